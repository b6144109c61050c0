"""Self-supervised pre-training: masked patch prediction, as in the paper (§4.6, Appendix B.1.2).

    encoder = keras_vit.ViT_B16(include_top=False)
    mpp = keras_vit.pretraining.MaskedPatchPrediction(encoder)      # the paper's settings
    mpp.compile(optimizer=keras.optimizers.Adam(2e-4))               # no loss: the model adds its own
    mpp.fit(images_in_0_255, epochs=...)                             # no labels
    mpp.encoder.save_weights("ssl.weights.h5")
    model = keras_vit.ViT_B16(weights="ssl.weights.h5", classes=10)  # a new zero head

The paper (Appendix B.1.2): 50% of the patch embeddings of each image are
corrupted; of those, 80% are replaced by a learnable [mask] embedding, 10% by
the embedding of another random patch (of the same image) and 10% are kept
unchanged. Each corrupted patch's own output token predicts the 3-bit mean
colour of the patch (512 classes). It also tried a 4x4 downsampled patch in
3-bit colour (16 predictions of 512 classes) and L2 regression on the whole
patch: "all worked quite well, though L2 was slightly worse"; a 15%
corruption rate was slightly worse. Its recipe (`training.masked_patch_recipe`):
1M steps on JFT, batch 4096, Adam, learning rate 2e-4, 10k warm-up steps,
cosine decay. ViT-B/16 then reaches 79.9% on ImageNet after fine-tuning
(§4.6): 2% above training from scratch, 4% below supervised pre-training.

The corruption is applied to the patch embeddings (after the ResNet stem of
a hybrid), before the class token and the position embedding are added, as a
BERT-style token mask (so the mask token lives in embedding space, not in
pixel space). Exactly round(corruption_rate x tokens) patches of every image
are corrupted, chosen by top-k of uniform noise: shapes are static, the step
compiles with XLA.
"""

import math

import keras
from keras import layers, ops

from keras_vit.layers import PIXEL_OFFSET, PIXEL_SCALE, as_pair, serializable
from keras_vit.views import transformer_blocks

TARGETS = ("mean_color", "downsampled", "pixels")
DOWNSAMPLED_GRID = 4  # the paper's 4x4 downsampled patch: 16 predictions per patch
MASK_TOKEN_STDDEV = 0.02


# ---------------------------------------------------------------------------
# Targets, from pixels in [0, 255]
# ---------------------------------------------------------------------------


def _patch_pixels(images, patch_size):
    """(batch, H, W, C) -> (batch, rows, cols, ph, pw, C), patches in row-major order."""
    ph, pw = as_pair(patch_size)
    height, width, channels = images.shape[1], images.shape[2], images.shape[3]
    if height is None or width is None:
        raise ValueError("Masked patch targets need images of a known height and width.")
    if height % ph or width % pw:
        raise ValueError(
            f"Images of {height}x{width} are not whole {ph}x{pw} patches: give a multiple of the patch size."
        )
    rows, cols = height // ph, width // pw
    x = ops.reshape(images, (-1, rows, ph, cols, pw, channels))
    return ops.transpose(x, (0, 1, 3, 2, 4, 5))


def _color_classes(sums, count, bits):
    """Per-channel sums over `count` pixels (..., 3) -> the colour class: each
    channel's floor(mean * 2^bits / 256), then (r * 2^bits + g) * 2^bits + b."""
    levels = 2**bits
    # sums * 2^bits is exact in float32; one rounded division.
    codes = ops.floor(sums * float(levels) / (256.0 * count))
    codes = ops.cast(ops.clip(codes, 0, levels - 1), "int32")
    return (codes[..., 0] * levels + codes[..., 1]) * levels + codes[..., 2]


def mean_color_targets(images, patch_size, bits=3):
    """The paper's target: each patch's mean colour in `bits` bits per channel.

    Args:
        images: (batch, height, width, 3) pixels in [0, 255] (before the
            model's scaling), height and width multiples of the patch size.
        patch_size: the patch side in input pixels (for a hybrid: the patch
            size times the ResNet's stride), or a (rows, cols) pair.
        bits: bits per channel (3: 512 classes).

    Returns int32 (batch, rows * cols) in token order (row-major): each
    channel's patch mean goes to floor(mean * 2^bits / 256), and
    class = (r * 2^bits + g) * 2^bits + b.
    """
    images = ops.cast(ops.convert_to_tensor(images), "float32")
    patches = _patch_pixels(images, patch_size)
    ph, pw = as_pair(patch_size)
    sums = ops.sum(patches, axis=(3, 4))  # (batch, rows, cols, 3)
    classes = _color_classes(sums, ph * pw, bits)
    return ops.reshape(classes, (ops.shape(classes)[0], -1))


