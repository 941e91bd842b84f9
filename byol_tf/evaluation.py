"""Frozen-feature evaluation: embedding, weighted kNN and a kNN callback.

The kNN rule is the one of InstDisc (Wu et al. 2018), used by solo-learn and
DINO: cosine similarity to every train sample, top-k neighbours, each vote
weighted by `exp(sim / temperature)`, predict the class with the most weight.
"""

import sys
import time
from typing import Tuple

import keras
import numpy as np
import tensorflow as tf

try:  # Honours `keras.config.disable_interactive_logging()`; private in 3.x.
    from keras.src.utils.io_utils import print_msg as _print_msg
except ImportError:
    _print_msg = print


def _resize_and_scale(images, image_size):
    """uint8 [B, H, W, 3] -> float32 [B, S, S, 3] in [0, 1]."""
    images = tf.image.resize(tf.cast(images, tf.float32), (image_size, image_size), method="bilinear", antialias=True)
    return tf.clip_by_value(images / 255.0, 0.0, 1.0)


def _make_embed_fn(encoder, image_size):
    try:  # `byol_tf.augment` owns eval preprocessing once it exists; imported
        # lazily so kNN does not depend on the augmentation module.
        from byol_tf.augment import preprocess_eval as preprocess
    except ImportError:
        preprocess = _resize_and_scale

    @tf.function
    def fn(batch):
        return encoder(preprocess(batch, image_size), training=False)

    return fn


class _Progress:
    """An embedding's progress: a Keras bar on a terminal, and one line when done (what logs keep)."""

    def __init__(self, what, total_batches=None):
        self.what, self.images, self.batches, self.start = what, 0, 0, time.time()
        self.bar = keras.utils.Progbar(total_batches, unit_name="batch") if sys.stdout.isatty() else None

    def step(self, images):
        self.images, self.batches = self.images + int(images), self.batches + 1
        if self.bar is not None:
            self.bar.update(self.batches)

    def done(self):
        _print_msg(f"Embedded {self.images} {self.what} in {time.time() - self.start:.1f} s")


