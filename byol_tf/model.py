"""`BYOL`: the online and target networks and the training step."""

from typing import TYPE_CHECKING, Optional, Sequence

import keras
import tensorflow as tf

from byol_tf import losses
from byol_tf.backbones import batch_norm_layers, configure_batch_norm
from byol_tf.device_views import DeviceViews
from byol_tf.ema import EMAUpdate, ema_step
from byol_tf.heads import PREDICTOR_NAME, MLPHead

if TYPE_CHECKING:
    pass


def _clone(layer, input_shape):
    """A fresh copy of `layer` (a functional model or a layer) with the same weights."""
    if isinstance(layer, keras.Model):
        copy = keras.models.clone_model(layer)
        # Subclassed backbones (keras-cv, keras-hub) are cloned from their constructor
        # arguments, without the BatchNorm settings `configure_batch_norm` made.
        for source, target in zip(batch_norm_layers(layer), batch_norm_layers(copy)):
            configure_batch_norm(target, source.synchronized, source.momentum, source.epsilon)
    else:
        copy = layer.__class__.from_config(layer.get_config())
        copy.build(input_shape)
    copy.set_weights(layer.get_weights())
    return copy


def pooled_encoder(encoder: keras.Model, input_shape: Optional[Sequence[int]] = None) -> keras.Model:
    """`encoder` as a functional model from images to pooled features `[batch, features]`.

    A functional encoder that pools is returned as it is; one that returns
    feature maps `[batch, h, w, c]` (a keras-hub `Backbone`) gets a global
    average pooling; a subclassed one is first called on
    `keras.Input(input_shape)`. The layers (and weights) are the encoder's.
    """
    if not isinstance(encoder, keras.Model):
        raise ValueError(f"`encoder` must be a keras.Model. Received: encoder={encoder!r}")
    try:
        shape, rank = tuple(encoder.inputs[0].shape[1:]), len(encoder.output.shape)
    except (AttributeError, ValueError, TypeError, IndexError):  # subclassed: no graph yet
        if input_shape is None:
            raise ValueError(
                "A subclassed encoder has no input shape of its own: pass `input_shape`, e.g. "
                "(224, 224, 3). Received: input_shape=None"
            ) from None
        shape, rank = tuple(input_shape), None
    if rank == 2:
        return encoder
    inputs = keras.Input(shape, name="images")
    features = encoder(inputs)
    if len(features.shape) == 4:
        features = keras.layers.GlobalAveragePooling2D(name="pool")(features)
    elif len(features.shape) != 2:
        raise ValueError(f"The encoder must return [B, H, W, C] or [B, C]. Received: output shape={features.shape}")
    return keras.Model(inputs, features, name=f"{encoder.name}_pooled")


