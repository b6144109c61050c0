"""TF Serving export: the SavedModel must stand alone and agree with model.predict.

One tiny non-square model (with its own class names) and one that takes
[-1, 1] inputs and returns logits are exported once per module, and the
first again as int8; a fresh Python process that cannot import keras or
keras_vit loads all three, as TF Serving would, and `saved_model_cli run`
reads one.
"""

import base64
import io
import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
from PIL import Image

import keras_vit
from keras_vit import images, labels, runtimes, serving
from harness import png, randomize_head, tiny_vit

tf = pytest.importorskip("tensorflow")
pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="TF Serving export is TensorFlow")

SHAPE = (32, 48, 3)
NAMES = ["cat", "dog", "car", "tree", "boat"]
TOLERANCE = 1e-5
# int8 export vs the float model, largest probability difference. Keras's
# int8 rounds each kernel per output channel and each matmul input per token
# to 127 steps of its largest magnitude (up to 1/254 of it per value); through
# the tiny random model's 13 quantized matmuls this moved its probabilities
# by up to 0.039 on these 3 random-pixel images (0.032 on 64 others): the
# bound leaves 2.5x. A wrong scale or layout moves them by O(1); the exact
# check is against Keras's own quantized copy (TOLERANCE).
INT8_TOLERANCE = 0.1
DEFAULT_K = serving.DEFAULT_TOP_K  # the "scaled" export's top_k (its 5 classes)
EXAMPLE_IMAGE = os.path.join(os.path.dirname(__file__), "..", "examples", "images", "cat.jpg")


def _pixels(batch=3, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (batch,) + SHAPE).astype("uint8")


def _png(image):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """{kind: (model, version_dir)} for a pixels+softmax and a [-1,1]+logits model."""
    root = tmp_path_factory.mktemp("exports")
    keras.utils.set_random_seed(0)
    pixels_model = tiny_vit(input_shape=SHAPE)
    randomize_head(pixels_model)
    scaled_model = tiny_vit(input_shape=SHAPE, include_preprocessing=False, classifier_activation=None)
    randomize_head(scaled_model)
    return {
        "pixels": (pixels_model, serving.export_for_serving(pixels_model, str(root / "pixels"), class_names=NAMES, top_k=3)),
        "scaled": (scaled_model, serving.export_for_serving(scaled_model, str(root / "scaled"))),
        "int8": (pixels_model, serving.export_for_serving(
            pixels_model, str(root / "int8"), class_names=NAMES, top_k=3, quantize="int8")),
    }


@pytest.fixture(scope="module")
def loaded(exported):
    """The pixels model's export, loaded in this process."""
    return tf.saved_model.load(exported["pixels"][1])


@pytest.fixture(scope="module")
def softmax_twin(exported):
    """The logits model's weights in a model whose head applies the softmax."""
    logits_model, _ = exported["scaled"]
    twin = tiny_vit(input_shape=SHAPE, include_preprocessing=False)
    twin.set_weights(logits_model.get_weights())
    assert not runtimes.outputs_are_logits(twin) and runtimes.outputs_are_logits(logits_model)
    return twin


