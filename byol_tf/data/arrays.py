"""Examples held in memory: `ImageSet`, `ExampleSet` (audio, text), `.npz` images, and the array source.

The fast path for CIFAR-sized data: the arrays are cropped batch-wise by
`byol_tf.augment.augment_pair`, from the images as stored (no resizing).
Audio waveforms and sentences are held the same way, as `ExampleSet`s.
"""

import dataclasses
from typing import List, Optional, Tuple

import numpy as np
import tensorflow as tf

from byol_tf.data.sources import LIMIT_SEED, Source


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
    modality = "image"  # not a field: an ImageSet holds images

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
    def examples(self) -> np.ndarray:
        """The images, under the name every in-memory set shares."""
        return self.images

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


@dataclasses.dataclass(frozen=True)
class ExampleSet:
    """Audio or text examples in memory, with their labels when there are any.

    Args:
        examples: `[N, ...]`: float32 waveforms `[N, samples]` for audio, a
            string array `[N]` for text.
        modality: "audio" or "text" (`byol_tf.modalities`).
        labels: int64 `[N]` indices into `class_names`, or `None`.
        class_names: the class names (index = label), or `None`.
        skipped: `(item, reason)` for each file or line that could not be used.
        source: where the examples came from, for logs and run records.
    """

    examples: np.ndarray
    modality: str
    labels: Optional[np.ndarray] = None
    class_names: Optional[List[str]] = None
    skipped: List[Tuple[str, str]] = dataclasses.field(default_factory=list)
    source: str = ""

    def __post_init__(self):
        if len(self.examples) == 0:
            raise ValueError(f"An example set needs at least one example. Received: {len(self.examples)} examples")
        if self.labels is not None and np.shape(self.labels) != (len(self.examples),):
            raise ValueError(
                f"`labels` must have shape ({len(self.examples)},), one per example. "
                f"Received: labels with shape={np.shape(self.labels)}"
            )

    def __len__(self) -> int:
        return len(self.examples)


def load_npz(path):
    """Reads a `.npz` with `x` (and optional `y`, `class_names`) as an `ImageSet`, images as stored."""
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

    labels = None
    if "y" in arrays:
        y = arrays["y"].reshape(-1) if arrays["y"].ndim == 2 and arrays["y"].shape[1] == 1 else arrays["y"]
        if y.shape != (len(x),):
            raise ValueError(
                f"`y` in the .npz file must have one label per image, shape ({len(x)},). "
                f"Received: data={path!r} with y.shape={arrays['y'].shape}"
            )
        if not (
            np.issubdtype(y.dtype, np.integer) or (np.issubdtype(y.dtype, np.floating) and np.all(y == np.round(y)))
        ):
            raise ValueError(
                f"`y` in the .npz file must hold integer labels. Received: data={path!r} with y.dtype={y.dtype}"
            )
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
    raise ValueError(
        f"`x` in the .npz file must be a numeric image array. Received: data={path!r} with x.dtype={x.dtype}"
    )


class ArraySource(Source):
    """An `ImageSet` or `ExampleSet` as a source: the in-memory fast path.

    Args:
        examples: an `ImageSet` or an `ExampleSet`.
        limit: keep a fixed random subset of this many examples.
    """

    def __init__(self, examples, limit=None):
        self.name = examples.source or "arrays"
        super().__init__()
        self.examples, self.labels = examples.examples, examples.labels
        if limit is not None and limit < len(examples):
            keep = np.random.default_rng(LIMIT_SEED).permutation(len(examples))[:limit]
            self.examples, self.labels = self.examples[keep], None if self.labels is None else self.labels[keep]
        if self.labels is not None:
            self.labels = np.asarray(self.labels, np.int64)
        self.class_names, self.modality = examples.class_names, examples.modality
        for path, reason in examples.skipped:
            self.skips.add(path, reason)
        self.labelled = self.labels is not None
        self.num_examples = len(self.examples)

    @property
    def images(self) -> np.ndarray:
        """The examples of an image set."""
        return self.examples

    def eval_records(self):
        labels = self.labels if self.labels is not None else np.full(self.num_examples, -1, np.int64)
        return tf.data.Dataset.from_tensor_slices(
            {"position": np.arange(self.num_examples, dtype=np.int64), "data": self.examples, "label": labels}
        )

    @staticmethod
    def fetch(record):
        return record["data"]
