"""The paper's data-size study (§4.3, Figures 3 and 4): pre-train several model sizes on nested
subsets of one dataset, then measure each by linear few-shot accuracy.

    python examples/scaling.py --models micro,mini --dataset digits --image_size 16 \\
        --train_examples 100,300,1000,1437 --seeds 0,1,2 --output_dir runs/scaling

For every model, subset size N and seed: a model with random weights is
pre-trained for --steps updates on the first N examples of the dataset's
training split (`keras_vit.data.subset`: the same N examples for every model
and seed, nested across N), with the paper's ImageNet pre-training recipe
(Adam, weight decay, warm-up then cosine decay, clipping at 1); then its
representation is evaluated by linear few-shot regression
(`keras_vit.evaluation.few_shot`, seeds 0..2 of the shot draw) on
--fewshot_dataset. Each run lives in --output_dir/MODEL/N/seed-S/ and is
resumed or skipped when started again; scaling.csv (one row per model, N,
seed and shot count) and scaling.png (mean accuracy against N, one line per
model, the spread over seeds as error bars) are rewritten at the end.

--models takes constructor names (ViT_Ti16, ...) or the small sizes of
SMALL_MODELS, meant for low-resolution offline data such as digits.
"""

import csv
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # tf.data and the Trainer
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from keras_vit.errors import UsageError, first_line  # noqa: E402

# Widths and depths in the ratios of Ti/16 -> S/16 -> B/16, scaled down for 16x16 images.
SMALL_MODELS = {
    "micro": dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_dim=128),
    "mini": dict(patch_size=4, hidden_size=64, depth=4, num_heads=4, mlp_dim=256),
    "small": dict(patch_size=4, hidden_size=128, depth=6, num_heads=4, mlp_dim=512),
}

flags.DEFINE_list("models", ["micro", "mini"], f"constructor names or small sizes ({', '.join(SMALL_MODELS)})")
flags.DEFINE_string("dataset", "digits", "pre-training data: digits, a TFDS name of keras_vit.data or an image folder")
flags.DEFINE_string("fewshot_dataset", None, "few-shot evaluation data (default --dataset)")
flags.DEFINE_string("data_dir", None, "the TFDS data directory")
flags.DEFINE_list("train_examples", ["100", "300", "1000", "1437"], "pre-training subset sizes (nested)")
flags.DEFINE_list("seeds", ["0", "1", "2"], "training seeds (initialisation and data order)")
flags.DEFINE_list("shots", ["1", "5", "10"], "few-shot examples per class")
flags.DEFINE_integer("image_size", 16, "resolution of pre-training and evaluation", lower_bound=1)
flags.DEFINE_integer("steps", 300, "updates per pre-training run (the same for every N)", lower_bound=1)
flags.DEFINE_integer("batch_size", 64, "pre-training batch size", lower_bound=1)
flags.DEFINE_float("learning_rate", 1e-3, "peak learning rate", lower_bound=0)
flags.DEFINE_float("weight_decay", 0.1, "decoupled weight decay", lower_bound=0)
flags.DEFINE_string("output_dir", "runs/scaling", "runs, scaling.csv and scaling.png")
FLAGS = flags.FLAGS

CSV_FIELDS = ("model", "train_examples", "seed", "shots", "accuracy", "fewshot_seed_accuracies")


def _ints(name, values):
    try:
        numbers = [int(v) for v in values]
    except ValueError:
        raise UsageError(f"--{name} takes whole numbers separated by commas, got {','.join(values)}") from None
    if not numbers:
        raise UsageError(f"--{name} is empty")
    return numbers


def build_model(name, classes, image_size, dropout):
    from keras_vit import models

    shape = (image_size, image_size, 3)
    if name in SMALL_MODELS:
        return models.ViT(**SMALL_MODELS[name], input_shape=shape, classes=classes, dropout_rate=dropout,
                          classifier_activation=None, name=f"vit_{name}")
    return models.CONSTRUCTORS[name](input_shape=shape, classes=classes, dropout_rate=dropout,
                                     classifier_activation=None)


def pretrain(model_name, train_source, num_examples, seed, run_dir):
    """One pre-training run (resumed if it was interrupted); returns the trained model."""
    import keras

    from keras_vit import data, training

    subset = data.subset(train_source, num_examples)
    recipe = training.pretrain_recipe(
        "*", "imagenet", total_steps=FLAGS.steps, learning_rate=FLAGS.learning_rate,
        weight_decay=FLAGS.weight_decay, dropout=0.0, batch_size=FLAGS.batch_size,
        warmup_steps=max(FLAGS.steps // 10, 1),
    )
    keras.utils.set_random_seed(seed)
    model = build_model(model_name, train_source.num_classes, FLAGS.image_size, recipe.model_kwargs["dropout_rate"])
    trainer = training.Trainer(model)
    trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss)
    value_range = data.input_range(model)

    def batches(start_step):
        return data.train_dataset(subset, FLAGS.image_size, FLAGS.batch_size, seed=seed, start_step=start_step,
                                  value_range=value_range)

    # A run_dir trained under other flags is refused, not reused or resumed under another schedule.
    settings = dict(model=model_name, dataset=train_source.name, train_examples=num_examples, seed=seed,
                    image_size=FLAGS.image_size, batch_size=FLAGS.batch_size, steps=recipe.total_steps,
                    learning_rate=FLAGS.learning_rate, weight_decay=FLAGS.weight_decay)
    training.train(trainer, batches, recipe.total_steps, run_dir, save_every=recipe.total_steps, verbose=0,
                   settings=settings)
    return model