FRESH_PROCESS = textwrap.dedent(
    """
    import base64, json, sys
    import numpy as np
    # The export must not need keras or keras_vit: make importing them fail.
    sys.modules["keras"] = None
    sys.modules["keras_vit"] = None
    import tensorflow as tf

    inputs = np.load(sys.argv[1])
    results = {}
    for kind in ("pixels", "scaled"):
        signatures = tf.saved_model.load(sys.argv[2 if kind == "pixels" else 3]).signatures
        results[kind + "/float"] = signatures["serve_float"](images=tf.constant(inputs[kind + "_float"]))
        results[kind + "/uint8"] = signatures["serve_pixels"](images=tf.constant(inputs["uint8"]))
    # The body of a TF Serving REST predict request, as a client would send it.
    body = json.loads(open(sys.argv[4]).read())
    encoded = [base64.b64decode(item["b64"]) for item in body["instances"]]  # as TF Serving does
    results["pixels/bytes"] = tf.saved_model.load(sys.argv[2]).signatures["serving_default"](images=tf.constant(encoded))
    int8 = tf.saved_model.load(sys.argv[6])
    results["int8/float"] = int8.signatures["serve_float"](images=tf.constant(inputs["pixels_float"]))
    results["int8/uint8"] = int8.signatures["serve_pixels"](images=tf.constant(inputs["uint8"]))
    # What the int8 export stores and runs: its variables' dtypes, and its
    # graph's matmuls that take int8 operands (in the signature's function library).
    graph = int8.signatures["serve_float"].graph.as_graph_def()
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    int8_matmuls = [node.name for node in nodes if node.op.startswith(("MatMul", "BatchMatMul"))
                    and node.attr["Ta" if "Ta" in node.attr else "T"].type == tf.int8.as_datatype_enum]
    results["int8/graph"] = {
        "variable_dtypes": tf.constant([v.dtype.name for v in int8.model_variables]),
        "int8_matmuls": tf.constant(len(int8_matmuls)),
    }
    arrays = {f"{key}:{name}": value.numpy() for key, out in results.items() for name, value in out.items()}
    np.savez(sys.argv[5], **{key: a.astype("S") if a.dtype == object else a for key, a in arrays.items()})
    """
)


@pytest.fixture(scope="module")
def fresh_process_outputs(exported, tmp_path_factory):
    work = tmp_path_factory.mktemp("fresh")
    pixels = _pixels()
    inputs = {
        "uint8": pixels,
        "pixels_float": pixels.astype("float32") + np.float32(0.25),  # not only whole numbers
        "scaled_float": np.random.default_rng(1).uniform(-1, 1, (3,) + SHAPE).astype("float32"),
    }
    np.savez(work / "inputs.npz", **inputs)
    body = {"instances": [{"b64": base64.b64encode(_png(image)).decode("ascii")} for image in pixels]}
    (work / "request.json").write_text(json.dumps(body))
    script = work / "serve.py"
    script.write_text(FRESH_PROCESS)
    command = [sys.executable, str(script), str(work / "inputs.npz"), exported["pixels"][1],
               exported["scaled"][1], str(work / "request.json"), str(work / "outputs.npz"), exported["int8"][1]]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 0, completed.stderr[-3000:]
    outputs = dict(np.load(work / "outputs.npz"))
    return inputs, outputs


def test_export_is_versioned_for_tf_serving(exported, tmp_path):
    _, version_dir = exported["pixels"]
    export_dir = os.path.dirname(version_dir)
    assert os.path.basename(version_dir) == "1"
    assert os.path.isfile(os.path.join(version_dir, "saved_model.pb"))
    assert os.listdir(export_dir) == ["1"], "no partial folders left behind"
    with pytest.raises(ValueError, match="already exists"):
        serving.export_for_serving(exported["pixels"][0], export_dir, version=1)
    assert os.listdir(export_dir) == ["1"]
    (tmp_path / "7").mkdir()
    assert serving._version_dir(str(tmp_path), None, overwrite=False) == (str(tmp_path / "8"), 8)


def test_signatures_and_outputs(loaded):
    assert set(loaded.signatures) == set(serving.SIGNATURES)
    outputs = loaded.signatures["serve_pixels"](images=tf.constant(_pixels(2)))
    assert outputs["probabilities"].shape == (2, 5) and outputs["probabilities"].dtype == tf.float32
    assert outputs["top_k_indices"].shape == (2, 3) and outputs["top_k_indices"].dtype == tf.int32
    assert outputs["top_k_scores"].shape == (2, 3)
    assert outputs["top_k_labels"].dtype == tf.string
    assert [name.decode() for name in loaded.class_names.numpy()] == NAMES


