"""`byol-make-shards` from a checkout: see `byol_tf/cli/make_shards.py` for the flags (`--helpfull`)."""

from byol_tf.cli.make_shards import run

if __name__ == "__main__":
    run()
