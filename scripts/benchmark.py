"""Times BYOL's input pipeline, its train step, or both through `model.fit`.

    python scripts/benchmark.py --what=step --backbone=resnet18 --image_size=32 --batch_size=128
    python scripts/benchmark.py --what=step --precision=mixed_bfloat16
    python scripts/benchmark.py --what=augment --image_size=96
    python scripts/benchmark.py --what=fit

--what=augment: the tf.data pipeline alone (`data.pretrain_dataset` on random
  uint8 images in memory, both views with the preset's augmentation at
  --image_size); images/sec = batches x batch_size / elapsed.
--what=input: the same from files (--data=FOLDER): read, decode, crop from the
  originals, both views.
  For augment and input the default --warmup=30 reaches the steady state: the
  colour stages compile once per padded subset size, over about the first 20
  batches (`warmup_s=` prints what the warm-up batches took).
--what=step: the compiled train step alone, on one fixed pair of random views
  repeated from memory, through `model.fit` with the `EMAUpdate` callback.
--what=fit: `model.fit` on the real augmentation pipeline, EMA included.

For step and fit, each optimizer step's time is taken between consecutive
`on_train_batch_end` calls after --warmup steps; images/sec = batch_size /
median step time. A source image counts once although it makes two views.

Only timing lives here: the model, optimizer, EMA and data are the library's.
The last line printed is `images_per_sec=<float>`.
"""

import os
import sys
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.config import AUGMENT_ON, PRECISIONS
from byol_tf.precision import global_policy, resolve_precision

FLAGS = flags.FLAGS
flags.DEFINE_enum("what", "step", ["augment", "input", "step", "fit"], "What to time.")
flags.DEFINE_string(
    "data",
    None,
    "--what=input (required) and --what=fit (default: random images in memory): the image folder (or shards, tfds:NAME) to stream both views from.",
)
flags.DEFINE_enum(
    "augment_on",
    "host",
    list(AUGMENT_ON),
    "--what=fit: the colour stages in tf.data, or inside the train step (--what=input/augment then time the host's part).",
)
flags.DEFINE_string("preset", "imagenet", "Preset for the heads, optimizer, EMA and augmentation.")
flags.DEFINE_string("backbone", "resnet18", "Backbone name (resnet18: the ImageNet-stem ResNet-18).")
flags.DEFINE_integer("image_size", 32, "Image (view) side in pixels.")
flags.DEFINE_integer("batch_size", 128, "Global batch size, in source images.")
flags.DEFINE_integer("steps", 20, "Timed steps (batches).")
flags.DEFINE_integer(
    "warmup",
    None,
    "Untimed steps (batches) first; the first one compiles. Default 30 for augment and input (the colour "
    "stages compile over about 20 batches), 5 otherwise.",
)
flags.DEFINE_enum("precision", "float32", list(PRECISIONS), "Keras global dtype policy (auto: byol_tf.precision).")
flags.DEFINE_boolean("jit_compile", None, "XLA: passed to compile. Unset: Keras' 'auto', as scripts/pretrain.py uses.")
flags.DEFINE_string("strategy", "default", "A byol_tf.distribute strategy name.")
flags.DEFINE_integer(
    "cpu_replicas", None, "Split the CPU into this many logical devices (to try 'mirrored' without GPUs)."
)
flags.DEFINE_boolean(
    "fast_kernels", None, "byol_tf.kernels' fused BatchNorm and convolution paths (default: the preset's, on)."
)
flags.DEFINE_integer("steps_per_execution", 1, "Optimizer steps per compiled call.")
flags.DEFINE_integer("projector_hidden", None, "Override the projector's hidden width.")
flags.DEFINE_integer(
    "predictor_hidden", None, "Override the predictor's hidden width (default: --projector_hidden if set)."
)
flags.DEFINE_integer("num_images", None, "Random source images for augment/fit (default: max(2 x batch, 1024)).")
flags.DEFINE_integer("seed", 0, "Seed for the model, the random images and the augmentation.")
flags.DEFINE_integer(
    "intra_op_threads",
    None,
    "TensorFlow's process-wide intra-op pool (default: one per core). 1 is how PyTorch's DataLoader workers run "
    "(BENCHMARKS.md, 'Two cores in one process').",
    lower_bound=0,
)

