"""The `keras-vit` command line (also `python -m keras_vit`).

Each subcommand is a pair: `_add_NAME(subparsers)` declares its arguments and
`_run_NAME(args)` does the work. User mistakes raise `UsageError` (or
ValueError / FileNotFoundError from the library) and are printed as one line,
never as a traceback.
"""

import argparse
import os
import sys

from keras_vit.errors import UsageError, first_line


# ---------------------------------------------------------------------------
# list
# ---------------------------------------------------------------------------


def _add_list(subparsers):
    parser = subparsers.add_parser("list", help="list the model constructors and the official checkpoints")
    parser.add_argument("what", nargs="?", choices=("all", "models", "weights"), default="all")


def _run_list(args):
    from keras_vit import registry

    if args.what in ("all", "models"):
        print(constructors_table())
    if args.what in ("all", "weights"):
        if args.what == "all":
            print()
        print(registry.list_weights(print_table=False))


def constructors_table(markdown=False):
    """The constructors as a table: configuration, parameters and GMACs at 224 px."""
    from keras_vit import sizes, variants  # no Keras: `keras-vit list` starts at once
    from keras_vit.tables import format_table

    rows = [("constructor", "ResNet stages", "width", "depth", "heads", "MLP", "patch",
             "params (1000 classes)", "GMACs @224")]
    for name, variant in variants.CONSTRUCTOR_VARIANTS.items():
        config = variants.variant_config(variant)
        rows.append((
            name,
            str(config["block_sizes"]) if "block_sizes" in config else "-",
            str(config["hidden_size"]),
            str(config["depth"]),
            str(config["num_heads"]),
            str(config["mlp_dim"]),
            str(config["patch_size"]),
            f"{sizes.parameter_count(**config):,}",
            f"{sizes.multiply_accumulates(**config) / 1e9:.1f}",
        ))
    return format_table(rows, markdown=markdown, code_columns=(0,))


# ---------------------------------------------------------------------------
# convert
# ---------------------------------------------------------------------------

CONVERT_SUFFIXES = (".keras", ".weights.h5")
SHA256_HELP = ("SHA-256 the checkpoint file must have; accepts a file that changed upstream "
               "(later runs use the cached file without it)")


def _add_convert(subparsers):
    parser = subparsers.add_parser(
        "convert",
        help="convert an official .npz checkpoint (file or tag) into a .keras model or .weights.h5 file",
        description="Loads an official checkpoint strictly into a keras_vit model and saves it. "
        "CHECKPOINT is a .npz file or a checkpoint tag/official name (see `keras-vit list weights`).",
    )
    parser.add_argument("checkpoint", help="official .npz file, or a checkpoint tag such as in21k+in1k")
    parser.add_argument("output", help="OUT.keras (whole model) or OUT.weights.h5 (weights only)")
    parser.add_argument("--model", required=True, help="constructor name, e.g. ViT_B16")
    parser.add_argument("--classes", type=int, default=None,
                        help="head size (default the checkpoint's; another count gets a zero-initialised head)")
    parser.add_argument("--image-size", type=int, nargs="+", metavar="PIXELS", default=None,
                        help="input size: SIDE or HEIGHT WIDTH (default the checkpoint's resolution)")
    parser.add_argument("--no-top", action="store_true", help="drop the head (include_top=False)")
    pre_logits = parser.add_mutually_exclusive_group()
    pre_logits.add_argument("--keep-pre-logits", dest="keep_pre_logits", action="store_const", const=True,
                            help="keep the checkpoint's pre_logits layer (default: kept unless the head is new)")
    pre_logits.add_argument("--drop-pre-logits", dest="keep_pre_logits", action="store_const", const=False,
                            help="drop the checkpoint's pre_logits layer")
    parser.add_argument("--sha256", default=None, help=SHA256_HELP)
    parser.add_argument("--overwrite", action="store_true", help="replace OUTPUT if it exists")


