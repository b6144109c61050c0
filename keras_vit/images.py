"""Encoded image files -> RGB pixels: the one decoder of `keras-vit predict` and of an export's serving_default.

Both accept the same formats (`FORMATS`: what `tf.io.decode_image` reads in
every TensorFlow keras_vit supports; WebP only from TensorFlow 2.18 on, so
not here), refuse the rest with the same words, decode with the same
TensorFlow kernels, and refuse an image of more than `MAX_PIXELS` pixels
from its header, before anything is decoded or allocated. The functions
are TensorFlow ops: serving_default runs them in its graph, `read_image`
eagerly.

Two consequences of sharing the decoder: a 16-bit PNG becomes the same
8-bit pixels in both (TensorFlow keeps each sample's high byte, v >> 8;
Pillow's convert("RGB"), which predict used before, clipped 16-bit grey
to white), and a JPEG decodes to the same pixels in both (libjpeg
implementations differ in their rounding).
"""

import os
import re

from keras_vit.errors import UsageError

# (name, the file's first bytes), in the order the names are listed.
FORMATS = (
    ("JPEG", (b"\xff\xd8\xff",)),
    ("PNG", (b"\x89PNG\r\n\x1a\n",)),
    ("GIF", (b"GIF87a", b"GIF89a")),
    ("BMP", (b"BM",)),
)
FORMAT_NAMES = ", ".join(name for name, _ in FORMATS[:-1]) + f" or {FORMATS[-1][0]}"
FILE_SUFFIXES = (".jpg", ".jpeg", ".png", ".gif", ".bmp")  # how a folder's image files are told from the rest
# More than an 8K frame (33 MP) and most camera sensors, and a bound on memory:
# decoding and resizing such an image takes about 0.6 GB; a 69-byte PNG whose
# header claims 1 x 60,000,000 pixels must not be decoded at all.
MAX_PIXELS = 40_000_000
HEADER_BYTES = 32  # enough for the size fields of PNG, GIF and BMP


def format_index(encoded):
    """The index into FORMATS of one encoded file (a scalar string tensor),
    from its first bytes, or -1."""
    import tensorflow as tf

    matched = tf.stack([
        tf.reduce_any([tf.strings.substr(encoded, 0, len(magic)) == magic for magic in magics])
        for _, magics in FORMATS
    ])
    return tf.where(tf.reduce_any(matched), tf.argmax(tf.cast(matched, tf.int32), output_type=tf.int32), -1)


def inspect(encoded):
    """(format index into FORMATS or -1, height, width) of one encoded file
    (a scalar string tensor), from its header alone; 0 x 0 for no format."""
    import tensorflow as tf

    index = format_index(encoded)
    head = tf.strings.substr(tf.strings.join([tf.strings.substr(encoded, 0, HEADER_BYTES), b"\0" * HEADER_BYTES]),
                             0, HEADER_BYTES)
    head = tf.cast(tf.io.decode_raw(head, tf.uint8), tf.int64)

    def number(start, length, big_endian=False, signed=False):
        digits = head[start:start + length]
        digits = digits if big_endian else tf.reverse(digits, [0])
        value = tf.reduce_sum(digits * tf.constant([256 ** i for i in reversed(range(length))], tf.int64))
        return tf.where(value >= 2 ** (8 * length - 1), value - 2 ** (8 * length), value) if signed else value

    sizes = {  # (height, width) as each format's decoder reads them
        "JPEG": lambda: tf.cast(tf.image.extract_jpeg_shape(encoded)[:2], tf.int64),
        "PNG": lambda: tf.stack([number(20, 4, big_endian=True), number(16, 4, big_endian=True)]),
        "GIF": lambda: tf.stack([number(8, 2), number(6, 2)]),
        "BMP": lambda: tf.abs(tf.stack([number(22, 4, signed=True), number(18, 4, signed=True)])),
    }
    size = tf.switch_case(index, [sizes[name] for name, _ in FORMATS],
                          default=lambda: tf.zeros([2], tf.int64))
    return index, size[0], size[1]


def decode(encoded):
    """One encoded file -> uint8 (height, width, 3) RGB (an animation's first frame)."""
    import tensorflow as tf

    return tf.io.decode_image(encoded, channels=3, expand_animations=False)


def checked_decode(encoded, name):
    """`decode` inside a graph, after two checks that fail with a message
    starting with `name` (the signature): a known format, at most MAX_PIXELS."""
    import tensorflow as tf

    index, height, width = inspect(encoded)
    known = tf.debugging.Assert(
        index >= 0, [f"{name}: input is not a {FORMAT_NAMES} image; its first bytes:", tf.strings.substr(encoded, 0, 8)]
    )
    with tf.control_dependencies([known]):
        small = tf.debugging.Assert(
            height * width <= MAX_PIXELS,
            [f"{name}: the image is larger than {MAX_PIXELS:,} pixels; its height and width:", height, width],
        )
    with tf.control_dependencies([small]):
        return decode(encoded)


def read_image(path):
    """An image file as numpy uint8 (height, width, 3) RGB, decoded exactly as
    serving_default decodes it, or a one-line UsageError."""
    import tensorflow as tf

    if not os.path.exists(path):
        raise UsageError(f"{path}: no such file.")
    if os.path.isdir(path):
        raise UsageError(f"{path}: is a folder, not an image file.")
    with open(path, "rb") as file:
        encoded = tf.constant(file.read())
    try:
        index, height, width = (int(value) for value in inspect(encoded))
        if index < 0:
            raise UsageError(f"{path}: not a readable image (not a {FORMAT_NAMES} file).")
        if height * width > MAX_PIXELS:
            raise UsageError(
                f"{path}: {width}x{height} is more than {MAX_PIXELS:,} pixels (keras_vit.images.MAX_PIXELS); "
                "resize it first."
            )
        return decode(encoded).numpy()
    except tf.errors.OpError as error:
        raise UsageError(f"{path}: not a readable image ({_op_reason(error)}).") from None


def _op_reason(error):
    """A TensorFlow op error's own words, without the kernel's name around them."""
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:.*$", "", text.strip().splitlines()[0] if text.strip() else type(error).__name__)
