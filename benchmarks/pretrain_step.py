"""Time of a masked-patch pre-training step beside a supervised training step, in one run.

Both train ViT-B/16 (by default) at 224 px on the same in-memory batch with
Keras's defaults (`compile` + `train_on_batch`, Adam): the supervised model
with its 1000-class head and categorical cross-entropy; the self-supervised
one as `keras_vit.pretraining.MaskedPatchPrediction` around the same
architecture without head (the paper's settings: 50% corrupted, 3-bit mean
colour). Rounds alternate between the two so that machine load hits both
alike; prints each round's step times, the medians, the spread and the
ratio of the medians, masked patch / supervised (the goal: at most 1.15).

    python benchmarks/pretrain_step.py [--model ViT_B16] [--batch 8] [--rounds 7] [--steps 2]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402


def main():
    import keras

    import keras_vit
    from keras_vit.pretraining import MaskedPatchPrediction

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT_B16", help="constructor name (ViT_B16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (each: --steps steps of each model)")
    parser.add_argument("--steps", type=int, default=2, help="steps per model per round")
    parser.add_argument("--target", default="mean_color")
    args = parser.parse_args()

    constructor = keras_vit.get_constructor(args.model)
    shape = (args.image_size, args.image_size, 3)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (args.batch, *shape)).astype("float32")
    labels = keras.utils.to_categorical(rng.integers(0, 1000, args.batch), 1000)

    keras.utils.set_random_seed(0)
    supervised = constructor(input_shape=shape, classes=1000, classifier_activation=None)
    supervised.compile(optimizer=keras.optimizers.Adam(1e-4),
                       loss=keras.losses.CategoricalCrossentropy(from_logits=True))
    masked = MaskedPatchPrediction(constructor(input_shape=shape, include_top=False), target=args.target, seed=0)
    masked.compile(optimizer=keras.optimizers.Adam(1e-4))
    steps = {
        "supervised": lambda: supervised.train_on_batch(images, labels),
        "masked_patch": lambda: masked.train_on_batch(images),
    }
    compile_seconds = {}
    for name, step in steps.items():  # the first step traces (and compiles)
        start = time.perf_counter()
        step()
        compile_seconds[name] = time.perf_counter() - start
    times = {name: [] for name in steps}
    for index in range(args.rounds):
        for name, step in steps.items():
            for _ in range(args.steps):
                start = time.perf_counter()
                step()
                times[name].append(time.perf_counter() - start)
        print(f"round {index + 1}: " + ", ".join(
            f"{n} {statistics.median(t[-args.steps:]):.3f} s/step" for n, t in times.items()), flush=True)

    import tensorflow as tf

    print(f"\n{args.model} at {args.image_size}px, batch {args.batch}, {args.rounds} rounds x {args.steps} steps, "
          f"{os.cpu_count()} CPUs ({platform.machine()}), GPUs: {len(tf.config.list_physical_devices('GPU'))}, "
          f"TensorFlow {tf.__version__}, Keras {keras.__version__}, jit_compile={supervised.jit_compile}/"
          f"{masked.jit_compile}, load average {os.getloadavg()[0]:.1f}")
    medians = {}
    for name, values in times.items():
        medians[name] = statistics.median(values)
        low, high = np.percentile(values, [25, 75])
        print(f"  {name:13s} median {medians[name]:.3f} s/step (IQR {low:.3f}-{high:.3f}, min {min(values):.3f}, "
              f"max {max(values):.3f}; first step incl. tracing {compile_seconds[name]:.1f} s)")
    ratio = medians["masked_patch"] / medians["supervised"]
    per_round = [m / s for m, s in zip(_round_medians(times["masked_patch"], args.steps),
                                       _round_medians(times["supervised"], args.steps))]
    print(f"  ratio masked_patch / supervised: {ratio:.3f} (per round: {min(per_round):.3f}-{max(per_round):.3f}); "
          f"goal <= 1.15: {'met' if ratio <= 1.15 else 'NOT met'}")


def _round_medians(values, steps):
    return [statistics.median(values[i:i + steps]) for i in range(0, len(values), steps)]


if __name__ == "__main__":
    main()
