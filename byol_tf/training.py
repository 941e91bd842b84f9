"""One pretraining run: data -> model -> `fit` -> artefacts in a run folder.

The run folder holds `config.json`, `metrics.csv`, `tensorboard/`,
`backup/` (the full training state every N steps, for an exact resume),
`checkpoints/byol.keras` (the whole model, each epoch), `encoder.keras`
(the final online encoder) and `summary.json` (with the run's `status`).
"""

import csv
import json
import math
import os
import shutil
import tempfile
import time

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

SUMMARY = "summary.json"
CONFIG = "config.json"
BACKUP = "backup"


def check_out_dir(out_dir, overwrite=False):
    """Refuses to reuse a folder that holds a finished (or stopped) run, unless `overwrite`."""
    path = os.path.join(out_dir, SUMMARY)
    if os.path.exists(path) and not overwrite:
        try:
            with open(path) as f:
                status = json.load(f).get("status", "finished")
        except (OSError, ValueError):
            status = "unknown"
        raise ValueError(
            f"`out` holds a finished run (status={status}); pass overwrite=True (--overwrite) to replace it. "
            f"Received: out={out_dir!r}"
        )


def _flatten(values, prefix=""):
    flat = {}
    for key, value in values.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def config_differences(old, new):
    """`[(field, old, new)]` for the fields where two config dicts differ (augment fields as `augment.NAME`)."""
    # A JSON round trip makes tuples lists on both sides.
    old, new = _flatten(json.loads(json.dumps(old))), _flatten(json.loads(json.dumps(new)))
    return [(k, old.get(k), new.get(k)) for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]


def probe_classes(train, eval_set=None):
    """Classes for the online linear probe: the class names, or enough for every label of in-memory sets."""
    labels = [int(np.max(s.labels)) + 1 for s in (train, eval_set)
              if s is not None and getattr(s, "labels", None) is not None and len(s.labels)]
    count = max([len(s.class_names or []) for s in (train, eval_set) if s is not None] + labels)
    # A probe needs two classes; a one-class set still gets a valid (if trivial) probe.
    return max(2, count)


def _with_defaults(values):
    """A saved config dict with the fields added since it was written at their defaults.

    One that no longer parses is returned as it is, to be reported field by field.
    """
    try:
        return PretrainConfig.from_dict(values).to_dict()
    except (TypeError, ValueError):
        return values


def check_resume(out_dir, config, overwrite=False):
    """Refuses to resume `out_dir` with a configuration other than the one in its `config.json`.

    Returns True if `out_dir` holds a backup this run will resume from. With
    `overwrite`, a differing run folder is started over instead (its backup
    is ignored and replaced).
    """
    path = os.path.join(out_dir, CONFIG)
    has_backup = guards.read_backup(os.path.join(out_dir, BACKUP)) is not None
    if not os.path.isfile(path):
        return has_backup
    with open(path) as f:
        old = _with_defaults(json.load(f))
    differences = config_differences(old, config.to_dict())
    if not differences:
        return has_backup
    if overwrite:
        return False
    listed = "; ".join(f"{k}: {a!r} in {path} vs {b!r} now" for k, a, b in differences)
    raise ValueError(
        f"Cannot resume the run in {out_dir!r} with a different configuration ({listed}). "
        f"Rerun with the same settings, choose another --out, or pass --overwrite to start over. "
        f"Received: out={out_dir!r}"
    )


def _truncate_metrics(path, epoch):
    """Drops the rows of epochs >= `epoch` (0-based) from `metrics.csv`: a resumed run writes them again."""
    if not os.path.isfile(path):
        return
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    if not rows or "epoch" not in rows[0]:
        return
    column = rows[0].index("epoch")
    keep = [rows[0]] + [r for r in rows[1:] if len(r) > column and r[column].isdigit() and int(r[column]) < epoch]
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        csv.writer(f).writerows(keep)
    os.replace(tmp, path)


def _remove(path):
    if os.path.isdir(path):
        shutil.rmtree(path, ignore_errors=True)
    elif os.path.exists(path):
        os.remove(path)


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
    return build_encoder(config.backbone, config.image_size, bn_momentum=config.bn_momentum, bn_epsilon=config.bn_epsilon)


