"""keras_vit: the Vision Transformer model zoo for Keras 3.

    import keras_vit
    model = keras_vit.ViT_B16(weights=None)       # or a checkpoint tag
"""

from keras_vit import layers
from keras_vit.models import (
    CONSTRUCTORS,
    VARIANTS,
    ViT,
    attention_model,
    feature_extractor,
    get_constructor,
    preprocess_inputs,
)
from keras_vit.models import (  # the application constructors, one per VARIANTS row
    ViT_B8,
    ViT_B16,
    ViT_B32,
    ViT_H14,
    ViT_L16,
    ViT_L32,
    ViT_S16,
    ViT_S32,
    ViT_Ti16,
)
from keras_vit.models import (  # the hybrid (ResNet + ViT) constructors, one per hybrid.HYBRID_VARIANTS row
    R26_ViT_S32,
    R50_ViT_B16,
    R50_ViT_L32,
    R_ViT_Ti16,
)
from keras_vit import hybrid
from keras_vit.checkpoints import list_weights, load_npz
from keras_vit.weights import load_weights
from keras_vit import training
from keras_vit import visualize
from keras_vit.serving import export_for_serving

__version__ = "0.1.0"


def __getattr__(name):
    # keras_vit.data imports TensorFlow (tf.data): loaded on first use, so that
    # `import keras_vit` stays light on the JAX and torch backends.
    if name == "data":
        import importlib

        return importlib.import_module("keras_vit.data")
    raise AttributeError(f"module 'keras_vit' has no attribute {name!r}")
