"""`byol-export` from a checkout: see `byol_tf/cli/export.py` for the flags (`--helpfull`)."""

from byol_tf.cli.export import run

if __name__ == "__main__":
    run()
