"""The building blocks of a Vision Transformer, as serializable Keras 3 layers.

Every layer here computes with `keras.ops`, so a model built from them runs
on the TensorFlow, JAX and PyTorch backends alike. Three guarded paths reach
below it, each where keras.ops has nothing to offer and each beside its
keras.ops form: a size check in TensorFlow graphs (`_checked_in_graph`);
on PyTorch's CPU in inference, oneDNN's linear kernel with the bias and the
GELU fused in (`_onednn_linear`); and on JAX's CPU in bf16, dots that
accumulate and return float32 (`_xla_cpu_bfloat16`).

Variable names are a stable contract: `keras_vit.npz` maps the official
checkpoint keys onto them (its `MODEL_KEYS` and `BLOCK_KEYS` are the table).
"""

import functools
import math

import keras
import numpy as np
from keras import layers, ops

LAYER_NORM_EPSILON = 1e-6  # the official Flax model's LayerNorm epsilon
PACKAGE = "keras_vit"


def serializable(cls):
    """Registers a layer class for `.keras` files (safe mode finds it by name)."""
    return keras.saving.register_keras_serializable(package=PACKAGE)(cls)


def as_pair(value):
    """An int or a pair of ints as a (rows, cols) tuple."""
    if isinstance(value, int):
        return (value, value)
    value = tuple(int(v) for v in value)
    if len(value) != 2:
        raise ValueError(f"Expected an int or a pair of ints, got {value!r}.")
    return value


# ---------------------------------------------------------------------------
# Input scaling: pixels [0, 255] -> [-1, 1], the official model's input range
# ---------------------------------------------------------------------------

PIXEL_SCALE = 1 / 127.5
PIXEL_OFFSET = -1.0


def scale_pixels(pixels):
    """[0, 255] pixels (a float array or tensor of any backend, or tf.data's) -> [-1, 1]."""
    return pixels * PIXEL_SCALE + PIXEL_OFFSET


def pixel_rescaling(name="rescaling"):
    """The model's first layer with `include_preprocessing=True`: `scale_pixels` as a layer."""
    return layers.Rescaling(scale=PIXEL_SCALE, offset=PIXEL_OFFSET, name=name)


def preprocess_input(images):
    """Scales pixels from [0, 255] to [-1, 1], the official ViT input range.

    Use it for models built with `include_preprocessing=False`; models built
    with the default `include_preprocessing=True` do this themselves. Numpy
    in, numpy out (as `keras.applications`); a tensor in, a tensor out.
    """
    numpy_in = isinstance(images, (np.ndarray, np.generic, list, tuple))
    images = ops.convert_to_tensor(images)
    if not keras.backend.is_float_dtype(images.dtype):
        images = ops.cast(images, "float32")
    scaled = scale_pixels(images)
    return ops.convert_to_numpy(scaled) if numpy_in else scaled


preprocess_inputs = preprocess_input  # the name keras_vit used before keras.applications


# ---------------------------------------------------------------------------
# Position-embedding resampling: numpy at load time (a model of one size), and
# keras.ops in the graph (a model of any size, `resample_position_embedding_ops`)
# ---------------------------------------------------------------------------

INTERPOLATIONS = ("zoom", "bicubic")


def resample_position_embedding(grid, new_grid_size, interpolation="zoom"):
    """Resamples a (rows, cols, width) grid of position embeddings.

    `"zoom"` is the official method of google-research/vision_transformer and
    big_vision: `scipy.ndimage.zoom(order=1)`, bilinear with the corner
    samples kept in place. `"bicubic"` resizes with half-pixel centres, as
    timm's `resample_abs_pos_embed`.
    """
    grid = np.asarray(grid)
    rows, cols = int(new_grid_size[0]), int(new_grid_size[1])
    if grid.ndim != 3:
        raise ValueError(f"Expected a (rows, cols, width) grid, got shape {grid.shape}.")
    if grid.shape[:2] == (rows, cols):
        return grid
    if interpolation == "zoom":
        import scipy.ndimage

        factors = (rows / grid.shape[0], cols / grid.shape[1], 1)
        return scipy.ndimage.zoom(grid.astype(np.float32), factors, order=1).astype(grid.dtype)
    if interpolation == "bicubic":
        resized = ops.image.resize(
            grid[None].astype(np.float32), (rows, cols), interpolation="bicubic", antialias=False
        )
        return ops.convert_to_numpy(resized)[0].astype(grid.dtype)
    raise ValueError(
        f"Unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}."
    )


def _zoom_axis(grid, axis, size):
    """`scipy.ndimage.zoom(order=1)` along one axis, with keras.ops: output i
    reads source coordinate i * (in - 1) / (out - 1), linearly interpolated
    (corners kept). `size` may be a Python int or a scalar tensor. The
    coordinate's integer and fractional parts come from integer arithmetic,
    so the weights are as exact as scipy's float64 ones up to float32 rounding."""
    length = ops.cast(ops.shape(grid)[axis], "int32")
    steps = ops.arange(size, dtype="int32") * (length - 1)
    denominator = ops.maximum(ops.cast(size, "int32") - 1, 1)
    lower = steps // denominator
    fraction = ops.cast(steps % denominator, "float32") / ops.cast(denominator, "float32")
    upper = ops.minimum(lower + 1, length - 1)
    shape = [1, 1, 1]
    shape[axis] = -1
    fraction = ops.cast(ops.reshape(fraction, shape), grid.dtype)
    below = ops.take(grid, lower, axis=axis)
    above = ops.take(grid, upper, axis=axis)
    return below + (above - below) * fraction


