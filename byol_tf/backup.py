"""Exact resume: `StepBackup` saves the whole training state every N steps, `restore_backup` loads it.

The state is online and target weights, BatchNorm statistics, tau, the
optimizer's slots and its step counter, written atomically. The step is also
the data position: `byol_tf.data.pretrain_dataset` is a pure function of
`(seed, batch index)`, so batch `step` is where to resume.

Keras's own `BackupAndRestore` is not used: in Keras 3.15 it restores only the
epoch (`model._initial_epoch`), so a mid-epoch backup replays the epoch from
its first batch with weights that already saw part of it.
"""

import json
import os
import shutil
import time

import keras

from byol_tf.guards import finite_logs, optimizer_step

STATE_FILE = "latest.json"
WEIGHTS_FILE = "state.weights.h5"


def atomic_json(path, value):
    """Writes `value` as JSON to `path` through a temporary file: a reader sees the old or the new file."""
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


class StepBackup(keras.callbacks.Callback):
    """Backs up the full training state every `every_steps` optimizer steps.

    Each backup goes to a fresh folder `backup_dir/step-NNNNNNNN/` (weights
    file and a `run.json`); then `backup_dir/latest.json` is replaced
    atomically to point at it, and older step folders are removed. A kill at
    any moment leaves `latest.json` pointing at a complete backup.

    The weights file holds every model variable (online and target networks,
    BatchNorm statistics, tau) and the optimizer's variables, its step counter
    included; `run.json` holds the step, the epoch and the batch within it
    (the data position), and `run_info` (data and schedule facts checked on
    resume).

    Args:
        backup_dir: folder for the backups.
        every_steps: optimizer steps between backups.
        steps_per_epoch: to record epoch and batch.
        state: the shared `GuardState`; no backup from a stopped or held state.
        run_info: JSON-able dict stored with every backup.
        position_fn: `step -> stream position` after that many steps, stored
            as `data_position` (streamed sources skip failed files, so the
            position is not `step * batch_size`).
    """

    def __init__(self, backup_dir, every_steps, steps_per_epoch, state, run_info=None, position_fn=None):
        super().__init__()
        if every_steps < 1:
            raise ValueError(f"`every_steps` must be >= 1. Received: every_steps={every_steps!r}")
        self.backup_dir = backup_dir
        self.every_steps = int(every_steps)
        self.steps_per_epoch = int(steps_per_epoch)
        self.state = state
        self.run_info = dict(run_info or {})
        self.position_fn = position_fn
        self._last_saved = None

    def on_train_begin(self, logs=None):
        self._last_saved = optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = optimizer_step(self.model)
        if step - self._last_saved < self.every_steps:
            return
        if self.state.stopped or self.state.hold_saves or not finite_logs(logs):
            return
        self.save(step)

    def save(self, step):
        os.makedirs(self.backup_dir, exist_ok=True)
        name = f"step-{step:08d}"
        folder = os.path.join(self.backup_dir, name)
        tmp = os.path.join(self.backup_dir, f".tmp-{name}")
        shutil.rmtree(tmp, ignore_errors=True)
        os.makedirs(tmp)
        self.model.save_weights(os.path.join(tmp, WEIGHTS_FILE))
        epoch, batch = divmod(step, self.steps_per_epoch)
        info = {
            "step": step,
            "epoch": epoch,
            "batch_in_epoch": batch,
            "data_batch_index": step,
            "time": time.time(),
            "run_info": self.run_info,
        }
        if self.position_fn is not None:
            info["data_position"] = self.position_fn(step)
        atomic_json(os.path.join(tmp, "run.json"), info)
        shutil.rmtree(folder, ignore_errors=True)
        os.replace(tmp, folder)
        atomic_json(os.path.join(self.backup_dir, STATE_FILE), {"folder": name, "step": step})
        for old in os.listdir(self.backup_dir):
            if old.startswith(("step-", ".tmp-step-")) and old != name:
                shutil.rmtree(os.path.join(self.backup_dir, old), ignore_errors=True)
        self._last_saved = step
        self.state.last_good["backup"] = {"path": folder, "step": step, "epoch": epoch}


def read_backup(backup_dir):
    """The newest complete backup's `run.json` (plus `weights_path`), or None."""
    pointer = os.path.join(backup_dir, STATE_FILE)
    if not os.path.isfile(pointer):
        return None
    with open(pointer) as f:
        latest = json.load(f)
    folder = os.path.join(backup_dir, os.path.basename(str(latest["folder"])))
    with open(os.path.join(folder, "run.json")) as f:
        info = json.load(f)
    info["weights_path"] = os.path.join(folder, WEIGHTS_FILE)
    info["folder"] = folder
    return info


def restore_backup(model, backup_dir, build_optimizer_on):
    """Loads the newest backup into a compiled `model`; returns its info or None.

    Args:
        model: the compiled model, built as when the backup was written.
        backup_dir: the folder `StepBackup` writes to.
        build_optimizer_on: the variables the optimizer trains, in the order
            `train_step` applies gradients to them (its slots are stored in
            that order).
    """
    info = read_backup(backup_dir)
    if info is None:
        return None
    if model.optimizer is not None and not model.optimizer.built:
        model.optimizer.build(build_optimizer_on)
    model.load_weights(info["weights_path"])
    restored = optimizer_step(model)
    if restored != info["step"]:
        raise ValueError(
            f"The backup in {backup_dir} says step {info['step']} but its optimizer is at step {restored}; "
            "it does not belong to this run. Remove it or use a new --out."
        )
    return info
