"""Image files: listing folders, checking headers, and decoding to RGB.

Shared by every source that reads encoded images (folders, TFRecord shards,
tfds with skipped decoding). Decoding runs inside `tf.data`; the header checks
and failure reasons are plain Python, used before a run (shard writing) and
when a streamed file fails (to say why).
"""

import os
import re
import struct

import tensorflow as tf
from absl import logging

# Extensions `tf.io.decode_image` understands; matched case-insensitively.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp")

# Images with more pixels than this are skipped before decoding, from the
# dimensions in their header: a decoded float32 copy takes 12 bytes a pixel
# (600 MB at 50 MP), several at a time in parallel. Sources take `max_pixels`.
MAX_IMAGE_PIXELS = 50_000_000

_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}


# A large folder's listing logs a line every this many files.
LIST_PROGRESS_EVERY = 100_000


def list_image_folder(folder):
    """The images below `folder`: `(paths, labels, class_names, skipped)`.

    If `folder` has subfolders, each first-level subfolder is a class (the
    ImageFolder convention, names sorted) and images directly in `folder` are
    skipped (they have no class); otherwise `labels` are all -1 and
    `class_names` is None. Hidden files and folders are ignored. Only names
    are listed: no file is opened, so this takes seconds for a million files.
    """
    folder = os.path.abspath(folder)
    with os.scandir(folder) as entries:
        # is_dir() follows a symlink here on purpose: linked class folders are common.
        class_names = sorted(e.name for e in entries if not e.name.startswith(".") and _is_dir(e))
    paths, labels, skipped = [], [], []
    roots = [(os.path.join(folder, c), i) for i, c in enumerate(class_names)] if class_names else [(folder, -1)]
    for root, label in roots:
        for path in _walk_images(root):
            paths.append(path)
            labels.append(label)
            if len(paths) % LIST_PROGRESS_EVERY == 0:
                logging.info("Listed %d image files in %s so far", len(paths), folder)
    if class_names:
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if _is_image_name(name) and not os.path.isdir(path):
                skipped.append((path, "not inside a class subfolder, so it has no label"))
    return paths, labels, class_names or None, skipped


def _is_dir(entry):
    """`entry.is_dir()`, False for a symlink loop or an unreadable link (a bad file, skipped later)."""
    try:
        return entry.is_dir()
    except OSError:
        return False


def _is_image_name(name):
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _walk_images(root):
    """Yields image paths below `root` in a sorted, reproducible order."""
    # followlinks=False: symlinked folders below `root` are not entered, so a
    # link pointing back up the tree cannot loop; `seen` also guards against
    # bind mounts or other aliases of the same real folder.
    seen = set()
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        real = os.path.realpath(dirpath)
        if real in seen:
            dirnames[:] = []
            continue
        seen.add(real)
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if _is_image_name(name):
                yield os.path.join(dirpath, name)


def precheck(path, max_pixels=MAX_IMAGE_PIXELS):
    """Why the file at `path` cannot be used, found without decoding it; None if it may be."""
    try:
        with open(path, "rb") as f:
            return precheck_bytes(f.read(), max_pixels)
    except OSError as e:
        return f"{type(e).__name__}: {e.strerror or e}"


def precheck_bytes(contents, max_pixels=MAX_IMAGE_PIXELS):
    """`precheck` on the encoded bytes of an image."""
    if not contents:
        return "empty file"
    size = header_size(contents)
    if size is None:
        return "Unknown image file format: no JPEG, PNG, GIF, BMP or WebP header (or a truncated one)"
    width, height = size
    if width <= 0 or height <= 0:
        return f"invalid image dimensions {width}x{height} in the header"
    if width * height > max_pixels:
        return (
            f"too large: {width}x{height} = {width * height / 1e6:.1f} megapixels, over the "
            f"{max_pixels / 1e6:g} MP limit (max_pixels)"
        )
    return None


