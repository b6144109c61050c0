"""Layer-level checks: serialization, the official interpolation, numerics."""

import re
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


def test_the_block_normalizes_with_epsilon_1e6_even_for_near_constant_tokens():
    """Tokens whose variance (1e-6) is of the order of the epsilon: a wrong epsilon shows."""
    block = _random_block()
    x = 5.0 + 1e-3 * np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    v = {w.path.split("/", 1)[1]: keras.ops.convert_to_numpy(w) for w in block.weights}
    normalized = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    expected = normalized * v["norm1/gamma"] + v["norm1/beta"]
    query = np.einsum("btd,dhk->bthk", expected, v["attention/query/kernel"]) + v["attention/query/bias"]
    _, scores = block(x, return_attention_scores=True)  # both paths: through MultiHeadAttention, and fast
    logits = np.einsum("bqhk,bshk->bhqs", query / np.sqrt(query.shape[-1]),
                       np.einsum("btd,dhk->bthk", expected, v["attention/key/kernel"]) + v["attention/key/bias"])
    probs = np.exp(logits - logits.max(-1, keepdims=True))
    np.testing.assert_allclose(keras.ops.convert_to_numpy(scores), probs / probs.sum(-1, keepdims=True), atol=1e-4)
    np.testing.assert_allclose(keras.ops.convert_to_numpy(block(x)), keras.ops.convert_to_numpy(block(x, return_attention_scores=True)[0]), atol=1e-4)


def test_under_mixed_bfloat16_the_block_computes_and_returns_bfloat16():
    float_block = _random_block()
    x = np.random.default_rng(3).normal(size=(2, 5, 8)).astype("float32")
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        block = _random_block()
    finally:
        keras.config.set_dtype_policy("float32")
    out = block(x)
    assert keras.backend.standardize_dtype(out.dtype) == "bfloat16"
    np.testing.assert_allclose(keras.ops.convert_to_numpy(keras.ops.cast(out, "float32")),
                               keras.ops.convert_to_numpy(float_block(x)), atol=0.05 * np.abs(x).max() + 0.1)


def _random_block(seed=4, width=8, mlp_dim=12, **kwargs):
    block = vit_layers.TransformerBlock(num_heads=2, mlp_dim=mlp_dim, **kwargs)
    block.build((None, 5, width))
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


