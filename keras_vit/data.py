"""Input pipelines for training and evaluating ViTs: `tf.data` and TensorFlow Datasets.

Augmentation lives here, outside the model, so the model stays a pure
function that XLA compiles whole. A pipeline yields `(images, labels)`
batches: float32 images in the model's input range (`input_range(model)`:
[0, 255] pixels for models built with `include_preprocessing=True`, the
default, else [-1, 1]) and one-hot float32 labels (soft after MixUp).

    data = keras_vit.data
    train_source = data.source("cifar10", "train")
    train = data.train_dataset(train_source, image_size=384, batch_size=512, seed=0)
    test = data.eval_dataset(data.source("cifar10", "eval"), image_size=384, batch_size=512)

Datasets: the TFDS names of `TFDS_SPLITS` (with the train/eval splits of the
official code), `"digits"` (scikit-learn's bundled 8x8 digits: offline, for
quick runs) or the path of an image folder with one sub-folder per class
(any folder of images for self-supervised training: `labelled=False`).

Training examples get the official fine-tuning augmentation: an Inception
crop (`sample_distorted_bounding_box`, area 5%-100%), a resize to the
training resolution and a random horizontal flip; RandAugment and MixUp (as
in AugReg) come from Keras's own preprocessing layers. Evaluation examples are
resized whole (official), or resized and centre-cropped with `crop_fraction`.
Every random choice is seeded: the same seed gives the same batches, and
batch number s is a function of (seed, s) alone, so a run resumed at step s
(`train_dataset(..., start_step=s)`) sees exactly the batches an uninterrupted
run sees from step s on (see `train_dataset`).
"""

import dataclasses
import numbers
import os
import zlib
from typing import Callable, Optional

import numpy as np
import tensorflow as tf

from keras_vit.errors import first_line, is_whole_number
from keras_vit.images import FILE_SUFFIXES, FORMAT_NAMES, format_index
from keras_vit.images import decode as decode_image
from keras_vit.layers import scale_pixels

AUTOTUNE = tf.data.AUTOTUNE
SPLITS = ("train", "eval")
MAX_SHUFFLE_BUFFER = 50_000  # as the official code; bounds host memory
EVAL_FOLDER_NAMES = ("val", "validation", "test")


@dataclasses.dataclass(frozen=True)
class TfdsSplits:
    """A TFDS dataset's training and evaluation splits (TFDS split strings)."""

    train: Optional[str]  # None: an evaluation-only dataset
    eval: str


# The official code's splits (google-research/vision_transformer); Pets and
# Flowers train on their whole training data, as the paper's final runs.
TFDS_SPLITS = {
    "cifar10": TfdsSplits("train[:98%]", "test"),
    "cifar100": TfdsSplits("train[:98%]", "test"),
    "oxford_iiit_pet": TfdsSplits("train", "test"),
    "oxford_flowers102": TfdsSplits("train+validation", "test"),
    "imagenet2012": TfdsSplits("train[:99%]", "validation"),
    "imagenet_v2": TfdsSplits(None, "test"),  # ImageNet's labels: fine-tune on imagenet2012
}
DIGITS = "digits"


@dataclasses.dataclass
class Source:
    """The undecorated examples of one split: (record, int label) pairs.

    `read(shuffle_files, seed)` makes the `tf.data.Dataset` of the records,
    in an order that depends only on `seed` (never on how often it was read).
    A record is a uint8 image, or what `decode(record, label)` turns into
    `(uint8 image, label)` (an encoded image, a file name): pipelines skip
    records without decoding them. `examples`, when set, are all the
    `(records, labels)` as arrays: training then draws each example by its
    index (random access) instead of reading a stream. `crop_area` and `flip`
    are the dataset's training-augmentation defaults.
    """

    name: str
    split: str
    num_classes: int
    num_examples: Optional[int]
    read: Callable[[bool, int], tf.data.Dataset]
    crop_area: tuple = (0.05, 1.0)
    flip: bool = True
    decode: Optional[Callable] = None
    examples: Optional[tuple] = None


