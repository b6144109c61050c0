"""The paper's few-shot linear evaluation of a model (§4.1), as big_vision runs it.

    results = keras_vit.evaluation.few_shot(model, ["cifar100", "digits"])
    results["cifar100"]["mean"][10]      # 10-shot accuracy, mean over seeds 0, 1, 2

Each dataset's train and test images are embedded once (`features`); then,
per seed and number of shots k, a ridge classifier is fitted on k examples
per class (`linear.sample_shots`: nested across k) and scored on the whole
test set (`linear.LinearFewShot`). Images are resized to 256/224 of the
model's input size (`image_size` for a model of any size) and
centre-cropped, as big_vision's `resize(256)|central_crop(224)`.
"""

import weakref

import numpy as np

from keras_vit.errors import is_whole_number
from keras_vit.evaluation.linear import DEFAULT_L2_REG, LinearFewShot, sample_shots

SHOTS = (1, 5, 10, 25)
SEEDS = (0, 1, 2)
CROP_FRACTION = 224 / 256

# name: (TFDS name, few-shot train split, test split), as big_vision's
# configs/common_fewshot.py. ImageNet needs a manual download; its first
# 65,000 training images hold at least 30 of every class.
FEWSHOT_DATASETS = {
    "caltech101": ("caltech101", "train", "test"),
    "cars196": ("cars196", "train", "test"),
    "cifar100": ("cifar100", "train", "test"),
    "dtd": ("dtd", "train", "test"),
    "oxford_iiit_pet": ("oxford_iiit_pet", "train", "test"),
    "uc_merced": ("uc_merced", "train[:1000]", "train[1000:]"),
    "imagenet2012": ("imagenet2012", "train[:65000]", "validation"),
}


def representation_model(model):
    """A model sharing `model`'s weights that returns the paper's representation.

    That is big_vision's `pre_logits`: the pooled token after the final
    LayerNorm, through tanh(Dense) when the model has a `pre_logits` layer.
    A model without pooling (include_top=False, pooling=None) is pooled as
    its class token, or the mean of its tokens without one.
    """
    import keras

    from keras_vit.layers import TokenPooling

    names = {layer.name for layer in model.layers}
    if "pre_logits" in names or "pool" in names:
        output = model.get_layer("pre_logits" if "pre_logits" in names else "pool").output
    elif "encoder_norm" in names:
        prefix = 1 if "class_token" in names else 0
        output = TokenPooling("token" if prefix else "gap", prefix, name="representation_pool")(
            model.get_layer("encoder_norm").output
        )
    else:
        raise ValueError(f"Model {model.name!r} is not a keras_vit model (no encoder_norm layer).")
    return keras.Model(model.input, output, name=f"{model.name}_representation")


def features(model, dataset, strategy=None, verbose="auto"):
    """(features, labels) of every example of `dataset`, as numpy arrays.

    Args:
        model: a keras_vit model (any constructor, hybrid or `ViT()`).
        dataset: a batched `tf.data.Dataset` of (images, labels) in the
            model's input range (`keras_vit.data.input_range(model)`);
            labels as class ids, shape (batch,) or (batch, 1), or one-hot.
        strategy: a `tf.distribute` strategy to run the model under.
        verbose: `model.predict`'s progress bar.

    The model runs through `predict` (tf.data prefetching, XLA as compiled,
    the strategy's replicas); the labels travel through it beside the images.
    """
    import tensorflow as tf

    _check_batches(model, dataset)

    def pair(images, labels):
        if labels.shape.rank == 2:
            labels = _class_ids(labels)
        return ((images, tf.cast(labels, tf.int32)),)

    outputs, labels = _labelled_model(model, strategy).predict(dataset.map(pair), verbose=verbose)
    return np.asarray(outputs, np.float32), np.asarray(labels)


def _class_ids(labels):
    """(batch,) int32 class ids of (batch, 1) class ids (as keras.datasets gives
    them: not one-hot, whose argmax would be 0) or (batch, classes) one-hot."""
    import tensorflow as tf

    def ids():
        return tf.cast(labels[:, 0], tf.int32)

    def one_hot():
        return tf.argmax(labels, axis=-1, output_type=tf.int32)

    width = labels.shape[-1]
    if width is None:  # known only when the data flows
        return tf.cond(tf.shape(labels)[-1] == 1, ids, one_hot)
    return ids() if width == 1 else one_hot()


