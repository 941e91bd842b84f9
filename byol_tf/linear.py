"""Linear evaluation of a frozen encoder (the standard self-supervised protocol).

The protocol, as in BYOL (Grill et al. 2020, Appendix C.1) and SimCLR:

- **Features are computed once**, with the encoder frozen and in inference
  mode, from deterministically preprocessed images: resized to the encoder's
  input side only (`byol_tf.evaluation.embed`; no crop, no colour change),
  for the train and the test split alike. With `flip_augment=True` the train
  set also gets the features of its horizontally flipped copy (twice the
  samples, the cheapest augmentation that does not need the encoder in the
  training loop).
- **The classifier is one `keras.layers.Dense`** on standardised features:
  each feature dimension is shifted and scaled by its mean and standard
  deviation over the (possibly subsampled) train features. That is a
  BatchNorm without affine parameters whose statistics are fixed, as in
  MAE's linear probe; it makes one learning rate work across encoders whose
  feature scales differ by orders of magnitude (a random-init encoder and a
  trained one, say). `feature_norm="l2"` L2-normalises instead (the kNN
  monitor's geometry) and `"none"` uses the raw features.
- **SGD with momentum 0.9 and a cosine learning-rate schedule** (no warm-up,
  no weight decay by default), cross-entropy on the logits.
- **Top-1 and top-5 accuracy** on the test split (top-k with
  `k = min(5, num_classes)`, so top-5 is 1.0 when there are at most 5
  classes).

For the semi-supervised protocols (1% and 10% of the labels) the train split
is cut to a class-balanced subset with a fixed seed (`class_balanced_subset`)
before anything is embedded.
"""

import keras
import numpy as np
import tensorflow as tf

from byol_tf.eval_inputs import encoder_image_size
from byol_tf.evaluation import embed, embed_dataset

FEATURE_NORMS = ("standardize", "l2", "none")


def _check_positive_int(name, value):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be a positive integer. Received: {name}={value!r}")


def _check_labels(name, labels, num):
    labels = np.asarray(labels)
    if labels.shape != (num,) or not np.issubdtype(labels.dtype, np.integer) or (num and labels.min() < 0):
        raise ValueError(
            f"`{name}` must be non-negative integers of shape ({num},). "
            f"Received: {name} with shape={labels.shape}, dtype={labels.dtype}"
        )
    return labels.astype(np.int64)


def class_balanced_subset(labels, fraction, seed=0):
    """Indices of a class-balanced subset holding `fraction` of the labels.

    Every class gets the same number of examples,
    `max(1, round(fraction * len(labels) / num_classes))`, drawn without
    replacement with `seed` (the same subset each time); a class with fewer
    examples than that contributes all it has. On a balanced set (CIFAR,
    ImageNet up to rounding) the subset has `fraction * len(labels)`
    examples, as the 1% and 10% protocols of SimCLR and BYOL.

    Args:
        labels: int array `[N]`.
        fraction: in (0, 1]; 1 keeps every index.
        seed: seeds the draw.

    Returns:
        Sorted int64 indices into `labels`.
    """
    labels = _check_labels("labels", labels, len(np.asarray(labels)))
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"`fraction` must be in (0, 1]. Received: fraction={fraction!r}")
    if fraction == 1.0:
        return np.arange(len(labels), dtype=np.int64)
    classes = np.unique(labels)
    per_class = max(1, int(round(fraction * len(labels) / len(classes))))
    rng = np.random.default_rng(seed)
    chosen = [rng.permutation(np.flatnonzero(labels == c))[:per_class] for c in classes]
    return np.sort(np.concatenate(chosen)).astype(np.int64)


def embed_with_flips(encoder, images, image_size):
    """Features of `images` followed by those of their horizontal flips.

    Args:
        encoder: the frozen encoder (see `byol_tf.evaluation.embed`).
        images: uint8 `[N, H, W, 3]`.
        image_size: the encoder's input side.

    Returns:
        float32 `[2N, D]`: rows `i` and `N + i` are image `i` and its mirror.
    """
    # A copy, since a reversed view has negative strides.
    flipped = np.ascontiguousarray(np.asarray(images)[:, :, ::-1])
    return np.concatenate(
        [
            embed(encoder, images, image_size, what="training images"),
            embed(encoder, flipped, image_size, what="flipped training images"),
        ]
    )


