"""One pretraining run: data -> model -> `fit` -> artefacts in a run folder.

The run folder holds `config.json`, `metrics.csv`, `tensorboard/`,
`backup/` (for resume), `checkpoints/byol.keras` (the whole model, each
epoch), `encoder.keras` (the final online encoder) and `summary.json`.
"""

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf import __version__
from byol_tf import data as data_lib
from byol_tf.backbones import build_encoder
from byol_tf.ema import EMAUpdate
from byol_tf.evaluation import KNNMonitor, embed, knn_accuracy
from byol_tf.model import build_byol
from byol_tf.optim import build_optimizer

SUMMARY = "summary.json"


def check_out_dir(out_dir, overwrite=False):
    """Refuses to reuse a folder that holds a finished run, unless `overwrite`."""
    if os.path.exists(os.path.join(out_dir, SUMMARY)) and not overwrite:
        raise ValueError(
            f"`out` holds a finished run; pass overwrite=True (--overwrite) to replace it. Received: out={out_dir!r}"
        )


def load_source(spec, image_size, split="train", limit=None):
    """Loads `spec` as a `data.ImageSet`; `shapes` generates the demo set."""
    if spec == "shapes":
        # 10k generated training images, 2k held out with another seed.
        num, seed = (10000, 0) if split == "train" else (2000, 1)
        return data_lib.make_shapes(limit or num, image_size=image_size, seed=seed)
    return data_lib.load_images(spec, image_size, split=split, limit=limit)


def knn_eval(encoder, image_size, memory, test, k=200):
    """kNN top-1 on `test` with `memory` (labelled `data.ImageSet`s) as memory."""
    train_features = embed(encoder, memory.images, image_size)
    test_features = embed(encoder, test.images, image_size)
    return knn_accuracy(train_features, memory.labels, test_features, test.labels, k=k)


def random_init_encoder(config):
    """The run's backbone at the random init the run started from."""
    keras.utils.set_random_seed(config.seed)
    return build_encoder(config.backbone, config.image_size)


def run_pretraining(config, train, out_dir, eval_set=None, knn_every=1, backup_every_steps=None,
                    compare_random_init=True, verbose=2, overwrite=False, autotune=True):
    """Pretrains BYOL on `train` and writes the run folder.

    Args:
        config: a `byol_tf.config.PretrainConfig`.
        train: a `data.ImageSet` of training images.
        out_dir: the run folder.
        eval_set: optional labelled `data.ImageSet` for kNN; the memory is
            `train`, which must then be labelled.
        knn_every: run the kNN monitor every this many epochs.
        backup_every_steps: back up for resume every this many steps
            (default: every epoch).
        compare_random_init: at the end, also report the kNN accuracy of the
            same backbone at random init.
        verbose: `fit` verbosity.
        overwrite: replace a finished run in `out_dir`.
        autotune: tf.data autotuning (see `data.pretrain_dataset`).

    Returns:
        The summary dict that is also written to `summary.json`.
    """
    check_out_dir(out_dir, overwrite)
    if eval_set is not None and train.labels is None:
        raise ValueError(
            f"kNN evaluation uses the training images as memory, so they need labels. Received: data={train.source!r} (unlabelled)"
        )
    keras.mixed_precision.set_global_policy(config.precision)
    keras.utils.set_random_seed(config.seed)
    steps = data_lib.steps_per_epoch(len(train), config.batch_size)
    total_steps = steps * config.epochs
    dataset = data_lib.pretrain_dataset(train.images, config.batch_size, config.augment, seed=config.seed, autotune=autotune)

    strategy = tf.distribute.get_strategy()
    with strategy.scope():
        model = build_byol(config, strategy.num_replicas_in_sync)
        model.compile(optimizer=build_optimizer(config, steps), steps_per_execution=config.steps_per_execution)

    # Only now, with the model built, does the run folder appear.
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "config.json"), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    callbacks = [EMAUpdate(total_steps, config.base_tau, config.bn_stats)]
    if eval_set is not None:
        # Before the loggers: they read the kNN accuracy from the shared logs.
        callbacks.append(KNNMonitor(train.images, train.labels, eval_set.images, eval_set.labels,
                                    config.image_size, every_n_epochs=knn_every))
    os.makedirs(os.path.join(out_dir, "checkpoints"), exist_ok=True)
    callbacks += [
        keras.callbacks.BackupAndRestore(os.path.join(out_dir, "backup"),
                                         save_freq=backup_every_steps or "epoch", delete_checkpoint=True),
        keras.callbacks.CSVLogger(os.path.join(out_dir, "metrics.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(out_dir, "tensorboard"), update_freq=max(1, steps // 10)),
        keras.callbacks.ModelCheckpoint(os.path.join(out_dir, "checkpoints", "byol.keras")),
        keras.callbacks.TerminateOnNaN(),
    ]
    logging.info("Pretraining %s on %d images: %d epochs x %d steps, global batch %d, peak lr %.4g",
                 config.backbone, len(train), config.epochs, steps, config.batch_size, config.peak_lr)
    start = time.time()
    history = model.fit(dataset, epochs=config.epochs, steps_per_epoch=steps, callbacks=callbacks, verbose=verbose)
    train_seconds = time.time() - start

    model.encoder.save(os.path.join(out_dir, "encoder.keras"))
    summary = {
        "version": __version__,
        "preset": config.preset,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "steps": int(model.optimizer.iterations),
        "total_steps": total_steps,
        "train_seconds": round(train_seconds, 1),
        "images_per_sec": round(int(model.optimizer.iterations) * config.batch_size / max(train_seconds, 1e-9), 1),
        "num_train_images": len(train),
        "num_skipped": train.num_skipped,
        "final": {k: float(v[-1]) for k, v in history.history.items()},
    }
    if eval_set is not None:
        summary["knn_acc"] = knn_eval(model.encoder, config.image_size, train, eval_set)
        if compare_random_init:
            summary["knn_acc_random_init"] = knn_eval(random_init_encoder(config), config.image_size, train, eval_set)
        logging.info("kNN top-1 (k=200): %.4f learned, %s at random init", summary["knn_acc"],
                     summary.get("knn_acc_random_init", "n/a"))
    with open(os.path.join(out_dir, SUMMARY), "w") as f:
        json.dump(summary, f, indent=2)
    return summary
