"""What a `weights=` value means: resolves it before the model is built, loads it after.

`plan()` looks at what the user passed before the model is built (a checkpoint
can fix the class count, the pre_logits layer and the resolution), and the
returned plan's `load(model)` fills the built model.

Accepted values:
    None                  random initialisation
    "path/x.weights.h5"   a Keras weights file (from `model.save_weights`); a
                          position embedding saved for another input size is
                          resized on load; classes default to the file's head,
                          another count (or a file without head, such as a
                          self-supervised encoder's) gets a zero-initialised
                          head on the loaded body
    "in21k", ...          an official checkpoint tag of the model's
                          architecture (`keras_vit.list_weights()`), or a
                          file's official name ("imagenet21k/ViT-B_16"), or
                          timm's name or tag of the same official file
                          ("augreg_in21k_ft_in1k", keras_vit.registry):
                          downloaded once, verified and cached
                          (keras_vit.registry, keras_vit.download)
    "path/x.npz"          a local official checkpoint file

With a checkpoint (tag or .npz), loading is strict (keras_vit.npz)
and the checkpoint fills in what the caller leaves None:
    classes               the checkpoint's; another count gets a
                          zero-initialised head on the pretrained body
    input_shape           the checkpoint's resolution; another size resizes
                          the position embedding (official zoom by default)
    keep_pre_logits       None: keep the checkpoint's pre_logits layer when
                          its head is kept, drop it with a new head (as the
                          official fine-tuning does); True/False to choose
    expected_sha256       a SHA-256 the file must have (wins over the
                          registry's and the one recorded at download)
"""

import dataclasses
import os
import re
import warnings
from typing import Callable, Optional

from keras_vit import download, npz, registry, variants
from keras_vit.errors import first_line

KERAS_WEIGHTS_SUFFIXES = (".weights.h5",)


@dataclasses.dataclass
class LoadPlan:
    """What a `weights=` value implies for the model, and how to load it."""

    classes: Optional[int] = None
    representation_size: Optional[int] = None
    input_shape: Optional[tuple] = None
    loader: Optional[Callable] = None
    resolution: Optional[int] = None  # the checkpoint's: the grid a model of any size stores

    def load(self, model):
        if self.loader is not None:
            self.loader(model)


def plan(
    weights,
    architecture=None,
    include_top=True,
    classes=None,
    representation_size=None,
    input_shape=None,
    keep_pre_logits=None,
    expected_sha256=None,
):
    """Resolves a `weights=` value into a `LoadPlan` (see the module docstring)."""
    checkpoint_options = dict(keep_pre_logits=keep_pre_logits, expected_sha256=expected_sha256)
    if weights is None:
        _reject_checkpoint_options(checkpoint_options, "weights=None")
        return LoadPlan(classes, representation_size, input_shape)
    if not isinstance(weights, (str, os.PathLike)):
        raise TypeError(f"weights must be None or a string, got {type(weights).__name__}.")
    path = os.fspath(weights)
    if path.endswith(KERAS_WEIGHTS_SUFFIXES):
        _reject_checkpoint_options(checkpoint_options, "a Keras weights file")
        if not os.path.exists(path):
            raise FileNotFoundError(f"Weights file not found: {path}")
        file_classes = keras_weights_classes(path)
        new_head = False
        if include_top:
            classes = (file_classes or 1000) if classes is None else classes
            new_head = classes != file_classes
        return LoadPlan(
            classes, representation_size, input_shape,
            lambda model: load_keras_weights(model, path, new_head=new_head),
        )
    if path.endswith(".npz") and os.path.exists(path):
        info = npz.inspect_npz(path)
        source = path
    else:
        source = registry.find_checkpoint(path, architecture)
        if source is None:
            if path.endswith(".npz"):
                raise FileNotFoundError(f"Checkpoint file not found: {path}")
            tags = ""
            if architecture:
                tags = ", ".join(registry.tags_for(architecture) + registry.timm_tags_for(architecture))
            raise ValueError(
                f"Unknown weights {path!r}: pass None, a checkpoint tag"
                + (f" of {architecture} ({tags})" if tags else "")
                + ", an official .npz file or a Keras '.weights.h5' file; see keras_vit.list_weights()."
            )
        info = npz.CheckpointInfo(source.classes, source.pre_logits, source.resolution)
    return _checkpoint_plan(
        source, info, include_top, classes, representation_size, input_shape, **checkpoint_options
    )


def _reject_checkpoint_options(options, what):
    given = [name for name, value in options.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)} only apply to official checkpoints, not to {what}.")


