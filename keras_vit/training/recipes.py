"""The paper's training recipes: learning-rate schedule, losses and the presets of its Tables 3 and 4.

Recipes (`finetune_recipe`, `pretrain_recipe`) return a `Recipe`: a fresh
optimizer with its learning-rate schedule, the loss, the batch size and step
counts, and the model arguments (dropout, head activation) the recipe needs.

Fine-tuning (Appendix B.1.1, Table 4): SGD, momentum 0.9, no weight decay,
gradient clipping at global norm 1, linear warm-up then cosine decay, batch
512, softmax cross-entropy; the new head is zero-initialised (the model's
default). Pre-training (Appendix B.1, Table 3): Adam (0.9, 0.999) with
decoupled weight decay, batch 4096, 10k warm-up steps then linear decay
(cosine and clipping for ImageNet-1k), the learning rate, weight decay and
dropout of Table 3, sigmoid cross-entropy for the multi-label datasets.
Self-supervised (`masked_patch_recipe`, Appendix B.1.2): Adam, learning
rate 2e-4, 10k warm-up steps, cosine decay, batch 4096, 1M steps.
"""

import dataclasses
import math
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
        if not base_learning_rate > 0:  # a rate of 0 trains nothing: always a mistake
            raise ValueError(f"The learning rate must be more than 0, got {base_learning_rate}.")
        if not total_steps >= 1:
            raise ValueError(f"total_steps must be at least 1, got {total_steps}.")
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
    """A dataset's fine-tuning run in Table 4: its steps, learning-rate sweep and warm-up."""

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
    """A row of Table 3: the pre-training hyper-parameters of some variants on one dataset."""

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
    """A pre-training dataset's size and classes, as the paper gives them (Section 4.1)."""

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
    loss: Optional[keras.losses.Loss]  # None: the model adds its own (masked patch prediction)
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
    schedule = WarmupDecay(_given(learning_rate, FINETUNE_LEARNING_RATE), total_steps, warmup_steps, "cosine")
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
    warmup_steps=None,
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
        warmup_steps: linear warm-up steps; default 10k as in the paper, at
            most a tenth of a shorter run (a value given is used as it is).
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
    warmup_steps = _warmup(warmup_steps, total_steps)
    schedule = WarmupDecay(_given(learning_rate, preset.learning_rate), total_steps, warmup_steps, preset.decay)
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


MASKED_PATCH_STEPS = 1_000_000
MASKED_PATCH_LEARNING_RATE = 2e-4


def masked_patch_recipe(
    *,
    total_steps=MASKED_PATCH_STEPS,
    warmup_steps=None,
    learning_rate=MASKED_PATCH_LEARNING_RATE,
    batch_size=PRETRAIN_BATCH_SIZE,
    accum_steps=1,
):
    """The paper's self-supervised recipe: masked patch prediction (Appendix B.1.2).

    Adam (beta 0.9, 0.999, no weight decay), base learning rate 2e-4,
    10k warm-up steps then cosine decay, batch 4096, 1M steps (about 14
    epochs of JFT; the paper saw diminishing returns after 100k). The
    default warm-up is at most a tenth of a shorter run. For
    `keras_vit.pretraining.MaskedPatchPrediction`, which adds its own loss:
    `loss` is None (compile with `loss=recipe.loss`, i.e. none).
    `accum_steps`: micro-batches per update (see `Trainer`).
    """
    warmup_steps = _warmup(warmup_steps, total_steps)
    schedule = WarmupDecay(learning_rate, total_steps, warmup_steps, "cosine")
    optimizer = keras.optimizers.Adam(learning_rate=schedule, beta_1=0.9, beta_2=0.999)
    return Recipe(
        optimizer=optimizer,
        learning_rate=schedule,
        loss=None,
        batch_size=_check_batch(batch_size, accum_steps),
        total_steps=total_steps,
        warmup_steps=warmup_steps,
        accum_steps=accum_steps,
        model_kwargs={},
        description=(
            f"masked patch prediction: Adam lr {schedule.base_learning_rate:g}, {warmup_steps} warm-up + cosine "
            f"decay over {total_steps} steps, batch {batch_size}"
        ),
    )


def _given(value, default):
    """`value` unless it is None (0 is a value, not "unset": it gets refused)."""
    return default if value is None else value


def _warmup(warmup_steps, total_steps):
    """The pre-training warm-up: as given, else the paper's 10k, at most a tenth of a shorter run."""
    return min(PRETRAIN_WARMUP_STEPS, total_steps // 10) if warmup_steps is None else warmup_steps


def _variant(model):
    """"ViT_B16" -> "B/16"; a variant name stays as it is."""
    from keras_vit import models  # models never imports training

    if model in models.CONSTRUCTORS:
        return getattr(models.CONSTRUCTORS[model], "variant", model)
    return model


def _check_batch(batch_size, accum_steps):
    if accum_steps < 1 or batch_size % accum_steps:
        raise ValueError(f"batch size {batch_size} must be a multiple of accum_steps {accum_steps} (at least 1).")
    return batch_size
