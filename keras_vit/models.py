"""The Vision Transformer builder, its variants table and the application constructors.

`ViT()` builds any size; `VARIANTS` and `HYBRID_VARIANTS` (keras_vit.variants) name
the official ones, and each has a constructor with the `keras.applications`
signature (`ViT_B16`, `R50_ViT_B16`, ...). Layer names of a built model (the
contract that `keras_vit.npz` and `keras_vit.views` rely on):

    image_size_check     ImageSizeCheck (models of any size only)
    rescaling            pixels [0, 255] -> [-1, 1] (with include_preprocessing)
    resnet_stem          ResNetStem (hybrids only)
    patch_embed          PatchEncoder: (batch, rows*cols, width)      "stem"
    class_token          ClassToken (absent with class_token=False)
    position_embedding   PositionEmbedding                            "with_posemb"
    embedding_dropout    Dropout
    block_00 ... block_NN  TransformerBlock
    encoder_norm         LayerNormalization                           "encoded"
    pool                 TokenPooling ("token" | "gap")
    pre_logits           Dense + tanh (only with representation_size)
    predictions          Dense head, zero-initialised, float32        "predictions"
"""

import contextlib
import difflib
import inspect
import numbers
import textwrap

import keras
from keras import layers

from keras_vit import hybrid, pretrained, registry
from keras_vit import layers as vit_layers
from keras_vit.errors import is_whole_number
from keras_vit.variants import (  # noqa: F401 (the tables, also keras_vit.models.*)
    CONSTRUCTOR_VARIANTS, VARIANTS, display_name, variant_config,
)

DEFAULT_IMAGE_SIZE = 224

