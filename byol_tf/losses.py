"""BYOL's regression loss and the optional contrastive (InfoNCE) loss.

Both are pure functions of the online predictions `p` and the target
projections `z`; the target side never receives a gradient.
"""

import tensorflow as tf


def regression_loss(p, z):
    """Per-example `2 - 2 * cos(p, stop_gradient(z))` (Grill et al. 2020, Eq. 2).

    Args:
        p: online predictions, `[batch, dim]`.
        z: target projections, `[batch, dim]`.

    Returns:
        `[batch]` float32 losses in [0, 4].
    """
    p = tf.math.l2_normalize(tf.cast(p, tf.float32), axis=-1)
    z = tf.math.l2_normalize(tf.stop_gradient(tf.cast(z, tf.float32)), axis=-1)
    return 2.0 - 2.0 * tf.reduce_sum(p * z, axis=-1)


def infonce_loss(p, z, temperature=0.1):
    """Per-example InfoNCE over the batch: the positive of `p[i]` is `z[i]`.

    Other rows of `z` in the (local) batch are the negatives.

    Args:
        p: online predictions, `[batch, dim]`.
        z: target projections, `[batch, dim]`.
        temperature: softmax temperature.

    Returns:
        `[batch]` float32 cross-entropies.
    """
    p = tf.math.l2_normalize(tf.cast(p, tf.float32), axis=-1)
    z = tf.math.l2_normalize(tf.stop_gradient(tf.cast(z, tf.float32)), axis=-1)
    logits = tf.matmul(p, z, transpose_b=True) / temperature
    labels = tf.range(tf.shape(p)[0])
    return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=labels, logits=logits)


LOSSES = {"byol": regression_loss, "infonce": infonce_loss}


def symmetric_loss(p1, p2, z1, z2, loss="byol", temperature=0.1):
    """Per-example loss **summed** over both view orders, as in the paper.

    `p1` (online, view 1) regresses `z2` (target, view 2) and `p2` regresses
    `z1`. Averaging the two terms instead would halve the gradient, a bug
    several reimplementations shipped.

    Args:
        p1, p2: online predictions for views 1 and 2.
        z1, z2: target projections for views 1 and 2.
        loss: "byol" or "infonce".
        temperature: used by "infonce" only.

    Returns:
        `[batch]` float32: in [0, 8] for "byol".
    """
    if loss not in LOSSES:
        raise ValueError(f"Unknown loss; expected one of {sorted(LOSSES)}. Received: loss={loss!r}")
    if loss == "infonce":
        return infonce_loss(p1, z2, temperature) + infonce_loss(p2, z1, temperature)
    return LOSSES[loss](p1, z2) + LOSSES[loss](p2, z1)


def multi_crop_loss(p1, p2, p_small, z1, z2, loss="byol", temperature=0.1):
    """`symmetric_loss` plus, for each small view's prediction, its loss against both targets.

    Only the two large views have targets (as in DINO and solo-learn's
    multi-crop BYOL); the terms are summed, as the paper sums its two.

    Args:
        p1, p2: online predictions for the large views 1 and 2.
        p_small: a list of online predictions, one per small view (may be empty).
        z1, z2: target projections for the large views.
        loss: "byol" or "infonce".
        temperature: used by "infonce" only.

    Returns:
        `[batch]` float32: in [0, 8 + 8 * len(p_small)] for "byol".
    """
    total = symmetric_loss(p1, p2, z1, z2, loss, temperature)
    for p in p_small:
        total += symmetric_loss(p, p, z1, z2, loss, temperature)
    return total