def run_pretraining(config, train, out_dir, eval_set=None, knn_every=1, backup_every_steps=None,
                    compare_random_init=True, verbose=2, overwrite=False, autotune=True, strategy=None,
                    jit_compile="auto", sync_bn=True, deterministic=False, collapse_threshold=None,
                    collapse_patience=50, on_collapse="stop", backbone=None, callbacks=None):
    """Pretrains BYOL on `train` and writes the run folder, resuming from its backup if there is one.

    Args:
        config: a `byol_tf.config.PretrainConfig`.
        train: the training images: a `data.Source` (`data.open_source`),
            or an `ImageSet`.
        out_dir: the run folder.
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
    check_out_dir(out_dir, overwrite)
    train = data_lib.open_source(train)
    eval_set = None if eval_set is None else data_lib.open_source(eval_set)
    if eval_set is not None and not train.labelled:
        raise ValueError(
            f"kNN evaluation uses the training images as memory, so they need labels. Received: data={train.name!r} (unlabelled)"
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
    if hasattr(distribute, "check_steps_per_execution"):
        distribute.check_steps_per_execution(config.steps_per_execution, strategy)
    replicas = strategy.num_replicas_in_sync
    workers, worker = distribute.input_pipelines(strategy)
    resuming = check_resume(out_dir, config, overwrite)
    steps = data_lib.steps_per_epoch(train.num_examples, config.batch_size)
    if steps < 1:
        raise ValueError(
            f"Not enough images for one batch: {train.num_examples} images in {train.name}. Received: batch_size={config.batch_size}"
        )
    data_lib.check_decodable(train)
    total_steps = steps * config.epochs
    run_info = {"data": train.name, "num_train_images": train.num_examples, "steps_per_epoch": steps,
                "total_steps": total_steps, "replicas": replicas, "workers": workers}
    backup_dir = os.path.join(out_dir, BACKUP)
    if resuming:
        info = guards.read_backup(backup_dir)
        differences = [(k, info["run_info"].get(k), v) for k, v in run_info.items()
                       if k in info.get("run_info", {}) and info["run_info"][k] != v]
        if differences and not overwrite:
            listed = "; ".join(f"{k}: {a!r} in the backup vs {b!r} now" for k, a, b in differences)
            raise ValueError(
                f"Cannot resume the run in {out_dir!r}: its backup was made with other data ({listed}). "
                f"Use the same --data and --limit, another --out, or --overwrite to start over. Received: out={out_dir!r}"
            )
        resuming = not differences

    print(f"strategy={type(strategy).__name__} replicas={replicas}", flush=True)
    logging.info("strategy=%s replicas=%d", type(strategy).__name__, replicas)
    if deterministic:
        tf.config.experimental.enable_op_determinism()
    keras.mixed_precision.set_global_policy(config.precision)
    keras.utils.set_random_seed(config.seed)

    with strategy.scope():
        model = build_byol(config, replicas if sync_bn else 1, backbone=backbone,
                           probe_classes=probe_classes(train, eval_set) if config.probe else None)
        model.compile(optimizer=build_optimizer(config, steps), steps_per_execution=config.steps_per_execution,
                      jit_compile=jit_compile)

    # Only the chief writes the run folder; other workers of a multi-worker
    # cluster write to a temporary folder that is deleted at the end (they
    # still read the chief's backup to resume, on a shared file system).
    chief = distribute.is_chief()
    write_dir = out_dir if chief else tempfile.mkdtemp(prefix="byol_worker_")
    if not resuming and chief:
        # A fresh start (nothing to resume, or --overwrite): no stale records of an older run.
        for name in (BACKUP, "metrics.csv", "tensorboard", "encoder.keras", SUMMARY):
            _remove(os.path.join(out_dir, name))
    start_step = 0
    if resuming:
        with strategy.scope():
            info = guards.restore_backup(model, backup_dir, model.online_trainable_variables)
        start_step = int(info["step"])
        if chief:
            _truncate_metrics(os.path.join(out_dir, "metrics.csv"), start_step // steps)
        message = f"Resumed from step {start_step} (backup in {backup_dir})"
        print(message, flush=True)
        logging.info(message)

    # Only now, with the model built, does the run folder appear.
    os.makedirs(write_dir, exist_ok=True)
    with open(os.path.join(write_dir, CONFIG), "w") as f:
        json.dump(config.to_dict(), f, indent=2)
    state = guards.GuardState()
    if collapse_threshold is None:
        collapse_threshold = 0.1 / math.sqrt(config.projection_dim)
    # Order matters: the EMA update first (a backup must include it), then the
    # guards (they flag a bad state), then everything that saves or logs.
    callback_list = [EMAUpdate(total_steps, config.base_tau, config.bn_stats), guards.NaNGuard(state)]
    if collapse_threshold > 0:
        callback_list.append(guards.CollapseGuard(state, collapse_threshold, collapse_patience, on_collapse))
    callback_list += list(callbacks or [])
    if eval_set is not None:
        # Before the loggers: they read the kNN accuracy from the shared logs.
        callback_list.append(KNNMonitor(eval_data(train, config), None, eval_data(eval_set, config), None,
                                        config.image_size, every_n_epochs=knn_every))
    checkpoint = os.path.join(write_dir, "checkpoints", "byol.keras")
    # Each worker streams its own share; the backup keeps every worker's position.
    tracker = data_lib.StreamPosition(train)
    position = info.get("data_position", start_step * config.batch_size // workers) if resuming else 0
    tracker.restart(start_step, position[worker] if isinstance(position, list) else position)
    position_fn = None
    if not isinstance(train, data_lib.ArraySource):
        position_fn = tracker.after if workers == 1 else (
            lambda step: distribute.gather_from_workers(strategy, tracker.after(step)))
    callback_list += [
        guards.StepBackup(os.path.join(write_dir, BACKUP), backup_every_steps or steps, steps, state, run_info,
                          position_fn),
        keras.callbacks.CSVLogger(os.path.join(write_dir, "metrics.csv"), append=True),
        keras.callbacks.TensorBoard(os.path.join(write_dir, "tensorboard"), update_freq=max(1, steps // 10)),
        guards.SafeCheckpoint(checkpoint, state),
    ]
    if os.path.isfile(checkpoint):
        # Written at the end of the last whole epoch before the backup.
        state.last_good["checkpoint"] = {"path": checkpoint, "step": (start_step // steps) * steps,
                                         "epoch": start_step // steps}
    if resuming:
        state.last_good["backup"] = {"path": info["folder"], "step": start_step, "epoch": info.get("epoch")}
    pause = guards.TestPause.from_env()
    if pause is not None:
        callback_list.append(pause)
    logging.info("Pretraining %s on %d images: %d epochs x %d steps, global batch %d, peak lr %.4g",
                 config.backbone, train.num_examples, config.epochs, steps, config.batch_size, config.peak_lr)

    validation = {}
    if config.probe and eval_set is not None:
        # The probe is validated on the kNN monitor's epochs (`val_probe_acc`).
        validation = dict(
            validation_data=eval_data(eval_set, config),
            validation_freq=[e for e in range(1, config.epochs + 1) if is_monitor_epoch(e, knn_every, config.epochs)],
        )

    def fit(first_step, epoch, end_epoch, steps_per_epoch):
        # The stream is a pure function of the position: resume where step `first_step` starts.
        position = tracker.after(first_step) if position_fn is not None else None  # arrays: the batch index

        def make(context=None):
            return data_lib.pretrain_dataset(train, config.batch_size, config.augment, seed=config.seed,
                                             autotune=autotune, start_step=first_step, start_position=position,
                                             with_labels=config.probe, tracker=tracker, input_context=context,
                                             augment_on=config.augment_on)

        # Several workers: each builds its own share (its files), in per-replica batches.
        dataset = strategy.distribute_datasets_from_function(make) if workers > 1 else make()
        return model.fit(dataset, initial_epoch=epoch, epochs=end_epoch, steps_per_epoch=steps_per_epoch,
                         callbacks=callback_list, verbose=verbose, **validation).history

    start = time.time()
    history = {}
    epoch, offset = divmod(start_step, steps)
    if offset and epoch < config.epochs:
        # The rest of the interrupted epoch, then whole epochs.
        history = fit(start_step, epoch, epoch + 1, steps - offset)
        epoch += 1
    if epoch < config.epochs and not state.stopped:
        history = fit(epoch * steps, epoch, config.epochs, steps)
    train_seconds = time.time() - start
    steps_done = guards._step(model)

    summary = {
        "version": __version__,
        "status": state.status,
        "preset": config.preset,
        "backbone": config.backbone,
        "image_size": config.image_size,
        "steps": steps_done,
        "total_steps": total_steps,
        "resumed_from_step": start_step if resuming else None,
        "train_seconds": round(train_seconds, 1),
        "images_per_sec": round((steps_done - start_step) * config.batch_size / max(train_seconds, 1e-9), 1),
        "num_train_images": train.num_examples,
        "num_skipped": sum(distribute.gather_from_workers(strategy, train.num_skipped)),
        # This worker's (every worker logs its own); `num_skipped` counts them all.
        "skipped_files": [list(item) for item in train.skips.items()[:100]],
        "strategy": type(strategy).__name__,
        "replicas": replicas,
        "final": {k: float(v[-1]) for k, v in history.items() if len(v)},
    }
    if state.stopped:
        summary["message"] = state.message
        summary["last_good"] = state.last_good
        print(f"{state.message} {state.good_checkpoint_text()}", flush=True)
        logging.error("%s %s", state.message, state.good_checkpoint_text())
    else:
        model.encoder.save(os.path.join(write_dir, "encoder.keras"))
        if eval_set is not None:
            # The monitor always evaluates the last epoch; reuse it rather than embed twice.
            knn_history = history.get("knn_acc", [])
            summary["knn_acc"] = float(knn_history[-1]) if knn_history else knn_eval(
                model.encoder, config, train, eval_set)
            if compare_random_init:
                summary["knn_acc_random_init"] = knn_eval(random_init_encoder(config), config, train, eval_set)
            logging.info("kNN top-1 (k=200): %.4f learned, %s at random init", summary["knn_acc"],
                         summary.get("knn_acc_random_init", "n/a"))
    guards._atomic_json(os.path.join(write_dir, SUMMARY), summary)
    if chief:
        try:
            plot_run(write_dir, None if state.stopped else eval_set, encoder=model.encoder,
                     crop_fraction=config.eval_crop_fraction)
        except Exception as error:  # A plotting failure must not fail a finished run.
            logging.warning("Plots failed: %s", error)
    if not state.stopped:
        # Finished: the backup has served its purpose. A stopped run keeps its last good backup.
        _remove(os.path.join(write_dir, BACKUP))
    if not chief:
        shutil.rmtree(write_dir, ignore_errors=True)
    return summary
