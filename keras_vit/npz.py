"""Official `.npz` checkpoints -> keras_vit models: the archive reader, every layout quirk, the strict key matcher.

Loading (`load_npz`) is strict: every checkpoint array is used exactly once
and every model weight is set exactly once; anything else is one ValueError
naming the keys and shapes. The explicit exceptions, each asked for by an
argument or by how the model was built:
    new_head=True          the model's head is zero-initialised (as official
                           fine-tuning does); the checkpoint's head is unused
    drop_pre_logits=True   the checkpoint's pre_logits layer is unused
    include_top=False      (a model without head) takes the body alone
    another input size     the position embedding is resized to the model's
                           grid by its PositionEmbedding (official zoom by
                           default; see `posemb_interpolation`)
Arrays are read one at a time from the archive and assigned, so converting
needs the model plus about one array of extra memory, not a second copy of
the checkpoint.

The quarantine: every checkpoint quirk is handled here and nowhere else
(as big_vision's `fix_old_checkpoints`):
    * key prefixes: none (original files), `opt/target/` (files saved with
      their Flax optimizer: arrays outside `opt/target/` are its state and
      are ignored), `params/` (big_vision);
    * block sub-layer names: vision_transformer's pre-linen numbering
      (LayerNorm_0, MultiHeadDotProductAttention_1, LayerNorm_2, MlpBlock_3)
      or big_vision's linen numbering (LayerNorm_0, ..._0, LayerNorm_1,
      MlpBlock_0);
    * the position embedding at `Transformer/posembed_input/pos_embedding`,
      `Transformer/pos_embedding` or top-level `pos_embedding`; when it has
      no class-token entry (big_vision adds it before prepending the class
      token) a zero entry is prepended, which computes the same function;
    * old Flax GroupNorm scales/biases stored as (1, 1, 1, C) are squeezed
      (vision_transformer's `_fix_groupnorm`).
The Keras-variable <-> key table is `MODEL_KEYS`, `BLOCK_KEYS` and, for a
hybrid's ResNet, `STEM_PATH` below: the one place it is written. Attention
kernels already have the official shapes in Keras, (width, heads, head_dim)
and (heads, head_dim, width): nothing is reshaped.
"""

import dataclasses
import functools
import math
import os
import re
import zipfile
import zlib
from typing import Optional

import numpy as np

from keras_vit import download, variants
from keras_vit.errors import first_line
from keras_vit.hybrid import STEM_LAYER_NAME

MAX_LISTED = 6  # keys named per problem in an error line


# ---------------------------------------------------------------------------
# Reading .npz archives: one array at a time, shapes from the headers alone
# ---------------------------------------------------------------------------


class CorruptCheckpointError(ValueError):
    """The file is not a readable .npz archive (truncated, corrupt, not npz)."""


_READ_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError, OSError, ValueError, KeyError)


class _Archive:
    """An official `.npz` opened lazily (np.load(allow_pickle=False), always)."""

    def __init__(self, path):
        self.path = os.fspath(path)
        try:
            self._npz = np.load(self.path, allow_pickle=False)
        except FileNotFoundError:
            raise FileNotFoundError(f"Checkpoint file not found: {self.path}") from None
        except _READ_ERRORS as error:
            raise self._corrupt(error) from None
        if not isinstance(self._npz, np.lib.npyio.NpzFile):
            raise CorruptCheckpointError(f"{self.path} is a single array, not an .npz checkpoint archive.")
        self.shapes = self._read_shapes()

    def _corrupt(self, error):
        return CorruptCheckpointError(
            f"{self.path} is not a readable .npz checkpoint (truncated or corrupt: {first_line(error)})."
        )

    def _read_shapes(self):
        shapes = {}
        try:
            for member in self._npz.zip.namelist():
                if not member.endswith(".npy"):
                    continue
                with self._npz.zip.open(member) as file:
                    version = np.lib.format.read_magic(file)
                    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                                   (2, 0): np.lib.format.read_array_header_2_0}.get(version)
                    if read_header is None:  # rare format 3.0: read the array itself
                        shape = self.read(member[:-4]).shape
                    else:
                        shape = read_header(file)[0]
                shapes[member[: -len(".npy")]] = tuple(shape)
        except _READ_ERRORS as error:
            raise self._corrupt(error) from None
        return shapes

    def read(self, key):
        try:
            value = self._npz[key]
        except _READ_ERRORS as error:
            raise self._corrupt(error) from None
        if not isinstance(value, np.ndarray):
            raise CorruptCheckpointError(f"{self.path}: member {key!r} is not a .npy array.")
        return value

    def close(self):
        self._npz.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------
