"""Few-shot linear evaluation: the solver against a direct solve, nested shots, the paper's representation."""

import json
import os
import subprocess
import sys

import keras
import numpy as np
import pytest
import tensorflow as tf

import harness
import keras_vit
from keras_vit import data, evaluation
from keras_vit.evaluation import linear


def direct_ridge_predictions(train_x, train_y, test_x, num_classes, l2):
    """The ridge normal equations solved directly in float64, big_vision's standardisation and bias."""
    mean, std = train_x.mean(0), train_x.std(0) + 1e-5
    design = lambda x: np.hstack([(x - mean) / std, np.full((len(x), 1), 100.0)])  # noqa: E731
    x = design(train_x.astype(np.float64))
    y = 2.0 * np.eye(num_classes)[train_y] - 1.0
    w = np.linalg.solve(x.T @ x + l2 * np.eye(x.shape[1]), x.T @ y)
    return w, np.argmax(design(test_x.astype(np.float64)) @ w, axis=1)


@pytest.mark.parametrize("n, d", [(200, 16), (12, 40)])  # N >= D (eigh of XᵀX) and N < D (of XXᵀ)
def test_linear_few_shot_equals_a_direct_ridge_solve(n, d):
    rng = np.random.default_rng(n)
    classes = 4
    centres = rng.normal(0, 2, (classes, d))
    train_y = np.arange(n) % classes
    train_x = centres[train_y] + rng.normal(0, 3, (n, d))
    test_y = rng.integers(0, classes, 500)
    test_x = centres[test_y] + rng.normal(0, 3, (500, d))
    for l2 in (2.0**-4, 1.0, 2.0**10):
        w, predictions = direct_ridge_predictions(train_x, train_y, test_x, classes, l2)
        solver = linear.LinearFewShot(train_x, train_y, classes)
        np.testing.assert_allclose(solver.weights(l2), w, rtol=1e-6, atol=1e-9)
        accuracy = evaluation.linear_few_shot(train_x, train_y, test_x, test_y, classes, l2_reg=l2)
        assert accuracy == np.mean(predictions == test_y)
    sweep = evaluation.linear_few_shot(train_x, train_y, test_x, test_y, classes, l2_reg=[1.0, 2.0**10])
    assert sweep == {1.0: solver.accuracy(test_x, test_y, 1.0), 1024.0: solver.accuracy(test_x, test_y, 1024.0)}
    assert 0.5 < sweep[1.0]  # separable enough: far above the 0.25 of chance


def test_linear_few_shot_rejects_bad_input_in_one_line():
    with pytest.raises(ValueError, match=r"Expected features \(N, D\) and labels \(N,\)"):
        evaluation.linear_few_shot(np.zeros((4, 3)), np.zeros(5, int), np.zeros((2, 3)), np.zeros(2, int))
    with pytest.raises(ValueError, match=r"Labels must be in \[0, 2\)"):
        evaluation.linear_few_shot(np.zeros((4, 3)), np.array([0, 1, 2, 1]), np.zeros((2, 3)), np.zeros(2), 2)


def test_shots_are_nested_k_per_class_and_fixed_by_the_seed():
    labels = np.repeat(np.arange(5), 30)
    np.random.default_rng(0).shuffle(labels)
    sets = evaluation.sample_shots(labels, (1, 5, 10, 25), seed=0)
    for k, indices in sets.items():
        assert np.bincount(labels[indices], minlength=5).tolist() == [k] * 5
    for small, large in [(1, 5), (5, 10), (10, 25)]:
        assert set(sets[small]) <= set(sets[large])
    again = evaluation.sample_shots(labels, (1, 5, 10, 25), seed=0)
    assert all(np.array_equal(sets[k], again[k]) for k in sets)
    other = evaluation.sample_shots(labels, (5,), seed=1)
    assert not np.array_equal(np.sort(other[5]), np.sort(sets[5]))
    # big_vision's draw: one permutation per class, in class order, from default_rng(seed)
    rng = np.random.default_rng(0)
    expected = np.concatenate([rng.permutation(np.flatnonzero(labels == c))[:5] for c in range(5)])
    np.testing.assert_array_equal(sets[5], expected)


def _batches(images, labels, batch_size=4):
    return tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)


