"""The two asymmetric BYOL views as vectorised batch ops.

Every function works on a whole batch at once with per-image random
parameters, so it is cheap inside `tf.data` after `.batch()`: there are no
per-image loops, `map_fn` or keras-cv layers (which fall back to per-image
while-loops). Randomness is stateless: the same `seed` gives the same views,
eagerly, in `tf.function` and in `tf.data`.
"""

import math

import tensorflow as tf

from byol_tf.colour import colour_and_finish
from byol_tf.config import AugmentConfig

# torchvision's RandomResizedCrop makes 10 attempts before its fallback.
CROP_TRIES = 10
# Folded into a batch seed for its small views (any constant the large views do not use).
SMALL_VIEWS_TAG = 7919
# `finish_pair_on_host` makes views of at least this size in chunks of this many rows
# (at most colour's `_SUBSET_PAD`, so the chunks' subsets are not padded).
HOST_CHUNK_MIN_SIZE = 128
HOST_CHUNK_ROWS = 8


def augment_view(images, seed, config: AugmentConfig, view: int) -> tf.Tensor:
    """Makes one BYOL view of a batch, with per-image random parameters.

    The ops run in torchvision's order: random resized crop, horizontal flip,
    colour jitter (its four ops in a random order per image), grayscale,
    Gaussian blur and solarization. The crop is taken from the images as
    given (in-memory arrays); streamed photos are cropped one by one from
    their original size (`byol_tf.data`) and then go through `finish_view`.

    Args:
        images: uint8 (0..255) or float (0..1) tensor of shape
            `[batch, height, width, 3]`; the batch size may be unknown.
        seed: int32 or int64 tensor of shape `[2]`, for the stateless RNG.
        config: an `AugmentConfig`.
        view: 0 or 1, selects `blur_prob[view]` and `solarize_prob[view]`.

    Returns:
        float32 tensor of shape `[batch, config.image_size,
        config.image_size, 3]` with values in `[0, 1]`.
    """
    _check_view(view)
    return colour_and_finish(crop_view(images, seed, config), _view_keys(seed), config, view)


def crop_view(images, seed, config: AugmentConfig) -> tf.Tensor:
    """The crop and flip of `augment_view` (same `seed`): float32 `[batch, size, size, 3]`.

    `finish_view` with the same seed completes the view, here or on the accelerator.
    """
    images = _unit_float(images)
    keys = _view_keys(seed)
    batch = tf.shape(images)[0]
    height = tf.fill([batch], tf.cast(tf.shape(images)[1], tf.float32))
    width = tf.fill([batch], tf.cast(tf.shape(images)[2], tf.float32))
    tries = tf.random.stateless_uniform(tf.stack([batch, CROP_TRIES, 2]), keys[0])
    offsets = tf.random.stateless_uniform(tf.stack([batch, 2]), keys[1])
    top, left, h, w = crop_window(height, width, tries, offsets, config)
    flip = tf.random.stateless_uniform(tf.stack([batch]), keys[2]) < config.flip_prob
    boxes = mirrored(window_boxes(top, left, h, w, height, width, config.image_size), flip)
    # Bilinear samples of 0..1 stay in 0..1 (to a rounding error that the
    # view's last op, a clip, removes), so the crop is not clipped here.
    return tf.image.crop_and_resize(images, boxes, tf.range(batch), [config.image_size] * 2)


def finish_view(crops, seed, config: AugmentConfig, view: int, rows=None) -> tf.Tensor:
    """The stages of `augment_view` after the crop and flip, on a batch of crops.

    Args:
        crops: uint8 or float (0..1) `[batch, image_size, image_size, 3]`,
            already cropped and flipped.
        seed: int32 or int64 tensor of shape `[2]`.
        config: an `AugmentConfig`.
        view: 0 or 1.
        rows: `(first, total)`: `crops` are rows `first .. first + batch` of
            a batch of `total` made with `seed`, and get those rows' random
            draws (one replica's share, `byol_tf.device_views`). Default:
            the whole batch.

    Returns:
        float32 `[batch, image_size, image_size, 3]` in `[0, 1]`.
    """
    _check_view(view)
    return colour_and_finish(_unit_float(crops), _view_keys(seed), config, view, rows)


