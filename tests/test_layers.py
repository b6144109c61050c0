"""Layer-level checks: serialization, the official interpolation, numerics."""

import warnings

import keras
import numpy as np
import pytest
import scipy.ndimage

from keras_vit import layers as vit_layers

pytestmark = pytest.mark.multibackend


@pytest.mark.parametrize(
    "layer",
    [
        vit_layers.PatchEncoder(8, 32),
        vit_layers.ClassToken(),
        vit_layers.PositionEmbedding((2, 3), 1, "bicubic"),
        vit_layers.DropPath(0.1, seed=3),
        vit_layers.TransformerBlock(4, 64, 0.1, 0.2, 0.3, gelu_approximate=False),
        vit_layers.TokenPooling("gap"),
    ],
    ids=lambda layer: type(layer).__name__,
)
def test_config_round_trip(layer):
    config = keras.saving.serialize_keras_object(layer)
    restored = keras.saving.deserialize_keras_object(config, safe_mode=True)
    assert type(restored) is type(layer)
    assert restored.get_config() == layer.get_config()


def test_zoom_interpolation_is_scipys():
    grid = np.random.default_rng(0).normal(size=(24, 24, 8)).astype("float32")
    ours = vit_layers.resample_position_embedding(grid, (14, 14))
    official = scipy.ndimage.zoom(grid, (14 / 24, 14 / 24, 1), order=1)
    np.testing.assert_array_equal(ours, official)


def test_non_square_resize_keeps_prefix():
    embedding = np.random.default_rng(1).normal(size=(1, 1 + 4 * 4, 6)).astype("float32")
    resized = vit_layers.resize_position_embedding(embedding, (4, 4), (3, 5))
    assert resized.shape == (1, 16, 6)
    np.testing.assert_array_equal(resized[:, 0], embedding[:, 0])
    grid = embedding[0, 1:].reshape(4, 4, 6)
    np.testing.assert_allclose(resized[0, 1:].reshape(3, 5, 6), scipy.ndimage.zoom(grid, (3 / 4, 5 / 4, 1), order=1), rtol=1e-6)


def test_bicubic_option_differs_but_keeps_size():
    grid = np.random.default_rng(2).normal(size=(4, 4, 3)).astype("float32")
    cubic = vit_layers.resample_position_embedding(grid, (6, 6), "bicubic")
    assert cubic.shape == (6, 6, 3)
    assert not np.allclose(cubic, vit_layers.resample_position_embedding(grid, (6, 6), "zoom"))
    with pytest.raises(ValueError, match="Unknown interpolation"):
        vit_layers.resample_position_embedding(grid, (6, 6), "nearest")


def test_transformer_block_matches_reference_numpy():
    """The block against a direct numpy transcription of the official Flax block."""
    block = vit_layers.TransformerBlock(num_heads=2, mlp_dim=12)
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    block.build(x.shape)
    rng = np.random.default_rng(4)
    for w in block.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    ours = keras.ops.convert_to_numpy(block(x))

    v = {w.path.split("/", 1)[1]: keras.ops.convert_to_numpy(w) for w in block.weights}

    def layer_norm(t, name):
        mean = t.mean(-1, keepdims=True)
        var = t.var(-1, keepdims=True)
        return (t - mean) / np.sqrt(var + 1e-6) * v[f"{name}/gamma"] + v[f"{name}/beta"]

    def gelu_tanh(t):
        return 0.5 * t * (1 + np.tanh(np.sqrt(2 / np.pi) * (t + 0.044715 * t**3)))

    h = layer_norm(x, "norm1")
    q, k, val = (np.einsum("btd,dhk->bthk", h, v[f"attention/{n}/kernel"]) + v[f"attention/{n}/bias"] for n in ("query", "key", "value"))
    logits = np.einsum("bqhk,bshk->bhqs", q / np.sqrt(q.shape[-1]), k)
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    probs /= probs.sum(-1, keepdims=True)
    attended = np.einsum("bhqs,bshk->bqhk", probs, val)
    out = np.einsum("bqhk,hkd->bqd", attended, v["attention/attention_output/kernel"]) + v["attention/attention_output/bias"]
    x1 = x + out
    y = layer_norm(x1, "norm2") @ v["mlp_in/kernel"] + v["mlp_in/bias"]
    y = gelu_tanh(y) @ v["mlp_out/kernel"] + v["mlp_out/bias"]
    np.testing.assert_allclose(ours, x1 + y, atol=1e-4)

    _, scores = block(x, return_attention_scores=True)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores), probs, atol=1e-5)


def _random_block(seed=4, **kwargs):
    block = vit_layers.TransformerBlock(num_heads=2, mlp_dim=12, **kwargs)
    block.build((None, 5, 8))
    rng = np.random.default_rng(seed)
    for w in block.weights:
        w.assign(rng.normal(0, 0.3, w.shape).astype("float32"))
    return block


