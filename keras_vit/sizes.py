"""Model sizes without building a model: parameters and multiply-accumulates from a configuration.

The keywords are a constructor's `config` (`keras_vit.ViT_B16.config`):

    sizes.parameter_count(**keras_vit.ViT_B16.config)          # 86,567,656
    sizes.multiply_accumulates(**keras_vit.ViT_B16.config)     # 17.6 G
"""

from keras_vit import hybrid


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
        macs += hybrid.stem_macs(block_sizes, width_factor, image_size)
    macs += depth * (
        4 * tokens * hidden_size**2  # q, k, v, out projections
        + 2 * tokens * tokens * hidden_size  # scores and weighted sum
        + 2 * tokens * hidden_size * mlp_dim
    )
    macs += hidden_size * classes
    return macs