# The keras.applications arguments, documented once for ViT() and every constructor.
APPLICATION_ARGS = """\
        include_top: whether to end with the classification head.
        weights: None (random initialisation), a checkpoint tag or official
            file name (see `keras_vit.list_weights()`), an official `.npz`
            file or a Keras `.weights.h5` file (see `keras_vit.pretrained`).
        input_tensor: optional Keras tensor to use as the image input.
        input_shape: (height, width, 3), multiples of {multiple}; default
            224x224, or the checkpoint's resolution. (None, None, 3): any
            size (multiples of {multiple}) at call time; the position
            embedding keeps the checkpoint's grid (else 224 px) and is
            resampled to each input's grid with `posemb_interpolation`.
        pooling: "token" (class token), "gap" (mean of the patch tokens; "avg"
            is accepted, the keras.applications name) or None. With include_top the default is "token"; without it, None
            returns the whole encoded token sequence (batch, tokens, width).
        classes: head size; default the checkpoint's, else 1000. With
            pretrained weights and another count, a zero-initialised head.
        classifier_activation: activation of the head ("softmax", None, ...).
        include_preprocessing: take pixels in [0, 255] and scale them to
            [-1, 1] inside the model (else give `preprocess_input` values).
        name: model name."""


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
    dtype=None,
    **weights_options,
):
    """Builds a Vision Transformer of any size as a functional Keras model.

    Args:
        patch_size: side of the square patches (or a (rows, cols) pair).
        hidden_size: token width.
        depth: number of Transformer blocks.
        num_heads: attention heads per block.
        mlp_dim: hidden size of each MLP.
        representation_size: width of the tanh `pre_logits` layer before the
            head (the ImageNet-21k checkpoints have one); None for none.
{application_args}
        dropout_rate, attention_dropout_rate, drop_path_rate: regularisation;
            the drop-path rate grows linearly from 0 to this over the blocks.
        class_token: prepend a class token (all official ViT checkpoints do).
        gelu_approximate: tanh-approximate GELU, as the official Flax model.
        posemb_interpolation: how a position embedding stored for another
            grid is resized (on load, or at each call for a model of any
            size): "zoom" (official) or "bicubic".
        stem: optional callable mapping the scaled image tensor to a feature
            map that the patches are taken from (the hybrid models' ResNet).
        architecture: the constructor name ("ViT_B16"), which checkpoint tags
            are looked up for; set by the constructors.
        dtype: the dtype policy of every layer but the float32 head (a
            `stem`'s too); None: Keras's global policy. "mixed_bfloat16":
            float32 weights, bf16 arithmetic, for training; "bfloat16": bf16
            weights, for inference (as close to float32 as mixed_bfloat16,
            without casting every weight at every call, in half the memory).
        **weights_options: `keep_pre_logits`, `expected_sha256` (see
            `keras_vit.pretrained`).
    """
    _check_argument_names(weights_options, architecture)
    policy = _dtype_policy(dtype)
    if pooling == "avg":  # the keras.applications spelling
        pooling = "gap"
    if include_top and pooling is None:
        pooling = "token"
    if pooling not in (None, "token", "gap"):
        raise ValueError(f'Unknown pooling {pooling!r}; use "token", "gap" (or "avg") or None.')
    sizes = dict(patch_size=patch_size, hidden_size=hidden_size, depth=depth, num_heads=num_heads, mlp_dim=mlp_dim)
    if include_top and classes is not None:
        sizes["classes"] = classes
    for argument, value in sizes.items():
        for number in value if isinstance(value, (tuple, list)) else (value,):
            if not is_whole_number(number) or number < 1:
                raise ValueError(f"{argument} must be a positive whole number, got {value!r}.")
    rates = dict(dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate,
                 drop_path_rate=drop_path_rate)
    for argument, value in rates.items():
        if not isinstance(value, numbers.Real) or not 0 <= value < 1:
            raise ValueError(f"{argument} must be a fraction in [0, 1), got {value!r}.")

    # Weights may fix the class count, head and resolution: resolve them first.
    plan = pretrained.plan(
        weights,
        architecture=architecture,
        include_top=include_top,
        classes=classes,
        representation_size=representation_size,
        input_shape=input_shape,
        **weights_options,
    )
    classes = plan.classes if plan.classes is not None else 1000
    representation_size = plan.representation_size
    patch_size = vit_layers.as_pair(patch_size)
    # Input pixels per token: the patch size, times the ResNet's stride for a hybrid.
    stride = getattr(stem, "stride", 1) if stem is not None else 1
    patch_pixels = (patch_size[0] * stride, patch_size[1] * stride)
    input_shape = _image_shape(plan.input_shape, input_tensor, patch_size, stem, patch_pixels)
    any_size = input_shape[0] is None or input_shape[1] is None

    with _global_dtype_policy(policy):
        if input_tensor is None:
            inputs = layers.Input(shape=input_shape, name="images")
        elif not keras.utils.is_keras_tensor(input_tensor):
            inputs = layers.Input(tensor=input_tensor, shape=input_shape, name="images")
        else:
            inputs = input_tensor

        x = inputs
        if any_size:
            x = vit_layers.ImageSizeCheck(patch_pixels, name="image_size_check")(x)
        if include_preprocessing:
            x = vit_layers.pixel_rescaling()(x)
        images = x
        if stem is not None:
            x = stem(x)
            if not any_size:
                _check_feature_map(x.shape[1:3], patch_size, input_shape)

        patch_encoder = vit_layers.PatchEncoder(patch_size, hidden_size, name="patch_embed")
        feature_size = x.shape[1:3]  # a stem's SAME padding rounds up: not always input // stride
        x = patch_encoder(x)
        if class_token:
            x = vit_layers.ClassToken(name="class_token")(x)
        num_prefix_tokens = 1 if class_token else 0
        if any_size:
            # The stored embedding keeps one grid (the checkpoint's, else 224 px);
            # each call resamples it to the images' grid.
            side = plan.resolution or DEFAULT_IMAGE_SIZE
            grid_size = (side // patch_pixels[0], side // patch_pixels[1])
            x = vit_layers.PositionEmbedding(
                grid_size, num_prefix_tokens, posemb_interpolation, patch_pixels=patch_pixels,
                name="position_embedding",
            )(x, images)
        else:
            grid_size = patch_encoder.grid_size(feature_size)
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
                name=f"block_{index:02d}",
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


ViT.__doc__ = ViT.__doc__.format(application_args=APPLICATION_ARGS.format(multiple="the patch size"))


# timm's and keras_hub's names for ViT()'s arguments: a user coming from
# them gets ours in the error, not Python's bare "unexpected keyword argument".
_OTHER_SPELLINGS = {
    "num_classes": "classes",
    "img_size": "input_shape",
    "image_size": "input_shape",
    "image_shape": "input_shape",
    "drop_rate": "dropout_rate",
    "attn_drop_rate": "attention_dropout_rate",
    "global_pool": "pooling",
    "pretrained": "weights",
    "embed_dim": "hidden_size",
    "num_layers": "depth",
    "intermediate_dim": "mlp_dim",
}
_EXAMPLES = {"input_shape": "input_shape=(size, size, 3)", "weights": 'weights="in21k" (see keras_vit.list_weights())'}


_POLICY_CHOICES = '"float32", "mixed_bfloat16" (training in bf16), "bfloat16" (bf16 inference) or "mixed_float16"'


def _dtype_policy(dtype):
    """`dtype` as a Keras policy (None stays None), or a one-line error."""
    if dtype is None:
        return None
    try:
        policy = keras.dtype_policies.get(dtype)
    except (TypeError, ValueError):
        raise ValueError(f"dtype={dtype!r} is not a Keras dtype policy; use {_POLICY_CHOICES}.") from None
    if getattr(policy, "quantization_mode", None):
        raise ValueError(
            f"dtype={dtype!r} is a quantized policy: build the model in float32 or mixed precision, load its "
            'weights, then call model.quantize("int8").'
        )
    if not keras.backend.is_float_dtype(policy.compute_dtype):
        raise ValueError(f"dtype={dtype!r} does not compute in floats; use {_POLICY_CHOICES}.")
    return policy


@contextlib.contextmanager
def _global_dtype_policy(policy):
    """Builds layers under `policy` (a user's stem's too, which takes no dtype
    argument), then gives back the caller's global policy; None: unchanged."""
    if policy is None:
        yield
        return
    previous = keras.config.dtype_policy()
    keras.config.set_dtype_policy(policy)
    try:
        yield
    finally:
        keras.config.set_dtype_policy(previous)


def _check_argument_names(weights_options, architecture):
    """ViT() and the constructors pass unknown keywords on to
    `pretrained.plan` as weights options: say which one is unknown and what
    to write instead, rather than plan()'s TypeError."""
    caller = architecture or "ViT"
    arguments = [name for name, parameter in inspect.signature(ViT).parameters.items()
                 if parameter.kind != parameter.VAR_KEYWORD]  # fmt: skip
    # plan()'s own options, those ViT() does not take itself (keep_pre_logits, expected_sha256).
    own_options = [name for name in inspect.signature(pretrained.plan).parameters if name not in arguments]
    # A constructor fixes its variant's sizes: those are not its arguments.
    fixed = {*CONSTRUCTORS[architecture].config, "stem"} if architecture in CONSTRUCTORS else set()
    for argument in weights_options:
        if argument in own_options:
            continue
        ours = _OTHER_SPELLINGS.get(argument)
        if ours in fixed:
            advice = f"{caller} has a fixed {ours}; build other sizes with keras_vit.ViT({ours}=...)"
        elif ours:
            advice = f"use {_EXAMPLES.get(ours, ours + '=')}"
        else:
            known = [name for name in arguments if name not in fixed and name != "architecture"]
            close = difflib.get_close_matches(argument, known + own_options, n=1)
            advice = f"did you mean {close[0]}=?" if close else f"see help(keras_vit.{caller}) for the arguments"
        raise TypeError(f"{caller}() got an unknown argument {argument!r}: {advice}")


def _image_shape(input_shape, input_tensor, patch_size, stem, patch_pixels):
    """The model's (height, width, 3); height and width may be None (a model
    of any size, whose inputs are checked when it is called)."""
    if input_shape is None and input_tensor is not None and len(input_tensor.shape) == 4:
        input_shape = tuple(input_tensor.shape[1:])
    if input_shape is None:
        input_shape = (DEFAULT_IMAGE_SIZE, DEFAULT_IMAGE_SIZE, 3)
    input_shape = tuple(input_shape)
    if len(input_shape) != 3 or input_shape[-1] != 3:
        raise ValueError(f"input_shape must be (height, width, 3), got {input_shape}.")
    height, width = input_shape[:2]
    if height is None or width is None:
        if stem is not None and not hasattr(stem, "stride"):
            raise ValueError(
                f"input_shape {input_shape}: a model of any size needs a stem with a known `stride` "
                "(keras_vit.hybrid.stem_builder's); give a fixed height and width."
            )
        for side, multiple in ((height, patch_pixels[0]), (width, patch_pixels[1])):
            if side is not None and side % multiple:
                raise ValueError(
                    f"input_shape {input_shape}: {side} is not a multiple of {multiple}, the input "
                    "pixels per token; give a multiple, or None for any size."
                )
        return input_shape
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
# The application constructors: one per row of VARIANTS and HYBRID_VARIANTS
# ---------------------------------------------------------------------------

_CONSTRUCTOR_DOC = """Builds {title}.

    {description}
    With `include_preprocessing=True` (the default) the model takes pixels
    in [0, 255].

    Args:
{application_args}
        **kwargs: other arguments of `keras_vit.ViT` (dtype, dropout_rate,
            drop_path_rate, representation_size, keep_pre_logits, ...).

    Returns:
        A `keras.Model`.
    """


def _constructor(variant):
    """Marks a function as the constructor of `variant` and gives it the shared docstring."""

    def decorate(function):
        config = variant_config(variant)
        if "block_sizes" in config:
            title = f"{display_name(variant)}, a hybrid Vision Transformer of Dosovitskiy et al. (2021)"
            description = (
                "A ResNet (units per stage {block_sizes}, stride {stride}) feeds {patch_size}x{patch_size} "
                "patches of its feature map to a Transformer of width {hidden_size}, {depth} blocks, "
                "{num_heads} heads, MLP {mlp_dim}."
            )
            stride = hybrid.total_stride(config["block_sizes"])
        else:
            title = f"{display_name(variant)}, the {variant} Vision Transformer of Dosovitskiy et al. (2021)"
            description = "Width {hidden_size}, {depth} blocks, {num_heads} heads, MLP {mlp_dim}, "
            description += "{patch_size}x{patch_size} patches."
            stride = 1
        description = textwrap.fill(description.format(stride=stride, **config), width=72,
                                    subsequent_indent="    ")
        function.__doc__ = _CONSTRUCTOR_DOC.format(
            title=title, description=description,
            application_args=APPLICATION_ARGS.format(multiple=stride * config["patch_size"]),
        )
        function.variant = variant
        function.config = config  # the keywords of keras_vit.sizes.parameter_count and multiply_accumulates
        return function

    return decorate


def _build(constructor, arguments):
    """Calls ViT() with a constructor's variant and its own arguments (its `locals()`)."""
    arguments = dict(arguments)
    kwargs = arguments.pop("kwargs")
    config = dict(constructor.config)
    if "block_sizes" in config:
        config["stem"] = hybrid.stem_builder(config.pop("block_sizes"), config.pop("width_factor"))
    return ViT(**config, **arguments, architecture=constructor.__name__, **kwargs)


@_constructor("Ti/16")
def ViT_Ti16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
             classifier_activation="softmax", include_preprocessing=True, name="vit_ti16", **kwargs):
    return _build(ViT_Ti16, locals())


