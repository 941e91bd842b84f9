import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import kernels
from byol_tf.backbones import build_encoder
from byol_tf.model import BYOL
from helpers_model import tiny_byol, view_dataset


def _grads(fn, x, kernel):
    with tf.GradientTape() as tape:
        tape.watch([x, kernel])
        y = fn(x, kernel)
        # A non-linear loss, so every gradient entry gets its own weight.
        loss = tf.reduce_sum(y * tf.sin(y))
    return (y, *tape.gradient(loss, [x, kernel]))


def _op_types(fn, *args):
    return {op.type for op in tf.function(fn).get_concrete_function(*args).graph.get_operations()}


# (map size, in, out, kernel, stride, padding): 1x1 maps (the centre-tap
# product), tiny outputs (the patch product), and larger maps (plain conv;
# stride-1 "same" ones take their input gradient as a forward convolution).
CONV_CASES = [
    (1, 6, 4, 3, 1, "SAME"),
    (2, 5, 7, 3, 1, "SAME"),
    (4, 5, 7, 3, 2, "SAME"),
    (3, 5, 7, 3, 2, "SAME"),
    (2, 4, 6, 1, 2, "VALID"),
    (2, 4, 6, 1, 2, "SAME"),
    (5, 3, 4, 3, 2, "VALID"),
    (3, 3, 8, 7, 2, "SAME"),
    (9, 3, 4, 3, 1, "SAME"),
    (7, 3, 4, 5, 1, "SAME"),
]


@pytest.mark.parametrize("size,cin,cout,k,stride,padding", CONV_CASES)
@pytest.mark.parametrize("as_matmul,as_conv", [(True, True), (True, False), (False, True), (False, False)])
def test_conv2d_matches_tf_conv_and_its_gradients(size, cin, cout, k, stride, padding, as_matmul, as_conv):
    x = tf.random.normal((3, size, size, cin), seed=1)
    kernel = tf.random.normal((k, k, cin, cout), seed=2)
    expected = _grads(lambda a, w: tf.nn.conv2d(a, w, stride, padding), x, kernel)
    got = _grads(lambda a, w: kernels.conv2d(a, w, (stride, stride), padding, as_matmul, as_conv), x, kernel)
    for e, g in zip(expected, got):
        np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-4, atol=1e-4)


def test_filter_gradient_is_a_matmul_on_tiny_maps_only():
    def grad_of(size, as_matmul):
        x = tf.random.normal((2, size, size, 4))
        kernel = tf.random.normal((3, 3, 4, 5))

        def fn(a, w):
            with tf.GradientTape() as tape:
                tape.watch(w)
                y = kernels.conv2d(a, w, (1, 1), "SAME", as_matmul)
            return tape.gradient(y, w)

        return _op_types(fn, x, kernel)

    assert "Conv2DBackpropFilter" not in grad_of(2, True)
    assert "Conv2DBackpropFilter" in grad_of(2, False)
    assert "Conv2DBackpropFilter" in grad_of(3, True)  # 9 output pixels: the plain kernel is faster


def test_input_gradient_is_a_forward_convolution_for_stride_1_same_odd_kernels_only():
    def grad_ops(size, k, stride, padding, as_conv):
        x = tf.random.normal((2, size, size, 4))
        kernel = tf.random.normal((k, k, 4, 5))

        def fn(a, w):
            with tf.GradientTape() as tape:
                tape.watch(a)
                y = kernels.conv2d(a, w, (stride, stride), padding, input_grad_as_conv=as_conv)
            return tape.gradient(y, a)

        return _op_types(fn, x, kernel)

    assert "Conv2DBackpropInput" not in grad_ops(6, 3, 1, "SAME", True)
    assert "Conv2DBackpropInput" not in grad_ops(6, 5, 1, "SAME", True)
    assert "Conv2DBackpropInput" in grad_ops(6, 3, 1, "SAME", False)
    assert "Conv2DBackpropInput" in grad_ops(6, 3, 2, "SAME", True)  # strided: the transpose is not a plain conv
    assert "Conv2DBackpropInput" in grad_ops(6, 3, 1, "VALID", True)
    assert "Conv2DBackpropInput" in grad_ops(6, 2, 1, "SAME", True)  # even kernels pad unevenly


def test_a_1x1_map_convolves_with_the_centre_tap_only():
    ops = _op_types(lambda a, w: kernels.conv2d(a, w), tf.zeros((2, 1, 1, 4)), tf.zeros((3, 3, 4, 5)))
    assert "MatMul" in ops and "Conv2D" not in ops


