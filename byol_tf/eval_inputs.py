"""What an evaluation needs from a run folder: the encoder (learned or at random init) and labelled data.

Shared by `byol-linear-eval` and `byol-finetune`.
"""

import os

import keras

from byol_tf.run_dir import RunDir


def load_run_config(run_dir):
    """Reads `RUN/config.json` as a `PretrainConfig`.

    Args:
        run_dir: a pretraining run folder.

    Returns:
        The `byol_tf.config.PretrainConfig` the run was made with.
    """
    return RunDir(run_dir).read_config()


def load_encoder(run_dir=None, encoder_path=None, random_init=False):
    """Loads the encoder to evaluate: the run's, another file, or a random init.

    Args:
        run_dir: a pretraining run folder; its `encoder.keras` is the default
            encoder and its `config.json` describes the backbone.
        encoder_path: a `.keras` encoder file (images in [0, 1] to pooled
            features), instead of `RUN/encoder.keras`.
        random_init: instead of the trained weights, the same backbone at the
            random init the run started from (rebuilt from `config.json` with
            the run's seed), the baseline the learned features must beat.

    Returns:
        `(encoder, config)`: a `keras.Model` and the run's `PretrainConfig`,
        or `None` when no `run_dir` is given.
    """
    config = load_run_config(run_dir) if run_dir else None
    if random_init:
        if config is None:
            raise ValueError(
                "A random-init encoder is rebuilt from the run's config.json, so it "
                f"needs `run_dir`. Received: run_dir={run_dir!r}"
            )
        # Imported here: it pulls in the model and data stacks.
        from byol_tf.run_eval import random_init_encoder

        return random_init_encoder(config), config
    path = encoder_path or (RunDir(run_dir).encoder_file if run_dir else None)
    if path is None or not os.path.exists(path):
        raise ValueError(
            "Expected an existing encoder file (`encoder_path`, or `run_dir` holding "
            f"encoder.keras). Received: run_dir={run_dir!r}, encoder_path={encoder_path!r}"
        )
    return keras.saving.load_model(path), config


def encoder_image_size(encoder):
    """The square input side an encoder was built for."""
    shape = encoder.input_shape
    if len(shape) != 4 or shape[1] is None or shape[1] != shape[2]:
        raise ValueError(f"Expected an encoder with a square input [B, S, S, 3]. Received: input_shape={shape}")
    return int(shape[1])


def resolve_sources(data, eval_data, config=None):
    """The train and test data sources: the given ones, else what the run implies.

    Args:
        data: the training source, or `None`: `"shapes"` for a demo run.
        eval_data: the test source, or `None`: the same `"shapes"` (whose
            test split is generated with another seed) or, for `"tfds:NAME"`,
            `"tfds:NAME:test"`.
        config: the run's `PretrainConfig`, or `None`.

    Returns:
        `(data, eval_data)`.
    """
    data = data or ("shapes" if config is not None and config.preset == "demo" else None)
    if data is None:
        raise ValueError("`data` is required unless the run is a demo run. Received: data=None")
    if eval_data is None and data == "shapes":
        eval_data = data
    elif eval_data is None and data.startswith("tfds:") and data.count(":") == 1:
        eval_data = f"{data}:test"
    if eval_data is None:
        raise ValueError(f"`eval_data` is required for this data. Received: eval_data=None, data={data}")
    for name, value in (("data", data), ("eval_data", eval_data)):
        if value != "shapes" and not value.startswith("tfds:") and not os.path.exists(value):
            raise ValueError(f"`{name}` does not exist. Received: {name}={value}")
    return data, eval_data


def load_labelled(source, image_size, split, limit=None, crop_fraction=1.0):
    """Loads a labelled `data.ImageSet` (`shapes`, tfds, .npz or folder).

    Args:
        source: as `--data` of `byol-pretrain`.
        image_size: side the images are fitted to.
        split: "train" or "test" (the held-out `shapes` use another seed).
        limit: keep at most this many images (a fixed random subset).
        crop_fraction: the evaluation preprocessing's (`preprocess_eval`).
    """
    from byol_tf import data

    images = data.load_images(source, image_size, split, limit, crop_fraction)
    if images.labels is None:
        raise ValueError(f"Evaluation needs labelled data. Received: data={source!r} (unlabelled)")
    return images


def load_eval_inputs(run_dir, encoder_path, random_init, data, eval_data, limit=None, eval_limit=None):
    """The encoder and the labelled train/test sets that an evaluation script needs.

    Returns:
        `(encoder, config, train, test, data, eval_data)`: the sources as
        resolved from the run's config when `data`/`eval_data` are None.
    """
    config = load_run_config(run_dir) if run_dir else None
    if config is not None and config.modality != "image":
        return _example_inputs(config, run_dir, encoder_path, random_init, data, eval_data, limit, eval_limit)
    encoder, config = load_encoder(run_dir, encoder_path, random_init)
    data, eval_data = resolve_sources(data, eval_data, config)
    image_size = encoder_image_size(encoder)
    crop_fraction = config.eval_crop_fraction if config is not None else 1.0
    train = load_labelled(data, image_size, "train", limit, crop_fraction)
    test = load_labelled(eval_data, image_size, "test", eval_limit, crop_fraction)
    return encoder, config, train, test, data, eval_data


def _example_inputs(config, run_dir, encoder_path, random_init, data, eval_data, limit, eval_limit):
    """`load_eval_inputs` for audio and text runs: the examples in memory, their encoder."""
    from byol_tf.run_eval import load_source, random_init_encoder

    for name, value in (("data", data), ("eval_data", eval_data)):
        if value is None:
            raise ValueError(f"`{name}` is required for a {config.modality} run (PATH:SPLIT). Received: {name}=None")
    train, test = load_source(data, config, limit=limit), load_source(eval_data, config, limit=eval_limit)
    for name, source in (("data", train), ("eval_data", test)):
        if not source.labelled:
            raise ValueError(f"Evaluation needs labelled data. Received: {name}={source.name!r} (unlabelled)")
    if random_init:
        encoder = random_init_encoder(config, train)  # a text encoder's vocabulary comes from `train`
    else:
        encoder, _ = load_encoder(run_dir, encoder_path)
    return encoder, config, train, test, data, eval_data
