"""keras_vit.data: every TFDS pipeline on mock data, the digits and image-folder
sources, the model's input range, determinism."""

import io
import re

import keras
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from harness import tiny_vit
from PIL import Image

from keras_vit import data

SIZE, BATCH = 24, 4


def batches(ds, count=2):
    return [(x.numpy(), y.numpy()) for x, y in ds.take(count)]


def check_batch(images, labels, num_classes, value_range=(0.0, 255.0), batch=BATCH):
    assert images.shape == (batch, SIZE, SIZE, 3) and images.dtype == np.float32
    assert images.min() >= value_range[0] - 1e-4 and images.max() <= value_range[1] + 1e-4
    assert labels.shape == (batch, num_classes)
    np.testing.assert_allclose(labels.sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("name", list(data.TFDS_SPLITS))
def test_tfds_pipelines_on_mock_data(name):
    expected_classes = {"cifar10": 10, "cifar100": 100, "oxford_iiit_pet": 37, "oxford_flowers102": 102}
    with tfds.testing.mock_data(num_examples=12):
        eval_source = data.source(name, "eval")
        assert eval_source.num_classes == expected_classes.get(name, 1000)
        for images, labels in batches(data.eval_dataset(eval_source, SIZE, BATCH)):
            check_batch(images, labels, eval_source.num_classes)
        if data.TFDS_SPLITS[name].train is None:
            with pytest.raises(ValueError, match="evaluation set"):
                data.source(name, "train")
            return
        train_source = data.source(name, "train")
        train = data.train_dataset(train_source, SIZE, BATCH, seed=3, value_range=(-1.0, 1.0))
        stream = batches(train, 5)  # more batches than examples: it repeats
        for images, labels in stream:
            check_batch(images, labels, train_source.num_classes, value_range=(-1.0, 1.0))
        # Resumed at step 4 (in the second epoch: 12 examples): batch 4 of the stream.
        resumed = data.train_dataset(train_source, SIZE, BATCH, seed=3, start_step=4, value_range=(-1.0, 1.0))
        assert_same(batches(resumed, 1), stream[4:])


def assert_same(one, two):
    assert len(one) == len(two)
    for (x1, y1), (x2, y2) in zip(one, two):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)


def test_train_pipeline_is_deterministic_in_its_seed():
    source = data.source("digits", "train")

    def stream(seed, **augment):
        return batches(data.train_dataset(source, SIZE, 8, seed=seed, **augment), 3)

    first = stream(1)
    assert_same(first, stream(1))
    assert not np.array_equal(first[0][0], stream(2)[0][0])
    # Keras's RandAugment and MixUp are seeded too.
    augmented = stream(1, randaugment=0.5, mixup=0.2)
    assert_same(augmented, stream(1, randaugment=0.5, mixup=0.2))
    labels = np.concatenate([y for _, y in augmented])
    assert np.any((labels > 0.01) & (labels < 0.99))  # MixUp's soft labels, still summing to one
    check_batch(augmented[0][0], labels[:8], 10, batch=8)


def numbered_source(count=50, examples=True):
    """Constant 6x6 images whose value is the example's number times 5 (labels:
    the number mod 10): a crop, resize or flip keeps the value, so batches tell
    which examples they hold. `examples=False`: a stream source, as TFDS's."""
    numbers = np.arange(count)
    images = np.broadcast_to((numbers * 5).astype(np.uint8)[:, None, None, None], (count, 6, 6, 3)).copy()
    labels = (numbers % 10).astype(np.int32)

    def read(shuffle_files, seed):
        return tf.data.Dataset.from_tensor_slices((images, labels))

    return data.Source("numbered", "train", 10, count, read, examples=(images, labels) if examples else None)


def example_numbers(ds, count):
    numbers = [np.round(x[:, 0, 0, 0] / 5).astype(int) for x, _ in batches(ds, count)]
    return np.concatenate(numbers)


