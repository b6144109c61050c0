"""A small-scale, offline reproduction of the paper's self-supervised study (§4.6, Appendix B.1.2).

    python examples/masked_patch_digits.py --output_dir runs/mpp-digits              # every stage
    python examples/masked_patch_digits.py --output_dir runs/mpp-digits --stage pretrain
    python examples/masked_patch_digits.py --output_dir runs/mpp-digits --stage fewshot
    python examples/masked_patch_digits.py --output_dir runs/mpp-digits --stage finetune

Data: scikit-learn's digits (keras_vit.data.digits, 16x16: 1,437 training
and 360 test images, the fixed stratified split). The model: a small ViT
(--model, default "mini" of examples/scaling.py: width 64, 4 blocks, 4x4
patches, 16 patches per image).

1. pretrain: for each seed, masked patch prediction
   (keras_vit.pretraining.MaskedPatchPrediction: 50% of the patches, 80% mask
   / 10% random patch / 10% kept, the 3-bit mean colour) on the 1,437
   training images, labels unused; Adam, warm-up then cosine decay (the
   paper's recipe, with a learning rate and step count for this size). Saves
   seed-S/encoder.weights.h5.
2. fewshot: linear few-shot accuracy (keras_vit.evaluation's ridge
   classifier `linear_few_shot` on frozen features of the 16x16 images,
   shots drawn by `sample_shots`: 1/5/10 images per class, draw = the seed)
   of each pre-trained encoder and of the same model at its random
   initialisation (same seed), with the class token's representation (the
   paper's) and with the mean of the patch tokens.
3. finetune: fine-tuning on 10 labelled images per class (the 10-shot draw of
   the seed) with the paper's fine-tuning recipe (SGD, momentum 0.9,
   clipping at 1, warm-up then cosine decay; a new zero head), from each
   pre-trained encoder and from random initialisation with the same budget;
   accuracy on the 360 test images.

Each stage prints and saves its table (results.json, table.md) with the mean
and the standard deviation over the seeds; stages already done are read back.
"""

import json
import os
import sys
import time

os.environ.setdefault("KERAS_BACKEND", "tensorflow")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

SMALL_MODELS = {
    "micro": dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_dim=128),
    "mini": dict(patch_size=4, hidden_size=64, depth=4, num_heads=4, mlp_dim=256),
}

flags.DEFINE_enum("stage", "all", ["all", "pretrain", "fewshot", "finetune"], "what to run")
flags.DEFINE_string("output_dir", "runs/mpp-digits", "encoders, results.json and table.md")
flags.DEFINE_enum("model", "mini", list(SMALL_MODELS), "the ViT size")
flags.DEFINE_list("seeds", ["0", "1", "2"], "seeds: initialisation, corruption, data order, shot draw")
flags.DEFINE_enum("target", "mean_color", ["mean_color", "downsampled", "pixels"], "the masked patch target")
flags.DEFINE_float("corruption_rate", 0.5, "fraction of patches corrupted")
flags.DEFINE_integer("pretrain_steps", 1200, "pre-training updates, rounded up to whole epochs of the 1,437 images "
                     "(11 steps each at the default batch of 128)", lower_bound=1)
flags.DEFINE_integer("pretrain_batch_size", 128, "pre-training batch size", lower_bound=1, upper_bound=1437)
flags.DEFINE_float("pretrain_learning_rate", 1e-3, "pre-training peak learning rate (Adam)")
flags.DEFINE_integer("finetune_shots", 10, "labelled images per class for fine-tuning", lower_bound=1)
flags.DEFINE_integer("finetune_steps", 500, "fine-tuning updates", lower_bound=1)
flags.DEFINE_integer("finetune_batch_size", 50, "fine-tuning batch size (at most --finetune_shots x 10)", lower_bound=1)
flags.DEFINE_float("finetune_learning_rate", 0.01, "fine-tuning peak learning rate (SGD)")
FLAGS = flags.FLAGS

IMAGE_SIZE = 16
SHOTS = (1, 5, 10)


def digits():
    from keras_vit import data

    (x_train, y_train), (x_test, y_test) = data.digits(image_size=IMAGE_SIZE)
    return x_train.astype("float32"), y_train, x_test.astype("float32"), y_test


def build(seed, **kwargs):
    import keras

    from keras_vit import models

    keras.utils.set_random_seed(seed)
    return models.ViT(**SMALL_MODELS[FLAGS.model], input_shape=(IMAGE_SIZE, IMAGE_SIZE, 3),
                      name=f"vit_{FLAGS.model}", **kwargs)


def encoder_path(seed):
    return os.path.join(FLAGS.output_dir, f"seed-{seed}", "encoder.weights.h5")


PRETRAIN_FLAGS = ("model", "target", "corruption_rate", "pretrain_steps", "pretrain_batch_size",
                  "pretrain_learning_rate")


