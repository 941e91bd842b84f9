import keras
import numpy as np
import pytest

from byol_tf.backbones import available_backbones, build_encoder


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
        backbone_kwargs=dict(stackwise_filters=[64, 32], stackwise_blocks=[1, 1], stackwise_strides=[1, 2], block_type="basic_block", include_rescaling=False),
    )
    assert encoder.output.shape[-1] == 32


def test_unknown_backbone_names_value():
    with pytest.raises(ValueError, match="backbone='resnet7'"):
        build_encoder("resnet7", 32)
    assert "resnet18" in available_backbones()