def available_datasets():
    """The dataset names `source` knows besides image folders: the TFDS ones and "digits"."""
    return list(TFDS_SPLITS) + [DIGITS]


def source(dataset, split="train", data_dir=None, tfds_split=None, download=True, labelled=True):
    """The `Source` of `split` ("train" or "eval") of `dataset`.

    Args:
        dataset: a name of `available_datasets()` or the path of an image
            folder (one sub-folder per class; with `train/` and `val/` (or
            `validation/`, `test/`) sub-folders those are the splits, else
            10% of each class, chosen by a hash of the file name, is held out).
        split: "train" or "eval".
        data_dir: the TFDS data directory (default: TFDS's own).
        tfds_split: overrides the TFDS split string (e.g. "train[:10%]");
            with it, any TFDS name is accepted.
        download: let TFDS download and prepare a dataset it does not have.
        labelled: False for self-supervised training (keras_vit.pretraining):
            an image folder then needs no class sub-folders (every image
            under it, in any sub-folder, with label 0 of 1 class).
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {SPLITS}.")
    dataset = os.fspath(dataset)
    if dataset == DIGITS:
        return _digits_source(split)
    if dataset in TFDS_SPLITS:
        return _tfds_source(dataset, split, data_dir, tfds_split, download)
    if os.path.isdir(dataset):
        return _folder_source(dataset, split, labelled)
    if tfds_split is not None:  # any TFDS dataset, with the split string given
        return _tfds_source(dataset, split, data_dir, tfds_split, download)
    raise ValueError(
        f"Unknown dataset {dataset!r}: use one of {', '.join(available_datasets())}, "
        "or the path of an image folder with one sub-folder per class."
    )


SUBSET_SEED = 0  # fixed: a subset never depends on a training seed


def subset(source, num_examples):
    """The first `num_examples` of `source` in one fixed shuffled order.

    Nested (the 1,000-example subset holds the 300-example one) and the same
    for every model and training seed: the paper's data-size study (§4.3)
    pre-trains on such subsets. The order is a shuffle with a fixed seed
    (buffer: the whole source up to 50,000 examples), so an image folder,
    read class by class, gives a mixed subset.
    """
    _check_source(source)
    total = source.num_examples
    if num_examples < 1 or (total is not None and num_examples > total):
        raise ValueError(f"Cannot take {num_examples} examples of {source.name} ({total or 'unknown'} in its "
                         f"{source.split} split): use 1..{total}.")
    if source.examples is not None:  # in memory: the first examples of a fixed permutation
        records, labels = source.examples
        chosen = np.random.default_rng(SUBSET_SEED).permutation(len(labels))[:num_examples]
        examples = (records[chosen], labels[chosen])
        return dataclasses.replace(source, num_examples=num_examples, examples=examples,
                                   read=lambda shuffle_files, seed: tf.data.Dataset.from_tensor_slices(examples))
    buffer = min(total or MAX_SHUFFLE_BUFFER, MAX_SHUFFLE_BUFFER)

    def read(shuffle_files, seed):
        del shuffle_files, seed  # the subset is fixed; the training pipeline shuffles it
        ds = source.read(False, SUBSET_SEED)  # records: shuffled before they are decoded
        return ds.shuffle(buffer, seed=SUBSET_SEED, reshuffle_each_iteration=False).take(num_examples)

    return dataclasses.replace(source, num_examples=num_examples, read=read)


# ---------------------------------------------------------------------------
# TensorFlow Datasets
# ---------------------------------------------------------------------------


def _tfds_source(name, split, data_dir, tfds_split, download):
    import tensorflow_datasets as tfds

    tfds_split = tfds_split or getattr(TFDS_SPLITS[name], split)
    if tfds_split is None:
        raise ValueError(
            f"{name} has no {split} split: it is an evaluation set "
            "(train on imagenet2012 and evaluate on it)."
        )
    try:
        builder = tfds.builder(name, data_dir=data_dir)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(f"Unknown dataset {name!r}: TFDS has no such dataset ({first_line(error)})") from None
    if download and not builder.is_prepared():
        # Under tfds.testing.mock_data download_and_prepare does nothing: nothing to reach.
        if "mock" not in getattr(type(builder).download_and_prepare, "__qualname__", ""):
            _check_reachable(name, builder)
        try:
            builder.download_and_prepare()
        except Exception as error:  # noqa: BLE001 - network, manual download: one line for the user
            raise ValueError(
                f"TFDS could not prepare {name} in {builder.data_dir}: {first_line(error)} "
                "Download it there first, or point data_dir to where it is."
            ) from error

    def read(shuffle_files, seed):
        try:
            ds = builder.as_dataset(
                split=tfds_split,
                shuffle_files=shuffle_files,
                # The same file order every time it is read: a resumed run
                # re-reads the files in the order of the run it continues.
                read_config=tfds.ReadConfig(shuffle_seed=seed, shuffle_reshuffle_each_iteration=False),
                # Only the image (left encoded: decode() decodes the records kept) and the label;
                # read as features, not as_supervised: dtd and others have no supervised keys.
                decoders=tfds.decode.PartialDecoding(
                    {"image": True, "label": True}, decoders={"image": tfds.decode.SkipDecoding()}
                ),
            )
        except AssertionError as error:  # TFDS's "could not find data"
            raise ValueError(f"{name}: {first_line(error)}") from error
        return ds.map(lambda example: (example["image"], tf.cast(example["label"], tf.int32)))

    image_feature = builder.info.features["image"]

    def decode(record, label):
        return image_feature.decode_example(record), label

    try:  # split sizes: unknown for mock data
        num_examples = builder.info.splits[tfds_split].num_examples
    except (KeyError, ValueError, AssertionError):
        num_examples = None
    return Source(name, split, builder.info.features["label"].num_classes, num_examples, read, decode=decode)


REACHABLE_TIMEOUT_SECONDS = 5


def _check_reachable(name, builder):
    """Fails at once, in one line, when none of the hosts a TFDS dataset
    downloads from answers (offline, TFDS retries for minutes before its own
    error). Any HTTP answer counts, even an error status; proxies are the
    environment's, as for the download itself."""
    import urllib.error
    import urllib.parse
    import urllib.request

    from keras_vit.download import open_url

    try:
        urls = list(builder.url_infos or ())
    except Exception:  # noqa: BLE001 - no checksums file: let TFDS say what it needs
        return
    hosts = sorted({f"{parts.scheme}://{parts.netloc}/" for parts in map(urllib.parse.urlsplit, urls)
                    if parts.scheme in ("http", "https") and parts.netloc})
    reasons = []
    for host in hosts:
        try:
            open_url(urllib.request.Request(host, method="HEAD"), REACHABLE_TIMEOUT_SECONDS).close()
            return
        except urllib.error.HTTPError:
            return  # it answered
        except (urllib.error.URLError, OSError, ValueError) as error:
            reasons.append(f"{host}: {getattr(error, 'reason', error)}")
    if reasons:
        raise ValueError(
            f"{name} is not prepared in {builder.data_dir} and no host it downloads from answers ({reasons[0]}): "
            f"prepare it where there is network (tfds build {name} --data_dir DIR) and pass that folder "
            "(keras-vit's --data-dir DIR, the examples' --data_dir DIR, data_dir=)."
        )


