"""CPU serving runtimes beside TF Serving: OpenVINO, ONNX Runtime and LiteRT.

`keras_vit.export_for_serving(model, dir, format=...)` writes each of them
into TF Serving's versioned layout, `dir/<version>/`, as one model file
(RUNTIMES' `model_file`) and `labels.txt` (one class name per line). Each
file holds one function, written by Keras's `model.export` from
`serving_model(...)`:

    images         float32 (batch, H, W, 3), pixels in [0, 255], at the model's size
    probabilities  float32 (batch, classes)

the same contract as the SavedModel's `serve_float`: the model's own input
scaling and the softmax (for a model that returns logits) are inside, so a
server needs the runtime alone, not keras, keras_vit or TensorFlow. With
`any_size=True` (OpenVINO, ONNX) H and W are free, multiples of the model's
pixels per token, stored in the file's metadata (`pixels_per_token`).

The file is always float32: precision is the runtime's choice. OpenVINO runs
it in bfloat16 by default on CPUs with bf16 units (AVX512_BF16, AMX); pass
`INFERENCE_PRECISION_HINT="f32"` for float32 results. `quantize="int8"`
uses each runtime's own int8 path:

    openvino  NNCF post-training quantization: int8 weights and activations
              (int8 x int8 matmuls), calibrated on `calibration_images`
    onnx      onnxruntime's dynamic quantization: int8 weights, activations
              quantized per batch at run time; no calibration
    litert    LiteRT's dynamic-range quantization: int8 weights, int8 matmuls
              with activations quantized at run time; no calibration

`load_export(path)` runs any export (the SavedModel too) through its runtime:
`keras-vit predict IMAGES --model EXPORT_DIR` uses it.
"""

import contextlib
import importlib.util
import os
from typing import NamedTuple

import numpy as np

from keras_vit.errors import UsageError

INPUT_NAME = "images"
OUTPUT_NAME = "probabilities"
LABELS_FILE = "labels.txt"
# Where an any-size export keeps its pixels per token (rows, cols).
METADATA_KEY = "pixels_per_token"
SAVED_MODEL_FILE = "saved_model.pb"
# ONNX files are protobufs, which cannot exceed 2 GiB (ViT-H/14 is 2.5 GB in float32).
ONNX_MAX_BYTES = 2**31 - 1


class Runtime(NamedTuple):
    """One serving format: its file, what writes, runs and quantizes it, its setup.cfg extra."""

    title: str  # as users know it
    model_file: str  # in the version folder
    export_needs: tuple  # modules that write the file
    run_needs: str  # the module that runs it
    int8_needs: tuple  # modules that make its int8 file
    any_size: bool  # dynamic height and width
    extra: str  # setup.cfg extra that installs all of the above


RUNTIMES = {
    "openvino": Runtime("OpenVINO", "model.xml", ("openvino",), "openvino", ("nncf",), True, "openvino"),
    "onnx": Runtime("ONNX Runtime", "model.onnx", ("tf2onnx", "onnx"), "onnxruntime", ("onnxruntime",), True, "onnx"),
    "litert": Runtime("LiteRT", "model.tflite", (), "ai_edge_litert", (), False, "litert"),
}


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def check_export(format, any_size=False, quantize=None, calibration_images=None):
    """One-line errors, before anything is written, for what `format` cannot
    do or what is not installed."""
    if calibration_images is not None and not (quantize and format == "openvino"):
        raise ValueError(
            "calibration_images (--calibration-images) is only used by quantize='int8' with format='openvino'."
        )
    if format not in RUNTIMES:  # the SavedModel: serving.py checks the rest
        return
    runtime = RUNTIMES[format]
    if any_size and not runtime.any_size:
        raise ValueError(
            f"format={format!r}: {runtime.title} has no dynamic height and width, so any_size=True "
            f"(--any-size) cannot be served; export at one size, or use format='openvino' or 'onnx'."
        )
    needs = runtime.export_needs + (runtime.int8_needs if quantize else ())
    missing = [name for name in needs if not _installed(name)]
    if missing:
        raise ValueError(
            f"format={format!r} needs {', '.join(missing)}, which is not installed: "
            f"pip install 'keras-vit[{runtime.extra}]'."
        )
    if quantize and format == "openvino" and calibration_images is None:
        raise ValueError(
            "quantize='int8' with format='openvino' also quantizes the activations and needs "
            "calibration_images (--calibration-images DIR): a few hundred of your own images."
        )


