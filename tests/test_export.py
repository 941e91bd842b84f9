"""TF Serving export: the SavedModel is loaded in a separate process, as a server would."""

import hashlib
import json
import os
import subprocess
import tempfile
import sys

import keras
import numpy as np
import pytest

from byol_tf import __version__, get_preset
from byol_tf.augment import preprocess_eval
from byol_tf.backbones import build_encoder
from byol_tf.export import EXTRA_DIR, METADATA_FILE, export_run, keras_path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SIZE = 32
ENV = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)

# Runs in a fresh process with only TensorFlow (no byol_tf), like a server: loads
# the SavedModel, calls every signature, and records errors instead of dying.
LOADER = r"""
import json, sys
import numpy as np
import tensorflow as tf

export_dir, inputs_path, out_path = sys.argv[1:]
model = tf.saved_model.load(export_dir)
inputs = np.load(inputs_path)
outputs, errors = {}, {}

def call(key, signature, **feed):
    try:
        outputs[key] = model.signatures[signature](**feed)["embedding"].numpy()
    except Exception as error:  # recorded: the test checks type and message
        errors[key] = {"type": type(error).__name__, "message": getattr(error, "message", str(error))}

for name in ("b1", "b7", "train_size"):
    x = inputs[name]
    call(name + "/float", "serving_default", images=tf.constant(x.astype(np.float32)))
    call(name + "/uint8", "serve_uint8", images=tf.constant(x))
    call(name + "/bytes", "serve_image_bytes", image_bytes=tf.constant([tf.io.encode_png(i).numpy() for i in x]))
gray = inputs["gray"]
call("gray/bytes", "serve_image_bytes", image_bytes=tf.constant([tf.io.encode_png(gray).numpy()]))
rgba = inputs["rgba"]
call("rgba/bytes", "serve_image_bytes", image_bytes=tf.constant([tf.io.encode_png(rgba).numpy()]))
# Images of different sizes in one request.
mixed = [tf.io.encode_png(inputs["b1"][0]).numpy(), tf.io.encode_png(inputs["train_size"][0]).numpy()]
call("mixed/bytes", "serve_image_bytes", image_bytes=tf.constant(mixed))
call("bad/channels", "serving_default", images=tf.zeros([1, 8, 8, 4]))
call("bad/rank", "serving_default", images=tf.zeros([8, 8, 3]))
call("bad/uint8_channels", "serve_uint8", images=tf.zeros([2, 8, 8, 1], tf.uint8))
call("bad/bytes", "serve_image_bytes", image_bytes=tf.constant([b"not an image"]))
np.savez(out_path, **{k.replace("/", "__"): v for k, v in outputs.items()})
print(json.dumps({"errors": errors, "metadata": model.metadata().numpy().decode()}))
"""


def _hashes(folder):
    result = {}
    for dirpath, _, files in os.walk(folder):
        for name in files:
            path = os.path.join(dirpath, name)
            with open(path, "rb") as f:
                result[os.path.relpath(path, folder)] = hashlib.sha256(f.read()).hexdigest()
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A run folder with an untrained encoder whose BatchNorm statistics are not the defaults."""
    folder = tmp_path_factory.mktemp("run")
    keras.utils.set_random_seed(1)
    encoder = build_encoder("resnet_tiny", IMAGE_SIZE)
    rng = np.random.default_rng(0)
    for layer in _all_layers(encoder):
        if isinstance(layer, keras.layers.BatchNormalization):
            # Non-trivial moving statistics: a serving graph that ran BatchNorm in
            # training mode (batch statistics) would then give other embeddings.
            layer.moving_mean.assign(rng.normal(0, 0.5, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 2.0, layer.moving_variance.shape))
    encoder.save(str(folder / "encoder.keras"))
    # The ImageNet protocol's centre crop, so that non-square images lose their borders.
    config = get_preset("demo", epochs=1, batch_size=32, warmup_epochs=0, eval_crop_fraction=0.875)
    (folder / "config.json").write_text(json.dumps(config.to_dict()))
    (folder / "summary.json").write_text(
        json.dumps({"steps": 5, "preset": "demo", "backbone": "resnet_tiny", "image_size": IMAGE_SIZE})
    )
    return str(folder)


def _all_layers(model):
    for layer in model.layers:
        yield layer
        if isinstance(layer, keras.Model):
            yield from _all_layers(layer)


@pytest.fixture(scope="module")
def exported(run_dir, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("saved_models") / "tiny")
    version_dir = export_run(run_dir, out)
    return out, version_dir


@pytest.fixture(scope="module")
def images():
    rng = np.random.default_rng(2)
    return {
        "b1": rng.integers(0, 256, (1, 48, 40, 3), dtype=np.uint8),
        "b7": rng.integers(0, 256, (7, 48, 40, 3), dtype=np.uint8),
        "train_size": rng.integers(0, 256, (7, IMAGE_SIZE, IMAGE_SIZE, 3), dtype=np.uint8),
        "gray": rng.integers(0, 256, (20, 24, 1), dtype=np.uint8),
        "rgba": rng.integers(0, 256, (20, 24, 4), dtype=np.uint8),
    }


@pytest.fixture(scope="module")
def served(exported, images, tmp_path_factory):
    """Outputs, errors and metadata of the SavedModel, from a separate process."""
    _, version_dir = exported
    folder = tmp_path_factory.mktemp("loader")
    script, inputs, outputs = folder / "loader.py", folder / "inputs.npz", folder / "outputs.npz"
    script.write_text(LOADER)
    np.savez(inputs, **images)
    result = subprocess.run(
        [sys.executable, str(script), version_dir, str(inputs), str(outputs)],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=str(folder),
    )
    # A bad input must come back as an error, not take the process down.
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    arrays = dict(np.load(outputs))
    return {k.replace("__", "/"): v for k, v in arrays.items()}, report["errors"], report["metadata"]


def _reference(run_dir, images):
    """The evaluation pipeline's embeddings: the images as PNG files in a folder, read as kNN reads them."""
    from PIL import Image

    from byol_tf import data
    from byol_tf.evaluation import embed_dataset

    folder = tempfile.mkdtemp()
    for i, image in enumerate(images):
        Image.fromarray(image).save(os.path.join(folder, f"{i:03d}.png"))
    encoder = keras.saving.load_model(os.path.join(run_dir, "encoder.keras"))
    features, _ = embed_dataset(encoder, data.eval_dataset(data.open_source(folder), IMAGE_SIZE, 0.875))
    return features


