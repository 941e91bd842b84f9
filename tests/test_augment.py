import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from byol_tf import augment, colour
from byol_tf.augment import augment_pair, augment_view, preprocess_eval
from byol_tf.config import AugmentConfig
from byol_tf.presets import get_preset

SIZE = 32
BASE = AugmentConfig(image_size=SIZE)
# Every op off, and a crop that is the whole image; tests switch on what they measure.
PLAIN = dataclasses.replace(
    BASE,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_prob=0.0,
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=(0.0, 0.0),
    solarize_prob=(0.0, 0.0),
)


def _seed(value):
    return tf.constant([value, 7], tf.int64)


def _images(n, height=SIZE, width=SIZE, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, size=(n, height, width, 3), dtype=np.uint8)


def _ramps(n, size):
    """Channel 0 ramps 0..1 left to right, channel 1 top to bottom."""
    ramp = np.linspace(0.0, 1.0, size, dtype=np.float32)
    image = np.stack(np.broadcast_arrays(ramp[None, :], ramp[:, None], np.float32(0.5)), -1)
    return np.repeat(image[None], n, axis=0)


@pytest.mark.parametrize("view", [0, 1])
@pytest.mark.parametrize("shape", [(SIZE, SIZE), (40, 48)])
def test_shape_dtype_range_and_input_dtypes(view, shape):
    images = _images(6, *shape)
    out = augment_view(images, _seed(1), BASE, view)
    assert out.shape == (6, SIZE, SIZE, 3) and out.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(out)) and float(tf.reduce_max(out)) <= 1.0
    # Float inputs are read as 0..1, so they give the same view as uint8 / 255.
    out_float = augment_view(images.astype(np.float32) / 255.0, _seed(1), BASE, view)
    np.testing.assert_allclose(out_float, out, atol=1e-5)


@pytest.mark.parametrize("view", [0, 1])
def test_empty_batch_gives_empty_views(view):
    # Every stage, the XLA ones included, takes a batch of 0 images.
    out = augment_view(_images(0, 40, 40), _seed(1), dataclasses.replace(BASE, blur_prob=(1.0, 0.5)), view)
    assert out.shape == (0, SIZE, SIZE, 3)


def test_view_must_be_0_or_1():
    with pytest.raises(ValueError, match="view"):
        augment_view(_images(2), _seed(0), BASE, 2)


@pytest.mark.parametrize("view", [0, 1])
def test_parameters_differ_per_image(view):
    images = np.repeat(_images(1), 8, axis=0)
    out = augment_view(images, _seed(3), BASE, view).numpy().reshape(8, -1)
    gaps = np.abs(out[:, None] - out[None]).max(-1)
    assert np.all(gaps[~np.eye(8, dtype=bool)] > 1e-3)


def test_seeds_are_deterministic():
    images = _images(4)
    first, second = augment_pair(images, _seed(5), BASE)
    again, _ = augment_pair(images, _seed(5), BASE)
    np.testing.assert_array_equal(first, again)
    same_int32, _ = augment_pair(images, tf.constant([5, 7], tf.int32), BASE)
    np.testing.assert_array_equal(first, same_int32)
    other, _ = augment_pair(images, _seed(6), BASE)
    assert np.abs(first - other).max() > 0.1
    assert np.abs(first - second).max() > 0.1