def _run_convert(args):
    from keras_vit import models

    if not args.output.endswith(CONVERT_SUFFIXES):
        raise UsageError(f"OUTPUT must end with {' or '.join(CONVERT_SUFFIXES)}, got {args.output!r}.")
    if args.image_size is not None and len(args.image_size) not in (1, 2):
        raise UsageError("--image-size takes SIDE or HEIGHT WIDTH.")
    input_shape = None
    if args.image_size:
        height, width = (args.image_size * 2)[:2]
        input_shape = (height, width, 3)
    if os.path.exists(args.output) and not args.overwrite:
        raise UsageError(f"{args.output} already exists; pass --overwrite to replace it.")
    constructor = models.get_constructor(args.model)
    model = constructor(
        weights=args.checkpoint,
        include_top=not args.no_top,
        classes=args.classes,
        input_shape=input_shape,
        keep_pre_logits=args.keep_pre_logits,
        expected_sha256=args.sha256,
    )
    _save_atomically(model, args.output)
    print(f"{args.model} ({model.count_params():,} parameters, input {model.input_shape[1:]}, "
          f"output {model.output_shape[1:]}) -> {args.output}")


def _save_atomically(model, output):
    """model.save (.keras) or save_weights (.weights.h5) to a temporary file
    beside `output`, moved into place once complete: a failed or interrupted
    save never leaves a half-written OUTPUT, nor damages the one it replaces."""
    folder, name = os.path.split(os.path.abspath(output))
    os.makedirs(folder, exist_ok=True)
    suffix = next(suffix for suffix in CONVERT_SUFFIXES if name.endswith(suffix))  # Keras checks the suffix
    partial = os.path.join(folder, f".{name}.{os.getpid()}.partial{suffix}")
    try:
        (model.save if suffix == ".keras" else model.save_weights)(partial)
        os.replace(partial, output)
    finally:
        if os.path.exists(partial):
            os.remove(partial)


# ---------------------------------------------------------------------------
# predict
# ---------------------------------------------------------------------------

MODEL_FILE_SUFFIX = ".keras"


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, got {text!r}")
    return value


def _add_model_arguments(parser, model_flag=True):
    if model_flag:
        parser.add_argument("--model", default="ViT_B16",
                            help="constructor name (see `keras-vit list models`), a saved .keras model, or (predict "
                            "only) an export folder written by `keras-vit export` in any format, run by its own "
                            "runtime; default ViT_B16")
    parser.add_argument("--weights", default=None,
                        help="checkpoint tag such as augreg_in21k+in1k (see `keras-vit list weights`), an official "
                        ".npz or a .weights.h5 file; default: random weights")
    parser.add_argument("--labels", default=None,
                        help="class names: imagenet1k, imagenet21k or a text file with one per line "
                        "(default: the checkpoint's, a .keras model's NAME.labels.txt beside it, else by the "
                        "number of classes)")
    parser.add_argument("--sha256", default=None, help=SHA256_HELP)


def _add_predict(subparsers):
    parser = subparsers.add_parser(
        "predict",
        help="classify images and print the top classes",
        description="Classifies each IMAGE (JPEG, PNG, GIF or BMP, decoded as the export's serving_default "
        "decodes them): it is resized to the model's input size (bilinear, as the official evaluation) and fed "
        "as [0, 255] pixels.",
    )
    parser.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    _add_model_arguments(parser)
    parser.add_argument("--top", type=_positive_int, default=5, metavar="K", help="how many classes to print (5)")
    parser.add_argument("--precision", choices=("float32", "bfloat16"), default="float32",
                        help="with --model EXPORT_DIR of an OpenVINO export: the precision OpenVINO computes in "
                        "(float32, the default, gives model.predict's results; bfloat16 is its fast path on CPUs "
                        "with bf16 units)")
    parser.add_argument("--explain", metavar="OUT.png", default=None,
                        help="also write each image's attention-rollout map (the paper's Figure 6) to this PNG")


def _resize_images(images, size):
    """Bilinear resize to `size` (no antialiasing, as the official evaluation's
    tf.image.resize), as float32 [0, 255] pixels."""
    import numpy as np
    from keras import ops

    resized = [
        ops.convert_to_numpy(
            ops.image.resize(image[None].astype("float32"), size, interpolation="bilinear", antialias=False)
        )[0]
        for image in images
    ]
    return np.stack(resized)


