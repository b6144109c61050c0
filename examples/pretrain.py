"""Pre-trains a ViT with the paper's recipe (Appendix B.1, Table 3), on any tf.distribute strategy
or, on JAX, any keras.distribution.

    python examples/pretrain.py --model ViT_B16 --preset imagenet --dataset imagenet2012 \\
        --model_dir runs/b16-i1k --strategy tpu --tpu local
    KERAS_BACKEND=jax python examples/pretrain.py --model ViT_L16 --preset imagenet --dataset imagenet2012 \\
        --model_dir runs/l16-i1k --distribution model:8

Adam (0.9, 0.999) with decoupled weight decay, batch 4096 at 224x224, 10k
warm-up steps then linear decay (cosine and clipping at norm 1 for
ImageNet-1k), the learning rate, weight decay and dropout of Table 3 for
--model on the --preset dataset, sigmoid cross-entropy for the multi-label
presets (imagenet21k, jft300m). The step count is the preset's epochs over
--dataset unless --steps is given. See examples/common.py for the flags both
scripts share.

Self-supervised, without labels (masked patch prediction, §4.6, Appendix B.1.2):

    python examples/pretrain.py --objective masked_patch --model ViT_B16 --dataset path/to/images \
        --model_dir runs/b16-mpp [--target mean_color|downsampled|pixels] [--corruption_rate 0.5]
    python examples/finetune.py --model ViT_B16 --weights runs/b16-mpp/encoder.weights.h5 ...

The folder needs no class sub-folders. Adam, lr 2e-4, 10k warm-up, cosine
decay, batch 4096, 1M steps unless --steps (`training.masked_patch_recipe`);
--preset, --epochs, --weight_decay and --dropout do not apply. The run saves
`encoder.weights.h5` (the encoder without the mask token and the prediction
head) beside model.keras (the whole MaskedPatchPrediction).
"""

import common
from absl import flags

from keras_vit import training

common.define_flags(model="ViT_B16", image_size=training.PRETRAIN_RESOLUTION, batch_size=training.PRETRAIN_BATCH_SIZE)
common._define("enum", "preset", "imagenet", "the Table 3 row: the dataset the recipe was made for "
               "(imagenet covers every model)", enum_values=list(training.PRETRAIN_DATASETS))
common._define("integer", "epochs", None, "epochs over --dataset (default: the preset's)", lower_bound=1)
common._define("float", "weight_decay", None, "decoupled weight decay (default: the preset's)", lower_bound=0)
common._define("float", "dropout", None, "dropout rate (default: the preset's)", lower_bound=0, upper_bound=1)
common._define("enum", "objective", "supervised", "supervised (the labels, Table 3) or masked_patch "
               "(self-supervised, §4.6: no labels needed)", enum_values=["supervised", "masked_patch"])
common._define("enum", "target", "mean_color", "masked_patch: what each corrupted patch predicts",
               enum_values=["mean_color", "downsampled", "pixels"])
common._define("float", "corruption_rate", 0.5, "masked_patch: the fraction of each image's patches corrupted",
               lower_bound=0, upper_bound=1)
FLAGS = flags.FLAGS


def build_recipe(train_source, variant):
    if FLAGS.objective == "masked_patch":
        return training.masked_patch_recipe(
            total_steps=FLAGS.steps or training.MASKED_PATCH_STEPS,
            warmup_steps=FLAGS.warmup_steps,
            learning_rate=training.MASKED_PATCH_LEARNING_RATE if FLAGS.learning_rate is None else FLAGS.learning_rate,
            batch_size=FLAGS.batch_size,
            accum_steps=FLAGS.accum_steps,
        )
    return training.pretrain_recipe(
        variant,
        FLAGS.preset,
        num_examples=train_source.num_examples,
        epochs=FLAGS.epochs,
        total_steps=FLAGS.steps,
        warmup_steps=FLAGS.warmup_steps,
        learning_rate=FLAGS.learning_rate,
        weight_decay=FLAGS.weight_decay,
        dropout=FLAGS.dropout,
        batch_size=FLAGS.batch_size,
        accum_steps=FLAGS.accum_steps,
    )


if __name__ == "__main__":
    common.run(build_recipe)
