"""The registry of Google's official ViT checkpoint files: names, tags and what each file holds.

`weights/checkpoints.json` (shipped as `keras_vit.assets`) lists the
recommended AugReg files and the original paper's files: each file's short
tag per architecture (`in21k`, `in21k+in1k`, `in21k+in1k-224`,
`augreg_in21k`, `augreg_in21k+in1k`, `augreg_in21k+in1k-224`), resolution,
classes and label set, the width of its `pre_logits` layer, the ImageNet
top-1 its source reports, and its SHA-256 where known. `find_checkpoint`
resolves a tag for an architecture, or a file's official name
(`imagenet21k/ViT-B_16`, an AugReg file name, with or without `.npz`, or its
URL), or timm's name of the same file (`vit_base_patch16_224.augreg_in21k_ft_in1k`,
or its tag alone for an architecture: `timm_checkpoint`). `list_weights()`
prints the table (`keras_vit.from_name` builds a model from a timm name).
"""

import dataclasses
import functools
import importlib.resources
import json
import re
from typing import Optional

from keras_vit import download
from keras_vit.tables import format_table

REGISTRY_FILE = "checkpoints.json"


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One official checkpoint file (a row of weights/checkpoints.json)."""

    tag: str
    architecture: str
    file: str
    resolution: int
    classes: int
    labels: str
    pre_logits: Optional[int] = None
    imagenet_top1: Optional[float] = None
    accuracy_source: Optional[str] = None
    sha256: Optional[str] = None
    aliases: tuple = ()
    sha256_source: Optional[str] = None
    note: Optional[str] = None
    timm: tuple = ()  # timm's "model.pretrained_tag" names of this same file

    @property
    def url(self):
        return download.url_for(self.file)

    @property
    def official_name(self):
        """The file's path under the official bucket, without `.npz`."""
        return self.file[: -len(".npz")] if self.file.endswith(".npz") else self.file

    def long_names(self):
        names = {self.official_name}
        if self.official_name.startswith("augreg/"):  # AugReg names are unique on their own
            names.add(self.official_name[len("augreg/"):])
        return names

    def short_names(self):
        return {self.tag, *self.aliases}


@functools.lru_cache(maxsize=None)
def registry():
    """All registered checkpoints, in the order of weights/checkpoints.json."""
    text = (importlib.resources.files("keras_vit.assets") / REGISTRY_FILE).read_text(encoding="utf-8")
    rows = json.loads(text)["checkpoints"]
    return tuple(
        Checkpoint(**dict(row, aliases=tuple(row.get("aliases", ())), timm=tuple(row.get("timm", ()))))
        for row in rows
    )


def _normalise_name(name):
    name = name.strip()
    for prefix in (download.OFFICIAL_BASE_URL, "gs://vit_models/"):
        if name.startswith(prefix):
            name = name[len(prefix):]
    name = name.replace("%2B", "+").replace("%2b", "+")
    return name[: -len(".npz")] if name.endswith(".npz") else name


def tags_for(architecture):
    return [entry.tag for entry in registry() if entry.architecture == architecture]


def find_checkpoint(name, architecture=None):
    """The registry entry `name` designates for `architecture`, or None if unknown.

    `name` is a short tag ("in21k", valid per architecture) or a file's
    official name, registered or any AugReg file name (`augreg_checkpoint`).
    Raises ValueError when the name is known but does not fit `architecture`.
    """
    name = _normalise_name(name)
    entry = next((e for e in registry() if name in e.long_names()), None) or augreg_checkpoint(name)
    if entry is not None:
        if architecture is not None and entry.architecture != architecture:
            raise ValueError(
                f"Checkpoint {entry.official_name!r} is for {entry.architecture}, not "
                f"{architecture}: build it with keras_vit.{entry.architecture}."
            )
        return entry
    entry = timm_checkpoint(name, architecture)
    if entry is not None:
        return entry
    matches = [entry for entry in registry() if name in entry.short_names()]
    if not matches:
        return None
    if architecture is None:
        raise ValueError(
            f"Checkpoint tag {name!r} names one file per architecture: use a constructor such "
            f"as keras_vit.{matches[0].architecture}, or pass the file's official name or path."
        )
    for entry in matches:
        if entry.architecture == architecture:
            return entry
    available = ", ".join(tags_for(architecture)) or "none"
    raise ValueError(
        f"No {name!r} checkpoint for {architecture} (its tags: {available}); "
        "see keras_vit.list_weights()."
    )


# timm names. Each registry entry's "timm" field lists the timm model names
# ("vit_base_patch16_224.augreg_in21k_ft_in1k") whose weights are that same
# official file: read from the default_cfgs of timm 1.0.31's
# timm/models/vision_transformer.py and vision_transformer_hybrid.py (a cfg's
# url names the official file; timm's jx_*.pth files are its converted copies
# of the original paper's files). Only files of weights/checkpoints.json.


def timm_names():
    """{timm model name: registry entry} for every mapped file."""
    return {name: entry for entry in registry() for name in entry.timm}


def timm_checkpoint(name, architecture=None):
    """The entry a timm name designates, or None when `name` is not one.

    `name` is a full timm name ("vit_base_patch16_224.augreg_in21k_ft_in1k")
    or, with an architecture, its pretrained tag alone ("augreg_in21k_ft_in1k"),
    which must then name one file of that architecture.
    """
    names = timm_names()
    if name in names:
        entry = names[name]
        if architecture is not None and entry.architecture != architecture:
            raise ValueError(
                f"timm weights {name!r} are {entry.official_name!r}, for {entry.architecture}, not "
                f"{architecture}: build it with keras_vit.{entry.architecture} or keras_vit.from_name."
            )
        return entry
    if architecture is None or "." in name:
        return None
    full = [timm_name for timm_name, entry in names.items()
            if entry.architecture == architecture and timm_name.split(".", 1)[1] == name]
    if len(full) > 1:
        raise ValueError(
            f"timm tag {name!r} names {len(full)} files for {architecture}: pass the full timm name, "
            f"one of {', '.join(full)}."
        )
    return names[full[0]] if full else None


