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


@pytest.fixture
def backend():
    return keras.backend.backend()