@pytest.mark.parametrize("tokens", [7, 13], ids=["fewer_tokens_than_width", "more_tokens_than_width"])
def test_under_mixed_bfloat16_the_fast_path_is_as_accurate_as_multi_head_attentions_own_call(tokens, monkeypatch):
    """bf16 (on PyTorch's CPU its own branch: explicit attention, softmax on
    bf16 logits): outputs and weight gradients no further from the float32
    block than MultiHeadAttention's own bf16 call is. 16-wide heads and
    logits of a few units, so that a lost 1/sqrt(head) scale, a softmax over
    the wrong axis or a key not transposed shows. On PyTorch in inference the
    biases are added (3 x 7 tokens, fewer than the width 32) or ride in the
    matmuls as a kernel row (3 x 13 tokens): both are checked."""
    x = np.random.default_rng(6).normal(size=(3, tokens, 32)).astype("float32")
    float_block = _random_block(seed=5, width=32, mlp_dim=48)
    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        bf16_block = _random_block(seed=5, width=32, mlp_dim=48)
    finally:
        keras.config.set_dtype_policy("float32")
    explicit_calls, bias_rows = [], []
    if keras.backend.backend() == "torch":  # the branches this test is for run
        explicit = bf16_block._explicit_attention
        bf16_block._explicit_attention = lambda *args: explicit_calls.append(1) or explicit(*args)
        projections = vit_layers._torch_projections
        monkeypatch.setattr(vit_layers, "_torch_projections",
                            lambda x, pairs, bias_row: bias_rows.append(bias_row) or projections(x, pairs, bias_row))

    def as_float(y):
        return keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))

    def distance(got, want):
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    want = as_float(float_block(x))
    del bias_rows[:]
    out = bf16_block(x)
    if keras.backend.backend() == "torch":
        assert explicit_calls == ([1] if out.device.type == "cpu" else [])
        assert bias_rows == [3 * tokens > 32] * 2  # the attention's projections, then the MLP's first
    fast = distance(as_float(out), want)
    through_keras_attention = distance(as_float(bf16_block(x, return_attention_scores=True)[0]), want)
    assert 0 < fast <= 2 * through_keras_attention + 1e-3, (fast, through_keras_attention)

    want = _weight_gradients(float_block, x)
    through_keras_attention = _weight_gradients(bf16_block, x, return_attention_scores=True)
    for training in (False, True):  # in training TensorFlow's GELU runs in float32
        del bias_rows[:]
        fast = _weight_gradients(bf16_block, x, training=training)
        if keras.backend.backend() == "torch":  # in training the row's gradient costs more: always the add
            assert bias_rows == [not training and 3 * tokens > 32] * 2, training
        for variable, w, f, k in zip(bf16_block.trainable_variables, want, fast, through_keras_attention):
            assert distance(f, w) <= 2 * distance(k, w) + 1e-3, (training, variable.path, distance(f, w), distance(k, w))


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="oneDNN's fused linear kernel is the PyTorch path's")
@pytest.mark.parametrize("policy", ["float32", "mixed_bfloat16", "mixed_float16"])
@pytest.mark.parametrize("approximate", [True, False], ids=["tanh_gelu", "exact_gelu"])
def test_without_gradients_torch_projects_through_onednn_and_computes_the_same(policy, approximate, monkeypatch):
    """PyTorch without gradients (predict, evaluate, `torch.no_grad()`), on a
    CPU: each of the block's six projections is one call of oneDNN's fused
    linear kernel, the MLP's first with the block's own GELU fused in. The
    output is what the block computes with gradients on (through keras.ops):
    the same within float32 rounding, and in bf16 no further from the float32
    block. float16 (which oneDNN refuses on most CPUs), and bf16 on a CPU
    without oneDNN's bf16, stay on keras.ops, with the same output."""
    import torch

    float_block = _random_block(seed=5, width=32, mlp_dim=48, gelu_approximate=approximate)
    keras.config.set_dtype_policy(policy)
    try:
        block = _random_block(seed=5, width=32, mlp_dim=48, gelu_approximate=approximate)
    finally:
        keras.config.set_dtype_policy("float32")
    gelus = []
    fused = vit_layers._onednn_linear
    monkeypatch.setattr(vit_layers, "_onednn_linear",
                        lambda x, kernel, bias, gelu=None: gelus.append(gelu) or fused(x, kernel, bias, gelu))
    x = np.random.default_rng(6).normal(size=(3, 13, 32)).astype("float32")

    def as_float(y):
        return keras.ops.convert_to_numpy(keras.ops.cast(y, "float32"))

    def distance(got, want):
        return np.linalg.norm(got - want) / np.linalg.norm(want)

    want = as_float(float_block(x))
    with_gradients = as_float(block(x))
    assert gelus == []
    with torch.no_grad():
        out = block(x)
    if out.device.type != "cpu" or block.compute_dtype not in vit_layers._onednn_linear_dtypes():
        assert policy != "float32" or out.device.type != "cpu"  # float32 always goes through oneDNN on a CPU
        assert gelus == []
        np.testing.assert_array_equal(as_float(out), with_gradients)
        return
    # query, key, value, the attention's output, the MLP's first (GELU), its second
    assert gelus == [None] * 4 + ["tanh" if approximate else "none", None]
    assert keras.backend.standardize_dtype(out.dtype) == block.compute_dtype
    if policy == "float32":
        assert distance(as_float(out), with_gradients) <= 1e-6
    else:
        assert 0 < distance(as_float(out), want) <= 2 * distance(with_gradients, want) + 1e-3