# flag -> PretrainConfig field, to name the flag in validation errors.
_OVERRIDES = {
    "backbone": "backbone",
    "image_size": "image_size",
    "batch_size": "batch_size",
    "precision": "precision",
    "steps_per_execution": "steps_per_execution",
    "projector_hidden": "projector_hidden",
    "predictor_hidden": "predictor_hidden",
    "seed": "seed",
    "fast_kernels": "fast_kernels",
    "augment_on": "augment_on",
}


def _usage_error(error):
    """A config ValueError as a UsageError that names the flag."""
    head, _, received = str(error).partition("Received: ")
    name, _, value = received.partition("=")
    flag = {field: flag for flag, field in _OVERRIDES.items()}.get(name, name)
    return app.UsageError(f"{head}Received: --{flag}={value}" if received else str(error))


def _check_flags():
    """Everything that can be checked before TensorFlow starts."""
    if FLAGS.warmup is None:
        FLAGS.warmup = 30 if FLAGS.what in ("augment", "input") else 5
    for name, low in (("steps", 1), ("warmup", 0), ("cpu_replicas", 1), ("num_images", 1)):
        value = getattr(FLAGS, name)
        if value is not None and value < low:
            raise app.UsageError(f"--{name} must be >= {low}. Received: --{name}={value}")
    if FLAGS.what == "input" and not FLAGS.data:
        raise app.UsageError("--what=input streams from --data. Received: --data=None")
    if FLAGS.what not in ("augment", "input") and FLAGS.warmup < 1:
        # The first step traces and compiles; it must not be timed.
        raise app.UsageError(f"--warmup must be >= 1 for --what={FLAGS.what}. Received: --warmup={FLAGS.warmup}")
    spe = FLAGS.steps_per_execution
    if spe is not None and spe >= 1 and FLAGS.what not in ("augment", "input"):
        for name in ("steps", "warmup"):
            if getattr(FLAGS, name) % spe:
                raise app.UsageError(
                    f"--{name} must be a multiple of --steps_per_execution={spe}: batch callbacks fire once "
                    f"per execution. Received: --{name}={getattr(FLAGS, name)}"
                )
    from byol_tf import backbones, distribute, presets

    if FLAGS.strategy not in distribute.STRATEGIES:
        raise app.UsageError(
            f"--strategy must be one of {distribute.STRATEGIES}. Received: --strategy={FLAGS.strategy}"
        )
    try:
        backbones.check_backbone(FLAGS.backbone)
    except ValueError as error:
        raise app.UsageError(str(error).replace("backbone=", "--backbone="))
    overrides = {field: getattr(FLAGS, flag) for flag, field in _OVERRIDES.items() if getattr(FLAGS, flag) is not None}
    if FLAGS.projector_hidden is not None and FLAGS.predictor_hidden is None:
        overrides["predictor_hidden"] = FLAGS.projector_hidden
    try:
        return presets.get_preset(FLAGS.preset, **overrides)
    except ValueError as error:
        raise _usage_error(error)


def _random_images(config, num_images):
    import numpy as np

    rng = np.random.default_rng(config.seed)
    return rng.integers(0, 256, (num_images, config.image_size, config.image_size, 3), dtype=np.uint8)


def _step_timer(model_tau):
    """A callback that records `time.perf_counter()` after every execution."""
    import keras

    class StepTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.times = []

        def on_train_batch_end(self, batch, logs=None):
            # Wait for the step and the EMA update (which assigns tau last)
            # to finish on the device before reading the clock.
            model_tau.numpy()
            self.times.append(time.perf_counter())

    return StepTimer()


def _median(values):
    values = sorted(values)
    mid = len(values) // 2
    return values[mid] if len(values) % 2 else 0.5 * (values[mid - 1] + values[mid])


def _time_augment(config):
    from byol_tf import data

    num_images = FLAGS.num_images or max(2 * config.batch_size, 1024)
    if FLAGS.what == "input":
        # The whole input pipeline from files: read, decode the crop windows, both views.
        source = data.open_source(FLAGS.data)
    else:
        source = _random_images(config, num_images)
    dataset = data.pretrain_dataset(
        source, config.batch_size, config.augment, seed=config.seed, augment_on=config.augment_on
    )
    start = time.perf_counter()
    iterator = iter(dataset)
    for _ in range(FLAGS.warmup):
        next(iterator)
    print(f"warmup_s={time.perf_counter() - start:.3f}")
    times = [time.perf_counter()]
    for _ in range(FLAGS.steps):
        next(iterator)  # tf.data hands back materialised tensors
        times.append(time.perf_counter())
    elapsed = times[-1] - times[0]
    print(f"elapsed_s={elapsed:.6f}")
    print(f"median_step_s={_median([b - a for a, b in zip(times, times[1:])]):.6f}")
    return FLAGS.steps * config.batch_size / elapsed


