"""Supervised fine-tuning of a pretrained encoder as an image classifier.

The classifier keeps the encoder's input contract, images in [0, 1], by
putting a copy of the encoder's ImageNet `Normalization` in front:

    Input [B, S, S, 3] in [0, 1] -> Normalization -> head(backbone) -> softmax

where the head is

- `keras_cv.models.ImageClassifier(backbone=..., num_classes=...)` when the
  backbone is a keras-cv `Backbone` (e.g. runs with `--backbone=resnet18`),
- `keras_hub.models.ImageClassifier` for a keras-hub `Backbone`, only when
  keras-hub is installed,
- otherwise (the built-in ResNets, `keras.applications`) global average
  pooling and a `Dense` softmax layer, which is what `ImageClassifier` does.

The backbone is taken out of the encoder, not copied: the classifier and the
encoder share its variables, so load a fresh encoder for each classifier.

`byol_tf.export.export_classifier` writes a fine-tuned classifier for TF
Serving with the encoder export's signatures (returning `probabilities`).

Training uses the standard supervised augmentation as batched `tf.data` ops:
a random crop of the image zero-padded by 1/8 of its side (4 px at 32 px,
the CIFAR recipe) or, for larger images, an Inception-style random resized
crop (`byol_tf.augment.augment_view` with every colour op off); both with a
random horizontal flip. SGD with momentum 0.9, a cosine schedule and weight
decay (not on biases and BatchNorm). With `freeze_epochs=N` the backbone is
frozen for the first N epochs (only the head learns, BatchNorm stays in
inference mode), then unfrozen and the model recompiled with a fresh
optimizer and cosine schedule over the remaining epochs.
"""

import dataclasses

import keras
import numpy as np
import tensorflow as tf

from byol_tf import data as data_lib
from byol_tf.augment import augment_view, mirrored, preprocess_eval
from byol_tf.config import AugmentConfig
from byol_tf.linear import topk_accuracy

AUGMENTS = ("auto", "crop_pad", "resized_crop", "none")


def _keras_hub_backbone_class():
    try:  # optional: keras-hub is not a dependency.
        import keras_hub
    except ImportError:
        return None
    return keras_hub.models.Backbone


def _is_keras_cv_backbone(layer):
    try:
        import keras_cv
    except ImportError:
        return False
    return isinstance(layer, keras_cv.models.Backbone)


def split_encoder(encoder):
    """The input `Normalization` and the backbone of a `build_encoder` encoder.

    Args:
        encoder: a model made by `byol_tf.backbones.build_encoder` (or loaded
            from a run's `encoder.keras`): Input -> Normalization -> backbone
            -> optional pooling.

    Returns:
        `(normalization, backbone)`: the `keras.layers.Normalization` layer
        (or `None` if the encoder has none) and the backbone `keras.Model`.
    """
    models = [layer for layer in encoder.layers if isinstance(layer, keras.Model)]
    if len(models) != 1:
        raise ValueError(
            "Expected an encoder with exactly one nested backbone model (see "
            "byol_tf.backbones.build_encoder). Received: encoder layers="
            f"{[type(layer).__name__ for layer in encoder.layers]}"
        )
    norms = [layer for layer in encoder.layers if isinstance(layer, keras.layers.Normalization)]
    return (norms[0] if norms else None), models[0]


def _copy_normalization(layer):
    copy = keras.layers.Normalization.from_config(layer.get_config())
    return copy, layer.get_weights()


def build_classifier(encoder, num_classes, name="classifier"):
    """A softmax classifier on the encoder's backbone (see the module docstring).

    Args:
        encoder: an encoder from `build_encoder` / `RUN/encoder.keras`. Its
            backbone is reused (shared variables), so the classifier starts
            from exactly the encoder's weights.
        num_classes: number of output classes.
        name: model name.

    Returns:
        A `keras.Model` mapping float images in [0, 1] `[B, S, S, 3]` to class
        probabilities `[B, num_classes]`.
    """
    if isinstance(num_classes, bool) or not isinstance(num_classes, (int, np.integer)) or num_classes < 2:
        raise ValueError(f"`num_classes` must be an integer >= 2. Received: num_classes={num_classes!r}")
    num_classes = int(num_classes)
    norm, backbone = split_encoder(encoder)
    inputs = keras.Input(encoder.input_shape[1:], name="images")
    x = inputs
    norm_weights = None
    if norm is not None:
        norm_copy, norm_weights = _copy_normalization(norm)
        x = norm_copy(x)
    hub_backbone = _keras_hub_backbone_class()
    if _is_keras_cv_backbone(backbone):
        import keras_cv

        outputs = keras_cv.models.ImageClassifier(backbone=backbone, num_classes=num_classes)(x)
    elif hub_backbone is not None and isinstance(backbone, hub_backbone):
        import keras_hub

        # No preprocessor: the copied Normalization already does its job.
        outputs = keras_hub.models.ImageClassifier(
            backbone=backbone, num_classes=num_classes, preprocessor=None, activation="softmax"
        )(x)
    else:
        x = backbone(x)
        if len(x.shape) == 4:
            x = keras.layers.GlobalAveragePooling2D(name="avg_pool")(x)
        outputs = keras.layers.Dense(num_classes, activation="softmax", name="predictions")(x)
    model = keras.Model(inputs, outputs, name=name)
    if norm_weights:  # an adapted Normalization keeps its statistics in weights
        norm_copy.set_weights(norm_weights)
    return model