# ---------------------------------------------------------------------------
# scikit-learn's digits: a real image dataset that is always offline
# ---------------------------------------------------------------------------

DIGITS_TEST_FRACTION = 0.2


def digits(image_size=None, test_fraction=DIGITS_TEST_FRACTION):
    """scikit-learn's 1,797 handwritten 8x8 digits as RGB images.

    Returns `((x_train, y_train), (x_test, y_test))` as numpy arrays: uint8
    pixels in [0, 255] of shape (n, 8, 8, 3), or (n, image_size, image_size, 3)
    upsampled bilinearly when `image_size` is given, and int32 labels 0-9.
    The split is stratified and fixed (it never depends on a training seed),
    so accuracies on the test part are comparable across runs.
    """
    from sklearn import datasets, model_selection

    bunch = datasets.load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
    images = np.repeat(images[..., None], 3, axis=-1)
    if image_size is not None:
        resized = tf.image.resize(images, (image_size, image_size), method="bilinear")
        images = np.clip(np.round(resized.numpy()), 0, 255).astype(np.uint8)
    labels = bunch.target.astype(np.int32)
    x_train, x_test, y_train, y_test = model_selection.train_test_split(
        images, labels, test_size=test_fraction, stratify=labels, random_state=0
    )
    return (x_train, y_train), (x_test, y_test)


