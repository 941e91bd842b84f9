"""Exports a run's online encoder as a TF Serving SavedModel.

`export_run(RUN, "saved_models/NAME")` writes TF Serving's versioned layout:

    saved_models/NAME/
        1/                          # the SavedModel TF Serving loads
            saved_model.pb
            variables/
            assets.extra/byol_metadata.json
        encoder-1.keras             # the same encoder for Keras users
        2/ ...

TF Serving only looks at sub-folders with integer names, so the `.keras` file
next to them (and the hidden temporary folder an export is written into) are
ignored by it. A version folder is never overwritten.

Signatures (all return `{"embedding": float32 [batch, D]}`):

- `serving_default`: `images`, float32 RGB in [0, 255], `[batch, height, width, 3]`;
- `serve_uint8`: `images`, uint8 RGB, `[batch, height, width, 3]`;
- `serve_image_bytes`: `image_bytes`, string `[batch]` of encoded JPEG, PNG, BMP
  or GIF (the first frame); grayscale and RGBA are converted to RGB.

Any batch size and image size is accepted: images go through the one
evaluation preprocessing, `byol_tf.augment.preprocess_eval` (short side to
`image_size / crop_fraction`, centre crop), as in kNN and linear evaluation,
and the encoder applies the ImageNet mean/std itself. A bad shape fails with an `InvalidArgumentError` naming the expected
shape; undecodable bytes fail in the decoder with an `InvalidArgumentError`.
"""

import datetime
import json
import numbers
import os
import re
import shutil
import tempfile
from typing import Optional

import tensorflow as tf

from byol_tf import __version__
from byol_tf.augment import preprocess_eval
from byol_tf.data.crops import eval_image
from byol_tf.run_dir import RunDir

METADATA_FILE = "byol_metadata.json"
EXTRA_DIR = "assets.extra"
NORMALISATION = "[0,255] RGB -> /255 -> ImageNet mean/std inside the encoder"
SIGNATURES = ("serving_default", "serve_uint8", "serve_image_bytes")
_VERSION_DIR = re.compile(r"^[0-9]+$")
_KERAS_FILE = re.compile(r"^encoder-([0-9]+)\.keras$")


def keras_path(out_dir, version):
    """The `.keras` copy of version `version`, next to the version folders."""
    return os.path.join(out_dir, f"encoder-{int(version)}.keras")


def existing_versions(out_dir):
    """The versions present in `out_dir`: integer folders or `encoder-N.keras` files."""
    if not os.path.isdir(out_dir):
        return []
    versions = set()
    for name in os.listdir(out_dir):
        if _VERSION_DIR.match(name) and os.path.isdir(os.path.join(out_dir, name)):
            versions.add(int(name))
        match = _KERAS_FILE.match(name)
        if match:
            # An orphaned .keras file (an export that died halfway) still claims its number.
            versions.add(int(match.group(1)))
    return sorted(versions)


