"""Two windowed JPEG decodes (decode_and_crop_jpeg) against one full decode and two slices.

    .venv/bin/python benchmarks/jpeg_crops.py --data=../shared/data/imagewoof/train --image_size=96

Streams both views of the folder through `data.pretrain_dataset` with each mode, in
alternating rounds, and prints images/s per round and mode.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_string("data", None, "An image folder of JPEGs.")
flags.DEFINE_integer("image_size", 96, "View side.")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
flags.DEFINE_integer("steps", 15, "Timed batches per round.")
flags.DEFINE_integer("rounds", 3, "Alternating rounds per mode.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    from byol_tf import data, get_preset
    from byol_tf.data import crops

    config = get_preset("imagenet", image_size=FLAGS.image_size, batch_size=FLAGS.batch_size)
    source = data.open_source(FLAGS.data)
    for round_ in range(FLAGS.rounds):
        for windowed in (True, False):
            crops.WINDOWED_JPEG = windowed
            iterator = iter(data.pretrain_dataset(source, config.batch_size, config.augment, seed=round_))
            for _ in range(3):
                next(iterator)
            begin = time.perf_counter()
            for _ in range(FLAGS.steps):
                next(iterator)
            rate = FLAGS.steps * config.batch_size / (time.perf_counter() - begin)
            print(f"round={round_} mode={'windowed' if windowed else 'full'} images_per_sec={rate:.1f}", flush=True)


if __name__ == "__main__":
    app.run(main)