# The quarantine: layouts and the key table
# ---------------------------------------------------------------------------

PREFIXES = ("", "opt/target/", "params/")
POSEMB_KEYS = ("Transformer/posembed_input/pos_embedding", "Transformer/pos_embedding", "pos_embedding")
BLOCK_NAMES = {
    # vision_transformer (pre-linen Flax numbered sub-modules across types)
    "vision_transformer": dict(norm1="LayerNorm_0", attention="MultiHeadDotProductAttention_1",
                               norm2="LayerNorm_2", mlp="MlpBlock_3"),
    # big_vision (linen numbers sub-modules per type)
    "big_vision": dict(norm1="LayerNorm_0", attention="MultiHeadDotProductAttention_0",
                       norm2="LayerNorm_1", mlp="MlpBlock_0"),
}

# Keras variable path -> official key (without prefix). "{posemb}" is the
# layout's position-embedding key.
MODEL_KEYS = {
    "patch_embed/projection/kernel": "embedding/kernel",
    "patch_embed/projection/bias": "embedding/bias",
    "class_token/token": "cls",
    "position_embedding/embedding": "{posemb}",
    "encoder_norm/gamma": "Transformer/encoder_norm/scale",
    "encoder_norm/beta": "Transformer/encoder_norm/bias",
    "pre_logits/kernel": "pre_logits/kernel",
    "pre_logits/bias": "pre_logits/bias",
    "predictions/kernel": "head/kernel",
    "predictions/bias": "head/bias",
}
# Inside block_NN -> inside Transformer/encoderblock_N, with BLOCK_NAMES.
BLOCK_KEYS = {
    "norm1/gamma": "{norm1}/scale",
    "norm1/beta": "{norm1}/bias",
    "attention/query/kernel": "{attention}/query/kernel",
    "attention/query/bias": "{attention}/query/bias",
    "attention/key/kernel": "{attention}/key/kernel",
    "attention/key/bias": "{attention}/key/bias",
    "attention/value/kernel": "{attention}/value/kernel",
    "attention/value/bias": "{attention}/value/bias",
    "attention/attention_output/kernel": "{attention}/out/kernel",
    "attention/attention_output/bias": "{attention}/out/bias",
    "norm2/gamma": "{norm2}/scale",
    "norm2/beta": "{norm2}/bias",
    "mlp_in/kernel": "{mlp}/Dense_0/kernel",
    "mlp_in/bias": "{mlp}/Dense_0/bias",
    "mlp_out/kernel": "{mlp}/Dense_1/kernel",
    "mlp_out/bias": "{mlp}/Dense_1/bias",
}
BLOCK_PATH = re.compile(r"^block_(\d+)/(.+)$")
# A hybrid's ResNet (the `resnet_stem` layer): `resnet_stem/<path>/<variable>`
# -> `<path>/<key>`, e.g. resnet_stem/block1/unit1/gn_proj/gamma ->
# block1/unit1/gn_proj/scale; conv_root/kernel, gn_root/..., blockS/unitU/
# {conv1,conv2,conv3,conv_proj}/kernel and {gn1,gn2,gn3,gn_proj}/{scale,bias}.
STEM_PATH = re.compile(rf"^{STEM_LAYER_NAME}/(.+)/(kernel|gamma|beta)$")
STEM_VARIABLES = {"kernel": "kernel", "gamma": "scale", "beta": "bias"}
HEAD_KEYS = ("head/kernel", "head/bias")
PRE_LOGITS_KEYS = ("pre_logits/kernel", "pre_logits/bias")
# Old Flax GroupNorm parameters were stored (1, 1, 1, C): squeezed on load.
GROUP_NORM_KEY = re.compile(r"(^|/)gn(\d+|_root|_proj)/(scale|bias)$")


@dataclasses.dataclass(frozen=True)
class Layout:
    prefix: str
    blocks: str  # a key of BLOCK_NAMES
    posemb: Optional[str]  # position-embedding key without prefix, None if absent


