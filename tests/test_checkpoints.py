"""The checkpoint registry and the strict `.npz` -> model conversion (tiny models).

Numerical agreement with an independent implementation is in
test_parity_timm.py; downloads and the cache are in test_download.py.
"""

import json
import os
import re

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit import cli, npz, pretrained, registry
from keras_vit.testing import official_arrays, resized_posemb_zoom, write_checkpoint

TINY = dict(patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64)


def tiny_arrays(image_size=32, classes=5, representation_size=None, seed=0, **overrides):
    config = dict(TINY, **overrides)
    return dict(official_arrays(**config, image_size=image_size, classes=classes,
                                representation_size=representation_size, seed=seed))


def tiny_model(weights, **kwargs):
    config = dict(TINY, include_preprocessing=False, classifier_activation=None)
    config.update(kwargs)
    return keras_vit.ViT(**config, weights=weights)


def images(shape=(32, 32), batch=2, seed=1):
    return np.random.default_rng(seed).uniform(-1, 1, (batch,) + tuple(shape) + (3,)).astype("float32")


def value(variable):
    return keras.ops.convert_to_numpy(variable)


def weight(model, path):
    return value(next(w for w in model.weights if w.path == path))


def one_line_error(excinfo):
    message = str(excinfo.value)
    assert "\n" not in message, message
    return message


@pytest.fixture
def tiny_ckpt(tmp_path):
    arrays = tiny_arrays()
    return write_checkpoint(tmp_path / "tiny.npz", arrays), arrays


# ---------------------------------------------------------------------------
# Registry
# ---------------------------------------------------------------------------

FAMILIES = {  # tag -> (classes, resolution); "-224" tags are 224 px, the others as listed
    "in21k": (21843, 224),
    "in21k+in1k": (1000, 384),
    "in21k+in1k-224": (1000, 224),
    "augreg_in21k": (21843, 224),
    "augreg_in21k+in1k": (1000, 384),
    "augreg_in21k+in1k-224": (1000, 224),
}


def test_registry_rows_are_consistent():
    entries = registry.registry()
    raw = json.loads((__import__("importlib").resources.files("keras_vit.assets") / "checkpoints.json").read_text())
    assert len(entries) == len(raw["checkpoints"]) >= 40
    assert raw["base_url"] == keras_vit.download.OFFICIAL_BASE_URL
    files = [e.file for e in entries]
    assert len(set(files)) == len(files), "a file is listed twice"
    names = [(e.architecture, name) for e in entries for name in e.short_names()]
    assert len(set(names)) == len(names), "a tag or alias names two files of one architecture"
    for e in entries:
        assert e.architecture in keras_vit.models.CONSTRUCTORS, e
        assert e.tag in FAMILIES, e
        assert (e.classes, e.resolution) == FAMILIES[e.tag], e
        assert e.labels == {21843: "imagenet21k", 1000: "imagenet1k"}[e.classes]
        assert e.file.endswith(".npz") and not e.file.startswith(("/", "http"))
        assert e.file.startswith("augreg/") == e.tag.startswith("augreg_")
        if e.file.startswith("augreg/"):
            assert f"res_{e.resolution}" in e.file or e.tag == "augreg_in21k"
        hidden = keras_vit.models.CONSTRUCTORS[e.architecture].config["hidden_size"]
        assert e.pre_logits in (None, hidden), "a pre_logits layer is as wide as the encoder"
        assert e.pre_logits is None or e.tag == "in21k", "only the original in21k files carry one"
        assert e.sha256 is None or re.fullmatch(r"[0-9a-f]{64}", e.sha256)
        assert (e.imagenet_top1 is None) == (e.accuracy_source is None)
        assert e.imagenet_top1 is None or (e.classes == 1000 and 70 < e.imagenet_top1 < 90)


