"""CPU serving speed: keras_vit's exports in every runtime beside timm, in one run (issue 18).

ViT-B/16 at 224 px with a 10-class head and random weights (the speed does
not depend on them), exported by `keras_vit.export_for_serving` in every
format, beside timm's `vit_base_patch16_224`:

    SavedModel      TF's serve_float signature, float32, and the export of a
                    mixed_bfloat16 copy (bf16 matmuls)
    OpenVINO        f32 and bf16 (INFERENCE_PRECISION_HINT), the LATENCY hint;
                    bf16 with the THROUGHPUT hint (one stream per core, the
                    batch split over them, asynchronous); int8 (NNCF's static
                    quantization, calibrated here on random pixels: fine for
                    speed; tests/test_serving_formats.py checks int8 accuracy
                    on real digits)
    ONNX Runtime    float32; int8 (dynamic quantization)
    LiteRT          float32; int8 (dynamic-range quantization), XNNPACK, all cores
    timm            eager and torch.compile, float32 and bf16 (torch.autocast),
                    under torch.inference_mode()

Each engine (SavedModel, OpenVINO, ONNX Runtime, LiteRT, timm) is a worker
process that loads and warms its contenders once, then waits; the parent
asks each in turn for one round, so only one runs at a time and a drift in
the machine's load hits every engine alike. A round of one contender: batch
--batch throughput (--repeats calls) and batch-1 latency (--latency-calls
calls). Printed: each contender's median img/s over the rounds with the
min-max spread, its batch-1 p50 and p99 latency over all calls, and the
ratios of keras_vit's best export to timm's best, in bf16 and in float32
(goals >= 1.3 and >= 1.0), and of their best batch-1 p50 latencies (goal
<= 1.0). The header names the CPU and whether it has AMX and AVX512_BF16.

    python benchmarks/serving_speed.py [--rounds 5] [--batch 8] [--repeats 3] [--latency-calls 10]
                                       [--engines savedmodel,openvino,onnx,litert,timm] [--tiny]

--tiny: a 2-block, 64-wide ViT at 32 px for a smoke test of the whole path.
Needs the `serving`, `parity` and `bench` extras (`.ci/run` installs them).
"""

import argparse
import math
import os
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workers import ROOT, Worker, cpu_description, describe, emit, serve_rounds  # noqa: E402
CLASSES = 10
B16 = dict(label="ViT-B/16", patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072, image_size=224)
TINY = dict(label="tiny ViT (32 px)", patch_size=8, hidden_size=64, depth=2, num_heads=2, mlp_dim=128, image_size=32)
ENGINES = ("savedmodel", "openvino", "onnx", "litert", "timm")
# Every contender: (engine, name, precision, is keras_vit).
CONTENDERS = (
    ("savedmodel", "SavedModel float32", "float32", True),
    ("savedmodel", "SavedModel bf16", "bf16", True),
    ("openvino", "OpenVINO f32", "float32", True),
    ("openvino", "OpenVINO bf16", "bf16", True),
    ("openvino", "OpenVINO bf16, THROUGHPUT hint", "bf16", True),
    ("openvino", "OpenVINO int8", "int8", True),
    ("onnx", "ONNX Runtime float32", "float32", True),
    ("onnx", "ONNX Runtime int8", "int8", True),
    ("litert", "LiteRT float32", "float32", True),
    ("litert", "LiteRT int8", "int8", True),
    ("timm", "timm eager float32", "float32", False),
    ("timm", "timm eager bf16", "bf16", False),
    ("timm", "timm torch.compile float32", "float32", False),
    ("timm", "timm torch.compile bf16", "bf16", False),
)


# --------------------------------------------------------------------------- the exports


EXPORTS = ("savedmodel_float32", "savedmodel_bf16", "openvino", "openvino_int8", "onnx", "onnx_int8", "litert",
           "litert_int8")


