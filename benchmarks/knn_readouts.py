"""kNN of a finished run read other ways: the target encoder, and other k.

    python benchmarks/knn_readouts.py --run=runs/c20_zen2_h2 --data=data/cifar10/train.npz \
        --eval_data=data/cifar10/test.npz --ks=200 --encoders=online,target
    python benchmarks/knn_readouts.py --run=runs/woof_zen2_h2 --ks=10,20,50,100,200 \
        --data=../shared/data/imagewoof/train --eval_data=../shared/data/imagewoof/val

`online` is the saved `encoder.keras` (what the run evaluated and exported),
`target` the target encoder of the last checkpoint (`checkpoints/byol.keras`),
`random` the backbone at the run's random init. Prints one line per encoder and k.
"""

from absl import app, flags

flags.DEFINE_string("run", None, "A finished run folder (config.json, encoder.keras, checkpoints/).", required=True)
flags.DEFINE_string("data", None, "kNN memory: labelled training data.", required=True)
flags.DEFINE_string("eval_data", None, "kNN test data.", required=True)
flags.DEFINE_list("ks", ["200"], "Neighbour counts.")
flags.DEFINE_list("encoders", ["online", "random"], "Any of online, target, random.")
FLAGS = flags.FLAGS


def main(argv):
    del argv
    import keras

    from byol_tf import run_eval
    from byol_tf.eval_inputs import load_encoder
    from byol_tf.evaluation import knn_accuracy
    from byol_tf.run_dir import RunDir

    run = RunDir(FLAGS.run)
    config = run.read_config()
    encoders = {
        "online": lambda: load_encoder(FLAGS.run)[0],
        "target": lambda: keras.saving.load_model(run.checkpoint_file, compile=False).target_encoder,
        "random": lambda: load_encoder(FLAGS.run, random_init=True)[0],
    }
    memory, test = run_eval.load_source(FLAGS.data, config), run_eval.load_source(FLAGS.eval_data, config)
    for name in FLAGS.encoders:
        encoder = encoders[name]()
        train_features, train_labels = run_eval.embed_dataset(encoder, run_eval.eval_data(memory, config), "memory")
        test_features, test_labels = run_eval.embed_dataset(encoder, run_eval.eval_data(test, config), "test")
        for k in map(int, FLAGS.ks):
            accuracy = knn_accuracy(train_features, train_labels, test_features, test_labels, k=k)
            print(f"encoder={name} k={k} knn_acc={100 * accuracy:.2f}", flush=True)


if __name__ == "__main__":
    app.run(main)