def test_registry_has_every_file_the_issue_asks_for():
    have = {(e.architecture, e.tag) for e in registry.registry()}
    wanted = {(f"ViT_{m}", "in21k") for m in ("B16", "B32", "L16", "L32", "H14")}
    wanted |= {(f"ViT_{m}", "in21k+in1k") for m in ("B16", "B32", "L16", "L32")}
    wanted |= {(f"ViT_{m}", "in21k+in1k-224") for m in ("B16", "L16")}
    augreg = ("Ti16", "S16", "S32", "B16", "B32", "B8", "L16")
    wanted |= {(f"ViT_{m}", tag) for m in augreg for tag in ("augreg_in21k", "augreg_in21k+in1k-224")}
    wanted |= {(f"ViT_{m}", "augreg_in21k+in1k") for m in augreg if m != "B8"}  # no B/8 384 file is published
    assert wanted <= have, sorted(wanted - have)


def test_find_checkpoint_by_tag_alias_and_official_name():
    entry = registry.find_checkpoint("in21k+in1k", "ViT_B16")
    assert entry.file == "imagenet21k+imagenet2012/ViT-B_16.npz" and entry.resolution == 384
    assert registry.find_checkpoint("in21k+in1k-384", "ViT_B16") is entry
    for name in ("imagenet21k+imagenet2012/ViT-B_16", "imagenet21k+imagenet2012/ViT-B_16.npz",
                 "https://storage.googleapis.com/vit_models/imagenet21k%2Bimagenet2012/ViT-B_16.npz",
                 "gs://vit_models/imagenet21k+imagenet2012/ViT-B_16.npz"):
        assert registry.find_checkpoint(name, "ViT_B16") is entry, name
        assert registry.find_checkpoint(name) is entry  # long names need no architecture
    augreg = registry.find_checkpoint("augreg_in21k", "ViT_Ti16")
    assert registry.find_checkpoint(os.path.basename(augreg.file), "ViT_Ti16") is augreg
    assert registry.find_checkpoint("no-such-checkpoint", "ViT_B16") is None


def test_find_checkpoint_errors_name_the_fix():
    with pytest.raises(ValueError) as excinfo:
        registry.find_checkpoint("imagenet21k/ViT-L_16", "ViT_B16")
    assert "ViT_L16" in one_line_error(excinfo)
    with pytest.raises(ValueError) as excinfo:
        registry.find_checkpoint("augreg_in21k", "ViT_H14")
    assert "in21k" in one_line_error(excinfo) and "list_weights" in str(excinfo.value)
    with pytest.raises(ValueError, match="constructor"):
        registry.find_checkpoint("in21k", None)
    with pytest.raises(ValueError, match="ViT_L16"):
        keras_vit.ViT_B16(weights="imagenet21k/ViT-L_16")  # before anything is built or fetched


def test_list_weights_prints_and_returns_the_table(capsys):
    table = keras_vit.list_weights()
    assert capsys.readouterr().out.strip() == table
    lines = table.splitlines()
    assert lines[0].split()[:6] == ["architecture", "tag", "resolution", "classes", "pre_logits", "ImageNet"]
    for entry in registry.registry():
        assert any(entry.file in line and entry.tag in line for line in lines), entry
    b16 = next(line for line in lines if "imagenet21k/ViT-B_16.npz" in line)
    assert "21,843" in b16 and " 768 " in b16
    only_b16 = keras_vit.list_weights(print_table=False, architecture="ViT_B16")
    assert capsys.readouterr().out == ""
    assert "ViT_L16" not in only_b16 and "in21k+in1k-224" in only_b16
    markdown = keras_vit.list_weights(print_table=False, markdown=True)
    assert markdown.startswith("| architecture | tag |") and "| `in21k` |" in markdown