def resample_position_embedding_ops(grid, new_grid_size, interpolation="zoom"):
    """`resample_position_embedding` inside the graph: a (rows, cols, width)
    tensor to `new_grid_size`, whose entries may be tensors (an input's grid).

    keras.ops only, so it runs on every backend and under XLA. `"zoom"`
    matches the numpy (scipy) version to float32 rounding; `"bicubic"` is the
    backend's `ops.image.resize`, which the numpy version calls too.
    """
    rows, cols = new_grid_size
    if interpolation == "zoom":
        grid = ops.cast(grid, "float32")
        return _zoom_axis(_zoom_axis(grid, 0, rows), 1, cols)
    if interpolation == "bicubic":
        resized = ops.image.resize(
            ops.cast(grid, "float32")[None], (rows, cols), interpolation="bicubic", antialias=False
        )
        return resized[0]
    raise ValueError(
        f"Unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}."
    )


def image_size_error(height, width, multiple):
    """The one-line error for an input whose height or width is not a
    multiple of `multiple` (rows, cols): pixels per token of the model."""
    def allowed(m):
        return ", ".join(str(m * k) for k in range(1, 5)) + ", ..."

    error = ValueError(
        f"Input size {height}x{width} does not cut into whole patches: height must be a multiple of "
        f"{multiple[0]} ({allowed(multiple[0])}) and width a multiple of {multiple[1]} "
        f"({allowed(multiple[1])}); resize or crop the images."
    )
    # Raised inside a layer's call: Keras would wrap it in a multi-line
    # "Exception encountered when calling ..." message unless marked as done.
    error._keras_call_info_injected = True
    return error


def check_image_size(height, width, multiple):
    """(rows, cols) of tokens for a (height, width) input of `multiple`
    pixels per token, or the `image_size_error` line: each side must be a
    whole multiple, and at least one (no token, no answer)."""
    rows, cols = height // multiple[0], width // multiple[1]
    if height % multiple[0] or width % multiple[1] or not rows or not cols:
        raise image_size_error(height, width, multiple)
    return rows, cols


def _checked_in_graph(rows, cols, height, width, multiple):
    """TensorFlow (one of the two places keras_vit's model code reaches below
    keras.ops; `_onednn_linear` is the other): a TensorFlow graph traced for
    unknown image sizes (`model.predict` traces again with open sizes;
    tf.function, SavedModels) has no static size to check in Python, and
    keras.ops has no assertion. JAX and torch always see the size while
    tracing, so `input_grid` checks it in Python there.
    Returns (rows, cols) that depend on the check, which fails with the
    `image_size_error` line."""
    import tensorflow as tf

    whole = tf.reduce_all([tf.equal(height % multiple[0], 0), tf.equal(width % multiple[1], 0),
                           rows > 0, cols > 0])  # at least one token
    message = str(image_size_error("{height}", "{width}", multiple)).replace("{height}x{width}", "%s")
    check = tf.debugging.Assert(whole, [tf.strings.format(message.replace("%s", "{}x{}"), (height, width))])
    with tf.control_dependencies([check]):
        return tf.identity(rows), tf.identity(cols)


def resize_position_embedding(
    embedding, old_grid_size, new_grid_size, num_prefix_tokens=1, interpolation="zoom"
):
    """Resizes a (1, prefix + rows*cols, width) position embedding to a new grid.

    The prefix (class token) entries are kept as they are; only the grid part
    is interpolated (the paper's "high-resolution fine-tuning").
    """
    embedding = np.asarray(embedding)
    old_rows, old_cols = old_grid_size
    width = embedding.shape[-1]
    if embedding.shape[1] != num_prefix_tokens + old_rows * old_cols:
        raise ValueError(
            f"Position embedding with {embedding.shape[1]} entries does not fit "
            f"{num_prefix_tokens} prefix token(s) plus a {old_rows}x{old_cols} grid."
        )
    prefix = embedding[:, :num_prefix_tokens]
    grid = embedding[0, num_prefix_tokens:].reshape(old_rows, old_cols, width)
    grid = resample_position_embedding(grid, new_grid_size, interpolation)
    grid = grid.reshape(1, -1, width)
    return np.concatenate([prefix, grid], axis=1)


def square_grid_size(num_grid_tokens):
    """The side of a square grid of `num_grid_tokens` tokens, or an error."""
    side = int(round(math.sqrt(num_grid_tokens)))
    if side * side != num_grid_tokens:
        raise ValueError(
            f"Cannot infer the patch grid of a position embedding with "
            f"{num_grid_tokens} grid entries: it is not square. Pass the grid size."
        )
    return side, side


# ---------------------------------------------------------------------------
# Layers
# ---------------------------------------------------------------------------


@serializable
class ImageSizeCheck(layers.Layer):
    """Passes images through unchanged after checking that they cut into
    whole tokens of `patch_pixels` (rows, cols) input pixels.

    The first layer of a model of any size: there the convolutions of the
    patch embedding or ResNet stem would otherwise refuse an image smaller
    than a token first, in the backend's multi-line words. A size unknown
    while tracing (a TensorFlow graph) is checked by `PositionEmbedding`.
    """

    def __init__(self, patch_pixels, **kwargs):
        super().__init__(**kwargs)
        self.patch_pixels = as_pair(patch_pixels)

    def call(self, images):
        height, width = images.shape[1], images.shape[2]
        if height is not None and width is not None:
            check_image_size(height, width, self.patch_pixels)
        return images

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(patch_pixels=self.patch_pixels)
        return config


