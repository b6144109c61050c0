"""Model sizes without building a model: parameters and multiply-accumulates from a configuration.

The keywords are a constructor's `config` (`keras_vit.ViT_B16.config`):

    sizes.parameter_count(**keras_vit.ViT_B16.config)          # 86,567,656
    sizes.multiply_accumulates(**keras_vit.ViT_B16.config)     # 17.6 G
"""

import math

ROOT_WIDTH = 64  # features of a hybrid ResNet's conv_root and first stage, x width_factor


def _patched_input(image_size, block_sizes, width_factor):
    """(side, channels) of what the patches are cut from: the image, or a hybrid's ResNet output."""
    if block_sizes is None:
        return image_size, 3
    return feature_map_side(block_sizes, image_size), output_channels(block_sizes, width_factor)


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
        (0 if block_sizes is None else stem_parameter_count(block_sizes, width_factor))
        + patch_size**2 * channels * hidden_size + hidden_size  # patch embedding
        + hidden_size + tokens * hidden_size  # class token, position embedding
        + depth * block
        + 2 * hidden_size  # final LayerNorm
        + hidden_size * classes + classes
    )


def multiply_accumulates(patch_size, hidden_size, depth, num_heads, mlp_dim, image_size=224, classes=1000,
                         block_sizes=None, width_factor=1):
    """Multiply-accumulates (MACs) of one forward pass of one image: its
    matmuls and convolutions, the rest is negligible. FLOPs are twice this.
    `block_sizes`, `width_factor`: a hybrid's ResNet."""
    del num_heads
    side, channels = _patched_input(image_size, block_sizes, width_factor)
    tokens = (side // patch_size) ** 2 + 1
    patches = tokens - 1
    macs = patches * patch_size**2 * channels * hidden_size
    if block_sizes is not None:
        macs += stem_macs(block_sizes, width_factor, image_size)
    macs += depth * (
        4 * tokens * hidden_size**2  # q, k, v, out projections
        + 2 * tokens * tokens * hidden_size  # scores and weighted sum
        + 2 * tokens * hidden_size * mlp_dim
    )
    macs += hidden_size * classes
    return macs


# ---------------------------------------------------------------------------
# A hybrid's ResNet (keras_vit.hybrid builds it; BiT's layout, see there)
# ---------------------------------------------------------------------------


def root_width(width_factor=1):
    """Features of the root convolution and of the first stage: ROOT_WIDTH x width_factor."""
    return int(ROOT_WIDTH * width_factor)


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
