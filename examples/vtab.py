"""VTAB-1k with the paper's protocol (Table 2; per task, Table 9), on any tf.distribute strategy.

    python examples/vtab.py --model ViT_L16 --weights in21k --tasks all --output vtab-l16.json

Each task fine-tunes a fresh copy of the pre-trained model on its 1,000
training examples (train800val200) with SGD momentum 0.9, lr 0.01, 2,500 steps
of batch 512 at 384x384, cosine decay, clipping at 1, and measures top-1
accuracy on its test split (keras_vit.evaluation.vtab). --tasks takes all, a
group (natural, specialized, structured) or task names, comma-separated.

--output gets the per-task accuracies, the group means and the VTAB mean as
JSON, rewritten after every task; the table printed at the end sits beside
the paper's Table 9 row for the same checkpoint where the paper has one
(ViT_L16 with the original ImageNet-21k file: "ViT-L/16 (ImageNet-21k)"), or
the row --paper_row names. Resisc45 and Retinopathy need a manual download
into <data_dir>/downloads/manual (the error says how; every task asked for is
checked before the first one trains). For a quick run on a
small machine: --model ViT --model_args patch_size=8,hidden_size=32,depth=2,
num_heads=4,mlp_dim=64 --image_size 32 --steps 10 --batch_size 16.
"""

import json
import os

import common
from absl import flags

from keras_vit import training
from keras_vit.errors import UsageError, first_line
from keras_vit.evaluation import vtab

_define = common._define
_define("string", "model", "ViT_B16", "a constructor name (ViT_Ti16 ... ViT_H14), or ViT with --model_args")
_define("string", "model_args", "", "more constructor arguments, key=value[,key=value], e.g. "
        "patch_size=8,hidden_size=32,depth=2,num_heads=4,mlp_dim=64 with --model ViT")
_define("string", "weights", None, "passed to the constructor: a checkpoint tag, an official .npz or a .weights.h5")
_define("string", "tasks", "all", "all, natural, specialized, structured or task names, comma-separated "
        f"({', '.join(vtab.TASKS)})")
_define("string", "data_dir", None, "the TFDS data directory (manual downloads go to its downloads/manual)")
_define("integer", "steps", vtab.STEPS, "optimizer updates per task", lower_bound=1)
_define("integer", "batch_size", vtab.BATCH_SIZE, "global batch size, split across replicas", lower_bound=1)
_define("integer", "accum_steps", 1, "micro-batches per update (gradient accumulation)", lower_bound=1)
_define("integer", "eval_batch_size", None, "global test batch size (default --batch_size / --accum_steps)",
        lower_bound=1)
_define("integer", "image_size", vtab.RESOLUTION, "training and test resolution", lower_bound=1)
_define("float", "learning_rate", vtab.LEARNING_RATE, "base learning rate", lower_bound=0)
_define("integer", "warmup_steps", None, "linear warm-up steps (default 500 of 2,500: a fifth of a shorter run)",
        lower_bound=0)
_define("integer", "seed", 0, "seed of the data order, augmentation and initialisation")
_define("bool", "mixed_precision", False, "mixed_float16 on GPUs, mixed_bfloat16 elsewhere")
_define("enum", "strategy", "auto", "tf.distribute strategy", enum_values=list(training.STRATEGIES))
_define("string", "tpu", None, "the TPU for --strategy tpu: a Cloud TPU name, or local on a TPU VM")
_define("string", "paper_row", "auto", "the Table 9 row to print beside the results: auto (from --model and "
        f"--weights), none, or one of: {'; '.join(vtab.PAPER_TABLE_9)}")
_define("string", "output", None, "the JSON file of the results")
flags.mark_flags_as_required(["output"])
FLAGS = flags.FLAGS


def main(argv):
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)
    if len(argv) > 1:
        common.fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
    try:
        run()
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        common.fail(first_line(error))