@serializable
class PatchEncoder(layers.Layer):
    """Cuts an image (or feature map) into patches and embeds each as a token.

    A convolution whose kernel and stride are both the patch size is exactly a
    linear projection of each flattened patch. Output: (batch, rows*cols, width).
    """

    def __init__(self, patch_size, hidden_size, **kwargs):
        super().__init__(**kwargs)
        self.patch_size = as_pair(patch_size)
        self.hidden_size = int(hidden_size)
        self.projection = layers.Conv2D(
            self.hidden_size,
            kernel_size=self.patch_size,
            strides=self.patch_size,
            padding="valid",
            dtype=self.dtype_policy,
            name="projection",
        )

    def build(self, input_shape):
        self.projection.build(input_shape)
        self.built = True

    def grid_size(self, image_size):
        """The (rows, cols) of patches for an input of (height, width)."""
        height, width = image_size
        return height // self.patch_size[0], width // self.patch_size[1]

    def call(self, images):
        patches = self.projection(images)
        batch = ops.shape(patches)[0]
        return ops.reshape(patches, (batch, -1, self.hidden_size))

    def compute_output_shape(self, input_shape):
        rows, cols = input_shape[1], input_shape[2]
        tokens = None
        if rows is not None and cols is not None:
            tokens = (rows // self.patch_size[0]) * (cols // self.patch_size[1])
        return (input_shape[0], tokens, self.hidden_size)

    def get_config(self):
        config = super().get_config()
        config.update(patch_size=self.patch_size, hidden_size=self.hidden_size)
        return config


@serializable
class ClassToken(layers.Layer):
    """Prepends a learned class token to the token sequence (zero-initialised)."""

    def build(self, input_shape):
        self.token = self.add_weight(
            shape=(1, 1, input_shape[-1]), initializer="zeros", name="token"
        )
        self.built = True

    def call(self, tokens):
        batch = ops.shape(tokens)[0]
        token = ops.cast(self.token, tokens.dtype)
        token = ops.broadcast_to(token, (batch, 1, ops.shape(tokens)[-1]))
        return ops.concatenate([token, tokens], axis=1)

    def compute_output_shape(self, input_shape):
        length = None if input_shape[1] is None else input_shape[1] + 1
        return (input_shape[0], length, input_shape[2])


@serializable
class PositionEmbedding(layers.Layer):
    """Adds a learned 1-D position embedding to a (prefix + grid) token sequence.

    Args:
        grid_size: (rows, cols) of the patch grid the embedding covers.
        num_prefix_tokens: tokens before the grid (1 for the class token);
            their entries are never interpolated.
        interpolation: how a stored embedding for another grid is resized on
            load: "zoom" (official, default) or "bicubic".

        patch_pixels: for a model of any input size: the (rows, cols) input
            pixels each token covers (the patch size; the stem's stride times
            it for hybrids). The layer is then called as `layer(tokens, images)`
            and resamples the stored embedding to the images' grid in the graph
            (with `interpolation`); at the stored grid it adds it unchanged.

    Loading weights saved for a different grid (`load_weights`, `.keras`
    files) resizes the stored embedding to this layer's grid instead of failing.
    """

    def __init__(self, grid_size, num_prefix_tokens=1, interpolation="zoom", patch_pixels=None, **kwargs):
        super().__init__(**kwargs)
        self.grid_size = tuple(int(s) for s in as_pair(grid_size))
        self.patch_pixels = None if patch_pixels is None else as_pair(patch_pixels)
        self.num_prefix_tokens = int(num_prefix_tokens)
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"Unknown interpolation {interpolation!r}; use one of {INTERPOLATIONS}."
            )
        self.interpolation = interpolation

    @property
    def num_tokens(self):
        return self.num_prefix_tokens + self.grid_size[0] * self.grid_size[1]

    def build(self, tokens_shape, images_shape=None):
        input_shape = tokens_shape
        if images_shape is None and input_shape[1] is not None and input_shape[1] != self.num_tokens:
            raise ValueError(
                f"{self.name}: got {input_shape[1]} tokens, expected {self.num_tokens} "
                f"({self.num_prefix_tokens} prefix + {self.grid_size[0]}x{self.grid_size[1]} grid)."
            )
        self.embedding = self.add_weight(
            shape=(1, self.num_tokens, input_shape[-1]),
            initializer=keras.initializers.RandomNormal(stddev=0.02),
            name="embedding",
        )
        self.built = True

    def call(self, tokens, images=None):
        if images is None:
            return tokens + ops.cast(self.embedding, tokens.dtype)
        return tokens + ops.cast(self.embedding_for(images), tokens.dtype)

    def input_grid(self, images):
        """(rows, cols) of tokens for `images` (batch, height, width, channels):
        Python ints when the size is known while tracing (checked then), else
        scalar tensors."""
        if self.patch_pixels is None:
            raise ValueError(f"{self.name}: built for one grid; it takes no images (patch_pixels=None).")
        height, width = images.shape[1], images.shape[2]
        if height is not None and width is not None:
            return check_image_size(height, width, self.patch_pixels)
        shape = ops.shape(images)
        height, width = shape[1], shape[2]
        rows, cols = height // self.patch_pixels[0], width // self.patch_pixels[1]
        if keras.backend.backend() == "tensorflow":
            rows, cols = _checked_in_graph(rows, cols, height, width, self.patch_pixels)
        return rows, cols

    def embedding_for(self, images):
        """The (1, prefix + rows*cols, width) embedding for `images`' grid."""
        rows, cols = self.input_grid(images)
        if isinstance(rows, int) and isinstance(cols, int) and (rows, cols) == self.grid_size:
            return self.embedding
        width = self.embedding.shape[-1]
        prefix = self.embedding[:, : self.num_prefix_tokens]
        grid = ops.reshape(self.embedding[0, self.num_prefix_tokens :], (*self.grid_size, width))
        grid = resample_position_embedding_ops(grid, (rows, cols), self.interpolation)
        grid = ops.reshape(ops.cast(grid, self.embedding.dtype), (1, -1, width))
        return ops.concatenate([prefix, grid], axis=1)

    def compute_output_shape(self, tokens_shape, images_shape=None):
        return tokens_shape

    def resized(self, embedding, grid_size=None):
        """Returns `embedding` (numpy, any grid) resized to this layer's grid.

        `grid_size` is the stored embedding's grid; when None it must be square.
        """
        embedding = np.asarray(embedding)
        if embedding.ndim == 2:
            embedding = embedding[None]
        if embedding.shape[-1] != self.embedding.shape[-1]:
            raise ValueError(
                f"{self.name}: stored position embedding has width {embedding.shape[-1]}, "
                f"the model has {self.embedding.shape[-1]}."
            )
        if embedding.shape[1] == self.num_tokens and grid_size in (None, self.grid_size):
            return embedding
        if grid_size is None:
            grid_size = square_grid_size(embedding.shape[1] - self.num_prefix_tokens)
        return resize_position_embedding(
            embedding, grid_size, self.grid_size, self.num_prefix_tokens, self.interpolation
        )

    # Stored alongside the embedding so a non-square grid can be resized later.
    def save_own_variables(self, store):
        store["0"] = ops.convert_to_numpy(self.embedding)
        store["1"] = np.asarray(self.grid_size, dtype="int32")

    def load_own_variables(self, store):
        grid_size = tuple(int(s) for s in np.asarray(store["1"])) if "1" in store else None
        self.embedding.assign(self.resized(np.asarray(store["0"]), grid_size))

    def get_config(self):
        config = super().get_config()
        config.update(
            grid_size=self.grid_size,
            num_prefix_tokens=self.num_prefix_tokens,
            interpolation=self.interpolation,
        )
        if self.patch_pixels is not None:  # absent for one-size models: their files stay as they were
            config["patch_pixels"] = self.patch_pixels
        return config


