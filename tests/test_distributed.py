"""The example scripts under tf.distribute, each run in its own process:
MirroredStrategy over 2 logical CPUs, MultiWorkerMirroredStrategy over 2
worker processes, a run killed with SIGKILL and resumed, pre-training, and
the one-line errors (no TPU, bad flags, unknown dataset). Runs that must
match (a resumed run and an uninterrupted one, workers and one process) are
compared weight by weight.

Each run is a tiny ViT on scikit-learn's digits at 16x16, so the whole file
takes a few minutes on two cores.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import time

import keras
import numpy as np
import pytest
from harness import EXAMPLE_DRIVER_END

import keras_vit  # noqa: F401 - registers the layers that load_model reads

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FINETUNE = os.path.join(ROOT, "examples", "finetune.py")
PRETRAIN = os.path.join(ROOT, "examples", "pretrain.py")
TINY = [
    "--model", "ViT",
    "--model_args", "patch_size=8,hidden_size=32,depth=2,num_heads=4,mlp_dim=64",
    "--dataset", "digits",
    "--image_size", "16",
    "--batch_size", "32",
]  # fmt: skip
TIMEOUT = 300  # seconds for one run; a hung run fails the test instead of blocking CI


def command(script, *flags):
    return [sys.executable, script, *TINY, *flags]


def environment(**extra):
    env = dict(os.environ, KERAS_BACKEND="tensorflow", TF_CPP_MIN_LOG_LEVEL="3", PYTHONUNBUFFERED="1")
    # The scripts import the keras_vit of this tree, not whichever one is installed.
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [ROOT, env.get("PYTHONPATH")]))
    env.pop("TF_CONFIG", None)
    env.update(extra)
    return env


def start(argv, env=None, output=subprocess.PIPE):
    return subprocess.Popen(argv, env=env or environment(), stdout=output, stderr=output, text=True, cwd=ROOT)


def finish(processes):
    """Waits for named processes started side by side (two cores: it halves the
    wall time); kills any left over, whatever happens. -> {name: (stdout, stderr, code)}."""
    try:
        done = {}
        for name, process in processes.items():
            stdout, stderr = process.communicate(timeout=TIMEOUT)
            done[name] = (stdout, stderr, process.returncode)
        return done
    finally:
        for process in processes.values():
            if process.poll() is None:
                process.kill()
                process.wait()


def run_all(**jobs):
    """Runs example commands side by side; each must succeed. -> {name: stdout}."""
    done = finish({name: start(argv) for name, argv in jobs.items()})
    for name, (_, stderr, code) in done.items():
        assert code == 0, (name, stderr[-3000:])
    return {name: stdout for name, (stdout, _, _) in done.items()}


def results(directory):
    with open(os.path.join(directory, "results.json")) as f:
        return json.load(f)


def weights(directory):
    model = keras.saving.load_model(os.path.join(directory, "model.keras"), safe_mode=True)
    return model.get_weights()


def test_mirrored_over_two_cpus_trains_and_equals_one_device(tmp_path):
    """2 replicas x 2 accumulated micro-batches of 8 make the same updates as
    one device with the batch of 32, gradient clipping included (a small
    clip norm so that it binds), and the loss falls."""
    same = ["--steps", "20", "--save_every", "5", "--learning_rate", "0.5", "--clip_norm", "0.05"]
    stdout = run_all(
        one=command(FINETUNE, *same, "--strategy", "one_device", "--model_dir", str(tmp_path / "one")),
        mirrored=command(
            FINETUNE, *same, "--strategy", "mirrored", "--cpu_replicas", "2", "--accum_steps", "2",
            "--model_dir", str(tmp_path / "mirrored"),
        ),
    )  # fmt: skip
    assert "2 replica(s) (MirroredStrategy)" in stdout["mirrored"]
    assert "Held-out accuracy on digits" in stdout["mirrored"]
    got, reference = results(tmp_path / "mirrored"), results(tmp_path / "one")
    assert got["replicas"] == 2 and got["steps"] == 20
    losses = got["history"]["loss"]
    assert losses[-1] < losses[0] - 0.1, losses
    np.testing.assert_allclose(losses, reference["history"]["loss"], rtol=1e-4)
    for a, b in zip(weights(tmp_path / "mirrored"), weights(tmp_path / "one")):
        np.testing.assert_allclose(a, b, atol=1e-4)


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_mirrored_over_two_processes_equals_one_device(tmp_path):
    """Two workers, each with half of every global batch, make the updates of
    one process with the whole batch (gradient clipping included: a small
    clip norm, so that it binds), and hold the same weights."""
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    same = ["--steps", "6", "--save_every", "3", "--learning_rate", "0.5", "--clip_norm", "0.05"]
    multi, single = tmp_path / "multi", tmp_path / "one"
    processes = {"one": start(command(FINETUNE, *same, "--strategy", "one_device", "--model_dir", str(single)))}
    for index in range(2):
        tf_config = json.dumps({"cluster": {"worker": workers}, "task": {"type": "worker", "index": index}})
        processes[index] = start(
            command(FINETUNE, *same, "--strategy", "multi_worker", "--model_dir", str(multi)),
            env=environment(TF_CONFIG=tf_config),
        )
    for name, (_, stderr, code) in finish(processes).items():
        assert code == 0, (name, stderr[-3000:])
    chief, other = str(multi), str(multi / "worker-1")  # each task writes in its own directory
    for directory in (chief, other):
        assert results(directory)["steps"] == 6 and results(directory)["replicas"] == 2
    assert os.path.isdir(os.path.join(chief, "logs"))  # TensorBoard: the chief's
    for a, b in zip(weights(chief), weights(other)):
        np.testing.assert_array_equal(a, b)
    reference = weights(single)
    assert not all(np.allclose(a, 0) for a in reference[-2:])  # the zero-initialised head learned
    # Float round-off only (3e-8 seen): the all-reduce sums the two halves in another order.
    for a, b in zip(weights(chief), reference):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6)
    np.testing.assert_allclose(results(chief)["history"]["loss"], results(single)["history"]["loss"], rtol=1e-6)


def _saved_step(model_dir):
    try:
        with open(os.path.join(model_dir, "checkpoint", "state.json")) as f:
            return json.load(f)["step"]
    except (FileNotFoundError, json.JSONDecodeError):
        return 0


# RandAugment, MixUp and dropout on: every random draw of the run must be
# the same after the restart.
KILL_FLAGS = [
    "--steps", "100", "--save_every", "10", "--learning_rate", "0.1", "--randaugment", "0.3", "--mixup", "0.2",
    "--model_args", TINY[TINY.index("--model_args") + 1] + ",dropout_rate=0.1",
]  # fmt: skip
KILL_STRATEGIES = {
    "one_device": ["--strategy", "one_device"],
    "mirrored": ["--strategy", "mirrored", "--cpu_replicas", "2"],
}


def _kill_after_first_checkpoint(runs):
    """SIGKILLs each of `runs` ({name: (process, model_dir)}, running side by
    side) as soon as its first checkpoint is written."""
    pending = dict(runs)
    try:
        deadline = time.time() + TIMEOUT
        while pending and time.time() < deadline:
            for name, (process, model_dir) in list(pending.items()):
                if _saved_step(model_dir) or process.poll() is not None:
                    process.send_signal(signal.SIGKILL)  # a real kill: no clean-up runs in the process
                    del pending[name]
            time.sleep(0.01)
    finally:
        for process, _ in runs.values():
            if process.poll() is None:
                process.kill()
            process.wait()
    for name, (process, _) in runs.items():
        assert process.returncode == -signal.SIGKILL, (name, "finished before it was killed")


def test_killed_run_resumes_to_the_weights_of_an_uninterrupted_run(tmp_path):
    """A run killed with SIGKILL between two checkpoints and started again
    ends with the weights of a run that was never interrupted, on one device
    and on two mirrored replicas (both side by side)."""
    argv = {
        (name, kind): command(FINETUNE, *KILL_FLAGS, *strategy, "--model_dir", str(tmp_path / f"{name}-{kind}"))
        for name, strategy in KILL_STRATEGIES.items()
        for kind in ("uninterrupted", "killed")
    }
    references = {name: start(argv[name, "uninterrupted"]) for name in KILL_STRATEGIES}
    try:
        _kill_after_first_checkpoint({
            name: (start(argv[name, "killed"], output=subprocess.DEVNULL), str(tmp_path / f"{name}-killed"))
            for name in KILL_STRATEGIES
        })  # fmt: skip
        saved = {name: _saved_step(str(tmp_path / f"{name}-killed")) for name in KILL_STRATEGIES}
        for name, step in saved.items():
            assert 10 <= step < 100 and step % 10 == 0, (name, "the run must die between two checkpoints")
            assert not os.path.exists(tmp_path / f"{name}-killed" / "results.json")
        stdout = run_all(**{name: argv[name, "killed"] for name in KILL_STRATEGIES})
    finally:
        done = finish(references)
    differences = {}
    for name in KILL_STRATEGIES:
        _, stderr, code = done[name]
        assert code == 0, (name, stderr[-3000:])
        assert f"Resuming from step {saved[name]}" in stdout[name]
        uninterrupted, resumed = tmp_path / f"{name}-uninterrupted", tmp_path / f"{name}-killed"
        after = results(resumed)
        assert after["start_step"] == saved[name]
        assert after["steps"] == results(uninterrupted)["steps"] == 100
        # The logs of the whole run: those before the kill from the checkpoint, then the resumed run's.
        losses = after["history"]["loss"]
        assert len(losses) == 10
        differences[name] = {
            "weights": max(float(np.abs(a - b).max()) for a, b in zip(weights(resumed), weights(uninterrupted))),
            "losses": float(np.abs(np.subtract(losses, results(uninterrupted)["history"]["loss"])).max()),
        }
    # Both strategies checked before failing: float round-off at most.
    assert all(d["weights"] <= 1e-6 and d["losses"] <= 1e-6 for d in differences.values()), differences


# Runs an example script with keras_vit.data.train_dataset recording the seed
# it is given and training.train stopping after it made the stream: {"seed": ...}.
SEED_RUN = """
import json, os, runpy, sys
from keras_vit import data, training

