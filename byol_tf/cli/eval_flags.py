"""Flags shared by the scripts that evaluate a pretrained encoder."""

from absl import flags

# The library's argument names for these flags (`byol_tf.cli.flag_errors`).
INPUT_ARGUMENTS = {"run_dir": "run_dir", "encoder_path": "encoder", "data": "data", "eval_data": "eval_data"}


def define_input_flags():
    """The encoder and labelled data flags of linear_eval.py and finetune.py."""
    flags.DEFINE_string("run_dir", None, "Pretraining run folder: encoder.keras and config.json.")
    flags.DEFINE_string("encoder", None, "A .keras encoder file, instead of RUN/encoder.keras.")
    flags.DEFINE_string(
        "data", None, "Labelled training data (as pretrain.py --data). Default: 'shapes' for a demo run."
    )
    flags.DEFINE_string(
        "eval_data", None, "Labelled test data. Default: the test split of --data for 'shapes' and tfds."
    )
    flags.DEFINE_integer("limit", None, "Use at most this many training images.")
    flags.DEFINE_integer("eval_limit", None, "Use at most this many test images.")


def check_input_flags(argv):
    """Refuses stray arguments and a missing encoder, naming the flags."""
    import os

    from absl import app

    values = flags.FLAGS
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments. Received: {argv[1:]}")
    if not values.run_dir and not values.encoder:
        raise app.UsageError("Pass --run_dir or --encoder. Received: --run_dir=None, --encoder=None")
    if values.run_dir and not os.path.isdir(values.run_dir):
        raise app.UsageError(f"--run_dir does not exist. Received: --run_dir={values.run_dir}")
