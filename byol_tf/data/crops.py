"""Per-image random resized crops from the original image, as `tf.data` map functions.

The paper, torchvision, DeepMind, lightly and solo-learn all crop from the
original photo and then resize. Here each image draws its two crop windows
from its own size (`byol_tf.augment.crop_window`), a JPEG decodes only
what it needs, each crop is resized to the view size and flipped, and the
views are rounded to uint8, as torchvision's PIL pipeline is. The colour
stages then run batched (`byol_tf.augment.finish_pair`).
"""

import tensorflow as tf

from byol_tf.augment import CROP_TRIES, crop_window, preprocess_eval
from byol_tf.config import AugmentConfig
from byol_tf.data import files

# JPEG crops: two windowed decodes (`decode_and_crop_jpeg`) or one full
# decode and two slices. BENCHMARKS.md ("JPEG crop decoding") has the figures.
WINDOWED_JPEG = False


def view_key(seed, position):
    """The RNG key of the example at stream `position` (int64), from the run's `seed`."""
    # -2: no batch seed `[seed, i]` (i >= 0) nor epoch seed `[seed, -1 - e]` is this.
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(-2, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def two_crops(data, key, config: AugmentConfig, max_pixels=files.MAX_IMAGE_PIXELS, windowed=None):
    """Two random resized, flipped crops of one image, uint8 `[2, S, S, 3]`.

    Args:
        data: a scalar string of encoded image bytes, or a decoded
            `[H, W, C]` image (uint8 0..255 or float 0..1).
        key: the example's RNG key (`view_key`).
        config: crop scale, ratio, flip probability and the view size.
        max_pixels: larger images fail (the stream skips them).
        windowed: for JPEG, decode only the crop windows (default
            `WINDOWED_JPEG`).

    Returns:
        uint8 `[2, image_size, image_size, 3]`, view 1 then view 2.
    """
    keys = tf.random.experimental.stateless_split(key, num=3)
    tries = tf.random.stateless_uniform([2, CROP_TRIES, 2], keys[0])
    offsets = tf.random.stateless_uniform([2, 2], keys[1])
    flips = tf.random.stateless_uniform([2], keys[2]) < config.flip_prob

    def windows(height, width):
        size = lambda n: tf.fill([2], tf.cast(n, tf.float32))
        top, left, h, w = crop_window(size(height), size(width), tries, offsets, config)
        return tf.cast(tf.stack([top, left, h, w], axis=1), tf.int32)

    def from_image(image):
        shape = tf.shape(image)
        win = windows(shape[0], shape[1])
        return [image[w[0]:w[0] + w[2], w[1]:w[1] + w[3]] for w in tf.unstack(win)]

    if data.dtype != tf.string:
        crops = from_image(files.to_rgb_float(tf.convert_to_tensor(data)))
    else:
        windowed = WINDOWED_JPEG if windowed is None else windowed
        crops = tf.cond(files.is_jpeg(data), lambda: _jpeg_crops(data, windows, max_pixels, windowed),
                        lambda: from_image(_decode_other(data, max_pixels)))
    views = [_resize_and_flip(c, config.image_size, f) for c, f in zip(crops, tf.unstack(flips))]
    return tf.stack(views)


def _jpeg_crops(data, windows, max_pixels, windowed):
    shape = tf.image.extract_jpeg_shape(data)
    with tf.control_dependencies([files.check_pixels(shape[0], shape[1], max_pixels)]):
        win = windows(shape[0], shape[1])
    if windowed:
        crops = [tf.image.decode_and_crop_jpeg(data, w, channels=3) for w in tf.unstack(win)]
    else:
        image = tf.io.decode_jpeg(data, channels=3)
        crops = [image[w[0]:w[0] + w[2], w[1]:w[1] + w[3]] for w in tf.unstack(win)]
    return [tf.cast(c, tf.float32) / 255.0 for c in crops]


def _decode_other(data, max_pixels):
    """Non-JPEG bytes -> float RGB; a PNG's size is checked from its header before decoding."""
    head = tf.io.decode_raw(tf.strings.substr(tf.strings.join([data, "\0" * 24]), 0, 24), tf.uint8)
    size = tf.cast(head[16:24], tf.int64)
    width = size[0] * 2**24 + size[1] * 2**16 + size[2] * 2**8 + size[3]
    height = size[4] * 2**24 + size[5] * 2**16 + size[6] * 2**8 + size[7]
    is_png = tf.strings.substr(data, 0, 4) == b"\x89PNG"
    checks = [files.check_pixels(tf.where(is_png, height, 0), tf.where(is_png, width, 0), max_pixels)]
    with tf.control_dependencies(checks):
        image = files.decode_rgb(data)
    shape = tf.shape(image)
    with tf.control_dependencies([files.check_pixels(shape[0], shape[1], max_pixels)]):
        return tf.identity(image)


def _resize_and_flip(crop, size, flip):
    """A float crop in [0, 1] -> uint8 `[size, size, 3]`, mirrored if `flip`."""
    x = tf.image.resize(crop, [size, size], method="bilinear", antialias=True)
    x = tf.where(flip, tf.reverse(x, [1]), x)
    return tf.cast(tf.round(tf.clip_by_value(x, 0.0, 1.0) * 255.0), tf.uint8)


def eval_image(data, image_size, crop_fraction, max_pixels=files.MAX_IMAGE_PIXELS):
    """One image (encoded bytes or decoded) through `preprocess_eval`: float32 `[S, S, 3]`."""
    if data.dtype == tf.string:
        image = tf.cond(files.is_jpeg(data), lambda: _checked_jpeg(data, max_pixels),
                        lambda: _decode_other(data, max_pixels))
    else:
        image = files.to_rgb_float(tf.convert_to_tensor(data))
    return preprocess_eval(image, image_size, crop_fraction)


def _checked_jpeg(data, max_pixels):
    shape = tf.image.extract_jpeg_shape(data)
    with tf.control_dependencies([files.check_pixels(shape[0], shape[1], max_pixels)]):
        return tf.cast(tf.io.decode_jpeg(data, channels=3), tf.float32) / 255.0
