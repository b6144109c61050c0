"""What examples/finetune.py and examples/pretrain.py share: their absl flags,
one-line errors, and the run itself (strategy -> data -> model -> train).

On TensorFlow (the default) the run uses a tf.distribute strategy
(--strategy); on JAX (KERAS_BACKEND=jax) a keras.distribution
(--distribution data or model:N), started across processes from Keras's
KERAS_DISTRIBUTION_* environment variables when they are set.

The scripts differ only in their defaults and their recipe (see
keras_vit.training); everything else, including fault tolerance, lives in
keras_vit.training.train.
"""

import ast
import os
import sys

os.environ.setdefault("KERAS_BACKEND", "tensorflow")  # tf.distribute needs it; KERAS_BACKEND=jax for --distribution
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from keras_vit.errors import UsageError, first_line  # noqa: E402

FLAGS = flags.FLAGS
OUR_FLAGS = []  # the flags these scripts define, for error messages
# Flags a resumed run may change: where and how it runs (micro-batches make
# the same updates as whole batches) and what it evaluates. Every other flag
# defines the run (its batches, model, schedule), so a resume under another
# value is refused (keras_vit.training.train's settings).
NOT_THE_RUN = {"eval_dataset", "data_dir", "eval_batch_size", "strategy", "distribution", "tpu", "cpu_replicas",
               "accum_steps", "jit_compile", "model_dir", "save_every"}


def _define(kind, name, default, help, **kwargs):
    getattr(flags, f"DEFINE_{kind}")(name=name, default=default, help=help, **kwargs)
    OUR_FLAGS.append(name)


def define_flags(*, model, image_size, batch_size):
    """The flags both scripts take; `model`, `image_size`, `batch_size` are
    the script's defaults."""
    from keras_vit import training

    _define("string", "model", model, "a constructor name (ViT_Ti16 ... ViT_H14), or ViT with --model_args")
    _define("string", "model_args", "", "more constructor arguments, key=value[,key=value], e.g. "
            "patch_size=8,hidden_size=32,depth=2,num_heads=4,mlp_dim=64 with --model ViT")
    _define("string", "weights", None, "passed to the constructor: a checkpoint tag, an official .npz or a .weights.h5")
    _define("string", "dataset", None, "a TFDS name (cifar10, cifar100, oxford_iiit_pet, oxford_flowers102, "
            "imagenet2012), digits (scikit-learn's offline digits) or an image folder (one sub-folder per class)")
    _define("string", "eval_dataset", None, "the dataset to evaluate on (default --dataset; e.g. imagenet_v2)")
    _define("string", "data_dir", None, "the TFDS data directory")
    _define("integer", "image_size", image_size, "training and evaluation resolution", lower_bound=1)
    _define("integer", "batch_size", batch_size, "global batch size, split across replicas", lower_bound=1)
    _define("integer", "eval_batch_size", None, "global evaluation batch size (default --batch_size)", lower_bound=1)
    _define("integer", "steps", None, "optimizer updates (default: the recipe's)", lower_bound=1)
    _define("integer", "warmup_steps", None, "linear warm-up steps (default: the recipe's)", lower_bound=0)
    _define("float", "learning_rate", None, "base learning rate (default: the recipe's)", lower_bound=0)
    _define("integer", "accum_steps", 1, "micro-batches per update (gradient accumulation)", lower_bound=1)
    _define("float", "randaugment", None, "RandAugment magnitude factor in [0, 1] (off by default)",
            lower_bound=0, upper_bound=1)
    _define("float", "mixup", None, "MixUp alpha (off by default)", lower_bound=0)
    _define("bool", "mixed_precision", False, "mixed_float16 on GPUs, mixed_bfloat16 elsewhere")
    _define("enum", "strategy", "auto", "tf.distribute strategy (TensorFlow backend)",
            enum_values=list(training.STRATEGIES))
    _define("string", "distribution", None, "keras.distribution on the JAX backend (KERAS_BACKEND=jax): data "
            "(DataParallel over every device) or model:N (ModelParallel: each model split over N devices by "
            "keras_vit.training.layout_map, the batch over the others). Several processes (hosts): set "
            "KERAS_DISTRIBUTION_JOB_ADDRESSES (the coordinator's host:port first), KERAS_DISTRIBUTION_NUM_PROCESSES "
            "and KERAS_DISTRIBUTION_PROCESS_ID (0 on the coordinator) in each; --batch_size is global")
    _define("string", "tpu", None, "the TPU for --strategy tpu: a Cloud TPU name, or local on a TPU VM")
    _define("integer", "cpu_replicas", 0, "split the CPU into this many logical devices (tf.distribute without GPUs)",
            lower_bound=0)
    _define("enum", "jit_compile", "auto", "XLA-compile the train step (auto: Keras's choice, off on CPUs and under tf.distribute)",
            enum_values=["auto", "true", "false"])
    _define("string", "model_dir", None, "checkpoints, TensorBoard logs, model.keras and results.json; "
            "a run started again with the same model_dir resumes")
    _define("integer", "save_every", 100, "checkpoint every this many steps", lower_bound=1)
    _define("integer", "seed", 0, "seed of the data order, augmentation and initialisation")
    flags.mark_flags_as_required(["dataset", "model_dir"])


