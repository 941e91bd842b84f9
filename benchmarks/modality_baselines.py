"""Audio and text runs against their baselines: kNN (and a linear probe) on the learned encoder,
the same encoder at random init, and features made without any learning.

    python benchmarks/modality_baselines.py --run_dir=runs/fsdd \
        --data=../shared/data/fsdd/fsdd.npz:train --eval_data=../shared/data/fsdd/fsdd.npz:test
    python benchmarks/modality_baselines.py --run_dir=runs/sst2 \
        --data=../shared/data/sst2/sst2.csv.gz:train --eval_data=../shared/data/sst2/sst2.csv.gz:dev

The no-learning features, computed here with NumPy and `tf.signal` (not the library):
- audio: the log-mel spectrogram of the centre second, flattened (64 bands, 25 ms
  windows, 10 ms hop), each band standardised on the training clips;
- text: bag of words (counts of the 10,000 most frequent training words, TF-IDF weighted).
Prints one `name=value` line per figure.
"""

import collections
import re

import numpy as np
from absl import app, flags

flags.DEFINE_string("run_dir", None, "A finished audio or text run folder.")
flags.DEFINE_string("data", None, "Training split (memory for kNN, training set of the probe): PATH:SPLIT.")
flags.DEFINE_string("eval_data", None, "Test split: PATH:SPLIT.")
flags.DEFINE_integer("probe_epochs", 100, "Epochs of the linear probe.")
FLAGS = flags.FLAGS


def log_mel(waveforms, sample_rate, num_samples, bins=64):
    import tensorflow as tf

    start = max(0, (waveforms.shape[1] - num_samples) // 2)
    x = tf.constant(waveforms[:, start : start + num_samples], tf.float32)
    window, hop = int(0.025 * sample_rate), int(0.010 * sample_rate)
    power = tf.abs(tf.signal.stft(x, window, hop, fft_length=256)) ** 2
    matrix = tf.signal.linear_to_mel_weight_matrix(bins, 129, sample_rate, 20.0, sample_rate / 2)
    return np.log(np.asarray(power @ matrix) + 1e-6)  # [N, frames, bins]


def standardise(train, test):
    mean, std = train.mean(axis=(0, 1)), train.std(axis=(0, 1)) + 1e-6
    flat = lambda x: ((x - mean) / std).reshape(len(x), -1)  # noqa: E731
    return flat(train), flat(test)


def bag_of_words(train_texts, test_texts, size=10000):
    tokenize = lambda t: re.sub(r"[^\w\s]", " ", t.lower()).split()  # noqa: E731
    counts = collections.Counter(w for t in train_texts for w in set(tokenize(t)))
    vocab = {w: i for i, (w, _) in enumerate(sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:size])}
    idf = np.log(len(train_texts) / np.array([counts[w] for w in vocab], np.float32))

    def vectors(texts):
        x = np.zeros((len(texts), len(vocab)), np.float32)
        for row, text in enumerate(texts):
            for word in tokenize(text):
                if word in vocab:
                    x[row, vocab[word]] += 1.0
        return x * idf

    return vectors(train_texts), vectors(test_texts)


def report(name, train_x, train_y, test_x, test_y, probe=True):
    from byol_tf.evaluation import knn_accuracy
    from byol_tf.linear import train_linear

    print(f"{name}_knn_top1={knn_accuracy(train_x, train_y, test_x, test_y, k=200):.4f}", flush=True)
    if probe:
        result = train_linear(train_x, train_y, test_x, test_y, epochs=FLAGS.probe_epochs, lr=0.1)
        print(f"{name}_linear_top1={result['top1']:.4f}", flush=True)


def main(argv):
    del argv
    from byol_tf import training
    from byol_tf.evaluation import embed_dataset
    from byol_tf.run_dir import RunDir

    run = RunDir(FLAGS.run_dir)
    config = run.read_config()
    train = training.load_source(FLAGS.data, config)
    test = training.load_source(FLAGS.eval_data, config)
    print(f"modality={config.modality} train={train.num_examples} test={test.num_examples}")
    for name, encoder in (
        ("learned", run.load_encoder()),
        ("random_init", training.random_init_encoder(config, train)),
    ):
        train_x, train_y = embed_dataset(encoder, training.eval_data(train, config), "train")
        test_x, test_y = embed_dataset(encoder, training.eval_data(test, config), "test")
        report(name, train_x, train_y, test_x, test_y)
    if config.modality == "audio":
        rate, length = config.augment.sample_rate, config.augment.num_samples
        train_x, test_x = standardise(log_mel(train.examples, rate, length), log_mel(test.examples, rate, length))
        report("raw_log_mel", train_x, train.labels, test_x, test.labels)
    else:
        train_x, test_x = bag_of_words(list(train.examples), list(test.examples))
        report("bag_of_words", train_x, train.labels, test_x, test.labels)


if __name__ == "__main__":
    app.run(main)
