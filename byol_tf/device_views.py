"""Augmentation on the accelerator: the host sends crops, the train step finishes the views.

DeepMind's BYOL augments on the TPU so that the host only decodes and
crops. Here the host makes the uint8 (streamed) or float (in-memory) crops
and flips; the colour jitter, grayscale, blur and solarize run inside the
compiled train step, on each replica's share of the batch.
"""

import dataclasses

import keras

from byol_tf.augment import finish_pair
from byol_tf.config import AugmentConfig


@keras.saving.register_keras_serializable(package="byol_tf")
class DeviceViews(keras.layers.Layer):
    """Finishes BYOL view pairs from host crops, inside the train step.

    Its input is a batch of `byol_tf.data.pretrain_dataset(...,
    augment_on="device")`: a dict of
    - `crops`: `[b, 2, size, size, 3]`, uint8 or float in [0, 1], both views'
      crops and flips;
    - `seed`: `[b, 2]`, the host batch's seed on every row;
    - `row`: `[b]`, each image's row in the host batch; `rows`: `[b]`, its size.

    A replica gets a contiguous slice of the rows. It draws the random
    parameters of the whole host batch and keeps its rows', so the views are
    the host path's (`finish_pair`) to float rounding, whatever the replicas.

    Args:
        augment_config: an `AugmentConfig` (or its dict).
    """

    def __init__(self, augment_config, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(autocast=False, **kwargs)
        if isinstance(augment_config, dict):
            augment_config = AugmentConfig.from_dict(augment_config)
        if not isinstance(augment_config, AugmentConfig):
            raise ValueError(f"`augment_config` must be an AugmentConfig. Received: augment_config={augment_config!r}")
        self.augment_config = augment_config
        self.built = True  # no weights

    def call(self, batch):
        crops = batch["crops"]
        rows = (batch["row"][0], batch["rows"][0])
        return finish_pair(crops[:, 0], crops[:, 1], batch["seed"][0], self.augment_config, rows)

    def get_config(self):
        config = super().get_config()
        config.update(augment_config=dataclasses.asdict(self.augment_config))
        return config