def fail(message):
    print(f"{os.path.basename(sys.argv[0])}: error: {message}", file=sys.stderr)
    sys.exit(2)


def _parse_flags(argv):
    try:
        return FLAGS(argv)
    except flags.Error as error:
        message = str(error).strip().splitlines()[0]  # absl: "flag --x=y: what is wrong"
        if "Unknown command line flag" in message:
            message += f" (flags: {', '.join('--' + n for n in OUR_FLAGS)})"
        fail(message)


def run(build_recipe):
    """Runs a script: `build_recipe(train_source, model_variant)` -> Recipe."""
    app.run(lambda argv: _main(argv, build_recipe), flags_parser=_parse_flags)


def _main(argv, build_recipe):
    from absl import logging

    if not FLAGS["verbosity"].present:
        logging.set_verbosity(logging.WARNING)  # TensorFlow's INFO lines drown the progress
    if len(argv) > 1:
        fail(f"unexpected arguments {argv[1:]}; all options are --flags (see --helpshort)")
    try:
        setup = _setup(build_recipe)
    except (UsageError, ValueError, FileNotFoundError, NotADirectoryError, PermissionError) as error:
        fail(first_line(error))
    try:
        _train(*setup)
    except UsageError as error:  # a resume under other flags
        fail(first_line(error))


def _setup(build_recipe):
    import keras

    from keras_vit import data, models, training

    strategy = _strategy()
    on_tpu = FLAGS.strategy == "tpu"
    if FLAGS.mixed_precision:
        if strategy.jax:
            on_gpu = keras.distribution.list_devices()[0].startswith("gpu")
        else:
            import tensorflow as tf

            on_gpu = bool(tf.config.list_logical_devices("GPU"))
        keras.mixed_precision.set_global_policy("mixed_float16" if on_gpu else "mixed_bfloat16")
    if FLAGS.model == "ViT":
        constructor, variant = models.ViT, "ViT"
    else:
        constructor = models.get_constructor(FLAGS.model)
        variant = getattr(constructor, "variant", FLAGS.model)
    model_args = _parse_model_args(FLAGS.model_args)

    masked = masked_patch_objective()
    train_source = data.source(FLAGS.dataset, "train", FLAGS.data_dir, labelled=not masked)
    eval_source = data.source(FLAGS.eval_dataset or FLAGS.dataset, "eval", FLAGS.data_dir, labelled=not masked)
    if not masked and eval_source.num_classes != train_source.num_classes:
        raise UsageError(
            f"--eval_dataset {eval_source.name} has {eval_source.num_classes} classes, "
            f"--dataset {train_source.name} {train_source.num_classes}"
        )
    with strategy.scope():  # the optimizer, like the model, must be made under the scope
        recipe = build_recipe(train_source, variant)
    replicas = strategy.num_replicas_in_sync
    if recipe.batch_size % (replicas * recipe.accum_steps):
        raise UsageError(
            f"--batch_size {recipe.batch_size} must be a multiple of replicas ({replicas}) x --accum_steps "
            f"({recipe.accum_steps})"
        )
    jit = {"true": True, "false": False}.get(FLAGS.jit_compile, "auto")  # Keras: off on CPUs and under tf.distribute

    keras.utils.set_random_seed(FLAGS.seed)
    size = FLAGS.image_size
    with strategy.scope():  # model, optimizer slots and metrics live on the strategy's devices
        # Masked patch prediction trains the encoder (no head) inside its
        # MaskedPatchPrediction, which adds its own loss; labels are unused.
        head = dict(include_top=False) if masked else dict(classes=train_source.num_classes)
        try:
            model = encoder = constructor(
                weights=FLAGS.weights,
                input_shape=(size, size, 3),
                **head,
                **{**recipe.model_kwargs, **model_args},
            )
        except TypeError as error:  # an argument the constructor does not take
            raise UsageError(f"--model {FLAGS.model} --model_args: {error}") from None
        if masked:
            from keras_vit import pretraining

            model = pretraining.MaskedPatchPrediction(
                encoder, target=FLAGS.target, corruption_rate=FLAGS.corruption_rate, seed=FLAGS.seed
            )
        trainer = training.Trainer(model, accum_steps=recipe.accum_steps)
        trainer.compile(
            optimizer=recipe.optimizer,
            loss=recipe.loss,
            metrics=[] if masked else [keras.metrics.CategoricalAccuracy(name="accuracy")],
            jit_compile=jit,
        )

    value_range = data.input_range(encoder)  # [0, 255] when the model scales pixels itself

    def train_data(start_step):
        return data.train_dataset(
            train_source,
            size,
            recipe.batch_size,
            seed=FLAGS.seed,
            start_step=start_step,
            value_range=value_range,
            randaugment=FLAGS.randaugment,
            mixup=FLAGS.mixup,
        )

    eval_batch, eval_images = FLAGS.eval_batch_size or recipe.batch_size, eval_source.num_examples
    # TPUs need static shapes; keras.distribution splits every batch evenly over its devices.
    whole_batches = on_tpu or strategy.distribution is not None
    if whole_batches:
        eval_batch, eval_images = _whole_eval_batches(eval_batch, eval_source, replicas)
    eval_data = data.eval_dataset(eval_source, size, eval_batch, value_range=value_range, drop_remainder=whole_batches)
    print(
        f"{FLAGS.model} on {train_source.name} ({train_source.num_classes} classes) at {size}x{size}, "
        f"{replicas} replica(s) ({strategy.name}), XLA {'on' if trainer.jit_compile else 'off'}.\n"
        f"{recipe.description}",
        flush=True,
    )
    return trainer, train_data, eval_data, eval_source, eval_images, recipe, strategy


