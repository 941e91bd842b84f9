"""`byol-plot` from a checkout: see `byol_tf/cli/plot_run.py` for the flags (`--helpfull`)."""

from byol_tf.cli.plot_run import run

if __name__ == "__main__":
    run()