@serializable
class DropPath(layers.Layer):
    """Stochastic depth: drops a whole residual branch per sample while training."""

    def __init__(self, rate=0.0, seed=None, **kwargs):
        super().__init__(**kwargs)
        self.rate = float(rate)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed) if self.rate > 0 else None

    def call(self, inputs, training=None):
        if not training or self.rate == 0.0:
            return inputs
        keep = 1.0 - self.rate
        shape = (ops.shape(inputs)[0],) + (1,) * (len(inputs.shape) - 1)
        mask = keras.random.uniform(shape, seed=self.seed_generator, dtype=inputs.dtype)
        mask = ops.cast(mask < keep, inputs.dtype)
        return inputs * mask / ops.cast(keep, inputs.dtype)

    def compute_output_shape(self, input_shape):
        return input_shape

    def get_config(self):
        config = super().get_config()
        config.update(rate=self.rate, seed=self.seed)
        return config


def _reshape(x, shape):
    """`ops.reshape` for the blocks' per-call paths. On PyTorch, ops.reshape
    flattens its shape through torch's pytree to look for symbolic tensors:
    17 us a call against 4 us for the tensor's own reshape, and a ViT-B/16
    forward pass has 300 (5 of the 16 ms that Keras's Python takes in one)."""
    if keras.backend.backend() != "torch" or isinstance(x, keras.KerasTensor):
        return ops.reshape(x, shape)
    if isinstance(x, keras.Variable):
        x = x.value  # cast to the compute dtype inside a layer call, as ops would
    return x.reshape(tuple(shape))


def _matmul_plus_bias(x, kernel, bias):
    """x . kernel + bias in x's dtype. ops.add with a 1-D bias is TensorFlow's
    BiasAdd, which oneDNN fuses into the matmul together with a residual add
    that follows; a `+` (AddV2) is not fused there. (On PyTorch's CPU in
    inference, `_onednn_linear`; on JAX's CPU in bf16, `_xla_cpu_projection`.)"""
    if _onednn_linear_usable(x):
        return _onednn_linear(x, kernel, bias)
    if _xla_cpu_bfloat16(x):
        return _xla_cpu_projection(x, kernel, bias)
    return ops.add(ops.matmul(x, ops.cast(kernel, x.dtype)), ops.cast(bias, x.dtype))


def _xla_cpu_bfloat16(x):
    """JAX: whether x is bfloat16 on XLA's CPU backend, whose dots then go
    through `_xla_cpu_projection` and `_xla_cpu_attention`. There a bf16 dot
    that returns bf16 takes a slow path, and the same dot returning float32
    (`preferred_element_type`, which keras.ops does not expose) a fast one:
    one 1576x768 . 768x3072 projection (ViT-B/16's first MLP matmul at batch
    8) took 37.3 ms the first way, 19.8 ms the second and 35.4 ms in float32;
    jax.nn.dot_product_attention (what keras.ops calls on a CPU) 27.5 ms a
    block against 6.0 ms for the same attention with both dots returning
    float32 (Zen 4 CPU, AVX512_BF16, JAX 0.10). GPUs and TPUs keep the
    keras.ops path (fused kernels, no such slow path)."""
    if keras.backend.backend() != "jax" or keras.backend.standardize_dtype(x.dtype) != "bfloat16":
        return False
    import jax

    return jax.default_backend() == "cpu"


def _xla_cpu_projection(x, kernel, bias):
    """x . kernel + bias, the kernel's first axis contracted with x's last:
    the dot accumulated and returned in float32, the bias added in float32,
    then rounded to x's dtype once (`_xla_cpu_bfloat16` says when)."""
    import jax.numpy as jnp

    projected = jnp.tensordot(x, ops.cast(kernel, x.dtype), axes=1, preferred_element_type=jnp.float32)
    return ops.cast(projected + ops.cast(bias, "float32"), x.dtype)


def _xla_cpu_attention(query, key, value):
    """softmax(query . key^T) . value on (batch, tokens, heads, head), the
    scale already in the query: both dots accumulated and returned in
    float32, the softmax in float32, as keras.ops computes it
    (`_xla_cpu_bfloat16` says when)."""
    import jax.numpy as jnp

    logits = jnp.einsum("btnh,bsnh->bnts", query, key, preferred_element_type=jnp.float32)
    weights = ops.cast(ops.softmax(logits, axis=-1), query.dtype)
    return ops.cast(jnp.einsum("bnts,bsnh->btnh", weights, value, preferred_element_type=jnp.float32), query.dtype)


