"""Bytes per device of ViT-H/14 under keras.distribution's model parallelism, and step time data vs model parallel.

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 \\
        python benchmarks/model_parallel_memory.py [--model ViT_H14] [--materialize] [--sizes 1,2,4,8] [--no-step-time]

Memory: for model:1, 2, 4, 8 (a (8/N, N) mesh of ("batch", "model"), split
by `keras_vit.training.layout_map`), the bytes each device holds of the
model's parameters and of Adam's state (two slots per trainable variable,
laid out as it: Keras gives an optimizer slot its variable's layout). The
model is built inside a `keras.StatelessScope`, which creates no arrays:
each variable's layout comes from the distribution, and its shard shape from
JAX's `NamedSharding.shard_shape`, exactly what Keras would place. With
--materialize the variables are really created on the 8 virtual devices
(parameters only, ~2.5 GB at model:8 for H/14, 20 GB at model:1: keep it for
small models or large machines) and their shards counted (`per_device_bytes`).

The goal: the split kernels at 1/N of their size on each device, and each
device's total within 10% of the ideal (everything / N). "split" counts the
variables `layout_map` splits; "replicated" the rest (norms, embeddings,
biases of row-split layers, the patch embedding).

Step time: one training step (SGD, global batch 16, 64x64 inputs) of a
small ViT (patch 16, width 256, 4 blocks, 8 heads, MLP 1024) under
--distribution data and model:2/4/8 on the same 8 devices, median of 5
after a compile step. On virtual CPU devices this measures XLA's overhead
of the partitioning, not a speed-up: the 8 "devices" share the machine's cores.
"""

import argparse
import math
import os
import platform
import statistics
import sys
import time

SIZES = (1, 2, 4, 8)
ADAM_SLOTS = 2  # m and v, each laid out as its variable
GOAL = 0.10  # total within 10% of ideal


def layout_bytes(variables, distribution):
    """{"split": bytes, "replicated": bytes, "split_full": bytes} per device
    for `variables` (created or deferred) under `distribution`."""
    totals = {"split": 0, "replicated": 0, "split_full": 0}
    for variable in variables:
        layout = distribution.get_variable_layout(variable)
        shape = tuple(variable.shape)
        itemsize = _itemsize(variable.dtype)
        shard = layout.backend_layout.shard_shape(shape)
        size = math.prod(shard) * itemsize
        if any(axis is not None for axis in layout.axes):  # split (over 1 device at model:1)
            totals["split"] += size
            totals["split_full"] += math.prod(shape) * itemsize
        else:
            totals["replicated"] += size
    return totals


def _itemsize(dtype):
    import numpy as np

    return np.dtype(str(dtype)).itemsize


def measure_memory(constructor, size, materialize):
    import keras

    from keras_vit import training

    distribution = training.make_distribution(f"model:{size}")
    keras.distribution.set_distribution(distribution)
    try:
        if materialize:
            model = constructor()
            devices = training.per_device_bytes(model.weights)
            bytes_ = layout_bytes(model.weights, distribution)
            measured = max(devices.values())
        else:
            with keras.StatelessScope():
                model = constructor()
            bytes_ = layout_bytes(model.weights, distribution)
            measured = None
        trainable = {id(v) for v in model.trainable_weights}
        optimizer = layout_bytes([v for v in model.weights if id(v) in trainable], distribution)
        parameters = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in model.weights)
        trainable_bytes = sum(math.prod(v.shape) * _itemsize(v.dtype) for v in model.trainable_weights)
    finally:
        keras.distribution.set_distribution(None)
    optimizer_per_device = ADAM_SLOTS * (optimizer["split"] + optimizer["replicated"])
    return dict(
        size=size,
        params_per_device=bytes_["split"] + bytes_["replicated"],
        split_per_device=bytes_["split"],
        split_full=bytes_["split_full"],
        replicated=bytes_["replicated"],
        optimizer_per_device=optimizer_per_device,
        params_total=parameters,
        optimizer_total=ADAM_SLOTS * trainable_bytes,
        measured_params_per_device=measured,
    )


