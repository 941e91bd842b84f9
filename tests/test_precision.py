"""`precision="auto"` resolves from the CPU's flags and the GPUs TensorFlow sees."""

import keras
import numpy as np
import pytest

from byol_tf import data, training
from byol_tf.backbones import build_encoder
from byol_tf.config import PretrainConfig
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
    "flags_line, has_gpu, expected",
    [
        (ZEN4, False, "mixed_bfloat16"),
        ("flags\t: sse2 amx_bf16 amx_tile\n", False, "mixed_bfloat16"),
        (ZEN3, False, "float32"),
        ("", False, "float32"),  # no flags line (not Linux, or not x86)
        (ZEN4, True, "float32"),  # a GPU: the user picks float16 or bfloat16
    ],
)
def test_auto_is_bfloat16_only_on_cpus_with_bfloat16_instructions(tmp_path, flags_line, has_gpu, expected):
    flags = cpu_flags(_cpuinfo(tmp_path, flags_line))
    assert resolve_precision("auto", has_gpu=has_gpu, flags=flags) == expected


@pytest.mark.parametrize("name", ["float32", "mixed_float16", "mixed_bfloat16"])
def test_a_named_policy_is_kept_whatever_the_machine(name):
    assert resolve_precision(name, has_gpu=False, flags={"avx512_bf16"}) == name
    assert resolve_precision(name, has_gpu=True, flags=set()) == name


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