def _load_model(name, weights, input_shape=None, sha256=None):
    """(model, label set or None, what the weights are) for --model/--weights/--sha256;
    `input_shape` for a constructor (a .keras model has its own)."""
    from keras_vit import labels as vit_labels
    from keras_vit import models, registry

    if name.endswith(MODEL_FILE_SUFFIX):
        for flag, value in (("--weights", weights), ("--sha256", sha256)):
            if value is not None:
                raise UsageError(f"{flag} does not apply to {name}: a .keras model carries its own weights.")
        labels = vit_labels.labels_file_for(name)
        return _load_keras_file(name), labels if os.path.isfile(labels) else None, "its saved weights"
    if os.sep in name or "/" in name:  # a path, not a constructor name
        problem = "not a .keras model file" if os.path.exists(name) else "no such file or folder"
        raise UsageError(f"{name}: {problem} (a model is a constructor name, a .keras file or, for predict, "
                         "an export folder).")
    constructor = models.get_constructor(name)
    label_set = None
    if weights is not None and not os.path.exists(weights):
        entry = registry.find_checkpoint(weights, architecture=name)
        label_set = entry.labels if entry is not None else None
    model = constructor(weights=weights, input_shape=input_shape, expected_sha256=sha256)
    return model, label_set, weights or "random weights"


def _load_keras_file(path):
    """A saved `.keras` model, or a one-line UsageError saying what is wrong with the file."""
    import re
    import zipfile
    import zlib

    import keras

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such model file.")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, not a .keras model file.")
    try:  # a .keras file is a zip archive: check it whole first (Keras calls a bad one "File not found")
        with zipfile.ZipFile(path) as archive:
            bad_member = archive.testzip()
            problem = f"{bad_member} in it is corrupt" if bad_member else None
            if problem is None and "config.json" not in archive.namelist():
                problem = "it holds no config.json"
    except (zipfile.BadZipFile, zlib.error, OSError, EOFError, ValueError, NotImplementedError) as error:
        problem = first_line(error) if os.path.getsize(path) else "the file is empty"
    if problem is not None:
        raise UsageError(f"{path} is not a readable .keras model ({problem}): truncated or damaged? Save it again.")
    try:
        return keras.saving.load_model(path)
    except (TypeError, ValueError, KeyError, OSError) as error:
        unknown = re.search(r"Could not locate class '([^']+)'", str(error))
        if unknown is None:
            raise UsageError(f"{path}: Keras cannot load it ({first_line(error)})") from None
        raise UsageError(
            f"{path}: Keras cannot rebuild its class {unknown.group(1)!r}, which neither Keras nor this keras_vit "
            "defines (saved by another version, or with another package's layers). In Python, import the package "
            "that defines it before keras.saving.load_model (keras_vit's layers: import keras_vit)."
        ) from None


def _input_size(model):
    """The model's input size; for a model of any size, the size its position embedding was stored for."""
    size = tuple(model.input_shape[1:3])
    if None in size:
        posemb = model.get_layer("position_embedding")
        size = tuple(g * p for g, p in zip(posemb.grid_size, posemb.patch_pixels))
    return size


def _require_classifier(model, command):
    from keras_vit import serving

    problem = serving.not_a_classifier(model)
    if problem:
        raise UsageError(f"{command} needs a classifier: {problem}.")


