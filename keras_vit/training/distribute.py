"""`tf.distribute` strategies by name, and where each task of a multi-worker run writes."""

import json
import os

from keras_vit.errors import first_line

STRATEGIES = ("auto", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(count):
    """Splits the host CPU into `count` logical devices, so MirroredStrategy
    can run several replicas without GPUs. Call before TensorFlow starts."""
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError as error:
        raise RuntimeError(f"split_cpu({count}) must run before TensorFlow initialises its devices: {error}") from error


def make_strategy(name="auto", tpu=None):
    """A `tf.distribute.Strategy`, by name (see `STRATEGIES`).

    auto: multi_worker when TF_CONFIG names several tasks, mirrored over
    several GPUs (or logical CPUs), else one device. one_device: the first GPU,
    else the CPU. mirrored: all local GPUs, else all logical CPUs.
    multi_worker: MultiWorkerMirroredStrategy from TF_CONFIG. tpu: TPUStrategy
    from a TPU cluster resolver (`tpu`: a TPU name or "local" on a TPU VM).
    """
    import tensorflow as tf

    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy {name!r}; use one of {', '.join(STRATEGIES)}.")
    if name == "auto":
        if _tf_config_tasks() > 1:
            name = "multi_worker"
        elif len(_local_devices()) > 1:
            name = "mirrored"
        else:
            name = "one_device"
    if name == "one_device":
        return tf.distribute.OneDeviceStrategy(_local_devices()[0])
    if name == "mirrored":
        return tf.distribute.MirroredStrategy(_local_devices())
    if name == "multi_worker":
        if not os.environ.get("TF_CONFIG"):
            raise ValueError(
                "--strategy multi_worker needs the TF_CONFIG environment variable "
                '(e.g. {"cluster": {"worker": ["host1:port", "host2:port"]}, "task": {"type": "worker", "index": 0}}).'
            )
        return tf.distribute.MultiWorkerMirroredStrategy()
    try:
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver(tpu=tpu or None)
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
    except Exception as error:  # noqa: BLE001 - any failure here means: no TPU reachable
        raise ValueError(
            f"--strategy tpu: no TPU found ({first_line(error)}). Run on a TPU VM with --tpu local, "
            "or pass --tpu with the name of a Cloud TPU."
        ) from None
    return tf.distribute.TPUStrategy(resolver)


def _local_devices():
    import tensorflow as tf

    gpus = tf.config.list_logical_devices("GPU")
    return [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]


def _tf_config_tasks():
    try:
        cluster = json.loads(os.environ.get("TF_CONFIG", "{}")).get("cluster", {})
    except json.JSONDecodeError:
        raise ValueError("TF_CONFIG is not valid JSON.") from None
    return sum(len(tasks) for tasks in cluster.values())


def task_directory(model_dir, strategy=None):
    """Where this task writes: `model_dir` for the chief (or a single
    process), `model_dir/worker-N` for the other workers of a multi-worker
    run, so no two tasks write the same file, shared file system or not."""
    resolver = getattr(strategy, "cluster_resolver", None)
    task_type = getattr(resolver, "task_type", None)
    task_id = getattr(resolver, "task_id", None) or 0
    if task_type in (None, "chief") or (task_type == "worker" and task_id == 0 and not _has_chief(resolver)):
        return model_dir
    return os.path.join(model_dir, f"{task_type}-{task_id}")


def _has_chief(resolver):
    try:
        return "chief" in resolver.cluster_spec().as_dict()
    except Exception:  # noqa: BLE001 - no cluster spec: a single task
        return False


# ---------------------------------------------------------------------------
