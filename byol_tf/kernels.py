"""Faster compute paths for Keras's `Conv2D` and `BatchNormalization`, same maths.

Keras 3 on TensorFlow leaves speed on the table in BYOL's training step:

- `BatchNormalization` normalises with `tf.nn.moments` and a chain of
  element-wise ops (and, under mixed precision, casts to float32 and back);
  TensorFlow's `FusedBatchNormV3` does the same in one kernel each way.
- oneDNN's filter gradient (`Conv2DBackpropFilter`) is 1.3-4.6x slower than
  one matrix product over the image patches when the output map is tiny
  (2x2 or 1x1, as in the last stages of an ImageNet-stem ResNet on 32 px
  images), in bfloat16 most. On GPUs cuDNN has no such weakness, so this path
  is for CPUs only.
- oneDNN's input gradient (`Conv2DBackpropInput`) of a stride-1 convolution
  runs 1.1-13x slower than a forward convolution of the output gradient with
  the kernel flipped and transposed, which is the same sum
  (benchmarks/conv_input_grad.py on AVX2 CPUs, worst on small maps).
- A 3x3 "same" convolution of a 1x1 map only ever multiplies its centre tap
  by data: the other taps see padding. It is a matrix product with the
  centre tap, exactly.

`install_fast_kernels(model)` switches a model's plain `Conv2D` and
`BatchNormalization` layers to these paths. Each layer keeps its class,
weights and config, so saved models, exports and fine-tuning see ordinary
Keras layers; only how the step computes changes, and
`tests/test_kernels.py` checks outputs, gradients and moving statistics
against Keras's own paths.
"""

import keras
import tensorflow as tf

# Output maps of at most this many pixels get their filter gradient as a
# matrix product (benchmarks/conv_filter_grad.py: it loses from 4x4 on).
_MATMUL_GRAD_MAX_PIXELS = 4


def _padded_patches(x, kernel_size, strides, padding):
    kh, kw = kernel_size
    if kh == 1 and kw == 1:
        # Either padding: a 1x1 kernel reads every stride-th pixel.
        return x[:, :: strides[0], :: strides[1], :]
    return tf.image.extract_patches(x, [1, kh, kw, 1], [1, strides[0], strides[1], 1], [1, 1, 1, 1], padding)


def _input_grad_as_conv(dy, kernel):
    # The transpose of a stride-1 "same" convolution with an odd kernel is the
    # "same" convolution with the kernel flipped in space and in/out swapped.
    return tf.nn.conv2d(dy, tf.transpose(tf.reverse(kernel, [0, 1]), [0, 1, 3, 2]), [1, 1, 1, 1], "SAME")


