"""Reliability callbacks: NaN and collapse guards, safe saves (exact resume: `byol_tf.backup`).

- `NaNGuard` stops at the first non-finite loss, before anything is saved.
- `CollapseGuard` watches each batch's `collapse_std` and stops (or warns)
  after `patience` steps below a threshold.
- `SafeCheckpoint` writes `checkpoints/byol.keras` each epoch, atomically,
  and never from a state a guard has flagged.

All of them share one `GuardState`, which also records the last good
checkpoint so the run can say where it is.
"""

import math
import os

import keras
import numpy as np
from absl import logging

FINISHED = "finished"
STOPPED_NAN = "stopped_nan"
STOPPED_COLLAPSE = "stopped_collapse"


class GuardState:
    """What the guards found, shared by the guards and the savers.

    Attributes:
        status: `FINISHED` (nothing went wrong, so far), `STOPPED_NAN` or
            `STOPPED_COLLAPSE`.
        message: what happened, for people.
        hold_saves: True while the current state is suspect (a collapse
            streak is running): savers skip, keeping the last good files.
        last_good: `{"path", "step", "epoch"}` of the newest save known good,
            per kind ("backup", "checkpoint").
    """

    def __init__(self):
        self.status = FINISHED
        self.message = ""
        self.hold_saves = False
        self.last_good = {}

    @property
    def stopped(self):
        return self.status != FINISHED

    def trip(self, status, message, model):
        self.status = status
        self.message = message
        model.stop_training = True

    def good_checkpoint_text(self):
        """Where the newest good saved state is, as a sentence."""
        if not self.last_good:
            return "No good checkpoint was saved before this happened."
        parts = [
            f"{kind} at step {info['step']}: {info['path']}"
            for kind, info in sorted(self.last_good.items(), key=lambda kv: -kv[1]["step"])
        ]
        return "Last good state (kept): " + "; ".join(parts) + "."


def optimizer_step(model):
    return int(model.optimizer.iterations.numpy())


def finite_logs(logs, key="loss"):
    value = (logs or {}).get(key)
    if value is None:
        return True
    return bool(np.all(np.isfinite(np.asarray(value, dtype=np.float64))))


class NaNGuard(keras.callbacks.Callback):
    """Stops training at the first batch whose loss is NaN or infinite.

    The loss in the batch logs is the epoch's running mean, which stays
    non-finite once any batch was: this fires on that batch. Put it before
    the savers in the callback list: they skip once `state.stopped` is set.
    """

    def __init__(self, state):
        super().__init__()
        self.state = state
        self._epoch = 0

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch

    def on_train_batch_end(self, batch, logs=None):
        if self.state.stopped or finite_logs(logs):
            return
        step = optimizer_step(self.model)
        loss = (logs or {}).get("loss")
        self.state.trip(
            STOPPED_NAN,
            f"The loss became {float(np.asarray(loss)):.4g} at step {step} (epoch {self._epoch + 1}); "
            "training stopped and nothing was saved from that state (try a lower --lr).",
            self.model,
        )
        logging.error(self.state.message)


class CollapseGuard(keras.callbacks.Callback):
    """Detects representation collapse from each batch's `collapse_std`.

    The batch value is recovered from the model's `collapse_tracker`
    (a `keras.metrics.Mean`): the change in its total over the change in its
    count since the previous batch callback. After `patience` consecutive
    steps below `threshold`, `action="stop"` stops training and
    `action="warn"` logs a warning once per streak. While a streak runs the
    savers hold off (stop mode), so the last saved files predate it.

    Args:
        state: the shared `GuardState`.
        threshold: collapse_std below this counts as collapsed (healthy is
            about `1 / sqrt(projection_dim)`).
        patience: consecutive collapsed steps before acting.
        action: "stop" or "warn".
    """

    def __init__(self, state, threshold, patience=50, action="stop"):
        super().__init__()
        if action not in ("stop", "warn"):
            raise ValueError(f"`action` must be 'stop' or 'warn'. Received: action={action!r}")
        if patience < 1:
            raise ValueError(f"`patience` must be >= 1. Received: patience={patience!r}")
        self.state = state
        self.threshold = float(threshold)
        self.patience = int(patience)
        self.action = action
        self.streak = 0
        self.streak_start = None
        self.values = []  # (step, per-batch collapse_std), for tests and logs
        self._total = 0.0
        self._count = 0.0
        self._epoch = 0
        self._warned = False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch = epoch
        self._total, self._count = 0.0, 0.0

    def _batch_value(self, logs):
        tracker = getattr(self.model, "collapse_tracker", None)
        if tracker is not None and hasattr(tracker, "total") and hasattr(tracker, "count"):
            total, count = float(tracker.total.numpy()), float(tracker.count.numpy())
            if count < self._count:  # reset between our callbacks
                self._total, self._count = 0.0, 0.0
            steps = count - self._count
            value = (total - self._total) / steps if steps > 0 else None
            self._total, self._count = total, count
            return value, max(int(round(steps)), 1)
        value = (logs or {}).get("collapse_std")
        return (None if value is None else float(value)), 1

    def on_train_batch_end(self, batch, logs=None):
        if self.state.stopped:
            return
        value, steps = self._batch_value(logs)
        if value is None or not math.isfinite(value):
            return
        step = optimizer_step(self.model)
        self.values.append((step, value))
        if value >= self.threshold:
            if self.streak:
                logging.info("collapse_std recovered to %.4g at step %d.", value, step)
            self.streak, self.streak_start, self._warned = 0, None, False
            self.state.hold_saves = False
            return
        if not self.streak:
            self.streak_start = step - steps + 1
            # The savers keep what they have until the streak is resolved.
            self.state.hold_saves = self.action == "stop" or not self._warned
        self.streak += steps
        if self.streak < self.patience:
            return
        message = (
            f"Representation collapse: collapse_std stayed below {self.threshold:.4g} for {self.streak} steps "
            f"(steps {self.streak_start}-{step}, epoch {self._epoch + 1}; last value {value:.3g}, healthy is about "
            "1/sqrt(projection_dim))"
        )
        if self.action == "stop":
            self.state.trip(STOPPED_COLLAPSE, message + "; training stopped.", self.model)
            logging.error(self.state.message)
        elif not self._warned:
            self._warned = True
            self.state.hold_saves = False
            logging.warning("%s; continuing (--on_collapse=warn). %s", message, self.state.good_checkpoint_text())
            print(f"WARNING: {message}; continuing (--on_collapse=warn).", flush=True)


class SafeCheckpoint(keras.callbacks.Callback):
    """Saves the whole model (`.keras`) at each epoch end, atomically.

    Written to a temporary file then `os.replace`d, and skipped when the
    loss is not finite, a guard stopped the run or a collapse streak holds
    saves: the file on disk is always the last good state.
    """

    def __init__(self, path, state):
        super().__init__()
        self.path = path
        self.state = state

    def on_epoch_end(self, epoch, logs=None):
        if self.state.stopped or self.state.hold_saves or not finite_logs(logs):
            return
        folder = os.path.dirname(self.path) or "."
        os.makedirs(folder, exist_ok=True)
        tmp = os.path.join(folder, ".tmp-" + os.path.basename(self.path))
        self.model.save(tmp)
        os.replace(tmp, self.path)
        self.state.last_good["checkpoint"] = {"path": self.path, "step": optimizer_step(self.model), "epoch": epoch + 1}