def _installed(module):
    try:
        return importlib.util.find_spec(module) is not None
    except ValueError:  # a module set to None in sys.modules: it cannot be imported
        return False


def outputs_are_logits(model):
    """Whether the model's last layer has no activation (logits, not
    probabilities): the export and `keras-vit predict` then apply a softmax."""
    activation = getattr(model.layers[-1], "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def nearest_token_multiple(pixels, multiple):
    """float32 (batch, H, W, 3) -> bilinearly resized to the nearest multiple
    of `multiple` (rows, cols pixels per token), at least one token: how an
    any-size export sizes each image (in its graph, and in `keras-vit
    predict` for the other formats)."""
    import tensorflow as tf

    size = tf.cast(tf.shape(pixels)[1:3], tf.float32)
    multiple = tf.constant(multiple, tf.float32)
    rounded = tf.maximum(tf.floor(size / multiple + 0.5), 1.0) * multiple
    return tf.image.resize(pixels, tf.cast(rounded, tf.int32), method="bilinear")


def serving_model(model, model_takes_pixels, input_shape):
    """A Keras model around `model`: float32 [0, 255] pixels named "images"
    -> float32 probabilities named "probabilities" (a one-key dict, so that
    every format names its output so). `input_shape` is (H, W, 3), None for
    any size."""
    import keras

    from keras_vit.layers import pixel_rescaling

    images = keras.Input(input_shape, dtype="float32", name=INPUT_NAME)
    scaled = images if model_takes_pixels else pixel_rescaling(name="scale_pixels")(images)
    outputs = model(scaled)
    final = keras.layers.Softmax if outputs_are_logits(model) else keras.layers.Identity
    return keras.Model(images, {OUTPUT_NAME: final(dtype="float32", name=OUTPUT_NAME)(outputs)})


def write(format, model, folder, input_shape, quantize=None, calibration_images=None, pixels_per_token=None):
    """Writes the serving model `model` (see `serving_model`) in `format`
    into `folder` and returns the model file's path."""
    import tensorflow as tf

    runtime = RUNTIMES[format]
    path = os.path.join(folder, runtime.model_file)
    signature = [tf.TensorSpec((None,) + tuple(input_shape), tf.float32, name=INPUT_NAME)]
    if format == "onnx":
        size = sum(int(np.prod(v.shape)) * 4 for v in model.weights)
        if size > ONNX_MAX_BYTES:
            raise ValueError(
                f"format='onnx': {model.name!r} has {size / 2**30:.1f} GiB of float32 weights and ONNX files are "
                "limited to 2 GiB; use format='openvino'."
            )
    options = {"optimizations": [tf.lite.Optimize.DEFAULT]} if format == "litert" and quantize else {}
    if format == "openvino":  # written as Keras exports it, then finished under the final name
        keras_path = os.path.join(folder, "keras_export.xml")
        model.export(keras_path, format=format, input_signature=signature, verbose=False)
        _finish_openvino(keras_path, path, quantize, calibration_images, pixels_per_token)
        return path
    with _without_tf2onnx_optimizers() if format == "onnx" else contextlib.nullcontext():
        model.export(path, format=format, input_signature=signature, verbose=False, **options)
    if format == "onnx":
        _finish_onnx(path, quantize, pixels_per_token)
    return path


@contextlib.contextmanager
def _without_tf2onnx_optimizers():
    """Keras's ONNX export (tf2onnx) rewrites the converted graph with tf2onnx's
    own optimizers: for ViT-B/16 they took 80 of the export's 150 s and raised
    its peak memory from 8 to 18 GB, and onnxruntime optimizes the graph again
    when it loads it (the same img/s with and without them, measured). So they
    are skipped while Keras exports."""
    from tf2onnx import optimizer

    original = optimizer.optimize_graph
    optimizer.optimize_graph = lambda graph, *args, **kwargs: graph
    try:
        yield
    finally:
        optimizer.optimize_graph = original


def _finish_openvino(keras_path, path, quantize, calibration_images, pixels_per_token):
    import openvino as ov

    model = ov.Core().read_model(keras_path)  # maps keras_export.bin: that file must not be rewritten
    if quantize:
        model = _openvino_int8(model, calibration_images)
    if pixels_per_token is not None:
        model.set_rt_info(",".join(map(str, pixels_per_token)), ["keras_vit", METADATA_KEY])
    # float32 as written (save_model would halve the weights to float16 by default).
    ov.save_model(model, path, compress_to_fp16=False)
    del model
    for suffix in (".xml", ".bin"):
        os.remove(keras_path[:-len(".xml")] + suffix)


def checked_calibration_images(images, size, pixels_per_token=None):
    """`images` as float32 (count, H, W, 3) [0, 255] pixels at the served
    `size` (height, width), or, for a model of any size (size None), at
    multiples of `pixels_per_token`; else a one-line ValueError."""
    images = np.asarray(images, dtype="float32")
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) == 0:
        raise ValueError(
            f"calibration_images must be float32 pixels (count, height, width, 3), got shape {images.shape}."
        )
    height, width = images.shape[1:3]
    if None in size:
        if height % pixels_per_token[0] or width % pixels_per_token[1]:
            raise ValueError(
                f"calibration_images are {height}x{width}, not a multiple of the model's "
                f"{pixels_per_token[0]}x{pixels_per_token[1]} pixels per token: resize them."
            )
    elif (height, width) != tuple(size):
        raise ValueError(
            f"calibration_images are {height}x{width} and the model takes {size[0]}x{size[1]}: resize them "
            "(`keras-vit export --calibration-images DIR` resizes a folder's images)."
        )
    if not np.isfinite(images).all() or images.min() < 0 or images.max() > 255:
        raise ValueError("calibration_images must be pixels in [0, 255], as served; some are outside.")
    if images.max() <= 1:
        raise ValueError(
            f"calibration_images look like [0, 1] values (the largest is {images.max():g}); give [0, 255] "
            "pixels, as served (multiply by 255)."
        )
    return images


