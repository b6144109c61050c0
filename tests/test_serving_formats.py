"""OpenVINO, ONNX and LiteRT exports: each must stand alone in its runtime and
agree with model.predict.

A tiny ViT with a random head (non-square, pixels in, probabilities out), a
tiny hybrid taking [-1, 1] and returning logits (so the export must scale and
softmax), and a ViT of any size are exported once per module in every
format; a fresh Python process in which keras, keras_vit and tensorflow
cannot be imported runs them with each runtime alone. The demo's digits ViT,
trained once per module, checks bfloat16 on OpenVINO and each runtime's int8
on real held-out images.
"""

import json
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest

import keras_vit
from harness import randomize_head, tiny_hybrid, tiny_vit
from keras_vit import cli, demo, runtimes, serving

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="exports are written from TensorFlow")

FORMATS = tuple(runtimes.RUNTIMES)
TOLERANCE = 1e-4  # float32 export vs model.predict
SHAPE = (32, 48, 3)
ANY_SIZES = ((2, 32, 32, 3), (3, 24, 64, 3))  # square, and not square
NAMES = ["cat", "dog", "car", "tree", "boat"]
# int8 may cost at most this much held-out accuracy (the 0.5 points).
INT8_ACCURACY_LOSS = 0.005


def _pixels(shape, seed=0):
    return np.random.default_rng(seed).uniform(0, 255, shape).astype("float32")


@pytest.fixture(scope="module")
def models():
    keras.utils.set_random_seed(0)
    vit = tiny_vit(input_shape=SHAPE)
    hybrid = tiny_hybrid(include_preprocessing=False, classifier_activation=None)
    any_size = tiny_vit(input_shape=(None, None, 3))
    for model in (vit, hybrid, any_size):
        randomize_head(model)
    return {"vit": vit, "hybrid": hybrid, "any_size": any_size}


@pytest.fixture(scope="module")
def exports(models, tmp_path_factory):
    """{(kind, format): version folder}."""
    root = tmp_path_factory.mktemp("exports")
    folders = {}
    for format in FORMATS:
        folders["vit", format] = serving.export_for_serving(
            models["vit"], str(root / "vit" / format), class_names=NAMES, format=format)
        folders["hybrid", format] = serving.export_for_serving(models["hybrid"], str(root / "hybrid" / format),
                                                                format=format)
        if runtimes.RUNTIMES[format].any_size:
            folders["any_size", format] = serving.export_for_serving(
                models["any_size"], str(root / "any_size" / format), format=format, any_size=True)
    return folders


def _inputs(models):
    """{kind: [float32 [0, 255] pixel batches]}: what each export is fed."""
    return {
        "vit": [_pixels((3,) + SHAPE)],
        "hybrid": [_pixels((2,) + models["hybrid"].input_shape[1:], seed=1)],
        "any_size": [_pixels(shape, seed) for seed, shape in enumerate(ANY_SIZES)],
    }


def _expected(kind, model, pixels):
    """The probabilities `model` gives for `pixels`: the hybrid takes [-1, 1]
    and returns logits, which its export scales and softmaxes itself."""
    if kind != "hybrid":
        return model.predict(pixels, verbose=0)
    logits = model.predict(keras.ops.convert_to_numpy(keras_vit.preprocess_inputs(pixels)), verbose=0)
    exp = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return exp / exp.sum(axis=-1, keepdims=True)


