"""The Vision Transformer builder, its variants table and the application constructors.

A variant is a row of `VARIANTS`; `ViT_B16` and friends are generated from that
table with the `keras.applications` signature. Layer names of a built model
(the contract the checkpoint loader and `feature_extractor` rely on):

    rescaling            pixels [0, 255] -> [-1, 1] (with include_preprocessing)
    patch_embed          PatchEncoder: (batch, rows*cols, width)      "stem"
    class_token          ClassToken (absent with class_token=False)
    position_embedding   PositionEmbedding                            "with_posemb"
    embedding_dropout    Dropout
    block_00 ... block_NN  TransformerBlock
    encoder_norm         LayerNormalization                           "encoded"
    pool                 TokenPooling ("token" | "gap")
    pre_logits           Dense + tanh (only with representation_size)
    predictions          Dense head, zero-initialised, float32        "logits"
"""

import textwrap

import keras
from keras import layers, ops

from keras_vit import hybrid
from keras_vit import layers as vit_layers

DEFAULT_IMAGE_SIZE = 224

# The official configurations (google-research/vision_transformer, configs/models.py).
VARIANTS = {
    "Ti/16": dict(patch_size=16, hidden_size=192, depth=12, num_heads=3, mlp_dim=768),
    "S/16": dict(patch_size=16, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "S/32": dict(patch_size=32, hidden_size=384, depth=12, num_heads=6, mlp_dim=1536),
    "B/8": dict(patch_size=8, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "B/16": dict(patch_size=16, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "B/32": dict(patch_size=32, hidden_size=768, depth=12, num_heads=12, mlp_dim=3072),
    "L/16": dict(patch_size=16, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "L/32": dict(patch_size=32, hidden_size=1024, depth=24, num_heads=16, mlp_dim=4096),
    "H/14": dict(patch_size=14, hidden_size=1280, depth=32, num_heads=16, mlp_dim=5120),
}


def preprocess_inputs(images):
    """Scales pixels from [0, 255] to [-1, 1], the official ViT input range.

    Use it for models built with `include_preprocessing=False`; models built
    with the default `include_preprocessing=True` do this themselves.
    """
    images = ops.convert_to_tensor(images)
    if not keras.backend.is_float_dtype(images.dtype):
        images = ops.cast(images, "float32")
    return images / 127.5 - 1.0


def block_name(index):
    return f"block_{index:02d}"


def ViT(
    patch_size=16,
    hidden_size=768,
    depth=12,
    num_heads=12,
    mlp_dim=3072,
    representation_size=None,
    include_top=True,
    weights=None,
    input_shape=None,
    input_tensor=None,
    pooling=None,
    classes=None,
    classifier_activation="softmax",
    include_preprocessing=True,
    dropout_rate=0.0,
    attention_dropout_rate=0.0,
    drop_path_rate=0.0,
    class_token=True,
    gelu_approximate=True,
    posemb_interpolation="zoom",
    stem=None,
    architecture=None,
    name="vit",
    **weights_kwargs,
):
    """Builds a Vision Transformer of any size as a functional Keras model.

    Args:
        patch_size: side of the square patches (or a (rows, cols) pair).
        hidden_size: token width. depth: number of Transformer blocks.
        num_heads: attention heads per block. mlp_dim: hidden size of each MLP.
        representation_size: width of the tanh `pre_logits` layer before the
            head (the ImageNet-21k checkpoints have one); None for none.
        include_top: whether to end with the classification head.
        weights: None (random initialisation) or what `keras_vit.load_weights`
            takes (a Keras `.weights.h5` path; checkpoint tags and `.npz` files).
        input_shape: (height, width, 3), both multiples of the patch size;
            default (224, 224, 3).
        input_tensor: optional Keras tensor to use as the image input.
        pooling: "token" (class token), "gap" (mean of the patch tokens) or
            None. With include_top the default is "token"; without it, None
            returns the whole encoded token sequence (batch, tokens, width).
        classes: size of the head; default 1000, or the checkpoint's.
        classifier_activation: activation of the head ("softmax", None, ...).
        include_preprocessing: take pixels in [0, 255] and scale them to
            [-1, 1] inside the model.
        dropout_rate, attention_dropout_rate, drop_path_rate: regularisation;
            the drop-path rate grows linearly from 0 to this over the blocks.
        class_token: prepend a class token (all official ViT checkpoints do).
        gelu_approximate: tanh-approximate GELU, as the official Flax model.
        posemb_interpolation: how a position embedding stored for another
            grid is resized on load: "zoom" (official) or "bicubic".
        stem: optional callable mapping the scaled image tensor to a feature
            map that the patches are taken from (the hybrid models' ResNet).
        architecture: the constructor name ("ViT_B16"), which checkpoint tags
            are looked up for; set by the constructors.
        name: model name.
        **weights_kwargs: passed on to `keras_vit.load_weights`.
    """
    if include_top and pooling is None:
        pooling = "token"
    if pooling not in (None, "token", "gap"):
        raise ValueError(f'Unknown pooling {pooling!r}; use "token", "gap" or None.')
    if include_top and classes is not None and classes < 1:
        raise ValueError(f"classes must be a positive number, got {classes}.")

    # Weights may fix the class count, head and resolution: resolve them first.
    from keras_vit import weights as vit_weights

    plan = vit_weights.plan(
        weights,
        architecture=architecture,
        include_top=include_top,
        classes=classes,
        representation_size=representation_size,
        input_shape=input_shape,
        **weights_kwargs,
    )
    classes = plan.classes if plan.classes is not None else 1000
    representation_size = plan.representation_size
    input_shape = _image_shape(plan.input_shape, input_tensor, vit_layers._pair(patch_size), stem)

    if input_tensor is None:
        inputs = layers.Input(shape=input_shape, name="images")
    elif not keras.utils.is_keras_tensor(input_tensor):
        inputs = layers.Input(tensor=input_tensor, shape=input_shape, name="images")
    else:
        inputs = input_tensor

    x = inputs
    if include_preprocessing:
        x = layers.Rescaling(scale=1 / 127.5, offset=-1.0, name="rescaling")(x)
    if stem is not None:
        x = stem(x)
        _check_feature_map(x.shape[1:3], vit_layers._pair(patch_size), input_shape)

    patch_encoder = vit_layers.PatchEncoder(patch_size, hidden_size, name="patch_embed")
    grid_size = patch_encoder.grid_size(x.shape[1:3])
    x = patch_encoder(x)
    if class_token:
        x = vit_layers.ClassToken(name="class_token")(x)
    num_prefix_tokens = 1 if class_token else 0
    x = vit_layers.PositionEmbedding(
        grid_size, num_prefix_tokens, posemb_interpolation, name="position_embedding"
    )(x)
    x = layers.Dropout(dropout_rate, name="embedding_dropout")(x)
    for index in range(depth):
        x = vit_layers.TransformerBlock(
            num_heads=num_heads,
            mlp_dim=mlp_dim,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            drop_path_rate=drop_path_rate * index / max(depth - 1, 1),
            gelu_approximate=gelu_approximate,
            name=block_name(index),
        )(x)
    x = layers.LayerNormalization(epsilon=vit_layers.LAYER_NORM_EPSILON, name="encoder_norm")(x)

    if pooling is not None:
        x = vit_layers.TokenPooling(pooling, num_prefix_tokens, name="pool")(x)
    if include_top:
        if representation_size:
            x = layers.Dense(representation_size, activation="tanh", name="pre_logits")(x)
        # float32 head: stable softmax under mixed precision. Zero-initialised
        # as the official model (and its fine-tuning recipe).
        x = layers.Dense(
            classes,
            activation=classifier_activation,
            kernel_initializer="zeros",
            dtype="float32",
            name="predictions",
        )(x)

    if input_tensor is not None:
        inputs = keras.utils.get_source_inputs(input_tensor)
    model = keras.Model(inputs, x, name=name)
    plan.load(model)
    return model


def _image_shape(input_shape, input_tensor, patch_size, stem):
    if input_shape is None and input_tensor is not None and len(input_tensor.shape) == 4:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        input_shape = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}.")
    height, width = input_shape[:2]
    if height is None or width is None:
        raise ValueError(
            f"input_shape {input_shape}: height and width must be fixed numbers "
            "(the position embedding is sized for one patch grid)."
        )
    if stem is None and (height % patch_size[0] or width % patch_size[1]):
        raise ValueError(
            f"input_shape {input_shape}: height and width must be multiples of the "
            f"patch size {patch_size[0]}x{patch_size[1]}."
        )
    return input_shape


def _check_feature_map(feature_size, patch_size, input_shape):
    """A stem's feature map must hold whole patches (as an image must without one)."""
    if feature_size[0] % patch_size[0] or feature_size[1] % patch_size[1]:
        raise ValueError(
            f"input_shape {input_shape}: the stem makes a {feature_size[0]}x{feature_size[1]} "
            f"feature map, not a multiple of the patch size {patch_size[0]}x{patch_size[1]}; "
            "use an input size that gives whole patches."
        )


# ---------------------------------------------------------------------------
# Constructors: one per row of VARIANTS and of hybrid.HYBRID_VARIANTS, all
# with the same signature
# ---------------------------------------------------------------------------

_CONSTRUCTOR_DOC = """Builds {title}.

    {description}
    With `include_preprocessing=True` (the default) the model takes pixels
    in [0, 255].

    Args:
        include_top: whether to end with the classification head.
        weights: None, a checkpoint tag (see `keras_vit.list_weights()`), an
            official `.npz` file or a Keras `.weights.h5` file.
        input_shape: (height, width, 3), multiples of {multiple}; default
            224x224, or the checkpoint's resolution.
        input_tensor: optional Keras tensor to use as the image input.
        pooling: "token", "gap" or None (see `keras_vit.ViT`).
        classes: head size; default the checkpoint's, else 1000. With
            pretrained weights and another count, a zero-initialised head.
        classifier_activation: activation of the head.
        include_preprocessing: scale [0, 255] pixels to [-1, 1] in the model.
        dropout_rate, attention_dropout_rate, drop_path_rate: regularisation.
        representation_size: width of a tanh `pre_logits` layer; None for
            none, or the checkpoint's when its pre_logits are kept.
        name: model name.
        **kwargs: other arguments of `keras_vit.ViT` and `keras_vit.load_weights`.

    Returns:
        A `keras.Model`.
    """


# Keys of a constructor's `config` that describe its ResNet, not the Transformer.
_STEM_KEYS = ("block_sizes", "width_factor")


def hybrid_config(variant):
    """The full configuration of a hybrid: its Transformer's row of VARIANTS,
    the patch size on the ResNet's feature map, and the ResNet."""
    row = hybrid.HYBRID_VARIANTS[variant]
    return dict(VARIANTS[row["transformer"]], patch_size=row["patch_size"],
                **{key: row[key] for key in _STEM_KEYS})


def _constructor_doc(variant, config):
    if "block_sizes" not in config:
        title = f"ViT-{variant}, the {variant} Vision Transformer of Dosovitskiy et al. (2021)"
        description = "Width {hidden_size}, {depth} blocks, {num_heads} heads, MLP {mlp_dim}, "
        description += "{patch_size}x{patch_size} patches."
        stride = 1
    else:
        title = f"{display_name(variant)}, a hybrid Vision Transformer of Dosovitskiy et al. (2021)"
        description = (
            "A ResNet (units per stage {block_sizes}, stride {stride}) feeds {patch_size}x{patch_size} "
            "patches of its feature map to a Transformer of width {hidden_size}, {depth} blocks, "
            "{num_heads} heads, MLP {mlp_dim}."
        )
        stride = hybrid.total_stride(config["block_sizes"])
    description = textwrap.fill(description.format(stride=stride, **config), width=72, subsequent_indent="    ")
    return _CONSTRUCTOR_DOC.format(title=title, description=description, multiple=stride * config["patch_size"])


def display_name(variant):
    """"B/16" -> "ViT-B/16"; "R50+B/16" -> "R50+ViT-B/16"."""
    stem, _, transformer = variant.rpartition("+")
    return f"{stem}+ViT-{transformer}" if stem else f"ViT-{variant}"


def _make_constructor(variant, config):
    vit_config = {key: value for key, value in config.items() if key not in _STEM_KEYS}
    if "block_sizes" in config:
        vit_config["stem"] = hybrid.stem_builder(config["block_sizes"], config["width_factor"])
    model_name = "vit_" + variant.lower().replace("/", "").replace("+", "_")

    def constructor(
        include_top=True,
        weights=None,
        input_shape=None,
        input_tensor=None,
        pooling=None,
        classes=None,
        classifier_activation="softmax",
        include_preprocessing=True,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        representation_size=None,
        name=model_name,
        **kwargs,
    ):
        return ViT(
            **vit_config,
            representation_size=representation_size,
            include_top=include_top,
            weights=weights,
            input_shape=input_shape,
            input_tensor=input_tensor,
            pooling=pooling,
            classes=classes,
            classifier_activation=classifier_activation,
            include_preprocessing=include_preprocessing,
            dropout_rate=dropout_rate,
            attention_dropout_rate=attention_dropout_rate,
            drop_path_rate=drop_path_rate,
            name=name,
            architecture=constructor_name(variant),
            **kwargs,
        )

    constructor.__name__ = constructor.__qualname__ = constructor_name(variant)
    constructor.__doc__ = _constructor_doc(variant, config)
    constructor.variant = variant
    constructor.config = config  # the keywords of parameter_count and gflops
    return constructor


def constructor_name(variant):
    """"B/16" -> "ViT_B16"; "R50+B/16" -> "R50_ViT_B16"."""
    stem, _, transformer = variant.rpartition("+")
    name = "ViT_" + transformer.replace("/", "")
    return f"{stem}_{name}" if stem else name


CONSTRUCTORS = {constructor_name(v): _make_constructor(v, VARIANTS[v]) for v in VARIANTS}
CONSTRUCTORS.update(
    {constructor_name(v): _make_constructor(v, hybrid_config(v)) for v in hybrid.HYBRID_VARIANTS}
)
globals().update(CONSTRUCTORS)


def get_constructor(name):
    """The constructor called `name` ("ViT_B16"), or an error listing them all."""
    try:
        return CONSTRUCTORS[name]
    except KeyError:
        raise ValueError(
            f"Unknown model {name!r}; choose one of: {', '.join(CONSTRUCTORS)}."
        ) from None


# ---------------------------------------------------------------------------
# Views of a built model that share its weights
# ---------------------------------------------------------------------------


def _blocks(model):
    return [layer for layer in model.layers if isinstance(layer, vit_layers.TransformerBlock)]


def feature_extractor(model, outputs=None):
    """A model with the same weights that returns a dict of intermediate tensors.

    Keys (as big_vision's ViT): "stem" (patch tokens), "with_posemb",
    "block_00".. (each block's output tokens), "encoded" (after the final
    LayerNorm), "pre_logits" (pooled features; after the representation layer
    when there is one) and "logits" when the model has a head. `outputs` picks
    a subset of the keys.
    """
    available = {"stem": "patch_embed", "with_posemb": "position_embedding"}
    available.update({block.name: block.name for block in _blocks(model)})
    available["encoded"] = "encoder_norm"
    names = {layer.name for layer in model.layers}
    for key in ("pre_logits", "pool"):
        if key in names:
            available["pre_logits"] = key
            break
    if "predictions" in names:
        available["logits"] = "predictions"
    if outputs is None:
        outputs = list(available)
    unknown = [key for key in outputs if key not in available]
    if unknown:
        raise ValueError(f"Unknown outputs {unknown}; this model has {list(available)}.")
    tensors = {key: model.get_layer(available[key]).output for key in outputs}
    return keras.Model(model.input, tensors, name=f"{model.name}_features")


def attention_model(model):
    """A model with the same weights that returns every block's attention.

    Output: a list with one (batch, heads, tokens, tokens) tensor per
    Transformer block, the softmax attention probabilities.
    """
    blocks = _blocks(model)
    if not blocks:
        raise ValueError(f"Model {model.name!r} has no TransformerBlock layers.")
    scores = [_AttentionScores(block)(block.input) for block in blocks]
    return keras.Model(model.input, scores, name=f"{model.name}_attention")


class _AttentionScores(layers.Layer):
    """Calls a block for its attention probabilities alone.

    Calling the block itself a second time with another output structure
    trips Keras' functional graph check, which reads a layer's first call.
    """

    def __init__(self, block):
        super().__init__(name=f"{block.name}_attention", dtype=block.dtype_policy)
        self.block = block

    def call(self, tokens):
        return self.block(tokens, return_attention_scores=True)[1]


def format_constructors_table():
    """The constructors as a text table: variant, parameters, GFLOPs at 224."""
    rows = [("constructor", "ResNet stages", "width", "depth", "heads", "MLP", "patch", "params (1000 classes)", "GFLOPs @224")]
    for name, constructor in CONSTRUCTORS.items():
        config = constructor.config
        rows.append((
            name,
            str(config["block_sizes"]) if "block_sizes" in config else "-",
            str(config["hidden_size"]),
            str(config["depth"]),
            str(config["num_heads"]),
            str(config["mlp_dim"]),
            str(config["patch_size"]),
            f"{parameter_count(**config):,}",
            f"{gflops(**config):.1f}",
        ))
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows)


def _patched_input(image_size, block_sizes, width_factor):
    """(side, channels) of what the patches are cut from: the image, or a hybrid's ResNet output."""
    if block_sizes is None:
        return image_size, 3
    return hybrid.feature_map_side(block_sizes, image_size), hybrid.output_channels(block_sizes, width_factor)


def parameter_count(patch_size, hidden_size, depth, num_heads, mlp_dim, image_size=224, classes=1000,
                    block_sizes=None, width_factor=1):
    """Parameters of a ViT with a class token and a head, without building it.

    With `block_sizes` (and `width_factor`): a hybrid, its ResNet included.
    """
    del num_heads  # the heads split the width; they add no parameters
    side, channels = _patched_input(image_size, block_sizes, width_factor)
    tokens = (side // patch_size) ** 2 + 1
    block = 4 * (hidden_size**2 + hidden_size) + 2 * hidden_size * mlp_dim + mlp_dim + hidden_size + 4 * hidden_size
    return (
        (0 if block_sizes is None else hybrid.stem_parameter_count(block_sizes, width_factor))
        + patch_size**2 * channels * hidden_size + hidden_size  # patch embedding
        + hidden_size + tokens * hidden_size  # class token, position embedding
        + depth * block
        + 2 * hidden_size  # final LayerNorm
        + hidden_size * classes + classes
    )


def gflops(patch_size, hidden_size, depth, num_heads, mlp_dim, image_size=224, classes=1000,
           block_sizes=None, width_factor=1):
    """Multiply-accumulates x 2 of one forward pass, in GFLOPs (matmuls and
    convolutions only); `block_sizes`, `width_factor`: a hybrid's ResNet."""
    del num_heads
    side, channels = _patched_input(image_size, block_sizes, width_factor)
    tokens = (side // patch_size) ** 2 + 1
    patches = tokens - 1
    macs = patches * patch_size**2 * channels * hidden_size
    if block_sizes is not None:
        macs += hybrid.stem_macs(block_sizes, width_factor, image_size)
    macs += depth * (
        4 * tokens * hidden_size**2  # q, k, v, out projections
        + 2 * tokens * tokens * hidden_size  # scores and weighted sum
        + 2 * tokens * hidden_size * mlp_dim
    )
    macs += hidden_size * classes
    return 2 * macs / 1e9
