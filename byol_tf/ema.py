"""The target network's exponential moving average and its tau schedule."""

import math

import keras
import tensorflow as tf

# How the target's BatchNorm moving statistics are kept (`update_target`).
BN_STATS_MODES = ("own", "ema", "copy")


def cosine_tau(step, total_steps, base_tau):
    """tau at optimizer step `step` (0-based): cosine from `base_tau` to 1.

    `tau = 1 - (1 - base_tau) * (cos(pi * step / total_steps) + 1) / 2`
    (Grill et al. 2020, Section 3.2). Works on Python numbers and tensors.

    Args:
        step: the 0-based index of the optimizer step just taken.
        total_steps: the run's total number of optimizer steps.
        base_tau: tau at step 0.
    """
    if isinstance(step, (int, float)):
        progress = min(step / total_steps, 1.0)
        return 1.0 - (1.0 - base_tau) * (math.cos(math.pi * progress) + 1.0) / 2.0
    progress = tf.minimum(tf.cast(step, tf.float32) / tf.cast(total_steps, tf.float32), 1.0)
    return 1.0 - (1.0 - base_tau) * (tf.cos(math.pi * progress) + 1.0) / 2.0


def update_target(online_vars, target_vars, tau, bn_stats="own"):
    """`target = tau * target + (1 - tau) * online` over all variable pairs.

    Trainable variables always follow the EMA. BatchNorm moving statistics
    (the non-trainable online variables) are handled as `bn_stats` says:
    "own" leaves the target's statistics to its own forward passes (as in
    DeepMind's BYOL, where the target keeps its own network state), "ema"
    averages them like the weights, "copy" copies the online ones.

    Args:
        online_vars: variables of the online encoder and projector.
        target_vars: the matching target variables, in the same order.
        tau: EMA decay, a float or scalar tensor.
        bn_stats: "own", "ema" or "copy".
    """
    tau = tf.cast(tau, tf.float32)
    for online, target in zip(online_vars, target_vars):
        if online.trainable or bn_stats == "ema":
            # assign_sub is the cheapest form: one fused read-modify-write.
            target.assign_sub((1.0 - tau) * (target.value - online.value))
        elif bn_stats == "copy":
            target.assign(online.value)


class TauSchedule:
    """tau over a run: `cosine_tau` from `base_tau` to 1 over `total_steps` optimizer steps."""

    def __init__(self, total_steps, base_tau, bn_stats="own"):
        self.total_steps, self.base_tau, self.bn_stats = total_steps, base_tau, bn_stats
        # Read by the compiled train step, which outlives one `fit`: a run planned to a
        # time budget changes the length between fits without a retrace.
        self._total = tf.Variable(float(total_steps), trainable=False, name="tau_total_steps")

    def set_total_steps(self, total_steps):
        self.total_steps = total_steps
        self._total.assign(float(total_steps))

    def tau_at(self, step):
        """tau for the 0-based optimizer step `step`."""
        if isinstance(step, (int, float)):
            return cosine_tau(step, self.total_steps, self.base_tau)
        return cosine_tau(step, self._total, self.base_tau)


def ema_step(model, schedule, previous_iterations=None):
    """One EMA update of `model`'s target for the optimizer step just taken; returns tau.

    Args:
        model: the `BYOL` model.
        schedule: a `TauSchedule`.
        previous_iterations: `optimizer.iterations` before the step, or
            None. With a `keras.optimizers.LossScaleOptimizer` (under
            `mixed_float16`), a step it skipped for non-finite gradients
            leaves `iterations` there, and the target is then left as it is too.
    """
    optimizer = model.optimizer
    tau = schedule.tau_at(optimizer.iterations - 1)

    def update():
        update_target(model.online_ema_variables, model.target_ema_variables, tau, schedule.bn_stats)
        model.tau.assign(tau)
        return tf.constant(True)

    if previous_iterations is None or not isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        update()
        return tau
    applied = optimizer.iterations > tf.cast(previous_iterations, optimizer.iterations.dtype)
    tf.cond(applied, update, lambda: tf.constant(False))
    return tf.identity(model.tau)


class EMAUpdate(keras.callbacks.Callback):
    """Updates a `byol_tf.BYOL` model's target network after every step.

    tau is computed from `optimizer.iterations`, so it is right after a resume.
    At the start of `fit` the callback hands the model its `TauSchedule`
    (the model logs each step's tau from it). With `steps_per_execution > 1`,
    batch callbacks fire once per execution, so the callback also tells the
    model to run the same `ema_step` inside its `train_step`, after every
    optimizer step; otherwise the callback runs it after each batch.

    Args:
        total_steps: optimizer steps of the whole run; tau reaches 1 there.
            `None`: `fit`'s epochs times its steps per epoch.
        base_tau: tau at step 0 (0.996 in the paper).
        bn_stats: "own", "ema" or "copy" (see `update_target`).
    """

    def __init__(self, total_steps, base_tau=0.996, bn_stats="own"):
        super().__init__()
        if total_steps is not None and (not isinstance(total_steps, int) or total_steps < 1):
            raise ValueError(f"`total_steps` must be a positive int. Received: total_steps={total_steps!r}")
        if not 0.0 <= base_tau <= 1.0:
            raise ValueError(f"`base_tau` must be in [0, 1]. Received: base_tau={base_tau!r}")
        if bn_stats not in BN_STATS_MODES:
            raise ValueError(f"`bn_stats` must be one of {BN_STATS_MODES}. Received: bn_stats={bn_stats!r}")
        self.total_steps = total_steps
        self.base_tau = base_tau
        self.bn_stats = bn_stats
        self._update_fn = None

    def on_train_begin(self, logs=None):
        if self.total_steps is None:
            steps = (self.params or {}).get("steps")
            if not steps:
                raise ValueError(
                    "EMAUpdate needs the run's length: pass `total_steps`, or `steps_per_epoch` to "
                    f"`fit` for a dataset of unknown size. Received: total_steps=None, steps={steps}"
                )
            self.total_steps = int(self.params["epochs"]) * int(steps)
        schedule = getattr(self.model, "ema_schedule", None)
        if isinstance(schedule, TauSchedule) and (schedule.base_tau, schedule.bn_stats) == (
            self.base_tau,
            self.bn_stats,
        ):
            schedule.set_total_steps(self.total_steps)  # the one the compiled step already reads
        else:
            schedule = TauSchedule(self.total_steps, self.base_tau, self.bn_stats)
        self.in_step = getattr(self.model, "steps_per_execution", 1) > 1
        self.model.ema_schedule, self.model.ema_in_step = schedule, self.in_step
        self._iterations = tf.identity(self.model.optimizer.iterations)

        def update(previous_iterations):
            # Also returns the iterations this update saw, the next one's
            # `previous_iterations` (kept as a tensor: no wait on the device).
            ema_step(self.model, schedule, previous_iterations)
            return tf.identity(self.model.optimizer.iterations)

        self._update_fn = tf.function(update)

    def set_total_steps(self, total_steps):
        """A new length for the run (a time budget's re-plan), taken from the next step on."""
        self.total_steps = int(total_steps)
        schedule = getattr(self.model, "ema_schedule", None) if self.model is not None else None
        if isinstance(schedule, TauSchedule):
            schedule.set_total_steps(self.total_steps)

    def on_train_batch_end(self, batch, logs=None):
        if not self.in_step:
            self._iterations = self._update_fn(self._iterations)

    def get_config(self):
        return {"total_steps": self.total_steps, "base_tau": self.base_tau, "bn_stats": self.bn_stats}
