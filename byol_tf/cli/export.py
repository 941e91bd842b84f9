"""Exports a run's online encoder as a TF Serving SavedModel or a keras-hub preset.

    byol-export --run_dir=runs/demo --out=saved_models/demo
    byol-export --run_dir=runs/demo --out=saved_models/demo --version=3
    byol-export --run_dir=runs/hub --out=presets/hub --format=keras_hub_preset

Writes `OUT/<version>/` (the SavedModel; the next free version unless
--version is given, never overwriting one) and `OUT/encoder-<version>.keras`;
with --format=keras_hub_preset, the preset folder OUT (never overwritten),
which `keras_hub.models.Backbone.from_preset(OUT)` loads.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.cli import flag_errors, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Run folder with encoder.keras and config.json (from byol-pretrain).")
flags.DEFINE_string("out", None, "Model base folder for TF Serving, e.g. saved_models/NAME.")
flags.DEFINE_integer("version", None, "Version to write (>= 1). Default: one more than the highest present.")
flags.DEFINE_enum(
    "format",
    "saved_model",
    ["saved_model", "keras_hub_preset"],
    "saved_model: TF Serving's versioned layout in --out. keras_hub_preset: the keras-hub backbone "
    "as a preset folder --out (runs with a keras_hub backbone; needs keras-hub).",
)


def main(argv):
    del argv
    for name in ("run_dir", "out"):
        if not getattr(FLAGS, name):
            raise app.UsageError(f"--{name} is required. Received: --{name}={getattr(FLAGS, name)}")
    run_dir = FLAGS.run_dir
    if not os.path.isdir(run_dir):
        raise app.UsageError(f"--run_dir is not a folder. Received: --run_dir={run_dir}")
    from byol_tf.run_dir import RunDir

    run = RunDir(run_dir)
    for path in (run.encoder_file, run.config_file):
        if not os.path.exists(path):
            raise app.UsageError(
                f"--run_dir has no {os.path.basename(path)}; pass a finished run folder from "
                f"byol-pretrain. Received: --run_dir={run_dir}"
            )
    if FLAGS.version is not None and FLAGS.version < 1:
        raise app.UsageError(f"--version must be >= 1. Received: --version={FLAGS.version}")
    if FLAGS.format == "keras_hub_preset":
        if FLAGS.version is not None:
            raise app.UsageError(
                f"--version applies to --format=saved_model only; a preset folder is not versioned. "
                f"Received: --version={FLAGS.version}"
            )
        export_preset(run_dir, FLAGS.out)
    else:
        export_saved_model(run_dir, FLAGS.out, FLAGS.version)


# The library's argument names -> this command's flags.
_FLAG_NAMES = dict(version="version", run_dir="run_dir", preset_dir="out", out_dir="out")


def export_preset(run_dir, out):
    """`--format=keras_hub_preset`: the preset folder, and how to load it."""
    # Imported here so that flag errors come before TensorFlow's start-up.
    try:
        from byol_tf import hub

        with flag_errors(**_FLAG_NAMES):
            hub.export_run_preset(run_dir, out)
    except ImportError as error:
        raise app.UsageError(f"--format=keras_hub_preset needs keras-hub ({error}). Received: --format={FLAGS.format}")
    print(f"keras-hub preset: {out}")
    print(f"Load: keras_hub.models.Backbone.from_preset({out!r})")
    print(f"  or: keras_hub.models.ImageClassifier.from_preset({out!r}, num_classes=N)  # [0, 255] RGB images")
    print(f"  or: --backbone=keras_hub_preset:{out}")


def export_saved_model(run_dir, out, version):
    """`--format=saved_model`: the next (or given) version, and its signatures."""
    from byol_tf import export

    with flag_errors(**_FLAG_NAMES):
        version_dir = export.export_run(run_dir, out, version=version)
    version = os.path.basename(version_dir)
    print(f"SavedModel: {version_dir}")
    print(f"Keras model: {export.keras_path(out, version)}")
    # Printed from the metadata the export wrote, so this never drifts from the model.
    with open(os.path.join(version_dir, export.EXTRA_DIR, export.METADATA_FILE)) as f:
        metadata = json.load(f)
    if "image_size" in metadata:
        print(f"Signatures (images are resized to {metadata['image_size']}x{metadata['image_size']} inside):")
    else:
        print(f"Signatures ({metadata['modality']}):")
    for name, io in metadata["signatures"].items():
        inputs = ", ".join(f"{k}: {v}" for k, v in io["inputs"].items())
        outputs = ", ".join(f"{k}: {v}" for k, v in io["outputs"].items())
        print(f"  {name}  {inputs} -> {outputs}")
    print(f"Inspect: saved_model_cli show --all --dir {version_dir}")


def run():
    """The `byol-export` console command."""
    run_main(main, __name__)


if __name__ == "__main__":
    run()
