"""The two asymmetric BYOL views as vectorised batch ops.

Every function works on a whole batch at once with per-image random
parameters, so it is cheap inside `tf.data` after `.batch()`: there are no
per-image loops, `map_fn` or keras-cv layers (which fall back to per-image
while-loops). Randomness is stateless: the same `seed` gives the same views,
eagerly, in `tf.function` and in `tf.data`.
"""

import math

import numpy as np
import tensorflow as tf

from byol_tf.config import AugmentConfig

# ITU-R 601-2 luma, the weights torchvision and `tf.image.rgb_to_grayscale` use.
_LUMA = (0.2989, 0.587, 0.114)
# torchvision's RandomResizedCrop makes 10 attempts before its fallback.
CROP_TRIES = 10


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
    return _colour_and_finish(crop_view(images, seed, config), _view_keys(seed), config, view)


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
    # Flipping is free here: a box with x1 > x2 samples the crop mirrored.
    y1, x1, y2, x2 = tf.unstack(window_boxes(top, left, h, w, height, width, config.image_size), axis=1)
    flip = tf.random.stateless_uniform(tf.stack([batch]), keys[2]) < config.flip_prob
    boxes = tf.stack([y1, tf.where(flip, x2, x1), y2, tf.where(flip, x1, x2)], axis=1)
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
    return _colour_and_finish(_unit_float(crops), _view_keys(seed), config, view, rows)


