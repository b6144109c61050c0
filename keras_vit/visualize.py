"""What a Vision Transformer looks at: the paper's Figures 6 and 7.

Attention maps (Figure 6), for any model built by keras_vit and any input
size, square or not (a model built with `input_shape=(None, None, 3)` at
each batch's own size):

    heatmaps = visualize.attention_rollout_maps(model, images)   # (batch, rows, cols)
    visualize.save_attention_overlay(images, heatmaps, "attention.png")

Inside the model (Figure 7):

    visualize.patch_embedding_components(model)        # left: PCA of the patch filters
    visualize.position_embedding_similarity(model)     # centre: posemb cosine similarity
    visualize.attention_distances(model, images)       # right: mean attention distance

and `plot_patch_components`, `plot_position_similarity`,
`plot_attention_distance` draw them. Numbers are numpy arrays; the overlay
PNG needs only Pillow; the plots need matplotlib (`pip install keras-vit[viz]`).
"""

import math

import numpy as np

# ---------------------------------------------------------------------------
# Reading a model
# ---------------------------------------------------------------------------


def _layout(model, images=None):
    """(rows, cols) of the patch grid, prefix tokens, and pixels per patch,
    for `images` (batch, height, width, 3): a model of any input size
    (`input_shape=(None, None, 3)`) takes its grid from their size."""
    posemb = model.get_layer("position_embedding")
    if getattr(posemb, "patch_pixels", None) is not None:
        if images is None:
            raise ValueError(f"Model {model.name!r} takes any input size: pass the images.")
        height, width = np.shape(images)[1:3]
        if height % posemb.patch_pixels[0] or width % posemb.patch_pixels[1]:
            from keras_vit.layers import image_size_error

            raise image_size_error(height, width, posemb.patch_pixels)
        return ((height // posemb.patch_pixels[0], width // posemb.patch_pixels[1]),
                posemb.num_prefix_tokens, tuple(float(p) for p in posemb.patch_pixels))
    rows, cols = posemb.grid_size
    height, width = model.input_shape[1:3]
    # From the input size, not the patch layer: a hybrid's patches are taken
    # from a feature map, each covering (height / rows) x (width / cols) pixels.
    return (rows, cols), posemb.num_prefix_tokens, (height / rows, width / cols)


def attention_weights(model, images, batch_size=8):
    """Every block's attention probabilities for `images`.

    Returns a list (one per block) of (batch, heads, tokens, tokens) arrays.
    """
    from keras_vit.views import attention_model

    if np.ndim(images) != 4:
        raise ValueError(
            f"Expected a batch of images (batch, height, width, 3), got shape {np.shape(images)}: one image "
            "needs a batch axis (images[None])."
        )
    outputs = attention_model(model).predict(images, batch_size=batch_size, verbose=0)
    if not isinstance(outputs, (list, tuple)):  # Keras returns a one-output model's array as it is
        outputs = [outputs]
    return [np.asarray(output, dtype=np.float32) for output in outputs]


# ---------------------------------------------------------------------------
# Attention rollout (Figure 6)
# ---------------------------------------------------------------------------


def attention_rollout(attentions):
    """Attention rollout (Abnar & Zuidema, 2020), the method of Figure 6.

    Each block's attention is averaged over heads, mixed with the identity
    for the residual connection (0.5 A + 0.5 I, rows renormalised) and the
    blocks are multiplied from the first to the last. Row i of the result is
    how much each input token contributes to output token i: every row sums
    to 1.

    Args:
        attentions: a list of (batch, heads, tokens, tokens) arrays.

    Returns:
        (batch, tokens, tokens) array.
    """
    rollout = None
    for attention in attentions:
        attention = np.asarray(attention, dtype=np.float64).mean(axis=1)
        attention = 0.5 * attention + 0.5 * np.eye(attention.shape[-1])
        attention /= attention.sum(axis=-1, keepdims=True)
        rollout = attention if rollout is None else attention @ rollout
    if rollout is None:
        raise ValueError("attention_rollout needs the attention of at least one block.")
    return rollout


def rollout_maps(rollout, grid_size, num_prefix_tokens=1):
    """The rollout's attention on the patch grid, (batch, rows, cols), max 1.

    With a class token, its row (what the classifier reads); without one,
    the mean over all output tokens (what "gap" pooling reads).
    """
    rows, cols = grid_size
    if num_prefix_tokens:
        attention = rollout[:, 0, num_prefix_tokens:]
    else:
        attention = rollout.mean(axis=1)
    maps = attention.reshape(-1, rows, cols)
    return maps / np.maximum(maps.max(axis=(1, 2), keepdims=True), 1e-12)


def attention_rollout_maps(model, images, batch_size=8):
    """Figure 6 for a keras_vit model: (batch, rows, cols) attention maps."""
    grid_size, num_prefix_tokens, _ = _layout(model, images)
    rollout = attention_rollout(attention_weights(model, images, batch_size))
    return rollout_maps(rollout, grid_size, num_prefix_tokens)


# ---------------------------------------------------------------------------
# Overlay pictures (Pillow only)
# ---------------------------------------------------------------------------


def overlay_attention(image, heatmap):
    """The image masked by its (upsampled) attention map, as Figure 6.

    Args:
        image: (height, width, 3) pixels in [0, 255].
        heatmap: (rows, cols) values in [0, 1].

    Returns:
        (height, width, 3) uint8 array.
    """
    image = np.asarray(image, dtype=np.float32)
    mask = _upsample(heatmap, image.shape[:2])
    return np.clip(image * mask[..., None], 0, 255).astype(np.uint8)


def heat_overlay(image, heatmap, opacity=0.5):
    """The image blended with a black-red-yellow-white heat colouring of the map
    (stretched to its own minimum and maximum)."""
    image = np.asarray(image, dtype=np.float32)
    mask = _upsample(heatmap, image.shape[:2])[..., None]
    mask = (mask - mask.min()) / max(float(mask.max() - mask.min()), 1e-12)
    heat = np.clip(np.concatenate([3 * mask, 3 * mask - 1, 3 * mask - 2], axis=-1), 0, 1) * 255
    return np.clip((1 - opacity) * image + opacity * heat, 0, 255).astype(np.uint8)


def _upsample(heatmap, size):
    from PIL import Image

    heatmap = np.asarray(heatmap, dtype=np.float32)
    resized = Image.fromarray(heatmap, mode="F").resize((size[1], size[0]), Image.BILINEAR)
    return np.clip(np.asarray(resized), 0.0, 1.0)


MIN_PANEL_SIDE = 160  # small inputs (the demo's 32x32 digits) are enlarged to this


def save_attention_overlay(images, heatmaps, path, captions=None):
    """Writes a PNG: one row per image, [input | masked by attention | heat map].

    Args:
        images: (batch, height, width, 3) pixels in [0, 255].
        heatmaps: (batch, rows, cols) in [0, 1], e.g. `attention_rollout_maps`.
        path: where to write the PNG.
        captions: optional text under each row (e.g. the predicted label).

    Returns:
        `path`.
    """
    from PIL import Image, ImageDraw

    images = np.asarray(images, dtype=np.float32)
    if images.ndim != 4 or images.shape[-1] != 3 or len(images) != len(heatmaps):
        raise ValueError(
            f"Expected (batch, height, width, 3) images and one heat map each; got images "
            f"{images.shape} and {len(heatmaps)} heat maps."
        )
    if captions is not None and len(captions) != len(images):
        raise ValueError(f"Expected one caption per image; got {len(captions)} for {len(images)} images.")
    height, width = images.shape[1:3]
    scale = max(1, math.ceil(MIN_PANEL_SIDE / max(height, width)))
    caption_height = 14 if captions else 0
    row_height = height * scale + caption_height
    gap = 4
    sheet = Image.new("RGB", (3 * width * scale + 2 * gap, len(images) * row_height), "white")
    draw = ImageDraw.Draw(sheet)
    for index, (image, heatmap) in enumerate(zip(images, heatmaps)):
        panels = (image.astype(np.uint8), overlay_attention(image, heatmap), heat_overlay(image, heatmap))
        top = index * row_height
        for column, panel in enumerate(panels):
            picture = Image.fromarray(panel).resize((width * scale, height * scale), Image.NEAREST)
            sheet.paste(picture, (column * (width * scale + gap), top))
        if captions:
            draw.text((2, top + height * scale + 1), str(captions[index]), fill="black")
    sheet.save(path, format="PNG")
    return path


# ---------------------------------------------------------------------------
# Figure 7: inside the model
# ---------------------------------------------------------------------------


def mean_attention_distance(attentions, grid_size, patch_pixels=(1.0, 1.0), num_prefix_tokens=1):
    """Mean attention distance per block and head (Figure 7, right).

    For each head, the distance in pixels between a query patch and the key
    patches it attends to, weighted by the attention, averaged over query
    patches and images (the paper's "attention distance", analogous to a
    CNN's receptive field size). Prefix tokens have no place in the image:
    they are left out, and each query's attention over the patches is
    renormalised to sum to 1.

    Args:
        attentions: a list of (batch, heads, tokens, tokens) arrays.
        grid_size: (rows, cols) of the patch grid.
        patch_pixels: (height, width) of a patch in pixels.
        num_prefix_tokens: tokens before the grid (1 for a class token).

    Returns:
        (blocks, heads) array of distances in pixels.
    """
    rows, cols = grid_size
    row_index, col_index = np.meshgrid(np.arange(rows), np.arange(cols), indexing="ij")
    centres = np.stack(
        [row_index.ravel() * patch_pixels[0], col_index.ravel() * patch_pixels[1]], axis=-1
    )
    distance = np.linalg.norm(centres[:, None] - centres[None], axis=-1)  # (patches, patches)
    result = []
    for attention in attentions:
        attention = np.asarray(attention, dtype=np.float64)[..., num_prefix_tokens:, num_prefix_tokens:]
        attention = attention / np.maximum(attention.sum(axis=-1, keepdims=True), 1e-12)
        per_query = (attention * distance).sum(axis=-1)  # (batch, heads, patches)
        result.append(per_query.mean(axis=(0, 2)))
    return np.stack(result)


def attention_distances(model, images, batch_size=8):
    """Figure 7 (right) for a keras_vit model: (blocks, heads) distances in pixels."""
    grid_size, num_prefix_tokens, patch_pixels = _layout(model, images)
    attentions = attention_weights(model, images, batch_size)
    return mean_attention_distance(attentions, grid_size, patch_pixels, num_prefix_tokens)


def position_embedding_similarity(model):
    """Cosine similarity of each patch's position embedding with every other's
    (Figure 7, centre): (rows, cols, rows, cols), 1 for a patch with itself."""
    import keras

    layer = model.get_layer("position_embedding")
    rows, cols = layer.grid_size
    embedding = keras.ops.convert_to_numpy(layer.embedding)[0, layer.num_prefix_tokens :]
    return cosine_similarity_grid(embedding, (rows, cols))


def cosine_similarity_grid(embedding, grid_size):
    """(rows*cols, width) vectors -> (rows, cols, rows, cols) cosine similarities."""
    rows, cols = grid_size
    embedding = np.asarray(embedding, dtype=np.float64)
    unit = embedding / np.maximum(np.linalg.norm(embedding, axis=-1, keepdims=True), 1e-12)
    return (unit @ unit.T).reshape(rows, cols, rows, cols)


def patch_embedding_components(model, count=28):
    """The principal components of the patch-embedding filters (Figure 7, left).

    Each of the model's `width` filters is a (patch, patch, channels) image;
    the components are the orthonormal directions of largest variance among
    them, strongest first.

    Returns:
        (components, explained_variance_ratio): (count, patch_h, patch_w,
        channels) and (count,) arrays.
    """
    import keras

    kernel = keras.ops.convert_to_numpy(model.get_layer("patch_embed").projection.kernel)
    return principal_components(kernel, count)


def principal_components(kernel, count=28):
    """PCA of a (patch_h, patch_w, channels, filters) convolution kernel's filters."""
    kernel = np.asarray(kernel, dtype=np.float64)
    filter_shape = kernel.shape[:-1]
    filters = kernel.reshape(-1, kernel.shape[-1]).T  # (filters, patch_h*patch_w*channels)
    filters = filters - filters.mean(axis=0)
    _, singular_values, directions = np.linalg.svd(filters, full_matrices=False)
    count = min(count, len(directions))
    variance = singular_values**2
    ratio = variance[:count] / max(variance.sum(), 1e-12)
    return directions[:count].reshape((count,) + filter_shape), ratio


# ---------------------------------------------------------------------------
# Plots (matplotlib, the `viz` extra)
# ---------------------------------------------------------------------------


def _figure(figsize):
    try:
        from matplotlib.backends.backend_agg import FigureCanvasAgg
        from matplotlib.figure import Figure
    except ImportError:
        raise ImportError(
            "keras_vit.visualize plots need matplotlib: pip install 'keras-vit[viz]'."
        ) from None
    figure = Figure(figsize=figsize)
    FigureCanvasAgg(figure)  # headless: no pyplot state, no display needed
    return figure


def _save(figure, path):
    if path is not None:
        figure.savefig(path, dpi=100, bbox_inches="tight")
    return figure


def plot_attention_distance(distances, path=None, title="Mean attention distance"):
    """Figure 7 (right): one dot per head, against the block index."""
    distances = np.asarray(distances)
    figure = _figure((4, 3.5))
    axes = figure.add_subplot()
    blocks, heads = distances.shape
    for head in range(heads):
        axes.scatter(np.arange(blocks), distances[:, head], s=12, label=f"head {head}")
    axes.set_xlabel("network depth (block)")
    axes.set_ylabel("mean attention distance (pixels)")
    axes.set_title(title)
    if heads <= 16:
        axes.legend(fontsize=6, ncol=2)
    return _save(figure, path)


def plot_position_similarity(similarity, path=None, title="Position embedding similarity"):
    """Figure 7 (centre): for each patch, its similarity with every patch."""
    similarity = np.asarray(similarity)
    rows, cols = similarity.shape[:2]
    cell = 0.6  # inches per patch
    figure = _figure((cols * cell + 1.2, rows * cell * rows / cols + 0.8))
    grid = figure.add_gridspec(rows, cols, left=0.02, right=0.8, top=0.88, bottom=0.02, wspace=0.06, hspace=0.06)
    image = None
    for row in range(rows):
        for col in range(cols):
            axes = figure.add_subplot(grid[row, col])
            image = axes.imshow(similarity[row, col], vmin=-1, vmax=1, cmap="viridis")
            axes.set_xticks([])
            axes.set_yticks([])
    colorbar_axes = figure.add_axes([0.84, 0.1, 0.03, 0.75])
    figure.colorbar(image, cax=colorbar_axes, label="cosine similarity")
    figure.suptitle(title)
    return _save(figure, path)


def plot_patch_components(components, path=None, columns=7, title="RGB embedding filters (principal components)"):
    """Figure 7 (left): each component shown as a small RGB image."""
    components = np.asarray(components)
    if components.ndim != 4 or components.shape[-1] not in (1, 3):
        raise ValueError(
            f"Expected (count, height, width, 1 or 3) image components, got shape {components.shape} "
            "(a hybrid's patch embedding reads feature maps, not RGB pixels)."
        )
    count = len(components)
    rows = math.ceil(count / columns)
    figure = _figure((columns * 0.8, rows * 0.8 + 0.4))
    for index, component in enumerate(components):
        axes = figure.add_subplot(rows, columns, index + 1)
        low, high = component.min(), component.max()
        axes.imshow((component - low) / max(high - low, 1e-12))
        axes.set_xticks([])
        axes.set_yticks([])
    figure.suptitle(title)
    return _save(figure, path)