@pytest.mark.parametrize("by_index", [True, False], ids=["random-access", "stream"])
def test_each_epoch_is_a_new_permutation_and_a_resumed_stream_continues_it(by_index):
    """50 examples in batches of 8: epochs end inside batches 6 and 12. Every
    epoch holds each example once, in its own order; the stream started at
    step s is the stream from batch s on, across epoch boundaries."""
    source = numbered_source(examples=by_index)
    stream = example_numbers(data.train_dataset(source, 4, 8, seed=5), 18)  # 144 examples: 2.88 epochs
    first, second = stream[:50], stream[50:100]
    np.testing.assert_array_equal(np.sort(first), np.arange(50))
    np.testing.assert_array_equal(np.sort(second), np.arange(50))
    assert not np.array_equal(first, second) and not np.array_equal(first, np.arange(50))
    for step in (1, 6, 7, 12):
        resumed = example_numbers(data.train_dataset(source, 4, 8, seed=5, start_step=step), 3)
        np.testing.assert_array_equal(resumed, stream[8 * step : 8 * step + 24])
    other_seed = example_numbers(data.train_dataset(source, 4, 8, seed=6), 7)
    assert not np.array_equal(other_seed[:50], first)


def test_resumed_digits_batches_are_the_uninterrupted_ones_with_randaugment_and_mixup():
    """Batch 8 of 160 holds the end of the first epoch of digits (1,437
    examples) and the start of the second: a run resumed at step 8 or 9 gets
    the batches of the uninterrupted stream, pixel for pixel, with RandAugment
    and MixUp (their draws are set from the batch number)."""
    source = data.source("digits", "train")
    augment = dict(seed=3, randaugment=0.5, mixup=0.2, value_range=(-1.0, 1.0))
    stream = batches(data.train_dataset(source, 8, 160, **augment), 10)
    for step in (8, 9):
        assert_same(batches(data.train_dataset(source, 8, 160, start_step=step, **augment), 10 - step), stream[step:])
    # Read again (as Keras does after a first batch to build the model): the
    # same batches, whatever batches the pipeline made before.
    ds = data.train_dataset(source, 8, 160, **augment)
    batches(ds, 2)
    assert_same(batches(ds, 1), stream[:1])


def test_augmented_batches_do_not_depend_on_the_dtype_policy():
    """Under mixed precision (--mixed_precision) the pipeline still makes
    float32 batches, the very ones of a float32 run: MixUp used to multiply
    its bfloat16 weights into float32 labels and fail."""
    source = data.source("digits", "train")
    augment = dict(seed=3, randaugment=0.5, mixup=0.2)
    reference = batches(data.train_dataset(source, SIZE, 8, **augment), 2)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        mixed = batches(data.train_dataset(source, SIZE, 8, **augment), 2)
    finally:
        keras.config.set_dtype_policy("float32")
    assert all(x.dtype == y.dtype == np.float32 for x, y in mixed)
    assert_same(mixed, reference)


def test_randaugment_changes_the_images_deterministically():
    source = data.source("digits", "train")

    def stream(seed, **augment):
        return batches(data.train_dataset(source, SIZE, 8, seed=seed, **augment), 3)

    plain, augmented = stream(1), stream(1, randaugment=0.5)
    for (x, y), (xa, ya) in zip(plain, augmented):
        np.testing.assert_array_equal(y, ya)  # the same examples, cropped the same way
        changed = np.abs(x - xa).reshape(len(x), -1).max(axis=1)
        assert np.all(changed > 10), changed  # every image changed by more than 10 levels somewhere
    assert_same(augmented, stream(1, randaugment=0.5))
    assert not np.array_equal(augmented[0][0], stream(2, randaugment=0.5)[0][0])