def finish_pair(crops1, crops2, seed, config: AugmentConfig, rows=None):
    """`finish_view` for both views, from the seeds `augment_pair` gives them."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    return finish_view(crops1, seeds[0], config, 0, rows), finish_view(crops2, seeds[1], config, 1, rows)


def crop_pair(images, seed, config: AugmentConfig):
    """The crops of `augment_pair` (same `seed`); `finish_pair` with that seed completes both views."""
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    images = _unit_float(images)
    return crop_view(images, seeds[0], config), crop_view(images, seeds[1], config)


def _check_view(view):
    if view not in (0, 1):
        raise ValueError(f"`view` must be 0 or 1. Received: view={view!r}")


def _view_keys(seed):
    # The RNG's output depends on the seed's dtype; fix it so int32 and int64 agree.
    return tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)


def _colour_and_finish(x, keys, config, view, rows=None):
    """Colour jitter, grayscale, blur and solarize of float views `x`, from `keys[3:]`.

    With `rows = (first, total)`, every draw is made for `total` images and
    rows `first .. first + batch` of it are used (see `finish_view`).
    """
    batch = tf.shape(x)[0]
    first, total = (0, batch) if rows is None else (tf.cast(rows[0], tf.int32), tf.cast(rows[1], tf.int32))
    mine = lambda t: t[first : first + batch]

    def draw(i, minval=0.0, maxval=1.0):
        return mine(tf.random.stateless_uniform(tf.stack([total]), keys[i], minval, maxval))

    def chance(i, prob):
        return draw(i) < prob

    if config.jitter_prob > 0:
        params = _jitter_params(total, keys[4], config)
        x = _color_jitter(
            x, chance(3, config.jitter_prob), None if params is None else tuple(map(mine, params)), config
        )
    gray = chance(5, config.grayscale_prob) if config.grayscale_prob > 0 else None
    solarize_prob = config.solarize_prob[view]
    # Images left alone get a threshold no pixel reaches.
    threshold = tf.where(chance(8, solarize_prob), config.solarize_threshold, 2.0) if solarize_prob > 0 else None
    blur_prob = config.blur_prob[view]
    if blur_prob <= 0:
        return _finish(x, gray, None, threshold)
    weights = _blur_weights(draw(6, minval=config.blur_sigma[0], maxval=config.blur_sigma[1]), config)
    if blur_prob >= 1:
        return _finish(x, gray, weights, threshold)
    # Blur only the chosen images: at p=0.1 that skips 90% of the work.
    picked = _indices(chance(7, blur_prob))
    blurred = _on_subset(_finish, picked, x, gray, weights, threshold)
    return tf.tensor_scatter_nd_update(_finish(x, gray, None, threshold), picked[:, None], blurred)


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


def window_boxes(top, left, h, w, height, width, image_size):
    """Pixel windows as normalised `crop_and_resize` boxes `[n, 4]`."""
    # crop_and_resize puts the box edges on pixel centres (align-corners).
    # Shrinking them by half an output pixel samples like tf.image.resize
    # (half-pixel centres) when downscaling; when upscaling that would reach
    # past the crop, so keep the edges on its outer pixels, as resize clamps.
    size = float(image_size)

    def edges(start, length, extent):
        inset = tf.maximum(0.5 * length / size - 0.5, 0.0)
        scale = tf.maximum(extent - 1, 1.0)
        return (start + inset) / scale, (start + length - 1 - inset) / scale

    y1, y2 = edges(top, h, height)
    x1, x2 = edges(left, w, width)
    return tf.stack([y1, x1, y2, x2], axis=1)


def _gray(x):
    """Luma of `[..., 3]` images, keeping a channel axis of 1."""
    # A matmul: several times faster on CPU than multiply-and-reduce.
    return tf.tensordot(x, tf.constant(_LUMA, x.dtype)[:, None], axes=1)


def _adjust_hue(x, delta):
    """Shifts the hue of each image by its `delta` (a fraction of the colour circle)."""
    hsv = tf.image.rgb_to_hsv(x)
    hue = tf.math.floormod(hsv[..., :1] + delta[:, None, None, None], 1.0)
    return tf.clip_by_value(tf.image.hsv_to_rgb(tf.concat([hue, hsv[..., 1:]], -1)), 0.0, 1.0)


def _jitter_params(batch, key, config):
    """Each image's jitter op and amount at every stage, `[batch, stages]` each, or None.

    Each image draws a permutation of the ops (argsort of uniforms); factors
    are 1 +- strength (amounts are the +- part), the hue shift is +- hue of
    the circle. Ops of strength 0 are identities and are left out.
    """
    strengths = (config.brightness, config.contrast, config.saturation, config.hue)
    ops = [i for i, strength in enumerate(strengths) if strength > 0]
    if not ops:
        return None
    factor_key, order_key = tf.unstack(tf.random.experimental.stateless_split(key, num=2))
    shape = tf.stack([batch, len(ops)])
    amounts = tf.random.stateless_uniform(shape, factor_key, -1.0, 1.0) * [strengths[i] for i in ops]
    order = tf.argsort(tf.random.stateless_uniform(shape, order_key), axis=1)
    return tf.gather(ops, order), tf.gather(amounts, order, batch_dims=1)


def _color_jitter(x, apply, params, config):
    """torchvision's ColorJitter on the images in `apply`, ops in a random order per image.

    Brightness, contrast and saturation are each a blend `f * x + (1 - f) *
    target` with a per-image factor and target (black, the mean grey, the
    grey image). The images are grouped by the stage of their hue shift, and
    each group runs its whole chain (blends, and the hue shift at its stage)
    as one XLA call, which fuses it; images left alone are not touched.
    `params` are `_jitter_params`' draws for these images (None: no op).
    """
    if params is None:
        return x
    stage_ops, stage_amounts = params
    if config.hue > 0:
        hue_stage = tf.argmax(tf.cast(stage_ops == 3, tf.int32), axis=1, output_type=tf.int32)
        groups = [(stage, apply & (hue_stage == stage)) for stage in range(stage_ops.shape[1])]
    else:
        groups = [(None, apply)]
    left = _indices(~apply)
    picked, results = [left], [tf.gather(x, left)]
    for stage, members in groups:
        chosen = _indices(members)
        results.append(_on_subset(_JITTER_CHAINS[stage], chosen, x, stage_ops, stage_amounts))
        picked.append(chosen)
    # Every image is written once, from its group or as it was: faster than
    # scattering the groups into a copy of the batch (23-27 vs 27-33 ms at 96 px).
    return tf.dynamic_stitch(picked, results)


def _jitter_chain(x, stage_ops, stage_amounts, hue_stage, start=0, stop=None):
    """One group's jitter stages `start:stop`: a blend at each but `hue_stage`, where the hue shifts."""
    for stage in range(stage_ops.shape[1])[start:stop]:
        if stage == hue_stage:
            x = _adjust_hue(x, stage_amounts[:, stage])
        else:
            x = _blend(x, stage_ops[:, stage], stage_amounts[:, stage])
    return x


