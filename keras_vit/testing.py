"""Random checkpoints in Google's official `.npz` layouts, for tests and benchmarks.

    arrays = official_arrays(patch_size=16, hidden_size=192, depth=12,
                             num_heads=3, mlp_dim=768, image_size=224,
                             classes=1000)
    write_checkpoint(path, arrays, layout="plain")   # or "opt_target", "big_vision"

`official_arrays` yields (key, array) pairs with the vision_transformer key
names (no prefix), lazily: a ViT-L/16-sized checkpoint can be written without
holding it in memory. Values are random but well scaled (kernels ~ 1/sqrt(fan
in)), so a deep model's logits stay O(1) and comparisons are meaningful.

Layouts written by `write_checkpoint`:
    plain        the original files' keys
    opt_target   every key under `opt/target/`, plus an optimizer-state array
                 outside it (as files saved with a Flax optimizer)
    big_vision   keys under `params/`, blocks with linen numbering
                 (LayerNorm_0, MultiHeadDotProductAttention_0, LayerNorm_1,
                 MlpBlock_0), a top-level `pos_embedding` without the
                 class-token entry; that entry is folded into `cls` (as
                 big_vision's fix_old_checkpoints does in reverse), so the
                 file computes exactly the function of the plain one.

Hybrid models: pass their ResNet arrays (official names such as
`conv_root/kernel`) as `extra`; they are written unchanged in every layout.
"""

import os
import zipfile

import numpy as np

VIT_TO_BIG_VISION = {
    "MultiHeadDotProductAttention_1": "MultiHeadDotProductAttention_0",
    "LayerNorm_2": "LayerNorm_1",
    "MlpBlock_3": "MlpBlock_0",
}
POSEMB_KEY = "Transformer/posembed_input/pos_embedding"


def _pair(value):
    return (value, value) if isinstance(value, int) else tuple(value)