def test_fresh_process_float_input_matches_predict(exported, fresh_process_outputs):
    inputs, outputs = fresh_process_outputs
    model, _ = exported["pixels"]
    expected = model.predict(inputs["pixels_float"], verbose=0)
    probabilities = outputs["pixels/float:probabilities"]
    assert np.abs(probabilities - expected).max() <= TOLERANCE
    top = np.argsort(-expected, axis=-1)[:, :3]
    np.testing.assert_array_equal(outputs["pixels/float:top_k_indices"], top)
    np.testing.assert_allclose(outputs["pixels/float:top_k_scores"], np.take_along_axis(expected, top, -1), atol=TOLERANCE)
    assert outputs["pixels/float:top_k_labels"].tolist() == [[NAMES[i].encode() for i in row] for row in top]


def test_fresh_process_uint8_and_rest_bytes_match_predict(exported, fresh_process_outputs):
    inputs, outputs = fresh_process_outputs
    model, _ = exported["pixels"]
    expected = model.predict(inputs["uint8"].astype("float32"), verbose=0)
    assert np.abs(outputs["pixels/uint8:probabilities"] - expected).max() <= TOLERANCE
    # PNG is lossless: the REST body's images are the same pixels
    assert np.abs(outputs["pixels/bytes:probabilities"] - expected).max() <= TOLERANCE


def test_fresh_process_model_without_preprocessing(fresh_process_outputs, softmax_twin):
    """A model taking [-1, 1] and returning logits: float input goes in as it
    is, uint8 pixels are scaled in the graph, and the probabilities are those
    of the same weights with a softmax head."""
    inputs, outputs = fresh_process_outputs
    expected = softmax_twin.predict(inputs["scaled_float"], verbose=0)
    assert np.abs(outputs["scaled/float:probabilities"] - expected).max() <= TOLERANCE
    scaled = keras.ops.convert_to_numpy(keras_vit.preprocess_inputs(inputs["uint8"]))
    expected = softmax_twin.predict(scaled, verbose=0)
    assert np.abs(outputs["scaled/uint8:probabilities"] - expected).max() <= TOLERANCE
    np.testing.assert_allclose(outputs["scaled/uint8:top_k_scores"], -np.sort(-expected)[:, :DEFAULT_K], atol=TOLERANCE)
    np.testing.assert_allclose(outputs["scaled/uint8:probabilities"].sum(axis=-1), 1.0, rtol=1e-5)
    assert outputs["scaled/uint8:top_k_labels"][0, 0].decode().startswith("class_")


def _quantizable_kernels(model):
    """The kernels Keras's int8 mode quantizes: one per Dense and EinsumDense layer."""
    return [layer for layer in model._flatten_layers() if isinstance(layer, (keras.layers.Dense, keras.layers.EinsumDense))]


def test_fresh_process_int8_export_stores_and_runs_int8(exported, fresh_process_outputs):
    """Every Dense/EinsumDense kernel is an int8 variable of the export (13 in
    the tiny model: 4 attention projections and 2 MLP layers per block, the
    head) and each of their matmuls multiplies int8 by int8."""
    _, outputs = fresh_process_outputs
    model, _ = exported["int8"]
    kernels = len(_quantizable_kernels(model))
    assert kernels == 13
    dtypes = [dtype.decode() for dtype in outputs["int8/graph:variable_dtypes"]]
    assert dtypes.count("int8") == kernels, dtypes
    assert set(dtypes) == {"int8", "float32"}  # biases, scales, norms, embeddings, patch convolution
    assert outputs["int8/graph:int8_matmuls"] >= kernels


def test_fresh_process_int8_export_is_close_to_float(exported, fresh_process_outputs):
    """The int8 export gives what Keras's own quantized copy gives in this
    process (to float rounding), which is close to the float model but not
    equal to it (so the float graph was not exported by mistake)."""
    inputs, outputs = fresh_process_outputs
    model, _ = exported["int8"]
    quantized = serving.quantized_copy(model)
    for name, images in (("float", inputs["pixels_float"]), ("uint8", inputs["uint8"].astype("float32"))):
        served = outputs[f"int8/{name}:probabilities"]
        assert np.abs(served - quantized.predict(images, verbose=0)).max() <= TOLERANCE
        expected = model.predict(images, verbose=0)
        difference = np.abs(served - expected).max()
        assert 1e-5 < difference <= INT8_TOLERANCE, difference
        # The same best class wherever float's is clear (random pixels give near-ties).
        ranked = np.sort(expected, axis=-1)
        clear = ranked[:, -1] - ranked[:, -2] > 2 * INT8_TOLERANCE
        assert clear.any()
        np.testing.assert_array_equal(served.argmax(axis=-1)[clear], expected.argmax(axis=-1)[clear])
    assert outputs["int8/float:top_k_labels"].shape == (3, 3)


