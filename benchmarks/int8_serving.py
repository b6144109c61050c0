"""int8 serving: accuracy and speed of float32, bfloat16 and int8 SavedModels.

Three exports of the same weights through `keras_vit.export_for_serving`:

    float32   the model as it is
    bfloat16  the same weights in a copy built under the mixed_bfloat16 policy
              (bf16 matmuls, float32 variables)
    int8      export_for_serving(..., quantize="int8"): Keras's int8 Dense and
              EinsumDense kernels, per-token int8 inputs, int8 x int8 -> int32

1. The demo's digits ViT (`keras_vit.demo`: trained here with the demo's
   recipe, or loaded with --model digits_vit.keras as `keras-vit demo` saves
   it): the accuracy of each export on the demo's 360 held-out digits
   through `serve_float` (goal: int8 within 0.5 points of float32), and each
   export's images/s.
2. A ViT-B/16-sized classifier (random weights, 224 px, 1000 classes): the
   same speed comparison, where the matmuls are big enough for int8 to
   matter.
3. The kernel underneath: TensorFlow's matmul of ViT-B/16's MLP shape at
   batch 8, (8, 197, 768) x (768, 3072), as int8 x int8 -> int32 (what the
   int8 export runs), float32 and bfloat16, in operations per second.

Speed is through the loaded SavedModel's `serve_float` signature (what TF
Serving runs), after warm-up; each round times every export once, in a
rotating order, so that load from other jobs hits all alike. Printed: the
median images/s over the rounds with the min-max spread, and the ratio of
medians to float32.

    python benchmarks/int8_serving.py [--model digits_vit.keras] [--rounds 7] [--skip-b16]
"""

import argparse
import os
import platform
import shutil
import statistics
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

PRECISIONS = ("float32", "bfloat16", "int8")


def cpu_name():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def bfloat16_copy(model, build):
    """`build()` under the mixed_bfloat16 policy, with `model`'s weights."""
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        copy = build()
    finally:
        keras.config.set_dtype_policy(previous)
    copy.set_weights(model.get_weights())
    return copy


def export_all(model, build, folder, class_names=None):
    """{precision: loaded SavedModel} and {precision: variables size in bytes}."""
    import tensorflow as tf

    from keras_vit import serving

    models = {"float32": (model, None), "bfloat16": (bfloat16_copy(model, build), None), "int8": (model, "int8")}
    loaded, sizes = {}, {}
    for precision, (exported, quantize) in models.items():
        start = time.perf_counter()
        version_dir = serving.export_for_serving(
            exported, os.path.join(folder, precision), class_names=class_names, quantize=quantize
        )
        variables = os.path.join(version_dir, "variables")
        sizes[precision] = sum(os.path.getsize(os.path.join(variables, name)) for name in os.listdir(variables))
        loaded[precision] = tf.saved_model.load(version_dir)
        print(f"  exported {precision:8s} in {time.perf_counter() - start:5.1f} s, "
              f"variables {sizes[precision] / 2**20:7.1f} MiB")
    return loaded, sizes


def serve_float(loaded, images, batch_size):
    """Probabilities for `images` through the `serve_float` signature, in batches."""
    import tensorflow as tf

    signature = loaded.signatures["serve_float"]
    return np.concatenate([
        signature(images=tf.constant(images[start:start + batch_size]))["probabilities"].numpy()
        for start in range(0, len(images), batch_size)
    ])


def speed(loaded, images, rounds, repeats):
    """{precision: [images/s of each round]}, the precisions alternating in a rotating order."""
    import tensorflow as tf

    batch = tf.constant(images)
    signatures = {precision: saved.signatures["serve_float"] for precision, saved in loaded.items()}
    for signature in signatures.values():  # warm-up: first calls build kernels and caches
        for _ in range(2):
            signature(images=batch)["probabilities"].numpy()
    results = {precision: [] for precision in signatures}
    order = list(signatures)
    for round_index in range(rounds):
        shift = round_index % len(order)
        for precision in order[shift:] + order[:shift]:
            signature = signatures[precision]
            start = time.perf_counter()
            for _ in range(repeats):
                signature(images=batch)["probabilities"].numpy()
            results[precision].append(repeats * len(images) / (time.perf_counter() - start))
    return results


def print_speed(title, results):
    print(title)
    baseline = statistics.median(results["float32"])
    for precision, values in results.items():
        median = statistics.median(values)
        print(f"  {precision:8s} {median:9.1f} img/s  (min {min(values):.1f}, max {max(values):.1f}, "
              f"{len(values)} rounds)  {median / baseline:5.2f}x float32")


def digits(args, folder):
    from keras_vit import demo

    (train_x, train_y), (test_x, test_y) = demo.load_digits()
    if args.model:
        model = keras.saving.load_model(args.model)
        print(f"digits model: {args.model}")
    else:
        keras.utils.set_random_seed(args.seed)
        model = demo.build_model()
        start = time.perf_counter()
        demo.train(model, train_x, train_y, epochs=args.epochs, progress=False)
        print(f"digits model: trained with the demo's recipe, {args.epochs} epochs, seed {args.seed}, "
              f"in {time.perf_counter() - start:.0f} s")
    keras_accuracy = float(np.mean(model.predict(test_x, batch_size=256, verbose=0).argmax(-1) == test_y))
    print(f"  keras model.predict: {keras_accuracy:.2%} on {len(test_x)} held-out digits")
    loaded, _ = export_all(model, demo.build_model, os.path.join(folder, "digits"), class_names=demo.CLASS_NAMES)
    print(f"accuracy on the {len(test_x)} held-out digits through serve_float:")
    accuracy = {}
    float_predictions = None
    for precision, saved in loaded.items():
        predictions = serve_float(saved, test_x, args.digits_batch).argmax(-1)
        float_predictions = predictions if float_predictions is None else float_predictions
        accuracy[precision] = float(np.mean(predictions == test_y))
        changed = int(np.sum(predictions != float_predictions))
        print(f"  {precision:8s} {accuracy[precision]:.2%}  ({100 * (accuracy[precision] - accuracy['float32']):+.2f} "
              f"points vs float32; {changed} of {len(test_x)} predictions differ from float32's)")
    gap = 100 * (accuracy["float32"] - accuracy["int8"])
    print(f"  int8 within 0.5 points of float32: {'yes' if gap <= 0.5 else 'NO'} ({gap:+.2f} points lost)")
    images = test_x[: args.digits_batch]
    print_speed(f"digits ViT speed, serve_float, batch {len(images)}:",
                speed(loaded, images, args.rounds, args.digits_repeats))


