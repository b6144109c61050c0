"""GPU speed of keras_vit on JAX and on torch beside timm + torch.compile (issue 12, goal 4).

ViT-B/16 and ViT-L/16 at 224 px in bf16, at one batch on one card:

- inference img/s: keras_vit `predict_on_batch`; timm `model(x)` under
  `torch.inference_mode()`;
- training-step img/s: an SGD step with a 10-class head on the class token
  and cross-entropy; keras_vit `compile(SGD, SparseCategoricalCrossentropy)`
  then `train_on_batch`; timm forward, loss, backward, `SGD.step()`.

Engines, each in its own process, one after the other (a process per engine
and model: the backend is chosen at import, and each frees the card for the
next):

    keras-jax    keras_vit, KERAS_BACKEND=jax, mixed_bfloat16, compile(jit_compile=True) (XLA)
    keras-jax-data  keras-jax under `--distribution data` (keras.distribution's DataParallel
                 over every card, as the examples run it), ViT-B/16 only
    timm         timm vit_*_patch16_224 (random weights), torch.compile, torch.autocast(bfloat16)
    keras-torch  keras_vit, KERAS_BACKEND=torch, mixed_bfloat16, eager (Keras's default on torch)

The images are on the card before timing (a jax array, a cuda tensor), so no
engine pays a host-to-card copy per step. Each figure is the median of
--rounds rounds with the slowest and fastest round beside it; warm-up
(tracing, XLA or Inductor compilation) is timed apart. Prints a table and the
ratio keras_vit-JAX / timm+compile (goal >= 1).

A global time guard (--budget seconds, 280 by default) keeps the whole run
inside the device machine's 5 minutes: the jobs run in order of importance
(keras-jax, timm and keras-jax-data, ViT-B/16 then ViT-L/16, then keras-torch), a phase that
would start in the last 10 s is skipped, rounds stop short of the deadline,
and a job still running at the deadline is stopped; whatever finished is
reported, the rest is marked "not run".

    python benchmarks/gpu_speed.py [--models B16,L16] [--batch 64] [--rounds 5]
                                   [--engines keras-jax,timm,keras-jax-data,keras-torch] [--budget 280]
                                   [--device auto|cuda|cpu] [--tiny]

--tiny: a 2-block, 64-wide ViT at 32 px (patch 8) for a CPU smoke test of the
whole path. `benchmarks/gpu.sh` wraps this script for the device machine.
"""

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workers import RESULT, ROOT, describe, emit  # noqa: E402

ENGINES = ("keras-jax", "timm", "keras-jax-data", "keras-torch")
ENGINE_LABELS = {
    "keras-jax": "keras_vit JAX (XLA)",
    "keras-jax-data": "keras_vit JAX, data par.",
    "timm": "timm torch.compile",
    "keras-torch": "keras_vit torch (eager)",
}
# The configurations of the paper (Table 1); timm's names for the same shapes.
MODELS = {
    "B16": dict(label="ViT-B/16", patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072,
                timm="vit_base_patch16_224", image_size=224),
    "L16": dict(label="ViT-L/16", patch_size=16, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096,
                timm="vit_large_patch16_224", image_size=224),
}
TINY = dict(label="tiny ViT (32 px)", patch_size=8, hidden_size=64, depth=2, num_heads=2, mlp_dim=128,
            timm=None, image_size=32)
PHASES = ("inference", "train")
CLASSES = 10


# --------------------------------------------------------------------------- worker side


def time_rounds(step, sync, batch, rounds, deadline, target_seconds):
    """Warm-up: three steps (the first traces and compiles); then `rounds`
    rounds of n steps each, n chosen so that a round lasts about
    target_seconds, stopping early rather than cross the deadline.
    Returns (seconds of the first step, [img/s of each round])."""
    start = time.perf_counter()
    step()
    sync()
    warmup = time.perf_counter() - start
    for _ in range(2):  # a second trace (torch.compile's guards, Keras's step counter) lands here, not in a round
        start = time.perf_counter()
        step()
        sync()
    one = max(time.perf_counter() - start, 1e-6)
    steps = max(2, min(200, int(target_seconds / one)))
    speeds = []
    for _ in range(rounds):
        if speeds and time.time() + 1.5 * one * steps > deadline:
            break
        start = time.perf_counter()
        for _ in range(steps):
            step()
        sync()
        speeds.append(batch * steps / (time.perf_counter() - start))
    return warmup, speeds