def _whole_eval_batches(requested, source, replicas):
    """(batch, images evaluated) for an evaluation in whole batches that
    split evenly over `replicas`: the largest such batch, at most
    `requested`, that divides the eval set (no image left out), else the
    largest that fits in it. The batch size changes no result."""
    count = source.num_examples
    if count is None:  # unknown size: whole batches of what was asked
        return max(requested // replicas, 1) * replicas, None
    if count < replicas:
        raise UsageError(f"{source.name}'s {source.split} split has {count} images, fewer than the {replicas} "
                         "replicas that split each evaluation batch")
    sizes = range(replicas, min(requested, count) // replicas * replicas + 1, replicas)
    batch = max((b for b in sizes if count % b == 0), default=sizes[-1] if sizes else replicas)
    return batch, count // batch * batch


def _train(trainer, train_data, eval_data, eval_source, eval_images, recipe, strategy):
    from keras_vit import training

    results = training.train(
        trainer,
        train_data,
        recipe.total_steps,
        FLAGS.model_dir,
        save_every=min(FLAGS.save_every, recipe.total_steps),
        eval_data=eval_data,
        settings=_run_settings(recipe),
    )
    directory = training.process_directory(FLAGS.model_dir) if strategy.jax else training.task_directory(
        FLAGS.model_dir, strategy.tf_strategy)
    count = eval_source.num_examples
    evaluated = f"{eval_images or '?'}" if eval_images == count else f"{eval_images or 'whole batches'} of {count or '?'}"
    held_out = f"on {eval_source.name} ({eval_source.split}, {evaluated} images)"
    if masked_patch_objective():
        # The encoder alone (no mask token, no prediction head), for examples/finetune.py --weights.
        encoder_path = os.path.join(directory, ENCODER_WEIGHTS)
        trainer.model.encoder.save_weights(encoder_path)
        print(
            f"Trained {results['steps']} steps (from step {results['start_step']}) in {results['train_seconds']} s. "
            f"Held-out masked patch loss {held_out}: {results['eval']['loss']:.4f}. "
            f"Encoder: {encoder_path} (fine-tune: examples/finetune.py --model {FLAGS.model}{_model_flags()} "
            f"--weights {encoder_path})",
            flush=True,
        )
        return
    print(
        f"Trained {results['steps']} steps (from step {results['start_step']}) in {results['train_seconds']} s. "
        f"Held-out accuracy {held_out}: "
        f"{results['eval']['accuracy']:.4f}. Model: {os.path.join(directory, 'model.keras')}",
        flush=True,
    )


ENCODER_WEIGHTS = "encoder.weights.h5"


def _model_flags():
    """The flags beside --model that the encoder's architecture needs, as given."""
    model_args = f" --model_args {FLAGS.model_args}" if FLAGS.model_args else ""
    return f"{model_args} --image_size {FLAGS.image_size}"


def _run_settings(recipe):
    """What defines the run, for `training.train(settings=)` to compare on a
    resume: every flag but NOT_THE_RUN, as values rather than spellings
    (--model_args parsed, paths absolute, the recipe's steps, warm-up and
    learning rate whether given or defaulted)."""
    settings = {name: FLAGS[name].value for name in OUR_FLAGS if name not in NOT_THE_RUN}
    for name in ("dataset", "weights"):
        if settings[name] and os.path.exists(settings[name]):
            settings[name] = os.path.realpath(settings[name])
    settings["model_args"] = _parse_model_args(FLAGS.model_args)
    settings.update(steps=recipe.total_steps, warmup_steps=recipe.warmup_steps,
                    learning_rate=recipe.learning_rate.base_learning_rate)
    return settings


class _Strategy:
    """What the run needs of a tf.distribute strategy or a keras.distribution:
    a scope, the replica count, a name."""

    def __init__(self, tf_strategy=None, distribution=None):
        import contextlib

        from keras_vit import training

        self.tf_strategy, self.distribution = tf_strategy, distribution
        self.jax = tf_strategy is None
        if tf_strategy is not None:
            self.num_replicas_in_sync = tf_strategy.num_replicas_in_sync
            self.name = type(tf_strategy).__name__
        else:
            self.num_replicas_in_sync = training.sharding.replicas(distribution)
            self.name = "one device" if distribution is None else _describe(distribution)
        self._owner = tf_strategy or distribution
        self._nothing = contextlib.nullcontext

    def scope(self):
        return self._owner.scope() if self._owner is not None else self._nothing()


def _describe(distribution):
    mesh = distribution.device_mesh
    shape = " x ".join(f"{size} {name}" for size, name in zip(mesh.shape, mesh.axis_names))
    processes = f", {distribution.num_processes} processes" if distribution.num_processes > 1 else ""
    return f"{type(distribution).__name__}, mesh {shape}{processes}"


def _strategy():
    """The run's tf.distribute strategy (TensorFlow) or keras.distribution (JAX), from the flags."""
    import keras

    from keras_vit import training

    backend = keras.backend.backend()
    if backend == "jax":
        given = [f"--{name}" for name in ("strategy", "tpu", "cpu_replicas") if FLAGS[name].present]
        if given:
            raise UsageError(
                f"{', '.join(given)}: tf.distribute flags, for KERAS_BACKEND=tensorflow; on JAX use "
                "--distribution data or --distribution model:N"
            )
        training.initialize()  # several processes: from the KERAS_DISTRIBUTION_* variables, if set
        distribution = None
        if FLAGS.distribution:
            distribution = training.make_distribution(FLAGS.distribution)
            keras.distribution.set_distribution(distribution)
        return _Strategy(distribution=distribution)
    if backend != "tensorflow":
        raise UsageError(f"these scripts run on KERAS_BACKEND=tensorflow or jax (it is {backend})")
    if FLAGS.distribution:
        raise UsageError(
            f"--distribution {FLAGS.distribution}: keras.distribution needs KERAS_BACKEND=jax; on TensorFlow use "
            "--strategy (tf.distribute)"
        )
    if FLAGS.cpu_replicas:
        training.split_cpu(FLAGS.cpu_replicas)
    return _Strategy(tf_strategy=training.make_strategy(FLAGS.strategy, FLAGS.tpu))


def masked_patch_objective():
    """Whether this run is self-supervised (examples/pretrain.py --objective masked_patch)."""
    return "objective" in FLAGS and FLAGS.objective == "masked_patch"


def _parse_model_args(text):
    """"patch_size=8,hidden_size=32" -> {"patch_size": 8, "hidden_size": 32}."""
    args = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key.strip().isidentifier():
            raise UsageError(f"--model_args: expected key=value, got {item!r}")
        try:
            args[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            args[key.strip()] = value.strip()  # a bare word: a string
    return args
