"""The shared model test harness: every architecture goes through the same checks.

An architecture is registered by one line in `ARCHITECTURES` (a name and a
function building a tiny model of that family); `tests/test_models.py`
parametrises every check over that table. The checks use `keras.ops` and
Keras APIs only, so they run unchanged under KERAS_BACKEND=jax.
"""

import os
import struct
import zlib

import keras
import numpy as np
import pytest

import keras_vit

TINY_VIT = dict(patch_size=8, hidden_size=32, depth=2, num_heads=4, mlp_dim=64)


def tiny_vit(input_shape=(32, 32, 3), **kwargs):
    config = dict(TINY_VIT, input_shape=input_shape, classes=5)
    config.update(kwargs)
    return keras_vit.ViT(**config)


# The root block and one bottleneck unit (32 root features): stride 4; with
# 2x2 patches 8 pixels per token, as the tiny ViT's patch 8.
TINY_RESNET = dict(block_sizes=(1,), width_factor=0.5)


def tiny_hybrid(input_shape=(32, 32, 3), **kwargs):
    """A tiny R+ViT: 2x2 patches of a small ResNet's feature map."""
    config = dict(patch_size=2, stem=keras_vit.hybrid.stem_builder(**TINY_RESNET))
    config.update(kwargs)
    return tiny_vit(input_shape, **config)


# name -> builder(input_shape=..., **kwargs) of a small model of that family.
# A new architecture gets every check below by adding one line here.
ARCHITECTURES = {
    "vit": tiny_vit,
    "hybrid": tiny_hybrid,
}


def images(batch=2, shape=(32, 32, 3), seed=0):
    return np.random.default_rng(seed).uniform(0, 255, (batch,) + tuple(shape)).astype("float32")


def randomize_head(model):
    """The official head is zero-initialised, which blocks gradients to the body
    on the first step; checks that need them give it random values. So is the
    last GroupNorm scale of a hybrid's ResNet units (blocking the units' convs)."""
    head = model.get_layer("predictions")
    rng = np.random.default_rng(1)
    head.kernel.assign(rng.normal(0, 0.5, head.kernel.shape).astype("float32"))
    for weight in model.weights:
        if weight.path.endswith("gn3/gamma"):
            weight.assign(rng.uniform(0.5, 1.5, weight.shape).astype("float32"))


# --- the checks -------------------------------------------------------------


def softmax(logits):
    logits = np.asarray(logits, np.float64)
    e = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def check_forward(build):
    # A random head: the official zero head outputs 1/classes whatever the body computes.
    model = build()
    randomize_head(model)
    x = images(3)
    out = model.predict(x, verbose=0)
    assert out.shape == (3, 5)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, rtol=1e-5)
    assert np.ptp(out, axis=0).max() > 1e-3, "every image gets the same output: the body ignores its input"
    # Each image is computed on its own: alone, or in another batch, it gets the same output.
    np.testing.assert_allclose(model.predict(x[1:2], verbose=0)[0], out[1], rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(model(x, training=False)), out, rtol=1e-4, atol=1e-6)


def check_fit_evaluate_predict(build):
    model = build()
    randomize_head(model)
    model.compile(optimizer=keras.optimizers.Adam(1e-3), loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    x = images(16, seed=3)
    y = np.arange(16) % 5
    history = model.fit(x, y, batch_size=8, epochs=4, verbose=0)
    losses = history.history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0]
    loss, accuracy = model.evaluate(x, y, verbose=0)
    predictions = model.predict(x, verbose=0)
    assert predictions.shape == (16, 5)
    # evaluate() reports what predict() gives: the loss and accuracy computed here from the predictions
    np.testing.assert_allclose(accuracy, np.mean(predictions.argmax(axis=1) == y), atol=1e-6)
    np.testing.assert_allclose(loss, -np.mean(np.log(predictions[np.arange(16), y])), rtol=1e-4)


