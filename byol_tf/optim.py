"""Optimizers and the learning-rate schedule for BYOL pretraining.

`LARS` and `WarmupCosine` follow DeepMind's BYOL code (byol/utils/optimizers.py
and byol/utils/schedules.py); `build_optimizer` turns a `PretrainConfig` into a
ready Keras optimizer. Biases and BatchNorm parameters (every variable of rank
<= 1) get neither weight decay nor the LARS trust ratio, as in the paper.
"""

from typing import TYPE_CHECKING, Optional

import keras
import tensorflow as tf
from keras import ops
from byol_tf.checks import check as _check
from byol_tf.heads import PREDICTOR_NAME

if TYPE_CHECKING:
    from byol_tf.config import PretrainConfig


@keras.saving.register_keras_serializable(package="byol_tf")
class WarmupCosine(keras.optimizers.schedules.CosineDecay):
    """Linear warm-up to `peak_lr`, then cosine decay to `final_lr`.

    As in DeepMind's BYOL, the rate at step `s < warmup_steps` is
    `peak_lr * s / warmup_steps` (so step 0 has rate 0); from `warmup_steps`
    to `total_steps` it is
    `final_lr + (peak_lr - final_lr) * 0.5 * (1 + cos(pi * t / T))` with
    `t = s - warmup_steps`, `T = total_steps - warmup_steps`; then `final_lr`.

    Keras's `CosineDecay(warmup_target=...)` does the maths; this subclass
    only speaks the paper's terms (peak, warm-up, total), checks them, and
    keeps the name older runs' saved optimizers refer to.

    Args:
        peak_lr: rate at the end of warm-up.
        warmup_steps: length of the linear warm-up, in optimizer steps.
        total_steps: step at which the cosine reaches `final_lr`.
        final_lr: rate at and after `total_steps`.
    """

    def __init__(self, peak_lr, warmup_steps, total_steps, final_lr=0.0, name="WarmupCosine"):
        _check(total_steps > 0, "total_steps", total_steps, "must be > 0")
        _check(
            0 <= warmup_steps <= total_steps, "warmup_steps", warmup_steps, f"must be in [0, total_steps={total_steps}]"
        )
        _check(peak_lr >= 0, "peak_lr", peak_lr, "must be >= 0")
        _check(0 <= final_lr <= peak_lr, "final_lr", final_lr, f"must be in [0, peak_lr={peak_lr}]")
        self.peak_lr = float(peak_lr)
        self.total_steps = int(total_steps)
        self.final_lr = float(final_lr)
        super().__init__(
            initial_learning_rate=0.0,
            # Keras counts the cosine from the end of the warm-up; a zero-length one is a step.
            decay_steps=max(self.total_steps - int(warmup_steps), 1),
            alpha=self.final_lr / self.peak_lr if self.peak_lr > 0 else 0.0,
            warmup_target=self.peak_lr,
            warmup_steps=int(warmup_steps),
            name=name,
        )
        # A variable, read by the compiled step: a run planned to a time budget
        # (`byol_tf.budget_run`) sets its length after the warm-up, without retracing.
        self._decay_steps = tf.Variable(float(self.decay_steps), trainable=False, name="decay_steps")

    def set_total_steps(self, total_steps: int) -> None:
        """Lays the cosine over `total_steps` (the warm-up is unchanged)."""
        _check(total_steps >= self.warmup_steps, "total_steps", total_steps, f">= warmup_steps={self.warmup_steps}")
        self.total_steps = int(total_steps)
        self.decay_steps = max(self.total_steps - self.warmup_steps, 1)
        self._decay_steps.assign(float(self.decay_steps))

    def __call__(self, step):
        # CosineDecay reads `self.decay_steps`; hand it the variable for this call.
        plain, self.decay_steps = self.decay_steps, self._decay_steps
        try:
            return super().__call__(step)
        finally:
            self.decay_steps = plain

    def get_config(self):
        return {
            "peak_lr": self.peak_lr,
            "warmup_steps": self.warmup_steps,
            "total_steps": self.total_steps,
            "final_lr": self.final_lr,
            "name": self.name,
        }


