"""Fine-tuning: weight transfer into the keras-cv classifier, freezing, saving, the script."""

import json
import os
import types

import keras
import keras_cv
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import data, export, finetune
from byol_tf.backbones import build_encoder
from test_linear import RESULT_RE, colour_set, tiny_run_dir
from test_scripts import colour_npz, run_script_cases

SIZE = 16


def tiny_keras_cv_encoder():
    backbone = keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 32],
        stackwise_blocks=[1, 1],
        stackwise_strides=[1, 2],
        block_type="basic_block",
        include_rescaling=False,
        input_shape=(SIZE, SIZE, 3),
    )
    return build_encoder(backbone, SIZE)


@pytest.fixture(scope="module")
def encoder_file(tmp_path_factory):
    """A 'pretrained' keras-cv encoder on disk: random init, then BN statistics moved off their init."""
    encoder = tiny_keras_cv_encoder()
    # A forward pass in training mode changes the moving means and variances,
    # so the comparison below also covers the non-trainable variables.
    encoder(np.random.default_rng(0).random((8, SIZE, SIZE, 3)).astype(np.float32), training=True)
    path = str(tmp_path_factory.mktemp("enc") / "encoder.keras")
    encoder.save(path)
    return path


@pytest.fixture(scope="module")
def splits():
    # 3 classes told apart by the dominant colour: a known answer any network learns at once.
    return colour_set(32, seed=0, size=SIZE), colour_set(30, seed=1, size=SIZE)


def values(variables):
    return [np.array(v) for v in variables]


def test_keras_cv_classifier_starts_from_the_pretrained_weights(encoder_file):
    reference = keras.saving.load_model(encoder_file)
    classifier = finetune.build_classifier(keras.saving.load_model(encoder_file), num_classes=3)
    head = [layer for layer in classifier.layers if isinstance(layer, keras_cv.models.ImageClassifier)]
    assert len(head) == 1, [type(layer).__name__ for layer in classifier.layers]
    backbone = finetune.find_backbone(classifier)
    assert backbone is head[0].backbone and isinstance(backbone, keras_cv.models.ResNetBackbone)
    _, pretrained = finetune.split_encoder(reference)
    assert len(backbone.weights) == len(pretrained.weights) > 0
    fresh = tiny_keras_cv_encoder()  # another init: the comparison must be able to fail
    differs = 0
    for loaded, expected, other in zip(backbone.weights, pretrained.weights, finetune.split_encoder(fresh)[1].weights):
        assert loaded.path.split("/")[-1] == expected.path.split("/")[-1]
        np.testing.assert_array_equal(np.array(loaded), np.array(expected), err_msg=loaded.path)
        differs += not np.array_equal(np.array(loaded), np.array(other))
    assert differs > len(pretrained.weights) // 2
    # The input contract stays [0, 1] images: the ImageNet normalisation comes first.
    x = np.random.default_rng(1).random((2, SIZE, SIZE, 3)).astype(np.float32)
    norm = [layer for layer in classifier.layers if isinstance(layer, keras.layers.Normalization)]
    np.testing.assert_allclose(norm[0](x), reference.get_layer("imagenet_norm")(x), atol=1e-6)
    # Same features as the encoder: the pooled backbone output of the classifier equals the encoder's.
    pooled = keras.layers.GlobalAveragePooling2D()(backbone(norm[0](x), training=False))
    np.testing.assert_allclose(pooled, reference(x, training=False), atol=1e-5)


class BackboneSnapshots(keras.callbacks.Callback):
    def __init__(self, backbone):
        super().__init__()
        self.backbone, self.snapshots = backbone, []

    def on_train_begin(self, logs=None):
        if not self.snapshots:
            self.snapshots.append(values(self.backbone.weights))

    def on_epoch_end(self, epoch, logs=None):
        self.snapshots.append(values(self.backbone.weights))


