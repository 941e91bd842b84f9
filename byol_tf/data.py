"""Loading images into memory and turning them into BYOL input pipelines.

Everything is loaded once into a uint8 array (`ImageSet`), from one of:

- `"tfds:NAME"` or `"tfds:NAME:SPLIT"`: a TensorFlow Datasets dataset;
- a `.npz` file with an `x` array (and optionally `y`, `class_names`);
- a folder of image files, with one subfolder per class or without labels.

`make_shapes` generates a labelled toy dataset without any download, for the
demo and the tests. `pretrain_dataset` and `eval_dataset` build the `tf.data`
pipelines that `BYOL.fit` and the linear/kNN evaluation consume.

In-memory arrays are the design choice here: the datasets this library
targets on one machine (CIFAR-sized, or a few thousand folder images) fit
easily, and it keeps every pipeline simple, seedable and fast.
"""

import dataclasses
import os
import re
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf.augment import augment_pair, preprocess_eval
from byol_tf.config import AugmentConfig

# Extensions `tf.io.decode_image` understands; matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

# "tfds:NAME[:SPLIT]". NAME may carry a config and a version ("mnist:3.0.1",
# "imagenette/320px:1.0.0"), and SPLIT may contain colons ("train[:10%]"), so
# a plain split on ":" is ambiguous; the version is recognised by its form.
_TFDS_RE = re.compile(r"^tfds:(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")

# `limit` keeps a random subset; a fixed seed makes it the same subset each run.
_LIMIT_SEED = 1234

# Images resized per call when fitting an in-memory array: bounds the float32
# working memory (512 x 224 x 224 x 3 x 4 bytes = 300 MB at ImageNet size).
_RESIZE_CHUNK = 512


@dataclasses.dataclass
class ImageSet:
    """Images loaded into memory, with their labels when there are any.

    Args:
        images: uint8 array `[num_images, size, size, 3]`.
        labels: int64 array `[num_images]` of indices into `class_names`, or
            `None` for an unlabelled source.
        class_names: the class names (index = label), or `None` if unknown.
        skipped: `(path, reason)` for each file that could not be used.
        source: where the images came from, for logs and run records.
    """

    images: np.ndarray
    labels: Optional[np.ndarray] = None
    class_names: Optional[List[str]] = None
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        images = np.asarray(self.images)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(
                "`images` must be a uint8 array of shape [N, H, W, 3]. "
                f"Received: images with dtype={images.dtype} and shape={images.shape}"
            )
        self.images = images
        if self.labels is not None:
            labels = np.asarray(self.labels)
            if labels.shape != (len(images),):
                raise ValueError(
                    f"`labels` must have shape ({len(images)},), one per image. "
                    f"Received: labels with shape={labels.shape}"
                )
            self.labels = labels.astype(np.int64)

    def __len__(self) -> int:
        return len(self.images)

    @property
    def num_images(self) -> int:
        """Number of images loaded."""
        return len(self.images)

    @property
    def num_skipped(self) -> int:
        """Number of files that could not be used (see `skipped` for why)."""
        return len(self.skipped)

    @property
    def num_classes(self) -> Optional[int]:
        """Number of classes, or `None` for unlabelled data."""
        if self.class_names is not None:
            return len(self.class_names)
        if self.labels is not None and len(self.labels):
            return int(self.labels.max()) + 1
        return None