def write_export(folder, config, name):
    """One keras_vit export of the random-weight model (seed 0, the same in
    every process) into `folder`/<name>/1/."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    import keras
    import numpy as np

    import keras_vit
    from keras_vit import serving

    size = config["image_size"]

    def build():
        return keras_vit.ViT(patch_size=config["patch_size"], hidden_size=config["hidden_size"],
                             depth=config["depth"], num_heads=config["num_heads"], mlp_dim=config["mlp_dim"],
                             input_shape=(size, size, 3), classes=CLASSES)

    keras.utils.set_random_seed(0)
    model = build()
    keras.config.set_dtype_policy("mixed_bfloat16")
    bf16 = build()
    keras.config.set_dtype_policy("float32")
    bf16.set_weights(model.get_weights())
    assert bf16.get_layer("block_00").compute_dtype == "bfloat16" and model.get_layer("block_00").compute_dtype == "float32"
    calibration = np.random.default_rng(1).uniform(0, 255, (16, size, size, 3)).astype("float32")
    plan = {
        "savedmodel_float32": (model, dict()),
        "savedmodel_bf16": (bf16, dict()),
        "openvino": (model, dict(format="openvino")),
        "openvino_int8": (model, dict(format="openvino", quantize="int8", calibration_images=calibration)),
        "onnx": (model, dict(format="onnx")),
        "onnx_int8": (model, dict(format="onnx", quantize="int8")),
        "litert": (model, dict(format="litert")),
        "litert_int8": (model, dict(format="litert", quantize="int8")),
    }
    exported, options = plan[name]
    start = time.perf_counter()
    serving.export_for_serving(exported, os.path.join(folder, name), **options)
    print(f"exported {name} in {time.perf_counter() - start:.0f} s", flush=True)


# --------------------------------------------------------------------------- the workers


def load_contenders(engine, folder, config, batch):
    """{contender name: (batch call, batch-1 call)} of one engine, each taking its own input."""
    import numpy as np

    size = config["image_size"]
    pixels = np.random.default_rng(0).uniform(0, 255, (batch, size, size, 3)).astype("float32")
    one = pixels[:1]

    def version(name):
        return os.path.join(folder, name, "1")

    if engine == "savedmodel":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        import tensorflow as tf

        calls = {}
        for name, export in (("SavedModel float32", "savedmodel_float32"), ("SavedModel bf16", "savedmodel_bf16")):
            serve = tf.saved_model.load(version(export)).signatures["serve_float"]
            big, small = tf.constant(pixels), tf.constant(one)
            calls[name] = ((lambda s, x: lambda: s(images=x)["probabilities"].numpy())(serve, big),
                           (lambda s, x: lambda: s(images=x)["probabilities"].numpy())(serve, small))
        return calls
    if engine == "openvino":
        import openvino as ov

        core = ov.Core()

        def compiled(export, hint, performance="LATENCY"):
            path = os.path.join(version(export), "model.xml")
            return core.compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": hint, "PERFORMANCE_HINT": performance})

        def synchronous(model):
            return (lambda: model(pixels)[0]), (lambda: model(one)[0])

        throughput = compiled("openvino", "bf16", "THROUGHPUT")
        queue = ov.AsyncInferQueue(throughput, int(throughput.get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS")))
        chunks = np.array_split(pixels, len(queue))

        def asynchronous():
            for chunk in chunks:
                queue.start_async({0: chunk})
            queue.wait_all()

        latency_bf16 = compiled("openvino", "bf16")
        return {
            "OpenVINO f32": synchronous(compiled("openvino", "f32")),
            "OpenVINO bf16": synchronous(latency_bf16),
            "OpenVINO bf16, THROUGHPUT hint": (asynchronous, lambda: latency_bf16(one)[0]),
            # int8 layers run int8; OpenVINO's default precision (bf16 on CPUs with bf16 units) for the rest.
            "OpenVINO int8": synchronous(core.compile_model(os.path.join(version("openvino_int8"), "model.xml"), "CPU",
                                                            {"PERFORMANCE_HINT": "LATENCY"})),
        }
    if engine == "onnx":
        import onnxruntime

        def session(export):
            s = onnxruntime.InferenceSession(os.path.join(version(export), "model.onnx"),
                                             providers=["CPUExecutionProvider"])
            return (lambda: s.run(None, {"images": pixels})[0]), (lambda: s.run(None, {"images": one})[0])

        return {"ONNX Runtime float32": session("onnx"), "ONNX Runtime int8": session("onnx_int8")}
    if engine == "litert":
        from ai_edge_litert.interpreter import Interpreter

        def runners(export):
            path = os.path.join(version(export), "model.tflite")
            big, small = (Interpreter(model_path=path, num_threads=os.cpu_count()).get_signature_runner()
                          for _ in range(2))
            return (lambda: big(images=pixels)), (lambda: small(images=one))

        return {"LiteRT float32": runners("litert"), "LiteRT int8": runners("litert_int8")}
    if engine == "timm":
        import torch

        sys.modules.setdefault("triton", None)  # torchvision's triton is not needed on a CPU
        import timm

        if config is TINY:
            from timm.models.vision_transformer import VisionTransformer

            model = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=2, mlp_ratio=2.0,
                                      num_classes=CLASSES)
        else:
            model = timm.create_model("vit_base_patch16_224", pretrained=False, num_classes=CLASSES)
        model.eval()
        compiled = torch.compile(model)
        images = torch.from_numpy(np.random.default_rng(0).uniform(-1, 1, (batch, 3, size, size)).astype("float32"))

        def call(module, x, bf16):
            def run():
                with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                    return module(x)
            return run

        return {
            f"timm {kind} {precision}": (call(module, images, precision == "bf16"),
                                         call(module, images[:1], precision == "bf16"))
            for kind, module in (("eager", model), ("torch.compile", compiled))
            for precision in ("float32", "bf16")
        }
    raise ValueError(f"unknown engine {engine!r}")


def worker(args):
    """Loads and warms one engine's contenders, then runs a round per 'round' line on stdin."""
    config = TINY if args.tiny else B16
    start = time.perf_counter()
    try:
        calls = load_contenders(args.worker, args.folder, config, args.batch)
        for batch_call, single_call in calls.values():
            for _ in range(2):  # compiles (torch.compile, OpenVINO's first inference) outside the rounds
                batch_call()
                single_call()
    except Exception as error:  # a missing runtime or a failed load ends this engine, not the run
        emit(ready=False, error=describe(error))
        return
    emit(ready=True, contenders=list(calls), warmup_s=time.perf_counter() - start)

    def run_round():
        results = {}
        for name, (batch_call, single_call) in calls.items():
            begin = time.perf_counter()
            for _ in range(args.repeats):
                batch_call()
            img_s = args.batch * args.repeats / (time.perf_counter() - begin)
            latencies = []
            for _ in range(args.latency_calls):
                begin = time.perf_counter()
                single_call()
                latencies.append(1000 * (time.perf_counter() - begin))
            results[name] = dict(img_s=img_s, latency_ms=latencies)
        return results

    serve_rounds(run_round)