def _check_batches(model, dataset):
    """A one-line ValueError unless `dataset` yields batches of (images, labels) the model takes."""
    spec = getattr(dataset, "element_spec", None)
    if not (isinstance(spec, tuple) and len(spec) == 2):
        raise ValueError(
            "features needs a dataset of (images, labels) batches, got elements "
            f"{_spec_text(spec)}: pair each image with its class id (e.g. tf.data.Dataset.zip((images, labels)))."
        )
    images, labels = spec
    rank = len(model.input_shape)
    if images.shape.rank == rank - 1 and labels.shape.rank in (0, 1):
        raise ValueError(
            f"features needs batches, and the dataset yields single images of shape {tuple(images.shape)}: "
            "batch it first (dataset.batch(64))."
        )
    if images.shape.rank != rank:
        raise ValueError(
            f"{model.name} takes images of shape {tuple(model.input_shape[1:])}, and the dataset yields "
            f"{tuple(images.shape)}: give batches of images."
        )
    if labels.shape.rank not in (1, 2):
        raise ValueError(
            f"features takes labels as class ids of shape (batch,) or (batch, 1) or one-hot (batch, classes), "
            f"and the dataset yields labels of shape {tuple(labels.shape)}."
        )


def _spec_text(spec):
    if isinstance(spec, (tuple, list)):
        return "(" + ", ".join(_spec_text(part) for part in spec) + ")"
    if isinstance(spec, dict):
        return "{" + ", ".join(f"{key!r}: {_spec_text(part)}" for key, part in spec.items()) + "}"
    shape = getattr(spec, "shape", None)
    return f"of shape {tuple(shape)}" if shape is not None else type(spec).__name__


# One labelled model per (model, strategy): its traced predict function is reused by later calls.
_LABELLED = weakref.WeakKeyDictionary()


def _labelled_model(model, strategy):
    """(images, labels) -> (representation, labels), sharing `model`'s weights."""
    import contextlib

    import keras

    # Matched by identity (not id()): a strategy that was freed cannot pass for a new one.
    built = _LABELLED.setdefault(model, [])
    for known, labelled in built:
        if known is strategy:
            return labelled
    with strategy.scope() if strategy is not None else contextlib.nullcontext():
        representation = representation_model(model)
        labels = keras.Input(shape=(), dtype="int32", name="labels")
        labelled = keras.Model([representation.input, labels], [representation.output, labels])
    built.append((strategy, labelled))
    return labelled


def dataset_sources(name, data_dir=None):
    """(train, test) `keras_vit.data.Source`s of a few-shot dataset: a name of
    FEWSHOT_DATASETS, "digits" (its fixed 80/20 split) or an image folder."""
    from keras_vit import data

    if name in FEWSHOT_DATASETS:
        tfds_name, train_split, test_split = FEWSHOT_DATASETS[name]
        return (data.source(tfds_name, "train", data_dir, tfds_split=train_split),
                data.source(tfds_name, "eval", data_dir, tfds_split=test_split))
    try:
        return data.source(name, "train", data_dir), data.source(name, "eval", data_dir)
    except ValueError as error:
        if "Unknown dataset" in str(error):
            raise ValueError(
                f"Unknown few-shot dataset {name!r}: use one of {', '.join(FEWSHOT_DATASETS)}, digits, "
                "or an image folder (one sub-folder per class)."
            ) from None
        raise