def test_int8_export_leaves_the_model_float(tmp_path):
    """quantize="int8" quantizes a copy: the caller's model keeps its float
    variables (the same objects, the same values) and its predictions."""
    model = tiny_vit(input_shape=SHAPE)
    randomize_head(model)
    images = _pixels(2).astype("float32")
    before = model.predict(images, verbose=0)
    variables = {id(v): (v.path, v.dtype, keras.ops.convert_to_numpy(v).copy()) for v in model.weights}
    policies = [layer.dtype_policy.name for layer in model._flatten_layers()]
    serving.export_for_serving(model, str(tmp_path), quantize="int8")
    assert {id(v) for v in model.weights} == set(variables)
    for v in model.weights:
        path, dtype, value = variables[id(v)]
        assert v.dtype == dtype == "float32", path
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(v), value)
    assert [layer.dtype_policy.name for layer in model._flatten_layers()] == policies
    assert not any(serving._quantization_mode(layer) for layer in model._flatten_layers())
    np.testing.assert_array_equal(model.predict(images, verbose=0), before)


def test_int8_export_of_a_model_of_any_size(tmp_path):
    """quantize="int8" with any_size=True: serve_float takes each size, close to float."""
    model = tiny_vit(input_shape=(None, None, 3))
    randomize_head(model)
    served = tf.saved_model.load(serving.export_for_serving(model, str(tmp_path), any_size=True, quantize="int8"))
    assert [v.dtype for v in served.model_variables].count(tf.int8) == len(_quantizable_kernels(model))
    for shape in ((2, 32, 32, 3), (2, 24, 48, 3)):
        images = np.random.default_rng(0).uniform(0, 255, shape).astype("float32")
        probabilities = served.signatures["serve_float"](images=tf.constant(images))["probabilities"].numpy()
        difference = np.abs(probabilities - model.predict(images, verbose=0)).max()
        assert 1e-5 < difference <= INT8_TOLERANCE, (shape, difference)


@pytest.mark.parametrize("quantize, problem", [
    ("int4", "quantize must be None (float) or 'int8', got 'int4'"),
    ("INT8", "quantize must be None (float) or 'int8', got 'INT8'"),
    (True, "quantize must be None (float) or 'int8', got True"),
    ("float8", "got 'float8'"),
])
def test_export_refuses_an_unknown_quantize_mode(tmp_path, quantize, problem):
    with pytest.raises(ValueError) as error:
        serving.export_for_serving(tiny_vit(), str(tmp_path), quantize=quantize)
    assert problem in str(error.value) and "\n" not in str(error.value)
    assert os.listdir(tmp_path) == [], "a refused export writes nothing"


def test_int8_export_refuses_a_model_it_cannot_quantize(tmp_path):
    already = serving.quantized_copy(tiny_vit())
    with pytest.raises(ValueError, match="is already quantized .* export it with quantize=None"):
        serving.export_for_serving(already, str(tmp_path), quantize="int8")
    # No Dense or EinsumDense layer: Keras would quantize nothing.
    inputs = keras.Input((8, 8, 3))
    convolution = keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(keras.layers.Conv2D(4, 3)(inputs)))
    with pytest.raises(ValueError, match="has no layer that Keras quantizes"):
        serving.export_for_serving(convolution, str(tmp_path), quantize="int8")
    assert os.listdir(tmp_path) == []