def pretrain_settings(seed):
    """What made seed-S/encoder.weights.h5 (saved beside it as pretrain.json)."""
    return {"seed": seed, **{name: FLAGS[name].value for name in PRETRAIN_FLAGS}}


def settings_path(seed):
    return os.path.join(os.path.dirname(encoder_path(seed)), "pretrain.json")


def check_encoder(seed):
    """Whether seed S's encoder is there, made with these flags: a stage reads
    an encoder back only when it is the one the flags ask for."""
    path = encoder_path(seed)
    if not os.path.exists(path):
        return False
    saved = None
    if os.path.exists(settings_path(seed)):
        with open(settings_path(seed)) as f:
            saved = json.load(f)
    wanted = pretrain_settings(seed)
    if saved != wanted:
        changed = "; ".join(f"--{name} {saved.get(name)} -> {wanted[name]}" for name in PRETRAIN_FLAGS
                            if saved.get(name) != wanted[name]) if saved else "no pretrain.json beside it"
        fail(f"{path} was pre-trained with other flags ({changed}): give those flags, or another --output_dir")
    return True


def fail(message):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


# --- 1. pre-training ------------------------------------------------------------


def pretrain(seed, x_train):
    import keras

    from keras_vit import training
    from keras_vit.pretraining import MaskedPatchPrediction

    path = encoder_path(seed)
    if check_encoder(seed):
        return None
    encoder = build(seed, include_top=False)
    mpp = MaskedPatchPrediction(encoder, target=FLAGS.target, corruption_rate=FLAGS.corruption_rate, seed=seed)
    recipe = training.masked_patch_recipe(total_steps=FLAGS.pretrain_steps,
                                          learning_rate=FLAGS.pretrain_learning_rate,
                                          batch_size=FLAGS.pretrain_batch_size)
    mpp.compile(optimizer=recipe.optimizer, jit_compile=True)
    batches = len(x_train) // FLAGS.pretrain_batch_size
    epochs = -(-FLAGS.pretrain_steps // batches)
    began = time.time()
    # Epochs of shuffled full batches, cut at the step count.
    import tensorflow as tf

    ds = (tf.data.Dataset.from_tensor_slices(x_train).shuffle(len(x_train), seed=seed, reshuffle_each_iteration=True)
          .batch(FLAGS.pretrain_batch_size, drop_remainder=True).repeat())
    history = mpp.fit(ds, steps_per_epoch=batches, epochs=epochs, verbose=0).history["loss"]
    os.makedirs(os.path.dirname(path), exist_ok=True)
    mpp.encoder.save_weights(path)
    with open(settings_path(seed), "w") as f:
        json.dump(pretrain_settings(seed), f, indent=1)
    result = {"seed": seed, "loss_first_epoch": history[0], "loss_last_epoch": history[-1],
              "steps": batches * epochs, "seconds": round(time.time() - began, 1)}
    print(f"pre-trained seed {seed}: loss {history[0]:.3f} -> {history[-1]:.3f} "
          f"({result['steps']} steps, {result['seconds']} s)", flush=True)
    keras.backend.clear_session()
    return result


# --- 2. linear few-shot ---------------------------------------------------------


def few_shot_accuracies(encoder, seed, x_train, y_train, x_test, y_test):
    import keras

    from keras_vit import evaluation
    from keras_vit.layers import TokenPooling

    token = evaluation.representation_model(encoder)
    gap = keras.Model(encoder.input, TokenPooling("gap", 1)(encoder.get_layer("encoder_norm").output))
    out = {}
    for name, model in (("token", token), ("gap", gap)):
        train = model.predict(x_train, batch_size=256, verbose=0)
        test = model.predict(x_test, batch_size=256, verbose=0)
        fitter = {}
        for k, indices in evaluation.sample_shots(y_train, SHOTS, seed, 10).items():
            fitter[k] = evaluation.linear_few_shot(train[indices], y_train[indices], test, y_test, 10)
        out[name] = fitter
    return out


# --- 3. fine-tuning -------------------------------------------------------------


def finetune(seed, weights, x_train, y_train, x_test, y_test):
    import keras
    import numpy as np

    from keras_vit import evaluation, training

    keras.utils.set_random_seed(seed)
    model = build(seed, weights=weights, classes=10)
    indices = evaluation.sample_shots(y_train, (FLAGS.finetune_shots,), seed, 10)[FLAGS.finetune_shots]
    recipe = training.finetune_recipe(total_steps=FLAGS.finetune_steps, learning_rate=FLAGS.finetune_learning_rate,
                                      batch_size=FLAGS.finetune_batch_size)
    model.compile(optimizer=recipe.optimizer, loss=recipe.loss, metrics=["accuracy"], jit_compile=True)
    x, y = x_train[indices], keras.utils.to_categorical(y_train[indices], 10)
    steps_per_epoch = max(len(x) // FLAGS.finetune_batch_size, 1)
    import tensorflow as tf

    ds = (tf.data.Dataset.from_tensor_slices((x, y)).shuffle(len(x), seed=seed, reshuffle_each_iteration=True)
          .batch(FLAGS.finetune_batch_size, drop_remainder=True).repeat())
    model.fit(ds, steps_per_epoch=steps_per_epoch, epochs=-(-FLAGS.finetune_steps // steps_per_epoch), verbose=0)
    predictions = model.predict(x_test, batch_size=256, verbose=0)
    accuracy = float(np.mean(np.argmax(predictions, axis=1) == y_test))
    keras.backend.clear_session()
    return accuracy


# --- the table ------------------------------------------------------------------


def summary(values):
    import numpy as np

    values = np.asarray(values, float) * 100
    return f"{values.mean():.1f} ± {values.std():.1f}"


def table(results):
    lines = []
    if "fewshot" in results:
        lines += ["| linear few-shot (test accuracy %) | representation | " + " | ".join(f"{k}-shot" for k in SHOTS) + " |",
                  "|---|---|" + "---|" * len(SHOTS)]
        for init in ("masked patch", "random init"):
            for rep in ("token", "gap"):
                rows = results["fewshot"][init]
                cells = [summary([r[rep][str(k)] for r in rows]) for k in SHOTS]
                lines.append(f"| {init} | {'class token' if rep == 'token' else 'mean of patch tokens'} | "
                             + " | ".join(cells) + " |")
        lines.append("")
    if "finetune" in results:
        shots = FLAGS.finetune_shots
        lines += [f"| fine-tuned on {shots} images per class | test accuracy % |", "|---|---|"]
        for init in ("masked patch", "random init"):
            lines.append(f"| {init} | {summary(results['finetune'][init])} |")
        lines.append("")
    return "\n".join(lines)


def main(argv):
    del argv
    seeds = [int(s) for s in FLAGS.seeds]
    # Misuse is refused before anything is trained or written.
    labelled = FLAGS.finetune_shots * 10  # digits' 10 classes
    if FLAGS.stage in ("all", "finetune") and FLAGS.finetune_batch_size > labelled:  # else no whole batch to train on
        fail(f"--finetune_batch_size {FLAGS.finetune_batch_size} is more than the {labelled} labelled images "
             f"(--finetune_shots {FLAGS.finetune_shots} x 10 classes)")
    for seed in seeds:
        if not check_encoder(seed) and FLAGS.stage in ("fewshot", "finetune"):
            fail(f"no pre-trained encoder at {encoder_path(seed)}: run --stage pretrain (or all) first")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    results_path = os.path.join(FLAGS.output_dir, "results.json")
    results = json.load(open(results_path)) if os.path.exists(results_path) else {}
    results.setdefault("seconds", {})
    x_train, y_train, x_test, y_test = digits()

    def save():
        with open(results_path, "w") as f:
            json.dump(results, f, indent=1)
        with open(os.path.join(FLAGS.output_dir, "table.md"), "w") as f:
            f.write(table(results))

    if FLAGS.stage in ("all", "pretrain"):
        began = time.time()
        runs = [pretrain(seed, x_train) for seed in seeds]
        results["pretrain"] = [r for r in runs if r] or results.get("pretrain", [])
        results["seconds"]["pretrain"] = round(time.time() - began, 1)
        save()
    if FLAGS.stage in ("all", "fewshot"):
        import keras

        began = time.time()
        fewshot = {"masked patch": [], "random init": []}
        for seed in seeds:
            for init, weights in (("masked patch", encoder_path(seed)), ("random init", None)):
                encoder = build(seed, include_top=False)
                if weights:
                    encoder.load_weights(weights)
                accuracies = few_shot_accuracies(encoder, seed, x_train, y_train, x_test, y_test)
                fewshot[init].append({rep: {str(k): v for k, v in acc.items()} for rep, acc in accuracies.items()})
                keras.backend.clear_session()
        results["fewshot"] = fewshot
        results["seconds"]["fewshot"] = round(time.time() - began, 1)
        save()
    if FLAGS.stage in ("all", "finetune"):
        began = time.time()
        tuned = {"masked patch": [], "random init": []}
        for seed in seeds:
            for init, weights in (("masked patch", encoder_path(seed)), ("random init", None)):
                tuned[init].append(finetune(seed, weights, x_train, y_train, x_test, y_test))
                print(f"fine-tuned seed {seed} from {init}: {tuned[init][-1]:.4f}", flush=True)
        results["finetune"] = tuned
        results["seconds"]["finetune"] = round(time.time() - began, 1)
        save()
    print(table(results))
    print("seconds per stage:", results["seconds"])


if __name__ == "__main__":
    app.run(main)
