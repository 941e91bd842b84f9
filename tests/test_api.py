"""The five-line Python API: `BYOL(encoder)`, `lars`, `views`, and the README's snippet as written."""

import os
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

import byol_tf

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _readme_snippet():
    text = open(os.path.join(ROOT, "README.md")).read()
    match = re.search(r"<!-- five-line-api -->\n```python\n(.*?)```", text, re.S)
    assert match, "the README lost its five-line snippet"
    return match.group(1)


def test_the_readme_snippet_runs_as_written(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(compile(_readme_snippet(), "README.md", "exec"), scope)
    model = scope["model"]
    # The EMA callback was added: 4 steps taken, tau on the cosine from 0.996 to 1.
    assert int(model.optimizer.iterations) == 4
    np.testing.assert_allclose(float(model.tau), 1 - 0.004 * (np.cos(np.pi * 3 / 4) + 1) / 2, rtol=1e-6)
    encoder = keras.saving.load_model(tmp_path / "encoder.keras")
    assert encoder.output.shape == (None, 576)  # MobileNetV3Small's last feature maps, pooled
    x = np.random.default_rng(0).random((2, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(encoder(x), model.encoder(x), atol=1e-5)


class SmallConvNet(keras.Model):
    """A subclassed encoder: feature maps, no graph until called."""

    def __init__(self, width=8, **kwargs):
        super().__init__(**kwargs)
        self.width = width
        self.conv = keras.layers.Conv2D(width, 3, strides=2)
        self.bn = keras.layers.BatchNormalization()

    def call(self, x, training=None):
        return keras.ops.relu(self.bn(self.conv(x), training=training))


def test_a_subclassed_encoder_trains_and_its_target_follows_by_ema():
    with pytest.raises(ValueError, match="input_shape=None"):
        byol_tf.BYOL(SmallConvNet())
    model = byol_tf.BYOL(
        SmallConvNet(), byol_tf.MLPHead(16, 8), byol_tf.MLPHead(16, 8), input_shape=(16, 16, 3), base_tau=0.5
    )
    assert model.encoder.output.shape == (None, 8)
    online, target = model.encoder.weights[0], model.target_encoder.weights[0]
    before = target.numpy().copy()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    images = tf.data.Dataset.from_tensor_slices(
        np.random.default_rng(1).integers(0, 256, (16, 20, 24, 3), dtype=np.uint8)
    )
    model.fit(byol_tf.views(images, byol_tf.AugmentConfig(image_size=16), batch_size=8), epochs=1, verbose=0)
    # One epoch of 16 images is 2 steps, and the EMA ran after each, with
    # tau = 1 - 0.5 * (cos(pi * step / 2) + 1) / 2: 0.5 after step 0, 0.75 after step 1.
    assert int(model.optimizer.iterations) == 2
    assert float(model.tau) == pytest.approx(0.75)
    assert not np.allclose(target.numpy(), before) and not np.allclose(target.numpy(), online.numpy())


def test_views_is_an_endless_seeded_stream_that_knows_its_epoch():
    images = tf.data.Dataset.from_tensor_slices(
        np.random.default_rng(2).integers(0, 256, (10, 30, 20, 3), dtype=np.uint8)
    )
    a = byol_tf.views(images, byol_tf.AugmentConfig(image_size=8), batch_size=4, seed=5)
    b = byol_tf.views(images, byol_tf.AugmentConfig(image_size=8), batch_size=4, seed=5)
    assert a.byol_steps_per_epoch == 2
    for (a1, a2), (b1, b2) in zip(a.take(6), b.take(6)):  # beyond one pass
        assert a1.shape == (4, 8, 8, 3)
        np.testing.assert_array_equal(a1.numpy(), b1.numpy())
    with pytest.raises(ValueError, match="num_examples=None"):
        byol_tf.views(images.repeat(), batch_size=4)


def test_lars_warms_up_and_decays_by_the_formula():
    optimizer = byol_tf.lars(learning_rate=0.4, total_steps=10, warmup_steps=2)
    schedule = optimizer.learning_rate if callable(optimizer.learning_rate) else optimizer._learning_rate
    for step, expected in ((0, 0.0), (1, 0.2), (2, 0.4), (6, 0.4 * (1 + np.cos(np.pi * 4 / 8)) / 2), (10, 0.0)):
        assert float(schedule(step)) == pytest.approx(expected, abs=1e-6)
    assert isinstance(optimizer, byol_tf.LARS)
