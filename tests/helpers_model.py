"""Tiny BYOL models and data shared by the model, EMA and script tests."""

import numpy as np
import tensorflow as tf

from byol_tf.backbones import build_encoder
from byol_tf.heads import MLPHead
from byol_tf.kernels import install_fast_kernels
from byol_tf.model import BYOL


def tiny_byol(image_size=16, loss="byol", fast_kernels=True, **kwargs):
    encoder = build_encoder("resnet_tiny", image_size)
    model = BYOL(encoder, MLPHead(32, 16, name="projector"), MLPHead(32, 16, name="predictor"), loss=loss, **kwargs)
    if fast_kernels:
        install_fast_kernels(model)
    return model


def view_dataset(num=32, batch=8, image_size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((num, image_size, image_size, 3)).astype("float32")
    noise = 0.1 * rng.random((num, image_size, image_size, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, np.clip(x + noise, 0, 1))).batch(batch).repeat()


def colour_classes(num=48, classes=3, image_size=16, seed=0):
    """Images whose class is the dominant colour channel: separable by a linear probe."""
    rng = np.random.default_rng(seed)
    labels = np.arange(num) % classes
    x = 0.3 * rng.random((num, image_size, image_size, 3)).astype("float32")
    x[np.arange(num), :, :, labels] += 0.7
    return x, labels.astype("int64")


def labelled_view_dataset(x, labels, batch=8):
    noise = 0.05 * np.random.default_rng(1).random(x.shape).astype("float32")
    views = (x, np.clip(x + noise, 0, 1))
    return tf.data.Dataset.from_tensor_slices((views, labels)).batch(batch).repeat()


def weights(variables):
    return [v.numpy().copy() for v in variables]