def _run_embed_fn(fn, images, batch_size, what="images"):
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(
            f"Expected uint8 images of shape [N, H, W, 3]. Received: images.shape={images.shape}, dtype={images.dtype}"
        )
    if len(images) == 0 or batch_size < 1:
        raise ValueError(
            "Expected at least one image and batch_size >= 1. Received: "
            f"images.shape={images.shape}, batch_size={batch_size}"
        )
    # One fixed batch shape => one trace; the last batch is zero-padded and the
    # padding rows cut off (training=False, so they cannot affect the others).
    out, progress = [], _Progress(what, -(-len(images) // batch_size))
    for start in range(0, len(images), batch_size):
        batch = images[start : start + batch_size]
        real = len(batch)
        if real < batch_size:
            pad = np.zeros((batch_size - real,) + batch.shape[1:], np.uint8)
            batch = np.concatenate([batch, pad])
        out.append(np.asarray(fn(tf.constant(batch)), np.float32)[:real])
        progress.step(real)
    progress.done()
    return np.concatenate(out)


def embed_dataset(
    encoder: keras.Model, dataset: tf.data.Dataset, what: str = "images"
) -> Tuple[np.ndarray, np.ndarray]:
    """Embeds an evaluation dataset of `(examples, labels)` batches (`byol_tf.data.eval_dataset`).

    Any example type: images, waveforms or strings, as the encoder takes
    them. Shows progress (see `_Progress`), naming the examples as `what`.

    Returns:
        `(features, labels)`: float32 `[N, D]` and int64 `[N]` numpy arrays.
    """
    spec = dataset.element_spec[0]
    fn = tf.function(
        lambda x: encoder(x, training=False),
        # Any batch size, one trace: the last batch is usually smaller.
        input_signature=[tf.TensorSpec([None, *spec.shape[1:]], spec.dtype)],
        reduce_retracing=True,
    )
    features, labels = [], []
    total = int(dataset.cardinality())
    progress = _Progress(what, total if total > 0 else None)
    for images, batch_labels in dataset:
        features.append(np.asarray(fn(images), np.float32))
        labels.append(batch_labels.numpy())
        progress.step(len(labels[-1]))
    progress.done()
    if not features:
        raise ValueError("The evaluation dataset is empty. Received: dataset with no batches")
    return np.concatenate(features), np.concatenate(labels)


def embed(encoder, images: np.ndarray, image_size: int, batch_size: int = 512, what: str = "images") -> np.ndarray:
    """Embeds uint8 images with a frozen encoder (inference mode).

    Args:
        encoder: callable mapping float32 [B, S, S, 3] images in [0, 1] to
            pooled features [B, D]; normalisation is inside the encoder.
        images: uint8 numpy array [N, H, W, 3], values 0..255.
        image_size: side S the images are resized to (bilinear, antialias).
        batch_size: images per forward pass.

    Returns:
        float32 numpy array [N, D].

    Example:
    >>> feats = embed(model.encoder, x_test, image_size=32)
    """
    batch_size = min(batch_size, len(images)) if len(images) else batch_size
    return _run_embed_fn(_make_embed_fn(encoder, image_size), images, batch_size, what)


def _check_knn_args(k, temperature):
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ValueError(f"Expected an integer k >= 1. Received: k={k}")
    if not temperature > 0:
        raise ValueError(f"Expected temperature > 0. Received: temperature={temperature}")


def _check_features(name, x):
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"Expected non-empty 2-D {name}. Received: {name}.shape={x.shape}")
    return x


def _check_labels(name, y, n):
    y = np.asarray(y)
    if y.ndim == 2 and y.shape[1] == 1:  # e.g. keras.datasets.cifar10 labels
        y = y[:, 0]
    if y.ndim != 1 or len(y) != n:
        raise ValueError(f"Expected {name} of shape [{n}] to match the features. Received: {name}.shape={y.shape}")
    if not np.issubdtype(y.dtype, np.integer) or (len(y) and y.min() < 0):
        raise ValueError(f"Expected non-negative integer {name}. Received: dtype={y.dtype}")
    return y.astype(np.int64)


def knn_predict(train_features, train_labels, test_features, k=200, temperature=0.1, num_classes=None, batch_size=1024):
    """Weighted kNN predictions (InstDisc / solo-learn / DINO rule).

    Args:
        train_features: float [N, D] bank of train features.
        train_labels: int [N] labels in `[0, num_classes)`.
        test_features: float [M, D] query features.
        k: neighbours per query; clipped to N.
        temperature: votes are weighted by `exp(cosine_similarity / temperature)`.
        num_classes: defaults to `max(train_labels) + 1`.
        batch_size: queries per step; peak memory is about `batch_size * N` floats.

    Returns:
        int64 numpy array [M] of predicted classes.

    Example:
    >>> pred = knn_predict(f_train, y_train, f_test, k=200, temperature=0.1)
    """
    train = _check_features("train_features", train_features)
    test = _check_features("test_features", test_features)
    labels = _check_labels("train_labels", train_labels, len(train))
    if train.shape[1] != test.shape[1]:
        raise ValueError(
            "Expected train and test features of the same dimension. Received: "
            f"train_features.shape={train.shape}, test_features.shape={test.shape}"
        )
    _check_knn_args(k, temperature)
    if batch_size < 1:
        raise ValueError(f"Expected batch_size >= 1. Received: batch_size={batch_size}")
    max_label = int(labels.max())
    num_classes = max_label + 1 if num_classes is None else int(num_classes)
    if num_classes <= max_label:
        raise ValueError(f"Expected num_classes > max(train_labels)={max_label}. Received: num_classes={num_classes}")
    k = min(int(k), len(train))
    bank = tf.math.l2_normalize(tf.constant(train), axis=1)
    bank_labels = tf.constant(labels)
    preds = []
    for start in range(0, len(test), batch_size):
        q = tf.math.l2_normalize(tf.constant(test[start : start + batch_size]), axis=1)
        sims, idx = tf.math.top_k(tf.matmul(q, bank, transpose_b=True), k=k)
        # Subtracting each row's max similarity rescales its votes by a constant
        # (argmax unchanged) and keeps exp() finite for small temperatures.
        weights = tf.exp((sims - sims[:, :1]) / temperature)
        b = tf.shape(q)[0]
        # Segment sums over (row, class) ids instead of a one-hot [b, k, C]
        # tensor, which would not fit for ImageNet-sized C.
        seg = tf.gather(bank_labels, idx) + tf.range(b, dtype=tf.int64)[:, None] * num_classes
        votes = tf.math.unsorted_segment_sum(tf.reshape(weights, [-1]), tf.reshape(seg, [-1]), b * num_classes)
        preds.append(tf.argmax(tf.reshape(votes, [b, num_classes]), axis=1).numpy())
    return np.concatenate(preds).astype(np.int64)


def knn_accuracy(train_features, train_labels, test_features, test_labels, **kwargs) -> float:
    """Top-1 accuracy in [0, 1] of `knn_predict` (same keyword arguments)."""
    test_labels = _check_labels("test_labels", test_labels, len(np.asarray(test_features)))
    preds = knn_predict(train_features, train_labels, test_features, **kwargs)
    return float(np.mean(preds == test_labels))


def is_monitor_epoch(epoch, every_n_epochs, last_epoch):
    """Whether a monitor runs after 1-based `epoch`: every `every_n_epochs`, and after the last."""
    return epoch % every_n_epochs == 0 or epoch == last_epoch


class KNNMonitor(keras.callbacks.Callback):
    """Logs the kNN accuracy of the online encoder's frozen features.

    Place it *before* `CSVLogger`/`TensorBoard` in `callbacks`: Keras hands one
    shared `logs` dict to the callbacks in list order (History runs last), so
    later callbacks see `logs[name]` and earlier ones do not. Epochs without an
    evaluation have no `name` key, so `History.history[name]` has one entry
    per evaluation, not one per epoch.

    Args:
        train_images, train_labels: uint8 [N, H, W, 3] bank images and labels,
            or an evaluation dataset of `(images, labels)` batches
            (`byol_tf.data.eval_dataset`; then `train_labels` is None).
        test_images, test_labels: the queries, in the same form.
        image_size: side the images are resized to before the encoder.
        every_n_epochs: evaluate when `(epoch + 1) % every_n_epochs == 0`,
            and always after the last epoch of `fit`.
        k, temperature: see `knn_predict`.
        encoder_fn: `model -> encoder`; defaults to `model.encoder`, the
            online encoder (never the EMA `target_encoder`).
        batch_size: images per forward pass.
        name: key written into `logs`.
        last_epoch: `() -> int`, the run's last epoch when one run is
            several `fit` calls (resume, a time budget); default: the last
            epoch of each `fit`.

    Example:
    >>> model.fit(ds, epochs=100, callbacks=[
    ...     KNNMonitor(x_tr, y_tr, x_te, y_te, image_size=32, every_n_epochs=10),
    ...     keras.callbacks.CSVLogger("log.csv")])
    """

    def __init__(
        self,
        train_images,
        train_labels,
        test_images,
        test_labels,
        image_size,
        every_n_epochs=1,
        k=200,
        temperature=0.1,
        encoder_fn=None,
        batch_size=512,
        name="knn_acc",
        last_epoch=None,
    ):
        super().__init__()
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise ValueError(f"Expected every_n_epochs >= 1. Received: every_n_epochs={every_n_epochs}")
        _check_knn_args(k, temperature)  # fail now, not after the first epochs
        self.streamed = isinstance(train_images, tf.data.Dataset)
        if self.streamed:
            if not isinstance(test_images, tf.data.Dataset):
                raise ValueError(f"Pass both sets as datasets or both as arrays. Received: test_images={test_images!r}")
            self.train_images, self.test_images = train_images, test_images
        else:
            self.train_images, self.test_images = np.asarray(train_images), np.asarray(test_images)
            self.train_labels = _check_labels("train_labels", train_labels, len(self.train_images))
            self.test_labels = _check_labels("test_labels", test_labels, len(self.test_images))
        self.image_size, self.every_n_epochs = image_size, every_n_epochs
        self.k, self.temperature, self.encoder_fn = k, temperature, encoder_fn
        self.batch_size, self.name, self.last_epoch = batch_size, name, last_epoch
        self._fn_cache = (None, None)  # (encoder, tf.function): trace once per fit

    def _encoder(self):
        if self.encoder_fn is not None:
            return self.encoder_fn(self.model)
        if not hasattr(self.model, "encoder"):
            raise ValueError(
                f"KNNMonitor needs `model.encoder` or `encoder_fn`. Received: model of type {type(self.model).__name__}"
            )
        return self.model.encoder

    def evaluate(self):
        """Returns the current kNN top-1 accuracy of the online encoder."""
        encoder = self._encoder()
        if self.streamed:
            train, self.train_labels = embed_dataset(encoder, self.train_images, "kNN memory images")
            test, self.test_labels = embed_dataset(encoder, self.test_images, "kNN test images")
        else:
            if self._fn_cache[0] is not encoder:
                self._fn_cache = (encoder, _make_embed_fn(encoder, self.image_size))
            # One batch size for both sets, so both reuse a single trace.
            bs = min(self.batch_size, max(len(self.train_images), len(self.test_images)))
            train = _run_embed_fn(self._fn_cache[1], self.train_images, bs, "kNN memory images")
            test = _run_embed_fn(self._fn_cache[1], self.test_images, bs, "kNN test images")
        return knn_accuracy(train, self.train_labels, test, self.test_labels, k=self.k, temperature=self.temperature)

    def on_epoch_end(self, epoch, logs=None):
        last = self.last_epoch() if callable(self.last_epoch) else (self.params or {}).get("epochs")
        if not is_monitor_epoch(epoch + 1, self.every_n_epochs, last):
            return
        acc = self.evaluate()
        if logs is not None:
            logs[self.name] = acc
        _print_msg(
            f"Epoch {epoch + 1}: {self.name}={acc:.4f} (k={self.k}, "
            f"{len(self.train_labels)} train / {len(self.test_labels)} test)"
        )
