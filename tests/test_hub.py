"""keras-hub: backbones from arguments and from a local preset, the ImageClassifier, preset export."""

import json
import os
import socket

import keras
import numpy as np
import pytest
import tensorflow as tf

keras_hub = pytest.importorskip("keras_hub")

from byol_tf import export, finetune, hub  # noqa: E402
from byol_tf.backbones import IMAGENET_MEAN, IMAGENET_STD, build_encoder  # noqa: E402
from test_linear import colour_set  # noqa: E402
from test_scripts import run_script  # noqa: E402

SIZE = 16
# The smallest keras-hub ResNet: its stem and first stage must have 64 filters.
HUB_KWARGS = dict(
    input_conv_filters=[64],
    input_conv_kernel_sizes=[3],
    stackwise_num_filters=[64, 16],
    stackwise_num_blocks=[1, 1],
    stackwise_num_strides=[1, 2],
    block_type="basic_block",
    use_pre_activation=False,
)


def hub_encoder(seed):
    """A 'pretrained' keras-hub encoder: seeded init, then BN statistics moved off their init."""
    keras.utils.set_random_seed(seed)
    encoder = build_encoder("keras_hub:ResNetBackbone", SIZE, backbone_kwargs=HUB_KWARGS)
    encoder(np.random.default_rng(seed).random((8, SIZE, SIZE, 3)).astype(np.float32), training=True)
    return encoder


def normalise(x01):
    """The ImageNet normalisation, in NumPy."""
    return (x01 - np.array(IMAGENET_MEAN)) / np.array(IMAGENET_STD)


@pytest.fixture(scope="module")
def encoder():
    return hub_encoder(seed=1)


@pytest.fixture(scope="module")
def preset(encoder, tmp_path_factory):
    return hub.save_preset(encoder, str(tmp_path_factory.mktemp("presets") / "tiny"), metadata={"run": "test"})


@pytest.fixture(scope="module")
def pixels():
    return np.random.default_rng(5).integers(0, 256, (4, SIZE, SIZE, 3), dtype=np.uint8)


def assert_same_weights(got, expected, other):
    """`got` equals `expected` variable by variable, and `other` (another init) differs: the check can fail."""
    assert len(got) == len(expected) == len(other) > 0
    for a, b in zip(got, expected):
        np.testing.assert_array_equal(np.array(a), np.array(b))
    assert sum(not np.array_equal(np.array(a), np.array(b)) for a, b in zip(got, other)) > len(got) // 2


def test_backbone_from_arguments_matches_a_direct_keras_hub_build(encoder, pixels):
    _, backbone = finetune.split_encoder(encoder)
    assert isinstance(backbone, keras_hub.models.ResNetBackbone)
    assert backbone.stackwise_num_filters == [64, 16] and backbone.image_shape == (SIZE, SIZE, 3)
    # The reference: keras-hub's own class with the same weights, fed NumPy-normalised images.
    reference = keras_hub.models.ResNetBackbone(image_shape=(SIZE, SIZE, 3), **HUB_KWARGS)
    reference.set_weights(backbone.get_weights())
    x = pixels / 255.0
    expected = np.mean(reference(normalise(x).astype(np.float32), training=False), axis=(1, 2))
    np.testing.assert_allclose(encoder(x, training=False), expected, atol=1e-5)
    with pytest.raises(ValueError, match="backbone=keras_hub:NoSuchBackbone"):
        build_encoder("keras_hub:NoSuchBackbone", SIZE)
    with pytest.raises(ValueError, match="backbone=keras_hub:ImageClassifier"):  # a task, not a backbone
        build_encoder("keras_hub:ImageClassifier", SIZE)


def test_preset_folder_loads_the_learned_weights(encoder, preset):
    names = set(os.listdir(preset))
    assert {"config.json", "model.weights.h5", "image_converter.json", export.METADATA_FILE} <= names
    assert not [n for n in os.listdir(os.path.dirname(preset)) if n.startswith(".")]  # no temporary folder left
    loaded = keras_hub.models.Backbone.from_preset(preset)
    assert isinstance(loaded, keras_hub.models.ResNetBackbone)
    _, trained = finetune.split_encoder(encoder)
    _, other = finetune.split_encoder(hub_encoder(seed=2))
    assert_same_weights(loaded.weights, trained.weights, other.weights)
    with open(os.path.join(preset, export.METADATA_FILE)) as f:
        record = json.load(f)
    assert record["run"] == "test" and record["image_size"] == SIZE
    with pytest.raises(ValueError, match="preset_dir="):
        hub.save_preset(encoder, preset)  # never overwritten


