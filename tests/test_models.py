"""Every architecture in harness.ARCHITECTURES through every harness check,
plus the constructors' parameter counts against the official configurations."""

import inspect

import keras
import numpy as np
import pytest

import harness
import keras_vit
from keras_vit.sizes import parameter_count

pytestmark = pytest.mark.multibackend


@pytest.mark.parametrize("check", list(harness.CHECKS))
@pytest.mark.parametrize("architecture", list(harness.ARCHITECTURES))
def test_architecture(architecture, check, tmp_path):
    run = harness.CHECKS[check]
    build = harness.ARCHITECTURES[architecture]
    if "tmp_path" in inspect.signature(run).parameters:
        run(build, tmp_path=str(tmp_path))
    else:
        run(build)


def test_published_counts():
    # The counts of the official models (and timm's) with a 1000-class head.
    assert parameter_count(**keras_vit.VARIANTS["B/16"]) == 86_567_656
    assert parameter_count(**keras_vit.VARIANTS["Ti/16"]) == 5_717_416


@pytest.mark.parametrize("name", list(keras_vit.models.CONSTRUCTORS))
def test_constructor_parameter_count(name):
    constructor = keras_vit.models.CONSTRUCTORS[name]
    model = constructor(weights=None)
    # parameter_count is the formula behind the README table; the built model must agree
    assert model.count_params() == parameter_count(**constructor.config)
    assert model.input_shape == (None, 224, 224, 3) and model.output_shape == (None, 1000)


def test_vit_b16_exact_counts():
    assert keras_vit.ViT_B16().count_params() == 86_567_656
    assert keras_vit.ViT_Ti16().count_params() == 5_717_416


def test_headless_outputs():
    kwargs = dict(harness.TINY_VIT, input_shape=(32, 32, 3), include_top=False)
    sequence = keras_vit.ViT(**kwargs)
    assert sequence.output_shape == (None, 17, 32)
    assert keras_vit.ViT(**kwargs, pooling="token").output_shape == (None, 32)
    gap = keras_vit.ViT(**kwargs, pooling="gap")
    x = harness.images()
    tokens = sequence.predict(x, verbose=0)
    gap.set_weights(sequence.get_weights())
    np.testing.assert_allclose(gap.predict(x, verbose=0), tokens[:, 1:].mean(axis=1), atol=1e-5)


def test_representation_layer_and_no_class_token():
    model = harness.tiny_vit(representation_size=16)
    assert model.get_layer("pre_logits").units == 16
    gap_only = harness.tiny_vit(class_token=False, pooling="gap")
    assert "class_token" not in [l.name for l in gap_only.layers]
    assert gap_only.get_layer("position_embedding").embedding.shape == (1, 16, 32)


def test_include_preprocessing_matches_preprocess_inputs():
    with_scaling = harness.tiny_vit()
    without = harness.tiny_vit(include_preprocessing=False)
    without.set_weights(with_scaling.get_weights())
    harness.randomize_head(with_scaling)
    without.get_layer("predictions").set_weights(with_scaling.get_layer("predictions").get_weights())
    x = harness.images()
    scaled = keras.ops.convert_to_numpy(keras_vit.preprocess_inputs(x))
    assert scaled.min() >= -1.0 and scaled.max() <= 1.0
    np.testing.assert_allclose(without.predict(scaled, verbose=0), with_scaling.predict(x, verbose=0), atol=1e-6)


def test_input_tensor():
    tensor = keras.Input(shape=(32, 32, 3))
    model = harness.tiny_vit(input_tensor=tensor, input_shape=None)
    assert model.inputs[0] is tensor


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(input_shape=(30, 32, 3)), "multiples of the patch size"),
        (dict(input_shape=(32, 32)), "(height, width, 3)"),
        (dict(pooling="max"), "Unknown pooling"),
        (dict(classes=0), "positive"),
        (dict(weights="nowhere.weights.h5"), "not found"),
        (dict(weights="bogus-tag"), "Unknown weights"),
        (dict(num_heads=5), "divisible"),
    ],
)
def test_bad_arguments_get_clear_errors(kwargs, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message.replace("(", r"\(").replace(")", r"\)")):
        harness.tiny_vit(**kwargs)