@_constructor("S/16")
def ViT_S16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_s16", **kwargs):
    return _build(ViT_S16, locals())


@_constructor("S/32")
def ViT_S32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_s32", **kwargs):
    return _build(ViT_S32, locals())


@_constructor("B/8")
def ViT_B8(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
           classifier_activation="softmax", include_preprocessing=True, name="vit_b8", **kwargs):
    return _build(ViT_B8, locals())


@_constructor("B/16")
def ViT_B16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_b16", **kwargs):
    return _build(ViT_B16, locals())


@_constructor("B/32")
def ViT_B32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_b32", **kwargs):
    return _build(ViT_B32, locals())


@_constructor("L/16")
def ViT_L16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_l16", **kwargs):
    return _build(ViT_L16, locals())


@_constructor("L/32")
def ViT_L32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_l32", **kwargs):
    return _build(ViT_L32, locals())


@_constructor("H/14")
def ViT_H14(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
            classifier_activation="softmax", include_preprocessing=True, name="vit_h14", **kwargs):
    return _build(ViT_H14, locals())


@_constructor("R+Ti/16")
def R_ViT_Ti16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
               classifier_activation="softmax", include_preprocessing=True, name="vit_r_ti16", **kwargs):
    return _build(R_ViT_Ti16, locals())