def load_images(source: str, image_size: int, split: str = "train", limit: Optional[int] = None) -> ImageSet:
    """Loads a dataset into memory as square uint8 images.

    Every image ends up `image_size` x `image_size` RGB: grayscale is
    replicated to three channels, alpha is dropped (as PIL's
    `convert("RGB")` does), and other sizes have their shorter side resized
    to `image_size` (with antialiasing) and are centre-cropped to a square.

    Args:
        source: one of
            - `"tfds:NAME"` or `"tfds:NAME:SPLIT"`: a TensorFlow Datasets
              dataset (needs `tensorflow_datasets` and, the first time, a
              download). The examples' `"image"` is used, and `"label"` when
              the dataset has one. `SPLIT` overrides `split` and may be a
              slice such as `"train[:10%]"`.
            - a path ending in `.npz`: array `x` (uint8 `[N, H, W, 3]`,
              `[N, H, W, 1]` or grayscale `[N, H, W]`), optional integer
              labels `y` and optional `class_names`. Float `x` is read as
              `[0, 1]` if its maximum is at most 1, else as `[0, 255]`;
              integer `x` must already lie in `[0, 255]`.
            - a folder: image files (`IMAGE_EXTENSIONS`, any case) anywhere
              below it. If it has subfolders, each first-level subfolder is
              a class (the ImageFolder convention; class names sorted) and
              images directly in the top folder are skipped; otherwise the
              images are unlabelled. Files with other extensions and hidden
              files or folders (names starting with ".") are ignored. Files
              that cannot be read or decoded are skipped and listed in
              `ImageSet.skipped` with the reason: unreadable files, empty
              files, dangling links and symlink loops, files whose header
              is not JPEG, PNG, GIF, BMP or WebP (e.g. text named .jpg),
              truncated or corrupt data, and images over
              `MAX_IMAGE_PIXELS` (50 MP, read from the header before any
              decoding). GIFs give their first frame; 16-bit PNGs are
              scaled to 8 bits; CMYK JPEGs, grayscale and RGBA become RGB.
        image_size: side of the square images, in pixels.
        split: the TFDS split when `source` names none; ignored otherwise.
        limit: if set, keep only `limit` images, picked by a shuffle with a
            fixed seed (the same subset every run). For a folder only as
            many files as needed are decoded.

    Returns:
        An `ImageSet`.

    Raises:
        ValueError: for an unknown source, a missing path, a folder without
            any usable image, malformed arrays, or an unknown TFDS dataset.
        RuntimeError: if a TFDS dataset is not available locally and cannot
            be downloaded.
    """
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive integer. Received: image_size={image_size!r}")
    image_size = int(image_size)
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"`limit` must be None or a positive integer. Received: limit={limit!r}")
    if not isinstance(source, (str, os.PathLike)):
        raise ValueError(f"Unknown data source: expected 'tfds:NAME', a .npz file or a folder. Received: data={source!r}")
    source = os.fspath(source)

    if source.startswith("tfds:"):
        result = _load_tfds(source, image_size, split)
    elif source.lower().endswith(".npz"):
        if not os.path.isfile(source):
            raise ValueError(f"The .npz file does not exist. Received: data={source!r}")
        result = _load_npz(source, image_size)
    elif os.path.isdir(source):
        # The folder loader applies `limit` itself, to decode only what it keeps.
        result = _load_folder(source, image_size, limit)
        limit = None
    else:
        what = "The path does not exist" if not os.path.exists(source) else "Unknown data source"
        raise ValueError(
            f"{what}: expected 'tfds:NAME[:SPLIT]', a .npz file or a folder of images. Received: data={source!r}"
        )

    if limit is not None and limit < len(result.images):
        keep = np.random.default_rng(_LIMIT_SEED).permutation(len(result.images))[:limit]
        result.images = result.images[keep]
        if result.labels is not None:
            result.labels = result.labels[keep]

    logging.info(
        "Loaded %d images of %dx%d from %s (%d skipped).",
        len(result.images), image_size, image_size, result.source, result.num_skipped,
    )
    for path, reason in result.skipped[:20]:
        logging.warning("Skipped %s: %s", path, reason)
    if result.num_skipped > 20:
        logging.warning("... and %d more skipped files (see ImageSet.skipped).", result.num_skipped - 20)
    return result