def _detect(op, view, n):
    """Returns (configured rate, per-image booleans saying the op was applied)."""
    if op == "grayscale":
        config = dataclasses.replace(PLAIN, grayscale_prob=BASE.grayscale_prob)
        out = augment_view(_images(n), _seed(11), config, view).numpy()
        return config.grayscale_prob, np.ptp(out, axis=-1).max(axis=(1, 2)) < 1e-6
    if op == "solarize":
        # Threshold 0 inverts every pixel of a solarized image.
        config = dataclasses.replace(PLAIN, solarize_prob=BASE.solarize_prob, solarize_threshold=0.0)
        out = augment_view(np.full((n, SIZE, SIZE, 3), 0.25, np.float32), _seed(12), config, view)
        return config.solarize_prob[view], out.numpy().mean(axis=(1, 2, 3)) > 0.5
    if op == "blur":
        # Blur flattens a checkerboard; sigma >= 1 keeps that unmistakable.
        config = dataclasses.replace(PLAIN, blur_prob=BASE.blur_prob, blur_sigma=(1.0, 2.0))
        board = (np.indices((SIZE, SIZE)).sum(0) % 2).astype(np.float32)
        images = np.repeat(np.repeat(board[None, :, :, None], n, 0), 3, -1)
        out = augment_view(images, _seed(13), config, view).numpy()
        return config.blur_prob[view], np.abs(np.diff(out, axis=2)).mean(axis=(1, 2, 3)) < 0.5
    if op == "flip":
        config = dataclasses.replace(PLAIN, flip_prob=BASE.flip_prob)
        out = augment_view(_ramps(n, SIZE), _seed(14), config, view).numpy()
        return config.flip_prob, out[:, 0, 0, 0] > out[:, 0, -1, 0]
    config = dataclasses.replace(PLAIN, jitter_prob=BASE.jitter_prob)
    images = _images(n)
    out = augment_view(images, _seed(15), config, view).numpy()
    return config.jitter_prob, np.abs(out - images / 255.0).max(axis=(1, 2, 3)) > 1e-4


@pytest.mark.parametrize("view", [0, 1])
@pytest.mark.parametrize("op", ["grayscale", "solarize", "blur", "flip", "jitter"])
def test_rates_match_config(op, view):
    n = 400
    prob, applied = _detect(op, view, n)
    bound = 5 * np.sqrt(prob * (1 - prob) / n)
    assert abs(applied.mean() - prob) <= bound, (applied.mean(), prob)


def test_jitter_off_gives_the_plain_crop():
    config = dataclasses.replace(BASE, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0))
    images = _images(8)
    off = augment_view(images, _seed(2), dataclasses.replace(config, jitter_prob=0.0), 1)
    # Same crops and flips (same seed); jitter always on but with identity strengths.
    identity = dataclasses.replace(config, jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0, hue=0.0)
    np.testing.assert_array_equal(off, augment_view(images, _seed(2), identity, 1))
    on = augment_view(images, _seed(2), dataclasses.replace(config, jitter_prob=1.0), 1)
    assert np.all(np.abs(on.numpy() - off.numpy()).max(axis=(1, 2, 3)) > 1e-3)


def test_brightness_is_one_factor_per_image_in_range():
    config = dataclasses.replace(PLAIN, jitter_prob=1.0, contrast=0.0, saturation=0.0, hue=0.0)
    images = np.random.default_rng(0).uniform(0.2, 0.6, (16, SIZE, SIZE, 3)).astype(np.float32)
    ratio = augment_view(images, _seed(4), config, 0).numpy() / images
    factor = ratio.mean(axis=(1, 2, 3))
    np.testing.assert_allclose(ratio, np.broadcast_to(factor[:, None, None, None], ratio.shape), rtol=1e-5)
    assert np.all((factor >= 0.6 - 1e-6) & (factor <= 1.4 + 1e-6)) and np.ptp(factor) > 0.1


def test_hue_is_one_shift_per_image_in_range():
    config = dataclasses.replace(PLAIN, jitter_prob=1.0, brightness=0.0, contrast=0.0, saturation=0.0)
    images = np.random.default_rng(2).uniform(size=(16, SIZE, SIZE, 3)).astype(np.float32)
    before = tf.image.rgb_to_hsv(images).numpy()
    after = tf.image.rgb_to_hsv(augment_view(images, _seed(5), config, 0)).numpy()
    np.testing.assert_allclose(after[..., 2], before[..., 2], atol=1e-5)  # value is kept
    shift = (after[..., 0] - before[..., 0] + 0.5) % 1.0 - 0.5
    colourful = before[..., 1] > 0.3  # hue is ill-defined for greys
    per_image = np.array([np.median(s[c]) for s, c in zip(shift, colourful)])
    assert np.all(np.abs(shift - per_image[:, None, None])[colourful] < 1e-3)
    assert np.all(np.abs(per_image) <= config.hue + 1e-6) and np.ptp(per_image) > 0.02