def _openvino_int8(model, calibration_images):
    import nncf

    images = np.asarray(calibration_images, dtype="float32")
    dataset = nncf.Dataset([images[i:i + 1] for i in range(len(images))])
    return nncf.quantize(model, dataset, model_type=nncf.ModelType.TRANSFORMER, subset_size=len(images))


def _finish_onnx(path, quantize, pixels_per_token):
    import onnx

    if quantize:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantized = path + ".int8"
        quantize_dynamic(path, quantized, weight_type=QuantType.QInt8)
        os.replace(quantized, path)
    if pixels_per_token is not None:
        model = onnx.load(path)
        onnx.helper.set_model_props(model, {METADATA_KEY: ",".join(map(str, pixels_per_token))})
        onnx.save(model, path)


def write_labels(folder, class_names):
    """Writes `labels.txt` into an export's version folder: one class name per line."""
    with open(os.path.join(folder, LABELS_FILE), "w", encoding="utf-8") as file:
        file.write("".join(f"{name}\n" for name in class_names))


# ---------------------------------------------------------------------------
# Running (keras-vit predict)
# ---------------------------------------------------------------------------


def version_folder(path):
    """`path` if it holds an export's model file, else its highest numbered
    version folder (TF Serving's choice); None when it is neither."""
    if _model_file(path):
        return path
    if not os.path.isdir(path):
        return None
    versions = [int(name) for name in os.listdir(path) if name.isdigit() and _model_file(os.path.join(path, name))]
    return os.path.join(path, str(max(versions))) if versions else None


def _model_file(folder):
    """(format, file path) of the export in `folder`, or None."""
    candidates = {"tf_saved_model": SAVED_MODEL_FILE, **{name: r.model_file for name, r in RUNTIMES.items()}}
    for format, name in candidates.items():
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            return format, path
    return None


