"""`precision="auto"` resolves from the CPU's flags and the GPUs TensorFlow sees."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import data, training
from byol_tf.backbones import build_encoder
from byol_tf.build import build_byol
from byol_tf.config import PretrainConfig
from byol_tf.kernels import install_fast_kernels
from byol_tf.optim import build_optimizer
from byol_tf.precision import cpu_flags, float32_copy, global_policy, resolve_precision
from byol_tf.presets import get_preset

# The flags line of a Zen 4 EPYC (shortened) and of a Zen 3 one, as /proc/cpuinfo writes them.
ZEN4 = "flags\t\t: fpu vme avx2 avx512f avx512_bf16 avx512_vnni\n"
ZEN3 = "flags\t\t: fpu vme avx2 fma\n"


def _cpuinfo(tmp_path, flags_line):
    path = tmp_path / "cpuinfo"
    path.write_text("processor\t: 0\nvendor_id\t: AuthenticAMD\n" + flags_line + "\nprocessor\t: 1\n" + flags_line)
    return str(path)


def test_cpu_flags_are_read_from_the_first_flags_line(tmp_path):
    assert cpu_flags(_cpuinfo(tmp_path, ZEN4)) == {"fpu", "vme", "avx2", "avx512f", "avx512_bf16", "avx512_vnni"}
    assert cpu_flags(str(tmp_path / "missing")) == frozenset()


@pytest.mark.parametrize(
    "flags_line, expected",
    [
        (ZEN4, "mixed_bfloat16"),
        ("flags\t: sse2 amx_bf16 amx_tile\n", "mixed_bfloat16"),
        (ZEN3, "float32"),
        ("", "float32"),  # no flags line (not Linux, or not x86)
    ],
)
def test_auto_is_bfloat16_only_on_cpus_with_bfloat16_instructions(tmp_path, flags_line, expected):
    flags = cpu_flags(_cpuinfo(tmp_path, flags_line))
    assert resolve_precision("auto", gpus=[], flags=flags) == expected


# NVIDIA's compute capabilities: V100 7.0, T4 7.5, A100 8.0, RTX 3090 8.6, L4 8.9, H100 9.0.
@pytest.mark.parametrize(
    "gpus, expected",
    [
        ([(8, 0)], "mixed_bfloat16"),
        ([(9, 0)] * 8, "mixed_bfloat16"),
        ([(8, 6), (8, 9)], "mixed_bfloat16"),
        ([(7, 0)], "float32"),  # bfloat16 tensor cores came with Ampere
        ([(7, 5)], "float32"),
        ([(9, 0), (7, 5)], "float32"),  # one policy for every replica: the oldest card decides
        ([None], "float32"),  # a GPU that reports no compute capability
    ],
)
def test_auto_on_gpus_is_bfloat16_from_compute_capability_8(gpus, expected):
    # The CPU's flags do not count once there is a GPU.
    assert resolve_precision("auto", gpus=gpus, flags={"avx512_bf16"}) == expected
    assert resolve_precision("auto", gpus=gpus, flags=set()) == expected


@pytest.mark.parametrize("name", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_a_named_policy_is_kept_whatever_the_machine(name):
    assert resolve_precision(name, gpus=[], flags={"avx512_bf16"}) == name
    assert resolve_precision(name, gpus=[(9, 0)], flags=set()) == name


def test_the_config_takes_auto_and_names_a_bad_precision():
    assert PretrainConfig(precision="auto").precision == "auto"
    with pytest.raises(ValueError, match="Received: precision='bf16'"):
        PretrainConfig(precision="bf16")


def test_global_policy_is_set_inside_and_restored_after_even_on_error():
    keras.mixed_precision.set_global_policy("float32")
    with pytest.raises(RuntimeError):
        with global_policy("mixed_bfloat16"):
            assert keras.mixed_precision.global_policy().name == "mixed_bfloat16"
            raise RuntimeError("inside")
    assert keras.mixed_precision.global_policy().name == "float32"


def test_a_run_in_bfloat16_gives_the_caller_its_policy_back(tmp_path, capsys):
    keras.mixed_precision.set_global_policy("float32")
    # The demo preset at 16 px with its 512-wide heads: 2 steps.
    config = get_preset("demo", image_size=16, batch_size=16, epochs=1, precision="mixed_bfloat16")
    images = data.make_shapes(32, image_size=16, seed=0)
    summary = training.run_pretraining(config, images, str(tmp_path / "run"), verbose=0, autotune=False)
    assert summary["status"] == "finished" and summary["dtype_policy"] == "mixed_bfloat16"
    assert "precision=mixed_bfloat16 dtype_policy=mixed_bfloat16" in capsys.readouterr().out
    assert keras.mixed_precision.global_policy().name == "float32"
    encoder = keras.saving.load_model(str(tmp_path / "run" / "encoder.keras"))
    assert {layer.dtype_policy.name for layer in encoder._flatten_layers()} == {"float32"}


def test_float32_copy_computes_in_float32_with_the_same_weights():
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")
    with global_policy("mixed_bfloat16"):
        mixed = build_encoder("resnet_tiny", 16)
    plain = build_encoder("resnet_tiny", 16)  # float32, a reference built independently
    plain.set_weights(mixed.get_weights())
    copy = float32_copy(mixed)
    assert {layer.dtype_policy.name for layer in copy._flatten_layers()} == {"float32"}
    assert "mixed_bfloat16" in {layer.dtype_policy.name for layer in mixed._flatten_layers()}
    expected = plain(x, training=False).numpy()
    np.testing.assert_allclose(copy(x, training=False).numpy(), expected, rtol=1e-5, atol=1e-6)
    # bfloat16 has 8 bits of mantissa: the mixed encoder is visibly off the float32 one.
    assert np.max(np.abs(mixed(x, training=False).numpy().astype("float32") - expected)) > 1e-3


def _has_gpu_kernel(op, dtype=None):
    """Whether TensorFlow's registry has a GPU kernel of `op` for input `T` of `dtype` (None: any)."""
    from tensorflow.python.framework import kernels as registry

    for kernel in registry.get_registered_kernels_for_op(op).kernel:
        if kernel.device_type == "GPU":
            allowed = [c.allowed_values.list.type for c in kernel.constraint if c.name == "T"]
            if dtype is None or not allowed or dtype in allowed[0]:
                return True
    return False


