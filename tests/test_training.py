"""keras_vit.training: the paper's recipes, the schedule and losses numerically,
gradient accumulation equal to a large batch, the fault-tolerant checkpoint."""

import json
import math
import os

import keras
import numpy as np
import pytest
import tensorflow as tf
from harness import images, randomize_head, stop_and_resume, tiny_vit

from keras_vit import training


def official_schedule(update, base, total, warmup, decay, end=1e-5):
    """google-research/vision_transformer's create_learning_rate_schedule, in numpy."""
    progress = np.clip((update - warmup) / (total - warmup), 0.0, 1.0)
    if decay == "cosine":
        rate = base * 0.5 * (1.0 + np.cos(np.pi * progress))
    else:
        rate = end + (base - end) * (1.0 - progress)
    return rate * np.minimum(1.0, update / warmup) if warmup else rate


def rates(schedule, steps):
    return np.array([float(keras.ops.convert_to_numpy(schedule(step))) for step in steps])


# --- schedule ---------------------------------------------------------------


@pytest.mark.parametrize("decay", ["cosine", "linear"])
def test_schedule_matches_the_official_formula(decay):
    schedule = training.WarmupDecay(0.1, total_steps=100, warmup_steps=10, decay=decay)
    steps = np.arange(100)
    got = rates(schedule, steps)
    # Keras passes the number of finished updates: step s is update s + 1.
    np.testing.assert_allclose(got, official_schedule(steps + 1, 0.1, 100, 10, decay), rtol=1e-5, atol=1e-8)


def test_schedule_shapes():
    cosine = rates(training.WarmupDecay(0.1, 100, 10, "cosine"), np.arange(100))
    warmup, decay = cosine[:10], cosine[9:]
    np.testing.assert_allclose(np.diff(warmup), 0.01, rtol=1e-4)  # linear ramp from 0
    assert cosine[9] == pytest.approx(0.1)  # the peak at the end of warm-up
    assert np.all(np.diff(decay) < 0)
    assert cosine[54] == pytest.approx(0.05, rel=1e-4)  # half-way through the cosine
    assert cosine[-1] == pytest.approx(0.0, abs=1e-9)

    linear = rates(training.WarmupDecay(0.1, 100, 10, "linear"), np.arange(100))
    np.testing.assert_allclose(np.diff(linear[9:]), -(0.1 - 1e-5) / 90, rtol=1e-3)  # a straight line
    assert linear[-1] == pytest.approx(1e-5)


def test_schedule_rejects_bad_arguments_and_round_trips():
    with pytest.raises(ValueError, match="warmup_steps"):
        training.WarmupDecay(0.1, total_steps=10, warmup_steps=10)
    with pytest.raises(ValueError, match="decay"):
        training.WarmupDecay(0.1, 10, decay="step")
    schedule = training.WarmupDecay(0.1, 100, 10, "linear", end_learning_rate=1e-4)
    restored = keras.saving.deserialize_keras_object(keras.saving.serialize_keras_object(schedule))
    np.testing.assert_allclose(rates(restored, range(100)), rates(schedule, range(100)))


# --- losses -----------------------------------------------------------------


def test_sigmoid_cross_entropy_is_summed_over_classes():
    rng = np.random.default_rng(0)
    logits = rng.normal(0, 3, (4, 7)).astype("float32")
    labels = (rng.uniform(size=(4, 7)) < 0.3).astype("float32")
    expected = -np.sum(
        labels * np.log(1 / (1 + np.exp(-logits))) + (1 - labels) * np.log(1 / (1 + np.exp(logits))), axis=-1
    ).mean()
    got = float(training.SigmoidCrossEntropy()(labels, logits))
    assert got == pytest.approx(expected, rel=1e-5)


def test_finetune_loss_is_softmax_cross_entropy():
    rng = np.random.default_rng(1)
    logits = rng.normal(0, 2, (5, 6))
    probabilities = (np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)).astype("float32")
    labels = np.eye(6, dtype="float32")[[0, 3, 5, 1, 1]]
    expected = -np.mean(np.sum(labels * np.log(probabilities), axis=-1))
    loss = training.finetune_recipe(total_steps=10).loss
    assert float(loss(labels, probabilities)) == pytest.approx(expected, rel=1e-5)


