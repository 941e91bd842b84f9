"""keras-hub presets out of BYOL encoders (needs the `hub` extra: `pip install 'byol-tf[hub]'`).

`save_preset(encoder, "presets/NAME")` writes the encoder's keras-hub backbone
as a preset folder:

    presets/NAME/
        config.json, model.weights.h5, metadata.json   # the backbone (`save_to_preset`)
        image_converter.json                           # the encoder's input normalisation
        byol_metadata.json                             # where the weights came from

so that, offline,

    keras_hub.models.Backbone.from_preset("presets/NAME")       # the learned backbone
    keras_hub.models.ImageClassifier.from_preset("presets/NAME", num_classes=10)

work; the image converter takes RGB images in [0, 255], resizes them to the
training size and applies the encoder's ImageNet mean/std, so the classifier's
preprocessor feeds the backbone exactly what it saw in pretraining. In byol-tf
the same folder is the backbone `keras_hub_preset:presets/NAME`.
"""

import json
import os
import shutil
import tempfile
from typing import Optional

import keras
import numpy as np

from byol_tf import __version__
from byol_tf.export import METADATA_FILE, check_run_dir, run_metadata
from byol_tf.finetune import split_encoder


def hub_backbone(encoder: keras.Model):
    """The `keras_hub.models.Backbone` inside a `build_encoder` encoder.

    Args:
        encoder: Input -> Normalization -> keras-hub backbone -> pooling, as
            `build_encoder("keras_hub:CLASS", ...)` builds it.
    """
    import keras_hub

    _, backbone = split_encoder(encoder)
    if not isinstance(backbone, keras_hub.models.Backbone):
        raise ValueError(
            "Only a keras-hub backbone can be saved as a keras-hub preset; pretrain with "
            "`--backbone=keras_hub:CLASS` or `keras_hub_preset:PRESET`. "
            f"Received: backbone={type(backbone).__name__}"
        )
    return backbone


def image_converter(encoder: keras.Model):
    """A keras-hub `ImageConverter` doing the encoder's input scaling, for [0, 255] images.

    The encoder computes `(x / 255 - mean) / std` (its `Normalization` layer on
    [0, 1] images); the converter computes `x * scale + offset` on [0, 255]
    images, so `scale = 1 / (255 std)` and `offset = -mean / std`.
    """
    import keras_hub

    norm, backbone = split_encoder(encoder)
    scale, offset = 1.0 / 255.0, None
    if norm is not None:
        mean = np.reshape(keras.ops.convert_to_numpy(norm.mean), [-1]).astype(np.float64)
        # Keras's Normalization divides by max(sqrt(variance), epsilon).
        std = np.maximum(np.sqrt(np.reshape(keras.ops.convert_to_numpy(norm.variance), [-1])), keras.config.epsilon())
        scale, offset = (1.0 / (255.0 * std)).tolist(), (-mean / std).tolist()
    # The backbone's own converter class, when keras-hub has one, so its task classes find it.
    converter_cls = next(
        (c for c in keras_hub.layers.ImageConverter.__subclasses__() if c.backbone_cls is type(backbone)),
        keras_hub.layers.ImageConverter,
    )
    size = int(encoder.input_shape[1])
    # Bilinear with antialiasing, as the evaluation preprocessing resizes.
    return converter_cls(image_size=(size, size), scale=scale, offset=offset, interpolation="bilinear", antialias=True)


def save_preset(encoder: keras.Model, preset_dir: str, metadata: Optional[dict] = None) -> str:
    """Writes the encoder's keras-hub backbone and its input scaling as a preset folder.

    The folder is written next to `preset_dir` under a hidden temporary name
    and renamed into place, so a half-written preset is never visible; an
    existing `preset_dir` is never overwritten.

    Args:
        encoder: a `build_encoder` encoder on a keras-hub backbone (a run's `encoder.keras`).
        preset_dir: the folder to create.
        metadata: JSON-serialisable extra metadata for `byol_metadata.json`.

    Returns:
        `preset_dir`.

    Example:
    >>> save_preset(keras.saving.load_model("runs/hub/encoder.keras"), "presets/hub")
    'presets/hub'
    """
    if os.path.exists(preset_dir):
        raise ValueError(f"`preset_dir` already exists; it is never overwritten. Received: preset_dir={preset_dir!r}")
    backbone, converter = hub_backbone(encoder), image_converter(encoder)
    parent = os.path.dirname(os.path.abspath(preset_dir))
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=".preset-", dir=parent)
    try:
        backbone.save_to_preset(tmp)
        converter.save_to_preset(tmp)
        record = {
            **(metadata or {}),
            "image_size": int(encoder.input_shape[1]),
            "inputs": "the backbone takes ImageNet-normalised images; image_converter.json does it for [0, 255] RGB",
            "library_version": __version__,
        }
        with open(os.path.join(tmp, METADATA_FILE), "w") as f:
            json.dump(record, f, indent=2, sort_keys=True)
        # Re-check: os.rename would silently replace an empty folder made meanwhile.
        if os.path.exists(preset_dir):
            raise ValueError(f"`preset_dir` appeared during the export. Received: preset_dir={preset_dir!r}")
        os.rename(tmp, preset_dir)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return preset_dir


def export_run_preset(run_dir: str, preset_dir: str) -> str:
    """Saves a run's online encoder as a keras-hub preset folder (see `save_preset`).

    Args:
        run_dir: a finished run folder (`encoder.keras`, `config.json`) of a keras-hub backbone.
        preset_dir: the folder to create; never overwritten.

    Returns:
        `preset_dir`.

    Example:
    >>> export_run_preset("runs/hub", "presets/hub")
    'presets/hub'
    """
    run = check_run_dir(run_dir)
    return save_preset(run.load_encoder(safe_mode=True), preset_dir, run_metadata(run))