# 64 px: a 7-tap kernel (int(0.1 * 64) = 6, made odd); 128 px: 13 taps.
@pytest.mark.parametrize("size, kernel_size", [(64, 7), (128, 13)])
def test_blur_matches_reference(size, kernel_size):
    sigma = 1.5
    config = dataclasses.replace(PLAIN, image_size=size, blur_prob=(1.0, 1.0), blur_sigma=(sigma, sigma))
    image = np.random.default_rng(1).uniform(size=(1, size, size, 3)).astype(np.float32)
    out = augment_view(image, _seed(0), config, 0).numpy()[0]
    half = kernel_size // 2
    taps = np.arange(kernel_size) - half
    kernel = np.exp(-0.5 * (taps / sigma) ** 2)
    kernel /= kernel.sum()
    padded = np.pad(image[0], ((half, half), (half, half), (0, 0)), mode="reflect")
    rows = sum(k * padded[i : i + size] for i, k in enumerate(kernel))
    expected = sum(k * rows[:, i : i + size] for i, k in enumerate(kernel))
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_full_crop_is_a_resize():
    images = _images(3)
    np.testing.assert_allclose(augment_view(images, _seed(0), PLAIN, 0), images / 255.0, atol=1e-6)
    # Halving with half-pixel centres samples between each 2x2 block: its mean.
    # crop_and_resize takes the box in normalised float32 coordinates: sample
    # positions off by up to ~64 * 2**-24 px, times steps between pixels up to 1.
    large = _images(3, 64, 64)
    expected = (large / 255.0).reshape(3, SIZE, 2, SIZE, 2, 3).mean(axis=(2, 4))
    np.testing.assert_allclose(augment_view(large, _seed(0), PLAIN, 0), expected, atol=1e-5)
    # A 1:1 crop covering all of a 40x48 image cannot exist: torchvision falls
    # back to the centre crop with the ratio clamped, here 40x40.
    wide = _images(3, 40, 48)
    expected = _np_bilinear(wide[:, :, 4:44] / 255.0, SIZE)
    np.testing.assert_allclose(augment_view(wide, _seed(0), PLAIN, 0), expected, atol=1e-5)


def _np_bilinear(images, size):
    """Bilinear resize without antialiasing, half-pixel centres, edges clamped (float64)."""

    def weights(extent):
        src = np.clip((np.arange(size) + 0.5) * extent / size - 0.5, 0, extent - 1)
        lo = np.floor(src).astype(int)
        hi = np.minimum(lo + 1, extent - 1)
        matrix = np.zeros((size, extent))
        np.add.at(matrix, (np.arange(size), lo), 1 - (src - lo))
        np.add.at(matrix, (np.arange(size), hi), src - lo)
        return matrix

    rows, cols = weights(images.shape[1]), weights(images.shape[2])
    return np.einsum("ih,jw,bhwc->bijc", rows, cols, images)


@pytest.mark.parametrize("ratio, span", [(1.0, (31, 31)), (2.0, (45 - 45 / 32, 22))])
def test_crop_scale_and_ratio(ratio, span):
    # A quarter of a 64x64 image: at ratio 1 a 32x32 crop, at ratio 2 a 45x23 one
    # (sampled at pixel centres: its 45 columns shrink to 32, its 23 rows stretch).
    config = dataclasses.replace(PLAIN, crop_scale=(0.25, 0.25), crop_ratio=(ratio, ratio))
    out = augment_view(_ramps(16, 64), _seed(8), config, 0).numpy()
    np.testing.assert_allclose(np.ptp(out[..., 0], axis=(1, 2)), span[0] / 63, atol=1e-5)
    np.testing.assert_allclose(np.ptp(out[..., 1], axis=(1, 2)), span[1] / 63, atol=1e-5)
    assert len(np.unique(out[:, 0, 0, 0].round(4))) > 4  # the crops move around


def test_tf_function_with_unknown_batch():
    spec = [tf.TensorSpec([None, SIZE, SIZE, 3], tf.uint8), tf.TensorSpec([2], tf.int64)]
    fn = tf.function(lambda x, s: augment_pair(x, s, BASE), input_signature=spec)
    for n in (5, 3):
        images = _images(n, seed=n)
        for graph, eager in zip(fn(images, _seed(9)), augment_pair(images, _seed(9), BASE)):
            assert graph.shape == (n, SIZE, SIZE, 3)
            np.testing.assert_allclose(graph, eager, atol=1e-5)