@pytest.mark.parametrize("name", ["b1", "b7", "train_size"])
def test_signatures_match_keras_encoder(run_dir, images, served, name):
    outputs, errors, _ = served
    expected = _reference(run_dir, images[name])
    assert expected.shape == (len(images[name]), 128)
    for signature in ("float", "uint8", "bytes"):
        key = f"{name}/{signature}"
        assert key not in errors, errors.get(key)
        assert outputs[key].shape == expected.shape, key
        # Serving and evaluation share preprocess_eval: only float32 rounding differs.
        np.testing.assert_allclose(outputs[key], expected, rtol=0, atol=1e-5, err_msg=key)
    # PNG is lossless, so decoding in the graph changes nothing.
    np.testing.assert_allclose(outputs[f"{name}/bytes"], outputs[f"{name}/float"], rtol=0, atol=1e-5)


def test_bytes_convert_grayscale_rgba_and_mixed_sizes(run_dir, images, served):
    outputs, errors, _ = served
    assert not [k for k in errors if not k.startswith("bad/")], errors
    gray_rgb = np.repeat(images["gray"][None], 3, axis=-1)
    np.testing.assert_allclose(outputs["gray/bytes"], _reference(run_dir, gray_rgb), atol=1e-4)
    np.testing.assert_allclose(outputs["rgba/bytes"], _reference(run_dir, images["rgba"][None, ..., :3]), atol=1e-4)
    np.testing.assert_allclose(outputs["mixed/bytes"][0], outputs["b1/float"][0], atol=1e-5)
    np.testing.assert_allclose(outputs["mixed/bytes"][1], outputs["train_size/float"][0], atol=1e-5)


@pytest.mark.parametrize(
    "key, fragments",
    [
        ("bad/channels", ["[batch, height, width, 3]", "1 8 8 4"]),
        ("bad/rank", ["[batch, height, width, 3]", "8 8 3"]),
        ("bad/uint8_channels", ["[batch, height, width, 3]", "2 8 8 1"]),
        ("bad/bytes", ["Unknown image file format"]),
    ],
)
def test_bad_inputs_fail_with_a_clear_error(served, key, fragments):
    _, errors, _ = served
    assert key in errors, f"{key} did not fail"
    assert errors[key]["type"] == "InvalidArgumentError", errors[key]
    for fragment in fragments:
        assert fragment in errors[key]["message"], errors[key]["message"]


def test_metadata_from_loaded_model_and_asset(exported, served):
    _, version_dir = exported
    _, _, metadata_json = served
    metadata = json.loads(metadata_json)
    with open(os.path.join(version_dir, EXTRA_DIR, METADATA_FILE)) as f:
        assert json.load(f) == metadata
    assert metadata["preset"] == "demo" and metadata["backbone"] == "resnet_tiny"
    assert metadata["image_size"] == IMAGE_SIZE and metadata["embedding_dim"] == 128
    assert metadata["training_steps"] == 5 and metadata["library_version"] == __version__
    assert metadata["version"] == 1 and metadata["exported_at"]
    assert "/255" in metadata["normalisation"] and "ImageNet" in metadata["normalisation"]
    assert sorted(metadata["signatures"]) == ["serve_image_bytes", "serve_uint8", "serving_default"]


