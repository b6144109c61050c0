"""Training ViTs as the paper does: its recipes, gradient accumulation, tf.distribute.

Recipes (`finetune_recipe`, `pretrain_recipe`) return a `Recipe`: a fresh
optimizer with its learning-rate schedule, the loss, the batch size and step
counts, and the model arguments (dropout, head activation) the recipe needs.

    recipe = keras_vit.training.finetune_recipe("cifar10", accum_steps=8)
    with strategy.scope():
        model = keras_vit.ViT_B16(weights=..., classes=10, input_shape=(384, 384, 3), **recipe.model_kwargs)
        trainer = keras_vit.training.Trainer(model, accum_steps=recipe.accum_steps)
        trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss, metrics=["accuracy"])
    keras_vit.training.train(trainer, lambda step: make_batches(step), recipe.total_steps, "runs/cifar10")

Fine-tuning (Appendix B.1.1, Table 4): SGD, momentum 0.9, no weight decay,
gradient clipping at global norm 1, linear warm-up then cosine decay, batch
512, softmax cross-entropy; the new head is zero-initialised (the model's
default). Pre-training (Appendix B.1, Table 3): Adam (0.9, 0.999) with
decoupled weight decay, batch 4096, 10k warm-up steps then linear decay
(cosine and clipping for ImageNet-1k), the learning rate, weight decay and
dropout of Table 3, sigmoid cross-entropy for the multi-label datasets.

Why `Trainer`: Keras optimizers accumulate gradients themselves
(`gradient_accumulation_steps`) and clip them (`global_clipnorm`), but under
`tf.distribute` (Keras 3.15) the first fails ("merge_call called while
defining a new graph") and the second clips each replica's share of the
gradient instead of the whole. `Trainer` splits each replica's batch into
micro-batches inside one train step (as the official code) and clips the
summed gradient, so k x batch B on one device, or one batch k*B over any number
of replicas, gives the same update.
"""

import dataclasses
import json
import math
import os
import time
from typing import Optional

import keras
from keras import ops

from keras_vit.layers import PACKAGE

# ---------------------------------------------------------------------------
# Learning-rate schedule and loss
# ---------------------------------------------------------------------------

DECAYS = ("cosine", "linear")


@keras.saving.register_keras_serializable(package=PACKAGE)
class WarmupDecay(keras.optimizers.schedules.LearningRateSchedule):
    """Linear warm-up from 0 to `base_learning_rate`, then cosine or linear decay.

    The official schedule (vision_transformer `create_learning_rate_schedule`):
    update number n (1-based) uses

        progress = clip((n - warmup) / (total - warmup), 0, 1)
        cosine:  base * 0.5 * (1 + cos(pi * progress))
        linear:  end + (base - end) * (1 - progress)
        times min(1, n / warmup) while warming up.

    Keras calls the schedule with the number of updates done so far (0 for the
    first), so `__call__(step)` returns the rate of update `step + 1`.
    """

    def __init__(self, base_learning_rate, total_steps, warmup_steps=0, decay="cosine", end_learning_rate=1e-5):
        if decay not in DECAYS:
            raise ValueError(f"Unknown decay {decay!r}; use one of {DECAYS}.")
        if not 0 <= warmup_steps < total_steps:
            raise ValueError(
                f"warmup_steps must be at least 0 and fewer than the total steps ({total_steps}), got {warmup_steps}."
            )
        self.base_learning_rate = float(base_learning_rate)
        self.total_steps = int(total_steps)
        self.warmup_steps = int(warmup_steps)
        self.decay = decay
        self.end_learning_rate = float(end_learning_rate)

    def __call__(self, step):
        update = ops.cast(step, "float32") + 1.0
        progress = ops.clip((update - self.warmup_steps) / (self.total_steps - self.warmup_steps), 0.0, 1.0)
        base = self.base_learning_rate
        if self.decay == "cosine":
            rate = base * 0.5 * (1.0 + ops.cos(math.pi * progress))
        else:
            rate = self.end_learning_rate + (base - self.end_learning_rate) * (1.0 - progress)
        if self.warmup_steps:
            rate = rate * ops.minimum(1.0, update / self.warmup_steps)
        return rate

    def get_config(self):
        return dict(
            base_learning_rate=self.base_learning_rate,
            total_steps=self.total_steps,
            warmup_steps=self.warmup_steps,
            decay=self.decay,
            end_learning_rate=self.end_learning_rate,
        )


