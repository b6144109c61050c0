"""Fine-tunes a ViT with the paper's recipe (Appendix B.1.1), on any tf.distribute strategy
or, on JAX, any keras.distribution.

    python examples/finetune.py --model ViT_B16 --weights <checkpoint tag or .npz> \\
        --dataset cifar10 --model_dir runs/cifar10 --strategy mirrored
    KERAS_BACKEND=jax python examples/finetune.py --model ViT_H14 --weights in21k \\
        --dataset cifar10 --model_dir runs/h14-cifar10 --distribution model:4

SGD with momentum 0.9, no weight decay, global-norm clipping at 1, linear
warm-up then cosine decay, batch 512 at 384x384, a new zero-initialised head;
the steps, warm-up and learning rate of Table 4 for its datasets (other
datasets need --steps). Killed and started again with the same --model_dir,
it resumes from its last checkpoint (--save_every). See examples/common.py for
the flags both scripts share.
"""

import common
from absl import flags

from keras_vit import training

common.define_flags(model="ViT_B16", image_size=training.FINETUNE_RESOLUTION, batch_size=training.FINETUNE_BATCH_SIZE)
common._define("float", "clip_norm", 1.0, "clip the gradient at this global norm", lower_bound=0)
FLAGS = flags.FLAGS


def build_recipe(train_source, variant):
    del variant  # the fine-tuning recipe is the same for every model
    return training.finetune_recipe(
        train_source.name if train_source.name in training.FINETUNE_PRESETS else None,
        total_steps=FLAGS.steps,
        warmup_steps=FLAGS.warmup_steps,
        learning_rate=FLAGS.learning_rate,
        batch_size=FLAGS.batch_size,
        accum_steps=FLAGS.accum_steps,
        clip_norm=FLAGS.clip_norm or None,
    )


if __name__ == "__main__":
    common.run(build_recipe)
