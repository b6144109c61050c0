"""Fault-tolerant training: `train()` runs a number of steps with atomic checkpoints and resumes where a killed run stopped."""

import contextlib
import json
import os
import time

import h5py
import keras
import numpy as np
from keras import ops

from keras_vit.errors import UsageError, is_whole_number
from keras_vit.training import sharding
from keras_vit.training.distribute import task_directory


def process_directory(model_dir):
    """Where this process of a JAX run writes: `model_dir` for process 0
    (or a single process), `model_dir/process-N` for the others."""
    import jax

    index = jax.process_index()
    return model_dir if index == 0 else os.path.join(model_dir, f"process-{index}")


class Backup(keras.callbacks.Callback):
    """Saves the whole training state (weights, optimizer slots, step, the
    layers' random state, the per-epoch logs so far) at the end of every
    epoch and restores it with `restore()`.

    Unlike `keras.callbacks.BackupAndRestore` (Keras 3.15), a save is atomic
    (written aside, then renamed: a kill mid-save keeps the previous one), a
    run resumes at the exact step saved rather than at the start of the
    epoch, and each task of a multi-worker run keeps its own copy. It also
    keeps the states of the layers' seed generators (Dropout's), which Keras
    does not save with the weights, in the same file: a resumed run draws the
    dropout masks the uninterrupted run draws.
    """

    WEIGHTS = "state.weights.h5"
    INFO = "state.json"
    SEED_STATES = "keras_vit_seed_generator_states"  # a dataset of the weights file, beside Keras's groups

    def __init__(self, directory, settings=None):
        """`settings`: a JSON-able dict of what defines the run (see `train`),
        saved with each state; `restore` refuses a state saved under others."""
        super().__init__()
        self.directory = directory
        self.settings = None if settings is None else json.loads(json.dumps(settings))
        self.path = os.path.join(directory, self.WEIGHTS)
        self.history = {}  # per-epoch logs of the whole run: the restored ones, then this process's

    def _info(self):
        path = os.path.join(self.directory, self.INFO)
        if not os.path.exists(path):
            return {}
        with open(path) as f:
            return json.load(f)

    def restore(self, model):
        """Loads the saved state into a `Trainer`; returns the step it was saved at (0: none)."""
        if not os.path.exists(self.path):
            return 0
        info = self._info()
        self._check_settings(info.get("settings"))
        # Keras loads a smaller model from a bigger one's file without a word
        # (and skips the optimizer's slots with a warning): compare first.
        saved, shapes = info.get("weight_shapes"), _weight_shapes(model)
        if saved is not None and saved != shapes:
            first = next((i for i, (a, b) in enumerate(zip(saved, shapes)) if a != b), min(len(saved), len(shapes)))
            raise UsageError(
                f"{self.path} holds the state of another model ({len(saved)} weights, this one has {len(shapes)}; "
                f"weight {first} differs): resume with the model that saved it, or train in a new model_dir."
            )
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
        model.load_weights(self.path)
        self.history = info.get("history", {})
        generators = _seed_generators(model)
        with h5py.File(self.path, "r") as f:
            states = f[self.SEED_STATES][()] if self.SEED_STATES in f else None
        if states is not None:
            if len(states) != len(generators):
                raise ValueError(
                    f"{self.path} holds {len(states)} seed generator states but the model has {len(generators)}: "
                    "resume with the model that saved it, or train in a new model_dir."
                )
            for generator, state in zip(generators, states):
                generator.state.assign(ops.cast(state, generator.state.dtype))
        return _step(model)

    def _check_settings(self, saved):
        """A resume under other settings would silently train another run."""
        if self.settings is None or saved is None:  # not asked, or saved before settings were recorded
            return

        def shown(settings, name):
            return repr(settings[name]) if name in settings else "unset"

        changed = [
            f"{name} {shown(saved, name)} -> {shown(self.settings, name)}"
            for name in sorted(set(saved) | set(self.settings))
            if name not in saved or name not in self.settings or saved[name] != self.settings[name]
        ]
        if changed:
            raise UsageError(
                f"{self.directory} holds a run saved with other settings ({'; '.join(changed)}): resume it with "
                "the settings it was saved with, or train in a new model_dir."
            )

    def on_epoch_end(self, epoch, logs=None):
        for key, value in (logs or {}).items():
            self.history.setdefault(key, []).append(float(value))
        self.save()

    def save(self):
        os.makedirs(self.directory, exist_ok=True)
        partial = os.path.join(self.directory, "partial-" + self.WEIGHTS)
        self.model.save_weights(partial)
        generators = _seed_generators(self.model)
        if generators:
            with h5py.File(partial, "a") as f:
                f.create_dataset(self.SEED_STATES, data=np.stack([_numpy(g.state) for g in generators]))
        os.replace(partial, self.path)
        info = {"step": _step(self.model), "history": self.history, "weight_shapes": _weight_shapes(self.model)}
        if self.settings is not None:
            info["settings"] = self.settings
        _write_json(os.path.join(self.directory, self.INFO), info)


def _step(trainer):
    return int(ops.convert_to_numpy(trainer.steps_done))


