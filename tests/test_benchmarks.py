"""The benchmarks' tables and ratios, from made-up results (no model runs).

Their CPU smoke tests (`bash benchmarks/gpu.sh --tiny`, `python
benchmarks/speed.py --tiny`, `python benchmarks/serving_speed.py --tiny`) start
an engine per process and compile with XLA and torch.compile: a minute or more
each on a 2-core machine, too long for the suite, so they are documented
commands (docs/guides/speed.md, docs/guides/serving.md), not tests.
"""

import importlib.util
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_benchmark(name):
    """benchmarks/NAME.py as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(name, os.path.join(ROOT, "benchmarks", f"{name}.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class Args:
    tiny = False
    batch = 64
    rounds = 5


def test_table_prints_every_engine_and_the_jax_over_timm_ratio(capsys):
    gpu_speed = load_benchmark("gpu_speed")
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

    gpu_speed = load_benchmark("gpu_speed")
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


class ServingArgs:
    batch = 8
    rounds = 2
    repeats = 3
    latency_calls = 2


def test_serving_speed_compares_keras_vits_best_export_with_timms_best(capsys):
    serving_speed = load_benchmark("serving_speed")
    rounds = {
        "OpenVINO bf16": [dict(img_s=30.0, latency_ms=[40.0, 50.0]), dict(img_s=32.0, latency_ms=[42.0, 60.0])],
        "OpenVINO int8": [dict(img_s=50.0, latency_ms=[30.0, 31.0]), dict(img_s=52.0, latency_ms=[30.0, 90.0])],
        "ONNX Runtime float32": [dict(img_s=9.0, latency_ms=[120.0, 130.0]), dict(img_s=11.0, latency_ms=[125.0, 128.0])],
        "timm eager bf16": [dict(img_s=20.0, latency_ms=[45.0, 47.0]), dict(img_s=22.0, latency_ms=[46.0, 48.0])],
        "timm torch.compile bf16": [dict(img_s=24.0, latency_ms=[44.0, 45.0]), dict(img_s=26.0, latency_ms=[44.0, 46.0])],
        "timm eager float32": [dict(img_s=8.0, latency_ms=[130.0, 140.0]), dict(img_s=10.0, latency_ms=[135.0, 136.0])],
    }
    summary = serving_speed.summarize(rounds)
    assert summary["OpenVINO bf16"] == (31.0, 30.0, 32.0, 46.0, 60.0)  # median, min, max, p50, p99
    assert serving_speed.p99(list(range(1, 201))) == 198 and serving_speed.p99([5.0]) == 5.0
    serving_speed.print_table(summary, {"litert": "ModuleNotFoundError: ai_edge_litert"}, "HEADER", ServingArgs())
    out = capsys.readouterr().out
    assert "LiteRT float32                   not run: ModuleNotFoundError: ai_edge_litert" in out
    assert "batch 8, bf16: keras_vit's best (OpenVINO bf16) / timm's best (timm torch.compile bf16) = 1.24 (below" in out
    assert "batch 8, bf16, int8 allowed: keras_vit's best (OpenVINO int8) / timm's best (timm torch.compile bf16) = 2.04 (meets" in out
    assert "batch 8, float32: keras_vit's best (ONNX Runtime float32) / timm's best (timm eager float32) = 1.11 (meets" in out
    assert "batch 1 p50 latency: keras_vit's best (OpenVINO int8, 30.5 ms) / timm's best (timm torch.compile bf16, 44.5 ms) = 0.69 (meets" in out


def test_model_parallel_memory_table_checks_the_split_and_the_ideal(capsys):
    """benchmarks/model_parallel_memory.py's verdict, from made-up byte counts:
    split kernels at 1/N and a total within 10% of ideal meet the goal; a
    replicated part that pushes the total past 10% does not."""
    bench = load_benchmark("model_parallel_memory")
    gib = 1024**3

    def row(n, replicated):
        split_full = 8 * gib
        return dict(size=n, params_per_device=split_full / n + replicated, split_per_device=split_full / n,
                    split_full=split_full, replicated=replicated, optimizer_per_device=2 * (split_full / n + replicated),
                    params_total=split_full + replicated, optimizer_total=2 * (split_full + replicated),
                    measured_params_per_device=None)

    assert bench.print_memory_table([row(1, 0.01 * gib), row(8, 0.01 * gib)], "ViT_X", "a machine")
    out = capsys.readouterr().out
    assert "ViT_X: bytes per device" in out and "a machine" in out and ": met" in out
    assert "model:8            1.010      1.000         2.020          3.030      3.004        1.009         1.000" in out
    assert not bench.print_memory_table([row(8, 0.2 * gib)], "ViT_X", "a machine")
    assert "NOT met" in capsys.readouterr().out
    bench.print_step_table([dict(spec="data", median_ms=50.0, min_ms=40.0, compile_s=2.0),
                            dict(spec="model:4", median_ms=75.0, min_ms=70.0, compile_s=3.0)], "a machine")
    assert "model:4             75.0     70.0        3.0    1.50x" in capsys.readouterr().out


class SpeedArgs:
    batch = 8
    rounds = 3
    repeats = 1


def test_speed_reports_every_backend_beside_timm_with_the_issues_goals(capsys):
    speed = load_benchmark("speed")
    rounds = {
        "timm": {"predict/float32": [8.0, 8.5, 9.0], "predict/bf16": [20.0, 21.0, 30.0],
                 "train/float32": [2.5, 2.6, 2.7], "train/bf16": [6.0, 6.0, 6.0], "roofline/bf16": [900.0, 1000.0, 1100.0]},
        "torch": {"predict/float32": [8.0, 8.2, 8.4], "predict/bf16": [22.0, 23.1, 24.0],
                  "train/float32": [2.4, 2.5, 2.6], "train/bf16": [5.0, 5.4, 6.0]},
        "timm_tanh": {"predict/bf16": [15.0, 16.0, 17.0]},
        "tensorflow": {"predict/float32": [7.0, 7.5, 8.0], "predict/bf16": [13.0, 14.0, 15.0],
                       "train/float32": [2.4, 2.4, 2.4], "train/bf16": [4.0, 4.2, 4.4],
                       "roofline/float32": [300.0, 330.0, 340.0]},
    }
    speed.print_report(rounds, {"jax": "ModuleNotFoundError: jax"}, "HEADER", flops=35.0e9,
                       engines=["tensorflow", "jax", "torch", "timm", "timm_tanh"], args=SpeedArgs())
    out = capsys.readouterr().out
    assert out.startswith("HEADER\n")
    assert "keras_vit JAX          not run: ModuleNotFoundError: jax" in out
    assert "14.00 [13.00-15.00] (0.67x)" in out and "23.10 [22.00-24.00] (1.10x)" in out
    assert "roofline through TensorFlow, float32: 330 [300-340] GFLOP/s = 9.43 img/s" in out
    assert "roofline through torch, bf16: 1000 [900-1100] GFLOP/s = 28.57 img/s" in out
    assert "goal: keras_vit torch predict bf16 / timm = 1.10 (meets the goal >= 1.0)" in out
    assert "goal: keras_vit torch train bf16 / timm = 0.90 (below the goal >= 1.0)" in out
    assert "goal: keras_vit TensorFlow predict bf16 / timm = 0.67 (below the goal >= 0.7)" in out
    assert "goal: keras_vit TensorFlow train bf16 / timm = 0.70 (below the goal >= 0.8)" in out
    assert "goal: keras_vit TensorFlow predict float32 / timm = 0.88 (below the goal >= 0.95)" in out
    assert "16.00 [15.00-17.00] (0.76x)" in out  # timm with the tanh GELU, beside its default
    assert "same GELU: keras_vit torch predict bf16 / timm with tanh GELU = 1.44" in out
    assert "same GELU: keras_vit torch train bf16" not in out  # timm_tanh's training step was not timed


def test_speed_roofline_call_lasts_about_the_time_asked():
    import time

    speed = load_benchmark("speed")
    calls = []

    def matmul():
        calls.append(None)
        time.sleep(0.01)

    repeated, n = speed.lasting(matmul, seconds=0.1)
    assert 5 <= n <= 10
    calls.clear()
    repeated()
    assert len(calls) == n


def test_speed_timm_tanh_engine_is_timm_with_the_tanh_gelu():
    """The "same GELU" ratios are only fair if that engine really computes the tanh GELU."""
    import numpy as np
    import torch
    from timm.models.vision_transformer import VisionTransformer

    speed = load_benchmark("speed")
    images = np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)).astype("float32")
    outputs = {}
    for engine, act_layer in speed.TIMM_ACT_LAYERS.items():
        torch.manual_seed(0)
        outputs[engine] = speed.timm_contenders(speed.TINY, 32, images, np.zeros(2, "int64"), act_layer)[
            "predict", "float32"]()
    torch.manual_seed(0)  # the same weights, built here with the tanh GELU
    config = speed.TINY
    reference = VisionTransformer(img_size=32, patch_size=config["patch_size"], embed_dim=config["hidden_size"],
                                  depth=config["depth"], num_heads=config["num_heads"],
                                  mlp_ratio=config["mlp_dim"] / config["hidden_size"], num_classes=speed.CLASSES,
                                  act_layer="gelu_tanh").eval()
    with torch.inference_mode():
        expected = reference(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(outputs["timm_tanh"], expected, atol=1e-6)
    assert not np.allclose(outputs["timm"], expected, atol=1e-6)  # timm's own default is the exact GELU