# --- recipes ----------------------------------------------------------------


def test_finetune_recipe_is_the_papers():
    recipe = training.finetune_recipe("cifar10")
    optimizer = recipe.optimizer
    assert isinstance(optimizer, keras.optimizers.SGD) and not isinstance(optimizer, keras.optimizers.AdamW)
    assert optimizer.momentum == 0.9 and optimizer.global_clipnorm == 1.0 and optimizer.weight_decay is None
    assert (recipe.batch_size, recipe.total_steps, recipe.warmup_steps) == (512, 10_000, 500)
    assert recipe.learning_rate.decay == "cosine" and recipe.learning_rate.base_learning_rate == 0.03
    assert optimizer.learning_rate is not None and recipe.learning_rate is optimizer._learning_rate
    assert training.FINETUNE_RESOLUTION == 384
    assert training.finetune_recipe("imagenet2012").total_steps == 20_000
    pets = training.finetune_recipe("oxford_iiit_pet", learning_rate=0.003)
    assert (pets.total_steps, pets.warmup_steps, pets.learning_rate.base_learning_rate) == (500, 100, 0.003)
    # Any other data: the step count is the user's; warm-up at most a tenth of it.
    assert training.finetune_recipe(total_steps=300).warmup_steps == 30
    with pytest.raises(ValueError, match="total_steps"):
        training.finetune_recipe("my_photos")
    with pytest.raises(ValueError, match="multiple of accum_steps"):
        training.finetune_recipe("cifar10", batch_size=512, accum_steps=3)


def test_pretrain_recipe_follows_table_3():
    b16 = training.pretrain_recipe("ViT_B16", "imagenet21k")
    optimizer = b16.optimizer
    assert isinstance(optimizer, keras.optimizers.AdamW)
    assert (optimizer.beta_1, optimizer.beta_2, optimizer.weight_decay) == (0.9, 0.999, 0.03)
    assert optimizer.global_clipnorm is None
    assert isinstance(b16.loss, training.SigmoidCrossEntropy)
    assert b16.model_kwargs == {"dropout_rate": 0.1, "classifier_activation": None}
    assert (b16.batch_size, b16.warmup_steps) == (4096, 10_000)
    assert b16.total_steps == math.ceil(90 * 14_000_000 / 4096)
    schedule = b16.learning_rate
    assert (schedule.base_learning_rate, schedule.decay) == (1e-3, "linear")

    l16 = training.pretrain_recipe("L/16", "jft300m")
    assert (l16.learning_rate.base_learning_rate, l16.optimizer.weight_decay, l16.model_kwargs["dropout_rate"]) == (
        4e-4, 0.1, 0.0,
    )
    assert training.pretrain_recipe("H/14", "jft300m").learning_rate.base_learning_rate == 3e-4

    # ImageNet-1k: any model, cosine decay, clipping at norm 1, softmax loss on logits.
    ti = training.pretrain_recipe("ViT_Ti16", "imagenet", num_examples=1000, batch_size=100)
    assert ti.total_steps == 300 * 10 and ti.warmup_steps == 300  # 300 epochs of 10 steps; warm-up <= 1/10
    assert (ti.learning_rate.decay, ti.learning_rate.base_learning_rate) == ("cosine", 3e-3)
    assert ti.optimizer.global_clipnorm == 1.0 and ti.optimizer.weight_decay == 0.3
    assert isinstance(ti.loss, keras.losses.CategoricalCrossentropy) and ti.loss.from_logits

    with pytest.raises(ValueError, match="no imagenet21k row for Ti/16"):
        training.pretrain_recipe("ViT_Ti16", "imagenet21k")
    custom = training.pretrain_recipe("ViT_Ti16", "imagenet21k", learning_rate=1e-3, weight_decay=0.1, total_steps=50)
    assert custom.total_steps == 50 and custom.optimizer.weight_decay == 0.1
    with pytest.raises(ValueError, match="pre-training dataset"):
        training.pretrain_recipe("B/16", "laion")