@pytest.mark.parametrize("policy", ["mixed_bfloat16", "mixed_float16"])
def test_every_floating_op_of_the_gpu_train_step_has_a_gpu_kernel(policy):
    # What "auto" picks on an A100/H100 must not fall back to the host: every op
    # that computes in floating point (the step's and, with augment_on="device",
    # the colour stages') needs a GPU kernel for its dtype in this TensorFlow.
    if not _has_gpu_kernel("Conv2D"):
        pytest.skip("this TensorFlow has no GPU kernels")
    config = get_preset(
        "imagenet", backbone="resnet_tiny", image_size=16, batch_size=4, augment_on="device", fast_kernels=False
    )
    with global_policy(policy):
        model = build_byol(config)
        install_fast_kernels(model, cpu_gradients=False)  # the GPU paths
        model.compile(optimizer=build_optimizer(config, 10))
        batch = {
            "crops": tf.zeros((4, 2, 16, 16, 3), tf.uint8),
            "seed": tf.zeros((4, 2), tf.int64),
            "row": tf.range(4),
            "rows": tf.fill([4], 4),
        }
        graph = tf.function(model.train_step).get_concrete_function(batch).graph.as_graph_def()
    nodes = list(graph.node) + [node for function in graph.library.function for node in function.node_def]
    typed = [(n.op, n.attr["T"].type) for n in nodes if "T" in n.attr and n.attr["T"].WhichOneof("value") == "type"]
    floating = {(op, t) for op, t in typed if tf.as_dtype(t).is_floating}
    assert (
        "Conv2D",
        tf.as_dtype(keras.mixed_precision.Policy(policy).compute_dtype).as_datatype_enum,
    ) in floating  # the step computes in 16 bits
    missing = sorted((op, tf.as_dtype(t).name) for op, t in floating if not _has_gpu_kernel(op, t))
    assert not missing