@keras.saving.register_keras_serializable(package="byol_tf")
class LARS(keras.optimizers.Optimizer):
    """Layer-wise Adaptive Rate Scaling (You et al. 2017), as in BYOL.

    For a variable `w` with gradient `g`: `g += weight_decay * w` (coupled
    decay); `g *= eta * ||w|| / ||g||` (trust ratio; 1 if either norm is 0);
    `m = momentum * m + g`; `w -= lr * m` (Nesterov: `w -= lr * (momentum * m
    + g)`). Variables of rank <= 1 (biases, BatchNorm gamma/beta) are always
    excluded from both decay and adaptation. The decay is handled here, so the
    base class's decoupled `weight_decay` stays `None`; the rate is
    `lars_weight_decay`.

    Args:
        learning_rate: a float or a `LearningRateSchedule`.
        momentum: momentum of the update buffer, in [0, 1).
        weight_decay: L2 coefficient added to the gradient, >= 0.
        eta: trust coefficient, > 0.
        nesterov: whether to use Nesterov momentum.
        exclude_from_adaptation: name substrings (matched against
            `variable.path` and `variable.name`) also excluded from the trust
            ratio, on top of the rank <= 1 rule.
        exclude_from_weight_decay: likewise, for weight decay.
        lr_multipliers: `{name substring: factor}`: variables whose path or
            name contains the substring take `factor` times the learning rate
            (the first match counts).
        name: the optimizer's name.
        **kwargs: base optimizer arguments (`clipnorm`, `global_clipnorm`, ...).
    """

    def __init__(
        self,
        learning_rate=0.1,
        momentum=0.9,
        weight_decay=1.5e-6,
        eta=1e-3,
        nesterov=False,
        exclude_from_adaptation=None,
        exclude_from_weight_decay=None,
        lr_multipliers=None,
        name="lars",
        **kwargs,
    ):
        super().__init__(learning_rate=learning_rate, name=name, **kwargs)
        _check(0 <= momentum < 1, "momentum", momentum, "must be in [0, 1)")
        _check(weight_decay >= 0, "weight_decay", weight_decay, "must be >= 0")
        _check(eta > 0, "eta", eta, "must be > 0")
        self.momentum = float(momentum)
        self.lars_weight_decay = float(weight_decay)
        self.eta = float(eta)
        self.nesterov = bool(nesterov)
        self.exclude_from_adaptation = list(exclude_from_adaptation or [])
        self.exclude_from_weight_decay_names = list(exclude_from_weight_decay or [])
        self.lr_multipliers = {str(k): float(v) for k, v in (lr_multipliers or {}).items()}
        for key, factor in self.lr_multipliers.items():
            _check(factor > 0, f"lr_multipliers[{key!r}]", factor, "must be > 0")

    def _excluded(self, variable, names):
        return len(variable.shape) <= 1 or self._matches(variable, names) is not None

    @staticmethod
    def _matches(variable, names):
        keys = (str(getattr(variable, "path", "")), str(variable.name))
        return next((s for s in names if any(s in k for k in keys)), None)

    def build(self, var_list):
        if self.built:
            return
        super().build(var_list)
        self.momentums = [self.add_variable_from_reference(v, "momentum") for v in var_list]
        # `_use_weight_decay` honours `exclude_from_weight_decay(var_list=...)` calls.
        self._decay_mask = [
            not self._excluded(v, self.exclude_from_weight_decay_names) and self._use_weight_decay(v) for v in var_list
        ]
        self._adapt_mask = [not self._excluded(v, self.exclude_from_adaptation) for v in var_list]
        matched = [self._matches(v, self.lr_multipliers) for v in var_list]
        self._lr_factors = [1.0 if m is None else self.lr_multipliers[m] for m in matched]

    def update_step(self, gradient, variable, learning_rate):
        index = self._get_variable_index(variable)
        dtype = variable.dtype
        lr = ops.cast(learning_rate * self._lr_factors[index], dtype)
        g = ops.cast(gradient, dtype)
        if self._decay_mask[index] and self.lars_weight_decay > 0:
            g = g + ops.cast(self.lars_weight_decay, dtype) * variable
        if self._adapt_mask[index]:
            w_norm = ops.sqrt(ops.sum(ops.square(variable)))
            g_norm = ops.sqrt(ops.sum(ops.square(g)))
            ok = ops.logical_and(w_norm > 0, g_norm > 0)
            ratio = ops.cast(self.eta, dtype) * w_norm / ops.where(ok, g_norm, ops.ones_like(g_norm))
            g = g * ops.where(ok, ratio, ops.ones_like(ratio))
        m = self.momentums[index]
        momentum = ops.cast(self.momentum, dtype)
        self.assign(m, momentum * m + g)
        step = momentum * m + g if self.nesterov else m
        self.assign_sub(variable, lr * step)

    def get_config(self):
        config = super().get_config()
        config.pop("weight_decay", None)
        config.update(
            {
                "momentum": self.momentum,
                "weight_decay": self.lars_weight_decay,
                "eta": self.eta,
                "nesterov": self.nesterov,
                "exclude_from_adaptation": self.exclude_from_adaptation,
                "exclude_from_weight_decay": self.exclude_from_weight_decay_names,
                "lr_multipliers": self.lr_multipliers,
            }
        )
        return config