def check_keras_file_round_trip(build, tmp_path):
    model = build()
    randomize_head(model)
    x = images()
    expected = model.predict(x, verbose=0)
    path = os.path.join(tmp_path, "model.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), expected)
    assert [w.path for w in restored.weights] == [w.path for w in model.weights]


def check_weights_file_round_trip(build, tmp_path):
    model = build()
    randomize_head(model)
    x = images()
    path = os.path.join(tmp_path, "model.weights.h5")
    model.save_weights(path)
    other = build()
    assert not np.allclose(other.predict(x, verbose=0), model.predict(x, verbose=0))
    other.load_weights(path)
    np.testing.assert_array_equal(other.predict(x, verbose=0), model.predict(x, verbose=0))


def check_mixed_precision(build, policy):
    keras.config.set_dtype_policy(policy)
    try:
        model = build()
        randomize_head(model)
        out = model(images(), training=False)
        assert all(w.dtype == "float32" for w in model.weights), "variables must stay float32"
        assert keras.backend.standardize_dtype(out.dtype) == "float32", "the head computes in float32"
        assert np.all(np.isfinite(keras.ops.convert_to_numpy(out)))
        features = keras_vit.feature_extractor(model, ["with_posemb", "encoded"])(images())
        compute = policy.split("_")[1]
        # class token and posemb are cast to the compute dtype, not float32
        assert keras.backend.standardize_dtype(features["with_posemb"].dtype) == compute
        assert keras.backend.standardize_dtype(features["encoded"].dtype) == compute
        if policy == "mixed_float16" and keras.backend.backend() == "jax":
            # The forward checks above ran; the training step cannot on this platform.
            pytest.skip("training step skipped: XLA:CPU has no float16 matmul with float32 accumulation "
                        "for the backward pass (JAX on CPU)")
        model.compile(optimizer="adam", loss="sparse_categorical_crossentropy")
        loss = model.train_on_batch(images(4, seed=5), np.arange(4) % 5)
        assert np.isfinite(loss)
    finally:
        keras.config.set_dtype_policy("float32")


def check_bfloat16_weights(build, tmp_path):
    """`dtype="bfloat16"` (inference): every layer computes in bf16 on bf16
    variables, but the float32 head; the caller's global policy is kept; the
    outputs are no further from float32's than mixed_bfloat16's (which rounds
    the same weights at each call); a `.keras` file keeps the bf16 weights."""
    reference = build()
    randomize_head(reference)
    weights = reference.get_weights()
    x = images(3)
    expected = reference.predict(x, verbose=0)
    model = build(dtype="bfloat16")
    assert keras.config.dtype_policy().name == "float32", "the global policy must stay the caller's"
    for built in (model, build(dtype="bfloat16", representation_size=8)):  # a pre_logits layer too
        head = {w.path for w in built.get_layer("predictions").weights}
        assert {w.dtype for w in built.weights if w.path in head} == {"float32"}
        assert {w.dtype for w in built.weights if w.path not in head} == {"bfloat16"}
    model.set_weights(weights)
    mixed = build(dtype="mixed_bfloat16")
    assert {w.dtype for w in mixed.weights} == {"float32"}
    mixed.set_weights(weights)
    out = model.predict(x, verbose=0)
    assert out.dtype == np.float32
    mixed_error = np.abs(mixed.predict(x, verbose=0) - expected).max()
    error = np.abs(out - expected).max()
    assert 0 < mixed_error and error <= 3 * mixed_error, (error, mixed_error)
    path = os.path.join(tmp_path, "bf16.keras")
    model.save(path)
    restored = keras.saving.load_model(path, safe_mode=True)
    assert sorted(w.dtype for w in restored.weights) == sorted(w.dtype for w in model.weights)
    np.testing.assert_array_equal(restored.predict(x, verbose=0), out)


def check_jit_compile(build):
    model = build()
    randomize_head(model)
    x = images(4)
    expected = model.predict(x, verbose=0)
    model.compile(optimizer="sgd", loss="sparse_categorical_crossentropy", jit_compile=True)
    np.testing.assert_allclose(model.predict(x, verbose=0), expected, atol=1e-5)
    assert np.isfinite(model.train_on_batch(x, np.arange(4) % 5))


def check_stateless_call(build):
    """`model.stateless_call` with other weights computes what the model
    computes once they are assigned: JAX training loops and keras.distribution
    call models this way, so every path of the model must read its weights
    through Keras (a read that bypasses the scope would use the stored ones)."""
    model = build()
    randomize_head(model)
    x = images(2)
    rng = np.random.default_rng(11)
    other = [keras.ops.convert_to_numpy(v) + rng.normal(0, 0.05, v.shape).astype("float32")
             for v in model.trainable_variables]
    before = model.predict(x, verbose=0)
    outputs, _ = model.stateless_call(other, [v.value for v in model.non_trainable_variables], x, training=False)
    for variable, value in zip(model.trainable_variables, other):
        variable.assign(value)
    after = model.predict(x, verbose=0)
    assert np.abs(after - before).max() > 1e-4, "the other weights must change the output"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(outputs), after, rtol=1e-4, atol=1e-6)