def topk_accuracy(logits, labels, k):
    """Fraction of rows whose label is among the `k` largest logits."""
    logits = np.asarray(logits)
    k = min(int(k), logits.shape[1])
    top = np.argsort(-logits, axis=1, kind="stable")[:, :k]
    return float(np.mean(np.any(top == np.asarray(labels)[:, None], axis=1)))


def build_linear_classifier(train_features, num_classes, feature_norm="standardize"):
    """The linear head: feature normalisation then one `Dense` (logits).

    Args:
        train_features: float `[N, D]`; with "standardize" their per-dimension
            mean and variance are frozen into a `Normalization` layer.
        num_classes: output logits.
        feature_norm: "standardize", "l2" or "none" (see the module docstring).

    Returns:
        A `keras.Model` `[B, D] -> [B, num_classes]` logits.
    """
    if feature_norm not in FEATURE_NORMS:
        raise ValueError(f"`feature_norm` must be one of {FEATURE_NORMS}. Received: feature_norm={feature_norm!r}")
    train_features = np.asarray(train_features, np.float32)
    inputs = keras.Input((train_features.shape[1],), name="features")
    x = inputs
    if feature_norm == "standardize":
        x = keras.layers.Normalization(mean=train_features.mean(0), variance=train_features.var(0), name="standardize")(
            x
        )
    elif feature_norm == "l2":
        x = keras.layers.UnitNormalization(name="l2_normalize")(x)
    outputs = keras.layers.Dense(num_classes, name="linear")(x)
    return keras.Model(inputs, outputs, name="linear_probe")