def _run_predict(args):
    from keras_vit import images as vit_images

    if args.explain is not None and not args.explain.lower().endswith(".png"):
        raise UsageError(f"--explain writes a PNG picture: give a name ending in .png, got {args.explain!r}.")
    if args.explain is not None and not os.path.isdir(os.path.dirname(args.explain) or "."):
        raise UsageError(f"--explain {args.explain}: the folder {os.path.dirname(args.explain)} does not exist.")
    # Every file checked before the model loads, decoded as the export's serving_default decodes it.
    images = [vit_images.read_image(path) for path in args.images]

    import keras
    import numpy as np

    from keras_vit import labels as vit_labels
    from keras_vit import serving

    if os.path.isdir(args.model):
        return _predict_with_export(args, images)
    if args.precision != "float32":
        raise UsageError(f"--precision {args.precision} applies to an OpenVINO export folder; {args.model} is not "
                         "one (a Keras model computes in its dtype policy's precision).")
    model, label_set, source = _load_model(args.model, args.weights, sha256=args.sha256)
    _require_classifier(model, "predict")
    classes = model.output_shape[-1]
    names = vit_labels.class_names(classes, args.labels or label_set)
    batch = _resize_images(images, _input_size(model))
    scores = keras.ops.convert_to_numpy(serving.probabilities(model, model.predict(batch, batch_size=8, verbose=0)))
    if args.weights is None and not args.model.endswith(MODEL_FILE_SUFFIX):
        print(f"note: {args.model} has random weights, so these predictions mean nothing; "
              "pass --weights TAG (see `keras-vit list weights`).")
    top = min(args.top, classes)
    captions = []
    for path, row in zip(args.images, scores):
        best = np.argsort(-row)[:top]
        print(f"{path}  ({args.model}, {source})")
        for rank, index in enumerate(best, 1):
            print(f"  {rank}. {row[index]:.4f}  {names[index]}")
        captions.append(f"{os.path.basename(path)}: {names[best[0]]} ({row[best[0]]:.2f})")
    if args.explain is not None:
        from keras_vit import visualize

        heatmaps = visualize.attention_rollout_maps(model, batch)
        visualize.save_attention_overlay(batch, heatmaps, args.explain, captions=captions)
        print(f"attention maps: {args.explain}")


def _predict_with_export(args, images):
    """`predict --model EXPORT_DIR`: the export's own runtime classifies the images."""
    import numpy as np

    from keras_vit import labels as vit_labels
    from keras_vit import runtimes

    for flag, value in (("--weights", args.weights), ("--sha256", args.sha256), ("--explain", args.explain)):
        if value is not None:
            raise UsageError(f"{flag} does not apply to an export folder ({args.model}): it holds its own model.")
    export = runtimes.load_export(args.model, precision=args.precision)
    scores = export.classify(images)
    classes = scores.shape[-1]
    if args.labels:  # the user's labels over the export's own labels.txt
        names = vit_labels.class_names(classes, args.labels)
    else:
        names = export.class_names or [f"class_{i}" for i in range(classes)]
    if len(names) != classes:
        raise UsageError(f"{export.folder}: labels.txt has {len(names)} names for a model with {classes} classes.")
    top = min(args.top, classes)
    for path, row in zip(args.images, scores):
        print(f"{path}  ({export.title}, {export.file})")
        for rank, index in enumerate(np.argsort(-row)[:top], 1):
            print(f"  {rank}. {row[index]:.4f}  {names[index]}")


# ---------------------------------------------------------------------------
# export
# ---------------------------------------------------------------------------


# keras_vit.serving.QUANTIZE_MODES and FORMATS, spelled out so that building the parser imports no keras
# (a test checks they agree).
QUANTIZE_CHOICES = ("int8",)
FORMAT_CHOICES = ("tf_saved_model", "openvino", "onnx", "litert")


def _add_export(subparsers):
    parser = subparsers.add_parser(
        "export",
        help="export a model for serving (EXPORT_DIR/<version>/): a TF Serving SavedModel, or OpenVINO, ONNX "
        "or LiteRT",
        description="Writes MODEL in EXPORT_DIR/<version>/, the layout TensorFlow Serving (and OpenVINO Model "
        "Server) loads. The default --format tf_saved_model has signatures serving_default (encoded JPEG/PNG "
        "images, REST {\"b64\": ...}), serve_pixels (uint8 batches) and serve_float (float32 batches as "
        "model.predict takes); --format openvino, onnx or litert writes one model file taking float32 [0, 255] "
        "pixels and returning probabilities, the fast path on CPUs. Each export needs its runtime only, not "
        "keras_vit.",
    )
    parser.add_argument("model", metavar="MODEL", help="constructor name (e.g. ViT_B16) or a saved .keras model")
    parser.add_argument("export_dir", metavar="EXPORT_DIR", help="the model's folder for TF Serving")
    _add_model_arguments(parser, model_flag=False)  # MODEL is positional here
    parser.add_argument("--version", type=int, default=None,
                        help="version folder number (default: one more than the highest there)")
    parser.add_argument("--top", type=_positive_int, default=5, metavar="K", help="top-k outputs (5)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing version folder")
    parser.add_argument("--any-size", action="store_true",
                        help="serve each image at its own size (rounded to whole patches) instead of resizing "
                        "all to one; MODEL is built with input_shape=(None, None, 3) (a .keras model must be)")
    parser.add_argument("--format", choices=FORMAT_CHOICES, default="tf_saved_model",
                        help="tf_saved_model (TF Serving, the default), openvino (model.xml/.bin), onnx "
                        "(model.onnx) or litert (model.tflite): the last three take float32 [0, 255] pixels at "
                        "the model's size and return probabilities; each version folder gets labels.txt")
    parser.add_argument("--quantize", choices=QUANTIZE_CHOICES, default=None,
                        help="export int8: for tf_saved_model Keras's model.quantize (int8 Dense/attention kernels "
                        "and matmuls; slower than float32 on CPUs), for the other formats the runtime's own int8 "
                        "path (openvino needs --calibration-images); outputs close to float's")
    parser.add_argument("--calibration-images", default=None, metavar="DIR",
                        help="with --format openvino --quantize int8: a folder of images like those served "
                        "(a few hundred; its .jpg, .jpeg, .png, .gif and .bmp files) to calibrate the int8 "
                        "activations")


