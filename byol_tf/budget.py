"""Training to a wall-clock budget: a measured warm-up, then the run's length planned to fit.

With `PretrainConfig.time_budget` set, a run (`byol_tf.training`) first
measures what a kNN check costs (the kNN of the step-0 encoder, which is the
random-init baseline the summary reports) and what a training step costs (a
short warm-up fit), then plans the number of epochs so that training, the
kNN checks and the final evaluation end inside the budget. The learning-rate
cosine and the tau schedule are then laid over the planned steps. The plan is
logged, written to `RUN/plan.json`, re-planned at most once if the measured
epoch time drifts by more than 15%, and kept as it is on resume.
"""

import dataclasses
import json
import math
import os
import re
import time
from typing import Optional

import keras
import numpy as np
from absl import logging

# "1h30m", "20m", "90s", "8h" or a plain number of seconds.
_DURATION = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")
# Steps the warm-up times, after the first ones that trace and compile.
WARMUP_TIMED_STEPS = 20
WARMUP_UNTIMED_STEPS = 3
# An epoch time this far from the plan's (as a fraction) triggers the one re-plan.
REPLAN_DRIFT = 0.15


def parse_duration(text) -> float:
    """Seconds in `"90s"`, `"20m"`, `"8h"`, `"1h30m"` or a plain number of seconds.

    >>> parse_duration("1h30m")
    5400.0
    """
    value = str(text).strip().lower()
    match = _DURATION.match(value)
    if value and re.fullmatch(r"\d+(\.\d+)?", value):
        seconds = float(value)
    elif value and match:
        seconds = sum(float(match.group(unit) or 0) * scale for unit, scale in (("h", 3600), ("m", 60), ("s", 1)))
    else:
        raise ValueError(f"`time_budget` must look like 90s, 20m, 8h or 1h30m. Received: time_budget={text!r}")
    if seconds <= 0:
        raise ValueError(f"`time_budget` must be > 0. Received: time_budget={text!r}")
    return seconds


def plan_epochs(remaining_s, seconds_per_step, steps_per_epoch, knn_seconds, knn_every, reserve_s) -> int:
    """The most whole epochs whose training and kNN checks fit in `remaining_s - reserve_s`.

    An epoch costs `seconds_per_step * steps_per_epoch` plus `knn_seconds / knn_every`
    (one check every `knn_every` epochs); the last epoch always has a check, hence
    one more `knn_seconds`. At least one epoch.
    """
    per_epoch = seconds_per_step * steps_per_epoch + knn_seconds / knn_every
    return max(1, int(math.floor((remaining_s - reserve_s - knn_seconds) / per_epoch)))


@dataclasses.dataclass
class Plan:
    """The plan of a budgeted run, as written to `plan.json`.

    `seconds_per_step` is the warm-up's median step; after a re-plan, the
    measured seconds per epoch (kNN checks and checkpoints included) / steps.
    """

    time_budget_s: float
    epochs: int
    steps_per_epoch: int
    seconds_per_step: float
    knn_seconds: float
    planned_at_s: float
    images_per_sec: float
    replanned: bool = False
    replanned_at_epoch: Optional[int] = None

    @property
    def total_steps(self) -> int:
        return self.epochs * self.steps_per_epoch

    def write(self, path):
        from byol_tf.backup import atomic_json

        atomic_json(path, {**dataclasses.asdict(self), "total_steps": self.total_steps})

    @classmethod
    def read(cls, path) -> Optional["Plan"]:
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            values = json.load(f)
        values.pop("total_steps", None)
        return cls(**values)

    def describe(self) -> str:
        return (
            f"planned {self.total_steps} steps ({self.epochs} epochs x {self.steps_per_epoch}) from "
            f"{self.images_per_sec:.1f} img/s and {self.knn_seconds:.1f} s per kNN check, "
            f"in a budget of {self.time_budget_s:.0f} s"
        )


class StepTimer(keras.callbacks.Callback):
    """The wall time of each optimizer step (batch callbacks fire once per `steps_per_execution`)."""

    def __init__(self):
        super().__init__()
        self.times = []
        self._last = None

    def on_train_begin(self, logs=None):
        self._last = None  # the gap between two fits is not a step

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._last is not None:
            self.times.append((now - self._last) / max(1, int(getattr(self.model, "steps_per_execution", 1))))
        self._last = now

    def seconds_per_step(self, skip=0) -> Optional[float]:
        """The median step time, leaving out the first `skip` (tracing, compiling)."""
        times = self.times[skip:]
        return float(np.median(times)) if times else None


class BudgetWatch(keras.callbacks.Callback):
    """Stops `fit` at the end of an epoch once the run's epochs drift past `REPLAN_DRIFT` from the plan.

    An epoch's wall time counts everything the plan pays for: steps, kNN checks,
    checkpoints. It is averaged over at least `min(knn_every, 5)` epochs (so a
    kNN check is in the average) before it is compared. The run then re-plans
    (`replan`) and fits on; only once per run.
    """

    def __init__(self, plan: Plan, knn_every: int):
        super().__init__()
        self.plan, self.knn_every = plan, knn_every
        self.epoch_times = []
        self.drifted = None  # the measured seconds per epoch that ask for a re-plan

    def on_train_begin(self, logs=None):
        self._last = time.time()  # the gap between two fits is not an epoch

    def on_epoch_end(self, epoch, logs=None):
        now = time.time()
        self.epoch_times.append(now - self._last)
        self._last = now
        if self.plan.replanned or self.drifted is not None:
            return
        if len(self.epoch_times) < max(2, min(self.knn_every, 5)):
            return
        measured = float(np.mean(self.epoch_times))
        planned = self.plan.seconds_per_step * self.plan.steps_per_epoch + self.plan.knn_seconds / self.knn_every
        if abs(measured / planned - 1.0) > REPLAN_DRIFT:
            self.drifted = measured
            self.model.stop_training = True


