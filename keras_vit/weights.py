"""The one entry point for the `weights=` argument of every constructor.

`plan()` looks at what the user passed before the model is built (a checkpoint
can fix the class count, the pre_logits layer and the resolution), and the
returned plan's `load(model)` fills the built model.

Accepted values:
    None                  random initialisation
    "path/x.weights.h5"   a Keras weights file (from `model.save_weights`); a
                          position embedding saved for another input size is
                          resized on load
"""

import dataclasses
import os
from typing import Callable, Optional

KERAS_WEIGHTS_SUFFIXES = (".weights.h5",)


@dataclasses.dataclass
class LoadPlan:
    """What a `weights=` value implies for the model, and how to load it."""

    classes: Optional[int] = None
    representation_size: Optional[int] = None
    input_shape: Optional[tuple] = None
    loader: Optional[Callable] = None

    def load(self, model):
        if self.loader is not None:
            self.loader(model)


def plan(
    weights,
    architecture=None,
    include_top=True,
    classes=None,
    representation_size=None,
    input_shape=None,
):
    """Resolves a `weights=` value into a `LoadPlan` (see the module docstring)."""
    if weights is None:
        return LoadPlan(classes, representation_size, input_shape)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None or a string, got {type(weights).__name__}.")
    path = os.fspath(weights)
    if path.endswith(KERAS_WEIGHTS_SUFFIXES):
        if not os.path.exists(path):
            raise FileNotFoundError(f"Weights file not found: {path}")
        return LoadPlan(
            classes, representation_size, input_shape, lambda model: load_keras_weights(model, path)
        )
    raise ValueError(
        f"Unknown weights {path!r}: pass None or the path of a Keras "
        f"'.weights.h5' file."
    )


def load_keras_weights(model, path):
    """Loads a `.weights.h5` file, with a one-line error when it does not fit."""
    try:
        model.load_weights(path)
    except (ValueError, KeyError) as error:
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ValueError(
            f"Weights file {path} does not fit model {model.name!r}: {first_line} "
            "Build the model with the same architecture, include_top and classes "
            "as the model that saved it."
        ) from error


def load_weights(model, weights, **kwargs):
    """Loads `weights` (anything `weights=` accepts) into an already built model."""
    plan(weights, **kwargs).load(model)