@keras.saving.register_keras_serializable(package=PACKAGE)
class SigmoidCrossEntropy(keras.losses.Loss):
    """Multi-label sigmoid cross-entropy from logits, summed over the classes
    and averaged over the batch (big_vision's `sigmoid_xent`), for the
    multi-label pre-training sets (ImageNet-21k, JFT)."""

    def __init__(self, name="sigmoid_cross_entropy", reduction="sum_over_batch_size", dtype=None):
        super().__init__(name=name, reduction=reduction, dtype=dtype)

    def call(self, y_true, y_pred):
        y_pred = ops.convert_to_tensor(y_pred)
        y_true = ops.cast(y_true, y_pred.dtype)
        per_class = ops.binary_crossentropy(y_true, y_pred, from_logits=True)
        return ops.sum(per_class, axis=-1)


# ---------------------------------------------------------------------------
# The paper's presets
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class FinetunePreset:
    total_steps: int
    learning_rates: tuple  # the paper's sweep
    warmup_steps: int = 500  # the official code's default


# Table 4 of the paper; warm-up as the official code (500), and BiT's
# HyperRule (100) for the 500-step runs.
FINETUNE_PRESETS = {
    "imagenet2012": FinetunePreset(20_000, (0.003, 0.01, 0.03, 0.06)),
    "cifar10": FinetunePreset(10_000, (0.001, 0.003, 0.01, 0.03)),
    "cifar100": FinetunePreset(10_000, (0.001, 0.003, 0.01, 0.03)),
    "oxford_iiit_pet": FinetunePreset(500, (0.001, 0.003, 0.01, 0.03), warmup_steps=100),
    "oxford_flowers102": FinetunePreset(500, (0.001, 0.003, 0.01, 0.03), warmup_steps=100),
}
FINETUNE_LEARNING_RATE = 0.03  # the official code's default; in every sweep of Table 4
FINETUNE_BATCH_SIZE = 512
FINETUNE_RESOLUTION = 384
FINETUNE_WARMUP_STEPS = 500


@dataclasses.dataclass(frozen=True)
class PretrainPreset:
    variants: tuple  # rows of keras_vit.VARIANTS (or hybrid names); "*" for all
    dataset: str
    epochs: int
    learning_rate: float
    decay: str
    weight_decay: float
    dropout: float
    clip_norm: Optional[float] = None