def downsampled_targets(images, patch_size, bits=3, grid=DOWNSAMPLED_GRID):
    """The paper's second target: each patch downsampled to `grid` x `grid`
    sub-patches, each coded as `mean_color_targets` codes a patch.

    Returns int32 (batch, rows * cols, grid * grid), sub-patches row-major
    within their patch. The patch size must be a multiple of `grid`.
    """
    ph, pw = as_pair(patch_size)
    if ph % grid or pw % grid:
        raise ValueError(
            f'target="downsampled" needs a patch size divisible by {grid}, got {ph}x{pw}: use "mean_color".'
        )
    images = ops.cast(ops.convert_to_tensor(images), "float32")
    codes = mean_color_targets(images, (ph // grid, pw // grid), bits)  # (batch, fine grid)
    height, width = images.shape[1], images.shape[2]
    rows, cols = height // ph, width // pw
    codes = ops.reshape(codes, (-1, rows, grid, cols, grid))
    codes = ops.transpose(codes, (0, 1, 3, 2, 4))
    return ops.reshape(codes, (-1, rows * cols, grid * grid))


def pixel_targets(images, patch_size):
    """The paper's third target: each patch's pixels scaled to [-1, 1]
    (batch, rows * cols, ph * pw * 3), in (row, column, channel) order."""
    images = ops.cast(ops.convert_to_tensor(images), "float32")
    patches = _patch_pixels(images, patch_size)
    shape = patches.shape
    patches = ops.reshape(patches, (-1, shape[1] * shape[2], shape[3] * shape[4] * shape[5]))
    return patches * PIXEL_SCALE + PIXEL_OFFSET


def corrupted_count(tokens, corruption_rate):
    """round(corruption_rate x tokens), halves rounded up, at least one."""
    return max(1, min(tokens, int(math.floor(corruption_rate * tokens + 0.5))))


# ---------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------


@serializable
class MaskedPatchPrediction(keras.Model):
    """Masked patch prediction (§4.6, Appendix B.1.2) around a keras_vit encoder.

    Args:
        encoder: a keras_vit model (any constructor, a hybrid or `ViT(...)`,
            with or without head; the head is not used). Its layers are
            shared: training this model trains `encoder`.
        target: "mean_color" (the paper's: 3-bit mean colour, 512 classes),
            "downsampled" (4x4 sub-patches in 3-bit colour, 16 x 512 classes)
            or "pixels" (L2 regression on the patch scaled to [-1, 1]).
        corruption_rate: the fraction of each image's patches corrupted
            (0.5; exactly round(rate x patches) per image).
        mask_rate, random_rate: of the corrupted patches, the fractions
            replaced by the learnable mask embedding (0.8) and by another
            random patch of the same image (0.1); the rest stay unchanged.
        bits: bits per colour channel of the colour targets (3).
        seed: seed of the corruption draws.

    Called on images (what `encoder` takes: [0, 255] pixels with the default
    `include_preprocessing=True`, else [-1, 1]), it returns the predictions
    for the corrupted patches, (batch, corrupted, outputs), and adds the
    loss: cross-entropy (mean squared error for "pixels") averaged over the
    corrupted patches only. Compile without a loss and fit on images alone;
    it also trains in `keras_vit.training.Trainer` and under tf.distribute.

    `encoder` is the plain model to keep: `mpp.encoder.save_weights(path)`;
    the mask token and the prediction head (`mask_token`, `head`) are not
    part of it. Build it with `include_top=False` (a head would get no
    gradient, and Keras warns about it) and a fixed input size (the number
    of corrupted patches must be known when the step is traced).
    """

    def __init__(self, encoder, target="mean_color", corruption_rate=0.5, mask_rate=0.8, random_rate=0.1,
                 bits=3, seed=None, **kwargs):
        if target not in TARGETS:
            raise ValueError(f"Unknown target {target!r}; use one of {', '.join(TARGETS)}.")
        if not 0 < corruption_rate <= 1:
            raise ValueError(f"corruption_rate must be in (0, 1], got {corruption_rate}.")
        if mask_rate < 0 or random_rate < 0 or mask_rate + random_rate > 1:
            raise ValueError(
                f"mask_rate ({mask_rate}) and random_rate ({random_rate}) must be at least 0 and sum to at most 1."
            )
        if not 1 <= bits <= 8:
            raise ValueError(f"bits must be 1 to 8 per channel, got {bits}.")
        names = {layer.name for layer in getattr(encoder, "layers", ())}
        missing = [n for n in ("patch_embed", "position_embedding", "encoder_norm") if n not in names]
        if missing:
            raise ValueError(
                f"{getattr(encoder, 'name', encoder)!r} is not a keras_vit model (no {', '.join(missing)} layer): "
                "give a model built by keras_vit.ViT or a constructor."
            )
        kwargs.setdefault("name", f"{encoder.name}_mpp")
        super().__init__(**kwargs)
        self.encoder = encoder
        self.target = target
        self.corruption_rate = float(corruption_rate)
        self.mask_rate = float(mask_rate)
        self.random_rate = float(random_rate)
        self.bits = int(bits)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed, name="corruption_seed")

        patch_embed = encoder.get_layer("patch_embed")
        self.patch_size = patch_embed.patch_size  # on the stem's feature map for a hybrid
        stride = 1
        self.has_stem = "resnet_stem" in names
        if self.has_stem:
            from keras_vit.hybrid import total_stride

            stride = total_stride(encoder.get_layer("resnet_stem").block_sizes)
        self.patch_pixels = (self.patch_size[0] * stride, self.patch_size[1] * stride)
        self.scales_pixels = "rescaling" in names
        self.num_prefix_tokens = 1 if "class_token" in names else 0
        width = patch_embed.hidden_size
        if target == "downsampled" and (self.patch_pixels[0] % DOWNSAMPLED_GRID or self.patch_pixels[1] % DOWNSAMPLED_GRID):
            raise ValueError(
                f'target="downsampled" needs patches of a multiple of {DOWNSAMPLED_GRID} pixels, '
                f"this encoder's are {self.patch_pixels[0]}x{self.patch_pixels[1]}: use \"mean_color\"."
            )
        classes = 2 ** (3 * self.bits)
        self.num_outputs = {
            "mean_color": classes,
            "downsampled": DOWNSAMPLED_GRID**2 * classes,
            "pixels": self.patch_pixels[0] * self.patch_pixels[1] * 3,
        }[target]
        self.mask_token = self.add_weight(
            shape=(1, 1, width),
            initializer=keras.initializers.RandomNormal(stddev=MASK_TOKEN_STDDEV),
            name="mask_token",
        )
        # float32 predictions: a stable softmax under mixed precision.
        self.head = layers.Dense(self.num_outputs, dtype="float32", name="mpp_head")
        self.head.build((None, None, width))
        self.built = True

    # --- corruption --------------------------------------------------------

    def corrupt(self, tokens):
        """Corrupts the patch embeddings `tokens` (batch, patches, width).

        Returns a dict: "tokens" (corrupted), "positions" (batch, k) int32
        (the corrupted patches, k = round(corruption_rate x patches)),
        "masked" and "replaced" (batch, patches) bools (which took the mask
        embedding, which another patch's), "source" (batch, patches) int32
        (the patch each would be replaced by, never itself).
        """
        num = tokens.shape[1]
        if num is None:
            raise ValueError(
                "MaskedPatchPrediction needs a known number of patches: give the encoder a fixed input_shape "
                "or feed batches of a fixed image size."
            )
        batch = ops.shape(tokens)[0]
        k = corrupted_count(num, self.corruption_rate)
        noise = keras.random.uniform((batch, num), seed=self.seed_generator)
        _, positions = ops.top_k(noise, k, sorted=False)
        positions = ops.cast(positions, "int32")
        selected = ops.any(ops.equal(positions[:, :, None], ops.arange(num, dtype="int32")[None, None, :]), axis=1)
        draw = keras.random.uniform((batch, num), seed=self.seed_generator)
        masked = ops.logical_and(selected, draw < self.mask_rate)
        replaced = ops.logical_and(
            selected, ops.logical_and(draw >= self.mask_rate, draw < self.mask_rate + self.random_rate)
        )
        # Another patch of the same image: uniform over the num - 1 others.
        others = max(num - 1, 1)
        offset = ops.cast(ops.floor(keras.random.uniform((batch, num), seed=self.seed_generator) * others), "int32")
        offset = ops.minimum(offset, others - 1)
        own = ops.arange(num, dtype="int32")[None, :]
        source = offset + ops.cast(ops.logical_and(offset >= own, num > 1), "int32")
        replacement = ops.take_along_axis(tokens, ops.expand_dims(source, -1), axis=1)
        mask = ops.cast(self.mask_token, tokens.dtype)
        corrupted = ops.where(ops.expand_dims(replaced, -1), replacement, tokens)
        corrupted = ops.where(ops.expand_dims(masked, -1), mask, corrupted)
        return {"tokens": corrupted, "positions": positions, "masked": masked, "replaced": replaced, "source": source}

    # --- forward and loss --------------------------------------------------

    def _check_size(self, images):
        """The encoder's layers are called one by one here, past its input
        check: a fixed-size encoder refuses another size in one line."""
        expected, got = tuple(self.encoder.input_shape[1:3]), tuple(images.shape[1:3])
        if None not in expected and None not in got and got != expected:
            error = ValueError(
                f"{self.encoder.name} takes {expected[0]}x{expected[1]} images, got {got[0]}x{got[1]}: resize them "
                "(the keras_vit.data pipelines' image_size), or build the encoder for that size."
            )
            error._keras_call_info_injected = True  # one line, not Keras's "Exception encountered when calling"
            raise error

    def call(self, images, training=None):
        encoder = self.encoder
        self._check_size(images)
        x = images
        if self.scales_pixels:
            x = encoder.get_layer("rescaling")(x)
        scaled = x
        if self.has_stem:
            x = encoder.get_layer("resnet_stem")(x, training=training)
        tokens = encoder.get_layer("patch_embed")(x)
        if x.shape[1] is not None and x.shape[2] is not None:  # a static patch count for top-k
            num = (x.shape[1] // self.patch_size[0]) * (x.shape[2] // self.patch_size[1])
            tokens = ops.reshape(tokens, (ops.shape(tokens)[0], num, tokens.shape[-1]))
        corruption = self.corrupt(tokens)
        x = corruption["tokens"]
        if self.num_prefix_tokens:
            x = encoder.get_layer("class_token")(x)
        position_embedding = encoder.get_layer("position_embedding")
        x = position_embedding(x, scaled) if position_embedding.patch_pixels is not None else position_embedding(x)
        x = encoder.get_layer("embedding_dropout")(x, training=training)
        for block in transformer_blocks(encoder):
            x = block(x, training=training)
        x = encoder.get_layer("encoder_norm")(x)
        patches = x[:, self.num_prefix_tokens :]
        positions = corruption["positions"]
        # Each corrupted patch is predicted from its own output token.
        chosen = ops.take_along_axis(patches, ops.expand_dims(positions, -1), axis=1)
        predictions = self.head(chosen)
        self.add_loss(self._loss(images, positions, predictions))
        return predictions

    def targets(self, images):
        """The target of every patch of `images` (what `encoder` takes):
        int32 (batch, patches) for "mean_color", (batch, patches, 16) for
        "downsampled", float (batch, patches, pixels) for "pixels"."""
        pixels = ops.cast(images, "float32")
        if not self.scales_pixels:  # [-1, 1] -> [0, 255]
            pixels = (pixels - PIXEL_OFFSET) / PIXEL_SCALE
        if self.target == "mean_color":
            return mean_color_targets(pixels, self.patch_pixels, self.bits)
        if self.target == "downsampled":
            return downsampled_targets(pixels, self.patch_pixels, self.bits)
        return pixel_targets(pixels, self.patch_pixels)

    def _loss(self, images, positions, predictions):
        targets = self.targets(images)
        if self.target == "mean_color":
            chosen = ops.take_along_axis(targets, positions, axis=1)
        else:
            chosen = ops.take_along_axis(targets, ops.expand_dims(positions, -1), axis=1)
        if self.target == "pixels":
            return ops.mean(ops.square(predictions - chosen))
        if self.target == "downsampled":
            shape = ops.shape(predictions)
            predictions = ops.reshape(predictions, (shape[0], shape[1], DOWNSAMPLED_GRID**2, -1))
        return ops.mean(keras.losses.sparse_categorical_crossentropy(chosen, predictions, from_logits=True))

    # --- serialization -----------------------------------------------------

    def get_config(self):
        return {
            "name": self.name,
            "encoder": keras.saving.serialize_keras_object(self.encoder),
            "target": self.target,
            "corruption_rate": self.corruption_rate,
            "mask_rate": self.mask_rate,
            "random_rate": self.random_rate,
            "bits": self.bits,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config, custom_objects=None):
        config = dict(config)
        encoder = keras.saving.deserialize_keras_object(config.pop("encoder"), custom_objects=custom_objects)
        return cls(encoder, **config)