def finish_pair(crops1, crops2, seed, config: AugmentConfig, rows=None):
    """`finish_view` for both views, from the seeds `augment_pair` gives them."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    return finish_view(crops1, seeds[0], config, 0, rows), finish_view(crops2, seeds[1], config, 1, rows)


def finish_pair_on_host(crops1, crops2, seed, config: AugmentConfig):
    """`finish_pair` for the host's `tf.data` pipeline: the same views, made in chunks of rows when they are large.

    A chunk's colour stages then work in the CPU's caches (1.6-1.7x for both
    views at 224 px on Zen 2; no gain at 80-96 px, and a loss at 48 px, where
    per-call costs dominate: BENCHMARKS.md). Each chunk draws as its rows of
    the whole batch (`rows`), so the views do not depend on the chunking.
    """
    batch, chunk = crops1.shape[0], HOST_CHUNK_ROWS
    if batch is None or batch <= chunk or config.image_size < HOST_CHUNK_MIN_SIZE:
        return finish_pair(crops1, crops2, seed, config)
    chunks = [
        finish_pair(crops1[first : first + chunk], crops2[first : first + chunk], seed, config, (first, batch))
        for first in range(0, batch, chunk)
    ]
    return tuple(tf.concat(views, 0) for views in zip(*chunks))


def crop_pair(images, seed, config: AugmentConfig):
    """The crops of `augment_pair` (same `seed`); `finish_pair` with that seed completes both views."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    images = _unit_float(images)
    return crop_view(images, seeds[0], config), crop_view(images, seeds[1], config)


def small_seed(seed):
    """The seed of a batch's small views: a branch of `seed` that the large views never draw from.

    As for the large views, a small view's crop and its colour stages share one seed.
    """
    return tf.random.experimental.stateless_fold_in(tf.cast(seed, tf.int64), SMALL_VIEWS_TAG)


def crop_small(images, seed, config: AugmentConfig):
    """The crops and flips of `config.small_views` small views (a list); `finish_small` completes them."""
    seeds = tf.random.experimental.stateless_split(small_seed(seed), num=config.small_views)
    small = config.small_view_config()
    return [crop_view(images, seeds[i], small) for i in range(config.small_views)]


def finish_small(crops, seed, config: AugmentConfig):
    """The small views from their crops (a list); view `i` takes the colour settings of large view `i % 2`."""
    if not crops:
        return []
    seeds = tf.random.experimental.stateless_split(small_seed(seed), num=len(crops))
    small = config.small_view_config()
    return [finish_view(crop, seeds[i], small, i % 2) for i, crop in enumerate(crops)]


def _check_view(view):
    if view not in (0, 1):
        raise ValueError(f"`view` must be 0 or 1. Received: view={view!r}")


def _view_keys(seed):
    # The RNG's output depends on the seed's dtype; fix it so int32 and int64 agree.
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)


def augment_pair(images, seed, config: AugmentConfig):
    """Makes the two asymmetric BYOL views of a batch from independent seeds.

    Args:
        images: uint8 (0..255) or float (0..1) tensor `[batch, height, width, 3]`.
        seed: int32 or int64 tensor of shape `[2]`.
        config: an `AugmentConfig`.

    Returns:
        A tuple of two float32 tensors `[batch, image_size, image_size, 3]`.
    """
    return finish_pair(*crop_pair(images, seed, config), seed, config)


def _unit_float(images):
    """uint8 (0..255) or float (0..1) images as float32 in 0..1.

    Both views are cropped from this: `crop_and_resize` reads float32 faster
    than uint8 on CPU (both views of 128 images at 96 px: 26 vs 35 ms on one
    thread, cast included), and the cast is paid once for the two views.
    """
    images = tf.convert_to_tensor(images)
    if images.dtype == tf.uint8:
        return tf.cast(images, tf.float32) / 255.0
    return tf.cast(images, tf.float32)


def eval_resize_side(image_size: int, crop_fraction: float) -> int:
    """The short side images are resized to before the evaluation centre crop."""
    # floor, as timm's `crop_pct`; 224 / 0.875 = 256, the ImageNet protocol.
    return int(math.floor(image_size / crop_fraction + 1e-6))