def _bn_pair(shape, **kwargs):
    plain = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-3, **kwargs)
    fast = keras.layers.BatchNormalization(momentum=0.8, epsilon=1e-3, **kwargs)
    for layer in (plain, fast):
        layer.build((None, *shape[1:]))
    rng = np.random.default_rng(0)
    for p, f in zip(plain.weights, fast.weights):
        value = rng.uniform(0.5, 1.5, p.shape).astype("float32")
        p.assign(value)
        f.assign(value)
    assert kernels.install_fast_kernels(fast) == 1
    return plain, fast


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 5, 4)])
@pytest.mark.parametrize("center,scale", [(True, True), (False, False)])
def test_fused_batch_norm_matches_keras(shape, center, scale):
    plain, fast = _bn_pair(shape, center=center, scale=scale)
    x = tf.random.normal(shape, mean=2.0, seed=3)
    results = []
    for layer in (plain, fast):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.function(lambda a, layer=layer: layer(a, training=True))(x)
            loss = tf.reduce_sum(y * tf.sin(y))
        results.append([y, *tape.gradient(loss, [x] + layer.trainable_weights), *layer.non_trainable_weights])
    for e, g in zip(*results):
        np.testing.assert_allclose(np.asarray(g), np.asarray(e), rtol=1e-4, atol=1e-5)
    # Inference uses the moving statistics, through Keras's own path.
    np.testing.assert_allclose(fast(x, training=False).numpy(), plain(x, training=False).numpy(), rtol=1e-5, atol=1e-6)


def test_install_switches_plain_layers_only_and_keeps_them_plain(tmp_path):
    class Standardised(keras.layers.Conv2D):
        def convolution_op(self, inputs, kernel):
            return super().convolution_op(inputs, kernel - tf.reduce_mean(kernel))

    encoder = build_encoder("resnet_tiny", 16)
    inputs = keras.Input((16, 16, 3))
    model = keras.Model(inputs, Standardised(2, 1)(keras.layers.Reshape((1, 1, -1))(encoder(inputs))))
    before = model.get_config()
    counts = [
        sum(isinstance(l, cls) for l in encoder._flatten_layers())
        for cls in (keras.layers.Conv2D, keras.layers.BatchNormalization)
    ]
    assert kernels.install_fast_kernels(model) == sum(counts)
    assert kernels.install_fast_kernels(model) == sum(counts)  # again: harmless
    assert model.get_config() == before
    standardised = model.layers[-1]
    assert "convolution_op" not in vars(standardised)
    path = str(tmp_path / "m.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, custom_objects={"Standardised": Standardised})
    assert not any("convolution_op" in vars(l) or "call" in vars(l) for l in reloaded._flatten_layers())
    x = tf.random.uniform((2, 16, 16, 3))
    np.testing.assert_allclose(reloaded(x).numpy(), model(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(6, 4), (3, 5, 5, 4)])
def test_fused_batch_norm_in_float16_matches_keras(shape):
    # Under mixed_float16 Keras computes the statistics in float32 and casts
    # back; the fused kernel takes float16 in and out with float32 statistics.
    plain, fast = _bn_pair(shape, dtype="mixed_float16")
    x = tf.cast(tf.random.normal(shape, mean=2.0, seed=3), tf.float16)
    results = []
    for layer in (plain, fast):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = tf.function(lambda a, layer=layer: layer(a, training=True))(x)
            loss = tf.reduce_sum(tf.cast(y, tf.float32) * tf.sin(tf.cast(y, tf.float32)))
        results.append([y, *tape.gradient(loss, [x] + layer.trainable_weights), *layer.non_trainable_weights])
    (y, dx, *rest), (fast_y, fast_dx, *fast_rest) = [[np.asarray(v) for v in r] for r in results]
    assert y.dtype == fast_y.dtype == dx.dtype == fast_dx.dtype == np.float16
    for e, g in ((y, fast_y), (dx, fast_dx)):
        # Both compute in float32 and round to float16: at most one float16 ulp apart.
        assert np.all(np.abs(g.astype(np.float32) - e.astype(np.float32)) <= np.spacing(np.abs(e))), (g, e)
    for e, g in zip(rest, fast_rest):
        # float32 gradients (sums over the batch) and moving statistics:
        # float32 rounding of the largest term.
        assert e.dtype == g.dtype == np.float32
        np.testing.assert_allclose(g, e, rtol=0, atol=1e-6 * np.abs(e).max())


def test_fused_batch_norm_counts_elements_in_int64():
    # int32 counts wrap past 2**31 elements in one layer on one replica.
    layer = keras.layers.BatchNormalization()
    layer.build((None, None, None, 4))
    graph = (
        tf.function(lambda x: kernels.fused_batch_norm(layer, x))
        .get_concrete_function(tf.TensorSpec([None, None, None, 4], tf.float32))
        .graph
    )
    sizes = [op for op in graph.get_operations() if op.type == "Size"]
    assert sizes and all(op.get_attr("out_type") == tf.int64 for op in sizes)


def _one_step(fast, precision="float32"):
    keras.mixed_precision.set_global_policy(precision)
    try:
        keras.utils.set_random_seed(0)
        model = tiny_byol(image_size=16, fast_kernels=fast)
        model.compile(optimizer=keras.optimizers.SGD(0.1))
        logs = model.train_step(next(iter(view_dataset(batch=16))))
        return float(logs["loss"]), [v.numpy() for v in model.online_ema_variables]
    finally:
        keras.mixed_precision.set_global_policy("float32")


def test_byol_step_is_the_same_with_fast_kernels():
    loss, weights = _one_step(fast=True)
    ref_loss, ref_weights = _one_step(fast=False)
    assert abs(loss - ref_loss) < 1e-5
    for a, b in zip(weights, ref_weights):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)