def test_preset_image_classifier_preprocesses_like_the_encoder(encoder, preset, pixels):
    classifier = keras_hub.models.ImageClassifier.from_preset(preset, num_classes=3)
    # The converter on [0, 255] images: the ImageNet normalisation, computed in NumPy.
    converted = classifier.preprocessor(pixels)
    np.testing.assert_allclose(converted, normalise(pixels / 255.0), atol=1e-5)
    pooled = np.mean(classifier.backbone(converted, training=False), axis=(1, 2))
    np.testing.assert_allclose(pooled, encoder(pixels / 255.0, training=False), atol=1e-5)


def test_build_from_local_preset_without_network(encoder, preset, pixels, monkeypatch):
    def no_network(*args, **kwargs):
        raise AssertionError("network access while building from a local preset")

    # Name resolution is the first step of any download (a named preset then fails with this error).
    monkeypatch.setattr(socket, "getaddrinfo", no_network)
    monkeypatch.setattr(socket.socket, "connect", no_network)
    built = build_encoder(f"keras_hub_preset:{preset}", SIZE)
    _, backbone = finetune.split_encoder(built)
    _, trained = finetune.split_encoder(encoder)
    _, other = finetune.split_encoder(hub_encoder(seed=3))
    assert_same_weights(backbone.weights, trained.weights, other.weights)
    np.testing.assert_allclose(built(pixels / 255.0), encoder(pixels / 255.0, training=False), atol=1e-5)
    # The run's image size, not the preset's: a ResNet takes any size.
    assert build_encoder(f"keras_hub_preset:{preset}", 24).input_shape == (None, 24, 24, 3)
    missing = os.path.join(os.path.dirname(preset), "missing")
    with pytest.raises(ValueError, match=f"backbone=keras_hub_preset:{missing}"):
        build_encoder(f"keras_hub_preset:{missing}", SIZE)


def test_keras_hub_image_classifier_fine_tunes_reloads_and_serves(encoder, preset, pixels, tmp_path):
    # A fresh encoder from the preset, since build_classifier shares the encoder's backbone.
    pretrained = build_encoder(f"keras_hub_preset:{preset}", SIZE)
    classifier = finetune.build_classifier(pretrained, num_classes=3)
    heads = [layer for layer in classifier.layers if isinstance(layer, keras_hub.models.ImageClassifier)]
    assert len(heads) == 1, [type(layer).__name__ for layer in classifier.layers]
    backbone = finetune.find_backbone(classifier)
    assert backbone is heads[0].backbone
    # Same features as the encoder on the same input, before any training.
    x = (pixels / 255.0).astype(np.float32)
    features = np.mean(backbone(normalise(x).astype(np.float32), training=False), axis=(1, 2))
    np.testing.assert_allclose(features, encoder(x, training=False), atol=1e-5)

    train, test = colour_set(24, seed=0, size=SIZE), colour_set(12, seed=1, size=SIZE)
    result = finetune.finetune(classifier, train, test, epochs=1, batch_size=12)
    assert classifier.optimizer.iterations.numpy() == 2 and np.isfinite(result.history["loss"][0])
    expected = classifier.predict(x, verbose=0)
    np.testing.assert_allclose(expected.sum(axis=1), 1.0, atol=1e-5)  # probabilities
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    assert isinstance(finetune.find_backbone(reloaded), keras_hub.models.ResNetBackbone)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=1e-5)

    version_dir = export.export_classifier(classifier, str(tmp_path / "served"))
    loaded = tf.saved_model.load(version_dir)
    served = loaded.signatures["serve_uint8"](images=tf.constant(pixels))["probabilities"]
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_export_script_writes_a_keras_hub_preset(encoder, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    encoder.save(str(run / "encoder.keras"))
    (run / "config.json").write_text(json.dumps({"backbone": "keras_hub:ResNetBackbone", "image_size": SIZE}))
    out = tmp_path / "preset"
    result = run_script("export.py", f"--run_dir={run}", f"--out={out}", "--format=keras_hub_preset", timeout=180)
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"keras_hub_preset:{out}" in result.stdout
    _, trained = finetune.split_encoder(encoder)
    _, other = finetune.split_encoder(hub_encoder(seed=4))
    assert_same_weights(keras_hub.models.Backbone.from_preset(str(out)).weights, trained.weights, other.weights)
    with open(out / export.METADATA_FILE) as f:
        assert json.load(f)["backbone"] == "keras_hub:ResNetBackbone"


def test_preset_export_refuses_other_backbones(tmp_path):
    with pytest.raises(ValueError, match="Received: backbone=Functional"):
        hub.save_preset(build_encoder("resnet_tiny", SIZE), str(tmp_path / "preset"))
    assert not os.path.exists(tmp_path / "preset")