def pretrain_dataset(
    images,
    batch_size: int,
    augment_config: AugmentConfig,
    seed: int = 0,
    shuffle_buffer: Optional[int] = None,
    autotune: bool = True,
    start_batch: int = 0,
    labels=None,
) -> tf.data.Dataset:
    """An infinite dataset of BYOL view pairs from in-memory images.

    The stream is a pure function of `(seed, batch index)`, so a resumed run
    can start exactly where an interrupted one stopped (`start_batch`).
    Epoch `e` is the stateless permutation
    `stateless_shuffle(range(N), seed=[seed, -1 - e])` of the images, cut
    into full batches (the remainder of each epoch is dropped, so one epoch
    is exactly `steps_per_epoch(len(images), batch_size)` batches). Batch
    `i` of the whole stream (epoch `i // steps`, position `i % steps`) is
    augmented with the stateless seed `[seed, i]`: the views are
    reproducible for a given `seed`, yet an image never gets the same
    augmentation twice in different epochs.

    Args:
        images: uint8 array `[num_images, height, width, 3]`.
        batch_size: images per batch.
        augment_config: the `AugmentConfig` of the two views.
        seed: seeds the shuffle and the augmentations.
        shuffle_buffer: kept for compatibility and validated, but ignored:
            every epoch is a full permutation of the images.
        autotune: leave `tf.data` autotuning on. Turning it off avoids a
            known idle stall (~20 s) of the autotuner after short fits,
            which matters in tests.
        start_batch: index of the first batch served; batch `i` of the
            stream started at `start_batch=s` is batch `s + i` of the stream
            started at 0, computed directly (nothing is skipped over).
        labels: optional integer array `[num_images]`; then every element is
            `((view1, view2), labels)`, for the online linear probe.

    Returns:
        A `tf.data.Dataset` of `(view1, view2)` float32 tensors, each
        `[batch_size, image_size, image_size, 3]` in `[0, 1]` (with their
        int64 labels, see `labels`). It repeats forever: pass
        `steps_per_epoch` to `fit`.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`images` must have shape [N, H, W, 3]. Received: images with shape={images.shape}")
    if not isinstance(augment_config, AugmentConfig):
        raise ValueError(f"`augment_config` must be an AugmentConfig. Received: augment_config={augment_config!r}")
    _check_batch_size(batch_size)
    if len(images) < batch_size:
        # There would be no full batch at all and `fit` would hang.
        raise ValueError(
            "Not enough images for one batch: need at least `batch_size` images. "
            f"Received: len(images)={len(images)}, batch_size={batch_size}"
        )
    if shuffle_buffer is not None and shuffle_buffer < 1:
        raise ValueError(f"`shuffle_buffer` must be >= 1. Received: shuffle_buffer={shuffle_buffer!r}")
    if isinstance(start_batch, bool) or not isinstance(start_batch, (int, np.integer)) or start_batch < 0:
        raise ValueError(f"`start_batch` must be an integer >= 0. Received: start_batch={start_batch!r}")

    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != (len(images),) or not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(
                f"`labels` must be integers, one per image, shape ({len(images)},). "
                f"Received: labels with dtype={labels.dtype} and shape={labels.shape}"
            )
        labels_t = tf.constant(labels.astype(np.int64))

    num_images = len(images)
    steps = steps_per_epoch(num_images, batch_size)
    seed_const = tf.constant(int(seed), tf.int64)
    images_t = tf.constant(images)
    element_shape = [int(batch_size), *images.shape[1:]]

    def make_views(index):
        epoch, position = index // steps, index % steps
        # Negative second seed word: never the same seed as a batch's augmentation.
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_images, dtype=tf.int64), seed=tf.stack([seed_const, -1 - epoch])
        )
        chosen = order[position * batch_size:(position + 1) * batch_size]
        batch = tf.ensure_shape(tf.gather(images_t, chosen), element_shape)
        views = augment_pair(batch, tf.stack([seed_const, index]), augment_config)
        if labels is None:
            return views
        return views, tf.ensure_shape(tf.gather(labels_t, chosen), [int(batch_size)])

    # The batch index (int64) counts across epochs, so every batch gets its own seed.
    ds = tf.data.Dataset.counter(start=int(start_batch), dtype=tf.int64)
    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = bool(autotune)
    options.deterministic = True
    # Multi-worker: there are no files to shard, so every worker makes the
    # same batches and keeps its share of each (the global batch is unchanged).
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.with_options(options)


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches in one epoch of `pretrain_dataset` (the remainder is dropped).

    Args:
        num_images: images in the dataset.
        batch_size: images per batch.
    """
    _check_batch_size(batch_size)
    return int(num_images) // int(batch_size)


def eval_dataset(images, labels, image_size: int, batch_size: int) -> tf.data.Dataset:
    """A finite, ordered dataset of preprocessed images for evaluation.

    Args:
        images: uint8 array `[num_images, height, width, 3]`.
        labels: integer array `[num_images]`, or `None` for images only.
        image_size: side the images are resized to.
        batch_size: images per batch; the last batch may be smaller.

    Returns:
        A `tf.data.Dataset` of `(images, labels)` (or just images when
        `labels` is None), images float32 in `[0, 1]`, in the input order.
    """
    images = np.asarray(images)
    if images.ndim != 4 or images.shape[-1] != 3:
        raise ValueError(f"`images` must have shape [N, H, W, 3]. Received: images with shape={images.shape}")
    _check_batch_size(batch_size)

    def preprocess(x, *label):
        return (preprocess_eval(x, image_size), *label) if label else preprocess_eval(x, image_size)

    if labels is None:
        ds = tf.data.Dataset.from_tensor_slices(images).batch(batch_size)
    else:
        labels = np.asarray(labels).astype(np.int64)
        if labels.shape != (len(images),):
            raise ValueError(
                f"`labels` must have one entry per image, shape ({len(images)},). "
                f"Received: labels with shape={labels.shape}"
            )
        ds = tf.data.Dataset.from_tensor_slices((images, labels)).batch(batch_size)
    ds = ds.map(preprocess, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------
# Generated toy data.

SHAPE_CLASSES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "dots",
)