def test_the_fast_path_and_multi_head_attentions_own_call_agree():
    """Attention maps go through MultiHeadAttention; every other call through the fast path."""
    block = _random_block()
    x = np.random.default_rng(3).normal(size=(3, 5, 8)).astype("float32")
    fast = keras.ops.convert_to_numpy(block(x))
    through_keras_attention, _ = block(x, return_attention_scores=True)
    np.testing.assert_allclose(fast, keras.ops.convert_to_numpy(through_keras_attention), atol=1e-5)


def _weight_gradients(block, x, **call_kwargs):
    """d sum(output**2) / d each trainable weight of `block`, on the backend in use."""
    backend = keras.backend.backend()

    def output(y):
        return y[0] if isinstance(y, tuple) else y

    if backend == "tensorflow":
        import tensorflow as tf

        with tf.GradientTape() as tape:
            loss = tf.reduce_sum(output(block(x, **call_kwargs)) ** 2)
        grads = tape.gradient(loss, block.trainable_variables)
    elif backend == "jax":
        import jax

        def loss(trainable):
            y, _ = block.stateless_call(trainable, [], x, **call_kwargs)
            return (output(y) ** 2).sum()

        grads = jax.grad(loss)([v.value for v in block.trainable_variables])
    else:
        for v in block.trainable_variables:
            v.value.grad = None
        (output(block(x, **call_kwargs)) ** 2).sum().backward()
        grads = [v.value.grad for v in block.trainable_variables]
    return [keras.ops.convert_to_numpy(g) for g in grads]


def test_the_fast_path_trains_the_same_weights_as_multi_head_attentions_own_call():
    block = _random_block()
    x = np.random.default_rng(7).normal(size=(3, 5, 8)).astype("float32")
    fast = _weight_gradients(block, x)
    through_keras_attention = _weight_gradients(block, x, return_attention_scores=True)
    assert len(fast) == len(block.trainable_variables) == 16
    for variable, got, want in zip(block.trainable_variables, fast, through_keras_attention):
        assert np.abs(want).max() > 0, variable.path
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4, err_msg=variable.path)


def test_drop_path_in_the_fast_path_drops_whole_images():
    block = _random_block(drop_path_rate=0.7)
    x = np.random.default_rng(5).normal(size=(32, 5, 8)).astype("float32")
    kept = keras.ops.convert_to_numpy(block(x))  # inference: both branches kept
    out = keras.ops.convert_to_numpy(block(x, training=True))
    both_dropped = np.all(out == x, axis=(1, 2))
    # Each image keeps or drops each branch as a whole: an image is either
    # exactly its input (both dropped) or differs from it in every token.
    assert 0 < both_dropped.sum() < 32
    assert np.all(np.any(out[~both_dropped] != x[~both_dropped], axis=2))
    assert not np.allclose(out[~both_dropped], kept[~both_dropped])  # the kept branches are rescaled


def test_a_quantized_block_computes_with_its_int8_kernels_and_scales():
    block = _random_block()
    x = np.random.default_rng(6).normal(size=(2, 5, 8)).astype("float32")
    float_output = keras.ops.convert_to_numpy(block(x))
    inputs = keras.Input((5, 8))
    model = keras.Model(inputs, block(inputs))
    with warnings.catch_warnings():  # "InputLayer does not have a `quantize` method": expected
        warnings.simplefilter("ignore")
        model.quantize("int8")
    assert "int8" in str(block.attention.query_dense._kernel.dtype)
    int8_output = keras.ops.convert_to_numpy(block(x))
    assert not np.array_equal(int8_output, float_output)  # it did compute in int8
    np.testing.assert_allclose(int8_output, float_output, atol=0.1 * np.abs(float_output).max())


def test_mha_kernels_have_official_shapes():
    block = vit_layers.TransformerBlock(num_heads=4, mlp_dim=64)
    block.build((None, 17, 32))
    shapes = {w.path.split("/", 1)[1]: tuple(w.shape) for w in block.weights}
    assert shapes["attention/query/kernel"] == (32, 4, 8)
    assert shapes["attention/query/bias"] == (4, 8)
    assert shapes["attention/attention_output/kernel"] == (4, 8, 32)
    assert shapes["attention/attention_output/bias"] == (32,)


def test_drop_path_drops_whole_samples_only_in_training():
    layer = vit_layers.DropPath(0.5, seed=1)
    x = np.ones((64, 3, 4), "float32")
    np.testing.assert_array_equal(keras.ops.convert_to_numpy(layer(x, training=False)), x)
    out = keras.ops.convert_to_numpy(layer(x, training=True))
    per_sample = out.reshape(64, -1)
    assert set(np.unique(per_sample)) <= {0.0, 2.0}
    assert np.all(per_sample.min(1) == per_sample.max(1))
    assert 0 < (per_sample[:, 0] == 0).sum() < 64


def test_position_embedding_rejects_wrong_token_count():
    layer = vit_layers.PositionEmbedding((2, 2))
    with pytest.raises(ValueError, match="expected 5"):
        layer.build((None, 7, 8))