def run_phases(engine, model_key, args, make_inference, make_train, sync):
    for phase in PHASES:
        if args.deadline - time.time() < 10:
            emit(engine=engine, model=model_key, phase=phase, error="not run (time guard)")
            continue
        try:
            step = (make_inference if phase == "inference" else make_train)()
            warmup, speeds = time_rounds(step, sync, args.batch, args.rounds, args.deadline - 3, args.round_seconds)
        except Exception as error:  # an out-of-memory or a backend failure ends this phase, not the run
            emit(engine=engine, model=model_key, phase=phase, error=describe(error))
            continue
        emit(engine=engine, model=model_key, phase=phase, warmup_s=warmup, img_s=speeds)


def config_of(model_key, tiny):
    return TINY if tiny else MODELS[model_key]


def torch_device(torch, wanted):
    if wanted == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("the driver saw a GPU but torch.cuda.is_available() is False")
    return "cuda" if wanted == "cuda" else "cpu"


def worker_keras(args, backend, distribution=None):
    """keras_vit on `backend`; `distribution` ("data"): on JAX under
    `keras_vit.training.make_distribution`, the examples' --distribution."""
    os.environ["KERAS_BACKEND"] = backend
    import keras
    import numpy as np

    import keras_vit

    engine = f"keras-{backend}" + (f"-{distribution}" if distribution else "")
    if distribution:
        keras.distribution.set_distribution(keras_vit.training.make_distribution(distribution))

    cfg = config_of(args.model, args.tiny)
    size = cfg["image_size"]
    keras.config.set_dtype_policy("mixed_bfloat16")
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, (args.batch,)).astype("int32")
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        if distribution:  # the batch laid out over the devices as the distribution splits it
            layout = keras.distribution.distribution().get_data_layout
            images = keras.distribution.distribute_tensor(images, layout(images.shape))
            labels = keras.distribution.distribute_tensor(labels, layout(labels.shape))
        else:
            images, labels = jax.device_put(images, device), jax.device_put(labels, device)
        emit(info="device", engine=engine, name=f"{device.platform}: {device.device_kind}")

        def sync():
            pass  # predict_on_batch and train_on_batch return host values: each step ends synchronised
    else:
        import torch

        device = torch_device(torch, args.device)
        images, labels = torch.as_tensor(images, device=device), torch.as_tensor(labels, device=device)
        name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
        emit(info="device", engine=f"keras-{backend}", name=f"{device}: {name}")

        def sync():
            if device == "cuda":
                torch.cuda.synchronize()

    def build():
        # The 10-class head on the class token, logits out; no [0, 255] scaling (timm has none).
        return keras_vit.ViT(
            patch_size=cfg["patch_size"], hidden_size=cfg["hidden_size"], depth=cfg["depth"],
            num_heads=cfg["num_heads"], mlp_dim=cfg["mlp_dim"], input_shape=(size, size, 3),
            classes=CLASSES, classifier_activation=None, include_preprocessing=False, weights=None,
        )

    model = build()
    model.compile(
        optimizer=keras.optimizers.SGD(learning_rate=0.01),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        jit_compile=(backend == "jax"),
    )

    def make_inference():
        return lambda: model.predict_on_batch(images)

    def make_train():
        return lambda: model.train_on_batch(images, labels)

    run_phases(engine, args.model, args, make_inference, make_train, sync)


def worker_timm(args):
    import torch

    try:
        import timm
    except ImportError as error:
        emit(engine="timm", model=args.model, phase="all", error=f"timm is not installed ({error})")
        return
    cfg = config_of(args.model, args.tiny)
    size = cfg["image_size"]
    device = torch_device(torch, args.device)
    name = torch.cuda.get_device_name() if device == "cuda" else "cpu"
    emit(info="device", engine="timm", name=f"{device}: {name}")
    if device == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    if args.tiny:
        from timm.models.vision_transformer import VisionTransformer

        model = VisionTransformer(
            img_size=size, patch_size=cfg["patch_size"], embed_dim=cfg["hidden_size"], depth=cfg["depth"],
            num_heads=cfg["num_heads"], mlp_ratio=cfg["mlp_dim"] / cfg["hidden_size"], num_classes=CLASSES,
        )
    else:
        model = timm.create_model(cfg["timm"], pretrained=False, num_classes=CLASSES)
    model = model.to(device)
    if args.timm_compile == "regional":
        for block in model.blocks:  # compile one block, reuse it for all (shorter compile)
            block.compile()
        compiled = model
    else:
        compiled = torch.compile(model)
    generator = torch.Generator().manual_seed(0)
    images = (torch.rand(args.batch, 3, size, size, generator=generator) * 2 - 1).to(device)
    labels = torch.randint(0, CLASSES, (args.batch,), generator=generator).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    loss_fn = torch.nn.CrossEntropyLoss()

    def sync():
        if device == "cuda":
            torch.cuda.synchronize()

    def make_inference():
        model.eval()

        def step():
            with torch.inference_mode(), torch.autocast(device, dtype=torch.bfloat16):
                return compiled(images)

        return step

    def make_train():
        model.train()

        def step():
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast(device, dtype=torch.bfloat16):
                loss = loss_fn(compiled(images), labels)
            loss.backward()
            optimizer.step()

        return step

    run_phases("timm", args.model, args, make_inference, make_train, sync)