def test_overrides_of_a_presets_weight_decay_and_step_count():
    """A preset's row (B/16 on ImageNet-21k, cifar10, pets) still yields to
    what is given: weight decay (0 included), and a run of another length
    warms up for a tenth of it at most, not the preset's full warm-up."""
    assert training.pretrain_recipe("B/16", "imagenet21k", weight_decay=0.05).optimizer.weight_decay == 0.05
    assert training.pretrain_recipe("B/16", "imagenet21k", weight_decay=0.0).optimizer.weight_decay == 0.0
    assert training.finetune_recipe("cifar10", total_steps=1000).warmup_steps == 100
    assert training.finetune_recipe("oxford_iiit_pet", total_steps=200).warmup_steps == 20
    assert training.finetune_recipe("cifar10", total_steps=100).warmup_steps == 10


def test_recipes_use_the_warmup_and_learning_rate_given():
    """Defaults fill only what was not given: an explicit warm-up longer than
    a tenth of the run is kept (it was cut to a tenth), and a learning rate of
    0 is refused (it became the default) in every recipe."""
    recipes = {
        "finetune": lambda **kw: training.finetune_recipe(**kw),
        "pretrain": lambda **kw: training.pretrain_recipe("B/16", "imagenet21k", **kw),
        "masked_patch": lambda **kw: training.masked_patch_recipe(**kw),
    }
    for name, recipe in recipes.items():
        assert recipe(total_steps=1000, warmup_steps=500).learning_rate.warmup_steps == 500, name
        assert recipe(total_steps=1000, warmup_steps=0).learning_rate.warmup_steps == 0, name
        assert recipe(total_steps=1000).warmup_steps == 100, name  # the default: a tenth of a short run
        assert recipe(total_steps=1000, learning_rate=0.5).learning_rate.base_learning_rate == 0.5, name
        with pytest.raises(ValueError, match="learning rate must be more than 0, got 0"):
            recipe(total_steps=1000, learning_rate=0.0)
        with pytest.raises(ValueError, match="total_steps must be at least 1, got 0"):
            recipe(total_steps=0)


def test_pretrain_schedule_shape():
    recipe = training.pretrain_recipe("B/16", "imagenet21k", total_steps=200, warmup_steps=20)
    got = rates(recipe.learning_rate, np.arange(200))
    np.testing.assert_allclose(got, official_schedule(np.arange(1, 201), 1e-3, 200, 20, "linear"), rtol=1e-5)
    assert np.argmax(got) == 19 and got[-1] == pytest.approx(1e-5)


# --- the Trainer: gradient accumulation ------------------------------------


def _train_tiny(accum_steps, clip_norm=1.0, jit_compile=False, steps=2):
    keras.utils.set_random_seed(0)
    model = tiny_vit()
    randomize_head(model)  # gradients reach the body from the first step
    recipe = training.finetune_recipe(
        total_steps=10, warmup_steps=2, learning_rate=0.1, batch_size=16, accum_steps=accum_steps, clip_norm=clip_norm
    )
    trainer = training.Trainer(model, accum_steps=accum_steps)
    trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss, metrics=["accuracy"], jit_compile=jit_compile)
    x = images(16, seed=3)
    y = np.eye(5, dtype="float32")[np.arange(16) % 5]
    history = trainer.fit(x, y, batch_size=16, epochs=steps, shuffle=False, verbose=0)
    return trainer, model.get_weights(), history.history["loss"]


def test_accumulated_micro_batches_equal_one_large_batch():
    """4 micro-batches of 4 give the update of one batch of 16 (momentum,
    clipping and the schedule included), with and without XLA."""
    big, big_weights, big_losses = _train_tiny(accum_steps=1)
    for jit_compile in (False, True):
        small, small_weights, small_losses = _train_tiny(accum_steps=4, jit_compile=jit_compile)
        for a, b in zip(big_weights, small_weights):
            np.testing.assert_allclose(a, b, atol=2e-6)
        np.testing.assert_allclose(small_losses, big_losses, rtol=1e-5)
        # 2 updates: the schedule and Adam's bias correction count updates, not micro-batches.
        assert int(keras.ops.convert_to_numpy(small.optimizer.iterations)) == 2
        assert int(keras.ops.convert_to_numpy(small.steps_done)) == 2
    # The check is not vacuous: training moved the weights, and clipping was active.
    _, unclipped, _ = _train_tiny(accum_steps=1, clip_norm=None)
    assert not all(np.allclose(a, b) for a, b in zip(big_weights, unclipped))
    assert not all(np.allclose(a, b) for a, b in zip(big_weights, tiny_vit().get_weights()))