def header_size(head):
    """(width, height) from an image's encoded bytes, or None for an unknown format."""
    if head[:8] == b"\x89PNG\r\n\x1a\n" and head[12:16] == b"IHDR" and len(head) >= 24:
        return struct.unpack(">II", head[16:24])
    if head[:6] in (b"GIF87a", b"GIF89a") and len(head) >= 10:
        return struct.unpack("<HH", head[6:10])
    if head[:2] == b"BM" and len(head) >= 26:
        if struct.unpack("<I", head[14:18])[0] == 12:  # OS/2 BITMAPCOREHEADER
            return struct.unpack("<HH", head[18:22])
        width, height = struct.unpack("<ii", head[18:26])
        return width, abs(height)
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" and len(head) >= 30:
        chunk = head[12:16]
        if chunk == b"VP8 ":
            width, height = struct.unpack("<HH", head[26:30])
            return width & 0x3FFF, height & 0x3FFF
        if chunk == b"VP8L":
            bits = struct.unpack("<I", head[21:25])[0]
            return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
        if chunk == b"VP8X":
            return int.from_bytes(head[24:27], "little") + 1, int.from_bytes(head[27:30], "little") + 1
        return None
    if head[:2] == b"\xff\xd8":
        return _jpeg_size(head)
    return None


def _jpeg_size(data):
    """Walks the JPEG segments to the frame header (SOFn)."""
    i = 2
    while i < len(data):
        while i < len(data) and data[i] != 0xFF:
            i += 1
        while i < len(data) and data[i] == 0xFF:
            i += 1
        if i >= len(data):
            return None
        marker = data[i]
        i += 1
        if marker == 0x01 or 0xD0 <= marker <= 0xD8:
            continue  # stand-alone markers
        if marker in (0xD9, 0xDA) or i + 2 > len(data):
            return None  # end of image or scan data before any frame header
        length = struct.unpack(">H", data[i : i + 2])[0]
        if marker in _JPEG_SOF:
            if i + 7 > len(data):
                return None
            height, width = struct.unpack(">HH", data[i + 3 : i + 7])
            return width, height
        i += length
    return None


def failure_reason(contents, max_pixels=MAX_IMAGE_PIXELS):
    """Why encoded `contents` could not be used: the header check, else the decoder's own error."""
    reason = precheck_bytes(contents, max_pixels)
    if reason is not None:
        return reason
    try:
        decode_rgb(tf.constant(contents)).numpy()
    except (tf.errors.OpError, ValueError) as e:
        message = getattr(e, "message", None) or str(e)
        # Drop TF's "{{function_node ...}}" prefix and op name suffix.
        message = re.sub(r"\{\{.*?\}\}\s*", "", message).split(" [Op:")[0].strip()
        return f"{type(e).__name__}: {message}"
    return "could not be decoded"


def is_jpeg(contents):
    """Whether encoded bytes start with the JPEG SOI marker (a scalar bool tensor)."""
    return tf.strings.substr(contents, 0, 2) == b"\xff\xd8"


def decode_rgb(contents):
    """Encoded JPEG, PNG, GIF (first frame), BMP or WebP -> float32 RGB `[H, W, 3]` in [0, 1].

    float32 decoding scales 8- and 16-bit PNGs alike; grayscale is replicated
    and alpha dropped, as PIL's `convert("RGB")`.
    """
    head = tf.strings.join([tf.strings.substr(contents, 0, 12), " " * 12])
    image = tf.cond(
        tf.strings.substr(head, 8, 4) == "WEBP",
        lambda: tf.cast(_decode_webp(contents), tf.float32) / 255.0,
        lambda: tf.io.decode_image(contents, dtype=tf.float32, expand_animations=False),
    )
    return to_rgb_float(tf.ensure_shape(image, [None, None, None]))


def _decode_webp(contents):
    """WebP -> uint8 `[H, W, C]`: TF decodes it only to uint8, with a frame axis."""
    image = tf.io.decode_image(contents, dtype=tf.uint8, expand_animations=False)
    return tf.reshape(image, tf.shape(image)[-3:])


def to_rgb_float(image):
    """`[H, W, C]` image with C in 1..4 (uint8 or float in [0, 1]) -> float32 RGB in [0, 1]."""
    if image.dtype == tf.uint8:
        image = tf.cast(image, tf.float32) / 255.0
    image = tf.cast(image, tf.float32)
    channels = tf.shape(image)[-1]
    # 1 (gray) and 2 (gray + alpha) -> gray replicated; 3 and 4 (RGBA) -> RGB.
    return tf.cond(channels < 3, lambda: tf.image.grayscale_to_rgb(image[..., :1]), lambda: image[..., :3])


def check_pixels(height, width, max_pixels):
    """An op that fails (so the stream skips the image) when `height * width > max_pixels`."""
    pixels = tf.cast(height, tf.int64) * tf.cast(width, tf.int64)
    return tf.debugging.assert_less_equal(
        pixels, tf.constant(int(max_pixels), tf.int64), message="image over max_pixels"
    )
