"""Sources read as a sequence of records: TFRecord shards (`write_shards`), tfds, any `tf.data.Dataset`.

They follow the `Source` interface of `byol_tf.data.sources`: the training
stream is a pure function of its seed, mixed by a seeded shuffle buffer.
"""

import os

import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf.data import files
from byol_tf.data.sources import Source, _check_shard

# Records permuted together by the sequential sources (shards, tfds, datasets).
SHUFFLE_WINDOW = 1024


class _SequentialSource(Source):
    """Sources read in order (shards, tfds, a `tf.data.Dataset`), mixed by a seeded shuffle buffer.

    Each pass reads `_epoch_base(seed)` (shards in a seeded order) through a
    `SHUFFLE_WINDOW`-record shuffle buffer; both reshuffle every pass from
    the seed, so the stream is a pure function of it, and a resume skips the
    first records unread by the decoder.
    """

    def train_records(self, seed, start=0, shard=(1, 0)):
        self._seed, self._shard = seed, _check_shard(shard)
        records = self._share(seed, self._shard)
        records = records.shuffle(SHUFFLE_WINDOW, seed=int(seed) + 1, reshuffle_each_iteration=True)
        records = records.repeat().enumerate().skip(int(start))
        return records.map(lambda i, r: {"position": i, **r})

    def _share(self, seed, shard):
        """One pass of worker `shard`'s records: every worker reads all and keeps every `count`-th."""
        count, index = shard
        base = self._epoch_base(seed)
        return base.shard(count, index) if count > 1 else base

    def eval_records(self):
        return self._epoch_base(None).enumerate().map(lambda i, r: {"position": i, **r})

    @staticmethod
    def fetch(record):
        return record["data"]

    def describe(self, position, train=True):
        records = (
            self.train_records(self._seed, position, self._shard) if train else self.eval_records().skip(int(position))
        )
        for record in records.take(1):
            name = record.get("name", tf.constant(f"record {position}")).numpy()
            name = name.decode("utf-8", "replace") if isinstance(name, bytes) else str(name)
            data = record["data"]
            reason = files.failure_reason(data.numpy()) if data.dtype == tf.string else "could not be used"
            return f"{self.name}: {name}", reason
        return f"{self.name}: record {position}", "could not be read"


SHARD_INDEX = "index.json"
SHARD_FEATURES = {
    "image/encoded": tf.io.FixedLenFeature([], tf.string),
    "image/filename": tf.io.FixedLenFeature([], tf.string, default_value=""),
    "image/class/label": tf.io.FixedLenFeature([], tf.int64, default_value=-1),
}