# Runs each export with its runtime alone: keras, keras_vit and tensorflow cannot be imported.
FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys
    import numpy as np
    for name in ("keras", "keras_vit", "tensorflow"):
        sys.modules[name] = None

    def openvino(path, images):
        import openvino as ov
        compiled = ov.Core().compile_model(path, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
        return compiled({"images": images})["probabilities"]

    def onnx(path, images):
        import onnxruntime
        session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
        return session.run(["probabilities"], {"images": images})[0]

    def litert(path, images):
        from ai_edge_litert.interpreter import Interpreter
        runner = Interpreter(model_path=path).get_signature_runner()
        return runner(images=images)["probabilities"]

    jobs = json.load(open(sys.argv[1]))
    inputs = np.load(sys.argv[2])
    outputs = {}
    for key, (format, path, names) in jobs.items():
        for i, name in enumerate(names):
            outputs[f"{key}/{i}"] = globals()[format](path, inputs[name])
    loaded = sorted(name for name in ("keras", "keras_vit", "tensorflow") if sys.modules.get(name) is not None)
    assert not loaded, loaded
    np.savez(sys.argv[3], **outputs)
    """
)


@pytest.fixture(scope="module")
def fresh_process_outputs(models, exports, tmp_path_factory):
    work = tmp_path_factory.mktemp("fresh")
    inputs = _inputs(models)
    arrays = {f"{kind}/{i}": batch for kind, batches in inputs.items() for i, batch in enumerate(batches)}
    np.savez(work / "inputs.npz", **arrays)
    jobs = {
        f"{kind}/{format}": (format, os.path.join(folder, runtimes.RUNTIMES[format].model_file),
                             [f"{kind}/{i}" for i in range(len(inputs[kind]))])
        for (kind, format), folder in exports.items()
    }
    (work / "jobs.json").write_text(json.dumps(jobs))
    (work / "run.py").write_text(FRESH_PROCESS)
    completed = subprocess.run(
        [sys.executable, str(work / "run.py"), str(work / "jobs.json"), str(work / "inputs.npz"),
         str(work / "outputs.npz")], capture_output=True, text=True, timeout=600)
    assert completed.returncode == 0, completed.stderr[-3000:]
    return inputs, dict(np.load(work / "outputs.npz"))


@pytest.mark.parametrize("format", FORMATS)
@pytest.mark.parametrize("kind", ["vit", "hybrid", "any_size"])
def test_fresh_process_matches_predict(models, fresh_process_outputs, kind, format):
    if kind == "any_size" and not runtimes.RUNTIMES[format].any_size:
        pytest.skip(f"{format} has no dynamic height and width (refused: see test_misuse_is_one_line...)")
    inputs, outputs = fresh_process_outputs
    model = models[kind]
    for i, images in enumerate(inputs[kind]):
        expected = _expected(kind, model, images)
        served = outputs[f"{kind}/{format}/{i}"]
        assert served.shape == expected.shape
        assert np.abs(served - expected).max() <= TOLERANCE, (kind, format, images.shape)
        np.testing.assert_allclose(served.sum(axis=-1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("format", FORMATS)
def test_version_folder_holds_the_model_file_and_labels(exports, format):
    folder = exports["vit", format]
    assert os.path.basename(folder) == "1"
    assert os.listdir(os.path.dirname(folder)) == ["1"], "no partial folders left behind"
    model_file = runtimes.RUNTIMES[format].model_file
    expected = {model_file, "labels.txt"} | ({"model.bin"} if format == "openvino" else set())
    assert set(os.listdir(folder)) == expected
    with open(os.path.join(folder, "labels.txt")) as file:
        assert file.read().splitlines() == NAMES
    # The same versioning and overwrite rules as the SavedModel.
    export_dir = os.path.dirname(folder)
    with pytest.raises(ValueError, match="already exists"):
        serving.export_for_serving(tiny_vit(input_shape=SHAPE), export_dir, version=1, format=format)
    assert os.listdir(export_dir) == ["1"]


def test_tf_saved_model_gets_labels_too(tmp_path):
    folder = serving.export_for_serving(tiny_vit(), str(tmp_path), class_names=NAMES)
    with open(os.path.join(folder, "labels.txt")) as file:
        assert file.read().splitlines() == NAMES


@pytest.mark.parametrize("format", FORMATS)
def test_load_export_classifies_images_of_any_size_as_predict(models, exports, format):
    """`load_export` (behind `keras-vit predict --model EXPORT_DIR`) resizes
    each image to the model's size as the SavedModel does, then runs the runtime."""
    import tensorflow as tf

    export = runtimes.load_export(os.path.dirname(exports["vit", format]))
    assert export.format == format and export.class_names == NAMES and export.input_size == SHAPE[:2]
    images = [np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8)
              for seed, size in enumerate([(40, 40, 3), (17, 90, 3)])]
    resized = np.concatenate([tf.image.resize(image[None].astype("float32"), SHAPE[:2]).numpy() for image in images])
    expected = models["vit"].predict(resized, verbose=0)
    assert np.abs(export.classify(images) - expected).max() <= TOLERANCE


