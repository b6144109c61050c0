"""The hybrid (ResNet + ViT) models: layers, constructors, sizes, official keys.

Every harness check (fit, .keras round trip, mixed precision, XLA, other and
non-square input sizes, attention maps, intermediate outputs, gradients) runs
for the tiny hybrid of harness.ARCHITECTURES from tests/test_models.py; the
parity with timm is tests/test_parity_hybrid.py.

Tests that compute with the layers are marked multibackend (run again on
JAX); shapes, official keys, the constructors, their table and the registry
do not depend on the backend and are tested once (tests/test_models.py builds
every constructor on both backends).
"""

import inspect
import math
import re

import keras
import numpy as np
import pytest

import harness
import keras_vit
from keras_vit import hybrid, npz
from keras_vit.models import CONSTRUCTORS, variant_config
from keras_vit.sizes import parameter_count
from keras_vit.testing import official_arrays, resnet_arrays, write_checkpoint

multibackend = pytest.mark.multibackend

HYBRIDS = {name: c for name, c in CONSTRUCTORS.items() if "block_sizes" in c.config}


def test_r50_vit_b16_parameter_count_and_grid():
    # The paper's R50+ViT-B/16 at 224 px with a 1000-class head (issue 4)
    model = keras_vit.R50_ViT_B16()
    assert model.count_params() == 98_659_112
    # "a downscaling of 2^(1 + 3)=16", vision_transformer configs/models.py
    assert model.get_layer("position_embedding").grid_size == (224 // 16, 224 // 16)


def test_hybrid_constructors_are_registered_with_the_pure_signature():
    assert set(HYBRIDS) == {"R50_ViT_B16", "R26_ViT_S32", "R50_ViT_L32", "R_ViT_Ti16"}
    pure = inspect.signature(keras_vit.ViT_B16).parameters
    for name, constructor in HYBRIDS.items():
        assert keras_vit.get_constructor(name) is constructor is getattr(keras_vit, name)
        parameters = inspect.signature(constructor).parameters
        assert list(parameters) == list(pure)
        assert [p.default for n, p in parameters.items() if n != "name"] == [
            p.default for n, p in pure.items() if n != "name"
        ]


def test_constructors_table_lists_the_hybrids(capsys):
    from keras_vit import cli

    assert cli.main(["list", "models"]) == 0
    lines = capsys.readouterr().out.splitlines()
    for name, constructor in HYBRIDS.items():
        (line,) = [line for line in lines if line.startswith(name + " ")]
        assert f"{parameter_count(**constructor.config):,}" in line
        assert str(constructor.config["block_sizes"]) in line


def test_hybrid_registry_entries_build():
    """Every registered hybrid checkpoint names a hybrid constructor, and its
    resolution is a whole number of tokens for it."""
    entries = [e for e in keras_vit.registry.registry() if e.architecture in HYBRIDS]
    assert {e.architecture for e in entries} == set(HYBRIDS)
    for entry in entries:
        config = HYBRIDS[entry.architecture].config
        pixels_per_token = hybrid.total_stride(config["block_sizes"]) * config["patch_size"]
        assert entry.resolution % pixels_per_token == 0, entry.file
        plan = keras_vit.pretrained.plan(entry.tag, architecture=entry.architecture)
        assert plan.input_shape == (entry.resolution, entry.resolution, 3)
        assert plan.classes == entry.classes


# --- the ResNet layers --------------------------------------------------------


@multibackend
def test_std_conv_uses_the_official_standardisation():
    """(w - mean) / (std + 1e-5) per output filter, as vision_transformer's StdConv;
    small kernels make the epsilon visible (timm's sqrt(var + 1e-8) would differ)."""
    rng = np.random.default_rng(0)
    kernel = rng.normal(0.3, 0.004, (3, 3, 4, 6)).astype("float32")
    x = rng.normal(0, 1, (2, 9, 9, 4)).astype("float32")
    conv = hybrid.StdConv2D(6, 3, strides=2)
    conv.build(x.shape)
    conv.kernel.assign(kernel)
    assert not conv.use_bias and conv.padding == "same"

    def plain_conv(standardised):
        reference = keras.layers.Conv2D(6, 3, strides=2, padding="same", use_bias=False)
        reference.build(x.shape)
        reference.kernel.assign(standardised.astype("float32"))
        return keras.ops.convert_to_numpy(reference(x))

    k = kernel.astype("float64")
    mean, std = k.mean(axis=(0, 1, 2)), k.std(axis=(0, 1, 2))
    ours = keras.ops.convert_to_numpy(conv(x))
    np.testing.assert_allclose(ours, plain_conv((k - mean) / (std + 1e-5)), rtol=1e-4, atol=1e-4)
    timm_style = plain_conv((k - mean) / np.sqrt(std**2 + 1e-8))
    assert np.max(np.abs(ours - timm_style)) > 1e-2
    # the stored kernel stays the raw one (as in the checkpoints)
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(conv.kernel), kernel)


@multibackend
def test_group_norms_are_flax_defaults():
    """32 groups, epsilon 1e-6 (flax.linen.GroupNorm, which the official model
    uses); an input of variance ~1e-6 makes the epsilon visible."""
    stem = hybrid.ResNetStem(())
    stem.build((None, 16, 16, 3))
    x = np.random.default_rng(0).normal(0.0, 1e-3, (2, 4, 4, 64))
    groups = x.reshape(2, 4, 4, 32, 2)
    mean, var = groups.mean(axis=(1, 2, 4), keepdims=True), groups.var(axis=(1, 2, 4), keepdims=True)
    expected = ((groups - mean) / np.sqrt(var + 1e-6)).reshape(x.shape)
    ours = keras.ops.convert_to_numpy(stem.gn_root(x.astype("float32")))
    np.testing.assert_allclose(ours, expected, atol=1e-4)
    assert np.max(np.abs(expected - ((groups - mean) / np.sqrt(var + 1e-5)).reshape(x.shape))) > 0.1


