"""`keras-vit demo`: the whole life of a Vision Transformer, offline, in minutes.

On scikit-learn's handwritten digits (shipped with scikit-learn, no
download): build a small ViT, train it with a progress bar, report its
accuracy on held-out digits, save it as `.keras`, export it for TF Serving,
load that export back and classify held-out digits through its
`serving_default` signature (PNG bytes in, labels out), and draw what the
model attends to. Everything lands in one folder, printed at the end.

    python -m keras_vit.demo            # or: keras-vit demo [--output-dir DIR] [--epochs N] [--seed N]
"""

import io
import math
import os
import time

import keras
import numpy as np

from keras_vit.labels import labels_file_for

# A ViT small enough to train on two CPU cores in a minute or two: the 8x8
# digits are upsampled to 32x32 and cut into a 4x4 grid of 8x8 patches.
IMAGE_SIZE = 32
MODEL_CONFIG = dict(patch_size=8, hidden_size=64, depth=4, num_heads=4, mlp_dim=128)
EPOCHS = 25
BATCH_SIZE = 64
PEAK_LEARNING_RATE = 2e-3
WARMUP_EPOCHS = 2
WEIGHT_DECAY = 0.05
CLASS_NAMES = [str(digit) for digit in range(10)]
ACCURACY_BAR = 0.95  # `keras-vit demo` exits with an error below this

MODEL_FILE = "digits_vit.keras"
OUTPUT_FILES = dict(model=MODEL_FILE, labels=labels_file_for(MODEL_FILE), export="serving", attention="attention.png")


def load_digits(image_size=IMAGE_SIZE):
    """scikit-learn's 1797 8x8 digits as RGB [0, 255] float32 images, upsampled.

    Returns ((train_images, train_labels), (held_out_images, held_out_labels)):
    `keras_vit.data.digits`' fixed, stratified 80/20 split.
    """
    try:
        import sklearn  # noqa: F401
    except ImportError:
        raise ImportError("The demo's digits come with scikit-learn: pip install scikit-learn.") from None
    from keras_vit import data

    (train_x, train_y), (test_x, test_y) = data.digits(image_size)
    return (train_x.astype("float32"), train_y), (test_x.astype("float32"), test_y)


def build_model(image_size=IMAGE_SIZE):
    """The demo's ViT: 32x32 RGB pixels in [0, 255] -> 10 digit probabilities."""
    from keras_vit.models import ViT

    return ViT(
        **MODEL_CONFIG, input_shape=(image_size, image_size, 3), classes=len(CLASS_NAMES), name="digits_vit"
    )


def learning_rate(epoch, epochs):
    """Linear warm-up, then cosine decay to zero (the paper's schedule, per epoch)."""
    if epoch < WARMUP_EPOCHS:
        return PEAK_LEARNING_RATE * (epoch + 1) / WARMUP_EPOCHS
    progress = (epoch - WARMUP_EPOCHS) / max(1, epochs - WARMUP_EPOCHS)
    return PEAK_LEARNING_RATE * 0.5 * (1.0 + math.cos(math.pi * progress))


def train(model, images, labels, epochs=EPOCHS, progress=True):
    """AdamW with warm-up and cosine decay; returns the Keras history."""
    model.compile(
        # A per-epoch schedule (a callback) instead of a LearningRateSchedule
        # object: the object is traced into every variable's update, which
        # costs this small model half a minute of graph building on a CPU.
        optimizer=keras.optimizers.AdamW(PEAK_LEARNING_RATE, weight_decay=WEIGHT_DECAY),
        loss="sparse_categorical_crossentropy",
        metrics=["accuracy"],
        jit_compile=False,  # XLA doubles this small model's CPU time (and compiles twice: last batch)
    )
    callbacks = [keras.callbacks.LearningRateScheduler(lambda epoch, _: learning_rate(epoch, epochs))]
    if progress:
        callbacks.append(ProgressBar(epochs * math.ceil(len(images) / BATCH_SIZE)))
    return model.fit(images, labels, batch_size=BATCH_SIZE, epochs=epochs, verbose=0, callbacks=callbacks)