# Table 3 of the paper (batch 4096, 10k warm-up steps, resolution 224).
PRETRAIN_PRESETS = (
    PretrainPreset(("B/16", "B/32"), "jft300m", 7, 8e-4, "linear", 0.1, 0.0),
    PretrainPreset(("L/32",), "jft300m", 7, 6e-4, "linear", 0.1, 0.0),
    PretrainPreset(("L/16",), "jft300m", 7, 4e-4, "linear", 0.1, 0.0),  # also run for 14 epochs
    PretrainPreset(("H/14",), "jft300m", 14, 3e-4, "linear", 0.1, 0.0),
    PretrainPreset(("R50+B/16", "R50+B/32"), "jft300m", 7, 8e-4, "linear", 0.1, 0.0),
    PretrainPreset(("R50+L/32",), "jft300m", 7, 2e-4, "linear", 0.1, 0.0),
    PretrainPreset(("R50+L/16",), "jft300m", 7, 4e-4, "linear", 0.1, 0.0),  # also 14 epochs
    PretrainPreset(("B/16", "B/32"), "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),
    PretrainPreset(("L/16", "L/32"), "imagenet21k", 90, 1e-3, "linear", 0.03, 0.1),  # also 30 epochs
    # "For ImageNet we found it beneficial to additionally apply gradient clipping at global norm 1."
    PretrainPreset(("*",), "imagenet", 300, 3e-3, "cosine", 0.3, 0.1, clip_norm=1.0),
)


@dataclasses.dataclass(frozen=True)
class PretrainDataset:
    num_examples: int
    num_classes: int
    multi_label: bool


# The sizes the paper gives (Section 4.1).
PRETRAIN_DATASETS = {
    "jft300m": PretrainDataset(303_000_000, 18_291, True),
    "imagenet21k": PretrainDataset(14_000_000, 21_843, True),
    "imagenet": PretrainDataset(1_281_167, 1000, False),
}
PRETRAIN_BATCH_SIZE = 4096
PRETRAIN_WARMUP_STEPS = 10_000
PRETRAIN_RESOLUTION = 224


@dataclasses.dataclass
class Recipe:
    """What a recipe returns: compile with `optimizer` and `loss`, build the
    model with `**model_kwargs`, train `total_steps` updates of `batch_size`
    examples, each as `accum_steps` micro-batches (see `Trainer`)."""

    optimizer: keras.optimizers.Optimizer
    learning_rate: WarmupDecay
    loss: keras.losses.Loss
    batch_size: int
    total_steps: int
    warmup_steps: int
    accum_steps: int = 1
    model_kwargs: dict = dataclasses.field(default_factory=dict)
    description: str = ""


def finetune_recipe(
    dataset=None,
    *,
    total_steps=None,
    warmup_steps=None,
    learning_rate=None,
    batch_size=FINETUNE_BATCH_SIZE,
    accum_steps=1,
    clip_norm=1.0,
):
    """The paper's fine-tuning recipe (Appendix B.1.1, Table 4).

    SGD with momentum 0.9 and no weight decay, gradients clipped at global
    norm `clip_norm`, `warmup_steps` of linear warm-up then cosine decay to 0,
    softmax cross-entropy on one-hot (or MixUp) labels. A dataset of
    `FINETUNE_PRESETS` sets the steps and warm-up; other datasets need
    `total_steps` (warm-up then defaults to 500, at most a tenth of the run,
    as for a preset's dataset run for another number of steps).
    The learning rate defaults to 0.03 (Table 4 sweeps 0.001-0.06).
    Fine-tune at resolution 384 (`FINETUNE_RESOLUTION`); the model's new head
    is zero-initialised by the constructors.
    """
    preset = FINETUNE_PRESETS.get(dataset)
    if total_steps is None:
        if preset is None:
            raise ValueError(
                f"No fine-tuning preset for {dataset!r}: give total_steps "
                f"(presets: {', '.join(FINETUNE_PRESETS)})."
            )
        total_steps = preset.total_steps
    if warmup_steps is None:
        warmup_steps = preset.warmup_steps if preset else FINETUNE_WARMUP_STEPS
        if not preset or total_steps != preset.total_steps:  # a shorter run: warm up for a tenth at most
            warmup_steps = min(warmup_steps, total_steps // 10)
    schedule = WarmupDecay(learning_rate or FINETUNE_LEARNING_RATE, total_steps, warmup_steps, "cosine")
    optimizer = keras.optimizers.SGD(learning_rate=schedule, momentum=0.9, global_clipnorm=clip_norm)
    return Recipe(
        optimizer=optimizer,
        learning_rate=schedule,
        loss=keras.losses.CategoricalCrossentropy(),  # the model ends with a softmax
        batch_size=_check_batch(batch_size, accum_steps),
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        accum_steps=accum_steps,
        model_kwargs={"classifier_activation": "softmax"},
        description=(
            f"fine-tune: SGD momentum 0.9, lr {schedule.base_learning_rate:g}, {warmup_steps} warm-up + cosine "
            f"over {total_steps} steps, batch {batch_size}, clip {clip_norm}"
        ),
    )


def pretrain_recipe(
    model="B/16",
    dataset="imagenet21k",
    *,
    num_examples=None,
    epochs=None,
    total_steps=None,
    warmup_steps=PRETRAIN_WARMUP_STEPS,
    learning_rate=None,
    weight_decay=None,
    dropout=None,
    batch_size=PRETRAIN_BATCH_SIZE,
    accum_steps=1,
):
    """The paper's pre-training recipe for `model` on `dataset` (Table 3).

    Args:
        model: a variant ("B/16") or a constructor name ("ViT_B16").
        dataset: the Table 3 row: "jft300m", "imagenet21k" or "imagenet"
            (ImageNet-1k, any model).
        num_examples: examples per epoch of the data actually used (default
            the paper's dataset size); with `epochs` it sets the step count.
        epochs, total_steps: override the preset's epochs / the step count.
        warmup_steps: linear warm-up (10k in the paper; at most a tenth of a
            shorter run).
        learning_rate, weight_decay, dropout: override the preset's.
        batch_size: global batch (4096 in the paper).
        accum_steps: micro-batches per update (see `Trainer`).

    Returns a `Recipe`: Adam (beta 0.9, 0.999) with decoupled weight decay
    (Keras's AdamW: each update also subtracts lr * weight_decay * w),
    warm-up then linear decay (cosine and clipping at global norm 1 for
    ImageNet-1k), sigmoid cross-entropy for the multi-label datasets and
    softmax cross-entropy for ImageNet-1k, both on the head's logits
    (`model_kwargs` sets `classifier_activation=None` and the dropout).
    """
    if dataset not in PRETRAIN_DATASETS:
        raise ValueError(f"Unknown pre-training dataset {dataset!r}; use one of {', '.join(PRETRAIN_DATASETS)}.")
    variant = _variant(model)
    preset = next(
        (p for p in PRETRAIN_PRESETS if p.dataset == dataset and (variant in p.variants or "*" in p.variants)),
        None,
    )
    if preset is None:
        if learning_rate is None or weight_decay is None or epochs is None and total_steps is None:
            rows = sorted({v for p in PRETRAIN_PRESETS if p.dataset == dataset for v in p.variants})
            raise ValueError(
                f"Table 3 has no {dataset} row for {variant}; it has {', '.join(rows)}. "
                "Give learning_rate, weight_decay and epochs (or total_steps) for another model."
            )
        preset = PretrainPreset((variant,), dataset, epochs or 1, learning_rate, "linear", weight_decay, dropout or 0.0)
    info = PRETRAIN_DATASETS[dataset]
    if total_steps is None:
        total_steps = math.ceil((epochs or preset.epochs) * (num_examples or info.num_examples) / batch_size)
    warmup_steps = min(warmup_steps, total_steps // 10)
    schedule = WarmupDecay(learning_rate or preset.learning_rate, total_steps, warmup_steps, preset.decay)
    weight_decay = preset.weight_decay if weight_decay is None else weight_decay
    optimizer = keras.optimizers.AdamW(
        learning_rate=schedule,
        beta_1=0.9,
        beta_2=0.999,
        weight_decay=weight_decay,
        global_clipnorm=preset.clip_norm,
    )
    loss = SigmoidCrossEntropy() if info.multi_label else keras.losses.CategoricalCrossentropy(from_logits=True)
    dropout = preset.dropout if dropout is None else dropout
    return Recipe(
        optimizer=optimizer,
        learning_rate=schedule,
        loss=loss,
        batch_size=_check_batch(batch_size, accum_steps),
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        accum_steps=accum_steps,
        model_kwargs={"dropout_rate": dropout, "classifier_activation": None},
        description=(
            f"pre-train ({variant} on {dataset}): Adam lr {schedule.base_learning_rate:g}, weight decay "
            f"{weight_decay:g}, dropout {dropout:g}, {warmup_steps} warm-up + {preset.decay} decay over "
            f"{total_steps} steps, batch {batch_size}, clip {preset.clip_norm}, {loss.name}"
        ),
    )


def _variant(model):
    """"ViT_B16" -> "B/16"; a variant name stays as it is."""
    from keras_vit import models

    if model in models.CONSTRUCTORS:
        return getattr(models.CONSTRUCTORS[model], "variant", model)
    return model


def _check_batch(batch_size, accum_steps):
    if accum_steps < 1 or batch_size % accum_steps:
        raise ValueError(f"batch size {batch_size} must be a multiple of accum_steps {accum_steps} (at least 1).")
    return batch_size


# ---------------------------------------------------------------------------
# Trainer: gradient accumulation and clipping that hold under tf.distribute
# ---------------------------------------------------------------------------


class Trainer(keras.Model):
    """Trains `model` (TensorFlow backend): fit/evaluate/predict as usual.

    Each train step takes one batch per replica, splits it into `accum_steps`
    micro-batches, runs them one after the other (a while loop: only one
    micro-batch's activations live at a time) and applies the optimizer once
    with their mean gradient. With several replicas and a clipping optimizer
    the gradient is summed over replicas before it is clipped, as on one
    device. Save `trainer.model`, not the trainer.
    """

    def __init__(self, model, accum_steps=1, **kwargs):
        if keras.backend.backend() != "tensorflow":
            raise ValueError(
                "keras_vit.training.Trainer needs KERAS_BACKEND=tensorflow; on other backends use the "
                "optimizer's own gradient_accumulation_steps."
            )
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be at least 1, got {accum_steps}.")
        super().__init__(name=kwargs.pop("name", f"{model.name}_trainer"), **kwargs)
        self.model = model
        self.accum_steps = int(accum_steps)
        # Train steps done, saved with the weights. Not optimizer.iterations:
        # a LossScaleOptimizer does not count the steps it skips.
        self.steps_done = self.add_weight(
            shape=(), dtype="int64", initializer="zeros", trainable=False, name="steps_done",
            aggregation="only_first_replica",
        )  # fmt: skip
        self.built = model.built

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 learns the batch shapes by reducing a first batch across
        # replicas, which fails under MultiWorkerMirroredStrategy ("Attempt to
        # convert a value (PerReplica...)"); a local replica's batch has them too.
        import tensorflow as tf

        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: self._distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v,
                    next(batches),
                )
                break
        return super()._maybe_symbolic_build(data_batch=data_batch)

    def train_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        k = self.accum_steps
        if k == 1:
            grads = self._micro_step(x, y, sample_weight, variables)
        else:
            def split(t):  # (batch, ...) -> (k, batch / k, ...)
                return None if t is None else tf.reshape(t, tf.concat([[k, -1], tf.shape(t)[1:]], 0))

            xs, ys, ws = tf.nest.map_structure(split, (x, y, sample_weight))

            def body(i, summed):
                def take(t):
                    return None if t is None else tf.gather(t, i)

                xi, yi, wi = tf.nest.map_structure(take, (xs, ys, ws))
                return [s + g for s, g in zip(summed, self._micro_step(xi, yi, wi, variables))]

            zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
            grads = [g / k for g in ops.fori_loop(0, k, body, zeros)]
        grads = self._clip_over_replicas(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        self.steps_done.assign_add(1)
        return self._logs()

    def test_step(self, data):
        super().test_step(data)
        return self._logs()

    def _logs(self):
        import tensorflow as tf

        logs = self.get_metrics_result()
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 averages each log over the workers with
            # strategy.reduce("MEAN", v, axis=0), which needs an axis 0
            # (tensorflow/tensorflow#72388): give the scalars one.
            logs = tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)
        return logs

    def _micro_step(self, x, y, sample_weight, variables):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            # Already divided by the replica count, so that the optimizer's sum
            # over replicas is the mean gradient.
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)  # mixed_float16's loss scale
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":  # the loss Keras reports: this replica's mean
                metric.update_state(loss * replicas, sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
        self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return tape.gradient(scaled, variables)

    def _clip_over_replicas(self, grads):
        """Clips the replicas' summed gradient; returns each replica's share.

        The optimizer sums the replicas' gradients after clipping them; here the
        sum is taken first, clipped as the optimizer is configured to, and
        split again (1/R each), so the optimizer's own clipping then finds
        nothing left to clip.
        """
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)  # under a LossScaleOptimizer
        if replicas == 1 or not (inner.global_clipnorm or inner.clipnorm or inner.clipvalue):
            return grads
        loss_scale = self.optimizer.scale_loss(1.0)  # gradients are scaled by it until the optimizer unscales
        total = [g / loss_scale for g in context.all_reduce(tf.distribute.ReduceOp.SUM, grads)]
        if inner.global_clipnorm:
            total, _ = tf.clip_by_global_norm(total, inner.global_clipnorm)
        if inner.clipnorm:
            total = [tf.clip_by_norm(g, inner.clipnorm) for g in total]
        if inner.clipvalue:
            total = [tf.clip_by_value(g, -inner.clipvalue, inner.clipvalue) for g in total]
        return [g * loss_scale / replicas for g in total]


# ---------------------------------------------------------------------------
# tf.distribute strategies
# ---------------------------------------------------------------------------

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(count):
    """Splits the host CPU into `count` logical devices, so MirroredStrategy
    can run several replicas without GPUs. Call before TensorFlow starts."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise RuntimeError(f"split_cpu({count}) must run before TensorFlow initialises its devices: {error}") from error


def make_strategy(name="auto", tpu=None):
    """A `tf.distribute.Strategy`, by name (see `STRATEGIES`).

    auto: multi_worker when TF_CONFIG names several tasks, mirrored over
    several GPUs (or logical CPUs), else one device. one_device: the first GPU,
    else the CPU. mirrored: all local GPUs, else all logical CPUs.
    multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG. tpu: TPUStrategy
    from a TPU cluster resolver (`tpu`: a TPU name or "local" on a TPU VM).
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        if _tf_config_tasks() > 1:
            name = "multi_worker"
        elif len(_local_devices()) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(_local_devices()[0])
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(_local_devices())
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "--strategy multi_worker needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}).'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as error:  # noqa: BLE001 - any failure here means: no TPU reachable
        raise ValueError(
            f"--strategy tpu: no TPU found ({first_line(error)}). Run on a TPU VM with --tpu local, "
            "or pass --tpu with the name of a Cloud TPU."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _local_devices():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def _tf_config_tasks():
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        raise ValueError("TF_CONFIG is not valid JSON.") from None
    return sum(len(tasks) for tasks in cluster.values())


def first_line(error):
    """An exception's message, first line only: user errors are one line."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def task_directory(model_dir, strategy=None):
    """Where this task writes: `model_dir` for the chief (or a single
    process), `model_dir/worker-N` for the other workers of a multi-worker
    run, so no two tasks write the same file, shared file system or not."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and not _has_chief(resolver)):
        return model_dir
    return os.path.join(model_dir, f"{task_type}-{task_id}")


def _has_chief(resolver):
    try:
        return "chief" in resolver.cluster_spec().as_dict()
    except Exception:  # noqa: BLE001 - no cluster spec: a single task
        return False


# ---------------------------------------------------------------------------
# Fault-tolerant training
# ---------------------------------------------------------------------------


class Backup(keras.callbacks.Callback):
    """Saves the whole training state (weights, optimizer slots, step) at the
    end of every epoch and restores it with `restore()`.

    Unlike `keras.callbacks.BackupAndRestore` (Keras 3.15), a save is atomic
    (written aside, then renamed: a kill mid-save keeps the previous one), a
    run resumes at the exact step saved rather than at the start of the
    epoch, and each task of a multi-worker run keeps its own copy.
    """

    WEIGHTS = "state.weights.h5"
    INFO = "state.json"

    def __init__(self, directory):
        super().__init__()
        self.directory = directory
        self.path = os.path.join(directory, self.WEIGHTS)

    def restore(self, model):
        """Loads the saved state into a `Trainer`; returns the step it was saved at (0: none)."""
        if not os.path.exists(self.path):
            return 0
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.path)
        return _step(model)

    def on_epoch_end(self, epoch, logs=None):
        self.save()

    def save(self):
        os.makedirs(self.directory, exist_ok=True)
        partial = os.path.join(self.directory, "partial-" + self.WEIGHTS)
        self.model.save_weights(partial)
        os.replace(partial, self.path)
        _write_json(os.path.join(self.directory, self.INFO), {"step": _step(self.model)})


def _step(trainer):
    return int(ops.convert_to_numpy(trainer.steps_done))


def _write_json(path, content):
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(partial, path)


def train(
    trainer,
    train_data,
    total_steps,
    model_dir,
    *,
    save_every=100,
    eval_data=None,
    callbacks=(),
    verbose=2,
):
    """Runs `total_steps` updates of `trainer` with checkpoints, resuming
    where a previous run with the same `model_dir` stopped.

    Args:
        trainer: a compiled `Trainer`, built under the strategy's scope.
        train_data: `train_data(start_step)` -> a repeated `tf.data.Dataset`
            of global batches; a resumed run gets the step it resumes from.
        total_steps: optimizer updates in the whole run.
        model_dir: gets `checkpoint/` (the training state, saved every
            `save_every` steps), `logs/` (TensorBoard), `model.keras` (the
            trained model) and `results.json`; other workers of a
            multi-worker run write the same under `model_dir/worker-N`.
        eval_data: a dataset evaluated at the end.
        callbacks: more Keras callbacks.
        verbose: `fit`'s verbosity (2: a line per checkpoint interval).

    The strategy is the one the trainer was built under.

    Returns the results dict also written to results.json: steps done,
    the step it resumed from, per-epoch training logs, the evaluation.
    """
    strategy = trainer.distribute_strategy
    directory = task_directory(model_dir, strategy)
    is_chief = directory == model_dir
    backup = Backup(os.path.join(directory, "checkpoint"))
    with strategy.scope():  # optimizer slots made by the restore belong to the strategy
        start_step = backup.restore(trainer)
    if start_step:
        print(f"Resuming from step {start_step} (saved in {backup.path}).", flush=True)
    callbacks = [backup, *callbacks]
    if is_chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(directory, "logs")))

    history = {}
    began = time.time()
    # A Keras epoch is one checkpoint interval; a shorter one ends the run.
    full, last = divmod(max(total_steps - start_step, 0), save_every)
    for count, length in ((full, save_every), (1 if last else 0, last)):
        if not count:
            continue
        step = _step(trainer)
        first_epoch = step // save_every  # only numbers the log lines
        fitted = trainer.fit(
            train_data(step),
            initial_epoch=first_epoch,
            epochs=first_epoch + count,
            steps_per_epoch=length,
            shuffle=False,  # the dataset shuffles
            callbacks=callbacks,
            verbose=verbose,
        )
        for key, values in fitted.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    results = {
        "steps": _step(trainer),
        "start_step": start_step,
        "train_seconds": round(time.time() - began, 1),
        "replicas": strategy.num_replicas_in_sync,
        "history": history,
    }
    if eval_data is not None:
        results["eval"] = {k: float(v) for k, v in trainer.evaluate(eval_data, return_dict=True, verbose=0).items()}
    model = getattr(trainer, "model", trainer)
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, "model.keras"))
    _write_json(os.path.join(directory, "results.json"), results)
    return results
