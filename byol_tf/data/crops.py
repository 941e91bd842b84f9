"""Per-image random resized crops from the original image, as `tf.data` map functions.

The paper, torchvision, DeepMind, lightly and solo-learn all crop from the
original photo and then resize. Here each image draws its two crop windows
(and those of any small views) from its own size
(`byol_tf.augment.crop_window`), they are resized to the view size (and
flipped), and the views are rounded to uint8, as
torchvision's PIL pipeline is. The colour stages then run batched
(`byol_tf.augment.finish_pair`).
"""

import functools

import tensorflow as tf

from byol_tf.augment import CROP_TRIES, crop_window, preprocess_eval, small_seed
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
    """Two random resized, flipped crops of one image, uint8 `[2, S, S, 3]` (`view_crops` without small views)."""
    return view_crops(data, key, config, max_pixels)[0]


def view_crops(data, key, config: AugmentConfig, max_pixels=files.MAX_IMAGE_PIXELS):
    """The two large and `config.small_views` small random resized, flipped crops of one image.

    The windows follow torchvision's RandomResizedCrop on the original size.
    Each window is sliced and resized bilinearly with half-pixel centres (as
    PIL places its samples; no antialiasing: the scaled decode below does most
    of any shrink), then flipped where drawn. A JPEG is decoded
    once, at the smallest DCT scale (1/2, 1/4, 1/8) that keeps every window's
    short side at least its view's size: libjpeg's scaled decode is an
    antialiased downscale, and it is several times cheaper on large photos.

    Args:
        data: a scalar string of encoded image bytes, or a decoded
            `[H, W, C]` image (uint8 0..255 or float 0..1).
        key: the example's RNG key (`view_key`); the small views draw from
            a branch of it, so the large views do not depend on them.
        config: crop scales, ratio, flip probability and the view sizes.
        max_pixels: larger images fail (the stream skips them).

    Returns:
        A tuple: uint8 `[2, S, S, 3]` (view 1 then view 2), then, with small
        views, uint8 `[small_views, s, s, 3]` (`S = image_size`, `s = small_view_size`).
    """
    groups = [_Group(key, config, 2)]
    if config.small_views:
        groups.append(_Group(small_seed(key), config.small_view_config(), config.small_views))

    def decoded(image):
        image = files.to_rgb_float(image)
        return [group.resized(image, group.windows(tf.shape(image))[0], 1.0) * 255.0 for group in groups]

    def jpeg():
        shape = tf.image.extract_jpeg_shape(data)
        with tf.control_dependencies([files.check_pixels(shape[0], shape[1], max_pixels)]):
            windows = [group.windows(shape) for group in groups]
        # The largest downscale that every window allows (relative to its own view size).
        # (a chain of minimums: without small views that is no op at all in the per-image map)
        allowed = functools.reduce(tf.minimum, [short / group.size for group, (_, short) in zip(groups, windows)])
        index = tf.reduce_sum(tf.cast(tf.constant(JPEG_RATIOS[1:], tf.float32) <= allowed, tf.int32))
        branches = [lambda r=r: tf.io.decode_jpeg(data, channels=3, ratio=r) for r in JPEG_RATIOS]
        # Sampled from the uint8 image: no float copy of the whole photo.
        image = tf.switch_case(index, branches)
        ratio = tf.gather(tf.constant(JPEG_RATIOS, tf.float32), index)
        return [group.resized(image, window, ratio) for group, (window, _) in zip(groups, windows)]

    if data.dtype != tf.string:
        views = decoded(tf.convert_to_tensor(data))
    else:
        views = tf.cond(files.is_jpeg(data), jpeg, lambda: decoded(_decode_other(data, max_pixels)))
    return tuple(tf.cast(tf.round(tf.clip_by_value(v, 0.0, 255.0)), tf.uint8) for v in views)


class _Group:
    """`count` views of one size and crop scale: their random draws, windows and resize."""

    def __init__(self, key, config: AugmentConfig, count: int):
        # One draw per group and example (per-element ops dominate a tf.data map's cost).
        u = tf.random.stateless_uniform([count, 2 * CROP_TRIES + 3], key)
        self.tries = tf.reshape(u[:, : 2 * CROP_TRIES], [count, CROP_TRIES, 2])
        self.offsets, self.flips = u[:, 2 * CROP_TRIES : 2 * CROP_TRIES + 2], u[:, -1] < config.flip_prob
        self.config, self.count, self.size = config, count, config.image_size

    def windows(self, shape):
        """Pixel windows `[count, 4]` (top, left, h, w) of an image of `shape`, and their shortest side."""
        fill = lambda value: tf.fill([self.count], tf.cast(value, tf.float32))
        top, left, h, w = crop_window(fill(shape[0]), fill(shape[1]), self.tries, self.offsets, self.config)
        return tf.stack([top, left, h, w], axis=1), tf.reduce_min(tf.minimum(h, w))

    def resized(self, image, windows, ratio):
        """The `windows` (original pixels) cut from `image`, decoded at 1/`ratio` of that size, resized and flipped.

        Slicing and `resize` run 2x faster than one `crop_and_resize` of both windows
        (BENCHMARKS.md). Scaled pixel k covers original pixels [k r, (k + 1) r) (libjpeg
        rounds the scaled size up), so the window edges divide by r, to the nearest pixel.
        """
        decoded = tf.shape(image)[:2]
        views = []
        for i in range(self.count):
            start = tf.cast(tf.round(windows[i, :2] / ratio), tf.int32)
            start = tf.minimum(start, decoded - 1)
            end = tf.cast(tf.round((windows[i, :2] + windows[i, 2:]) / ratio), tf.int32)
            end = tf.clip_by_value(end, start + 1, decoded)
            crop = tf.slice(image, tf.concat([start, [0]], 0), tf.concat([end - start, [-1]], 0))
            view = tf.image.resize(crop, [self.size, self.size])  # bilinear, half-pixel centres
            views.append(tf.cond(self.flips[i], lambda v=view: tf.reverse(v, [1]), lambda v=view: v))
        return tf.stack(views)


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
