"""Parity with an independent implementation: timm reads the same official `.npz`.

Each case writes a random checkpoint in an official layout, loads it into
keras_vit and into timm (`timm.models.vision_transformer._load_weights`, the
model built with act_layer="gelu_tanh" as the official GELU), feeds both the
same images in [-1, 1] and requires max |logit difference| <= 1e-4 (float32).

Shapes: ViT-Ti/16 and ViT-B/16 are the official configurations. The full
12-block B/16 runs once (at its own resolution, with head); the other
B/16-shaped cases (pre_logits, big_vision layout) keep B/16's width, heads and
MLP but only 2 blocks, to keep this file fast on a 2-core machine.

Where timm cannot be the reference on its own:
  * pre_logits: timm's loader ignores that layer, so the reference is timm's
    pooled features followed by tanh(x W + b) and the head in numpy, straight
    from the checkpoint's arrays;
  * another input size: timm resizes with bilinear interpolation, not the
    official zoom, so the reference is the checkpoint with its position
    embedding zoomed (scipy.ndimage.zoom, order 1) *before* timm loads it.
  * big_vision layout (no class-token posemb entry): timm's model is built
    with no_embed_class=True, the big_vision arrangement.
"""

import keras
import numpy as np
import pytest

import keras_vit
from keras_vit.testing import POSEMB_KEY, official_arrays, resized_posemb_zoom, write_checkpoint

pytestmark = pytest.mark.parity
# Imported, not importorskip'd: a missing parity extra must fail, not pass silently.
# (conftest keeps triton out: it crashes once TensorFlow is loaded)
import timm.models.vision_transformer as timm_vit  # noqa: E402
import torch  # noqa: E402

TOLERANCE = 1e-4
TI16 = keras_vit.VARIANTS["Ti/16"]
B16 = keras_vit.VARIANTS["B/16"]
B16_2_BLOCKS = dict(B16, depth=2)


def timm_model(config, image_size, classes, no_embed_class=False):
    model = timm_vit.VisionTransformer(
        img_size=image_size,
        patch_size=config["patch_size"],
        embed_dim=config["hidden_size"],
        depth=config["depth"],
        num_heads=config["num_heads"],
        mlp_ratio=config["mlp_dim"] / config["hidden_size"],
        num_classes=classes or 0,
        global_pool="token",
        no_embed_class=no_embed_class,
        act_layer="gelu_tanh",
        weight_init="skip",
    )
    assert model.norm.eps == 1e-6
    return model.eval()


def timm_outputs(model, path, x):
    timm_vit._load_weights(model, str(path))
    with torch.no_grad():
        return model(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()


def keras_outputs(config, path, x, **kwargs):
    model = keras_vit.ViT(**config, weights=str(path), include_preprocessing=False,
                          classifier_activation=None, **kwargs)
    return keras.ops.convert_to_numpy(model(x, training=False))


def inputs(height, width, batch=2, seed=0):
    return np.random.default_rng(seed).uniform(-1, 1, (batch, height, width, 3)).astype("float32")


def assert_close(ours, reference):
    assert ours.shape == reference.shape
    difference = np.max(np.abs(ours - reference))
    print(f"max |logit difference| {difference:.2e} (logit std {np.std(reference):.2f})")  # shown with -s
    assert difference <= TOLERANCE, f"max |logit difference| {difference:.2e} > {TOLERANCE}"
    assert np.std(reference) > 0.1, "the comparison must be on non-trivial logits"


@pytest.mark.parametrize("config, name", [(TI16, "Ti/16"), (B16, "B/16 (12 blocks)")])
def test_own_resolution_with_head(config, name, tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.npz", official_arrays(**config, image_size=224, classes=1000))
    x = inputs(224, 224)
    assert_close(keras_outputs(config, path, x), timm_outputs(timm_model(config, 224, 1000), path, x))


def test_without_head(tmp_path):
    path = write_checkpoint(tmp_path / "ckpt.npz", official_arrays(**TI16, image_size=224, classes=None))
    x = inputs(224, 224)
    ours = keras_outputs(TI16, path, x, include_top=False, pooling="token")
    assert_close(ours, timm_outputs(timm_model(TI16, 224, None), path, x))


def test_pre_logits(tmp_path):
    arrays = dict(official_arrays(**B16_2_BLOCKS, image_size=224, classes=100, representation_size=768))
    path = write_checkpoint(tmp_path / "ckpt.npz", arrays)
    x = inputs(224, 224)
    features = timm_outputs(timm_model(B16_2_BLOCKS, 224, None), path, x)  # pooled, normalised
    hidden = np.tanh(features @ arrays["pre_logits/kernel"] + arrays["pre_logits/bias"])
    reference = hidden @ arrays["head/kernel"] + arrays["head/bias"]
    assert_close(keras_outputs(B16_2_BLOCKS, path, x), reference)


def test_big_vision_params_layout(tmp_path):
    arrays = official_arrays(**B16_2_BLOCKS, image_size=224, classes=1000)
    path = write_checkpoint(tmp_path / "ckpt.npz", arrays, layout="big_vision")
    x = inputs(224, 224)
    reference = timm_outputs(timm_model(B16_2_BLOCKS, 224, 1000, no_embed_class=True), path, x)
    assert_close(keras_outputs(B16_2_BLOCKS, path, x), reference)


@pytest.mark.parametrize("height, width", [(224, 224), (224, 320)])
def test_384_checkpoint_at_another_size(height, width, tmp_path):
    """A checkpoint with a 24x24 grid (384 px) run at 224x224 and at 224x320."""
    arrays = dict(official_arrays(**TI16, image_size=384, classes=1000))
    path = write_checkpoint(tmp_path / "ckpt384.npz", arrays)
    grid = (height // 16, width // 16)
    zoomed = dict(arrays, **{POSEMB_KEY: resized_posemb_zoom(arrays[POSEMB_KEY], grid)})
    reference_path = write_checkpoint(tmp_path / "zoomed.npz", zoomed)
    x = inputs(height, width)
    reference = timm_outputs(timm_model(TI16, (height, width), 1000), reference_path, x)
    assert_close(keras_outputs(TI16, path, x, input_shape=(height, width, 3)), reference)