def test_accumulated_gradients_are_averaged_not_summed():
    """Without clipping (which would hide a gradient k times too large), k
    micro-batches make the update of one batch: their mean gradient."""
    _, one, _ = _train_tiny(accum_steps=1, clip_norm=None)
    _, four, _ = _train_tiny(accum_steps=4, clip_norm=None)
    for a, b in zip(four, one):
        np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)


def test_trainer_rejects_bad_accumulation():
    with pytest.raises(ValueError, match="accum_steps"):
        training.Trainer(tiny_vit(), accum_steps=0)
    # Batches that do not split into accum_steps micro-batches: one line before
    # training (arrays), or TensorFlow's assertion with that line (a dataset).
    trainer = training.Trainer(tiny_vit(), accum_steps=2)
    trainer.compile(optimizer="sgd", loss="categorical_crossentropy")
    labels = np.eye(5, dtype="float32")[np.arange(69) % 5]
    for count, batch, left in ((69, 32, 5), (64, 31, 31)):
        with pytest.raises(ValueError, match=rf"^A batch of {left} does not split into accum_steps=2 equal micro"):
            trainer.fit(images(count), labels[:count], batch_size=batch, verbose=0)
    with pytest.raises(ValueError, match="^A batch of 1 does not split"):  # 9 examples left to train on
        trainer.fit(images(18), labels[:18], batch_size=4, validation_split=0.5, verbose=0)
    assert int(keras.ops.convert_to_numpy(trainer.steps_done)) == 0
    dataset = tf.data.Dataset.from_tensor_slices((images(69), labels)).batch(32)
    with pytest.raises(tf.errors.InvalidArgumentError, match="A batch does not split into accum_steps=2"):
        trainer.fit(dataset, verbose=0)


# --- strategies and the checkpoint -----------------------------------------


def test_make_strategy_errors(monkeypatch):
    with pytest.raises(ValueError, match="auto, one_device, mirrored, multi_worker, tpu"):
        training.make_strategy("horovod")
    monkeypatch.delenv("TF_CONFIG", raising=False)
    with pytest.raises(ValueError, match="TF_CONFIG"):
        training.make_strategy("multi_worker")
    assert training.task_directory("/runs/a", None) == "/runs/a"


def test_backup_restores_weights_optimizer_and_step(tmp_path):
    trainer, weights, _ = _train_tiny(accum_steps=1, steps=3)
    backup = training.Backup(str(tmp_path / "checkpoint"))
    backup.set_model(trainer)
    backup.save()
    # A save that was killed half-way leaves a partial file: it must not matter.
    (tmp_path / "checkpoint" / ("partial-" + training.Backup.WEIGHTS)).write_bytes(b"truncated")

    keras.utils.set_random_seed(1)
    fresh = training.Trainer(tiny_vit())
    fresh.compile(optimizer=training.finetune_recipe(total_steps=10).optimizer, loss="categorical_crossentropy")
    assert training.Backup(str(tmp_path / "checkpoint")).restore(fresh) == 3
    for a, b in zip(fresh.model.get_weights(), weights):
        np.testing.assert_array_equal(a, b)
    momentum = [v for v in trainer.optimizer.variables if "momentum" in v.path]
    restored = [v for v in fresh.optimizer.variables if "momentum" in v.path]
    assert momentum and len(momentum) == len(restored)
    for a, b in zip(momentum, restored):
        np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert training.Backup(str(tmp_path / "empty")).restore(fresh) == 0
    assert os.path.exists(tmp_path / "checkpoint" / training.Backup.INFO)


