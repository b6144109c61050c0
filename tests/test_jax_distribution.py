"""keras.distribution on JAX: `training.layout_map` splits every block kernel
over the model axis, and a sharded or data-parallel training step equals one
device's (loss, weights); an official .npz checkpoint loads under
ModelParallel; a killed run resumes under ModelParallel to the weights of an
uninterrupted one; the example runs with --distribution model:4.

Runs under KERAS_BACKEND=jax with 8 virtual CPU devices:

    KERAS_BACKEND=jax XLA_FLAGS=--xla_force_host_platform_device_count=8 python -m pytest tests/test_jax_distribution.py

(.ci/run does.) On another backend the module skips itself; on JAX with
fewer than 8 devices every test fails, saying how to run it.
"""

import json
import os
import socket
import subprocess
import sys

import keras
import numpy as np
import pytest
from harness import images, randomize_head, stop_and_resume, tiny_hybrid, tiny_vit

from keras_vit import training

if keras.backend.backend() != "jax":
    pytest.skip("keras.distribution's ModelParallel runs on JAX: run with KERAS_BACKEND=jax "
                "XLA_FLAGS=--xla_force_host_platform_device_count=8", allow_module_level=True)

import jax

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEVICES = 8
SPLIT = [
    "attention/query/kernel", "attention/key/kernel", "attention/value/kernel", "attention/attention_output/kernel",
    "mlp_in/kernel", "mlp_out/kernel",
]  # fmt: skip


@pytest.fixture(autouse=True)
def _eight_devices():
    if jax.device_count() < DEVICES:
        pytest.fail(f"{jax.device_count()} JAX device(s): set XLA_FLAGS=--xla_force_host_platform_device_count=8 "
                    "before Python starts")
    yield
    keras.distribution.set_distribution(None)


def model_parallel(shape=(2, 4)):
    devices = keras.distribution.list_devices()
    mesh = keras.distribution.DeviceMesh(shape, axis_names=("batch", "model"), devices=devices)
    return keras.distribution.ModelParallel(layout_map=training.layout_map(mesh), batch_dim_name="batch")


def numpy(variable):
    return keras.ops.convert_to_numpy(variable)


def one_step(build, weights, distribution, x, y, accum_steps=1, steps=1, batch_size=None, clip_norm=0.5):
    """Builds `build()` under `distribution` (None: one device), gives it
    `weights`, trains `steps` steps; -> (trainer, losses, weights)."""
    keras.distribution.set_distribution(distribution)
    try:
        model = build()
        model.set_weights(weights)
        trainer = training.Trainer(model, accum_steps=accum_steps)
        recipe = training.finetune_recipe(total_steps=10, warmup_steps=0, learning_rate=0.1, batch_size=len(x),
                                          accum_steps=accum_steps, clip_norm=clip_norm)
        trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss)
        history = trainer.fit(x, y, batch_size=batch_size or len(x), epochs=steps, shuffle=False, verbose=0)
        return trainer, history.history["loss"], [numpy(w) for w in model.weights]
    finally:
        keras.distribution.set_distribution(None)


def labels(count, classes=5):
    return np.eye(classes, dtype="float32")[np.arange(count) % classes]


