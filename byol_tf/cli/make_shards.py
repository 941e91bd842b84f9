"""Writes an image folder as TFRecord shards (original bytes, names, labels) plus index.json.

    byol-make-shards --data=photos/ --out=photos_shards/ --shard_size=1024

Then train from them with `byol-pretrain --data=photos_shards/`.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.cli import flag_errors, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("data", None, "The image folder (first-level subfolders are classes).")
flags.DEFINE_string("out", None, "The shard folder to create.")
flags.DEFINE_integer("shard_size", 1024, "Images per shard.")
flags.DEFINE_integer("seed", 0, "Seeds the order of the images across shards.")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments. Received: {argv[1:]}")
    if not FLAGS.data or not os.path.isdir(FLAGS.data):
        raise app.UsageError(f"--data must be an image folder. Received: --data={FLAGS.data}")
    if not FLAGS.out:
        raise app.UsageError("--out is required: the shard folder. Received: --out=None")
    if FLAGS.shard_size < 1:
        raise app.UsageError(f"--shard_size must be >= 1. Received: --shard_size={FLAGS.shard_size}")
    from byol_tf import data

    with flag_errors("shard_size", folder="data", out_dir="out"):
        index = data.write_shards(FLAGS.data, FLAGS.out, FLAGS.shard_size, FLAGS.seed)
    print(
        f"Wrote {index['num_examples']} images in {len(index['shards'])} shards to {FLAGS.out}; "
        f"left out {len(index['skipped'])} unusable files (listed in index.json)."
    )


def run():
    """The `byol-make-shards` console command."""
    run_main(main, __name__)


if __name__ == "__main__":
    run()
