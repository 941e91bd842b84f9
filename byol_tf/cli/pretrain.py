"""Pretrains a BYOL encoder with `model.fit`.

    byol-pretrain --preset=demo --out=runs/demo
    byol-pretrain --preset=cifar10_cpu20 --data=data/cifar10/train.npz \
        --eval_data=data/cifar10/test.npz --out=runs/cifar10_cpu20
    byol-pretrain --preset=fsdd_audio --data=fsdd.npz:train --eval_data=fsdd.npz:test --out=runs/fsdd
    byol-pretrain --preset=sst2_text --data=sst2.csv.gz:train --eval_data=sst2.csv.gz:dev --out=runs/sst2

Flags left unset keep the preset's value.
"""

import dataclasses
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging

from byol_tf.cli import flag_errors, process_started, run_main
from byol_tf.config import AUGMENT_ON, LOSSES, OPTIMIZERS, PRECISIONS
from byol_tf.presets import PRESETS, get_preset
from byol_tf.distribute import STRATEGIES

FLAGS = flags.FLAGS
flags.DEFINE_enum("preset", "demo", list(PRESETS), "A named recipe (byol_tf.presets.PRESETS).")
flags.DEFINE_string(
    "data",
    None,
    "An image folder, a folder of TFRecord shards (byol-make-shards), tfds:NAME[:SPLIT], a .npz, or 'shapes' (generated). Folders, shards and tfds are streamed. Audio presets: a folder of WAVs or a .npz; text presets: a folder of .txt files, a text file (a line each), a CSV (column 'text', labels 'label') or a .npz; PATH:SPLIT keeps the rows whose 'split' is SPLIT. Default: 'shapes' for the demo preset.",
)
flags.DEFINE_string("tfds_data_dir", None, "tfds's data folder, for --data=tfds:NAME (default: tfds's own).")
flags.DEFINE_string(
    "eval_data",
    None,
    "Labelled held-out data for kNN; the training data is the memory. Default: 'shapes' for the demo preset.",
)
flags.DEFINE_string("out", None, "Run folder: logs, metrics.csv, checkpoints, encoder.keras.")
flags.DEFINE_string("backbone", None, "Backbone name (see byol_tf.backbones).")
flags.DEFINE_integer("image_size", None, "The encoder's resolution: evaluation, export and serving resize to it.")
flags.DEFINE_integer(
    "view_size",
    None,
    "Side of the training views (default: image_size); smaller trains faster, the encoder stays at image_size.",
)
flags.DEFINE_list(
    "crop_scale",
    None,
    "LO,HI: the range of a training crop's area, as a fraction of the image (images only; the paper's 0.08,1).",
)
flags.DEFINE_multi_string(
    "augment",
    None,
    "KEY=VALUE, repeatable: one field of the preset's views (byol_tf.config.AugmentConfig, or the audio or text "
    "one); two-value fields take LO,HI. E.g. --augment=hue=0.05 --augment=blur_sigma=0.05,1",
)
flags.DEFINE_integer("epochs", None, "Epochs (the preset's time budget, if it has one, no longer applies).")
flags.DEFINE_string(
    "time_budget",
    None,
    "Wall time for the whole command, e.g. 90s, 20m, 8h, 1h30m: after a measured warm-up the run plans its "
    "steps (and lays the learning rate and tau over them, times --schedule_horizon) to end inside it; the "
    "plan is in RUN/plan.json. Not with --epochs.",
)
flags.DEFINE_integer("batch_size", None, "Global batch size.")
flags.DEFINE_enum("optimizer", None, list(OPTIMIZERS), "Optimizer.")
flags.DEFINE_float("lr", None, "Base learning rate for a batch of 256 (peak = lr * batch / 256).")
flags.DEFINE_float("weight_decay", None, "Weight decay (not on biases and BatchNorm).")
flags.DEFINE_float("warmup_epochs", None, "Linear warm-up epochs.")
flags.DEFINE_float("base_tau", None, "EMA decay at step 0, cosine-annealed to 1 over the schedule.")
flags.DEFINE_float(
    "schedule_horizon", None, "Lay the learning rate's and tau's cosines over this many times the run's steps (>= 1)."
)
flags.DEFINE_float("predictor_lr_scale", None, "The predictor's learning rate as a multiple of the schedule's (LARS).")
flags.DEFINE_enum("loss", None, list(LOSSES), "Loss.")
flags.DEFINE_integer("seed", None, "Seed for data order, augmentation and init.")
flags.DEFINE_integer("steps_per_execution", None, "Optimizer steps per compiled call.")
flags.DEFINE_integer("limit", None, "Use at most this many training images.")
flags.DEFINE_integer(
    "knn_every",
    None,
    "kNN monitor every N epochs and after the last (with --eval_data). Default: every epoch; with a "
    "time budget, as often as 5 percent of the budget allows.",
)
flags.DEFINE_integer("backup_every_steps", None, "Back up for resume every N steps (default: each epoch).")
flags.DEFINE_boolean(
    "overwrite", False, "Replace a finished run in --out (or start over a run folder with another config)."
)
flags.DEFINE_boolean(
    "deterministic",
    False,
    "Enable TF op determinism and seed everything: the same command gives bit-identical weights, also after a kill and resume.",
)
flags.DEFINE_float(
    "collapse_threshold",
    None,
    "Collapse guard: per-batch collapse_std below this counts as collapsed (default 0.1/sqrt(projection_dim); 0 = off).",
)
flags.DEFINE_integer("collapse_patience", 50, "Collapse guard: consecutive collapsed steps before acting.")
flags.DEFINE_enum("on_collapse", "stop", ["stop", "warn"], "Collapse guard action.")
flags.DEFINE_enum(
    "strategy",
    "auto",
    list(STRATEGIES),
    "tf.distribute strategy (see byol_tf.distribute.get_strategy).",
)
flags.DEFINE_integer(
    "cpu_replicas", None, "Split the CPU into this many logical devices (Mirrored on CPU, for testing)."
)
flags.DEFINE_enum(
    "precision",
    None,
    list(PRECISIONS),
    "Keras dtype policy; auto: mixed_bfloat16 on CPUs with bf16 instructions and on GPUs of "
    "compute capability 8.0 on (A100, H100), else float32.",
)
flags.DEFINE_boolean("jit_compile", None, "XLA-compile the train step (default: Keras's 'auto').")
flags.DEFINE_boolean(
    "sync_bn", True, "Synchronise BatchNorm across replicas when there are several (--nosync_bn: per replica)."
)
flags.DEFINE_boolean(
    "probe",
    None,
    "Online linear probe: a stop-gradient linear classifier trained on the labels alongside BYOL, logged as probe_acc (and val_probe_acc on --eval_data). Needs labelled --data.",
)
flags.DEFINE_boolean(
    "fast_kernels",
    None,
    "Fused BatchNorm and faster convolution gradients (byol_tf.kernels; the same maths). --nofast_kernels: Keras's own layers' paths.",
)
flags.DEFINE_float("probe_lr", None, "The online probe's Adam learning rate.")
flags.DEFINE_float(
    "eval_crop_fraction",
    None,
    "Evaluation and serving: resize the short side to image_size / this, centre-crop image_size (0.875: the ImageNet protocol; 1: CIFAR).",
)
flags.DEFINE_float(
    "bn_momentum",
    None,
    "Momentum of every BatchNorm layer, backbone and heads (default 0.9, the paper's; keras-cv/keras-hub/applications build 0.99).",
)
flags.DEFINE_float("bn_epsilon", None, "Epsilon of every BatchNorm layer (default 1e-5, the paper's).")
flags.DEFINE_enum(
    "augment_on",
    None,
    list(AUGMENT_ON),
    "Where the colour stages of the views run: in tf.data on the host, or inside the compiled train step on each replica (the host still decodes and crops).",
)
flags.DEFINE_integer("verbose", 2, "fit verbosity: 0, 1 (progress bar) or 2 (a line per epoch).")

