"""keras_vit.visualize: the numbers behind Figures 6 and 7, checked against
hand-built attention patterns with known answers."""

import sys

import keras
import numpy as np
import pytest
from PIL import Image

import harness
import keras_vit
from keras_vit import visualize

# numpy on top of keras_vit.attention_model: the same numbers on every backend
pytestmark = pytest.mark.multibackend


def _row_stochastic(rng, shape):
    weights = rng.uniform(0, 1, shape)
    return weights / weights.sum(axis=-1, keepdims=True)


# --- attention rollout (Figure 6) -----------------------------------------------------


def test_rollout_rows_sum_to_one():
    rng = np.random.default_rng(0)
    attentions = [_row_stochastic(rng, (2, 3, 7, 7)) for _ in range(4)]
    rollout = visualize.attention_rollout(attentions)
    assert rollout.shape == (2, 7, 7)
    np.testing.assert_allclose(rollout.sum(axis=-1), 1.0, atol=1e-12)
    assert (rollout >= 0).all()


def test_rollout_of_self_attention_is_identity_and_mixing_is_multiplied():
    tokens = 5
    identity = np.broadcast_to(np.eye(tokens), (1, 2, tokens, tokens))
    np.testing.assert_allclose(visualize.attention_rollout([identity, identity])[0], np.eye(tokens))
    # Every token attends only to token 0: 0.5 A + 0.5 I, then two blocks multiplied.
    to_first = np.zeros((1, 1, tokens, tokens))
    to_first[..., 0] = 1
    one_block = 0.5 * to_first[0, 0] + 0.5 * np.eye(tokens)
    np.testing.assert_allclose(visualize.attention_rollout([to_first, to_first])[0], one_block @ one_block)


# --- the model's attention and its rollout, recomputed in numpy from the weights ---------------


def _randomize(model, seed=2):
    """Random weights everywhere (LayerNorm scales and offsets, biases, class
    token, head included), large enough that attention is far from uniform."""
    rng = np.random.default_rng(seed)
    for weight in model.weights:
        value = keras.ops.convert_to_numpy(weight)
        weight.assign((value + rng.normal(0, 0.3, value.shape)).astype(value.dtype))
    harness.randomize_head(model)


def _layer_norm(x, gamma, beta, epsilon=1e-6):  # the official Flax LayerNorm
    mean = x.mean(axis=-1, keepdims=True)
    variance = ((x - mean) ** 2).mean(axis=-1, keepdims=True)
    return (x - mean) / np.sqrt(variance + epsilon) * gamma + beta


def _numpy_attention(model, images):
    """Each block's attention probabilities, (batch, heads, tokens, tokens),
    recomputed from the block's input tokens (feature_extractor: the position-
    embedded tokens, then each block's output) and its own norm1, query and key
    weights: softmax over keys of q . k / sqrt(head width), per head."""
    features = {key: keras.ops.convert_to_numpy(value) for key, value in keras_vit.feature_extractor(model)(images).items()}
    names = sorted(key for key in features if key.startswith("block_"))
    block_inputs = [features["with_posemb"]] + [features[name] for name in names[:-1]]
    weights = {w.path: keras.ops.convert_to_numpy(w).astype(np.float64) for w in model.weights}
    attentions = []
    for name, tokens in zip(names, block_inputs):
        x = _layer_norm(tokens.astype(np.float64), weights[f"{name}/norm1/gamma"], weights[f"{name}/norm1/beta"])
        # kernels (width, heads, head width), biases (heads, head width)
        q = np.einsum("btw,whd->bthd", x, weights[f"{name}/attention/query/kernel"]) + weights[f"{name}/attention/query/bias"]
        k = np.einsum("btw,whd->bthd", x, weights[f"{name}/attention/key/kernel"]) + weights[f"{name}/attention/key/bias"]
        scores = np.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(q.shape[-1])
        scores = np.exp(scores - scores.max(axis=-1, keepdims=True))
        attentions.append(scores / scores.sum(axis=-1, keepdims=True))
    return attentions


def _numpy_rollout_maps(attentions, grid_size):
    """Abnar & Zuidema (2020), image by image: per block the head mean, mixed
    half and half with the identity (the residual) and rows renormalised; the
    blocks multiplied, last block leftmost (token flow from input to output);
    the class token's row over the patches, as a (rows, cols) grid, max 1."""
    maps = []
    for image in range(len(attentions[0])):
        mixed = []
        for attention in attentions:
            mean = attention[image].mean(axis=0)
            residual = 0.5 * mean + 0.5 * np.eye(len(mean))
            mixed.append(residual / residual.sum(axis=1, keepdims=True))
        flow = np.linalg.multi_dot(mixed[::-1]) if len(mixed) > 1 else mixed[0]
        grid = flow[0, 1:].reshape(grid_size)
        maps.append(grid / grid.max())
    return np.stack(maps)