@multibackend
def test_bottleneck_unit_projection_and_identity_start():
    unit = hybrid.BottleneckUnit(32)
    unit.build((None, 8, 8, 128))  # 128 = 4 x 32 channels in, stride 1: no projection
    assert unit.conv_proj is None and len(unit.weights) == 9
    x = np.random.default_rng(0).uniform(0, 3, (2, 8, 8, 128)).astype("float32")
    # gn3's scale starts at zero (official): a fresh unit is relu(x + 0) = x for x >= 0
    np.testing.assert_allclose(keras.ops.convert_to_numpy(unit(x)), x, atol=1e-6)

    unit = hybrid.BottleneckUnit(32, strides=2)  # new width and stride: a projection shortcut
    out = unit(np.ones((1, 9, 9, 64), "float32"))
    assert unit.conv_proj is not None and len(unit.weights) == 12
    assert out.shape == (1, 5, 5, 128)  # SAME padding: ceil(9 / 2)


@pytest.mark.parametrize("block_sizes", [(), (2, 2, 2, 2), (3, 4, 9)])
@pytest.mark.parametrize("size", [(224, 224), (30, 47)])
def test_stem_output_shape_and_size_helpers(block_sizes, size):
    stem = hybrid.ResNetStem(block_sizes)
    out = stem(keras.Input((*size, 3)))
    channels = hybrid.output_channels(block_sizes)
    rows, cols = (hybrid.feature_map_side(block_sizes, s) for s in size)
    assert tuple(out.shape) == (None, rows, cols, channels)
    assert stem.compute_output_shape((None, *size, 3)) == (None, rows, cols, channels)
    stride = hybrid.total_stride(block_sizes)
    assert (rows, cols) == tuple(math.ceil(s / stride) for s in size)  # SAME padding rounds up


@pytest.mark.parametrize("block_sizes", [(), (2, 2, 2, 2), (3, 4, 9)])
def test_stem_weight_map_has_the_official_keys_and_shapes(block_sizes):
    inputs = keras.Input((64, 64, 3))
    model = keras.Model(inputs, hybrid.stem_builder(block_sizes)(inputs))
    mapping = npz.stem_weight_map(model)
    expected = resnet_arrays(block_sizes)  # written from the official code, independently
    assert sorted(mapping) == sorted(expected)
    for key, variable in mapping.items():
        assert tuple(variable.shape) == expected[key].shape, key
    stem_weights = model.get_layer("resnet_stem").weights
    assert len({id(v) for v in mapping.values()}) == len(stem_weights) == len(mapping)


# --- official checkpoints: the strict loader with the ResNet keys ---------------


def tiny_checkpoint(path, old_group_norm_shape=False, with_resnet=True):
    resnet = resnet_arrays(**harness.TINY_RESNET, old_group_norm_shape=old_group_norm_shape) if with_resnet else {}
    channels = hybrid.output_channels(**harness.TINY_RESNET) if with_resnet else 3
    patch = 2 if with_resnet else harness.TINY_VIT["patch_size"]  # as harness.tiny_hybrid
    arrays = dict(official_arrays(**dict(harness.TINY_VIT, patch_size=patch), classes=5, in_channels=channels,
                                  grid_size=(4, 4), extra=resnet))
    write_checkpoint(path, arrays)
    return arrays


@multibackend
def test_npz_loads_every_resnet_array(tmp_path):
    """weights=file.npz (the strict loader) fills every ResNet weight from its
    official key; GroupNorm arrays in the old (1, 1, 1, C) shape included."""
    arrays = tiny_checkpoint(tmp_path / "tiny.npz", old_group_norm_shape=True)
    model = harness.tiny_hybrid(weights=str(tmp_path / "tiny.npz"))
    mapping = npz.stem_weight_map(model)
    assert set(mapping) <= set(arrays)
    for key, variable in mapping.items():
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(variable), arrays[key].reshape(variable.shape))


@multibackend
def test_pure_and_hybrid_checkpoints_do_not_cross_load(tmp_path):
    tiny_checkpoint(tmp_path / "hybrid.npz")
    tiny_checkpoint(tmp_path / "pure.npz", with_resnet=False)
    with pytest.raises(ValueError, match=re.escape("ResNet units per stage none in the file vs (1,) in the model")):
        harness.tiny_hybrid(weights=str(tmp_path / "pure.npz"))
    with pytest.raises(ValueError, match=re.escape("ResNet units per stage (1,) in the file vs none in the model")):
        harness.tiny_vit(weights=str(tmp_path / "hybrid.npz"))


# --- errors -------------------------------------------------------------------


@multibackend
def test_bad_arguments_get_clear_errors():
    # 200 px -> a 50x50 ResNet map, not whole 8x8 patches
    with pytest.raises(ValueError, match="not a multiple of the patch size 8x8"):
        keras_vit.R_ViT_Ti16(input_shape=(200, 200, 3))
    with pytest.raises(ValueError, match="block_sizes must be positive"):
        hybrid.ResNetStem((3, 0))
    with pytest.raises(ValueError, match="not a hybrid model"):
        npz.stem_weight_map(harness.tiny_vit())