def test_eval_pipeline_resizes_or_centre_crops_in_order():
    images = np.zeros((2, 40, 80, 3), np.uint8)
    images[:, :, 20:60] = 255  # a white square in the middle of a wide image
    labels = np.array([3, 1], np.int32)
    source = data.Source("toy", "eval", 5, 2, lambda shuffle, seed: tf.data.Dataset.from_tensor_slices((images, labels)))
    resized, onehot = batches(data.eval_dataset(source, SIZE, 2), 1)[0]
    np.testing.assert_array_equal(onehot.argmax(axis=1), labels)
    assert resized[0, SIZE // 2, 0].max() == 0  # the whole width kept: black borders on the sides
    cropped, _ = batches(data.eval_dataset(source, SIZE, 2, crop_fraction=0.875), 1)[0]
    assert cropped[0, SIZE // 2, SIZE // 2].min() == 255 and cropped[0, SIZE // 2, 0].min() > 200  # the centre only


def test_inception_crop_and_model_input_range():
    image = tf.constant(np.arange(64 * 48 * 3, dtype=np.uint8).reshape(64, 48, 3))
    crops = [data.inception_crop(image, SIZE, seed=(0, s)).numpy() for s in range(4)]
    assert all(c.shape == (SIZE, SIZE, 3) for c in crops)
    assert not all(np.array_equal(crops[0], c) for c in crops[1:])
    assert data.input_range(tiny_vit()) == (0.0, 255.0)
    assert data.input_range(tiny_vit(include_preprocessing=False)) == (-1.0, 1.0)
    np.testing.assert_allclose(data.scale(tf.constant([0.0, 127.5, 255.0]), (-1.0, 1.0)).numpy(), [-1, 0, 1])


def test_digits_split_is_fixed_stratified_and_upsampled():
    (x_train, y_train), (x_test, y_test) = data.digits()
    assert x_train.shape == (1437, 8, 8, 3) and x_test.shape == (360, 8, 8, 3) and x_train.dtype == np.uint8
    assert x_train.max() == 255 and np.bincount(y_test).min() >= 35  # every digit is in the test part
    (big, big_labels), _ = data.digits(image_size=32)
    assert big.shape == (1437, 32, 32, 3)
    np.testing.assert_array_equal(big_labels, y_train)
    np.testing.assert_array_equal(data.digits()[1][0], x_test)


def _write_folder(root, classes=3, per_class=12):
    for label in range(classes):
        (root / f"class_{label}").mkdir(parents=True)
        for i in range(per_class):
            pixels = np.full((20 + i, 30, 3), 60 * label, np.uint8)  # sizes vary, colour = class
            Image.fromarray(pixels).save(root / f"class_{label}" / f"{i}.png")


def test_image_folder_source(tmp_path):
    _write_folder(tmp_path / "photos")
    train, held_out = (data.source(str(tmp_path / "photos"), split) for split in ("train", "eval"))
    assert train.num_classes == held_out.num_classes == 3
    assert train.num_examples + held_out.num_examples == 36 and held_out.num_examples > 0
    for images, labels in batches(data.eval_dataset(held_out, SIZE, 1), held_out.num_examples):
        assert images[0].mean() == pytest.approx(60 * labels[0].argmax(), abs=1)  # the right class
    images, labels = batches(data.train_dataset(train, SIZE, BATCH, seed=0), 1)[0]
    check_batch(images, labels, 3)

    # train/ and val/ sub-folders are the splits.
    _write_folder(tmp_path / "split" / "train", per_class=4)
    _write_folder(tmp_path / "split" / "val", per_class=2)
    assert data.source(str(tmp_path / "split"), "train").num_examples == 12
    assert data.source(str(tmp_path / "split"), "eval").num_examples == 6


def _folder_with_one_bad_file(tmp_path, pipeline, name, contents):
    """An image folder with train/ and val/, `contents` written as `name` into
    the split that `pipeline` ("train" or "eval") reads; the file's path and
    that pipeline's dataset, whose one batch holds every file."""
    _write_folder(tmp_path / "photos" / "train", per_class=2)
    _write_folder(tmp_path / "photos" / "val", per_class=2)
    bad = tmp_path / "photos" / ("train" if pipeline == "train" else "val") / "class_1" / name
    bad.write_bytes(contents)
    source = data.source(str(tmp_path / "photos"), pipeline)
    assert str(bad) in source.examples[0]
    if pipeline == "train":
        return bad, data.train_dataset(source, SIZE, 7, seed=0)
    return bad, data.eval_dataset(source, SIZE, 7)


def _first_batch_error(dataset):
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        for _ in dataset.take(1):
            pass
    return str(error.value)


@pytest.mark.parametrize("contents", [b"<html>404 Not Found</html>", b""], ids=["a_web_page", "an_empty_file"])
@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_a_file_of_a_folder_that_is_not_an_image_is_named_by_its_path(tmp_path, pipeline, contents):
    bad, dataset = _folder_with_one_bad_file(tmp_path, pipeline, "saved_page.jpg", contents)
    message = _first_batch_error(dataset)
    assert f"[{bad}] [is not a JPEG, PNG, GIF or BMP image: remove it from the folder or convert it" in message


@pytest.mark.parametrize("image_format", ["JPEG", "PNG"])
@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_a_truncated_image_of_a_folder_is_named_by_its_path(tmp_path, pipeline, image_format):
    """A download cut short: the header is right, TensorFlow's decoder fails, and its error names no file."""
    encoded = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(encoded, image_format)
    whole = encoded.getvalue()
    bad, dataset = _folder_with_one_bad_file(tmp_path, pipeline, f"cut_short.{image_format.lower()}",
                                             whole[: len(whole) // 2])
    message = _first_batch_error(dataset)
    assert f"[{bad}] [is truncated or corrupt (TensorFlow cannot decode it): remove it from the folder or re-save it]" in message

    bad.write_bytes(whole)  # the whole file reads
    for images, _ in dataset.take(1):
        assert images.shape[0] == 7


def test_unknown_or_empty_datasets_get_one_line_errors(tmp_path):
    with pytest.raises(ValueError, match="cifar10, cifar100, .*digits") as error:
        data.source("mnist")
    assert "\n" not in str(error.value)
    with pytest.raises(ValueError, match="no class sub-folders"):
        data.source(str(tmp_path))
    with pytest.raises(ValueError, match="split"):
        data.source("digits", "validation")
    # train/ without a held-out folder beside it: said so (train/ was read as a class with no images).
    _write_folder(tmp_path / "no_val" / "train", per_class=2)
    with pytest.raises(ValueError, match=r"has train/ but no val/ or validation/ or test/ beside it"):
        data.source(str(tmp_path / "no_val"), "train")


@pytest.mark.parametrize("pipeline", ["train", "eval"])
def test_pipeline_arguments_get_one_line_errors(pipeline):
    """Wrong sizes, ranges and seeds are named before TensorFlow meets them."""
    source = data.source("digits", "train")
    make = data.train_dataset if pipeline == "train" else data.eval_dataset
    cases = [
        (dict(batch_size=0), "batch_size must be a whole number, at least 1; got 0"),
        (dict(batch_size=8.0), "batch_size must be a whole number"),
        (dict(image_size=0), "image_size must be a whole number, at least 1; got 0"),
        (dict(value_range=(0, 1)), r"value_range must be \(0, 255\) or \(-1, 1\)"),
    ]
    if pipeline == "train":
        cases += [
            (dict(crop_area=(0.5, 2)), r"crop_area must be \(low, high\) fractions"),
            (dict(crop_area=(0, 1)), r"crop_area must be"),
            (dict(seed=None), "seed must be a whole number, got None"),
            (dict(start_step=-1), "start_step must be a whole number, 0 or more, got -1"),
        ]
    else:
        cases += [
            (dict(crop_fraction=fraction), r"crop_fraction must be in \(0, 1\], the central part kept \(0.875: "
                                           rf"224 px of 256\); got {fraction}")
            for fraction in (0, 1.5, -0.5)
        ]
    for wrong, message in cases:
        arguments = {"image_size": SIZE, "batch_size": 8, **wrong}
        with pytest.raises(ValueError, match=message) as error:
            make(source, arguments.pop("image_size"), arguments.pop("batch_size"), **arguments)
        assert "\n" not in str(error.value)


@pytest.mark.parametrize("make", [
    lambda wrong: data.train_dataset(wrong, SIZE, 8),
    lambda wrong: data.eval_dataset(wrong, SIZE, 8),
    lambda wrong: data.subset(wrong, 10),
])
def test_arrays_given_for_a_source_get_a_one_line_error(make):
    # digits() returns ((x, y), (x, y)) arrays, source("digits") a Source.
    with pytest.raises(TypeError, match=re.escape(
        'source must be a keras_vit.data.Source, from data.source(...) (a dataset name such as "digits", or an '
        "image folder), got tuple; numpy arrays go to model.fit(x, y) directly."
    )):
        make(data.digits())


def _numbered_source(count, examples):
    """`count` 16x16 images whose pixels all hold their number, read as a
    stream (like TFDS: no `examples`) or drawn by index."""
    images = np.broadcast_to(np.arange(count, dtype=np.uint8)[:, None, None, None], (count, 16, 16, 3)).copy()
    labels = np.zeros(count, np.int32)

    def read(shuffle_files, seed):
        return tf.data.Dataset.from_tensor_slices((images, labels))

    return data.Source("numbered", "train", 2, count, read, crop_area=(0.5, 1.0), flip=False,
                       examples=(images, labels) if examples else None)


def test_a_subset_of_a_streamed_source_is_the_same_examples_every_epoch():
    """The data-size study trains on N examples: a TFDS-like source's subset
    must not draw other examples in each epoch."""
    subset = data.subset(_numbered_source(40, examples=False), 10)
    ds = data.train_dataset(subset, 8, 5, seed=0, shuffle_buffer=10)
    numbers = [sorted(np.round(x[:, 0, 0, 0]).astype(int).tolist()) for x, _ in batches(ds, 6)]
    epochs = [sorted(numbers[i] + numbers[i + 1]) for i in (0, 2, 4)]  # 2 batches of 5 per epoch
    assert len(set(epochs[0])) == 10 and epochs[0] == epochs[1] == epochs[2], epochs


def test_train_crop_area_argument_overrides_the_sources_default():
    """crop_area=(1, 1) keeps every image whole, whatever the source's default."""
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (4, 16, 16, 3)).astype(np.uint8)
    labels = np.arange(4, dtype=np.int32)

    def read(shuffle_files, seed):
        return tf.data.Dataset.from_tensor_slices((images, labels))

    source = data.Source("random", "train", 4, 4, read, crop_area=(0.05, 0.1), flip=False, examples=(images, labels))
    for x, y in batches(data.train_dataset(source, 16, 4, seed=0, crop_area=(1.0, 1.0)), 2):
        np.testing.assert_allclose(x, images[np.argmax(y, axis=1)], atol=1e-3)


def test_train_flip_argument_overrides_the_sources_default_both_ways():
    """Images that brighten left to right: any crop and resize keeps that, a
    mirror reverses it. flip=False never mirrors a source that flips by default;
    flip=True mirrors some of 64 images of a source that does not (digits-like)."""
    ramp = np.broadcast_to((np.arange(16) * 16).astype(np.uint8)[None, :, None], (16, 16, 3))
    images, labels = np.stack([ramp] * 8), np.arange(8, dtype=np.int32) % 2

    def read(shuffle_files, seed):
        return tf.data.Dataset.from_tensor_slices((images, labels))

    flipping = data.Source("ramps", "train", 2, 8, read, crop_area=(0.5, 1.0), flip=True, examples=(images, labels))
    still = data.Source("ramps", "train", 2, 8, read, crop_area=(0.5, 1.0), flip=False, examples=(images, labels))

    def mirrored(source, **flip):
        batch = np.concatenate([x for x, _ in batches(data.train_dataset(source, 8, 16, seed=1, **flip), 4)])
        left, right = batch[:, :, 0].mean(axis=(1, 2)), batch[:, :, -1].mean(axis=(1, 2))
        assert np.all(left != right)  # every image is still a ramp, one way or the other
        return left > right

    assert not mirrored(flipping, flip=False).any()
    assert not mirrored(still).any()  # the source's own default
    flipped = mirrored(still, flip=True)
    assert flipped.any() and not flipped.all()
    assert mirrored(flipping).any()


def test_eval_center_crop_keeps_the_aspect_or_squashes_as_told():
    """A tall 40x20 image, crop_fraction 0.5 to 8 px: keep_aspect=True resizes
    its shorter side to 16 (32x16) and crops the centre, keep_aspect=False
    resizes it to 16x16 (big_vision's resize(256)|central_crop(224)) and crops."""
    image = np.random.default_rng(0).integers(0, 256, (40, 20, 3)).astype(np.uint8)
    source = data.Source("tall", "eval", 2, 1, lambda shuffle, seed: tf.data.Dataset.from_tensor_slices(
        (image[None], np.array([1], np.int32))))

    def pipeline(keep_aspect):
        return batches(data.eval_dataset(source, 8, 1, crop_fraction=0.5, keep_aspect=keep_aspect), 1)[0][0][0]

    def resized_then_cropped(height, width):
        resized = tf.image.resize(image.astype(np.float32), (height, width), method="bilinear").numpy()
        top, left = (height - 8) // 2, (width - 8) // 2
        return resized[top:top + 8, left:left + 8]

    kept, squashed = pipeline(True), pipeline(False)
    np.testing.assert_allclose(kept, resized_then_cropped(32, 16), atol=1e-3)
    np.testing.assert_allclose(squashed, resized_then_cropped(16, 16), atol=1e-3)
    assert np.abs(kept - squashed).max() > 10
