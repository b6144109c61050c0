"""Export an image classifier for serving: a TF Serving SavedModel, or an
OpenVINO, ONNX or LiteRT model.

    keras_vit.export_for_serving(model, "exports/vit")                     # -> exports/vit/1/
    keras_vit.export_for_serving(model, "exports/vit", format="openvino")  # -> exports/vit/2/model.xml

writes `EXPORT_DIR/<version>/` (TF Serving's versioned layout; the next
free integer by default), with `labels.txt` (the class names, one per line)
beside the model. `format="openvino"`, `"onnx"` and `"litert"` write one
model file taking float32 [0, 255] pixels and returning probabilities, as
`serve_float` below: the fast path on CPUs (`keras_vit.runtimes` says how
each is written, quantized and run). The rest of this page is the default
format, the SavedModel.

The forward pass is traced into the SavedModel graph with the model's
variables, so serving it needs TensorFlow only, not keras or keras_vit.
Three signatures, all with the same outputs:

    serving_default  images: string (batch,)   encoded JPEG/PNG/GIF/BMP files
                     (keras_vit.images: at most 40 million pixels each);
                     TF Serving's REST API carries them as {"b64": "..."}
    serve_pixels     images: uint8 (batch, height, width, 3), any size
    serve_float      images: float32 (batch, H, W, 3) at the model's size,
                     exactly what `model.predict` takes

    probabilities    float32 (batch, classes)
    top_k_scores     float32 (batch, k)     the k largest probabilities
    top_k_indices    int32   (batch, k)     their class ids
    top_k_labels     string  (batch, k)     their class names

Encoded and uint8 images are resized to the model's input size (bilinear,
as the official evaluation pipeline) as [0, 255] pixels, then scaled the way
the model expects: models built with `include_preprocessing=True` (the
default) take the pixels as they are; others get `preprocess_inputs`'
[-1, 1] scaling inside the graph. Bad input (not an image, wrong rank or
channels, an empty batch) fails with an error that names the problem.

Native resolution: with `any_size=True` (`keras-vit export --any-size`) and
a model built with `input_shape=(None, None, 3)`, nothing is resized to one
size: serving_default classifies each image at its own size and serve_pixels
each batch at its size, rounded to the nearest multiple of the model's pixels
per token (at least one token); serve_float takes any multiple as it is.

int8: with `quantize="int8"` (`keras-vit export --quantize int8`) the export
runs a quantized copy of the model (Keras's `model.quantize("int8")`; the
model passed in stays float): every Dense and EinsumDense kernel (the
attention projections, the MLPs, the head) is stored as int8 with one float32
scale per output channel, and each of their matmuls quantizes its input per
token on the fly and multiplies int8 by int8 into int32. The patch embedding
(a convolution), LayerNorms, attention softmax and position embedding stay
float. The export's variables are about a quarter of the float32 size
(ViT-B/16: 85 MiB, not 330) and its outputs are close to float's, not equal
(the demo's digits: the same held-out accuracy). On a CPU it is slower than
float32, not faster (TensorFlow's CPU int8 matmul runs at about a third of
float32's throughput; `benchmarks/int8_serving.py`): do not use it for speed
on a CPU.

Every format is written from TensorFlow graphs, so this module needs the
TensorFlow backend; it imports TensorFlow only when called, so `import
keras_vit` works without it.
"""

import functools
import os
import shutil
import warnings
from typing import NamedTuple

import keras
from keras import ops

from keras_vit import labels as vit_labels
from keras_vit import runtimes
from keras_vit.errors import first_line, is_whole_number
from keras_vit.layers import TokenPooling, scale_pixels

SIGNATURES = ("serving_default", "serve_pixels", "serve_float")
DEFAULT_TOP_K = 5
QUANTIZE_MODES = ("int8",)  # `quantize=` values besides None (float, as the model is)
FORMATS = ("tf_saved_model",) + tuple(runtimes.RUNTIMES)