def preprocess_eval(images, image_size: int, crop_fraction: float = 1.0) -> tf.Tensor:
    """The one evaluation preprocessing: short side to `image_size / crop_fraction`, centre crop.

    torchvision's `Resize(side)` then `CenterCrop(image_size)`: the short side
    becomes `eval_resize_side(image_size, crop_fraction)`, the long side
    `int(side * long / short)`, resized bilinearly with antialiasing; the
    crop starts at `round((size - image_size) / 2)`. The kNN monitor, linear
    evaluation, fine-tuning and the serving signatures all use it.

    Args:
        images: uint8 (0..255) or float (0..1) tensor, `[batch, height, width, 3]`
            or `[height, width, 3]`, of any size.
        image_size: side of the square output.
        crop_fraction: in (0, 1]; 1 keeps the whole short side (CIFAR), 0.875
            is the ImageNet protocol (resize to 256, crop 224).

    Returns:
        float32 tensor of side `image_size` with values in `[0, 1]`.
    """
    if not 0.0 < crop_fraction <= 1.0:
        raise ValueError(f"`crop_fraction` must be in (0, 1]. Received: crop_fraction={crop_fraction!r}")
    images = tf.convert_to_tensor(images)
    scale = 255.0 if images.dtype == tf.uint8 else 1.0
    shape = tf.shape(images)
    height, width = shape[-3], shape[-2]
    side = eval_resize_side(image_size, crop_fraction)
    short = tf.minimum(height, width)

    # torchvision: int(side * long / short) for the long side, exactly side for the short one.
    def scaled(length):
        return tf.where(length == short, side, tf.cast(side * length // short, tf.int32))

    new_h, new_w = scaled(height), scaled(width)
    x = tf.image.resize(tf.cast(images, tf.float32), tf.stack([new_h, new_w]), method="bilinear", antialias=True)
    top = tf.cast(tf.round(tf.cast(new_h - image_size, tf.float32) / 2.0), tf.int32)
    left = tf.cast(tf.round(tf.cast(new_w - image_size, tf.float32) / 2.0), tf.int32)
    x = x[..., top : top + image_size, left : left + image_size, :]
    x = tf.ensure_shape(x, [*images.shape[:-3], image_size, image_size, 3])
    return tf.clip_by_value(x / scale, 0.0, 1.0)


def crop_window(height, width, tries, offsets, config: AugmentConfig):
    """torchvision's RandomResizedCrop window, `(top, left, h, w)` in pixels of the original image.

    All tries are drawn at once and the first valid one is kept; where none
    is valid, torchvision's fallback: the centre crop with its aspect ratio
    clamped into `crop_ratio`.

    Args:
        height, width: image sizes `[n]`, one per image.
        tries: uniforms `[n, tries, 2]` (area, log-ratio).
        offsets: uniforms `[n, 2]` placing the crop.
        config: its `crop_scale` and `crop_ratio`.

    Returns:
        Four float32 `[n]` tensors of whole pixel counts.
    """
    height, width = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
    (s_lo, s_hi), (r_lo, r_hi) = config.crop_scale, config.crop_ratio
    area = (height * width)[:, None] * (s_lo + (s_hi - s_lo) * tries[..., 0])
    log_lo, log_hi = math.log(r_lo), math.log(r_hi)
    ratio = tf.exp(log_lo + (log_hi - log_lo) * tries[..., 1])
    w = tf.round(tf.sqrt(area * ratio))
    h = tf.round(tf.sqrt(area / ratio))
    valid = (w > 0) & (w <= width[:, None]) & (h > 0) & (h <= height[:, None])
    first = tf.argmax(tf.cast(valid, tf.int32), axis=1)
    found = tf.reduce_any(valid, axis=1)
    in_ratio = width / height
    fallback_w = tf.where(in_ratio > r_hi, tf.round(height * r_hi), width)
    fallback_h = tf.where(in_ratio < r_lo, tf.round(width / r_lo), height)
    w = tf.where(found, tf.gather(w, first, batch_dims=1), fallback_w)
    h = tf.where(found, tf.gather(h, first, batch_dims=1), fallback_h)
    top = tf.where(found, tf.floor(offsets[:, 0] * (height - h + 1)), tf.floor((height - h) / 2))
    left = tf.where(found, tf.floor(offsets[:, 1] * (width - w + 1)), tf.floor((width - w) / 2))
    return top, left, h, w


def mirrored(boxes, flip):
    """`crop_and_resize` boxes `[n, 4]` with x1 and x2 swapped where `flip`.

    Flipping is free this way: a box with x1 > x2 samples the crop mirrored.
    """
    y1, x1, y2, x2 = tf.unstack(boxes, axis=1)
    return tf.stack([y1, tf.where(flip, x2, x1), y2, tf.where(flip, x1, x2)], axis=1)


def window_boxes(top, left, h, w, height, width, image_size):
    """Pixel windows as normalised `crop_and_resize` boxes `[n, 4]`."""
    # crop_and_resize puts the box edges on pixel centres (align-corners).
    # Shrinking them by half an output pixel samples like tf.image.resize
    # (half-pixel centres) when downscaling; when upscaling that would reach
    # past the crop, so the edges stay on its outer pixels (tf.image.resize,
    # which the streamed crops use, clamps instead: they differ when upscaling).
    size = float(image_size)

    def edges(start, length, extent):
        inset = tf.maximum(0.5 * length / size - 0.5, 0.0)
        scale = tf.maximum(extent - 1, 1.0)
        return (start + inset) / scale, (start + length - 1 - inset) / scale

    y1, y2 = edges(top, h, height)
    x1, x2 = edges(left, w, width)
    return tf.stack([y1, x1, y2, x2], axis=1)
