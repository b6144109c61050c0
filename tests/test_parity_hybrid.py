"""Parity of the hybrid models with timm's (`vision_transformer_hybrid.py`).

As tests/test_parity_timm.py: a random checkpoint in the official layout (the
ResNet arrays from `keras_vit.testing.resnet_arrays`, the Transformer's
from `official_arrays`) is loaded into keras_vit (`weights=path.npz`, the
strict loader) and into timm (`_load_weights`; model built with
act_layer="gelu_tanh", the official GELU), both get the same images in
[-1, 1], and max |logit difference| must be <= 1e-4 in float32.

The ResNets are the official ones (R50 (3, 4, 9), R26 (2, 2, 2, 2), the bare
root of R+Ti/16); to keep this file fast on a 2-core machine the Transformers
on top of R50 and R26 have 2 blocks (their own width, heads and MLP);
R+ViT-Ti/16 runs whole, through its constructor and a registry tag.

timm's ResNet differs from the official one in two constants, so the timm
reference is set to the official ones: its GroupNorm epsilon (1e-5) is set to
Flax's 1e-6, and its weight standardisation, (w - mean) / sqrt(var + 1e-8), is
replaced by the official (w - mean) / (std + 1e-5) (`official_numerics`).
Measured with timm's own constants on these random checkpoints: ~4e-4, all of
it from the standardisation's epsilon (with it matched, float64 runs of both
agree to ~1e-6, the float32 head): the epsilon changes each channel's scale
by eps / std(kernel), unevenly within a GroupNorm group. The rest of timm
(padding, pooling, units, shortcut projections, key mapping, Transformer) is
used as it is.

A resolution change is compared against the checkpoint with its position
embedding zoomed (official scipy.ndimage.zoom, order 1) before timm loads it,
since timm resizes bilinearly.
"""

import os
import types

import numpy as np
import pytest

import keras_vit
from keras_vit.testing import POSEMB_KEY, official_arrays, resized_posemb_zoom, resnet_arrays, write_checkpoint
from test_parity_timm import assert_close, inputs, keras_outputs

pytestmark = pytest.mark.parity
# Imported, not importorskip'd: a missing parity extra must fail, not pass silently.
import timm  # noqa: E402
import timm.models.vision_transformer as timm_vit  # noqa: E402
import torch  # noqa: E402

# timm's model of each architecture (it takes the depth and size as arguments)
TIMM_NAMES = {"R50+B/16": "vit_base_r50_s16_384", "R26+S/32": "vit_small_r26_s32_224",
              "R+Ti/16": "vit_tiny_r_s16_p8_224", "R50+L/32": "vit_large_r50_s32_224"}
# pixels per token (ResNet stride x patch), from the official code: root conv /2, max pool /2,
# /2 per stage after the first; R+Ti/16 takes 8x8 patches of the root's /4 output
PIXELS_PER_TOKEN = {"R50+B/16": 16, "R26+S/32": 32, "R+Ti/16": 32}
STEM_KEYS = ("block_sizes", "width_factor")


def hybrid_config(variant, depth=None):
    config = keras_vit.models.variant_config(variant)
    return config if depth is None else dict(config, depth=depth)


def checkpoint_arrays(variant, config, image_size, old_group_norm_shape=False):
    """A random official checkpoint of `config` (a hybrid_config) for `image_size` px, 1000 classes."""
    resnet = resnet_arrays(config["block_sizes"], config["width_factor"], old_group_norm_shape=old_group_norm_shape)
    channels = list(resnet.values())[-1].shape[-1]  # the ResNet's last GroupNorm: its output width
    transformer = {k: v for k, v in config.items() if k not in STEM_KEYS}
    side = image_size // PIXELS_PER_TOKEN[variant]
    return dict(official_arrays(**transformer, classes=1000, in_channels=channels, extra=resnet,
                                grid_size=(side, side)))


def timm_hybrid(variant, depth, image_size):
    model = timm.create_model(TIMM_NAMES[variant], pretrained=False, depth=depth, img_size=image_size,
                              num_classes=1000, act_layer="gelu_tanh")
    return official_numerics(model).eval()


def official_numerics(model):
    """timm's ResNet with the official GroupNorm epsilon and weight standardisation."""
    convs = [m for m in model.modules() if isinstance(m, timm.layers.StdConv2dSame)]
    norms = [m for m in model.modules() if isinstance(m, torch.nn.GroupNorm)]
    assert convs and norms
    for conv in convs:
        conv.forward = types.MethodType(_official_std_conv_forward, conv)
    for norm in norms:
        norm.eps = 1e-6  # flax.linen.GroupNorm
    return model