def export_for_serving(
    model,
    export_dir,
    class_names=None,
    version=None,
    top_k=DEFAULT_TOP_K,
    model_takes_pixels=None,
    overwrite=False,
    any_size=False,
    quantize=None,
    format="tf_saved_model",
    calibration_images=None,
):
    """Writes `model` for serving in `export_dir/<version>/`: a TF Serving
    SavedModel, or an OpenVINO, ONNX or LiteRT model (`format`).

    Args:
        model: a Keras image classifier, (batch, H, W, 3) -> (batch, classes)
            (not a keras_vit model built with include_top=False). For the
            OpenVINO, ONNX and LiteRT formats a float model: they quantize
            it themselves (`quantize`).
        export_dir: the model's folder in a TF Serving model base path.
        class_names: the label of each class (a fine-tuned model's own), a
            shipped label set name ("imagenet1k", "imagenet21k") or a text
            file with one name per line. Default: the shipped set with the
            model's class count, else "class_N".
        version: integer version folder; default one more than the highest
            already there (1 for a new folder).
        top_k: how many best classes the top_k_* outputs hold.
        model_takes_pixels: whether the model takes [0, 255] pixels (True) or
            [-1, 1] values (False). Default: True when the model has a
            `Rescaling` layer (keras_vit's `include_preprocessing=True`).
        overwrite: replace an existing version folder instead of failing.
        any_size: serve at each image's own size (rounded to the model's
            pixels per token) instead of resizing to one size; needs a model
            built with `input_shape=(None, None, 3)`.
        quantize: None (the default) exports the model as it is; "int8"
            exports an int8 model, outputs close to (not equal to) the
            float model's. For the SavedModel, `quantized_copy(model)`:
            int8 Dense/EinsumDense kernels and int8 matmuls; for the other
            formats, the runtime's own int8 path (`keras_vit.runtimes`).
            `model` itself is not changed.
        format: "tf_saved_model" (the default: the three signatures above),
            "openvino" (`model.xml` + `model.bin`), "onnx" (`model.onnx`) or
            "litert" (`model.tflite`). The last three hold one function,
            float32 pixels "images" -> "probabilities", as `serve_float`
            (see `keras_vit.runtimes`); each version folder also gets
            `labels.txt`, the class names one per line. LiteRT cannot serve
            any_size=True. The file is float32 whatever the model's dtype
            policy: the runtime picks the precision (OpenVINO: bfloat16 on
            CPUs with bf16 units).
        calibration_images: with format="openvino" and quantize="int8",
            float32 pixels (count, H, W, 3) in [0, 255] at the model's input
            size, a few hundred images like those served, to calibrate the
            int8 activations.

    Returns:
        The path of the written version folder.
    """
    if not isinstance(model, keras.Model):
        load = (": load it with keras.saving.load_model first, or run `keras-vit export MODEL.keras EXPORT_DIR`"
                if isinstance(model, (str, os.PathLike)) else "")
        raise ValueError(f"export_for_serving takes a Keras model, got {type(model).__name__} {model!r}{load}.")
    format = _check_format(format)
    _require_tensorflow_backend()
    _check_quantize(quantize)
    runtimes.check_export(format, any_size, quantize, calibration_images)
    plan = _plan(model, class_names, top_k, model_takes_pixels, any_size)  # checks everything, writes nothing
    if format != "tf_saved_model":
        _require_float_model(model, format)
    if calibration_images is not None:
        calibration_images = runtimes.checked_calibration_images(
            calibration_images, (plan.height, plan.width), plan.multiple)
    version_dir, _ = _version_dir(export_dir, version, overwrite)
    if format == "tf_saved_model":
        served = quantized_copy(model, quantize) if quantize else model
        module = _saveable(_ServingGraph(served, plan).functions(), plan.class_names)
        write = functools.partial(_save_module, module)
    else:
        shape = (plan.height, plan.width, 3)
        served = runtimes.serving_model(float32_copy(model), plan.model_takes_pixels, shape)
        write = functools.partial(runtimes.write, format, served, input_shape=shape, quantize=quantize,
                                  calibration_images=calibration_images, pixels_per_token=plan.multiple)
    _write_atomically(write, export_dir, version_dir, plan.class_names)
    return version_dir


def _require_float_model(model, format):
    """The runtimes' files are written from a float32 copy of the model, so a
    model Keras already quantized (`model.quantize`) cannot go there."""
    quantized = _quantized_layer(model)
    if quantized is not None:
        raise ValueError(
            f"format={format!r} exports float weights, and {model.name!r} is already quantized by Keras (its layer "
            f"{quantized.name!r} is {_quantization_mode(quantized)}): export the float model with "
            "quantize='int8', the runtime's own int8 path."
        )