@_constructor("R26+S/32")
def R26_ViT_S32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
                classifier_activation="softmax", include_preprocessing=True, name="vit_r26_s32", **kwargs):
    return _build(R26_ViT_S32, locals())


@_constructor("R50+B/16")
def R50_ViT_B16(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
                classifier_activation="softmax", include_preprocessing=True, name="vit_r50_b16", **kwargs):
    return _build(R50_ViT_B16, locals())


@_constructor("R50+L/32")
def R50_ViT_L32(include_top=True, weights=None, input_tensor=None, input_shape=None, pooling=None, classes=None,
                classifier_activation="softmax", include_preprocessing=True, name="vit_r50_l32", **kwargs):
    return _build(R50_ViT_L32, locals())


# variants.CONSTRUCTOR_VARIANTS names them (keras-free, for `keras-vit list`).
CONSTRUCTORS = {name: globals()[name] for name in CONSTRUCTOR_VARIANTS}


def get_constructor(name):
    """The constructor called `name` ("ViT_B16"), or an error listing them all."""
    try:
        return CONSTRUCTORS[name]
    except KeyError:
        raise ValueError(f"Unknown model {name!r}; choose one of: {', '.join(CONSTRUCTORS)}.") from None


def from_name(name, **kwargs):
    """Builds the model a timm name designates, with that official file:

        keras_vit.from_name("vit_base_patch16_224.augreg_in21k_ft_in1k")

    Only names of files in the registry (`keras_vit.registry.timm_names()`,
    `keras_vit.list_weights()`); `kwargs` are the constructor's (`classes`,
    `input_shape`, `include_top`, ...).
    """
    names = registry.timm_names()
    if name not in names:
        model_name = name.partition(".")[0]
        architectures = {timm_name.partition(".")[0]: entry.architecture for timm_name, entry in names.items()}
        architecture = architectures.get(model_name)
        if architecture is None:
            raise ValueError(
                f"Unknown timm name {name!r}: keras_vit has official files for "
                f"{', '.join(sorted(architectures))} (as model.tag); see keras_vit.list_weights()."
            )
        raise ValueError(
            f"timm name {name!r} is not an official file keras_vit registers; {architecture}'s timm names: "
            f"{', '.join(registry.timm_tags_for(architecture))}; "
            f"its tags: {', '.join(registry.tags_for(architecture))}."
        )
    entry = names[name]
    return get_constructor(entry.architecture)(weights=entry.official_name, **kwargs)
