"""One pretraining run: validate, build, resume, fit, summarise, into a run folder (`RunDir`)."""

import dataclasses
import math
import os
import tempfile
import time
from typing import Optional

import keras
import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf import __version__
from byol_tf import data as data_lib
from byol_tf import distribute, guards
from byol_tf.backbones import build_encoder
from byol_tf.config import PretrainConfig
from byol_tf.ema import EMAUpdate
from byol_tf.evaluation import KNNMonitor, embed_dataset, is_monitor_epoch, knn_accuracy
from byol_tf.model import build_byol
from byol_tf.optim import build_optimizer
from byol_tf.plots import plot_run
from byol_tf.resume import check_out_dir, check_resume, remove, resume_backup, truncate_metrics
from byol_tf.run_dir import RunDir

__all__ = [
    "run_pretraining",
    "check_out_dir",
    "check_resume",
    "load_source",
    "eval_data",
    "knn_eval",
    "random_init_encoder",
    "probe_classes",
]


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


def load_source(spec, image_size, split="train", limit=None, tfds_data_dir=None):
    """`data.open_source` for a run: nothing is decoded until training reads it."""
    return data_lib.open_source(spec, split, limit, image_size, tfds_data_dir)


def eval_data(source, config, batch_size=256):
    """`source` through the run's evaluation preprocessing, as `(images, labels)` batches."""
    return data_lib.eval_dataset(source, config.image_size, config.eval_crop_fraction, batch_size)


def knn_eval(encoder, config, memory, test, k=200):
    """kNN top-1 on `test` with `memory` (labelled sources) as memory."""
    train_features, train_labels = embed_dataset(encoder, eval_data(memory, config), "kNN memory images")
    test_features, test_labels = embed_dataset(encoder, eval_data(test, config), "kNN test images")
    return knn_accuracy(train_features, train_labels, test_features, test_labels, k=k)


def random_init_encoder(config):
    """The run's backbone at the random init the run started from."""
    keras.utils.set_random_seed(config.seed)
    return build_encoder(
        config.backbone, config.image_size, bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon
    )


@dataclasses.dataclass
class _Run:
    """What the steps of one run share."""

    config: PretrainConfig
    train: data_lib.Source
    eval_set: data_lib.Source
    run: RunDir  # where the chief writes
    out: RunDir  # the user's run folder (backups are read from it on every worker)
    strategy: tf.distribute.Strategy
    steps: int
    run_info: dict
    backup: dict = None  # the backup resumed from
    start_step: int = 0

    @property
    def workers(self):
        return distribute.input_pipelines(self.strategy)


def _validate(
    config, train, eval_set, out_dir, strategy, overwrite, backup_every_steps, on_collapse, collapse_patience
):
    """Every check that needs no model; returns the run's shared state, its backup found."""
    check_out_dir(out_dir, overwrite)
    train = data_lib.open_source(train)
    eval_set = None if eval_set is None else data_lib.open_source(eval_set)
    if eval_set is not None and not train.labelled:
        raise ValueError(
            "kNN evaluation uses the training images as memory, so they need labels. "
            f"Received: data={train.name!r} (unlabelled)"
        )
    if config.probe and not train.labelled:
        raise ValueError(
            f"The online linear probe (probe=True) trains on labels. Received: data={train.name!r} (unlabelled)"
        )
    if on_collapse not in ("stop", "warn"):
        raise ValueError(f"`on_collapse` must be 'stop' or 'warn'. Received: on_collapse={on_collapse!r}")
    if collapse_patience < 1:
        raise ValueError(f"`collapse_patience` must be >= 1. Received: collapse_patience={collapse_patience!r}")
    if backup_every_steps is not None and backup_every_steps < 1:
        raise ValueError(f"`backup_every_steps` must be >= 1. Received: backup_every_steps={backup_every_steps!r}")
    strategy = strategy or tf.distribute.get_strategy()
    distribute.check_global_batch(config.batch_size, strategy)
    distribute.check_steps_per_execution(config.steps_per_execution, strategy)
    steps = data_lib.steps_per_epoch(train.num_examples, config.batch_size)
    if steps < 1:
        raise ValueError(
            f"Not enough images for one batch: {train.num_examples} images in {train.name}. "
            f"Received: batch_size={config.batch_size}"
        )
    data_lib.check_decodable(train)
    run_info = {
        "data": train.name,
        "num_train_images": train.num_examples,
        "steps_per_epoch": steps,
        "total_steps": steps * config.epochs,
        "replicas": strategy.num_replicas_in_sync,
        "workers": distribute.input_pipelines(strategy)[0],
    }
    backup = resume_backup(out_dir, config, run_info, overwrite)
    # Only the chief writes the run folder; other workers of a multi-worker cluster
    # write to a temporary folder deleted at the end (they read the chief's backup).
    run = RunDir(out_dir if distribute.is_chief() else tempfile.mkdtemp(prefix="byol_worker_"))
    return _Run(config, train, eval_set, run, RunDir(out_dir), strategy, steps, run_info, backup)


