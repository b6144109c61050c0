"""Export an image classifier as a SavedModel that TensorFlow Serving loads.

    keras_vit.export_for_serving(model, "exports/vit")     # -> exports/vit/1/

writes `EXPORT_DIR/<version>/` (TF Serving's versioned layout; the next
free integer by default). The forward pass is traced into the SavedModel
graph with the model's variables, so serving it needs TensorFlow only, not
keras or keras_vit. Three signatures, all with the same outputs:

    serving_default  images: string (batch,)   encoded JPEG/PNG/GIF/BMP files;
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

TF Serving runs graphs, so this module needs the TensorFlow backend; it
imports TensorFlow only when called, so `import keras_vit` works without it.
"""

import os
import shutil

import keras

from keras_vit import labels as vit_labels

SIGNATURES = ("serving_default", "serve_pixels", "serve_float")
DEFAULT_TOP_K = 5


def export_for_serving(
    model,
    export_dir,
    class_names=None,
    version=None,
    top_k=DEFAULT_TOP_K,
    model_takes_pixels=None,
    overwrite=False,
):
    """Writes `model` as a TF Serving SavedModel in `export_dir/<version>/`.

    Args:
        model: a Keras image classifier, (batch, H, W, 3) -> (batch, classes).
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

    Returns:
        The path of the written version folder.
    """
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            f"export_for_serving needs the TensorFlow backend (this is {keras.backend.backend()!r}): "
            "save the model as .keras and run `KERAS_BACKEND=tensorflow keras-vit export MODEL.keras EXPORT_DIR`."
        )
    import tensorflow as tf

    height, width, classes = _classifier_shape(model)
    names = _class_names(class_names, classes)
    top_k = int(top_k)
    if top_k < 1:
        raise ValueError(f"top_k must be at least 1, got {top_k}.")
    top_k = min(top_k, classes)
    if model_takes_pixels is None:
        model_takes_pixels = any(isinstance(layer, keras.layers.Rescaling) for layer in model.layers)
    logits = outputs_are_logits(model)
    version_dir, version = _version_dir(export_dir, version, overwrite)

    label_table = tf.constant(names, dtype=tf.string)

    def classify(images):
        """float32 (batch, H, W, 3) in the model's own input range -> outputs."""
        scores = tf.cast(model(images, training=False), tf.float32)
        if logits:
            scores = tf.nn.softmax(scores, axis=-1)
        best = tf.math.top_k(scores, k=top_k)
        return {
            "probabilities": scores,
            "top_k_scores": best.values,
            "top_k_indices": best.indices,
            "top_k_labels": tf.gather(label_table, best.indices),
        }

    def classify_pixels(pixels):
        """float32 [0, 255] pixels of any size -> outputs."""
        pixels = tf.image.resize(pixels, (height, width), method="bilinear")
        if not model_takes_pixels:
            pixels = pixels / 127.5 - 1.0  # keras_vit.preprocess_inputs
        return classify(pixels)

    # Loaded signatures and TF Serving do not check inputs against the
    # signature, so the specs leave shapes open (a known rank would let the
    # graph optimiser fold these checks away) and each check is in the graph,
    # run in order, with a message naming the problem.
    def checked(images, name, rank, channels=None, size=None):
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
        previous = []
        for condition, message in checks:
            with tf.control_dependencies(previous):
                shape = tf.shape(images)
                previous = [tf.debugging.Assert(condition(shape), [message, shape])]
        with tf.control_dependencies(previous):
            return tf.identity(images)

    def decode(encoded):
        is_image = tf.debugging.Assert(
            _is_image_file(encoded),
            ["serving_default: input is not a JPEG, PNG, GIF or BMP image; its first bytes:",
             tf.strings.substr(encoded, 0, 8)],
        )
        with tf.control_dependencies([is_image]):
            image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
        image = tf.image.resize(image, (height, width), method="bilinear")
        return tf.ensure_shape(image, (height, width, 3))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.string, name="images")])
    def serving_default(images):
        images = tf.ensure_shape(checked(images, "serving_default", rank=1), (None,))
        pixels = tf.map_fn(decode, images, fn_output_signature=tf.TensorSpec((height, width, 3), tf.float32))
        return classify_pixels(pixels)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def serve_pixels(images):
        images = checked(images, "serve_pixels", rank=4, channels=3)
        return classify_pixels(tf.cast(tf.ensure_shape(images, (None, None, None, 3)), tf.float32))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def serve_float(images):
        # The size is fixed: these values go to the model untouched.
        images = checked(images, "serve_float", rank=4, channels=3, size=(height, width))
        return classify(tf.ensure_shape(images, (None, height, width, 3)))

    module = tf.Module()
    signatures = {}
    for name, function in zip(SIGNATURES, (serving_default, serve_pixels, serve_float)):
        setattr(module, name, function)
        signatures[name] = function.get_concrete_function()
    # Track the tf.Variables the traced graphs read (as keras' ExportArchive
    # does), not the keras wrappers around them: TF1-style loaders
    # (TF Serving, saved_model_cli) only restore variables saved this way.
    captured = {id(v): v for function in signatures.values() for v in function.variables}
    module.model_variables = list(captured.values())
    module.class_names = tf.Variable(names, trainable=False, name="class_names")

    # Written next to the final folder and renamed into place: TF Serving
    # polls the folder and must never see a half-written version.
    partial_dir = os.path.join(export_dir, f".partial-{version}-{os.getpid()}")
    shutil.rmtree(partial_dir, ignore_errors=True)
    try:
        tf.saved_model.save(module, partial_dir, signatures=signatures)
        if os.path.exists(version_dir):  # overwrite=True
            shutil.rmtree(version_dir)
        os.replace(partial_dir, version_dir)
    finally:
        shutil.rmtree(partial_dir, ignore_errors=True)
    return version_dir