def few_shot(model, datasets, shots=SHOTS, seeds=SEEDS, l2_reg=DEFAULT_L2_REG, batch_size=64,
             crop_fraction=CROP_FRACTION, data_dir=None, strategy=None, verbose="auto", image_size=None):
    """The few-shot linear accuracy of `model` on each dataset.

    Args:
        model: a keras_vit model.
        datasets: names (FEWSHOT_DATASETS, "digits", an image folder path),
            or {name: (train Source, test Source)}.
        shots: examples per class of each few-shot train set (positive ints).
        seeds: one draw of the few-shot sets per seed (ints from 0).
        l2_reg: the ridge penalty (big_vision's 2**10).
        batch_size, crop_fraction, data_dir, strategy, verbose: the feature pass.
        image_size: the side of the square images fed to the model; default
            its input size. Required for a model of any size
            (`input_shape=(None, None, 3)`).

    Returns:
        {dataset: {"per_seed": {seed: {k: accuracy}}, "mean": {k: accuracy},
        "std": {k: ...}, "num_classes": C, "train_examples": N, "test_examples": M}}.
    """
    from keras_vit import data

    shots, seeds = check_protocol(shots, seeds)
    size = fed_image_size(model, image_size)
    if not isinstance(datasets, dict):
        datasets = {name: dataset_sources(name, data_dir) for name in datasets}
    value_range = data.input_range(model)
    results = {}
    def embed(source):
        return features(model, data.eval_dataset(source, size, batch_size, value_range=value_range,
                                                  crop_fraction=crop_fraction, keep_aspect=False),
                        strategy=strategy, verbose=verbose)

    for name, (train, test) in datasets.items():
        train_x, train_y = embed(train)
        check_shots(name, train_y, shots, train.num_classes)  # before the test set is embedded
        test_x, test_y = embed(test)
        per_seed = {}
        for seed in seeds:
            per_seed[seed] = {
                k: LinearFewShot(train_x[idx], train_y[idx], train.num_classes).accuracy(test_x, test_y, l2_reg)
                for k, idx in sample_shots(train_y, shots, seed, train.num_classes).items()
            }
        results[name] = {
            "per_seed": per_seed,
            "mean": {k: float(np.mean([per_seed[s][k] for s in seeds])) for k in shots},
            "std": {k: float(np.std([per_seed[s][k] for s in seeds])) for k in shots},
            "num_classes": train.num_classes,
            "train_examples": len(train_y),
            "test_examples": len(test_y),
        }
    return results


def check_protocol(shots, seeds):
    """(shots, seeds) as tuples, or a one-line ValueError: shots a non-empty
    list of positive ints, seeds a non-empty list of ints from 0 (a k of 0 or
    less would slice indices[:k] into a set that is not k per class)."""

    def whole_numbers(name, values, lowest):
        if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
            raise ValueError(f"{name} must be a list of whole numbers, got {values!r}: e.g. {name}=(1, 5).")
        values = tuple(values)
        wrong = [v for v in values if not is_whole_number(v) or v < lowest]
        if not values or wrong:
            raise ValueError(
                f"{name} must be a non-empty list of whole numbers from {lowest}, got {values!r}"
                f"{f' ({wrong[0]!r} is not one)' if wrong else ''}."
            )
        return tuple(int(v) for v in values)

    return whole_numbers("shots", shots, 1), whole_numbers("seeds", seeds, 0)


def fed_image_size(model, image_size=None):
    """The side of the square images few-shot feeds `model`: `image_size`,
    which a model of fixed size must take, or the model's own."""
    height, width = model.input_shape[1:3]
    if image_size is not None:
        if not is_whole_number(image_size) or image_size < 1:
            raise ValueError(f"image_size must be a positive whole number of pixels, got {image_size!r}.")
        if (height, width) not in ((None, None), (image_size, image_size)):
            raise ValueError(
                f"{model.name} takes {height}x{width} images, not image_size {image_size}: leave image_size out."
            )
        return int(image_size)
    if height is None or width is None:
        raise ValueError(
            f"{model.name} takes images of any size: pass image_size, the side in pixels to feed it (e.g. the "
            "resolution it was trained at)."
        )
    if height != width:
        raise ValueError(f"{model.name} takes {height}x{width} images; few-shot feeds square ones: build it square.")
    return height


def check_shots(name, labels, shots, num_classes):
    """Raises a one-line ValueError when a class of `name`'s few-shot train
    set has fewer images than the largest k of `shots` (sample_shots would
    give it all it has: a k-shot result that is not one)."""
    counts = np.bincount(np.asarray(labels, np.int64), minlength=num_classes)
    needed = max(shots)
    fewest = int(np.argmin(counts))
    if counts[fewest] < needed:
        raise ValueError(
            f"{name}: {needed}-shot needs {needed} training images of every class, and class {fewest} has "
            f"{counts[fewest]} ({int(np.sum(counts < needed))} of {num_classes} classes have fewer than {needed}): "
            f"use shots of at most {counts[fewest]} (--shots)."
        )


def format_results(results):
    """The few-shot table: one row per dataset, mean ± std over seeds per k."""
    from keras_vit.tables import format_table

    shots = sorted({k for result in results.values() for k in result["mean"]})
    rows = [("dataset", "classes", *[f"{k}-shot" for k in shots])]
    for name, result in results.items():
        rows.append((name, str(result["num_classes"]),
                     *[f"{100 * result['mean'][k]:.2f} ± {100 * result['std'][k]:.2f}" for k in shots]))
    return format_table(rows)