def check_non_square_input(build):
    model = build(input_shape=(32, 48, 3))
    out = model.predict(images(shape=(32, 48, 3)), verbose=0)
    assert out.shape == (2, 5)
    tokens = keras_vit.feature_extractor(model, ["encoded"]).predict(images(shape=(32, 48, 3)), verbose=0)
    assert tokens["encoded"].shape[1] == 1 + 4 * 6


def check_weights_at_another_size(build, tmp_path):
    """Weights saved at 32x32 load into a 48x64 model: posemb resized (official zoom)."""
    small = build()
    path = os.path.join(tmp_path, "small.weights.h5")
    small.save_weights(path)
    large = build(input_shape=(48, 64, 3))
    large.load_weights(path)
    source = keras.ops.convert_to_numpy(small.get_layer("position_embedding").embedding)
    layer = large.get_layer("position_embedding")
    rows, cols = small.get_layer("position_embedding").grid_size
    expected = keras_vit.layers.resize_position_embedding(source, (rows, cols), layer.grid_size)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(layer.embedding), expected, rtol=1e-6)
    # the class-token entry is kept apart, never interpolated
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer.embedding)[:, 0], source[:, 0])
    for name in ("class_token", "block_00", "predictions"):
        for a, b in zip(small.get_layer(name).weights, large.get_layer(name).weights):
            np.testing.assert_array_equal(keras.ops.convert_to_numpy(a), keras.ops.convert_to_numpy(b))
    assert np.all(np.isfinite(large.predict(images(shape=(48, 64, 3)), verbose=0)))


def check_gradients_reach_every_weight(build):
    """One plain SGD step changes every trainable weight iff its gradient is non-zero."""
    model = build()
    randomize_head(model)
    before = [keras.ops.convert_to_numpy(w).copy() for w in model.trainable_weights]
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss="sparse_categorical_crossentropy")
    model.train_on_batch(images(4), np.arange(4) % 5)
    frozen = [
        w.path
        for w, old in zip(model.trainable_weights, before)
        if np.array_equal(keras.ops.convert_to_numpy(w), old)
    ]
    assert not frozen, f"no gradient reached {frozen}"


