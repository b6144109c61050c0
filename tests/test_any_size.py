"""One model at any resolution (`input_shape=(None, None, 3)`), native-resolution
serving, and the keras.applications / timm habits (preprocess_input,
decode_predictions, pooling="avg", timm names).

A model of any size keeps one stored position embedding and resamples it in
the graph to each input's grid; a model built for that size loads the same
weights and resizes them on load. Both must give the same logits.
"""

import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import layers as vit_layers
from keras_vit import labels, registry
from keras_vit.testing import official_arrays, write_checkpoint
from harness import TINY_RESNET, TINY_VIT, images, randomize_head

multibackend = pytest.mark.multibackend
TOLERANCE = 1e-5
ANY = (None, None, 3)


def vit16(input_shape, **kwargs):
    """A tiny ViT with the constructors' 16-pixel patches."""
    config = dict(TINY_VIT, patch_size=16, input_shape=input_shape, classes=5, classifier_activation=None)
    config.update(kwargs)
    return keras_vit.ViT(**config)


def hybrid16(input_shape, **kwargs):
    """A tiny hybrid: a stride-4 ResNet and 4x4 patches of its feature map, 16 pixels per token."""
    stem = keras_vit.hybrid.stem_builder(**TINY_RESNET)
    return vit16(input_shape, patch_size=4, stem=stem, **kwargs)


BUILDERS = {"vit": vit16, "hybrid": hybrid16}
SIZES = [(224, 224), (160, 320), (96, 64), (384, 384)]


def logits(model, x):
    return keras.ops.convert_to_numpy(model(x, training=False))


def fixed_twin(build, dynamic, size, tmp_path, **kwargs):
    """A model built for `size` holding the dynamic model's weights (resized on load)."""
    path = str(tmp_path / "dynamic.weights.h5")
    dynamic.save_weights(path)
    return build(size + (3,), weights=path, **kwargs)


@pytest.fixture(scope="module")
def dynamic_models():
    keras.utils.set_random_seed(3)
    built = {}
    for name, build in BUILDERS.items():
        model = build(ANY)
        randomize_head(model)
        built[name] = model
    return built


@multibackend
@pytest.mark.parametrize("size", SIZES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("architecture", list(BUILDERS))
def test_any_size_matches_a_model_built_for_that_size(dynamic_models, architecture, size, tmp_path):
    dynamic = dynamic_models[architecture]
    assert dynamic.get_layer("position_embedding").grid_size == (14, 14)  # 224 px by default
    fixed = fixed_twin(BUILDERS[architecture], dynamic, size, tmp_path)
    x = images(2, size + (3,))
    expected = logits(fixed, x)
    assert np.ptp(expected) > 1e-2  # a random head: logits that depend on the image
    np.testing.assert_allclose(logits(dynamic, x), expected, atol=TOLERANCE, rtol=0)


@multibackend
@pytest.mark.parametrize("size", [(160, 320), (64, 96)], ids=lambda s: f"{s[0]}x{s[1]}")
def test_bicubic_any_size_matches_bicubic_resize_on_load(size, tmp_path):
    dynamic = vit16(ANY, posemb_interpolation="bicubic")
    randomize_head(dynamic)
    fixed = fixed_twin(vit16, dynamic, size, tmp_path, posemb_interpolation="bicubic")
    x = images(2, size + (3,))
    np.testing.assert_allclose(logits(dynamic, x), logits(fixed, x), atol=TOLERANCE, rtol=0)


@multibackend
@pytest.mark.parametrize("new_grid", [(5, 9), (20, 7), (1, 3), (14, 14), (28, 28)])
def test_in_graph_zoom_is_scipy_zoom(new_grid):
    grid = np.random.default_rng(0).normal(size=(14, 14, 6)).astype("float32")
    expected = vit_layers.resample_position_embedding(grid, new_grid, "zoom")  # scipy.ndimage.zoom(order=1)
    got = keras.ops.convert_to_numpy(vit_layers.resample_position_embedding_ops(grid, new_grid, "zoom"))
    np.testing.assert_allclose(got, expected, atol=1e-6, rtol=0)


@multibackend
def test_stored_grid_is_used_as_it_is(dynamic_models):
    layer = dynamic_models["vit"].get_layer("position_embedding")
    assert layer.embedding_for(images(1, (224, 224, 3))) is layer.embedding  # no resampling at 224
    other = layer.embedding_for(images(1, (160, 320, 3)))
    assert tuple(other.shape) == (1, 1 + 10 * 20, TINY_VIT["hidden_size"])


@multibackend
def test_checkpoint_grid_is_stored_and_resampled_per_call(tmp_path):
    """weights= a checkpoint: the stored grid is the checkpoint's (384 px), and
    each size gives what a model built for it from the same file gives."""
    arrays = dict(official_arrays(**dict(TINY_VIT, patch_size=16), image_size=384, classes=5))
    path = str(write_checkpoint(tmp_path / "tiny384.npz", arrays))
    dynamic = vit16(ANY, weights=path, classes=None)
    posemb = dynamic.get_layer("position_embedding")
    assert posemb.grid_size == (24, 24)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(posemb.embedding),
                                  arrays["Transformer/posembed_input/pos_embedding"])
    for size in [(384, 384), (224, 160)]:
        fixed = vit16(size + (3,), weights=path, classes=None)
        x = images(2, size + (3,))
        np.testing.assert_allclose(logits(dynamic, x), logits(fixed, x), atol=TOLERANCE, rtol=0)