def train_linear(
    train_features,
    train_labels,
    test_features,
    test_labels,
    num_classes=None,
    epochs=100,
    batch_size=256,
    lr=0.1,
    momentum=0.9,
    weight_decay=0.0,
    feature_norm="standardize",
    seed=0,
    verbose=0,
):
    """Trains a linear classifier on fixed features and scores it on the test ones.

    Args:
        train_features, test_features: float `[N, D]` and `[M, D]`.
        train_labels, test_labels: int `[N]` and `[M]`.
        num_classes: defaults to `max(labels) + 1` over both splits.
        epochs: passes over the train features.
        batch_size: features per step (clipped to N).
        lr: peak learning rate of the cosine schedule (decays to 0 over
            all steps).
        momentum: SGD momentum.
        weight_decay: decoupled weight decay of `keras.optimizers.SGD`.
        feature_norm: "standardize", "l2" or "none".
        seed: seeds the classifier's init and the shuffling.
        verbose: `fit` verbosity.

    Returns:
        A dict with `top1`, `top5` (test accuracies in [0, 1]), `train_top1`,
        `num_train`, `num_test`, `num_classes`.

    Example:
    >>> result = train_linear(f_train, y_train, f_test, y_test, epochs=90)
    >>> result["top1"]
    """
    train_features = np.asarray(train_features, np.float32)
    test_features = np.asarray(test_features, np.float32)
    if train_features.ndim != 2 or test_features.ndim != 2 or train_features.shape[1] != test_features.shape[1]:
        raise ValueError(
            "Expected 2-D train and test features of the same width. Received: "
            f"train_features.shape={train_features.shape}, test_features.shape={test_features.shape}"
        )
    if not len(train_features) or not len(test_features):
        raise ValueError(
            "Expected at least one train and one test feature. Received: "
            f"train_features.shape={train_features.shape}, test_features.shape={test_features.shape}"
        )
    train_labels = _check_labels("train_labels", train_labels, len(train_features))
    test_labels = _check_labels("test_labels", test_labels, len(test_features))
    _check_positive_int("epochs", epochs)
    _check_positive_int("batch_size", batch_size)
    if not lr > 0:
        raise ValueError(f"`lr` must be > 0. Received: lr={lr!r}")
    top_label = int(max(train_labels.max(), test_labels.max()))
    num_classes = top_label + 1 if num_classes is None else int(num_classes)
    if num_classes <= top_label:
        raise ValueError(
            f"`num_classes` must exceed the largest label {top_label}. Received: num_classes={num_classes}"
        )

    keras.utils.set_random_seed(seed)
    batch_size = min(batch_size, len(train_features))
    steps = -(-len(train_features) // batch_size)
    model = build_linear_classifier(train_features, num_classes, feature_norm)
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=epochs * steps)
    model.compile(
        optimizer=keras.optimizers.SGD(schedule, momentum=momentum, weight_decay=weight_decay or None),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    dataset = (
        tf.data.Dataset.from_tensor_slices((train_features, train_labels))
        .shuffle(len(train_features), seed=seed, reshuffle_each_iteration=True)
        .batch(batch_size)
        .prefetch(tf.data.AUTOTUNE)
    )
    model.fit(dataset, epochs=epochs, verbose=verbose)
    test_logits = model.predict(test_features, batch_size=1024, verbose=0)
    train_logits = model.predict(train_features, batch_size=1024, verbose=0)
    return {
        "top1": topk_accuracy(test_logits, test_labels, 1),
        "top5": topk_accuracy(test_logits, test_labels, 5),
        "train_top1": topk_accuracy(train_logits, train_labels, 1),
        "num_train": int(len(train_features)),
        "num_test": int(len(test_features)),
        "num_classes": num_classes,
    }


def linear_eval(encoder, train, test, label_fraction=1.0, flip_augment=False, seed=0, config=None, **kwargs):
    """The linear-evaluation protocol on a frozen encoder, from images (or audio, text).

    Args:
        encoder: images in [0, 1] `[B, S, S, 3]` -> features `[B, D]`.
        train, test: labelled `byol_tf.data.ImageSet`s; for audio and text,
            `ArraySource`s (`byol_tf.run_eval.load_source`) and `config`.
        label_fraction: in (0, 1]: train on a class-balanced subset of this
            fraction of the train labels (`class_balanced_subset`, `seed`).
        flip_augment: add the features of the flipped train images.
        seed: seeds the label subset, the classifier init and the shuffling.
        config: the run's `PretrainConfig`, for the evaluation input of audio and text.
        **kwargs: passed to `train_linear` (`epochs`, `batch_size`, `lr`,
            `feature_norm`, ...).

    Returns:
        The dict of `train_linear`, plus `label_fraction` and `flip_augment`.
    """
    for name, split in (("train", train), ("test", test)):
        if split.labels is None:
            raise ValueError(
                f"Linear evaluation needs labels. Received: {name} from {getattr(split, 'name', '')!r} (unlabelled)"
            )
    if getattr(train, "modality", "image") != "image":
        return _linear_eval_examples(encoder, train, test, label_fraction, flip_augment, seed, config, **kwargs)
    image_size = encoder_image_size(encoder)
    index = class_balanced_subset(train.labels, label_fraction, seed)
    images, labels = train.images[index], train.labels[index]
    if flip_augment:
        train_features, labels = embed_with_flips(encoder, images, image_size), np.concatenate([labels, labels])
    else:
        train_features = embed(encoder, images, image_size, what="training images")
    test_features = embed(encoder, test.images, image_size, what="test images")
    num_classes = max(train.num_classes or 0, test.num_classes or 0) or None
    result = train_linear(
        train_features, labels, test_features, test.labels, num_classes=num_classes, seed=seed, **kwargs
    )
    result.update(label_fraction=float(label_fraction), flip_augment=bool(flip_augment))
    return result


def _linear_eval_examples(encoder, train, test, label_fraction, flip_augment, seed, config, **kwargs):
    """`linear_eval` for in-memory audio or text: every example embedded once, then the label subset."""
    from byol_tf.run_eval import eval_data

    if config is None or flip_augment:
        raise ValueError(
            "Audio and text need the run's `config` and have no flip augmentation. "
            f"Received: config={config!r}, flip_augment={flip_augment!r}"
        )
    train_features, train_labels = embed_dataset(encoder, eval_data(train, config), "training examples")
    test_features, test_labels = embed_dataset(encoder, eval_data(test, config), "test examples")
    index = class_balanced_subset(train_labels, label_fraction, seed)
    num_classes = max(len(train.class_names or []), int(train_labels.max()) + 1, int(test_labels.max()) + 1)
    result = train_linear(
        train_features[index], train_labels[index], test_features, test_labels, num_classes, seed=seed, **kwargs
    )
    result.update(label_fraction=float(label_fraction), flip_augment=False)
    return result