def _check_format(format):
    if format not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(map(repr, FORMATS))}, got {format!r}.")
    return format


def float32_copy(model):
    """`model` itself when every layer computes in float32, else a copy
    whose layers do (same weights): what the runtimes' files hold."""
    import keras

    if all(layer.dtype_policy.name == "float32" for layer in model._flatten_layers()):
        return model

    def as_float32(layer):
        config = layer.get_config()
        config["dtype"] = "float32"
        return layer.__class__.from_config(config)

    copy = keras.models.clone_model(model, clone_function=as_float32)
    copy.set_weights(model.get_weights())
    return copy


def quantized_copy(model, mode="int8"):
    """A copy of `model` quantized by Keras (`copy.quantize(mode)`), same
    weights before quantization; `model` is left as it is.

    Raises ValueError when the mode is not one of QUANTIZE_MODES, the model
    cannot be cloned from its config, is already quantized, or has no layer
    that Keras quantizes (so a copy that is silently still float never ships).
    """
    _check_quantize(mode, allow_none=False)
    already = _quantized_layer(model)
    if already is not None:
        raise ValueError(
            f"quantize={mode!r}: {model.name!r} is already quantized (its layer {already.name!r} is "
            f"{_quantization_mode(already)}); export it with quantize=None."
        )
    try:
        copy = keras.models.clone_model(model)
    except Exception as error:  # subclassed models without get_config, custom layers Keras cannot rebuild
        raise ValueError(
            f"quantize={mode!r} quantizes a copy of the model, and {model.name!r} cannot be cloned from its "
            f"config ({first_line(error)})."
        ) from None
    copy.set_weights(model.get_weights())
    with warnings.catch_warnings():
        # Keras warns once per layer it does not quantize (LayerNorm, Conv2D, ...) and
        # about numpy 2's __array__ copy keyword; neither is a problem here.
        warnings.filterwarnings("ignore", message=r"Layer .* does not have a `quantize` method")
        warnings.filterwarnings("ignore", message=r"__array__ implementation doesn't accept a copy keyword")
        copy.quantize(mode)
    if not any(_quantization_mode(layer) == mode for layer in copy._flatten_layers()):
        raise ValueError(
            f"quantize={mode!r}: {model.name!r} has no layer that Keras quantizes (Dense, EinsumDense); "
            "nothing would change."
        )
    return copy


def _check_quantize(quantize, allow_none=True):
    if quantize is None and allow_none:
        return
    if not isinstance(quantize, str) or quantize not in QUANTIZE_MODES:
        choices = " or ".join(map(repr, QUANTIZE_MODES))
        raise ValueError(f"quantize must be {'None (float) or ' if allow_none else ''}{choices}, got {quantize!r}.")


def _quantized_layer(model):
    """The first layer of `model` that Keras quantized, or None."""
    return next((layer for layer in model._flatten_layers() if _quantization_mode(layer)), None)


def _quantization_mode(layer):
    return getattr(getattr(layer, "dtype_policy", None), "quantization_mode", None)


def probabilities(model, outputs):
    """`model`'s outputs as float32 class probabilities: softmaxed over the
    last axis when the model returns logits (`runtimes.outputs_are_logits`), else as
    they are. keras.ops, so the export's graph and `keras-vit predict` (numpy
    in, a backend tensor out) share it."""
    outputs = ops.cast(outputs, "float32")
    return ops.softmax(outputs, axis=-1) if runtimes.outputs_are_logits(model) else outputs


# ---------------------------------------------------------------------------
# Step 1: what to export (checks the model and arguments; writes nothing)
# ---------------------------------------------------------------------------


class _Plan(NamedTuple):
    height: int  # None with any_size
    width: int
    class_names: list
    top_k: int
    model_takes_pixels: bool
    multiple: tuple = None  # with any_size: (rows, cols) pixels per token


def _require_tensorflow_backend():
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"export_for_serving needs the TensorFlow backend (this is {keras.backend.backend()!r}): "
            "save the model as .keras and run `KERAS_BACKEND=tensorflow keras-vit export MODEL.keras EXPORT_DIR`."
        )