def _digits_source(split):
    (x_train, y_train), (x_test, y_test) = digits()
    images, labels = (x_train, y_train) if split == "train" else (x_test, y_test)

    def read(shuffle_files, seed):
        del shuffle_files, seed  # in memory: training draws the examples by index
        return tf.data.Dataset.from_tensor_slices((images, labels))

    # Digits are not mirror-symmetric, and each 8x8 image is already a tight,
    # centred crop of its digit: crops keep most of it.
    return Source(DIGITS, split, 10, len(labels), read, crop_area=(0.8, 1.0), flip=False, examples=(images, labels))


# ---------------------------------------------------------------------------
# An image folder: <root>/<class>/<image> (optionally under train/ and val/)
# ---------------------------------------------------------------------------

FOLDER_EVAL_FRACTION = 0.1


def _folder_source(root, split, labelled=True):
    train_dir = os.path.join(root, "train")
    eval_dirs = [os.path.join(root, n) for n in EVAL_FOLDER_NAMES if os.path.isdir(os.path.join(root, n))]
    list_images = _list_images if labelled else _list_unlabelled_images
    if os.path.isdir(train_dir) and not eval_dirs:  # else train/ would be read as a class
        raise ValueError(
            f"Image folder {root} has train/ but no {' or '.join(n + '/' for n in EVAL_FOLDER_NAMES)} beside it: "
            "add the held-out images there, or put the class folders in it directly (a tenth is then held out)."
        )
    if os.path.isdir(train_dir) and eval_dirs:
        class_names = _class_folders(train_dir) if labelled else [""]
        files, labels = list_images(train_dir if split == "train" else eval_dirs[0], class_names)
    else:
        class_names = _class_folders(root) if labelled else [""]
        files, labels = list_images(root, class_names)
        # A hash of the relative path picks the held-out files: stable when files are added.
        held_out = np.array([
            zlib.crc32(os.path.relpath(f, root).encode()) % 1000 < FOLDER_EVAL_FRACTION * 1000 for f in files
        ], dtype=bool)
        keep = held_out if split == "eval" else ~held_out
        files, labels = [f for f, k in zip(files, keep) if k], [l for l, k in zip(labels, keep) if k]
    if not files:
        raise ValueError(f"Image folder {root} has no {split} images ({', '.join(FILE_SUFFIXES)}).")

    labels = np.asarray(labels, np.int32)

    def read(shuffle_files, seed):
        del shuffle_files, seed  # file names: training draws them by index
        return tf.data.Dataset.from_tensor_slices((files, labels))

    return Source(root, split, len(class_names), len(files), read, decode=_decode_file, examples=(files, labels))


def _class_folders(directory):
    names = sorted(n for n in os.listdir(directory) if os.path.isdir(os.path.join(directory, n)))
    if not names:
        raise ValueError(f"Image folder {directory} has no class sub-folders (<folder>/<class>/<image>).")
    return names


def _list_images(directory, class_names):
    files, labels = [], []
    for label, name in enumerate(class_names):
        class_dir = os.path.join(directory, name)
        if not os.path.isdir(class_dir):
            continue
        for file in sorted(os.listdir(class_dir)):
            if file.lower().endswith(FILE_SUFFIXES):
                files.append(os.path.join(class_dir, file))
                labels.append(label)
    return files, labels


def _list_unlabelled_images(directory, class_names):
    """Every image under `directory` (sub-folders too, sorted), all label 0."""
    del class_names
    files = []
    for folder, subfolders, names in os.walk(directory):
        subfolders.sort()
        files += [os.path.join(folder, n) for n in sorted(names) if n.lower().endswith(FILE_SUFFIXES)]
    return files, [0] * len(files)


