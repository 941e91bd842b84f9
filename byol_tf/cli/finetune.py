"""Fine-tunes a pretrained BYOL encoder as an image classifier (see `byol_tf.finetune`).

    byol-finetune --run_dir=runs/demo
    byol-finetune --run_dir=runs/demo --init=random        # supervised from scratch
    byol-finetune --run_dir=runs/demo --label_fraction=0.1 --freeze_epochs=5

Writes into --out (default `RUN/finetune`, `RUN/finetune_random`, with a
`_frac0.1` suffix for a label fraction): `classifier.keras`, `finetune.json`
and, in TF Serving's versioned layout, `saved_model/<version>/` (the next free
version, with the encoder export's signatures: see `byol_tf.export`); prints
`top1=... top5=...`.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.cli import eval_flags, flag_errors, run_main

FLAGS = flags.FLAGS
eval_flags.define_input_flags()
flags.DEFINE_enum(
    "init",
    "pretrained",
    ["pretrained", "random"],
    "Start from the pretrained encoder, or from the run's backbone at random init (supervised baseline).",
)
flags.DEFINE_integer("epochs", 30, "Epochs, frozen ones included.")
flags.DEFINE_integer("batch_size", 128, "Images per step.")
flags.DEFINE_float("lr", 0.05, "Peak learning rate of the cosine schedule (SGD, momentum 0.9).")
flags.DEFINE_float("weight_decay", 5e-4, "Weight decay on the kernels.")
flags.DEFINE_integer("freeze_epochs", 0, "Train only the head for this many first epochs, then unfreeze the backbone.")
flags.DEFINE_float("label_fraction", 1.0, "Train on a class-balanced subset of this fraction of the labels, e.g. 0.1.")
flags.DEFINE_enum(
    "augment",
    "auto",
    ["auto", "crop_pad", "resized_crop", "none"],
    "Training augmentation (always with a flip, except none).",
)
flags.DEFINE_integer("seed", 0, "Seeds the label subset, the head's init, the data order and augmentation.")
flags.DEFINE_string("out", None, "Output folder. Default: a folder in --run_dir.")
flags.DEFINE_integer("verbose", 2, "fit verbosity.")


def main(argv):
    eval_flags.check_input_flags(argv)
    if not FLAGS.out and not FLAGS.run_dir:
        raise app.UsageError("--out is required without --run_dir. Received: --out=None")
    if not 0 < FLAGS.label_fraction <= 1:
        raise app.UsageError(f"--label_fraction must be in (0, 1]. Received: --label_fraction={FLAGS.label_fraction}")
    for name in ("epochs", "batch_size", "limit", "eval_limit"):
        value = getattr(FLAGS, name)
        if value is not None and value < 1:
            raise app.UsageError(f"--{name} must be >= 1. Received: --{name}={value}")
    if not 0 <= FLAGS.freeze_epochs <= FLAGS.epochs:
        raise app.UsageError(
            f"--freeze_epochs must be in [0, --epochs={FLAGS.epochs}]. Received: --freeze_epochs={FLAGS.freeze_epochs}"
        )
    if FLAGS.lr <= 0:
        raise app.UsageError(f"--lr must be > 0. Received: --lr={FLAGS.lr}")

    import keras

    from byol_tf import eval_inputs, export, finetune, linear

    with flag_errors(**eval_flags.INPUT_ARGUMENTS):
        encoder, _, train, test, data, eval_data = eval_inputs.load_eval_inputs(
            FLAGS.run_dir,
            FLAGS.encoder,
            FLAGS.init == "random",
            FLAGS.data,
            FLAGS.eval_data,
            FLAGS.limit,
            FLAGS.eval_limit,
        )
    if getattr(train, "modality", "image") != "image":
        raise app.UsageError(
            f"byol-finetune fine-tunes image encoders; evaluate a {train.modality} run with byol-linear-eval. "
            f"Received: --run_dir={FLAGS.run_dir}"
        )
    index = linear.class_balanced_subset(train.labels, FLAGS.label_fraction, FLAGS.seed)
    train = type(train)(
        images=train.images[index], labels=train.labels[index], class_names=train.class_names, source=train.source
    )
    num_classes = max(train.num_classes, test.num_classes)

    keras.utils.set_random_seed(FLAGS.seed)
    classifier = finetune.build_classifier(encoder, num_classes)
    result = finetune.finetune(
        classifier,
        train,
        test,
        epochs=FLAGS.epochs,
        batch_size=FLAGS.batch_size,
        lr=FLAGS.lr,
        weight_decay=FLAGS.weight_decay,
        freeze_epochs=FLAGS.freeze_epochs,
        augment=FLAGS.augment,
        seed=FLAGS.seed,
        verbose=FLAGS.verbose,
    )
    suffix = "_random" if FLAGS.init == "random" else ""
    suffix += f"_frac{FLAGS.label_fraction:g}" if FLAGS.label_fraction < 1 else ""
    out = FLAGS.out or os.path.join(FLAGS.run_dir, "finetune" + suffix)
    os.makedirs(out, exist_ok=True)
    classifier.save(os.path.join(out, "classifier.keras"))
    # classifier.keras is the Keras copy already: no classifier-N.keras next to the versions.
    version_dir = export.export_classifier(
        classifier,
        os.path.join(out, "saved_model"),
        metadata={
            "class_names": None if train.class_names is None else [str(n) for n in train.class_names],
            "init": FLAGS.init,
            "top1": result.top1,
        },
        keras_copy=False,
    )
    record = {
        "top1": result.top1,
        "top5": result.top5,
        "num_train": result.num_train,
        "num_test": len(test),
        "num_classes": num_classes,
        "init": FLAGS.init,
        "encoder": FLAGS.encoder or "encoder.keras",
        "data": data,
        "eval_data": eval_data,
        "label_fraction": FLAGS.label_fraction,
        "epochs": FLAGS.epochs,
        "freeze_epochs": FLAGS.freeze_epochs,
        "batch_size": FLAGS.batch_size,
        "lr": FLAGS.lr,
        "weight_decay": FLAGS.weight_decay,
        "augment": FLAGS.augment,
        "seed": FLAGS.seed,
        "history": result.history,
    }
    with open(os.path.join(out, "finetune.json"), "w") as f:
        json.dump(record, f, indent=2)
    print(
        f"Fine-tuned {type(finetune.find_backbone(classifier)).__name__} ({FLAGS.init} init) on "
        f"{result.num_train} images, {num_classes} classes, {FLAGS.epochs} epochs "
        f"({FLAGS.freeze_epochs} frozen):"
    )
    print(f"top1={result.top1:.4f} top5={result.top5:.4f}")
    print(f"Wrote {out}/classifier.keras, {version_dir} (TF Serving), {out}/finetune.json")


def run():
    """The `byol-finetune` console command."""
    run_main(main, __name__, eval_flags.__name__)


if __name__ == "__main__":
    run()