def _plan(model, class_names, top_k, model_takes_pixels, any_size=False):
    height, width, classes = _classifier_shape(model, any_size)
    multiple = _pixels_per_token(model) if any_size else None
    names = _class_names(class_names, classes)
    top_k = int(top_k)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    if model_takes_pixels is None:
        model_takes_pixels = any(isinstance(layer, keras.layers.Rescaling) for layer in model.layers)
    return _Plan(height, width, names, min(top_k, classes), bool(model_takes_pixels), multiple)


def _pixels_per_token(model):
    """A keras_vit model of any size's input pixels per token (rows, cols)."""
    try:
        multiple = model.get_layer("position_embedding").patch_pixels
    except (ValueError, AttributeError):
        multiple = None
    if multiple is None:
        raise ValueError(
            f"any_size=True needs a keras_vit model built with input_shape=(None, None, 3); "
            f"{model.name!r} has no position embedding of any size."
        )
    return tuple(int(m) for m in multiple)


def _classifier_shape(model, any_size=False):
    input_shape = model.input_shape
    output_shape = model.output_shape
    if isinstance(input_shape, list) or len(input_shape) != 4 or input_shape[-1] != 3:
        raise ValueError(
            f"export_for_serving needs a model taking (batch, height, width, 3) images; "
            f"{model.name!r} takes {input_shape}."
        )
    problem = not_a_classifier(model)
    if problem:
        raise ValueError(f"export_for_serving needs a classifier returning (batch, classes); {problem}.")
    height, width = input_shape[1:3]
    if any_size:
        if height is not None or width is not None:
            raise ValueError(
                f"any_size=True needs a model of any input size; {model.name!r} takes {input_shape}: "
                "build it with input_shape=(None, None, 3)."
            )
        return None, None, int(output_shape[-1])
    if height is None or width is None:
        raise ValueError(
            f"export_for_serving needs a fixed input size; {model.name!r} takes {input_shape}: pass "
            "any_size=True (--any-size) to serve each image at its own size."
        )
    return int(height), int(width), int(output_shape[-1])


def not_a_classifier(model):
    """Why `model` is not an image classifier returning (batch, classes), or
    None: the check of the export and of `keras-vit predict`. A keras_vit
    model built with include_top=False returns tokens, or pooled features
    whose shape alone would pass for class scores."""
    output_shape = model.output_shape
    if isinstance(output_shape, (list, dict)) or len(output_shape) != 2 or not output_shape[-1]:
        return f"{model.name!r} returns {output_shape} (build it with include_top=True)"
    if isinstance(model.layers[-1], TokenPooling):
        return (f"{model.name!r} returns {output_shape[-1]} pooled features, not class scores (built with "
                "include_top=False): build it with include_top=True, or fine-tune a head on it")
    return None


def _class_names(class_names, classes):
    if class_names is None or isinstance(class_names, str):
        return vit_labels.class_names(classes, class_names)
    names = [str(name) for name in class_names]
    if len(names) != classes:
        raise ValueError(f"Got {len(names)} class names for a model with {classes} classes.")
    return names


MAX_VERSION = 2**63 - 1  # TF Serving reads version folders as int64


def _version_dir(export_dir, version, overwrite):
    """(the version folder's path, its number), checked; creates nothing."""
    if os.path.exists(export_dir) and not os.path.isdir(export_dir):
        raise ValueError(f"{export_dir} is a file; the export needs a folder (its versions go inside it).")
    if version is None:
        existing = [int(name) for name in os.listdir(export_dir) if name.isdigit()] if os.path.isdir(export_dir) else []
        version = max(existing, default=0) + 1
    if isinstance(version, str) and version.isdigit():
        version = int(version)
    if not is_whole_number(version) or not 0 <= version <= MAX_VERSION:
        raise ValueError(f"version must be a whole number from 0 to 2**63-1 (the version folder's name), "
                         f"got {version!r}.")
    version = int(version)
    version_dir = os.path.join(export_dir, str(version))
    if os.path.exists(version_dir) and not overwrite:
        raise ValueError(
            f"{version_dir} already exists; choose another version or pass overwrite=True (--overwrite)."
        )
    return version_dir, version


# ---------------------------------------------------------------------------
# Step 2: the three signatures' graphs
# ---------------------------------------------------------------------------

