"""The generated demo set: shapes and textures of random colours, no download needed."""

import numpy as np

from byol_tf.data.arrays import ImageSet

SHAPE_CLASSES = (
    "circle",
    "square",
    "triangle",
    "cross",
    "ring",
    "horizontal_stripes",
    "vertical_stripes",
    "diagonal_stripes",
    "checkerboard",
    "dots",
)

# Images drawn per vectorised numpy call: bounds memory at large image sizes.
_SHAPES_CHUNK = 1024


def make_shapes(num_images: int, image_size: int = 32, num_classes: int = 10, seed: int = 0) -> ImageSet:
    """Generates a labelled dataset of shapes and textures, without a download.

    Class `k` is the family `SHAPE_CLASSES[k]`: a filled circle, square,
    upward triangle, plus-shaped cross or ring, or a square patch of
    horizontal, vertical or diagonal stripes, a checkerboard or a grid of
    dots. Each image has a random position, size (and stripe period),
    random foreground and background colours and mild Gaussian noise.

    The colours are the point: they vary far more between images than the
    shape does, so raw pixels (or colour statistics) say little about the
    class, while features that ignore colour and position, which BYOL's
    crops and colour jitter teach, separate the classes easily. Classes are
    symmetric under horizontal flips (diagonal stripes go either way).

    Args:
        num_images: number of images; labels are balanced (counts differ by
            at most one) and in random order.
        image_size: side of the square images, at least 8.
        num_classes: number of families used, 1 to 10 (the first ones).
        seed: the same seed gives the same images.

    Returns:
        An `ImageSet` with `class_names` from `SHAPE_CLASSES`.
    """
    if isinstance(num_images, bool) or not isinstance(num_images, (int, np.integer)) or num_images < 1:
        raise ValueError(f"`num_images` must be a positive integer. Received: num_images={num_images!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)) or image_size < 8:
        raise ValueError(f"`image_size` must be an integer >= 8. Received: image_size={image_size!r}")
    if not 1 <= num_classes <= len(SHAPE_CLASSES):
        raise ValueError(
            f"`num_classes` must be between 1 and {len(SHAPE_CLASSES)}. Received: num_classes={num_classes!r}"
        )
    size = int(image_size)
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num_images) % num_classes).astype(np.int64)
    images = np.empty((num_images, size, size, 3), np.uint8)
    # Pixel centres, shaped to broadcast against per-image parameters [n, 1, 1].
    coords = np.arange(size, dtype=np.float32) + 0.5
    yy, xx = coords[None, :, None], coords[None, None, :]
    for k in range(num_classes):
        index = np.flatnonzero(labels == k)
        for start in range(0, len(index), _SHAPES_CHUNK):
            chunk = index[start : start + _SHAPES_CHUNK]
            images[chunk] = _draw_family(k, len(chunk), size, yy, xx, rng)
    return ImageSet(
        images=images,
        labels=labels,
        class_names=list(SHAPE_CLASSES[:num_classes]),
        source=f"shapes(seed={seed})",
    )


def _draw_family(k, n, size, yy, xx, rng):
    """Draws `n` images of family `k` as uint8 `[n, size, size, 3]`."""

    def draw(lo, hi):
        return rng.uniform(lo, hi, (n, 1, 1)).astype(np.float32)

    if k < 5:
        # Solid shapes: half-size r, kept fully inside the image.
        r = draw(0.18, 0.38) * size
    else:
        # Texture patches need room for a few periods.
        r = draw(0.3, 0.48) * size
    cy = r + draw(0.0, 1.0) * (size - 2 * r)
    cx = r + draw(0.0, 1.0) * (size - 2 * r)
    dy, dx = yy - cy, xx - cx
    inside = (np.abs(dy) < r) & (np.abs(dx) < r)
    # Stripe/cell period in pixels, at least 3 so one period spans whole pixels.
    period = np.maximum(draw(0.1, 0.2) * size, 3.0)
    phase = draw(0.0, 1.0)

    def stripes(t):
        return np.mod(t / period + phase, 1.0) < 0.5

    if k == 0:
        mask = dy**2 + dx**2 < r**2
    elif k == 1:
        mask = inside & (np.abs(dx) < r * 0.85) & (np.abs(dy) < r * 0.85)
    elif k == 2:
        # Apex at the top (y grows downwards), base at the bottom.
        mask = (np.abs(dy) < r) & (np.abs(dx) < (dy + r) * 0.6)
    elif k == 3:
        arm = r * 0.3
        mask = inside & ((np.abs(dx) < arm) | (np.abs(dy) < arm))
    elif k == 4:
        dist = np.sqrt(dy**2 + dx**2)
        mask = (dist < r) & (dist > r * 0.55)
    elif k == 5:
        mask = inside & stripes(yy + 0 * xx)
    elif k == 6:
        mask = inside & stripes(xx + 0 * yy)
    elif k == 7:
        # Either diagonal, so that the class is closed under horizontal flips.
        direction = np.where(rng.random((n, 1, 1)) < 0.5, 1.0, -1.0).astype(np.float32)
        mask = inside & stripes((xx * direction + yy) / np.sqrt(2.0))
    elif k == 8:
        cell = np.floor((yy - cy) / period) + np.floor((xx - cx) / period)
        mask = inside & (np.mod(cell, 2.0) == 0)
    else:
        fy = np.mod((yy - cy) / period, 1.0) - 0.5
        fx = np.mod((xx - cx) / period, 1.0) - 0.5
        mask = inside & (fy**2 + fx**2 < 0.3**2)

    background = rng.random((n, 3)).astype(np.float32)
    # Each channel of the foreground differs from the background by 0.3..0.7
    # (mod 1), so the shape is always visible whatever the two colours are.
    foreground = np.mod(background + rng.uniform(0.3, 0.7, (n, 3)).astype(np.float32), 1.0)
    x = np.where(mask[..., None], foreground[:, None, None, :], background[:, None, None, :])
    x = x + rng.normal(0.0, 0.03, x.shape).astype(np.float32)
    return np.round(np.clip(x, 0.0, 1.0) * 255.0).astype(np.uint8)
