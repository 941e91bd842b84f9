"""Training to a time budget: durations, the plan's arithmetic, the schedules laid over it, a budgeted run."""

import csv
import dataclasses
import json
import math
import os
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import budget, budget_run, data, get_preset, training
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


def test_check_count_follows_the_monitor_epochs():
    assert budget.check_count(0, 100, 10, 3) == 4  # epochs 3, 6, 9 and the last, 10
    assert budget.check_count(30, 35, 10, 3) == 1  # a partial last epoch 4 has its check
    assert budget.check_count(25, 60, 10, 4) == 2  # epochs 3 to 6: 4 and the last
    assert budget.check_count(20, 20, 10, 1) == 0  # nothing left to run


def test_plan_steps_fills_the_budget_to_the_step():
    # 1 s of steps and a 2 s check an epoch: 33 epochs cost 99 s; one more step needs a 34th check.
    assert budget.plan_steps(100, 0, 10, 0.1, 2.0, 1) == 330
    # Checks at epochs 4, 8, ..., 64 and the last: 66 epochs cost 66 + 17 * 2 = 100 s.
    assert budget.plan_steps(100, 0, 10, 0.1, 2.0, 4) == 660
    # No checks: the last epoch is partial (105 steps, 10.5 s; 106 would be 10.6 s).
    assert budget.plan_steps(10.55, 0, 10, 0.1, 0.0, 1) == 105
    # From step 23: 340 steps (34 s) and the checks of epochs 5, 10, ..., 35 and 37 (8 x 2 s).
    assert budget.plan_steps(50.05, 23, 10, 0.1, 2.0, 5) == 363
    assert budget.plan_steps(1, 0, 10, 1.0, 5.0, 1) == 1  # never less than one step


@pytest.mark.parametrize(
    "available, knn_seconds, expected",
    [
        (1000, 10.0, 3),  # 10 epochs, 5 checks allowed (5% of 1000 s): every 3 -> 3, 6, 9 and 10
        (2400, 16.7, 5),  # 24 epochs, 7 checks: every 4 would make epoch 24 periodic and last
        (1000, 100.0, 11),  # no check fits in 5%: only the last of the 10 epochs
    ],
)
def test_spaced_checks_cost_at_most_their_share(available, knn_seconds, expected):
    every = budget.spaced_checks(available, 100.0, knn_seconds, budget_s=available)
    assert every == expected
    epochs = int(available / 100.0)
    assert epochs % every != 0
    # The last check is always run, even when it alone costs more than the share.
    assert budget.check_count(0, 10 * epochs, 10, every) * knn_seconds <= max(budget.KNN_SHARE * available, knn_seconds)


def _tau(step, total, base_tau):
    return 1 - (1 - base_tau) * (math.cos(math.pi * step / total) + 1) / 2


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


