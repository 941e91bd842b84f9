import math
import os
import subprocess
import sys
import textwrap

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf.build import build_byol
from byol_tf.config import PretrainConfig
from byol_tf.optim import LARS, MaskedAdamW, MaskedSGD, WarmupCosine, build_optimizer
from byol_tf.presets import get_preset


# ---------------------------------------------------------------- WarmupCosine


def test_warmup_cosine_values():
    s = WarmupCosine(peak_lr=2.0, warmup_steps=10, total_steps=110, final_lr=0.2)
    lr = lambda step: float(s(step))
    assert lr(0) == 0.0
    assert lr(5) == pytest.approx(1.0)
    assert lr(10) == pytest.approx(2.0)
    assert lr(60) == pytest.approx(0.2 + 1.8 * 0.5)  # halfway down the cosine
    assert lr(35) == pytest.approx(0.2 + 1.8 * 0.5 * (1 + math.cos(math.pi * 0.25)), rel=1e-5)
    assert lr(110) == pytest.approx(0.2)
    assert lr(500) == pytest.approx(0.2)


def test_warmup_cosine_graph_and_no_warmup():
    s = WarmupCosine(peak_lr=1.0, warmup_steps=0, total_steps=4)
    values = tf.function(lambda steps: tf.map_fn(s, steps, fn_output_signature=tf.float32))(
        tf.constant([0, 2, 4, 9], tf.int64)
    )
    np.testing.assert_allclose(values.numpy(), [1.0, 0.5, 0.0, 0.0], atol=1e-6)


