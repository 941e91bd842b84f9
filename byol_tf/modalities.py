"""What changes with the kind of example (`image`, `audio`, `text`): views, evaluation input, data, encoder.

The BYOL model, the EMA, the training loop, kNN, the probe and resume are
the same for all three; a run's `PretrainConfig.modality` picks the entry
here. Images keep their own streaming pipeline (`byol_tf.data`); audio clips
and sentences are small enough to be held in memory (`ExampleSet`) and go
through the array path, whose view function is the modality's.
"""

import dataclasses
import gzip
import os
from typing import Callable, Optional, Tuple

import keras
import tensorflow as tf

from byol_tf.data.arrays import ArraySource, ExampleSet

# Encoders built by name for each modality (images: `byol_tf.backbones`).
AUDIO_BACKBONES = ("audio_conv",)
TEXT_BACKBONES = ("text_gru", "text_lstm")


@dataclasses.dataclass(frozen=True)
class Modality:
    """One kind of example.

    Args:
        name: "image", "audio" or "text".
        views: `(batch, seed, augment_config) -> (view1, view2)`, stateless in `seed`.
        eval_input: `(batch, augment_config) -> encoder input`, the evaluation preprocessing.
        load: `(path, split, augment_config) -> ExampleSet`.
        build_encoder: `(config, train_examples) -> keras.Model`.
        serving_input: the input of the served signature, `(name, dtype, shape, what to send)`.
    """

    name: str
    views: Optional[Callable] = None
    eval_input: Optional[Callable] = None
    load: Optional[Callable] = None
    build_encoder: Optional[Callable] = None
    serving_input: Optional[Tuple[str, tf.DType, list, str]] = None


def _audio_views(batch, seed, config):
    from byol_tf.audio import audio_views

    return audio_views(batch, seed, config)


def _audio_eval(batch, config):
    from byol_tf.audio import eval_waveforms

    return eval_waveforms(batch, config.num_samples)


def _load_audio(path, split, config):
    from byol_tf.audio import load_audio

    # Clips keep their full length (up to a crop's worth more): the views crop in time.
    data = load_audio(path, config.sample_rate, split=split)
    return ExampleSet(data.waveforms, "audio", data.labels, _names(data.class_names), list(data.skipped), path)


def _audio_encoder(config, train):
    from byol_tf.audio import build_audio_encoder

    _check_backbone(config.backbone, AUDIO_BACKBONES)
    augment = config.augment
    return build_audio_encoder(
        augment.sample_rate,
        augment.num_samples,
        num_mel_bins=augment.num_mel_bins,
        min_freq=augment.min_freq,
        bn_momentum=0.9 if config.bn_momentum is None else config.bn_momentum,
        bn_epsilon=1e-5 if config.bn_epsilon is None else config.bn_epsilon,
    )


def _text_views(batch, seed, config):
    from byol_tf.text import text_views

    return text_views(batch, seed, config)


def _load_text(path, split, config):
    from byol_tf.text import load_text

    del config
    if path.endswith((".csv", ".csv.gz")):
        columns = _csv_columns(path)
        data = load_text(
            path,
            label_column="label" if "label" in columns else None,
            where={"split": split} if split else None,
        )
    elif split:
        raise ValueError(
            f"A split (`PATH:SPLIT`) applies to CSV files with a `split` column. Received: split={split!r}"
        )
    else:
        data = load_text(path)
    return ExampleSet(data.texts, "text", data.labels, _names(data.class_names), list(data.skipped), path)


def _text_encoder(config, train):
    from byol_tf.text import adapt_vocabulary, build_text_encoder

    _check_backbone(config.backbone, TEXT_BACKBONES)
    if train is None:
        raise ValueError("A text encoder adapts its vocabulary to the training text. Received: train=None")
    vocabulary = adapt_vocabulary(train.examples)
    return build_text_encoder(vocabulary, config.augment.max_tokens, cell=config.backbone.split("_")[1])


