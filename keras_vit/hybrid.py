"""The hybrid models' ResNet: the paper's "Hybrid Architecture" (section 3.1).

A hybrid Vision Transformer takes its patches from the feature map of a
ResNet instead of from the pixels. The ResNet is BiT's flavour, as in
google-research/vision_transformer (`models_resnet.py`, `models_vit.py`):

    conv_root   7x7/2 weight-standardised convolution, GroupNorm, ReLU,
                3x3/2 max pooling (SAME padding: total stride 4)
    block1..N   stages of bottleneck units; stage s has 64*2^(s-1) features
                (x width_factor) and 4x that many outputs; every stage but
                the first starts with stride 2

A bottleneck unit is conv1 (1x1) -> conv2 (3x3, the stride) -> conv3 (1x1),
each followed by GroupNorm (32 groups), ReLU after the first two, and a
projection shortcut (conv_proj + gn_proj) when the shape changes; the sum goes
through a ReLU (the official unit normalises after each convolution; its
ResNet is "v2" by its weight standardisation and GroupNorm).

Numerics are the official Flax model's: the kernel is standardised as
(w - mean) / (std + 1e-5) over (height, width, input) per output filter, and
GroupNorm's epsilon is Flax's 1e-6.

Every layer here is serializable and computes with `keras.ops` only. The
ResNet of a built model is one layer named `resnet_stem` (`STEM_LAYER_NAME`);
`keras_vit.npz` maps the official checkpoint keys onto its variables.
"""

import math

import keras
from keras import layers, ops

from keras_vit.layers import serializable

STEM_LAYER_NAME = "resnet_stem"  # the checkpoint loader looks for this layer
STD_CONV_EPSILON = 1e-5  # official weight_standardize: (w - mean) / (std + eps)
GROUP_NORM_EPSILON = 1e-6  # flax.linen.GroupNorm's default
GROUP_NORM_GROUPS = 32
ROOT_WIDTH = 64  # features of conv_root and of the first stage, x width_factor

# The hybrids of the paper (R50+ViT-B/16) and of the AugReg release, from the
# official configs (vision_transformer configs/models.py). `transformer` is the
# row of keras_vit.VARIANTS whose width, depth, heads and MLP the Transformer
# has; `patch_size` is taken on the ResNet's feature map; `block_sizes` are the
# units per ResNet stage (() = the root block alone, stride 4: R+Ti/16's 8x8
# patches make 32 pixels per token, as the official code and timm compute,
# though its config's comment speaks of /16).
HYBRID_VARIANTS = {
    "R+Ti/16": dict(transformer="Ti/16", patch_size=8, block_sizes=(), width_factor=1),
    "R26+S/32": dict(transformer="S/32", patch_size=1, block_sizes=(2, 2, 2, 2), width_factor=1),
    "R50+B/16": dict(transformer="B/16", patch_size=1, block_sizes=(3, 4, 9), width_factor=1),
    "R50+L/32": dict(transformer="L/32", patch_size=1, block_sizes=(3, 4, 6, 3), width_factor=1),
}


def standardize_kernel(kernel, epsilon=STD_CONV_EPSILON):
    """(kernel - mean) / (std + epsilon) per output filter, in float32 at least."""
    dtype = kernel.dtype
    kernel = ops.cast(kernel, keras.backend.result_type(dtype, "float32"))
    axes = tuple(range(len(kernel.shape) - 1))
    kernel = kernel - ops.mean(kernel, axis=axes, keepdims=True)
    kernel = kernel / (ops.std(kernel, axis=axes, keepdims=True) + epsilon)
    return ops.cast(kernel, dtype)


@serializable
class StdConv2D(layers.Conv2D):
    """A `Conv2D` that standardises its kernel on every call (weight standardisation).

    The stored kernel is the raw one (as in the official checkpoints); the
    convolution uses it with zero mean and unit standard deviation over
    (height, width, input channels) for each output filter. Defaults as the
    official ResNet: SAME padding, no bias.
    """

    def __init__(self, filters, kernel_size, strides=1, padding="same", use_bias=False,
                 epsilon=STD_CONV_EPSILON, **kwargs):
        super().__init__(filters, kernel_size, strides=strides, padding=padding, use_bias=use_bias, **kwargs)
        self.epsilon = float(epsilon)

    def convolution_op(self, inputs, kernel):
        return super().convolution_op(inputs, standardize_kernel(kernel, self.epsilon))

    def get_config(self):
        config = super().get_config()
        config.update(epsilon=self.epsilon)
        return config


def _group_norm(name, policy, gamma_initializer="ones"):
    return layers.GroupNormalization(
        groups=GROUP_NORM_GROUPS,
        epsilon=GROUP_NORM_EPSILON,
        gamma_initializer=gamma_initializer,
        dtype=policy,
        name=name,
    )