@pytest.mark.skipif(keras.backend.backend() != "torch", reason="oneDNN's fused linear kernel is the PyTorch path's")
def test_torch_predict_goes_through_onednn_and_gives_the_models_own_output(monkeypatch):
    """Keras's `predict_on_batch` on torch runs without gradients: every block
    projects through oneDNN, and the probabilities are the model's own (a call
    with gradients on, through keras.ops). With mkldnn switched off in torch,
    keras.ops again."""
    import torch

    import keras_vit

    model = keras_vit.ViT(patch_size=4, hidden_size=32, depth=2, num_heads=2, mlp_dim=64,
                          input_shape=(16, 16, 3), classes=5)
    images = np.random.default_rng(8).uniform(0, 255, (4, 16, 16, 3)).astype("float32")
    calls = []
    fused = vit_layers._onednn_linear
    monkeypatch.setattr(vit_layers, "_onednn_linear", lambda *args: calls.append(1) or fused(*args))
    with torch.enable_grad():
        want = keras.ops.convert_to_numpy(model(images))
    assert calls == []
    got = model.predict_on_batch(images)
    on_cpu = keras.ops.convert_to_tensor(images).device.type == "cpu"
    assert len(calls) == (6 * 2 if on_cpu else 0)
    np.testing.assert_allclose(got, want, atol=1e-6)
    del calls[:]
    monkeypatch.setattr(torch.backends.mkldnn, "enabled", False)
    np.testing.assert_allclose(model.predict_on_batch(images), want, atol=1e-6)
    assert calls == []


def _on_jax_cpu():
    if keras.backend.backend() != "jax":
        return False
    import jax

    return jax.default_backend() == "cpu"


@pytest.mark.skipif(not _on_jax_cpu(), reason="the float32-returning dots are the path of JAX on a CPU")
@pytest.mark.parametrize("policy", ["mixed_bfloat16", "bfloat16"])
def test_on_jax_cpu_in_bfloat16_every_dot_of_the_block_returns_float32(policy):
    """XLA's CPU backend computes a bf16 dot that returns float32 on a path
    about twice as fast as one that returns bf16: each of the block's six
    dots (query/key/value, the attention's two, its output, the MLP's two)
    takes bf16 operands and returns float32 (in the compiled program's
    text), and the block still returns bf16. In float32 nothing changes.
    (The accuracy test above holds these dots' outputs and gradients to
    MultiHeadAttention's own bf16 call.)"""
    import jax

    keras.config.set_dtype_policy(policy)
    try:
        block = _random_block(seed=5, width=32, mlp_dim=48)
    finally:
        keras.config.set_dtype_policy("float32")
    x = np.random.default_rng(6).normal(size=(3, 13, 32)).astype("float32")

    def dots(function, *args):
        text = jax.jit(function).lower(*args).as_text()
        lines = [line for line in text.splitlines() if "stablehlo.dot_general" in line]
        return [re.findall(r"tensor<[^>]*?x?([a-z]+[0-9]+)>", line.split(" : ")[-1]) for line in lines]

    forward = dots(lambda x: block(x), x)
    assert forward == [["bf16", "bf16", "f32"]] * 6, forward
    assert keras.backend.standardize_dtype(block(x).dtype) == "bfloat16"

    float_block = _random_block(seed=5, width=32, mlp_dim=48)
    assert [types[-1] for types in dots(lambda x: float_block(x), x)] == ["f32"] * 6
    assert not vit_layers._xla_cpu_bfloat16(keras.ops.ones((2, 2), "float32"))


@pytest.mark.skipif(not _on_jax_cpu(), reason="the float32-returning dots are the path of JAX on a CPU")
@pytest.mark.parametrize("kernel_shape", [(32, 48), (32, 3, 32)], ids=["a_projection", "query_key_value"])
def test_on_jax_cpu_a_bfloat16_projection_adds_its_bias_in_float32_and_rounds_once(kernel_shape):
    """Rounding the dot to bf16 and then adding the bias rounds twice: a
    third of the outputs one bf16 step off, 40% more error."""
    import jax.numpy as jnp

    rng = np.random.default_rng(7)
    x, kernel, bias = (jnp.asarray(rng.normal(size=shape), jnp.bfloat16)
                       for shape in ((64, 32), kernel_shape, kernel_shape[1:]))  # fmt: skip
    got = vit_layers._xla_cpu_projection(x, kernel, bias)
    dot = jnp.tensordot(x, kernel, axes=1, preferred_element_type=jnp.float32)
    assert got.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(got, np.float32),
                                  np.asarray((dot + bias.astype(jnp.float32)).astype(jnp.bfloat16), np.float32))


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


# --- dropout in training: the block against Keras's MultiHeadAttention -------


