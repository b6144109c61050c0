"""Training ViTs as the paper does, under any `tf.distribute` strategy (TensorFlow)
or `keras.distribution` (JAX: `layout_map` splits a model over devices).

    recipe = keras_vit.training.finetune_recipe("cifar10", accum_steps=8)
    with strategy.scope():
        model = keras_vit.ViT_B16(weights=..., classes=10, input_shape=(384, 384, 3), **recipe.model_kwargs)
        trainer = keras_vit.training.Trainer(model, accum_steps=recipe.accum_steps)
        trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss, metrics=["accuracy"])
    keras_vit.training.train(trainer, lambda step: make_batches(step), recipe.total_steps, "runs/cifar10")

Its modules:

    recipes     the paper's schedules, losses and Table 3/4 presets; the self-supervised recipe
    trainer     `Trainer`: gradient accumulation and clipping under tf.distribute and keras.distribution
    distribute  strategies by name; where each task of a multi-worker run writes
    sharding    keras.distribution on JAX: `layout_map`, distributions by name, multi-process start
    loop        `train()`: checkpointed training that resumes where it was killed
"""

from keras_vit.training.distribute import STRATEGIES, make_strategy, split_cpu, task_directory
from keras_vit.training.loop import Backup, process_directory, train
from keras_vit.training.recipes import (
    DECAYS,
    FINETUNE_BATCH_SIZE,
    FINETUNE_LEARNING_RATE,
    FINETUNE_PRESETS,
    FINETUNE_RESOLUTION,
    FINETUNE_WARMUP_STEPS,
    MASKED_PATCH_LEARNING_RATE,
    MASKED_PATCH_STEPS,
    PRETRAIN_BATCH_SIZE,
    PRETRAIN_DATASETS,
    PRETRAIN_PRESETS,
    PRETRAIN_RESOLUTION,
    PRETRAIN_WARMUP_STEPS,
    FinetunePreset,
    PretrainDataset,
    PretrainPreset,
    Recipe,
    SigmoidCrossEntropy,
    WarmupDecay,
    finetune_recipe,
    masked_patch_recipe,
    pretrain_recipe,
)
from keras_vit.training.sharding import DISTRIBUTIONS, initialize, layout_map, make_distribution, per_device_bytes
from keras_vit.training.trainer import Trainer