@pytest.mark.parametrize("format", [f for f in FORMATS if runtimes.RUNTIMES[f].any_size])
def test_load_export_of_any_size_rounds_each_image_to_whole_patches(models, exports, format):
    """An any-size export's file stores its pixels per token; each image is
    resized to the nearest multiple (57x90 -> 56x88 with 8-pixel patches)."""
    import tensorflow as tf

    export = runtimes.load_export(exports["any_size", format])
    patch = models["any_size"].get_layer("position_embedding").patch_pixels
    assert export.input_size is None and export.pixels_per_token == tuple(patch) == (8, 8)
    image = np.random.default_rng(3).integers(0, 256, (57, 90, 3), dtype=np.uint8)
    resized = tf.image.resize(image[None].astype("float32"), (56, 88)).numpy()
    expected = models["any_size"].predict(resized, verbose=0)
    assert np.abs(export.classify([image]) - expected).max() <= TOLERANCE


def test_cli_exports_and_predicts_through_each_runtime(models, exports, tmp_path, capsys):
    from PIL import Image

    image = np.random.default_rng(4).integers(0, 256, SHAPE, dtype=np.uint8)
    Image.fromarray(image).save(tmp_path / "image.png")
    expected = models["vit"].predict(image[None].astype("float32"), verbose=0)[0]
    best = NAMES[int(expected.argmax())]
    for format in FORMATS:
        assert cli.main(["predict", str(tmp_path / "image.png"), "--model", os.path.dirname(exports["vit", format]),
                         "--top", "2"]) == 0
        printed = capsys.readouterr().out
        assert runtimes.RUNTIMES[format].title in printed
        assert f"1. {expected.max():.4f}  {best}" in printed, printed
    models["vit"].save(tmp_path / "vit.keras")
    assert cli.main(["export", str(tmp_path / "vit.keras"), str(tmp_path / "onnx"), "--format", "onnx",
                     "--labels", _labels_file(tmp_path)]) == 0
    assert "openvino/model_server" in capsys.readouterr().out
    assert sorted(os.listdir(tmp_path / "onnx" / "1")) == ["labels.txt", "model.onnx"]


def test_cli_predict_hands_its_precision_to_the_runtime(exports, tmp_path, monkeypatch, capsys):
    from PIL import Image

    Image.fromarray(np.zeros(SHAPE, np.uint8)).save(tmp_path / "image.png")
    asked, load = [], runtimes.load_export

    def spy(path, **options):
        asked.append(options)
        return load(path, **options)

    monkeypatch.setattr(runtimes, "load_export", spy)
    folder = os.path.dirname(exports["vit", "openvino"])
    assert cli.main(["predict", str(tmp_path / "image.png"), "--model", folder, "--precision", "bfloat16"]) == 0
    assert asked == [{"precision": "bfloat16"}]
    capsys.readouterr()


def test_the_newest_version_is_the_highest_number_not_the_last_name(tmp_path):
    """TF Serving's choice: 10 after 9 (a string order would take 9); a
    folder without a model file (an export being written) is not a version."""
    for version in ("2", "9", "10", "11"):
        os.makedirs(tmp_path / version)
        if version != "11":
            open(tmp_path / version / runtimes.RUNTIMES["onnx"].model_file, "w").close()
    assert runtimes.version_folder(str(tmp_path)) == str(tmp_path / "10")


def _labels_file(folder):
    path = os.path.join(folder, "labels.txt")
    with open(path, "w") as file:
        file.write("\n".join(NAMES) + "\n")
    return path


def test_cli_format_choices_match_the_library():
    assert cli.FORMAT_CHOICES == serving.FORMATS


