"""`keras.distribution` on JAX: how keras_vit models split over a device mesh.

    import keras, keras_vit
    mesh = keras.distribution.DeviceMesh((2, 4), axis_names=("batch", "model"))
    keras.distribution.set_distribution(
        keras.distribution.ModelParallel(layout_map=keras_vit.training.layout_map(mesh), batch_dim_name="batch"))
    model = keras_vit.ViT_H14(weights="in21k", classes=10)       # each kernel split over "model"

`make_distribution("data" | "model:N")` builds such a distribution over all
devices (the examples' `--distribution`), and `initialize()` starts a
multi-process run from Keras's environment variables.
"""

import math
import os

import keras

# Keras's own variables for keras.distribution.initialize() (documented there).
ENVIRONMENT = ("KERAS_DISTRIBUTION_JOB_ADDRESSES", "KERAS_DISTRIBUTION_NUM_PROCESSES", "KERAS_DISTRIBUTION_PROCESS_ID")

# Any prefix, so that a model nested in another (a Trainer, MaskedPatchPrediction) matches too.
_ANY = r"(?:.*/)?"


def layout_map(mesh, model_axis="model"):
    """A `keras.distribution.LayoutMap` that splits every keras_vit model
    (ViTs and hybrids) over `mesh`'s `model_axis`, Megatron-style.

        mesh = keras.distribution.DeviceMesh((2, 4), axis_names=("batch", "model"))
        keras.distribution.set_distribution(
            keras.distribution.ModelParallel(layout_map=keras_vit.training.layout_map(mesh), batch_dim_name="batch"))
        model = keras_vit.ViT_H14(weights="in21k", classes=10)       # each kernel split over "model"
        model.fit(train_ds, ...)

    In each Transformer block:
    - query, key and value: split by head (kernel (width, heads, head) on its
      heads axis, bias (heads, head) too), so each device attends with its
      own heads only;
    - the attention output: split by row (kernel (heads, head, width) on its
      heads axis), which consumes the heads where they are; one all-reduce
      of the block's output;
    - `mlp_in`: split by column (kernel (width, mlp) and bias on the MLP axis);
    - `mlp_out`: split by row (kernel (mlp, width) on the MLP axis): one
      all-reduce.
    Above the encoder, `pre_logits` (when there is one) is split by column
    and the head by row, so a 21k-class head is split too. Everything else
    is replicated: the norms, biases of the row-split layers, the class
    token and position embedding, the patch embedding (a fifth of a percent
    of ViT-H/14's parameters: splitting it would add an all-gather of every
    token for nothing) and a hybrid's ResNet (GroupNorm would need its
    channels gathered after every convolution).

    Set the distribution before the model is built: Keras places each
    variable when it is created. A model whose heads or MLP width the axis
    does not divide fails to build with a one-line error naming the sizes.
    Optimizer slots follow their variables' layouts.
    """
    if model_axis not in mesh.axis_names:
        raise ValueError(
            f"The mesh has no axis {model_axis!r} (its axes: {', '.join(map(repr, mesh.axis_names))}); "
            "name one of them as model_axis."
        )
    m = model_axis
    layouts = keras.distribution.LayoutMap(mesh)
    attention = _ANY + r"attention/"
    layouts[attention + r"(?:query|key|value)/kernel"] = (None, m, None)  # (width, heads, head)
    layouts[attention + r"(?:query|key|value)/bias"] = (m, None)  # (heads, head)
    layouts[attention + r"attention_output/kernel"] = (m, None, None)  # (heads, head, width)
    layouts[_ANY + r"mlp_in/kernel"] = (None, m)  # (width, mlp)
    layouts[_ANY + r"mlp_in/bias"] = (m,)
    layouts[_ANY + r"mlp_out/kernel"] = (m, None)  # (mlp, width)
    layouts[_ANY + r"pre_logits/kernel"] = (None, m)  # (width, representation)
    layouts[_ANY + r"pre_logits/bias"] = (m,)
    layouts[_ANY + r"predictions/kernel"] = (m, None)  # (width or representation, classes)
    return layouts


DISTRIBUTIONS = ("data", "model:N")


def make_distribution(spec, devices=None):
    """A `keras.distribution.Distribution` by name, over `devices` (default:
    every device of every process).

    "data": `DataParallel`, every variable replicated, the batch split over
    all devices. "model:N": `ModelParallel` on a (devices / N, N) mesh with
    axes ("batch", "model"), variables split over "model" by `layout_map`
    and the batch over "batch"; "model:1" is data parallelism through the
    same code.
    """
    if keras.backend.backend() != "jax":
        raise ValueError(
            f"keras.distribution needs KERAS_BACKEND=jax (it is {keras.backend.backend()}); "
            "on TensorFlow use tf.distribute (--strategy)."
        )
    devices = list(devices or keras.distribution.list_devices())
    if spec == "data":
        return keras.distribution.DataParallel(devices=devices)
    kind, _, count = str(spec).partition(":")
    if kind != "model" or not count.isdigit() or int(count) < 1:
        raise ValueError(f"Unknown distribution {spec!r}; use data or model:N (N devices per model, e.g. model:4).")
    per_model = int(count)
    if len(devices) % per_model:
        raise ValueError(
            f"Distribution model:{per_model}: {len(devices)} devices do not split into models of {per_model}; "
            f"use an N that divides {len(devices)}."
        )
    mesh = keras.distribution.DeviceMesh(
        (len(devices) // per_model, per_model), axis_names=("batch", "model"), devices=devices
    )
    return keras.distribution.ModelParallel(layout_map=layout_map(mesh), batch_dim_name="batch")


def replicas(distribution=None):
    """How many model replicas share each global batch under `distribution`
    (default: the current one; 1 without)."""
    distribution = distribution or keras.distribution.distribution()
    return 1 if distribution is None else int(distribution.num_model_replicas)


def initialize():
    """Starts a multi-process JAX run from Keras's environment variables
    (`ENVIRONMENT`) when they are set: KERAS_DISTRIBUTION_JOB_ADDRESSES (the
    coordinator's host:port first), KERAS_DISTRIBUTION_NUM_PROCESSES,
    KERAS_DISTRIBUTION_PROCESS_ID (0 for the coordinator). Returns whether it
    did. Call it before anything touches a JAX device. Without them (or on
    a Cloud TPU pod, where JAX finds its peers itself: set only
    KERAS_DISTRIBUTION_NUM_PROCESSES) it does nothing."""
    given = [name for name in ENVIRONMENT if os.environ.get(name)]
    if not given:
        return False
    missing = [name for name in ENVIRONMENT if name not in given]
    if missing and given != ["KERAS_DISTRIBUTION_NUM_PROCESSES"]:
        raise ValueError(
            f"A multi-process run needs all of {', '.join(ENVIRONMENT)}; {', '.join(missing)} not set."
        )
    keras.distribution.initialize()
    return True


def per_device_bytes(variables):
    """{device: bytes} that `variables` (Keras variables, JAX arrays) take on
    each device of their shardings: what model parallelism saves."""
    totals = {}
    for variable in variables:
        value = getattr(variable, "value", variable)
        for shard in value.addressable_shards:
            size = math.prod(shard.data.shape) * shard.data.dtype.itemsize
            totals[shard.device] = totals.get(shard.device, 0) + size
    return totals
