"""Training to a wall-clock budget: the plan's arithmetic.

A budgeted run (`byol_tf.budget_run`) measures a kNN check and a training
step, then plans the number of steps (the last epoch may be partial) whose
training, kNN checks and final evaluation end inside the budget; the plan is
`Plan`, written to `RUN/plan.json`. Everything here is arithmetic on the
measurements, testable without a model.
"""

import dataclasses
import json
import os
import re
from typing import Optional

# "1h30m", "20m", "90s", "8h" or a plain number of seconds.
_DURATION = re.compile(r"^(?:(?P<h>\d+(?:\.\d+)?)h)?(?:(?P<m>\d+(?:\.\d+)?)m)?(?:(?P<s>\d+(?:\.\d+)?)s)?$")
# Without a `knn_every`, the plan spaces the kNN checks (the last included) to cost at most
# this share of the budget.
KNN_SHARE = 0.05


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


def check_count(first_step, last_step, steps_per_epoch, knn_every) -> int:
    """kNN checks at the ends of the epochs after `first_step` up to the one holding `last_step`.

    A check follows every `knn_every`-th epoch and the last (`is_monitor_epoch`);
    the epoch that ends at `first_step` has had its own.
    """
    from byol_tf.evaluation import is_monitor_epoch

    last_epoch = -(-last_step // steps_per_epoch)
    first_epoch = first_step // steps_per_epoch + 1
    return sum(1 for e in range(first_epoch, last_epoch + 1) if is_monitor_epoch(e, knn_every, last_epoch))


def run_cost(first_step, last_step, steps_per_epoch, seconds_per_step, knn_seconds, knn_every) -> float:
    """Seconds from `first_step` to `last_step`: the steps and the kNN checks between them."""
    checks = check_count(first_step, last_step, steps_per_epoch, knn_every)
    return (last_step - first_step) * seconds_per_step + checks * knn_seconds


def plan_steps(available_s, first_step, steps_per_epoch, seconds_per_step, knn_seconds, knn_every) -> int:
    """The last step of the longest run from `first_step` whose steps and kNN checks fit in `available_s`.

    Steps, not epochs: the last epoch may be partial, so the budget is not
    rounded down to a whole epoch. At least one step. The cost grows with the
    last step, so a bisection finds it.
    """

    def cost(last_step):
        return run_cost(first_step, last_step, steps_per_epoch, seconds_per_step, knn_seconds, knn_every)

    low, high = first_step + 1, first_step + 1 + max(0, int(available_s / max(seconds_per_step, 1e-9)))
    while low < high:  # the largest last step with cost <= available (or first_step + 1)
        middle = (low + high + 1) // 2
        low, high = (middle, high) if cost(middle) <= available_s else (low, middle - 1)
    return low


@dataclasses.dataclass
class Plan:
    """The plan of a budgeted run, as written to `plan.json`.

    `seconds_per_step` is the warm-up's median step; after a re-plan, the
    measured mean (checkpoints and backups included, kNN checks not).
    """

    time_budget_s: float
    total_steps: int
    steps_per_epoch: int
    seconds_per_step: float
    knn_seconds: float
    planned_at_s: float
    images_per_sec: float
    replans: int = 0
    replanned_at_epoch: Optional[int] = None  # the last re-plan's
    knn_every: int = 1
    first_total_steps: Optional[int] = None  # the warm-up's plan, kept through a re-plan
    warm_up_seconds_per_step: Optional[float] = None

    @property
    def epochs(self) -> int:
        """Epochs to run, the last one partial when the steps are not a whole number of epochs."""
        return -(-self.total_steps // self.steps_per_epoch)

    def write(self, path):
        from byol_tf.backup import atomic_json

        atomic_json(path, {**dataclasses.asdict(self), "epochs": self.epochs})

    @classmethod
    def read(cls, path) -> Optional["Plan"]:
        if not os.path.isfile(path):
            return None
        with open(path) as f:
            values = json.load(f)
        values.pop("epochs", None)
        return cls(**values)

    def describe(self) -> str:
        last = self.total_steps - (self.epochs - 1) * self.steps_per_epoch
        return (
            f"planned {self.total_steps} steps ({self.epochs} epochs of {self.steps_per_epoch}, the last "
            f"{last}) from {self.images_per_sec:.1f} img/s, a kNN check every {self.knn_every} epochs "
            f"({self.knn_seconds:.1f} s each), in a budget of {self.time_budget_s:.0f} s"
        )


def plan_cost(plan, step, seconds_per_step) -> float:
    """Seconds from `step` to the plan's last step at `seconds_per_step`, its kNN checks included."""
    return run_cost(step, plan.total_steps, plan.steps_per_epoch, seconds_per_step, plan.knn_seconds, plan.knn_every)


def reserve(budget_s, knn_seconds):
    # What follows the last check: the summary, the plots (an embedding map of 2,000 examples,
    # a fifth of a check at most), the process's exit; and 0.5% of slack.
    return 0.005 * budget_s + 0.2 * knn_seconds + 5.0


def spaced_checks(available_s, seconds_per_epoch, knn_seconds, budget_s) -> int:
    """Epochs between kNN checks for the checks (the last included) to cost at most `KNN_SHARE` of the budget.

    More than `epochs // checks`, and the last planned epoch kept off the
    periodic ones: a re-plan that adds a partial epoch then moves the last
    check rather than adding one.
    """
    epochs = max(1, int(available_s / max(seconds_per_epoch, 1e-9)))
    checks = max(1, int(KNN_SHARE * budget_s / max(knn_seconds, 1e-9)))
    every = epochs // checks + 1
    return every + 1 if epochs % every == 0 else every  # fewer checks still