def _decode_file(path, label):
    """A folder's image file, decoded; a file that is not an image (a page
    saved under an image's name, an empty file) or that TensorFlow cannot
    decode (a download cut short) fails naming its path: TensorFlow's own
    error names no file. (No size limit here, unlike `keras-vit predict`: a
    large photo is a fine training image.)"""
    encoded = tf.io.read_file(path)
    known = tf.debugging.Assert(
        format_index(encoded) >= 0,
        [path, f"is not a {FORMAT_NAMES} image: remove it from the folder or convert it; its first bytes:",
         tf.strings.substr(encoded, 0, 8)],
    )
    with tf.control_dependencies([known]):
        image, decoded = _decode_or_flag(encoded)
    readable = tf.debugging.Assert(
        decoded, [path, "is truncated or corrupt (TensorFlow cannot decode it): remove it from the folder or re-save it"]
    )
    with tf.control_dependencies([readable]):
        return tf.identity(image), label


def _decode_or_flag(encoded):
    """(`decode_image(encoded)`, True), or (a 1x1 image, False) where decoding
    fails. A graph has no try; a one-element dataset whose decode error is
    dropped (`ignore_errors`) is one. It costs nothing measurable beside the
    decoding (2.1 ms a 451x300 JPEG either way)."""
    attempt = tf.data.Dataset.from_tensors(encoded).map(lambda e: (decode_image(e), True)).ignore_errors()
    failed = tf.data.Dataset.from_tensors((tf.zeros([1, 1, 3], tf.uint8), False))
    return attempt.concatenate(failed).take(1).get_single_element()


# ---------------------------------------------------------------------------
# The pipelines
# ---------------------------------------------------------------------------


def input_range(model):
    """The pixel range `model` takes: (0, 255) if it scales inputs itself
    (`include_preprocessing=True`, a "rescaling" layer), else (-1, 1)."""
    try:
        model.get_layer("rescaling")
    except ValueError:
        return (-1.0, 1.0)
    return (0.0, 255.0)