def test_warmup_cosine_config_round_trip():
    s = WarmupCosine(peak_lr=0.8, warmup_steps=7, total_steps=70, final_lr=0.01)
    assert s.get_config() == {
        "peak_lr": 0.8,
        "warmup_steps": 7,
        "total_steps": 70,
        "final_lr": 0.01,
        "name": "WarmupCosine",
    }
    # Keras's own schedule does the maths.
    assert isinstance(s, keras.optimizers.schedules.CosineDecay)
    again = WarmupCosine.from_config(s.get_config())
    for step in (0, 3, 7, 30, 70, 80):
        assert float(again(step)) == float(s(step))
    again = keras.optimizers.schedules.deserialize(keras.optimizers.schedules.serialize(s))
    assert isinstance(again, WarmupCosine) and again.get_config() == s.get_config()


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(peak_lr=1.0, warmup_steps=0, total_steps=0), "`total_steps` must be > 0. Received: total_steps=0"),
        (dict(peak_lr=1.0, warmup_steps=5, total_steps=4), "Received: warmup_steps=5"),
        (dict(peak_lr=-1.0, warmup_steps=0, total_steps=4), "Received: peak_lr=-1.0"),
        (dict(peak_lr=1.0, warmup_steps=0, total_steps=4, final_lr=2.0), "Received: final_lr=2.0"),
    ],
)
def test_warmup_cosine_validation(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        WarmupCosine(**kwargs)


# ------------------------------------------------------------------------ LARS


def _numpy_lars(params, grads_per_step, lr, momentum, wd, eta, nesterov, decay, adapt):
    params = {k: v.astype(np.float64).copy() for k, v in params.items()}
    bufs = {k: np.zeros_like(v) for k, v in params.items()}
    for grads in grads_per_step:
        for k, w in params.items():
            g = grads[k].astype(np.float64)
            if decay[k]:
                g = g + wd * w
            if adapt[k]:
                wn, gn = np.linalg.norm(w), np.linalg.norm(g)
                g = g * (eta * wn / gn if wn > 0 and gn > 0 else 1.0)
            bufs[k] = momentum * bufs[k] + g
            params[k] = w - lr * (momentum * bufs[k] + g if nesterov else bufs[k])
    return params


def _problem(seed=0):
    rng = np.random.default_rng(seed)
    params = {
        "kernel": rng.normal(size=(3, 2)).astype("float32"),
        "bias": rng.normal(size=(2,)).astype("float32"),
        "gamma": (1.0 + 0.1 * rng.normal(size=(2,))).astype("float32"),
        "zero_kernel": np.zeros((2, 2), "float32"),
    }
    grads = [{k: rng.normal(size=v.shape).astype("float32") for k, v in params.items()} for _ in range(3)]
    return params, grads


@pytest.mark.parametrize("nesterov", [False, True])
@pytest.mark.parametrize("names", [None, ["zero_k"]])
def test_lars_matches_numpy_reference(nesterov, names):
    params, grads = _problem()
    kw = dict(learning_rate=0.5, momentum=0.9, weight_decay=0.1, eta=0.01, nesterov=nesterov)
    opt = LARS(exclude_from_adaptation=names, **kw)
    variables = {k: keras.Variable(v, name=k) for k, v in params.items()}
    for step in grads:
        opt.apply_gradients([(tf.constant(step[k]), variables[k]) for k in params])
    # Rank <= 1 variables (bias, BN gamma) get neither decay nor trust ratio.
    decay = {"kernel": True, "bias": False, "gamma": False, "zero_kernel": True}
    adapt = {"kernel": True, "bias": False, "gamma": False, "zero_kernel": names is None}
    expected = _numpy_lars(
        params, grads, kw["learning_rate"], kw["momentum"], kw["weight_decay"], kw["eta"], nesterov, decay, adapt
    )
    for k in params:
        np.testing.assert_allclose(variables[k].numpy(), expected[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The exclusions matter: bias with the trust ratio, or the kernel without, would differ.
    wrong = _numpy_lars(params, grads, 0.5, 0.9, 0.1, 0.01, nesterov, decay, {**adapt, "bias": True})
    assert not np.allclose(variables["bias"].numpy(), wrong["bias"], rtol=1e-3)
    wrong = _numpy_lars(params, grads, 0.5, 0.9, 0.1, 0.01, nesterov, {**decay, "kernel": False}, adapt)
    assert not np.allclose(variables["kernel"].numpy(), wrong["kernel"], rtol=1e-6, atol=0)


def test_lars_zero_norm_weight_gets_trust_one_and_decay_by_name():
    opt = LARS(learning_rate=0.5, momentum=0.9, weight_decay=0.5, eta=1e-3, exclude_from_weight_decay=["nodecay"])
    zero = keras.Variable(np.zeros((2, 2), "float32"), name="zero")
    nodecay = keras.Variable(np.ones((2, 2), "float32"), name="kernel_nodecay")
    g = np.full((2, 2), 2.0, "float32")
    opt.apply_gradients([(tf.constant(g), zero), (tf.constant(g), nodecay)])
    np.testing.assert_allclose(zero.numpy(), -0.5 * g)  # trust ratio 1, not eta * 0 / ||g||
    # Without decay the trust ratio is eta * ||w|| / ||g|| = 1e-3 * 2 / 4.
    np.testing.assert_allclose(nodecay.numpy(), 1.0 - 0.5 * (1e-3 * 2 / 4) * g, rtol=1e-6)


def test_lars_lr_multipliers_scale_the_matched_variables_steps():
    opt = LARS(learning_rate=0.5, momentum=0.9, weight_decay=0.1, eta=1e-2, lr_multipliers={"predictor_": 10.0})
    w = np.array([[1.0, -2.0], [0.5, 3.0]], "float32")
    g = np.array([[0.2, 0.1], [-0.4, 0.3]], "float32")
    plain = keras.Variable(w, name="encoder_kernel")
    fast = keras.Variable(w, name="predictor_kernel")
    bias = keras.Variable(np.ones(2, "float32"), name="predictor_bias")
    opt.apply_gradients([(tf.constant(g), plain), (tf.constant(g), fast), (tf.constant(g[0]), bias)])
    # One LARS step from zero momentum, written out: decay, then the trust ratio eta ||w|| / ||g||.
    decayed = g + 0.1 * w
    step = 0.5 * (1e-2 * np.linalg.norm(w) / np.linalg.norm(decayed)) * decayed
    np.testing.assert_allclose(plain.numpy(), w - step, rtol=1e-6)
    np.testing.assert_allclose(fast.numpy(), w - 10.0 * step, rtol=1e-5)
    np.testing.assert_allclose(bias.numpy(), 1.0 - 10.0 * 0.5 * g[0], rtol=1e-6)  # rank 1: no decay, no ratio
    with pytest.raises(ValueError, match=r"lr_multipliers\['head'\].*Received: .*=0"):
        LARS(lr_multipliers={"head": 0.0})


def test_build_optimizer_scales_only_the_predictor():
    config = _config(predictor_lr_scale=10.0)
    assert build_optimizer(config, steps_per_epoch=10).lr_multipliers == {"predictor/": 10.0}
    assert build_optimizer(_config(), steps_per_epoch=10).lr_multipliers == {}
    # On a built model: exactly the predictor's variables, none of the encoder's or projector's.
    config = get_preset("demo", predictor_lr_scale=10.0)
    model = build_byol(config)
    opt = build_optimizer(config, steps_per_epoch=10)
    opt.build(model.online_trainable_variables)
    scaled = {id(v) for v, f in zip(model.online_trainable_variables, opt._lr_factors) if f == 10.0}
    assert scaled == {id(v) for v in model.predictor.trainable_variables} and len(scaled) == 5
    with pytest.raises(ValueError, match=r"predictor_lr_scale.*optimizer='sgd'.*Received: predictor_lr_scale=10"):
        _config(optimizer="sgd", base_lr=0.1, predictor_lr_scale=10.0)
    with pytest.raises(ValueError, match="Received: predictor_lr_scale=0"):
        _config(predictor_lr_scale=0.0)


def test_lars_config_round_trip():
    schedule = WarmupCosine(peak_lr=3.2, warmup_steps=10, total_steps=100)
    opt = LARS(
        learning_rate=schedule,
        momentum=0.8,
        weight_decay=1e-5,
        eta=2e-3,
        nesterov=True,
        exclude_from_adaptation=["head"],
        exclude_from_weight_decay=["emb"],
        lr_multipliers={"predictor/": 10.0},
        global_clipnorm=1.0,
    )
    assert opt.weight_decay is None  # Keras' decoupled decay must stay off.
    config = opt.get_config()
    for key, value in dict(
        momentum=0.8,
        weight_decay=1e-5,
        eta=2e-3,
        nesterov=True,
        exclude_from_adaptation=["head"],
        exclude_from_weight_decay=["emb"],
        lr_multipliers={"predictor/": 10.0},
        global_clipnorm=1.0,
        name="lars",
    ).items():
        assert config[key] == value, key
    again = keras.optimizers.deserialize(keras.optimizers.serialize(opt))
    assert isinstance(again, LARS)
    assert again.get_config() == config
    assert isinstance(again._learning_rate, WarmupCosine)
    assert again._learning_rate.get_config() == schedule.get_config()


def _tiny_data(n=64):
    rng = np.random.default_rng(1)
    x = rng.normal(size=(n, 8)).astype("float32")
    y = (x @ rng.normal(size=(8, 1)) + 0.5).astype("float32")
    return x, y


def _tiny_model():
    keras.utils.set_random_seed(0)
    return keras.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16),
            keras.layers.BatchNormalization(),
            keras.layers.ReLU(),
            keras.layers.Dense(1),
        ]
    )