# Images drawn per vectorised numpy call: bounds memory at large image sizes.
_SHAPES_CHUNK = 1024


def make_shapes(num_images: int, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> ImageSet:
    """Generates a labelled dataset of shapes and textures, without a download.

    Class `k` is the family `SHAPE_CLASSES[k]`: a filled circle, square,
    upward triangle, plus-shaped cross or ring, or a square patch of
    horizontal, vertical or diagonal stripes, a checkerboard or a grid of
    dots. Each image has a random position, size (and stripe period),
    random foreground and background colours and mild Gaussian noise.

    The colours are the point: they vary far more between images than the
    shape does, so raw pixels (or colour statistics) say little about the
    class, while features that ignore colour and position, which BYOL's
    crops and colour jitter teach, separate the classes easily. Classes are
    symmetric under horizontal flips (diagonal stripes go either way).

    Args:
        num_images: number of images; labels are balanced (counts differ by
            at most one) and in random order.
        image_size: side of the square images, at least 8.
        num_classes: number of families used, 1 to 10 (the first ones).
        seed: the same seed gives the same images.

    Returns:
        An `ImageSet` with `class_names` from `SHAPE_CLASSES`.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"`num_images` must be a positive integer. Received: num_images={num_images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"`image_size` must be an integer >= 8. Received: image_size={image_size!r}")
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(
            f"`num_classes` must be between 1 and {len(SHAPE_CLASSES)}. Received: num_classes={num_classes!r}"
        )
    size = int(image_size)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % num_classes).astype(np.int64)
    images = np.empty((num_images, size, size, 3), np.uint8)
    # Pixel centres, shaped to broadcast against per-image parameters [n, 1, 1].
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = coords[None, :, None], coords[None, None, :]
    for k in range(num_classes):
        index = np.flatnonzero(labels == k)
        for start in range(0, len(index), _SHAPES_CHUNK):
            chunk = index[start:start + _SHAPES_CHUNK]
            images[chunk] = _draw_family(k, len(chunk), size, yy, xx, rng)
    return ImageSet(
        images=images,
        labels=labels,
        class_names=list(SHAPE_CLASSES[:num_classes]),
        source=f"shapes(seed={seed})",
    )


def _draw_family(k, n, size, yy, xx, rng):
    """Draws `n` images of family `k` as uint8 `[n, size, size, 3]`."""

    def draw(lo, hi):
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    if k < 5:
        # Solid shapes: half-size r, kept fully inside the image.
        r = draw(0.18, 0.38) * size
    else:
        # Texture patches need room for a few periods.
        r = draw(0.3, 0.48) * size
    cy = r + draw(0.0, 1.0) * (size - 2 * r)
    cx = r + draw(0.0, 1.0) * (size - 2 * r)
    dy, dx = yy - cy, xx - cx
    inside = (np.abs(dy) < r) & (np.abs(dx) < r)
    # Stripe/cell period in pixels, at least 3 so one period spans whole pixels.
    period = np.maximum(draw(0.1, 0.2) * size, 3.0)
    phase = draw(0.0, 1.0)

    def stripes(t):
        return np.mod(t / period + phase, 1.0) < 0.5

    if k == 0:
        mask = dy**2 + dx**2 < r**2
    elif k == 1:
        mask = inside & (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)
    elif k == 2:
        # Apex at the top (y grows downwards), base at the bottom.
        mask = (np.abs(dy) < r) & (np.abs(dx) < (dy + r) * 0.6)
    elif k == 3:
        arm = r * 0.3
        mask = inside & ((np.abs(dx) < arm) | (np.abs(dy) < arm))
    elif k == 4:
        dist = np.sqrt(dy**2 + dx**2)
        mask = (dist < r) & (dist > r * 0.55)
    elif k == 5:
        mask = inside & stripes(yy + 0 * xx)
    elif k == 6:
        mask = inside & stripes(xx + 0 * yy)
    elif k == 7:
        # Either diagonal, so that the class is closed under horizontal flips.
        direction = np.where(rng.random((n, 1, 1)) < 0.5, 1.0, -1.0).astype(np.float32)
        mask = inside & stripes((xx * direction + yy) / np.sqrt(2.0))
    elif k == 8:
        cell = np.floor((yy - cy) / period) + np.floor((xx - cx) / period)
        mask = inside & (np.mod(cell, 2.0) == 0)
    else:
        fy = np.mod((yy - cy) / period, 1.0) - 0.5
        fx = np.mod((xx - cx) / period, 1.0) - 0.5
        mask = inside & (fy**2 + fx**2 < 0.3**2)

    background = rng.random((n, 3)).astype(np.float32)
    # Each channel of the foreground differs from the background by 0.3..0.7
    # (mod 1), so the shape is always visible whatever the two colours are.
    foreground = np.mod(background + rng.uniform(0.3, 0.7, (n, 3)).astype(np.float32), 1.0)
    x = np.where(mask[..., None], foreground[:, None, None, :], background[:, None, None, :])
    x = x + rng.normal(0.0, 0.03, x.shape).astype(np.float32)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)


# ---------------------------------------------------------------------------
# Sources.


def _load_tfds(source, image_size, split):
    match = _TFDS_RE.match(source)
    if not match:
        raise ValueError(f"Malformed TFDS source; expected 'tfds:NAME' or 'tfds:NAME:SPLIT'. Received: data={source!r}")
    name, split = match.group("name"), match.group("split") or split
    try:
        # Imported here: TFDS is heavy and only needed for this source.
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ValueError(
            f"Loading {source!r} needs the `tensorflow_datasets` package (pip install tensorflow-datasets). "
            f"Received: data={source!r}"
        ) from e
    try:
        ds, info = tfds.load(name, split=split, as_supervised=False, with_info=True, shuffle_files=False)
    except tfds.core.registered.DatasetNotFoundError as e:
        raise ValueError(f"Unknown TFDS dataset {name!r}. Received: data={source!r}") from e
    except Exception as e:  # noqa: BLE001 - download/prepare errors come in many types.
        raise RuntimeError(
            f"Could not load the TFDS dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
            "If this machine is offline, download it elsewhere (tfds data_dir) or use a local "
            "folder of images or a .npz file with an `x` array as the data source instead."
        ) from e

    spec = ds.element_spec
    if not isinstance(spec, dict) or "image" not in spec:
        keys = sorted(spec) if isinstance(spec, dict) else spec
        raise ValueError(f"TFDS dataset {name!r} has no 'image' feature (features: {keys}). Received: data={source!r}")
    has_label = "label" in spec and spec["label"].dtype.is_integer and spec["label"].shape.rank == 0
    class_names = None
    if has_label:
        feature = info.features["label"] if "label" in info.features else None
        class_names = list(getattr(feature, "names", None) or []) or None

    def prepare(example):
        image = _fit_square(_to_rgb_float(example["image"]), image_size)
        label = tf.cast(example["label"], tf.int64) if has_label else tf.constant(-1, tf.int64)
        return image, label

    # Images of varying size (e.g. ImageNet) are fitted one by one in parallel,
    # then batched so Python sees few, large arrays.
    ds = ds.map(prepare, num_parallel_calls=tf.data.AUTOTUNE).batch(256)
    images, labels = [], []
    for x, y in tfds.as_numpy(ds):
        images.append(x)
        labels.append(y)
    if not images:
        raise ValueError(f"TFDS split {split!r} of {name!r} is empty. Received: data={source!r}")
    return ImageSet(
        images=np.concatenate(images),
        labels=np.concatenate(labels) if has_label else None,
        class_names=class_names,
        source=f"tfds:{name}:{split}",
    )


def _load_npz(path, image_size):
    try:
        # allow_pickle=False: an .npz from elsewhere must not run code on load.
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except Exception as e:  # noqa: BLE001 - corrupt zip, pickled objects, I/O errors.
        raise ValueError(f"Could not read the .npz file ({type(e).__name__}: {e}). Received: data={path!r}") from e
    if "x" not in arrays:
        raise ValueError(f"The .npz file has no `x` array (arrays: {sorted(arrays)}). Received: data={path!r}")
    x = _to_uint8(arrays["x"], path)
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim != 4 or x.shape[-1] not in (1, 3, 4) or len(x) == 0:
        raise ValueError(
            "`x` in the .npz file must be images [N, H, W], [N, H, W, 1], [N, H, W, 3] or [N, H, W, 4] "
            f"with N > 0. Received: data={path!r} with x.shape={arrays['x'].shape}"
        )
    if x.shape[-1] == 1:
        x = np.repeat(x, 3, axis=-1)
    elif x.shape[-1] == 4:
        x = x[..., :3]
    if x.shape[1:3] != (image_size, image_size):
        x = _fit_array(x, image_size)

    labels = None
    if "y" in arrays:
        y = arrays["y"].reshape(-1) if arrays["y"].ndim == 2 and arrays["y"].shape[1] == 1 else arrays["y"]
        if y.shape != (len(x),):
            raise ValueError(
                f"`y` in the .npz file must have one label per image, shape ({len(x)},). "
                f"Received: data={path!r} with y.shape={arrays['y'].shape}"
            )
        if not (np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))):
            raise ValueError(f"`y` in the .npz file must hold integer labels. Received: data={path!r} with y.dtype={y.dtype}")
        if y.min() < 0:
            raise ValueError(f"`y` in the .npz file must be >= 0. Received: data={path!r} with min(y)={y.min()}")
        labels = y.astype(np.int64)
    class_names = None
    if "class_names" in arrays:
        class_names = [str(c) for c in arrays["class_names"].reshape(-1)]
        if labels is not None and labels.max() >= len(class_names):
            raise ValueError(
                f"`y` has labels up to {labels.max()} but only {len(class_names)} `class_names`. Received: data={path!r}"
            )
    return ImageSet(images=x, labels=labels, class_names=class_names, source=path)


def _to_uint8(x, path):
    """Converts an image array to uint8 by the documented rule."""
    if x.dtype == np.uint8:
        return x
    if np.issubdtype(x.dtype, np.floating):
        if not np.all(np.isfinite(x)):
            raise ValueError(f"`x` in the .npz file has NaN or infinite values. Received: data={path!r}")
        # A float image whose maximum is <= 1 is on the [0, 1] scale; anything
        # brighter can only be [0, 255]. (An all-dark [0, 255] image would be
        # misread, but that is not a useful training image either.)
        scale = 255.0 if x.size and x.max() <= 1.0 else 1.0
        return np.round(np.clip(x * scale, 0.0, 255.0)).astype(np.uint8)
    if np.issubdtype(x.dtype, np.integer) or x.dtype == np.bool_:
        if x.size and (x.min() < 0 or x.max() > 255):
            raise ValueError(
                f"Integer `x` in the .npz file must lie in [0, 255]. "
                f"Received: data={path!r} with x in [{x.min()}, {x.max()}]"
            )
        return x.astype(np.uint8)
    raise ValueError(f"`x` in the .npz file must be a numeric image array. Received: data={path!r} with x.dtype={x.dtype}")


def _load_folder(folder, image_size, limit):
    folder = os.path.abspath(folder)
    with os.scandir(folder) as entries:
        # is_dir() follows a symlink here on purpose: linked class folders are common.
        class_names = sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    labelled = bool(class_names)

    paths, labels, skipped = [], [], []
    roots = [(os.path.join(folder, c), i) for i, c in enumerate(class_names)] if labelled else [(folder, -1)]
    for root, label in roots:
        for path in _walk_images(root):
            paths.append(path)
            labels.append(label)
    if labelled:
        # ImageFolder semantics: images next to the class folders have no class.
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if _is_image_name(name) and not os.path.isdir(path):
                skipped.append((path, "not inside a class subfolder, so it has no label"))
    if not paths:
        raise ValueError(
            f"No image files ({', '.join(IMAGE_EXTENSIONS)}) found in the folder. Received: data={folder!r}"
        )

    order = np.arange(len(paths))
    if limit is not None:
        order = np.random.default_rng(_LIMIT_SEED).permutation(len(paths))
    images, kept = _decode_files([paths[i] for i in order], image_size, limit, skipped)
    if not kept:
        raise ValueError(
            f"None of the {len(paths)} image files in the folder could be decoded "
            f"(e.g. {skipped[-1][0]}: {skipped[-1][1]}). Received: data={folder!r}"
        )
    kept_labels = np.asarray([labels[order[i]] for i in kept], np.int64)
    if labelled:
        empty = sorted(set(class_names) - {class_names[i] for i in set(kept_labels.tolist())})
        if empty and limit is None:
            logging.warning("Class folders without any usable image in %s: %s", folder, empty)
    return ImageSet(
        images=images,
        labels=kept_labels if labelled else None,
        class_names=class_names if labelled else None,
        skipped=skipped,
        source=folder,
    )


def _is_dir(entry):
    """`entry.is_dir()`, False for a symlink loop or an unreadable link (a bad file, skipped later)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root):
    """Yields image paths below `root` in a sorted, reproducible order."""
    # followlinks=False: symlinked folders below `root` are not entered, so a
    # link pointing back up the tree cannot loop. `seen` also guards the walk
    # against bind mounts or other aliases of the same real folder.
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        # Sorting in place also fixes the order os.walk descends in.
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                yield os.path.join(dirpath, name)


