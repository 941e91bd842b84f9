"""The `model.fit` part of a run: the stream position, the callbacks in their order, and the fit calls.

Each function takes the run's shared state (`training._Run`).
"""

import csv
import math
import os

import keras
from absl import logging

from byol_tf import backup as backups
from byol_tf import data as data_lib
from byol_tf import budget_run, distribute, guards
from byol_tf.ema import EMAUpdate
from byol_tf.evaluation import KNNMonitor, is_monitor_epoch
from byol_tf.run_eval import eval_data


class RunCSVLogger(keras.callbacks.CSVLogger):
    """Keras's `CSVLogger` (appending) with one set of columns for the whole run.

    Keras takes the columns from the first epoch it sees in each `fit`, so a
    metric logged on some epochs only (`knn_acc` every few epochs) was lost,
    and a run made of several fits (resume, a time budget's warm-up) wrote
    rows that did not match the header. Here the columns are the existing
    file's header or, for a new file, the first epoch's plus `extra`.
    """

    def __init__(self, filename, extra=()):
        super().__init__(filename, append=True)
        self.extra = list(extra)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self.keys = None
        if os.path.isfile(self.filename):
            with open(self.filename, newline="") as f:
                header = next(csv.reader(f), None)
            if header and header[0] == "epoch":
                self.keys = header[1:]

    def on_epoch_end(self, epoch, logs=None):
        if self.keys is None:
            keys = sorted(set(logs or {}) | set(self.extra))
            # As Keras does: validation columns even when the first epoch has none.
            self.keys = keys if any(k.startswith("val_") for k in keys) else keys + [f"val_{k}" for k in keys]
        super().on_epoch_end(epoch, logs)


def stream_tracker(r):
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


def run_callbacks(r, state, position_fn, backup_every_steps, collapse_threshold, collapse_patience, on_collapse, extra):
    """The run's callbacks, in the order they must run."""
    config, steps = r.config, r.steps
    if collapse_threshold is None:
        collapse_threshold = 0.1 / math.sqrt(config.projection_dim)
    # The EMA update first (a backup must include it), then the guards (they flag a
    # bad state), then everything that saves or logs.
    ema = EMAUpdate(config.schedule_steps(r.total_steps), config.base_tau, config.bn_stats)
    callbacks = [ema, guards.NaNGuard(state)]
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
                every_n_epochs=r.knn_every,  # a time budget's plan may change it
                last_epoch=lambda: r.config.epochs,  # a time budget's plan sets it
            )
        )
    callbacks += [
        backups.StepBackup(r.run.backup_dir, backup_every_steps or steps, steps, state, r.run_info, position_fn),
        RunCSVLogger(r.run.metrics_file, extra=["knn_acc"] if r.eval_set is not None else []),
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


class _MonitorEpochs(list):
    """Keras's `validation_freq` (a list, for Keras): the kNN monitor's epochs, as a budget's re-plans move the last."""

    def __init__(self, r):
        super().__init__()
        self.r = r

    def __contains__(self, epoch):
        return is_monitor_epoch(epoch, self.r.knn_every, self.r.config.epochs)


def fit_run(r, model, callbacks, state, tracker, streamed, verbose, autotune):
    """`model.fit` from the start step: the rest of an interrupted epoch, then one fit of the other epochs.

    With a time budget and no plan yet, a measured warm-up plans the steps
    first (`byol_tf.budget_run`). Its `BudgetWatch` ends the fit at the plan's
    last step (the last epoch may be partial) and re-plans inside the fit,
    whose `epochs` leaves room for a re-plan to add up to as many again.
    """
    steps = r.steps

    def fit(first_step, epoch, end_epoch, steps_per_epoch, warm_up_callbacks=None):
        # A time budget's warm-up fits with its own few callbacks and no validation.
        callback_list = callbacks if warm_up_callbacks is None else warm_up_callbacks
        config = r.config  # a budget's plan sets its epochs
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

        validation = {}
        if config.probe and r.eval_set is not None and warm_up_callbacks is None:
            # The probe is validated on the kNN monitor's epochs (`val_probe_acc`).
            validation = dict(validation_data=eval_data(r.eval_set, config), validation_freq=_MonitorEpochs(r))
        # Several workers: each builds its own share (its files), in per-replica batches.
        dataset = r.strategy.distribute_datasets_from_function(make) if r.workers[0] > 1 else make()
        return model.fit(
            dataset,
            initial_epoch=epoch,
            epochs=end_epoch,
            steps_per_epoch=steps_per_epoch,
            callbacks=callback_list,
            verbose=verbose,
            **validation,
        ).history

    fit_epochs = r.config.epochs
    if r.config.time_budget:
        resumed = r.plan is not None  # a resumed run keeps its plan: its clock is unknown
        if not resumed:
            budget_run.warm_up_and_plan(r, model, fit, callbacks)
        fit_epochs = 2 * r.config.epochs + 1
        callbacks.append(
            budget_run.BudgetWatch(
                r.plan,
                r.started,
                replan=lambda seconds_per_step, step: budget_run.replan(
                    r, model, callbacks, seconds_per_step, step, fit_epochs * steps
                ),
                agree=budget_run.worker_agreement(r),
                frozen=resumed,
            )
        )
    config = r.config
    logging.info(
        "Pretraining %s on %d examples: %d steps (%d epochs x %d), global batch %d, peak lr %.4g",
        config.backbone,
        r.train.num_examples,
        r.total_steps,
        config.epochs,
        steps,
        config.batch_size,
        config.peak_lr,
    )
    history = {}
    step = r.start_step
    epoch, offset = divmod(step, steps)
    if offset and step < r.total_steps:
        # The rest of an interrupted epoch (a resume, a budget's warm-up): a fit of its own.
        history = fit(step, epoch, epoch + 1, min(steps, r.total_steps - epoch * steps) - offset)
        step = guards.optimizer_step(model)
    if step < r.total_steps and not state.stopped:
        history = fit(step, step // steps, fit_epochs, steps)
    return history
