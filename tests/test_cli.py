"""The `keras-vit` command line as a new user meets it, run in subprocesses.

Importing TensorFlow costs seconds, so most cases run in one subprocess that
calls `keras_vit.cli.main` once per command line and records exit code,
stdout and stderr of each; the console script and `python -m keras_vit`
are run for real as well.
"""

import glob
import io
import json
import os
import re
import subprocess
import sys
import textwrap
import zipfile

import numpy as np
import pytest
from PIL import Image

import harness
from harness import png, png16
from keras_vit import images, visualize
from keras_vit.testing import official_arrays, write_checkpoint

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE_IMAGES = sorted(glob.glob(os.path.join(ROOT, "examples", "images", "*.jpg")))
CONSOLE_SCRIPT = os.path.join(os.path.dirname(sys.executable), "keras-vit")
# Subprocesses import this checkout's keras_vit, whichever copy the environment has installed.
ENV = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")])))
SUBCOMMANDS = ("list", "convert", "predict", "export", "demo")
# TensorFlow's C++ runtime logs a few lines straight to stderr while it
# loads (before any setting can silence them); they are not the CLI's output.
TF_RUNTIME_LOG = re.compile(
    r"^(WARNING: All log messages before absl::InitializeLog|[IWEF]\d{4} \S+\s+\d+ \S+:\d+\] |"
    r"To enable the following instructions)"
)

