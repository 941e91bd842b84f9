"""Where images come from: the `Source` interface, its `SkipLog`, and image folders.

TFRecord shards, tfds and any `tf.data.Dataset` are in
`byol_tf.data.record_sources`; arrays in memory in `byol_tf.data.arrays`.

A streaming source lists what it has without decoding anything and gives
two record streams:

- `train_records(seed, start)`: endless, a pure function of `seed`; the
  record at stream position `p` belongs to epoch `p // num_examples`, so a
  run resumes at any position without going over the records before it
  (folders) or by skipping undecoded records (shards, tfds, datasets);
- `eval_records()`: every record once, in a fixed order.

`train_records(seed, start, shard=(count, index))` is one worker's share
under multi-worker training: folders split their files (each epoch's order,
`index::count`), shards split their files when they balance across the
workers, and the rest split records (every worker reads all, keeps its
own). Each worker's stream is again a pure function of `seed`.

Records are dicts `{"position": int64, "data": bytes or image, "label": int64}`
(label -1 when unlabelled). `ArraySource` holds images in memory, the fast
path for CIFAR-sized arrays. Files that fail are skipped by the pipeline and
reported to the source's `SkipLog`, which `describe(position)` helps name.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf.data import files

# `limit` keeps a random subset; a fixed seed makes it the same subset each run.
LIMIT_SEED = 1234


class SkipLog:
    """The files a stream could not use: each logged once, with its reason.

    Args:
        source: the source's name, for the log lines.
        log_first: warn for this many files; count the rest.
    """

    def __init__(self, source="", log_first=20):
        self.source = source
        self.log_first = log_first
        self.reasons = {}

    def add(self, name, reason):
        """Records `name` (once) with why it could not be used."""
        if name in self.reasons:
            return
        self.reasons[name] = reason
        if len(self.reasons) <= self.log_first:
            logging.warning("Skipped %s: %s", name, reason)
        elif len(self.reasons) == self.log_first + 1:
            logging.warning("More files of %s are skipped; they are counted in num_skipped.", self.source)

    @property
    def count(self):
        return len(self.reasons)

    def items(self):
        return list(self.reasons.items())


def _epoch_order(num, seed, epoch):
    """Epoch `epoch`'s stateless permutation of `num` records, seeded `[seed, -1 - epoch]`."""
    return tf.random.experimental.stateless_shuffle(
        tf.range(num, dtype=tf.int64), seed=tf.stack([tf.cast(seed, tf.int64), -1 - tf.cast(epoch, tf.int64)])
    )


def _epochs(num, start, make_epoch):
    """Concatenated epochs from stream position `start`: `make_epoch(epoch, first)` gives one from its `first` record."""
    num, start = int(num), int(start)
    epochs = tf.data.Dataset.counter(start=start // num, dtype=tf.int64)
    return epochs.flat_map(lambda e: make_epoch(e, tf.maximum(start - e * num, 0)))


def _check_shard(shard):
    count, index = (int(v) for v in shard)
    if count < 1 or not 0 <= index < count:
        raise ValueError(f"`shard` must be (count, index) with 0 <= index < count. Received: shard={shard!r}")
    return count, index


class Source:
    """What every source has: a name, a size, class names and a skip log."""

    name = ""
    num_examples = None
    class_names = None
    labelled = False
    # The last training stream's seed and worker share, for `describe`.
    _seed, _shard = 0, (1, 0)

    def __init__(self):
        self.skips = SkipLog(self.name)

    @property
    def num_skipped(self):
        return self.skips.count

    def describe(self, position):
        """`(name, reason)` of the record at stream `position`, for the skip log."""
        return f"record {position} of {self.name}", "could not be decoded"


class FolderSource(Source):
    """A folder of image files, listed once (names only) and read file by file.

    Args:
        folder: searched recursively; first-level subfolders are classes.
        limit: keep a fixed random subset of this many files.
        max_pixels: larger images are skipped.
    """

    def __init__(self, folder, limit=None, max_pixels=files.MAX_IMAGE_PIXELS):
        self.name = os.path.abspath(folder)
        super().__init__()
        paths, labels, self.class_names, skipped = files.list_image_folder(folder)
        if not paths:
            raise ValueError(
                f"No image files ({', '.join(files.IMAGE_EXTENSIONS)}) found in the folder. Received: data={folder!r}"
            )
        if limit is not None and limit < len(paths):
            keep = np.sort(np.random.default_rng(LIMIT_SEED).permutation(len(paths))[:limit])
            paths, labels = [paths[i] for i in keep], [labels[i] for i in keep]
        for path, reason in skipped:
            self.skips.add(path, reason)
        self.paths = paths
        self.labels = np.asarray(labels, np.int64)
        self.labelled = self.class_names is not None
        self.num_examples = len(paths)
        self.max_pixels = max_pixels
        # tf strings are bytes: keeps odd (non-UTF-8) file names intact.
        self._paths = tf.constant([os.fsencode(p) for p in paths], tf.string)
        self._labels = tf.constant(self.labels)
        self._order_cache = (None, None)

    def _records(self, positions, index):
        return {"position": positions, "path": tf.gather(self._paths, index), "label": tf.gather(self._labels, index)}

    def share_size(self, shard=(1, 0)):
        """Records in one epoch of worker `shard = (count, index)`'s stream."""
        return len(range(shard[1], self.num_examples, shard[0]))

    def train_records(self, seed, start=0, shard=(1, 0)):
        count, index = _check_shard(shard)
        num = self.share_size(shard)

        def epoch(e, first):
            mine = _epoch_order(self.num_examples, seed, e)[index::count]
            return tf.data.Dataset.from_tensor_slices(
                self._records(e * num + tf.range(first, num), tf.gather(mine, tf.range(first, num)))
            )

        self._seed, self._shard = seed, (count, index)
        return _epochs(num, start, epoch)

    def eval_records(self):
        index = tf.range(self.num_examples, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices(self._records(index, index))

    @staticmethod
    def fetch(record):
        """Reads the file: in the parallel decode map, so reads overlap."""
        return tf.io.read_file(record["path"])

    def path_at(self, position, train=True):
        if not train:
            return self.paths[position]
        count, worker = self._shard
        epoch, index = divmod(int(position), self.share_size(self._shard))
        if self._order_cache[0] != (epoch, self._shard):
            order = _epoch_order(self.num_examples, self._seed, epoch).numpy()[worker::count]
            self._order_cache = ((epoch, self._shard), order)
        return self.paths[int(self._order_cache[1][index])]

    def describe(self, position, train=True):
        path = self.path_at(position, train)
        try:
            with open(path, "rb") as f:
                return path, files.failure_reason(f.read(), self.max_pixels)
        except OSError as e:
            return path, f"{type(e).__name__}: {e.strerror or e}"
