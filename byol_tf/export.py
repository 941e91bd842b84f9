"""Exports for TF Serving, on Keras's `keras.export.ExportArchive`: the encoder and the classifier.

`export_run(RUN, "saved_models/NAME")` (the online encoder) and
`export_classifier(classifier, "saved_models/NAME")` (a fine-tuned classifier)
write TF Serving's versioned layout:

    saved_models/NAME/
        1/                          # the SavedModel TF Serving loads
            saved_model.pb
            variables/
            assets.extra/byol_metadata.json
        encoder-1.keras             # the same model for Keras users (classifier-1.keras)
        2/ ...

TF Serving only looks at sub-folders with integer names, so the `.keras` file
next to them (and the hidden temporary folder an export is written into) are
ignored by it. A version folder is never overwritten.

Image signatures (one table, `byol_tf.signatures.image_endpoints`, for both models):

- `serving_default`: `images`, float32 RGB in [0, 255], `[batch, height, width, 3]`;
- `serve_uint8`: `images`, uint8 RGB, `[batch, height, width, 3]`;
- `serve_image_bytes`: `image_bytes`, string `[batch]` of encoded JPEG, PNG, BMP
  or GIF (the first frame); grayscale and RGBA are converted to RGB;
- `metadata`: no input; the export's metadata as a JSON string.

The encoder's return `{"embedding": float32 [batch, D]}`, the classifier's
`{"probabilities": float32 [batch, classes]}`; the classifier also keeps
Keras's `serve` (float32 images in [0, 1] at the training size -> probabilities).

Any batch size and image size is accepted: images go through the one
evaluation preprocessing, `byol_tf.augment.preprocess_eval` (short side to
`image_size / crop_fraction`, centre crop), as in kNN and linear evaluation,
and the model applies the ImageNet mean/std itself. A bad shape fails with an
`InvalidArgumentError` naming the expected shape; undecodable bytes fail in
the decoder with an `InvalidArgumentError`.

Audio and text runs (`export_example_encoder`) have one signature,
`serving_default`: `waveforms` (float32 `[batch, samples]`, centre-cropped or
zero-padded to the run's clip length) or `text` (string `[batch]`, tokenised by
the encoder's own vocabulary), to `embedding`, plus `metadata`.
"""

import datetime
import json
import os
import shutil
from typing import Callable, Dict, Optional, Tuple

import keras
import tensorflow as tf

from byol_tf import __version__
from byol_tf.run_dir import RunDir
from byol_tf.signatures import IMAGE_INPUTS, image_endpoints, image_size_of
from byol_tf.versions import existing_versions, keras_path, next_version, write_version  # noqa: F401 - re-exported

METADATA_FILE = "byol_metadata.json"
EXTRA_DIR = "assets.extra"
NORMALISATION = "[0,255] RGB -> /255 -> ImageNet mean/std inside the encoder"
SIGNATURES = ("serving_default", "serve_uint8", "serve_image_bytes")