def train_dataset(
    source,
    image_size,
    batch_size,
    *,
    seed=0,
    start_step=0,
    value_range=(0.0, 255.0),
    crop_area=None,
    flip=None,
    randaugment=None,
    mixup=None,
    shuffle_buffer=None,
):
    """An endless stream of augmented training batches, positioned by step.

    Batch number s is a function of (seed, s) alone: the dataset made with
    `start_step=s` yields batches s, s+1, ... of the dataset made with
    `start_step=0`, identical to the last bit, so a run killed and resumed at
    step s trains on the batches an uninterrupted run trains on (with the
    same `seed`, source and arguments, RandAugment and MixUp included).

    Example number p of the stream (p = step * batch_size + i) is example
    `p % n` of epoch `p // n` (n examples). Each epoch's order is its own
    permutation, seeded by (seed, epoch): a stateless index permutation for
    sources with `examples` (digits, image folders: nothing before the start
    is read), else (TFDS) a shuffle buffer over the records in the seeded file
    order, where a resumed run skips the records of its epoch before its
    start without decoding them. Crops and flips are seeded by (seed, p),
    RandAugment and MixUp by (seed, s) (their seed generators are set before
    each batch).

    Args:
        source: a `Source` (see `source()`).
        image_size: the training resolution (square).
        batch_size: the global batch size; `tf.distribute` splits it across
            replicas (and workers: every worker computes the same stream and
            keeps its share, `AutoShardPolicy.DATA`).
        seed: all randomness (file order, shuffling, crops, flips,
            RandAugment, MixUp) derives from it.
        start_step: the step a resumed run starts from: the first batch is
            batch `start_step` of the stream.
        value_range: the model's input range (`input_range(model)`).
        crop_area: Inception-crop area range; default the source's (5%-100%).
        flip: random horizontal flips; default the source's (all but digits).
        randaugment: None, or the RandAugment magnitude factor in [0, 1] of
            `keras.layers.RandAugment` (2 ops; Keras picks the ops per batch).
        mixup: None, or the MixUp alpha (AugReg uses 0.2 or 0.5).
        shuffle_buffer: for sources without `examples` (TFDS), the shuffle
            buffer; default min(examples, 50,000).
    """
    _check_pipeline(source, image_size, batch_size, value_range)
    if not is_whole_number(seed):
        raise ValueError(f"seed must be a whole number, got {seed!r}.")
    if not is_whole_number(start_step) or start_step < 0:
        raise ValueError(f"start_step must be a whole number, 0 or more, got {start_step!r}.")
    crop_area = tuple(crop_area or source.crop_area)
    if len(crop_area) != 2 or not 0 < crop_area[0] <= crop_area[1] <= 1:
        raise ValueError(f"crop_area must be (low, high) fractions of the image, 0 < low <= high <= 1; got {crop_area}.")
    flip = source.flip if flip is None else flip
    seed = int(seed)
    first = int(start_step) * int(batch_size)  # the position of the first example

    if source.examples is not None:
        records = _positioned_by_index(source, seed, first)
    else:
        records = _positioned_stream(source, seed, first, shuffle_buffer)

    def augment(position, record, label):
        image, label = source.decode(record, label) if source.decode else (record, label)
        crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(_key(seed, _EXAMPLE, position), 2))
        image = inception_crop(image, image_size, crop_area, crop_seed)
        if flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_seed)
        return image, tf.one_hot(label, source.num_classes)

    # Stateless ops seeded by the example's position: parallel and deterministic.
    ds = records.map(augment, num_parallel_calls=AUTOTUNE, deterministic=True)
    ds = ds.batch(batch_size, drop_remainder=True).enumerate(start=int(start_step))
    augment_batch, stateful = _batch_augmentation(value_range, randaugment, mixup, seed)
    # Keras's augmentation layers draw from seed generators (variables): a
    # sequential map, which sets them from the batch number before each batch.
    if stateful:
        ds = ds.map(augment_batch)
    else:
        ds = ds.map(augment_batch, num_parallel_calls=AUTOTUNE, deterministic=True)
    return _with_options(ds).prefetch(AUTOTUNE)


# What a key seeds: an example's crop and flip, an epoch's order, a batch's Keras layers.
_EXAMPLE, _ORDER, _BATCH = 0, 1, 2


def _key(seed, purpose, *values):
    """A stateless-RNG seed (shape [2], int64) for `purpose` and `values` (ints or int64 scalars)."""
    key = tf.constant([seed, purpose], tf.int64)
    for value in values:
        key = tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))
    return key


def _positioned_by_index(source, seed, first):
    """(position, record, label) from position `first` on; position p is
    example `p % n` of epoch `p // n`, drawn by a stateless index permutation."""
    records, labels = source.examples
    count = len(labels)
    if not count:
        raise ValueError(f"{source.name} ({source.split}) has no examples to train on.")
    records, labels = tf.constant(records), tf.constant(labels)

    def lookup(position):
        epoch, offset = position // count, position % count
        index = tf.random.experimental.index_shuffle(offset, _key(seed, _ORDER, epoch), count - 1)
        return position, tf.gather(records, index), tf.gather(labels, index)

    return tf.data.Dataset.counter(start=first, dtype=tf.int64).map(lookup)


def _positioned_stream(source, seed, first, shuffle_buffer):
    """(position, record, label) from position `first` on, for a source read as
    a stream: each epoch is its records, in the seeded file order, through a
    shuffle buffer seeded by (seed, epoch). The records of the first epoch
    before `first` are read and skipped, not decoded."""
    records = source.read(True, seed)
    count = source.num_examples
    if count is None:  # unknown split size (e.g. TFDS mock data): count once
        count = int(records.reduce(tf.constant(0, tf.int64), lambda n, _: n + 1))
    if not count:
        raise ValueError(f"{source.name} ({source.split}) has no examples to train on.")
    buffer = shuffle_buffer or min(count, MAX_SHUFFLE_BUFFER)

    def epoch(number):
        # take(count): an epoch is exactly `count` records, whatever the reader.
        return _shuffle(records, buffer, _key(seed, _ORDER, number)).take(count)

    start_epoch, offset = divmod(first, count)
    ds = tf.data.Dataset.counter(start=start_epoch, dtype=tf.int64).flat_map(epoch).skip(offset)
    return ds.enumerate(start=first).map(lambda position, example: (position, *example))