_OVERRIDES = {
    "backbone": "backbone",
    "image_size": "image_size",
    "view_size": "view_size",
    "epochs": "epochs",
    "batch_size": "batch_size",
    "optimizer": "optimizer",
    "lr": "base_lr",
    "weight_decay": "weight_decay",
    "warmup_epochs": "warmup_epochs",
    "base_tau": "base_tau",
    "schedule_horizon": "schedule_horizon",
    "predictor_lr_scale": "predictor_lr_scale",
    "loss": "loss",
    "seed": "seed",
    "steps_per_execution": "steps_per_execution",
    "precision": "precision",
    "probe": "probe",
    "probe_lr": "probe_lr",
    "fast_kernels": "fast_kernels",
    "eval_crop_fraction": "eval_crop_fraction",
    "bn_momentum": "bn_momentum",
    "bn_epsilon": "bn_epsilon",
    "augment_on": "augment_on",
}

# Exit status of a run a guard stopped (NaN loss or collapse).
EXIT_STOPPED = 3


def _crop_scale(values):
    """`--crop_scale=LO,HI` as two floats (the config checks their range)."""
    try:
        lo, hi = (float(value) for value in values)
    except ValueError:
        raise app.UsageError(f"--crop_scale must be two numbers, LO,HI. Received: --crop_scale={','.join(values)}")
    if PRESETS[FLAGS.preset].modality != "image":
        raise app.UsageError(
            f"--crop_scale is for image presets. Received: --crop_scale={','.join(values)}, --preset={FLAGS.preset}"
        )
    return lo, hi