def _run_export(args):
    from keras_vit import labels as vit_labels
    from keras_vit import runtimes, serving

    input_shape = (None, None, 3) if args.any_size else None
    model, label_set, source = _load_model(args.model, args.weights, input_shape, sha256=args.sha256)
    _require_classifier(model, "export")
    names = vit_labels.class_names(model.output_shape[-1], args.labels or label_set)
    calibration = None
    if args.calibration_images:  # the flags checked before the folder's images are read
        runtimes.check_export(args.format, args.any_size, args.quantize, args.calibration_images)
        calibration = _calibration_images(args.calibration_images, model)
    version_dir = serving.export_for_serving(
        model, args.export_dir, class_names=names, version=args.version, top_k=args.top, overwrite=args.overwrite,
        any_size=args.any_size, quantize=args.quantize, format=args.format, calibration_images=calibration,
    )
    height, width = model.input_shape[1:3]
    size = "any size" if args.any_size else f"{height}x{width}"
    precision = f", {args.quantize}" if args.quantize else ""
    folder = os.path.abspath(args.export_dir)
    name = os.path.basename(folder)
    kind = "" if args.format == "tf_saved_model" else f", {args.format}"
    print(f"{args.model} ({source}, {len(names)} classes, {size}{precision}{kind}) -> {version_dir}")
    if args.format == "tf_saved_model":
        print(f"signatures: {', '.join(serving.SIGNATURES)}")
        print(f"serve it:   docker run -p 8501:8501 -v {folder}:/models/{name} -e MODEL_NAME={name} tensorflow/serving")
        print(f"query it:   curl -d '{{\"instances\": [{{\"b64\": \"'$(base64 -w0 IMAGE.jpg)'\"}}]}}' "
              f"localhost:8501/v1/models/{name}:predict")
    else:
        print("input:      images, float32 (batch, height, width, 3) pixels in [0, 255]; output: probabilities")
        if args.format in ("openvino", "onnx"):
            print(f"serve it:   docker run -p 9000:9000 -v {folder}:/models/{name} openvino/model_server "
                  f"--model_path /models/{name} --model_name {name} --port 9000")
    print(f"try it:     keras-vit predict IMAGE.jpg --model {args.export_dir}")


def _calibration_images(folder, model):
    """The image files in `folder` (by their suffix; other files are left
    out), resized to the model's input size, as float32 pixels."""
    from keras_vit import images as vit_images

    if not os.path.isdir(folder):
        raise UsageError(f"--calibration-images {folder}: not a folder of images.")
    paths = sorted(os.path.join(folder, name) for name in os.listdir(folder)
                   if os.path.isfile(os.path.join(folder, name)) and not name.startswith(".")
                   and name.lower().endswith(vit_images.FILE_SUFFIXES))
    if not paths:
        raise UsageError(f"--calibration-images {folder}: the folder has no image files "
                         f"({', '.join(vit_images.FILE_SUFFIXES)}).")
    size = _input_size(model)
    return _resize_images([vit_images.read_image(path) for path in paths], size)