@keras.saving.register_keras_serializable(package="byol_tf")
class BYOL(keras.Model):
    """Bootstrap Your Own Latent (Grill et al. 2020).

    The online network is encoder -> projector -> predictor; the target,
    encoder -> projector, is a copy whose weights follow the online ones by
    EMA (`byol_tf.ema.EMAUpdate`). Gradients reach the online weights only;
    the target's variables are marked non-trainable, but its BatchNorm layers
    stay in training mode so that they normalise with batch statistics.

    Calling the model runs the **online** encoder: that is the network to
    evaluate and export.

    A batch is `(view1, view2)`, or `(view1, view2, *small)` with multi-crop
    small views (`AugmentConfig.small_views`): those run through the online
    network only, and each regresses both large views' targets
    (`losses.multi_crop_loss`).

    Weight regularisers of the online networks (`model.losses`) are added to
    the BYOL loss, as Keras's `compute_loss` adds them, and the logged `loss`
    includes them.

    Args:
        encoder: any `keras.Model` from images to features. One that returns
            feature maps (a keras-hub `Backbone`) gets a global average
            pooling; a subclassed one is called on `input_shape` first
            (`pooled_encoder`). `model.encoder` is the pooled encoder.
        projector: the projector head; default `MLPHead(4096, 256)` (the paper's).
        predictor: the predictor head; default `MLPHead(4096, 256)`.
        loss: "byol" (the paper's regression loss) or "infonce".
        temperature: InfoNCE temperature.
        probe_classes: number of classes of the online linear probe, or
            `None` for no probe. The probe is a linear classifier on the
            online encoder's features of the first view, trained alongside
            BYOL on `((view1, view2), labels)` batches with its own Adam
            optimizer (as solo-learn's online classifier). The features are
            stop-gradient: the probe never changes the encoder. It logs
            `probe_acc` in training and, on `(images, labels)` validation
            data, in `evaluate` (`val_probe_acc` in `fit`).
        probe_learning_rate: the probe's Adam learning rate.
        device_views: a `byol_tf.device_views.DeviceViews`: the batches are
            host crops (`pretrain_dataset(..., augment_on="device")`), and
            the views are finished inside the train step, per replica.
        base_tau: tau at step 0 of the `EMAUpdate` that `fit` adds when
            none is passed (cosine to 1 over the run's steps).
        input_shape: the image shape, `(height, width, channels)`, for a
            subclassed encoder.
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from byol_tf import backbones, heads
    >>> model = BYOL(
    ...     backbones.build_encoder("resnet_tiny", 32),
    ...     heads.MLPHead(64, 16),
    ...     heads.MLPHead(64, 16),
    ... )
    >>> model.compile(optimizer="sgd")

    `fit` adds an `EMAUpdate(base_tau)` when `callbacks` hold none (the
    target never moves without one), and takes `steps_per_epoch` from a
    `byol_tf.views` stream when it is not given.
    """

    def __init__(
        self,
        encoder: keras.Model,
        projector: Optional[keras.layers.Layer] = None,
        predictor: Optional[keras.layers.Layer] = None,
        loss: str = "byol",
        temperature: float = 0.1,
        probe_classes: Optional[int] = None,
        probe_learning_rate: float = 1e-3,
        device_views: Optional[DeviceViews] = None,
        base_tau: float = 0.996,
        input_shape: Optional[Sequence[int]] = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        if not 0.0 <= base_tau <= 1.0:
            raise ValueError(f"`base_tau` must be in [0, 1]. Received: base_tau={base_tau!r}")
        encoder = pooled_encoder(encoder, input_shape)
        # The paper's heads: 4096 hidden units, 256 outputs.
        projector = MLPHead(4096, 256, name="projector") if projector is None else projector
        predictor = MLPHead(4096, 256, name=PREDICTOR_NAME) if predictor is None else predictor
        self.base_tau = base_tau
        if loss not in losses.LOSSES:
            raise ValueError(f"Unknown loss; expected one of {sorted(losses.LOSSES)}. Received: loss={loss!r}")
        if probe_classes is not None and (
            isinstance(probe_classes, bool) or not isinstance(probe_classes, int) or probe_classes < 2
        ):
            raise ValueError(
                f"`probe_classes` must be None or an integer >= 2. Received: probe_classes={probe_classes!r}"
            )
        if not probe_learning_rate > 0:
            raise ValueError(
                f"`probe_learning_rate` must be > 0. Received: probe_learning_rate={probe_learning_rate!r}"
            )
        self.encoder = encoder
        self.projector = projector
        self.predictor = predictor
        self.loss_name = loss
        self.temperature = temperature
        feature_dim = encoder.output.shape[-1]
        if not projector.built:
            projector.build((None, feature_dim))
        if not predictor.built:
            predictor.build(projector.compute_output_shape((None, feature_dim)))
        self.target_encoder = _clone(encoder, None)
        self.target_projector = _clone(projector, (None, feature_dim))
        for variable in self.target_encoder.weights + self.target_projector.weights:
            variable.trainable = False
        self.online_ema_variables = encoder.weights + projector.weights
        self.target_ema_variables = self.target_encoder.weights + self.target_projector.weights
        for online, target in zip(self.online_ema_variables, self.target_ema_variables):
            if online.shape != target.shape:
                raise ValueError(
                    f"Online and target variables do not match. Received: {online.path} {online.shape} vs {target.path} {target.shape}"
                )
        self.device_views = device_views
        self.tau = self.add_weight(shape=(), initializer="zeros", trainable=False, name="tau")
        # Set by `EMAUpdate` at the start of `fit`.
        self.ema_schedule = None
        self.ema_in_step = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.collapse_tracker = keras.metrics.Mean(name="collapse_std")
        self.probe_classes = probe_classes
        self.probe_learning_rate = probe_learning_rate
        self.probe = None
        if probe_classes is not None:
            # float32 under mixed precision too: its optimizer has no loss scaling.
            self.probe = keras.layers.Dense(probe_classes, dtype="float32", name="probe")
            self.probe.build((None, feature_dim))
            self.probe_optimizer = keras.optimizers.Adam(probe_learning_rate, name="probe_adam")
            # Built now so that saved weights load into it before the first step.
            self.probe_optimizer.build(self.probe.trainable_variables)
            self.probe_accuracy = keras.metrics.Mean(name="probe_acc")
        # Every sub-network is built above.
        self.built = True

    @property
    def metrics(self):
        extra = [self.probe_accuracy] if self.probe is not None else []
        return [self.loss_tracker, self.collapse_tracker, *extra]

    @property
    def online_trainable_variables(self):
        return (
            self.encoder.trainable_variables + self.projector.trainable_variables + self.predictor.trainable_variables
        )

    def call(self, images, training=False):
        return self.encoder(images, training=training)

    def _target(self, images):
        return self.target_projector(self.target_encoder(images, training=True), training=True)

    def _online(self, images):
        h = self.encoder(images, training=True)
        z = self.projector(h, training=True)
        return h, z, self.predictor(z, training=True)

    def fit(self, x=None, *args, callbacks=None, steps_per_epoch=None, **kwargs):
        callbacks = list(callbacks or [])
        if not any(isinstance(c, EMAUpdate) for c in callbacks):
            # Without it the target never moves; first, so that later callbacks see the update.
            callbacks.insert(0, EMAUpdate(None, self.base_tau))
        steps_per_epoch = steps_per_epoch or getattr(x, "byol_steps_per_epoch", None)
        kwargs.setdefault("shuffle", False)  # the views are shuffled already; Keras would warn
        return super().fit(x, *args, callbacks=callbacks, steps_per_epoch=steps_per_epoch, **kwargs)

    def compile(self, *args, **kwargs):
        super().compile(*args, **kwargs)
        # On the online variables only: `fit` would otherwise build it on all
        # trainable variables, the probe's included, which it never updates.
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.online_trainable_variables)

    def _maybe_symbolic_build(self, iterator=None, data_batch=None):
        # Keras traces a sample batch here to build what is unbuilt, first
        # reducing it across replicas for its shapes, which fails under
        # MultiWorkerMirroredStrategy ("Attempt to convert a value
        # (PerReplica...)", keras-team/keras#20585). BYOL builds its networks
        # in `__init__` and its optimizers in `compile`: nothing is left to trace.
        ready = self.optimizer is None or self.optimizer.built
        if ready and all(layer.built for layer in self._flatten_layers()):
            return
        super()._maybe_symbolic_build(iterator=iterator, data_batch=data_batch)

    def _unpack(self, data):
        """`(view1, view2, *small)` or `((view1, view2, *small), labels)` -> views, labels or None.

        Host crops (a dict, with or without labels) are finished into views here.
        """
        views, labels = (
            (data, None)
            if isinstance(data, dict)
            else (data if len(data) == 2 and isinstance(data[0], (tuple, list, dict)) else (data, None))
        )
        if isinstance(views, dict):
            if self.device_views is None:
                raise ValueError(
                    "The batches are host crops (augment_on='device'), but this BYOL has no "
                    "`device_views` to finish them. Received: device_views=None"
                )
            views = self.device_views(views)
        return tuple(views), labels

    def _train_probe(self, features, labels):
        replicas = tf.distribute.get_strategy().num_replicas_in_sync
        features = tf.stop_gradient(tf.cast(features, tf.float32))
        with tf.GradientTape() as tape:
            logits = self.probe(features)
            loss = tf.reduce_mean(keras.losses.sparse_categorical_crossentropy(labels, logits, from_logits=True))
            loss = loss / replicas
        variables = self.probe.trainable_variables
        self.probe_optimizer.apply(tape.gradient(loss, variables), variables)
        self._update_probe_accuracy(labels, logits)

    def _update_probe_accuracy(self, labels, logits):
        correct = tf.cast(tf.equal(tf.argmax(logits, axis=-1), tf.cast(labels, tf.int64)), tf.float32)
        # The global fraction, the same on every replica: exact also when the
        # replicas' last validation batches differ in size.
        total = _replica_sum(tf.cast(tf.size(correct), tf.float32))
        self.probe_accuracy.update_state(_replica_sum(tf.reduce_sum(correct)) / tf.maximum(total, 1.0), total)

    def train_step(self, data):
        (view1, view2, *small), labels = self._unpack(data)
        if labels is not None and self.probe is None:
            raise ValueError("The batches carry labels, but this BYOL has no probe. Received: probe_classes=None")
        # Each view goes through the networks on its own, as in the paper: a
        # concatenated batch would change the BatchNorm statistics.
        z1_target = tf.stop_gradient(self._target(view1))
        z2_target = tf.stop_gradient(self._target(view2))
        variables = self.online_trainable_variables
        with tf.GradientTape() as tape:
            h1, z1, p1 = self._online(view1)
            _, _, p2 = self._online(view2)
            # Multi-crop: the small views are online only, and predict both large views' targets.
            p_small = [self._online(view)[2] for view in small]
            loss = tf.reduce_mean(
                losses.multi_crop_loss(p1, p2, p_small, z1_target, z2_target, self.loss_name, self.temperature)
            )
            # Weight regularisers of the online networks (a user's or a
            # keras.applications backbone): added as Keras's `compute_loss`
            # does. The target's variables are non-trainable, so not counted.
            if self.losses:
                loss = loss + tf.add_n([tf.cast(penalty, loss.dtype) for penalty in self.losses])
            # Keras's TF optimizer SUM-reduces gradients over replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        grads = tape.gradient(scaled_loss, variables)
        # The rate this step uses, read before `apply` advances the schedule.
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        # Read before `apply`: a loss-scale optimizer that skips a non-finite
        # step leaves it as it is, and the EMA must then skip the step too.
        iterations = tf.identity(self.optimizer.iterations)
        self.optimizer.apply(grads, variables)
        tau = self.tau
        if self.ema_schedule is not None and self.ema_in_step:
            tau = ema_step(self, self.ema_schedule, iterations)
        elif self.ema_schedule is not None:
            # The callback applies this tau right after the step.
            tau = self.ema_schedule.tau_at(self.optimizer.iterations - 1)
        # oneDNN's fused BatchNorm+ReLU maps NaN to 0, so a NaN weight can leave
        # the loss finite: the logged loss turns NaN with the weights (NaNGuard).
        finite = tf.reduce_all([tf.reduce_all(tf.math.is_finite(v)) for v in variables])
        self.loss_tracker.update_state(tf.where(finite, loss, tf.constant(float("nan"), loss.dtype)))
        self.collapse_tracker.update_state(collapse_std(z1))
        logs = {
            "loss": self.loss_tracker.result(),
            "collapse_std": self.collapse_tracker.result(),
            "tau": tf.identity(tau),
            "lr": lr,
        }
        if labels is not None:
            self._train_probe(h1, labels)
            logs["probe_acc"] = self.probe_accuracy.result()
        return _for_keras_reduction(logs)

    def test_step(self, data):
        """The probe's top-1 on `(images, labels)`: `val_probe_acc` in `fit`."""
        if self.probe is None:
            raise ValueError(
                "Evaluation data needs the online linear probe: build BYOL with `probe_classes`. Received: probe_classes=None"
            )
        images, labels = data[0], data[1]
        features = tf.cast(self.encoder(images, training=False), tf.float32)
        self._update_probe_accuracy(labels, self.probe(features))
        return _for_keras_reduction({"probe_acc": self.probe_accuracy.result()})

    def compile_from_config(self, config):
        # Keras skips `compile` on load when a model overrides it; ours only
        # adds the optimizer build, so a reloaded model gets its optimizer
        # state back.
        self.compile(**keras.saving.deserialize_keras_object(config))

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            projector=keras.saving.serialize_keras_object(self.projector),
            predictor=keras.saving.serialize_keras_object(self.predictor),
            loss=self.loss_name,
            temperature=self.temperature,
            probe_classes=self.probe_classes,
            probe_learning_rate=self.probe_learning_rate,
            device_views=None if self.device_views is None else keras.saving.serialize_keras_object(self.device_views),
            base_tau=self.base_tau,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config.pop("fast_kernels", None)  # stored by models saved before the kernels became opt-in
        for key in ("encoder", "projector", "predictor", "device_views"):
            if config.get(key) is not None:
                config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def _for_keras_reduction(logs):
    """`logs` in the shape Keras can average over the replicas.

    Under a multi-worker `MultiWorkerMirroredStrategy`, Keras averages each
    log with `strategy.reduce("MEAN", value, axis=0)`, which rejects scalars
    (keras-team/keras#20585); a `[1]` vector averages to the same scalar.
    """
    strategy = tf.distribute.get_strategy()
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy) and strategy.extended._in_multi_worker_mode():
        return {name: tf.reshape(value, [1]) for name, value in logs.items()}
    return logs


def _replica_sum(value):
    """The sum of `value` over the replicas, inside a replica context."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return value
    return context.all_reduce("SUM", value)


def collapse_std(z: tf.Tensor) -> tf.Tensor:
    """Mean over dimensions of the batch std of L2-normalised projections.

    About `1/sqrt(dim)` for well-spread projections and 0 when the network
    has collapsed to a constant (Chen & He 2021, Section 4.1).
    """
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
    return tf.reduce_mean(tf.math.reduce_std(z, axis=0))