def test_lars_fits_a_keras_model_and_saves(tmp_path):
    x, y = _tiny_data()
    model = _tiny_model()
    model.compile(optimizer=LARS(learning_rate=0.05, eta=0.2), loss="mse")
    before = model.evaluate(x, y, verbose=0)
    model.fit(x, y, batch_size=16, epochs=5, verbose=0, shuffle=False)
    after = model.evaluate(x, y, verbose=0)
    assert np.isfinite(after) and after < 0.7 * before, (before, after)
    path = str(tmp_path / "m.keras")
    model.save(path)
    loaded = keras.models.load_model(path)
    assert isinstance(loaded.optimizer, LARS) and loaded.optimizer.eta == 0.2
    assert int(loaded.optimizer.iterations) == int(model.optimizer.iterations) == 20


_MIRRORED = textwrap.dedent("""
    import numpy as np, tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from byol_tf.optim import LARS, WarmupCosine
    x = np.random.default_rng(1).normal(size=(32, 8)).astype("float32")
    y = x.sum(axis=1, keepdims=True)
    def run(strategy):
        with strategy.scope():
            keras.utils.set_random_seed(0)
            model = keras.Sequential([keras.Input((8,)), keras.layers.Dense(4), keras.layers.Dense(1)])
            model.compile(LARS(WarmupCosine(1.0, 2, 8), weight_decay=1e-2, eta=0.02), loss="mse")
        model.fit(x, y, batch_size=16, epochs=3, shuffle=False, verbose=0)
        return [w.numpy() for w in model.weights]
    mirrored = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    assert mirrored.num_replicas_in_sync == 2
    for a, b in zip(run(mirrored), run(tf.distribute.get_strategy())):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    print("MIRRORED_OK")
""")