def _augment_field(item, augment):
    """One `--augment=KEY=VALUE` as (KEY, value), the value parsed as the preset's own value's type."""
    key, _, text = item.partition("=")
    fields = sorted(f.name for f in dataclasses.fields(augment) if f.name != "image_size")
    if key not in fields:
        raise app.UsageError(
            f"--augment takes KEY=VALUE with KEY one of {fields} (--preset={FLAGS.preset}; the views' side is "
            f"--view_size). Received: --augment={item}"
        )
    default = getattr(augment, key)
    try:
        if isinstance(default, tuple):
            value = tuple(type(d)(part) for d, part in zip(default, text.split(",", len(default) - 1), strict=True))
        elif isinstance(default, bool):
            value = {"true": True, "false": False}[text.lower()]
        else:
            value = type(default)(text)
    except (ValueError, KeyError):
        kind = f"{len(default)} comma-separated values" if isinstance(default, tuple) else type(default).__name__
        raise app.UsageError(f"--augment={key}= takes {kind}. Received: --augment={item}")
    return key, value


def _augment_overrides():
    """`--augment` and `--crop_scale` as the dict of view fields `get_preset` takes."""
    augment = PRESETS[FLAGS.preset].augment
    overrides = dict(_augment_field(item, augment) for item in FLAGS.augment or ())
    if FLAGS.crop_scale is not None:
        if "crop_scale" in overrides:
            raise app.UsageError(
                f"Set the crop scale once. Received: --crop_scale={','.join(FLAGS.crop_scale)}, "
                f"--augment=crop_scale={','.join(map(str, overrides['crop_scale']))}"
            )
        overrides["crop_scale"] = _crop_scale(FLAGS.crop_scale)
    return overrides


def _config():
    overrides = {field: getattr(FLAGS, flag) for flag, field in _OVERRIDES.items() if getattr(FLAGS, flag) is not None}
    augment = _augment_overrides()
    if augment:
        overrides["augment"] = augment
    # A view field set by --augment names that flag in its error (--crop_scale names its own).
    augment_flags = {key: f"augment={key}" for key, _, _ in (item.partition("=") for item in FLAGS.augment or ())}
    names = {**{field: flag for flag, field in _OVERRIDES.items()}, **augment_flags}
    with flag_errors("time_budget", "crop_scale", **names):
        if FLAGS.time_budget is not None:
            from byol_tf.budget import parse_duration

            if FLAGS.epochs is not None:
                raise app.UsageError(
                    "Train for --epochs or to a --time_budget, not both. "
                    f"Received: --epochs={FLAGS.epochs}, --time_budget={FLAGS.time_budget}"
                )
            overrides["time_budget"] = parse_duration(FLAGS.time_budget)
        return get_preset(FLAGS.preset, **overrides)


def _check_image_size(config):
    """Builds the encoder and runs it on one view, so a size the backbone cannot take fails before any work."""
    import keras
    import numpy as np

    from byol_tf import backbones
    from byol_tf.build import accept_any_image_size

    flag, value = "image_size", config.image_size
    try:
        encoder = backbones.build_encoder(config.backbone, config.image_size)
        accept_any_image_size(encoder)
        if config.view_size:
            flag, value = "view_size", config.view_size
            encoder(np.zeros((1, value, value, 3), np.float32))
        if config.augment.small_views:
            flag, value = "augment=small_view_fraction", config.augment.small_view_fraction
            size = config.augment.small_view_size
            encoder(np.zeros((1, size, size, 3), np.float32))
    except Exception as error:  # noqa: BLE001 - backbones fail in many ways on small inputs.
        raise app.UsageError(
            f"--{flag} is too small (or otherwise unusable) for --backbone={config.backbone} "
            f"({type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}). "
            f"Received: --{flag}={value}"
        )
    finally:
        keras.backend.clear_session()