def _keras_block_in_training(block, x):
    """The official Flax block in training mode, composed here from Keras's
    own layers, the block's weights and its Dropout: MultiHeadAttention
    called as Keras calls it (its attention dropout on the probabilities),
        x = x + Dropout(Attention(LN(x)))
        x = x + Dropout(Dense(Dropout(GELU(Dense(LN(x))))))
    drawing the masks in that order."""
    x = keras.ops.convert_to_tensor(x)
    h = block.norm1(x)
    x = x + block.dropout(block.attention(h, h, training=True), training=True)
    y = keras.activations.gelu(block.mlp_in(block.norm2(x)), approximate=True)
    y = block.mlp_out(block.dropout(y, training=True))
    return x + block.dropout(y, training=True)


def _replayable(block):
    """A function that puts back every random state `block` draws its dropout
    masks from: its layers' seed generators, and the global seed (on PyTorch
    an unseeded Keras Dropout draws from torch's global generator)."""
    generators = [g for layer in block._flatten_layers() for g in getattr(layer, "_seed_generators", ())]
    states = [keras.ops.convert_to_numpy(g.state).copy() for g in generators]

    def replay():
        for generator, state in zip(generators, states):
            generator.state.assign(state)
        keras.utils.set_random_seed(1)

    return replay


@pytest.mark.parametrize(
    "dropout_rate, attention_dropout_rate", [(0.3, 0.0), (0.0, 0.3), (0.3, 0.2)], ids=["hidden", "attention", "both"]
)
def test_dropout_in_training_draws_the_masks_of_keras_multi_head_attention(dropout_rate, attention_dropout_rate):
    """With the same random state, a training call gives what Keras's own
    layers give: hidden dropout at the same three places, attention dropout
    on the probabilities (the masks of a dropout left out or moved would
    land on other units). The fast path can match to round-off because a
    Dropout's mask depends only on the number and order of its units, and
    its (batch * tokens, width) rows are the same units in the same order
    (true on all three backends)."""
    block = _random_block(dropout_rate=dropout_rate, attention_dropout_rate=attention_dropout_rate)
    x = np.random.default_rng(8).normal(size=(3, 5, 8)).astype("float32")
    replay = _replayable(block)
    replay()
    ours = keras.ops.convert_to_numpy(block(x, training=True))
    replay()
    keras_layers = keras.ops.convert_to_numpy(_keras_block_in_training(block, x))
    np.testing.assert_allclose(ours, keras_layers, atol=1e-5)
    assert np.abs(ours - keras.ops.convert_to_numpy(block(x))).max() > 0.1  # the rates did drop units


@pytest.mark.parametrize("gelu_approximate", [True, False])  # training has its own GELU call on TensorFlow
def test_training_without_dropout_equals_inference(gelu_approximate):
    block = _random_block(gelu_approximate=gelu_approximate)
    x = np.random.default_rng(9).normal(size=(3, 5, 8)).astype("float32")
    training, inference = (keras.ops.convert_to_numpy(block(x, training=flag)) for flag in (True, False))
    np.testing.assert_array_equal(training, inference)


def _probe_block(num_heads=2, **kwargs):
    """A block with zero weights and unit LayerNorms: each check sets the
    few weights that route one dropout's mask to the block's output."""
    block = vit_layers.TransformerBlock(num_heads=num_heads, mlp_dim=12, **kwargs)
    block.build((None, 5, 8))
    for w in block.weights:
        w.assign(np.ones(w.shape, "float32") if w.path.endswith("gamma") else np.zeros(w.shape, "float32"))
    return block


def _assert_binomial(dropped, rate):
    """The count of dropped units is Binomial(n, rate): within 5 standard deviations."""
    n = dropped.size
    assert abs(dropped.sum() - n * rate) < 5 * np.sqrt(n * rate * (1 - rate)), (dropped.mean(), rate)


RATE = 0.4