class _ServingModule(tf.Module):
    """The encoder plus the serving functions that tf.saved_model.save traces."""

    def __init__(self, encoder, image_size, metadata_json, crop_fraction=1.0):
        super().__init__(name="byol_encoder")
        self.encoder = encoder
        self._image_size = int(image_size)
        self._crop_fraction = float(crop_fraction)
        self._metadata_json = metadata_json

    def _embed_resized(self, x):
        """[B, S, S, 3] float32 in [0, 1] -> {"embedding": [B, D]}."""
        # training=False: BatchNorm must use its moving statistics, so an image's
        # embedding does not depend on the rest of the request's batch.
        features = self.encoder(x, training=False)
        return {"embedding": tf.cast(features, tf.float32)}

    def _resize(self, images):
        # The evaluation pipeline's own function, so served and evaluated embeddings agree.
        return preprocess_eval(images, self._image_size, self._crop_fraction)

    def _embed_pixels(self, images):
        """Checks the shape of a batch in [0, 255], resizes it and embeds it."""
        # The signatures declare an unknown shape on purpose: a declared
        # [?, ?, ?, 3] would make the check below constant-fold away, and a wrong
        # feed would then fail deep inside a convolution with an obscure message.
        shape = tf.shape(images)
        # shape[-1:] is empty (not an error) for a scalar, so this is safe at any rank.
        ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.reduce_all(tf.equal(shape[-1:], 3)))
        check = tf.debugging.Assert(
            ok, ["`images` must have shape [batch, height, width, 3] (RGB). Received shape:", shape], summarize=8
        )
        with tf.control_dependencies([check]):
            images = tf.ensure_shape(images, [None, None, None, 3])
        size_ok = tf.reduce_all(tf.greater(shape[1:3], 0))
        check = tf.debugging.Assert(
            size_ok, ["`images` must have height and width >= 1. Received shape:", shape], summarize=8
        )
        with tf.control_dependencies([check]):
            images = tf.identity(images)
        return self._embed_resized(self._resize(tf.cast(images, tf.float32) / 255.0))

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32, name="images")])
    def serve_float(self, images):
        return self._embed_pixels(images)

    @tf.function(input_signature=[tf.TensorSpec(None, tf.uint8, name="images")])
    def serve_uint8(self, images):
        return self._embed_pixels(images)

    @tf.function(input_signature=[tf.TensorSpec([None], tf.string, name="image_bytes")])
    def serve_image_bytes(self, image_bytes):
        def decode(data):
            # The evaluation pipeline's decoder: grayscale and RGBA become RGB, a GIF its first frame.
            return eval_image(data, self._image_size, self._crop_fraction)

        # Images of different sizes cannot be stacked before resizing, hence map_fn.
        spec = tf.TensorSpec([self._image_size, self._image_size, 3], tf.float32)
        pixels = tf.map_fn(decode, image_bytes, fn_output_signature=spec)
        return self._embed_resized(pixels)

    @tf.function(input_signature=[])
    def metadata(self):
        """The export's metadata as a JSON string."""
        return tf.constant(self._metadata_json)


def export_encoder(
    encoder, export_dir: str, image_size: int, metadata: Optional[dict] = None, crop_fraction: float = 1.0
) -> dict:
    """Writes `encoder` as a SavedModel with the serving signatures.

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
    """
    if os.path.exists(export_dir):
        raise ValueError(f"`export_dir` already exists; it is never overwritten. Received: export_dir={export_dir!r}")
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"`image_size` must be >= 1. Received: image_size={image_size}")
    input_shape = tuple(encoder.inputs[0].shape) if getattr(encoder, "inputs", None) else None
    if input_shape and input_shape[1:3] not in ((None, None), (image_size, image_size)):
        raise ValueError(
            f"`image_size` does not match the encoder's input shape {input_shape}. Received: image_size={image_size}"
        )
    embedding_dim = encoder.outputs[0].shape[-1] if getattr(encoder, "outputs", None) else None
    metadata = dict(metadata or {})
    embedding = f"float32 [batch, {embedding_dim or 'D'}]"
    metadata.update(
        image_size=image_size,
        crop_fraction=float(crop_fraction),
        embedding_dim=None if embedding_dim is None else int(embedding_dim),
        normalisation=NORMALISATION,
        signatures={
            "serving_default": {
                "inputs": {"images": "float32 [batch, height, width, 3], RGB 0..255"},
                "outputs": {"embedding": embedding},
            },
            "serve_uint8": {
                "inputs": {"images": "uint8 [batch, height, width, 3], RGB"},
                "outputs": {"embedding": embedding},
            },
            "serve_image_bytes": {
                "inputs": {"image_bytes": "string [batch], encoded JPEG/PNG/BMP/GIF"},
                "outputs": {"embedding": embedding},
            },
        },
        library_version=__version__,
        exported_at=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    )
    metadata_json = json.dumps(metadata, indent=2, sort_keys=True)
    module = _ServingModule(encoder, image_size, metadata_json, crop_fraction)
    signatures = {
        "serving_default": module.serve_float.get_concrete_function(),
        "serve_uint8": module.serve_uint8.get_concrete_function(),
        "serve_image_bytes": module.serve_image_bytes.get_concrete_function(),
    }
    tf.saved_model.save(module, export_dir, signatures=signatures)
    # assets.extra is where TF Serving expects side files (e.g. warm-up requests);
    # it is not loaded into the graph.
    os.makedirs(os.path.join(export_dir, EXTRA_DIR), exist_ok=True)
    with open(os.path.join(export_dir, EXTRA_DIR, METADATA_FILE), "w") as f:
        f.write(metadata_json + "\n")
    return metadata


