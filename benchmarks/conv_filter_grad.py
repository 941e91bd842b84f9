"""Times a convolution's filter gradient two ways, per layer shape of ResNet-18 at 32 px.

    .venv/bin/python benchmarks/conv_filter_grad.py

`native` is TensorFlow's `Conv2DBackpropFilter` (oneDNN on CPUs); `matmul` is
what `byol_tf.kernels` uses on tiny maps: one matrix product over the image
patches. Median milliseconds of 15 calls after 3 untimed ones, batch 128, in
float32 and bfloat16. This is the evidence for the 4-pixel threshold in
`byol_tf/kernels.py`.
"""

import os
import sys
import time

from absl import app, flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

flags.DEFINE_integer("batch_size", 128, "Images per batch.")
FLAGS = flags.FLAGS

# (input side, in channels, out channels, kernel, stride): the 3x3 and 7x7
# convolutions of an ImageNet-stem ResNet-18 on 32 px images.
SHAPES = [
    (32, 3, 64, 7, 2),
    (8, 64, 64, 3, 1),
    (8, 64, 128, 3, 2),
    (4, 128, 128, 3, 1),
    (4, 128, 256, 3, 2),
    (2, 256, 256, 3, 1),
    (2, 256, 512, 3, 2),
    (1, 512, 512, 3, 1),
]


def _median_ms(fn, *args):
    for _ in range(3):
        fn(*args).numpy()
    times = []
    for _ in range(15):
        start = time.perf_counter()
        fn(*args).numpy()
        times.append(time.perf_counter() - start)
    return 1000 * sorted(times)[len(times) // 2]


def main(argv):
    del argv
    import tensorflow as tf

    from byol_tf import kernels

    for dtype in (tf.float32, tf.bfloat16):
        for size, cin, cout, k, stride in SHAPES:
            out = -(-size // stride)
            x = tf.cast(tf.random.normal((FLAGS.batch_size, size, size, cin)), dtype)
            dy = tf.cast(tf.random.normal((FLAGS.batch_size, out, out, cout)), dtype)
            native = tf.function(
                lambda x, dy: tf.raw_ops.Conv2DBackpropFilter(
                    input=x,
                    filter_sizes=[k, k, cin, cout],
                    out_backprop=dy,
                    strides=[1, stride, stride, 1],
                    padding="SAME",
                )
            )
            matmul = tf.function(
                lambda x, dy: tf.matmul(
                    tf.reshape(kernels._padded_patches(x, (k, k), (stride, stride), "SAME"), [-1, k * k * cin]),
                    tf.reshape(dy, [-1, cout]),
                    transpose_a=True,
                )
            )
            print(
                f"{dtype.name:9s} in {size}x{size}x{cin:<3d} out {out}x{out}x{cout:<3d} k{k} s{stride}: "
                f"native {_median_ms(native, x, dy):6.2f} ms  matmul {_median_ms(matmul, x, dy):6.2f} ms",
                flush=True,
            )


if __name__ == "__main__":
    app.run(main)
