"""Speed of keras_vit beside keras_hub and beside this machine's matmul limit, in one run.

For each model (ViT-B/16 and ViT-L/16 at 224 px, batch 8, TensorFlow backend):

- roofline: the best matmul throughput of this machine, measured in the same
  run, for the model's largest matmul (its MLP at this batch: batch*tokens x
  width . width x mlp_dim; 1576x768 . 768x3072 for ViT-B/16), in float32 and
  bfloat16. Divided by the model's forward FLOPs (2x `sizes.multiply_accumulates`)
  it is the img/s the model would reach if every FLOP ran at that speed.
- inference: img/s through `model.predict_on_batch(x)` and through a plain
  `model(x)` under `tf.function`, in float32, mixed_bfloat16 and int8
  (`model.quantize("int8")`, float32 otherwise), keras_vit beside
  `keras_hub.models.ViTBackbone` of the same configuration (both: encoder
  without head or input scaling), as a fraction of the roofline and as the
  ratio keras_vit / keras_hub. Goals: >= 85% of the roofline in bf16, >= 90%
  in float32.
- training step: `compile(optimizer=SGD(), loss=...)` with Keras's defaults,
  then `train_on_batch`, with a 10-class softmax head on the class token, in
  float32 and mixed_bfloat16, keras_vit beside keras_hub, as the ratio
  (goals: >= 2.0 in bf16, >= 1.1 in float32) and as a fraction of 3x the
  forward roofline (a training step does about 3x the forward FLOPs; goal 85%).

Every figure is the median over --rounds rounds with its min-max; in each
round every contender (roofline matmuls included) runs --repeats batches in
turn, so machine load spreads over all of them alike.

    python benchmarks/speed.py [--models B/16,L/16] [--train_models B/16] [--batch 8]
                               [--rounds 5] [--repeats 2] [--precisions float32,mixed_bfloat16,int8]
"""

import argparse
import os
import platform
import statistics
import time
import warnings

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import keras_vit  # noqa: E402

CLASSES = 10
GOALS = {  # what issue 12 asks of each figure
    ("inference", "float32"): "goal >= 90% of roofline",
    ("inference", "mixed_bfloat16"): "goal >= 85% of roofline",
    ("training", "float32"): "goal >= 1.1x keras_hub, 85% of 3x roofline",
    ("training", "mixed_bfloat16"): "goal >= 2.0x keras_hub, 85% of 3x roofline",
}


# ---------------------------------------------------------------------------
# The contenders
# ---------------------------------------------------------------------------


def keras_vit_model(config, image_size, head):
    return keras_vit.ViT(
        **config,
        include_top=head,
        classes=CLASSES,
        include_preprocessing=False,
        input_shape=(image_size, image_size, 3),
    )


def keras_hub_model(config, image_size, head):
    from keras_hub.models import ViTBackbone

    backbone = ViTBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=config["patch_size"],
        num_layers=config["depth"],
        num_heads=config["num_heads"],
        hidden_dim=config["hidden_size"],
        mlp_dim=config["mlp_dim"],
    )
    if not head:
        return backbone
    class_token = backbone.output[:, 0, :]
    outputs = keras.layers.Dense(CLASSES, activation="softmax", name="head")(class_token)
    return keras.Model(backbone.input, outputs)


BUILDERS = {"keras_vit": keras_vit_model, "keras_hub": keras_hub_model}


def build(engine, config, image_size, precision, head=False):
    """A model in `precision`; "int8" is a float32 model after `model.quantize("int8")`."""
    keras.config.set_dtype_policy("float32" if precision == "int8" else precision)
    try:
        model = BUILDERS[engine](config, image_size, head)
    finally:
        keras.config.set_dtype_policy("float32")
    if precision == "int8":
        with warnings.catch_warnings():  # "Layer X does not have a `quantize` method": expected
            warnings.simplefilter("ignore")
            model.quantize("int8")
    return model


def inference_calls(model, images):
    """The two ways users run inference: predict_on_batch, and model(x) in a tf.function."""
    graph_call = tf.function(lambda x: model(x, training=False))
    return {
        "predict_on_batch": lambda: np.asarray(model.predict_on_batch(images)),
        "tf.function": lambda: graph_call(images).numpy(),
    }


def training_call(model, images, labels):
    model.compile(optimizer=keras.optimizers.SGD(), loss="sparse_categorical_crossentropy")
    return lambda: float(model.train_on_batch(images, labels))


def roofline_call(rows, inner, cols, dtype):
    """A call of one matmul of the model's MLP shape, (rows x inner) . (inner x cols), in `dtype`."""
    a = tf.cast(tf.random.normal((rows, inner)), dtype)
    b = tf.cast(tf.random.normal((inner, cols)), dtype)
    matmul = tf.function(tf.matmul)
    return lambda: matmul(a, b).numpy()


