"""Training to a wall-clock budget: the warm-up, the plan applied, the watch that keeps it.

With `PretrainConfig.time_budget` set, a run (`byol_tf.training`) first
measures what a kNN check costs (the kNN of the step-0 encoder, which is the
random-init baseline the summary reports) and what a training step costs (a
short warm-up fit), then plans its steps (`byol_tf.budget`). The
learning-rate cosine and the tau schedule are laid over the planned steps
(times `PretrainConfig.schedule_horizon`).
The plan is logged, written to `RUN/plan.json`, checked against the clock
every 1/20 of the run (at most an epoch) and re-planned inside the running
fit when the predicted end misses the budget by more than `REPLAN_DRIFT`,
and kept as it is on resume.
"""

import dataclasses
import time
from typing import Optional

import keras
import numpy as np
from absl import logging

from byol_tf.budget import Plan, plan_cost, plan_steps, reserve, spaced_checks

# Steps the warm-up times, after the first ones that trace and compile.
WARMUP_TIMED_STEPS = 20
WARMUP_UNTIMED_STEPS = 3
# The watch measures a window of steps at a time: 1/20 of the planned run (at least 5 steps),
# at most an epoch (an epoch of a large dataset can be longer than the whole budget).
WATCH_WINDOWS = 20
WATCH_MIN_WINDOW = 5
# Its speed: the mean over the last 3 windows or the last epoch, whichever is longer (recent,
# not all: a shared machine's speed moves within a run; a whole epoch: its end's checkpoint
# and backup are counted once per epoch).
WATCH_RECENT = 3
# A predicted end this far from the budget (as a fraction of it) triggers a re-plan:
# inside the +-3% a budgeted run is held to.
REPLAN_DRIFT = 0.02


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
    """Ends `fit` at the plan's last step, and re-plans when the predicted end misses.

    The watch measures windows of steps: 1/`WATCH_WINDOWS` of the plan, at most
    an epoch, and each epoch's end (checkpoints and the kNN check). The
    prediction takes the mean seconds per step of the last `WATCH_RECENT`
    windows or the last epoch, whichever is longer (the kNN checks' time
    taken out and counted per check), the steps and checks left, and the
    summary's reserve. The first window of each fit is left out: it pays
    one-time costs (a new input pipeline, tracing). When the predicted end is
    more than `REPLAN_DRIFT` of the budget away from it,
    `replan(seconds_per_step, step)` returns the new plan, inside the running fit (a
    new fit would cost a new input pipeline). A machine whose speed moves
    within a run (by 25% between epochs of one run on a shared 2-core VM)
    needs more than one re-plan: at most one a window, none when `frozen` (a
    resumed run keeps its plan).
    """

    def __init__(self, plan: Plan, started: float, replan=None, agree=None, frozen=False):
        super().__init__()
        self.plan, self.started, self.replan = plan, started, replan
        # `agree(miss)`: the same miss on every worker of a cluster (all re-plan, or none).
        self.agree = agree or (lambda miss: miss)
        self.frozen, self.windows, self._first_dropped = frozen, [], False  # windows: (seconds, steps, checks)
        planned = plan.first_total_steps or plan.total_steps
        self.window = max(1, min(plan.steps_per_epoch, max(WATCH_MIN_WINDOW, planned // WATCH_WINDOWS)))

    def on_train_begin(self, logs=None):
        # The gap between two fits is neither a step nor a check.
        self._since, self._step = time.time(), int(self.model.optimizer.iterations.numpy())
        self._at, self._first_dropped = self._step, False

    def on_epoch_begin(self, epoch, logs=None):
        self._epoch_first = self._at

    def on_train_batch_end(self, batch, logs=None):
        # Keras's `batch` is the epoch's last step run (0-based): the step count without
        # reading the optimizer's variable, which would wait on the device every step.
        self._at = self._epoch_first + batch + 1
        if self._at >= self.plan.total_steps:
            self.model.stop_training = True  # the plan's last step, mid-epoch or not
        elif self._at - self._step >= self.window:
            self._measure(checks=0)

    def on_epoch_end(self, epoch, logs=None):
        self._at = int(self.model.optimizer.iterations.numpy())
        self._measure(checks=int("knn_acc" in (logs or {})))

    def seconds_per_step(self) -> Optional[float]:
        """The mean over the last `WATCH_RECENT` windows or epoch, or None before half a window."""
        seconds = steps = checks = 0
        for window_seconds, window_steps, window_checks in reversed(self.windows):
            if steps >= max(WATCH_RECENT * self.window, self.plan.steps_per_epoch):
                break
            seconds, steps, checks = seconds + window_seconds, steps + window_steps, checks + window_checks
        if steps < self.window / 2:
            return None
        return max(1e-9, seconds - checks * self.plan.knn_seconds) / steps

    def _measure(self, checks):
        """Closes a window at step `self._at`; re-plans when the predicted end misses the budget."""
        now, step = time.time(), self._at
        measured = (now - self._since, step - self._step, checks)
        self._since, self._step = now, step
        if self._first_dropped:
            self.windows.append(measured)
        self._first_dropped = True  # the fit's first window: one-time costs
        seconds_per_step = self.seconds_per_step()
        if self.frozen or self.replan is None or seconds_per_step is None or step >= self.plan.total_steps:
            return
        left = plan_cost(self.plan, step, seconds_per_step)
        predicted = now - self.started + left + reserve(self.plan.time_budget_s, self.plan.knn_seconds)
        if self.agree(abs(predicted / self.plan.time_budget_s - 1.0)) > REPLAN_DRIFT:
            self.plan = self.replan(seconds_per_step, step)
            self._since = time.time()  # the re-plan's own time is not a step


def log(message):
    print(message, flush=True)
    logging.info(message)


def _schedule(optimizer):
    """The optimizer's learning-rate schedule (inside a `LossScaleOptimizer` too), or None."""
    optimizer = getattr(optimizer, "inner_optimizer", optimizer)
    schedule = getattr(optimizer, "_learning_rate", None)
    return schedule if hasattr(schedule, "set_total_steps") else None


def apply_plan(r, model, callbacks, plan: Plan) -> None:
    """Lays the learning rate and tau over the plan's steps (times the horizon); the plan's epochs become the run's."""
    from byol_tf.ema import EMAUpdate
    from byol_tf.evaluation import KNNMonitor

    r.plan, r.knn_every = plan, plan.knn_every
    r.config = dataclasses.replace(r.config, epochs=plan.epochs, warmup_epochs=min(r.config.warmup_epochs, plan.epochs))
    schedule = _schedule(model.optimizer)
    total = r.config.schedule_steps(plan.total_steps)
    if schedule is not None:
        schedule.set_total_steps(max(total, schedule.warmup_steps))
    for callback in callbacks or []:
        if isinstance(callback, EMAUpdate):
            callback.set_total_steps(total)
        if isinstance(callback, KNNMonitor):
            callback.every_n_epochs = plan.knn_every
    if total != plan.total_steps:
        horizon = r.config.schedule_horizon
        log(f"Time budget: the learning rate and tau are laid over {total} steps (schedule_horizon={horizon})")


def resumed_plan(r, model) -> None:
    """On resume, the plan the interrupted run made, exactly (no new warm-up, no re-plan)."""
    plan = Plan.read(r.out.plan_file) if r.backup else None
    if plan is not None:
        apply_plan(r, model, [], plan)  # and the watch is frozen: the interrupted run's clock is unknown
        log(f"Time budget: resuming the plan in {r.out.plan_file}: {plan.describe()}")


def agreed(r, value: int, pick) -> int:
    """`pick` (min or max) of an integer over the workers of a cluster: every worker plans the same run."""
    from byol_tf import distribute

    return pick(distribute.gather_from_workers(r.strategy, int(value)))


def worker_agreement(r):
    """`BudgetWatch`'s `agree`: the largest miss over the workers, to 1e-6."""
    return lambda miss: agreed(r, round(1e6 * miss), max) / 1e6


def warm_up_and_plan(r, model, fit, callbacks) -> None:
    """Measures a kNN check and the step time, plans the steps, and applies and writes the plan.

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
    available = budget_s - elapsed - reserve(budget_s, knn_seconds)
    knn_every = r.knn_every
    if not r.knn_every_given and r.eval_set is not None:
        knn_every = agreed(r, spaced_checks(available, seconds_per_step * r.steps, knn_seconds, budget_s), max)
    total = agreed(r, plan_steps(available, warm, r.steps, seconds_per_step, knn_seconds, knn_every), min)
    plan = Plan(
        budget_s,
        total,
        r.steps,
        seconds_per_step,
        knn_seconds,
        elapsed,  # unrounded: the plan can be recomputed from plan.json exactly
        r.config.batch_size / seconds_per_step,
        knn_every=knn_every,
        first_total_steps=total,
        warm_up_seconds_per_step=seconds_per_step,
    )
    apply_plan(r, model, callbacks, plan)
    plan.write(r.run.plan_file)
    log(f"Time budget: {plan.describe()}")


def replan(r, model, callbacks, seconds_per_step, step, max_steps) -> Plan:
    """A re-plan at `step`: the steps left in the budget at the measured seconds per step (at most `max_steps`)."""
    plan = r.plan
    available = plan.time_budget_s - (time.time() - r.started) - reserve(plan.time_budget_s, plan.knn_seconds)
    total = plan_steps(available, step, r.steps, seconds_per_step, plan.knn_seconds, plan.knn_every)
    total = min(agreed(r, total, min), max_steps)
    # The miss, not only the speed: checks and checkpoints can move the end at an unchanged step time.
    ends = plan.time_budget_s - available + plan_cost(plan, step, seconds_per_step)
    log(
        f"Time budget: at step {step} the run would end at {ends:.0f} s of its {plan.time_budget_s:.0f} s "
        f"(steps take {1000 * seconds_per_step:.1f} ms with checkpoints, {1000 * plan.seconds_per_step:.1f} ms "
        f"planned); re-planned: {total} steps (were {plan.total_steps})"
    )
    plan = dataclasses.replace(
        plan,
        total_steps=total,
        seconds_per_step=seconds_per_step,
        images_per_sec=r.config.batch_size / seconds_per_step,
        replans=plan.replans + 1,
        replanned_at_epoch=step // r.steps,
    )
    apply_plan(r, model, callbacks, plan)
    plan.write(r.run.plan_file)
    return plan