def test_list_weights_takes_the_architecture_first(capsys):
    # As timm's list_models takes its filter: list_weights("ViT_B16") once
    # printed the whole registry (the name was taken for print_table).
    only_b16 = keras_vit.list_weights("ViT_B16")
    assert capsys.readouterr().out.strip() == only_b16.strip()
    assert only_b16 == keras_vit.list_weights(architecture="ViT_B16", print_table=False)
    assert "ViT_L16" not in only_b16 and "in21k+in1k-224" in only_b16
    with pytest.raises(ValueError, match=re.escape("No checkpoints for 'ViT_X'; see keras_vit.list_weights().")):
        keras_vit.list_weights("ViT_X")
    with pytest.raises(TypeError, match=re.escape("architecture must be a constructor name such as 'ViT_B16', got False.")):
        keras_vit.list_weights(False)  # the old order's print_table


def test_an_accuracy_marker_names_the_same_source_in_every_table():
    """[n] is fixed by the registry, not by the rows a table happens to show
    (one architecture's table once renumbered its sources from [1])."""
    full = keras_vit.list_weights(print_table=False)
    for architecture in ("ViT_Ti16", "ViT_B16", "R50_ViT_L32"):
        part = keras_vit.list_weights(print_table=False, architecture=architecture)
        for line in part.splitlines():
            marker = re.search(r"\d\.\d\d \[\d\]", line)
            if marker:
                file = line.split()[-1]
                assert marker.group(0) in next(row for row in full.splitlines() if row.endswith(file))
        notes = [line for line in part.splitlines() if line.startswith("[")]
        assert notes and all(note in full.splitlines() for note in notes)


def test_cli_lists_the_checkpoints(capsys):
    assert cli.main(["list", "weights"]) == 0
    assert capsys.readouterr().out.strip() == keras_vit.list_weights(print_table=False)


# ---------------------------------------------------------------------------
# Loading: layouts, strictness and its explicit exceptions
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("layout", ["plain", "opt_target", "big_vision"])
def test_every_layout_loads_every_array(layout, tmp_path):
    arrays = tiny_arrays()
    plain = tiny_model(write_checkpoint(tmp_path / "plain.npz", arrays))
    model = tiny_model(write_checkpoint(tmp_path / f"{layout}.npz", arrays, layout))
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 5)
    np.testing.assert_array_equal(weight(model, "block_01/attention/query/kernel"),
                                  arrays["Transformer/encoderblock_1/MultiHeadDotProductAttention_1/query/kernel"])
    np.testing.assert_array_equal(weight(model, "block_00/mlp_out/kernel"),
                                  arrays["Transformer/encoderblock_0/MlpBlock_3/Dense_1/kernel"])
    np.testing.assert_array_equal(value(model.get_layer("predictions").bias), arrays["head/bias"])
    # big_vision folds the class-token posemb into `cls`: the same function, exactly
    np.testing.assert_allclose(model(images()), plain(images()), atol=1e-6)