@pytest.mark.parametrize("build", [tiny_vit, tiny_hybrid], ids=["vit", "hybrid"])
def test_model_parallel_splits_every_block_kernel_and_trains_as_one_device(build):
    """On a (2, 4) mesh each block's query/key/value, attention output, mlp_in
    and mlp_out kernel lives in 4 pieces (a quarter of its heads or MLP
    units each); one step of the sharded model gives one device's loss and
    weights (clipping at norm 0.5, active here, included)."""
    keras.utils.set_random_seed(0)
    reference = build()
    randomize_head(reference)
    start = reference.get_weights()
    x, y = images(8, seed=1), labels(8)

    keras.distribution.set_distribution(model_parallel())
    sharded = build()
    keras.distribution.set_distribution(None)
    by_path = {v.path: v for v in sharded.weights}
    split = [path for path in by_path if any(path.endswith(name) for name in SPLIT)]
    assert len(split) == 2 * len(SPLIT)  # two blocks
    for path in split:
        value = by_path[path].value
        shards = {tuple(shard.data.shape) for shard in value.addressable_shards}
        axis = 1 if "/query" in path or "/key" in path or "/value" in path or "mlp_in" in path else 0
        expected = list(value.shape)
        expected[axis] //= 4
        assert shards == {tuple(expected)}, (path, shards)
        assert len({shard.device for shard in value.addressable_shards}) == DEVICES
    # Everything not named is replicated (a norm, the position embedding).
    for path in ("block_00/norm1/gamma", "position_embedding/embedding"):
        assert {tuple(s.data.shape) for s in by_path[path].value.addressable_shards} == {tuple(by_path[path].shape)}

    _, one_loss, one_weights = one_step(build, start, None, x, y)
    trainer, parallel_loss, parallel_weights = one_step(build, start, model_parallel(), x, y)
    np.testing.assert_allclose(parallel_loss, one_loss, rtol=1e-5, atol=1e-5)
    for variable, a, b in zip(trainer.model.weights, parallel_weights, one_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5, err_msg=variable.path)
    # The step moved the weights (the comparison is not between two starts).
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(one_weights, start))
    # Optimizer slots are laid out as their variables.
    momentum = [v for v in trainer.optimizer.variables if v.path.endswith("mlp_in_kernel_momentum")]
    assert momentum and {tuple(s.data.shape) for s in momentum[0].value.addressable_shards} == {(32, 16)}


def test_data_parallel_over_eight_devices_equals_one_device_with_accumulation():
    """4 steps of a global batch of 16 split over 8 devices (and into 2
    micro-batches per step) give the losses and weights of one device
    (without clipping, which would hide a wrongly scaled gradient)."""
    keras.utils.set_random_seed(0)
    reference = tiny_vit()
    randomize_head(reference)
    start = reference.get_weights()
    x, y = images(64, seed=2), labels(64)
    _, one_loss, one_weights = one_step(tiny_vit, start, None, x, y, batch_size=16, steps=4, clip_norm=None)
    data = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    trainer, parallel_loss, parallel_weights = one_step(tiny_vit, start, data, x, y, accum_steps=2, batch_size=16,
                                                        steps=4, clip_norm=None)
    np.testing.assert_allclose(parallel_loss, one_loss, rtol=1e-5, atol=1e-5)
    for a, b in zip(parallel_weights, one_weights):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-5)
    assert int(numpy(trainer.steps_done)) == 16 and int(numpy(trainer.optimizer.iterations)) == 16
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(one_weights, start))


def test_npz_checkpoint_loads_under_model_parallel_with_the_logits_of_one_device(tmp_path):
    """An official-layout .npz (with pre_logits: split by column, the head
    by row) through `weights=`: the sharded model's logits are one
    device's; so are those of a .weights.h5 and a .keras file saved from
    it; and the loader stays strict (a wrong width fails)."""
    from keras_vit import testing

    path = str(tmp_path / "tiny.npz")
    testing.write_checkpoint(path, testing.official_arrays(8, 32, 2, 4, 64, image_size=32, classes=5,
                                                           representation_size=32))
    x = images(4, seed=4)
    unsharded = keras_vit_model(path)
    expected = numpy(unsharded(x))
    keras.distribution.set_distribution(model_parallel())
    sharded = keras_vit_model(path)
    head = {tuple(s.data.shape) for s in sharded.get_layer("predictions").kernel.value.addressable_shards}
    assert head == {(8, 5)}
    pre_logits = {tuple(s.data.shape) for s in sharded.get_layer("pre_logits").kernel.value.addressable_shards}
    assert pre_logits == {(32, 8)}  # (width, representation) by column
    np.testing.assert_allclose(numpy(sharded(x)), expected, rtol=1e-5, atol=1e-5)
    assert np.abs(expected).max() > 1e-3  # a loaded head, not zeros
    # The same through a .weights.h5 (weights=) and a .keras file, saved from the sharded model.
    sharded.save_weights(str(tmp_path / "tiny.weights.h5"))
    sharded.save(str(tmp_path / "tiny.keras"))
    from_h5 = keras_vit_model(str(tmp_path / "tiny.weights.h5"), representation_size=32)
    from_keras = keras.saving.load_model(str(tmp_path / "tiny.keras"))
    for model in (from_h5, from_keras):
        assert {tuple(s.data.shape) for s in model.get_layer("predictions").kernel.value.addressable_shards} == {(8, 5)}
        np.testing.assert_allclose(numpy(model(x)), expected, rtol=1e-5, atol=1e-5)
    # Strict under the distribution too: a checkpoint of another width is refused.
    with pytest.raises(ValueError, match="hidden_size|width"):
        keras_vit_model(path, hidden_size=64, num_heads=8)


