"""Shared pytest setup: quiet TensorFlow, fresh Keras state for every test."""

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
# The parity tests' timm imports torchvision, which loads triton (torch's GPU
# compiler); triton's LLVM crashes the process (segfault) once TensorFlow is
# loaded. CPU tests never need it: make `import triton` fail cleanly instead.
sys.modules.setdefault("triton", None)

import keras  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def _fresh_keras_state():
    keras.config.set_dtype_policy("float32")
    keras.utils.set_random_seed(0)
    yield
    keras.config.set_dtype_policy("float32")
    keras.backend.clear_session()


# Variables that pytest and torch set for their own use (torch's compiler on its first run,
# its cache folder when first asked for it: timm's imports can be the first).
_SET_BY_LIBRARIES = {"PYTEST_CURRENT_TEST", "_TORCHINDUCTOR_PYOBJECT_TENSOR_DATA_PTR", "TORCHINDUCTOR_CACHE_DIR"}


@pytest.fixture(autouse=True)
def _leaves_the_environment_as_it_found_it():
    """CI runs the test files in two processes, in an order that varies from run to
    run: a test that changes os.environ or the working folder for good changes the
    tests after it in some runs only. Use monkeypatch, which undoes its changes
    before this check."""
    environ, cwd = dict(os.environ), os.getcwd()
    yield
    changed = sorted(name for name in environ.keys() | os.environ.keys()
                     if environ.get(name) != os.environ.get(name) and name not in _SET_BY_LIBRARIES)
    assert not changed, f"the test left these environment variables changed: {', '.join(changed)}"
    assert os.getcwd() == cwd, f"the test left the working folder at {os.getcwd()} (was {cwd})"


@pytest.fixture
def backend():
    return keras.backend.backend()