def test_train_checkpoints_and_resumes_to_the_exact_step_count(tmp_path):
    from keras_vit import data

    source = data.source("digits", "train")

    def train_data(step):
        return data.train_dataset(source, 32, 16, seed=0, start_step=step)

    def trainer():
        keras.utils.set_random_seed(0)
        model = tiny_vit(classes=10)
        trainer = training.Trainer(model)
        recipe = training.finetune_recipe(total_steps=9, learning_rate=0.1)
        trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss, metrics=["accuracy"])
        return trainer

    first = training.train(trainer(), train_data, 7, str(tmp_path), save_every=3, verbose=0)
    assert (first["steps"], first["start_step"], len(first["history"]["loss"])) == (7, 0, 3)  # 3 + 3 + 1
    assert os.path.isdir(tmp_path / "logs" / "train") and os.path.exists(tmp_path / "model.keras")
    # Started again with another interval and a longer run: it goes on from
    # step 7, to exactly 9; its logs are the whole run's (3 from the checkpoint).
    second = training.train(trainer(), train_data, 9, str(tmp_path), save_every=4, verbose=0)
    assert (second["steps"], second["start_step"], len(second["history"]["loss"])) == (9, 7, 4)
    assert second["history"]["loss"][:3] == first["history"]["loss"]
    done = training.train(trainer(), train_data, 9, str(tmp_path), save_every=4, verbose=0)
    # Finished: nothing to redo, and results.json keeps the run's logs.
    assert (done["steps"], done["start_step"], done["history"]) == (9, 9, second["history"])
    assert json.loads((tmp_path / "results.json").read_text())["history"] == second["history"]
    for bad in (0, -1, 2.5):
        with pytest.raises(ValueError, match="save_every must be a whole number of steps, at least 1"):
            training.train(trainer(), train_data, 9, str(tmp_path), save_every=bad, verbose=0)


def test_a_resume_under_other_settings_is_refused(tmp_path):
    """An exact resume needs the run it resumes: settings saved with the
    checkpoint that differ from the new run's are named in one line, and
    nothing saved is touched; the same settings (a tuple read back as a
    list) resume."""
    from keras_vit import data
    from keras_vit.errors import UsageError

    source = data.source("digits", "train")

    def train_data(step):
        return data.train_dataset(source, 16, 8, seed=0, start_step=step)

    def trainer():
        keras.utils.set_random_seed(0)
        trainer = training.Trainer(tiny_vit(input_shape=(16, 16, 3), classes=10))
        trainer.compile(optimizer=training.finetune_recipe(total_steps=4).optimizer, loss="categorical_crossentropy")
        return trainer

    settings = {"seed": 0, "batch_size": 8, "image_size": (16, 16)}
    training.train(trainer(), train_data, 2, str(tmp_path), save_every=2, verbose=0, settings=settings)
    state = tmp_path / "checkpoint" / training.Backup.WEIGHTS
    saved = state.read_bytes()
    for other, named in (
        (dict(settings, seed=1), "seed 0 -> 1"),
        (dict(settings, mixup=0.2), "mixup unset -> 0.2"),
        ({"seed": 0, "batch_size": 8}, "image_size [16, 16] -> unset"),
    ):
        with pytest.raises(UsageError) as error:
            training.train(trainer(), train_data, 4, str(tmp_path), save_every=2, verbose=0, settings=other)
        message = str(error.value)
        assert "\n" not in message and named in message and "new model_dir" in message, message
    # Another model in the same model_dir: one line, not Keras's list of every layer.
    other_model = training.Trainer(tiny_vit(input_shape=(16, 16, 3), classes=10, depth=1))
    other_model.compile(optimizer="sgd", loss="categorical_crossentropy")
    with pytest.raises(UsageError, match=r"holds the state of another model \(.*\): resume with the model") as error:
        training.train(other_model, train_data, 4, str(tmp_path), save_every=2, verbose=0, settings=settings)
    assert "\n" not in str(error.value)
    # As many weights, of other shapes (another head): refused too.
    other_head = training.Trainer(tiny_vit(input_shape=(16, 16, 3), classes=5))
    other_head.compile(optimizer="sgd", loss="categorical_crossentropy")
    with pytest.raises(UsageError, match="holds the state of another model"):
        training.train(other_head, train_data, 4, str(tmp_path), save_every=2, verbose=0)
    assert state.read_bytes() == saved
    assert json.loads((tmp_path / "checkpoint" / training.Backup.INFO).read_text())["step"] == 2
    resumed = training.train(trainer(), train_data, 4, str(tmp_path), save_every=2, verbose=0, settings=settings)
    assert (resumed["start_step"], resumed["steps"]) == (2, 4)
    # Not asked (settings=None): resumes whatever was saved.
    assert training.train(trainer(), train_data, 4, str(tmp_path), verbose=0)["start_step"] == 4


