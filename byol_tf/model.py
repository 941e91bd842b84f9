"""`BYOL`: the online and target networks and the training step."""

import keras
import tensorflow as tf

from byol_tf import losses
from byol_tf.heads import MLPHead


def _clone(layer, input_shape):
    """A fresh copy of `layer` (a functional model or a layer) with the same weights."""
    if isinstance(layer, keras.Model):
        copy = keras.models.clone_model(layer)
    else:
        copy = layer.__class__.from_config(layer.get_config())
        copy.build(input_shape)
    copy.set_weights(layer.get_weights())
    return copy


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

    Args:
        encoder: a `keras.Model` from images to pooled features.
        projector: the projector head (an `MLPHead`).
        predictor: the predictor head (an `MLPHead`).
        loss: "byol" (the paper's regression loss) or "infonce".
        temperature: InfoNCE temperature.
        **kwargs: passed to `keras.Model`.

    Example:
    >>> from byol_tf import backbones, heads
    >>> model = BYOL(
    ...     backbones.build_encoder("resnet_tiny", 32),
    ...     heads.MLPHead(64, 16),
    ...     heads.MLPHead(64, 16),
    ... )
    >>> model.compile(optimizer="sgd")
    """

    def __init__(self, encoder, projector, predictor, loss="byol", temperature=0.1, **kwargs):
        super().__init__(**kwargs)
        if loss not in losses.LOSSES:
            raise ValueError(f"Unknown loss; expected one of {sorted(losses.LOSSES)}. Received: loss={loss!r}")
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
                raise ValueError(f"Online and target variables do not match. Received: {online.path} {online.shape} vs {target.path} {target.shape}")
        self.tau = self.add_weight(shape=(), initializer="zeros", trainable=False, name="tau")
        # Set by `EMAUpdate` at the start of `fit`.
        self.ema_schedule = None
        self.ema_in_step = False
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.collapse_tracker = keras.metrics.Mean(name="collapse_std")
        # Every sub-network is built above.
        self.built = True

    @property
    def metrics(self):
        return [self.loss_tracker, self.collapse_tracker]

    @property
    def online_trainable_variables(self):
        return self.encoder.trainable_variables + self.projector.trainable_variables + self.predictor.trainable_variables

    def call(self, images, training=False):
        return self.encoder(images, training=training)

    def _target(self, images):
        return self.target_projector(self.target_encoder(images, training=True), training=True)

    def _online(self, images):
        z = self.projector(self.encoder(images, training=True), training=True)
        return z, self.predictor(z, training=True)

    def train_step(self, data):
        view1, view2 = data[0], data[1]
        # Each view goes through the networks on its own, as in the paper: a
        # concatenated batch would change the BatchNorm statistics.
        z1_target = tf.stop_gradient(self._target(view1))
        z2_target = tf.stop_gradient(self._target(view2))
        variables = self.online_trainable_variables
        with tf.GradientTape() as tape:
            z1, p1 = self._online(view1)
            _, p2 = self._online(view2)
            loss = tf.reduce_mean(
                losses.symmetric_loss(p1, p2, z1_target, z2_target, self.loss_name, self.temperature)
            )
            # Keras's TF optimizer SUM-reduces gradients over replicas.
            replicas = tf.distribute.get_strategy().num_replicas_in_sync
            scaled_loss = self.optimizer.scale_loss(loss / replicas)
        grads = tape.gradient(scaled_loss, variables)
        # The rate this step uses, read before `apply` advances the schedule.
        lr = tf.cast(self.optimizer.learning_rate, tf.float32)
        self.optimizer.apply(grads, variables)
        tau = self.tau
        if self.ema_schedule is not None and self.ema_in_step:
            tau = self.ema_schedule.step_update(self)
        elif self.ema_schedule is not None:
            # The callback applies this tau right after the step.
            tau = self.ema_schedule.tau_at(self.optimizer.iterations - 1)
        self.loss_tracker.update_state(loss)
        self.collapse_tracker.update_state(collapse_std(z1))
        return {
            "loss": self.loss_tracker.result(),
            "collapse_std": self.collapse_tracker.result(),
            "tau": tf.identity(tau),
            "lr": lr,
        }

    def compile_from_config(self, config):
        super().compile_from_config(config)
        # Build the optimizer on the online variables only, so that a reloaded
        # model gets its optimizer state back.
        if self.optimizer is not None and not self.optimizer.built:
            self.optimizer.build(self.online_trainable_variables)

    def get_config(self):
        config = super().get_config()
        config.update(
            encoder=keras.saving.serialize_keras_object(self.encoder),
            projector=keras.saving.serialize_keras_object(self.projector),
            predictor=keras.saving.serialize_keras_object(self.predictor),
            loss=self.loss_name,
            temperature=self.temperature,
        )
        return config

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for key in ("encoder", "projector", "predictor"):
            config[key] = keras.saving.deserialize_keras_object(config[key])
        return cls(**config)


def collapse_std(z):
    """Mean over dimensions of the batch std of L2-normalised projections.

    About `1/sqrt(dim)` for well-spread projections and 0 when the network
    has collapsed to a constant (Chen & He 2021, Section 4.1).
    """
    z = tf.math.l2_normalize(tf.cast(z, tf.float32), axis=-1)
    return tf.reduce_mean(tf.math.reduce_std(z, axis=0))


def build_byol(config, strategy_replicas=1, backbone=None):
    """Builds a `BYOL` model from a `byol_tf.config.PretrainConfig`.

    Args:
        config: the run's configuration.
        strategy_replicas: replicas of the current strategy; BatchNorm is
            synchronised across them when there are several.
        backbone: optional `keras.Model` to use instead of `config.backbone`.
    """
    from byol_tf.backbones import build_encoder

    sync = strategy_replicas > 1
    encoder = build_encoder(backbone if backbone is not None else config.backbone, config.image_size, synchronized=sync)
    projector = MLPHead(config.projector_hidden, config.projection_dim, synchronized=sync, name="projector")
    predictor = MLPHead(config.predictor_hidden, config.projection_dim, synchronized=sync, name="predictor")
    return BYOL(encoder, projector, predictor, loss=config.loss, temperature=config.temperature, name="byol")
