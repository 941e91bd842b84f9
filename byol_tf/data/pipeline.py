"""`tf.data` pipelines: where the data comes from (`open_source`) and BYOL view pairs for training.

Training streams any source with memory that does not grow with its size:
records are read and decoded in a parallel map, each image's two crops are
taken from the original (`byol_tf.data.crops`), files that fail are
skipped (and reported), and the colour stages run batched. In-memory arrays
keep their batched fast path (`byol_tf.augment.augment_pair`).

Every stream is a pure function of `(seed, position)`: the batch after
optimizer step `s` is the same in a resumed run as in an unbroken one.
"""

import os
import re

import numpy as np
import tensorflow as tf

from byol_tf.augment import crop_pair, crop_small, finish_pair_on_host, finish_small
from byol_tf.config import AUGMENT_CONFIGS, AUGMENT_ON
from byol_tf.data import crops, files
from byol_tf.data.arrays import ArraySource, ExampleSet, ImageSet, load_npz
from byol_tf.data.shapes import make_shapes
from byol_tf.data.stream import StreamPosition
from byol_tf.data.record_sources import SHARD_INDEX, DatasetSource, ShardSource, TfdsSource
from byol_tf.data.sources import FolderSource, Source
from byol_tf.modalities import get_modality

# "tfds:NAME[:SPLIT]". NAME may carry a config and a version ("mnist:3.0.1",
# "imagenette/320px:1.0.0"), and SPLIT may contain colons ("train[:10%]"), so
# a plain split on ":" is ambiguous; the version is recognised by its form.
_TFDS_RE = re.compile(r"^tfds:(?P<name>[^:\[\]]+(?::\d+\.\d+\.\d+)?)(?::(?P<split>.+))?$")


def open_source(data, split="train", limit=None, image_size=32, tfds_data_dir=None) -> Source:
    """A source for `data`, without decoding anything yet.

    Args:
        data: one of
            - a folder of images (recursive; first-level subfolders are classes);
            - a folder of TFRecord shards with an `index.json` (`write_shards`);
            - `"tfds:NAME"` or `"tfds:NAME:SPLIT"`;
            - a `.npz` file with `x` (uint8 `[N, H, W, 3]`), optional `y` and
              `class_names` (held in memory);
            - `"shapes"`: the generated demo set (10,000 train, 2,000 test images);
            - an `ImageSet`, or a `tf.data.Dataset` of images or `(image, label)`;
            - an `ExampleSet` of audio or text (`byol_tf.modalities.open_examples`).
        split: the tfds split when `data` names none; `"test"` draws the
            held-out shapes.
        limit: use a fixed subset of at most this many images.
        image_size: the side of generated shapes.
        tfds_data_dir: tfds's data folder.

    Returns:
        A `Source`.
    """
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, (int, np.integer)) or limit < 1):
        raise ValueError(f"`limit` must be None or a positive integer. Received: limit={limit!r}")
    if isinstance(data, Source):
        return data
    if isinstance(data, (ImageSet, ExampleSet)):
        return ArraySource(data, limit)
    if isinstance(data, tf.data.Dataset):
        return DatasetSource(data.take(limit) if limit else data)
    if not isinstance(data, (str, os.PathLike)):
        raise ValueError(
            f"Unknown data source: expected a folder, 'tfds:NAME', a .npz file, 'shapes' or a "
            f"tf.data.Dataset. Received: data={data!r}"
        )
    data = os.fspath(data)
    if data == "shapes":
        num, seed = (10000, 0) if split == "train" else (2000, 1)
        return ArraySource(make_shapes(limit or num, image_size=image_size, seed=seed))
    if data.startswith("tfds:"):
        match = _TFDS_RE.match(data)
        if not match:
            raise ValueError(
                f"Malformed TFDS source; expected 'tfds:NAME' or 'tfds:NAME:SPLIT'. Received: data={data!r}"
            )
        return TfdsSource(match.group("name"), match.group("split") or split, tfds_data_dir, limit)
    if data.lower().endswith(".npz"):
        if not os.path.isfile(data):
            raise ValueError(f"The .npz file does not exist. Received: data={data!r}")
        return ArraySource(load_npz(data), limit)
    if os.path.isdir(data):
        if os.path.isfile(os.path.join(data, SHARD_INDEX)):
            return ShardSource(data, limit)
        return FolderSource(data, limit)
    what = "The path does not exist" if not os.path.exists(data) else "Unknown data source"
    raise ValueError(
        f"{what}: expected a folder of images or shards, 'tfds:NAME[:SPLIT]', a .npz file or "
        f"'shapes'. Received: data={data!r}"
    )