def test_freeze_epochs_freeze_the_backbone_then_train_it(encoder_file, splits):
    train, test = splits
    classifier = finetune.build_classifier(keras.saving.load_model(encoder_file), num_classes=3)
    backbone = finetune.find_backbone(classifier)
    head = classifier.layers[-1].get_layer("predictions")
    head_before = values(head.weights)
    snapshots = BackboneSnapshots(backbone)
    result = finetune.finetune(
        classifier, train, test, epochs=4, freeze_epochs=1, batch_size=8, lr=0.1, callbacks=[snapshots]
    )
    start, frozen, unfrozen = snapshots.snapshots[:3]
    # Epoch 1: every backbone variable (BN statistics included) is untouched, the head learned.
    for a, b in zip(start, frozen):
        np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, b) for a, b in zip(head_before, values(head.weights)))
    # Epoch 2: unfrozen and recompiled, the backbone trains.
    assert sum(not np.array_equal(a, b) for a, b in zip(frozen, unfrozen)) > len(frozen) // 2
    assert backbone.trainable
    assert len(result.history["loss"]) == 4 and all(np.isfinite(result.history["loss"]))
    assert result.num_train == 32
    # The training colours are fitted (a known answer; chance is 1/3). The
    # held-out top-1 is not asserted: 4 epochs of 4 steps leave the unfrozen
    # BatchNorm's moving statistics lagging, and inference-mode accuracy
    # swings between chance and 1 with the init.
    # lr 0.1 on batches of 8 is noisy: the best epoch, not the last.
    assert max(result.history["top1"]) >= 0.9 and result.top5 == 1.0, result


def test_saved_classifier_reloads_with_equal_predictions(encoder_file, splits, tmp_path):
    train, test = splits
    classifier = finetune.build_classifier(keras.saving.load_model(encoder_file), num_classes=3)
    finetune.finetune(classifier, train, test, epochs=1, batch_size=16)
    path = str(tmp_path / "classifier.keras")
    classifier.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    x = test.images.astype(np.float32) / 255.0
    expected = classifier.predict(x, verbose=0)
    np.testing.assert_allclose(reloaded.predict(x, verbose=0), expected, atol=1e-5)
    assert isinstance(finetune.find_backbone(reloaded), keras_cv.models.ResNetBackbone)


def test_classifier_export_serves_the_encoder_signatures(encoder_file, splits, tmp_path):
    _, test = splits
    # Untrained head, but the encoder's BatchNorm statistics are off their init: serving
    # in training mode (batch statistics) would give other probabilities.
    classifier = finetune.build_classifier(keras.saving.load_model(encoder_file), num_classes=3)
    out = str(tmp_path / "served")
    version_dir = export.export_classifier(classifier, out, metadata={"class_names": ["r", "g", "b"]})
    assert version_dir == os.path.join(out, "1")
    assert sorted(os.listdir(out)) == ["1", "classifier-1.keras"]  # no temporary folder left
    # Keep the loaded object alive: `serve` only holds weak references to its variables.
    loaded = tf.saved_model.load(version_dir)
    pixels = test.images[:5]
    # The reference: the Keras classifier on the evaluation pipeline's input (images at the
    # training size, so preprocess_eval is the identity up to /255).
    expected = classifier.predict(pixels.astype(np.float32) / 255.0, verbose=0)
    assert expected.shape == (5, 3)
    pngs = tf.constant([tf.io.encode_png(image).numpy() for image in pixels])
    for name, feed in [
        ("serving_default", {"images": tf.constant(pixels.astype(np.float32))}),
        ("serve_uint8", {"images": tf.constant(pixels)}),
        ("serve_image_bytes", {"image_bytes": pngs}),
    ]:
        outputs = loaded.signatures[name](**feed)
        assert list(outputs) == ["probabilities"], name
        np.testing.assert_allclose(outputs["probabilities"], expected, atol=1e-5, err_msg=name)
    # Keras's own endpoint is kept: float images in [0, 1] at the training size.
    np.testing.assert_allclose(loaded.serve(tf.constant(pixels / 255.0, tf.float32)), expected, atol=1e-5)
    with pytest.raises(tf.errors.InvalidArgumentError, match="1 8 8 4"):
        loaded.signatures["serving_default"](images=tf.zeros([1, 8, 8, 4]))
    metadata = json.loads(loaded.metadata().numpy().decode())
    assert metadata["num_classes"] == 3 and metadata["class_names"] == ["r", "g", "b"] and metadata["version"] == 1
    assert metadata["signatures"]["serve_uint8"]["outputs"] == {"probabilities": "float32 [batch, 3]"}
    reloaded = keras.saving.load_model(os.path.join(out, "classifier-1.keras"), safe_mode=True)
    np.testing.assert_allclose(reloaded.predict(pixels / 255.0, verbose=0), expected, atol=1e-5)
    # Version 1 is never overwritten (the next free one is tested with export_run, same code).
    with pytest.raises(ValueError, match="version=1"):
        export.export_classifier(classifier, out, version=1)