def detect_layout(shapes, path="checkpoint"):
    """Which of the known layouts the archive's keys follow."""
    for prefix in PREFIXES:
        if prefix + "embedding/kernel" in shapes:
            break
    else:
        found = ", ".join(sorted(shapes)[:MAX_LISTED]) or "none"
        raise ValueError(
            f"{path} is not an official ViT checkpoint: no 'embedding/kernel' under any of the "
            f"prefixes {[p or '(none)' for p in PREFIXES]} (keys: {found})."
        )
    big_vision_attention = f"{prefix}Transformer/encoderblock_0/{BLOCK_NAMES['big_vision']['attention']}/query/kernel"
    blocks = "big_vision" if big_vision_attention in shapes else "vision_transformer"
    posemb = next((key for key in POSEMB_KEYS if prefix + key in shapes), None)
    return Layout(prefix, blocks, posemb)


def official_key(variable_path, layout):
    """The official key (without prefix) of a Keras variable path, or None."""
    match = STEM_PATH.match(variable_path)
    if match:  # a hybrid's ResNet: the same names, Keras's gamma/beta for Flax's scale/bias
        return f"{match.group(1)}/{STEM_VARIABLES[match.group(2)]}"
    if variable_path in MODEL_KEYS:
        key = MODEL_KEYS[variable_path]
        if key == "{posemb}":
            return layout.posemb or POSEMB_KEYS[0]
        return key
    match = BLOCK_PATH.match(variable_path)
    if match and match.group(2) in BLOCK_KEYS:
        inner = BLOCK_KEYS[match.group(2)].format(**BLOCK_NAMES[layout.blocks])
        return f"Transformer/encoderblock_{int(match.group(1))}/{inner}"
    return None


def weight_map(model, layout):
    """{official key without prefix: Keras variable} for every weight of `model`
    that has one, and the list of model weights that have none."""
    mapping, unmapped = {}, []
    for variable in model.weights:
        key = official_key(variable.path, layout)
        if key is None:
            unmapped.append(variable)
        else:
            mapping[key] = variable
    seen = {}
    for key, variable in mapping.items():
        if id(variable) in seen:
            raise ValueError(f"{variable.path} is mapped twice: from {seen[id(variable)]} and {key}.")
        seen[id(variable)] = key
    return mapping, unmapped


def stem_weight_map(model):
    """{official key: Keras variable} of the ResNet of a hybrid `model` alone."""
    if not any(layer.name == STEM_LAYER_NAME for layer in model.layers):
        raise ValueError(f"Model {model.name!r} has no {STEM_LAYER_NAME!r} layer: it is not a hybrid model.")
    mapping, _ = weight_map(model, Layout("", "vision_transformer", POSEMB_KEYS[0]))
    return {key: v for key, v in mapping.items() if STEM_PATH.match(v.path)}


_BLOCK_INDEX = re.compile(r"^Transformer/encoderblock_(\d+)/")
_RESNET_UNIT = re.compile(r"^block(\d+)/unit(\d+)/")


def architecture(shapes, blocks="vision_transformer"):
    """The `variants.Architecture` of {official key without prefix: shape}
    (a file's arrays, or a model's weights by `weight_map`), None when the
    keys that fix it are missing. `blocks`: a key of BLOCK_NAMES."""
    names = BLOCK_NAMES[blocks]
    try:
        kernel = shapes["embedding/kernel"]
        query = shapes[f"Transformer/encoderblock_0/{names['attention']}/query/kernel"]
        mlp = shapes[f"Transformer/encoderblock_0/{names['mlp']}/Dense_0/kernel"]
    except KeyError:
        return None
    depth = len({match.group(1) for match in map(_BLOCK_INDEX.match, shapes) if match})
    units = {}  # a hybrid's ResNet: stage -> units
    for match in filter(None, map(_RESNET_UNIT.match, shapes)):
        stage = int(match.group(1))
        units[stage] = max(units.get(stage, 0), int(match.group(2)))
    hybrid = units or any(key.startswith("conv_root/") for key in shapes)
    resnet = tuple(units[stage] for stage in sorted(units)) if hybrid else None
    return variants.Architecture(kernel[-1], depth, query[1], mlp[-1], tuple(kernel[:2]), resnet)


def model_architecture(model, blocks="vision_transformer"):
    """The `variants.Architecture` of a keras_vit model (None for another model)."""
    mapping, _ = weight_map(model, Layout("", blocks, POSEMB_KEYS[0]))
    return architecture({key: tuple(variable.shape) for key, variable in mapping.items()}, blocks)