def _cli_signatures(text):
    """{signature: {"inputs": {name: dtype}, "outputs": {name: dtype}}} from `saved_model_cli show --all`."""
    signatures, current, section, tensor = {}, None, None, None
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("signature_def['"):
            current = signatures.setdefault(line.split("'")[1], {"inputs": {}, "outputs": {}})
        elif current is not None and line.startswith(("inputs['", "outputs['")):
            section, tensor = line.split("[")[0], line.split("'")[1]
        elif current is not None and tensor and line.startswith("dtype:"):
            current[section][tensor] = line.split()[1]
            tensor = None
    return signatures


def test_saved_model_cli_lists_the_signatures(exported):
    _, version_dir = exported
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    result = subprocess.run(
        [cli, "show", "--all", "--dir", version_dir], capture_output=True, text=True, timeout=120, env=ENV
    )
    assert result.returncode == 0, result.stderr[-3000:]
    signatures = _cli_signatures(result.stdout)
    assert signatures["serving_default"] == {"inputs": {"images": "DT_FLOAT"}, "outputs": {"embedding": "DT_FLOAT"}}
    assert signatures["serve_uint8"] == {"inputs": {"images": "DT_UINT8"}, "outputs": {"embedding": "DT_FLOAT"}}
    assert signatures["serve_image_bytes"] == {
        "inputs": {"image_bytes": "DT_STRING"},
        "outputs": {"embedding": "DT_FLOAT"},
    }


def test_keras_file_reloads_safely_with_the_same_embeddings(run_dir, exported, images):
    out, _ = exported
    path = keras_path(out, 1)
    assert os.path.dirname(path) == out and os.path.isfile(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    x = preprocess_eval(images["b7"], IMAGE_SIZE, 0.875)
    np.testing.assert_allclose(reloaded(x, training=False).numpy(), _reference(run_dir, images["b7"]), atol=1e-6)


def test_script_exports_next_version_and_never_overwrites(run_dir, exported):
    out, version_dir = exported
    before = _hashes(version_dir)
    keras_before = _hashes(out)["encoder-1.keras"]
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export.py"), f"--run_dir={run_dir}", f"--out={out}"],
        capture_output=True,
        text=True,
        timeout=300,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert os.path.join(out, "2") in result.stdout
    for name in ("serving_default", "serve_uint8", "serve_image_bytes"):
        assert name in result.stdout
    assert sorted(n for n in os.listdir(out) if not n.startswith(".")) == [
        "1",
        "2",
        "encoder-1.keras",
        "encoder-2.keras",
    ]
    assert [n for n in os.listdir(out) if n.startswith(".")] == []  # no temporary folder left
    assert _hashes(version_dir) == before and _hashes(out)["encoder-1.keras"] == keras_before
    with pytest.raises(ValueError, match="version=1"):
        export_run(run_dir, out, version=1)
    assert _hashes(version_dir) == before


def test_explicit_version_and_errors(run_dir, tmp_path):
    out = str(tmp_path / "m")
    for bad in (0, 1.5, "2"):
        with pytest.raises(ValueError, match=f"version={bad!r}"):
            export_run(run_dir, out, version=bad)
    with pytest.raises(ValueError, match="run_dir="):
        export_run(str(tmp_path / "missing"), out)
    os.makedirs(os.path.join(out, "7"))  # an existing (even empty) version folder is never replaced
    with pytest.raises(ValueError, match="version=7"):
        export_run(run_dir, out, version=7)


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["--run_dir=/nonexistent/run", "--out=/tmp/x"], "--run_dir=/nonexistent/run"),
        (["--out=/tmp/x"], "--run_dir=None"),
    ],
)
def test_script_names_bad_flags(args, fragment):
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode != 0 and fragment in result.stderr, result.stderr[-2000:]


def test_script_names_missing_encoder(run_dir, tmp_path):
    empty = tmp_path / "run"
    empty.mkdir()
    (empty / "config.json").write_text("{}")
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "export.py"), f"--run_dir={empty}", f"--out={tmp_path / 'out'}"],
        capture_output=True,
        text=True,
        timeout=120,
        env=ENV,
        cwd=ROOT,
    )
    assert result.returncode != 0
    assert "encoder.keras" in result.stderr and f"--run_dir={empty}" in result.stderr
    assert not (tmp_path / "out").exists()
