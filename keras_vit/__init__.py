"""keras_vit: the Vision Transformer model zoo for Keras 3.

    import keras_vit
    model = keras_vit.ViT_B16(weights="augreg_in21k+in1k", classes=10)

One module per concept:

    layers       the Transformer's building blocks (patches, class token, position
                 embedding, blocks, pooling) and the [0, 255] -> [-1, 1] input scaling
    models       `ViT()`, the VARIANTS table and the application constructors
    hybrid       the hybrid models' ResNet stem and HYBRID_VARIANTS
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
    visualize    attention rollout maps and the paper's attention-distance figure
    demo         the offline digits demo (`keras-vit demo`)
    cli          the `keras-vit` command line
    errors       one-line user errors
    tables       text tables for the CLI and the docs
"""

from keras_vit import evaluation, hybrid, layers, pretraining, sizes, training, visualize
from keras_vit.labels import decode_predictions
from keras_vit.layers import preprocess_input, preprocess_inputs
from keras_vit.models import (
    CONSTRUCTORS,
    VARIANTS,
    R26_ViT_S32,
    R50_ViT_B16,
    R50_ViT_L32,
    R_ViT_Ti16,
    ViT,
    ViT_B8,
    ViT_B16,
    ViT_B32,
    ViT_H14,
    ViT_L16,
    ViT_L32,
    ViT_S16,
    ViT_S32,
    ViT_Ti16,
    from_name,
    get_constructor,
)
from keras_vit.npz import load_npz
from keras_vit.pretrained import load_pretrained
from keras_vit.pretraining import MaskedPatchPrediction
from keras_vit.registry import list_weights
from keras_vit.serving import export_for_serving
from keras_vit.views import attention_model, feature_extractor

__version__ = "0.1.0"


def __getattr__(name):
    # keras_vit.data imports TensorFlow (tf.data): loaded on first use, so that
    # `import keras_vit` stays light on the JAX and torch backends.
    if name == "data":
        import importlib

        return importlib.import_module("keras_vit.data")
    raise AttributeError(f"module 'keras_vit' has no attribute {name!r}")