@pytest.mark.parametrize("horizon", [1.0, 2.0])
def test_budgeted_run_plans_its_steps_and_keeps_the_plan(tmp_path, horizon):
    budget_s = 30.0
    config = get_preset(
        "demo",
        time_budget=budget_s,
        schedule_horizon=horizon,
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
    # The plan, checked against its own measurements with the cost written out: 10 steps an
    # epoch, a check every third epoch and after the last, and the summary's reserve.
    total = plan["total_steps"]
    warm = min(10 - 1, budget_run.WARMUP_UNTIMED_STEPS + budget_run.WARMUP_TIMED_STEPS)  # the warm-up's steps

    def cost(last_step, seconds_per_step):
        epochs = math.ceil(last_step / 10)
        checks = len({e for e in range(3, epochs + 1, 3)} | {epochs})
        return (last_step - warm) * seconds_per_step + checks * plan["knn_seconds"]

    # The warm-up's plan (`first_total_steps`), from its own measurements and its elapsed time.
    available = budget_s - plan["planned_at_s"] - (0.005 * budget_s + 0.2 * plan["knn_seconds"] + 5.0)
    seconds_per_step = plan["warm_up_seconds_per_step"]
    assert cost(plan["first_total_steps"], seconds_per_step) <= available
    assert available < cost(plan["first_total_steps"] + 1, seconds_per_step)
    if plan["replans"] == 0:
        assert total == plan["first_total_steps"]
    assert plan["epochs"] == math.ceil(total / 10)
    assert summary["steps"] == total == summary["total_steps"]
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
    # tau follows the cosine over the planned steps (not the preset's epochs), times the
    # horizon, from the (re-)plan on: each row holds the tau of its epoch's last step.
    laid_over = round(horizon * total)
    for row in rows[plan["replanned_at_epoch"] or 0 :]:
        step = min(10 * (int(row["epoch"]) + 1), total) - 1
        np.testing.assert_allclose(float(row["tau"]), _tau(step, laid_over, 0.99), atol=2e-6)
        # The learning rate too (no warm-up here): the step's rate, read before its update.
        expected_lr = _cosine(step, config.peak_lr, 0, laid_over)
        np.testing.assert_allclose(float(row["lr"]), expected_lr, rtol=1e-5, atol=1e-7)
    assert 0.0 <= summary["knn_acc_random_init"] <= 1.0  # measured at step 0, before the warm-up
    assert summary["run_seconds"] > 0


def test_an_epoch_run_lays_its_schedules_over_the_horizon(tmp_path):
    config = get_preset(
        "demo",
        epochs=2,
        batch_size=32,
        projector_hidden=32,
        predictor_hidden=32,
        projection_dim=16,
        warmup_epochs=0,
        schedule_horizon=2.0,
    )
    out = str(tmp_path / "run")
    training.run_pretraining(config, data.make_shapes(160, image_size=32, seed=0), out, verbose=0, autotune=False)
    with open(os.path.join(out, "metrics.csv"), newline="") as f:
        rows = list(csv.DictReader(f))
    # 5 steps an epoch, 10 in the run, tau's cosine over 20: at the last step (9) it is 9/20 of the way.
    np.testing.assert_allclose(float(rows[-1]["tau"]), _tau(9, 20, 0.99), atol=2e-6)
    saved = keras.saving.load_model(os.path.join(out, "checkpoints", "byol.keras"), safe_mode=True)
    assert saved.optimizer._learning_rate.total_steps == 20


@pytest.mark.parametrize("seconds_per_step, replans", [(1.0, False), (1.5, True)])
def test_watch_replans_when_the_predicted_end_misses_and_stops_at_the_last_step(monkeypatch, seconds_per_step, replans):
    clock = [1000.0]
    monkeypatch.setattr(budget_run.time, "time", lambda: clock[0])
    # Planned 10 s into a 100 s run, from step 10: 1 s steps, a 2 s check after each 10-step
    # epoch, a reserve of 0.5 + 0.4 + 5 s: 84.1 s hold 7 epochs (70 steps, 7 checks: 84 s).
    assert budget.plan_steps(84.1, 10, 10, 1.0, 2.0, 1) == 80
    plan = budget.Plan(100.0, 80, 10, 1.0, 2.0, 10.0, 32.0)
    asked = []  # the seconds per step of each re-plan; each one here ends the run at step 45

    def replan(seconds, step):
        asked.append(seconds)
        return dataclasses.replace(plan, total_steps=45, replans=len(asked))

    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=tf.Variable(3)), stop_training=False)
    watch = budget_run.BudgetWatch(plan, started=990.0, replan=replan)
    watch.set_model(model)
    clock[0] = 995.0
    watch.on_train_begin()
    # The rest of epoch 1 pays one-time costs: left out of the measurement, even when slow.
    clock[0], model.optimizer.iterations = 1000.0, tf.Variable(10)
    watch.on_epoch_end(0, {"loss": 1.0})
    assert watch.windows == [] and asked == []
    # Epoch 2: 10 steps and its check.
    clock[0] += 10 * seconds_per_step + 2.0
    model.optimizer.iterations.assign(20)
    watch.on_epoch_end(1, {"loss": 1.0, "knn_acc": 0.5})
    # Predicted end: elapsed + 60 steps + 6 checks + the reserve; on pace, 99.9 s.
    predicted = (10 + 10 * seconds_per_step + 2) + 60 * seconds_per_step + 6 * 2.0 + 5.9
    assert replans == (abs(predicted / 100 - 1) > budget_run.REPLAN_DRIFT)
    assert asked == ([pytest.approx(seconds_per_step)] if replans else [])
    # The speed is the last epoch's or 3 windows' (5 steps each), whichever is longer: three
    # more epochs at 0.5 s a step, without checks, far ahead of the plan: at most one re-plan
    # an epoch.
    for epoch in range(2, 5):
        clock[0] += 5.0
        model.optimizer.iterations.assign_add(10)
        watch.on_epoch_end(epoch, {"loss": 1.0})
    assert watch.seconds_per_step() == pytest.approx(0.5)
    assert 1 <= len(asked) <= 4 and watch.plan.total_steps == 45
    # The fit ends at the plan's last step, inside an epoch (Keras passes the epoch's step index).
    ending = budget_run.BudgetWatch(watch.plan, started=990.0)
    ending.set_model(model)
    model.optimizer.iterations.assign(40)
    ending.on_train_begin()
    ending.on_epoch_begin(4)
    ending.on_train_batch_end(3)  # step 44
    assert not model.stop_training
    ending.on_train_batch_end(4)  # step 45
    assert model.stop_training
    # A resumed run's watch is frozen: it measures and never re-plans.
    frozen = budget_run.BudgetWatch(plan, started=990.0, replan=replan, frozen=True)
    frozen.set_model(model)
    frozen.on_train_begin()
    count = len(asked)
    for epoch in range(3):
        clock[0] += 50.0
        model.optimizer.iterations.assign_add(10)
        frozen.on_epoch_end(epoch, {"loss": 1.0})
    assert len(asked) == count


