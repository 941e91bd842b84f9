"""Times each stage of one BYOL view on a batch, to see where augmentation time goes.

    .venv/bin/python benchmarks/augment_stages.py --image_size=96

Prints milliseconds per batch for every stage, graph mode (`tf.function`),
after one untimed call. The stages are the library's own private functions,
called as `augment_view` calls them.
"""

import dataclasses
import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("image_size", 96, "View side in pixels (the source images have the same side).")
flags.DEFINE_integer("batch_size", 128, "Images per batch.")
flags.DEFINE_integer("repeats", 20, "Timed calls per stage.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import numpy as np
    import tensorflow as tf

    from byol_tf import augment, colour
    from byol_tf.presets import get_preset

    size, batch = FLAGS.image_size, FLAGS.batch_size
    config = dataclasses.replace(get_preset("imagenet").augment, image_size=size)
    rng = np.random.default_rng(0)
    images = tf.constant(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8))
    x = tf.constant(rng.random((batch, size, size, 3)), tf.float32)
    seed, key = tf.constant([1, 2], tf.int64), tf.constant([3, 4], tf.int64)
    apply = tf.constant(rng.random(batch) < config.jitter_prob)
    sigma = tf.constant(rng.uniform(*config.blur_sigma, batch), tf.float32)
    delta = tf.constant(rng.uniform(-config.hue, config.hue, batch), tf.float32)
    no_hue = dataclasses.replace(config, hue=0.0)
    ops, amounts = colour._jitter_params(batch, key, config)
    no_hue_params = colour._jitter_params(batch, key, no_hue)
    weights = colour._blur_weights(sigma, config)
    threshold = tf.where(tf.constant(rng.random(batch) < 0.2), 0.5, 2.0)
    boxes = tf.tile([[0.1, 0.1, 0.9, 0.9]], [batch, 1])
    unit = augment._unit_float(images)  # what both views are cropped from
    stages = [
        ("both views (augment_pair)", lambda: augment.augment_pair(images, seed, config)),
        ("view 1 (blur p=1)", lambda: augment.augment_view(images, seed, config, 0)),
        ("view 2 (blur p=0.1, solarize)", lambda: augment.augment_view(images, seed, config, 1)),
        ("uint8 to float32", lambda: augment._unit_float(images)),
        ("crop and resize (float32)", lambda: tf.image.crop_and_resize(unit, boxes, tf.range(batch), [size, size])),
        ("colour jitter", lambda: colour._color_jitter(x, apply, (ops, amounts), config)),
        ("colour jitter without hue", lambda: colour._color_jitter(x, apply, no_hue_params, no_hue)),
        ("hue shift, all images", lambda: colour._adjust_hue(x, delta)),
        ("jitter chain, all images, XLA", lambda: colour._JITTER_CHAINS[1](x, ops, amounts)),
        ("grayscale", lambda: colour._gray(x)),
        ("Gaussian blur, all images, XLA", lambda: colour._finish(x, None, weights, None)),
        ("grey+blur+clip, all, XLA", lambda: colour._finish(x, apply, weights, None)),
        ("grey+solarize+clip, all, XLA", lambda: colour._finish(x, apply, None, threshold)),
    ]
    for name, stage in stages:
        fn = tf.function(stage)
        tf.nest.map_structure(lambda t: t.numpy(), fn())
        start = time.perf_counter()
        for _ in range(FLAGS.repeats):
            out = fn()
        tf.nest.map_structure(lambda t: t.numpy(), out)
        ms = 1000 * (time.perf_counter() - start) / FLAGS.repeats
        print(f"{name:32s} {ms:8.2f} ms/batch  {batch * 1000 / ms:9.0f} img/s", flush=True)


if __name__ == "__main__":
    app.run(main)
