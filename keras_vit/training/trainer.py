"""`Trainer`: gradient accumulation and clipping that hold under `tf.distribute` and `keras.distribution`.

Why: Keras optimizers accumulate gradients themselves
(`gradient_accumulation_steps`) and clip them (`global_clipnorm`), but under
`tf.distribute` (Keras 3.15) the first fails ("merge_call called while
defining a new graph") and the second clips each replica's share of the
gradient instead of the whole. `Trainer` splits each replica's batch into
micro-batches inside one train step (as the official code) and clips the
summed gradient, so k x batch B on one device, or one batch k*B over any number
of replicas, gives the same update.

On JAX, under a `keras.distribution` (DataParallel, ModelParallel) or none,
the train step is one jitted function over global arrays (XLA's GSPMD splits
it): the optimizer's own clipping already sees the whole gradient, and
`Trainer` adds the same in-step accumulation.
"""

import math

import keras
from keras import ops

class Trainer(keras.Model):
    """Trains `model` (TensorFlow or JAX backend): fit/evaluate/predict as usual.

    Each train step takes one batch per replica, splits it into `accum_steps`
    micro-batches, runs them one after the other (a while loop: only one
    micro-batch's activations live at a time) and applies the optimizer once
    with their mean gradient. With several replicas and a clipping optimizer
    the gradient is summed over replicas before it is clipped, as on one
    device. Save `trainer.model`, not the trainer.

    On JAX the micro-batch i of a batch is its examples i, i + k, i + 2k...
    (each device keeps its own share of every micro-batch under data
    parallelism); their mean gradient is the same as of k contiguous ones.
    """

    def __init__(self, model, accum_steps=1, **kwargs):
        if keras.backend.backend() not in ("tensorflow", "jax"):
            raise ValueError(
                "keras_vit.training.Trainer needs KERAS_BACKEND=tensorflow or jax; on other backends use the "
                "optimizer's own gradient_accumulation_steps."
            )
        if accum_steps < 1:
            raise ValueError(f"accum_steps must be at least 1, got {accum_steps}.")
        super().__init__(name=kwargs.pop("name", f"{model.name}_trainer"), **kwargs)
        self.model = model
        self.accum_steps = int(accum_steps)
        # Train steps done, saved with the weights. Not optimizer.iterations:
        # a LossScaleOptimizer does not count the steps it skips.
        self.steps_done = self.add_weight(
            shape=(), dtype="int64" if keras.backend.backend() == "tensorflow" else "int32",  # JAX: no int64 by default
            initializer="zeros", trainable=False, name="steps_done",
            aggregation="only_first_replica",
        )  # fmt: skip
        self.built = model.built

    def call(self, inputs, training=False):
        return self.model(inputs, training=training)

    def fit(self, x=None, y=None, batch_size=None, *args, **kwargs):
        """`keras.Model.fit`; arrays whose batches (the last one too) do not
        split into `accum_steps` micro-batches are refused before training."""
        arrays = keras.tree.flatten(x) if x is not None else []
        if self.accum_steps > 1 and arrays and hasattr(arrays[0], "shape") and len(arrays[0].shape):
            count = int(math.floor(arrays[0].shape[0] * (1.0 - kwargs.get("validation_split", 0.0))))
            batch = batch_size or 32  # Keras's default
            for size in (min(batch, count), count % batch):
                if size % self.accum_steps:
                    raise ValueError(self._split_error(size))
        return super().fit(x, y, batch_size, *args, **kwargs)

    def _split_error(self, batch=None):
        """The one line for a batch (of `batch` examples, when known) that `accum_steps` does not divide."""
        size = "" if batch is None else f" of {batch}"
        return (
            f"A batch{size} does not split into accum_steps={self.accum_steps} equal micro-batches: give "
            "batches of a multiple of it, the last one too (drop it: drop_remainder=True, or fewer examples)."
        )

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras 3.15 learns the batch shapes by reducing a first batch across
        # replicas, which fails under MultiWorkerMirroredStrategy ("Attempt to
        # convert a value (PerReplica...)"); a local replica's batch has them too.
        if keras.backend.backend() != "tensorflow":
            return super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)
        import tensorflow as tf

        if iterator is not None and self._distribute_strategy is not None:
            for _, _, batches in iterator:
                data_batch = tf.nest.map_structure(
                    lambda v: self._distribute_strategy.experimental_local_results(v)[0]
                    if isinstance(v, tf.distribute.DistributedValues)
                    else v,
                    next(batches),
                )
                break
        return super()._maybe_symbolic_build(data_batch=data_batch)

    def train_step(self, *args):
        if keras.backend.backend() == "jax":
            return self._jax_train_step(*args)  # (state, data): JAX's train steps are stateless
        return self._tf_train_step(*args)

    def _tf_train_step(self, data):
        import tensorflow as tf

        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        variables = self.trainable_variables
        k = self.accum_steps
        if k == 1:
            grads = self._micro_step(x, y, sample_weight, variables)
        else:
            def split(t):  # (batch, ...) -> (k, batch / k, ...)
                if t is None:
                    return None
                batch = tf.shape(t)[0]
                check = tf.debugging.assert_equal(
                    batch % k, 0, message=self._split_error())
                with tf.control_dependencies([check]):
                    return tf.reshape(t, tf.concat([[k, -1], tf.shape(t)[1:]], 0))

            xs, ys, ws = tf.nest.map_structure(split, (x, y, sample_weight))

            def body(i, summed):
                def take(t):
                    return None if t is None else tf.gather(t, i)

                xi, yi, wi = tf.nest.map_structure(take, (xs, ys, ws))
                return [s + g for s, g in zip(summed, self._micro_step(xi, yi, wi, variables))]

            zeros = [tf.zeros(v.shape, v.dtype) for v in variables]
            grads = [g / k for g in ops.fori_loop(0, k, body, zeros)]
        grads = self._clip_over_replicas(grads)
        self.optimizer.apply_gradients(zip(grads, variables))
        self.steps_done.assign_add(1)
        return self._logs()

    def test_step(self, *args):
        if keras.backend.backend() == "jax":
            return super().test_step(*args)
        super().test_step(*args)
        return self._logs()

    def _jax_train_step(self, state, data):
        """JAX's `train_step(state, data) -> (logs, state)` with `accum_steps`
        micro-batches in a `fori_loop` and one optimizer update."""
        import jax

        trainable, non_trainable, optimizer_variables, metrics_variables = state
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        k = self.accum_steps
        grad_fn = jax.value_and_grad(self.compute_loss_and_updates, has_aux=True)

        def micro_step(xi, yi, wi, non_trainable, metrics_variables):
            (_, aux), grads = grad_fn(
                trainable, non_trainable, metrics_variables, xi, yi, wi,
                training=True, optimizer_variables=optimizer_variables,
            )  # fmt: skip
            unscaled_loss, y_pred, non_trainable, metrics_variables = aux
            _, metrics_variables = self._update_metrics_variables(
                metrics_variables, unscaled_loss, xi, yi, y_pred, wi
            )
            return grads, non_trainable, metrics_variables

        if k == 1:
            grads, non_trainable, metrics_variables = micro_step(x, y, sample_weight, non_trainable, metrics_variables)
        else:
            def split(t):  # (batch, ...) -> (batch / k, k, ...): micro-batch i is [:, i]
                if t is None:
                    return None
                if t.shape[0] % k:  # shapes are static while JAX traces
                    raise ValueError(self._split_error(t.shape[0]))
                return jax.numpy.reshape(jax.numpy.asarray(t), (-1, k) + tuple(t.shape[1:]))

            xs, ys, ws = jax.tree_util.tree_map(split, (x, y, sample_weight))

            def body(i, carry):
                summed, non_trainable, metrics_variables = carry
                xi, yi, wi = jax.tree_util.tree_map(lambda t: t[:, i], (xs, ys, ws))
                grads, non_trainable, metrics_variables = micro_step(xi, yi, wi, non_trainable, metrics_variables)
                return [s + g for s, g in zip(summed, grads)], non_trainable, metrics_variables

            zeros = [jax.numpy.zeros_like(v) for v in trainable]
            summed, non_trainable, metrics_variables = jax.lax.fori_loop(
                0, k, body, (zeros, list(non_trainable), list(metrics_variables))
            )
            grads = [g / k for g in summed]
        trainable, optimizer_variables = self.optimizer.stateless_apply(optimizer_variables, grads, trainable)
        non_trainable = list(non_trainable)
        for index, variable in enumerate(self.non_trainable_variables):
            if variable is self.steps_done:
                non_trainable[index] = non_trainable[index] + 1
        with keras.StatelessScope(state_mapping=list(zip(self.metrics_variables, metrics_variables))):
            logs = self.get_metrics_result()
        return logs, (trainable, non_trainable, optimizer_variables, metrics_variables)

    def _logs(self):
        import tensorflow as tf

        logs = self.get_metrics_result()
        if isinstance(self.distribute_strategy, tf.distribute.MultiWorkerMirroredStrategy):
            # Keras 3.15 averages each log over the workers with
            # strategy.reduce("MEAN", v, axis=0), which needs an axis 0
            # (tensorflow/tensorflow#72388): give the scalars one.
            logs = tf.nest.map_structure(lambda v: tf.reshape(v, [1]), logs)
        return logs

    def _micro_step(self, x, y, sample_weight, variables):
        import tensorflow as tf

        with tf.GradientTape() as tape:
            y_pred = self(x, training=True)
            # Already divided by the replica count, so that the optimizer's sum
            # over replicas is the mean gradient.
            loss = self.compute_loss(x=x, y=y, y_pred=y_pred, sample_weight=sample_weight, training=True)
            scaled = self.optimizer.scale_loss(loss)  # mixed_float16's loss scale
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        for metric in self.metrics:
            if metric.name == "loss":  # the loss Keras reports: this replica's mean
                metric.update_state(loss * replicas, sample_weight=tf.shape(tf.nest.flatten(x)[0])[0])
        self.compute_metrics(x, y, y_pred, sample_weight=sample_weight)
        return tape.gradient(scaled, variables)

    def _clip_over_replicas(self, grads):
        """Clips the replicas' summed gradient; returns each replica's share.

        The optimizer sums the replicas' gradients after clipping them; here the
        sum is taken first, clipped as the optimizer is configured to, and
        split again (1/R each), so the optimizer's own clipping then finds
        nothing left to clip.
        """
        import tensorflow as tf

        context = tf.distribute.get_replica_context()
        replicas = context.num_replicas_in_sync if context is not None else 1
        inner = getattr(self.optimizer, "inner_optimizer", self.optimizer)  # under a LossScaleOptimizer
        if replicas == 1 or not (inner.global_clipnorm or inner.clipnorm or inner.clipvalue):
            return grads
        loss_scale = self.optimizer.scale_loss(1.0)  # gradients are scaled by it until the optimizer unscales
        total = [g / loss_scale for g in context.all_reduce(tf.distribute.ReduceOp.SUM, grads)]
        if inner.global_clipnorm:
            total, _ = tf.clip_by_global_norm(total, inner.global_clipnorm)
        if inner.clipnorm:
            total = [tf.clip_by_norm(g, inner.clipnorm) for g in total]
        if inner.clipvalue:
            total = [tf.clip_by_value(g, -inner.clipvalue, inner.clipvalue) for g in total]
        return [g * loss_scale / replicas for g in total]
