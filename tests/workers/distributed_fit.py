"""Trains a tiny BYOL for a few steps under a strategy and saves every variable.

Run as a subprocess by tests/test_distribute.py (logical CPU devices and
TF_CONFIG must be set before TensorFlow starts):

    python distributed_fit.py OUT.npz --strategy=mirrored --cpu_replicas=2
"""

import argparse
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np

parser = argparse.ArgumentParser()
parser.add_argument("out")
parser.add_argument("--strategy", default="default")
parser.add_argument("--cpu_replicas", type=int, default=None)
parser.add_argument("--steps", type=int, default=3)
parser.add_argument("--steps_per_execution", type=int, default=1)
parser.add_argument("--batch", type=int, default=16)
parser.add_argument("--precision", default="float32")
parser.add_argument("--backbone", default="resnet_tiny")
parser.add_argument("--image_size", type=int, default=16)
parser.add_argument(
    "--augment_on", default=None, help="Train on BYOL views of uint8 images made on the host or device."
)
parser.add_argument("--nofast_kernels", action="store_true", help="Keras's own BatchNorm and Conv2D paths.")
parser.add_argument("--nosync_bn", action="store_true", help="Per-replica BatchNorm (to show what sync changes).")
parser.add_argument("--init", default=None, help="Initial weights to load (saved there first if missing).")
args = parser.parse_args()

from byol_tf import distribute

strategy = distribute.get_strategy(args.strategy, args.cpu_replicas)

import keras
import tensorflow as tf

from byol_tf import get_preset
from byol_tf.ema import EMAUpdate
from byol_tf.build import build_byol

keras.mixed_precision.set_global_policy(args.precision)
size = args.image_size
config = get_preset(
    "demo",
    backbone=args.backbone,
    image_size=size,
    batch_size=args.batch,
    projector_hidden=32,
    projection_dim=16,
    predictor_hidden=32,
    precision=args.precision,
    fast_kernels=not args.nofast_kernels,
    augment_on=args.augment_on or "host",
)
distribute.check_global_batch(config.batch_size, strategy)
rng = np.random.default_rng(0)
x1 = rng.random((args.batch * args.steps, size, size, 3)).astype("float32")
x2 = np.clip(x1 + 0.2 * rng.random(x1.shape).astype("float32"), 0, 1)

keras.utils.set_random_seed(0)
with strategy.scope():
    model = build_byol(config, 1 if args.nosync_bn else strategy.num_replicas_in_sync)
    # Plain SGD: the comparison is about the distributed step, not the optimizer.
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9), steps_per_execution=args.steps_per_execution)
# Same initial weights whatever the strategy: load them from a shared file if present.
init = args.init or os.path.join(os.path.dirname(args.out), f"init_{args.backbone}.weights.h5")
if os.path.exists(init):
    model.load_weights(init)
elif distribute.is_chief():
    model.save_weights(init)
ds = tf.data.Dataset.from_tensor_slices((x1, x2)).batch(args.batch)
if args.augment_on:
    from byol_tf.data import ArraySource, ImageSet, pretrain_dataset

    images = ArraySource(ImageSet(np.round(x1 * 255).astype(np.uint8)))
    ds = pretrain_dataset(images, args.batch, config.augment, augment_on=args.augment_on, autotune=False)
history = model.fit(ds, epochs=1, steps_per_epoch=args.steps, callbacks=[EMAUpdate(args.steps, 0.9)], verbose=0)

values = {f"v{i}": np.asarray(v.numpy(), "float32") for i, v in enumerate(model.weights)}
values["loss"] = np.float32(history.history["loss"][-1])
# Every replica's copy of every mirrored variable, to check they agree.
spread = 0.0
for v in model.weights:
    inner = getattr(v, "value", v)
    copies = getattr(inner, "values", None)
    if copies:
        first = copies[0].numpy()
        spread = max([spread] + [float(np.abs(c.numpy() - first).max()) for c in copies[1:]])
values["replica_spread"] = np.float32(spread)
values["replicas"] = np.int32(strategy.num_replicas_in_sync)
values["names"] = np.array([v.path for v in model.weights])
bn = [layer for layer in model._flatten_layers(recursive=True) if isinstance(layer, keras.layers.BatchNormalization)]
values["bn_layers"] = np.int32(len(bn))
values["bn_synchronized"] = np.int32(sum(layer.synchronized for layer in bn))
values["loss_dtype"] = np.array(
    str(
        model.loss_tracker.result().dtype.name
        if hasattr(model.loss_tracker.result().dtype, "name")
        else model.loss_tracker.result().dtype
    )
)
# Every worker saves (to its own OUT), so the test can compare them.
np.savez(args.out, **values)
print("done", strategy.num_replicas_in_sync, float(values["loss"]), spread)