def conv2d(x, kernel, strides=(1, 1), padding="SAME", filter_grad_as_matmul=False, input_grad_as_conv=False):
    """A channels-last 2D convolution with the fast paths of this module.

    Args:
        x: `[batch, height, width, in_channels]` images or features.
        kernel: `[kh, kw, in_channels, out_channels]`.
        strides: `(sh, sw)`.
        padding: "SAME" or "VALID".
        filter_grad_as_matmul: compute the kernel's gradient as one matrix
            product over image patches when the output map has at most 4
            pixels (faster on CPUs).
        input_grad_as_conv: compute the input's gradient of a stride-1
            "same" convolution with an odd kernel as a forward convolution
            (faster on CPUs).
    """
    kernel = tf.convert_to_tensor(kernel)
    kh, kw, cin, cout = kernel.shape
    sh, sw = strides
    if (x.shape[1], x.shape[2], sh, sw, padding) == (1, 1, 1, 1, "SAME") and kh % 2 and kw % 2:
        centre = kernel[kh // 2, kw // 2]
        return tf.reshape(tf.matmul(tf.reshape(x, [-1, cin]), centre), [-1, 1, 1, cout])
    strides4 = [1, sh, sw, 1]
    out_pixels = None
    if x.shape[1] is not None and x.shape[2] is not None:
        out_h = -(-x.shape[1] // sh) if padding == "SAME" else (x.shape[1] - kh) // sh + 1
        out_w = -(-x.shape[2] // sw) if padding == "SAME" else (x.shape[2] - kw) // sw + 1
        out_pixels = out_h * out_w
    matmul_grad = filter_grad_as_matmul and out_pixels is not None and out_pixels <= _MATMUL_GRAD_MAX_PIXELS
    conv_grad = input_grad_as_conv and (sh, sw, padding) == (1, 1, "SAME") and kh % 2 == 1 and kw % 2 == 1
    if not (matmul_grad or conv_grad):
        return tf.nn.conv2d(x, kernel, strides4, padding)

    @tf.custom_gradient
    def conv(x, kernel):
        def grad(dy):
            if conv_grad:
                dx = _input_grad_as_conv(dy, kernel)
            else:
                dx = tf.raw_ops.Conv2DBackpropInput(
                    input_sizes=tf.shape(x), filter=kernel, out_backprop=dy, strides=strides4, padding=padding
                )
            if not matmul_grad:
                dkernel = tf.raw_ops.Conv2DBackpropFilter(
                    input=x, filter_sizes=tf.shape(kernel), out_backprop=dy, strides=strides4, padding=padding
                )
                return dx, dkernel
            patches = tf.reshape(_padded_patches(x, (kh, kw), strides, padding), [-1, kh * kw * cin])
            dkernel = tf.matmul(patches, tf.reshape(dy, [-1, cout]), transpose_a=True)
            return dx, tf.reshape(dkernel, [kh, kw, cin, cout])

        return tf.nn.conv2d(x, kernel, strides4, padding), grad

    return conv(x, kernel)


def fused_batch_norm(layer, inputs):
    """`layer`'s training-mode forward pass through `FusedBatchNormV3`.

    Normalises with the batch statistics and updates the moving ones exactly
    as `keras.layers.BatchNormalization` does (with the biased variance).

    Args:
        layer: a built `keras.layers.BatchNormalization` over the last axis.
        inputs: a rank-2 or rank-4 tensor.
    """
    shape = tf.shape(inputs)
    x = inputs if inputs.shape.rank == 4 else tf.reshape(inputs, [-1, 1, 1, inputs.shape[-1]])
    if x.dtype == tf.float64:
        x = tf.cast(x, tf.float32)
    channels = [inputs.shape[-1]]
    gamma = tf.cast(layer.gamma, tf.float32) if layer.scale else tf.ones(channels)
    beta = tf.cast(layer.beta, tf.float32) if layer.center else tf.zeros(channels)
    y, mean, variance = tf.compat.v1.nn.fused_batch_norm(x, gamma, beta, epsilon=layer.epsilon, is_training=True)[:3]
    # The fused kernel returns the unbiased variance; Keras averages the biased one.
    # Counted in int64: one replica's layer can hold more than 2**31 elements.
    count = tf.cast(tf.size(x, out_type=tf.int64) // tf.shape(x, out_type=tf.int64)[-1], tf.float32)
    variance = variance * (count - 1.0) / tf.maximum(count, 1.0)
    momentum = layer.momentum
    layer.moving_mean.assign(tf.cast(layer.moving_mean, tf.float32) * momentum + mean * (1.0 - momentum))
    layer.moving_variance.assign(tf.cast(layer.moving_variance, tf.float32) * momentum + variance * (1.0 - momentum))
    return tf.cast(tf.reshape(y, shape), layer.compute_dtype)


def _fast_conv_op(layer, on_cpu):
    plain = keras.layers.Conv2D.convolution_op.__get__(layer)

    def convolution_op(inputs, kernel):
        if layer.data_format != "channels_last" or tuple(layer.dilation_rate) != (1, 1) or layer.groups != 1:
            return plain(inputs, kernel)
        return conv2d(inputs, kernel, tuple(layer.strides), layer.padding.upper(), on_cpu, on_cpu)

    return convolution_op


def _fast_bn_call(layer):
    plain = keras.layers.BatchNormalization.call.__get__(layer)

    def call(inputs, training=None, mask=None):
        eligible = (
            training
            and layer.trainable
            and mask is None
            and not layer.synchronized
            and not layer.renorm
            and inputs.shape.rank in (2, 4)
            and layer.axis in (-1, inputs.shape.rank - 1)
        )
        return fused_batch_norm(layer, inputs) if eligible else plain(inputs, training=training, mask=mask)

    return call


def install_fast_kernels(model, cpu_gradients=None):
    """Switches `model`'s plain `Conv2D` and `BatchNormalization` layers to the fast paths.

    Subclasses that override `convolution_op` or `call` keep their own code.
    Layers stay of their class with the same weights and config; installing
    twice is harmless.

    Args:
        model: a `keras.Model` or layer; nested layers are included.
        cpu_gradients: the gradients that are faster on CPUs (the filter's as
            a matrix product on tiny maps, the input's as a forward
            convolution). `None`: on when TensorFlow sees no GPU.

    Returns:
        The number of layers switched.
    """
    if cpu_gradients is None:
        cpu_gradients = not tf.config.list_physical_devices("GPU")
    switched = 0
    for layer in model._flatten_layers(include_self=True, recursive=True):
        if isinstance(layer, keras.layers.Conv2D) and type(layer).convolution_op is keras.layers.Conv2D.convolution_op:
            layer.convolution_op = _fast_conv_op(layer, cpu_gradients)
            switched += 1
        elif (
            isinstance(layer, keras.layers.BatchNormalization)
            and type(layer).call is keras.layers.BatchNormalization.call
        ):
            layer.call = _fast_bn_call(layer)
            switched += 1
    return switched