def test_trainer_under_mixed_float16_scales_the_loss():
    keras.config.set_dtype_policy("mixed_float16")
    model = tiny_vit()
    randomize_head(model)
    before = [w.copy() for w in model.get_weights()]
    trainer = training.Trainer(model, accum_steps=2)
    recipe = training.finetune_recipe(total_steps=4, learning_rate=0.1, batch_size=8, accum_steps=2)
    trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss)
    assert isinstance(trainer.optimizer, keras.optimizers.LossScaleOptimizer)  # Keras wraps it for float16
    history = trainer.fit(images(8), np.eye(5, dtype="float32")[np.arange(8) % 5], batch_size=8, epochs=6, verbose=0)
    assert np.all(np.isfinite(history.history["loss"]))
    # The optimizer skips the updates whose scaled float16 gradients overflow
    # (and lowers the scale, from 2**15); the train steps are all counted.
    assert int(keras.ops.convert_to_numpy(trainer.steps_done)) == 6
    assert 1 <= int(keras.ops.convert_to_numpy(trainer.optimizer.iterations)) < 6
    assert not all(np.array_equal(a, b) for a, b in zip(before, model.get_weights()))


def _classifier_trainer():
    model = tiny_vit(input_shape=(16, 16, 3), classes=10, dropout_rate=0.1)
    recipe = training.finetune_recipe(total_steps=7, warmup_steps=2, learning_rate=0.1)
    return training.Trainer(model), recipe


def _masked_patch_trainer():
    """A tiny encoder inside MaskedPatchPrediction: the trainer also holds the
    mask token, the prediction head and the corruption's seed generator."""
    from keras_vit.pretraining import MaskedPatchPrediction

    encoder = tiny_vit(input_shape=(16, 16, 3), patch_size=4, include_top=False, dropout_rate=0.1)
    recipe = training.masked_patch_recipe(total_steps=7, warmup_steps=2, learning_rate=3e-3, batch_size=16)
    return training.Trainer(MaskedPatchPrediction(encoder, seed=0)), recipe


@pytest.mark.parametrize("build", [_classifier_trainer, _masked_patch_trainer], ids=["classifier", "masked_patch"])
def test_resumed_training_ends_with_the_weights_of_an_uninterrupted_run(tmp_path, build):
    """7 steps in one go, or 4 steps then a fresh trainer restored from the
    checkpoint (as a killed process would be) for the other 3: the same
    weights, to 1e-6. Dropout, RandAugment and MixUp are on: the data stream
    is positioned by step and the layers' random state is in the checkpoint.
    A wrapped model (masked patch prediction) resumes its own weights and
    random state too: the mask token, the head, the corruption draws."""
    from keras_vit import data

    source = data.source("digits", "train")

    def train_data(step):
        return data.train_dataset(source, 16, 16, seed=0, start_step=step, randaugment=0.3, mixup=0.2)

    def trainer():
        keras.utils.set_random_seed(0)
        trainer, recipe = build()
        trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss)
        return trainer

    uninterrupted, stopped, resumed, results = stop_and_resume(trainer, train_data, str(tmp_path))
    assert (results["start_step"], results["steps"]) == (4, 7)
    assert len(resumed.model.weights) == len(uninterrupted.model.weights)
    for a, b in zip(resumed.model.weights, uninterrupted.model.weights):
        np.testing.assert_allclose(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b), rtol=0, atol=1e-6,
                                   err_msg=a.path)
    # Not vacuous: the last 3 steps moved the weights.
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(stopped.model.get_weights(), resumed.model.get_weights()))