def _time_fit(config, strategy):
    import keras
    import tensorflow as tf

    from byol_tf import data
    from byol_tf.ema import EMAUpdate
    from byol_tf.build import build_byol
    from byol_tf.optim import build_optimizer

    total = FLAGS.warmup + FLAGS.steps
    keras.utils.set_random_seed(config.seed)
    if FLAGS.what == "fit":
        num_images = FLAGS.num_images or max(2 * config.batch_size, 1024)
        source = data.open_source(FLAGS.data) if FLAGS.data else _random_images(config, num_images)
        dataset = data.pretrain_dataset(
            source, config.batch_size, config.augment, seed=config.seed, augment_on=config.augment_on
        )
    else:
        shape = (config.batch_size, config.train_size, config.train_size, 3)
        views = (tf.random.uniform(shape, seed=1), tf.random.uniform(shape, seed=2))
        dataset = tf.data.Dataset.from_tensors(views).repeat()
    jit = "auto" if FLAGS.jit_compile is None else FLAGS.jit_compile
    with strategy.scope():
        model = build_byol(config, strategy.num_replicas_in_sync)
        model.compile(
            optimizer=build_optimizer(config, total), steps_per_execution=config.steps_per_execution, jit_compile=jit
        )
    print(f"jit_compile={model.jit_compile} (flag: {jit})")
    print(f"params online={sum(int(tf.size(v)) for v in model.online_trainable_variables)}")
    timer = _step_timer(model.tau)
    callbacks = [EMAUpdate(total, config.base_tau, config.bn_stats), timer]
    model.fit(dataset, epochs=1, steps_per_epoch=total, callbacks=callbacks, verbose=0, shuffle=False)
    spe = config.steps_per_execution
    # times[i] is the end of execution i; executions before warmup/spe are untimed.
    timed = timer.times[FLAGS.warmup // spe - 1 :]
    step_times = [(b - a) / spe for a, b in zip(timed, timed[1:])]
    if len(step_times) != FLAGS.steps // spe:
        raise RuntimeError(f"Expected {FLAGS.steps // spe} timed executions, got {len(step_times)}")
    median = _median(step_times)
    print(f"min_step_s={min(step_times):.6f} max_step_s={max(step_times):.6f}")
    print(f"median_step_s={median:.6f}")
    return config.batch_size / median


def main(argv):
    del argv
    config = _check_flags()

    import keras
    import tensorflow as tf

    from byol_tf import distribute

    if FLAGS.intra_op_threads is not None:
        tf.config.threading.set_intra_op_parallelism_threads(FLAGS.intra_op_threads)  # before the runtime starts
    # Before anything touches the devices: the CPU split must come first.
    try:
        strategy = distribute.get_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
        distribute.check_global_batch(config.batch_size, strategy)
    except ValueError as error:
        raise app.UsageError(str(error).replace("batch_size=", "--batch_size=").replace("strategy=", "--strategy="))
    policy = resolve_precision(config.precision)
    with global_policy(policy):
        print(f"tensorflow={tf.__version__} keras={keras.__version__}")
        print(
            f"what={FLAGS.what} preset={config.preset} backbone={config.backbone} image_size={config.image_size} "
            f"batch_size={config.batch_size} steps={FLAGS.steps} warmup={FLAGS.warmup}"
        )
        print(
            f"precision={config.precision} ({policy}) fast_kernels={config.fast_kernels} steps_per_execution={config.steps_per_execution} "
            f"projector_hidden={config.projector_hidden} predictor_hidden={config.predictor_hidden} "
            f"projection_dim={config.projection_dim}"
        )
        print(f"strategy={type(strategy).__name__} ({FLAGS.strategy}) replicas={strategy.num_replicas_in_sync}")
        print(f"devices={[d.name for d in tf.config.list_logical_devices()]}")
        if FLAGS.what in ("augment", "input"):
            print(f"augment={config.augment}")
            images_per_sec = _time_augment(config)
        else:
            images_per_sec = _time_fit(config, strategy)
    print(f"images_per_sec={images_per_sec:.3f}")


if __name__ == "__main__":
    sys.exit(app.run(main))
