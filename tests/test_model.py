import os

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import build_byol, data, get_preset
from byol_tf.build import accept_any_image_size
from byol_tf.ema import EMAUpdate
from byol_tf.heads import MLPHead
from byol_tf.model import BYOL, collapse_std
from helpers_model import colour_classes, labelled_view_dataset, tiny_byol, view_dataset, weights


def test_target_starts_equal_and_is_not_trainable():
    model = tiny_byol()
    for o, t in zip(model.online_ema_variables, model.target_ema_variables):
        np.testing.assert_array_equal(o.numpy(), t.numpy())
        assert not t.trainable
    trainable = {id(v) for v in model.trainable_variables}
    assert not any(id(v) in trainable for v in model.target_ema_variables)
    assert {id(v) for v in model.online_trainable_variables} == trainable


class _RecordOnline(keras.callbacks.Callback):
    """The online weights after every step (EMA comes first: it is the earlier callback)."""

    def __init__(self):
        super().__init__()
        self.steps = []

    def on_train_batch_end(self, batch, logs=None):
        self.steps.append(weights(self.model.online_ema_variables))


def test_fit_lowers_loss_and_moves_only_online_by_gradient():
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
    online_before = weights(model.online_trainable_variables)
    target_before = weights(model.target_ema_variables)
    record = _RecordOnline()
    history = model.fit(view_dataset(), steps_per_epoch=4, epochs=4, callbacks=[EMAUpdate(16, 0.99), record], verbose=0)
    loss = history.history["loss"]
    assert loss[-1] < loss[0]
    # Every online variable, predictor included, got a gradient.
    for before, var in zip(online_before, model.online_trainable_variables):
        assert not np.allclose(before, var.numpy()), var.path
    # The target moved by EMA only: after step k (0-based) it is
    # tau_k * target + (1 - tau_k) * online_k, with the paper's cosine
    # tau_k = 1 - (1 - 0.99) * (cos(pi * k / 16) + 1) / 2, replayed in float64.
    assert len(record.steps) == 16
    expected = [t.astype(np.float64) for t in target_before]
    for k, online in enumerate(record.steps):
        tau = 1 - (1 - 0.99) * (np.cos(np.pi * k / 16) + 1) / 2
        expected = [tau * t + (1 - tau) * o for t, o in zip(expected, online)]
    checked = 0
    for o, t, e, before in zip(model.online_ema_variables, model.target_ema_variables, expected, target_before):
        if o.trainable:
            # 16 float32 multiply-adds: rounding well below 1e-6 of weights of order 1.
            np.testing.assert_allclose(t.numpy(), e, rtol=1e-5, atol=1e-6, err_msg=t.path)
            checked += np.abs(e - before).max() > 1e-4  # the EMA moved it more than the tolerance
    assert checked > 0
    assert set(history.history) >= {"loss", "tau", "lr", "collapse_std"}


def test_target_batchnorm_uses_batch_statistics():
    # With trainable=False a Keras BN layer runs in inference mode; the target
    # must not: its moving mean ("own" statistics) moves during training.
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    bn = [v for v in model.target_encoder.non_trainable_variables if "moving_mean" in v.path][0]
    before = bn.numpy().copy()
    model.fit(view_dataset(), steps_per_epoch=2, epochs=1, callbacks=[EMAUpdate(2, 0.99)], verbose=0)
    assert not np.allclose(before, bn.numpy())


def test_calling_the_model_runs_the_online_encoder():
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.5))
    model.fit(view_dataset(), steps_per_epoch=3, epochs=1, callbacks=[EMAUpdate(3, 0.5)], verbose=0)
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), model.encoder(x).numpy(), atol=1e-6)
    assert not np.allclose(model(x).numpy(), model.target_encoder(x).numpy(), atol=1e-4)


