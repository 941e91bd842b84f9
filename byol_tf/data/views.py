"""`views`: BYOL view pairs from a user's own images, for `BYOL.fit`."""

import tensorflow as tf

from byol_tf.config import AugmentConfig
from byol_tf.data.pipeline import open_source, pretrain_dataset, steps_per_epoch
from byol_tf.data.record_sources import DatasetSource


def views(
    images, augment_config: AugmentConfig = None, batch_size: int = 256, seed: int = 0, num_examples: int = None
) -> tf.data.Dataset:
    """An endless, seeded stream of BYOL view pairs from `images`.

    Each image is cropped from its original size, twice, with the paper's
    asymmetric augmentation (`AugmentConfig`); a pass over the images is an
    epoch, reshuffled from `seed`. The dataset carries
    `byol_steps_per_epoch`, which `BYOL.fit` uses when it is not told.

    Args:
        images: a `tf.data.Dataset` of images (any size, uint8 or float in
            [0, 1]; or encoded bytes), of `(image, label)` pairs, or of
            `{"image": ...}` dicts; or anything `byol_tf.data.open_source`
            takes (a folder, shards, `"tfds:NAME"`, a `.npz`).
        augment_config: the two views (default `AugmentConfig()`, 224 px).
        batch_size: images per batch.
        seed: seeds the order and every augmentation.
        num_examples: the dataset's size when its cardinality is unknown.

    Returns:
        A `tf.data.Dataset` of `(view1, view2)` float32 batches in [0, 1].

    Example:
    >>> images = tf.data.Dataset.from_tensor_slices(tf.zeros([8, 40, 30, 3], tf.uint8))
    >>> pairs = views(images, AugmentConfig(image_size=16), batch_size=4)
    >>> pairs.byol_steps_per_epoch, pairs.element_spec[0].shape
    (2, TensorShape([4, 16, 16, 3]))
    """
    augment_config = AugmentConfig() if augment_config is None else augment_config
    if isinstance(images, tf.data.Dataset):
        source = DatasetSource(images, num_examples)
    else:
        source = open_source(images)
    dataset = pretrain_dataset(source, batch_size, augment_config, seed=seed)
    dataset.byol_steps_per_epoch = steps_per_epoch(source.num_examples, batch_size)
    return dataset
