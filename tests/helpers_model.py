"""Tiny BYOL models and data shared by the model, EMA and script tests."""

import numpy as np
import tensorflow as tf

from byol_tf.backbones import build_encoder
from byol_tf.heads import MLPHead
from byol_tf.model import BYOL


def tiny_byol(image_size=16, loss="byol"):
    encoder = build_encoder("resnet_tiny", image_size)
    return BYOL(encoder, MLPHead(32, 16, name="projector"), MLPHead(32, 16, name="predictor"), loss=loss)


def view_dataset(num=32, batch=8, image_size=16, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.random((num, image_size, image_size, 3)).astype("float32")
    noise = 0.1 * rng.random((num, image_size, image_size, 3)).astype("float32")
    return tf.data.Dataset.from_tensor_slices((x, np.clip(x + noise, 0, 1))).batch(batch).repeat()


def weights(variables):
    return [v.numpy().copy() for v in variables]