def test_loaded_model_matches_a_numpy_forward_pass(tiny_ckpt):
    path, a = tiny_ckpt
    model = tiny_model(path)
    x = images()

    def norm(v, name):
        mean, var = v.mean(-1, keepdims=True), v.var(-1, keepdims=True)
        return (v - mean) / np.sqrt(var + 1e-6) * a[f"{name}/scale"] + a[f"{name}/bias"]

    def gelu(v):
        return 0.5 * v * (1 + np.tanh(np.sqrt(2 / np.pi) * (v + 0.044715 * v**3)))

    patches = x.reshape(2, 4, 8, 4, 8, 3).transpose(0, 1, 3, 2, 4, 5).reshape(2, 16, 8 * 8 * 3)
    tokens = patches @ a["embedding/kernel"].reshape(-1, 32) + a["embedding/bias"]
    tokens = np.concatenate([np.broadcast_to(a["cls"], (2, 1, 32)), tokens], 1)
    tokens = tokens + a["Transformer/posembed_input/pos_embedding"]
    for i in range(2):
        b = f"Transformer/encoderblock_{i}"
        att = f"{b}/MultiHeadDotProductAttention_1"
        y = norm(tokens, f"{b}/LayerNorm_0")
        q, k, v = (np.einsum("btd,dhk->bhtk", y, a[f"{att}/{n}/kernel"]) + a[f"{att}/{n}/bias"][:, None]
                   for n in ("query", "key", "value"))
        logits = q @ k.transpose(0, 1, 3, 2) / np.sqrt(8)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        tokens = tokens + np.einsum("bhtk,hkd->btd", probs @ v, a[f"{att}/out/kernel"]) + a[f"{att}/out/bias"]
        y = norm(tokens, f"{b}/LayerNorm_2")
        y = gelu(y @ a[f"{b}/MlpBlock_3/Dense_0/kernel"] + a[f"{b}/MlpBlock_3/Dense_0/bias"])
        tokens = tokens + y @ a[f"{b}/MlpBlock_3/Dense_1/kernel"] + a[f"{b}/MlpBlock_3/Dense_1/bias"]
    pooled = norm(tokens, "Transformer/encoder_norm")[:, 0]
    expected = pooled @ a["head/kernel"] + a["head/bias"]
    np.testing.assert_allclose(model(x), expected, atol=1e-4)


@pytest.mark.multibackend
@pytest.mark.parametrize("size", [32, 48])
def test_official_weights_load_into_a_bfloat16_model_rounded_once(tiny_ckpt, size):
    """dtype="bfloat16" (inference): the same strict load, each array (the
    resized position embedding too) rounded to bf16 once; the head float32."""
    path, _ = tiny_ckpt
    full = tiny_model(path, input_shape=(size, size, 3))
    half = tiny_model(path, input_shape=(size, size, 3), dtype="bfloat16")
    assert [w.path for w in half.weights] == [w.path for w in full.weights]
    for w32, w16 in zip(full.weights, half.weights):
        assert w16.dtype == ("float32" if w16.path.startswith("predictions/") else "bfloat16"), w16.path
        stored = keras.ops.convert_to_numpy(keras.ops.cast(keras.ops.cast(w32, w16.dtype), "float32"))
        np.testing.assert_array_equal(value(w16).astype("float32"), stored, err_msg=w16.path)


def test_unused_checkpoint_array_is_an_error(tmp_path):
    arrays = dict(tiny_arrays(), **{"Transformer/extra/kernel": np.zeros((3, 7), "float32")})
    with pytest.raises(ValueError) as excinfo:
        tiny_model(write_checkpoint(tmp_path / "extra.npz", arrays))
    assert "unused checkpoint arrays: Transformer/extra/kernel (3, 7)" in one_line_error(excinfo)


def test_missing_array_is_an_error(tmp_path):
    arrays = tiny_arrays()
    del arrays["Transformer/encoderblock_1/LayerNorm_2/scale"]
    with pytest.raises(ValueError) as excinfo:
        tiny_model(write_checkpoint(tmp_path / "missing.npz", arrays))
    message = one_line_error(excinfo)
    assert "missing from the checkpoint: Transformer/encoderblock_1/LayerNorm_2/scale" in message
    assert "block_01/norm2/gamma (32,)" in message


def test_shape_mismatch_names_both_shapes(tmp_path):
    arrays = dict(tiny_arrays(), **{"Transformer/encoderblock_1/LayerNorm_2/scale": np.ones(16, "float32")})
    with pytest.raises(ValueError) as excinfo:
        tiny_model(write_checkpoint(tmp_path / "odd.npz", arrays))
    message = one_line_error(excinfo)
    assert "Transformer/encoderblock_1/LayerNorm_2/scale (16,) vs block_01/norm2/gamma (32,)" in message