def test_lars_under_mirrored_strategy_matches_single_device():
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", KERAS_BACKEND="tensorflow")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run(
        [sys.executable, "-c", _MIRRORED], cwd=root, env=env, capture_output=True, text=True, timeout=300
    )
    assert "MIRRORED_OK" in proc.stdout, proc.stdout[-2000:] + proc.stderr[-4000:]


# ------------------------------------------------------------- build_optimizer


def _config(**kw):
    return PretrainConfig(**{"batch_size": 256, "epochs": 10, "warmup_epochs": 1, **kw})


@pytest.mark.parametrize(
    "name, base_lr, cls",
    [("lars", 0.2, LARS), ("sgd", 0.1, MaskedSGD), ("adam", 1e-3, keras.optimizers.Adam), ("adamw", 1e-3, MaskedAdamW)],
)
def test_build_optimizer_classes(name, base_lr, cls):
    opt = build_optimizer(_config(optimizer=name, base_lr=base_lr, weight_decay=1e-4), steps_per_epoch=10)
    assert type(opt) is cls
    schedule = opt._learning_rate
    assert isinstance(schedule, WarmupCosine)
    assert (schedule.peak_lr, schedule.warmup_steps, schedule.total_steps) == (base_lr, 10, 100)
    if name == "lars":
        assert opt.lars_weight_decay == 1e-4 and opt.momentum == 0.9 and opt.weight_decay is None
    if name == "sgd":
        assert isinstance(opt, keras.optimizers.SGD) and opt.momentum == 0.9 and not opt.nesterov
    if name == "adam":
        assert not opt.weight_decay


def test_build_optimizer_warmup_rounding():
    opt = build_optimizer(_config(warmup_epochs=0.5), steps_per_epoch=7)
    assert opt._learning_rate.warmup_steps == 4 and opt._learning_rate.total_steps == 70


def test_build_optimizer_lays_the_cosine_over_the_schedule_horizon():
    # 10 epochs of 4 steps, 1 warm-up epoch, the cosine over 2 x 40 = 80 steps: at the run's
    # last step (40) it is 36 of 76 steps down, written out by hand; 0 only at step 80.
    opt = build_optimizer(_config(base_lr=1.0, batch_size=512, schedule_horizon=2.0), steps_per_epoch=4)
    schedule = opt._learning_rate
    assert schedule.total_steps == 80
    assert float(schedule(40)) == pytest.approx(1 + math.cos(math.pi * 36 / 76), rel=1e-6)
    assert float(schedule(80)) == pytest.approx(0.0, abs=1e-7)


@pytest.mark.parametrize("name", ["adam", "adamw"])
def test_build_optimizer_rejects_lars_sized_adam_rates(name):
    cfg = _config(optimizer=name, base_lr=0.8)
    with pytest.raises(ValueError, match=rf"Received: optimizer='{name}', peak_lr=0.8") as info:
        build_optimizer(cfg, steps_per_epoch=10)
    assert "1e-3" in str(info.value) and "base_lr" in str(info.value)


@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_keras_decay_skips_rank_one_variables(name):
    opt = build_optimizer(_config(optimizer=name, base_lr=1e-3, weight_decay=0.5), steps_per_epoch=1)
    kernel = keras.Variable(np.ones((2, 2), "float32"), name="kernel")
    bias = keras.Variable(np.ones((2,), "float32"), name="bias")
    for _ in range(3):  # zero gradients: only the decay moves the weights
        opt.apply_gradients([(tf.zeros((2, 2)), kernel), (tf.zeros((2,)), bias)])
    np.testing.assert_array_equal(bias.numpy(), np.ones(2))
    assert np.all(kernel.numpy() < 1.0)


def test_optimizer_learning_rate_follows_schedule():
    # Peak 1.0 * 512 / 256 = 2, warm-up over 1 epoch of 4 steps, then a
    # cosine to 0 over the other 36 of 10 * 4 steps: written out by hand.
    opt = build_optimizer(_config(base_lr=1.0, batch_size=512), steps_per_epoch=4)
    expected = [0.0, 0.5, 1.0, 1.5, 2.0] + [(1 + math.cos(math.pi * k / 36)) for k in (1, 2)]
    w = keras.Variable(np.ones((2, 2), "float32"))
    assert float(opt.learning_rate) == 0.0
    for step in range(1, 7):
        opt.apply_gradients([(tf.ones((2, 2)), w)])
        assert int(opt.iterations) == step
        assert float(opt.learning_rate) == pytest.approx(expected[step], rel=1e-6, abs=1e-7)
