"""Choosing a `tf.distribute` strategy, including logical CPU replicas."""

import json
import os

from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

STRATEGIES = ("auto", "default", "one_device", "mirrored", "multi_worker", "tpu")


def split_cpu(num_replicas):
    """Splits the CPU into `num_replicas` logical devices, so Mirrored runs on CPU.

    Must run before TensorFlow initialises its devices (before any op).

    Args:
        num_replicas: number of logical CPU devices, >= 1.
    """
    if num_replicas < 1:
        raise ValueError(f"`cpu_replicas` must be >= 1. Received: cpu_replicas={num_replicas}")
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * num_replicas)


def get_strategy(name: str = "auto", cpu_replicas: Optional[int] = None) -> tf.distribute.Strategy:
    """Returns the strategy `name`.

    "auto": `TF_CONFIG` set -> MultiWorkerMirrored; a TPU found -> TPU;
    several GPUs (or `cpu_replicas` > 1) -> Mirrored; one GPU -> OneDevice;
    else the default strategy.

    Args:
        name: one of `STRATEGIES`.
        cpu_replicas: split the CPU into this many logical devices first
            (for testing Mirrored without GPUs).
    """
    if name not in STRATEGIES:
        raise ValueError(f"Unknown strategy; expected one of {STRATEGIES}. Received: strategy={name!r}")
    if cpu_replicas:
        split_cpu(cpu_replicas)
    if name == "auto":
        name = _auto_name(cpu_replicas)
    if name == "multi_worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
    elif name == "tpu":
        resolver = tf.distribute.cluster_resolver.TPUClusterResolver()
        tf.config.experimental_connect_to_cluster(resolver)
        tf.tpu.experimental.initialize_tpu_system(resolver)
        strategy = tf.distribute.TPUStrategy(resolver)
    elif name == "mirrored":
        gpus = tf.config.list_logical_devices("GPU")
        devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
        strategy = tf.distribute.MirroredStrategy(devices)
    elif name == "one_device":
        gpus = tf.config.list_logical_devices("GPU")
        strategy = tf.distribute.OneDeviceStrategy(gpus[0].name if gpus else "/cpu:0")
    else:
        strategy = tf.distribute.get_strategy()
    logging.info("strategy=%s replicas=%d", type(strategy).__name__, strategy.num_replicas_in_sync)
    return strategy


def _auto_name(cpu_replicas):
    if (
        os.environ.get("TF_CONFIG")
        and len(json.loads(os.environ["TF_CONFIG"]).get("cluster", {}).get("worker", [])) > 1
    ):
        return "multi_worker"
    if os.environ.get("TPU_NAME") or os.environ.get("COLAB_TPU_ADDR"):
        return "tpu"
    gpus = len(tf.config.list_physical_devices("GPU"))
    if gpus > 1 or (cpu_replicas or 1) > 1:
        return "mirrored"
    return "one_device" if gpus == 1 else "default"


def check_global_batch(batch_size, strategy):
    """The global batch must split evenly over the replicas."""
    replicas = strategy.num_replicas_in_sync
    if batch_size % replicas:
        raise ValueError(
            f"`batch_size` is the global batch and must divide by the {replicas} replicas. "
            f"Received: batch_size={batch_size}"
        )


def check_steps_per_execution(steps_per_execution, strategy):
    """Keras 3 cannot run `steps_per_execution > 1` under several replicas.

    Its multi-step loop fails with "You must feed a value for placeholder
    tensor" under MirroredStrategy (keras-team/keras#19246, still open; seen
    here with Keras 3.15 on logical CPUs), so refuse early instead.
    """
    if steps_per_execution > 1 and strategy.num_replicas_in_sync > 1:
        raise ValueError(
            "`steps_per_execution` > 1 does not work under a strategy with several replicas in "
            "Keras 3 (keras-team/keras#19246); use 1. Received: "
            f"steps_per_execution={steps_per_execution} with {strategy.num_replicas_in_sync} replicas"
        )


def is_chief():
    """True unless this process is a non-chief worker of a multi-worker cluster."""
    config = json.loads(os.environ.get("TF_CONFIG", "{}") or "{}")
    task = config.get("task", {})
    kind = task.get("type")
    if kind is None:
        return True
    has_chief = "chief" in config.get("cluster", {})
    return kind == "chief" or (kind == "worker" and task.get("index", 0) == 0 and not has_chief)


def input_pipelines(strategy: tf.distribute.Strategy) -> Tuple[int, int]:
    """`(count, index)`: the workers of a multi-worker cluster and this one's index, else `(1, 0)`.

    The index is TensorFlow's `input_pipeline_id`: the chief first, then the workers.
    """
    resolver = getattr(strategy, "cluster_resolver", None)
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) or resolver is None:
        return 1, 0
    spec = resolver.cluster_spec()
    count = sum(spec.num_tasks(job) for job in ("chief", "worker") if job in spec.jobs)
    if count <= 1:
        return 1, 0
    offset = 1 if resolver.task_type == "worker" and "chief" in spec.jobs else 0
    return count, int(resolver.task_id) + offset


def gather_from_workers(strategy: tf.distribute.Strategy, value: int) -> List[int]:
    """`[value on worker 0, ..., value on worker n - 1]` for an integer `value` (< 2**53) on each.

    A collective (an all-reduce of one-hot vectors): every worker must call
    it at the same point, from the cross-replica context (a callback).
    """
    count, index = input_pipelines(strategy)
    if count == 1:
        return [int(value)]
    local = strategy.num_replicas_in_sync // count
    mine = np.zeros(count, np.float64)
    mine[index] = value

    def contribute():
        # One replica per worker contributes, so the sum is each worker's value once.
        first = tf.distribute.get_replica_context().replica_id_in_sync_group % local == 0
        return tf.where(first, tf.constant(mine), tf.zeros(count, tf.float64))

    total = strategy.reduce(tf.distribute.ReduceOp.SUM, strategy.run(contribute), axis=None)
    return [int(v) for v in np.round(total.numpy())]