class LoadedExport:
    """An export loaded into its runtime: `classify(images)` takes a list of
    uint8 (H, W, 3) RGB images of any sizes and returns (count, classes)
    probabilities, resized as the export's SavedModel would (bilinear, to
    the model's size or, for any size, to the nearest multiple of its pixels
    per token)."""

    def __init__(self, path, precision="float32"):
        if precision not in PRECISIONS:
            raise UsageError(f"precision must be one of {', '.join(map(repr, PRECISIONS))}, got {precision!r}.")
        folder = version_folder(path)
        if folder is None:
            raise UsageError(
                f"{path}: no export found (a folder with {SAVED_MODEL_FILE}, "
                f"{', '.join(r.model_file for r in RUNTIMES.values())}, or version folders holding one)."
            )
        self.format, self.file = _model_file(folder)
        self.folder = folder
        self.class_names = _read_labels(folder)
        runtime = RUNTIMES.get(self.format)
        if runtime is not None and not _installed(runtime.run_needs):
            raise UsageError(
                f"{self.file} is a {runtime.title} model and {runtime.run_needs} is not installed: "
                f"pip install 'keras-vit[{runtime.extra}]'."
            )
        self.title = runtime.title if runtime else "TensorFlow SavedModel"
        if precision != "float32" and self.format != "openvino":
            raise UsageError(
                f"precision={precision!r} applies to OpenVINO exports only; {self.file} is a {self.title} "
                "model, which computes in the precision it was exported in."
            )
        self._run, self.input_size, self.pixels_per_token = _LOADERS[self.format](self.file, precision)

    def classify(self, images):
        if self.format == "tf_saved_model":  # its serve_pixels resizes in the graph
            return np.concatenate([self._run(image[None]) for image in images])
        return np.concatenate([self._run(self._resized(image)) for image in images])

    def _resized(self, image):
        import tensorflow as tf

        pixels = tf.constant(image[None], tf.float32)
        if self.input_size is None:
            pixels = nearest_token_multiple(pixels, self.pixels_per_token)
        else:
            pixels = tf.image.resize(pixels, self.input_size, method="bilinear")
        return pixels.numpy()


PRECISIONS = ("float32", "bfloat16")  # what OpenVINO can be asked to compute in


def load_export(path, precision="float32"):
    """The export at `path` (an export folder or one version folder) in its
    runtime; `precision` "float32" or "bfloat16" (OpenVINO only)."""
    return LoadedExport(path, precision)


def _read_labels(folder):
    path = os.path.join(folder, LABELS_FILE)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as file:
        return [line.rstrip("\n") for line in file]


def _size_and_multiple(shape, metadata):
    """(height, width) or None, and pixels per token or None, from an input
    shape (batch, H, W, 3) with -1/None/0 for a free size."""
    height, width = (int(d) if d not in (None, -1, 0) and not isinstance(d, str) else None for d in shape[1:3])
    if height and width:
        return (height, width), None
    return None, tuple(int(v) for v in metadata.split(","))


def _load_saved_model(path, precision):
    import tensorflow as tf

    serve = tf.saved_model.load(os.path.dirname(path)).signatures["serve_pixels"]
    return (lambda images: serve(images=tf.constant(images, tf.uint8))[OUTPUT_NAME].numpy()), None, None


def _load_openvino(path, precision):
    import openvino as ov

    core = ov.Core()
    model = core.read_model(path)
    hint = {"float32": "f32", "bfloat16": "bf16"}[precision]
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    metadata = model.get_rt_info(["keras_vit", METADATA_KEY]).astype(str) if model.has_rt_info(
        ["keras_vit", METADATA_KEY]) else None
    shape = [d.get_length() if d.is_static else None for d in model.input(0).get_partial_shape()]
    size, multiple = _size_and_multiple(shape, metadata)
    return (lambda images: compiled(images)[0]), size, multiple


def _load_onnx(path, precision):
    import onnxruntime

    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map.get(METADATA_KEY)
    size, multiple = _size_and_multiple(session.get_inputs()[0].shape, metadata)
    return (lambda images: session.run([OUTPUT_NAME], {INPUT_NAME: images})[0]), size, multiple


def _load_litert(path, precision):
    from ai_edge_litert.interpreter import Interpreter

    interpreter = Interpreter(model_path=path)
    runner = interpreter.get_signature_runner()
    shape = interpreter.get_input_details()[0]["shape_signature"]
    size, _ = _size_and_multiple(shape, None)
    return (lambda images: runner(**{INPUT_NAME: images})[OUTPUT_NAME]), size, None


_LOADERS = {"tf_saved_model": _load_saved_model, "openvino": _load_openvino, "onnx": _load_onnx,
            "litert": _load_litert}
