"""Inference speed of keras_vit beside keras_hub's ViTBackbone, same configuration.

Both models are ViT-B/16 encoders (patch embedding, class token, position
embedding, 12 blocks, final LayerNorm; no head, no input scaling) at 224x224,
timed in one process with the same call (`predict_on_batch`, after warm-up),
alternating between the two models so that machine load hits both alike.
Prints images/s for each and the ratio keras_vit / keras_hub per precision.

    python benchmarks/inference_speed.py [--batch 8] [--rounds 7] [--precisions float32,mixed_bfloat16]
"""

import argparse
import os
import platform
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

B16 = dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072)


def build_keras_vit(image_size):
    import keras_vit

    return keras_vit.ViT(
        **B16,
        include_top=False,
        include_preprocessing=False,
        input_shape=(image_size, image_size, 3),
    )


def build_keras_hub(image_size):
    from keras_hub.models import ViTBackbone

    return ViTBackbone(
        image_shape=(image_size, image_size, 3),
        patch_size=B16["patch_size"],
        num_layers=B16["depth"],
        num_heads=B16["num_heads"],
        hidden_dim=B16["hidden_size"],
        mlp_dim=B16["mlp_dim"],
    )


def seconds_per_batch(model, images, repeats):
    start = time.perf_counter()
    for _ in range(repeats):
        keras.ops.convert_to_numpy(model.predict_on_batch(images))
    return (time.perf_counter() - start) / repeats


def measure(precision, batch, image_size, rounds, repeats):
    keras.config.set_dtype_policy(precision)
    models = {"keras_vit": build_keras_vit(image_size), "keras_hub": build_keras_hub(image_size)}
    outputs = {}
    images = np.random.default_rng(0).uniform(-1, 1, (batch, image_size, image_size, 3)).astype("float32")
    for name, model in models.items():
        outputs[name] = model.predict_on_batch(images)  # warm-up: tracing and compilation
        seconds_per_batch(model, images, 1)
    assert outputs["keras_vit"].shape == outputs["keras_hub"].shape, "the two encoders must agree in shape"
    times = {name: [] for name in models}
    for _ in range(rounds):
        for name, model in models.items():
            times[name].append(seconds_per_batch(model, images, repeats))
    keras.config.set_dtype_policy("float32")
    return {name: batch / statistics.median(samples) for name, samples in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--image_size", type=int, default=224)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--precisions", default="float32,mixed_bfloat16")
    args = parser.parse_args()

    print(
        f"ViT-B/16 encoder, batch {args.batch}, {args.image_size}x{args.image_size}, "
        f"backend {keras.backend.backend()}, keras {keras.__version__}, "
        f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs"
    )
    print(f"{'precision':<16}{'keras_vit img/s':>16}{'keras_hub img/s':>16}{'ratio':>8}")
    for precision in args.precisions.split(","):
        speed = measure(precision, args.batch, args.image_size, args.rounds, args.repeats)
        ratio = speed["keras_vit"] / speed["keras_hub"]
        print(f"{precision:<16}{speed['keras_vit']:>16.2f}{speed['keras_hub']:>16.2f}{ratio:>8.3f}")


if __name__ == "__main__":
    main()
