"""`keras-vit demo`, piece by piece (seconds), and end to end at one epoch.

The full demo (25 epochs, exit status 1 below its 95% bar) is not run here:
`bash .ci/run` runs it as the README's first command, `bash .ci/demo`.
"""

import io
import os
import re

import keras
import numpy as np
import pytest
from PIL import Image

from keras_vit import data, demo

tf = pytest.importorskip("tensorflow")

pytestmark = pytest.mark.skipif(keras.backend.backend() != "tensorflow", reason="the demo exports for TF Serving")


def test_digits_are_upsampled_rgb_pixels_with_a_fixed_held_out_split():
    (train_x, train_y), (test_x, test_y) = demo.load_digits()
    assert train_x.shape == (1437, 32, 32, 3) and test_x.shape == (360, 32, 32, 3)
    assert train_x.dtype == np.float32 and 0 <= train_x.min() and train_x.max() == 255
    np.testing.assert_array_equal(train_x[..., 0], train_x[..., 2])  # grey digits as RGB
    assert set(test_y) == set(range(10))  # stratified: every digit held out
    (_, _), (again_x, again_y) = demo.load_digits()
    np.testing.assert_array_equal(again_x, test_x)
    np.testing.assert_array_equal(again_y, test_y)
    assert not any(np.array_equal(test_x[0], image) for image in train_x)


def test_training_learns():
    (train_x, train_y), _ = demo.load_digits()
    model = demo.build_model()
    assert model.input_shape == (None, 32, 32, 3) and model.output_shape == (None, 10)
    losses = demo.train(model, train_x[:128], train_y[:128], epochs=3, progress=False).history["loss"]
    assert losses[-1] < losses[0]


def test_run_writes_everything_and_reports_real_numbers(tmp_path, capsys):
    result = demo.run(str(tmp_path / "out"), epochs=1, examples=4, accuracy_bar=0.0)  # 1 epoch: any accuracy
    err = capsys.readouterr().err
    assert "training" in err and "23/23" in err  # the progress bar: 1437 digits / 64 per step
    paths = result["paths"]
    assert paths["model"] == str(tmp_path / "out" / "digits_vit.keras")
    model = keras.saving.load_model(paths["model"], safe_mode=True)
    _, (test_x, test_y) = demo.load_digits()
    predictions = model.predict(test_x, verbose=0).argmax(axis=-1)
    assert result["accuracy"] == pytest.approx(np.mean(predictions == test_y))  # what was printed is measured
    assert os.path.isfile(os.path.join(paths["export"], "saved_model.pb"))
    assert os.path.basename(paths["export"]) == "1"
    # classified through the reloaded export: the saved model's answers
    assert result["served"] == [demo.CLASS_NAMES[i] for i in predictions[:4]]
    assert result["truth"] == [demo.CLASS_NAMES[i] for i in test_y[:4]]
    with Image.open(paths["attention"]) as picture:
        assert picture.format == "PNG" and picture.height >= 4 * 32

    # The saved model's class names go with it: `keras-vit predict` and `export` print digits, not class_7.
    from keras_vit import cli

    assert paths["labels"] == str(tmp_path / "out" / "digits_vit.labels.txt")
    digit = tmp_path / "digit.png"
    digit.write_bytes(demo.encode_png(test_x[0]))
    assert cli.main(["predict", str(digit), "--model", paths["model"], "--top", "10"]) == 0
    printed = re.findall(r"^  \d+\. \d\.\d{4}  (.+)$", capsys.readouterr().out, flags=re.MULTILINE)
    assert sorted(printed) == demo.CLASS_NAMES
    assert cli.main(["export", paths["model"], str(tmp_path / "export")]) == 0
    exported = tf.saved_model.load(str(tmp_path / "export" / "1"))
    assert [name.decode() for name in exported.class_names.numpy()] == demo.CLASS_NAMES


def test_a_run_below_its_bar_publishes_nothing(tmp_path, monkeypatch, capsys):
    """Run again into the same folder, a model below the bar must not replace the
    good one nor add an export version (TF Serving serves the highest)."""
    from keras_vit import cli

    out = tmp_path / "out"
    (out / "serving" / "1").mkdir(parents=True)
    for name in ("digits_vit.keras", "digits_vit.labels.txt", "attention.png"):
        (out / name).write_text("an earlier run's")
    before = sorted((path.relative_to(out), path.read_bytes() if path.is_file() else None) for path in out.rglob("*"))
    monkeypatch.setattr(demo, "train", lambda *args, **kwargs: None)  # untrained: about 10%
    assert cli.main(["demo", "--output-dir", str(out)]) == 1
    assert "below the demo's 95% bar: nothing was saved or exported" in capsys.readouterr().err
    assert sorted((path.relative_to(out), path.read_bytes() if path.is_file() else None)
                  for path in out.rglob("*")) == before
    assert demo.run(str(tmp_path / "new"), progress=False)["paths"] is None
    assert not (tmp_path / "new").exists()


def test_encode_png_is_lossless():
    _, (test_x, _) = demo.load_digits()
    decoded = np.asarray(Image.open(io.BytesIO(demo.encode_png(test_x[0]))))
    np.testing.assert_array_equal(decoded, test_x[0].astype(np.uint8))
    np.testing.assert_array_equal(test_x[0], data.digits(32)[1][0][0])


def test_cli_seed_reaches_the_run(monkeypatch, tmp_path):
    from keras_vit import cli

    calls = []
    monkeypatch.setattr(demo, "run", lambda output_dir, epochs, seed: calls.append((output_dir, epochs, seed))
                        or {"accuracy": 1.0})
    assert cli.main(["demo", "--output-dir", str(tmp_path), "--epochs", "2", "--seed", "7"]) == 0
    assert cli.main(["demo", "--output-dir", str(tmp_path)]) == 0
    assert calls == [(str(tmp_path), 2, 7), (str(tmp_path), demo.EPOCHS, 0)]


class _StopBeforeTraining(Exception):
    pass


def test_run_seeds_the_initial_weights(monkeypatch, tmp_path):
    """demo.run(seed=...) is what `--seed` changes: the same seed builds the same
    model, another seed another one (training is stopped before it starts)."""
    initial = []

    def record_and_stop(model, *args, **kwargs):
        initial.append(np.concatenate([np.ravel(w) for w in model.get_weights()]))
        raise _StopBeforeTraining

    monkeypatch.setattr(demo, "train", record_and_stop)
    # The global seed before each run pairs differently from the runs' seeds:
    # only the run's own seeding makes runs 1 and 2 equal and runs 1 and 3 differ.
    for seed, seed_before in [(3, 1), (3, 2), (4, 1)]:
        keras.utils.set_random_seed(seed_before)
        with pytest.raises(_StopBeforeTraining):
            demo.run(str(tmp_path), seed=seed, progress=False)
    np.testing.assert_array_equal(initial[0], initial[1])
    assert not np.array_equal(initial[0], initial[2])