def _paper_row():
    if FLAGS.paper_row == "none":
        return None
    if FLAGS.paper_row == "auto":
        return vtab.paper_row_for(FLAGS.model, FLAGS.weights)
    if FLAGS.paper_row not in vtab.PAPER_TABLE_9:
        raise UsageError(f"--paper_row {FLAGS.paper_row!r}: use auto, none or one of: {'; '.join(vtab.PAPER_TABLE_9)}")
    return FLAGS.paper_row


def run():
    import keras

    from keras_vit import models

    tasks = vtab.parse_tasks(FLAGS.tasks)  # a wrong name fails before TensorFlow starts
    paper_row = _paper_row()
    if keras.backend.backend() != "tensorflow":
        raise UsageError(f"this script uses tf.distribute: set KERAS_BACKEND=tensorflow (it is {keras.backend.backend()})")
    if FLAGS.model == "ViT":
        constructor = models.ViT
    else:
        constructor = models.get_constructor(FLAGS.model)
    model_args = common._parse_model_args(FLAGS.model_args)
    strategy = training.make_strategy(FLAGS.strategy, FLAGS.tpu)
    if FLAGS.mixed_precision:
        import tensorflow as tf

        keras.mixed_precision.set_global_policy(
            "mixed_float16" if tf.config.list_logical_devices("GPU") else "mixed_bfloat16"
        )

    def build_model(num_classes, input_shape):
        try:
            return constructor(weights=FLAGS.weights, input_shape=input_shape, classes=num_classes, **model_args)
        except TypeError as error:  # an argument the constructor does not take
            raise UsageError(f"--model {FLAGS.model} --model_args: {error}") from None

    warmup = vtab.default_warmup_steps(FLAGS.steps) if FLAGS.warmup_steps is None else FLAGS.warmup_steps
    report = {
        "model": FLAGS.model,
        "model_args": model_args,
        "weights": FLAGS.weights,
        "protocol": {
            "steps": FLAGS.steps, "batch_size": FLAGS.batch_size, "accum_steps": FLAGS.accum_steps,
            "image_size": FLAGS.image_size, "learning_rate": FLAGS.learning_rate, "warmup_steps": warmup,
            "seed": FLAGS.seed, "replicas": strategy.num_replicas_in_sync,
        },
        "paper_row": paper_row,
        "paper": vtab.PAPER_TABLE_9.get(paper_row),
    }
    accuracies, details = {}, {}

    def write(results):
        report.update(
            results={name: results[name] for name in vtab.TASKS if name in results},
            groups={group: results[group] for group in vtab.GROUPS if group in results},
            mean=results.get("mean"),
            details=details,
        )
        partial = FLAGS.output + ".partial"
        os.makedirs(os.path.dirname(os.path.abspath(FLAGS.output)), exist_ok=True)
        with open(partial, "w") as f:
            json.dump(report, f, indent=1)
        os.replace(partial, FLAGS.output)

    def on_task(name, task_details):
        accuracies[name], details[name] = task_details["accuracy"], task_details
        write(vtab.summarize(accuracies))

    print(f"VTAB-1k: {FLAGS.model} on {len(tasks)} task(s) at {FLAGS.image_size}x{FLAGS.image_size}, "
          f"{FLAGS.steps} steps of batch {FLAGS.batch_size}, lr {FLAGS.learning_rate:g}, {warmup} warm-up steps, "
          f"{strategy.num_replicas_in_sync} replica(s).", flush=True)
    results = vtab.run(
        build_model, tasks, data_dir=FLAGS.data_dir, steps=FLAGS.steps, batch_size=FLAGS.batch_size,
        image_size=FLAGS.image_size, accum_steps=FLAGS.accum_steps, learning_rate=FLAGS.learning_rate,
        warmup_steps=warmup, eval_batch_size=FLAGS.eval_batch_size, strategy=strategy, seed=FLAGS.seed,
        on_task=on_task,
    )
    write(results)
    print(vtab.format_results(results, paper_row))
    if paper_row is None:
        print("(The paper's Table 9 has rows for: " + "; ".join(vtab.PAPER_TABLE_9) + "; --paper_row picks one.)")
    print(f"Results: {FLAGS.output}", flush=True)


if __name__ == "__main__":
    from absl import app

    app.run(main, flags_parser=common._parse_flags)