def steps_per_epoch(num_images: int, batch_size: int) -> int:
    """Full batches in one epoch (the stream runs on; an epoch is `num_images // batch_size` steps)."""
    _check_batch_size(batch_size)
    return int(num_images) // int(batch_size)


def pretrain_dataset(
    source,
    batch_size: int,
    augment_config,
    seed: int = 0,
    start_step: int = 0,
    start_position=None,
    with_labels: bool = False,
    autotune: bool = True,
    tracker: StreamPosition = None,
    input_context: tf.distribute.InputContext = None,
    augment_on: str = "host",
) -> tf.data.Dataset:
    """An endless dataset of BYOL view pairs.

    Args:
        source: a `Source` (`open_source`), an `ImageSet` or a uint8 array.
        batch_size: images per batch.
        augment_config: the two views: an `AugmentConfig`, or the config
            of an audio or text source's modality (`byol_tf.modalities`).
        seed: seeds the order and every augmentation.
        start_step: the optimizer step of the first batch (seeds its colour stages).
        start_position: the stream position to start at (`StreamPosition.after`);
            default `start_step * batch_size`.
        with_labels: yield `((view1, view2), labels)` for the online probe.
        autotune: tf.data autotuning (off avoids an idle stall after short fits).
        tracker: a `StreamPosition` to fill (streaming sources).
        input_context: from `strategy.distribute_datasets_from_function`:
            with several input pipelines (workers), this worker's share, in
            per-replica batches. Streaming sources read only this worker's
            files (`Source.train_records`); in-memory arrays make each global
            batch and keep this worker's rows. `start_position` is then this
            worker's own stream position.
        augment_on: "host" makes the views here; "device" stops after the
            crops and flips and yields what `byol_tf.device_views.DeviceViews`
            finishes inside the train step (the same views, to float rounding).

    Returns:
        A `tf.data.Dataset` of `(view1, view2)`, each float32
        `[batch_size, image_size, image_size, 3]` in [0, 1] (per replica
        with an `input_context`), followed by `small_views` float32 views of
        `small_view_size`; with `augment_on="device"`, the dict of crops that
        `DeviceViews` takes instead of the views.
    """
    _check_batch_size(batch_size)
    if augment_on not in AUGMENT_ON:
        raise ValueError(f"`augment_on` must be one of {AUGMENT_ON}. Received: augment_on={augment_on!r}")
    if isinstance(start_step, bool) or not isinstance(start_step, (int, np.integer)) or start_step < 0:
        raise ValueError(f"`start_step` must be an integer >= 0. Received: start_step={start_step!r}")
    if isinstance(source, np.ndarray):
        source = ArraySource(ImageSet(source))
    source = open_source(source)
    if source.num_examples < batch_size:
        # There would be no full batch at all and `fit` would hang.
        raise ValueError(
            "Not enough images for one batch: need at least `batch_size` images. "
            f"Received: {source.num_examples} images, batch_size={batch_size}, data={source.name!r}"
        )
    modality = getattr(source, "modality", "image")
    expected = AUGMENT_CONFIGS[modality]
    if not isinstance(augment_config, expected):
        raise ValueError(
            f"`augment_config` must be an {expected.__name__} for {modality} data. "
            f"Received: augment_config={augment_config!r}"
        )
    if modality != "image" and augment_on != "host":
        raise ValueError(f"Audio and text views are made on the host. Received: augment_on={augment_on!r}")
    if modality == "image" and augment_config.small_views and augment_on != "host":
        raise ValueError(
            f"Small views are made on the host. Received: augment_on={augment_on!r}, "
            f"small_views={augment_config.small_views}"
        )
    if with_labels and not source.labelled:
        raise ValueError(f"`with_labels` needs labelled data. Received: data={source.name!r} (unlabelled)")
    workers, worker = (input_context.num_input_pipelines, input_context.input_pipeline_id) if input_context else (1, 0)
    if batch_size % workers:
        raise ValueError(f"`batch_size` must divide by the {workers} workers. Received: batch_size={batch_size}")
    if isinstance(source, ArraySource):

        def make_views(batch, batch_seed):
            if modality != "image":
                return get_modality(modality).views(batch, batch_seed, augment_config)
            small = crop_small(batch, batch_seed, augment_config) if augment_config.small_views else []
            return _views_or_crops(
                *crop_pair(batch, batch_seed, augment_config), batch_seed, augment_config, augment_on, small
            )

        ds = _array_views(source, batch_size, make_views, seed, start_step, with_labels)
        if workers > 1:
            rows = slice(worker * batch_size // workers, (worker + 1) * batch_size // workers)
            ds = ds.map(lambda *element: tf.nest.map_structure(lambda t: t[rows], element))
    else:
        start = start_step * batch_size // workers if start_position is None else int(start_position)
        ds = _streamed_views(
            source,
            batch_size // workers,
            augment_config,
            seed,
            start_step,
            start,
            with_labels,
            tracker,
            (workers, worker),
            augment_on,
        )
    if input_context is not None:
        ds = ds.rebatch(input_context.get_per_replica_batch_size(batch_size), drop_remainder=True)
    options = tf.data.Options()
    options.autotune.enabled = bool(autotune)
    options.deterministic = True
    # Multi-worker without an input context (`experimental_distribute_dataset`):
    # every worker makes the same batches and keeps its share of each.
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.DATA
    return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def _views_or_crops(crops1, crops2, batch_seed, config, augment_on, small=()):
    """The finished views (the two large ones, then any `small` ones), or (for the device) both crops with the seed and row of each image."""
    if augment_on == "host":
        return (*finish_pair_on_host(crops1, crops2, batch_seed, config), *finish_small(small, batch_seed, config))
    batch = tf.shape(crops1)[0]
    return {
        "crops": tf.stack([crops1, crops2], axis=1),
        "seed": tf.tile(batch_seed[None], [batch, 1]),
        "row": tf.range(batch, dtype=tf.int32),
        "rows": tf.fill([batch], tf.cast(batch, tf.int32)),
    }


def _array_views(source, batch_size, make_views, seed, start_step, with_labels):
    """In-memory examples: epoch `e` is the stateless permutation `[seed, -1 - e]`, cut into full batches.

    `make_views(batch, batch_seed)` turns each batch into what the model takes.
    """
    num_examples, steps = source.num_examples, steps_per_epoch(source.num_examples, batch_size)
    seed_const = tf.constant(int(seed), tf.int64)
    examples_t = tf.constant(source.examples)
    labels_t = tf.constant(source.labels if source.labels is not None else np.zeros(num_examples, np.int64))
    element_shape = [int(batch_size), *source.examples.shape[1:]]

    def make(index):
        epoch, position = index // steps, index % steps
        order = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=tf.stack([seed_const, -1 - epoch])
        )
        chosen = order[position * batch_size : (position + 1) * batch_size]
        batch = tf.ensure_shape(tf.gather(examples_t, chosen), element_shape)
        views = make_views(batch, tf.stack([seed_const, index]))
        return (views, tf.ensure_shape(tf.gather(labels_t, chosen), [int(batch_size)])) if with_labels else views

    # The batch index (int64) counts across epochs, so every batch gets its own seed.
    ds = tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64)
    return ds.map(make, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _streamed_views(source, batch_size, config, seed, start_step, start, with_labels, tracker, shard, augment_on):
    max_pixels = getattr(source, "max_pixels", files.MAX_IMAGE_PIXELS)
    tracker = tracker or StreamPosition(source)
    tracker.restart(start_step, start)

    def load(record):
        views = crops.view_crops(source.fetch(record), crops.view_key(seed, record["position"]), config, max_pixels)
        example = {"position": record["position"], "views": views[0], "label": record["label"]}
        return {**example, "small": views[1]} if config.small_views else example

    ds = source.train_records(seed, start, shard).map(load, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    # A file that fails to decode is dropped here; `tracker` notices the gap and logs it.
    ds = ds.ignore_errors().batch(batch_size, drop_remainder=True)
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64), ds)
    ds = ds.map(lambda step, batch: (tracker.observe_op(step, batch["position"]), batch))

    workers, worker = shard

    def finish(step, batch):
        # Each worker's batch of a step gets its own colour draws: batch seed `step * workers + worker`.
        batch_seed = tf.stack([tf.constant(int(seed), tf.int64), step * workers + worker])
        small = tf.unstack(batch["small"], axis=1) if "small" in batch else []
        views = _views_or_crops(batch["views"][:, 0], batch["views"][:, 1], batch_seed, config, augment_on, small)
        return (views, batch["label"]) if with_labels else views

    return ds.map(finish, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)


def _check_batch_size(batch_size):
    if isinstance(batch_size, bool) or not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer. Received: batch_size={batch_size!r}")
