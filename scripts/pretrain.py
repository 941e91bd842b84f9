"""`byol-pretrain` from a checkout: see `byol_tf/cli/pretrain.py` for the flags (`--helpfull`)."""

from byol_tf.cli.pretrain import run

if __name__ == "__main__":
    run()