def print_memory_table(rows, model_name, machine):
    gib = 1024**3
    print(f"{model_name}: bytes per device under model:N (mesh (8/N, N) of batch x model), float32, "
          f"parameters + Adam state (2 slots); {machine}")
    print(f"{'model:N':<8} {'params/dev GiB':>15} {'split GiB':>10} {'Adam/dev GiB':>13} {'total/dev GiB':>14} "
          f"{'ideal GiB':>10} {'total/ideal':>12} {'split at 1/N':>13}")
    met = True
    for row in rows:
        n = row["size"]
        total = row["params_per_device"] + row["optimizer_per_device"]
        ideal = (row["params_total"] + row["optimizer_total"]) / n
        split_ratio = row["split_per_device"] / (row["split_full"] / n) if row["split_full"] else float("nan")
        ok = total <= ideal * (1 + GOAL) and abs(split_ratio - 1) < 1e-9
        met &= ok
        measured = row.get("measured_params_per_device")
        note = "" if measured is None else f"  (measured params/dev {measured / gib:.3f} GiB)"
        print(f"model:{n:<2} {row['params_per_device'] / gib:>15.3f} {row['split_per_device'] / gib:>10.3f} "
              f"{row['optimizer_per_device'] / gib:>13.3f} {total / gib:>14.3f} {ideal / gib:>10.3f} "
              f"{total / ideal:>12.3f} {split_ratio:>13.3f}{note}")
    print(f"goal (split kernels at 1/N, total within {GOAL:.0%} of ideal): {'met' if met else 'NOT met'}")
    return met


STEP_MODEL = dict(patch_size=16, hidden_size=256, depth=4, num_heads=8, mlp_dim=1024, classes=10)


def measure_step(spec, rounds=5, batch=16, image=64):
    import keras
    import numpy as np

    import keras_vit
    from keras_vit import training

    distribution = training.make_distribution(spec)
    keras.distribution.set_distribution(distribution)
    try:
        keras.utils.set_random_seed(0)
        model = keras_vit.ViT(input_shape=(image, image, 3), **STEP_MODEL)
        trainer = training.Trainer(model)
        trainer.compile(optimizer=keras.optimizers.SGD(0.01), loss="categorical_crossentropy")
        rng = np.random.default_rng(0)
        x = rng.uniform(0, 255, (batch, image, image, 3)).astype("float32")
        y = np.eye(STEP_MODEL["classes"], dtype="float32")[np.arange(batch) % STEP_MODEL["classes"]]
        start = time.perf_counter()
        trainer.train_on_batch(x, y)  # compiles
        compile_s = time.perf_counter() - start
        times = []
        for _ in range(rounds):
            start = time.perf_counter()
            loss = trainer.train_on_batch(x, y)
            float(np.asarray(loss))  # waits for the step
            times.append(time.perf_counter() - start)
    finally:
        keras.distribution.set_distribution(None)
    return dict(spec=spec, median_ms=1000 * statistics.median(times), min_ms=1000 * min(times), compile_s=compile_s)


def print_step_table(rows, machine):
    c = STEP_MODEL
    print(f"Step time, ViT patch {c['patch_size']}, width {c['hidden_size']}, {c['depth']} blocks, "
          f"{c['num_heads']} heads, MLP {c['mlp_dim']}, global batch 16 at 64x64, SGD; {machine}")
    print(f"{'distribution':<13} {'median ms':>10} {'min ms':>8} {'compile s':>10} {'vs data':>8}")
    base = next((r["median_ms"] for r in rows if r["spec"] == "data"), None)
    for row in rows:
        ratio = f"{row['median_ms'] / base:.2f}x" if base else "-"
        print(f"{row['spec']:<13} {row['median_ms']:>10.1f} {row['min_ms']:>8.1f} {row['compile_s']:>10.1f} {ratio:>8}")


def machine_name():
    import jax

    return (f"{os.cpu_count()} CPUs ({platform.machine()}), {jax.device_count()} XLA devices "
            f"({jax.devices()[0].platform}), jax {jax.__version__}")


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="ViT_H14", help="a keras_vit constructor (default ViT_H14)")
    parser.add_argument("--materialize", action="store_true", help="really create the variables and count shards")
    parser.add_argument("--no-step-time", action="store_true", help="only the memory table")
    parser.add_argument("--sizes", default=",".join(map(str, SIZES)), help="the N of model:N, comma-separated")
    args = parser.parse_args()
    import keras

    if keras.backend.backend() != "jax":
        sys.exit("error: run with KERAS_BACKEND=jax (and XLA_FLAGS=--xla_force_host_platform_device_count=8 on a CPU)")
    import keras_vit
    from keras_vit import models

    if keras.distribution.get_device_count() < max(SIZES):
        sys.exit(f"error: {keras.distribution.get_device_count()} devices; set "
                 "XLA_FLAGS=--xla_force_host_platform_device_count=8 before Python starts")
    constructor = models.get_constructor(args.model)
    machine = machine_name()
    rows = [measure_memory(constructor, int(n), args.materialize) for n in args.sizes.split(",")]
    met = print_memory_table(rows, args.model, machine)
    if not args.no_step_time:
        print()
        print_step_table([measure_step(spec) for spec in ("data", "model:2", "model:4", "model:8")], machine)
    del keras_vit
    return 0 if met else 1


if __name__ == "__main__":
    sys.exit(main())
