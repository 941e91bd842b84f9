"""Writing TFRecord shards from an image folder: the original bytes, names and labels.

    write_shards("photos/", "photos_shards/", shard_size=1000)

Each record is a `tf.train.Example` with `image/encoded` (the file's bytes,
not re-encoded), `image/filename` (its path below the folder) and
`image/class/label` (-1 when unlabelled). The files go into the shards in a
seeded random order, so every shard mixes the classes, and `index.json`
lists the shards and their counts: a run knows the dataset's size without
reading it. Files whose header is not an image (or is over `max_pixels`)
are left out and listed with their reasons; what still fails to decode is
skipped while training.
"""

import datetime
import json
import os

import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf.data import files
from byol_tf.data.record_sources import SHARD_INDEX


def _example(contents, name, label):
    feature = {
        "image/encoded": tf.train.Feature(bytes_list=tf.train.BytesList(value=[contents])),
        "image/filename": tf.train.Feature(bytes_list=tf.train.BytesList(value=[name])),
        "image/class/label": tf.train.Feature(int64_list=tf.train.Int64List(value=[label])),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def write_shards(folder, out_dir, shard_size=1024, seed=0, max_pixels=files.MAX_IMAGE_PIXELS, prefix="shard"):
    """Writes the images of `folder` as TFRecord shards plus `index.json` into `out_dir`.

    Args:
        folder: an image folder (first-level subfolders are classes).
        out_dir: created; must not already hold an `index.json`.
        shard_size: records per shard.
        seed: seeds the order of the files across the shards.
        max_pixels: larger images are left out.
        prefix: shard file names are `{prefix}-00000-of-00012.tfrecord`.

    Returns:
        The index dict that was written (with `skipped`: `[path, reason]` pairs).
    """
    if isinstance(shard_size, bool) or not isinstance(shard_size, int) or shard_size < 1:
        raise ValueError(f"`shard_size` must be a positive integer. Received: shard_size={shard_size!r}")
    if os.path.exists(os.path.join(out_dir, SHARD_INDEX)):
        raise ValueError(f"`out_dir` already holds shards; choose another folder. Received: out_dir={out_dir!r}")
    paths, labels, class_names, skipped = files.list_image_folder(folder)
    if not paths:
        raise ValueError(f"No image files found in the folder. Received: folder={folder!r}")
    order = np.random.default_rng(seed).permutation(len(paths))
    num_shards = -(-len(paths) // shard_size)
    os.makedirs(out_dir, exist_ok=True)
    shards, written = [], 0
    root = os.path.abspath(folder)
    for k in range(num_shards):
        name = f"{prefix}-{k:05d}-of-{num_shards:05d}.tfrecord"
        count = 0
        with tf.io.TFRecordWriter(os.path.join(out_dir, name)) as writer:
            for i in order[k * shard_size : (k + 1) * shard_size]:
                try:
                    with open(paths[i], "rb") as f:
                        contents = f.read()
                except OSError as e:
                    skipped.append((paths[i], f"{type(e).__name__}: {e.strerror or e}"))
                    continue
                reason = files.precheck_bytes(contents, max_pixels)
                if reason is not None:
                    skipped.append((paths[i], reason))
                    continue
                writer.write(_example(contents, os.fsencode(os.path.relpath(paths[i], root)), int(labels[i])))
                count += 1
        shards.append({"file": name, "count": count})
        written += count
        logging.info("Wrote %s (%d images, %d of %d so far)", name, count, written, len(paths))
    index = {
        "format": "byol_tf.shards/1",
        "num_examples": written,
        "class_names": class_names,
        "shards": shards,
        "source": root,
        "written_at": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "skipped": [[p, r] for p, r in skipped],
    }
    with open(os.path.join(out_dir, SHARD_INDEX), "w") as f:
        json.dump(index, f, indent=1)
    return index