MODALITIES = {
    # Images stream through byol_tf.data; their views, evaluation and encoders live there and in backbones.
    "image": Modality("image"),
    "audio": Modality(
        "audio",
        _audio_views,
        _audio_eval,
        _load_audio,
        _audio_encoder,
        ("waveforms", tf.float32, [None, None], "float32 [batch, samples] in [-1, 1] at the run's sample rate"),
    ),
    "text": Modality(
        "text",
        _text_views,
        lambda batch, config: batch,  # the encoder standardises and tokenises raw text itself
        _load_text,
        _text_encoder,
        ("text", tf.string, [None], "string [batch], UTF-8 sentences"),
    ),
}


def get_modality(name: str) -> Modality:
    if name not in MODALITIES:
        raise ValueError(f"Unknown modality; expected one of {tuple(MODALITIES)}. Received: modality={name!r}")
    return MODALITIES[name]


def split_spec(spec: str) -> Tuple[str, Optional[str]]:
    """`"PATH:SPLIT"` -> `(PATH, SPLIT)` when PATH exists and the whole does not; else `(spec, None)`."""
    head, sep, tail = spec.rpartition(":")
    if sep and not os.path.exists(spec) and os.path.exists(head) and tail:
        return head, tail
    return spec, None


def open_examples(data, config, limit: Optional[int] = None) -> ArraySource:
    """Audio or text examples for a run of `config.modality`, held in memory.

    Args:
        data: an `ExampleSet`, an `ArraySource`, or a path with an optional
            split: `fsdd.npz:train` (a `.npz` with a `split` array),
            `sst2.csv.gz:dev` (a CSV with a `split` column), a folder.
        config: the run's `PretrainConfig`.
        limit: keep a fixed random subset of at most this many examples.
    """
    modality = get_modality(config.modality)
    if modality.load is None:
        raise ValueError(f"`open_examples` is for audio and text; images use `data.open_source`. Received: {data!r}")
    if isinstance(data, ArraySource):
        source = data
    else:
        if not isinstance(data, ExampleSet):
            if not isinstance(data, (str, os.PathLike)):
                raise ValueError(f"Expected a path or an ExampleSet of {modality.name}. Received: data={data!r}")
            path, split = split_spec(os.fspath(data))
            if not os.path.exists(path):
                raise ValueError(f"The path does not exist. Received: data={data!r}")
            data = modality.load(path, split, config.augment)
        source = ArraySource(data, limit)
    if source.modality != modality.name:
        raise ValueError(
            f"The data holds {source.modality} examples but the run is {modality.name}. Received: data={source.name!r}"
        )
    return source


def build_encoder(config, backbone: Optional[keras.Model] = None, train=None, synchronized: bool = False):
    """The run's encoder, `backbone` if given (any `keras.Model` from examples to `[batch, D]`)."""
    from byol_tf import backbones

    modality = get_modality(config.modality)
    if modality.build_encoder is None:
        return backbones.build_encoder(
            backbone if backbone is not None else config.backbone,
            config.image_size,
            synchronized=synchronized,
            bn_momentum=config.bn_momentum,
            bn_epsilon=config.bn_epsilon,
        )
    encoder = backbone if backbone is not None else modality.build_encoder(config, train)
    backbones.configure_batch_norm(encoder, synchronized, None, None)
    return encoder


def check_backbone(config) -> None:
    """Raises a ValueError naming `config.backbone` unless the run's modality can build it."""
    from byol_tf import backbones

    if config.modality == "image":
        backbones.check_backbone(config.backbone)
    else:
        _check_backbone(config.backbone, AUDIO_BACKBONES if config.modality == "audio" else TEXT_BACKBONES)


def _check_backbone(name, known):
    if name not in known:
        raise ValueError(f"Unknown backbone for this modality; expected one of {known}. Received: backbone={name!r}")


def _names(class_names):
    return None if class_names is None else [str(c) for c in class_names]


def _csv_columns(path):
    with (gzip.open if path.endswith(".gz") else open)(path, "rt", encoding="utf-8", errors="replace") as f:
        return [c.strip() for c in f.readline().strip().split(",")]