def main(argv):
    del argv
    if not FLAGS.out:
        raise app.UsageError("--out is required: the run folder. Received: --out=None")
    config = _config()
    data = FLAGS.data or ("shapes" if config.preset == "demo" else None)
    if data is None:
        raise app.UsageError("--data is required for this preset. Received: --data=None")
    eval_data = FLAGS.eval_data or ("shapes" if data == "shapes" else None)
    from byol_tf.modalities import check_backbone, split_spec

    for name, value in (("data", data), ("eval_data", eval_data)):
        if value and value != "shapes" and not value.startswith("tfds:") and not os.path.exists(split_spec(value)[0]):
            raise app.UsageError(f"--{name} does not exist. Received: --{name}={value}")
    for name in ("knn_every", "limit", "backup_every_steps", "cpu_replicas", "collapse_patience"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise app.UsageError(f"--{name} must be >= 1. Received: --{name}={value}")
    if FLAGS.collapse_threshold is not None and not FLAGS.collapse_threshold >= 0:
        raise app.UsageError(
            f"--collapse_threshold must be >= 0. Received: --collapse_threshold={FLAGS.collapse_threshold}"
        )

    # Importing TensorFlow does not initialise its devices; the first op does.
    from byol_tf import distribute, training

    with flag_errors("backbone", "out", "overwrite"):
        check_backbone(config)
        training.check_out_dir(FLAGS.out, FLAGS.overwrite)
        training.check_resume(FLAGS.out, config, FLAGS.overwrite)

    # The strategy first of all TF work: --cpu_replicas must split the CPU
    # before TensorFlow initialises its devices.
    with flag_errors("steps_per_execution", "batch_size", "cpu_replicas", "strategy"):
        strategy = distribute.get_strategy(FLAGS.strategy, FLAGS.cpu_replicas)
        distribute.check_global_batch(config.batch_size, strategy)
        distribute.check_steps_per_execution(config.steps_per_execution, strategy)
    if FLAGS.deterministic:
        import keras
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        keras.utils.set_random_seed(config.seed)
    if config.modality == "image":
        _check_image_size(config)

    logging.info("Config: %s", config)
    with flag_errors("data"):
        train = training.load_source(data, config, "train", FLAGS.limit, FLAGS.tfds_data_dir)
    with flag_errors(data="eval_data"):
        eval_set = training.load_source(eval_data, config, "test", None, FLAGS.tfds_data_dir) if eval_data else None
    if config.probe and not train.labelled:
        raise app.UsageError(f"--probe trains a classifier on the labels, but --data has none. Received: --data={data}")
    print(f"Training data: {train.num_examples} {config.modality} examples from {train.name}", flush=True)
    summary = training.run_pretraining(
        config,
        train,
        FLAGS.out,
        eval_set=eval_set,
        knn_every=FLAGS.knn_every,
        backup_every_steps=FLAGS.backup_every_steps,
        verbose=FLAGS.verbose,
        overwrite=FLAGS.overwrite,
        strategy=strategy,
        jit_compile="auto" if FLAGS.jit_compile is None else FLAGS.jit_compile,
        sync_bn=FLAGS.sync_bn,
        deterministic=FLAGS.deterministic,
        collapse_threshold=FLAGS.collapse_threshold,
        collapse_patience=FLAGS.collapse_patience,
        on_collapse=FLAGS.on_collapse,
        started=process_started(),
    )
    print(f"Run folder: {FLAGS.out}")
    if summary["status"] != "finished":
        print(
            f"Run stopped ({summary['status']}) after {summary['steps']} steps: see {os.path.join(FLAGS.out, 'summary.json')}"
        )
        return EXIT_STOPPED
    print(f"Trained {summary['steps']} steps in {summary['train_seconds']} s ({summary['images_per_sec']} img/s)")
    if summary["num_skipped"]:
        print(f"Skipped {summary['num_skipped']} unusable files (names and reasons in summary.json and the log).")
    final = summary.get("final", {})
    if "probe_acc" in final:
        line = f"Online linear probe: {100 * final['probe_acc']:.2f}% on the last epoch's training views"
        if "val_probe_acc" in final:
            line += f", {100 * final['val_probe_acc']:.2f}% on --eval_data"
        print(line)
    if "knn_acc" in summary:
        line = f"kNN top-1 (k=200): {100 * summary['knn_acc']:.2f}% learned"
        if "knn_acc_random_init" in summary:
            line += f" vs {100 * summary['knn_acc_random_init']:.2f}% at random init"
        print(line)


def run():
    """The `byol-pretrain` console command."""
    run_main(main, __name__)


if __name__ == "__main__":
    run()
