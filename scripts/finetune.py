"""`byol-finetune` from a checkout: see `byol_tf/cli/finetune.py` for the flags (`--helpfull`)."""

from byol_tf.cli.finetune import run

if __name__ == "__main__":
    run()