# ---------------------------------------------------------------------------
# Timing: rounds, each contender in turn
# ---------------------------------------------------------------------------


def seconds_per_call(contenders, rounds, repeats):
    """{name: [seconds per call, one per round]}, contenders interleaved within each round."""
    for call in contenders.values():  # warm-up: tracing, graph optimisation, first allocations
        call()
        call()
    times = {name: [] for name in contenders}
    for _ in range(rounds):
        for name, call in contenders.items():
            start = time.perf_counter()
            for _ in range(repeats):
                call()
            times[name].append((time.perf_counter() - start) / repeats)
    return times


def rate(per_call_seconds, amount):
    """amount per second: (median, min, max) over the rounds."""
    rates = sorted(amount / s for s in per_call_seconds)
    return statistics.median(rates), rates[0], rates[-1]


def spread(figure, fmt="{:.2f}"):
    median, low, high = figure
    return f"{fmt.format(median)} [{fmt.format(low)}-{fmt.format(high)}]"


# ---------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------


def benchmark_model(variant, args, train):
    config = keras_vit.VARIANTS[variant]
    size, batch = args.image_size, args.batch
    tokens = (size // config["patch_size"]) ** 2 + 1
    forward_flops = 2 * keras_vit.sizes.multiply_accumulates(**config, image_size=size, classes=0)
    shape = (batch * tokens, config["hidden_size"], config["mlp_dim"])
    matmul_flops = 2 * shape[0] * shape[1] * shape[2]
    rng = np.random.default_rng(0)
    images = rng.uniform(-1, 1, (batch, size, size, 3)).astype("float32")
    labels = rng.integers(0, CLASSES, batch)

    print(f"\n## ViT-{variant}, {size}x{size}, batch {batch}: forward {forward_flops / 1e9:.1f} GFLOP/image")
    roofline_dtypes = {"float32": tf.float32, "mixed_bfloat16": tf.bfloat16}
    for precision in args.precisions:
        contenders = {}
        roofline_dtype = roofline_dtypes.get(precision, tf.float32)
        contenders["roofline"] = roofline_call(*shape, roofline_dtype)
        for engine in BUILDERS:
            model = build(engine, config, size, precision)
            for call, fn in inference_calls(model, images).items():
                contenders[(engine, "inference", call)] = fn
            if train and precision != "int8":
                contenders[(engine, "training", "train_on_batch")] = training_call(
                    build(engine, config, size, precision, head=True), images, labels
                )
        times = seconds_per_call(contenders, args.rounds, args.repeats)
        roofline_gflops = rate(times.pop("roofline"), matmul_flops / 1e9)
        roofline_images = roofline_gflops[0] * 1e9 / forward_flops
        print(
            f"\n{precision}: roofline {spread(roofline_gflops, '{:.0f}')} GFLOP/s "
            f"({'bfloat16' if roofline_dtype == tf.bfloat16 else 'float32'} matmul "
            f"{shape[0]}x{shape[1]} . {shape[1]}x{shape[2]}) = {roofline_images:.2f} img/s forward"
        )
        print(f"{'':<34}{'keras_vit img/s':>24}{'of roofline':>13}{'keras_hub img/s':>24}{'vit/hub':>9}")
        for (engine, kind, call) in [key for key in times if key[0] == "keras_vit"]:
            ours = rate(times[("keras_vit", kind, call)], batch)
            theirs = rate(times[("keras_hub", kind, call)], batch)
            limit = roofline_images / (3 if kind == "training" else 1)
            goal = GOALS.get((kind, precision), "")
            print(
                f"{kind + ' ' + call:<34}{spread(ours):>24}{ours[0] / limit:>12.0%} "
                f"{spread(theirs):>24}{ours[0] / theirs[0]:>8.2f}x  {goal}"
            )


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="B/16,L/16", help="keras_vit.VARIANTS names")
    parser.add_argument("--train_models", default="B/16", help="the models whose training step is timed")
    parser.add_argument("--precisions", default="float32,mixed_bfloat16,int8")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    args.precisions = args.precisions.split(",")
    unknown = [p for p in args.precisions if p not in ("float32", "mixed_bfloat16", "int8")]
    unknown += [m for m in args.models.split(",") + args.train_models.split(",") if m and m not in keras_vit.VARIANTS]
    if unknown:
        parser.error(f"unknown precision or model {unknown}; precisions: float32, mixed_bfloat16, int8; "
                     f"models: {', '.join(keras_vit.VARIANTS)}")

    import keras_hub

    print(
        f"# keras_vit speed: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}; TensorFlow {tf.__version__}, keras {keras.__version__}, "
        f"keras_hub {keras_hub.__version__}, backend {keras.backend.backend()}"
    )
    print(f"median img/s [min-max] over {args.rounds} rounds of {args.repeats} batches")
    for variant in args.models.split(","):
        benchmark_model(variant, args, train=variant in args.train_models.split(","))
    print(f"\nload average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