def test_tf_data_pipeline():
    images = _images(10)
    dataset = (
        tf.data.Dataset.from_tensor_slices(images)
        .batch(4)
        .enumerate()
        .map(lambda i, x: augment_pair(x, tf.stack([i, 0]), BASE), num_parallel_calls=tf.data.AUTOTUNE)
    )
    batches = list(dataset)
    assert [v1.shape[0] for v1, _ in batches] == [4, 4, 2]
    for i, (v1, v2) in enumerate(batches):
        eager = augment_pair(images[4 * i : 4 * i + 4], tf.constant([i, 0], tf.int64), BASE)
        np.testing.assert_allclose(v1, eager[0], atol=1e-5)
        np.testing.assert_allclose(v2, eager[1], atol=1e-5)


def _pil_resize(image, width, height):
    """PIL's antialiased bilinear resize of each channel, in float (the reference torchvision uses)."""
    return np.stack(
        [
            np.asarray(
                Image.fromarray(image[..., c].astype(np.float32), mode="F").resize((width, height), Image.BILINEAR)
            )
            for c in range(image.shape[-1])
        ],
        -1,
    )


@pytest.mark.parametrize(
    "shape, size, fraction, resized, top_left",
    [
        # torchvision Resize(side) + CenterCrop(size), worked out by hand:
        # side = floor(24 / 0.875) = 27; long side int(27 * 48 / 40) = 32; crop at round(3/2)=2, round(8/2)=4.
        ((40, 48), 24, 0.875, (27, 32), (2, 4)),
        # side 16; long int(16 * 50 / 30) = 26; crop at round(10/2) = 5, 0.
        ((50, 30), 16, 1.0, (26, 16), (5, 0)),
        # Upscaling: side 40; long int(40 * 50 / 30) = 66; crop at 13, 0.
        ((50, 30), 40, 1.0, (66, 40), (13, 0)),
    ],
)
def test_preprocess_eval_is_torchvision_resize_and_centre_crop(shape, size, fraction, resized, top_left):
    image = np.random.default_rng(0).integers(0, 256, (*shape, 3), dtype=np.uint8)
    (h, w), (top, left) = resized, top_left
    expected = _pil_resize(image, w, h)[top : top + size, left : left + size] / 255.0
    out = preprocess_eval(image, size, fraction)
    assert out.shape == (size, size, 3) and out.dtype == tf.float32
    # TF's antialiased bilinear is PIL's triangle filter: float32 rounding apart.
    np.testing.assert_allclose(out, expected, atol=1e-5)
    batch = preprocess_eval(np.stack([image, image[::-1]]), size, fraction)
    np.testing.assert_allclose(batch[0], out, atol=1e-6)
    # float input in [0, 1] gives the same as uint8.
    np.testing.assert_allclose(preprocess_eval(image.astype(np.float32) / 255.0, size, fraction), out, atol=1e-6)


def test_preprocess_eval_rejects_a_bad_crop_fraction():
    with pytest.raises(ValueError, match="crop_fraction=1.5"):
        preprocess_eval(np.zeros((8, 8, 3), np.uint8), 8, 1.5)


# NumPy references for the jitter and finish ops, written out from torchvision's
# definitions (torchvision/transforms/_functional_tensor.py), in float64, on
# `[h, w, 3]` images in [0, 1]. Independent of `byol_tf.augment`'s helpers.


def _np_gray(img):
    """rgb_to_grayscale: ITU-R 601-2 luma, one channel."""
    return 0.2989 * img[..., 0:1] + 0.587 * img[..., 1:2] + 0.114 * img[..., 2:3]


def _np_blend(img1, img2, ratio):
    return np.clip(ratio * img1 + (1.0 - ratio) * img2, 0.0, 1.0)


def _np_brightness(img, factor):
    return _np_blend(img, np.zeros_like(img), factor)


def _np_contrast(img, factor):
    return _np_blend(img, np.mean(_np_gray(img)), factor)


def _np_saturation(img, factor):
    return _np_blend(img, _np_gray(img), factor)