# Loaded signatures and TF Serving do not check inputs against the signature,
# so the specs leave even the rank open (a known rank would let the graph
# optimiser fold the checks away) and `_check_input` checks in the graph.
_INPUT_DTYPES = {"serving_default": "string", "serve_pixels": "uint8", "serve_float": "float32"}

_SHAPES = {
    "serving_default": "a rank-1 (batch,) vector of encoded images",
    "serve_pixels": "a rank-4 (batch, height, width, 3) uint8 batch",
    "serve_float": "a rank-4 (batch, height, width, 3) float32 batch",
}

class _ServingGraph:
    """The bodies of the three signatures for one model, each a named step."""

    def __init__(self, model, plan):
        import tensorflow as tf

        self.model = model
        self.plan = plan
        # One eager constant, captured (and saved) once for all signatures.
        self.label_table = tf.constant(plan.class_names, dtype=tf.string)

    def functions(self):
        """{name: tf.function} for SIGNATURES, each taking one `images` tensor."""
        import tensorflow as tf

        bodies = {"serving_default": self.serve_encoded, "serve_pixels": self.serve_pixels,
                  "serve_float": self.serve_float}
        return {
            name: tf.function(bodies[name], input_signature=[tf.TensorSpec(None, _INPUT_DTYPES[name], name="images")])
            for name in SIGNATURES
        }

    def serve_encoded(self, images):
        """serving_default: string (batch,) encoded image files -> outputs."""
        import tensorflow as tf

        height, width = self.plan.height, self.plan.width
        images = tf.ensure_shape(_check_input(images, "serving_default", rank=1), (None,))
        if self.plan.multiple is not None:
            # Each image at its own size: one model call per image.
            def scores(encoded):
                pixels = _decode_image(encoded, size=None)
                return self.scores(self.native_size(pixels[None]))[0]

            return self.outputs(tf.map_fn(
                scores, images, fn_output_signature=tf.TensorSpec((len(self.plan.class_names),), tf.float32),
            ))
        pixels = tf.map_fn(
            functools.partial(_decode_image, size=(height, width)), images,
            fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32),
        )
        return self.classify_pixels(pixels)

    def serve_pixels(self, images):
        """serve_pixels: uint8 (batch, any height, any width, 3) -> outputs."""
        import tensorflow as tf

        images = _check_input(images, "serve_pixels", rank=4, channels=3)
        return self.classify_pixels(tf.cast(tf.ensure_shape(images, (None, None, None, 3)), tf.float32))

    def serve_float(self, images):
        """serve_float: float32 at the model's size, given to the model untouched -> outputs."""
        import tensorflow as tf

        height, width = self.plan.height, self.plan.width
        if self.plan.multiple is not None:
            images = _check_input(images, "serve_float", rank=4, channels=3, multiple=self.plan.multiple)
            return self.classify(tf.ensure_shape(images, (None, None, None, 3)))
        images = _check_input(images, "serve_float", rank=4, channels=3, size=(height, width))
        return self.classify(tf.ensure_shape(images, (None, height, width, 3)))

    def native_size(self, pixels):
        """float32 [0, 255] (batch, H, W, 3) -> at the nearest multiple of the
        pixels per token, scaled as the model expects."""
        pixels = runtimes.nearest_token_multiple(pixels, self.plan.multiple)
        return pixels if self.plan.model_takes_pixels else scale_pixels(pixels)

    def classify_pixels(self, pixels):
        """float32 [0, 255] pixels of any size -> resized, scaled as the model expects -> outputs."""
        import tensorflow as tf

        if self.plan.multiple is not None:
            return self.classify(self.native_size(pixels))
        pixels = tf.image.resize(pixels, (self.plan.height, self.plan.width), method="bilinear")
        return self.classify(pixels if self.plan.model_takes_pixels else scale_pixels(pixels))

    def scores(self, images):
        """float32 (batch, H, W, 3) in the model's own input range -> probabilities."""
        return probabilities(self.model, self.model(images, training=False))

    def classify(self, images):
        """float32 (batch, H, W, 3) in the model's own input range -> the four outputs."""
        return self.outputs(self.scores(images))

    def outputs(self, scores):
        """(batch, classes) probabilities -> the four outputs."""
        import tensorflow as tf

        best = tf.math.top_k(scores, k=self.plan.top_k)
        return {
            "probabilities": scores,
            "top_k_scores": best.values,
            "top_k_indices": best.indices,
            "top_k_labels": tf.gather(self.label_table, best.indices),
        }


