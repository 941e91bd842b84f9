"""`precision="auto"`: the Keras dtype policy that is fastest on this machine.

oneDNN runs bfloat16 convolutions and matrix products natively on x86 CPUs with
AVX512_BF16 or AMX-BF16 instructions (on 2 Zen 4 cores the `cifar10_cpu20`
step is 1.45x float32's, BENCHMARKS.md). Elsewhere it converts, so "auto" keeps
float32. NVIDIA GPUs of compute capability 8.0 on (Ampere, Hopper, Blackwell)
multiply bfloat16 on their tensor cores, as TensorFlow's mixed-precision guide
says, so "auto" picks it there too: unlike float16 it needs no loss scaling,
whose optimizer state would not resume on another card. Older GPUs keep float32
(`--precision=mixed_float16` is the fast choice on compute capability 7.x).
"""

import contextlib

import keras
import tensorflow as tf

AUTO = "auto"
BF16_CPU_FLAGS = ("avx512_bf16", "amx_bf16")
BF16_GPU_CAPABILITY = (8, 0)


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


def gpu_capabilities() -> list:
    """The compute capability `(major, minor)` of each GPU TensorFlow sees; None where a GPU gives none."""
    return [
        tf.config.experimental.get_device_details(gpu).get("compute_capability")
        for gpu in tf.config.list_physical_devices("GPU")
    ]


def resolve_precision(precision: str, gpus=None, flags=None) -> str:
    """The Keras dtype policy name for `precision`; only "auto" is resolved.

    Args:
        precision: a Keras dtype policy name, or "auto".
        gpus: the compute capability of each GPU, as `gpu_capabilities`
            gives them (`None`: ask TensorFlow; empty: no GPU).
        flags: the CPU's feature flags (`None`: read `/proc/cpuinfo`).
    """
    if precision != AUTO:
        return precision
    gpus = gpu_capabilities() if gpus is None else list(gpus)
    if gpus:
        # Every replica runs one policy: bfloat16 only where every GPU has it (a card
        # that reports no capability, not NVIDIA's, keeps float32).
        bf16 = all(c is not None and tuple(c) >= BF16_GPU_CAPABILITY for c in gpus)
        return "mixed_bfloat16" if bf16 else "float32"
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