def _np_rgb2hsv(img):
    r, g, b = img[..., 0], img[..., 1], img[..., 2]
    maxc, minc = img.max(-1), img.min(-1)
    eqc = maxc == minc
    cr = maxc - minc
    s = cr / np.where(eqc, 1.0, maxc)
    divisor = np.where(eqc, 1.0, cr)
    rc, gc, bc = (maxc - r) / divisor, (maxc - g) / divisor, (maxc - b) / divisor
    hr = (maxc == r) * (bc - gc)
    hg = ((maxc == g) & (maxc != r)) * (2.0 + rc - bc)
    hb = ((maxc != g) & (maxc != r)) * (4.0 + gc - rc)
    h = np.fmod((hr + hg + hb) / 6.0 + 1.0, 1.0)
    return h, s, maxc


def _np_hsv2rgb(h, s, v):
    i = np.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.astype(int) % 6
    p = np.clip(v * (1.0 - s), 0.0, 1.0)
    q = np.clip(v * (1.0 - s * f), 0.0, 1.0)
    t = np.clip(v * (1.0 - s * (1.0 - f)), 0.0, 1.0)
    table = [(v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q)]
    return np.stack([np.choose(i, [row[c] for row in table]) for c in range(3)], axis=-1)


def _np_hue(img, shift):
    h, s, v = _np_rgb2hsv(img)
    return _np_hsv2rgb((h + shift) % 1.0, s, v)


def _np_jitter_op(img, op, amount):
    """Op 0-2 (brightness, contrast, saturation) with factor 1 + amount; op 3 shifts the hue by amount."""
    if op == 3:
        return _np_hue(img, amount)
    return (_np_brightness, _np_contrast, _np_saturation)[op](img, 1.0 + amount)