def _onednn_linear_usable(x):
    """PyTorch: whether `_onednn_linear` projects x (2-D: tokens, width).
    Only without gradients (the kernel has no backward; Keras's `predict`
    and `evaluate` run under `torch.no_grad()`), on a CPU, in float32 or
    bfloat16, outside torch.compile (Inductor makes its own fused kernels),
    in a torch built with oneDNN and with it enabled."""
    if keras.backend.backend() != "torch":
        return False
    import torch

    if torch.is_grad_enabled() or x.device.type != "cpu" or torch.compiler.is_compiling():
        return False
    return torch.backends.mkldnn.enabled and keras.backend.standardize_dtype(x.dtype) in _onednn_linear_dtypes()


@functools.cache
def _onednn_linear_dtypes():
    import torch

    mkldnn = torch.ops.mkldnn
    if not (torch.backends.mkldnn.is_available() and hasattr(mkldnn, "_linear_pointwise")):
        return ()
    bf16 = hasattr(mkldnn, "_is_mkldnn_bf16_supported") and mkldnn._is_mkldnn_bf16_supported()
    return ("float32", "bfloat16") if bf16 else ("float32",)


def _onednn_linear(x, kernel, bias, gelu=None):
    """PyTorch on a CPU, in inference: x . kernel + bias, then with `gelu`
    ("tanh": the official approximation, "none": the exact GELU) its GELU,
    in one call of oneDNN's linear kernel with the bias and the GELU fused
    in (`torch.ops.mkldnn._linear_pointwise`, which torch.compile's Inductor
    also calls for this fusion on CPUs, with freezing on). keras.ops has
    neither the fusion nor a fast tanh GELU on torch: torch's CPU kernel for
    it is 2 to 4 times slower than for the exact GELU timm uses, and its
    float32 matmuls (MKL) were 5-12% slower than oneDNN's at ViT-B/16's
    shapes. Together: ViT-B/16 predict, batch 8, +9% in float32 and +7% in
    bf16 on a Zen 4 CPU. `_onednn_linear_usable` says when."""
    import torch

    width = x.shape[-1]
    kernel = _reshape(kernel, (width, -1)).to(x.dtype)
    bias = _reshape(bias, (-1,)).to(x.dtype)
    # The kernel (out, in) as a transposed view: no copy here.
    return torch.ops.mkldnn._linear_pointwise(x, kernel.t(), bias, "gelu" if gelu else "none", [], gelu or "")


def _torch_projections(x, kernels_and_biases, bias_row):
    """PyTorch: [x . kernel + bias for each (kernel, bias)], on one 2-D x.

    torch's matmul takes no bias (torch.addmm is not a keras.op), and a
    separate add is one more pass over a freshly allocated output (40 of 515
    ms of ops in a bf16 ViT-B/16 forward pass on a CPU). With `bias_row`,
    the bias rides in the matmul as the kernel's last row, against a column
    of ones on x: `TransformerBlock._bias_as_kernel_row` says when that
    pays."""
    dtype = keras.backend.standardize_dtype(x.dtype)
    width = x.shape[-1]
    if not bias_row:
        return [_matmul_plus_bias(x, _reshape(kernel, (width, -1)), _reshape(bias, (-1,)))
                for kernel, bias in kernels_and_biases]  # fmt: skip
    x = ops.concatenate([x, ops.ones((ops.shape(x)[0], 1), dtype=dtype)], axis=1)
    return [
        ops.matmul(x, ops.concatenate([_reshape(ops.cast(kernel, dtype), (width, -1)),
                                       _reshape(ops.cast(bias, dtype), (1, -1))], axis=0))
        for kernel, bias in kernels_and_biases
    ]  # fmt: skip


def _layer_norm_float32(x, gamma, beta, epsilon):
    """TensorFlow: `ops.layer_normalization` (float32 whatever x's dtype),
    written with the centred tokens computed once and reused for the
    variance. TensorFlow runs each op as its own pass over the tokens, and
    this form took 21 ms less than Keras's in a bf16 forward pass of
    ViT-B/16 (4%, AMX CPU)."""
    x = ops.cast(x, "float32")
    centred = ops.subtract(x, ops.mean(x, axis=-1, keepdims=True))
    variance = ops.mean(ops.square(centred), axis=-1, keepdims=True)
    return ops.add(ops.cast(beta, "float32"),
                   ops.multiply(centred, ops.multiply(ops.rsqrt(ops.add(variance, epsilon)), ops.cast(gamma, "float32"))))  # fmt: skip


def _check_even_split(layer, variables):
    """A one-line error when the current `keras.distribution` would split one
    of `layer`'s variables over a number of devices that does not divide the
    split axis (JAX would fail on the first such variable with a long
    sharding error). `variables`: {path under the layer: (what its split axis
    counts, its shape)}."""
    distribution = keras.distribution.distribution()
    if distribution is None or not hasattr(distribution, "get_tensor_layout"):
        return
    for name, (what, shape) in variables.items():
        try:
            layout = distribution.get_tensor_layout(f"{layer.path}/{name}")
        except NotImplementedError:
            return
        if layout is None or layout.device_mesh is None:
            continue
        mesh = layout.device_mesh
        for size, axes in zip(shape, layout.axes):
            axes = (axes,) if isinstance(axes, str) else tuple(axes or ())
            parts = math.prod(mesh.shape[mesh.axis_names.index(axis)] for axis in axes)
            if size % parts:
                error = ValueError(
                    f"{layer.name}: {what} {size} does not split evenly over the {parts} devices of mesh axis "
                    f"{' x '.join(axes)!r} ({name}, shape {shape}); use a mesh whose {' x '.join(axes)!r} "
                    f"axis divides {size}."
                )
                error._keras_call_info_injected = True  # one line, not Keras's "Exception encountered when calling"
                raise error


