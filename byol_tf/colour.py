"""The colour stages of the BYOL views: jitter, grayscale, Gaussian blur, solarize, as batched ops.

`colour_and_finish` applies them to float crops in [0, 1] with per-image
random parameters drawn from stateless keys (`byol_tf.augment` makes the
crops and the keys). Each stage is an independent formula checked against
NumPy in tests/test_augment.py.
"""

import numpy as np
import tensorflow as tf

# ITU-R 601-2 luma, the weights torchvision and `tf.image.rgb_to_grayscale` use.
_LUMA = (0.2989, 0.587, 0.114)


def colour_and_finish(x, keys, config, view, rows=None):
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


def _gray(x):
    """Luma of `[..., 3]` images, keeping a channel axis of 1."""
    # A matmul: several times faster on CPU than multiply-and-reduce.
    return tf.tensordot(x, tf.constant(_LUMA, x.dtype)[:, None], axes=1)


def _adjust_hue(x, delta):
    """Shifts the hue of each image by its `delta` (a fraction of the colour circle)."""
    hsv = tf.image.rgb_to_hsv(x)
    hue = hsv[..., :1] + delta[:, None, None, None]
    # The fraction as x - floor(x): the same values as floormod(x, 1.0), 5-11% faster under XLA on AVX2.
    hue = hue - tf.floor(hue)
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
    # scattering the groups into a copy of the batch (BENCHMARKS.md, "Choices in the code").
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
    the hue shift's loops, so there the chain is split at the hue shift
    (about twice as fast: BENCHMARKS.md, "Choices in the code"). There is no
    randomness inside, so the output matches the plain ops to float32 rounding.
    """

    def compile_stages(start=0, stop=None):
        return tf.function(lambda x, o, a: _jitter_chain(x, o, a, hue_stage, start, stop), jit_compile=True)

    if hue_stage is None or hue_stage < 2:
        return compile_stages()
    before, rest = compile_stages(stop=hue_stage), compile_stages(start=hue_stage)
    return lambda x, o, a: rest(before(x, o, a), o, a)


# One chain per hue stage (None: no hue op), compiled once per batch size;
# `_on_subset` pads the subsets they get to keep those sizes few.
_SUBSET_PAD = 8
_JITTER_CHAINS = {stage: _compiled_chain(stage) for stage in (None, 0, 1, 2, 3)}


def _indices(mask):
    """The int32 positions of the True entries of a `[batch]` mask."""
    return tf.cast(tf.where(mask)[:, 0], tf.int32)


def _on_subset(fn, index, *tensors):
    """`fn` applied to the images at `index` (`[n]` positions) of `tensors` (None passes as None).

    The subset is padded with copies of image 0 to a multiple of
    `_SUBSET_PAD` images (computed, then dropped): XLA compiles once per
    shape, so this keeps it to a handful of sizes. Subsets of batches of at
    most `_SUBSET_PAD` images (such as `augment.finish_pair_on_host`'s chunks)
    are not padded: they have few sizes, and padding would multiply their work.
    """
    count = tf.shape(index)[0]
    batch = tensors[0].shape[0]
    pad = 1 if batch is not None and batch <= _SUBSET_PAD else _SUBSET_PAD
    padded = (count + pad - 1) // pad * pad
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
    It is `[batch, height, padded width * 3]`: XLA vectorises its loops along
    the last axis, which the 3 channels alone leave too short (1.4x on AVX2).
    """
    half = weights.shape[1] // 2
    padded = _reflect_pad(_reflect_pad(x, half, axis=2), half, axis=1)
    return _valid_taps(tf.reshape(padded, [-1, padded.shape[1], 3 * padded.shape[2]]), weights, axis=1)


def _valid_taps(padded, weights, axis):
    """Sum of `padded` shifted along `axis` (1: rows, 2: pixels), weighted by each image's `weights` `[batch, taps]`.

    `padded` is `[batch, height, width * 3]`, a pixel's channels side by
    side; `weights` are odd-length, symmetric kernels (`_blur_weights`). The
    output is `taps - 1` pixels shorter along `axis`.
    """
    taps, stride = weights.shape[1], 1 if axis == 1 else 3
    size = padded.shape[axis] - stride * (taps - 1)
    w = weights[:, :, None, None]
    window = lambda t: padded[:, t : t + size] if axis == 1 else padded[:, :, stride * t : stride * t + size]
    # The Gaussian is symmetric: mirrored taps share one product.
    half = taps // 2
    pairs = [w[:, t] * (window(t) + window(taps - 1 - t)) for t in range(half)]
    return tf.add_n(pairs + [w[:, half] * window(half)])


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
# the split stores the vertical pass once (BENCHMARKS.md, "Choices in the code").
_finish_xla = tf.function(
    lambda x, gray, threshold: _solarize_and_clip(_grayscale(x, gray), threshold), jit_compile=True
)
_gray_and_blur_height_xla = tf.function(
    lambda x, gray, w: _pad_and_blur_height(_grayscale(x, gray), w), jit_compile=True
)
_blur_width_and_finish_xla = tf.function(
    lambda x, w, threshold: _solarize_and_clip(_unflatten(_valid_taps(x, w, axis=2)), threshold), jit_compile=True
)


def _unflatten(x):
    """`[batch, height, width * 3]` back to `[batch, height, width, 3]`."""
    return tf.reshape(x, [-1, x.shape[1], x.shape[2] // 3, 3])


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