# ---------------------------------------------------------------------------
# evaluate
# ---------------------------------------------------------------------------


FEW_SHOT_BATCH_SIZE = 64
FEW_SHOT_SEEDS = 3


def _int_list(text):
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected whole numbers separated by commas, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive whole numbers separated by commas, got {text!r}")
    return tuple(values)


def _add_evaluate(subparsers):
    parser = subparsers.add_parser(
        "evaluate",
        help="few-shot linear accuracy of a model's representation (the paper's section 4.1), or VTAB-1k",
        description="Embeds each dataset's train and test images once with MODEL (its pre_logits "
        "representation), then fits a ridge classifier on k examples per class for each seed and "
        "prints the test accuracy, mean and spread over seeds (big_vision's few-shot protocol).",
    )
    parser.add_argument("model", metavar="MODEL", help="constructor name (e.g. ViT_B16) or a saved .keras model")
    parser.add_argument("--weights", default=None,
                        help="checkpoint tag, official .npz or .weights.h5 (constructor names only)")
    parser.add_argument("--dataset", action="append", default=None, metavar="NAME",
                        help="few-shot dataset: caltech101, cars196, cifar100, dtd, oxford_iiit_pet, uc_merced, "
                        "imagenet2012, digits or an image folder; repeat or separate by commas")
    parser.add_argument("--shots", type=_int_list, default=None, metavar="K,K,...",
                        help="examples per class (default 1,5,10,25)")
    # None: not given, so that --vtab can refuse it (and pick its own batch size).
    parser.add_argument("--seeds", type=_positive_int, default=None, metavar="N",
                        help=f"seeds 0..N-1 ({FEW_SHOT_SEEDS})")
    parser.add_argument("--batch-size", type=_positive_int, default=None,
                        help=f"images per forward pass ({FEW_SHOT_BATCH_SIZE}); with --vtab, the fine-tuning batch "
                        "(the paper's 512)")
    parser.add_argument("--image-size", type=_positive_int, default=None, metavar="PIXELS",
                        help="the side of the square images fed to the model: default its input size, required for "
                        "a model of any size; with --vtab, the fine-tuning and test resolution (the paper's 384)")
    parser.add_argument("--data-dir", default=None, help="the TFDS data directory")
    parser.add_argument("--vtab", default=None, metavar="TASKS",
                        help="instead: fine-tune on VTAB-1k tasks (all, natural, specialized, structured or "
                        "names separated by commas) with the paper's protocol; --shots, --seeds and --dataset "
                        "do not apply")
    parser.add_argument("--output", default=None, metavar="OUT.json", help="also write the results as JSON")


def _run_evaluate(args):
    from keras_vit import evaluation

    if args.vtab is not None:
        return _run_vtab(args)
    if not args.dataset:
        raise UsageError("give --dataset NAME (or --vtab TASKS).")
    names = [name.strip() for value in args.dataset for name in value.split(",") if name.strip()]
    datasets = {name: evaluation.dataset_sources(name, args.data_dir) for name in names}  # before the model
    model, _, source = _load_model(args.model, args.weights)
    seeds = args.seeds or FEW_SHOT_SEEDS
    results = evaluation.few_shot(model, datasets, shots=args.shots or evaluation.SHOTS,
                                  seeds=tuple(range(seeds)), batch_size=args.batch_size or FEW_SHOT_BATCH_SIZE,
                                  data_dir=args.data_dir, image_size=_few_shot_image_size(args, model))
    print(f"{args.model} ({source}): few-shot linear accuracy (%), mean ± std over {seeds} seed(s)")
    return _report(evaluation.format_results(results), results, args.output)


def _few_shot_image_size(args, model):
    """--image-size, checked against the model: required for a model of any size, else its own size or absent."""
    size = tuple(model.input_shape[1:3])
    if None in size:
        if args.image_size is None:
            stored = "x".join(map(str, _input_size(model)))
            raise UsageError(f"{args.model} takes images of any size: give --image-size PIXELS, the side to feed it "
                             f"(its position embedding was stored for {stored}).")
        return args.image_size
    if args.image_size is not None and size != (args.image_size, args.image_size):
        raise UsageError(f"--image-size {args.image_size} does not apply to {args.model}: it takes "
                         f"{size[0]}x{size[1]} images; leave --image-size out.")
    return args.image_size