def find_backbone(classifier):
    """The backbone inside a `build_classifier` model (also after reloading)."""
    for layer in classifier.layers:
        if getattr(layer, "backbone", None) is not None:  # keras-cv / keras-hub task
            return layer.backbone
    for layer in classifier.layers:
        if isinstance(layer, keras.Model):
            return layer
    raise ValueError(
        f"No backbone found in the classifier. Received: layers={[layer.name for layer in classifier.layers]}"
    )


def _pad_crop_flip(images, seed, image_size):
    """Random crop of the zero-padded batch plus a random flip, per image."""
    pad = max(1, image_size // 8)
    keys = tf.random.experimental.stateless_split(seed, num=2)
    batch = tf.shape(images)[0]
    x = tf.pad(tf.cast(images, tf.float32) / 255.0, [[0, 0], [pad, pad], [pad, pad], [0, 0]])
    side = float(image_size + 2 * pad - 1)
    offsets = tf.floor(tf.random.stateless_uniform([batch, 2], keys[0], 0.0, 2.0 * pad + 1.0))
    y1, x1 = offsets[:, 0] / side, offsets[:, 1] / side
    # Corners on pixel centres with crop_size == box size in pixels sample
    # exactly the pixels of the crop (no interpolation); x1 > x2 mirrors it.
    y2, x2 = y1 + (image_size - 1) / side, x1 + (image_size - 1) / side
    flip = tf.random.stateless_uniform([batch], keys[1]) < 0.5
    boxes = mirrored(tf.stack([y1, x1, y2, x2], axis=1), flip)
    return tf.image.crop_and_resize(x, boxes, tf.range(batch), [image_size, image_size])


def train_dataset(images, labels, image_size, batch_size, augment="auto", seed=0):
    """An infinite dataset of augmented `(images, labels)` training batches.

    Args:
        images: uint8 `[N, H, W, 3]`, already `image_size` square (as
            `data.load_images` returns them).
        labels: int `[N]`.
        image_size: the classifier's input side.
        batch_size: images per batch; every batch is full.
        augment: "crop_pad" (random crop with 1/8 zero padding + flip),
            "resized_crop" (random resized crop, scale 0.08-1, + flip),
            "none", or "auto": "crop_pad" up to 64 px, else "resized_crop".
        seed: seeds the order and the augmentation (batch `i` uses `[seed, i]`).

    Returns:
        A `tf.data.Dataset` of float32 images in [0, 1] and int64 labels;
        pass `steps_per_epoch` to `fit`.
    """
    if augment not in AUGMENTS:
        raise ValueError(f"`augment` must be one of {AUGMENTS}. Received: augment={augment!r}")
    if augment == "auto":
        augment = "crop_pad" if image_size <= 64 else "resized_crop"
    rrc = AugmentConfig(
        image_size=image_size, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0)
    )

    def transform(index, batch):
        x, y = batch
        seed_pair = tf.stack([tf.constant(int(seed), tf.int64), index])
        if augment == "crop_pad":
            x = _pad_crop_flip(x, seed_pair, image_size)
        elif augment == "resized_crop":
            x = augment_view(x, seed_pair, rrc, view=0)
        else:
            x = preprocess_eval(x, image_size)
        return x, y

    pairs = (
        tf.data.Dataset.from_tensor_slices((np.asarray(images), np.asarray(labels, np.int64)))
        .shuffle(len(images), seed=seed, reshuffle_each_iteration=True)
        .repeat()
        .batch(batch_size, drop_remainder=True)
    )
    ds = tf.data.Dataset.zip(tf.data.Dataset.counter(dtype=tf.int64), pairs)
    return ds.map(transform, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


def _compile(classifier, lr, weight_decay, steps):
    schedule = keras.optimizers.schedules.CosineDecay(lr, decay_steps=max(1, steps))
    optimizer = keras.optimizers.SGD(schedule, momentum=0.9, weight_decay=weight_decay or None)
    if weight_decay:
        # As in the supervised ResNet recipes: decay the kernels only.
        optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    classifier.compile(
        optimizer=optimizer,
        loss=keras.losses.SparseCategoricalCrossentropy(),
        metrics=[keras.metrics.SparseCategoricalAccuracy(name="top1")],
    )


@dataclasses.dataclass
class FinetuneResult:
    """What `finetune` returns.

    Args:
        top1: test top-1 accuracy in [0, 1].
        top5: test top-k accuracy, `k = min(5, num_classes)`.
        history: per-epoch training logs of both phases, concatenated.
        num_train: labelled training images used.
    """

    top1: float
    top5: float
    history: dict
    num_train: int


def finetune(
    classifier,
    train,
    test,
    epochs=30,
    batch_size=128,
    lr=0.05,
    weight_decay=5e-4,
    freeze_epochs=0,
    augment="auto",
    seed=0,
    verbose=0,
    callbacks=None,
):
    """Fine-tunes a `build_classifier` model on labelled images, then tests it.

    Args:
        classifier: from `build_classifier`.
        train, test: labelled `byol_tf.data.ImageSet`s at the classifier's size.
        epochs: total epochs, frozen ones included.
        batch_size: images per step (clipped to the number of train images).
        lr: peak learning rate of each phase's cosine schedule.
        weight_decay: SGD weight decay on the kernels.
        freeze_epochs: keep the backbone frozen for this many first epochs.
        augment: see `train_dataset`.
        seed: seeds the data order and augmentation.
        verbose: `fit` verbosity.
        callbacks: extra Keras callbacks for both phases.

    Returns:
        A `FinetuneResult`. The backbone is left trainable.
    """
    if isinstance(epochs, bool) or not isinstance(epochs, (int, np.integer)) or epochs < 1:
        raise ValueError(f"`epochs` must be a positive integer. Received: epochs={epochs!r}")
    if not 0 <= freeze_epochs <= epochs:
        raise ValueError(f"`freeze_epochs` must be in [0, epochs={epochs}]. Received: freeze_epochs={freeze_epochs!r}")
    for name, split in (("train", train), ("test", test)):
        if split.labels is None:
            raise ValueError(f"Fine-tuning needs labels. Received: {name} from {split.source!r} (unlabelled)")
    image_size = int(classifier.input_shape[1])
    num_classes = int(classifier.output_shape[-1])
    top_label = int(max(train.labels.max(), test.labels.max()))
    if top_label >= num_classes:
        raise ValueError(
            f"The classifier has {num_classes} classes but the labels go up to {top_label}. "
            f"Received: num_classes={num_classes}"
        )
    batch_size = min(int(batch_size), len(train))
    steps = len(train) // batch_size
    backbone = find_backbone(classifier)
    history = {}
    phases = [(0, freeze_epochs, False), (freeze_epochs, epochs, True)]
    for phase, (start, stop, trainable) in enumerate(phases):
        if stop == start:
            continue
        backbone.trainable = trainable
        # Trainable variables are collected when the train function is built,
        # so a change of `trainable` only takes effect after compiling again.
        _compile(classifier, lr, weight_decay, (stop - start) * steps)
        # Another seed per phase, so the second phase does not replay the first's batches.
        dataset = train_dataset(train.images, train.labels, image_size, batch_size, augment, seed=seed + 1000 * phase)
        fit = classifier.fit(
            dataset, initial_epoch=start, epochs=stop, steps_per_epoch=steps, verbose=verbose, callbacks=callbacks
        )
        for key, values in fit.history.items():
            history.setdefault(key, []).extend(float(v) for v in values)
    backbone.trainable = True
    # Scored like the linear probe: Keras' top-k metric counts ties as hits,
    # which makes a saturated (one-hot) classifier look perfect at top-5.
    probs = classifier.predict(data_lib.eval_dataset(test.images, image_size, 1.0, 256).map(lambda x, _: x), verbose=0)
    return FinetuneResult(
        top1=topk_accuracy(probs, test.labels, 1),
        top5=topk_accuracy(probs, test.labels, 5),
        history=history,
        num_train=len(train),
    )