@serializable
class BottleneckUnit(layers.Layer):
    """The official bottleneck unit: 1x1 -> 3x3 (strided) -> 1x1, 4x expansion.

        y = relu(gn1(conv1(x))); y = relu(gn2(conv2(y))); y = gn3(conv3(y))
        out = relu(shortcut(x) + y)

    `shortcut` is gn_proj(conv_proj(x)) when the unit changes the width or
    the resolution, else the identity. gn3's scale starts at zero, as the
    official model's, so a fresh unit starts as its shortcut.
    """

    def __init__(self, features, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.features = int(features)
        self.strides = int(strides)
        policy = self.dtype_policy
        outputs = 4 * self.features
        self.conv1 = StdConv2D(self.features, 1, dtype=policy, name="conv1")
        self.gn1 = _group_norm("gn1", policy)
        self.conv2 = StdConv2D(self.features, 3, strides=self.strides, dtype=policy, name="conv2")
        self.gn2 = _group_norm("gn2", policy)
        self.conv3 = StdConv2D(outputs, 1, dtype=policy, name="conv3")
        self.gn3 = _group_norm("gn3", policy, gamma_initializer="zeros")
        self.conv_proj = None  # whether there is a projection depends on the input width
        self.gn_proj = None

    def build(self, input_shape):
        outputs = 4 * self.features
        if input_shape[-1] != outputs or self.strides != 1:
            policy = self.dtype_policy
            self.conv_proj = StdConv2D(outputs, 1, strides=self.strides, dtype=policy, name="conv_proj")
            self.gn_proj = _group_norm("gn_proj", policy)
            self.conv_proj.build(input_shape)
            self.gn_proj.build(self.conv_proj.compute_output_shape(input_shape))
        shape = input_shape
        for conv, norm in self.convs_and_norms()[:3]:
            conv.build(shape)
            shape = conv.compute_output_shape(shape)
            norm.build(shape)
        self.built = True

    def convs_and_norms(self):
        """(conv, norm) pairs in official order: 1, 2, 3, then the projection if any."""
        pairs = [(self.conv1, self.gn1), (self.conv2, self.gn2), (self.conv3, self.gn3)]
        if self.conv_proj is not None:
            pairs.append((self.conv_proj, self.gn_proj))
        return pairs

    def call(self, inputs):
        shortcut = inputs
        if self.conv_proj is not None:
            shortcut = self.gn_proj(self.conv_proj(inputs))
        y = ops.relu(self.gn1(self.conv1(inputs)))
        y = ops.relu(self.gn2(self.conv2(y)))
        y = self.gn3(self.conv3(y))
        return ops.relu(shortcut + y)

    def compute_output_shape(self, input_shape):
        shape = self.conv2.compute_output_shape(tuple(input_shape))
        return shape[:-1] + (4 * self.features,)

    def get_config(self):
        config = super().get_config()
        config.update(features=self.features, strides=self.strides)
        return config


@serializable
class ResNetStage(layers.Layer):
    """`num_units` bottleneck units ("unit1", ...); the first one has the stride."""

    def __init__(self, num_units, features, strides=1, **kwargs):
        super().__init__(**kwargs)
        self.num_units = int(num_units)
        self.features = int(features)
        self.strides = int(strides)
        self.units = [
            BottleneckUnit(
                self.features,
                strides=self.strides if index == 0 else 1,
                dtype=self.dtype_policy,
                name=f"unit{index + 1}",
            )
            for index in range(self.num_units)
        ]

    def build(self, input_shape):
        shape = input_shape
        for unit in self.units:
            unit.build(shape)
            shape = unit.compute_output_shape(shape)
        self.built = True

    def call(self, inputs):
        x = inputs
        for unit in self.units:
            x = unit(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = tuple(input_shape)
        for unit in self.units:
            shape = unit.compute_output_shape(shape)
        return shape

    def get_config(self):
        config = super().get_config()
        config.update(num_units=self.num_units, features=self.features, strides=self.strides)
        return config


@serializable
class ResNetStem(layers.Layer):
    """The hybrid models' ResNet: root block and stages, image -> feature map.

    Args:
        block_sizes: units per stage, e.g. (3, 4, 9) for R50+ViT-B/16; () for
            the root block alone (R+ViT-Ti/16).
        width_factor: multiplies every stage's width (64 features at the root).
    Output: (batch, ceil(H / stride), ceil(W / stride), channels) with
    `stride` = `total_stride(block_sizes)` and `channels` = `output_channels`.
    """

    def __init__(self, block_sizes=(3, 4, 9), width_factor=1, **kwargs):
        super().__init__(**kwargs)
        self.block_sizes = tuple(int(size) for size in block_sizes)
        if any(size < 1 for size in self.block_sizes):
            raise ValueError(f"block_sizes must be positive unit counts, got {self.block_sizes}.")
        self.width_factor = width_factor
        self.width = root_width(width_factor)
        policy = self.dtype_policy
        self.conv_root = StdConv2D(self.width, 7, strides=2, dtype=policy, name="conv_root")
        self.gn_root = _group_norm("gn_root", policy)
        self.pool = layers.MaxPooling2D(3, strides=2, padding="same", dtype=policy, name="pool")
        self.stages = [
            ResNetStage(
                size,
                self.width * 2**index,
                strides=1 if index == 0 else 2,
                dtype=policy,
                name=f"block{index + 1}",
            )
            for index, size in enumerate(self.block_sizes)
        ]

    def build(self, input_shape):
        self.conv_root.build(input_shape)
        shape = self.conv_root.compute_output_shape(input_shape)
        self.gn_root.build(shape)
        shape = self.pool.compute_output_shape(shape)
        for stage in self.stages:
            stage.build(shape)
            shape = stage.compute_output_shape(shape)
        self.built = True

    def call(self, images):
        x = ops.relu(self.gn_root(self.conv_root(images)))
        x = self.pool(x)
        for stage in self.stages:
            x = stage(x)
        return x

    def compute_output_shape(self, input_shape):
        shape = self.pool.compute_output_shape(self.conv_root.compute_output_shape(tuple(input_shape)))
        for stage in self.stages:
            shape = stage.compute_output_shape(shape)
        return shape

    def get_config(self):
        config = super().get_config()
        config.update(block_sizes=self.block_sizes, width_factor=self.width_factor)
        return config


def root_width(width_factor=1):
    """Features of the root convolution and of the first stage: ROOT_WIDTH x width_factor."""
    return int(ROOT_WIDTH * width_factor)


def stem_builder(block_sizes=(3, 4, 9), width_factor=1):
    """A `stem=` for `keras_vit.ViT`: each call adds a fresh `resnet_stem` layer.

        model = keras_vit.ViT(patch_size=1, ..., stem=stem_builder((3, 4, 9)))
    """
    block_sizes = tuple(block_sizes)

    def stem(images):
        return ResNetStem(block_sizes, width_factor, name=STEM_LAYER_NAME)(images)

    stem.stride = total_stride(block_sizes)  # input pixels per feature-map pixel
    return stem


# ---------------------------------------------------------------------------
# Sizes without building (the constructors table, the tests)
# ---------------------------------------------------------------------------


def total_stride(block_sizes):
    """Downscaling of the ResNet: 4 for the root block, x2 per stage after the first."""
    return 4 * 2 ** max(len(block_sizes) - 1, 0)


def output_channels(block_sizes, width_factor=1):
    """Channels of the ResNet's output feature map (the patches' input)."""
    width = root_width(width_factor)
    return 4 * width * 2 ** (len(block_sizes) - 1) if block_sizes else width


def _convs(block_sizes, width_factor, image_size):
    """Yields (kernel, in, out, output side) of every convolution, in order."""
    width = root_width(width_factor)
    side = math.ceil(image_size / 2)  # SAME padding: output side = ceil(input / stride)
    yield 7, 3, width, side
    side = math.ceil(side / 2)  # max pooling
    channels = width
    for index, size in enumerate(block_sizes):
        features = width * 2**index
        for unit in range(size):
            strides = 2 if index > 0 and unit == 0 else 1
            out_side = math.ceil(side / strides)
            if channels != 4 * features or strides != 1:
                yield 1, channels, 4 * features, out_side
            yield 1, channels, features, side
            yield 3, features, features, out_side
            yield 1, features, 4 * features, out_side
            channels, side = 4 * features, out_side


def stem_parameter_count(block_sizes, width_factor=1):
    """Parameters of the ResNet: bias-free kernels plus a GroupNorm scale and bias each."""
    return sum(k * k * cin * cout + 2 * cout for k, cin, cout, _ in _convs(block_sizes, width_factor, 224))


def stem_macs(block_sizes, width_factor=1, image_size=224):
    """Multiply-accumulates of the ResNet's convolutions for a square image."""
    return sum(side * side * k * k * cin * cout for k, cin, cout, side in _convs(block_sizes, width_factor, image_size))


def feature_map_side(block_sizes, image_size=224):
    """Side of the ResNet's output for a square image (SAME padding rounds up)."""
    side = math.ceil(math.ceil(image_size / 2) / 2)
    for _ in block_sizes[1:]:
        side = math.ceil(side / 2)
    return side