def study():
    from keras_vit import data, evaluation

    sizes = sorted(_ints("train_examples", FLAGS.train_examples))
    seeds = _ints("seeds", FLAGS.seeds)
    shots = tuple(_ints("shots", FLAGS.shots))
    train_source = data.source(FLAGS.dataset, "train", FLAGS.data_dir)
    if train_source.num_examples is not None and sizes[-1] > train_source.num_examples:
        raise UsageError(f"--train_examples {sizes[-1]} is more than the {train_source.num_examples} examples "
                         f"of {train_source.name}'s training split")
    fewshot_sources = evaluation.fewshot.dataset_sources(FLAGS.fewshot_dataset or FLAGS.dataset, FLAGS.data_dir)
    from keras_vit import models

    unknown = [name for name in FLAGS.models if name not in SMALL_MODELS and name not in models.CONSTRUCTORS]
    if unknown:  # checked before hours of training
        raise UsageError(f"--models: unknown {', '.join(unknown)}; use {', '.join(SMALL_MODELS)} or constructor "
                         f"names ({', '.join(models.CONSTRUCTORS)})")
    os.makedirs(FLAGS.output_dir, exist_ok=True)
    rows = []
    for model_name in FLAGS.models:
        for num_examples in sizes:
            for seed in seeds:
                run_dir = os.path.join(FLAGS.output_dir, model_name, str(num_examples), f"seed-{seed}")
                model = pretrain(model_name, train_source, num_examples, seed, run_dir)
                result = evaluation.few_shot(model, {"fewshot": fewshot_sources}, shots=shots, verbose=0)["fewshot"]
                for k in shots:
                    rows.append(dict(model=model_name, train_examples=num_examples, seed=seed, shots=k,
                                     accuracy=round(result["mean"][k], 5),
                                     fewshot_seed_accuracies=" ".join(f"{result['per_seed'][s][k]:.4f}"
                                                                      for s in sorted(result["per_seed"]))))
                print(f"{model_name:>8}  N={num_examples:<7} seed {seed}  "
                      + "  ".join(f"{k}-shot {100 * result['mean'][k]:.1f}%" for k in shots), flush=True)
    path = os.path.join(FLAGS.output_dir, "scaling.csv")
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    picture = plot(rows, os.path.join(FLAGS.output_dir, "scaling.png"))
    print(f"Results: {path}" + (f", {picture}" if picture else ""))
    return rows


def summary(rows):
    """{(model, shots): [(N, mean over seeds, min, max), ...]} of the CSV rows."""
    import numpy as np

    table = {}
    for (model, k) in dict.fromkeys((r["model"], r["shots"]) for r in rows):
        points = []
        for n in sorted({r["train_examples"] for r in rows}):
            values = [r["accuracy"] for r in rows if (r["model"], r["shots"], r["train_examples"]) == (model, k, n)]
            if values:
                points.append((n, float(np.mean(values)), min(values), max(values)))
        table[(model, k)] = points
    return table


def plot(rows, path):
    """Figure 4's layout: few-shot accuracy against pre-training examples, one line per model."""
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'keras-vit[viz]').", file=sys.stderr)
        return None
    shots = sorted({r["shots"] for r in rows})
    figure = Figure(figsize=(4 * len(shots), 3.4))
    FigureCanvasAgg(figure)
    table = summary(rows)
    for index, k in enumerate(shots):
        axes = figure.add_subplot(1, len(shots), index + 1)
        for (model, shot), points in table.items():
            if shot != k:
                continue
            n, mean, low, high = (list(column) for column in zip(*points))
            axes.errorbar(n, [100 * m for m in mean],
                          yerr=[[100 * (m - lo) for m, lo in zip(mean, low)], [100 * (hi - m) for m, hi in zip(mean, high)]],
                          marker="o", capsize=3, label=model)
        axes.set_xscale("log")
        axes.set_xlabel("pre-training examples")
        axes.set_ylabel(f"linear {k}-shot accuracy (%)")
        axes.grid(alpha=0.3)
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def main(argv):
    if len(argv) > 1:
        _fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
    try:
        study()
    except (UsageError, ValueError, FileNotFoundError) as error:
        _fail(first_line(error))


def _fail(message):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


if __name__ == "__main__":
    app.run(main)