@pytest.mark.parametrize("dtype", ["mixed_bfloat16", "bfloat16"])
def test_a_mixed_precision_model_is_exported_in_float32(tmp_path, dtype):
    """The file is float32 whatever the policy (precision is the runtime's
    choice): it gives what the same weights give in float32 (bf16 weights:
    their bf16 values, in float32)."""
    import onnx

    mixed = tiny_vit(input_shape=SHAPE, dtype=dtype)
    randomize_head(mixed)
    folder = serving.export_for_serving(mixed, str(tmp_path), format="onnx")
    graph = onnx.load(os.path.join(folder, "model.onnx")).graph
    assert onnx.TensorProto.BFLOAT16 not in {t.data_type for t in graph.initializer}
    float32 = tiny_vit(input_shape=SHAPE)
    float32.set_weights(mixed.get_weights())
    images = _pixels((2,) + SHAPE)
    served = runtimes.load_export(folder).classify(list(images.astype("uint8")))
    expected = float32.predict(images.astype("uint8").astype("float32"), verbose=0)
    assert np.abs(served - expected).max() <= TOLERANCE
    assert mixed.get_layer("block_00").compute_dtype == "bfloat16", "the caller's model is left as it was"


# ---------------------------------------------------------------------------
# Misuse: one line, nothing written
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("arguments, problem", [
    (dict(format="tensorrt"), "format must be one of 'tf_saved_model', 'openvino', 'onnx', 'litert', got 'tensorrt'"),
    (dict(format="litert", any_size=True), "LiteRT has no dynamic height and width"),
    (dict(format="openvino", quantize="int8"), "needs calibration_images (--calibration-images DIR)"),
    (dict(format="onnx", quantize="int8", calibration_images=np.zeros((1, 32, 32, 3))),
     "only used by quantize='int8' with format='openvino'"),
    (dict(calibration_images=np.zeros((1, 32, 32, 3))), "only used by quantize='int8' with format='openvino'"),
    # Calibration images are checked before anything is written, as the model will be served.
    (dict(format="openvino", quantize="int8", calibration_images=np.full((2, 32, 64, 3), 99.0)),
     "calibration_images are 32x64 and the model takes 32x32"),
    (dict(format="openvino", quantize="int8", calibration_images=np.full((2, 64, 32, 3), 99.0)),
     "calibration_images are 64x32 and the model takes 32x32"),
    (dict(format="openvino", quantize="int8", calibration_images=np.full((2, 32, 32, 1), 99.0)),
     "must be float32 pixels (count, height, width, 3)"),
    (dict(format="openvino", quantize="int8", calibration_images=np.full((2, 32, 32, 3), 0.5)),
     "look like [0, 1] values"),
    (dict(format="openvino", quantize="int8", calibration_images=np.full((2, 32, 32, 3), 300.0)),
     "must be pixels in [0, 255]"),
    (dict(format="openvino", quantize="int8", any_size=True, calibration_images=np.full((2, 36, 32, 3), 99.0)),
     "36x32, not a multiple of the model's 8x8 pixels per token"),
])
def test_misuse_is_one_line_and_writes_nothing(tmp_path, arguments, problem):
    model = tiny_vit(input_shape=(None, None, 3)) if arguments.get("any_size") else tiny_vit()
    export_dir = tmp_path / "export"
    with pytest.raises(ValueError) as error:
        serving.export_for_serving(model, str(export_dir), **arguments)
    assert problem in str(error.value) and "\n" not in str(error.value)
    assert not export_dir.exists()


@pytest.mark.parametrize("format", FORMATS)
def test_a_runtime_that_is_not_installed_is_one_line(monkeypatch, exports, tmp_path, format):
    runtime = runtimes.RUNTIMES[format]
    for module in runtime.export_needs:
        with monkeypatch.context() as patch:
            patch.setitem(sys.modules, module, None)  # as if not installed: importing it fails
            with pytest.raises(ValueError) as error:
                serving.export_for_serving(tiny_vit(), str(tmp_path / format), format=format)
            assert f"pip install 'keras-vit[{runtime.extra}]'" in str(error.value)
            assert not (tmp_path / format).exists()
    monkeypatch.setitem(sys.modules, runtime.run_needs, None)
    with pytest.raises(cli.UsageError) as error:
        runtimes.load_export(exports["vit", format])
    assert f"{runtime.run_needs} is not installed: pip install 'keras-vit[{runtime.extra}]'" in str(error.value)


@pytest.mark.parametrize("format", FORMATS)
def test_a_model_keras_quantized_is_refused_by_the_runtime_formats(tmp_path, format):
    model = tiny_vit()
    model.quantize("int8")
    with pytest.raises(ValueError, match=r"already quantized by Keras .* export the float model with quantize='int8'"):
        serving.export_for_serving(model, str(tmp_path / "export"), format=format)
    assert not (tmp_path / "export").exists()