def log(message):
    print(message, flush=True)
    logging.info(message)


def _schedule(optimizer):
    """The optimizer's learning-rate schedule (inside a `LossScaleOptimizer` too), or None."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if hasattr(schedule, "set_total_steps") else None


def apply_plan(r, model, callbacks, plan: Plan) -> None:
    """Lays the learning rate and tau over the plan's steps; `r.config.epochs` becomes the plan's."""
    from byol_tf.ema import EMAUpdate

    r.plan = plan
    r.config = dataclasses.replace(r.config, epochs=plan.epochs, warmup_epochs=min(r.config.warmup_epochs, plan.epochs))
    schedule = _schedule(model.optimizer)
    if schedule is not None:
        schedule.set_total_steps(max(plan.total_steps, schedule.warmup_steps))
    for callback in callbacks or []:
        if isinstance(callback, EMAUpdate):
            callback.total_steps = plan.total_steps  # read again when the next `fit` begins


def resumed_plan(r, model) -> None:
    """On resume, the plan the interrupted run made, exactly (no new warm-up, no re-plan)."""
    plan = Plan.read(r.out.plan_file) if r.backup else None
    if plan is not None:
        plan.replanned = True  # the interrupted run's elapsed time is unknown: keep the plan as it is
        apply_plan(r, model, [], plan)
        log(f"Time budget: resuming the plan in {r.out.plan_file}: {plan.describe()}")


def _reserve(budget_s, knn_seconds):
    # The summary (encoder file, plots, an embedding map about half a kNN check) and 1% slack.
    return 0.01 * budget_s + 0.5 * knn_seconds + 5.0


def warm_up_and_plan(r, model, fit, callbacks, knn_every) -> None:
    """Measures a kNN check and the step time, plans the epochs, and applies and writes the plan.

    Runs the first steps of epoch 1 (`fit(first_step, epoch, end_epoch, steps, warm_up_callbacks)`)
    with the EMA and the NaN guard only; the run continues from there (`r.start_step`).
    """
    from byol_tf import guards
    from byol_tf.ema import EMAUpdate
    from byol_tf.run_eval import knn_eval

    budget_s = float(r.config.time_budget)
    if r.steps < 3:
        raise ValueError(
            f"A time budget times a warm-up of at least 3 steps in the first epoch. "
            f"Received: time_budget={budget_s}, {r.steps} steps per epoch"
        )
    knn_seconds = 0.0
    if r.eval_set is not None:
        start = time.time()
        # The step-0 encoder is the random init: the summary's baseline, measured here once.
        r.knn_at_start = knn_eval(model.encoder, r.config, r.train, r.eval_set)
        knn_seconds = time.time() - start
        log(f"kNN top-1 at step 0 (random init): {100 * r.knn_at_start:.2f}% in {knn_seconds:.1f} s")
    timer = StepTimer()
    warm = min(r.steps - 1, WARMUP_UNTIMED_STEPS + WARMUP_TIMED_STEPS)
    minimal = [c for c in callbacks if isinstance(c, (EMAUpdate, guards.NaNGuard))] + [timer]
    fit(0, 0, 1, warm, minimal)
    r.start_step = warm
    seconds_per_step = timer.seconds_per_step(skip=min(WARMUP_UNTIMED_STEPS - 1, len(timer.times) - 1))
    elapsed = time.time() - r.started
    epochs = plan_epochs(
        budget_s - elapsed, seconds_per_step, r.steps, knn_seconds, knn_every, _reserve(budget_s, knn_seconds)
    )
    plan = Plan(
        budget_s,
        epochs,
        r.steps,
        seconds_per_step,
        knn_seconds,
        round(elapsed, 1),
        r.config.batch_size / seconds_per_step,
    )
    apply_plan(r, model, callbacks, plan)
    plan.write(r.run.plan_file)
    log(f"Time budget: {plan.describe()}")


def replan(r, model, callbacks, seconds_per_epoch) -> None:
    """The one re-plan: the epochs left in the budget at the measured seconds per epoch."""
    plan = r.plan
    done = int(model.optimizer.iterations.numpy()) // r.steps
    left = plan.time_budget_s - (time.time() - r.started) - _reserve(plan.time_budget_s, plan.knn_seconds)
    more = max(1, int(math.floor((left - plan.knn_seconds) / seconds_per_epoch)))
    planned = plan.seconds_per_step * r.steps
    log(
        f"Time budget: epochs take {seconds_per_epoch:.1f} s, not the {planned:.1f} s planned (kNN checks "
        f"included); re-planned after epoch {done}: {more} more epochs"
    )
    plan = dataclasses.replace(
        plan,
        epochs=done + more,
        seconds_per_step=seconds_per_epoch / r.steps,
        images_per_sec=r.config.batch_size * r.steps / seconds_per_epoch,
        replanned=True,
        replanned_at_epoch=done,
    )
    apply_plan(r, model, callbacks, plan)
    plan.write(r.run.plan_file)