def _compiled_chain(hue_stage):
    """The jitter chain of one hue stage as XLA calls: one, or two when the hue shift comes late.

    XLA fuses the HSV round trip and the blends into a few loops. When two
    or more blends come before the hue shift, it also recomputes them inside
    the hue shift's loops, so there the chain is split at the hue shift: for
    32 images of 96 px, 4.4-4.6 ms instead of 8.7-9.5 (one blend before it:
    4.2 ms in one call, 4.4 split). There is no randomness inside, so the
    output matches the plain ops to float32 rounding.
    """

    def compile_stages(start=0, stop=None):
        return tf.function(lambda x, o, a: _jitter_chain(x, o, a, hue_stage, start, stop), jit_compile=True)

    if hue_stage is None or hue_stage < 2:
        return compile_stages()
    before, rest = compile_stages(stop=hue_stage), compile_stages(start=hue_stage)
    return lambda x, o, a: rest(before(x, o, a), o, a)


# One chain per hue stage (None: no hue op). XLA compiles once per batch
# size (about 0.3 s each), so the subsets the chains get are padded
# (`_on_subset`): to 8, as padding to 16 computed about 15% more images for
# the same time per batch once compiled.
_SUBSET_PAD = 8
_JITTER_CHAINS = {stage: _compiled_chain(stage) for stage in (None, 0, 1, 2, 3)}


def _indices(mask):
    """The int32 positions of the True entries of a `[batch]` mask."""
    return tf.cast(tf.where(mask)[:, 0], tf.int32)


def _on_subset(fn, index, *tensors):
    """`fn` applied to the images at `index` (`[n]` positions) of `tensors` (None passes as None).

    The subset is padded with copies of image 0 to a multiple of
    `_SUBSET_PAD` images (computed, then dropped): XLA compiles once per
    shape, so this keeps it to a handful of sizes.
    """
    count = tf.shape(index)[0]
    padded = (count + _SUBSET_PAD - 1) // _SUBSET_PAD * _SUBSET_PAD
    index = tf.pad(index, [[0, padded - count]])
    return fn(*[None if t is None else tf.gather(t, index) for t in tensors])[:count]


def _blend(x, op, amount):
    """One jitter stage's brightness, contrast or saturation: `f * x + (1 - f) * target`.

    `op` (`[batch]`, 0-3) picks each image's op; op 3 (hue) and an `amount` of
    0 leave the image as it is.
    """
    gray = _gray(x)
    mean = tf.reduce_mean(gray, axis=[1, 2, 3], keepdims=True)
    is_op = lambda i: tf.cast(op == i, x.dtype)[:, None, None, None]
    target = is_op(1) * mean + is_op(2) * gray
    factor = 1.0 + tf.where(op == 3, 0.0, amount)[:, None, None, None]
    return tf.clip_by_value(factor * x + (1.0 - factor) * target, 0.0, 1.0)


def _blur_weights(sigma, config):
    """Per-image normalised 1-D Gaussian kernels `[batch, taps]` for the view size.

    The blur is separable, with reflect padding (`_pad_and_blur_height`, `_valid_taps`).
    """
    size = config.image_size
    kernel = max(3, int(config.blur_kernel_fraction * size))
    kernel = min(kernel + 1 - kernel % 2, 2 * size - 1)
    taps = np.arange(kernel) - kernel // 2
    weights = tf.exp(-0.5 * (tf.constant(taps, tf.float32) / sigma[:, None]) ** 2)
    return weights / tf.reduce_sum(weights, axis=1, keepdims=True)


