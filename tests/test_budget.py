"""Training to a time budget: durations, the plan's arithmetic, the schedules laid over it, a budgeted run."""

import csv
import json
import math
import os

import numpy as np
import pytest
import tensorflow as tf

from byol_tf import budget, data, get_preset, training
from byol_tf.optim import WarmupCosine


@pytest.mark.parametrize(
    "text, seconds", [("90s", 90.0), ("20m", 1200.0), ("8h", 28800.0), ("1h30m", 5400.0), ("45", 45.0), ("2.5m", 150.0)]
)
def test_parse_duration(text, seconds):
    assert budget.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "abc", "0s", "-5", "1d", "m"])
def test_parse_duration_rejects_and_names_the_value(text):
    with pytest.raises(ValueError, match=f"Received: time_budget={text!r}"):
        budget.parse_duration(text)


def test_plan_epochs_fills_the_budget():
    # 1 s of steps per epoch plus a 2 s kNN check each epoch: (100 - 5 reserve - 2 last check) / 3 = 31.
    assert budget.plan_epochs(100, 0.1, 10, 2.0, 1, 5.0) == 31
    # A check every 4 epochs costs 0.5 s per epoch: 93 / 1.5 = 62.
    assert budget.plan_epochs(100, 0.1, 10, 2.0, 4, 5.0) == 62
    assert budget.plan_epochs(1, 1.0, 10, 0.0, 1, 0.0) == 1  # never less than one epoch


def _cosine(step, peak, warmup, total):
    if step < warmup:
        return peak * step / warmup
    t = min(step - warmup, total - warmup)
    return 0.5 * peak * (1 + math.cos(math.pi * t / (total - warmup)))


def test_schedule_is_laid_over_new_total_without_retracing():
    schedule = WarmupCosine(peak_lr=0.5, warmup_steps=10, total_steps=1000)
    lr = tf.function(lambda step: schedule(step))
    lr(tf.constant(0))  # traced with the first total
    schedule.set_total_steps(100)
    for step in (0, 5, 10, 40, 99, 150):
        np.testing.assert_allclose(lr(tf.constant(step)).numpy(), _cosine(step, 0.5, 10, 100), rtol=1e-5, atol=1e-7)
    assert lr.experimental_get_tracing_count() == 1
    assert schedule.get_config()["total_steps"] == 100


def test_presets_budget_and_epochs_exclude_each_other():
    assert get_preset("cifar10_cpu20").time_budget == 1200
    assert get_preset("cifar10_cpu20", epochs=3).time_budget is None
    with pytest.raises(ValueError, match="Received: epochs=3, time_budget=60"):
        get_preset("cifar10_cpu20", epochs=3, time_budget=60)


def test_budgeted_run_plans_its_steps_and_keeps_the_plan(tmp_path):
    budget_s = 45.0
    config = get_preset(
        "demo",
        time_budget=budget_s,
        batch_size=32,
        projector_hidden=64,
        predictor_hidden=64,
        projection_dim=32,
        warmup_epochs=0,
    )
    train = data.make_shapes(320, image_size=32, seed=0)  # 10 steps an epoch
    test = data.make_shapes(64, image_size=32, seed=1)
    out = str(tmp_path / "run")
    summary = training.run_pretraining(config, train, out, eval_set=test, knn_every=3, verbose=0)
    with open(os.path.join(out, "plan.json")) as f:
        plan = json.load(f)
    assert summary["status"] == "finished"
    # The plan, checked against its own measurements with the formula written out.
    per_epoch = plan["seconds_per_step"] * 10 + plan["knn_seconds"] / 3
    if not plan["replanned"]:
        reserve = 0.01 * budget_s + 0.5 * plan["knn_seconds"] + 5.0
        expected = max(1, math.floor((budget_s - plan["planned_at_s"] - reserve - plan["knn_seconds"]) / per_epoch))
        assert plan["epochs"] == expected
    assert summary["steps"] == plan["total_steps"] == plan["epochs"] * 10 == summary["total_steps"]
    np.testing.assert_allclose(plan["images_per_sec"], 32 / plan["seconds_per_step"], rtol=1e-6)
    # tau reaches 1 at the planned end (the cosine over the planned steps, not the preset's epochs).
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    # One row an epoch, one set of columns across the warm-up's and the main fits,
    # kNN on every third epoch and the last.
    assert [int(row["epoch"]) for row in rows] == list(range(plan["epochs"]))
    assert all(None not in row for row in rows)
    knn_epochs = [int(row["epoch"]) + 1 for row in rows if row["knn_acc"] not in ("", "NA")]
    assert knn_epochs == sorted({e for e in range(3, plan["epochs"] + 1, 3)} | {plan["epochs"]})
    # tau follows the cosine over the planned steps (not the preset's epochs) from the (re-)plan on:
    # each row holds the tau of its epoch's last step.
    total = plan["total_steps"]
    for row in rows[plan["replanned_at_epoch"] or 0 :]:
        step = 10 * (int(row["epoch"]) + 1) - 1
        expected_tau = 1 - (1 - 0.99) * (math.cos(math.pi * step / total) + 1) / 2
        np.testing.assert_allclose(float(row["tau"]), expected_tau, atol=2e-6)
    assert 0.0 <= summary["knn_acc_random_init"] <= 1.0  # measured at step 0, before the warm-up
    # A loose check that the run ended near its budget (the benchmark measures it exactly).
    assert summary["train_seconds"] < 2 * budget_s