class ProgressBar(keras.callbacks.Callback):
    """One tqdm bar over all training steps, with the running loss and accuracy."""

    def __init__(self, total_steps):
        super().__init__()
        self.total_steps = total_steps
        self.bar = None
        self.epoch = 0

    def on_train_begin(self, logs=None):
        from tqdm.auto import tqdm

        self.bar = tqdm(total=self.total_steps, desc="training", unit="step")

    def on_epoch_begin(self, epoch, logs=None):
        self.epoch = epoch + 1

    def on_train_batch_end(self, batch, logs=None):
        logs = logs or {}
        self.bar.set_postfix(
            epoch=self.epoch, loss=f"{logs.get('loss', float('nan')):.3f}",
            accuracy=f"{logs.get('accuracy', float('nan')):.3f}", refresh=False,
        )
        self.bar.update(1)

    def on_train_end(self, logs=None):
        self.bar.close()


def encode_png(image):
    """(height, width, 3) [0, 255] pixels -> PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.asarray(image).round().clip(0, 255).astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def classify_with_export(version_dir, images):
    """Loads a SavedModel written by `export_for_serving` and classifies
    `images` through `serving_default`, as TF Serving would: PNG bytes in."""
    import tensorflow as tf

    serve = tf.saved_model.load(version_dir).signatures["serving_default"]
    outputs = serve(images=tf.constant([encode_png(image) for image in images]))
    return [label.decode() for label in outputs["top_k_labels"].numpy()[:, 0]]


def run(output_dir="keras_vit_demo", epochs=EPOCHS, examples=8, progress=True, seed=0, accuracy_bar=ACCURACY_BAR):
    """Runs the demo; returns a dict of what it measured and wrote.

    A model whose held-out accuracy is below `accuracy_bar` is not published:
    nothing is written (files of an earlier run stay as they were; a new
    export version would be the one TF Serving picks up) and the result's
    "paths" is None.
    """
    from keras_vit import serving, visualize

    start = time.perf_counter()
    paths = {key: os.path.join(output_dir, name) for key, name in OUTPUT_FILES.items()}
    keras.utils.set_random_seed(seed)

    (train_x, train_y), (test_x, test_y) = load_digits()
    print(f"digits: {len(train_x)} for training, {len(test_x)} held out, {IMAGE_SIZE}x{IMAGE_SIZE} RGB")
    model = build_model()
    print(f"model: ViT with {model.count_params():,} parameters, "
          + ", ".join(f"{key}={value}" for key, value in MODEL_CONFIG.items()))
    train(model, train_x, train_y, epochs=epochs, progress=progress)
    probabilities = model.predict(test_x, batch_size=256, verbose=0)
    accuracy = float(np.mean(probabilities.argmax(axis=-1) == test_y))
    print(f"held-out accuracy: {accuracy:.2%} ({len(test_x)} digits never seen in training)")
    result = dict(accuracy=accuracy, paths=paths)
    if accuracy < accuracy_bar:
        print(f"below the {accuracy_bar:.0%} bar: nothing written to {output_dir}")
        result.update(paths=None, seconds=time.perf_counter() - start)
        return result

    os.makedirs(output_dir, exist_ok=True)
    model.save(paths["model"])
    with open(paths["labels"], "w", encoding="utf-8") as file:  # the names `keras-vit predict/export` give
        file.write("".join(name + "\n" for name in CLASS_NAMES))
    print(f"saved model: {paths['model']} (class names: {paths['labels']})")
    sample_x, sample_y = test_x[:examples], test_y[:examples]
    if keras.backend.backend() == "tensorflow":
        version_dir = serving.export_for_serving(model, paths["export"], class_names=CLASS_NAMES)
        paths["export"] = version_dir
        print(f"exported for TF Serving: {version_dir}")
        served = classify_with_export(version_dir, sample_x)
        truth = [CLASS_NAMES[label] for label in sample_y]
        print(f"served predictions of {len(served)} held-out digits: {' '.join(served)} (true: {' '.join(truth)})")
        result["served"], result["truth"] = served, truth
    else:
        print(f"skipped the TF Serving export: it needs KERAS_BACKEND=tensorflow (this is {keras.backend.backend()})")

    heatmaps = visualize.attention_rollout_maps(model, sample_x)
    predicted = probabilities[:examples].argmax(axis=-1)
    captions = [f"true {t}, predicted {p}" for t, p in zip(sample_y, predicted)]
    visualize.save_attention_overlay(sample_x, heatmaps, paths["attention"], captions=captions)
    print(f"attention maps (rollout): {paths['attention']}")

    result["seconds"] = time.perf_counter() - start
    print(f"done in {result['seconds']:.0f} s; everything is in {os.path.abspath(output_dir)}")
    return result


if __name__ == "__main__":
    import sys

    sys.exit(0 if run()["accuracy"] >= ACCURACY_BAR else 1)