def test_saved_model_cli_run(exported, tmp_path):
    model, version_dir = exported["pixels"]
    images = _pixels(2, seed=5).astype("float32")
    np.save(tmp_path / "images.npy", images)
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    completed = subprocess.run(
        [cli, "run", "--dir", version_dir, "--tag_set", "serve", "--signature_def", "serve_float",
         "--inputs", f"images={tmp_path / 'images.npy'}", "--outdir", str(tmp_path / "out")],
        capture_output=True, text=True, timeout=300,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    probabilities = np.load(tmp_path / "out" / "probabilities.npy")
    assert np.abs(probabilities - model.predict(images, verbose=0)).max() <= TOLERANCE


def test_jpeg_is_decoded_and_resized_as_the_official_evaluation(exported, loaded):
    """A real photo of another size: decoded and bilinearly resized to the
    model's size in the graph, as tf.image.resize in the official pipeline."""
    model, _ = exported["pixels"]
    with open(EXAMPLE_IMAGE, "rb") as file:
        data = file.read()
    served = loaded.signatures["serving_default"](images=tf.constant([data]))
    reference = tf.image.resize(tf.io.decode_jpeg(data, channels=3)[None], SHAPE[:2], method="bilinear")
    expected = model.predict(reference.numpy(), verbose=0)
    assert np.abs(served["probabilities"].numpy() - expected).max() <= TOLERANCE


def _encoded(image, format, **options):
    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format=format, **options)
    return buffer.getvalue()


def _webp():
    return _encoded(np.zeros((8, 8, 3), np.uint8), "WEBP")


def test_the_size_of_each_format_is_read_from_its_header():
    """What the pixel bound relies on: (height, width) from the header, as the decoder reads it."""
    image = _pixels(1)[0]  # 32x48
    for name, encoded in [("JPEG", _encoded(image, "JPEG")), ("PNG", _png(image)), ("GIF", _encoded(image, "GIF")),
                          ("BMP", _encoded(image, "BMP")), ("PNG", png(60_000_000, 1))]:
        index, height, width = (int(value) for value in images.inspect(tf.constant(encoded)))
        assert images.FORMATS[index][0] == name
        expected = (1, 60_000_000) if len(encoded) < 100 else SHAPE[:2]
        assert (height, width) == expected, name
        if len(encoded) >= 100:
            assert images.decode(tf.constant(encoded)).shape == SHAPE
    bmp = bytearray(_encoded(image, "BMP"))
    bmp[22:26] = (-32).to_bytes(4, "little", signed=True)  # a top-down BMP stores a negative height
    assert [int(v) for v in images.inspect(tf.constant(bytes(bmp)))] == [3, 32, 48]
    assert [int(v) for v in images.inspect(tf.constant(_webp()))] == [-1, 0, 0]


@pytest.mark.parametrize(
    "signature, images, problem",
    [
        ("serving_default", np.array([b"this is not an image"]), "not a JPEG, PNG, GIF or BMP image"),
        # keras-vit predict refuses the same (keras_vit.images): WebP, and more than 40 million pixels
        ("serving_default", np.array([_webp()]), "not a JPEG, PNG, GIF or BMP image"),
        ("serving_default", np.array([png(20000, 20000)]), "larger than 40,000,000 pixels"),
        ("serving_default", np.array([png(60_000_000, 1)]), "larger than 40,000,000 pixels"),
        ("serving_default", np.array([b"GIF89a" + (65535).to_bytes(2, "little") * 2 + b"\0" * 20]),
         "larger than 40,000,000 pixels"),
        ("serving_default", np.array([], dtype=bytes), "empty batch"),
        ("serving_default", np.array([[b"x"]]), "expected a rank-1"),
        ("serve_pixels", np.zeros(SHAPE, "uint8"), "expected a rank-4"),
        ("serve_pixels", np.zeros((1, 32, 48, 4), "uint8"), "3 (RGB) channels"),
        ("serve_float", np.zeros((0,) + SHAPE, "float32"), "empty batch"),
        ("serve_float", np.zeros((1, 32, 32, 3), "float32"), "must be 32x48"),
    ],
)
def test_bad_input_names_the_problem(loaded, signature, images, problem):
    function = loaded.signatures[signature]
    with pytest.raises(tf.errors.InvalidArgumentError) as error:
        function(images=tf.constant(images))
    assert problem in str(error.value)
    assert signature in str(error.value)