def file_architecture(path):
    """The `variants.Architecture` of an official `.npz` (array headers only), or None."""
    with _Archive(path) as archive:
        shapes = archive.shapes
    layout = detect_layout(shapes, path)
    return architecture({k[len(layout.prefix):]: v for k, v in shapes.items() if k.startswith(layout.prefix)},
                        layout.blocks)


# ---------------------------------------------------------------------------
# Strict loading
# ---------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class CheckpointInfo:
    """What a checkpoint implies for the model, from its array shapes alone."""

    classes: Optional[int]  # None: no head
    pre_logits: Optional[int]  # width, None: no pre_logits layer
    resolution: Optional[int]  # square input side it was trained at, None if unknown


def inspect_npz(path):
    """CheckpointInfo of a local `.npz`, reading only the array headers."""
    with _Archive(path) as archive:
        shapes = archive.shapes
    layout = detect_layout(shapes, path)
    p = layout.prefix
    classes = shapes[p + "head/bias"][-1] if p + "head/bias" in shapes else None
    pre_logits = shapes[p + "pre_logits/bias"][-1] if p + "pre_logits/bias" in shapes else None
    resolution = None
    kernel = shapes[p + "embedding/kernel"]
    plain_patches = len(kernel) == 4 and kernel[0] == kernel[1] and kernel[2] == 3
    if plain_patches and layout.posemb is not None:  # a hybrid's resolution needs its ResNet
        tokens = shapes[p + layout.posemb][-2]
        for grid_tokens in (tokens, tokens - 1):  # without / with a class-token entry
            side = math.isqrt(max(grid_tokens, 0))
            if side and side * side == grid_tokens:
                resolution = side * kernel[0]
                break
    return CheckpointInfo(classes, pre_logits, resolution)


def load_npz(model, path, *, new_head=False, drop_pre_logits=False, expected_sha256=None):
    """Loads an official `.npz` checkpoint into a built keras_vit model, strictly.

    Args:
        model: a keras_vit model (any constructor, or `keras_vit.ViT`).
        path: the `.npz` file (plain, `opt/target/` or big_vision `params/` keys).
        new_head: zero-initialise the model's head instead of loading the
            checkpoint's (for another class count, as official fine-tuning).
        drop_pre_logits: leave the checkpoint's pre_logits layer unused (the
            model must have none).
        expected_sha256: check the file's SHA-256 first.

    Raises:
        ValueError: naming the keys and shapes, when the checkpoint and the
            model do not match one to one (see the module docstring for the
            exceptions).
    """
    path = os.fspath(path)
    if expected_sha256 is not None:
        if not os.path.exists(path):
            raise FileNotFoundError(f"Checkpoint file not found: {path}")
        download.check_sha256(path, expected_sha256)
    with _Archive(path) as archive:
        layout = detect_layout(archive.shapes, path)
        assignments = _match(model, archive.shapes, layout, path, new_head, drop_pre_logits)
        for key, variable, transform in assignments:
            value = archive.read(key)
            value = transform(value) if transform else value
            variable.assign(np.asarray(value, dtype=variable.dtype))
            del value  # one array alive at a time
    if new_head:
        head = model.get_layer("predictions")
        for variable in (head.kernel, head.bias):
            variable.assign(np.zeros(variable.shape, dtype=variable.dtype))