@pytest.mark.parametrize("architecture", ["vit", "hybrid"])
def test_features_are_the_models_pre_logits(architecture):
    build = harness.ARCHITECTURES[architecture]
    model = build(representation_size=24)  # with the tanh pre_logits layer
    harness.randomize_head(model)
    images, labels = harness.images(6), np.array([0, 1, 2, 3, 4, 0])
    got, got_labels = evaluation.features(model, _batches(images, labels), verbose=0)
    expected = keras_vit.feature_extractor(model, ["pre_logits"]).predict(images, verbose=0)["pre_logits"]
    assert got.shape == (6, 24)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)
    pre_logits = model.get_layer("pre_logits")
    pooled = keras_vit.feature_extractor(model, ["encoded"]).predict(images, verbose=0)["encoded"][:, 0]
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in (pre_logits.kernel, pre_logits.bias))
    np.testing.assert_allclose(got, np.tanh(pooled @ kernel + bias), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(got_labels, labels)


def test_features_of_a_model_without_head_or_pooling_are_its_class_token():
    model = harness.tiny_vit(include_top=False)
    images = harness.images(5)
    got, labels = evaluation.features(model, _batches(images, np.eye(5)[[0, 1, 2, 3, 4]]), verbose=0)
    np.testing.assert_allclose(got, model.predict(images, verbose=0)[:, 0], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(labels, np.arange(5))  # one-hot labels become class ids


def big_vision_few_shot(train_x, train_y, test_x, test_y, num_classes):
    """{seed: {k: accuracy}} by big_vision's few-shot protocol, written out
    here: configs/common_fewshot.py's defaults (shots 1, 5, 10, 25; seeds 0,
    1, 2; l2 = 2**10) and evaluators/fewshot_lsr.py's draw (each class's
    indices permuted once by default_rng(seed), the first k taken) and
    ridge regression (`direct_ridge_predictions`)."""
    results = {}
    for seed in (0, 1, 2):
        rng = np.random.default_rng(seed)
        per_class = [rng.permutation(np.where(train_y == c)[0]) for c in range(num_classes)]
        results[seed] = {}
        for k in (1, 5, 10, 25):
            chosen = np.concatenate([indices[:k] for indices in per_class])
            _, predictions = direct_ridge_predictions(train_x[chosen], train_y[chosen], test_x, num_classes, 2.0**10)
            results[seed][k] = float(np.mean(predictions == test_y))
    return results


def test_few_shot_defaults_are_big_visions_protocol_on_digits():
    keras.utils.set_random_seed(0)
    model = harness.tiny_vit(input_shape=(16, 16, 3), patch_size=4, classes=10)
    results = evaluation.few_shot(model, ["digits"], verbose=0)  # every protocol setting at its default
    result = results["digits"]
    assert (result["num_classes"], result["train_examples"], result["test_examples"]) == (10, 1437, 360)
    # The same features, through big_vision's protocol written out in numpy.
    train, test = (data.source("digits", split) for split in ("train", "eval"))
    embed = lambda s: evaluation.features(  # noqa: E731
        model, data.eval_dataset(s, 16, 64, crop_fraction=evaluation.fewshot.CROP_FRACTION, keep_aspect=False),
        verbose=0)
    (train_x, train_y), (test_x, test_y) = embed(train), embed(test)
    assert result["per_seed"] == big_vision_few_shot(train_x, train_y, test_x, test_y, 10)
    for k in (1, 5, 10, 25):
        assert result["mean"][k] == pytest.approx(np.mean([result["per_seed"][s][k] for s in (0, 1, 2)]))
    assert result["mean"][5] > 0.2  # a random ViT's features still beat chance (0.1) on digits
    table = evaluation.format_results(results)
    assert "digits" in table and "25-shot" in table


def test_few_shot_reads_big_vision_splits_of_a_tfds_dataset(tmp_path):
    import tensorflow_datasets as tfds

    model = harness.tiny_vit(classes=21)
    with tfds.testing.mock_data(num_examples=200, data_dir=str(tmp_path)):  # 200: one of each class at least
        results = evaluation.few_shot(model, ["dtd"], shots=(1,), seeds=(0,), batch_size=16, verbose=0)
    assert results["dtd"]["num_classes"] == 47
    assert results["dtd"]["train_examples"] == results["dtd"]["test_examples"] == 200


def test_too_few_images_per_class_for_the_shots_is_one_line():
    """digits has 143 training images of its rarest class: 500-shot was a silent
    "143-shot" result ("88.61 ± 0.00"), now an error naming the class and counts."""
    labels = data.digits()[0][1]
    counts = np.bincount(labels)
    with pytest.raises(ValueError) as excinfo:
        evaluation.check_shots("digits", labels, (1, 500), 10)
    message = str(excinfo.value)
    assert "\n" not in message
    assert (f"digits: 500-shot needs 500 training images of every class, and class {np.argmin(counts)} has "
            f"{counts.min()}") in message
    evaluation.check_shots("digits", labels, (1, int(counts.min())), 10)  # the most it allows
    with pytest.raises(ValueError, match="class 2 has 0"):
        evaluation.check_shots("three", np.array([0, 1, 1, 0]), (1,), 3)


def test_a_tfds_dataset_that_is_not_local_fails_at_once_offline(tmp_path, monkeypatch):
    """Not prepared in data_dir and no download host answers (proxies that refuse,
    so even a machine with network is offline here): one line at once, not
    TFDS's minutes of retries."""
    harness.refuse_proxies(monkeypatch)
    with pytest.raises(ValueError) as excinfo:
        data.source("cifar100", "train", data_dir=str(tmp_path))
    message = str(excinfo.value)
    assert "\n" not in message
    assert f"cifar100 is not prepared in {tmp_path}" in message and "no host it downloads from answers" in message
    assert "https://www.cs.toronto.edu/" in message and "--data-dir" in message
    assert os.listdir(tmp_path) in ([], ["cifar100"]), "nothing downloaded"


def test_unknown_few_shot_dataset_is_one_line():
    with pytest.raises(ValueError, match="Unknown few-shot dataset 'mnist_x'") as excinfo:
        evaluation.few_shot(harness.tiny_vit(), ["mnist_x"])
    assert "\n" not in str(excinfo.value)


STRATEGY_SCRIPT = r"""
import os, sys
os.environ["KERAS_BACKEND"] = "tensorflow"
from keras_vit.training import make_strategy, split_cpu
split_cpu(2)
import keras, numpy as np, tensorflow as tf
sys.path.insert(0, sys.argv[1])
import harness
from keras_vit import evaluation
keras.utils.set_random_seed(0)
model = harness.tiny_vit(representation_size=8)
images, labels = harness.images(10), np.arange(10) % 5
ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(4)
plain, _ = evaluation.features(model, ds, verbose=0)
strategy = make_strategy("mirrored")
assert strategy.num_replicas_in_sync == 2
mirrored, mirrored_labels = evaluation.features(model, ds, strategy=strategy, verbose=0)
np.testing.assert_allclose(mirrored, plain, rtol=1e-5, atol=1e-6)
np.testing.assert_array_equal(mirrored_labels, labels)
print("same features on 2 replicas")
"""


def test_features_under_a_mirrored_strategy_equal_one_device():
    tests = os.path.dirname(os.path.abspath(__file__))
    done = subprocess.run([sys.executable, "-c", STRATEGY_SCRIPT, tests], capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert done.returncode == 0, done.stderr[-3000:]
    assert "same features on 2 replicas" in done.stdout


def test_cli_evaluate_prints_the_few_shot_table(tmp_path, capsys):
    import json

    from keras_vit import cli

    keras.utils.set_random_seed(0)
    model = harness.tiny_vit(input_shape=(16, 16, 3), patch_size=4, classes=10)
    path = str(tmp_path / "tiny.keras")
    model.save(path)
    out = str(tmp_path / "fewshot.json")
    assert cli.main(["evaluate", path, "--dataset", "digits", "--shots", "1,5", "--seeds", "2", "--output", out]) == 0
    printed = capsys.readouterr().out
    saved = json.load(open(out))["digits"]
    assert "mean ± std over 2 seed(s)" in printed
    row = next(line for line in printed.splitlines() if line.startswith("digits"))
    assert f"{100 * saved['mean']['5']:.2f} ± {100 * saved['std']['5']:.2f}" in row
    expected = evaluation.few_shot(model, ["digits"], shots=(1, 5), seeds=(0, 1), verbose=0)["digits"]
    assert saved["per_seed"]["1"]["5"] == expected["per_seed"][1][5]
    assert cli.main(["evaluate", path, "--dataset", "digits", "--shots", "5,500"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "500-shot needs 500 training images of every class" in err, err


@pytest.mark.parametrize("argv, message", [
    (["evaluate", "ViT_Ti16"], "give --dataset NAME"),
    (["evaluate", "ViT_Ti16", "--dataset", "digits", "--shots", "1,x"], "expected whole numbers"),
    (["evaluate", "ViT_Ti16", "--dataset", "digits", "--shots", "0"], "expected positive whole numbers"),
    (["evaluate", "nope.keras", "--dataset", "digits"], "nope.keras: no such model file"),
    (["evaluate", "ViT_Ti16", "--vtab", "caltech101,nope"], "nope"),
    (["evaluate", "model.keras", "--vtab", "all"], "--vtab fine-tunes a fresh model per task"),
])
def test_cli_evaluate_misuse_is_one_line(argv, message, capsys):
    from keras_vit import cli

    try:
        status = cli.main(argv)
    except SystemExit as exit:  # argparse's own errors
        status = exit.code
    err = capsys.readouterr().err
    assert status == 2 and message in err and len(err.strip().splitlines()) <= 2, err


def test_subsets_are_nested_and_independent_of_the_training_seed():
    source = data.source("digits", "train")
    small, large = data.subset(source, 100), data.subset(source, 300)
    labels = lambda s, seed: np.array([int(y) for _, y in s.read(True, seed)])  # noqa: E731
    images = lambda s: np.stack([x.numpy() for x, _ in s.read(True, 0)])  # noqa: E731
    assert small.num_examples == 100 and len(labels(small, 0)) == 100
    np.testing.assert_array_equal(images(large)[:100], images(small))  # nested
    np.testing.assert_array_equal(labels(small, 0), labels(small, 7))  # not the training seed's
    assert len(set(labels(small, 0))) == 10  # a shuffled draw: every class, not the first ones
    # Training draws from the subset alone (digits are drawn by index from `examples`).
    one = data.subset(source, 1)
    batches = data.train_dataset(one, 8, 16, seed=3).take(3)
    seen = {int(label) for _, labels in batches for label in np.argmax(labels, axis=1)}
    assert seen == {int(labels(one, 0)[0])}
    with pytest.raises(ValueError, match=r"Cannot take 5000 examples of digits \(1437"):
        data.subset(source, 5000)


# Runs examples/scaling.py (argv[2:]) with the images each run's trainer is
# fed recorded by index: every training digit keeps its red channel and
# carries its index in green (index % 256) and blue (index // 256), flat
# planes that crops and resizes keep flat (`data.subset` picks from these
# coded digits), and `training.train` feeds each run the batches it would
# have read, decoding them first. Written to argv[1] as {run dir: indices};
# an image whose code planes are not flat (not a coded digit) counts as -1.
COUNTING_SCALING_RUN = """
import dataclasses, json, os, runpy, sys
import numpy as np
import tensorflow as tf
from keras_vit import data, training

subset, train = data.subset, training.train
seen = {}

def coded_subset(source, num_examples):
    images, labels = source.examples
    index = np.arange(len(labels))
    coded = images.copy()
    coded[..., 1] = (index % 256)[:, None, None]
    coded[..., 2] = (index // 256)[:, None, None]
    return subset(dataclasses.replace(source, examples=(coded, labels)), num_examples)

def indices(images):
    planes = images[..., 1:].reshape(len(images), -1, 2)
    flat = np.ptp(planes, axis=1).max(axis=1) < 0.01
    codes = np.round(planes[:, 0, 0]) + 256 * np.round(planes[:, 0, 1])
    return np.where(flat, codes, -1).astype(int).tolist()

def counting_train(trainer, train_data, total_steps, model_dir, **kwargs):
    def fed(step):
        batches = list(train_data(step).take(total_steps - step).as_numpy_iterator())
        seen.setdefault(model_dir, []).extend(i for x, _ in batches for i in indices(x))
        return tf.data.Dataset.from_tensor_slices(tuple(np.stack(part) for part in zip(*batches)))
    return train(trainer, fed, total_steps, model_dir, **kwargs)

data.subset, training.train = coded_subset, counting_train
""" + harness.EXAMPLE_DRIVER_END


def test_scaling_example_end_to_end_on_a_tiny_budget(tmp_path):
    """Each row's model is trained on exactly the subset the row names:
    the images its trainer is fed are those N, each seen."""
    import csv
    import dataclasses

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    argv = [os.path.join(root, "examples", "scaling.py"), "--models", "micro",
            "--train_examples", "40,80", "--seeds", "0", "--steps", "5", "--batch_size", "16", "--shots", "1,2",
            "--output_dir", str(tmp_path)]
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join([root, os.environ.get("PYTHONPATH", "")]))
    driver = tmp_path / "counting_scaling_run.py"
    driver.write_text(COUNTING_SCALING_RUN)
    done = subprocess.run([sys.executable, str(driver), str(tmp_path / "seen.json"), *argv], capture_output=True,
                          text=True, timeout=600, env=env, cwd=root)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = list(csv.DictReader(open(tmp_path / "scaling.csv")))
    assert [(r["model"], r["train_examples"], r["shots"]) for r in rows] == [
        ("micro", "40", "1"), ("micro", "40", "2"), ("micro", "80", "1"), ("micro", "80", "2")]
    # 5 steps of 16: every example of each subset is fed at least once.
    seen = json.load(open(tmp_path / "seen.json"))
    source = data.source("digits", "train")
    by_index = dataclasses.replace(source, examples=(np.arange(source.num_examples), source.examples[1]))
    for n in (40, 80):
        fed = seen[str(tmp_path / "micro" / str(n) / "seed-0")]
        assert len(fed) == 5 * 16
        assert set(fed) == set(data.subset(by_index, n).examples[0].tolist()), n
    with open(tmp_path / "scaling.png", "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # Each row is the few-shot accuracy of the model its run saved.
    model = keras.saving.load_model(tmp_path / "micro" / "80" / "seed-0" / "model.keras")
    expected = evaluation.few_shot(model, ["digits"], shots=(1, 2), verbose=0)["digits"]["mean"][2]
    assert float(rows[3]["accuracy"]) == pytest.approx(expected, abs=1e-5)
    results = json.load(open(tmp_path / "micro" / "80" / "seed-0" / "results.json"))
    assert results["steps"] == 5
    # Misuse: one line, exit 2
    bad = subprocess.run([sys.executable, argv[0], "--models", "huge"], capture_output=True, text=True, timeout=120,
                         env=env, cwd=root)
    assert bad.returncode == 2 and "--models: unknown huge" in bad.stderr.strip().splitlines()[-1]
    # Run again into the same folder under another schedule: refused, not read back as if it were that run.
    other = subprocess.run([sys.executable, *argv, "--learning_rate", "0.5", "--weight_decay", "0.3"],
                           capture_output=True, text=True, timeout=300, env=env, cwd=root)
    assert other.returncode == 2, other.stderr[-2000:]
    assert ("holds a run saved with other settings (learning_rate 0.001 -> 0.5; weight_decay 0.1 -> 0.3)"
            in other.stderr.strip().splitlines()[-1]), other.stderr[-2000:]


def test_few_shot_fits_its_ridge_with_the_l2_reg_it_is_given():
    """A non-default l2_reg reaches every ridge fit: the accuracies are those of
    the direct ridge solve with that penalty on the same features and draws,
    not the default 2**10's."""
    keras.utils.set_random_seed(0)
    model = harness.tiny_vit(input_shape=(16, 16, 3), patch_size=4, classes=10)
    shots, seeds, l2 = (1, 5, 10), (0, 1), 1.0
    result = evaluation.few_shot(model, ["digits"], shots=shots, seeds=seeds, l2_reg=l2, verbose=0)["digits"]
    train, test = (data.source("digits", split) for split in ("train", "eval"))
    embed = lambda s: evaluation.features(  # noqa: E731
        model, data.eval_dataset(s, 16, 64, crop_fraction=evaluation.fewshot.CROP_FRACTION, keep_aspect=False),
        verbose=0)
    (train_x, train_y), (test_x, test_y) = embed(train), embed(test)

    def ridge_accuracies(penalty):
        accuracies = {}
        for seed in seeds:
            draws = evaluation.sample_shots(train_y, shots, seed, 10)
            accuracies[seed] = {}
            for k, chosen in draws.items():
                _, predictions = direct_ridge_predictions(train_x[chosen], train_y[chosen], test_x, 10, penalty)
                accuracies[seed][k] = float(np.mean(predictions == test_y))
        return accuracies

    assert result["per_seed"] == ridge_accuracies(l2)
    # The penalty matters on these features: the default's accuracies differ, so ignoring l2_reg shows.
    assert ridge_accuracies(linear.DEFAULT_L2_REG) != result["per_seed"]


def test_features_take_class_ids_with_a_trailing_axis_as_class_ids():
    """keras.datasets gives labels of shape (N, 1): they were taken for one-hot,
    and their argmax made every label 0."""
    model = harness.tiny_vit()
    images, labels = harness.images(6), np.array([3, 1, 4, 1, 0, 2])
    _, got = evaluation.features(model, _batches(images, labels[:, None]), verbose=0)
    np.testing.assert_array_equal(got, labels)
    # A label width known only when the data flows: decided per batch.
    unknown_width = tf.data.Dataset.from_generator(
        lambda: iter([(images[:3], labels[:3, None]), (images[3:], labels[3:, None])]),
        output_signature=(tf.TensorSpec((None, 32, 32, 3), tf.float32), tf.TensorSpec((None, None), tf.int64)),
    ).apply(tf.data.experimental.assert_cardinality(2))
    np.testing.assert_array_equal(evaluation.features(model, unknown_width, verbose=0)[1], labels)
    one_hot = unknown_width.map(lambda x, y: (x, tf.one_hot(y[:, 0], 5)))
    np.testing.assert_array_equal(evaluation.features(model, one_hot, verbose=0)[1], labels)


@pytest.mark.parametrize("make, message", [
    (lambda x, y: tf.data.Dataset.from_tensor_slices(x).batch(4),
     "features needs a dataset of (images, labels) batches, got elements of shape (None, 32, 32, 3)"),
    (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y)),
     "the dataset yields single images of shape (32, 32, 3): batch it first"),
    (lambda x, y: tf.data.Dataset.from_tensor_slices((x, y[:, None, None])).batch(4),
     "labels of shape (None, 1, 1)"),
])
def test_features_of_a_dataset_without_labels_or_batches_is_one_line(make, message):
    model = harness.tiny_vit()
    with pytest.raises(ValueError) as excinfo:
        evaluation.features(model, make(harness.images(4), np.arange(4)), verbose=0)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value), str(excinfo.value)


def test_linear_few_shot_takes_class_ids_of_shape_n_1_and_refuses_one_hot_in_one_line():
    """Test labels (M, 1) compared with (M,) predictions broadcast to (M, M): a wrong accuracy."""
    rng = np.random.default_rng(0)
    train_x, test_x = rng.normal(size=(40, 6)), rng.normal(size=(10, 6))
    train_y, test_y = np.arange(40) % 4, rng.integers(0, 4, 10)
    expected = evaluation.linear_few_shot(train_x, train_y, test_x, test_y)
    assert evaluation.linear_few_shot(train_x, train_y[:, None], test_x, test_y[:, None]) == expected
    solver = linear.LinearFewShot(train_x, train_y)
    assert solver.accuracy(test_x, test_y[:, None], [1.0]) == solver.accuracy(test_x, test_y, [1.0])
    for bad_labels, message in [(np.eye(4)[test_y], "got (10, 6) and (10, 4) (one-hot? pass np.argmax"),
                                (test_y[:9], "got (10, 6) and (9,)")]:
        with pytest.raises(ValueError, match="Expected test features") as excinfo:
            solver.accuracy(test_x, bad_labels)
        assert message in str(excinfo.value)
    with pytest.raises(ValueError, match=r"Expected features \(M, 6\) like the train features, got \(10, 5\)"):
        solver.accuracy(test_x[:, :5], test_y)


@pytest.mark.parametrize("protocol, message", [
    (dict(shots=[-1]), "shots must be a non-empty list of whole numbers from 1, got (-1,)"),
    (dict(shots=[0, 5]), "(0 is not one)"),
    (dict(shots="5"), "shots must be a list of whole numbers, got '5'"),
    (dict(shots=[]), "shots must be a non-empty list"),
    (dict(shots=[2.5]), "(2.5 is not one)"),
    (dict(seeds=[]), "seeds must be a non-empty list of whole numbers from 0, got ()"),
    (dict(seeds=["0"]), "('0' is not one)"),
    (dict(seeds=3), "seeds must be a list of whole numbers, got 3"),
])
def test_few_shot_refuses_shots_and_seeds_that_are_not_lists_of_whole_numbers(protocol, message):
    """shots=[-1] was a "-1-shot" result (indices[:-1]: all but one image per class)."""
    with pytest.raises(ValueError) as excinfo:
        evaluation.few_shot(harness.tiny_vit(), ["digits"], **{"seeds": [0], **protocol}, verbose=0)
    assert message in str(excinfo.value) and "\n" not in str(excinfo.value), str(excinfo.value)


def test_few_shot_refuses_a_model_of_non_square_images():
    with pytest.raises(ValueError, match="takes 32x16 images; few-shot feeds square ones"):
        evaluation.fed_image_size(harness.tiny_vit(input_shape=(32, 16, 3)))


def test_few_shot_of_a_model_of_any_size_is_fed_the_image_size_it_is_given(tmp_path):
    """It read input_shape[1], None for such a model: a 97-line TypeError."""
    keras.utils.set_random_seed(0)
    any_size = harness.tiny_vit(input_shape=(None, None, 3), patch_size=4, classes=10)
    with pytest.raises(ValueError, match="takes images of any size: pass image_size") as excinfo:
        evaluation.few_shot(any_size, ["digits"], shots=(1,), seeds=(0,), verbose=0)
    assert "\n" not in str(excinfo.value)
    got = evaluation.few_shot(any_size, ["digits"], shots=(1, 5), seeds=(0,), image_size=16, verbose=0)
    weights = str(tmp_path / "any.weights.h5")
    any_size.save_weights(weights)
    fixed = harness.tiny_vit(input_shape=(16, 16, 3), patch_size=4, classes=10, weights=weights)
    expected = evaluation.few_shot(fixed, ["digits"], shots=(1, 5), seeds=(0,), verbose=0)
    assert got["digits"]["per_seed"][0] == pytest.approx(expected["digits"]["per_seed"][0], abs=1 / 360)
    with pytest.raises(ValueError, match="takes 16x16 images, not image_size 32: leave image_size out"):
        evaluation.few_shot(fixed, ["digits"], shots=(1,), seeds=(0,), image_size=32, verbose=0)


def test_cli_evaluate_feeds_a_model_of_any_size_the_image_size_flag(tmp_path, capsys):
    from keras_vit import cli

    keras.utils.set_random_seed(0)
    path = str(tmp_path / "any.keras")
    harness.tiny_vit(input_shape=(None, None, 3), patch_size=4, classes=10).save(path)
    argv = ["evaluate", path, "--dataset", "digits", "--shots", "1", "--seeds", "1"]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "takes images of any size: give --image-size PIXELS" in err, err
    assert cli.main(argv + ["--image-size", "16"]) == 0
    assert "mean ± std over 1 seed(s)" in capsys.readouterr().out
    fixed = str(tmp_path / "fixed.keras")
    harness.tiny_vit(input_shape=(16, 16, 3), patch_size=4, classes=10).save(fixed)
    assert cli.main(["evaluate", fixed, "--dataset", "digits", "--image-size", "32"]) == 2
    assert "--image-size 32 does not apply to" in capsys.readouterr().err


@pytest.mark.parametrize("flags, message", [
    (["--shots", "5"], "--shots does not apply to --vtab"),
    (["--seeds", "2"], "--seeds does not apply to --vtab"),
    (["--dataset", "digits"], "--dataset does not apply to --vtab"),
])
def test_cli_evaluate_vtab_refuses_the_few_shot_flags_in_one_line(flags, message, capsys, monkeypatch):
    """They were silently ignored: vtab.run was given data_dir only."""
    from keras_vit import cli
    from keras_vit.evaluation import vtab

    monkeypatch.setattr(vtab, "run", lambda *args, **kwargs: pytest.fail("ran VTAB"))
    assert cli.main(["evaluate", "ViT_Ti16", "--vtab", "dtd", *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err


def test_cli_evaluate_vtab_passes_batch_and_image_size_through(capsys, monkeypatch):
    from keras_vit import cli
    from keras_vit.evaluation import vtab

    calls = []

    def run(build_model, tasks, **kwargs):
        calls.append((tasks, kwargs))
        return vtab.summarize({"dtd": 0.5})

    monkeypatch.setattr(vtab, "run", run)
    assert cli.main(["evaluate", "ViT_Ti16", "--vtab", "dtd", "--batch-size", "16", "--image-size", "32"]) == 0
    assert cli.main(["evaluate", "ViT_Ti16", "--vtab", "dtd"]) == 0  # the paper's protocol
    assert calls == [(["dtd"], dict(data_dir=None, batch_size=16, image_size=32)), (["dtd"], dict(data_dir=None))]
