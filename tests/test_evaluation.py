import sys

import numpy as np
import pytest
import tensorflow as tf
import keras

from byol_tf.evaluation import KNNMonitor, embed, knn_accuracy, knn_predict


def reference_knn(train, train_labels, test, k, temperature, num_classes):
    """Brute-force float64 NumPy version of the weighted kNN rule."""
    train = train / np.linalg.norm(train, axis=1, keepdims=True)
    test = test / np.linalg.norm(test, axis=1, keepdims=True)
    k = min(k, len(train))
    preds = []
    for q in test.astype(np.float64):
        sims = train.astype(np.float64) @ q
        votes = np.zeros(num_classes)
        for i in np.argsort(-sims, kind="stable")[:k]:
            votes[train_labels[i]] += np.exp(sims[i] / temperature)
        preds.append(np.argmax(votes))
    return np.array(preds)


@pytest.fixture
def random_data():
    rng = np.random.default_rng(0)
    return (
        rng.normal(size=(300, 16)).astype(np.float32),
        rng.integers(0, 5, 300),
        rng.normal(size=(50, 16)).astype(np.float32),
        rng.integers(0, 5, 50),
    )


@pytest.mark.parametrize("k,temperature", [(1, 0.1), (20, 0.1), (20, 0.5), (1000, 0.07)])
def test_knn_matches_numpy_reference(random_data, k, temperature):
    xtr, ytr, xte, yte = random_data
    expected = reference_knn(xtr, ytr, xte, k, temperature, 5)
    got = knn_predict(xtr, ytr, xte, k=k, temperature=temperature)
    np.testing.assert_array_equal(got, expected)
    assert knn_accuracy(xtr, ytr, xte, yte, k=k, temperature=temperature) == pytest.approx(np.mean(expected == yte))
    # Random labels: the rule must not be trivially constant.
    assert len(np.unique(got)) > 1


def test_knn_batching_and_num_classes_do_not_change_predictions(random_data):
    xtr, ytr, xte, _ = random_data
    one_batch = knn_predict(xtr, ytr, xte, k=20)
    np.testing.assert_array_equal(knn_predict(xtr, ytr, xte, k=20, batch_size=7), one_batch)
    np.testing.assert_array_equal(knn_predict(xtr, ytr, xte, k=20, num_classes=9), one_batch)


def test_knn_weights_votes_by_similarity():
    # One very close neighbour of class 0 against two farther ones of class 1:
    # a sharp temperature must follow the weights, a flat one the majority.
    train = np.array([[1.0, 0.0], [0.6, 0.8], [0.6, -0.8]], np.float32)
    labels = np.array([1, 0, 0])
    test = np.array([[1.0, 0.0]], np.float32)
    # exp(1 / 0.001) overflows float32: both classes would tie at inf -> class 0.
    assert knn_predict(train, labels, test, k=3, temperature=0.001)[0] == 1
    assert knn_predict(train, labels, test, k=3, temperature=100.0)[0] == 0
    assert knn_predict(train, labels, test, k=1, temperature=100.0)[0] == 1


def test_knn_separated_clusters_is_perfect():
    rng = np.random.default_rng(1)
    centers = rng.normal(size=(5, 16)) * 10
    ytr, yte = rng.integers(0, 5, 200), rng.integers(0, 5, 40)
    xtr = centers[ytr] + rng.normal(size=(200, 16)) * 0.1
    xte = centers[yte] + rng.normal(size=(40, 16)) * 0.1
    assert knn_accuracy(xtr, ytr, xte, yte, k=10) == 1.0
    # Labels given as [N, 1] (keras.datasets style) are accepted.
    assert knn_accuracy(xtr, ytr[:, None], xte, yte[:, None], k=10) == 1.0


def test_knn_input_errors(random_data):
    xtr, ytr, xte, yte = random_data
    for bad_k in (0, -3, 2.5):
        with pytest.raises(ValueError, match=f"k={bad_k}"):
            knn_predict(xtr, ytr, xte, k=bad_k)
    with pytest.raises(ValueError, match="temperature=0"):
        knn_predict(xtr, ytr, xte, temperature=0)
    with pytest.raises(ValueError, match=r"train_labels\.shape=\(299,\)"):
        knn_predict(xtr, ytr[:-1], xte)
    with pytest.raises(ValueError, match=r"test_labels\.shape=\(49,\)"):
        knn_accuracy(xtr, ytr, xte, yte[:-1])
    with pytest.raises(ValueError, match="same dimension"):
        knn_predict(xtr, ytr, xte[:, :8])
    with pytest.raises(ValueError, match="num_classes=3"):
        knn_predict(xtr, ytr, xte, num_classes=3)


class CountingGAP(keras.layers.Layer):
    """Global average pooling that counts how often it is traced/called."""

    def __init__(self, scale=1.0, **kwargs):
        super().__init__(**kwargs)
        self.scale, self.calls = scale, 0

    def call(self, x):
        self.calls += 1
        self.last_shape = tuple(x.shape)
        return tf.reduce_mean(x, axis=[1, 2]) * self.scale