def _official_std_conv_forward(self, x):
    """StdConv2dSame.forward with vision_transformer's weight_standardize(eps=1e-5)."""
    if self.same_pad:
        x = timm.layers.padding.pad_same(x, self.kernel_size, self.stride, self.dilation)
    mean = self.weight.mean(dim=(1, 2, 3), keepdim=True)
    std = self.weight.std(dim=(1, 2, 3), keepdim=True, unbiased=False)
    weight = (self.weight - mean) / (std + 1e-5)
    return torch.nn.functional.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


def timm_outputs(model, path, x):
    timm_vit._load_weights(model, str(path))
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def keras_hybrid_outputs(config, path, x, **kwargs):
    """keras_vit.ViT with the hybrid's stem (as the constructors build it, at any depth)."""
    transformer = {k: v for k, v in config.items() if k not in STEM_KEYS}
    stem = keras_vit.hybrid.stem_builder(config["block_sizes"], config["width_factor"])
    return keras_outputs(dict(transformer, stem=stem), path, x, **kwargs)


@pytest.mark.parametrize("variant", list(TIMM_NAMES))
@pytest.mark.parametrize("image_size, classes", [(224, 1000), (384, 21843)])
def test_parameter_counts(variant, image_size, classes):
    """parameter_count (the README table; every constructor builds exactly it,
    tests/test_models.py) against timm's model of the same official config."""
    reference = timm.create_model(TIMM_NAMES[variant], img_size=image_size, num_classes=classes, device="meta")
    expected = sum(p.numel() for p in reference.parameters())
    assert keras_vit.sizes.parameter_count(**hybrid_config(variant), image_size=image_size, classes=classes) == expected


@pytest.mark.parametrize("variant, old_group_norm_shape", [("R50+B/16", True), ("R26+S/32", False)])
def test_own_resolution(variant, old_group_norm_shape, tmp_path):
    """The real R50 and R26 at 224 px (2 Transformer blocks), both GroupNorm array shapes."""
    config = hybrid_config(variant, depth=2)
    arrays = checkpoint_arrays(variant, config, 224, old_group_norm_shape)
    path = write_checkpoint(tmp_path / "ckpt.npz", arrays)
    x = inputs(224, 224)
    reference = timm_outputs(timm_hybrid(variant, 2, 224), path, x)
    assert_close(keras_hybrid_outputs(config, path, x), reference)


def test_r26_s32_384_checkpoint_at_224(tmp_path):
    """A checkpoint with R26+ViT-S/32's 12x12 grid (384 px) run at 224 px: zoomed to 7x7."""
    config = hybrid_config("R26+S/32", depth=2)
    arrays = checkpoint_arrays("R26+S/32", config, 384)
    path = write_checkpoint(tmp_path / "ckpt384.npz", arrays)
    zoomed = dict(arrays, **{POSEMB_KEY: resized_posemb_zoom(arrays[POSEMB_KEY], (7, 7))})
    reference_path = write_checkpoint(tmp_path / "zoomed.npz", zoomed)
    x = inputs(224, 224)
    reference = timm_outputs(timm_hybrid("R26+S/32", 2, 224), reference_path, x)
    assert_close(keras_hybrid_outputs(config, path, x, input_shape=(224, 224, 3)), reference)


def test_r_ti16_registry_checkpoint_at_non_square_size(tmp_path, monkeypatch):
    """The whole R+ViT-Ti/16 through its constructor and its 384 px registry tag
    (the file placed in the cache: no download), run at 160x256: grid 12x12 -> 5x8."""
    monkeypatch.setenv("KERAS_VIT_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KERAS_VIT_BASE_URL", "http://127.0.0.1:9/")  # nothing listens there
    entry = keras_vit.registry.find_checkpoint("augreg_in21k+in1k", "R_ViT_Ti16")
    assert entry.resolution == 384
    arrays = checkpoint_arrays("R+Ti/16", hybrid_config("R+Ti/16"), entry.resolution)
    path = tmp_path / "cache" / entry.file
    os.makedirs(path.parent)
    write_checkpoint(path, arrays)
    model = keras_vit.R_ViT_Ti16(weights="augreg_in21k+in1k", input_shape=(160, 256, 3),
                                 include_preprocessing=False, classifier_activation=None)
    zoomed = dict(arrays, **{POSEMB_KEY: resized_posemb_zoom(arrays[POSEMB_KEY], (5, 8))})
    reference_path = write_checkpoint(tmp_path / "zoomed.npz", zoomed)
    x = inputs(160, 256)
    reference = timm_outputs(timm_hybrid("R+Ti/16", 12, (160, 256)), reference_path, x)
    assert_close(np.asarray(model(x, training=False)), reference)