def test_precision_is_checked_and_only_for_openvino(exports):
    with pytest.raises(cli.UsageError, match="precision must be one of 'float32', 'bfloat16', got 'fp16'"):
        runtimes.load_export(exports["vit", "openvino"], precision="fp16")
    for format in ("onnx", "litert"):
        with pytest.raises(cli.UsageError, match="precision='bfloat16' applies to OpenVINO exports only"):
            runtimes.load_export(exports["vit", format], precision="bfloat16")


def test_predict_on_a_folder_without_an_export_says_so(tmp_path):
    with pytest.raises(cli.UsageError, match="no export found"):
        runtimes.load_export(str(tmp_path))


# ---------------------------------------------------------------------------
# Precision on real images: the demo's digits ViT
# ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def digits():
    """(trained digits ViT, training images, held-out images, held-out labels)."""
    keras.utils.set_random_seed(0)
    (train_x, train_y), (test_x, test_y) = demo.load_digits()
    model = demo.build_model()
    demo.train(model, train_x, train_y, progress=False)
    return model, train_x, test_x, test_y


def _accuracy(export, images, labels):
    return float(np.mean(export.classify(list(images.astype("uint8"))).argmax(-1) == labels))


def test_openvino_bfloat16_keeps_every_top1_on_the_digits(digits, tmp_path):
    import openvino as ov

    if "BF16" not in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"):
        pytest.skip("this CPU has no bfloat16 units: OpenVINO computes in float32 here")
    model, _, test_x, _ = digits
    folder = serving.export_for_serving(model, str(tmp_path), format="openvino")
    images = list(test_x.astype("uint8"))
    float32 = runtimes.load_export(folder).classify(images)
    bfloat16 = runtimes.load_export(folder, precision="bfloat16").classify(images)
    difference = np.abs(bfloat16 - float32).max()
    print(f"OpenVINO bfloat16 vs float32 on {len(images)} held-out digits: largest probability difference "
          f"{difference:.4f}, top-1 changed on {int((bfloat16.argmax(-1) != float32.argmax(-1)).sum())}")
    assert difference > 0, "bfloat16 gave float32's results exactly: it did not run in bfloat16"
    np.testing.assert_array_equal(bfloat16.argmax(-1), float32.argmax(-1))


def _int8_ops(format, folder):
    """How many int8 operations the export's file holds."""
    path = os.path.join(folder, runtimes.RUNTIMES[format].model_file)
    if format == "openvino":
        import openvino as ov

        model = ov.Core().read_model(path)
        return sum(op.get_type_name() == "FakeQuantize" or
                   (op.get_type_name() == "Constant" and op.get_element_type() == ov.Type.i8) for op in model.get_ops())
    if format == "onnx":
        import onnx

        return sum(node.op_type in ("MatMulInteger", "DynamicQuantizeLinear") for node in onnx.load(path).graph.node)
    from ai_edge_litert.interpreter import Interpreter

    return sum(detail["dtype"] == np.int8 for detail in Interpreter(model_path=path).get_tensor_details())


@pytest.mark.parametrize("format", FORMATS)
def test_int8_keeps_the_digits_accuracy(digits, tmp_path, format):
    model, train_x, test_x, test_y = digits
    calibration = train_x[::5] if format == "openvino" else None  # 288 training digits
    float32 = runtimes.load_export(serving.export_for_serving(model, str(tmp_path / "f32"), format=format))
    int8_folder = serving.export_for_serving(model, str(tmp_path / "int8"), format=format, quantize="int8",
                                             calibration_images=calibration)
    assert _int8_ops(format, int8_folder) > 0, "no int8 operation in the int8 export"
    assert _int8_ops(format, float32.folder) == 0
    float_accuracy = _accuracy(float32, test_x, test_y)
    int8_accuracy = _accuracy(runtimes.load_export(int8_folder), test_x, test_y)
    print(f"{format}: held-out accuracy float32 {float_accuracy:.2%}, int8 {int8_accuracy:.2%}")
    assert float_accuracy > 0.9  # a trained model, or the comparison means nothing
    assert int8_accuracy >= float_accuracy - INT8_ACCURACY_LOSS