def test_export_refuses_what_it_cannot_serve(tmp_path):
    model = tiny_vit()
    with pytest.raises(ValueError, match="3 class names for a model with 5 classes"):
        serving.export_for_serving(model, str(tmp_path), class_names=["a", "b", "c"])
    with pytest.raises(ValueError, match="include_top=True"):
        serving.export_for_serving(tiny_vit(include_top=False), str(tmp_path))  # (batch, tokens, width)
    # (batch, width) features have a classifier's shape: the export must not serve them as class scores.
    with pytest.raises(ValueError, match="returns 32 pooled features, not class scores"):
        serving.export_for_serving(tiny_vit(include_top=False, pooling="gap"), str(tmp_path))
    with pytest.raises(ValueError, match="takes a Keras model, got str 'model.keras': load it with keras.saving"):
        serving.export_for_serving("model.keras", str(tmp_path))
    assert os.listdir(tmp_path) == [], "a refused export writes nothing"


@pytest.mark.parametrize("version, problem", [
    ("v1", "got 'v1'"), (1.5, "got 1.5"), (-1, "got -1"), (True, "got True"), (2**63, "from 0 to 2**63-1"),
])
def test_a_bad_version_is_one_line_and_creates_no_folder(tmp_path, version, problem):
    export_dir = tmp_path / "new_model"
    with pytest.raises(ValueError) as error:
        serving.export_for_serving(tiny_vit(), str(export_dir), version=version)
    assert "version must be a whole number" in str(error.value) and problem in str(error.value)
    assert not export_dir.exists()


def test_an_export_folder_that_is_a_file_is_refused(tmp_path):
    path = tmp_path / "model.keras"
    path.write_bytes(b"not a folder")
    with pytest.raises(ValueError, match="is a file; the export needs a folder"):
        serving.export_for_serving(tiny_vit(), str(path))
    assert path.read_bytes() == b"not a folder"


def test_a_failed_first_export_leaves_no_empty_folder(tmp_path, monkeypatch):
    def failing_save(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(serving, "_save_module", failing_save)
    with pytest.raises(OSError, match="disk full"):
        serving.export_for_serving(tiny_vit(), str(tmp_path / "new_model"))
    assert os.listdir(tmp_path) == []


def test_default_class_names():
    assert serving._class_names(None, 1000) == labels.load_labels("imagenet1k")
    assert serving._class_names(None, 21843) == labels.load_labels("imagenet21k")
    assert serving._class_names(None, 3) == ["class_0", "class_1", "class_2"]
    assert serving._class_names("imagenet1k", 1000)[0] == "tench, Tinca tinca"
    with pytest.raises(ValueError, match="have 1000 classes, the model has 10"):
        serving._class_names("imagenet1k", 10)
    with pytest.raises(ValueError, match="Unknown labels 'imagenet2k'"):
        serving._class_names("imagenet2k", 10)


def test_label_files_are_the_official_order():
    imagenet1k = labels.load_labels("imagenet1k")
    assert len(imagenet1k) == 1000 and len(set(imagenet1k)) >= 998  # "crane" and "maillot" appear twice
    # Spot checks against the official ilsvrc2012 order (class ids of the checkpoints)
    assert imagenet1k[0] == "tench, Tinca tinca"
    assert imagenet1k[281] == "tabby, tabby cat"
    assert imagenet1k[504] == "coffee mug"
    assert imagenet1k[999] == "toilet tissue, toilet paper, bathroom tissue"
    imagenet21k = labels.load_labels("imagenet21k")
    assert len(imagenet21k) == 21843 and imagenet21k[0] == "organism, being"
    assert all(name and "\n" not in name for name in imagenet21k)
    assert labels.short_name(imagenet1k[281]) == "tabby"
