"""Times a stride-1 convolution's input gradient two ways, per layer shape.

    .venv/bin/python benchmarks/conv_input_grad.py [--batch_size=128]

`native` is TensorFlow's `Conv2DBackpropInput` (oneDNN on CPUs); `as_conv` is
what `byol_tf.kernels` uses: a forward convolution of the output gradient with
the kernel flipped and transposed. `forward` is the layer's own forward
convolution, for scale. Median milliseconds of 11 calls after 3 untimed ones,
float32, 3x3 "same" convolutions of the shapes in `resnet_tiny` (32 px),
`resnet_tiny_stem4` (96 px) and ResNet-18 (32 and 224 px). This is the
evidence for `input_grad_as_conv` in `byol_tf/kernels.py`.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("batch_size", 128, "Images per batch.")
FLAGS = flags.FLAGS

# (map side, channels): stride-1 3x3 convolutions, channels in = out.
SHAPES = [(16, 16), (8, 32), (4, 64), (2, 128), (24, 16), (12, 32), (6, 64), (3, 128), (8, 64), (4, 128), (2, 256)]
LARGE_SHAPES = [(56, 64), (28, 128), (14, 256), (7, 512)]  # ResNet-18 at 224 px, at batch 32


def _median_ms(fn, *args):
    for _ in range(3):
        fn(*args).numpy()
    times = []
    for _ in range(11):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def _time_shape(batch, size, channels):
    import tensorflow as tf

    from byol_tf import kernels

    x = tf.random.normal((batch, size, size, channels))
    dy = tf.random.normal((batch, size, size, channels))
    kernel = tf.random.normal((3, 3, channels, channels))
    forward = tf.function(lambda x, w: tf.nn.conv2d(x, w, 1, "SAME"))
    native = tf.function(
        lambda dy, w: tf.raw_ops.Conv2DBackpropInput(
            input_sizes=x.shape, filter=w, out_backprop=dy, strides=[1, 1, 1, 1], padding="SAME"
        )
    )
    as_conv = tf.function(kernels._input_grad_as_conv)
    difference = float(tf.reduce_max(tf.abs(native(dy, kernel) - as_conv(dy, kernel))))
    print(
        f"batch {batch:3d} {size:2d}x{size:<2d}x{channels:<3d}: forward {_median_ms(forward, x, kernel):7.2f} ms  "
        f"native {_median_ms(native, dy, kernel):7.2f} ms  as_conv {_median_ms(as_conv, dy, kernel):7.2f} ms  "
        f"(largest difference {difference:.1e})",
        flush=True,
    )


def main(argv):
    del argv
    for size, channels in SHAPES:
        _time_shape(FLAGS.batch_size, size, channels)
    for size, channels in LARGE_SHAPES:
        _time_shape(32, size, channels)


if __name__ == "__main__":
    app.run(main)