@pytest.mark.parametrize(
    "architecture, shape, depth",
    [("vit", (32, 32, 3), 3), ("vit", (32, 48, 3), 3), ("hybrid", (32, 48, 3), 3), ("vit", (32, 32, 3), 1)],
    ids=["vit-square", "vit-non_square", "hybrid-non_square", "vit-one_block"],  # one block: one output, no list
)
def test_attention_and_rollout_maps_equal_a_numpy_recomputation(architecture, shape, depth):
    model = harness.ARCHITECTURES[architecture](input_shape=shape, depth=depth)
    _randomize(model)
    images = harness.images(3, shape=shape)
    expected = _numpy_attention(model, images)

    # attention_model: the model's own attention probabilities
    # One block: Keras returns the one output as it is, not in a list.
    attentions = [keras.ops.convert_to_numpy(a) for a in keras.tree.flatten(keras_vit.attention_model(model)(images))]
    assert len(attentions) == len(expected) == depth
    for got, want in zip(attentions, expected):
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert max(a.max() for a in expected) > 0.5, "attention is near uniform: the comparison would see little"

    # attention_rollout_maps (and so `keras-vit predict --explain`): the rollout of that attention
    grid_size = model.get_layer("position_embedding").grid_size
    assert grid_size == (shape[0] // 8, shape[1] // 8)
    want = _numpy_rollout_maps(expected, grid_size)
    got = visualize.attention_rollout_maps(model, images)
    assert got.shape == want.shape == (3,) + grid_size
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)
    assert np.ptp(want, axis=(1, 2)).min() > 0.05, "flat maps: the comparison would see little"


def test_rollout_maps_without_class_token_average_all_rows():
    rollout = np.zeros((1, 4, 4))
    rollout[0, :, 2] = 1.0  # every token reads token 2
    maps = visualize.rollout_maps(rollout, (2, 2), num_prefix_tokens=0)
    np.testing.assert_array_equal(maps[0], [[0, 0], [1, 0]])


# --- overlay pictures -----------------------------------------------------------------------


def test_overlay_masks_the_image_by_attention():
    image = np.full((4, 6, 3), 200, dtype=np.float32)
    np.testing.assert_array_equal(visualize.overlay_attention(image, np.ones((2, 3))), image)
    np.testing.assert_array_equal(visualize.overlay_attention(image, np.zeros((2, 3))), 0)
    heatmap = np.zeros((2, 3))
    heatmap[0, 0] = 1.0
    masked = visualize.overlay_attention(image, heatmap)
    assert masked[0, 0, 0] > masked[-1, -1, 0]  # upsampled, bright where attended