def eval_dataset(source, image_size, batch_size, *, value_range=(0.0, 255.0), crop_fraction=1.0,
                 keep_aspect=True, drop_remainder=False):
    """Evaluation batches in file order: each image resized to `image_size`
    (official), or with `crop_fraction` < 1 resized to image_size /
    crop_fraction (its shorter side; both sides with `keep_aspect=False`, as
    big_vision's `resize(256)|central_crop(224)`) and the centre cropped.
    TPUs need `drop_remainder=True` (static shapes)."""
    _check_pipeline(source, image_size, batch_size, value_range)
    if not isinstance(crop_fraction, numbers.Real) or not 0 < crop_fraction <= 1:
        raise ValueError(f"crop_fraction must be in (0, 1], the central part kept (0.875: 224 px of 256); "
                         f"got {crop_fraction!r}.")

    def preprocess(image, label):
        image = center_crop(image, image_size, crop_fraction, keep_aspect)
        return scale(image, value_range), tf.one_hot(label, source.num_classes)

    ds = source.read(False, 0)
    if source.decode:
        ds = ds.map(source.decode, num_parallel_calls=AUTOTUNE)
    ds = ds.map(preprocess, num_parallel_calls=AUTOTUNE)
    ds = ds.batch(batch_size, drop_remainder=drop_remainder)
    return _with_options(ds).prefetch(AUTOTUNE)


def _check_source(source):
    # digits() returns arrays, source("digits") a Source: an easy mix-up.
    if not isinstance(source, Source):
        raise TypeError(
            f"source must be a keras_vit.data.Source, from data.source(...) (a dataset name such as \"digits\", or "
            f"an image folder), got {type(source).__name__}; numpy arrays go to model.fit(x, y) directly."
        )


def _check_pipeline(source, image_size, batch_size, value_range):
    """One-line errors for the arguments both pipelines take, before TensorFlow meets them."""
    _check_source(source)
    for name, value in (("image_size", image_size), ("batch_size", batch_size)):
        if not is_whole_number(value) or value < 1:
            raise ValueError(f"{name} must be a whole number, at least 1; got {value!r}.")
    scale(tf.zeros([1]), value_range)  # the one check of value_range


def inception_crop(image, image_size, area_range=(0.05, 1.0), seed=(0, 0)):
    """A random crop of `area_range` of the image (aspect 3/4-4/3), resized to
    image_size x image_size, as the official fine-tuning pipeline."""
    begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
        tf.shape(image),
        bounding_boxes=tf.zeros([0, 0, 4], tf.float32),
        seed=seed,
        area_range=area_range,
        min_object_covered=0.0,
        use_image_if_no_bounding_boxes=True,
    )
    image = tf.slice(image, begin, size)
    image.set_shape([None, None, 3])  # tf.slice loses the static channel count
    return tf.image.resize(image, (image_size, image_size))


def center_crop(image, image_size, crop_fraction=1.0, keep_aspect=True):
    """The central `image_size` square of the image resized to `image_size /
    crop_fraction` (its shorter side with `keep_aspect`, else both sides);
    `crop_fraction=1` resizes the whole image to `image_size` square."""
    if crop_fraction >= 1.0:
        return tf.image.resize(image, (image_size, image_size))
    if keep_aspect:
        shape = tf.cast(tf.shape(image)[:2], tf.float32)
        scale_to = (image_size / crop_fraction) / tf.reduce_min(shape)
        resized = tf.cast(tf.round(shape * scale_to), tf.int32)
    else:
        resized = tf.fill([2], int(round(image_size / crop_fraction)))
    image = tf.image.resize(image, resized)
    top, left = (resized[0] - image_size) // 2, (resized[1] - image_size) // 2
    return tf.image.crop_to_bounding_box(image, top, left, image_size, image_size)