def _check_input(images, name, rank, channels=None, size=None, multiple=None):
    """`images` once its rank, batch, channels and size are as signature `name`
    needs; else the graph fails with a message naming the problem. Each check
    runs after the previous one (a rank-0 input has no batch to look at)."""
    import tensorflow as tf

    checks = [
        (lambda shape: tf.equal(tf.size(shape), rank), f"{name}: expected {_SHAPES[name]}, got shape"),
        (lambda shape: shape[0] > 0, f"{name}: empty batch; send at least one image"),
    ]
    if channels is not None:
        checks.append((
            lambda shape: tf.equal(shape[-1], channels),
            f"{name}: images must have {channels} (RGB) channels, got shape",
        ))
    if size is not None:
        checks.append((
            lambda shape: tf.reduce_all(tf.equal(shape[1:3], size)),
            f"{name}: images must be {size[0]}x{size[1]} (resize them, or use serve_pixels), got shape",
        ))
    if multiple is not None:
        checks.append((
            lambda shape: tf.reduce_all(tf.equal(shape[1:3] % multiple, 0)),
            f"{name}: height and width must be multiples of {multiple[0]} and {multiple[1]} "
            "(resize them, or use serve_pixels), got shape",
        ))
    previous = []
    for condition, message in checks:
        with tf.control_dependencies(previous):
            shape = tf.shape(images)
            previous = [tf.debugging.Assert(condition(shape), [message, shape])]
    with tf.control_dependencies(previous):
        return tf.identity(images)


def _decode_image(encoded, size):
    """One encoded image file -> float32 [0, 255] pixels, bilinearly resized
    to `size` (None: at its own size). Decoded by keras_vit.images, as
    `keras-vit predict` decodes files: the same formats, the same pixels,
    the same bound on the pixel count (read from the header, before decoding)."""
    import tensorflow as tf

    from keras_vit import images

    image = images.checked_decode(encoded, "serving_default")
    if size is None:
        return tf.ensure_shape(tf.cast(image, tf.float32), (None, None, 3))
    image = tf.image.resize(image, size, method="bilinear")
    return tf.ensure_shape(image, (*size, 3))


# ---------------------------------------------------------------------------
# Step 3: the saved object, written atomically
# ---------------------------------------------------------------------------


def _saveable(functions, class_names):
    """A tf.Module holding the signature functions, the variables they read and the class names."""
    import tensorflow as tf

    module = tf.Module()
    for name, function in functions.items():
        setattr(module, name, function)
    # Track the tf.Variables the traced graphs read (as keras' ExportArchive
    # does): tf.saved_model.save refuses untracked ones, and TF1-style loaders
    # (TF Serving, saved_model_cli) restore only these, not keras' wrappers.
    traced = [function.get_concrete_function() for function in functions.values()]
    read = {id(v): v for function in traced for v in function.variables}
    module.model_variables = list(read.values())
    module.class_names = tf.Variable(class_names, trainable=False, name="class_names")
    return module


def _save_module(module, folder):
    import tensorflow as tf

    signatures = {name: getattr(module, name).get_concrete_function() for name in SIGNATURES}
    tf.saved_model.save(module, folder, signatures=signatures)


def _write_atomically(write, export_dir, version_dir, class_names):
    """`write(folder)` into a folder next to `version_dir`, with `labels.txt`,
    then renamed into place: TF Serving polls the folder and must never see
    a half-written version, and a failed export leaves nothing."""
    partial_dir = os.path.join(export_dir, f".partial-{os.path.basename(version_dir)}-{os.getpid()}")
    new_export_dir = not os.path.exists(export_dir)
    shutil.rmtree(partial_dir, ignore_errors=True)
    try:
        os.makedirs(partial_dir)
        write(partial_dir)
        runtimes.write_labels(partial_dir, class_names)
        if os.path.exists(version_dir):  # overwrite=True
            shutil.rmtree(version_dir)
        os.replace(partial_dir, version_dir)
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
        if new_export_dir and os.path.isdir(export_dir) and not os.listdir(export_dir):
            os.rmdir(export_dir)  # a failed first export leaves no empty folder behind