class _NoDecayForRankOne:
    """Keras's decoupled weight decay, masked with its own `exclude_from_weight_decay` by the paper's rule.

    Biases and BatchNorm parameters (every variable of rank <= 1) get no
    decay; the mask is set when the optimizer is built, the first time it
    sees the variables.
    """

    def build(self, var_list):
        if not self.built:
            self.exclude_from_weight_decay(var_list=[v for v in var_list if len(v.shape) <= 1])
        super().build(var_list)


@keras.saving.register_keras_serializable(package="byol_tf")
class MaskedSGD(_NoDecayForRankOne, keras.optimizers.SGD):
    """`keras.optimizers.SGD` whose weight decay skips rank <= 1 variables."""


@keras.saving.register_keras_serializable(package="byol_tf")
class MaskedAdamW(_NoDecayForRankOne, keras.optimizers.AdamW):
    """`keras.optimizers.AdamW` whose weight decay skips rank <= 1 variables."""


# Each optimizer from (schedule, config); the names are the config's choices.
_BUILDERS = {
    "lars": lambda schedule, c: LARS(
        schedule,
        momentum=c.momentum,
        weight_decay=c.weight_decay,
        lr_multipliers={f"{PREDICTOR_NAME}/": c.predictor_lr_scale} if c.predictor_lr_scale != 1.0 else None,
    ),
    "sgd": lambda schedule, c: MaskedSGD(
        schedule, momentum=float(c.momentum), nesterov=False, weight_decay=c.weight_decay or None
    ),
    "adam": lambda schedule, c: keras.optimizers.Adam(schedule),
    "adamw": lambda schedule, c: MaskedAdamW(schedule, weight_decay=c.weight_decay),
}
OPTIMIZERS = tuple(_BUILDERS)


def build_optimizer(config: "PretrainConfig", steps_per_epoch: int) -> keras.optimizers.Optimizer:
    """Returns the optimizer of `config`, with its `WarmupCosine` schedule.

    "lars": `LARS`. "sgd": momentum SGD with Keras' decoupled decay
    (`w -= lr * wd * w`, outside the momentum), skipping rank <= 1 variables.
    "adam": Adam without decay. "adamw": AdamW, decay skipping rank <= 1.

    Args:
        config: a `byol_tf.config.PretrainConfig`.
        steps_per_epoch: optimizer steps per epoch, >= 1.
    """
    _check(steps_per_epoch >= 1, "steps_per_epoch", steps_per_epoch, "must be >= 1")
    name, peak = config.optimizer, config.peak_lr
    _check(name in _BUILDERS, "optimizer", name, f"must be one of {OPTIMIZERS}")
    if name in ("adam", "adamw") and peak > 0.01:
        suggestion = 1e-3 * 256 / config.batch_size
        raise ValueError(
            f"A LARS-sized learning rate makes {name} diverge or collapse; the peak rate "
            f"base_lr * batch_size / 256 should be about 1e-3 (base_lr={suggestion:.3g} for "
            f"batch_size={config.batch_size}). Received: optimizer={name!r}, peak_lr={peak!r}"
        )
    schedule = WarmupCosine(
        peak_lr=peak,
        warmup_steps=round(config.warmup_epochs * steps_per_epoch),
        total_steps=config.schedule_steps(config.epochs * steps_per_epoch),
    )
    return _BUILDERS[name](schedule, config)


def lars(
    learning_rate: float = 0.2,
    total_steps: Optional[int] = None,
    warmup_steps: int = 0,
    weight_decay: float = 1.5e-6,
    momentum: float = 0.9,
) -> "LARS":
    """The paper's optimizer: `LARS` (bias and BatchNorm excluded) on a warm-up and cosine schedule.

    Args:
        learning_rate: the peak rate (the paper: 0.2 * batch_size / 256).
        total_steps: the run's optimizer steps, for the cosine; `None`: a constant rate.
        warmup_steps: linear warm-up steps.
        weight_decay: decoupled decay of the weights (not biases or BatchNorm).
        momentum: heavy-ball momentum.
    """
    schedule = WarmupCosine(learning_rate, warmup_steps, total_steps) if total_steps else learning_rate
    return LARS(schedule, momentum=momentum, weight_decay=weight_decay)