def _grayscale(x, gray):
    """Turns the images picked by `gray` (`[batch]` bools, or None) grey."""
    if gray is None:
        return x
    mask = tf.cast(gray, x.dtype)[:, None, None, None]
    # Arithmetic, not a select: 1 * a + 0 * b is exact for finite values.
    return mask * _gray(x) + (1.0 - mask) * x


def _solarize_and_clip(x, threshold):
    """Inverts pixels at or above each image's `threshold` (or None), then clips to [0, 1]."""
    if threshold is not None:
        x = tf.where(x >= threshold[:, None, None, None], 1.0 - x, x)
    return tf.clip_by_value(x, 0.0, 1.0)


def _pad_and_blur_height(x, weights):
    """Reflect-pads both axes by the kernel's half width and blurs along the height.

    The result keeps the width's padding for the second, horizontal pass
    (`_valid_taps(..., axis=2)`); blurring a column commutes with copying it.
    """
    half = weights.shape[1] // 2
    padded = _reflect_pad(_reflect_pad(x, half, axis=2), half, axis=1)
    return _valid_taps(padded, weights, axis=1)


def _valid_taps(padded, weights, axis):
    """Sum of `padded` shifted along `axis` (1 or 2), weighted by each image's `weights` `[batch, taps]`.

    The output is `taps - 1` pixels shorter than `padded` along `axis`.
    """
    taps = weights.shape[1]
    size = padded.shape[axis] - taps + 1
    w = weights[:, :, None, None, None]
    window = lambda t: padded[:, t : t + size] if axis == 1 else padded[:, :, t : t + size]
    return tf.add_n([w[:, t] * window(t) for t in range(taps)])


def _reflect_pad(x, half, axis):
    """Pads `half` pixels on both sides of `axis`, reflected without repeating the edge.

    torchvision's "reflect" padding, built from two reversed edge strips
    rather than `tf.pad`: XLA's mirror pad rejects empty batches.
    """
    size = x.shape[axis]
    before = tf.reverse(tf.gather(x, tf.range(1, half + 1), axis=axis), [axis])
    after = tf.reverse(tf.gather(x, tf.range(size - 1 - half, size - 1), axis=axis), [axis])
    return tf.concat([before, x, after], axis=axis)


# The finish as XLA calls. With a blur it takes two: in one call XLA fuses
# the horizontal pass with the vertical one and computes that twice, so
# the split, which stores the vertical pass once, is faster: for 128 images
# on one thread 14 vs 22-27 ms at 96 px and 164 ms at 224 px, where the
# batched-matmul blur this replaced took 467 ms.
_finish_xla = tf.function(
    lambda x, gray, threshold: _solarize_and_clip(_grayscale(x, gray), threshold), jit_compile=True
)
_gray_and_blur_height_xla = tf.function(
    lambda x, gray, w: _pad_and_blur_height(_grayscale(x, gray), w), jit_compile=True
)
_blur_width_and_finish_xla = tf.function(
    lambda x, w, threshold: _solarize_and_clip(_valid_taps(x, w, axis=2), threshold), jit_compile=True
)


def _finish(x, gray, weights, threshold):
    """The view's last stages in torchvision's order, then the final clip, as XLA calls.

    Args:
        x: `[batch, h, w, 3]` images in [0, 1].
        gray: `[batch]` bools, the images to turn grey, or None.
        weights: `[batch, taps]` blur kernels for every image, or None.
        threshold: `[batch]` solarize thresholds (> 1: left alone), or None.
    """
    if weights is None:
        return _finish_xla(x, gray, threshold)
    return _blur_width_and_finish_xla(_gray_and_blur_height_xla(x, gray, weights), weights, threshold)
