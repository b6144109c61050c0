"""Speed inside Keras on every backend, beside timm and keras_hub, in one run (issue 19).

ViT-B/16 (--model) at 224 px, batch 8, a 10-class softmax head, random
weights, in float32 and in bf16, as a user runs them:

    predict      keras_vit and keras_hub: `model.predict_on_batch(x)`;
                 timm: `model(x)` under `torch.inference_mode()`
    train step   keras_vit and keras_hub: `compile(SGD(), sparse categorical
                 cross-entropy)` with Keras's other defaults, then
                 `train_on_batch(x, y)`; timm: forward, cross-entropy,
                 backward, `SGD.step()`, eager
    bf16         Keras: the `mixed_bfloat16` dtype policy (each model's
                 compute dtype is asserted); timm: `torch.autocast(bfloat16)`
    bf16 weights predict only: Keras: the `bfloat16` policy (bf16 variables,
                 keras_vit's head float32: `keras_vit.ViT(dtype="bfloat16")`);
                 timm: a copy of the model in bf16 (`.to(torch.bfloat16)`), no
                 autocast. Nothing is cast to bf16 at each call.

Engines, each a worker process (benchmarks/workers.py): keras_vit on
KERAS_BACKEND=tensorflow, jax (XLA, Keras's default `jit_compile` there) and
torch (eager, Keras's default there, and with `compile(jit_compile=True)`,
which Keras runs through torch.compile); keras_hub's ViTBackbone with the same
head on TensorFlow; timm's VisionTransformer of the same shape, eager (the
way a timm user runs it; torch.compile is in benchmarks/serving_speed.py).

The roofline: this machine's matmul throughput for the model's largest
matmul (its MLP at this batch: batch*tokens x width . width x mlp_dim), in
float32 and bf16, through TensorFlow and through torch, each call a run of
matmuls lasting about a second so that the bf16 units are warm. Divided into
the forward FLOPs it is the img/s a forward pass would reach if every FLOP
ran at that speed.

Every figure is the median of --rounds rounds with the min-max; in each round
every engine runs every contender in turn. Printed: the CPU (AMX,
AVX512_BF16), a table of img/s with each figure's ratio to timm's, the
ratios issue 19 sets goals for, and keras_vit on torch beside timm with the
tanh GELU (engine timm_tanh): timm's default GELU is the exact (erf) one,
whose torch CPU kernel is several times faster than the tanh form that
keras_vit and the official model use.

    python benchmarks/speed.py [--model B/16] [--batch 8] [--rounds 5] [--repeats 1]
                               [--engines tensorflow,jax,torch,torch_compiled,keras_hub,timm,timm_tanh] [--tiny]

--tiny: a 2-block, 64-wide ViT at 32 px: a smoke test of the whole path.
Needs the `bench` and `parity` extras (keras_hub, timm; `.ci/run` installs them).
"""

import argparse
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from workers import ROOT, Worker, cpu_description, describe, emit, serve_rounds  # noqa: E402

sys.path.insert(0, ROOT)
from keras_vit import sizes, variants  # noqa: E402  (neither imports keras)

CLASSES = 10
TINY = dict(patch_size=8, hidden_size=64, depth=2, num_heads=2, mlp_dim=128)
ENGINES = {  # engine: (label, KERAS_BACKEND of its process)
    "tensorflow": ("keras_vit TensorFlow", "tensorflow"),
    "jax": ("keras_vit JAX", "jax"),
    "torch": ("keras_vit torch", "torch"),
    "torch_compiled": ("keras_vit torch, jit", "torch"),  # compile(jit_compile=True): torch.compile
    "keras_hub": ("keras_hub TensorFlow", "tensorflow"),
    "timm": ("timm eager", "torch"),
    "timm_tanh": ("timm eager, tanh GELU", "torch"),  # keras_vit's (the official) GELU: the same math
}
TIMM_ACT_LAYERS = {"timm": None, "timm_tanh": "gelu_tanh"}  # timm's engines: act_layer (None: timm's default)
ROOFLINES = {"tensorflow": "TensorFlow", "timm": "torch"}  # the engines that also time the roofline matmul
PRECISIONS = ("float32", "bf16")  # trained in, and the rooflines'
PHASES = ("predict", "train")
COLUMNS = [("predict", "float32"), ("predict", "bf16"), ("predict", "bf16w"), ("train", "float32"), ("train", "bf16")]
POLICIES = {"float32": "float32", "bf16": "mixed_bfloat16", "bf16w": "bfloat16"}  # Keras's, per precision
# Issue 19's goals: (engine, phase, precision) -> the least ratio to timm.
GOALS = {
    ("torch", "predict", "bf16"): 1.0, ("torch", "train", "bf16"): 1.0, ("torch", "predict", "float32"): 0.95,
    ("tensorflow", "predict", "bf16"): 0.7, ("tensorflow", "train", "bf16"): 0.8,
    ("tensorflow", "predict", "float32"): 0.95,
}