seen, make = {}, data.train_dataset

def recording(*args, **kwargs):
    seen["seed"] = kwargs.get("seed")
    return make(*args, **kwargs)

def first_batches_only(trainer, train_data, total_steps, model_dir, **kwargs):
    train_data(0)
    sys.exit(0)

data.train_dataset, training.train = recording, first_batches_only
""" + EXAMPLE_DRIVER_END


def test_seed_flag_reaches_the_training_stream(tmp_path):
    driver = tmp_path / "seed_run.py"
    driver.write_text(SEED_RUN)
    argv = [sys.executable, str(driver), str(tmp_path / "seen.json"),
            *command(FINETUNE, "--steps", "2", "--seed", "7", "--model_dir", str(tmp_path / "run"))[1:]]
    done = finish({"run": start(argv)})["run"]
    assert done[2] == 0, done[1][-3000:]
    assert json.loads((tmp_path / "seen.json").read_text()) == {"seed": 7}


def test_pretrain_and_one_line_errors(tmp_path):
    """Runs concurrently: a tiny pre-training run and the scripts' errors."""
    env = environment()
    jobs = {
        "pretrain": command(
            PRETRAIN, "--preset", "imagenet21k", "--learning_rate", "0.001", "--weight_decay", "0.03",
            "--steps", "6", "--save_every", "3", "--model_dir", str(tmp_path / "pretrain"),
            # A constructor argument the recipe also sets (its dropout, 0 here): the user's wins.
            "--model_args", TINY[TINY.index("--model_args") + 1] + ",dropout_rate=0.1",
        ),
        "tpu": command(FINETUNE, "--strategy", "tpu", "--steps", "2", "--model_dir", str(tmp_path / "tpu")),
        "strategy": command(FINETUNE, "--strategy", "horovod", "--model_dir", str(tmp_path / "x")),
        "dataset": [sys.executable, FINETUNE, "--dataset", "mnist", "--steps", "2", "--model_dir", str(tmp_path / "y")],
        "flag": command(FINETUNE, "--epochz", "3", "--model_dir", str(tmp_path / "z")),
        "distribution": command(FINETUNE, "--distribution", "data", "--model_dir", str(tmp_path / "d")),
    }  # fmt: skip
    done = finish({name: start(argv, env=env) for name, argv in jobs.items()})
    stdout, stderr, code = done.pop("pretrain")
    assert code == 0, stderr[-3000:]
    assert "sigmoid_cross_entropy" in stdout and "Adam lr 0.001, weight decay 0.03" in stdout
    assert results(tmp_path / "pretrain")["steps"] == 6
    pretrained = keras.saving.load_model(tmp_path / "pretrain" / "model.keras", safe_mode=True)
    assert pretrained.get_layer("embedding_dropout").rate == 0.1
    # Started again with another --seed (a flag that defines the batches):
    # refused, not resumed; with the same run spelled otherwise: resumed.
    same = [a.replace("patch_size=8,hidden_size=32", "hidden_size=32,patch_size=8") for a in jobs["pretrain"]]
    assert same != jobs["pretrain"]
    again = finish({"resume": start(jobs["pretrain"] + ["--seed", "1"], env=env), "same": start(same, env=env)})
    stdout, stderr, code = again.pop("same")
    assert code == 0 and "Resuming from step 6" in stdout, stderr[-3000:]
    assert len(results(tmp_path / "pretrain")["history"]["loss"]) == 2  # the run's logs are kept
    done.update(again)

    expected = {
        "tpu": "--strategy tpu: no TPU found",
        "strategy": "value should be one of <auto|one_device|mirrored|multi_worker|tpu>",
        "dataset": "Unknown dataset 'mnist': use one of cifar10, cifar100, oxford_iiit_pet",
        "flag": "Unknown command line flag 'epochz'",
        "distribution": "--distribution data: keras.distribution needs KERAS_BACKEND=jax",
        "resume": "holds a run saved with other settings (seed 0 -> 1)",
    }
    for name, (_, stderr, code) in done.items():
        lines = [line for line in stderr.splitlines() if "error:" in line]
        assert code == 2, (name, stderr[-2000:])
        assert len(lines) == 1 and expected[name] in lines[0], (name, stderr[-2000:])
        assert "Traceback" not in stderr, name