_SHAPES = {
    "serving_default": "a rank-1 (batch,) vector of encoded images",
    "serve_pixels": "a rank-4 (batch, height, width, 3) uint8 batch",
    "serve_float": "a rank-4 (batch, height, width, 3) float32 batch",
}

# The first bytes of each format tf.io.decode_image reads.
_IMAGE_MAGIC = (b"\xff\xd8\xff", b"\x89PNG", b"GIF8", b"BM")


def _is_image_file(encoded):
    import tensorflow as tf

    return tf.reduce_any(
        [tf.strings.substr(encoded, 0, len(magic)) == magic for magic in _IMAGE_MAGIC]
    )


def _classifier_shape(model):
    input_shape = model.input_shape
    output_shape = model.output_shape
    if isinstance(input_shape, list) or len(input_shape) != 4 or input_shape[-1] != 3:
        raise ValueError(
            f"export_for_serving needs a model taking (batch, height, width, 3) images; "
            f"{model.name!r} takes {input_shape}."
        )
    if isinstance(output_shape, list) or len(output_shape) != 2 or not output_shape[-1]:
        raise ValueError(
            f"export_for_serving needs a classifier returning (batch, classes); {model.name!r} "
            f"returns {output_shape} (build it with include_top=True)."
        )
    height, width = input_shape[1:3]
    if height is None or width is None:
        raise ValueError(f"export_for_serving needs a fixed input size; {model.name!r} takes {input_shape}.")
    return int(height), int(width), int(output_shape[-1])


def _class_names(class_names, classes):
    if class_names is None or isinstance(class_names, str):
        return vit_labels.class_names(classes, class_names)
    names = [str(name) for name in class_names]
    if len(names) != classes:
        raise ValueError(f"Got {len(names)} class names for a model with {classes} classes.")
    return names


def outputs_are_logits(model):
    """Whether the model's last layer has no activation (logits, not
    probabilities): the export and `keras-vit predict` then apply a softmax."""
    activation = getattr(model.layers[-1], "activation", None)
    return activation is None or getattr(activation, "__name__", "") == "linear"


def _version_dir(export_dir, version, overwrite):
    os.makedirs(export_dir, exist_ok=True)
    if version is None:
        existing = [int(name) for name in os.listdir(export_dir) if name.isdigit()]
        version = max(existing, default=0) + 1
    version = int(version)
    if version < 0:
        raise ValueError(f"version must be a non-negative integer, got {version}.")
    version_dir = os.path.join(export_dir, str(version))
    if os.path.exists(version_dir) and not overwrite:
        raise ValueError(
            f"{version_dir} already exists; choose another version or pass overwrite=True (--overwrite)."
        )
    return version_dir, version