def test_watch_measures_windows_inside_an_epoch_longer_than_the_run(monkeypatch):
    clock = [1000.0]
    monkeypatch.setattr(budget_run.time, "time", lambda: clock[0])
    # A large dataset: one epoch (1,000 steps) is longer than the plan (80 steps at 1 s from step
    # 10, no kNN checks). The watch measures windows of 5 steps (80 / 20 = 4, at least 5).
    plan = budget.Plan(100.0, 80, 1000, 1.0, 0.0, 10.0, 32.0, knn_every=1000)
    # At 1.5 s a step, re-planned at step 20, 25 s into the run: 100 - 25 - (0.5 + 5) s left
    # hold 46 steps.
    assert budget.plan_steps(69.5, 20, 1000, 1.5, 0.0, 1000) == 66
    asked = []

    def replan(seconds, step):
        asked.append((seconds, step))
        return dataclasses.replace(plan, total_steps=66, replans=1)

    model = types.SimpleNamespace(optimizer=types.SimpleNamespace(iterations=tf.Variable(10)), stop_training=False)
    watch = budget_run.BudgetWatch(plan, started=990.0, replan=replan)
    watch.set_model(model)
    watch.on_train_begin()
    watch.on_epoch_begin(0)
    assert watch.window == 5
    for batch in range(55):  # steps 11 to 65, 1.5 s each
        clock[0] += 1.5
        watch.on_train_batch_end(batch)
    # Steps 11-15 left out (one-time costs), 16-20 measured: one re-plan, at step 20, and
    # none after it (on pace with the new plan).
    assert asked == [(pytest.approx(1.5), 20)]
    assert [steps for _, steps, _ in watch.windows][:3] == [5, 5, 5]
    assert not model.stop_training
    watch.on_train_batch_end(55)  # step 66
    assert model.stop_training
    # Each fit's first window is left out: the second fit's slow start (a new input pipeline).
    fresh = budget_run.BudgetWatch(plan, started=990.0)
    fresh.set_model(model)
    for first_step, step_seconds in ((10, [1.0] * 5), (15, [10.0] * 5 + [1.0] * 5)):
        model.optimizer.iterations.assign(first_step)
        fresh.on_train_begin()
        fresh.on_epoch_begin(0)
        for batch, seconds in enumerate(step_seconds):
            clock[0] += seconds
            fresh.on_train_batch_end(batch)
    assert fresh.windows == [(pytest.approx(5.0), 5, 0)]
