"""Streaming at scale: peak memory of one epoch at N vs 10N files, and time to the first step.

    .venv/bin/python benchmarks/streaming_scale.py --what=memory --data=../shared/data/imagewoof/train --copies=1
    .venv/bin/python benchmarks/streaming_scale.py --what=memory --data=../shared/data/imagewoof/train --copies=10
    .venv/bin/python benchmarks/streaming_scale.py --what=first_step --data=../shared/data/imagewoof/train --num_files=100000

The larger folders are symbolic links to the files of `--data` (in a temporary folder,
deleted at the end), one class subfolder per original class. `memory` streams one epoch
of both 96 px views through `data.pretrain_dataset` (the input pipeline, which is what
could grow with the data) and prints `peak_rss_mb=`. `first_step` times, from a fresh
process: listing the folder, building and compiling the `photos96_cpu20` model, and one
`fit` step, and prints `seconds_to_first_step=`.
"""

import os
import resource
import shutil
import sys
import tempfile
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_enum("what", "memory", ["memory", "first_step"], "What to measure.")
flags.DEFINE_string("data", None, "An image folder with class subfolders.")
flags.DEFINE_integer("copies", 1, "memory: links to each file (10 gives 10N images).")
flags.DEFINE_integer("num_files", 100000, "first_step: links in the folder.")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
FLAGS = flags.FLAGS
START = time.perf_counter()


def _linked_folder(data, total):
    """A temporary folder of `total` links cycling over the images of `data`."""
    from byol_tf.data import files

    paths, labels, class_names, _ = files.list_image_folder(data)
    root = tempfile.mkdtemp(prefix="byol_links_")
    for name in class_names:
        os.makedirs(os.path.join(root, name))
    for i in range(total):
        path = paths[i % len(paths)]
        os.symlink(
            os.path.abspath(path),
            os.path.join(root, class_names[labels[i % len(paths)]], f"{i:07d}{os.path.splitext(path)[1]}"),
        )
    return root


def main(argv):
    del argv
    from byol_tf import data, get_preset

    config = get_preset("photos96_cpu20", batch_size=FLAGS.batch_size)
    count = len(data.files.list_image_folder(FLAGS.data)[0])
    total = count * FLAGS.copies if FLAGS.what == "memory" else FLAGS.num_files
    root = _linked_folder(FLAGS.data, total)
    try:
        begin = time.perf_counter()
        source = data.open_source(root)
        listed = time.perf_counter() - begin
        if FLAGS.what == "memory":
            steps = data.steps_per_epoch(source.num_examples, config.batch_size)
            for _ in data.pretrain_dataset(source, config.batch_size, config.augment).take(steps):
                pass
            seconds = time.perf_counter() - begin
            print(f"images={steps * config.batch_size} seconds={seconds:.1f} listing_s={listed:.2f}")
            print(f"peak_rss_mb={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}")
        else:
            from byol_tf.ema import EMAUpdate
            from byol_tf.build import build_byol
            from byol_tf.optim import build_optimizer

            steps = data.steps_per_epoch(source.num_examples, config.batch_size)
            model = build_byol(config)
            model.compile(optimizer=build_optimizer(config, steps))
            dataset = data.pretrain_dataset(source, config.batch_size, config.augment)
            model.fit(dataset, epochs=1, steps_per_epoch=1, verbose=0, callbacks=[EMAUpdate(steps, config.base_tau)])
            print(f"files={source.num_examples} listing_s={listed:.2f}")
            print(
                f"seconds_to_first_step={time.perf_counter() - START:.1f} (from the script's start, imports included)"
            )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    app.run(main)