def check_intermediate_outputs(build):
    model = build()
    randomize_head(model)
    x = images(3)
    features = keras_vit.feature_extractor(model).predict(x, verbose=0)
    depth = len([l for l in model.layers if isinstance(l, keras_vit.layers.TransformerBlock)])
    assert [f"block_{i:02d}" for i in range(depth)] == [k for k in features if k.startswith("block_")]
    assert features["encoded"].shape[1] == features["with_posemb"].shape[1]
    # "predictions" is what the model returns, "logits" the head before its softmax,
    # "pre_logits" the class token of "encoded" (no representation layer here).
    np.testing.assert_allclose(features["predictions"], model.predict(x, verbose=0), atol=1e-6)
    head = model.get_layer("predictions")
    kernel, bias = (keras.ops.convert_to_numpy(w) for w in (head.kernel, head.bias))
    np.testing.assert_allclose(features["pre_logits"], features["encoded"][:, 0], atol=1e-6)
    np.testing.assert_allclose(features["logits"], features["pre_logits"] @ kernel + bias, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(softmax(features["logits"]), features["predictions"], rtol=1e-4, atol=1e-6)
    assert np.ptp(features["logits"], axis=0).max() > 1e-3


def check_attention_maps(build):
    model = build()
    maps = keras_vit.attention_model(model).predict(images(), verbose=0)
    tokens = keras_vit.feature_extractor(model, ["encoded"]).predict(images(), verbose=0)["encoded"].shape[1]
    blocks = [l for l in model.layers if isinstance(l, keras_vit.layers.TransformerBlock)]
    assert len(maps) == len(blocks)
    for block, probs in zip(blocks, maps):
        assert probs.shape == (2, block.num_heads, tokens, tokens)
        np.testing.assert_allclose(probs.sum(axis=-1), 1.0, rtol=1e-5)
        assert np.all(probs >= 0)


def check_views_round_trip(build, tmp_path):
    """The views share the model's weights, and a saved view loads on its own
    (safe mode) with the same outputs."""
    model = build()
    x = images()
    views = {"features": keras_vit.feature_extractor(model), "attention": keras_vit.attention_model(model)}
    zero_head = views["features"].predict(x, verbose=0)["logits"]
    randomize_head(model)  # after the views were built: they follow the model's weights
    assert not np.allclose(views["features"].predict(x, verbose=0)["logits"], zero_head)
    for name, view in views.items():
        expected = keras.tree.flatten(view.predict(x, verbose=0))
        path = os.path.join(tmp_path, f"{name}.keras")
        view.save(path)
        restored = keras.tree.flatten(keras.saving.load_model(path, safe_mode=True).predict(x, verbose=0))
        assert len(restored) == len(expected)
        for got, want in zip(restored, expected):
            np.testing.assert_array_equal(got, want)


CHECKS = {
    "forward": check_forward,
    "fit_evaluate_predict": check_fit_evaluate_predict,
    "keras_file_round_trip": check_keras_file_round_trip,
    "weights_file_round_trip": check_weights_file_round_trip,
    "mixed_bfloat16": lambda build: check_mixed_precision(build, "mixed_bfloat16"),
    "mixed_float16": lambda build: check_mixed_precision(build, "mixed_float16"),
    "bfloat16_weights": check_bfloat16_weights,
    "jit_compile": check_jit_compile,
    "stateless_call": check_stateless_call,
    "non_square_input": check_non_square_input,
    "weights_at_another_size": check_weights_at_another_size,
    "gradients_reach_every_weight": check_gradients_reach_every_weight,
    "intermediate_outputs": check_intermediate_outputs,
    "attention_maps": check_attention_maps,
    "views_round_trip": check_views_round_trip,
}


# ---------------------------------------------------------------------------
# Network
# ---------------------------------------------------------------------------


def refuse_proxies(env):
    """Sends every HTTP(S) request through a proxy at the discard port, where
    nothing listens, so it fails at once even on a machine with network. `env`
    is pytest's monkeypatch (or one of its contexts), which undoes this."""
    for name in ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY"):
        env.setenv(name, "http://127.0.0.1:9")
    for name in ("no_proxy", "NO_PROXY"):
        env.delenv(name, raising=False)


# ---------------------------------------------------------------------------
# Image files
# ---------------------------------------------------------------------------


def png(width, height, samples=b"", bit_depth=8, colour_type=2):
    """A PNG file written by hand: any header, 16-bit samples (which Pillow cannot write in colour)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(samples))
            + chunk(b"IEND", b""))


def png16(values):
    """A 16-bit PNG of (height, width) grey or (height, width, 3) RGB values."""
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)  # filter byte 0 per row
    return png(values.shape[1], values.shape[0], rows, bit_depth=16, colour_type=0 if values.ndim == 2 else 2)


def stop_and_resume(make_trainer, train_data, folder, steps=7, stop_at=4, save_every=3):
    """`steps` steps of `keras_vit.training.train` in one go, and in two runs
    of fresh trainers (stopped after `stop_at`, as a killed process, then
    restored from the checkpoint) -> (uninterrupted, stopped, resumed, the
    resumed run's results)."""
    from keras_vit import training

    uninterrupted = make_trainer()
    training.train(uninterrupted, train_data, steps, os.path.join(folder, "uninterrupted"), save_every=save_every,
                   verbose=0)
    stopped = make_trainer()
    training.train(stopped, train_data, stop_at, os.path.join(folder, "resumed"), save_every=save_every, verbose=0)
    resumed = make_trainer()
    results = training.train(resumed, train_data, steps, os.path.join(folder, "resumed"), save_every=save_every,
                             verbose=0)
    return uninterrupted, stopped, resumed, results


# The end of a driver script that runs an example (`python DRIVER OUT.json
# SCRIPT FLAGS...`) after the lines before it patched keras_vit and made a
# dict `seen` of what they recorded: `seen` goes to OUT.json, whatever happens.
EXAMPLE_DRIVER_END = """
out, sys.argv = sys.argv[1], sys.argv[2:]
sys.path.insert(0, os.path.dirname(sys.argv[0]))  # as `python examples/X.py` would: `import common`
try:
    runpy.run_path(sys.argv[0], run_name="__main__")
finally:
    with open(out, "w") as f:
        json.dump(seen, f)
"""