def test_infonce_option_trains():
    model = tiny_byol(loss="infonce")
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    history = model.fit(view_dataset(), steps_per_epoch=2, epochs=1, callbacks=[EMAUpdate(2, 0.99)], verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_config_round_trip_and_keras_save(tmp_path):
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.fit(view_dataset(), steps_per_epoch=2, epochs=1, callbacks=[EMAUpdate(2, 0.9)], verbose=0)
    clone = BYOL.from_config(model.get_config())
    assert clone.get_config()["loss"] == "byol"
    path = os.path.join(tmp_path, "byol.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    for a, b in zip(model.weights, reloaded.weights):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
    for a, b in zip(model.optimizer.variables, reloaded.optimizer.variables):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert all(not v.trainable for v in reloaded.target_ema_variables)


def test_views_smaller_than_the_encoder_train_and_the_saved_encoder_keeps_its_size(tmp_path):
    from byol_tf.backbones import build_encoder

    small = dict(projector_hidden=32, projection_dim=16, predictor_hidden=32)
    model = build_byol(get_preset("cifar10_cpu20", view_size=16, **small))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.fit(view_dataset(image_size=16), steps_per_epoch=2, epochs=1, verbose=0)
    # The same network on 16 px images: a plain Keras encoder built at 16 px with its weights.
    reference = build_encoder("resnet_tiny", 16)
    reference.set_weights(model.encoder.get_weights())
    x = np.random.default_rng(0).random((4, 16, 16, 3)).astype("float32")
    np.testing.assert_allclose(model.encoder(x).numpy(), reference(x).numpy(), atol=1e-4)
    path = os.path.join(tmp_path, "encoder.keras")
    model.encoder.save(path)
    assert keras.saving.load_model(path).input_shape == (None, 32, 32, 3)


def test_small_views_train_online_only_and_add_their_loss_against_both_targets():
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    rng = np.random.default_rng(4)
    large = [rng.random((8, 16, 16, 3)).astype("float32") for _ in range(2)]
    small = [rng.random((8, 8, 8, 3)).astype("float32") for _ in range(2)]
    for network in (model.encoder, model.target_encoder):
        accept_any_image_size(network)
    logs = model.train_step(tuple(large + small))

    # The same networks, run by hand in training mode (batch statistics), and the loss in NumPy.
    def online(x):
        return model.predictor(model.projector(model.encoder(x, training=True), training=True), training=True).numpy()

    def target(x):
        return model.target_projector(model.target_encoder(x, training=True), training=True).numpy()

    def regression(p, z):
        p, z = p / np.linalg.norm(p, axis=-1, keepdims=True), z / np.linalg.norm(z, axis=-1, keepdims=True)
        return 2 - 2 * np.sum(p * z, axis=-1)

    z1, z2 = target(large[0]), target(large[1])
    p1, p2, s1, s2 = (online(x) for x in large + small)
    terms = [(p1, z2), (p2, z1), (s1, z1), (s1, z2), (s2, z1), (s2, z2)]
    expected = np.mean(sum(regression(p, z) for p, z in terms))
    # Had the small views targets of their own, or the mean instead of the sum, this would differ.
    assert float(logs["loss"]) == pytest.approx(expected, rel=1e-4)


def test_a_preset_with_small_views_fits_from_its_own_pipeline():
    small_heads = dict(projector_hidden=32, projection_dim=16, predictor_hidden=32)
    cfg = get_preset("cifar10_cpu20", augment={"small_views": 2}, **small_heads)
    model = build_byol(cfg)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    before = weights(model.online_trainable_variables)
    images = np.random.default_rng(0).integers(0, 256, (32, 32, 32, 3), dtype=np.uint8)
    views = data.pretrain_dataset(images, 8, cfg.augment, seed=0, autotune=False)
    assert [spec.shape.as_list()[1] for spec in views.element_spec] == [32, 32, 16, 16]
    history = model.fit(views, steps_per_epoch=2, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(b, v.numpy()) for b, v in zip(before, model.online_trainable_variables))


def test_collapse_signal():
    z = np.random.default_rng(0).normal(size=(512, 64)).astype("float32")
    assert float(collapse_std(z)) == pytest.approx(1 / np.sqrt(64), rel=0.1)
    assert float(collapse_std(np.ones((32, 64), "float32"))) == pytest.approx(0.0, abs=1e-6)


def test_build_byol_from_preset_uses_paper_heads():
    model = build_byol(get_preset("imagenet", backbone="resnet_tiny", image_size=32))
    assert model.projector.hidden_dim == 4096 and model.projector.output_dim == 256
    assert model.predictor.hidden_dim == 4096 and model.predictor.output_dim == 256


def test_unknown_loss():
    with pytest.raises(ValueError, match="loss='l2'"):
        tiny_byol(loss="l2")


# The online linear probe.


def test_probe_never_changes_the_encoder():
    x, labels = colour_classes()
    runs = {}
    for probe in (None, 3):
        keras.utils.set_random_seed(0)
        model = tiny_byol(probe_classes=probe, probe_learning_rate=0.05)
        model.compile(optimizer=keras.optimizers.SGD(0.05, momentum=0.9))
        probe_before = weights(model.probe.weights) if probe else None
        data = labelled_view_dataset(x, labels) if probe else labelled_view_dataset(x, labels).map(lambda v, y: v)
        model.fit(data, steps_per_epoch=3, epochs=1, callbacks=[EMAUpdate(3, 0.99)], verbose=0)
        runs[probe] = model
    with_probe, without = runs[3], runs[None]
    # Same online and target weights, step for step: the probe's features are stop-gradient.
    for a, b in zip(
        with_probe.online_trainable_variables + with_probe.target_ema_variables,
        without.online_trainable_variables + without.target_ema_variables,
    ):
        np.testing.assert_allclose(a.numpy(), b.numpy(), atol=1e-6, err_msg=a.path)
    assert not np.allclose(probe_before[0], with_probe.probe.kernel.numpy())
    # The BYOL optimizer holds no state for the probe; the probe has its own.
    main = {id(v) for v in with_probe.optimizer._trainable_variables}
    assert main == {id(v) for v in with_probe.online_trainable_variables}
    assert int(with_probe.probe_optimizer.iterations) == 3


def test_probe_learns_a_separable_task_and_validates():
    x, labels = colour_classes(num=96)
    model = tiny_byol(probe_classes=3, probe_learning_rate=0.05)
    model.compile(optimizer=keras.optimizers.SGD(0.01))
    val = tf.data.Dataset.from_tensor_slices((x, labels)).batch(32)
    history = model.fit(
        labelled_view_dataset(x, labels, batch=16),
        steps_per_epoch=12,
        epochs=3,
        validation_data=val,
        callbacks=[EMAUpdate(36, 0.99)],
        verbose=0,
    )
    assert history.history["probe_acc"][-1] > 0.9
    assert history.history["val_probe_acc"][-1] > 0.9
    # Chance is 1/3; a probe on shuffled labels cannot do this well.
    shuffled = np.random.default_rng(0).permutation(labels)
    result = model.evaluate(tf.data.Dataset.from_tensor_slices((x, shuffled)).batch(32), verbose=0, return_dict=True)
    assert result["probe_acc"] < 0.7


def test_probe_round_trips_through_config_save_and_weights(tmp_path):
    x, labels = colour_classes()
    model = tiny_byol(probe_classes=3, probe_learning_rate=0.02)
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    model.fit(labelled_view_dataset(x, labels), steps_per_epoch=2, epochs=1, callbacks=[EMAUpdate(2, 0.9)], verbose=0)
    config = BYOL.from_config(model.get_config()).get_config()
    assert config["probe_classes"] == 3 and config["probe_learning_rate"] == 0.02
    path = os.path.join(tmp_path, "byol.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    # What a resume uses: the weights file, probe optimizer included.
    fresh = tiny_byol(probe_classes=3, probe_learning_rate=0.02)
    fresh.compile(optimizer=keras.optimizers.SGD(0.05))
    model.save_weights(os.path.join(tmp_path, "w.weights.h5"))
    fresh.load_weights(os.path.join(tmp_path, "w.weights.h5"))
    for other in (reloaded, fresh):
        np.testing.assert_array_equal(model.probe.kernel.numpy(), other.probe.kernel.numpy())
        for a, b in zip(model.probe_optimizer.variables, other.probe_optimizer.variables):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
        assert int(other.probe_optimizer.iterations) == 2
        assert len(other.optimizer.variables) == len(model.optimizer.variables)


def test_probe_misuse_is_named():
    with pytest.raises(ValueError, match="probe_classes=1"):
        tiny_byol(probe_classes=1)
    with pytest.raises(ValueError, match="probe_learning_rate=0"):
        tiny_byol(probe_classes=3, probe_learning_rate=0)
    x, labels = colour_classes()
    model = tiny_byol()
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    with pytest.raises(ValueError, match="probe_classes=None"):
        model.fit(labelled_view_dataset(x, labels), steps_per_epoch=1, epochs=1, verbose=0)
    with pytest.raises(ValueError, match="probe_classes=None"):
        model.evaluate(tf.data.Dataset.from_tensor_slices((x, labels)).batch(8), verbose=0)


def _conv_encoder(l2=None, size=16):
    """A small encoder whose convolution kernel carries an L2 regulariser (or none)."""
    inputs = keras.Input((size, size, 3))
    regulariser = keras.regularizers.L2(l2) if l2 else None
    x = keras.layers.Conv2D(8, 3, kernel_regularizer=regulariser, name="conv")(inputs)
    x = keras.layers.ReLU()(keras.layers.BatchNormalization()(x))
    return keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x))


def test_train_step_adds_weight_regularisers():
    # SGD without momentum: the L2 term adds exactly lr * 2 * l2 * W to the
    # step of the regularised kernel and changes nothing else.
    l2, lr = 0.05, 0.1
    batch = next(iter(view_dataset(batch=8)))
    runs, start = {}, None
    for penalty in (None, l2):
        keras.utils.set_random_seed(0)
        model = BYOL(_conv_encoder(penalty), MLPHead(32, 16), MLPHead(32, 16))
        start = start or model.get_weights()
        model.set_weights(start)
        model.compile(optimizer=keras.optimizers.SGD(lr))
        kernel_before = model.encoder.get_layer("conv").kernel.numpy().copy()
        logs = model.train_step(batch)
        runs[penalty] = (model, kernel_before, float(logs["loss"]))
    (plain, w0, plain_loss), (regularised, w0_again, loss) = runs[None], runs[l2]
    np.testing.assert_array_equal(w0, w0_again)
    # The target's copy of the kernel is non-trainable: only the online one counts.
    assert len(regularised.losses) == 1
    # float32 sums of ~216 squares near 0.05: relative rounding ~1e-6.
    assert loss == pytest.approx(plain_loss + l2 * np.sum(w0.astype(np.float64) ** 2), rel=1e-6)
    for a, b in zip(regularised.online_trainable_variables, plain.online_trainable_variables):
        expected = b.numpy()
        if "conv" in a.path and "kernel" in a.path:
            expected = expected - lr * 2 * l2 * w0
        # Weights of order 0.1-1 after one float32 step: a few ulps.
        np.testing.assert_allclose(a.numpy(), expected, rtol=1e-6, atol=1e-7, err_msg=a.path)


@keras.saving.register_keras_serializable(package="tests")
class _NaNToZero(keras.layers.Layer):
    def call(self, x):
        return tf.where(tf.math.is_nan(x), tf.zeros_like(x), x)


def test_logged_loss_is_nan_when_a_weight_is_nan_even_if_the_forward_hides_it():
    # oneDNN's fused BatchNorm+ReLU maps NaN to 0 on some CPUs; this encoder
    # does the same on every CPU, so its loss stays finite with a NaN kernel.
    inputs = keras.Input((16, 16, 3))
    x = _NaNToZero()(keras.layers.Conv2D(8, 3, name="conv")(inputs))
    model = BYOL(keras.Model(inputs, keras.layers.GlobalAveragePooling2D()(x)), MLPHead(32, 16), MLPHead(32, 16))
    model.compile(optimizer=keras.optimizers.SGD(0.0))
    batch = next(iter(view_dataset(batch=8)))
    assert np.isfinite(float(model.train_step(batch)["loss"]))
    kernel = model.encoder.get_layer("conv").kernel
    kernel.assign(np.full(kernel.shape, np.nan, "float32"))
    model.loss_tracker.reset_state()
    logs = model.train_step(batch)
    assert np.isnan(float(logs["loss"]))
