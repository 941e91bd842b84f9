"""Linear evaluation of a frozen BYOL encoder (see `byol_tf.linear`).

    byol-linear-eval --run_dir=runs/demo
    byol-linear-eval --run_dir=runs/demo --label_fraction=0.01
    byol-linear-eval --run_dir=runs/demo --random_init
    byol-linear-eval --encoder=enc.keras --data=data/c10/train.npz --eval_data=data/c10/test.npz

Prints `top1=... top5=...` and writes the result as JSON into the run folder
(`linear_eval.json`, `linear_eval_random_init.json`, `linear_eval_frac0.01.json`,
...) when it is writable, or to `--out`.
"""

import json
import logging
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.cli import eval_flags, flag_errors, run_main

FLAGS = flags.FLAGS
eval_flags.define_input_flags()
flags.DEFINE_integer("epochs", 100, "Epochs of the linear classifier over the fixed features.")
flags.DEFINE_integer("batch_size", 256, "Features per SGD step.")
flags.DEFINE_float("lr", 0.1, "Peak learning rate of the cosine schedule (SGD, momentum 0.9).")
flags.DEFINE_float("weight_decay", 0.0, "Weight decay of the linear layer.")
flags.DEFINE_float("label_fraction", 1.0, "Train on a class-balanced subset of this fraction of the labels, e.g. 0.01.")
flags.DEFINE_integer("seed", 0, "Seeds the label subset, the classifier init and the shuffling.")
flags.DEFINE_boolean("random_init", False, "Evaluate the run's backbone at random init (from config.json) instead.")
flags.DEFINE_boolean("flip_augment", False, "Also train on the features of horizontally flipped train images.")
flags.DEFINE_enum(
    "feature_norm", "standardize", ["standardize", "l2", "none"], "How features are normalised before the linear layer."
)
flags.DEFINE_string("out", None, "Where to write the JSON result. Default: a file in --run_dir.")
flags.DEFINE_integer("verbose", 0, "fit verbosity.")


def result_name(random_init, label_fraction):
    name = "linear_eval" + ("_random_init" if random_init else "")
    return name + (f"_frac{label_fraction:g}" if label_fraction < 1 else "") + ".json"


def write_result(result, path):
    try:
        with open(path, "w") as f:
            json.dump(result, f, indent=2)
    except OSError as error:  # a read-only run folder must not lose the printed figures
        logging.warning("Could not write %s: %s", path, error)
        return None
    return path


def main(argv):
    eval_flags.check_input_flags(argv)
    if not 0 < FLAGS.label_fraction <= 1:
        raise app.UsageError(f"--label_fraction must be in (0, 1]. Received: --label_fraction={FLAGS.label_fraction}")
    for name in ("epochs", "batch_size", "limit", "eval_limit"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise app.UsageError(f"--{name} must be >= 1. Received: --{name}={value}")
    if FLAGS.lr <= 0:
        raise app.UsageError(f"--lr must be > 0. Received: --lr={FLAGS.lr}")

    from byol_tf import eval_inputs, linear

    with flag_errors(**eval_flags.INPUT_ARGUMENTS):
        encoder, config, train, test, data, eval_data = eval_inputs.load_eval_inputs(
            FLAGS.run_dir, FLAGS.encoder, FLAGS.random_init, FLAGS.data, FLAGS.eval_data, FLAGS.limit, FLAGS.eval_limit
        )
    result = linear.linear_eval(
        encoder,
        train,
        test,
        label_fraction=FLAGS.label_fraction,
        flip_augment=FLAGS.flip_augment,
        seed=FLAGS.seed,
        config=config,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        lr=FLAGS.lr,
        weight_decay=FLAGS.weight_decay,
        feature_norm=FLAGS.feature_norm,
        verbose=FLAGS.verbose,
    )
    result.update(
        encoder="random_init" if FLAGS.random_init else (FLAGS.encoder or "encoder.keras"),
        data=data,
        eval_data=eval_data,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        lr=FLAGS.lr,
        weight_decay=FLAGS.weight_decay,
        feature_norm=FLAGS.feature_norm,
        seed=FLAGS.seed,
    )
    out = FLAGS.out or (
        os.path.join(FLAGS.run_dir, result_name(FLAGS.random_init, FLAGS.label_fraction)) if FLAGS.run_dir else None
    )
    written = write_result(result, out) if out else None
    print(
        f"Linear eval ({result['num_train']} train features, {result['num_test']} test, "
        f"{result['num_classes']} classes, label_fraction={FLAGS.label_fraction:g}"
        f"{', random init' if FLAGS.random_init else ''}):"
    )
    print(f"top1={result['top1']:.4f} top5={result['top5']:.4f}")
    if written:
        print(f"Wrote {written}")


def run():
    """The `byol-linear-eval` console command."""
    run_main(main, __name__, eval_flags.__name__)


if __name__ == "__main__":
    run()