def test_overlay_png_is_written_with_the_right_size(tmp_path):
    images = harness.images(2, shape=(32, 48, 3))
    heatmaps = np.random.default_rng(0).uniform(0, 1, (2, 4, 6))
    path = tmp_path / "attention.png"
    visualize.save_attention_overlay(images, heatmaps, str(path), captions=["first", "second"])
    with Image.open(path) as picture:
        picture.load()
        scale = -(-visualize.MIN_PANEL_SIDE // 48)  # small inputs are enlarged
        assert picture.format == "PNG"
        assert picture.width == 3 * 48 * scale + 2 * 4  # three panels and two gaps
        assert picture.height > 2 * 32 * scale  # two rows, with captions
        first_panel = np.asarray(picture)[: 32 * scale : scale, : 48 * scale : scale]
    np.testing.assert_array_equal(first_panel, images[0].astype(np.uint8))
    with pytest.raises(ValueError, match="one heat map each"):
        visualize.save_attention_overlay(images, heatmaps[:1], str(path))
    with pytest.raises(ValueError, match="one caption per image; got 1 for 2 images"):
        visualize.save_attention_overlay(images, heatmaps, str(path), captions=["first"])


def test_one_image_without_a_batch_axis_is_one_line():
    model = harness.tiny_vit()
    with pytest.raises(ValueError, match=r"got shape \(32, 32, 3\): one image needs a batch axis"):
        visualize.attention_rollout_maps(model, harness.images(1)[0])


# --- Figure 7, right: mean attention distance ----------------------------------------------


def _pattern(grid_size, query_to_key, prefix_weight=0.0):
    """(1, 1, 1 + n, 1 + n) attention where patch q attends to patches with
    weights query_to_key[q], and to the class token with `prefix_weight`."""
    patches = grid_size[0] * grid_size[1]
    attention = np.zeros((1, 1, patches + 1, patches + 1))
    attention[0, 0, 0, 0] = 1.0
    attention[0, 0, 1:, 0] = prefix_weight
    attention[0, 0, 1:, 1:] = (1 - prefix_weight) * np.asarray(query_to_key)
    return attention


def test_attention_distance_of_hand_built_patterns():
    grid, patch = (1, 4), (16, 16)  # four patches in a row, 16 pixels apart
    self_only = _pattern(grid, np.eye(4))
    to_first = _pattern(grid, np.eye(4)[[0, 0, 0, 0]], prefix_weight=0.5)  # class token left out
    uniform = _pattern(grid, np.full((4, 4), 0.25))
    distances = visualize.mean_attention_distance(
        [np.concatenate([self_only, to_first, uniform], axis=1)], grid, patch
    )
    assert distances.shape == (1, 3)
    # self: 0; all to the first patch: 16 * mean(0, 1, 2, 3) = 24;
    # uniform: 16 * mean |i - j| over the 16 pairs = 16 * 20 / 16 = 20.
    np.testing.assert_allclose(distances[0], [0.0, 24.0, 20.0])


def test_attention_distance_uses_non_square_patch_pixels():
    grid, patch = (2, 2), (10, 20)  # patches 10 pixels tall and 20 wide
    opposite = np.eye(4)[[3, 2, 1, 0]]  # each patch attends to the diagonally opposite one
    distances = visualize.mean_attention_distance([_pattern(grid, opposite)], grid, patch)
    np.testing.assert_allclose(distances, [[np.hypot(10, 20)]])


def test_attention_distances_of_a_model():
    model = harness.tiny_vit(input_shape=(32, 48, 3))
    distances = visualize.attention_distances(model, harness.images(2, shape=(32, 48, 3)))
    assert distances.shape == (2, 4)  # blocks x heads
    farthest = np.hypot(3 * 8, 5 * 8)
    assert (distances > 0).all() and (distances < farthest).all()


# --- Figure 7, centre and left ---------------------------------------------------------------


def test_position_embedding_self_similarity_is_one():
    model = harness.tiny_vit(input_shape=(32, 48, 3))
    similarity = visualize.position_embedding_similarity(model)
    assert similarity.shape == (4, 6, 4, 6)
    flat = similarity.reshape(24, 24)
    np.testing.assert_allclose(np.diag(flat), 1.0, rtol=1e-6)
    np.testing.assert_allclose(flat, flat.T, atol=1e-12)
    assert (np.abs(flat) <= 1 + 1e-9).all()
    grid = visualize.cosine_similarity_grid(np.array([[1.0, 0.0], [0.0, 2.0], [-3.0, 0.0], [1.0, 1.0]]), (2, 2))
    np.testing.assert_allclose(grid[0, 0], [[1, 0], [-1, np.sqrt(0.5)]])


def test_patch_embedding_components_are_orthonormal():
    model = harness.tiny_vit()
    components, ratio = visualize.patch_embedding_components(model, count=10)
    assert components.shape == (10, 8, 8, 3)
    flat = components.reshape(10, -1)
    np.testing.assert_allclose(flat @ flat.T, np.eye(10), atol=1e-10)
    assert (np.diff(ratio) <= 1e-12).all() and 0 < ratio.sum() <= 1
    # a kernel whose filters vary along one direction only has that as its first component
    direction = np.zeros((2, 2, 3))
    direction[0, 1, 2] = 1.0
    kernel = np.stack([k * direction for k in range(-3, 4)], axis=-1)
    first, ratio = visualize.principal_components(kernel, count=1)
    np.testing.assert_allclose(np.abs(first[0]), direction, atol=1e-12)
    np.testing.assert_allclose(ratio, [1.0])


# --- plots ---------------------------------------------------------------------------------------


def test_plots_are_written(tmp_path):
    pytest.importorskip("matplotlib")
    model = harness.tiny_vit(input_shape=(32, 48, 3))
    figure = visualize.plot_position_similarity(visualize.position_embedding_similarity(model), tmp_path / "p.png")
    assert len(figure.axes) == 4 * 6 + 1  # one panel per patch and the colour bar
    components, _ = visualize.patch_embedding_components(model, count=9)
    figure = visualize.plot_patch_components(components, tmp_path / "c.png")
    assert len(figure.axes) == 9
    figure = visualize.plot_attention_distance(np.arange(8.0).reshape(2, 4), tmp_path / "d.png")
    assert len(figure.axes[0].collections) == 4  # one scatter per head
    for name in ("p.png", "c.png", "d.png"):
        with Image.open(tmp_path / name) as picture:
            assert picture.format == "PNG" and picture.width > 100


def test_plots_without_matplotlib_say_how_to_install_it(monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)
    monkeypatch.setitem(sys.modules, "matplotlib.backends.backend_agg", None)
    with pytest.raises(ImportError, match=r"pip install 'keras-vit\[viz\]'"):
        visualize.plot_attention_distance(np.zeros((2, 2)))
