"""benchmarks/gpu_speed.py's table and ratio, from made-up results (no model runs).

The whole script's CPU smoke test, `bash benchmarks/gpu.sh --tiny`, runs three
engines in three processes and compiles with XLA and torch.compile: 50 to 100 s
on a 2-core machine, too long for the suite, so it is a documented command
(README, "Speed"), not a test.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_gpu_speed():
    spec = importlib.util.spec_from_file_location("gpu_speed", os.path.join(ROOT, "benchmarks", "gpu_speed.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Args:
    tiny = False
    batch = 64
    rounds = 5


def test_table_prints_every_engine_and_the_jax_over_timm_ratio(capsys):
    gpu_speed = load_gpu_speed()
    results = {
        ("keras-jax", "B16", "inference"): dict(img_s=[1000.0, 1100.0, 1200.0], warmup_s=20.0),
        ("timm", "B16", "inference"): dict(img_s=[900.0, 1000.0, 1000.0], warmup_s=40.0),
        ("keras-torch", "B16", "inference"): dict(error="not installed: No module named 'keras'"),
        ("keras-jax", "B16", "train"): dict(img_s=[300.0, 310.0, 320.0], warmup_s=30.0),
        ("timm", "B16", "train"): dict(img_s=[400.0], warmup_s=60.0),
    }
    gpu_speed.print_table(results, {"timm": "cuda: NVIDIA H100"}, ["B16"], list(gpu_speed.ENGINES),
                          Args(), "cuda", 123.0)
    out = capsys.readouterr().out
    assert "cuda: NVIDIA H100" in out and "batch 64, 224 px" in out
    assert "ViT-B/16         inference keras_vit JAX (XLA)         1100.0    1000.0    1200.0      3      20.0" in out
    assert "not installed: No module named 'keras'" in out
    assert "ViT-B/16         train     keras_vit torch (eager)  not run (time guard)" in out
    assert "ratio keras_vit-JAX / timm+compile, ViT-B/16 inference: 1.100 (meets the goal >= 1)" in out
    assert "ratio keras_vit-JAX / timm+compile, ViT-B/16 train: 0.775 (below the goal >= 1)" in out


def test_time_rounds_keeps_the_compile_out_of_the_rounds_and_stops_before_the_deadline():
    import time

    gpu_speed = load_gpu_speed()
    calls = []

    def step():
        calls.append(None)
        time.sleep(0.05 if len(calls) == 1 else 0.001)  # the first call "compiles"

    warmup, speeds = gpu_speed.time_rounds(step, lambda: None, batch=4, rounds=3,
                                           deadline=time.time() + 60, target_seconds=0.01)
    assert warmup >= 0.05 and len(speeds) == 3 and max(speeds) < 4 / 0.001
    _, speeds = gpu_speed.time_rounds(step, lambda: None, batch=4, rounds=50,
                                      deadline=time.time() - 1, target_seconds=0.01)
    assert len(speeds) == 1  # past the deadline: one round, so that a figure exists