def timm_tags_for(architecture):
    """The timm names of `architecture`'s registered files."""
    return [name for name, entry in timm_names().items() if entry.architecture == architecture]


# The AugReg release names each file after its run (How to train your ViT,
# Steiner et al. 2021; vision_transformer's augreg index):
#   {model}-{upstream}-{epochs}ep-lr_..-aug_..-wd_..-do_..-sd_..[--{dataset}-steps_..-lr_..-res_{side}]
# Upstream runs are at 224 px; a fine-tuned file names its dataset and side.
AUGREG_NAME = re.compile(
    r"^(?:augreg/)?(?P<model>R_Ti_16|R26_S_32|R50_L_32|Ti_16|S_16|S_32|B_8|B_16|B_32|L_16)"
    r"-(?P<upstream>i21k|i1k)-\d+ep-lr_[^-]+-aug_[^-]+-wd_[^-]+-do_[^-]+-sd_[^-]+"
    r"(?:--(?P<dataset>[a-z0-9_]+)-steps_\d+k-lr_[^-]+-res_(?P<side>\d+))?$"
)
AUGREG_ARCHITECTURES = {
    "Ti_16": "ViT_Ti16", "S_16": "ViT_S16", "S_32": "ViT_S32", "B_8": "ViT_B8", "B_16": "ViT_B16",
    "B_32": "ViT_B32", "L_16": "ViT_L16", "R_Ti_16": "R_ViT_Ti16", "R26_S_32": "R26_ViT_S32",
    "R50_L_32": "R50_ViT_L32",
}
# (classes, label set) of the upstream and fine-tuning datasets of the release.
AUGREG_DATASETS = {
    "i21k": (21_843, "imagenet21k"),
    "i1k": (1000, "imagenet1k"),
    "imagenet2012": (1000, "imagenet1k"),
    "cifar100": (100, None),
    "oxford_iiit_pet": (37, None),
    "oxford_flowers102": (102, None),
    "resisc45": (45, None),
    "sun397": (397, None),
}


def augreg_checkpoint(name):
    """A `Checkpoint` for an AugReg file name that the registry does not list, or None.

    Its architecture, resolution and classes are read from the name (AugReg
    models have no pre_logits layer); no SHA-256 is known, so the download
    is checked as an archive only.
    """
    match = AUGREG_NAME.match(_normalise_name(name))
    if match is None:
        return None
    dataset = match["dataset"] or match["upstream"]
    if dataset not in AUGREG_DATASETS:
        raise ValueError(
            f"AugReg file {name!r} is fine-tuned on {dataset!r}, whose class count keras_vit does not know "
            f"(known: {', '.join(AUGREG_DATASETS)}); download it and pass the .npz path."
        )
    classes, labels = AUGREG_DATASETS[dataset]
    file = "augreg/" + match.group(0).removeprefix("augreg/") + ".npz"
    return Checkpoint(tag=file[len("augreg/"):-len(".npz")], architecture=AUGREG_ARCHITECTURES[match["model"]],
                      file=file, resolution=int(match["side"] or 224), classes=classes, labels=labels)


def accuracy_sources():
    """The sources of the reported ImageNet top-1 figures, in registry order:
    marker [n] is source n - 1 in every table (the whole registry's, one
    architecture's, the docs' short one)."""
    return list(dict.fromkeys(e.accuracy_source for e in registry() if e.accuracy_source))


def list_weights(architecture=None, print_table=True, markdown=False):
    """The registry as a table (tag, architecture, resolution, classes,
    pre_logits, reported ImageNet top-1); printed unless print_table=False.

    Args:
        architecture: only the checkpoints of this constructor
            (`list_weights("ViT_B16")`, as timm's `list_models` takes its
            filter first).
        print_table: print the table as well as return it.
        markdown: a Markdown table (the docs' full registry) instead of plain text.
    """
    if architecture is not None and not isinstance(architecture, str):
        raise TypeError(f"architecture must be a constructor name such as 'ViT_B16', got {architecture!r}.")
    entries = [e for e in registry() if architecture in (None, e.architecture)]
    first_row = {}
    for index, e in enumerate(entries):
        first_row.setdefault(e.architecture, index)
    entries.sort(key=lambda e: first_row[e.architecture])  # grouped by architecture, registry order within
    if architecture is not None and not entries:
        raise ValueError(f"No checkpoints for {architecture!r}; see keras_vit.list_weights().")
    header = ("architecture", "tag", "resolution", "classes", "pre_logits", "ImageNet top-1", "file")
    rows = [header]
    for e in entries:
        accuracy = "-"
        if e.imagenet_top1 is not None:
            accuracy = f"{e.imagenet_top1:.2f} [{accuracy_sources().index(e.accuracy_source) + 1}]"
        rows.append((
            e.architecture,
            e.tag,
            str(e.resolution),
            f"{e.classes:,}",
            str(e.pre_logits) if e.pre_logits else "-",
            accuracy,
            e.file,
        ))
    shown = {e.accuracy_source for e in entries}
    notes = [f"[{i + 1}] {source}" for i, source in enumerate(accuracy_sources()) if source in shown]
    if markdown:
        table = format_table(rows, markdown=True, code_columns=(1, 6)) + "\n\n" + "\n".join(n + "  " for n in notes)
    else:
        table = format_table(rows) + "\n\n" + "\n".join(notes)
    table = table.rstrip()
    if print_table:
        print(table)
    return table
