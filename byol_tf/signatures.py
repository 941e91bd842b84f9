"""The image serving signatures, one table for the encoder and the classifier exports (`byol_tf.export`).

Any batch size and image size: pixels or encoded bytes go through the
evaluation preprocessing (`byol_tf.augment.preprocess_eval`) inside the graph.
"""

from typing import Callable, Dict, Tuple

import tensorflow as tf

from byol_tf.augment import preprocess_eval
from byol_tf.data.crops import eval_image

# Signature name -> (input name, what to send), shared by the metadata and the endpoints.
IMAGE_INPUTS = {
    "serving_default": ("images", "float32 [batch, height, width, 3], RGB 0..255"),
    "serve_uint8": ("images", "uint8 [batch, height, width, 3], RGB"),
    "serve_image_bytes": ("image_bytes", "string [batch], encoded JPEG/PNG/BMP/GIF"),
}


def _checked_pixels(images):
    """`images` unchanged, after graph checks of its shape: [batch, height >= 1, width >= 1, 3]."""
    # The signatures declare an unknown shape on purpose: a declared
    # [?, ?, ?, 3] would make the check below constant-fold away, and a wrong
    # feed would then fail deep inside a convolution with an obscure message.
    shape = tf.shape(images)
    # shape[-1:] is empty (not an error) for a scalar, so this is safe at any rank.
    ok = tf.logical_and(tf.equal(tf.size(shape), 4), tf.reduce_all(tf.equal(shape[-1:], 3)))
    check = tf.debugging.Assert(
        ok, ["`images` must have shape [batch, height, width, 3] (RGB). Received shape:", shape], summarize=8
    )
    with tf.control_dependencies([check]):
        images = tf.ensure_shape(images, [None, None, None, 3])
    size_ok = tf.reduce_all(tf.greater(shape[1:3], 0))
    check = tf.debugging.Assert(
        size_ok, ["`images` must have height and width >= 1. Received shape:", shape], summarize=8
    )
    with tf.control_dependencies([check]):
        return tf.identity(images)


def image_endpoints(
    predict: Callable, image_size: int, crop_fraction: float = 1.0
) -> Dict[str, Tuple[Callable, tf.TensorSpec]]:
    """The three image signatures around `predict`, as `{name: (function, input spec)}`.

    Args:
        predict: maps float32 `[B, image_size, image_size, 3]` images in [0, 1]
            to a dict of output tensors.
        image_size: the side images are resized to, by `preprocess_eval`.
        crop_fraction: `preprocess_eval`'s; a run's `eval_crop_fraction`.
    """

    def from_pixels(images):
        # The evaluation pipeline's own function, so served and evaluated outputs agree.
        pixels = tf.cast(_checked_pixels(images), tf.float32) / 255.0
        return predict(preprocess_eval(pixels, image_size, crop_fraction))

    def from_bytes(image_bytes):
        # The evaluation pipeline's decoder: grayscale and RGBA become RGB, a GIF its first frame.
        # Images of different sizes cannot be stacked before resizing, hence map_fn.
        spec = tf.TensorSpec([image_size, image_size, 3], tf.float32)
        pixels = tf.map_fn(
            lambda data: eval_image(data, image_size, crop_fraction), image_bytes, fn_output_signature=spec
        )
        return predict(pixels)

    functions = {"serving_default": from_pixels, "serve_uint8": from_pixels, "serve_image_bytes": from_bytes}
    dtypes = {"serving_default": tf.float32, "serve_uint8": tf.uint8, "serve_image_bytes": tf.string}
    endpoints = {}
    for name, (input_name, _) in IMAGE_INPUTS.items():
        shape = [None] if dtypes[name] == tf.string else None  # unknown rank for pixels: see _checked_pixels
        endpoints[name] = (functions[name], tf.TensorSpec(shape, dtypes[name], name=input_name))
    return endpoints


def image_size_of(model, image_size) -> int:
    """`image_size` as an int, checked against the model's fixed input size."""
    image_size = int(image_size)
    if image_size < 1:
        raise ValueError(f"`image_size` must be >= 1. Received: image_size={image_size}")
    input_shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else None
    if input_shape and input_shape[1:3] not in ((None, None), (image_size, image_size)):
        raise ValueError(
            f"`image_size` does not match the model's input shape {input_shape}. Received: image_size={image_size}"
        )
    return image_size