@multibackend
@pytest.mark.parametrize("architecture", list(BUILDERS))
def test_xla(architecture, tmp_path):
    if keras.backend.backend() == "torch":
        pytest.skip("jit_compile is XLA on TensorFlow and JAX")
    dynamic = BUILDERS[architecture](ANY)
    randomize_head(dynamic)
    dynamic.compile(jit_compile=True)
    for size in [(96, 64), (160, 320)]:
        x = images(2, size + (3,))
        fixed = fixed_twin(BUILDERS[architecture], dynamic, size, tmp_path)
        fixed.compile(jit_compile=True)  # the same compiler on both sides: XLA fuses differently
        np.testing.assert_allclose(dynamic.predict(x, verbose=0), fixed.predict(x, verbose=0),
                                   atol=TOLERANCE, rtol=0)


@multibackend
def test_safe_mode_keras_round_trip(dynamic_models, tmp_path):
    model = dynamic_models["hybrid"]
    path = str(tmp_path / "any.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert restored.input_shape == (None, None, None, 3)
    for size in [(224, 224), (96, 64)]:
        x = images(2, size + (3,))
        np.testing.assert_allclose(logits(restored, x), logits(model, x), atol=1e-6, rtol=0)


@multibackend
def test_views_and_visualize_at_any_size(dynamic_models):
    model = dynamic_models["vit"]
    features = keras_vit.feature_extractor(model, ["with_posemb", "encoded"])
    attention = keras_vit.attention_model(model)
    for size in [(96, 64), (64, 160)]:
        tokens = 1 + (size[0] // 16) * (size[1] // 16)
        out = features(images(1, size + (3,)))
        assert tuple(out["encoded"].shape) == (1, tokens, TINY_VIT["hidden_size"])
        assert tuple(attention(images(1, size + (3,)))[0].shape) == (1, TINY_VIT["num_heads"], tokens, tokens)
        maps = keras_vit.visualize.attention_rollout_maps(model, images(2, size + (3,)))
        assert maps.shape == (2, size[0] // 16, size[1] // 16)
        distances = keras_vit.visualize.attention_distances(model, images(1, size + (3,)))
        assert distances.shape == (TINY_VIT["depth"], TINY_VIT["num_heads"])


def _one_line(error):
    message = str(error.value)
    assert "\n" not in message, message
    return message


@multibackend
def test_sizes_that_are_not_whole_patches_fail_in_one_line(dynamic_models):
    # A model of any size, called eagerly: the hybrid takes multiples of 16 (4 x 4-pixel stride).
    with pytest.raises(ValueError) as error:
        dynamic_models["hybrid"](images(1, (100, 64, 3)))
    message = _one_line(error)
    assert "100x64" in message and "multiple of 16 (16, 32, 48, 64, ...)" in message
    # At build time.
    with pytest.raises(ValueError) as error:
        vit16((100, None, 3))
    assert "100 is not a multiple of 16" in _one_line(error)
    with pytest.raises(ValueError) as error:
        keras_vit.visualize.attention_rollout_maps(dynamic_models["vit"], images(1, (40, 32, 3)))
    assert "40x32" in _one_line(error)


@multibackend
@pytest.mark.parametrize("size", [(32, 0), (0, 32), (8, 32), (32, 8)], ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("architecture", list(BUILDERS))
def test_an_image_smaller_than_a_token_gets_no_answer(dynamic_models, architecture, size):
    """No token, no classification: an image smaller than a token is refused,
    not answered from the class token alone, and in keras_vit's line, before
    the patch embedding's or the stem's convolution refuses it in the
    backend's words."""
    with pytest.raises(ValueError) as error:
        dynamic_models[architecture](images(1, size + (3,)))
    assert f"Input size {size[0]}x{size[1]} does not cut into whole patches" in _one_line(error)


def test_unknown_size_in_a_graph_is_checked_at_run_time(dynamic_models):
    """model.predict traces again for open sizes: the graph checks the size."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("JAX and torch always know the size while tracing (checked in Python)")
    import tensorflow as tf

    model = dynamic_models["vit"]
    run = tf.function(lambda x: model(x), input_signature=[tf.TensorSpec((None, None, None, 3))])
    assert tuple(run(images(1, (32, 48, 3))).shape) == (1, 5)
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"Input size 40x48 does not cut into whole patches"):
        run(images(1, (40, 48, 3)))
    for empty in ((0, 0, 3), (0, 48, 3), (4, 48, 3)):  # no whole token: no answer either
        with pytest.raises(tf.errors.InvalidArgumentError, match=rf"Input size {empty[0]}x{empty[1]} does not cut"):
            run(images(1, empty))


# --- native-resolution serving ----------------------------------------------

FRESH_PROCESS = textwrap.dedent(
    """
    import sys
    import numpy as np
    sys.modules["keras"] = None  # the export must not need keras or keras_vit
    sys.modules["keras_vit"] = None
    import tensorflow as tf

    inputs = dict(np.load(sys.argv[2]))
    signatures = tf.saved_model.load(sys.argv[1]).signatures
    out = {}
    for key in ("small", "wide"):
        out["pixels_" + key] = signatures["serve_pixels"](images=tf.constant(inputs[key]))["probabilities"].numpy()
    encoded = [tf.io.encode_png(inputs[key][0]).numpy() for key in ("small", "wide")]
    out["bytes"] = signatures["serving_default"](images=tf.constant(encoded))["probabilities"].numpy()
    np.savez(sys.argv[3], **out)
    """
)


def test_native_resolution_export_served_in_a_fresh_process(tmp_path):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TF Serving export is TensorFlow")
    model = vit16(ANY, classifier_activation="softmax")
    randomize_head(model)
    version_dir = keras_vit.export_for_serving(model, str(tmp_path / "export"), any_size=True)
    rng = np.random.default_rng(0)
    inputs = {"small": rng.integers(0, 256, (2, 64, 96, 3)).astype("uint8"),
              "wide": rng.integers(0, 256, (2, 48, 160, 3)).astype("uint8")}
    np.savez(tmp_path / "inputs.npz", **inputs)
    script = tmp_path / "serve.py"
    script.write_text(FRESH_PROCESS)
    completed = subprocess.run([sys.executable, str(script), version_dir, str(tmp_path / "inputs.npz"),
                                str(tmp_path / "out.npz")], capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    out = np.load(tmp_path / "out.npz")
    for key in ("small", "wide"):  # each batch at its own size: what the model gives at that size
        expected = model.predict(inputs[key].astype("float32"), verbose=0)
        np.testing.assert_allclose(out["pixels_" + key], expected, atol=TOLERANCE, rtol=0)
    expected = [model.predict(inputs[key][:1].astype("float32"), verbose=0)[0] for key in ("small", "wide")]
    np.testing.assert_allclose(out["bytes"], np.stack(expected), atol=TOLERANCE, rtol=0)


def test_native_resolution_rounds_to_whole_patches_and_default_export_refuses(tmp_path):
    """serve_pixels and serving_default resize what is not whole patches to the nearest whole patches."""
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TF Serving export is TensorFlow")
    import tensorflow as tf

    model = vit16(ANY, classifier_activation="softmax")
    randomize_head(model)
    with pytest.raises(ValueError, match="pass any_size=True"):
        keras_vit.export_for_serving(model, str(tmp_path / "default"))
    with pytest.raises(ValueError, match=r"input_shape=\(None, None, 3\)"):
        keras_vit.export_for_serving(vit16((64, 64, 3)), str(tmp_path / "fixed"), any_size=True)
    served = tf.saved_model.load(keras_vit.export_for_serving(model, str(tmp_path / "any"), any_size=True))

    def at_nearest_whole_patches(pixels):
        """The model's probabilities for `pixels` (H, W, 3) resized (bilinear) to
        the nearest multiples of 16 (at least 16), found here by search."""
        size = [min(range(16, 4 * side + 16, 16), key=lambda s: abs(s - side)) for side in pixels.shape[:2]]
        resized = tf.image.resize(pixels[None].astype("float32"), size, method="bilinear").numpy()
        return model.predict(resized, verbose=0)[0]

    rng = np.random.default_rng(1)
    pixels = rng.integers(0, 256, (1, 57, 90, 3)).astype("uint8")  # -> 64x96
    got = served.signatures["serve_pixels"](images=tf.constant(pixels))["probabilities"].numpy()
    np.testing.assert_allclose(got[0], at_nearest_whole_patches(pixels[0]), atol=TOLERANCE, rtol=0)
    # serving_default: encoded files, each at its own size, none of them whole patches:
    # 57x90 -> 64x96 (up), 70x41 -> 64x48 (down), 7x9 -> 16x16 (at least one patch).
    files = [rng.integers(0, 256, shape + (3,)).astype("uint8") for shape in [(57, 90), (70, 41), (7, 9)]]
    encoded = [tf.io.encode_png(image).numpy() for image in files]
    got = served.signatures["serving_default"](images=tf.constant(encoded))["probabilities"].numpy()
    np.testing.assert_allclose(got, np.stack([at_nearest_whole_patches(image) for image in files]),
                               atol=TOLERANCE, rtol=0)


def test_cli_export_any_size(tmp_path, capsys):
    if keras.backend.backend() != "tensorflow":
        pytest.skip("TF Serving export is TensorFlow")
    from keras_vit import cli

    model = vit16(ANY, classifier_activation="softmax")
    path = str(tmp_path / "any.keras")
    model.save(path)
    assert cli.main(["export", path, str(tmp_path / "export"), "--any-size"]) == 0
    assert "any size" in capsys.readouterr().out
    assert cli.main(["export", path, str(tmp_path / "export2")]) == 2
    assert "--any-size" in capsys.readouterr().err


# --- keras.applications habits ----------------------------------------------


@multibackend
def test_decode_predictions_on_a_known_head():
    """A head with zero kernel and a chosen bias: every image gets softmax(bias)."""
    model = keras_vit.ViT(**TINY_VIT, input_shape=(32, 32, 3), classes=1000)
    bias = np.zeros(1000, "float32")
    bias[[207, 3, 948]] = [5.0, 4.0, 3.0]
    model.get_layer("predictions").bias.assign(bias)
    preds = model.predict(images(2), verbose=0)
    decoded = keras_vit.decode_predictions(preds, top=3)
    names = labels.load_labels("imagenet1k")
    assert [[entry[0] for entry in row] for row in decoded] == [[207, 3, 948]] * 2
    assert decoded[0][0][1] == names[207] and names[207].startswith("golden retriever")
    np.testing.assert_allclose([score for _, _, score in decoded[0]], preds[0, [207, 3, 948]], rtol=1e-6)
    in21k = np.zeros((1, 21843), "float32")
    in21k[0, 12] = 1.0
    assert keras_vit.decode_predictions(in21k, top=1) == [[(12, labels.load_labels("imagenet21k")[12], 1.0)]]
    with pytest.raises(ValueError, match="not of 5"):
        keras_vit.decode_predictions(np.zeros((1, 5)))


@multibackend
def test_preprocess_input_is_the_models_own_scaling():
    assert keras_vit.preprocess_inputs is keras_vit.preprocess_input
    with_scaling = keras_vit.ViT(**TINY_VIT, input_shape=(32, 32, 3), classes=5)
    randomize_head(with_scaling)
    without = keras_vit.ViT(**TINY_VIT, input_shape=(32, 32, 3), classes=5, include_preprocessing=False)
    without.set_weights(with_scaling.get_weights())
    x = images(2)
    np.testing.assert_allclose(logits(without, keras_vit.preprocess_input(x)), logits(with_scaling, x), atol=1e-6)
    rescaling = with_scaling.get_layer("rescaling")
    np.testing.assert_allclose(keras_vit.preprocess_input(x), keras.ops.convert_to_numpy(rescaling(x)), atol=1e-6)
    # keras.applications' convention: numpy in, numpy out; a tensor in, a tensor out.
    pixels = np.full((1, 2, 2, 3), 255, "uint8")
    assert isinstance(keras_vit.preprocess_input(pixels), np.ndarray)
    np.testing.assert_array_equal(keras_vit.preprocess_input(pixels), np.ones((1, 2, 2, 3), "float32"))
    assert keras.ops.is_tensor(keras_vit.preprocess_input(keras.ops.convert_to_tensor(x)))


@multibackend
def test_pooling_avg_is_gap():
    avg = keras_vit.ViT(**TINY_VIT, input_shape=(32, 32, 3), include_top=False, pooling="avg")
    assert avg.get_layer("pool").mode == "gap"


# --- timm names --------------------------------------------------------------


def test_timm_names_resolve_to_the_entry_of_the_same_file():
    names = registry.timm_names()
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in names
    files = {entry.file for entry in registry.registry()}
    for name, entry in names.items():
        assert entry.file in files
        assert registry.find_checkpoint(name) == entry
        assert registry.find_checkpoint(name, entry.architecture) == entry
        tag = name.split(".", 1)[1]
        same_tag = [n for n, e in names.items() if e.architecture == entry.architecture and n.endswith("." + tag)]
        if len(same_tag) == 1:
            assert registry.find_checkpoint(tag, entry.architecture) == entry
        else:  # 224 and 384 files under one tag: the full name is required
            with pytest.raises(ValueError, match="pass the full timm name"):
                registry.find_checkpoint(tag, entry.architecture)


def test_timm_table_agrees_with_timm():
    """Where timm's cfg names the official file by its URL, it is the entry's file."""
    timm = pytest.importorskip("timm")
    checked = 0
    for name, entry in registry.timm_names().items():
        url = timm.models.get_pretrained_cfg(name).url or ""
        if "storage.googleapis.com/vit_models/" in url:
            assert url.endswith("/" + entry.file), name
            checked += 1
        else:  # timm's converted copy of an original-paper file: same model and resolution
            assert "augreg" not in entry.file and "augreg" not in name, name
    assert checked >= 15


def test_timm_tag_as_weights_and_from_name(monkeypatch):
    loaded = []
    monkeypatch.setattr(keras_vit.pretrained, "load_registered",
                        lambda model, entry, **options: loaded.append(entry))
    model = keras_vit.ViT_S32(weights="augreg_in21k_ft_in1k")
    assert loaded[-1].file == registry.timm_names()["vit_small_patch32_224.augreg_in21k_ft_in1k"].file
    assert loaded[-1].file.endswith("--imagenet2012-steps_20k-lr_0.03-res_224.npz")
    assert model.output_shape == (None, 1000)
    with pytest.raises(ValueError) as error:  # Ti/16 has a 224 and a 384 file under this tag
        keras_vit.ViT_Ti16(weights="augreg_in21k_ft_in1k")
    assert "vit_tiny_patch16_384.augreg_in21k_ft_in1k" in _one_line(error)
    model = keras_vit.from_name("vit_tiny_patch16_384.augreg_in21k_ft_in1k")
    assert loaded[-1].file.endswith("res_384.npz") and model.input_shape == (None, 384, 384, 3)
    with pytest.raises(ValueError) as error:
        keras_vit.from_name("vit_base_patch16_384.augreg_in21k_ft_in1k")  # a file we do not register
    message = _one_line(error)
    assert "vit_base_patch16_224.augreg_in21k_ft_in1k" in message and "in21k+in1k" in message
    with pytest.raises(ValueError) as error:
        keras_vit.ViT_B16(weights="augreg2_in21k_ft_in1k", include_top=False)
    assert "augreg_in21k+in1k" in _one_line(error)


def test_cli_predict_feeds_a_model_of_any_size_at_its_stored_resolution(tmp_path, capsys):
    import tensorflow as tf
    from PIL import Image

    from keras_vit import cli

    model = keras_vit.ViT(**TINY_VIT, input_shape=(None, None, 3), classes=5)
    randomize_head(model)
    path = str(tmp_path / "any.keras")
    model.save(path)
    image = str(tmp_path / "image.png")
    Image.fromarray(images(1, shape=(40, 56, 3))[0].astype("uint8")).save(image)
    assert cli.main(["predict", image, "--model", path, "--top", "1"]) == 0
    printed = capsys.readouterr().out
    side = model.get_layer("position_embedding").grid_size[0] * TINY_VIT["patch_size"]  # 224 px by default
    pixels = np.asarray(Image.open(image).convert("RGB"), dtype=np.float32)
    scores = model.predict(tf.image.resize(pixels[None], (side, side)).numpy(), verbose=0)[0]
    assert f"1. {scores.max():.4f}  class_{scores.argmax()}" in printed