def _describe(metadata, inputs, output, output_dim, **fields) -> dict:
    """`metadata` plus what every export records: the signatures (`{name: (input, what)}`), version, time."""
    described = f"float32 [batch, {output_dim or 'D'}]"
    signatures = {name: {"inputs": {key: text}, "outputs": {output: described}} for name, (key, text) in inputs.items()}
    return {
        **(metadata or {}),
        **fields,
        "signatures": signatures,
        "library_version": __version__,
        "exported_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


def _predict_fn(model, output):
    def predict(x):
        # training=False: BatchNorm must use its moving statistics, so an example's
        # output does not depend on the rest of the request's batch.
        return {output: tf.cast(model(x, training=False), tf.float32)}

    return predict


def _write_archive(model, export_dir, endpoints, metadata) -> dict:
    """Writes `model` with `endpoints` (`{name: (function, input_signature)}`) and a `metadata` signature."""
    if os.path.exists(export_dir):
        raise ValueError(f"`export_dir` already exists; it is never overwritten. Received: export_dir={export_dir!r}")
    metadata_json = json.dumps(metadata, indent=2, sort_keys=True)
    archive = keras.export.ExportArchive()
    archive.track(model)
    for name, (fn, signature) in endpoints.items():
        archive.add_endpoint(name, fn, input_signature=signature)
    archive.add_endpoint("metadata", lambda: tf.constant(metadata_json), input_signature=[])
    archive.write_out(export_dir, verbose=False)
    # assets.extra is where TF Serving expects side files (e.g. warm-up requests);
    # it is not loaded into the graph.
    os.makedirs(os.path.join(export_dir, EXTRA_DIR), exist_ok=True)
    with open(os.path.join(export_dir, EXTRA_DIR, METADATA_FILE), "w") as f:
        f.write(metadata_json + "\n")
    return metadata


def write_saved_model(
    model: keras.Model,
    export_dir: str,
    image_size: int,
    output: str,
    metadata: Optional[dict] = None,
    crop_fraction: float = 1.0,
    extra_endpoints: Optional[Dict[str, Tuple[Callable, list]]] = None,
) -> dict:
    """Writes `model` as one SavedModel with the image signatures and the metadata.

    Args:
        model: a Keras model mapping float32 `[B, image_size, image_size, 3]`
            images in [0, 1] to one tensor `[B, D]` (normalisation inside).
        export_dir: the SavedModel folder to create; it must not exist.
        image_size: the resolution served images are resized to.
        output: the name of the signatures' output (`embedding`, `probabilities`).
        metadata: JSON-serialisable extra metadata (preset, steps, ...).
        crop_fraction: the evaluation preprocessing's (`preprocess_eval`).
        extra_endpoints: more `{name: (function, input_signature)}` endpoints.

    Returns:
        The metadata dict that was written.
    """
    if os.path.exists(export_dir):
        raise ValueError(f"`export_dir` already exists; it is never overwritten. Received: export_dir={export_dir!r}")
    image_size = image_size_of(model, image_size)
    output_dim = model.outputs[0].shape[-1] if getattr(model, "outputs", None) else None
    fields = dict(image_size=image_size, crop_fraction=float(crop_fraction), normalisation=NORMALISATION)
    metadata = _describe(metadata, IMAGE_INPUTS, output, output_dim, **fields)
    endpoints = {
        name: (fn, [spec])
        for name, (fn, spec) in image_endpoints(_predict_fn(model, output), image_size, crop_fraction).items()
    }
    return _write_archive(model, export_dir, {**endpoints, **(extra_endpoints or {})}, metadata)


def export_encoder(
    encoder, export_dir: str, image_size: int, metadata: Optional[dict] = None, crop_fraction: float = 1.0
) -> dict:
    """Writes `encoder` as a SavedModel whose signatures return `{"embedding": [B, D]}`.

    Args:
        encoder: a Keras model mapping float32 `[B, image_size, image_size, 3]`
            images in [0, 1] to features `[B, D]` (the ImageNet normalisation
            inside), like a run's `encoder.keras`.
        export_dir: the SavedModel folder to create; it must not exist.
        image_size: the resolution served images are resized to.
        metadata: a dict of JSON-serialisable extra metadata (preset, steps, ...).
        crop_fraction: the evaluation preprocessing's (`preprocess_eval`);
            a run's `eval_crop_fraction`.

    Returns:
        The metadata dict that was written.

    Example:
    >>> export_encoder(keras.saving.load_model("runs/demo/encoder.keras"), "/tmp/encoder/1", 32)["embedding_dim"]
    128
    """
    dim = encoder.outputs[0].shape[-1] if getattr(encoder, "outputs", None) else None
    metadata = {**(metadata or {}), "embedding_dim": None if dim is None else int(dim)}
    return write_saved_model(encoder, export_dir, image_size, "embedding", metadata, crop_fraction)


def run_metadata(run: RunDir) -> dict:
    """What an export records about the run it came from."""
    config, summary = run.read_config_dict() or {}, run.read_summary()
    return {
        "preset": config.get("preset", summary.get("preset")),
        "backbone": config.get("backbone", summary.get("backbone")),
        "training_steps": summary.get("steps"),
        # The run's name, not its absolute path: the model may be shipped elsewhere.
        "run": os.path.basename(os.path.abspath(run.path)),
    }


def export_example_encoder(encoder, export_dir: str, config, metadata: Optional[dict] = None) -> dict:
    """Writes an audio or text encoder as a SavedModel: `serving_default` -> `{"embedding": [B, D]}`.

    Audio takes `waveforms`, float32 `[batch, samples]` in [-1, 1] at the
    run's sample rate, any length (centre-cropped or zero-padded to the
    model's input, as in kNN evaluation); text takes `text`, a string
    `[batch]`, tokenised inside the graph by the encoder's own vocabulary.

    Args:
        encoder: the run's encoder (its input: waveforms or strings).
        export_dir: the SavedModel folder to create; it must not exist.
        config: the run's `PretrainConfig` (its modality and views).
        metadata: JSON-serialisable extra metadata (preset, steps, ...).

    Returns:
        The metadata dict that was written.
    """
    from byol_tf.modalities import get_modality

    modality = get_modality(config.modality)
    if modality.serving_input is None:
        raise ValueError(f"Images are exported by `export_encoder`. Received: modality={config.modality!r}")
    input_name, dtype, shape, what = modality.serving_input
    predict = _predict_fn(encoder, "embedding")
    dim = int(encoder.outputs[0].shape[-1])
    fields = {"modality": config.modality, "embedding_dim": dim}
    if config.modality == "audio":
        fields.update(sample_rate=config.augment.sample_rate, num_samples=config.augment.num_samples)
    else:
        vectorizer = next(layer for layer in encoder.layers if isinstance(layer, keras.layers.TextVectorization))
        fields.update(vocabulary_size=int(vectorizer.vocabulary_size()), max_tokens=config.augment.max_tokens)
    endpoint = (
        lambda x: predict(modality.eval_input(x, config.augment)),
        [tf.TensorSpec(shape, dtype, name=input_name)],
    )
    described = _describe(metadata, {"serving_default": (input_name, what)}, "embedding", dim, **fields)
    return _write_archive(encoder, export_dir, {"serving_default": endpoint}, described)


def check_run_dir(run_dir: str) -> RunDir:
    """`RunDir(run_dir)`, after checking it is a finished run folder (`encoder.keras`, `config.json`)."""
    run = RunDir(run_dir)
    if not os.path.isdir(run_dir):
        raise ValueError(f"`run_dir` is not a folder. Received: run_dir={run_dir!r}")
    for path in (run.encoder_file, run.config_file):
        if not os.path.exists(path):
            raise ValueError(
                f"`run_dir` has no {os.path.basename(path)}; is it a finished run folder? Received: run_dir={run_dir!r}"
            )
    return run


def export_run(run_dir: str, out_dir: str, version: Optional[int] = None) -> str:
    """Exports a run's online encoder to `out_dir/<version>/` for TF Serving.

    Also writes `out_dir/encoder-<version>.keras`, loadable with
    `keras.saving.load_model(path, safe_mode=True)`. See `write_version` for
    how a half-written version is never visible.

    Args:
        run_dir: a run folder with `encoder.keras` and `config.json`
            (`summary.json` adds the step count).
        out_dir: the model's base folder (TF Serving's `--model_base_path`).
        version: integer version >= 1; default: one more than the highest
            present. An existing version is never overwritten.

    Returns:
        The version folder.

    Example:
    >>> export_run("runs/demo", "saved_models/demo")
    'saved_models/demo/1'
    """
    run = check_run_dir(run_dir)
    version = next_version(out_dir, version)
    config, summary = run.read_config_dict() or {}, run.read_summary()
    encoder = run.load_encoder(safe_mode=True)
    metadata = {**run_metadata(run), "version": version}
    keras_copy = lambda path: shutil.copyfile(run.encoder_file, path)  # noqa: E731 - the run's bytes, just loaded
    if config.get("modality", "image") != "image":
        run_config = run.read_config()
        return write_version(
            out_dir, version, lambda path: export_example_encoder(encoder, path, run_config, metadata), keras_copy
        )
    image_size = config.get("image_size") or summary.get("image_size") or encoder.inputs[0].shape[1]
    if not image_size:
        raise ValueError(
            f"No image_size in config.json and the encoder's input size is not fixed. Received: run_dir={run_dir!r}"
        )
    crop_fraction = config.get("eval_crop_fraction", 1.0)
    return write_version(
        out_dir, version, lambda path: export_encoder(encoder, path, image_size, metadata, crop_fraction), keras_copy
    )


def export_classifier(
    classifier: keras.Model,
    out_dir: str,
    version: Optional[int] = None,
    metadata: Optional[dict] = None,
    crop_fraction: float = 1.0,
    keras_copy: bool = True,
) -> str:
    """Exports a fine-tuned classifier to `out_dir/<version>/` for TF Serving.

    The signatures are the encoder's (see the module docstring) and return
    `{"probabilities": [B, num_classes]}`; Keras's `serve` endpoint (float32
    images in [0, 1] at the training size, as `classifier.export()` wrote it)
    is kept.

    Args:
        classifier: from `byol_tf.finetune.build_classifier`: float32 images in
            [0, 1] `[B, S, S, 3]` -> class probabilities.
        out_dir: the model's base folder (TF Serving's `--model_base_path`).
        version: integer version >= 1; default: the next free one. Never overwritten.
        metadata: JSON-serialisable extra metadata (class names, run, ...).
        crop_fraction: the evaluation preprocessing's; `finetune` tests with 1.0.
        keras_copy: also write `out_dir/classifier-<version>.keras`.

    Returns:
        The version folder.

    Example:
    >>> export_classifier(classifier, "saved_models/demo_classifier")
    'saved_models/demo_classifier/1'
    """
    version = next_version(out_dir, version)
    image_size = classifier.input_shape[1]
    if not image_size:
        raise ValueError(f"The classifier's input size must be fixed. Received: input_shape={classifier.input_shape}")
    metadata = {**(metadata or {}), "num_classes": int(classifier.output_shape[-1]), "version": version}
    serve = tf.TensorSpec([None, image_size, image_size, 3], tf.float32, name="inputs")
    extra = {"serve": (lambda x: classifier(x, training=False), [serve])}
    return write_version(
        out_dir,
        version,
        lambda path: write_saved_model(classifier, path, image_size, "probabilities", metadata, crop_fraction, extra),
        classifier.save if keras_copy else None,
        keras_name="classifier",
    )
