"""`build_byol`: a `BYOL` model from a `PretrainConfig` (encoder, heads, views, fast kernels)."""

from typing import TYPE_CHECKING, Optional

import keras

from byol_tf import kernels
from byol_tf.device_views import DeviceViews
from byol_tf.heads import PREDICTOR_NAME, MLPHead
from byol_tf.model import BYOL

if TYPE_CHECKING:
    from byol_tf.config import PretrainConfig


def build_byol(
    config: "PretrainConfig",
    strategy_replicas: int = 1,
    backbone: Optional[keras.Model] = None,
    probe_classes: Optional[int] = None,
    train=None,
) -> BYOL:
    """Builds a `BYOL` model from a `byol_tf.config.PretrainConfig`.

    Args:
        config: the run's configuration.
        strategy_replicas: replicas of the current strategy; every BatchNorm
            layer (backbone and heads) is synchronised across them when there
            are several.
        backbone: optional `keras.Model` to use instead of `config.backbone`.
        probe_classes: classes of the online linear probe (`None`: no probe);
            it trains with `config.probe_lr`.
        train: the training examples (an `ArraySource`); a text encoder
            adapts its vocabulary to them.
    """
    from byol_tf.modalities import build_encoder

    sync = strategy_replicas > 1
    encoder = build_encoder(config, backbone, train, synchronized=sync)
    # The heads are ours: the paper's BN unless the config says otherwise.
    heads_bn = dict(
        synchronized=sync,
        bn_momentum=0.9 if config.bn_momentum is None else config.bn_momentum,
        bn_epsilon=1e-5 if config.bn_epsilon is None else config.bn_epsilon,
    )
    projector = MLPHead(config.projector_hidden, config.projection_dim, name="projector", **heads_bn)
    predictor = MLPHead(config.predictor_hidden, config.projection_dim, name=PREDICTOR_NAME, **heads_bn)
    device_views = DeviceViews(config.augment, name="device_views") if config.augment_on == "device" else None
    model = BYOL(
        encoder,
        projector,
        predictor,
        loss=config.loss,
        temperature=config.temperature,
        probe_classes=probe_classes,
        probe_learning_rate=config.probe_lr,
        device_views=device_views,
        base_tau=config.base_tau,
        name="byol",
    )
    if config.modality == "image" and (config.train_size != config.image_size or config.augment.small_views):
        for network in (model.encoder, model.target_encoder):
            accept_any_image_size(network)
    if config.fast_kernels and config.modality == "image":
        # CPU speed paths (the same maths): the training entry point's choice, not the model's.
        kernels.install_fast_kernels(model)
    return model


def accept_any_image_size(encoder: keras.Model) -> None:
    """Lets a convolutional encoder built at one image size train on views of another.

    Keras checks a functional model's input against the shape it was built
    with; the layers themselves (convolutions, pooling) take any size. The
    check is relaxed on this object only: a saved and reloaded encoder keeps
    its `image_size` input.
    """
    for layer in [encoder, *encoder._flatten_layers(include_self=False)]:
        inputs = getattr(layer, "inputs", None) if isinstance(layer, keras.Model) else None
        if inputs and len(inputs) == 1 and len(inputs[0].shape) == 4:  # images or feature maps
            layer.input_spec = keras.InputSpec(shape=(None, None, None, inputs[0].shape[-1]))