@pytest.mark.parametrize("change, difference", [
    (dict(depth=3), "depth 2 in the file vs 3 in the model"),
    (dict(mlp_dim=48), "MLP 64 in the file vs 48 in the model"),
    (dict(hidden_size=64, num_heads=8), "width 32 in the file vs 64 in the model; heads 4 in the file vs 8"),
    (dict(patch_size=16), "patch 8x8 in the file vs 16x16 in the model"),
])
def test_another_architecture_says_what_differs_and_what_to_build(tiny_ckpt, change, difference):
    """Not a list of every key and shape (thousands of characters): what differs, and the model to build."""
    model = keras_vit.ViT(**dict(TINY, **change), input_shape=(32, 32, 3), classes=5)
    with pytest.raises(ValueError) as excinfo:
        keras_vit.load_npz(model, tiny_ckpt[0])
    message = one_line_error(excinfo)
    assert difference in message and len(message) < 400, message
    assert message.endswith("build keras_vit.ViT(patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64).")


def test_an_official_architecture_is_named_with_its_command_line_flag(tmp_path):
    arrays = official_arrays(**keras_vit.VARIANTS["Ti/16"], image_size=32, classes=5)
    model = keras_vit.ViT_S16(input_shape=(32, 32, 3), classes=5)
    with pytest.raises(ValueError) as excinfo:
        keras_vit.load_npz(model, write_checkpoint(tmp_path / "ti16.npz", arrays))
    message = one_line_error(excinfo)
    assert "width 192 in the file vs 384 in the model" in message and "depth" not in message
    assert "the weights are ViT_Ti16's" in message and "--model ViT_Ti16" in message


def test_another_class_count_gets_a_zero_head_on_the_pretrained_body(tiny_ckpt):
    path, arrays = tiny_ckpt
    model = tiny_model(path, classes=7)
    head = model.get_layer("predictions")
    assert model.output_shape == (None, 7)
    assert not value(head.kernel).any() and not value(head.bias).any()
    np.testing.assert_array_equal(value(model.get_layer("encoder_norm").gamma), arrays["Transformer/encoder_norm/scale"])
    # the same head size loads the head itself
    np.testing.assert_array_equal(value(tiny_model(path).get_layer("predictions").kernel), arrays["head/kernel"])


def test_load_npz_on_a_built_model_asks_before_replacing_the_head(tiny_ckpt):
    model = keras_vit.ViT(**TINY, input_shape=(32, 32, 3), classes=7)
    with pytest.raises(ValueError) as excinfo:
        keras_vit.load_npz(model, tiny_ckpt[0])
    message = one_line_error(excinfo)
    assert "head/kernel (32, 5) vs predictions/kernel (32, 7)" in message and "classes" in message
    keras_vit.load_npz(model, tiny_ckpt[0], new_head=True)
    assert not value(model.get_layer("predictions").kernel).any()


def test_classes_and_resolution_default_to_the_checkpoints(tmp_path):
    path = write_checkpoint(tmp_path / "res48.npz", tiny_arrays(image_size=48, classes=9))
    model = keras_vit.ViT(**TINY, weights=path)
    assert model.input_shape == (None, 48, 48, 3) and model.output_shape == (None, 9)


def test_position_embedding_is_resized_for_a_non_square_input(tiny_ckpt):
    path, arrays = tiny_ckpt
    model = tiny_model(path, input_shape=(48, 64, 3))
    posemb = value(model.get_layer("position_embedding").embedding)
    stored = arrays["Transformer/posembed_input/pos_embedding"]
    assert posemb.shape == (1, 1 + 6 * 8, 32)
    np.testing.assert_allclose(posemb, resized_posemb_zoom(stored, (6, 8)), atol=1e-6)  # official zoom
    np.testing.assert_array_equal(posemb[:, 0], stored[:, 0])  # class-token entry untouched
    bicubic = tiny_model(path, input_shape=(48, 64, 3), posemb_interpolation="bicubic")
    assert not np.allclose(value(bicubic.get_layer("position_embedding").embedding), posemb)