def _run_vtab(args):
    from keras_vit import models
    from keras_vit.evaluation import vtab

    if args.model.endswith(MODEL_FILE_SUFFIX):
        raise UsageError("--vtab fine-tunes a fresh model per task: give a constructor name and --weights.")
    # VTAB fine-tunes on each task's 1,000 examples with one seed: few-shot flags would be silently ignored.
    for flag, value in (("--shots", args.shots), ("--seeds", args.seeds), ("--dataset", args.dataset)):
        if value is not None:
            raise UsageError(f"{flag} does not apply to --vtab: it fine-tunes on each task's 1,000 training "
                             f"examples (leave {flag} out, or drop --vtab for few-shot evaluation).")
    constructor = models.get_constructor(args.model)
    tasks = vtab.parse_tasks(args.vtab)

    def build_model(num_classes, input_shape):
        return constructor(weights=args.weights, classes=num_classes, input_shape=input_shape)

    protocol = {"batch_size": args.batch_size, "image_size": args.image_size}  # the paper's where not given
    results = vtab.run(build_model, tasks, data_dir=args.data_dir,
                       **{name: value for name, value in protocol.items() if value is not None})
    return _report(vtab.format_results(results), results, args.output)


def _report(table, results, output):
    """Prints the table; writes the results as JSON when asked to."""
    import json

    print(table)
    if output:
        with open(output, "w") as f:
            json.dump(results, f, indent=1)
    return 0


# ---------------------------------------------------------------------------
# demo
# ---------------------------------------------------------------------------


def _add_demo(subparsers):
    parser = subparsers.add_parser(
        "demo",
        help="offline end to end: train a small ViT on digits, save, export for serving, draw attention",
        description="Trains a small ViT on scikit-learn's bundled handwritten digits (no network needed), "
        "reports its held-out accuracy, saves it as .keras, exports it for TF Serving, classifies held-out "
        "digits through the reloaded export and writes an attention-map picture.",
    )
    parser.add_argument("--output-dir", default="keras_vit_demo", help="where everything goes (./keras_vit_demo)")
    parser.add_argument("--epochs", type=_positive_int, default=None, help="training epochs (25)")
    parser.add_argument("--seed", type=int, default=0,
                        help="seed of the initialisation and the batch order (0); the accuracy varies with it")


def _run_demo(args):
    from keras_vit import demo

    try:
        result = demo.run(args.output_dir, epochs=args.epochs or demo.EPOCHS, seed=args.seed)
    except ImportError as error:  # scikit-learn missing: a setup problem, not a bug
        raise UsageError(str(error)) from None
    if result["accuracy"] < demo.ACCURACY_BAR:
        print(f"keras-vit demo: error: held-out accuracy {result['accuracy']:.2%} is below "
              f"the demo's {demo.ACCURACY_BAR:.0%} bar: nothing was saved or exported.", file=sys.stderr)
        return 1
    return 0


SUBCOMMANDS = {
    "list": (_add_list, _run_list),
    "convert": (_add_convert, _run_convert),
    "predict": (_add_predict, _run_predict),
    "export": (_add_export, _run_export),
    "demo": (_add_demo, _run_demo),
    "evaluate": (_add_evaluate, _run_evaluate),
}


class _ArgumentParser(argparse.ArgumentParser):
    """Reports a misused flag in one line (argparse also prints the usage)."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def build_parser():
    parser = _ArgumentParser(
        prog="keras-vit",
        description="Vision Transformers for Keras 3, with Google's official checkpoints.",
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for add, _ in SUBCOMMANDS.values():
        add(subparsers)
    return parser


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        print(f"keras-vit: error: choose a command: {', '.join(SUBCOMMANDS)} (see keras-vit --help)", file=sys.stderr)
        return 2
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    try:
        status = SUBCOMMANDS[args.command][1](args)
    except (UsageError, ValueError, OSError) as error:  # OSError: missing files, downloads
        print(f"keras-vit {args.command}: error: {first_line(error)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("keras-vit: interrupted", file=sys.stderr)
        return 130
    return status or 0


if __name__ == "__main__":
    sys.exit(main())
