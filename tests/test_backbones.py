import keras
import numpy as np
import pytest

from byol_tf.backbones import available_backbones, batch_norm_layers, build_encoder, configure_batch_norm


@pytest.mark.parametrize("name, dim", [("resnet_tiny", 128), ("resnet_small_cifar", 256)])
def test_builtin_encoders(name, dim):
    encoder = build_encoder(name, 32)
    assert encoder(np.zeros((2, 32, 32, 3), "float32")).shape == (2, dim)


def test_resnet18_is_the_standard_one():
    encoder = build_encoder("resnet18", 32)
    assert encoder.output.shape[-1] == 512
    # 11.19 M parameters, as torchvision's ResNet-18 without its classifier.
    assert abs(encoder.count_params() - 11.19e6) < 0.02e6
    cifar = build_encoder("resnet18_cifar", 32)
    assert cifar.get_layer("resnet18_cifar").get_layer("stem_conv").kernel.shape == (3, 3, 3, 64)


def test_prefix_forms_and_user_models():
    encoder = build_encoder("applications:MobileNetV3Small", 32, backbone_kwargs={"include_preprocessing": False})
    assert len(encoder.output.shape) == 2
    inputs = keras.Input((32, 32, 3))
    user = keras.Model(inputs, keras.layers.Conv2D(8, 3)(inputs))
    assert build_encoder(user, 32).output.shape[-1] == 8


def test_keras_cv_prefix():
    pytest.importorskip("keras_cv")
    encoder = build_encoder(
        "keras_cv:ResNetBackbone",
        32,
        backbone_kwargs=dict(
            stackwise_filters=[64, 32],
            stackwise_blocks=[1, 1],
            stackwise_strides=[1, 2],
            block_type="basic_block",
            include_rescaling=False,
        ),
    )
    assert encoder.output.shape[-1] == 32


def test_unknown_backbone_names_value():
    with pytest.raises(ValueError, match="backbone='resnet7'"):
        build_encoder("resnet7", 32)
    assert "resnet18" in available_backbones()


@pytest.mark.parametrize(
    "name, kwargs, count, own",
    [
        ("resnet18", None, 20, (0.99, 1.001e-5)),
        ("resnet50", None, 53, (0.99, 1.001e-5)),
        ("applications:MobileNetV3Small", {"include_preprocessing": False}, 34, (0.999, 1e-3)),
        ("resnet_tiny", None, 12, (0.9, 1e-5)),
    ],
)
def test_every_batch_norm_takes_the_run_settings(name, kwargs, count, own):
    encoder = build_encoder(name, 32, backbone_kwargs=kwargs)
    # Left alone, each keeps what its library builds.
    assert {(layer.momentum, layer.epsilon) for layer in batch_norm_layers(encoder)} == {own}
    encoder = build_encoder(name, 32, synchronized=True, backbone_kwargs=kwargs, bn_momentum=0.8, bn_epsilon=2e-5)
    layers = batch_norm_layers(encoder)
    assert len(layers) == count
    assert all(layer.synchronized and layer.momentum == 0.8 and layer.epsilon == 2e-5 for layer in layers)


def test_batch_norm_momentum_is_what_the_layer_uses():
    inputs = keras.Input((4,))
    model = keras.Model(inputs, keras.layers.BatchNormalization()(inputs))
    configure_batch_norm(model, momentum=0.5, epsilon=1e-3)
    x = np.arange(8, dtype="float32").reshape(2, 4)
    model(x, training=True)
    layer = batch_norm_layers(model)[0]
    # moving = m * moving + (1 - m) * batch, with the batch mean and (biased) variance.
    np.testing.assert_allclose(layer.moving_mean.numpy(), 0.5 * x.mean(0), rtol=1e-6)
    np.testing.assert_allclose(layer.moving_variance.numpy(), 0.5 + 0.5 * x.var(0), rtol=1e-6)
    with pytest.raises(ValueError, match="bn_momentum=1.0"):
        configure_batch_norm(model, momentum=1.0)
    with pytest.raises(ValueError, match="bn_epsilon=0"):
        configure_batch_norm(model, epsilon=0)


def test_the_target_network_keeps_the_batch_norm_settings():
    from byol_tf import get_preset
    from byol_tf.build import build_byol

    config = get_preset(
        "demo",
        backbone="resnet18",
        image_size=32,
        projector_hidden=8,
        projection_dim=4,
        predictor_hidden=8,
        bn_momentum=0.7,
        bn_epsilon=3e-5,
    )
    model = build_byol(config, strategy_replicas=2)
    layers = batch_norm_layers(model)
    assert len(layers) == 43
    assert all(layer.synchronized and layer.momentum == 0.7 and layer.epsilon == 3e-5 for layer in layers)