@pytest.fixture
def pre_logits_ckpt(tmp_path):
    arrays = tiny_arrays(classes=11, representation_size=32)
    return write_checkpoint(tmp_path / "pre_logits.npz", arrays), arrays


def test_pre_logits_kept_with_the_checkpoints_head(pre_logits_ckpt):
    path, arrays = pre_logits_ckpt
    model = tiny_model(path)
    np.testing.assert_array_equal(value(model.get_layer("pre_logits").kernel), arrays["pre_logits/kernel"])
    np.testing.assert_array_equal(value(model.get_layer("predictions").kernel), arrays["head/kernel"])


def test_pre_logits_dropped_with_a_new_head_unless_asked(pre_logits_ckpt):
    path, arrays = pre_logits_ckpt
    names = {layer.name for layer in tiny_model(path, classes=3).layers}
    assert "pre_logits" not in names  # official fine-tuning: drop-head variant
    kept = tiny_model(path, classes=3, keep_pre_logits=True)
    np.testing.assert_array_equal(value(kept.get_layer("pre_logits").bias), arrays["pre_logits/bias"])
    assert not value(kept.get_layer("predictions").kernel).any()
    dropped = tiny_model(path, keep_pre_logits=False)
    assert "pre_logits" not in {layer.name for layer in dropped.layers}
    np.testing.assert_array_equal(value(dropped.get_layer("predictions").kernel), arrays["head/kernel"])


def test_pre_logits_misuse_is_an_error(pre_logits_ckpt, tiny_ckpt, tmp_path):
    with pytest.raises(ValueError, match="no pre_logits layer") as excinfo:
        tiny_model(tiny_ckpt[0], keep_pre_logits=True)
    one_line_error(excinfo)
    with pytest.raises(ValueError, match="representation_size=16"):
        tiny_model(pre_logits_ckpt[0], representation_size=16)
    with pytest.raises(ValueError, match="include_top"):
        tiny_model(pre_logits_ckpt[0], include_top=False, keep_pre_logits=True)
    with pytest.raises(ValueError, match="only apply to official checkpoints"):
        tiny_model(None, keep_pre_logits=True, input_shape=(32, 32, 3))
    model = keras_vit.ViT(**TINY, input_shape=(32, 32, 3), classes=11)
    with pytest.raises(ValueError) as excinfo:
        keras_vit.load_npz(model, pre_logits_ckpt[0])
    assert "pre_logits/kernel (32, 32)" in one_line_error(excinfo) and "drop_pre_logits" in str(excinfo.value)
    keras_vit.load_npz(model, pre_logits_ckpt[0], drop_pre_logits=True)
    # The checkpoint's own head on the encoder's tokens needs pre_logits as wide as the encoder.
    narrow = write_checkpoint(tmp_path / "narrow.npz", tiny_arrays(classes=7, representation_size=16))
    with pytest.raises(ValueError) as excinfo:
        tiny_model(narrow, keep_pre_logits=False)
    assert "head takes the features of its pre_logits layer, which is dropped here" in one_line_error(excinfo)
    assert "for another class count" not in str(excinfo.value)


def test_without_top_the_body_alone_is_loaded(pre_logits_ckpt):
    path, arrays = pre_logits_ckpt
    model = tiny_model(path, include_top=False, pooling="token")
    assert model.output_shape == (None, 32)
    np.testing.assert_array_equal(weight(model, "block_01/norm2/beta"),
                                  arrays["Transformer/encoderblock_1/LayerNorm_2/bias"])


def test_truncated_local_file_is_a_one_line_error_and_stays(tiny_ckpt, tmp_path):
    data = open(tiny_ckpt[0], "rb").read()
    bad = tmp_path / "truncated.npz"
    bad.write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError) as excinfo:
        tiny_model(str(bad))
    message = one_line_error(excinfo)
    assert str(bad) in message and "truncated or corrupt" in message
    assert bad.exists(), "a user's own file is never deleted"