def test_embed_shape_dtype_partial_batch_and_single_trace():
    rng = np.random.default_rng(2)
    images = rng.integers(0, 256, size=(7, 10, 10, 3), dtype=np.uint8)
    encoder = keras.Sequential(
        [keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3), keras.layers.GlobalAveragePooling2D()]
    )
    feats = embed(encoder, images, image_size=8, batch_size=3)  # batches 3, 3, 1 (padded)
    assert feats.shape == (7, 4) and feats.dtype == np.float32
    direct = encoder(tf.image.resize(images.astype(np.float32) / 255.0, (8, 8), antialias=True), training=False)
    np.testing.assert_allclose(feats, direct, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(embed(encoder, images, 8, batch_size=64), feats, atol=1e-5)

    gap = CountingGAP()
    embed(gap, images, image_size=8, batch_size=3)
    assert gap.calls == 1  # fixed padded batch shape: traced once for 3 batches


@pytest.mark.parametrize("preprocess", ["default", "fallback"])
def test_embed_scales_uint8_to_unit_range(preprocess, monkeypatch):
    if preprocess == "fallback":  # as if byol_tf.augment did not exist
        monkeypatch.setitem(sys.modules, "byol_tf.augment", None)
    images = np.stack([np.full((5, 5, 3), v, np.uint8) for v in (0, 51, 255)])
    np.testing.assert_allclose(
        embed(CountingGAP(), images, image_size=12), [[0.0] * 3, [0.2] * 3, [1.0] * 3], atol=1e-6
    )
    gap = CountingGAP()
    embed(gap, images, image_size=12)
    assert gap.last_shape == (3, 12, 12, 3)
    with pytest.raises(ValueError, match="dtype=float32"):
        embed(CountingGAP(), images.astype(np.float32), image_size=12)


class ToyBYOL(keras.Model):
    """Online encoder = mean colour (separates the classes); the EMA-like
    target encoder is constant, so kNN on it is at chance."""

    def __init__(self):
        super().__init__()
        self.online_gap = CountingGAP()
        self.target_gap = CountingGAP(scale=0.0)
        self.encoder = keras.Sequential([keras.Input((6, 6, 3)), self.online_gap])
        self.target_encoder = keras.Sequential(
            [keras.Input((6, 6, 3)), self.target_gap, keras.layers.Lambda(lambda f: f + 1.0)]
        )
        self.online_gap.calls = self.target_gap.calls = 0  # ignore symbolic build calls

    def call(self, x):
        return x

    def train_step(self, data):
        return {"loss": tf.constant(0.0)}


class KeysRecorder(keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.keys = {}

    def on_epoch_end(self, epoch, logs=None):
        self.keys[epoch + 1] = sorted(logs)


def colour_data(n, seed):
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % 2
    images = rng.integers(0, 60, size=(n, 6, 6, 3), dtype=np.uint8)
    images[labels == 0, :, :, 0] += 150  # class 0 red, class 1 green
    images[labels == 1, :, :, 1] += 150
    return images, labels


@pytest.mark.parametrize("epochs,expected_epochs", [(4, [2, 4]), (3, [2, 3])])
def test_knn_monitor_logs_on_configured_epochs_with_online_encoder(epochs, expected_epochs):
    (xtr, ytr), (xte, yte) = colour_data(20, 3), colour_data(10, 4)
    model = ToyBYOL()
    model.compile()
    recorder = KeysRecorder()
    history = model.fit(
        np.zeros((4, 6, 6, 3), np.float32),
        epochs=epochs,
        batch_size=4,
        verbose=0,
        callbacks=[KNNMonitor(xtr, ytr, xte, yte, image_size=6, every_n_epochs=2, k=3, batch_size=8), recorder],
    )
    assert [e for e, keys in recorder.keys.items() if "knn_acc" in keys] == expected_epochs
    assert set(recorder.keys) == set(range(1, epochs + 1))
    assert history.history["knn_acc"] == [1.0] * len(expected_epochs)
    assert model.online_gap.calls == 1  # traced once, reused across evaluations
    assert model.target_gap.calls == 0


def test_knn_monitor_encoder_fn_and_errors():
    (xtr, ytr), (xte, yte) = colour_data(20, 3), colour_data(10, 4)
    model = ToyBYOL()
    monitor = KNNMonitor(
        xtr, ytr, xte, yte, image_size=6, k=1, encoder_fn=lambda m: m.target_encoder, name="target_knn"
    )
    monitor.set_model(model)
    logs = {}
    monitor.on_epoch_end(0, logs)
    assert logs == {"target_knn": 0.5}  # constant features: every query gets neighbour 0
    assert model.target_gap.calls == 1 and model.online_gap.calls == 0

    with pytest.raises(ValueError, match="every_n_epochs=0"):
        KNNMonitor(xtr, ytr, xte, yte, image_size=6, every_n_epochs=0)
    with pytest.raises(ValueError, match=r"test_labels\.shape=\(9,\)"):
        KNNMonitor(xtr, ytr, xte, yte[:-1], image_size=6)
    bare = KNNMonitor(xtr, ytr, xte, yte, image_size=6)
    bare.set_model(keras.Sequential([keras.Input((6, 6, 3)), CountingGAP()]))
    with pytest.raises(ValueError, match="model.encoder"):
        bare.on_epoch_end(0, {})
    with pytest.raises(ValueError, match="k=0"):
        KNNMonitor(xtr, ytr, xte, yte, image_size=6, k=0)


def test_embedding_reports_its_progress_in_one_line(capsys):
    from byol_tf.evaluation import embed

    encoder = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.GlobalAveragePooling2D()])
    images = np.random.default_rng(0).integers(0, 256, (10, 8, 8, 3), dtype=np.uint8)
    features = embed(encoder, images, 8, batch_size=4, what="test images")
    # Features are the per-channel means of the [0, 1] images.
    np.testing.assert_allclose(features, images.mean(axis=(1, 2)) / 255.0, rtol=1e-5)
    assert capsys.readouterr().out.count("Embedded 10 test images in") == 1