def _weight_shapes(trainer):
    """The shapes of the trained model's weights, in order: what a state must fit."""
    return [list(weight.shape) for weight in getattr(trainer, "model", trainer).weights]


def _numpy(variable):
    return ops.convert_to_numpy(variable.value)


def _seed_generators(trainer):
    """The seed generators of `trainer`'s layers (Dropout's...), in the fixed
    order of the layer graph: their states are variables, but not weights."""
    generators = {}
    for layer in trainer._flatten_layers(include_self=True, recursive=True):
        for generator in getattr(layer, "_seed_generators", ()):
            generators.setdefault(id(generator), generator)
    return list(generators.values())


def _write_json(path, content):
    partial = path + ".partial"
    with open(partial, "w") as f:
        json.dump(content, f, indent=1)
    os.replace(partial, path)


def train(
    trainer,
    train_data,
    total_steps,
    model_dir,
    *,
    save_every=100,
    eval_data=None,
    callbacks=(),
    verbose=2,
    settings=None,
):
    """Runs `total_steps` updates of `trainer` with checkpoints, resuming
    where a previous run with the same `model_dir` stopped.

    Args:
        trainer: a compiled `Trainer`, built under the strategy's scope.
        train_data: `train_data(start_step)` -> a repeated `tf.data.Dataset`
            of global batches whose first batch is batch `start_step` of the
            run (as `keras_vit.data.train_dataset(..., start_step=...)`); a
            resumed run gets the step it resumes from. With such a stream, a
            run killed at any point and resumed ends with the weights of an
            uninterrupted run (to float round-off).
        total_steps: optimizer updates in the whole run.
        model_dir: gets `checkpoint/` (the training state, saved every
            `save_every` steps), `logs/` (TensorBoard), `model.keras` (the
            trained model) and `results.json`; other workers of a
            multi-worker run write the same under `model_dir/worker-N`.
        eval_data: a dataset evaluated at the end.
        callbacks: more Keras callbacks.
        verbose: `fit`'s verbosity (2: a line per checkpoint interval).
        settings: a JSON-able dict of what defines the run (the batch stream,
            the model, the schedule: seed, batch size, steps, augmentation...),
            saved with each checkpoint. A resume whose `settings` differ from
            the saved ones raises a `keras_vit.errors.UsageError` naming the
            differences, as an exact resume needs the same run; None: not
            checked.

    The strategy is the one the trainer was built under: on TensorFlow its
    `tf.distribute` strategy, on JAX the current `keras.distribution` (or
    none), whose other processes write under `model_dir/process-N`.

    Returns the results dict also written to results.json: steps done,
    the step it resumed from, the per-epoch training logs of the whole run
    (those before a resume come from the checkpoint), the evaluation.
    """
    for name, value in (("total_steps", total_steps), ("save_every", save_every)):
        if not is_whole_number(value) or value < 1:
            raise ValueError(f"{name} must be a whole number of steps, at least 1; got {value!r}.")
    if keras.backend.backend() == "tensorflow":
        strategy = trainer.distribute_strategy
        directory = task_directory(model_dir, strategy)
        scope, replicas = strategy.scope(), strategy.num_replicas_in_sync
    else:
        distribution = keras.distribution.distribution()
        directory = process_directory(model_dir)
        scope = distribution.scope() if distribution is not None else contextlib.nullcontext()
        replicas = sharding.replicas(distribution)
    is_chief = directory == model_dir
    backup = Backup(os.path.join(directory, "checkpoint"), settings)
    with scope:  # optimizer slots made by the restore belong to the strategy (laid out as their variables)
        start_step = backup.restore(trainer)
    if start_step:
        print(f"Resuming from step {start_step} (saved in {backup.path}).", flush=True)
    callbacks = [backup, *callbacks]
    if is_chief:
        callbacks.append(keras.callbacks.TensorBoard(os.path.join(directory, "logs")))

    began = time.time()
    # A Keras epoch is one checkpoint interval; a shorter one ends the run.
    full, last = divmod(max(total_steps - start_step, 0), save_every)
    for count, length in ((full, save_every), (1 if last else 0, last)):
        if not count:
            continue
        step = _step(trainer)
        first_epoch = step // save_every  # only numbers the log lines
        trainer.fit(
            train_data(step),
            initial_epoch=first_epoch,
            epochs=first_epoch + count,
            steps_per_epoch=length,
            shuffle=False,  # the dataset shuffles
            callbacks=callbacks,
            verbose=verbose,
        )
    results = {
        "steps": _step(trainer),
        "start_step": start_step,
        "train_seconds": round(time.time() - began, 1),
        "replicas": replicas,
        "history": backup.history,
    }
    if eval_data is not None:
        results["eval"] = {k: float(v) for k, v in trainer.evaluate(eval_data, return_dict=True, verbose=0).items()}
    model = getattr(trainer, "model", trainer)
    os.makedirs(directory, exist_ok=True)
    model.save(os.path.join(directory, "model.keras"))
    _write_json(os.path.join(directory, "results.json"), results)
    return results