def worker(args):
    try:
        if args.worker == "timm":
            worker_timm(args)
        else:
            _, backend, *distribution = args.worker.split("-")
            worker_keras(args, backend, *distribution)
    except ImportError as error:
        emit(engine=args.worker, model=args.model, phase="all", error=f"not installed: {error}")
    except Exception as error:  # no usable device, a failed build: one line in the table
        emit(engine=args.worker, model=args.model, phase="all", error=describe(error))


# --------------------------------------------------------------------------- driver side


def detect_device(choice):
    if choice != "auto":
        return choice
    smi = shutil.which("nvidia-smi")
    if smi:
        try:
            listed = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20).stdout
            if "GPU" in listed:
                return "cuda"
        except (OSError, subprocess.SubprocessError):
            pass
    return "cpu"


def job_env(device):
    env = dict(os.environ)
    env["PYTHONPATH"] = ROOT + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    env["PYTHONUNBUFFERED"] = "1"
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    if device == "cpu":
        env["JAX_PLATFORMS"] = "cpu"
        env["CUDA_VISIBLE_DEVICES"] = ""
    else:
        env.setdefault("JAX_PLATFORMS", "cuda")  # fail loudly rather than fall back to the CPU
    return env


def run_job(engine, model_key, args, device, deadline):
    """Runs one worker process; returns its result records and its wall time."""
    command = [sys.executable, os.path.abspath(__file__), "--worker", engine, "--model", model_key,
               "--batch", str(args.batch), "--rounds", str(args.rounds),
               "--round-seconds", str(args.round_seconds), "--deadline", repr(deadline),
               "--timm-compile", args.timm_compile, "--device", device]
    if args.tiny:
        command.append("--tiny")
    records, tail = [], []
    log = open(os.path.join(args.log_dir, f"{engine}_{model_key}.log"), "w") if args.log_dir else None
    start = time.time()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                               env=job_env(device), cwd=ROOT, start_new_session=True)
    def read():
        for line in process.stdout:
            if log:
                log.write(line)
                log.flush()
            if line.startswith(RESULT):
                records.append(json.loads(line[len(RESULT):]))
            else:
                tail.append(line.rstrip())
                del tail[:-15]
                if args.verbose:
                    print("    | " + line.rstrip(), flush=True)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        process.wait(timeout=max(1.0, deadline - time.time()))
    except subprocess.TimeoutExpired:
        # The worker's own process group: it and torch.compile's compile workers, nothing else.
        try:
            os.killpg(process.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        process.wait()
        records.append(dict(engine=engine, model=model_key, phase="all",
                            error="stopped at the global time guard"))
    reader.join(timeout=5)
    if log:
        log.close()
    if process.returncode not in (0, None) and not any("error" in r or "img_s" in r for r in records
                                                        if r.get("info") is None):
        last = next((line for line in reversed(tail) if line.strip()), "no output")
        records.append(dict(engine=engine, model=model_key, phase="all",
                            error=f"exit status {process.returncode}: {last[-200:]}"))
    return records, time.time() - start


def summarise(speeds):
    return statistics.median(speeds), min(speeds), max(speeds)


def speed(value):
    return f"{value:9.1f}" if value >= 10 else f"{value:9.3f}"  # a CPU's 0.3 img/s keeps its digits


def runs(engine, model_key):
    """Whether `engine` runs `model_key`: the data-parallel path is timed on ViT-B/16 (or the tiny model) only."""
    return engine != "keras-jax-data" or model_key in ("B16", "tiny")


def print_table(results, device_names, models, engines, args, device, wall):
    cfgs = {key: config_of(key, args.tiny) for key in models}
    print()
    names = "; ".join(f"{e}: {n}" for e, n in device_names.items()) or device
    size = next(iter(cfgs.values()))["image_size"]
    print(f"keras_vit GPU speed (issue 12, goal 4): batch {args.batch}, {size} px, bf16 "
          f"(keras mixed_bfloat16, timm autocast bfloat16), median of up to {args.rounds} rounds, "
          f"{wall:.0f} s in all")
    print(f"device: {names}")
    header = f"{'model':<16} {'phase':<9} {'engine':<24} {'img/s':>9} {'min':>9} {'max':>9} {'rounds':>6} {'warm-up s':>9}"
    print(header)
    print("-" * len(header))
    for key in models:
        for phase in PHASES:
            for engine in [e for e in engines if runs(e, key)]:
                record = results.get((engine, key, phase))
                row = f"{cfgs[key]['label']:<16} {phase:<9} {ENGINE_LABELS[engine]:<24} "
                if record is None:
                    print(row + "not run (time guard)")
                elif "error" in record:
                    print(row + record["error"])
                else:
                    figures = " ".join(speed(value) for value in summarise(record["img_s"]))
                    print(row + f"{figures} {len(record['img_s']):6d} {record['warmup_s']:9.1f}")
    print()
    for key in models:
        for phase in PHASES:
            jax_record = results.get(("keras-jax", key, phase))
            timm_record = results.get(("timm", key, phase))
            label = f"{cfgs[key]['label']} {phase}"
            if jax_record and timm_record and "img_s" in jax_record and "img_s" in timm_record:
                ratio = summarise(jax_record["img_s"])[0] / summarise(timm_record["img_s"])[0]
                verdict = "meets" if ratio >= 1 else "below"
                print(f"ratio keras_vit-JAX / timm+compile, {label}: {ratio:.3f} ({verdict} the goal >= 1)")
            else:
                print(f"ratio keras_vit-JAX / timm+compile, {label}: n/a (a figure is missing)")


def driver(args):
    t0 = time.time()
    device = detect_device(args.device)
    models = ["tiny"] if args.tiny else [m.strip().upper().replace("/", "") for m in args.models.split(",")]
    for key in models:
        if key != "tiny" and key not in MODELS:
            sys.exit(f"unknown model {key!r}: choose from {', '.join(MODELS)}")
    engines = [e.strip() for e in args.engines.split(",")]
    for engine in engines:
        if engine not in ENGINES:
            sys.exit(f"unknown engine {engine!r}: choose from {', '.join(ENGINES)}")
    # The goal compares keras-jax with timm: those jobs first, model by model; keras-torch last.
    jobs = [(e, m) for m in models for e in engines if e != "keras-torch" and runs(e, m)]
    jobs += [(e, m) for m in models for e in engines if e == "keras-torch"]
    deadline = t0 + args.budget
    print(f"gpu_speed: device {device}, models {','.join(models)}, engines {','.join(engines)}, "
          f"batch {args.batch}, rounds {args.rounds}, budget {args.budget:.0f} s", flush=True)
    results, device_names = {}, {}
    for engine, model_key in jobs:
        left = deadline - time.time()
        if left < 5:
            print(f"  {engine} {model_key}: not run, the time guard's budget is spent", flush=True)
            continue
        records, seconds = run_job(engine, model_key, args, device, deadline)
        for record in records:
            if record.get("info") == "device":
                device_names[record["engine"]] = record["name"]
                continue
            phases = PHASES if record.get("phase") == "all" else (record["phase"],)
            for phase in phases:
                results.setdefault((engine, model_key, phase), record)
        done = [p for p in PHASES if "img_s" in results.get((engine, model_key, p), {})]
        print(f"  {engine} {model_key}: {seconds:.0f} s, measured {', '.join(done) or 'nothing'}", flush=True)
    print_table(results, device_names, models, engines, args, device, time.time() - t0)
    measured = sum("img_s" in r for r in results.values())
    return 0 if measured else 1


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="B16,L16", help="comma-separated: B16, L16")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--batch", type=int, default=None, help="64 by default, 8 with --tiny")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--round-seconds", type=float, default=None,
                        help="about how long a timed round lasts (0.5 s; 0.2 s with --tiny)")
    parser.add_argument("--budget", type=float, default=280.0, help="global time guard, seconds")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--timm-compile", default="full", choices=("full", "regional"),
                        help="torch.compile the whole timm model (default) or each block (faster to compile)")
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT at 32 px: a CPU smoke test")
    parser.add_argument("--verbose", action="store_true", help="show the workers' own output")
    parser.add_argument("--log-dir", help="write each worker's whole output to DIR/ENGINE_MODEL.log")
    parser.add_argument("--worker", choices=ENGINES, help=argparse.SUPPRESS)
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--deadline", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.batch is None:
        args.batch = 8 if args.tiny else 64
    if args.round_seconds is None:
        args.round_seconds = 0.2 if args.tiny else 0.5
    if args.worker:
        worker(args)
        return 0
    return driver(args)


if __name__ == "__main__":
    sys.exit(main())