@pytest.mark.parametrize("where", ["attention_output", "mlp_output", "mlp_hidden"])
def test_hidden_dropout_drops_its_rate_and_scales_the_rest(where):
    """Each of the three hidden dropouts alone reaches the output: its units
    are dropped at the rate (binomial bounds) and the others scaled by 1/(1 - rate)."""
    block = _probe_block(dropout_rate=RATE)
    x = np.random.default_rng(10).normal(size=(32, 5, 8)).astype("float32")
    keep = 1 - RATE
    if where == "attention_output":  # Dropout(attention): a branch of ones
        block.attention.output_dense.bias.assign(np.ones(8, "float32"))
        survivors, drop_rate = 1 / keep, RATE
    elif where == "mlp_output":  # the MLP's last Dropout: a branch of ones
        block.mlp_out.bias.assign(np.ones(8, "float32"))
        survivors, drop_rate = 1 / keep, RATE
    else:  # the Dropout between the MLP's Dense layers: hidden unit j -> output j, then the last Dropout
        block.mlp_in.bias.assign(np.ones(12, "float32"))
        block.mlp_out.kernel.assign(np.eye(12, 8, dtype="float32"))
        gelu_one = 0.5 * (1 + np.tanh(np.sqrt(2 / np.pi) * (1 + 0.044715)))  # tanh GELU of 1
        survivors, drop_rate = gelu_one / keep**2, 1 - keep**2
    branch = keras.ops.convert_to_numpy(block(x, training=True)) - x
    dropped = np.abs(branch) < 1e-6
    np.testing.assert_allclose(branch[~dropped], survivors, rtol=1e-5)
    _assert_binomial(dropped, drop_rate)


def test_attention_dropout_drops_attention_probabilities_at_its_rate():
    """Attention dropout acts on the attention probabilities: with uniform
    attention over 5 tokens whose values are independent vectors, the output
    of each query token is sum_s c_s value_s, and every c_s is either 0
    (dropped, at the rate) or 1 / (5 (1 - rate))."""
    block = _probe_block(num_heads=1, attention_dropout_rate=RATE)
    eye = np.eye(8, dtype="float32")
    block.attention.value_dense.kernel.assign(eye[:, None, :])
    block.attention.output_dense.kernel.assign(eye[None])
    x = np.tile(np.eye(5, 8, dtype="float32"), (32, 1, 1))  # token t: the unit vector e_t
    values = (np.eye(5, 8) - 1 / 8) / np.sqrt(7 / 64)  # LayerNorm(e_t), independent rows
    attended = keras.ops.convert_to_numpy(block(x, training=True)) - x
    coefficients = attended @ np.linalg.pinv(values)  # (batch, query, source)
    np.testing.assert_allclose(attended, coefficients @ values, atol=1e-5)  # a mix of the values
    dropped = np.abs(coefficients) < 1e-4
    np.testing.assert_allclose(coefficients[~dropped], 1 / (5 * (1 - RATE)), rtol=1e-4)
    _assert_binomial(dropped, RATE)
    inference = keras.ops.convert_to_numpy(block(x)) - x
    np.testing.assert_allclose(inference @ np.linalg.pinv(values), 0.2, atol=1e-5)  # uniform attention


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


def test_a_block_with_only_its_mlp_quantized_applies_the_int8_scales():
    """The fast path reads the MLP's kernels itself: a quantized Dense must send the block through the layers."""
    block = _random_block()
    x = np.random.default_rng(6).normal(size=(2, 5, 8)).astype("float32")
    float_output = keras.ops.convert_to_numpy(block(x))
    block.mlp_in.quantize("int8")
    block.mlp_out.quantize("int8")
    assert block.attention.query_dense.quantization_mode is None
    int8_output = keras.ops.convert_to_numpy(block(x))
    assert not np.array_equal(int8_output, float_output)
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


def test_image_size_is_checked_against_each_side_of_a_rectangular_token():
    """Rows against the token's height, columns against its width."""
    assert vit_layers.check_image_size(32, 24, (16, 8)) == (2, 3)
    assert vit_layers.check_image_size(24, 32, (8, 16)) == (3, 2)
    for height, width, token in ((32, 20, (16, 8)), (20, 32, (8, 16)), (8, 24, (16, 8))):
        with pytest.raises(ValueError, match=f"Input size {height}x{width} does not cut into whole patches"):
            vit_layers.check_image_size(height, width, token)
    with pytest.raises(ValueError, match="Input size 32x20"):
        vit_layers.ImageSizeCheck((16, 8))(np.zeros((1, 32, 20, 3), "float32"))
