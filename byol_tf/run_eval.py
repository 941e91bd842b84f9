"""What a run evaluates with: its data (`load_source`, `eval_data`), kNN, the random-init baseline, probe classes."""

import keras
import numpy as np

from byol_tf import data as data_lib
from byol_tf import modalities
from byol_tf.config import PretrainConfig
from byol_tf.evaluation import embed_dataset, knn_accuracy


def probe_classes(train, eval_set=None):
    """Classes for the online linear probe: the class names, or enough for every label of in-memory sets."""
    labels = [
        int(np.max(s.labels)) + 1
        for s in (train, eval_set)
        if s is not None and getattr(s, "labels", None) is not None and len(s.labels)
    ]
    count = max([len(s.class_names or []) for s in (train, eval_set) if s is not None] + labels)
    # A probe needs two classes; a one-class set still gets a valid (if trivial) probe.
    return max(2, count)


def load_source(spec, config: PretrainConfig, split="train", limit=None, tfds_data_dir=None):
    """The data of a run of `config.modality`.

    Images: `data.open_source` (nothing is decoded until training reads it;
    `split` is tfds's). Audio and text: `modalities.open_examples`, in
    memory (a split is named in the spec, `PATH:SPLIT`).
    """
    if config.modality != "image":
        return modalities.open_examples(spec, config, limit)
    return data_lib.open_source(spec, split, limit, config.image_size, tfds_data_dir)


def eval_data(source, config, batch_size=256):
    """`source` through the run's evaluation preprocessing, as `(inputs, labels)` batches."""
    if config.modality != "image":
        eval_input = modalities.get_modality(config.modality).eval_input
        return data_lib.examples_eval_dataset(source, lambda x: eval_input(x, config.augment), batch_size)
    return data_lib.eval_dataset(source, config.image_size, config.eval_crop_fraction, batch_size)


def knn_eval(encoder, config, memory, test, k=200):
    """kNN top-1 on `test` with `memory` (labelled sources) as memory."""
    train_features, train_labels = embed_dataset(encoder, eval_data(memory, config), "kNN memory images")
    test_features, test_labels = embed_dataset(encoder, eval_data(test, config), "kNN test images")
    return knn_accuracy(train_features, train_labels, test_features, test_labels, k=k)


def random_init_encoder(config, train=None):
    """The run's backbone at the random init the run started from (text: `train`'s vocabulary)."""
    keras.utils.set_random_seed(config.seed)
    return modalities.build_encoder(config, train=train)