def keras_vit_model(path, **kwargs):
    import keras_vit

    config = dict(patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64, input_shape=(32, 32, 3))
    config.update(kwargs)
    return keras_vit.ViT(weights=path, classifier_activation=None, **config)


def test_layouts_match_inside_other_scopes_and_per_device_bytes_counts_shards():
    """A model built inside name scopes (as inside a wrapper) is split the
    same; `per_device_bytes` counts each device's shard, not the whole array."""
    keras.distribution.set_distribution(model_parallel())
    with keras.name_scope("outer"), keras.name_scope("inner"):
        model = tiny_vit()
    block = model.get_layer("block_00")
    query, gamma = block.attention.query_dense.kernel, block.norm1.gamma
    assert query.path.startswith("outer/inner/"), query.path
    assert {tuple(s.data.shape) for s in query.value.addressable_shards} == {(32, 1, 8)}  # 4 heads over 4
    split = training.per_device_bytes([query])
    assert len(split) == DEVICES and set(split.values()) == {32 * 1 * 8 * 4}  # float32: a quarter each
    assert set(training.per_device_bytes([gamma]).values()) == {32 * 4}  # replicated: whole on each


def test_heads_that_do_not_divide_the_model_axis_fail_in_one_line():
    keras.distribution.set_distribution(model_parallel((1, 8)))
    with pytest.raises(ValueError) as error:
        tiny_vit(num_heads=4, hidden_size=32)  # 4 heads over 8 devices
    message = str(error.value)
    assert "\n" not in message and "head count 4" in message and "8 devices" in message, message
    with pytest.raises(ValueError, match="has no axis 'tensor'"):
        training.layout_map(keras.distribution.DeviceMesh((8,), axis_names=("batch",)), model_axis="tensor")