def official_arrays(patch_size, hidden_size, depth, num_heads, mlp_dim, image_size=224,
                    classes=1000, representation_size=None, seed=0, extra=None, in_channels=3,
                    grid_size=None):
    """Yields (official key, float32 array) of a random ViT checkpoint.

    classes=None: no head. representation_size: width of a pre_logits layer.
    grid_size: the posemb grid (rows, cols); default image_size // patch_size.
    """
    rng = np.random.default_rng(seed)
    patch = _pair(patch_size)
    rows, cols = grid_size or tuple(s // p for s, p in zip(_pair(image_size), patch))
    head_dim = hidden_size // num_heads

    def normal(shape, scale):
        return rng.normal(0.0, scale, shape).astype("float32")

    def dense(prefix, fan_in, shape_in, shape_out, bias_shape):
        yield f"{prefix}/kernel", normal(shape_in + shape_out, fan_in**-0.5)
        yield f"{prefix}/bias", normal(bias_shape, 0.02)

    def norm(prefix, width):
        yield f"{prefix}/scale", (1.0 + normal((width,), 0.1)).astype("float32")
        yield f"{prefix}/bias", normal((width,), 0.02)

    if extra:
        yield from extra.items()
    fan_in = patch[0] * patch[1] * in_channels
    yield from dense("embedding", fan_in, (patch[0], patch[1], in_channels), (hidden_size,), (hidden_size,))
    yield "cls", normal((1, 1, hidden_size), 0.02)
    yield POSEMB_KEY, normal((1, 1 + rows * cols, hidden_size), 0.02)
    for index in range(depth):
        block = f"Transformer/encoderblock_{index}"
        attention = f"{block}/MultiHeadDotProductAttention_1"
        yield from norm(f"{block}/LayerNorm_0", hidden_size)
        for name in ("query", "key", "value"):
            yield from dense(f"{attention}/{name}", hidden_size, (hidden_size,), (num_heads, head_dim),
                             (num_heads, head_dim))
        yield from dense(f"{attention}/out", hidden_size, (num_heads, head_dim), (hidden_size,), (hidden_size,))
        yield from norm(f"{block}/LayerNorm_2", hidden_size)
        yield from dense(f"{block}/MlpBlock_3/Dense_0", hidden_size, (hidden_size,), (mlp_dim,), (mlp_dim,))
        yield from dense(f"{block}/MlpBlock_3/Dense_1", mlp_dim, (mlp_dim,), (hidden_size,), (hidden_size,))
    yield from norm("Transformer/encoder_norm", hidden_size)
    width = hidden_size
    if representation_size:
        yield from dense("pre_logits", width, (width,), (representation_size,), (representation_size,))
        width = representation_size
    if classes:
        yield from dense("head", width, (width,), (classes,), (classes,))


def resnet_arrays(block_sizes, width_factor=1, seed=1, old_group_norm_shape=False):
    """{official key: array} of a random hybrid ResNet, for `official_arrays(extra=...)`.

    Written from vision_transformer's models_resnet.py / models_vit.py: conv_root
    (7x7), gn_root, then stage s (`block{s}`) of bottleneck units (`unit{u}`)
    with 64*2^(s-1) features (x width_factor): conv1 1x1, conv2 3x3, conv3 1x1
    to 4x the features, each with its GroupNorm, and conv_proj/gn_proj where
    the unit changes width or stride (every stage's first unit).
    old_group_norm_shape: GroupNorm arrays as (1, 1, 1, C), as older Flax saved them.
    """
    rng = np.random.default_rng(seed)
    arrays = {}

    def conv(name, size, cin, cout):
        arrays[f"{name}/kernel"] = rng.normal(0.0, (size * size * cin) ** -0.5, (size, size, cin, cout)).astype("float32")

    def group_norm(name, width):
        shape = (1, 1, 1, width) if old_group_norm_shape else (width,)
        arrays[f"{name}/scale"] = (1.0 + rng.normal(0.0, 0.1, shape)).astype("float32")
        arrays[f"{name}/bias"] = rng.normal(0.0, 0.1, shape).astype("float32")

    width = int(64 * width_factor)
    conv("conv_root", 7, 3, width)
    group_norm("gn_root", width)
    channels = width
    for stage, units in enumerate(block_sizes):
        features = width * 2**stage
        for unit in range(units):
            prefix = f"block{stage + 1}/unit{unit + 1}"
            if unit == 0:  # (stride 2 after stage 1, or new width): a projection shortcut
                conv(f"{prefix}/conv_proj", 1, channels, 4 * features)
                group_norm(f"{prefix}/gn_proj", 4 * features)
            for index, (size, cin, cout) in enumerate(
                [(1, channels, features), (3, features, features), (1, features, 4 * features)], 1
            ):
                conv(f"{prefix}/conv{index}", size, cin, cout)
                group_norm(f"{prefix}/gn{index}", cout)
            channels = 4 * features
    return arrays


def to_layout(items, layout="plain"):
    """Re-keys (key, array) pairs from the plain layout to `layout` (lazily)."""
    if layout == "plain":
        yield from items
    elif layout == "opt_target":
        for key, value in items:
            yield "opt/target/" + key, value
        yield "opt/state/step", np.asarray(1000, dtype="int32")
    elif layout == "big_vision":
        cls_posemb = None
        pending_cls = None
        for key, value in items:
            if key == POSEMB_KEY:
                cls_posemb = value[:, :1]
                yield "params/pos_embedding", value[:, 1:]
                if pending_cls is not None:
                    yield "params/cls", pending_cls + cls_posemb
                continue
            if key == "cls":
                if cls_posemb is None:
                    pending_cls = value
                    continue
                value = value + cls_posemb
            for old, new in VIT_TO_BIG_VISION.items():
                key = key.replace(f"/{old}/", f"/{new}/")
            yield "params/" + key, value
    else:
        raise ValueError(f"Unknown layout {layout!r}")


def write_npz(path, items):
    """Writes (key, array) pairs to an uncompressed .npz, one array at a time."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED, allowZip64=True) as archive:
        for key, value in items:
            with archive.open(key + ".npy", "w", force_zip64=True) as member:
                np.lib.format.write_array(member, np.asanyarray(value), allow_pickle=False)
    return path


def write_checkpoint(path, items, layout="plain"):
    """Writes official (key, array) pairs (dict or iterable) in `layout`; returns the path."""
    items = items.items() if isinstance(items, dict) else items
    return write_npz(os.fspath(path), to_layout(items, layout))


def resized_posemb_zoom(posemb, new_grid):
    """The official resize, written out independently of keras_vit: class-token
    entry kept, the square grid zoomed with scipy.ndimage.zoom(order=1)."""
    import scipy.ndimage

    side = int(round((posemb.shape[1] - 1) ** 0.5))
    grid = posemb[0, 1:].reshape(side, side, -1)
    zoomed = scipy.ndimage.zoom(grid, (new_grid[0] / side, new_grid[1] / side, 1), order=1)
    return np.concatenate([posemb[:, :1], zoomed.reshape(1, -1, posemb.shape[-1])], axis=1)