def vit_b16(args, folder):
    import keras_vit

    def build():
        return keras_vit.ViT_B16(input_shape=(224, 224, 3), classes=1000)

    keras.utils.set_random_seed(0)
    model = build()
    # The official head is zero-initialised; random values make its int8 matmul real work.
    head = model.get_layer("predictions")
    head.kernel.assign(np.random.default_rng(0).normal(0, 0.02, head.kernel.shape).astype("float32"))
    print(f"ViT-B/16 (random weights, {model.count_params():,} parameters, 224 px, 1000 classes):")
    loaded, _ = export_all(model, build, os.path.join(folder, "b16"))
    images = np.random.default_rng(0).uniform(0, 255, (args.batch, 224, 224, 3)).astype("float32")
    results = speed(loaded, images, args.rounds, args.b16_repeats)
    probabilities = {precision: serve_float(saved, images, args.batch) for precision, saved in loaded.items()}
    print_speed(f"ViT-B/16 speed, serve_float, batch {args.batch}:", results)
    for precision in ("bfloat16", "int8"):
        difference = np.abs(probabilities[precision] - probabilities["float32"]).max()
        print(f"  {precision} vs float32: largest probability difference {difference:.2e} (random weights)")


def kernels(args):
    """GOP/s of one ViT-B/16 MLP matmul at batch 8 in each precision, alternating."""
    import tensorflow as tf

    rng = np.random.default_rng(0)
    x = tf.constant(rng.integers(-127, 128, (args.batch, 197, 768)).astype("int8"))
    w = tf.constant(rng.integers(-127, 128, (768, 3072)).astype("int8"))
    operands = {
        "float32": (tf.cast(x, tf.float32), tf.cast(w, tf.float32), None),
        "bfloat16": (tf.cast(x, tf.bfloat16), tf.cast(w, tf.bfloat16), None),
        "int8": (x, w, tf.int32),
    }
    functions = {
        precision: tf.function(lambda a, b, output_type=output_type: tf.linalg.matmul(a, b, output_type=output_type)
                               if output_type is not None else tf.linalg.matmul(a, b))
        for precision, (_, _, output_type) in operands.items()
    }
    operations = 2 * args.batch * 197 * 768 * 3072
    results = {precision: [] for precision in operands}
    order = list(operands)
    for round_index in range(-1, args.rounds):  # round -1: warm-up
        shift = max(round_index, 0) % len(order)
        for precision in order[shift:] + order[:shift]:
            a, b, _ = operands[precision]
            start = time.perf_counter()
            for _ in range(3):
                functions[precision](a, b).numpy()
            if round_index >= 0:
                results[precision].append(3 * operations / (time.perf_counter() - start) / 1e9)
    print(f"TensorFlow matmul ({args.batch}, 197, 768) x (768, 3072), the ViT-B/16 MLP's first layer:")
    baseline = statistics.median(results["float32"])
    for precision, values in results.items():
        median = statistics.median(values)
        print(f"  {precision:8s} {median:7.1f} GOP/s  (min {min(values):.1f}, max {max(values):.1f})  "
              f"{median / baseline:5.2f}x float32")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a trained digits .keras model (default: train one)")
    parser.add_argument("--epochs", type=int, default=None, help="training epochs (the demo's 25)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--digits-batch", type=int, default=64)
    parser.add_argument("--digits-repeats", type=int, default=20)
    parser.add_argument("--batch", type=int, default=8, help="ViT-B/16 batch (8)")
    parser.add_argument("--b16-repeats", type=int, default=3)
    parser.add_argument("--skip-digits", action="store_true")
    parser.add_argument("--skip-b16", action="store_true")
    parser.add_argument("--keep", default=None, help="write the exports here and keep them (default: a temp folder)")
    args = parser.parse_args()
    if keras.backend.backend() != "tensorflow":
        parser.error("the SavedModel exports need KERAS_BACKEND=tensorflow")
    from keras_vit import demo

    args.epochs = args.epochs or demo.EPOCHS
    import tensorflow as tf

    print(f"machine: {cpu_name()}, {os.cpu_count()} logical CPUs; TensorFlow {tf.__version__}, "
          f"Keras {keras.__version__}; load average at start {os.getloadavg()[0]:.1f}")
    folder = args.keep or tempfile.mkdtemp(prefix="int8_serving_")
    start = time.perf_counter()
    try:
        if not args.skip_digits:
            digits(args, folder)
        if not args.skip_b16:
            vit_b16(args, folder)
        kernels(args)
    finally:
        if args.keep is None:
            shutil.rmtree(folder, ignore_errors=True)
    print(f"done in {time.perf_counter() - start:.0f} s; load average at end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