def _match(model, shapes, layout, path, new_head, drop_pre_logits):
    """[(checkpoint key, variable, transform)] covering both sides exactly once, or a ValueError."""
    mapping, unmapped = weight_map(model, layout)
    has_head = "head/kernel" in mapping
    if new_head and not has_head:
        raise ValueError(f"new_head=True, but model {model.name!r} has no head (include_top=False).")
    if drop_pre_logits and "pre_logits/kernel" in mapping:
        raise ValueError(
            f"drop_pre_logits=True, but model {model.name!r} has a pre_logits layer that would stay "
            "random: build it without representation_size."
        )
    unused_on_purpose = set()
    if new_head:
        unused_on_purpose.update(HEAD_KEYS)
        for key in HEAD_KEYS:
            del mapping[key]
    if not has_head:  # include_top=False: the body alone
        unused_on_purpose.update(HEAD_KEYS + PRE_LOGITS_KEYS)
    if drop_pre_logits:
        unused_on_purpose.update(PRE_LOGITS_KEYS)

    p = layout.prefix
    missing, mismatched, assignments = [], [], []
    for key, variable in mapping.items():
        full_key = p + key
        if full_key not in shapes:
            missing.append(f"{full_key} (for {variable.path} {tuple(variable.shape)})")
            continue
        shape, target = shapes[full_key], tuple(variable.shape)
        transform = None
        if variable.path == "position_embedding/embedding":
            transform = _posemb_transform(model.get_layer("position_embedding"))
            fits = len(shape) in (2, 3) and shape[-1] == target[-1]
        elif GROUP_NORM_KEY.search(key) and shape != target and tuple(d for d in shape if d != 1) == target:
            transform = functools.partial(np.reshape, shape=target)
            fits = True
        else:
            fits = shape == target
        if fits:
            assignments.append((full_key, variable, transform))
        else:
            mismatched.append(f"{full_key} {shape} vs {variable.path} {target}")
    used = {full_key for full_key, _, _ in assignments}
    # Outside `opt/target/` lies the optimizer's state, not weights of the model.
    candidates = [k for k in shapes if k.startswith(p)] if p == "opt/target/" else list(shapes)
    unused = sorted(k for k in candidates if k not in used and k[len(p):] not in unused_on_purpose)
    unused = [f"{k} {shapes[k]}" for k in unused]
    unmapped = [f"{v.path} {tuple(v.shape)}" for v in unmapped]
    if missing or mismatched or unused or unmapped:
        ours = architecture({k[len(p):]: v for k, v in shapes.items() if k.startswith(p)}, layout.blocks)
        theirs = model_architecture(model, layout.blocks)
        if ours is not None and theirs is not None and ours != theirs:
            raise ValueError(architecture_mismatch(f"Checkpoint {path}", model, ours, theirs))
        raise ValueError(_mismatch_message(model, path, missing, mismatched, unused, unmapped, drop_pre_logits))
    return assignments


def architecture_mismatch(what, model, ours, theirs):
    """One line: `what` (a weights file) holds architecture `ours`, `model` has `theirs`; what to build."""
    return (f"{what} does not fit model {model.name!r}: it holds another architecture "
            f"({'; '.join(ours.differences(theirs))}); {ours.fix()}.")


def _posemb_transform(layer):
    """Checkpoint position embedding -> this layer's grid (official zoom by default)."""

    def transform(embedding):
        embedding = embedding.reshape((1,) + embedding.shape[-2:])
        tokens = embedding.shape[1]
        if layer.num_prefix_tokens and math.isqrt(tokens) ** 2 == tokens:
            # No class-token entry (big_vision adds the posemb first): a zero entry is the same function.
            prefix = np.zeros((1, layer.num_prefix_tokens, embedding.shape[-1]), embedding.dtype)
            embedding = np.concatenate([prefix, embedding], axis=1)
        return layer.resized(embedding)

    return transform


def _listed(items):
    shown = "; ".join(items[:MAX_LISTED])
    return shown + (f"; and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else "")


def _mismatch_message(model, path, missing, mismatched, unused, unmapped, drop_pre_logits=False):
    parts = []
    if mismatched:
        parts.append(f"shape mismatches: {_listed(mismatched)}")
    if missing:
        parts.append(f"missing from the checkpoint: {_listed(missing)}")
    if unused:
        parts.append(f"unused checkpoint arrays: {_listed(unused)}")
    if unmapped:
        parts.append(f"model weights with no checkpoint key: {_listed(unmapped)}")
    hints = []
    text = " ".join(mismatched + unused)
    if "head/" in text and drop_pre_logits:
        hints.append("the checkpoint's head takes the features of its pre_logits layer, which is dropped here "
                     "(keep_pre_logits=False, drop_pre_logits=True) and is not as wide as the encoder: give the "
                     "model a new head (classes=N; load_npz(..., new_head=True)) or keep pre_logits")
    elif "head/" in text:
        hints.append("for another class count build the model with classes=N (keras-vit convert: --classes N); "
                     "load_npz(..., new_head=True) replaces a built model's head")
    if "pre_logits/" in text:
        hints.append("keep_pre_logits=False when building, or load_npz(..., drop_pre_logits=True), drops the "
                     "pre_logits layer (keras-vit convert: --drop-pre-logits)")
    hint = "; ".join(hints) or "build the architecture the checkpoint was trained with"
    return f"Checkpoint {path} does not fit model {model.name!r}: " + " | ".join(parts) + f". Hint: {hint}."