class ShardSource(_SequentialSource):
    """TFRecord shards written by `byol_tf.data.write_shards` (`scripts/make_shards.py`).

    Args:
        folder: holds `index.json` and the shard files it lists.
        limit: read only the first `limit` records of the shards in order.
    """

    def __init__(self, folder, limit=None):
        import json

        self.name = os.path.abspath(folder)
        super().__init__()
        path = os.path.join(folder, SHARD_INDEX)
        try:
            with open(path) as f:
                index = json.load(f)
            shards = [os.path.join(folder, s["file"]) for s in index["shards"]]
            counts = [int(s["count"]) for s in index["shards"]]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ValueError(
                f"Not a shard folder: {path} is missing or malformed ({type(e).__name__}: {e}). "
                f"Write one with scripts/make_shards.py. Received: data={folder!r}"
            ) from e
        missing = [s for s in shards if not os.path.isfile(s)]
        if missing or not shards:
            raise ValueError(f"The shard index lists missing files ({missing[:3]}) or none. Received: data={folder!r}")
        self.shards, self.counts = shards, counts
        self.class_names = index.get("class_names")
        self.labelled = self.class_names is not None
        self.num_examples = sum(counts) if limit is None else min(limit, sum(counts))
        self._limit = limit
        self._assignments = {}  # worker count -> `worker_files`

    def worker_files(self, count):
        """Shard files per worker, balanced by record count, or None when they cannot balance within 1%.

        Largest shards first, each to the worker with the fewest records so far.
        Worked out once per worker count (`describe` reopens the stream per skipped file).
        """
        if count not in self._assignments:
            self._assignments[count] = self._assign(count)
            if count > 1 and self._assignments[count] is None:
                logging.info(
                    "%d shards do not split evenly over %d workers: each reads all and keeps its records.",
                    len(self.shards),
                    count,
                )
        return self._assignments[count]

    def _assign(self, count):
        if count > len(self.shards) or self._limit is not None:
            return None
        loads, assigned = [0] * count, [[] for _ in range(count)]
        for k in sorted(range(len(self.shards)), key=lambda k: (-self.counts[k], k)):
            worker = loads.index(min(loads))
            loads[worker] += self.counts[k]
            assigned[worker].append(self.shards[k])
        return assigned if max(loads) <= 1.01 * min(loads) else None

    def _share(self, seed, shard):
        count, index = shard
        assigned = self.worker_files(count) if count > 1 else None
        if assigned is not None:
            return self._epoch_base(seed, sorted(assigned[index]))
        return super()._share(seed, shard)

    def _epoch_base(self, seed, files=None):
        files = self.shards if files is None else files
        shards = tf.data.Dataset.from_tensor_slices(tf.constant(files))
        if seed is not None:
            shards = shards.shuffle(len(files), seed=int(seed), reshuffle_each_iteration=True)
        records = shards.interleave(
            tf.data.TFRecordDataset,
            cycle_length=min(8, len(files)),
            block_length=1,
            num_parallel_calls=tf.data.AUTOTUNE,
            deterministic=True,
        )
        if self._limit is not None:
            records = records.take(self._limit)

        def parse(serialized):
            example = tf.io.parse_single_example(serialized, SHARD_FEATURES)
            return {
                "data": example["image/encoded"],
                "label": example["image/class/label"],
                "name": example["image/filename"],
            }

        return records.map(parse, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


class DatasetSource(_SequentialSource):
    """Any finite `tf.data.Dataset` of images, `(image, label)` pairs or `{"image", "label"}` dicts.

    Images are decoded `[H, W, C]` (uint8 or float in [0, 1], any size) or
    encoded bytes (a string scalar).

    Args:
        dataset: the images; it is read again each epoch.
        num_examples: its size, when `dataset.cardinality()` is unknown.
        class_names: optional class names (index = label).
        name: for logs.
    """

    def __init__(self, dataset, num_examples=None, class_names=None, name="tf.data.Dataset"):
        self.name = name
        super().__init__()
        if not isinstance(dataset, tf.data.Dataset):
            raise ValueError(f"`dataset` must be a tf.data.Dataset. Received: dataset={dataset!r}")
        if num_examples is None:
            cardinality = int(dataset.cardinality())
            if cardinality < 0:
                raise ValueError(
                    "The dataset's size is unknown (infinite or not computable): pass `num_examples`. "
                    f"Received: num_examples=None, cardinality={cardinality}"
                )
            num_examples = cardinality
        if num_examples < 1:
            raise ValueError(f"The dataset is empty. Received: num_examples={num_examples}")
        spec = dataset.element_spec
        if isinstance(spec, dict):
            if "image" not in spec:
                raise ValueError(f"A dict dataset needs an 'image' key. Received: keys={sorted(spec)}")
            self.labelled = "label" in spec
            dataset = dataset.map(lambda e: (e["image"], e["label"]) if "label" in e else e["image"])
        else:
            self.labelled = isinstance(spec, tuple) and len(spec) == 2
        self.dataset = dataset.map(self._as_record)
        self.num_examples = int(num_examples)
        self.class_names = list(class_names) if class_names is not None else None

    def _as_record(self, *element):
        image = element[0]
        label = tf.cast(element[1], tf.int64) if len(element) == 2 else tf.constant(-1, tf.int64)
        return {"data": image, "label": tf.reshape(label, [])}

    def _epoch_base(self, seed):
        return self.dataset.take(self.num_examples)


class TfdsSource(DatasetSource):
    """A TensorFlow Datasets split, streamed with the images left encoded.

    Args:
        name: the dataset name (with config/version, e.g. "imagenette/320px").
        split: a split or slice ("train", "train[:10%]").
        data_dir: where tfds keeps its data (default: tfds's own).
        limit: the first `limit` examples of the split.
    """

    def __init__(self, name, split="train", data_dir=None, limit=None):
        try:
            import tensorflow_datasets as tfds
        except ImportError as e:
            raise ValueError(
                f"Reading tfds:{name} needs `tensorflow_datasets` (pip install tensorflow-datasets). "
                f"Received: data='tfds:{name}'"
            ) from e
        source = f"tfds:{name}:{split}"
        try:
            builder = tfds.builder(name, data_dir=data_dir)
            decoders = {"image": tfds.decode.SkipDecoding()} if "image" in builder.info.features else None
            ds = builder.as_dataset(split=split, decoders=decoders, shuffle_files=False)
        except tfds.core.registered.DatasetNotFoundError as e:
            raise ValueError(f"Unknown TFDS dataset {name!r}. Received: data={source!r}") from e
        except Exception as e:  # noqa: BLE001 - download/prepare errors come in many types.
            raise RuntimeError(
                f"Could not load the TFDS dataset {name!r} (split {split!r}): {type(e).__name__}: {e}. "
                "Prepare it where there is a network (tfds build, or tfds.load) and pass --tfds_data_dir, "
                "or use a folder of images, TFRecord shards or a .npz file."
            ) from e
        spec = ds.element_spec
        if not isinstance(spec, dict) or "image" not in spec:
            raise ValueError(f"TFDS dataset {name!r} has no 'image' feature. Received: data={source!r}")
        has_label = "label" in spec and spec["label"].dtype.is_integer and spec["label"].shape.rank == 0
        ds = ds.map(lambda e: {"image": e["image"], "label": e["label"]} if has_label else {"image": e["image"]})
        count = int(ds.cardinality())
        if count < 0:
            count = int(ds.reduce(np.int64(0), lambda n, _: n + 1))
        if limit is not None:
            ds, count = ds.take(limit), min(limit, count)
        feature = builder.info.features["label"] if has_label else None
        names = list(getattr(feature, "names", None) or []) or None
        super().__init__(ds, num_examples=count, class_names=names, name=source)