def export_run(run_dir: str, out_dir: str, version: Optional[int] = None) -> str:
    """Exports a run's online encoder to `out_dir/<version>/` for TF Serving.

    Also writes `out_dir/encoder-<version>.keras`, loadable with
    `keras.saving.load_model(path, safe_mode=True)`. The export is written to a
    hidden temporary folder in `out_dir` and renamed into place, so TF Serving,
    which may be watching `out_dir`, never sees a half-written version.

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
    run = RunDir(run_dir)
    encoder_path, config_path = run.encoder_file, run.config_file
    if not os.path.isdir(run_dir):
        raise ValueError(f"`run_dir` is not a folder. Received: run_dir={run_dir!r}")
    for path in (encoder_path, config_path):
        if not os.path.exists(path):
            raise ValueError(
                f"`run_dir` has no {os.path.basename(path)}; is it a finished run folder? Received: run_dir={run_dir!r}"
            )
    existing = existing_versions(out_dir)
    if version is None:
        version = max(existing, default=0) + 1
    elif isinstance(version, bool) or not isinstance(version, numbers.Integral) or version < 1:
        raise ValueError(f"`version` must be an integer >= 1. Received: version={version!r}")
    version = int(version)
    version_dir = os.path.join(out_dir, str(version))
    if version in existing or os.path.exists(version_dir):
        raise ValueError(
            f"Version {version} already exists in {out_dir!r} and is never overwritten; "
            f"leave `version` unset for the next free one ({max(existing, default=0) + 1}). Received: version={version}"
        )

    config, summary = run.read_config_dict() or {}, run.read_summary()
    encoder = run.load_encoder(safe_mode=True)
    image_size = config.get("image_size") or summary.get("image_size") or encoder.inputs[0].shape[1]
    if not image_size:
        raise ValueError(
            f"No image_size in config.json and the encoder's input size is not fixed. Received: run_dir={run_dir!r}"
        )
    metadata = {
        "preset": config.get("preset", summary.get("preset")),
        "backbone": config.get("backbone", summary.get("backbone")),
        "training_steps": summary.get("steps"),
        # The run's name, not its absolute path: the model may be shipped elsewhere.
        "run": os.path.basename(os.path.abspath(run_dir)),
        "version": version,
    }
    os.makedirs(out_dir, exist_ok=True)
    # A dot-folder: TF Serving ignores non-integer names, so it never sees this.
    tmp = tempfile.mkdtemp(prefix=".export-", dir=out_dir)
    try:
        export_encoder(
            encoder,
            os.path.join(tmp, "saved_model"),
            image_size,
            metadata,
            crop_fraction=config.get("eval_crop_fraction", 1.0),
        )
        # A byte copy of the run's file, which load_model(safe_mode=True) just read.
        shutil.copyfile(encoder_path, os.path.join(tmp, "encoder.keras"))
        # Re-check: another export may have claimed the version meanwhile. os.rename
        # of a folder also refuses to replace a non-empty one.
        if os.path.exists(version_dir) or os.path.exists(keras_path(out_dir, version)):
            raise ValueError(
                f"Version {version} appeared in {out_dir!r} during the export. Received: version={version}"
            )
        os.rename(os.path.join(tmp, "saved_model"), version_dir)
        os.rename(os.path.join(tmp, "encoder.keras"), keras_path(out_dir, version))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return version_dir