def test_whole_eval_batches_score_as_many_images_as_the_replicas_allow():
    """examples/common.py's evaluation batch under keras.distribution or a
    TPU: a multiple of the replicas, at most the batch asked for, dividing the
    eval set where one does (else the fewest images left out)."""
    import importlib.util
    import types

    spec = importlib.util.spec_from_file_location("examples_common", os.path.join(ROOT, "examples", "common.py"))
    common = importlib.util.module_from_spec(spec)
    before = dict(os.environ)
    try:
        spec.loader.exec_module(common)
    finally:  # it sets the scripts' environment defaults
        os.environ.clear()
        os.environ.update(before)

    def source(count):
        return types.SimpleNamespace(num_examples=count, name="digits", split="eval")

    assert common._whole_eval_batches(16, source(32), 2) == (16, 32)
    assert common._whole_eval_batches(16, source(360), 2) == (12, 360)
    assert common._whole_eval_batches(512, source(360), 4) == (360, 360)
    assert common._whole_eval_batches(16, source(33), 2) == (16, 32)  # odd: one image cannot be scored
    assert common._whole_eval_batches(16, source(None), 4) == (16, None)
    with pytest.raises(common.UsageError, match="digits's eval split has 3 images, fewer than the 4 replicas"):
        common._whole_eval_batches(16, source(3), 4)
