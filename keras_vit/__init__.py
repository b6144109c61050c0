"""keras_vit: the Vision Transformer model zoo for Keras 3.

    import keras_vit
    model = keras_vit.ViT_B16(weights="augreg_in21k+in1k", classes=10)

One module per concept:

    layers       the Transformer's building blocks (patches, class token, position
                 embedding, blocks, pooling) and the [0, 255] -> [-1, 1] input scaling
    models       `ViT()` and the application constructors
    variants     the VARIANTS tables and `Architecture`, without Keras
    hybrid       the hybrid models' ResNet stem
    views        models sharing a built model's weights: intermediate outputs, attention
    sizes        parameter and multiply-accumulate counts without building a model
    pretrained   what a `weights=` value means: resolved before the build, loaded after
    registry     the official checkpoint files: tags, names (timm's too), resolutions, classes
    npz          official `.npz` -> Keras: the reader, layout quirks, strict key matcher
    download     verified, cached, atomic downloads of checkpoint files
    labels       the ImageNet-1k/-21k class names and label files, `decode_predictions`
    data         tf.data input pipelines: TFDS, digits, image folders, augmentation
    training     recipes, `Trainer` (accumulation, clipping), strategies, `train()`
    evaluation   the paper's protocols: few-shot linear accuracy, VTAB-1k
    pretraining  self-supervised masked patch prediction (§4.6): `MaskedPatchPrediction`, its targets
    serving      `export_for_serving`: a TF Serving SavedModel, or an OpenVINO, ONNX or LiteRT model
    runtimes     the CPU serving runtimes: how each format is written, quantized and run
    images       the one decoder of image files (`keras-vit predict` and serving_default)
    visualize    attention rollout maps and the paper's attention-distance figure
    demo         the offline digits demo (`keras-vit demo`)
    cli          the `keras-vit` command line
    errors       one-line user errors
    tables       text tables for the CLI and the docs

Importing keras_vit imports no Keras and no TensorFlow (the `keras-vit`
command line starts in a fraction of a second): each name below loads its
module on first use. The layers register with Keras for `.keras` files as
soon as Keras is imported, before or after keras_vit, so that
`keras.saving.load_model("model.keras")` works after `import keras_vit`.
"""

import functools
import importlib
import sys

__version__ = "0.1.0"

# name -> the module that defines it.
_LAZY = {
    **{name: "keras_vit.models" for name in (
        "CONSTRUCTORS", "R26_ViT_S32", "R50_ViT_B16", "R50_ViT_L32", "R_ViT_Ti16", "ViT", "ViT_B8", "ViT_B16",
        "ViT_B32", "ViT_H14", "ViT_L16", "ViT_L32", "ViT_S16", "ViT_S32", "ViT_Ti16", "from_name",
        "get_constructor")},
    "VARIANTS": "keras_vit.variants",
    "decode_predictions": "keras_vit.labels",
    "preprocess_input": "keras_vit.layers",
    "preprocess_inputs": "keras_vit.layers",
    "load_npz": "keras_vit.npz",
    "load_pretrained": "keras_vit.pretrained",
    "MaskedPatchPrediction": "keras_vit.pretraining",
    "list_weights": "keras_vit.registry",
    "export_for_serving": "keras_vit.serving",
    "attention_model": "keras_vit.views",
    "feature_extractor": "keras_vit.views",
}
_SUBMODULES = (
    "cli", "data", "demo", "download", "errors", "evaluation", "hybrid", "images", "labels", "layers", "models",
    "npz", "pretrained", "pretraining", "registry", "runtimes", "serving", "sizes", "tables", "testing", "training",
    "variants", "views", "visualize",
)
# The modules that register Keras serializables (layers, schedules): what a `.keras` file may name.
_REGISTERING = ("keras_vit.layers", "keras_vit.hybrid", "keras_vit.pretraining", "keras_vit.training.recipes")

__all__ = sorted([*_LAZY, *_SUBMODULES])


def __getattr__(name):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
    elif name in _SUBMODULES:
        value = importlib.import_module(f"keras_vit.{name}")
    else:
        raise AttributeError(f"module 'keras_vit' has no attribute {name!r}")
    globals()[name] = value  # found directly next time
    return value


def __dir__():
    return sorted({*globals(), *__all__})


class _RegisterWithKeras:
    """Registers keras_vit's layers with Keras as soon as both are loaded,
    without importing Keras itself: a one-shot import hook (first on
    sys.meta_path) that watches `keras` and the keras_vit modules load and,
    once Keras is loaded and no keras_vit module is half-way through its own
    import (one that imports Keras at its top would be), imports the modules
    that register serializables, then removes itself."""

    def __init__(self):
        self.loading = 0  # keras_vit modules being executed right now

    def find_spec(self, name, path=None, target=None):
        if name != "keras" and not name.startswith("keras_vit."):
            return None
        for finder in sys.meta_path:  # the spec the import would get without this hook
            spec = None if finder is self else getattr(finder, "find_spec", lambda *a: None)(name, path, target)
            if spec is not None:
                break
        if spec is not None and spec.loader is not None and hasattr(spec.loader, "exec_module"):
            spec.loader.exec_module = functools.partial(self._exec_then_register, spec.loader.exec_module, name)
        return spec

    def _exec_then_register(self, exec_module, name, module):
        watched = name != "keras"
        self.loading += watched
        try:
            exec_module(module)
        finally:
            self.loading -= watched
        if self.loading == 0 and "keras" in sys.modules and self in sys.meta_path:
            sys.meta_path.remove(self)
            _register_with_keras()


def _register_with_keras():
    for module in _REGISTERING:
        importlib.import_module(module)


if "keras" in sys.modules:
    _register_with_keras()
elif not any(isinstance(finder, _RegisterWithKeras) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterWithKeras())
