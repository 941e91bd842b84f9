"""Per-image random resized crops from the original image, as `tf.data` map functions.

The paper, torchvision, DeepMind, lightly and solo-learn all crop from the
original photo and then resize. Here each image draws its two crop windows
from its own size (`byol_tf.augment.crop_window`), both are resized to the
view size (and flipped) in one op, and the views are rounded to uint8, as
torchvision's PIL pipeline is. The colour stages then run batched
(`byol_tf.augment.finish_pair`).
"""

import tensorflow as tf

from byol_tf.augment import CROP_TRIES, window_boxes, crop_window, preprocess_eval
from byol_tf.config import AugmentConfig
from byol_tf.data import files

# libjpeg's DCT-domain downscaling factors (`decode_jpeg(ratio=...)`).
JPEG_RATIOS = (1, 2, 4, 8)


def view_key(seed, position):
    """The RNG key of the example at stream `position` (int64), from the run's `seed`."""
    # -2: no batch seed `[seed, i]` (i >= 0) nor epoch seed `[seed, -1 - e]` is this.
    base = tf.stack([tf.cast(seed, tf.int64), tf.constant(-2, tf.int64)])
    return tf.random.experimental.stateless_fold_in(base, tf.cast(position, tf.int64))


def two_crops(data, key, config: AugmentConfig, max_pixels=files.MAX_IMAGE_PIXELS):
    """Two random resized, flipped crops of one image, uint8 `[2, S, S, 3]`.

    The windows follow torchvision's RandomResizedCrop on the original size.
    Both are sampled bilinearly in one `crop_and_resize` (a mirrored box
    flips), as the in-memory path does. A JPEG is decoded at the smallest
    DCT scale (1/2, 1/4, 1/8) that keeps both windows' short sides at least
    the view size: libjpeg's scaled decode is an antialiased downscale, and
    it is several times cheaper on large photos.

    Args:
        data: a scalar string of encoded image bytes, or a decoded
            `[H, W, C]` image (uint8 0..255 or float 0..1).
        key: the example's RNG key (`view_key`).
        config: crop scale, ratio, flip probability and the view size.
        max_pixels: larger images fail (the stream skips them).

    Returns:
        uint8 `[2, image_size, image_size, 3]`, view 1 then view 2.
    """
    # One draw per example (per-element ops dominate a tf.data map's cost).
    u = tf.random.stateless_uniform([2, 2 * CROP_TRIES + 3], key)
    tries = tf.reshape(u[:, : 2 * CROP_TRIES], [2, CROP_TRIES, 2])
    offsets, flips = u[:, 2 * CROP_TRIES : 2 * CROP_TRIES + 2], u[:, -1] < config.flip_prob
    size = config.image_size

    def boxes(shape):
        height, width = tf.fill([2], tf.cast(shape[0], tf.float32)), tf.fill([2], tf.cast(shape[1], tf.float32))
        top, left, h, w = crop_window(height, width, tries, offsets, config)
        y1, x1, y2, x2 = tf.unstack(window_boxes(top, left, h, w, height, width, size), axis=1)
        short = tf.reduce_min(tf.minimum(h, w))
        return tf.stack([y1, tf.where(flips, x2, x1), y2, tf.where(flips, x1, x2)], axis=1), short

    def resized(image, box):
        return tf.image.crop_and_resize(image[None], box, tf.zeros([2], tf.int32), [size, size])

    def decoded(image):
        image = files.to_rgb_float(image)
        return resized(image, boxes(tf.shape(image))[0]) * 255.0

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        with tf.control_dependencies([files.check_pixels(shape[0], shape[1], max_pixels)]):
            box, short = boxes(shape)
        # Normalised boxes select the same region of the scaled image, to a fraction of its pixel.
        index = tf.reduce_sum(tf.cast(tf.constant(JPEG_RATIOS[1:], tf.float32) * size <= short, tf.int32))
        branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in JPEG_RATIOS]
        # Sampled from the uint8 image: no float copy of the whole photo.
        return resized(tf.switch_case(index, branches), box)

    if data.dtype != tf.string:
        views = decoded(tf.convert_to_tensor(data))
    else:
        views = tf.cond(files.is_jpeg(data), jpeg, lambda: decoded(_decode_other(data, max_pixels)))
    return tf.cast(tf.round(tf.clip_by_value(views, 0.0, 255.0)), tf.uint8)


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


def eval_image(data, image_size, crop_fraction, max_pixels=files.MAX_IMAGE_PIXELS):
    """One image (encoded bytes or decoded) through `preprocess_eval`: float32 `[S, S, 3]`."""
    if data.dtype == tf.string:
        image = tf.cond(
            files.is_jpeg(data), lambda: _checked_jpeg(data, max_pixels), lambda: _decode_other(data, max_pixels)
        )
    else:
        image = files.to_rgb_float(tf.convert_to_tensor(data))
    return preprocess_eval(image, image_size, crop_fraction)


def _checked_jpeg(data, max_pixels):
    shape = tf.image.extract_jpeg_shape(data)
    with tf.control_dependencies([files.check_pixels(shape[0], shape[1], max_pixels)]):
        return tf.cast(tf.io.decode_jpeg(data, channels=3), tf.float32) / 255.0
