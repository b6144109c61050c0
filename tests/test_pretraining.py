"""keras_vit.pretraining: masked patch prediction (paper §4.6, Appendix B.1.2).

The targets against numpy, on real photographs; the corruption's exact
counts, its 80/10/10 split and where random replacements come from; where the
corruption sits (after the patch embedding, before the position embedding);
training (gradients, a falling loss on digits, XLA, the Trainer; the
example script on an unlabelled folder, under a MirroredStrategy, resumed,
then fine-tuned); saving, and the encoder's way back
into a constructor.
"""

import json
import math
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
from harness import tiny_hybrid

import keras_vit
from keras_vit import pretraining, training
from keras_vit.pretraining import MaskedPatchPrediction, mean_color_targets

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = dict(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_dim=64)


def tiny_encoder(input_shape=(16, 16, 3), **kwargs):
    return keras_vit.ViT(**{**TINY, "input_shape": input_shape, "include_top": False, **kwargs})


def numpy(x):
    return keras.ops.convert_to_numpy(x)


# --- numpy references ---------------------------------------------------------


def reference_mean_color(images, patch, bits=3):
    images = np.asarray(images, np.float64)
    b, h, w, c = images.shape
    x = images.reshape(b, h // patch, patch, w // patch, patch, c).mean(axis=(2, 4))
    codes = np.floor(x * 2**bits / 256).astype(np.int64)
    classes = (codes[..., 0] * 2**bits + codes[..., 1]) * 2**bits + codes[..., 2]
    return classes.reshape(b, -1)


def reference_downsampled(images, patch, bits=3, grid=4):
    b, h, w, _ = images.shape
    rows, cols, sub = h // patch, w // patch, patch // grid
    out = np.zeros((b, rows * cols, grid * grid), np.int64)
    for r in range(rows):
        for c in range(cols):
            block = images[:, r * patch:(r + 1) * patch, c * patch:(c + 1) * patch]
            out[:, r * cols + c] = reference_mean_color(block, sub, bits)
    return out


# --- targets ------------------------------------------------------------------


@pytest.mark.multibackend
@pytest.mark.parametrize("bits", [3, 2])
def test_mean_color_targets_equal_a_numpy_reference(bits):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (3, 24, 32, 3)).astype("float32")
    # Patches exactly on a class boundary (mean 32, 64, ...) and at the extremes.
    images[0, :8, :8] = 32.0
    images[0, :8, 8:16] = 255.0
    images[0, :8, 16:24] = [0.0, 96.0, 224.0]
    got = numpy(mean_color_targets(images, 8, bits))
    assert got.dtype == np.int32 and got.shape == (3, 12)
    np.testing.assert_array_equal(got, reference_mean_color(images, 8, bits))
    assert got[0, 0] == (2**bits * 32 // 256) * (4**bits + 2**bits + 1)  # the boundary belongs to the upper class
    assert got[0, 1] == 2 ** (3 * bits) - 1
    assert got[0, 2] == (0 * 2**bits + 96 * 2**bits // 256) * 2**bits + 224 * 2**bits // 256


@pytest.mark.multibackend
def test_downsampled_and_pixel_targets_equal_numpy_references():
    images = np.random.default_rng(1).uniform(0, 255, (2, 32, 16, 3)).astype("float32")
    got = numpy(pretraining.downsampled_targets(images, 8))
    np.testing.assert_array_equal(got, reference_downsampled(images, 8))
    pixels = numpy(pretraining.pixel_targets(images, 8))
    expected = images.reshape(2, 4, 8, 2, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 8, 192) / 127.5 - 1
    np.testing.assert_allclose(pixels, expected, atol=1e-6)


@pytest.mark.parametrize("target", ["mean_color", "pixels"])
def test_targets_of_an_encoder_that_takes_scaled_pixels(target):
    """An encoder built with include_preprocessing=False takes [-1, 1]
    pixels: the targets are those of the [0, 255] images they came from."""
    encoder = keras_vit.ViT(**TINY, input_shape=(16, 16, 3), include_top=False, include_preprocessing=False)
    mpp = MaskedPatchPrediction(encoder, target=target, seed=0)
    images = np.random.default_rng(2).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    got = numpy(mpp.targets(images / 127.5 - 1))
    if target == "mean_color":
        np.testing.assert_array_equal(got, reference_mean_color(images, 4))
        assert len(np.unique(got)) > 1
    else:
        expected = images.reshape(2, 4, 4, 4, 4, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 48) / 127.5 - 1
        np.testing.assert_allclose(got, expected, atol=1e-5)


def photographs():
    """scikit-image's sample photographs, cropped to whole 16x16 patches."""
    from skimage import data

    for name in ("astronaut", "coffee", "chelsea", "rocket"):
        image = getattr(data, name)()
        side = min(image.shape[:2]) // 16 * 16
        yield name, image[None, :side, :side].astype("float32")


def test_targets_on_real_photographs_take_many_values():
    # On uniform-noise images every patch mean is near 127.5: a few classes at
    # most (the pitfall of vit-pytorch's mpp demo). Photographs are not noise.
    noise = np.random.default_rng(0).uniform(0, 255, (4, 224, 224, 3))
    assert len(np.unique(numpy(mean_color_targets(noise, 16)))) <= 8
    for name, image in photographs():
        targets = numpy(mean_color_targets(image, 16))
        assert len(np.unique(targets)) >= 20, name
        np.testing.assert_array_equal(targets, reference_mean_color(image, 16), err_msg=name)
        assert len(np.unique(numpy(pretraining.downsampled_targets(image, 16)))) >= 40, name


# --- the corruption -------------------------------------------------------------


def numbered_tokens(batch, patches, width=4):
    """Token (b, n) holds b * 1000 + n in every channel: its origin can be read back."""
    ids = np.arange(batch)[:, None] * 1000 + np.arange(patches)[None, :]
    return np.repeat(ids[..., None], width, axis=-1).astype("float32"), ids


@pytest.mark.multibackend
@pytest.mark.parametrize("rate, patches, expected", [(0.5, 49, 25), (0.15, 64, 10), (0.5, 16, 8)])
def test_corruption_counts_are_exact_per_image(rate, patches, expected):
    assert pretraining.corrupted_count(patches, rate) == expected == math.floor(rate * patches + 0.5)
    mpp = MaskedPatchPrediction(tiny_encoder(), corruption_rate=rate, seed=0)
    tokens, _ = numbered_tokens(32, patches, width=32)
    out = mpp.corrupt(keras.ops.convert_to_tensor(tokens))
    positions = numpy(out["positions"])
    assert positions.shape == (32, expected)
    for row in positions:
        assert len(set(row.tolist())) == expected  # distinct patches
    # Drawn per image, uniformly: the images differ, every patch gets its turn.
    assert len({tuple(sorted(row.tolist())) for row in positions}) > 16
    assert len(np.unique(positions)) == patches
    # Whatever is not among the positions is untouched.
    changed = np.any(numpy(out["tokens"]) != tokens, axis=-1)
    chosen = np.zeros((32, patches), bool)
    np.put_along_axis(chosen, positions, True, axis=1)
    assert not np.any(changed & ~chosen)
    assert not np.any(numpy(out["masked"]) & ~chosen) and not np.any(numpy(out["replaced"]) & ~chosen)


@pytest.mark.multibackend
def test_split_is_80_10_10_and_replacements_come_from_the_same_image():
    batch, patches = 500, 64
    mpp = MaskedPatchPrediction(tiny_encoder(), seed=3)
    tokens, ids = numbered_tokens(batch, patches, width=32)
    out = mpp.corrupt(keras.ops.convert_to_tensor(tokens))
    corrupted = numpy(out["tokens"])
    positions = numpy(out["positions"])
    masked, replaced = numpy(out["masked"]), numpy(out["replaced"])
    chosen = np.zeros((batch, patches), bool)
    np.put_along_axis(chosen, positions, True, axis=1)
    kept = chosen & ~masked & ~replaced
    total = chosen.sum()
    assert total == batch * 32
    for fraction, p in ((masked.sum() / total, 0.8), (replaced.sum() / total, 0.1), (kept.sum() / total, 0.1)):
        assert abs(fraction - p) < 4 * math.sqrt(p * (1 - p) / total), (fraction, p)
    mask = numpy(mpp.mask_token)[0, 0]
    np.testing.assert_array_equal(corrupted[masked], np.broadcast_to(mask, corrupted[masked].shape))
    np.testing.assert_array_equal(corrupted[kept], tokens[kept])
    # A replacement is another patch of the same image, spread over the image.
    origin = corrupted[replaced][:, 0].astype(int)
    image, patch = np.nonzero(replaced)
    assert np.all(origin // 1000 == image)
    assert np.all(origin % 1000 != patch)
    np.testing.assert_array_equal(origin % 1000, numpy(out["source"])[replaced])
    assert len(np.unique(origin % 1000)) > patches // 2
    assert not np.array_equal(mask, tokens[0, 0])


@pytest.mark.multibackend
def test_corruption_sits_after_the_patch_embedding_and_before_the_position_embedding():
    # Every patch masked: the image cannot reach the output (the mask replaced
    # the patch embeddings), but the positions still do (added afterwards).
    encoder = tiny_encoder()
    mpp = MaskedPatchPrediction(encoder, corruption_rate=1.0, mask_rate=1.0, random_rate=0.0, seed=0)
    rng = np.random.default_rng(0)
    images = rng.uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    predictions = numpy(mpp(images))  # (2, 16 patches, 512)
    assert predictions.shape == (2, 16, 512)
    first, second = predictions[0], predictions[1]
    order = lambda p: np.sort(p, axis=0)  # noqa: E731 - the patches come in top-k order
    np.testing.assert_allclose(order(first), order(second), atol=1e-5)
    assert np.std(predictions[0], axis=0).max() > 1e-3  # the positions tell the patches apart
    # With nothing masked the image does reach the output.
    plain = MaskedPatchPrediction(encoder, corruption_rate=1.0, mask_rate=0.0, random_rate=0.0, seed=0)
    out = numpy(plain(images))
    assert np.abs(order(out[0]) - order(out[1])).max() > 1e-3


@pytest.mark.multibackend
def test_each_corrupted_patch_is_predicted_from_its_own_output_token():
    # Nothing replaced (mask and random rates 0): the predictions are the head
    # applied to the encoder's own output tokens at the drawn positions.
    encoder = tiny_encoder()
    mpp = MaskedPatchPrediction(encoder, corruption_rate=0.5, mask_rate=0.0, random_rate=0.0, seed=0)
    images = np.random.default_rng(0).uniform(0, 255, (3, 16, 16, 3)).astype("float32")
    state = numpy(mpp.seed_generator.state).copy()
    positions = numpy(mpp.corrupt(keras.ops.zeros((3, 16, 32)))["positions"])
    mpp.seed_generator.state.assign(state)
    predictions = numpy(mpp(images))
    encoded = numpy(keras_vit.feature_extractor(encoder, ["encoded"])(images)["encoded"])[:, 1:]  # no class token
    expected = numpy(mpp.head(np.take_along_axis(encoded, positions[..., None], axis=1)))
    np.testing.assert_allclose(predictions, expected, atol=1e-4)


def test_a_hybrid_is_corrupted_after_its_resnet_stem():
    model = tiny_hybrid(input_shape=(32, 32, 3))  # 2x2 patches of a stride-4 feature map: 8 pixels per token
    mpp = MaskedPatchPrediction(model, seed=0)
    assert mpp.patch_size == (2, 2) and mpp.patch_pixels == (8, 8)
    images = np.random.default_rng(0).uniform(0, 255, (2, 32, 32, 3)).astype("float32")
    assert mpp(images).shape == (2, 8, 512)  # half of 16 tokens
    np.testing.assert_array_equal(numpy(mpp.targets(images)), reference_mean_color(images, 8))


# --- training -------------------------------------------------------------------


def digits_images(count=None):
    from keras_vit import data

    (x_train, _), _ = data.digits(image_size=16)
    return x_train[:count].astype("float32")


@pytest.mark.multibackend
def test_mask_token_and_head_get_gradients_and_the_loss_falls_on_digits(backend):
    keras.utils.set_random_seed(0)
    mpp = MaskedPatchPrediction(tiny_encoder(), seed=0)
    before = {v.path: numpy(v).copy() for v in (mpp.mask_token, mpp.head.kernel, mpp.head.bias)}
    # XLA compiles the whole step (TensorFlow's jit_compile; JAX jits anyway).
    mpp.compile(optimizer=keras.optimizers.Adam(3e-3), jit_compile=backend != "torch")
    images = digits_images(512)
    history = mpp.fit(images, batch_size=64, epochs=6, verbose=0, shuffle=False).history["loss"]
    for variable in (mpp.mask_token, mpp.head.kernel, mpp.head.bias):
        assert np.abs(numpy(variable) - before[variable.path]).max() > 1e-4, variable.path
    assert history[-1] < 0.6 * history[0], history
    # The loss is the mean over the corrupted patches alone, each predicted
    # from its own token: recomputed from the positions the call draws (the
    # draws depend on the seed generator's state alone, not on the tokens).
    x = images[:8]
    state = numpy(mpp.seed_generator.state).copy()
    positions = numpy(mpp.corrupt(keras.ops.zeros((8, 16, 32)))["positions"])
    mpp.seed_generator.state.assign(state)
    predictions = numpy(mpp(x)).astype("float64")
    assert predictions.shape == (8, 8, 512)
    targets = np.take_along_axis(reference_mean_color(x, 4), positions, axis=1)
    log_softmax = predictions - predictions.max(-1, keepdims=True)
    log_softmax -= np.log(np.exp(log_softmax).sum(-1, keepdims=True))
    by_hand = -np.take_along_axis(log_softmax, targets[..., None], axis=-1).mean()
    assert float(numpy(mpp.losses[0])) == pytest.approx(by_hand, rel=1e-4)


def test_trainer_with_accumulation_and_clipping():
    mpp = MaskedPatchPrediction(tiny_encoder(), seed=0)
    trainer = training.Trainer(mpp, accum_steps=2)
    trainer.compile(optimizer=keras.optimizers.Adam(1e-3, global_clipnorm=1.0), loss=None, jit_compile=True)
    before = numpy(mpp.mask_token).copy()
    history = trainer.fit(digits_images(64), batch_size=32, epochs=2, verbose=0).history["loss"]
    assert all(math.isfinite(v) for v in history) and history[0] > 1.0
    assert int(numpy(trainer.steps_done)) == 4
    assert np.abs(numpy(mpp.mask_token) - before).max() > 0


def test_recipe_is_the_papers():
    recipe = training.masked_patch_recipe()
    assert isinstance(recipe.optimizer, keras.optimizers.Adam)
    assert not isinstance(recipe.optimizer, keras.optimizers.AdamW)
    assert (recipe.batch_size, recipe.total_steps, recipe.warmup_steps) == (4096, 1_000_000, 10_000)
    assert recipe.learning_rate.base_learning_rate == 2e-4 and recipe.learning_rate.decay == "cosine"
    assert recipe.loss is None
    short = training.masked_patch_recipe(total_steps=1000, batch_size=64, accum_steps=4)
    assert (short.warmup_steps, short.accum_steps) == (100, 4)
    with pytest.raises(ValueError, match="multiple of accum_steps"):
        training.masked_patch_recipe(batch_size=10, accum_steps=4)


# --- saving and the way back -------------------------------------------------------


@pytest.mark.multibackend
def test_keras_file_reloads_in_safe_mode(tmp_path):
    mpp = MaskedPatchPrediction(tiny_encoder(), target="downsampled", corruption_rate=0.25, seed=7)
    path = str(tmp_path / "mpp.keras")
    mpp.save(path)
    loaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(loaded, MaskedPatchPrediction)
    assert (loaded.target, loaded.corruption_rate, loaded.seed) == ("downsampled", 0.25, 7)
    for a, b in zip(mpp.weights, loaded.weights):
        np.testing.assert_array_equal(numpy(a), numpy(b), err_msg=a.path)
    # Same seed, same weights: the same corruption and predictions.
    images = np.random.default_rng(0).uniform(0, 255, (2, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(numpy(loaded(images)), numpy(mpp(images)), atol=1e-5)
    np.testing.assert_allclose(numpy(loaded.losses[0]), numpy(mpp.losses[0]), rtol=1e-5)


@pytest.mark.multibackend
@pytest.mark.parametrize("include_top", [False, True])
def test_encoder_loads_into_a_constructor_with_a_new_head(tmp_path, include_top):
    encoder = tiny_encoder(include_top=include_top)
    mpp = MaskedPatchPrediction(encoder, seed=0)
    mpp.compile(optimizer=keras.optimizers.Adam(1e-2))
    mpp.fit(digits_images(32), batch_size=16, epochs=1, verbose=0)
    assert mpp.encoder is encoder
    assert not any("mask_token" in v.path or "mpp_head" in v.path for v in mpp.encoder.weights)
    path = str(tmp_path / "ssl.weights.h5")
    mpp.encoder.save_weights(path)
    model = keras_vit.ViT(**TINY, input_shape=(16, 16, 3), weights=path, classes=10)
    assert model.output.shape == (None, 10)
    assert not np.any(numpy(model.get_layer("predictions").kernel))  # a new zero head
    images = digits_images(4)
    ours = keras_vit.feature_extractor(encoder, ["encoded"])(images)["encoded"]
    theirs = keras_vit.feature_extractor(model, ["encoded"])(images)["encoded"]
    np.testing.assert_allclose(numpy(theirs), numpy(ours), atol=1e-6)
    # The trained body, not a fresh one.
    fresh = keras_vit.ViT(**TINY, input_shape=(16, 16, 3), classes=10)
    assert np.abs(numpy(keras_vit.feature_extractor(fresh, ["encoded"])(images)["encoded"]) - numpy(ours)).max() > 1e-3


def test_the_weights_of_a_whole_masked_patch_prediction_get_the_encoder_hint(tmp_path):
    """mpp.save_weights (not mpp.encoder.save_weights) into ViT(weights=): Keras
    said only "expected 0 variables, but received 1"."""
    mpp = MaskedPatchPrediction(tiny_encoder(include_top=False), seed=0)
    path = str(tmp_path / "mpp.weights.h5")
    mpp.save_weights(path)
    with pytest.raises(ValueError) as excinfo:
        keras_vit.ViT(**TINY, input_shape=(16, 16, 3), weights=path, classes=3)
    message = str(excinfo.value)
    assert "\n" not in message
    assert "holds a MaskedPatchPrediction" in message and "mpp.encoder.save_weights(...)" in message
    mpp.encoder.save_weights(path)  # the hint's way works
    keras_vit.ViT(**TINY, input_shape=(16, 16, 3), weights=path, classes=3)


@pytest.mark.parametrize("representation_size", [None, 16])
def test_a_weights_file_keeps_its_head_when_the_classes_match(tmp_path, representation_size):
    # With a representation layer the file holds two top-level Dense layers;
    # the head is the later one.
    config = dict(TINY, representation_size=representation_size)
    model = keras_vit.ViT(**config, input_shape=(16, 16, 3), classes=7)
    head = model.get_layer("predictions")
    head.kernel.assign(np.ones(head.kernel.shape, "float32"))
    path = str(tmp_path / "seven.weights.h5")
    model.save_weights(path)
    for classes in (None, 7):  # classes default to the file's head
        again = keras_vit.ViT(**config, input_shape=(16, 16, 3), weights=path, classes=classes)
        np.testing.assert_array_equal(numpy(again.get_layer("predictions").kernel), 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        keras_vit.ViT(**{**TINY, "hidden_size": 16}, input_shape=(16, 16, 3), weights=path, classes=3)


def test_a_weights_file_of_another_architecture_is_one_quiet_line(tmp_path):
    """What differs, not Keras's "A total of N objects could not be loaded" and
    four warnings; a file of the same architecture that still does not fit
    keeps Keras's reason in the line."""
    import warnings

    path = str(tmp_path / "tiny.weights.h5")
    keras_vit.ViT(**TINY, input_shape=(16, 16, 3), classes=3, representation_size=8).save_weights(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any warning fails the test
        with pytest.raises(ValueError) as excinfo:
            keras_vit.ViT(**{**TINY, "hidden_size": 16, "num_heads": 2}, input_shape=(16, 16, 3), weights=path)
        message = str(excinfo.value)
        assert "\n" not in message
        assert "width 32 in the file vs 16 in the model" in message
        assert "build keras_vit.ViT(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_dim=64)" in message
        with pytest.raises(ValueError) as excinfo:  # same architecture, another pre_logits width
            keras_vit.ViT(**TINY, input_shape=(16, 16, 3), weights=path, representation_size=4)
    message = str(excinfo.value)
    assert "\n" not in message and "A total of" not in message
    assert "value.shape=(32, 8)" in message and "Target variable" not in message, message


@pytest.mark.parametrize("kwargs, message", [
    (dict(target="colour"), "Unknown target 'colour'"),
    (dict(corruption_rate=0), "corruption_rate must be in"),
    (dict(mask_rate=0.8, random_rate=0.3), "sum to at most 1"),
    (dict(bits=0), "bits must be"),
])
def test_bad_arguments_are_one_line_errors(kwargs, message):
    with pytest.raises(ValueError, match=message) as excinfo:
        MaskedPatchPrediction(tiny_encoder(), **kwargs)
    assert "\n" not in str(excinfo.value)


def test_non_vit_encoders_and_odd_patches_are_one_line_errors():
    with pytest.raises(ValueError, match="not a keras_vit model") as excinfo:
        MaskedPatchPrediction(keras.Sequential([keras.Input((4,)), keras.layers.Dense(2)]))
    assert "\n" not in str(excinfo.value)
    with pytest.raises(ValueError, match="multiple of 4 pixels") as excinfo:
        MaskedPatchPrediction(keras_vit.ViT(**{**TINY, "patch_size": 2}, input_shape=(8, 8, 3)), target="downsampled")
    assert "\n" not in str(excinfo.value)


@pytest.mark.multibackend
def test_images_of_another_size_than_the_encoders_are_one_line_errors():
    mpp = MaskedPatchPrediction(keras_vit.ViT(**TINY, input_shape=(16, 16, 3), include_top=False), seed=0)
    with pytest.raises(ValueError) as excinfo:
        mpp(np.zeros((2, 24, 16, 3), "float32"))
    assert str(excinfo.value).startswith("vit takes 16x16 images, got 24x16: resize them"), str(excinfo.value)
    assert "\n" not in str(excinfo.value)


# --- the example scripts --------------------------------------------------------------


def run_examples(**argvs):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    processes = {name: subprocess.Popen([sys.executable, *argv], env=env, cwd=ROOT, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.PIPE)
                 for name, argv in argvs.items()}
    done = {}
    try:
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, (name, stderr[-3000:])
            done[name] = stdout
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    return done


def test_pretrain_example_on_an_unlabelled_folder_resumes_and_feeds_finetune(tmp_path):
    from PIL import Image

    folder = tmp_path / "images"  # no class sub-folders
    folder.mkdir()
    for index, image in enumerate(digits_images(120)):
        Image.fromarray(image.astype("uint8")).save(folder / f"{index:03d}.png")
    pretrain = os.path.join(ROOT, "examples", "pretrain.py")
    common = ["--objective", "masked_patch", "--model", "ViT", "--model_args",
              "patch_size=4,hidden_size=32,depth=2,num_heads=4,mlp_dim=64", "--dataset", str(folder),
              "--image_size", "16", "--batch_size", "16", "--save_every", "2", "--warmup_steps", "0"]
    whole, parts = str(tmp_path / "whole"), str(tmp_path / "parts")
    first = run_examples(
        whole=[pretrain, *common, "--steps", "4", "--model_dir", whole],
        # A 2-step run on 2 replicas, started again below.
        part=[pretrain, *common, "--steps", "2", "--model_dir", parts, "--strategy", "mirrored",
              "--cpu_replicas", "2", "--accum_steps", "2"],
    )
    # The MirroredStrategy check: 2 logical CPUs, 2 micro-batches per replica.
    assert "2 replica(s) (MirroredStrategy)" in first["part"]
    with open(os.path.join(parts, "results.json")) as f:
        part = json.load(f)
    assert part["replicas"] == 2 and part["steps"] == 2
    assert all(math.isfinite(v) and v > 1.0 for v in part["history"]["loss"])
    encoder = os.path.join(whole, "encoder.weights.h5")
    second = run_examples(
        # The same run on one device without accumulation: how it runs may change.
        resumed=[pretrain, *common, "--steps", "2", "--model_dir", parts],
        finetune=[os.path.join(ROOT, "examples", "finetune.py"), *common[2:6], "--dataset", "digits",
                  "--image_size", "16", "--batch_size", "16", "--steps", "2", "--weights", encoder,
                  "--model_dir", str(tmp_path / "finetune")],
    )
    assert "Resuming from step 2" in second["resumed"]
    assert "Held-out masked patch loss" in first["whole"] and "Held-out accuracy" in second["finetune"]
    # The printed fine-tuning hint names the architecture's flags too (the one run above).
    assert f"finetune.py --model ViT --model_args {common[5]} --image_size 16 --weights {encoder}" in first["whole"]
    # Each run's encoder loads into the constructor; model.keras is the whole wrapper, in safe mode.
    for directory in (whole, parts):
        model = keras_vit.ViT(**{**TINY, "num_heads": 4}, input_shape=(16, 16, 3), classes=3,
                              weights=os.path.join(directory, "encoder.weights.h5"))
        assert model.output.shape == (None, 3)
    loaded = keras.saving.load_model(os.path.join(whole, "model.keras"), safe_mode=True)
    assert isinstance(loaded, MaskedPatchPrediction)


def test_digits_study_reads_back_only_the_encoders_its_flags_ask_for(tmp_path):
    """examples/masked_patch_digits.py skips a seed whose encoder is there:
    one pre-trained under other flags (another --target) is refused in one
    line, not read back as if it were the one asked for, and a later stage
    without encoders says to pre-train first."""
    study = os.path.join(ROOT, "examples", "masked_patch_digits.py")
    tiny = ["--model", "micro", "--seeds", "0", "--pretrain_steps", "2", "--pretrain_batch_size", "512"]
    run_examples(pretrain=[study, *tiny, "--output_dir", str(tmp_path), "--stage", "pretrain"])
    with open(tmp_path / "seed-0" / "pretrain.json") as f:
        assert json.load(f)["target"] == "mean_color"
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3")
    for flags, expected in (
        (["--output_dir", str(tmp_path), "--stage", "pretrain", "--target", "pixels"],
         "was pre-trained with other flags (--target mean_color -> pixels)"),
        (["--output_dir", str(tmp_path / "empty"), "--stage", "fewshot"], "run --stage pretrain (or all) first"),
        *[(["--output_dir", str(tmp_path), "--stage", "pretrain", flag, value], f"{flag} {old} -> {value}")
          for flag, old, value in (("--model", "micro", "mini"), ("--corruption_rate", "0.5", "0.4"),
                                   ("--pretrain_steps", "2", "3"), ("--pretrain_batch_size", "512", "256"),
                                   ("--pretrain_learning_rate", "0.001", "0.002"))],
        (["--output_dir", str(tmp_path), "--stage", "finetune", "--finetune_batch_size", "200"],
         "--finetune_batch_size 200 is more than the 100 labelled images"),
    ):
        done = subprocess.run([sys.executable, study, *tiny, *flags], env=env, cwd=ROOT, capture_output=True,
                              text=True, timeout=300)
        errors = [line for line in done.stderr.splitlines() if "error:" in line]
        assert done.returncode == 2 and len(errors) == 1 and expected in errors[0], done.stderr[-2000:]
    assert not (tmp_path / "empty").exists()  # a refused run writes nothing