def test_plain_keras_classifier_for_builtin_resnets(splits):
    train, test = splits
    encoder = build_encoder("resnet_tiny", SIZE)
    classifier = finetune.build_classifier(encoder, num_classes=3)
    backbone = finetune.find_backbone(classifier)
    assert backbone is finetune.split_encoder(encoder)[1]
    assert not any(isinstance(layer, keras_cv.models.ImageClassifier) for layer in classifier.layers)
    result = finetune.finetune(classifier, train, test, epochs=4, batch_size=16, augment="resized_crop")
    assert classifier.optimizer.iterations.numpy() == 8
    # From scratch, 8 steps fit the training colours (a known answer); the
    # held-out top-1 is not asserted: BatchNorm's moving statistics are still
    # near their init after 8 steps, so inference-mode outputs lag behind.
    assert max(result.history["top1"]) >= 0.9, result
    with pytest.raises(ValueError, match="Received: num_classes=1"):
        finetune.build_classifier(encoder, num_classes=1)


@pytest.mark.parametrize("augment", ["crop_pad", "resized_crop", "none"])
def test_train_dataset(augment):
    images = data.make_shapes(8, image_size=SIZE, seed=0)
    x, y = next(iter(finetune.train_dataset(images.images, images.labels, SIZE, 4, augment, seed=0)))
    assert x.shape == (4, SIZE, SIZE, 3) and x.dtype == tf.float32 and y.shape == (4,)
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    if augment == "crop_pad":
        # A pure shift/flip with zero padding: pixels are copied, never interpolated.
        np.testing.assert_allclose(x * 255.0, np.round(x * 255.0), atol=1e-3)
    again = next(iter(finetune.train_dataset(images.images, images.labels, SIZE, 4, augment, seed=0)))
    np.testing.assert_array_equal(x, again[0])


def test_finetune_script(tmp_path_factory):
    run_dir = tiny_run_dir(tmp_path_factory)
    out = str(tmp_path_factory.mktemp("ft"))
    train, test = colour_npz(f"{out}/train.npz", 128, 0), colour_npz(f"{out}/test.npz", 64, 1)
    finetune = [
        f"--run_dir={run_dir}",
        f"--out={out}",
        f"--data={train}",
        f"--eval_data={test}",
        "--limit=128",
        "--eval_limit=64",
        "--epochs=2",
        "--freeze_epochs=1",
        "--batch_size=32",
        "--label_fraction=0.5",
        "--verbose=0",
    ]
    # --init=random rebuilds the run's backbone from config.json: fails fast without a run folder.
    random_without_run = [f"--encoder={run_dir}/encoder.keras", "--init=random", f"--out={out}"]
    (code, stdout, stderr), bad = run_script_cases(
        "finetune.py", [finetune, random_without_run], tmp_path_factory.mktemp("cases")
    )
    result = types.SimpleNamespace(returncode=code, stdout=stdout, stderr=stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    top1, top5 = map(float, RESULT_RE.search(result.stdout).groups())
    # Colour classes, 2 epochs (1 frozen) of 2 steps: on 63 held-out images
    # chance is 1/3 with std 0.059, so 0.5 is about 2.8 std above it.
    assert top1 > 0.5 and top5 == 1.0, result.stdout[-2000:]
    record = json.load(open(os.path.join(out, "finetune.json")))
    assert record["top1"] == pytest.approx(top1, abs=1e-4) and record["num_train"] == 63  # 3 classes x round(64 / 3)
    assert len(record["history"]["loss"]) == 2
    assert os.path.getsize(os.path.join(out, "classifier.keras")) > 0
    # TF Serving's versioned layout, as byol-export writes it, without a second .keras copy.
    assert sorted(os.listdir(os.path.join(out, "saved_model"))) == ["1"]
    assert os.path.exists(os.path.join(out, "saved_model", "1", "saved_model.pb"))
    assert os.path.join(out, "saved_model", "1") in result.stdout
    assert bad[0] != 0 and "--run_dir=None" in bad[2], bad[2][-2000:]