def _np_gaussian_kernel(size, sigma):
    """torchvision's _get_gaussian_kernel1d."""
    x = np.linspace(-(size // 2), size // 2, size)
    pdf = np.exp(-0.5 * (x / sigma) ** 2)
    return pdf / pdf.sum()


def _np_blur(img, kernel):
    """Separable blur with reflect padding, as torchvision's gaussian_blur."""
    half = len(kernel) // 2
    padded = np.pad(img, ((half, half), (half, half), (0, 0)), mode="reflect")
    h, w = img.shape[:2]
    rows = sum(k * padded[i : i + h] for i, k in enumerate(kernel))
    return sum(k * rows[:, i : i + w] for i, k in enumerate(kernel))


def _np_solarize(img, threshold):
    return np.where(img >= threshold, 1.0 - img, img)


def _np_finish(img, gray, kernel, threshold):
    """torchvision's order: grayscale (3 equal channels), blur, solarize; then the clip."""
    if gray:
        img = np.repeat(_np_gray(img), 3, axis=-1)
    if kernel is not None:
        img = _np_blur(img, kernel)
    if threshold is not None:
        img = _np_solarize(img, threshold)
    return np.clip(img, 0.0, 1.0)


def test_numpy_references_know_their_answers():
    # The references on values worked out by hand, so they are not wrong together with the code.
    px = np.array([[[0.2, 0.4, 0.8]]])
    np.testing.assert_allclose(_np_gray(px), [[[0.2989 * 0.2 + 0.587 * 0.4 + 0.114 * 0.8]]])
    np.testing.assert_allclose(_np_brightness(px, 1.5), [[[0.3, 0.6, 1.0]]])  # 1.2 clips
    h, s, v = _np_rgb2hsv(px)
    # max is blue: h = (4 + (g' - r')) / 6 with g' = (0.8-0.4)/0.6, r' = (0.8-0.2)/0.6: 220 degrees.
    np.testing.assert_allclose([h[0, 0], s[0, 0], v[0, 0]], [220 / 360, 0.75, 0.8])
    np.testing.assert_allclose(_np_hue(px, 1 / 3), [[[0.8, 0.2, 0.4]]])  # 220 + 120 = 340 degrees
    np.testing.assert_allclose(_np_hue(px, 0.0), px)
    two = np.array([[[0.0, 0.0, 0.0]], [[1.0, 1.0, 1.0]]])  # mean grey 0.5 (0.2989+0.587+0.114 = 0.9999)
    np.testing.assert_allclose(_np_contrast(two, 0.5), [[[0.249975] * 3], [[0.749975] * 3]])
    np.testing.assert_allclose(_np_solarize(np.array([0.3, 0.5, 0.9]), 0.5), [0.3, 0.5, 0.1])
    np.testing.assert_allclose(
        _np_gaussian_kernel(3, 1.0), np.array([np.exp(-0.5), 1, np.exp(-0.5)]) / (1 + 2 * np.exp(-0.5))
    )
    # Reflect padding without the edge: a ramp 0,1,2 blurred by [1,1,1]/3 gives 2/3, 1, 4/3.
    ramp = np.broadcast_to(np.arange(3.0)[None, :, None], (3, 3, 3))
    np.testing.assert_allclose(_np_blur(ramp, np.ones(3) / 3)[0, :, 0], [2 / 3, 1, 4 / 3])


def _chain_inputs(rng, batch, stages, ops, amounts):
    x = rng.random((batch, 12, 12, 3)).astype(np.float32)
    return x, np.asarray(ops, np.int32).reshape(batch, stages), np.asarray(amounts, np.float32).reshape(batch, stages)


# float32 arithmetic on values in [0, 1] against float64: a few float32 ulps of 1.
JITTER_ATOL = 2e-6


@pytest.mark.parametrize("op", [0, 1, 2, 3], ids=["brightness", "contrast", "saturation", "hue"])
def test_each_jitter_op_matches_torchvision(op):
    # One op per image through the XLA chain: the other stages are hue slots
    # (op 3) with amount 0, which leave the image alone.
    rng = np.random.default_rng(op)
    amounts = [-0.5, -0.4, -0.1, 0.0, 0.1, 0.25, 0.4, 0.5] if op == 3 else [-0.4, -0.2, -0.05, 0.0, 0.1, 0.3, 0.4, 0.8]
    batch = len(amounts)
    if op == 3:
        stage, ops, stage_amounts = 0, [[3, 3, 3, 3]] * batch, [[a, 0.0, 0.0, 0.0] for a in amounts]
    else:
        stage, ops, stage_amounts = None, [[op, 3, 3]] * batch, [[a, 0.0, 0.0] for a in amounts]
    x, ops, stage_amounts = _chain_inputs(rng, batch, len(ops[0]), ops, stage_amounts)
    got = colour._JITTER_CHAINS[stage](tf.constant(x), tf.constant(ops), tf.constant(stage_amounts)).numpy()
    expected = np.stack([_np_jitter_op(img.astype(np.float64), op, a) for img, a in zip(x, amounts)])
    np.testing.assert_allclose(got, expected, atol=JITTER_ATOL)
    # Amount 0 is the identity, and the others change the image.
    changed = np.abs(got - x).max(axis=(1, 2, 3)) > 1e-3
    np.testing.assert_array_equal(changed, np.asarray(amounts) != 0)


@pytest.mark.parametrize("batch", [0, 1, 7])
@pytest.mark.parametrize("hue_stage", [None, 0, 1, 2, 3])
def test_xla_jitter_chain_matches_torchvision(batch, hue_stage):
    # The fast path (one or two XLA calls per group), for subset sizes the
    # jitter hands it (the empty one included), against the NumPy ops in each
    # image's order.
    rng = np.random.default_rng(batch)
    # Each image's blend ops in a random order, with the hue shift (op 3) at `hue_stage`.
    rows = [list(rng.permutation(3)) for _ in range(batch)]
    if hue_stage is not None:
        rows = [row[:hue_stage] + [3] + row[hue_stage:] for row in rows]
    stages = 3 if hue_stage is None else 4
    x, ops, amounts = _chain_inputs(rng, batch, stages, rows, rng.uniform(-0.4, 0.4, (batch, stages)))
    fast = colour._JITTER_CHAINS[hue_stage](tf.constant(x), tf.constant(ops), tf.constant(amounts)).numpy()
    assert fast.shape == x.shape
    for img, row, amount, got in zip(x, ops, amounts, fast):
        expected = img.astype(np.float64)
        for op, a in zip(row, amount):
            expected = _np_jitter_op(expected, op, a)
        np.testing.assert_allclose(got, expected, atol=JITTER_ATOL)


def test_grouped_jitter_matches_torchvision_per_image():
    # `_color_jitter` groups the images by the stage of their hue shift; each
    # image must get its own four ops in its own order, and the images left
    # out none. The random draws come from `_jitter_params` (checked for
    # their contract here); the maths from the NumPy references.
    config = get_preset("imagenet").augment
    rng = np.random.default_rng(0)
    x = rng.random((40, 12, 12, 3)).astype(np.float32)
    apply = rng.random(40) < 0.8
    key = tf.constant([3, 4], tf.int64)
    ops, amounts = [t.numpy() for t in colour._jitter_params(40, key, config)]
    strengths = np.array([config.brightness, config.contrast, config.saturation, config.hue])
    np.testing.assert_array_equal(np.sort(ops, axis=1), np.tile(np.arange(4), (40, 1)))
    assert np.all(np.abs(amounts) <= strengths[ops] + 1e-7)
    assert len({tuple(row) for row in ops}) > 10  # the orders vary
    got = colour._color_jitter(
        tf.constant(x), tf.constant(apply), colour._jitter_params(40, key, config), config
    ).numpy()
    for img, on, row, amount, out in zip(x, apply, ops, amounts, got):
        if not on:
            np.testing.assert_array_equal(out, img)
            continue
        expected = img.astype(np.float64)
        for op, a in zip(row, amount):
            expected = _np_jitter_op(expected, op, a)
        np.testing.assert_allclose(out, expected, atol=JITTER_ATOL)


@pytest.mark.parametrize("batch", [0, 1, 9])
@pytest.mark.parametrize(
    "gray,blur,solarize",
    [
        (True, False, False),
        (False, True, False),
        (False, False, True),
        (True, True, False),
        (True, True, True),
        (True, False, True),
        (False, False, False),
    ],
)
def test_xla_finish_matches_torchvision(batch, gray, blur, solarize):
    rng = np.random.default_rng(batch)
    x = rng.random((batch, 20, 20, 3)).astype(np.float32)
    grey = rng.random(batch) < 0.5
    sigmas = rng.uniform(0.1, 2.0, batch)
    kernels = np.stack([_np_gaussian_kernel(9, s) for s in sigmas]) if batch else np.zeros((0, 9))
    thresholds = np.where(rng.random(batch) < 0.5, 0.5, 2.0)
    got = colour._finish(
        tf.constant(x),
        tf.constant(grey) if gray else None,
        tf.constant(kernels, tf.float32) if blur else None,
        tf.constant(thresholds, tf.float32) if solarize else None,
    ).numpy()
    assert got.shape == x.shape
    for i in range(batch):
        expected = _np_finish(
            x[i].astype(np.float64), gray and grey[i], kernels[i] if blur else None, thresholds[i] if solarize else None
        )
        # Near the 0.5 threshold float32 rounding may land a pixel on either
        # side; away from it, float32 ulps of values in [0, 1].
        near = (
            np.abs(_np_finish(x[i].astype(np.float64), gray and grey[i], kernels[i] if blur else None, None) - 0.5)
            < 1e-5
        )
        np.testing.assert_allclose(got[i][~near], expected[~near], atol=2e-6)


@pytest.mark.parametrize("batch, chunks", [(20, [8, 8, 4]), (8, [8])])
def test_host_chunks_give_the_views_of_the_whole_batch(batch, chunks, monkeypatch):
    # 128 px views: the smallest the host makes in chunks of 8 rows; a batch of 8 stays whole.
    config = dataclasses.replace(get_preset("imagenet").augment, image_size=128)
    rng = np.random.default_rng(batch)
    crops = [tf.constant(rng.integers(0, 256, (batch, 128, 128, 3), dtype=np.uint8)) for _ in range(2)]
    seed = tf.constant([3, batch], tf.int64)
    whole = augment.finish_pair(*crops, seed, config)
    calls = []
    finish_pair = augment.finish_pair
    monkeypatch.setattr(augment, "finish_pair", lambda c1, *a: calls.append(c1.shape[0]) or finish_pair(c1, *a))
    # Traced, as in the tf.data pipeline.
    host = tf.function(lambda: augment.finish_pair_on_host(*crops, seed, config))()
    assert calls == chunks
    for got, want in zip(host, whole):
        np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=0, atol=1e-6)