def _decode_files(paths, image_size, limit, skipped):
    """Decodes `paths` in parallel; records failures in `skipped`.

    Every file is first checked without decoding (`_precheck`: readable,
    non-empty, a known image header, at most `MAX_IMAGE_PIXELS`); only the
    files that pass go to the decoder. Returns the uint8 images and, for
    each, its index into `paths`. With `limit`, decoding stops once `limit`
    images are decoded.
    """
    reasons = {}
    candidates = []
    for i, path in enumerate(paths):
        reason = _precheck(path)
        if reason is None:
            candidates.append(i)
        else:
            reasons[i] = reason
    # tf.data decodes in parallel; `ignore_errors` drops the files that fail,
    # and the index travelling with each image tells which ones were dropped.
    # Only those are decoded again, eagerly, to learn why.
    encoded = [os.fsencode(paths[i]) for i in candidates]  # tf strings are bytes; keeps odd file names intact.
    images, kept = [], []
    count = 0
    if candidates:
        ds = tf.data.Dataset.from_tensor_slices(
            (tf.constant(candidates, tf.int64), tf.constant(encoded, tf.string))
        )

        def decode(index, path):
            return index, _decode_and_fit(tf.io.read_file(path), image_size)

        ds = ds.map(decode, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
        ds = ds.ignore_errors().batch(64)
        for index, batch in ds.as_numpy_iterator():
            images.append(batch)
            kept.append(index)
            count += len(index)
            if limit is not None and count >= limit:
                break
    kept = np.concatenate(kept) if kept else np.zeros([0], np.int64)
    images = np.concatenate(images) if images else np.zeros([0, image_size, image_size, 3], np.uint8)
    if limit is not None and len(kept) > limit:
        kept, images = kept[:limit], images[:limit]
    # Files before the last kept one that did not come back failed; files after
    # it were never needed (limit) or all failed (no limit).
    attempted = len(paths) if limit is None or len(kept) < limit else int(kept[-1]) + 1
    kept_set = set(kept.tolist())
    for i in range(attempted):
        if i in reasons:
            skipped.append((paths[i], reasons[i]))
        elif i not in kept_set:
            skipped.append((paths[i], _failure_reason(paths[i], image_size)))
    return images, kept.tolist()


# Images with more pixels than this are skipped before decoding, from the
# dimensions in their header: decoding one to float32 takes 12 bytes a pixel
# (600 MB at 50 MP), several at a time in parallel. Raise it for bigger scans.
MAX_IMAGE_PIXELS = 50_000_000

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


def _precheck(path):
    """Why `path` cannot be used, found without decoding it; None if it may be.

    Opens the file (unreadable files, dangling links and symlink loops fail
    here), reads its header, and checks it is a JPEG, PNG, GIF, BMP or WebP
    of at most `MAX_IMAGE_PIXELS` pixels.
    """
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            if not head:
                return "empty file"
            size = _header_size(f, head)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"
    if size is None:
        return "Unknown image file format: no JPEG, PNG, GIF, BMP or WebP header (or a truncated one)"
    width, height = size
    if width <= 0 or height <= 0:
        return f"invalid image dimensions {width}x{height} in the header"
    if width * height > MAX_IMAGE_PIXELS:
        return (
            f"too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"{MAX_IMAGE_PIXELS / 1e6:g} MP limit (byol_tf.data.MAX_IMAGE_PIXELS)"
        )
    return None


def _header_size(f, head):
    """(width, height) from an image header, or None for an unknown format."""
    import struct

    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"BM" and len(head) >= 26:
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
            return struct.unpack("<HH", head[18:22])
        width, height = struct.unpack("<ii", head[18:26])
        return width, abs(height)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = struct.unpack("<I", head[21:25])[0]
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        return None
    if head[:2] == b"\xff\xd8":
        # Walk the JPEG segments to the frame header (SOFn), seeking past the rest.
        f.seek(2)
        while True:
            byte = f.read(1)
            while byte and byte != b"\xff":
                byte = f.read(1)
            while byte == b"\xff":
                byte = f.read(1)
            if not byte:
                return None
            marker = byte[0]
            if marker == 0x01 or 0xD0 <= marker <= 0xD8:
                continue  # stand-alone markers
            if marker in (0xD9, 0xDA):
                return None  # end of image or scan data before any frame header
            length = f.read(2)
            if len(length) < 2:
                return None
            length = struct.unpack(">H", length)[0]
            if marker in _JPEG_SOF:
                frame = f.read(5)
                if len(frame) < 5:
                    return None
                height, width = struct.unpack(">HH", frame[1:5])
                return width, height
            f.seek(length - 2, 1)
    return None


def _failure_reason(path, image_size):
    """Why `path` failed to decode, found by decoding it again eagerly."""
    try:
        if os.path.getsize(path) == 0:
            return "empty file"
        _decode_and_fit(tf.io.read_file(os.fsencode(path)), image_size)
    except (tf.errors.OpError, OSError) as e:
        message = getattr(e, "message", None) or str(e)
        # Drop TF's "{{function_node ...}}" prefix and op name suffix.
        message = re.sub(r"\{\{.*?\}\}\s*", "", message).split(" [Op:")[0].strip()
        return f"{type(e).__name__}: {message}"
    return "could not be decoded"


def _decode_and_fit(contents, image_size):
    """Encoded image bytes -> uint8 `[image_size, image_size, 3]`."""
    # float32 decoding scales 8- and 16-bit PNGs alike to [0, 1]; a GIF gives
    # its first frame with expand_animations=False.
    head = tf.strings.join([tf.strings.substr(contents, 0, 12), " " * 12])
    image = tf.cond(
        tf.strings.substr(head, 8, 4) == "WEBP",
        lambda: _decode_webp(contents),
        lambda: tf.io.decode_image(contents, dtype=tf.float32, expand_animations=False),
    )
    image = tf.ensure_shape(image, [None, None, None])
    image = _fit_square(_to_rgb_float(image), image_size)
    return image


def _decode_webp(contents):
    """WebP -> float32 `[H, W, C]`: TF decodes it only to uint8, with a frame axis."""
    image = tf.io.decode_image(contents, dtype=tf.uint8, expand_animations=False)
    image = tf.reshape(image, tf.shape(image)[-3:])
    return tf.cast(image, tf.float32) / 255.0


def _to_rgb_float(image):
    """[H, W, C] image with C in 1..4 -> float32 RGB in [0, 1]."""
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    image = tf.cast(image, tf.float32)
    tf.debugging.assert_rank(image, 3)
    channels = tf.shape(image)[-1]
    # 1 (gray) and 2 (gray + alpha) -> gray replicated; 3 and 4 (RGBA) -> RGB.
    return tf.cond(
        channels < 3,
        lambda: tf.image.grayscale_to_rgb(image[..., :1]),
        lambda: image[..., :3],
    )


def _fit_square(image, image_size):
    """Shorter side -> `image_size` (antialiased), centre crop; float -> uint8."""
    shape = tf.shape(image)
    h, w = tf.cast(shape[0], tf.float32), tf.cast(shape[1], tf.float32)
    scale = image_size / tf.minimum(h, w)
    # max(): rounding must never make a side shorter than the crop.
    new_h = tf.maximum(tf.cast(tf.round(h * scale), tf.int32), image_size)
    new_w = tf.maximum(tf.cast(tf.round(w * scale), tf.int32), image_size)
    image = tf.image.resize(image, tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    image = image[top:top + image_size, left:left + image_size]
    image = tf.ensure_shape(image, [image_size, image_size, 3])
    return tf.cast(tf.round(tf.clip_by_value(image, 0.0, 1.0) * 255.0), tf.uint8)


def _fit_array(x, image_size):
    """Fits a uint8 array `[N, H, W, 3]` to `image_size` squares, in chunks."""
    h, w = x.shape[1:3]
    scale = image_size / min(h, w)
    new_h, new_w = max(round(h * scale), image_size), max(round(w * scale), image_size)
    top, left = (new_h - image_size) // 2, (new_w - image_size) // 2
    out = np.empty((len(x), image_size, image_size, 3), np.uint8)
    for start in range(0, len(x), _RESIZE_CHUNK):
        chunk = tf.cast(x[start:start + _RESIZE_CHUNK], tf.float32)
        chunk = tf.image.resize(chunk, [new_h, new_w], method="bilinear", antialias=True)
        chunk = chunk[:, top:top + image_size, left:left + image_size]
        out[start:start + _RESIZE_CHUNK] = tf.cast(tf.round(tf.clip_by_value(chunk, 0.0, 255.0)), tf.uint8).numpy()
    return out


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}")
