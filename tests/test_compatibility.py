"""Files saved by keras_vit 0.1.0 still load and compute the same outputs.

tests/fixtures/release_0_1_0/ holds a `.keras` file and a `.weights.h5` file
of a tiny ViT (with a representation layer) and of a tiny hybrid, and the
probabilities that release computed for two fixed images
(tests/fixtures/make_release_files.py wrote them, once, with that release).
A change to a layer's variables, names or config that would break users'
saved models fails here.
"""

import os

import keras
import numpy as np
import pytest

import keras_vit

RELEASE = os.path.join(os.path.dirname(__file__), "fixtures", "release_0_1_0")
NAMES = ("vit", "hybrid")


@pytest.fixture(scope="module")
def saved_outputs():
    with np.load(os.path.join(RELEASE, "outputs.npz")) as saved:
        assert str(saved["keras_vit_version"]) == "0.1.0"
        return {key: saved[key] for key in saved.files}


@pytest.mark.multibackend
@pytest.mark.parametrize("name", NAMES)
def test_a_keras_file_of_the_release_loads_in_safe_mode_with_the_same_outputs(name, saved_outputs):
    model = keras.models.load_model(os.path.join(RELEASE, f"{name}.keras"), safe_mode=True)
    probabilities = keras.ops.convert_to_numpy(model.predict(saved_outputs[f"{name}_images"], verbose=0))
    np.testing.assert_allclose(probabilities, saved_outputs[f"{name}_probabilities"], atol=1e-5)


def _same_architecture(name):
    # The constructor calls of tests/fixtures/make_release_files.py, weights left random.
    if name == "vit":
        return keras_vit.ViT(
            patch_size=4, hidden_size=32, depth=2, num_heads=4, mlp_dim=64,
            representation_size=16, input_shape=(32, 32, 3), classes=5, name="tiny_vit",
        )
    return keras_vit.ViT(
        patch_size=1, hidden_size=32, depth=1, num_heads=2, mlp_dim=64,
        input_shape=(32, 32, 3), classes=3, stem=keras_vit.hybrid.stem_builder((1, 1), 1),
        name="tiny_hybrid",
    )


@pytest.mark.multibackend
@pytest.mark.parametrize("name", NAMES)
def test_weights_h5_of_the_release_load_into_a_model_built_now(name, saved_outputs):
    model = _same_architecture(name)
    images = saved_outputs[f"{name}_images"]
    before = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    # The random weights differ from the saved ones: the check below is not vacuous.
    assert np.abs(before - saved_outputs[f"{name}_probabilities"]).max() > 1e-3
    model.load_weights(os.path.join(RELEASE, f"{name}.weights.h5"))
    probabilities = keras.ops.convert_to_numpy(model.predict(images, verbose=0))
    np.testing.assert_allclose(probabilities, saved_outputs[f"{name}_probabilities"], atol=1e-5)