def test_killed_run_resumes_under_model_parallel_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """7 steps in one go, or 4 steps, then a fresh trainer restored from the
    checkpoint (as a killed process would be) for the other 3, on a (2, 4)
    mesh, dropout and MixUp on: the same weights, to 1e-6."""
    from keras_vit import data

    source = data.source("digits", "train")

    def train_data(step):
        return data.train_dataset(source, 16, 16, seed=0, start_step=step, mixup=0.2)

    def trainer():
        keras.utils.set_random_seed(0)
        model = tiny_vit(input_shape=(16, 16, 3), classes=10, dropout_rate=0.1)
        recipe = training.finetune_recipe(total_steps=7, warmup_steps=2, learning_rate=0.1, batch_size=16,
                                          accum_steps=2)
        trainer = training.Trainer(model, accum_steps=2)
        trainer.compile(optimizer=recipe.optimizer, loss=recipe.loss)
        return trainer

    keras.distribution.set_distribution(model_parallel())
    uninterrupted, stopped, resumed, results = stop_and_resume(trainer, train_data, str(tmp_path))
    assert (results["start_step"], results["steps"], results["replicas"]) == (4, 7, 2)
    for a, b in zip(resumed.model.weights, uninterrupted.model.weights):
        assert a.value.sharding.is_equivalent_to(b.value.sharding, len(a.shape))
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=0, atol=1e-6, err_msg=a.path)
    mlp_in = resumed.model.get_layer("block_00").mlp_in.kernel
    assert {tuple(s.data.shape) for s in mlp_in.value.addressable_shards} == {(32, 16)}
    assert not all(np.allclose(a, b, atol=1e-4) for a, b in zip(stopped.model.get_weights(), resumed.model.get_weights()))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def example_env(devices, **extra):
    env = dict(os.environ, KERAS_BACKEND="jax", XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
               PYTHONUNBUFFERED="1", TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    for name in training.sharding.ENVIRONMENT:
        env.pop(name, None)
    env.update(extra)
    return env


def test_example_with_model_4_on_one_process_and_on_two_processes(tmp_path):
    """examples/finetune.py --distribution model:4 end to end on a (2, 4)
    mesh: in one process with 8 devices, and as two processes of 4 devices
    each (keras.distribution.initialize from KERAS_DISTRIBUTION_*, on
    127.0.0.1), which must log the same losses and end with the same
    weights; and the one-line refusal of --strategy on JAX."""
    tiny = [sys.executable, os.path.join(ROOT, "examples", "finetune.py"), "--model", "ViT",
            "--model_args", "patch_size=8,hidden_size=32,depth=2,num_heads=4,mlp_dim=64",
            "--dataset", "digits", "--image_size", "16", "--batch_size", "16", "--steps", "4", "--save_every", "2",
            "--accum_steps", "2", "--distribution", "model:4"]  # fmt: skip

    def run(directory, devices=8, **extra):
        return subprocess.Popen([*tiny, "--model_dir", str(tmp_path / directory)], env=example_env(devices, **extra),
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT)

    cluster = dict(KERAS_DISTRIBUTION_JOB_ADDRESSES=f"127.0.0.1:{free_port()}", KERAS_DISTRIBUTION_NUM_PROCESSES="2")
    runs = {"one": run("one")}
    runs.update({f"process-{i}": run("two", 4, KERAS_DISTRIBUTION_PROCESS_ID=str(i), **cluster) for i in (0, 1)})
    out = {}
    try:
        for name, process in runs.items():
            stdout, stderr = process.communicate(timeout=300)
            assert process.returncode == 0, (name, stderr[-3000:])
            out[name] = stdout
    finally:
        for process in runs.values():
            if process.poll() is None:
                process.kill()
                process.wait()
    assert "ModelParallel, mesh 2 batch x 4 model" in out["one"] and "Trained 4 steps" in out["one"], out["one"]
    assert "mesh 2 batch x 4 model, 2 processes" in out["process-0"], out["process-0"]
    one, two = (json.loads((tmp_path / name / "results.json").read_text()) for name in ("one", "two"))
    # Evaluated in whole batches split over the 2 batch replicas, yet on every
    # one of the 360 images (the batch of 16 asked for would leave out 8).
    assert "(eval, 360 images)" in out["one"], out["one"]
    from keras_vit import data

    trained = keras.saving.load_model(tmp_path / "one" / "model.keras")
    held_out = data.eval_dataset(data.source("digits", "eval"), 16, 120, value_range=data.input_range(trained))
    x, y = (np.concatenate(part) for part in zip(*held_out.as_numpy_iterator()))
    accuracy = np.mean(np.argmax(numpy(trained.predict(x, verbose=0)), -1) == np.argmax(y, -1))
    assert one["eval"]["accuracy"] == pytest.approx(accuracy, abs=1e-6)
    np.testing.assert_allclose(two["history"]["loss"], one["history"]["loss"], rtol=1e-5)
    assert os.path.exists(tmp_path / "two" / "process-1" / "model.keras")  # process 1 writes aside
    load = keras.saving.load_model
    for a, b in zip(load(tmp_path / "one" / "model.keras").weights, load(tmp_path / "two" / "model.keras").weights):
        np.testing.assert_allclose(numpy(a), numpy(b), rtol=0, atol=1e-5, err_msg=a.path)

    refused = subprocess.run([*tiny, "--strategy", "mirrored", "--model_dir", str(tmp_path / "b")],
                             env=example_env(8), capture_output=True, text=True, timeout=120, cwd=ROOT,
                             check=False)
    errors = [line for line in refused.stderr.splitlines() if "error:" in line]
    assert refused.returncode == 2 and len(errors) == 1 and "--strategy" in errors[0], refused.stderr[-2000:]
