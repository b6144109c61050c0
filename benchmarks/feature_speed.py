"""Throughput of `keras_vit.evaluation.features` beside `model.predict` on the same encoder.

Both embed the same in-memory images through a tf.data pipeline of batches:
`model.predict(dataset)` on a ViT with a head (what users call), and
`evaluation.features(model, dataset)` (the paper's representation, labels
carried beside it). Rounds alternate between the two so that machine load
hits both alike; prints images/s per round, the medians and the ratio
features / predict (the goal: at least 0.90).

    python benchmarks/feature_speed.py [--model ViT_S16] [--images 256] [--batch 32] [--rounds 5]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402


def main():
    import keras_vit
    from keras_vit import evaluation

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT_S16", help="constructor name (ViT_S16)")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args()

    model = keras_vit.get_constructor(args.model)(input_shape=(args.image_size, args.image_size, 3), classes=10)
    images = np.random.default_rng(0).uniform(0, 255, (args.images, args.image_size, args.image_size, 3))
    labels = np.arange(args.images) % 10
    dataset = tf.data.Dataset.from_tensor_slices((images.astype("float32"), labels)).batch(args.batch).cache()
    for _ in dataset:  # fill the cache: both time the model, not the copy into tf.data
        pass
    runs = {
        "predict": lambda: model.predict(dataset, verbose=0),
        "features": lambda: evaluation.features(model, dataset, verbose=0),
    }
    for run in runs.values():  # warm-up: tracing
        run()
    rates = {name: [] for name in runs}
    for index in range(args.rounds):
        for name, run in runs.items():
            start = time.perf_counter()
            run()
            rates[name].append(args.images / (time.perf_counter() - start))
        print(f"round {index + 1}: " + ", ".join(f"{n} {r[-1]:.2f} img/s" for n, r in rates.items()), flush=True)
    medians = {name: statistics.median(values) for name, values in rates.items()}
    print(f"\n{args.model} at {args.image_size}px, batch {args.batch}, {args.images} images, "
          f"{os.cpu_count()} CPUs ({platform.machine()}), TensorFlow {tf.__version__}")
    for name, values in rates.items():
        print(f"{name:>9}: median {medians[name]:.2f} img/s (range {min(values):.2f}-{max(values):.2f})")
    print(f"features / predict: {medians['features'] / medians['predict']:.3f}")


if __name__ == "__main__":
    main()