def test_corrupt_member_is_reported_with_the_file_name(tiny_ckpt, tmp_path):
    data = bytearray(open(tiny_ckpt[0], "rb").read())
    middle = len(data) // 2
    data[middle: middle + 64] = bytes(64)  # same size, bad CRC in some member
    bad = tmp_path / "corrupt.npz"
    bad.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="corrupt.npz") as excinfo:
        tiny_model(str(bad))
    one_line_error(excinfo)


def test_pickled_arrays_are_refused(tmp_path):
    path = tmp_path / "pickled.npz"
    np.savez(path, **{"embedding/kernel": np.array([{"a": 1}], dtype=object)})
    with pytest.raises(ValueError, match="pickled.npz"):
        tiny_model(str(path))


def test_expected_sha256_of_a_local_file(tiny_ckpt):
    path = tiny_ckpt[0]
    good = keras_vit.download.sha256_of(path)
    tiny_model(path, expected_sha256=good)
    with pytest.raises(ValueError, match="expected") as excinfo:
        tiny_model(path, expected_sha256="0" * 64)
    one_line_error(excinfo)


def test_unknown_weights_and_missing_files(tmp_path):
    with pytest.raises(FileNotFoundError, match="nothing.npz"):
        tiny_model(str(tmp_path / "nothing.npz"))
    with pytest.raises(ValueError, match="in21k") as excinfo:
        keras_vit.ViT_B16(weights="in22k")
    one_line_error(excinfo)


def test_hybrid_stem_weights_come_from_the_hook(tmp_path):
    from keras_vit import hybrid

    build = lambda weights: keras_vit.ViT(  # noqa: E731
        **dict(TINY, patch_size=1), stem=hybrid.stem_builder((1,), 0.5), input_shape=(32, 32, 3),
        classes=5, weights=weights)
    model = build(None)
    rng = np.random.default_rng(3)
    stem = {}
    for key, variable in npz.stem_weight_map(model).items():
        shape = tuple(variable.shape)
        if re.search(r"gn(\d+|_root|_proj)/(scale|bias)$", key):
            shape = (1, 1, 1) + shape  # as old Flax GroupNorm files stored them
        stem[key] = rng.normal(0, 0.1, shape).astype("float32")
    channels = model.get_layer("patch_embed").projection.kernel.shape[2]
    arrays = dict(official_arrays(**dict(TINY, patch_size=1), grid_size=(8, 8), classes=5,
                                  in_channels=channels, extra=stem))
    loaded = build(write_checkpoint(tmp_path / "hybrid.npz", arrays))
    mapping = npz.stem_weight_map(loaded)
    for key, array in stem.items():
        np.testing.assert_array_equal(value(mapping[key]), array.reshape(mapping[key].shape))
    del arrays["conv_root/kernel"]
    with pytest.raises(ValueError, match="resnet_stem/.*conv_root"):
        build(write_checkpoint(tmp_path / "no_root.npz", arrays))


# ---------------------------------------------------------------------------
# keras-vit convert
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def ti16_ckpt(tmp_path_factory):
    """A Ti/16 checkpoint for 64 px input: the real constructor, small and fast."""
    path = tmp_path_factory.mktemp("ti16") / "ti16.npz"
    return write_checkpoint(path, official_arrays(**keras_vit.VARIANTS["Ti/16"], image_size=64, classes=10))


def test_cli_convert_writes_a_model_and_weights(ti16_ckpt, tmp_path, capsys):
    expected = keras_vit.ViT_Ti16(weights=ti16_ckpt)
    x = np.random.default_rng(0).uniform(0, 255, (2, 64, 64, 3)).astype("float32")
    for suffix in (".keras", ".weights.h5"):
        out = str(tmp_path / f"converted{suffix}")
        assert cli.main(["convert", ti16_ckpt, out, "--model", "ViT_Ti16"]) == 0
        assert out in capsys.readouterr().out
        if suffix == ".keras":
            restored = keras.saving.load_model(out, safe_mode=True)
        else:
            restored = keras_vit.ViT_Ti16(input_shape=(64, 64, 3), classes=10)
            restored.load_weights(out)
        np.testing.assert_array_equal(restored(x), expected(x))


