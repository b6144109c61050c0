"""VTAB-1k as the paper runs it (Table 2; per task, Table 9): 19 tasks, 1,000 training examples each.

    from keras_vit.evaluation import vtab

    def build_model(num_classes, input_shape):   # a fresh pre-trained model with a new head
        return keras_vit.ViT_L16(weights="in21k", classes=num_classes, input_shape=input_shape)

    results = vtab.run(build_model, "all")        # {task: accuracy, group: mean, "mean": mean}
    print(vtab.format_results(results, "ViT-L/16 (ImageNet-21k)"))

Each task fine-tunes a fresh copy of the model on its `train800val200` split
(800 training + 200 validation examples) and reports top-1 accuracy on its
`test` split; the VTAB score is the mean over the 19 tasks (the paper's Table
2), and the Natural / Specialized / Structured means are over their tasks.

The tasks are those of google-research/task_adaptation (`task_adaptation/data/
*.py`, cited per task below): the TFDS builders and versions, where each
split comes from (a split of its own, or a slice of `train` that starts at a
percentage of it, computed from the TFDS split sizes as that code does), and
the label functions of the structured tasks. The code here is keras_vit's own.

The paper's protocol (Appendix B.1.1, Table 4): SGD with momentum 0.9, learning
rate 0.01, 2,500 steps of batch 512, cosine decay, no weight decay, gradients
clipped at global norm 1, resolution 384 for every task. Preprocessing follows
BiT (Kolesnikov et al. 2020), as the paper says: a random crop and a horizontal
flip at training time, each left out where it would change the label (which
tasks: google-research/scenic `scenic/projects/baselines/plainvit/configs/
vtab_plainvit_config.py`); test images are resized whole.
"""

import dataclasses
import math
import os
import re
import time
from typing import Callable, Optional, Union

import keras
import numpy as np

GROUPS = ("natural", "specialized", "structured")
SPLITS = ("train800", "val200", "train800val200", "test")

# The paper's protocol (Appendix B.1.1, Table 4).
STEPS = 2500
BATCH_SIZE = 512
LEARNING_RATE = 0.01
RESOLUTION = 384
# Warm-up: the protocol above names none for VTAB. The paper's fine-tuning code
# (google-research/vision_transformer, vit_jax/configs/common.py) warms up
# linearly for 500 steps by default, which is what we use for the 2,500-step
# runs. (Others: task_adaptation's run_all_tasks.sh warms up 80 of 1,000 steps;
# Scenic's ViT-G VTAB config 200 of 2,500.) Shorter runs warm up for a fifth.
WARMUP_STEPS = 500
LOG_EVERY = 100  # steps per Keras epoch: one progress line each

# BiT's training crop: the image resized to 448 x 448, then a random 384 x 384
# crop, i.e. (384/448)^2 = 73% of it. keras_vit's pipeline draws Inception-style
# boxes; VTAB's are fixed at that area (aspect ratio 3/4 to 4/3). Tasks without
# a crop are resized whole (area 100%).
BIT_CROP_AREA = (384 / 448) ** 2