def _checkpoint_plan(source, info, include_top, classes, representation_size, input_shape,
                     keep_pre_logits, expected_sha256):
    """The plan for an official checkpoint: a registry entry or a local .npz path."""
    new_head = False
    if include_top:
        classes = info.classes if classes is None else classes
        classes = 1000 if classes is None else classes  # a checkpoint without head
        new_head = classes != info.classes
    keep = _keep_pre_logits(info, include_top, new_head, representation_size, keep_pre_logits)
    if input_shape is None and info.resolution:
        input_shape = (info.resolution, info.resolution, 3)
    load_options = dict(
        new_head=new_head,
        drop_pre_logits=bool(include_top and info.pre_logits and not keep),
        expected_sha256=expected_sha256,
    )
    if isinstance(source, registry.Checkpoint):
        loader = lambda model: load_registered(model, source, **load_options)  # noqa: E731
    else:
        loader = lambda model: npz.load_npz(model, source, **load_options)  # noqa: E731
    return LoadPlan(classes, info.pre_logits if keep else None, input_shape, loader, info.resolution)


def _keep_pre_logits(info, include_top, new_head, representation_size, keep_pre_logits):
    """Whether the model gets the checkpoint's pre_logits layer (module docstring)."""
    if not include_top:
        if keep_pre_logits:
            raise ValueError("keep_pre_logits=True needs include_top=True (pre_logits sits below the head).")
        return False
    keep = keep_pre_logits
    if keep is None:
        keep = representation_size is not None or (info.pre_logits is not None and not new_head)
    if keep and info.pre_logits is None:
        raise ValueError(
            "This checkpoint has no pre_logits layer: leave keep_pre_logits and representation_size unset."
        )
    if keep and representation_size not in (None, info.pre_logits):
        raise ValueError(
            f"representation_size={representation_size} does not match the checkpoint's pre_logits "
            f"width {info.pre_logits}: leave it unset."
        )
    if not keep and representation_size is not None:
        raise ValueError(
            f"representation_size={representation_size} with keep_pre_logits=False would add a random "
            "pre_logits layer to a pretrained model: leave representation_size unset."
        )
    return bool(keep)


def keras_weights_classes(path):
    """The class count of the head in a keras_vit `.weights.h5` file, None
    without one (a file saved with include_top=False, or by
    `MaskedPatchPrediction.encoder`'s headless model). The head is the last
    top-level Dense of the model (the blocks' Dense layers are nested)."""
    import re

    import h5py

    with h5py.File(path, "r") as f:
        groups = f["layers"] if "layers" in f else {}
        dense = [name for name in groups if re.fullmatch(r"dense(_\d+)?", name)]
        if not dense:
            return None
        last = max(dense, key=lambda name: int(name.rpartition("_")[2]) if "_" in name else 0)
        variables = groups[last].get("vars", {})
        return int(variables["0"].shape[-1]) if "0" in variables else None


# Paths in a keras_vit `.weights.h5` (Keras names nested layers by class) -> the
# official keys `npz.architecture` reads; groups: block / ResNet stage and unit suffixes.
_H5_KEYS = (
    (re.compile(r"^layers/patch_encoder/projection/vars/0$"), "embedding/kernel"),
    (re.compile(r"^layers/transformer_block(?:_(\d+))?/attention/query_dense/vars/0$"),
     "Transformer/encoderblock_{0}/MultiHeadDotProductAttention_1/query/kernel"),
    (re.compile(r"^layers/transformer_block(?:_(\d+))?/mlp_in/vars/0$"), "Transformer/encoderblock_{0}/MlpBlock_3/Dense_0/kernel"),
    (re.compile(r"^layers/res_net_stem/conv_root/vars/0$"), "conv_root/kernel"),
    (re.compile(r"^layers/res_net_stem/stages/res_net_stage(?:_(\d+))?/units/bottleneck_unit(?:_(\d+))?/conv1/vars/0$"),
     "block{0}/unit{1}/conv1/kernel"),
)


def keras_weights_architecture(path):
    """The `variants.Architecture` of a keras_vit `.weights.h5` file from its
    array shapes, or None when it is not laid out as a keras_vit model's."""
    import h5py

    shapes = {}

    def add(name, item):  # (returning anything but None would stop visititems)
        if isinstance(item, h5py.Dataset):
            shapes[name] = item.shape

    with h5py.File(path, "r") as f:
        f.visititems(add)
    official = {}
    for name, shape in shapes.items():
        for pattern, key in _H5_KEYS:
            match = pattern.match(name)
            if match:  # suffixes count from none (0); official stages and units count from 1
                numbers = [int(group or 0) + (1 if key.startswith("block") else 0) for group in match.groups()]
                official[key.format(*numbers)] = tuple(shape)
    return npz.architecture(official)