@serializable
class TransformerBlock(layers.Layer):
    """A pre-LayerNorm Transformer encoder block, as the official Flax model.

        x = x + DropPath(Dropout(Attention(LayerNorm(x))))
        x = x + DropPath(MLP(LayerNorm(x)))      MLP = Dense-GELU-Dropout-Dense-Dropout

    Call with `return_attention_scores=True` to also get the attention
    probabilities, (batch, heads, tokens, tokens). `keras_vit.attention_model`
    does this for every block of a built model, sharing its weights.

    The weights live in Keras's own `MultiHeadAttention` (`attention`: the
    query/key/value/attention_output variables the checkpoint loader and saved
    files know) and two `Dense` layers. Three cases run through
    `MultiHeadAttention` itself: attention maps, attention dropout in
    training, and quantized models (`model.quantize`). Every other call takes
    the fast path, which uses the same variables differently, for speed:
    - the tokens of all images are rows of one matrix, so every projection is
      a single 2-D matmul that oneDNN fuses with its bias and residual add
      (on PyTorch, in inference under mixed precision and with more tokens
      than the width, the query/key/value and first MLP biases ride in the
      matmul as an extra kernel row, `_torch_projections`);
    - on PyTorch's CPU without gradients (`predict`, `evaluate`), each
      projection is one call of oneDNN's linear kernel with its bias, and for
      the MLP's first its GELU, fused in (`_onednn_linear`);
    - on TensorFlow and JAX, query, key and value come from one matmul with
      the three kernels side by side, not three, and the logit scale
      1/sqrt(head) is folded into the query's weights; on PyTorch, three
      matmuls on one input (no copy of the three kernels side by side at
      every call), the flash kernel applying the scale (or, in bfloat16 on
      a CPU, the query's weights, as on the other backends);
    - on JAX and PyTorch, `keras.ops.dot_product_attention` does the attention
      itself (the flash kernels on GPUs), except in bfloat16 on a CPU: on
      PyTorch torch's fused kernel is slower than two batched matmuls with a
      softmax on the bfloat16 logits between them (`_explicit_attention`),
      and on JAX every dot, the projections' too, returns float32, which
      XLA's CPU backend computes on a faster path (`_xla_cpu_bfloat16`);
      on TensorFlow, which has none, two einsums with the heads moved forward
      once, softmax in the compute dtype (as `MultiHeadAttention`);
    - on TensorFlow, layer norms written as fewer passes over the tokens
      (`_layer_norm_float32`), and in training the GELU in float32 (`_gelu`).
    """

    def __init__(
        self,
        num_heads,
        mlp_dim,
        dropout_rate=0.0,
        attention_dropout_rate=0.0,
        drop_path_rate=0.0,
        gelu_approximate=True,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.num_heads = int(num_heads)
        self.mlp_dim = int(mlp_dim)
        self.dropout_rate = float(dropout_rate)
        self.attention_dropout_rate = float(attention_dropout_rate)
        self.drop_path_rate = float(drop_path_rate)
        self.gelu_approximate = bool(gelu_approximate)
        policy = self.dtype_policy
        self.norm1 = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, dtype=policy, name="norm1")
        self.norm2 = layers.LayerNormalization(epsilon=LAYER_NORM_EPSILON, dtype=policy, name="norm2")
        self.dropout = layers.Dropout(self.dropout_rate, dtype=policy, name="dropout")
        self.drop_path = DropPath(self.drop_path_rate, dtype=policy, name="drop_path")
        self.attention = None  # its key_dim depends on the input width: made in build()
        self.mlp_in = None
        self.mlp_out = None

    def build(self, input_shape):
        width = input_shape[-1]
        if width % self.num_heads:
            raise ValueError(
                f"{self.name}: width {width} is not divisible by num_heads={self.num_heads}."
            )
        _check_even_split(self, {
            "attention/query/kernel": ("the head count", (width, self.num_heads, width // self.num_heads)),
            "mlp_in/kernel": ("the MLP width", (width, self.mlp_dim)),
        })  # fmt: skip
        policy = self.dtype_policy
        self.attention = layers.MultiHeadAttention(
            num_heads=self.num_heads,
            key_dim=width // self.num_heads,
            dropout=self.attention_dropout_rate,
            dtype=policy,
            name="attention",
        )
        self.mlp_in = layers.Dense(self.mlp_dim, dtype=policy, name="mlp_in")
        self.mlp_out = layers.Dense(width, dtype=policy, name="mlp_out")
        self.norm1.build(input_shape)
        self.norm2.build(input_shape)
        # Weightless, but `model.quantize` needs every sublayer built, and the
        # fast path calls drop-path only in training.
        self.dropout.build(input_shape)
        self.drop_path.build(input_shape)
        self.attention.build(input_shape, input_shape)
        self.mlp_in.build(input_shape)
        self.mlp_out.build(tuple(input_shape[:-1]) + (self.mlp_dim,))
        self.built = True

    def call(self, inputs, training=None, return_attention_scores=False):
        if return_attention_scores or (training and self.attention_dropout_rate) or self._quantized():
            return self._call_keras_attention(inputs, training, return_attention_scores)
        batch, width = ops.shape(inputs)[0], inputs.shape[-1]
        x = _reshape(inputs, (-1, width))  # (batch * tokens, width)
        attended = self._self_attention(self._norm(self.norm1, x), batch, training)
        x = x + self._residual_branch(self._attention_output(attended), batch, training)

        y = self._mlp_in_and_gelu(self._norm(self.norm2, x), training)
        y = self._dropout(y, training)
        y = _matmul_plus_bias(y, self.mlp_out.kernel, self.mlp_out.bias)
        x = x + self._residual_branch(y, batch, training)
        return _reshape(x, ops.shape(inputs))

    def _mlp_in_and_gelu(self, y, training):
        if _onednn_linear_usable(y):
            return _onednn_linear(y, self.mlp_in.kernel, self.mlp_in.bias, "tanh" if self.gelu_approximate else "none")
        if keras.backend.backend() == "torch":
            (y,) = _torch_projections(y, [(self.mlp_in.kernel, self.mlp_in.bias)], self._bias_as_kernel_row(y, training))
        else:
            y = _matmul_plus_bias(y, self.mlp_in.kernel, self.mlp_in.bias)
        return self._gelu(y, training)

    def _bias_as_kernel_row(self, x, training):
        """PyTorch: whether the projections of `x` (2-D: tokens, width) take
        their bias as one more kernel row (`_torch_projections`). Only in
        inference under a mixed precision policy, where each kernel is cast
        (copied) at every call anyway: in float32 the kernel is used as it
        is, and its copy with a bias row cost more than the add (3% of a
        float32 forward pass of ViT-B/16 on a CPU, 8% of a training step); in
        a bf16 training step the row's gradient cost more than the add's
        (4-5%). And only for more tokens than the width: the row copies the
        kernel (width + 1 rows), the add passes over the output (one row a
        token), so the row pays only when the output is the larger (bf16
        predict of ViT-B/16 on a Zen 4 CPU: at batch 8, 1576 tokens, the row
        3% faster; at batch 1, 197 tokens, the add 3-5% faster). (Inside a
        layer call Keras reports a variable's dtype as the compute dtype: the
        policy tells.)"""
        if _onednn_linear_usable(x):
            return False  # the bias is fused into oneDNN's kernel
        policy = self.dtype_policy
        return not training and policy.variable_dtype != policy.compute_dtype and x.shape[0] > x.shape[1]

    def _quantized(self):
        # After `model.quantize(...)` a kernel is stored in int8 with separate
        # scales, which only the Dense and EinsumDense layers themselves apply.
        attention = self.attention
        dense = (attention.query_dense, attention.key_dense, attention.value_dense, attention.output_dense,
                 self.mlp_in, self.mlp_out)  # fmt: skip
        return any(layer.quantization_mode is not None for layer in dense)

    def _self_attention(self, x, batch, training):
        """(batch * tokens, width) -> the heads' attended values, (batch * tokens, width)."""
        width = x.shape[-1]
        heads, head = self.num_heads, width // self.num_heads
        scale = 1.0 / math.sqrt(head)
        dense = (self.attention.query_dense, self.attention.key_dense, self.attention.value_dense)
        if keras.backend.backend() == "torch":
            # A matmul each, on one x.
            if keras.backend.standardize_dtype(x.dtype) == "bfloat16" and x.device.type == "cpu":
                return self._explicit_attention(x, batch, training)
            projected = _torch_projections(x, [(d.kernel, d.bias) for d in dense], self._bias_as_kernel_row(x, training))
            query, key, value = (_reshape(y, (batch, -1, heads, head)) for y in projected)
            return _reshape(ops.dot_product_attention(query, key, value, scale=scale), (-1, width))
        # One matmul for query, key and value (their kernels side by side),
        # with the 1/sqrt(head) logit scale folded into the query's weights.
        kernels = [_reshape(d.kernel, (width, width)) for d in dense]
        biases = [_reshape(d.bias, (width,)) for d in dense]
        kernel = ops.stack([kernels[0] * scale, *kernels[1:]], axis=1)  # (width, 3, width)
        bias = ops.stack([biases[0] * scale, *biases[1:]], axis=0)  # (3, width)
        if keras.backend.backend() == "jax":
            # Query, key and value keep an axis of their own (a (width, 3 *
            # width) kernel would mix them): under keras.distribution's model
            # parallelism each device then projects and attends with its own
            # heads only. The fused (flash) kernels take (batch, tokens, heads, head).
            xla_cpu_bfloat16 = _xla_cpu_bfloat16(x)
            if xla_cpu_bfloat16:
                projected = _xla_cpu_projection(x, kernel, bias)
            else:
                projected = ops.tensordot(x, ops.cast(kernel, x.dtype), axes=1) + ops.cast(bias, x.dtype)
            query, key, value = ops.unstack(_reshape(projected, (batch, -1, 3, heads, head)), 3, axis=2)
            if xla_cpu_bfloat16:
                attended = _xla_cpu_attention(query, key, value)
            else:
                attended = ops.dot_product_attention(query, key, value, scale=1.0)
            return _reshape(attended, (-1, width))
        projected = _matmul_plus_bias(x, _reshape(kernel, (width, 3 * width)), _reshape(bias, (3 * width,)))
        projected = _reshape(projected, (batch, -1, 3, heads, head))
        # TensorFlow has no fused attention and its einsum would transpose each
        # of query, key, value and the result: move the heads forward once.
        # unstack, not slices: a slice's gradient is a full-size scatter (it
        # was a tenth of a bf16 training step), unstack's is one stack.
        query, key, value = ops.unstack(ops.transpose(projected, (2, 0, 3, 1, 4)), 3, axis=0)
        logits = ops.einsum("bnth,bnsh->bnts", query, key)
        # Softmax in the compute dtype, as Keras's MultiHeadAttention computes
        # it: under mixed_bfloat16 a float32 round trip cast the logits twice
        # (4% of a bf16 forward pass of ViT-B/16 on an AMX CPU).
        weights = ops.softmax(logits, axis=-1)
        attended = ops.einsum("bnts,bnsh->bnth", weights, value)  # (batch, heads, tokens, head)
        return _reshape(ops.transpose(attended, (0, 2, 1, 3)), (-1, width))

    def _explicit_attention(self, x, batch, training):
        """PyTorch, bfloat16, CPU: softmax(query . key^T) . value as two
        batched matmuls, softmax on the bfloat16 logits, the 1/sqrt(head)
        scale folded into the query's weights (in the compute dtype: inside
        a layer call Keras hands out variables already cast).
        On CPUs torch's fused attention kernel is 1.5 to 2.5 times slower than
        this in bfloat16 (not in float32, where it stays faster)."""
        width = x.shape[-1]
        heads, head = self.num_heads, width // self.num_heads
        scale = 1.0 / math.sqrt(head)
        attention = self.attention
        projections = [
            (attention.query_dense.kernel * scale, attention.query_dense.bias * scale),
            (attention.key_dense.kernel, attention.key_dense.bias),
            (attention.value_dense.kernel, attention.value_dense.bias),
        ]
        projected = _torch_projections(x, projections, self._bias_as_kernel_row(x, training))
        query, key, value = (_reshape(y, (batch, -1, heads, head)) for y in projected)
        logits = ops.matmul(ops.transpose(query, (0, 2, 1, 3)), ops.transpose(key, (0, 2, 3, 1)))
        attended = ops.matmul(ops.softmax(logits, axis=-1), ops.transpose(value, (0, 2, 1, 3)))
        return _reshape(ops.transpose(attended, (0, 2, 1, 3)), (-1, width))  # (batch * tokens, width)

    def _attention_output(self, attended):
        """(batch * tokens, width) -> the output projection, same shape."""
        dense = self.attention.output_dense
        width = dense.kernel.shape[-1]
        return _matmul_plus_bias(attended, _reshape(dense.kernel, (width, width)), dense.bias)

    def _norm(self, norm, x):
        # What `norm`'s own call computes (in float32, whatever x's dtype),
        # without a layer call: on PyTorch the Python of a Keras layer call
        # costs as much as a layer norm over all tokens of ViT-B/16.
        if keras.backend.backend() == "tensorflow":
            return ops.cast(_layer_norm_float32(x, norm.gamma, norm.beta, norm.epsilon), norm.compute_dtype)
        return ops.cast(ops.layer_normalization(x, norm.gamma, norm.beta, epsilon=norm.epsilon), norm.compute_dtype)

    def _gelu(self, y, training):
        if training and keras.backend.backend() == "tensorflow":
            # In float32: TensorFlow's bf16 elementwise kernels are slow, and
            # the GELU and its gradient are a dozen of them over the widest
            # activation. Forward and backward took 20 instead of 33 ms for
            # one block of ViT-B/16 (9% of a bf16 training step on an AMX
            # CPU). In inference TensorFlow fuses the GELU into the matmul
            # before it, so there it stays in the compute dtype.
            return ops.cast(keras.activations.gelu(ops.cast(y, "float32"), approximate=self.gelu_approximate), y.dtype)
        return keras.activations.gelu(y, approximate=self.gelu_approximate)

    def _dropout(self, y, training):
        # No layer call where it does nothing (see _norm).
        return self.dropout(y, training=training) if training and self.dropout_rate else y

    def _residual_branch(self, y, batch, training):
        """Dropout, then drop-path, which drops whole images: it needs the batch axis back."""
        y = self._dropout(y, training)
        if training and self.drop_path_rate:
            y = _reshape(self.drop_path(_reshape(y, (batch, -1, y.shape[-1])), training=training), (-1, y.shape[-1]))
        return y

    def _call_keras_attention(self, inputs, training, return_attention_scores):
        """The same block through `MultiHeadAttention`: attention maps, attention dropout, int8."""
        x = self.norm1(inputs)
        attended = self.attention(
            x, x, training=training, return_attention_scores=return_attention_scores
        )
        if return_attention_scores:
            attended, scores = attended
        x = inputs + self.drop_path(self.dropout(attended, training=training), training=training)

        y = self.norm2(x)
        y = self.mlp_in(y)
        y = keras.activations.gelu(y, approximate=self.gelu_approximate)
        y = self.dropout(y, training=training)
        y = self.mlp_out(y)
        y = self.dropout(y, training=training)
        outputs = x + self.drop_path(y, training=training)
        if return_attention_scores:
            return outputs, scores
        return outputs

    def get_config(self):
        config = super().get_config()
        config.update(
            num_heads=self.num_heads,
            mlp_dim=self.mlp_dim,
            dropout_rate=self.dropout_rate,
            attention_dropout_rate=self.attention_dropout_rate,
            drop_path_rate=self.drop_path_rate,
            gelu_approximate=self.gelu_approximate,
        )
        return config


@serializable
class TokenPooling(layers.Layer):
    """Reduces a token sequence to one feature vector.

    "token": the class token (position 0); "gap": the mean of the patch tokens
    (the `num_prefix_tokens` leading tokens left out).
    """

    MODES = ("token", "gap")

    def __init__(self, mode="token", num_prefix_tokens=1, **kwargs):
        super().__init__(**kwargs)
        if mode not in self.MODES:
            raise ValueError(f"Unknown pooling {mode!r}; use one of {self.MODES} or None.")
        if mode == "token" and num_prefix_tokens < 1:
            raise ValueError('pooling="token" needs a class token; use pooling="gap".')
        self.mode = mode
        self.num_prefix_tokens = int(num_prefix_tokens)

    def call(self, tokens):
        if self.mode == "token":
            return tokens[:, 0]
        return ops.mean(tokens[:, self.num_prefix_tokens :], axis=1)

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[-1])

    def get_config(self):
        config = super().get_config()
        config.update(mode=self.mode, num_prefix_tokens=self.num_prefix_tokens)
        return config

