import keras
import numpy as np
import pytest

from byol_tf.ema import EMAUpdate, cosine_tau, update_target
from helpers_model import tiny_byol, view_dataset, weights


def test_cosine_tau_known_points():
    assert cosine_tau(0, 100, 0.996) == pytest.approx(0.996)
    assert cosine_tau(50, 100, 0.996) == pytest.approx(0.998)
    assert cosine_tau(100, 100, 0.996) == pytest.approx(1.0)
    assert cosine_tau(150, 100, 0.996) == pytest.approx(1.0)
    # Strictly below 1 before the last step: tau must not reach 1 early.
    assert cosine_tau(99, 100, 0.996) < 1.0
    for step in (0, 13, 50, 99):
        assert float(cosine_tau(keras.ops.convert_to_tensor(step), 100, 0.996)) == pytest.approx(
            cosine_tau(step, 100, 0.996), abs=1e-7
        )


@pytest.mark.parametrize("bn_stats", ["own", "ema", "copy"])
def test_update_target_is_exact(bn_stats):
    rng = np.random.default_rng(0)
    online = [
        keras.Variable(rng.normal(size=(3, 4)).astype("float32")),
        keras.Variable(rng.normal(size=(4,)).astype("float32"), trainable=False),
    ]
    target = [
        keras.Variable(rng.normal(size=(3, 4)).astype("float32")),
        keras.Variable(rng.normal(size=(4,)).astype("float32"), trainable=False),
    ]
    o, t = weights(online), weights(target)
    update_target(online, target, 0.9, bn_stats)
    np.testing.assert_allclose(target[0].numpy(), 0.9 * t[0] + 0.1 * o[0], rtol=1e-6)
    expected_stats = {"own": t[1], "ema": 0.9 * t[1] + 0.1 * o[1], "copy": o[1]}[bn_stats]
    np.testing.assert_allclose(target[1].numpy(), expected_stats, rtol=1e-6)


class _CheckEMA(keras.callbacks.Callback):
    """After each step's EMA, checks target == tau*previous + (1-tau)*online."""

    def __init__(self, schedule):
        super().__init__()
        self.schedule = schedule
        self.checked = 0

    def on_train_begin(self, logs=None):
        self.previous = weights(self.model.target_ema_variables)

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations) - 1
        tau = cosine_tau(step, self.schedule.total_steps, self.schedule.base_tau)
        online = self.model.online_ema_variables
        for o, prev, t in zip(online, self.previous, self.model.target_ema_variables):
            if o.trainable:
                np.testing.assert_allclose(t.numpy(), tau * prev + (1 - tau) * o.numpy(), rtol=1e-5, atol=1e-6)
                self.checked += 1
        self.previous = weights(self.model.target_ema_variables)
        assert logs["tau"] == pytest.approx(tau, abs=1e-6)


def test_callback_updates_every_target_variable_exactly():
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    ema = EMAUpdate(total_steps=6, base_tau=0.9)
    check = _CheckEMA(ema)
    model.fit(view_dataset(), steps_per_epoch=3, epochs=2, callbacks=[ema, check], verbose=0)
    trainable_pairs = sum(v.trainable for v in model.online_ema_variables)
    assert check.checked == 6 * trainable_pairs
    assert float(model.tau) == pytest.approx(cosine_tau(5, 6, 0.9))


def _train(steps_per_execution, steps=6):
    keras.utils.set_random_seed(1)
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.1), steps_per_execution=steps_per_execution)
    model.fit(view_dataset(), steps_per_epoch=steps, epochs=1, callbacks=[EMAUpdate(steps, 0.9)], verbose=0)
    return model


def test_steps_per_execution_gives_the_same_targets():
    one, two = _train(1), _train(2)
    assert int(two.optimizer.iterations) == 6
    assert float(two.tau) == pytest.approx(cosine_tau(5, 6, 0.9), abs=1e-7)
    for a, b in zip(one.target_ema_variables, two.target_ema_variables):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-4, atol=1e-5)


def test_callback_validates_arguments():
    with pytest.raises(ValueError, match="total_steps=0"):
        EMAUpdate(total_steps=0)
    with pytest.raises(ValueError, match="bn_stats='avg'"):
        EMAUpdate(total_steps=5, bn_stats="avg")


@pytest.mark.parametrize("steps_per_execution", [1, 2])
def test_a_step_skipped_by_loss_scaling_leaves_the_target(steps_per_execution):
    # Under mixed_float16 a loss scale of 2**60 overflows the float16
    # gradients: the LossScaleOptimizer skips the step (iterations stays) and
    # halves the scale. The target must skip it too.
    keras.mixed_precision.set_global_policy("mixed_float16")
    try:
        model = tiny_byol()
        optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(0.1), initial_scale=2.0**60)
        model.compile(optimizer=optimizer, steps_per_execution=steps_per_execution)
        # Move the target off the online network, so an EMA step would show.
        # (BatchNorm statistics are the target's own: its forward passes move them.)
        pairs = [(o, t) for o, t in zip(model.online_ema_variables, model.target_ema_variables) if o.trainable]
        rng = np.random.default_rng(0)
        for _, t in pairs:
            t.assign(t.numpy() + rng.normal(0.0, 0.1, t.shape).astype(t.dtype))
        target_before = [t.numpy().copy() for _, t in pairs]
        model.fit(view_dataset(), steps_per_epoch=2, epochs=1, callbacks=[EMAUpdate(10, 0.9)], verbose=0)
        assert int(model.optimizer.iterations) == 0 and float(optimizer.dynamic_scale) == 2.0**58
        for before, (_, t) in zip(target_before, pairs):
            np.testing.assert_array_equal(t.numpy(), before, err_msg=t.path)
        # A finite step (scale 1) is applied, and the EMA with it: tau of step 0.
        optimizer.dynamic_scale.assign(1.0)
        online_before = [o.numpy().copy() for o, _ in pairs]
        model.fit(
            view_dataset(), steps_per_epoch=steps_per_execution, epochs=1, callbacks=[EMAUpdate(10, 0.9)], verbose=0
        )
    finally:
        keras.mixed_precision.set_global_policy("float32")
    assert int(model.optimizer.iterations) == steps_per_execution
    if steps_per_execution == 2:
        # Two steps in one call: the online weights between them are not observable.
        assert all(not np.array_equal(t.numpy(), before) for before, (_, t) in zip(target_before, pairs))
        return
    moved = 0
    for o_before, before, (o, t) in zip(online_before, target_before, pairs):
        # tau = 0.9 at step 0: one float32 multiply-add.
        np.testing.assert_allclose(t.numpy(), 0.9 * before + 0.1 * o.numpy(), rtol=1e-6, atol=1e-7, err_msg=t.path)
        moved += not np.array_equal(o_before, o.numpy())
    assert moved == len(pairs)