def load_keras_weights(model, path, new_head=False):
    """Loads a `.weights.h5` file, with a one-line error when it does not fit.

    With `new_head`, the file's head (if any) is not loaded: the body (every
    layer up to `encoder_norm`) is, strictly, and the model keeps its
    zero-initialised head, as for an official checkpoint with another class
    count. That is how a self-supervised encoder (keras_vit.pretraining) or
    a model fine-tuned for other classes starts a new fine-tuning.
    """
    if _holds_masked_patch_prediction(path):
        raise ValueError(
            f"Weights file {path} holds a MaskedPatchPrediction (its encoder, mask token and prediction head), "
            "not a model: save the encoder alone with mpp.encoder.save_weights(...) and load that file."
        )
    ours, theirs = keras_weights_architecture(path), npz.model_architecture(model)
    if ours is not None and theirs is not None and ours != theirs:
        raise ValueError(npz.architecture_mismatch(f"Weights file {path}", model, ours, theirs))
    target = model
    if new_head:
        import keras

        target = keras.Model(model.inputs, model.get_layer("encoder_norm").output, name=model.name)
    try:
        with warnings.catch_warnings():
            # Keras warns per nested layer it could not match before it raises: the error says it once.
            warnings.filterwarnings("ignore", message="Skipping nested container")
            target.load_weights(path)
    except (ValueError, KeyError) as error:
        raise ValueError(
            f"Weights file {path} does not fit model {model.name!r}: {_keras_load_reason(error)} "
            "Build the model with the same architecture"
            + (" (body)" if new_head else ", include_top and classes")
            + " as the model that saved it."
        ) from error


def _holds_masked_patch_prediction(path):
    """Whether a `.weights.h5` file was saved by `MaskedPatchPrediction.save_weights`:
    the encoder model nested under "encoder", the prediction head beside it."""
    import h5py

    with h5py.File(path, "r") as f:
        return "layers" in f.get("encoder", {}) and "head" in f


def _keras_load_reason(error):
    """The reason in Keras's load_weights error, whose first line is only a count
    ("A total of 21 objects could not be loaded. Example error message ...:"),
    without the variable's values it prints after it."""
    paragraphs = [part.strip() for part in str(error).split("\n\n") if part.strip()]
    if len(paragraphs) > 1 and paragraphs[0].startswith("A total of"):
        paragraphs = paragraphs[1:]
    return first_line(paragraphs[0].split(" Target variable:")[0]) if paragraphs else type(error).__name__


def load_pretrained(model, weights, **kwargs):
    """Loads `weights` (anything `weights=` accepts) into an already built model.

    `kwargs` are `plan()`'s: `architecture` (for a tag), `include_top`,
    `classes`, `keep_pre_logits`, `expected_sha256`.
    """
    plan(weights, **kwargs).load(model)


def load_registered(model, entry, *, new_head=False, drop_pre_logits=False, expected_sha256=None, progress=True):
    """Downloads (once, verified) and loads a registry entry. A cached file
    that turns out unreadable, or not of the entry's architecture (a wrong
    file accepted into the cache), is removed so that the next run downloads
    it again; any other mismatch names the cached file."""
    path = download.fetch(entry.file, entry.sha256, expected_sha256, progress=progress)
    try:
        npz.load_npz(model, path, new_head=new_head, drop_pre_logits=drop_pre_logits)
    except npz.CorruptCheckpointError as error:
        raise npz.CorruptCheckpointError(f"{error} {_remove_from_cache(entry)}") from None
    except ValueError as error:
        found, variant = npz.file_architecture(path), variants.CONSTRUCTOR_VARIANTS.get(entry.architecture)
        described = variants.Architecture.of_variant(variant) if variant else None
        if None not in (found, described) and found != described:
            raise ValueError(
                f"The cached {entry.file} ({path}) is not the {entry.architecture} checkpoint the registry describes "
                f"({'; '.join(found.differences(described, theirs=entry.architecture))}). "
                + _remove_from_cache(entry)
            ) from None
        raise ValueError(f"{first_line(error)} (The checkpoint is the cached {path}.)") from None


def _remove_from_cache(entry):
    """Removes a bad cached file; says what happened, for the error line."""
    try:
        download.remove_cached(entry.file)
    except OSError as error:  # a read-only cache
        return (f"It could not be removed from the cache ({error.strerror}): replace it, "
                f"or set {download.CACHE_ENV} to another folder.")
    return "It was removed from the cache: run again to download it again."