def shape_of(args):
    """(configuration, image size, forward FLOPs per image, roofline matmul (rows, inner, cols))."""
    config = TINY if args.tiny else variants.VARIANTS[args.model]
    size = 32 if args.tiny else args.image_size
    tokens = (size // config["patch_size"]) ** 2 + 1
    flops = 2 * sizes.multiply_accumulates(**config, image_size=size, classes=CLASSES)
    return config, size, flops, (args.batch * tokens, config["hidden_size"], config["mlp_dim"])


# --------------------------------------------------------------------------- the workers


def keras_contenders(engine, config, size, images, labels):
    """{(phase, precision): call} of keras_vit or keras_hub on this process's backend."""
    import keras
    import numpy as np

    def build():
        if engine == "keras_hub":
            from keras_hub.models import ViTBackbone

            backbone = ViTBackbone(image_shape=(size, size, 3), patch_size=config["patch_size"],
                                   num_layers=config["depth"], num_heads=config["num_heads"],
                                   hidden_dim=config["hidden_size"], mlp_dim=config["mlp_dim"])
            outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(backbone.output[:, 0, :])
            return keras.Model(backbone.input, outputs)
        import keras_vit

        return keras_vit.ViT(**config, classes=CLASSES, include_preprocessing=False, input_shape=(size, size, 3))

    calls = {}
    for precision, policy in POLICIES.items():
        keras.config.set_dtype_policy(policy)
        try:
            model = build()
        finally:
            keras.config.set_dtype_policy("float32")
        compute = {layer.compute_dtype for layer in model.layers if layer.weights}
        stored = {weight.dtype for weight in model.weights}
        expected = "float32" if precision == "float32" else "bfloat16"
        assert expected in compute and (precision != "float32" or compute == {"float32"}), (engine, precision, compute)
        assert (precision == "bf16w") == ("bfloat16" in stored), (engine, precision, stored)
        model.compile(optimizer=keras.optimizers.SGD(), loss="sparse_categorical_crossentropy",
                      jit_compile=True if engine == "torch_compiled" else "auto")
        calls["predict", precision] = (lambda m: lambda: np.asarray(m.predict_on_batch(images)))(model)
        if precision in PRECISIONS:
            calls["train", precision] = (lambda m: lambda: float(m.train_on_batch(images, labels)))(model)
    return calls


def timm_contenders(config, size, images, labels, act_layer=None):
    """{(phase, precision): call} of timm's ViT of the same shape, eager: its own
    default GELU (exact, erf), or `act_layer="gelu_tanh"`, keras_vit's."""
    import copy

    import torch

    sys.modules.setdefault("triton", None)  # not needed on a CPU
    from timm.models.vision_transformer import VisionTransformer

    model = VisionTransformer(img_size=size, patch_size=config["patch_size"], embed_dim=config["hidden_size"],
                              depth=config["depth"], num_heads=config["num_heads"],
                              mlp_ratio=config["mlp_dim"] / config["hidden_size"], num_classes=CLASSES,
                              act_layer=act_layer)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    x = torch.from_numpy(images.transpose(0, 3, 1, 2).copy())
    y = torch.from_numpy(labels)
    bf16_copy = copy.deepcopy(model).to(torch.bfloat16).eval()

    def predict(bf16):
        def run():
            model.eval()
            with torch.inference_mode(), torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                return model(x).float().numpy()
        return run

    def predict_bf16_weights():
        with torch.inference_mode():
            return bf16_copy(x.to(torch.bfloat16)).float().numpy()

    def train(bf16):
        def run():
            model.train()
            optimizer.zero_grad(set_to_none=True)
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            optimizer.step()
            return float(loss.detach())
        return run

    calls = {(phase, precision): (predict if phase == "predict" else train)(precision == "bf16")
             for phase in PHASES for precision in PRECISIONS}
    calls["predict", "bf16w"] = predict_bf16_weights
    return calls


def roofline_contenders(engine, shape):
    """{("roofline", precision): call of one rows x inner . inner x cols matmul}, through TF or torch."""
    rows, inner, cols = shape
    calls = {}
    for precision in PRECISIONS:
        if engine == "tensorflow":
            import tensorflow as tf

            dtype = tf.bfloat16 if precision == "bf16" else tf.float32
            a, b = (tf.cast(tf.random.normal(s), dtype) for s in ((rows, inner), (inner, cols)))
            calls["roofline", precision] = (lambda f, a, b: lambda: f(a, b).numpy())(tf.function(tf.matmul), a, b)
        else:
            import torch

            dtype = torch.bfloat16 if precision == "bf16" else torch.float32
            a, b = torch.randn(rows, inner, dtype=dtype), torch.randn(inner, cols, dtype=dtype)
            calls["roofline", precision] = (lambda a, b: lambda: torch.matmul(a, b))(a, b)
    return calls


def lasting(call, seconds):
    """(call repeated n times, n): n such that the repeated call lasts about `seconds`."""
    call()
    start = time.perf_counter()
    call()
    n = max(1, round(seconds / max(time.perf_counter() - start, 1e-6)))

    def repeated():
        for _ in range(n):
            call()
    return repeated, n


def worker(args):
    """Loads and warms one engine's contenders, then times a round per 'round' line on stdin."""
    import numpy as np

    config, size, _, shape = shape_of(args)
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (args.batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, args.batch)
    start = time.perf_counter()
    try:
        if args.worker.startswith("timm"):
            calls = timm_contenders(config, size, images, labels, TIMM_ACT_LAYERS[args.worker])
        else:
            calls = keras_contenders(args.worker, config, size, images, labels)
        for call in calls.values():  # tracing, XLA compilation, first allocations: outside the rounds
            call()
            call()
        matmuls = {}
        if args.worker in ROOFLINES:
            for key, call in roofline_contenders(args.worker, shape).items():
                calls[key], matmuls[key] = lasting(call, seconds=1.0)
    except Exception as error:  # a missing package or a failed build ends this engine, not the run
        emit(ready=False, error=describe(error))
        return
    emit(ready=True, warmup_s=time.perf_counter() - start)
    matmul_flops = 2 * shape[0] * shape[1] * shape[2]

    def run_round():
        results = {}
        for key, call in calls.items():
            repeats = 1 if key in matmuls else args.repeats
            begin = time.perf_counter()
            for _ in range(repeats):
                call()
            seconds = (time.perf_counter() - begin) / repeats
            # img/s for a model; GFLOP/s for a roofline.
            results["/".join(key)] = (matmuls[key] * matmul_flops / 1e9 if key in matmuls else args.batch) / seconds
        return results

    serve_rounds(run_round)


# --------------------------------------------------------------------------- the parent


def spread(values):
    return statistics.median(values), min(values), max(values)


def print_report(rounds, errors, header, flops, engines, args):
    """rounds: {engine: {"phase/precision": [figure per round]}}."""
    print(header)
    print(f"img/s at batch {args.batch}: median over {args.rounds} rounds [min-max], "
          f"{args.repeats} call(s) a round; (x timm): the ratio of the medians")
    timm = {key: statistics.median(values) for key, values in rounds.get("timm", {}).items()}
    columns = [f"{phase}/{precision}" for phase, precision in COLUMNS]
    print(f"{'':22s}" + "".join(f" {column.replace('/', ' ').replace('bf16w', 'bf16 weights'):>31s}"
                                for column in columns))
    for engine in engines:
        label = ENGINES[engine][0]
        if engine in errors:
            print(f"{label:22s} not run: {errors[engine]}")
            continue
        cells = []
        for column in columns:
            values = rounds[engine].get(column)
            if not values:
                cells.append("")
                continue
            median, low, high = spread(values)
            ratio = f" ({median / timm[column]:.2f}x)" if engine != "timm" and timm.get(column) else ""
            cells.append(f"{median:.2f} [{low:.2f}-{high:.2f}]{ratio}")
        print(f"{label:22s}" + "".join(f" {cell:>31s}" for cell in cells))
    for engine, framework in ROOFLINES.items():
        for precision in PRECISIONS:
            values = rounds.get(engine, {}).get(f"roofline/{precision}")
            if values:
                median, low, high = spread(values)
                print(f"roofline through {framework}, {precision}: {median:.0f} [{low:.0f}-{high:.0f}] GFLOP/s "
                      f"= {median * 1e9 / flops:.2f} img/s if a forward pass ran at that speed")
    for (engine, phase, precision), goal in GOALS.items():
        values, theirs = rounds.get(engine, {}).get(f"{phase}/{precision}"), timm.get(f"{phase}/{precision}")
        if values and theirs:
            ratio = statistics.median(values) / theirs
            print(f"goal: {ENGINES[engine][0]} {phase} {precision} / timm = {ratio:.2f} "
                  f"({'meets' if ratio >= goal else 'below'} the goal >= {goal})")
    # timm's ViT uses the exact GELU, keras_vit the official tanh form, whose
    # kernel is several times slower on PyTorch's CPU: the same math, side by side.
    same = {key: statistics.median(values) for key, values in rounds.get("timm_tanh", {}).items()}
    for engine in ("torch", "torch_compiled"):
        for column, values in rounds.get(engine, {}).items():
            if same.get(column):
                print(f"same GELU: {ENGINES[engine][0]} {column.replace('/', ' ')} / timm with tanh GELU = "
                      f"{statistics.median(values) / same[column]:.2f}")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="B/16", help=f"one of {', '.join(variants.VARIANTS)}")
    parser.add_argument("--image-size", dest="image_size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=1, help="calls of each contender a round")
    parser.add_argument("--engines", default=",".join(ENGINES))
    parser.add_argument("--tiny", action="store_true", help="a tiny ViT at 32 px: a smoke test")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.model not in variants.VARIANTS:
        parser.error(f"unknown model {args.model!r}; choose from {', '.join(variants.VARIANTS)}")
    if args.worker:
        return worker(args)
    engines = [engine.strip() for engine in args.engines.split(",") if engine.strip()]
    unknown = sorted(set(engines) - set(ENGINES))
    if unknown:
        parser.error(f"unknown engines {unknown}; choose from {', '.join(ENGINES)}")
    config, size, flops, _ = shape_of(args)
    label = "tiny ViT" if args.tiny else f"ViT-{args.model}"
    header = (f"{label} at {size} px, {CLASSES} classes, random weights, forward {flops / 1e9:.3g} GFLOP/image; "
              f"{cpu_description()}; load average before: {os.getloadavg()[0]:.2f}")
    print(header, flush=True)
    workers, errors = {}, {}
    options = ["--model", args.model, "--image-size", str(size), "--batch", str(args.batch),
               "--repeats", str(args.repeats)] + (["--tiny"] if args.tiny else [])
    for engine in engines:  # started one after the other: each warms up on a quiet machine
        started = Worker(__file__, ["--worker", engine] + options,
                         env={"KERAS_BACKEND": ENGINES[engine][1], "TF_CPP_MIN_LOG_LEVEL": "3"})
        if started.ready.get("ready"):
            workers[engine] = started
            print(f"{engine}: ready in {started.ready['warmup_s']:.0f} s", flush=True)
        else:
            errors[engine] = started.ready.get("error")
            started.close()
    rounds = {engine: {} for engine in workers}
    for number in range(args.rounds):
        for engine, running in workers.items():
            for key, figure in running.round().items():
                rounds[engine].setdefault(key, []).append(figure)
        print(f"round {number + 1} of {args.rounds} done", flush=True)
    for running in workers.values():
        running.close()
    print()
    print_report(rounds, errors, header + f"; load average after: {os.getloadavg()[0]:.2f}", flops, engines, args)


if __name__ == "__main__":
    sys.exit(main())