def test_cli_convert_options_and_errors(ti16_ckpt, tmp_path, capsys):
    out = str(tmp_path / "small.weights.h5")
    assert cli.main(["convert", ti16_ckpt, out, "--model", "ViT_Ti16", "--classes", "3",
                     "--image-size", "32", "48"]) == 0
    assert "(32, 48, 3)" in capsys.readouterr().out
    for argv, expected in [
        ([ti16_ckpt, str(tmp_path / "x.h5"), "--model", "ViT_Ti16"], ".keras or .weights.h5"),
        ([str(tmp_path / "missing.npz"), str(tmp_path / "x.keras"), "--model", "ViT_Ti16"], "missing.npz"),
        ([ti16_ckpt, str(tmp_path / "x.keras"), "--model", "ViT_Q16"], "ViT_Q16"),
        ([ti16_ckpt, str(tmp_path / "x.keras"), "--model", "ViT_S16"], "width 192 in the file vs 384 in the model"),
    ]:
        assert cli.main(["convert"] + argv) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and expected in err, err
    assert not os.path.exists(tmp_path / "x.keras"), "nothing is written when conversion fails"


def test_cli_convert_does_not_replace_an_output_unless_told(ti16_ckpt, tmp_path, capsys):
    """As `export`: an existing OUTPUT needs --overwrite; the new file replaces
    it whole (written beside it, then moved), leaving nothing else behind."""
    for name in ("model.keras", "model.weights.h5"):
        out = tmp_path / name
        out.write_bytes(b"an earlier model")
        assert cli.main(["convert", ti16_ckpt, str(out), "--model", "ViT_Ti16"]) == 2
        assert "already exists; pass --overwrite to replace it" in capsys.readouterr().err
        assert out.read_bytes() == b"an earlier model"
    assert cli.main(["convert", ti16_ckpt, str(tmp_path / "model.keras"), "--model", "ViT_Ti16", "--overwrite"]) == 0
    assert sorted(os.listdir(tmp_path)) == ["model.keras", "model.weights.h5"]
    keras.saving.load_model(str(tmp_path / "model.keras"), safe_mode=True)


def test_every_augreg_model_name_maps_to_the_constructor_of_its_size_and_patch():
    """An unregistered AugReg file's architecture comes from its model name
    ("S_32", "R26_S_32"): the constructor whose variant (variants.py) has that
    model size, patch size and, for a hybrid, ResNet stem."""
    from keras_vit import variants

    def expected_constructor(model):
        *stem, size, patch = model.split("_")
        matches = []
        for constructor, variant in variants.CONSTRUCTOR_VARIANTS.items():
            variant_stem = variant.rpartition("+")[0]
            row = variants.HYBRID_VARIANTS[variant]["transformer"] if variant_stem else variant
            if (variant_stem == "_".join(stem) and row.split("/")[0] == size
                    and variants.VARIANTS[row]["patch_size"] == int(patch)):
                matches.append(constructor)
        assert len(matches) == 1, (model, matches)
        return matches[0]

    for model in registry.AUGREG_ARCHITECTURES:
        for run in ("", "--cifar100-steps_2k-lr_0.003-res_224"):
            name = f"{model}-i21k-300ep-lr_0.001-aug_strong2-wd_0.03-do_0.1-sd_0.1{run}"  # no registered file's run
            assert all(name not in entry.long_names() for entry in registry.registry())
            entry = registry.augreg_checkpoint(name)
            assert entry is not None, name
            assert entry.architecture == expected_constructor(model), name
            assert registry.find_checkpoint(name, entry.architecture) == entry