def default_warmup_steps(steps):
    """500 warm-up steps for the paper's 2,500; a fifth of a shorter run."""
    return min(WARMUP_STEPS, steps // 5)


# ---------------------------------------------------------------------------
# Images and labels of the tasks
# ---------------------------------------------------------------------------


def _rgb(image):
    return image


def _gray_to_rgb(scale=1):
    """A one-channel image as three channels (times `scale`: dSprites stores 0/1 pixels)."""

    def to_rgb(image):
        import tensorflow as tf

        return tf.tile(image, [1, 1, 3]) * scale

    return to_rgb


def bin_index(value, thresholds):
    """The index of the last threshold strictly below `value` (thresholds sorted
    ascending): task_adaptation's `reduce_max(where(thresholds - value < 0))`."""
    import tensorflow as tf

    below = tf.constant(thresholds, value.dtype) < value
    return tf.reduce_sum(tf.cast(below, tf.int32)) - 1


# task_adaptation/data/clevr.py: _count_preprocess_fn. Scenes hold 3 to 10 objects.
def _clevr_count(example, features):
    import tensorflow as tf

    return tf.size(example["objects"]["size"]) - 3


# task_adaptation/data/clevr.py: _closest_object_preprocess_fn; the depth is the
# third pixel coordinate, binned at these thresholds.
CLEVR_DISTANCE_THRESHOLDS = (0.0, 8.0, 8.5, 9.0, 9.5, 10.0, 100.0)


def _clevr_distance(example, features):
    import tensorflow as tf

    return bin_index(tf.reduce_min(example["objects"]["pixel_coords"][:, 2]), CLEVR_DISTANCE_THRESHOLDS)


# task_adaptation/data/kitti.py: _closest_vehicle_distance_pp. Vehicles are the
# object types Car, Van and Truck (TFDS kitti's types 0-2); the distance is the
# z of the object's location in metres; no vehicle counts as 1,000 m.
KITTI_VEHICLE_TYPES = 3
KITTI_NO_VEHICLE_DISTANCE = 1000.0
KITTI_DISTANCE_THRESHOLDS = (-100.0, 8.0, 20.0, 999.0)


def _kitti_closest_vehicle(example, features):
    import tensorflow as tf

    objects = example["objects"]
    depths = tf.boolean_mask(objects["location"][:, 2], objects["type"] < KITTI_VEHICLE_TYPES)
    distance = tf.reduce_min(tf.concat([depths, [KITTI_NO_VEHICLE_DISTANCE]], axis=0))
    return bin_index(distance, KITTI_DISTANCE_THRESHOLDS)


def _dsprites_bins(attribute, bins=16):
    """task_adaptation/data/dsprites.py: the attribute's classes floor-divided by
    (its class count / bins): 32 x positions by 2, 40 orientations by 2.5."""

    def label(example, features):
        import tensorflow as tf

        width = features[attribute].num_classes / bins
        return tf.math.floordiv(tf.cast(example[attribute], tf.float32), width)

    return label


# ---------------------------------------------------------------------------
# The 19 tasks
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Task:
    """One VTAB-1k task.

    The split templates are TFDS split strings in which `{P%}` is P percent of
    the sliced split's examples, rounded down, and `{P%+Q%+N}` a sum of such
    terms and integers: they resolve against the TFDS split sizes
    (`tfds_split`). `label` is a feature name, or `label(example, features)`
    for a label computed from other features; `image` makes the
    `image_key` feature a uint8 RGB image.
    """

    name: str  # keras_vit's name of the task
    title: str  # the paper's Table 9 column
    group: str
    tfds_name: str  # TFDS builder name:version
    num_classes: int
    train800: str
    val200: str
    test: str
    source: str  # the task_adaptation file it follows
    label: Union[str, Callable] = "label"
    image: Callable = _rgb
    image_key: str = "image"
    crop: bool = True
    flip: bool = True
    manual_download: Optional[str] = None  # how to provide the files TFDS cannot download
    manual_marker: Optional[str] = None  # what the manual folder must hold

    @property
    def train800val200(self):
        return f"{self.train800}+{self.val200}"

    def split_template(self, split):
        if split not in SPLITS:
            raise ValueError(f"Unknown VTAB split {split!r}; use one of {', '.join(SPLITS)}.")
        return getattr(self, split)

    def tfds_split(self, split, sizes):
        """The TFDS split string of `split`, given {TFDS split: examples}."""
        return resolve_split(self.split_template(split), sizes, self.name)

    def crop_area(self):
        return (BIT_CROP_AREA, BIT_CROP_AREA) if self.crop else (1.0, 1.0)

    def image_of(self, example):
        """The uint8 RGB image of a decoded TFDS example."""
        return self.image(example[self.image_key])

    def label_of(self, example, features):
        """The int32 label of a decoded TFDS example (`features`: the builder's)."""
        import tensorflow as tf

        label = example[self.label] if isinstance(self.label, str) else self.label(example, features)
        return tf.cast(label, tf.int32)


def _tail_of_train(percent):
    """val200: the 200 examples of `train` from `percent`% on (train800 is its start)."""
    return "train[:800]", f"train[{{{percent}%}}:{{{percent}%+200}}]"


_VALIDATION = ("train[:800]", "validation[:200]")  # val200 from TFDS's validation split

_RESISC45_HELP = (
    "VTAB task resisc45 needs a manual download: get NWPU-RESISC45.rar (https://1drv.ms/u/s!AmgKYzARBl5ca3HNaHIlzp_IXjs)"
    " and extract it so that {manual_dir}/NWPU-RESISC45 holds its class folders (TFDS's manual folder under data_dir "
    "{data_dir}), then run again with that data_dir (--data_dir)."
)
_RETINOPATHY_HELP = (
    "VTAB task diabetic_retinopathy needs a manual download: get the Kaggle data "
    "(https://www.kaggle.com/c/diabetic-retinopathy-detection/data), unpack train.zip, test.zip and sample.zip into "
    "{manual_dir}/train, test and sample and put trainLabels.csv beside them (TFDS's manual folder under data_dir "
    "{data_dir}), then run again with that data_dir (--data_dir); TFDS makes the btgraham-300 images from them."
)

_TASK_LIST = [
    # --- Natural -----------------------------------------------------------
    Task("caltech101", "Caltech101", "natural", "caltech101:3.*.*", 102, *_tail_of_train(90), "test",
         "caltech.py"),
    Task("cifar100", "CIFAR-100", "natural", "cifar100:3.*.*", 100, *_tail_of_train(90), "test", "cifar.py"),
    Task("dtd", "DTD", "natural", "dtd:3.*.*", 47, *_VALIDATION, "test", "dtd.py"),
    Task("oxford_flowers102", "Flowers102", "natural", "oxford_flowers102:2.*.*", 102, *_VALIDATION, "test",
         "oxford_flowers102.py"),
    # task_adaptation reads version 3.*.*, which TFDS no longer builds; 4.0.0
    # adds head boxes and fixes corrupt images.
    Task("oxford_iiit_pet", "Pets", "natural", "oxford_iiit_pet:4.*.*", 37, *_tail_of_train(80), "test",
         "oxford_iiit_pet.py"),
    Task("sun397", "Sun397", "natural", "sun397/tfds:4.*.*", 397, *_VALIDATION, "test", "sun397.py"),
    Task("svhn", "SVHN", "natural", "svhn_cropped:3.*.*", 10, *_tail_of_train(90), "test", "svhn.py"),
    # --- Specialized -------------------------------------------------------
    Task("patch_camelyon", "Camelyon", "specialized", "patch_camelyon:2.*.*", 2, *_VALIDATION, "test",
         "patch_camelyon.py"),
    # EuroSAT and Resisc45 have a train split only: 60% train, 20% val, 20% test.
    Task("eurosat", "EuroSAT", "specialized", "eurosat/rgb:2.*.*", 10, *_tail_of_train(60), "train[{60%+20%}:]",
         "eurosat.py"),
    Task("resisc45", "Resisc45", "specialized", "resisc45:3.*.*", 45, *_tail_of_train(60), "train[{60%+20%}:]",
         "resisc45.py", manual_download=_RESISC45_HELP, manual_marker="NWPU-RESISC45"),
    Task("diabetic_retinopathy", "Retinopathy", "specialized", "diabetic_retinopathy_detection/btgraham-300:3.*.*",
         5, *_VALIDATION, "test", "diabetic_retinopathy.py", manual_download=_RETINOPATHY_HELP,
         manual_marker="trainLabels.csv"),
    # --- Structured --------------------------------------------------------
    # Clevr tests on TFDS's validation split, as task_adaptation does (CLEVR's
    # test images come without scene annotations).
    Task("clevr_count", "Clevr-Count", "structured", "clevr:3.*.*", 8, *_tail_of_train(90), "validation",
         "clevr.py", label=_clevr_count, crop=False),
    Task("clevr_distance", "Clevr-Dist", "structured", "clevr:3.*.*", 6, *_tail_of_train(90), "validation",
         "clevr.py", label=_clevr_distance, crop=False),
    Task("dmlab", "DMLab", "structured", "dmlab:2.0.1", 6, *_VALIDATION, "test", "dmlab.py", crop=False),
    # dSprites has a train split only: 80% train, 10% val, 10% test.
    Task("dsprites_location", "dSpr-Loc", "structured", "dsprites:2.*.*", 16, *_tail_of_train(80),
         "train[{80%+10%}:]", "dsprites.py", label=_dsprites_bins("label_x_position"),
         image=_gray_to_rgb(255), crop=False, flip=False),
    Task("dsprites_orientation", "dSpr-Ori", "structured", "dsprites:2.*.*", 16, *_tail_of_train(80),
         "train[{80%+10%}:]", "dsprites.py", label=_dsprites_bins("label_orientation"),
         image=_gray_to_rgb(255), flip=False),
    Task("kitti_distance", "KITTI-Dist", "structured", "kitti:3.1.0", 4, *_VALIDATION, "test", "kitti.py",
         label=_kitti_closest_vehicle, crop=False),
    # smallNORB: val200 from the start of TFDS's test split, test its second half.
    Task("smallnorb_azimuth", "sNORB-Azim", "structured", "smallnorb:2.*.*", 18, "train[:800]", "test[:200]",
         "test[50%:]", "smallnorb.py", label="label_azimuth", image=_gray_to_rgb(), flip=False),
    Task("smallnorb_elevation", "sNORB-Elev", "structured", "smallnorb:2.*.*", 9, "train[:800]", "test[:200]",
         "test[50%:]", "smallnorb.py", label="label_elevation", image=_gray_to_rgb()),
]
TASKS = {task.name: task for task in _TASK_LIST}
TASK_SOURCE = "https://github.com/google-research/task_adaptation/tree/master/task_adaptation/data/"


def group_tasks(group):
    """The names of the tasks of one group ("natural", "specialized" or "structured")."""
    return [name for name, task in TASKS.items() if task.group == group]


def get_task(task):
    """The `Task` a name designates (a `Task` is returned as it is); one task only."""
    if isinstance(task, Task):
        return task
    names = parse_tasks(task)
    if len(names) != 1:
        raise ValueError(f"Expected one VTAB task, got {task!r} ({len(names)} tasks).")
    return TASKS[names[0]]


def parse_tasks(spec):
    """Task names from "all", a group ("natural", "specialized", "structured"),
    task names or the paper's column titles, comma-separated; in the paper's order."""
    items = spec if isinstance(spec, (list, tuple)) else str(spec).split(",")
    titles = {task.title.lower(): name for name, task in TASKS.items()}
    chosen = set()
    for item in (str(i).strip().lower() for i in items):
        if not item:
            continue
        if item == "all":
            chosen.update(TASKS)
        elif item in GROUPS:
            chosen.update(group_tasks(item))
        elif item in TASKS or item in titles:
            chosen.add(titles.get(item, item))
        else:
            raise ValueError(
                f"Unknown VTAB task {item!r}: use all, {', '.join(GROUPS)} or task names "
                f"({', '.join(TASKS)}), comma-separated."
            )
    if not chosen:
        raise ValueError(f"No VTAB task in {spec!r}: use all, {', '.join(GROUPS)} or task names.")
    return [name for name in TASKS if name in chosen]


_SLICE = re.compile(r"(\w+)\[([^\]]*)\]")
_FIELD = re.compile(r"\{([^}]*)\}")


def resolve_split(template, sizes, task="?"):
    """A split template ("train[{90%}:{90%+200}]") as a TFDS split string,
    given {TFDS split: number of examples}."""

    def resolve_slice(match):
        split, body = match.groups()

        def resolve_field(field):
            total = 0
            for term in field.group(1).split("+"):
                if term.endswith("%"):
                    if not sizes.get(split):
                        raise ValueError(
                            f"VTAB task {task}: TFDS does not know how many examples its {split!r} split has; "
                            "prepare the dataset first (keras_vit.evaluation.vtab.source downloads it)."
                        )
                    total += int(term[:-1]) * sizes[split] // 100  # task_adaptation's (P * n) // 100
                else:
                    total += int(term)
            return str(total)

        return f"{split}[{_FIELD.sub(resolve_field, body)}]"

    return _SLICE.sub(resolve_slice, template)


# ---------------------------------------------------------------------------
# Reading a task: TFDS -> (uint8 RGB image, int32 label)
# ---------------------------------------------------------------------------


def _tfds_builder(task, data_dir):
    import tensorflow_datasets as tfds

    from keras_vit.errors import first_line

    try:
        return tfds.builder(task.tfds_name, data_dir=data_dir)
    except Exception as error:  # noqa: BLE001 - an unknown name or version: one line
        raise ValueError(f"VTAB task {task.name}: TFDS cannot build {task.tfds_name} ({first_line(error)})") from None


def _check_manual_files(task, builder):
    """The task's one-line manual-download error when TFDS has neither its dataset nor the files to make it."""
    if task.manual_download and not builder.is_prepared():
        root = builder.data_dir_root
        manual_dir = root / "downloads" / "manual"
        if not (manual_dir / task.manual_marker).exists():
            raise ValueError(task.manual_download.format(manual_dir=manual_dir, data_dir=root))


def check_manual_downloads(tasks, data_dir=None):
    """Raises the manual-download error of the first of `tasks` whose files are
    missing (Resisc45, Retinopathy): `run` calls it before the first task
    trains, so a missing download is not found hours into a run."""
    for name in parse_tasks(tasks):
        if TASKS[name].manual_download:
            _check_manual_files(TASKS[name], _tfds_builder(TASKS[name], data_dir))


def _builder(task, data_dir, download):
    from keras_vit.errors import first_line

    builder = _tfds_builder(task, data_dir)
    if builder.is_prepared():
        return builder
    root = builder.data_dir_root
    _check_manual_files(task, builder)
    if not download:
        raise ValueError(f"VTAB task {task.name}: {task.tfds_name} is not in {root}; prepare it there or pass its data_dir.")
    try:
        builder.download_and_prepare()
    except Exception as error:  # noqa: BLE001 - network, disk, manual files: one line for the user
        raise ValueError(
            f"VTAB task {task.name}: TFDS could not prepare {task.tfds_name} in {root}: {first_line(error)} "
            "Prepare it there first, or pass the data_dir where it is."
        ) from error
    return builder


def _check_classes(task, features):
    if isinstance(task.label, str):
        found = features[task.label].num_classes
        if found != task.num_classes:
            raise ValueError(
                f"VTAB task {task.name}: {task.tfds_name}'s {task.label!r} has {found} classes, VTAB {task.num_classes}; "
                "use the TFDS version the task names."
            )


def source(task, split, data_dir=None, download=True):
    """A `keras_vit.data.Source` of a task's split: (uint8 RGB image, int32 label) examples.

    Args:
        task: a task name (`TASKS`) or `Task`.
        split: "train800", "val200", "train800val200" or "test".
        data_dir: the TFDS data directory (default TFDS's); Resisc45 and
            Retinopathy need files downloaded by hand into its
            `downloads/manual` folder.
        download: let TFDS download and prepare a dataset it does not have.

    `keras_vit.data.train_dataset` and `eval_dataset` take it; its crop area
    and flip are the task's (see `BIT_CROP_AREA`); its `tfds_split` is the
    TFDS split string it reads.
    """
    import tensorflow as tf
    import tensorflow_datasets as tfds

    from keras_vit import data

    task = get_task(task)
    template = task.split_template(split)
    builder = _builder(task, data_dir, download)
    sizes = {name: info.num_examples for name, info in builder.info.splits.items()}
    tfds_split = resolve_split(template, sizes, task.name)
    features = builder.info.features
    _check_classes(task, features)
    try:
        num_examples = builder.info.splits[tfds_split].num_examples
    except (KeyError, ValueError, AssertionError):
        num_examples = None

    def to_pair(example):
        return task.image_of(example), task.label_of(example, features)

    def read(shuffle_files, seed):
        ds = builder.as_dataset(
            split=tfds_split, shuffle_files=shuffle_files, read_config=tfds.ReadConfig(shuffle_seed=seed)
        )
        return ds.map(to_pair, num_parallel_calls=tf.data.AUTOTUNE)

    result = data.Source(task.name, split, task.num_classes, num_examples, read,
                         crop_area=task.crop_area(), flip=task.flip)
    result.tfds_split = tfds_split
    return result


def read(task, split, data_dir=None, *, shuffle_files=False, seed=0, download=True):
    """A task's split as a `tf.data.Dataset` of (uint8 RGB image, int32 label)."""
    return source(task, split, data_dir, download).read(shuffle_files, seed)


# ---------------------------------------------------------------------------
# The protocol
# ---------------------------------------------------------------------------


def run(build_model, tasks="all", *, data_dir=None, steps=STEPS, batch_size=BATCH_SIZE, image_size=RESOLUTION,
        accum_steps=1, learning_rate=LEARNING_RATE, warmup_steps=None, eval_batch_size=None, strategy=None, seed=0,
        verbose=2, on_task=None):
    """Fine-tunes a fresh model on each task's train800val200 split and measures it on the test split.

    Args:
        build_model: `build_model(num_classes, input_shape)` -> a new keras
            model, pre-trained, with a new `num_classes` head (softmax or
            logits); called once per task, under the strategy's scope.
        tasks: a `parse_tasks` string ("all", "natural", "dtd,kitti_distance") or names.
        data_dir: the TFDS data directory; the files of every task that
            needs a manual download are checked for before the first trains.
        steps, batch_size, image_size, learning_rate: the paper's 2,500 x 512
            at 384 px, lr 0.01 (`keras_vit.training.finetune_recipe`: SGD
            momentum 0.9, cosine decay, no weight decay, clipping at 1).
        accum_steps: micro-batches per update (`keras_vit.training.Trainer`).
        warmup_steps: default `default_warmup_steps(steps)` (500 of 2,500).
        eval_batch_size: default the micro-batch, batch_size / accum_steps.
        strategy: a `tf.distribute` strategy (default: the current one).
        seed: the data order, augmentation and initialisation.
        verbose: `fit`/`predict` verbosity; a line per task unless 0.
        on_task: called as `on_task(name, details)` after each task.

    Returns:
        {task: test accuracy, ..., group: mean over its tasks run, ...,
        "mean": mean over all tasks run} (fractions), in the paper's order;
        `.details[task]` holds the example counts, splits and seconds.
    """
    import tensorflow as tf

    from keras_vit import data, training

    names = parse_tasks(tasks)
    check_manual_downloads(names, data_dir)  # before any task trains
    strategy = strategy or tf.distribute.get_strategy()
    replicas = strategy.num_replicas_in_sync
    if batch_size % (replicas * accum_steps):
        raise ValueError(
            f"batch_size {batch_size} must be a multiple of replicas ({replicas}) x accum_steps ({accum_steps})."
        )
    warmup_steps = default_warmup_steps(steps) if warmup_steps is None else warmup_steps
    eval_batch_size = eval_batch_size or max(1, batch_size // accum_steps)
    accuracies, details = {}, {}
    for name in names:
        task = TASKS[name]
        train_source = source(task, "train800val200", data_dir)
        test_source = source(task, "test", data_dir)
        keras.utils.set_random_seed(seed)
        with strategy.scope():  # model, optimizer slots and metrics on the strategy's devices
            recipe = training.finetune_recipe(total_steps=steps, warmup_steps=warmup_steps,
                                              learning_rate=learning_rate, batch_size=batch_size,
                                              accum_steps=accum_steps, clip_norm=1.0)
            model = build_model(task.num_classes, (image_size, image_size, 3))
            _check_model(model, task, image_size)
            trainer = training.Trainer(model, accum_steps=accum_steps)
            trainer.compile(optimizer=recipe.optimizer, loss=_loss(model),
                            metrics=[keras.metrics.CategoricalAccuracy(name="accuracy")])
        value_range = data.input_range(model)
        began = time.time()
        train = data.train_dataset(train_source, image_size, batch_size, seed=seed, value_range=value_range)
        _fit(trainer, train, steps, verbose)
        trained = time.time()
        test = data.eval_dataset(test_source, image_size, eval_batch_size, value_range=value_range)
        predicted, labels = _predict_with_labels(model, test, strategy, verbose)
        accuracies[name] = float(np.mean(np.argmax(predicted, axis=-1) == labels))
        details[name] = {
            "accuracy": accuracies[name],
            "test_examples": int(len(labels)),
            "train_examples": train_source.num_examples,
            "steps": int(keras.ops.convert_to_numpy(trainer.steps_done)),
            "tfds": task.tfds_name,
            "train_split": train_source.tfds_split,
            "test_split": test_source.tfds_split,
            "train_seconds": round(trained - began, 1),
            "test_seconds": round(time.time() - trained, 1),
        }
        if verbose:
            print(f"VTAB {name}: {100 * accuracies[name]:.2f}% of {len(labels)} test images "
                  f"({details[name]['train_seconds']} s training).", flush=True)
        if on_task is not None:
            on_task(name, details[name])
        del trainer, model
    results = summarize(accuracies)
    results.details = details
    return results


class Results(dict):
    """A dict of accuracies and means; `details` holds what `run` measured per task."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.details = {}


def summarize(accuracies):
    """{task: accuracy} -> `Results`: the tasks in the paper's order, each
    group's mean over its tasks present, and "mean" over all of them."""
    results = Results((name, float(accuracies[name])) for name in TASKS if name in accuracies)
    unknown = set(accuracies) - set(TASKS)
    if unknown:
        raise ValueError(f"Unknown VTAB tasks {sorted(unknown)}; the tasks are {', '.join(TASKS)}.")
    for group in GROUPS:
        values = [accuracies[n] for n in group_tasks(group) if n in accuracies]
        if values:
            results[group] = float(np.mean(values))
    if accuracies:
        results["mean"] = float(np.mean(list(accuracies.values())))
    return results


def _check_model(model, task, image_size):
    shape = tuple(model.input_shape[1:3])
    classes = model.output_shape[-1]
    if shape != (image_size, image_size) or classes != task.num_classes:
        raise ValueError(
            f"build_model({task.num_classes}, ({image_size}, {image_size}, 3)) returned a model with input {shape} "
            f"and {classes} outputs: build it with that input_shape and classes."
        )


def _loss(model):
    """Cross-entropy on the head's softmax, or on its logits."""
    activation = getattr(model.layers[-1], "activation", None)
    softmax = getattr(activation, "__name__", "") == "softmax"
    return keras.losses.CategoricalCrossentropy(from_logits=not softmax)


class _StopAfter(keras.callbacks.Callback):
    """Ends `fit` after exactly `steps` updates (the last Keras epoch may be short)."""

    def __init__(self, steps):
        super().__init__()
        self.steps = steps
        self.done = 0

    def on_train_batch_end(self, batch, logs=None):
        self.done += 1
        if self.done >= self.steps:
            self.model.stop_training = True


def _fit(trainer, train, steps, verbose):
    interval = min(steps, LOG_EVERY)
    trainer.fit(train, epochs=math.ceil(steps / interval), steps_per_epoch=interval,
                callbacks=[_StopAfter(steps)], shuffle=False, verbose=verbose)  # the dataset shuffles


def _predict_with_labels(model, dataset, strategy, verbose):
    """(model outputs, int labels) of every example of a (images, one-hot) dataset,
    through `predict` (the strategy's replicas); the labels travel beside the images."""
    import tensorflow as tf

    def pair(images, labels):
        return ((images, tf.argmax(labels, axis=-1, output_type=tf.int32)),)

    with strategy.scope():
        images_in = keras.Input(shape=model.input_shape[1:], name="images")
        labels_in = keras.Input(shape=(), dtype="int32", name="labels")
        labelled = keras.Model([images_in, labels_in], [model(images_in), labels_in])
    outputs, labels = labelled.predict(dataset.map(pair), verbose=verbose)
    return np.asarray(outputs), np.asarray(labels)


# ---------------------------------------------------------------------------
# The paper's numbers
# ---------------------------------------------------------------------------

# Table 9 of the paper (arXiv 2010.11929v2), per task in TASKS order, percent.
# Each row's mean reproduces Table 2's VTAB score (77.63, 76.28, 72.72).
_TABLE_9 = {
    "ViT-H/14 (JFT)": "95.3 85.5 75.2 99.7 97.2 65.0 88.9 83.3 96.7 91.4 76.6 91.7 63.8 53.1 79.4 63.3 84.5 33.2 51.2",
    "ViT-L/16 (JFT)": "95.4 81.9 74.3 99.7 96.7 63.5 87.4 83.6 96.5 89.7 77.1 86.4 63.1 49.7 74.5 60.5 82.2 36.2 51.1",
    "ViT-L/16 (ImageNet-21k)":
        "90.8 84.1 74.1 99.3 92.7 61.0 80.9 82.5 95.6 85.2 75.3 70.3 56.1 41.9 74.7 64.9 79.9 30.5 41.7",
}
PAPER_TABLE_9 = {row: dict(zip(TASKS, map(float, values.split()))) for row, values in _TABLE_9.items()}
PAPER_TABLE_9_MEAN = {"ViT-H/14 (JFT)": 77.6, "ViT-L/16 (JFT)": 76.3, "ViT-L/16 (ImageNet-21k)": 72.7}
# Table 2: VTAB (19 tasks), mean ± std over three fine-tuning runs.
PAPER_TABLE_2 = {"ViT-H/14 (JFT)": (77.63, 0.23), "ViT-L/16 (JFT)": (76.28, 0.46),
                 "ViT-L/16 (ImageNet-21k)": (72.72, 0.21)}
# The public checkpoints the paper's rows were measured with (JFT ones are not public).
PAPER_CHECKPOINTS = {"imagenet21k/ViT-L_16": "ViT-L/16 (ImageNet-21k)"}


def paper_row_for(model_name, weights):
    """The Table 9 row measured with these weights ("ViT_L16" with the
    original ImageNet-21k file, tag "in21k"), or None."""
    from keras_vit import registry

    if not weights:
        return None
    candidates = [str(weights)]
    parts = os.path.normpath(str(weights)).split(os.sep)
    if len(parts) >= 2:
        candidates.append("/".join(parts[-2:]))  # a local ".../imagenet21k/ViT-L_16.npz"
    for candidate in candidates:
        try:
            entry = registry.find_checkpoint(candidate, model_name)
        except ValueError:
            entry = None
        if entry is not None:
            return PAPER_CHECKPOINTS.get(entry.official_name)
    return None


def format_results(results, paper_row=None):
    """A text table of `results` (run's or summarize's), beside a Table 9 row
    (its name, or {task: percent}) when given; group means and the VTAB mean
    of the paper are over the same tasks as ours."""
    from keras_vit.tables import format_table

    paper = PAPER_TABLE_9[paper_row] if isinstance(paper_row, str) else paper_row
    names = [n for n in TASKS if n in results]
    header = ["task", "group", "accuracy"]
    if paper:
        header += [f"paper: {paper_row}" if isinstance(paper_row, str) else "paper", "difference"]
    rows = [header]

    def row(label, group, ours, theirs):
        cells = [label, group, f"{ours:.1f}"]
        if paper:
            cells += [f"{theirs:.1f}", f"{ours - theirs:+.1f}"]
        return cells

    for name in names:
        task = TASKS[name]
        rows.append(row(task.title, task.group, 100 * results[name], paper[name] if paper else None))
    for group in GROUPS:
        members = [n for n in group_tasks(group) if n in results]
        if members:
            theirs = float(np.mean([paper[n] for n in members])) if paper else None
            rows.append(row(f"{group.capitalize()} mean", f"{len(members)}/{len(group_tasks(group))} tasks",
                            100 * float(np.mean([results[n] for n in members])), theirs))
    if names:
        theirs = float(np.mean([paper[n] for n in names])) if paper else None
        rows.append(row("VTAB mean", f"{len(names)}/{len(TASKS)} tasks",
                        100 * float(np.mean([results[n] for n in names])), theirs))
    return format_table(rows)