# --------------------------------------------------------------------------- the parent


def p99(values):
    """The nearest-rank 99th percentile: the smallest value at or above 99% of them."""
    values = sorted(values)
    return values[math.ceil(0.99 * len(values)) - 1]


def summarize(rounds):
    """{contender: [round results]} -> {contender: (median img/s, min, max, p50 ms, p99 ms)}."""
    summary = {}
    for name, results in rounds.items():
        speeds = [r["img_s"] for r in results]
        latencies = [ms for r in results for ms in r["latency_ms"]]
        summary[name] = (statistics.median(speeds), min(speeds), max(speeds),
                         statistics.median(latencies), p99(latencies))
    return summary


def best(summary, keras_vit, precisions, key):
    """(name, figure) of the best contender of one side in `precisions` by
    `key` (0: img/s, higher is better; 3: p50 ms, lower is better)."""
    candidates = [(name, summary[name][key]) for engine, name, precision, ours in CONTENDERS
                  if ours == keras_vit and precision in precisions and name in summary]
    if not candidates:
        return None
    return (max if key == 0 else min)(candidates, key=lambda item: item[1])


def print_table(summary, errors, header, args):
    print(header)
    print(f"batch {args.batch} throughput: median img/s over {args.rounds} rounds [min-max], {args.repeats} calls "
          f"a round; batch 1 latency: p50 and p99 ms over {args.rounds * args.latency_calls} calls")
    print(f"{'contender':32s} {'img/s':>8s} {'min':>8s} {'max':>8s} {'p50 ms':>9s} {'p99 ms':>9s}")
    for engine, name, _, _ in CONTENDERS:
        if name in summary:
            median, low, high, p50, p99 = summary[name]
            print(f"{name:32s} {median:8.2f} {low:8.2f} {high:8.2f} {p50:9.1f} {p99:9.1f}")
        elif engine in errors:
            print(f"{name:32s} not run: {errors[engine]}")
    comparisons = (("bf16", ("bf16",), "bf16", 1.3), ("bf16, int8 allowed", ("bf16", "int8"), "bf16", 1.3),
                   ("float32", ("float32",), "float32", 1.0))
    for label, ours_in, theirs_in, goal in comparisons:
        ours, theirs = best(summary, True, ours_in, 0), best(summary, False, (theirs_in,), 0)
        if ours and theirs:
            ratio = ours[1] / theirs[1]
            verdict = "meets" if ratio >= goal else "below"
            print(f"batch {args.batch}, {label}: keras_vit's best ({ours[0]}) / timm's best ({theirs[0]}) = "
                  f"{ratio:.2f} ({verdict} the goal >= {goal})")
    ours, theirs = best(summary, True, ("float32", "bf16", "int8"), 3), best(summary, False, ("float32", "bf16"), 3)
    if ours and theirs:
        ratio = ours[1] / theirs[1]
        verdict = "meets" if ratio <= 1.0 else "above"
        print(f"batch 1 p50 latency: keras_vit's best ({ours[0]}, {ours[1]:.1f} ms) / timm's best ({theirs[0]}, "
              f"{theirs[1]:.1f} ms) = {ratio:.2f} ({verdict} the goal <= 1.0)")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3, help="batch calls a round")
    parser.add_argument("--latency-calls", type=int, default=10, help="batch-1 calls a round")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT at 32 px: a smoke test")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--folder", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker(args)
    engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    config = TINY if args.tiny else B16
    header = (f"{config['label']}, {CLASSES} classes, random weights; {cpu_description()}; "
              f"load average before: {os.getloadavg()[0]:.2f}")
    print(header, flush=True)
    with tempfile.TemporaryDirectory(prefix="serving_speed_") as folder:
        start = time.perf_counter()
        needed = [name for name in EXPORTS if name.split("_")[0] in engines]
        for name in needed:  # a process each: ONNX's conversion alone peaks at 8 GB for ViT-B/16
            subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", "export", "--folder", folder,
                            "--export", name] + (["--tiny"] if args.tiny else []), check=True,
                           env=dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")))
        print(f"exports written in {time.perf_counter() - start:.0f} s", flush=True)
        workers, errors = [], {}
        for engine in engines:  # started one after the other: each warms up on a quiet machine
            started = Worker(__file__, ["--worker", engine, "--folder", folder, "--batch", str(args.batch),
                                        "--repeats", str(args.repeats), "--latency-calls", str(args.latency_calls)]
                             + (["--tiny"] if args.tiny else []))
            if started.ready.get("ready"):
                workers.append(started)
                print(f"{engine}: ready in {started.ready['warmup_s']:.0f} s", flush=True)
            else:
                errors[engine] = started.ready.get("error")
                started.close()
        rounds = {}
        for number in range(args.rounds):
            for running in workers:
                for name, result in running.round().items():
                    rounds.setdefault(name, []).append(result)
            print(f"round {number + 1} of {args.rounds} done", flush=True)
        for running in workers:
            running.close()
    print()
    print_table(summarize(rounds), errors, header + f"; load average after: {os.getloadavg()[0]:.2f}", args)


if __name__ == "__main__":
    if "--worker" in sys.argv and sys.argv[sys.argv.index("--worker") + 1] == "export":
        arguments = sys.argv[1:]
        write_export(arguments[arguments.index("--folder") + 1], TINY if "--tiny" in arguments else B16,
                     arguments[arguments.index("--export") + 1])
    else:
        sys.exit(main())
