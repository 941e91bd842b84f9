"""`byol-linear-eval` from a checkout: see `byol_tf/cli/linear_eval.py` for the flags (`--helpfull`)."""

from byol_tf.cli.linear_eval import run

if __name__ == "__main__":
    run()
