"""Evaluation data: every example once, in order, through the one evaluation preprocessing."""

import numpy as np
import tensorflow as tf

from byol_tf.augment import preprocess_eval
from byol_tf.data import crops, files
from byol_tf.data.arrays import ArraySource, ImageSet
from byol_tf.data.pipeline import _check_batch_size, open_source
from byol_tf.data.stream import StreamPosition


def eval_dataset(
    source, image_size: int, crop_fraction: float = 1.0, batch_size: int = 256, tracker: StreamPosition = None
) -> tf.data.Dataset:
    """Every image once, in a fixed order, through the one evaluation preprocessing.

    Args:
        source: a `Source`, an `ImageSet`, or a uint8 array `[N, H, W, 3]`.
        image_size: the encoder's input side.
        crop_fraction: see `byol_tf.augment.preprocess_eval`.
        batch_size: images per batch; the last batch may be smaller.
        tracker: a `StreamPosition` that names files that fail (streaming sources).

    Returns:
        A finite `tf.data.Dataset` of `(images, labels)`: float32
        `[batch, image_size, image_size, 3]` in [0, 1] and int64 labels (-1 when unlabelled).
    """
    _check_batch_size(batch_size)
    if isinstance(source, np.ndarray):
        source = ArraySource(ImageSet(source))
    source = open_source(source)
    if isinstance(source, ArraySource):
        return examples_eval_dataset(source, lambda x: preprocess_eval(x, image_size, crop_fraction), batch_size)
    max_pixels = getattr(source, "max_pixels", files.MAX_IMAGE_PIXELS)
    tracker = tracker or StreamPosition(source, train=False)
    tracker.restart(0, 0)

    def load(record):
        image = crops.eval_image(source.fetch(record), image_size, crop_fraction, max_pixels)
        return {"position": record["position"], "image": image, "label": record["label"]}

    ds = source.eval_records().map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # An empty batch at position `num_examples` closes the stream, so that
    # failures among the last records are noticed too.
    end = {
        "position": tf.constant([source.num_examples], tf.int64),
        "image": tf.zeros([0, image_size, image_size, 3]),
        "label": tf.zeros([0], tf.int64),
    }
    ds = ds.ignore_errors().batch(batch_size).concatenate(tf.data.Dataset.from_tensors(end))
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(dtype=tf.int64), ds)
    ds = ds.map(lambda i, b: (tracker.observe_op(i, b["position"]), b))
    ds = ds.filter(lambda _, b: tf.size(b["label"]) > 0)
    return ds.map(lambda _, b: (b["image"], b["label"])).prefetch(tf.data.AUTOTUNE)


def examples_eval_dataset(source, preprocess, batch_size: int = 256) -> tf.data.Dataset:
    """In-memory examples (`ArraySource`: images, audio, text) once, in order, through `preprocess`.

    Args:
        source: an `ArraySource`, `ImageSet` or `ExampleSet`.
        preprocess: a batch of examples -> the encoder's input.
        batch_size: examples per batch; the last batch may be smaller.

    Returns:
        A finite `tf.data.Dataset` of `(inputs, labels)`, int64 labels (-1 when unlabelled).
    """
    _check_batch_size(batch_size)
    source = open_source(source)
    if not isinstance(source, ArraySource):
        raise ValueError(f"Expected examples held in memory. Received: data={source.name!r}")
    ds = source.eval_records().batch(batch_size)
    ds = ds.map(lambda r: (preprocess(r["data"]), r["label"]), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    return ds.prefetch(tf.data.AUTOTUNE)


def check_decodable(source, tries=256):
    """Raises a ValueError naming the data unless one of its first `tries` images decodes.

    The stream skips what fails, so a source of nothing but bad files would
    otherwise wait forever for its first batch.
    """
    source = open_source(source)
    if isinstance(source, ArraySource):
        return
    max_pixels = getattr(source, "max_pixels", files.MAX_IMAGE_PIXELS)
    probe = (
        source.eval_records()
        .take(tries)
        .map(lambda r: tf.shape(crops.eval_image(source.fetch(r), 8, 1.0, max_pixels)))
        .ignore_errors()
        .take(1)
    )
    if any(True for _ in probe):
        return
    examples = "; ".join("{}: {}".format(*source.describe(p, train=False)) for p in range(min(3, tries)))
    raise ValueError(
        f"None of the first {tries} images could be decoded (e.g. {examples}). Received: data={source.name!r}"
    )


def load_images(
    data, image_size: int, split: str = "train", limit=None, crop_fraction: float = 1.0, tfds_data_dir=None
) -> ImageSet:
    """Loads a source into memory through the evaluation preprocessing, as uint8 `image_size` squares.

    For labelled sets that evaluation and fine-tuning hold in memory; pretraining streams instead.

    Args:
        data, split, limit, tfds_data_dir: as `open_source`.
        image_size: the side of the squares.
        crop_fraction: see `byol_tf.augment.preprocess_eval`.

    Returns:
        An `ImageSet`; `skipped` lists `(file, reason)` for every file that failed.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive integer. Received: image_size={image_size!r}")
    source = open_source(data, split, limit, image_size, tfds_data_dir)
    images, labels = [], []
    for x, y in eval_dataset(source, int(image_size), crop_fraction).as_numpy_iterator():
        images.append(np.round(x * 255.0).astype(np.uint8))
        labels.append(y)
    if not images:
        reason = source.skips.items()[-1] if source.skips.count else ("", "no image")
        raise ValueError(
            f"None of the {source.num_examples} images could be decoded (e.g. {reason[0]}: {reason[1]}). "
            f"Received: data={source.name!r}"
        )
    labels = np.concatenate(labels)
    return ImageSet(
        np.concatenate(images),
        labels if source.labelled else None,
        source.class_names,
        skipped=source.skips.items(),
        source=source.name,
    )
