"""Class names: the ImageNet label sets shipped with keras_vit, and any model's.

Two plain-text files ship in `keras_vit.assets` (the top-level weights/
folder), one label per line, line N = class N of the official checkpoints:

    imagenet1k_labels.txt    the 1000 ILSVRC-2012 classes, official order
    imagenet21k_labels.txt   the 21843 ImageNet-21k classes, in Google's order
                             (the head of the official in21k checkpoints)

Each label is the WordNet lemma list of the class ("tench, Tinca tinca"), as
the official ilsvrc2012_wordnet_lemmas.txt of google-research/vision_transformer.
Provenance: built from timm's `timm/data/_info/` files (Apache-2.0, Ross
Wightman): imagenet_synsets.txt, imagenet21k_goog_synsets.txt and
imagenet_synset_to_lemma.txt, with

    python -m keras_vit.labels TIMM_INFO_DIR weights/
"""

import functools
import importlib.resources
import os
import sys

# label set name -> (file in keras_vit.assets, number of classes,
#                    timm synset list it is built from)
LABEL_SETS = {
    "imagenet1k": ("imagenet1k_labels.txt", 1000, "imagenet_synsets.txt"),
    "imagenet21k": ("imagenet21k_labels.txt", 21843, "imagenet21k_goog_synsets.txt"),
}
TIMM_LEMMA_FILE = "imagenet_synset_to_lemma.txt"


@functools.lru_cache(maxsize=None)
def _read_label_set(name):
    file_name, count, _ = LABEL_SETS[name]
    text = (importlib.resources.files("keras_vit.assets") / file_name).read_text(encoding="utf-8")
    labels = tuple(text.splitlines())
    if len(labels) != count:
        raise ValueError(f"{file_name} has {len(labels)} labels, expected {count}: reinstall keras_vit.")
    return labels


def load_labels(name):
    """The class names of a shipped label set ("imagenet1k", "imagenet21k"),
    or of a text file with one name per line."""
    if name in LABEL_SETS:
        return list(_read_label_set(name))
    if not os.path.isfile(name):
        raise ValueError(
            f"Unknown labels {name!r}: not a file with one class name per line, nor one of: "
            f"{', '.join(LABEL_SETS)}."
        )
    with open(name, encoding="utf-8") as file:
        return [line.rstrip("\r\n") for line in file if line.strip()]


# NAME.labels.txt beside NAME.keras holds a saved model's class names, one per
# line (`keras-vit demo` writes one): `keras-vit predict` and `export` use them.
SAVED_MODEL_LABELS_SUFFIX = ".labels.txt"


def labels_file_for(model_path):
    """The class-names file that goes with a saved `.keras` model."""
    return os.path.splitext(os.fspath(model_path))[0] + SAVED_MODEL_LABELS_SUFFIX


def label_set_for(classes):
    """The shipped label set with `classes` classes, or None."""
    for name, (_, count, _) in LABEL_SETS.items():
        if count == classes:
            return name
    return None


def class_names(classes, labels=None):
    """`classes` names: those of `labels` (what `load_labels` takes), else the
    shipped set of that size, else "class_0", "class_1", ..."""
    labels = labels or label_set_for(classes)
    if labels is None:
        return [f"class_{index}" for index in range(classes)]
    names = load_labels(labels)
    if len(names) != classes:
        raise ValueError(f"Labels {labels!r} have {len(names)} classes, the model has {classes}.")
    return names


def short_name(label):
    """The first lemma of a label: "tench, Tinca tinca" -> "tench"."""
    return label.split(",")[0].strip()


def decode_predictions(preds, top=5):
    """The keras.applications helper: the `top` best classes of each row of
    `preds` (batch, classes) as a list per row of (class id, name, score),
    best first. The names are the shipped label set of that many classes
    (ImageNet-1k: 1000, ImageNet-21k: 21843); the id is the class index.
    Names are the full label ("tench, Tinca tinca"), not its first lemma:
    first lemmas repeat in ImageNet ("crane" is a bird and a machine)."""
    import numpy as np

    scores = np.asarray(preds)
    if scores.ndim != 2:
        raise ValueError(
            f"decode_predictions expects a (batch, classes) array, got shape {scores.shape}."
        )
    label_set = label_set_for(scores.shape[1])
    if label_set is None:
        known = ", ".join(f"{name} ({count})" for name, (_, count, _) in LABEL_SETS.items())
        raise ValueError(
            f"decode_predictions knows the class names of {known} classes, not of {scores.shape[1]}: "
            "use keras_vit.labels.load_labels for a model's own names."
        )
    names = _read_label_set(label_set)
    top = int(top)
    if top < 1:
        raise ValueError(f"top must be at least 1, got {top}.")
    best = np.argsort(-scores, axis=1, kind="stable")[:, :top]
    return [[(int(i), names[i], float(row[i])) for i in order] for row, order in zip(scores, best)]


def build_label_files(timm_info_dir, out_dir):
    """Writes the label files from timm's synset and lemma lists."""
    with open(os.path.join(timm_info_dir, TIMM_LEMMA_FILE), encoding="utf-8") as file:
        lemmas = dict(line.rstrip("\n").split("\t", 1) for line in file if line.strip())
    for file_name, count, synset_file in LABEL_SETS.values():
        with open(os.path.join(timm_info_dir, synset_file), encoding="utf-8") as file:
            synsets = [line.strip() for line in file if line.strip()]
        if len(synsets) != count:
            raise ValueError(f"{synset_file} has {len(synsets)} synsets, expected {count}.")
        with open(os.path.join(out_dir, file_name), "w", encoding="utf-8") as file:
            file.write("".join(lemmas[synset] + "\n" for synset in synsets))


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python -m keras_vit.labels TIMM_INFO_DIR OUT_DIR")
    build_label_files(sys.argv[1], sys.argv[2])
