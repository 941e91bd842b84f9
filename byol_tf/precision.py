"""`precision="auto"`: the Keras dtype policy that is fastest on this machine.

oneDNN runs bfloat16 convolutions and matrix products natively on x86 CPUs with
AVX512_BF16 or AMX-BF16 instructions (on 2 Zen 4 cores the `cifar10_cpu20`
step is 1.45x float32's, BENCHMARKS.md). Elsewhere it converts, so "auto" keeps
float32; it also keeps float32 on GPUs, where the choice between float16 and
bfloat16 depends on the card and is left to `--precision`.
"""

import contextlib

import keras
import tensorflow as tf

AUTO = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")


def cpu_flags(path: str = "/proc/cpuinfo") -> frozenset:
    """The first CPU's feature flags as Linux lists them; empty where they cannot be read."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def resolve_precision(precision: str, has_gpu=None, flags=None) -> str:
    """The Keras dtype policy name for `precision`; only "auto" is resolved.

    Args:
        precision: a Keras dtype policy name, or "auto".
        has_gpu: whether TensorFlow sees a GPU (`None`: ask TensorFlow).
        flags: the CPU's feature flags (`None`: read `/proc/cpuinfo`).
    """
    if precision != AUTO:
        return precision
    if has_gpu is None:
        has_gpu = bool(tf.config.list_physical_devices("GPU"))
    if has_gpu:
        return "float32"
    flags = cpu_flags() if flags is None else flags
    return "mixed_bfloat16" if any(flag in flags for flag in BF16_CPU_FLAGS) else "float32"


@contextlib.contextmanager
def global_policy(name: str):
    """Sets Keras's global dtype policy to `name` inside the block, and puts the previous one back."""
    previous = keras.mixed_precision.global_policy()
    keras.mixed_precision.set_global_policy(name)
    try:
        yield
    finally:
        keras.mixed_precision.set_global_policy(previous)


def _float32_policies(config):
    if isinstance(config, dict):
        if config.get("class_name") == "DTypePolicy" and isinstance(config.get("config"), dict):
            return {**config, "config": {**config["config"], "name": "float32"}}
        return {key: _float32_policies(value) for key, value in config.items()}
    if isinstance(config, list):
        return [_float32_policies(value) for value in config]
    return config


def float32_copy(model: keras.Model) -> keras.Model:
    """`model` rebuilt from its config to compute in float32, with its weights (`model` itself if it does).

    A mixed-precision run's variables are float32 already: only the compute
    dtype of each layer changes, so the saved encoder runs the same on any
    machine, whatever precision trained it.
    """
    config = keras.saving.serialize_keras_object(model)
    float32_config = _float32_policies(config)
    if float32_config == config:
        return model  # already float32 throughout: nothing to rebuild
    copy = keras.saving.deserialize_keras_object(float32_config)
    copy.set_weights(model.get_weights())
    return copy