def _build(r, sync_bn, backbone, jit_compile, deterministic):
    """The compiled model, under the strategy, from the run's seed."""
    replicas = r.strategy.num_replicas_in_sync
    print(f"strategy={type(r.strategy).__name__} replicas={replicas}", flush=True)
    logging.info("strategy=%s replicas=%d", type(r.strategy).__name__, replicas)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(r.config.precision)
    keras.utils.set_random_seed(r.config.seed)
    with r.strategy.scope():
        model = build_byol(
            r.config,
            replicas if sync_bn else 1,
            backbone=backbone,
            probe_classes=probe_classes(r.train, r.eval_set) if r.config.probe else None,
        )
        model.compile(
            optimizer=build_optimizer(r.config, r.steps),
            steps_per_execution=r.config.steps_per_execution,
            jit_compile=jit_compile,
        )
    return model


def _resume(r, model):
    """Restores the backup into `model` (or clears an older run's records), then writes the config."""
    if r.backup is None:
        if distribute.is_chief():
            # A fresh start (nothing to resume, or --overwrite): no stale records of an older run.
            for path in r.run.fresh_start_files():
                remove(path)
    else:
        with r.strategy.scope():
            r.backup = guards.restore_backup(model, r.out.backup_dir, model.online_trainable_variables)
        r.start_step = int(r.backup["step"])
        if distribute.is_chief():
            truncate_metrics(r.run.metrics_file, r.start_step // r.steps)
        message = f"Resumed from step {r.start_step} (backup in {r.out.backup_dir})"
        print(message, flush=True)
        logging.info(message)
    # Only now, with the model built, does the run folder appear.
    r.run.write_config(r.config)


def _tracker(r):
    """The stream position of this worker's data, from the backup's; and what a backup stores of it."""
    workers, worker = r.workers
    tracker = data_lib.StreamPosition(r.train)
    position = r.backup.get("data_position", r.start_step * r.config.batch_size // workers) if r.backup else 0
    tracker.restart(r.start_step, position[worker] if isinstance(position, list) else position)
    if isinstance(r.train, data_lib.ArraySource):
        return tracker, None  # arrays: the batch index is the position
    # Each worker streams its own share; the backup keeps every worker's position.
    if workers == 1:
        return tracker, tracker.after
    return tracker, lambda step: distribute.gather_from_workers(r.strategy, tracker.after(step))


def _callbacks(
    r, state, position_fn, knn_every, backup_every_steps, collapse_threshold, collapse_patience, on_collapse, extra
):
    """The run's callbacks, in the order they must run."""
    config, steps = r.config, r.steps
    if collapse_threshold is None:
        collapse_threshold = 0.1 / math.sqrt(config.projection_dim)
    # The EMA update first (a backup must include it), then the guards (they flag a
    # bad state), then everything that saves or logs.
    callbacks = [EMAUpdate(steps * config.epochs, config.base_tau, config.bn_stats), guards.NaNGuard(state)]
    if collapse_threshold > 0:
        callbacks.append(guards.CollapseGuard(state, collapse_threshold, collapse_patience, on_collapse))
    callbacks += list(extra or [])
    if r.eval_set is not None:
        # Before the loggers: they read the kNN accuracy from the shared logs.
        callbacks.append(
            KNNMonitor(
                eval_data(r.train, config),
                None,
                eval_data(r.eval_set, config),
                None,
                config.image_size,
                every_n_epochs=knn_every,
            )
        )
    callbacks += [
        guards.StepBackup(r.run.backup_dir, backup_every_steps or steps, steps, state, r.run_info, position_fn),
        keras.callbacks.CSVLogger(r.run.metrics_file, append=True),
        keras.callbacks.TensorBoard(r.run.tensorboard_dir, update_freq=max(1, steps // 10)),
        guards.SafeCheckpoint(r.run.checkpoint_file, state),
    ]
    if os.path.isfile(r.run.checkpoint_file):
        # Written at the end of the last whole epoch before the backup.
        epoch = r.start_step // steps
        state.last_good["checkpoint"] = {"path": r.run.checkpoint_file, "step": epoch * steps, "epoch": epoch}
    if r.backup:
        state.last_good["backup"] = {"path": r.backup["folder"], "step": r.start_step, "epoch": r.backup.get("epoch")}
    return callbacks


def _fit(r, model, callbacks, state, tracker, streamed, knn_every, verbose, autotune):
    """`model.fit` from the start step: the rest of an interrupted epoch, then whole epochs."""
    config, steps = r.config, r.steps
    validation = {}
    if config.probe and r.eval_set is not None:
        # The probe is validated on the kNN monitor's epochs (`val_probe_acc`).
        validation = dict(
            validation_data=eval_data(r.eval_set, config),
            validation_freq=[e for e in range(1, config.epochs + 1) if is_monitor_epoch(e, knn_every, config.epochs)],
        )

    def fit(first_step, epoch, end_epoch, steps_per_epoch):
        # The stream is a pure function of the position: resume where step `first_step` starts.
        position = tracker.after(first_step) if streamed else None  # arrays: the batch index

        def make(context=None):
            return data_lib.pretrain_dataset(
                r.train,
                config.batch_size,
                config.augment,
                seed=config.seed,
                autotune=autotune,
                start_step=first_step,
                start_position=position,
                with_labels=config.probe,
                tracker=tracker,
                input_context=context,
                augment_on=config.augment_on,
            )

        # Several workers: each builds its own share (its files), in per-replica batches.
        dataset = r.strategy.distribute_datasets_from_function(make) if r.workers[0] > 1 else make()
        return model.fit(
            dataset,
            initial_epoch=epoch,
            epochs=end_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=callbacks,
            verbose=verbose,
            **validation,
        ).history

    logging.info(
        "Pretraining %s on %d images: %d epochs x %d steps, global batch %d, peak lr %.4g",
        config.backbone,
        r.train.num_examples,
        config.epochs,
        steps,
        config.batch_size,
        config.peak_lr,
    )
    history = {}
    epoch, offset = divmod(r.start_step, steps)
    if offset and epoch < config.epochs:
        history = fit(r.start_step, epoch, epoch + 1, steps - offset)
        epoch += 1
    if epoch < config.epochs and not state.stopped:
        history = fit(epoch * steps, epoch, config.epochs, steps)
    return history


def _summarise(r, model, history, state, train_seconds, compare_random_init):
    """Writes `summary.json`, the encoder and the plots; returns the summary."""
    config, train = r.config, r.train
    steps_done = guards._step(model)
    summary = {
        "version": __version__,
        "status": state.status,
        "preset": config.preset,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "steps": steps_done,
        "total_steps": r.steps * config.epochs,
        "resumed_from_step": r.start_step if r.backup else None,
        "train_seconds": round(train_seconds, 1),
        "images_per_sec": round((steps_done - r.start_step) * config.batch_size / max(train_seconds, 1e-9), 1),
        "num_train_images": train.num_examples,
        "num_skipped": sum(distribute.gather_from_workers(r.strategy, train.num_skipped)),
        # This worker's (every worker logs its own); `num_skipped` counts them all.
        "skipped_files": [list(item) for item in train.skips.items()[:100]],
        "strategy": type(r.strategy).__name__,
        "replicas": r.strategy.num_replicas_in_sync,
        "final": {k: float(v[-1]) for k, v in history.items() if len(v)},
    }
    if state.stopped:
        summary.update(message=state.message, last_good=state.last_good)
        print(f"{state.message} {state.good_checkpoint_text()}", flush=True)
        logging.error("%s %s", state.message, state.good_checkpoint_text())
    else:
        model.encoder.save(r.run.encoder_file)
        if r.eval_set is not None:
            # The monitor always evaluates the last epoch; reuse it rather than embed twice.
            knn_history = history.get("knn_acc", [])
            summary["knn_acc"] = (
                float(knn_history[-1]) if knn_history else knn_eval(model.encoder, config, train, r.eval_set)
            )
            if compare_random_init:
                summary["knn_acc_random_init"] = knn_eval(random_init_encoder(config), config, train, r.eval_set)
            logging.info(
                "kNN top-1 (k=200): %.4f learned, %s at random init",
                summary["knn_acc"],
                summary.get("knn_acc_random_init", "n/a"),
            )
    guards._atomic_json(r.run.summary_file, summary)
    if distribute.is_chief():
        try:
            plot_run(
                r.run.path,
                None if state.stopped else r.eval_set,
                encoder=model.encoder,
                crop_fraction=config.eval_crop_fraction,
            )
        except Exception as error:  # A plotting failure must not fail a finished run.
            logging.warning("Plots failed: %s", error)
    if not state.stopped:
        # Finished: the backup has served its purpose. A stopped run keeps its last good backup.
        remove(r.run.backup_dir)
    if r.run.path != r.out.path:
        remove(r.run.path)
    return summary


def run_pretraining(
    config: PretrainConfig,
    train,
    out_dir: str,
    eval_set=None,
    knn_every: int = 1,
    backup_every_steps: Optional[int] = None,
    compare_random_init: bool = True,
    verbose: int = 2,
    overwrite: bool = False,
    autotune: bool = True,
    strategy: Optional[tf.distribute.Strategy] = None,
    jit_compile="auto",
    sync_bn: bool = True,
    deterministic: bool = False,
    collapse_threshold: Optional[float] = None,
    collapse_patience: int = 50,
    on_collapse: str = "stop",
    backbone: Optional[keras.Model] = None,
    callbacks: Optional[list] = None,
) -> dict:
    """Pretrains BYOL on `train` and writes the run folder, resuming from its backup if there is one.

    Args:
        config: a `byol_tf.config.PretrainConfig`.
        train: the training images: a `data.Source` (`data.open_source`),
            or an `ImageSet`.
        out_dir: the run folder (`RunDir`).
        eval_set: optional labelled source for kNN; the memory is `train`,
            which must then be labelled.
        knn_every: run the kNN monitor every this many epochs.
        backup_every_steps: back up for resume every this many steps
            (default: every epoch). A rerun with the same configuration
            resumes from the newest backup, mid-epoch included, exactly.
        compare_random_init: at the end, also report the kNN accuracy of the
            same backbone at random init.
        verbose: `fit` verbosity.
        overwrite: replace a finished run in `out_dir`.
        autotune: tf.data autotuning (see `data.pretrain_dataset`).
        strategy: a `tf.distribute.Strategy` (default: the current one).
        jit_compile: passed to `compile`.
        sync_bn: synchronise BatchNorm across replicas when there are several.
        deterministic: `tf.config.experimental.enable_op_determinism()`, so
            that a run (and a killed-and-resumed run) is bit-reproducible.
        collapse_threshold: per-batch `collapse_std` below which the
            collapse guard counts a step as collapsed; default
            `0.1 / sqrt(projection_dim)` (a tenth of the healthy value);
            0 turns the guard off.
        collapse_patience: consecutive collapsed steps before acting.
        on_collapse: "stop" or "warn".
        backbone: optional `keras.Model` to use instead of `config.backbone`.
        callbacks: extra Keras callbacks, run after the guards.

    Returns:
        The summary dict that is also written to `summary.json`; its
        `status` is "finished", "stopped_nan" or "stopped_collapse".
    """
    r = _validate(
        config, train, eval_set, out_dir, strategy, overwrite, backup_every_steps, on_collapse, collapse_patience
    )
    model = _build(r, sync_bn, backbone, jit_compile, deterministic)
    _resume(r, model)
    tracker, position_fn = _tracker(r)
    state = guards.GuardState()
    callback_list = _callbacks(
        r,
        state,
        position_fn,
        knn_every,
        backup_every_steps,
        collapse_threshold,
        collapse_patience,
        on_collapse,
        callbacks,
    )
    start = time.time()
    history = _fit(r, model, callback_list, state, tracker, position_fn is not None, knn_every, verbose, autotune)
    return _summarise(r, model, history, state, time.time() - start, compare_random_init)