BATCH_DRIVER = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from keras_vit import cli

    results = []
    for argv in json.load(open(sys.argv[1])):
        out, err = io.StringIO(), io.StringIO()
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = cli.main(argv)
            except SystemExit as exit:  # argparse: --help and misused flags
                code = exit.code
        results.append({"argv": argv, "code": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
    json.dump(results, open(sys.argv[2], "w"))
    """
)


# 16-bit test images: every high byte, and low bytes that differ from them.
GREY16 = (np.arange(40 * 48, dtype=np.int64).reshape(40, 48) * 34 % 65536).astype(np.uint16)
COLOUR16 = np.stack([GREY16, GREY16[::-1], 65535 - GREY16], axis=-1)


def _broken_keras_files(folder, tiny_path):
    """Damaged and foreign .keras files: {name: path}."""
    data = open(tiny_path, "rb").read()
    middle = len(data) // 2
    broken = {
        "empty_keras": b"",
        "text_keras": b"this is text, not a model\n",
        "truncated_keras": data[:middle],
        "flipped_keras": data[:middle] + bytes(b ^ 0xFF for b in data[middle:middle + 16]) + data[middle + 16:],
    }
    paths = {}
    for name, content in broken.items():
        paths[name] = os.path.join(folder, f"{name}.keras")
        open(paths[name], "wb").write(content)
    # A class neither Keras nor keras_vit defines (a newer version's, another package's).
    paths["foreign_keras"] = os.path.join(folder, "foreign.keras")
    with zipfile.ZipFile(tiny_path) as source, zipfile.ZipFile(paths["foreign_keras"], "w") as target:
        for item in source.infolist():
            content = source.read(item.filename)
            if item.filename == "config.json":
                content = content.replace(b'"PatchEncoder"', b'"PatchEncoderV9"').replace(
                    b"keras_vit>PatchEncoder", b"keras_vit>PatchEncoderV9")
            target.writestr(item, content)
    return paths


def _cli_lines(stderr):
    return [line for line in stderr.splitlines() if line.strip() and not TF_RUNTIME_LOG.match(line)]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    folder = tmp_path_factory.mktemp("cli")
    not_an_image = folder / "notes.jpg"
    not_an_image.write_text("this is text, not a JPEG\n")
    truncated = folder / "truncated.png"
    truncated.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 10)
    model = harness.tiny_vit()
    harness.randomize_head(model)
    model.save(folder / "tiny.keras")
    logits_model = harness.tiny_vit(classifier_activation=None)  # the same weights, a head without softmax
    logits_model.set_weights(model.get_weights())
    logits_model.save(folder / "tiny_logits.keras")
    harness.tiny_vit(include_top=False).save(folder / "tokens.keras")  # (batch, tokens, width)
    harness.tiny_vit(include_top=False, pooling="token").save(folder / "features.keras")  # (batch, width)
    (folder / "names.txt").write_text("\n".join(TINY_NAMES) + "\n")
    (folder / "other_names.txt").write_text("\n".join(OTHER_NAMES) + "\n")
    (folder / "grey16.png").write_bytes(png16(GREY16))
    (folder / "colour16.png").write_bytes(png16(COLOUR16))
    (folder / "huge.png").write_bytes(png(20000, 20000))  # 69 bytes: Pillow's DecompressionBombError
    (folder / "long.png").write_bytes(png(60_000_000, 1))  # 69 bytes that would take gigabytes
    webp = io.BytesIO()
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(webp, format="WEBP")
    (folder / "image.webp").write_bytes(webp.getvalue())
    write_checkpoint(folder / "tiny.npz", official_arrays(**harness.TINY_VIT, image_size=32, classes=5))
    return {"folder": str(folder), "not_an_image": str(not_an_image), "truncated": str(truncated),
            "model": model, "tiny": str(folder / "tiny.keras"), "names": str(folder / "names.txt"),
            "grey16": str(folder / "grey16.png"), "colour16": str(folder / "colour16.png"),
            "huge": str(folder / "huge.png"), "long": str(folder / "long.png"), "webp": str(folder / "image.webp"),
            "npz": str(folder / "tiny.npz"), "tokens_keras": str(folder / "tokens.keras"),
            "features_keras": str(folder / "features.keras"), **_broken_keras_files(str(folder), str(folder / "tiny.keras"))}


TINY_NAMES = ["apple", "bear", "cloud", "dune", "eel"]
OTHER_NAMES = ["ant", "bee", "cat", "dog", "elk"]
INT8_TOLERANCE = 0.1  # test_serving.py's: largest int8-vs-float probability difference (why: there)
EXPORT = ["export", "tiny.keras", "exports/tiny", "--labels", "names.txt", "--top", "2"]
EXPORT_INT8 = ["export", "tiny.keras", "exports/tiny_int8", "--labels", "names.txt", "--top", "2", "--quantize", "int8"]
# Every class of the tiny model with its softmax head, and of the same weights returning logits.
PREDICT_ALL = {name: ["predict", *EXAMPLE_IMAGES, "--model", name, "--labels", "names.txt", "--top", "5"]
               for name in ("tiny.keras", "tiny_logits.keras")}
# The export of EXPORT (its labels.txt holds TINY_NAMES), with --labels: the user's names win.
PREDICT_EXPORT_LABELS = ["predict", EXAMPLE_IMAGES[0], "--model", "exports/tiny", "--labels", "other_names.txt",
                         "--top", "5"]
PREDICT_16_BIT = ["predict", "grey16.png", "colour16.png", "--model", "tiny.keras", "--labels", "names.txt",
                  "--top", "5"]
NO_HASH = "00" * 32

# Each: (command line, words the one-line error must contain).
MISUSES = [
    ([], "choose a command"),
    (["predict"], "required: IMAGE"),
    (["predict", "{missing}"], "no such file"),
    (["predict", "{not_an_image}"], "not a readable image"),
    (["predict", "{truncated}"], "not a readable image"),
    (["predict", "{folder}"], "is a folder"),
    (["predict", "{image}", "--model", "ViT_X99"], "Unknown model 'ViT_X99'"),
    (["predict", "{image}", "--model", "ViT_B16", "--weights", "no_such_tag"], "Unknown weights 'no_such_tag'"),
    (["predict", "{image}", "--model", "ViT_B16", "--weights", "missing.weights.h5"], "not found"),
    (["predict", "{image}", "--model", "missing.keras"], "no such model file"),
    (["predict", "{image}", "--model", "{tiny}", "--labels", "nofile.txt"], "Unknown labels 'nofile.txt'"),
    (["predict", "{image}", "--model", "{tiny}", "--labels", "imagenet1k"], "have 1000 classes, the model has 5"),
    (["predict", "{image}", "--top", "0"], "--top"),
    (["predict", "{image}", "--explain", "out.jpg"], ".png"),
    (["predict", "{image}", "--frobnicate"], "unrecognized arguments: --frobnicate"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["list", "everything"], "invalid choice: 'everything'"),
    (["export"], "required: MODEL, EXPORT_DIR"),
    (["export", "ViT_X99", "{folder}/export"], "Unknown model 'ViT_X99'"),
    (["export", "ViT_B16", "{folder}/export", "--weights", "no_such_tag"], "Unknown weights 'no_such_tag'"),
    (["export", "{tiny}", "{folder}/export", "--quantize", "int4"], "argument --quantize: invalid choice: 'int4'"),
    (["export", "{tiny}", "{folder}/export", "--quantize"], "argument --quantize: expected one argument"),
    (["demo", "--epochs", "many"], "--epochs"),
    # One decoder for predict and serving_default: the same formats, a bound on the pixels (read from the header).
    (["predict", "{huge}"], "20000x20000 is more than 40,000,000 pixels"),
    (["predict", "{long}"], "60000000x1 is more than 40,000,000 pixels"),
    (["predict", "{webp}"], "not a readable image (not a JPEG, PNG, GIF or BMP file)"),
    # A damaged .keras file is named as such (Keras says "File not found", or raises BadZipFile).
    (["predict", "{image}", "--model", "{empty_keras}"], "is not a readable .keras model (the file is empty)"),
    (["predict", "{image}", "--model", "{text_keras}"], "is not a readable .keras model (File is not a zip file)"),
    (["predict", "{image}", "--model", "{truncated_keras}"], "is not a readable .keras model"),
    (["predict", "{image}", "--model", "{flipped_keras}"], "is not a readable .keras model"),
    (["export", "{flipped_keras}", "{folder}/export"], "is not a readable .keras model"),
    (["predict", "{image}", "--model", "{foreign_keras}"], "cannot rebuild its class 'PatchEncoderV9'"),
    (["predict", "{image}", "--model", "{tiny}", "--sha256", NO_HASH], "--sha256 does not apply"),
    (["export", "{tiny}", "{folder}/export", "--sha256", NO_HASH], "--sha256 does not apply"),
    (["predict", "{image}", "--model", "ViT_Ti16", "--weights", "{npz}", "--sha256", NO_HASH],
     f"expected {NO_HASH}: the file is not the expected checkpoint"),
    (["export", "ViT_Ti16", "{folder}/export_npz", "--weights", "{npz}", "--sha256", NO_HASH],
     f"expected {NO_HASH}: the file is not the expected checkpoint"),
    # A model without a head (include_top=False): its pooled features would pass for class scores.
    (["predict", "{image}", "--model", "{tokens_keras}"], "predict needs a classifier"),
    (["predict", "{image}", "--model", "{features_keras}"], "returns 32 pooled features, not class scores"),
    (["export", "{features_keras}", "{folder}/export_features"], "export needs a classifier"),
    (["predict", "{image}", "--model", "{folder}/exports/none/7"], "no such file or folder"),
    (["predict", "{image}", "--model", "exports/none/7"], "exports/none/7: no such file or folder"),  # relative
    (["export", "{folder}", "{folder}/export"], "not a .keras model file"),
    (["predict", "{image}", "--explain", "{folder}/no_folder/out.png"], "no_folder does not exist"),
    (["predict", "{image}", "--model", "{tiny}", "--precision", "bfloat16"], "applies to an OpenVINO export folder"),
    (["export", "{tiny}", "{folder}/export", "--calibration-images", "{folder}"],
     "only used by quantize='int8' with format='openvino'"),
]


@pytest.fixture(scope="module")
def batch(files, tmp_path_factory):
    """Every command line of this module's in-batch checks, run in one subprocess."""
    values = dict(files, missing=os.path.join(files["folder"], "missing.jpg"), image=EXAMPLE_IMAGES[0])
    command_lines = [[part.format(**values) for part in argv] for argv, _ in MISUSES]
    command_lines += [[name, "--help"] for name in SUBCOMMANDS] + [["--help"]]
    command_lines += [["list"], ["predict", *EXAMPLE_IMAGES, "--model", "ViT_Ti16", "--top", "3"], EXPORT, EXPORT_INT8]
    command_lines += list(PREDICT_ALL.values()) + [PREDICT_16_BIT, PREDICT_EXPORT_LABELS]
    work = tmp_path_factory.mktemp("batch")
    (work / "argv.json").write_text(json.dumps(command_lines))
    (work / "driver.py").write_text(BATCH_DRIVER)
    completed = subprocess.run(
        [sys.executable, str(work / "driver.py"), str(work / "argv.json"), str(work / "results.json")],
        capture_output=True, text=True, timeout=600, cwd=files["folder"], env=ENV,
    )
    assert completed.returncode == 0, completed.stderr[-3000:]
    results = json.loads((work / "results.json").read_text())
    return {tuple(result["argv"]): result for result in results}, command_lines


@pytest.mark.parametrize("index", range(len(MISUSES)), ids=[" ".join(argv) or "no-arguments" for argv, _ in MISUSES])
def test_misuse_gets_a_one_line_error(batch, index):
    results, command_lines = batch
    result = results[tuple(command_lines[index])]
    expected = MISUSES[index][1]
    assert result["code"] == 2, result
    lines = result["stderr"].splitlines()
    assert len(lines) == 1, f"expected one line, got: {result['stderr']!r}"
    assert lines[0].startswith("keras-vit") and "error:" in lines[0]
    assert expected in lines[0]
    assert result["stdout"] == ""


@pytest.mark.parametrize("subcommand", SUBCOMMANDS + ("",))
def test_help(batch, subcommand):
    results, _ = batch
    argv = (subcommand, "--help") if subcommand else ("--help",)
    result = results[argv]
    assert result["code"] == 0 and result["stderr"] == ""
    assert result["stdout"].startswith(f"usage: keras-vit {subcommand}".rstrip())
    if not subcommand:
        for name in SUBCOMMANDS:
            assert name in result["stdout"]


def test_list_prints_constructors_and_checkpoints(batch):
    result = batch[0][("list",)]
    assert result["code"] == 0
    for expected in ("constructor", "ViT_Ti16", "ViT_H14", "augreg_in21k+in1k", "imagenet21k/ViT-B_16.npz"):
        assert expected in result["stdout"]


def test_predict_with_random_weights_says_so(batch):
    result = batch[0][("predict", *EXAMPLE_IMAGES, "--model", "ViT_Ti16", "--top", "3")]
    assert result["code"] == 0, result["stderr"]
    out = result["stdout"]
    assert out.startswith("note: ViT_Ti16 has random weights")
    for path in EXAMPLE_IMAGES:
        assert f"{path}  (ViT_Ti16, random weights)" in out
    ranks = re.findall(r"^  ([123])\. (\d\.\d{4})  (.+)$", out, flags=re.MULTILINE)
    assert [rank for rank, _, _ in ranks] == ["1", "2", "3"] * len(EXAMPLE_IMAGES)
    # a zero-initialised head gives every ImageNet class 1/1000
    assert {score for _, score, _ in ranks} == {"0.0010"}
    assert all(label for _, _, label in ranks)


def test_predict_softmaxes_a_model_returning_logits(batch):
    """A model returning logits prints the probabilities of the same weights
    with a softmax head: the same classes in the same order, the same scores."""
    printed = {}
    for name, argv in PREDICT_ALL.items():
        result = batch[0][tuple(argv)]
        assert result["code"] == 0, result["stderr"]
        printed[name] = re.findall(r"^  ([1-5])\. (-?\d+\.\d{4})  (\w+)$", result["stdout"], flags=re.MULTILINE)
        assert len(printed[name]) == 5 * len(EXAMPLE_IMAGES), result["stdout"]
    for softmax_line, logits_line in zip(printed["tiny.keras"], printed["tiny_logits.keras"]):
        assert logits_line[0] == softmax_line[0] and logits_line[2] == softmax_line[2]
        assert abs(float(logits_line[1]) - float(softmax_line[1])) <= 1.5e-4  # 4 printed decimals
    for image in range(len(EXAMPLE_IMAGES)):
        scores = [float(score) for _, score, _ in printed["tiny_logits.keras"][5 * image:5 * image + 5]]
        assert abs(sum(scores) - 1.0) <= 5e-4 and min(scores) >= 0.0


def test_predict_and_serving_default_decode_16_bit_pngs_alike(batch, files):
    """16-bit grey and colour PNGs: `predict` prints what the export's
    serving_default computes from the same bytes, and both are the model's
    output on the high bytes (v >> 8) of the 16-bit samples, not on a white
    image (Pillow's convert("RGB") clipped 16-bit grey to 255)."""
    import tensorflow as tf

    result = batch[0][tuple(PREDICT_16_BIT)]
    assert result["code"] == 0, result["stderr"]
    printed = re.findall(r"^  ([1-5])\. (\d\.\d{4})  (\w+)$", result["stdout"], flags=re.MULTILINE)
    serve = tf.saved_model.load(os.path.join(files["folder"], "exports", "tiny", "1")).signatures["serving_default"]
    model = files["model"]
    for image, values in enumerate((GREY16, COLOUR16)):
        high_bytes = (values >> 8).astype("float32")
        pixels = np.repeat(high_bytes[..., None], 3, axis=-1) if values.ndim == 2 else high_bytes
        expected = model.predict(tf.image.resize(pixels[None], (32, 32), method="bilinear").numpy(), verbose=0)[0]
        white = model.predict(np.full((1, 32, 32, 3), 255.0, "float32"), verbose=0)[0]
        assert np.abs(expected - white).max() > 1e-3  # the check below can tell the two apart
        served = serve(images=tf.constant([png16(values)]))["probabilities"].numpy()[0]
        np.testing.assert_allclose(served, expected, atol=1e-5)
        rows = printed[5 * image:5 * image + 5]
        assert [name for _, _, name in rows] == [TINY_NAMES[i] for i in np.argsort(-expected)]
        assert all(abs(float(score) - served[TINY_NAMES.index(name)]) <= 1e-4 for _, score, name in rows)


def test_the_decoder_reads_16_bit_samples_as_their_high_byte():
    """Independently of any model: the pixels both paths get from 16-bit PNGs."""
    for values in (GREY16, COLOUR16):
        decoded = images.decode(png16(values)).numpy()
        expected = values >> 8
        expected = np.repeat(expected[..., None], 3, axis=-1) if values.ndim == 2 else expected
        np.testing.assert_array_equal(decoded, expected)


LIGHT_START = textwrap.dedent(
    """
    import contextlib, io, sys
    from keras_vit import cli

    with contextlib.redirect_stdout(io.StringIO()) as out:
        cli.build_parser()
        assert cli.main(["list"]) == 0
    assert "ViT_B16" in out.getvalue() and "in21k" in out.getvalue()
    heavy = sorted(name for name in ("keras", "tensorflow", "jax", "torch") if name in sys.modules)
    assert not heavy, heavy
    # Keras imported after keras_vit: the layers register with it all the same.
    import keras
    model = keras.saving.load_model(sys.argv[1])
    print("loaded", type(model.get_layer("patch_embed")).__module__)
    """
)


def test_help_and_list_start_without_tensorflow(files, tmp_path):
    """`keras-vit --help` and `keras-vit list` import neither Keras nor
    TensorFlow (so they print nothing on stderr and start at once), and
    `import keras_vit` still registers the layers for keras.saving.load_model."""
    env = {key: value for key, value in ENV.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    for argv in (["--help"], ["list"]):
        completed = subprocess.run([sys.executable, "-m", "keras_vit", *argv], capture_output=True, text=True,
                                   timeout=60, cwd=ROOT, env=env)
        assert completed.returncode == 0 and completed.stdout, completed.stderr
        assert completed.stderr == "", completed.stderr
    completed = subprocess.run([sys.executable, "-c", LIGHT_START, files["tiny"]], capture_output=True, text=True,
                               timeout=300, cwd=ROOT, env=ENV)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.strip() == "loaded keras_vit.layers"


def test_console_script_and_module_entry_points(tmp_path):
    for command in ([CONSOLE_SCRIPT], [sys.executable, "-m", "keras_vit", "predict", str(tmp_path / "gone.png")]):
        completed = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV)
        lines = _cli_lines(completed.stderr)
        assert completed.returncode == 2
        assert len(lines) == 1 and "error:" in lines[0], completed.stderr
        assert "Traceback" not in completed.stderr


def test_export_writes_a_servable_model(batch, files):
    import tensorflow as tf

    result = batch[0][tuple(EXPORT)]
    assert result["code"] == 0, result["stderr"]
    version_dir = os.path.join(files["folder"], "exports", "tiny", "1")
    assert f"-> exports/tiny{os.sep}1" in result["stdout"]
    assert "serving_default" in result["stdout"] and ":predict" in result["stdout"]
    served = tf.saved_model.load(version_dir).signatures["serve_float"](images=tf.constant(harness.images(2)))
    expected = files["model"].predict(harness.images(2), verbose=0)
    np.testing.assert_allclose(served["probabilities"].numpy(), expected, atol=1e-5)
    top = [[TINY_NAMES[i].encode() for i in row] for row in np.argsort(-expected, axis=-1)[:, :2]]
    assert served["top_k_labels"].numpy().tolist() == top


def test_predict_on_an_export_takes_the_given_labels(batch):
    exported = batch[0][tuple(PREDICT_EXPORT_LABELS)]
    assert exported["code"] == 0, exported["stderr"]
    printed = re.findall(r"^  [1-5]\. \d\.\d{4}  (\w+)$", exported["stdout"], flags=re.MULTILINE)
    assert sorted(printed) == sorted(OTHER_NAMES), exported["stdout"]
    # The same classes in the same order as the model's own names (predict on the .keras file).
    own = re.findall(r"^  [1-5]\. \d\.\d{4}  (\w+)$", batch[0][tuple(PREDICT_ALL["tiny.keras"])]["stdout"],
                     flags=re.MULTILINE)[:5]
    assert printed == [OTHER_NAMES[TINY_NAMES.index(name)] for name in own]


def test_export_quantize_int8_writes_an_int8_model(batch, files):
    """--quantize int8: the export's Dense/attention kernels are int8 and its
    probabilities are close to the float model's (test_serving's bound), not equal."""
    import tensorflow as tf

    from keras_vit import cli, serving

    assert cli.QUANTIZE_CHOICES == serving.QUANTIZE_MODES
    result = batch[0][tuple(EXPORT_INT8)]
    assert result["code"] == 0 and result["stderr"] == "", result["stderr"]  # no warning per unquantized layer
    assert f"(its saved weights, 5 classes, 32x32, int8) -> exports/tiny_int8{os.sep}1" in result["stdout"]
    loaded = tf.saved_model.load(os.path.join(files["folder"], "exports", "tiny_int8", "1"))
    assert [v.dtype for v in loaded.model_variables].count(tf.int8) == 13  # 2 blocks x 6 + the head
    served = loaded.signatures["serve_float"](images=tf.constant(harness.images(2)))["probabilities"].numpy()
    difference = np.abs(served - files["model"].predict(harness.images(2), verbose=0)).max()
    assert 1e-5 < difference <= INT8_TOLERANCE, difference


def test_calibration_images_are_the_folders_image_files(files, tmp_path):
    """A folder of images with other files in it (this project's own examples/images has CREDITS.md)."""
    from keras_vit import cli

    folder = os.path.join(ROOT, "examples", "images")
    assert sorted(os.listdir(folder)) != sorted(os.path.basename(path) for path in EXAMPLE_IMAGES)
    calibration = cli._calibration_images(folder, files["model"])
    assert calibration.shape == (len(EXAMPLE_IMAGES), 32, 32, 3)
    (tmp_path / "notes.md").write_text("no images here\n")
    with pytest.raises(cli.UsageError, match="the folder has no image files"):
        cli._calibration_images(str(tmp_path), files["model"])


def test_predict_matches_the_model_and_explains(files, tmp_path):
    """A saved .keras model through the console script: the printed labels and
    scores are the model's on the resized images, and --explain draws them."""
    import tensorflow as tf

    model, names = files["model"], TINY_NAMES
    completed = subprocess.run(
        [CONSOLE_SCRIPT, "predict", *EXAMPLE_IMAGES, "--model", files["tiny"], "--labels", files["names"],
         "--top", "2", "--explain", "why.png"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path, env=ENV,
    )
    assert completed.returncode == 0, completed.stderr
    assert _cli_lines(completed.stderr) == []
    printed = re.findall(r"^  ([12])\. (\d\.\d{4})  (\w+)$", completed.stdout, flags=re.MULTILINE)

    expected = []
    for path in EXAMPLE_IMAGES:  # decoded as serving_default and the official input pipeline decode them
        pixels = tf.io.decode_jpeg(tf.io.read_file(path), channels=3)
        resized = tf.image.resize(pixels[None], (32, 32), method="bilinear").numpy()
        scores = model.predict(resized, verbose=0)[0]
        for rank, index in enumerate(np.argsort(-scores)[:2], 1):
            expected.append((str(rank), f"{scores[index]:.4f}", names[index]))
    assert printed == expected
    with Image.open(tmp_path / "why.png") as picture:
        assert picture.format == "PNG"
        assert picture.height >= len(EXAMPLE_IMAGES) * visualize.MIN_PANEL_SIDE  # one row per image


def test_demo_exit_code_reflects_the_accuracy_bar(monkeypatch, capsys):
    from keras_vit import cli, demo

    monkeypatch.setattr(demo, "run", lambda output_dir, epochs, seed: {"accuracy": 0.5})
    assert cli.main(["demo"]) == 1
    assert "below the demo's 95% bar" in capsys.readouterr().err
    monkeypatch.setattr(demo, "run", lambda output_dir, epochs, seed: {"accuracy": 0.99})
    assert cli.main(["demo"]) == 0


def test_predict_labels_flag_wins_over_a_saved_models_labels_file(tmp_path, capsys):
    """A .keras model with NAME.labels.txt beside it prints those names; with
    --labels, the given file's names instead, for the same classes in the same order."""
    from keras_vit import cli
    from keras_vit import labels as vit_labels

    model = harness.tiny_vit()
    harness.randomize_head(model)
    path = str(tmp_path / "mine.keras")
    model.save(path)
    own, other = ["own_a", "own_b", "own_c", "own_d", "own_e"], ["other_a", "other_b", "other_c", "other_d", "other_e"]
    with open(vit_labels.labels_file_for(path), "w") as file:
        file.write("\n".join(own) + "\n")
    (tmp_path / "other.txt").write_text("\n".join(other) + "\n")

    def printed(*flags):
        assert cli.main(["predict", EXAMPLE_IMAGES[0], "--model", path, "--top", "5", *flags]) == 0
        return re.findall(r"^  [1-5]\. \d\.\d{4}  (\w+)$", capsys.readouterr().out, flags=re.MULTILINE)

    without, given = printed(), printed("--labels", str(tmp_path / "other.txt"))
    assert sorted(without) == own
    assert given == [other[own.index(name)] for name in without]