def test_byol_step_in_bfloat16_stays_as_close_to_float32_as_keras():
    ref_loss, _ = _one_step(fast=False)
    keras_loss = _one_step(fast=False, precision="mixed_bfloat16")[0]
    fast_loss = _one_step(fast=True, precision="mixed_bfloat16")[0]
    keras_gap = abs(keras_loss - ref_loss)
    # Keras's own bfloat16 gap is rounding: below bfloat16's unit roundoff
    # (2**-9) of the loss, as the errors of 16 pairs average out.
    assert 0 < keras_gap < 2**-9 * abs(ref_loss)
    # The fast kernels compute the same ops in the same precision, in another
    # order: they must meet the same rounding bound. (Against Keras's own gap
    # it held on Zen 4, but AMX-BF16 on an Intel Xeon rounds them 1.4x apart.)
    assert 0 < abs(fast_loss - ref_loss) < 2**-9 * abs(ref_loss)


def test_fast_kernels_are_the_entry_points_choice_not_the_models():
    from byol_tf import get_preset
    from byol_tf.build import build_byol

    model = tiny_byol(fast_kernels=False)
    assert not any("call" in vars(l) for l in model._flatten_layers())
    assert "fast_kernels" not in model.get_config()
    # A model saved before the kernels became opt-in still loads.
    BYOL.from_config({**model.get_config(), "fast_kernels": True})
    small = dict(image_size=16, projector_hidden=8, projection_dim=4, predictor_hidden=8)
    fast = build_byol(get_preset("demo", **small))
    assert any("call" in vars(l) for l in fast.target_encoder._flatten_layers())
    plain = build_byol(get_preset("demo", fast_kernels=False, **small))
    assert not any("call" in vars(l) for l in plain._flatten_layers())


def test_an_encoder_with_fast_kernels_exports_and_serves_like_plain_keras(tmp_path):
    from byol_tf.export import export_encoder

    # At 8 px resnet_tiny reaches 2x2 and 1x1 maps: every fast path is in the graph.
    model = tiny_byol(image_size=8)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    model.train_step(next(iter(view_dataset(batch=8, image_size=8))))  # BN statistics off their init
    encoder = model.encoder
    assert any("convolution_op" in vars(l) for l in encoder._flatten_layers())
    export_encoder(encoder, str(tmp_path / "1"), 8)
    served = tf.saved_model.load(str(tmp_path / "1")).signatures["serving_default"]
    # The reference: the same weights in a fresh encoder on Keras's own paths.
    plain = build_encoder("resnet_tiny", 8)
    assert not any("convolution_op" in vars(l) or "call" in vars(l) for l in plain._flatten_layers())
    plain.set_weights(encoder.get_weights())
    x = np.random.default_rng(0).uniform(0, 255, (3, 8, 8, 3)).astype("float32")
    expected = plain(x / 255.0, training=False).numpy()
    got = served(images=tf.constant(x))["embedding"].numpy()
    # float32 convolutions as matrix products: another summation order, a
    # few ulps of the largest feature.
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6 * np.abs(expected).max())
    assert np.abs(expected).max() > 0.1
