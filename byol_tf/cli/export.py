"""Exports a run's online encoder as a TF Serving SavedModel.

    byol-export --run_dir=runs/demo --out=saved_models/demo
    byol-export --run_dir=runs/demo --out=saved_models/demo --version=3

Writes `OUT/<version>/` (the SavedModel; the next free version unless
--version is given, never overwriting one) and `OUT/encoder-<version>.keras`.
"""

import json
import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.cli import run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("run_dir", None, "Run folder with encoder.keras and config.json (from byol-pretrain).")
flags.DEFINE_string("out", None, "Model base folder for TF Serving, e.g. saved_models/NAME.")
flags.DEFINE_integer("version", None, "Version to write (>= 1). Default: one more than the highest present.")


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

    # Imported here so that flag errors come before TensorFlow's start-up.
    from byol_tf import export

    try:
        version_dir = export.export_run(run_dir, FLAGS.out, version=FLAGS.version)
    except ValueError as error:
        raise app.UsageError(str(error).replace("version=", "--version=").replace("run_dir=", "--run_dir="))
    version = os.path.basename(version_dir)
    print(f"SavedModel: {version_dir}")
    print(f"Keras model: {export.keras_path(FLAGS.out, version)}")
    # Printed from the metadata the export wrote, so this never drifts from the model.
    with open(os.path.join(version_dir, export.EXTRA_DIR, export.METADATA_FILE)) as f:
        metadata = json.load(f)
    print(f"Signatures (images are resized to {metadata['image_size']}x{metadata['image_size']} inside):")
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
