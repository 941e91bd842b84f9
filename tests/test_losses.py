import numpy as np
import pytest
import tensorflow as tf

from byol_tf import losses


def _np_regression(p, z):
    p = p / np.linalg.norm(p, axis=-1, keepdims=True)
    z = z / np.linalg.norm(z, axis=-1, keepdims=True)
    return 2 - 2 * np.sum(p * z, axis=-1)


def test_regression_matches_numpy():
    rng = np.random.default_rng(0)
    p, z = rng.normal(size=(2, 8, 16)).astype("float32")
    np.testing.assert_allclose(losses.regression_loss(p, z).numpy(), _np_regression(p, z), atol=1e-5)


def test_identical_gives_zero_and_opposite_gives_four():
    x = np.random.default_rng(1).normal(size=(5, 7)).astype("float32")
    np.testing.assert_allclose(losses.regression_loss(x, 3 * x).numpy(), 0.0, atol=1e-5)
    np.testing.assert_allclose(losses.regression_loss(x, -x).numpy(), 4.0, atol=1e-5)


def test_symmetric_sums_both_orders():
    rng = np.random.default_rng(2)
    p1, p2, z1, z2 = rng.normal(size=(4, 6, 8)).astype("float32")
    total = losses.symmetric_loss(p1, p2, z1, z2).numpy()
    expected = _np_regression(p1, z2) + _np_regression(p2, z1)
    np.testing.assert_allclose(total, expected, atol=1e-5)
    # Summed, not averaged: opposite pairs in both orders give 8, not 4.
    np.testing.assert_allclose(losses.symmetric_loss(p1, p2, -p2, -p1).numpy(), 8.0, atol=1e-5)


def test_multi_crop_adds_each_small_view_against_both_targets():
    rng = np.random.default_rng(5)
    p1, p2, z1, z2, s1, s2 = rng.normal(size=(6, 6, 8)).astype("float32")
    total = losses.multi_crop_loss(p1, p2, [s1, s2], z1, z2).numpy()
    expected = sum(_np_regression(p, z) for p, z in [(p1, z2), (p2, z1), (s1, z1), (s1, z2), (s2, z1), (s2, z2)])
    np.testing.assert_allclose(total, expected, atol=1e-5)
    # Without small views it is the paper's loss.
    np.testing.assert_allclose(
        losses.multi_crop_loss(p1, p2, [], z1, z2).numpy(), _np_regression(p1, z2) + _np_regression(p2, z1), atol=1e-5
    )
    # Summed, not averaged: predictions opposite to both targets give 4 per term, 6 terms.
    np.testing.assert_allclose(losses.multi_crop_loss(-z1, -z1, [-z1, -z1], z1, z1).numpy(), 24.0, atol=1e-4)


@pytest.mark.parametrize("kind", ["byol", "infonce"])
def test_no_gradient_reaches_target(kind):
    rng = np.random.default_rng(3)
    p1, p2, z1, z2 = (tf.Variable(v) for v in rng.normal(size=(4, 6, 8)).astype("float32"))
    with tf.GradientTape() as tape:
        loss = tf.reduce_mean(losses.symmetric_loss(p1, p2, z1, z2, kind))
    grads = tape.gradient(loss, [p1, p2, z1, z2])
    assert grads[0] is not None and np.abs(grads[0].numpy()).sum() > 0
    assert grads[1] is not None and np.abs(grads[1].numpy()).sum() > 0
    assert grads[2] is None and grads[3] is None


def test_infonce_matches_numpy():
    rng = np.random.default_rng(4)
    p, z = rng.normal(size=(2, 6, 8)).astype("float32")
    pn = p / np.linalg.norm(p, axis=1, keepdims=True)
    zn = z / np.linalg.norm(z, axis=1, keepdims=True)
    logits = pn @ zn.T / 0.2
    logits -= logits.max(axis=1, keepdims=True)
    expected = -np.diag(logits) + np.log(np.exp(logits).sum(axis=1))
    np.testing.assert_allclose(losses.infonce_loss(p, z, 0.2).numpy(), expected, rtol=1e-4, atol=1e-5)


def test_unknown_loss_names_value():
    x = np.ones((2, 3), "float32")
    with pytest.raises(ValueError, match="loss='mse'"):
        losses.symmetric_loss(x, x, x, x, loss="mse")
