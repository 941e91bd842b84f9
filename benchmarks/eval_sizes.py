"""kNN of a finished run's encoder, and of its backbone at random init, at other evaluation sizes.

    python benchmarks/eval_sizes.py --run=runs/woof_zen4_v80_colour --sizes=80,96,112,128 \
        --data=../shared/data/imagewoof/train --eval_data=../shared/data/imagewoof/val

Each size replaces the run's `image_size` (the evaluation's short side is
`size / eval_crop_fraction`, then a centre crop to `size`); the saved encoder
takes any size (`build.accept_any_image_size`). Prints one line per size.
"""

import dataclasses
import json
import os

from absl import app, flags

flags.DEFINE_string("run", None, "A finished run folder (config.json, encoder.keras).", required=True)
flags.DEFINE_list("sizes", ["80", "96", "112", "128"], "Evaluation sizes, in pixels.")
flags.DEFINE_string("data", None, "kNN memory: labelled training data.", required=True)
flags.DEFINE_string("eval_data", None, "kNN test data.", required=True)
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import keras

    from byol_tf import run_eval
    from byol_tf.build import accept_any_image_size
    from byol_tf.config import PretrainConfig

    with open(os.path.join(FLAGS.run, "config.json")) as f:
        config = PretrainConfig.from_dict(json.load(f))
    encoder = keras.saving.load_model(os.path.join(FLAGS.run, "encoder.keras"), compile=False)
    accept_any_image_size(encoder)
    for size in map(int, FLAGS.sizes):
        # The source and the random init are built at each size (in-memory sources are sized on load).
        sized = dataclasses.replace(config, image_size=size)
        memory, test = run_eval.load_source(FLAGS.data, sized), run_eval.load_source(FLAGS.eval_data, sized)
        learned = run_eval.knn_eval(encoder, sized, memory, test)
        random_init = run_eval.knn_eval(run_eval.random_init_encoder(sized), sized, memory, test)
        print(
            f"eval_size={size} crop_fraction={sized.eval_crop_fraction} learned={100 * learned:.2f} "
            f"random_init={100 * random_init:.2f} gain={100 * (learned - random_init):+.2f}",
            flush=True,
        )


if __name__ == "__main__":
    app.run(main)