def scale(images, value_range):
    """[0, 255] pixels -> the model's input range: kept as they are, or [-1, 1]."""
    images = tf.cast(images, tf.float32)
    if tuple(value_range) == (0.0, 255.0):
        return images
    if tuple(value_range) == (-1.0, 1.0):
        return scale_pixels(images)
    raise ValueError(f"value_range must be (0, 255) or (-1, 1) (see input_range(model)), got {value_range}.")


def _shuffle(ds, buffer, key):
    """`ds.shuffle(buffer)` seeded by `key`, an int64 tensor [2] (here: made
    from the epoch number). `Dataset.shuffle` takes a tensor seed only when no
    global seed is set (with `tf.random.set_seed(0)` it fails in a traced
    function), so this calls its op, as it does, with the key as its seeds."""
    specs = tf.nest.flatten(ds.element_spec)
    variant = tf.raw_ops.ShuffleDatasetV3(
        input_dataset=tf.data.experimental.to_variant(ds),
        buffer_size=tf.constant(buffer, tf.int64),
        seed=key[0],
        seed2=key[1],
        seed_generator=tf.raw_ops.DummySeedGenerator(),
        output_types=[spec.dtype for spec in specs],
        output_shapes=[spec.shape for spec in specs],
        reshuffle_each_iteration=False,
    )
    return tf.data.experimental.from_variant(variant, ds.element_spec)


def _batch_augmentation(value_range, randaugment, mixup, seed):
    """(batch number, (images, labels)) -> augmented (images, labels), and
    whether it is stateful (Keras layers: it must run in a sequential map)."""
    import keras

    layers = []
    # float32 whatever the global policy: pixels and one-hot labels are float32
    # here (MixUp under mixed_bfloat16 would multiply bf16 weights into them).
    if randaugment is not None:
        layers.append(keras.layers.RandAugment(
            value_range=(0, 255), num_ops=2, factor=randaugment, seed=seed, dtype="float32"))
    if mixup:
        layers.append(keras.layers.MixUp(alpha=mixup, seed=seed + 1, dtype="float32"))
    generators = [g for layer in layers for g in _tf_seed_generators(layer)]

    def apply(number, batch):
        images, labels = batch
        # Every draw of the layers for batch `number` follows from this state,
        # whatever batches this pipeline (or another process) made before.
        for index, generator in enumerate(generators):
            state = tf.random.stateless_uniform(
                [2], _key(seed, _BATCH, number, index), minval=0, maxval=2**31 - 1, dtype=tf.int64
            )
            generator.state.assign(tf.cast(state, generator.state.dtype))
        for layer in layers:
            if isinstance(layer, keras.layers.MixUp):
                mixed = layer({"images": images, "labels": labels}, training=True)
                images, labels = mixed["images"], mixed["labels"]
            else:
                images = layer(images, training=True)
        return scale(images, value_range), labels

    return apply, bool(generators)


def _tf_seed_generators(layer):
    """The seed generators `layer` (and the layers inside it) draw from in a
    tf.data pipeline. Keras picks them per backend (`_get_seed_generator`):
    on another backend than TensorFlow, this makes the TensorFlow ones now,
    eagerly, rather than while the pipeline is traced."""
    import keras

    generators = {}
    for sublayer in layer._flatten_layers(include_self=True, recursive=True):
        if isinstance(getattr(sublayer, "generator", None), keras.random.SeedGenerator):
            sublayer.backend.set_backend("tensorflow")
            try:
                generator = sublayer._get_seed_generator("tensorflow")
            finally:
                sublayer.backend.reset()
            generators[id(generator)] = generator
    return list(generators.values())


def _with_options(ds):
    options = tf.data.Options()
    options.deterministic = True
    # Every worker reads the same seeded stream and keeps its share of the
    # examples: works for any source (in-memory arrays have no files to shard).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)
