"""Writes a run's plots (PNG) into its folder (see `byol_tf.plots`).

    byol-plot runs/demo                       # metrics.png
    byol-plot runs/demo --eval_data=shapes    # + embedding_map.png

`metrics.png`: loss, tau, lr, collapse_std and knn_acc per epoch.
`embedding_map.png` (with labelled --eval_data): the encoder's features of
the test images, projected to 2-D with PCA, coloured by label.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags

from byol_tf.cli import flag_errors, run_main

FLAGS = flags.FLAGS
flags.DEFINE_string("eval_data", None, "Labelled data for the embedding map (its test split); none: metrics only.")
flags.DEFINE_integer("eval_limit", 2000, "Embed at most this many images.")


def main(argv):
    if len(argv) != 2:
        raise app.UsageError(f"Usage: byol-plot RUN [--eval_data=...]. Received: {argv[1:]}")
    run_dir = argv[1]
    from byol_tf.run_dir import RunDir

    if not os.path.exists(RunDir(run_dir).metrics_file):
        raise app.UsageError(f"RUN must be a run folder with metrics.csv. Received: RUN={run_dir}")
    if FLAGS.eval_limit < 1:
        raise app.UsageError(f"--eval_limit must be >= 1. Received: --eval_limit={FLAGS.eval_limit}")

    from byol_tf import eval_inputs, plots

    eval_set = encoder = batches = None
    if FLAGS.eval_data:
        with flag_errors("eval_data", data="eval_data"):
            encoder, config = eval_inputs.load_encoder(run_dir)
            if config is not None and config.modality != "image":
                from byol_tf import run_eval

                eval_set = run_eval.load_source(FLAGS.eval_data, config)
                batches = run_eval.eval_data(eval_set, config)
            else:
                _, eval_data = eval_inputs.resolve_sources(FLAGS.eval_data, FLAGS.eval_data)
                eval_set = eval_inputs.load_labelled(
                    eval_data, eval_inputs.encoder_image_size(encoder), "test", FLAGS.eval_limit
                )
    written = plots.plot_run(run_dir, eval_set, encoder=encoder, max_points=FLAGS.eval_limit, batches=batches)
    for path in written.values():
        print(f"Wrote {path}")


def run():
    """The `byol-plot` console command."""
    run_main(main, __name__)


if __name__ == "__main__":
    run()
