"""Encoders: a registry from names to backbones that output pooled features.

Every encoder takes float images in [0, 1], `[batch, size, size, 3]`, applies
the ImageNet normalisation itself (so exports and fine-tuning see the same
input contract), and returns `[batch, features]`.

Names:
- `resnet18`: the standard ImageNet-stem ResNet-18 (keras-cv `ResNetBackbone`,
  built from arguments: no download).
- `resnet18_cifar`: ResNet-18 with a 3x3 stride-1 stem and no max-pool.
- `resnet_small_cifar`, `resnet_tiny`: narrower, shallower ResNets for CPUs;
  `resnet_tiny_stem4` is `resnet_tiny` with the ImageNet stem, for photos.
- `resnet50`: `keras.applications.ResNet50(weights=None)`.
- `keras_cv:CLASS`, `keras_hub:CLASS`, `applications:NAME`: any such backbone,
  with constructor arguments in `backbone_kwargs`.
- `keras_hub_preset:PRESET`: `keras_hub.models.Backbone.from_preset(PRESET)`
  with its weights. A local preset folder (e.g. one `byol_tf.hub.save_preset`
  wrote) loads offline; a named Kaggle or Hugging Face preset needs the network.
- any `keras.Model` passed directly to `build_encoder`.

BatchNormalization: `build_encoder` sets every BN layer of the backbone,
whatever its origin, to the run's momentum and epsilon (the paper's 0.9 and
1e-5 by default; keras-cv, keras-hub and keras.applications build theirs
with 0.99 and 1.001e-5) and, under several replicas, to cross-replica
statistics (`configure_batch_norm`).
"""

import importlib
import os
from typing import List, Optional, Union

import keras

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# name -> (widths, blocks per stage, stem) for the built-in ResNets.
_RESNETS = {
    "resnet18_cifar": ((64, 128, 256, 512), (2, 2, 2, 2), "cifar"),
    "resnet_small_cifar": ((32, 64, 128, 256), (1, 1, 1, 1), "stride2"),
    "resnet_tiny": ((16, 32, 64, 128), (1, 1, 1, 1), "stride2"),
    # resnet_tiny with the ImageNet stem (4x down): photos at 96 px cost what CIFAR does at 32.
    "resnet_tiny_stem4": ((16, 32, 64, 128), (1, 1, 1, 1), "imagenet"),
}

_PREFIXES = ("keras_cv", "keras_hub", "keras_hub_preset", "applications")


def available_backbones():
    """Returns the registered names (prefix forms take a class name, or a preset, after ':')."""
    return sorted(list(_RESNETS) + ["resnet18", "resnet50", *(f"{prefix}:" for prefix in _PREFIXES)])


def check_backbone(name):
    """Raises a ValueError naming `name` unless it is a known backbone name."""
    prefix, _, cls = name.partition(":") if isinstance(name, str) else ("", "", "")
    if name in _RESNETS or name in ("resnet18", "resnet50") or (cls and prefix in _PREFIXES):
        return
    raise ValueError(f"Unknown backbone; expected one of {available_backbones()}. Received: backbone={name!r}")


def _basic_block(x, filters, stride, synchronized, name):
    shortcut = x
    if stride != 1 or x.shape[-1] != filters:
        shortcut = keras.layers.Conv2D(filters, 1, stride, use_bias=False, name=f"{name}_proj")(x)
        shortcut = _bn(synchronized, f"{name}_proj_bn")(shortcut)
    x = keras.layers.Conv2D(filters, 3, stride, padding="same", use_bias=False, name=f"{name}_conv1")(x)
    x = keras.layers.ReLU()(_bn(synchronized, f"{name}_bn1")(x))
    x = keras.layers.Conv2D(filters, 3, 1, padding="same", use_bias=False, name=f"{name}_conv2")(x)
    x = _bn(synchronized, f"{name}_bn2")(x)
    return keras.layers.ReLU()(keras.layers.Add()([x, shortcut]))


def _bn(synchronized, name):
    return keras.layers.BatchNormalization(momentum=0.9, epsilon=1e-5, synchronized=synchronized, name=name)


def resnet(image_size, widths, blocks, stem="cifar", synchronized=False, name="resnet"):
    """A ResNet of basic blocks, returning the last feature map.

    Args:
        image_size: input side in pixels.
        widths: channels per stage.
        blocks: basic blocks per stage.
        stem: "cifar" (3x3 stride 1), "stride2" (3x3 stride 2, no pool) or
            "imagenet" (7x7 stride 2 and a 3x3 stride-2 max-pool).
        synchronized: cross-replica BatchNorm.
        name: model name.
    """
    if len(widths) != len(blocks):
        raise ValueError(f"`widths` and `blocks` must have the same length. Received: widths={widths}, blocks={blocks}")
    inputs = keras.Input((image_size, image_size, 3))
    if stem == "imagenet":
        x = keras.layers.Conv2D(widths[0], 7, 2, padding="same", use_bias=False, name="stem_conv")(inputs)
        x = keras.layers.ReLU()(_bn(synchronized, "stem_bn")(x))
        x = keras.layers.MaxPooling2D(3, 2, padding="same")(x)
    elif stem in ("cifar", "stride2"):
        stride = 1 if stem == "cifar" else 2
        x = keras.layers.Conv2D(widths[0], 3, stride, padding="same", use_bias=False, name="stem_conv")(inputs)
        x = keras.layers.ReLU()(_bn(synchronized, "stem_bn")(x))
    else:
        raise ValueError(f"`stem` must be 'cifar', 'stride2' or 'imagenet'. Received: stem={stem!r}")
    for stage, (filters, count) in enumerate(zip(widths, blocks)):
        for block in range(count):
            stride = 2 if stage > 0 and block == 0 else 1
            x = _basic_block(x, filters, stride, synchronized, f"stage{stage}_block{block}")
    return keras.Model(inputs, x, name=name)


def _keras_cv_resnet18(image_size):
    import keras_cv

    # The ResNet18Backbone alias fetches its preset config online even without
    # weights; the same network built from arguments needs no network.
    return keras_cv.models.ResNetBackbone(
        stackwise_filters=[64, 128, 256, 512],
        stackwise_blocks=[2, 2, 2, 2],
        stackwise_strides=[1, 2, 2, 2],
        block_type="basic_block",
        include_rescaling=False,
        input_shape=(image_size, image_size, 3),
    )


def _from_module(module_name, attr_path, image_size, kwargs):
    module = importlib.import_module(module_name)
    target = module
    for part in attr_path:
        if not hasattr(target, part):
            raise ValueError(
                f"`{module_name}` has no backbone class `{'.'.join(attr_path)}`. Received: backbone={module_name}:{attr_path[-1]}"
            )
        target = getattr(target, part)
    kwargs = dict(kwargs)
    kwargs.setdefault("input_shape", (image_size, image_size, 3))
    return target(**kwargs)


def _import_keras_hub(name):
    try:  # optional: the `hub` extra.
        return importlib.import_module("keras_hub")
    except ImportError as error:
        raise ImportError(
            f"This backbone needs keras-hub: pip install 'byol-tf[hub]'. Received: backbone={name}"
        ) from error


def _keras_hub_backbone(cls, image_size, kwargs):
    """`keras_hub.models.CLASS(**kwargs)`, by default at `image_size`."""
    keras_hub = _import_keras_hub(f"keras_hub:{cls}")
    target = getattr(keras_hub.models, cls, None)
    if not (isinstance(target, type) and issubclass(target, keras_hub.models.Backbone)):
        raise ValueError(f"`keras_hub.models` has no Backbone class `{cls}`. Received: backbone=keras_hub:{cls}")
    return target(**{"image_shape": (image_size, image_size, 3), **kwargs})


def _keras_hub_preset(preset, image_size, kwargs):
    """`keras_hub.models.Backbone.from_preset(preset, **kwargs)`, by default at `image_size`."""
    keras_hub = _import_keras_hub(f"keras_hub_preset:{preset}")
    # A path that is not a folder would otherwise be looked up online as a preset name.
    if os.sep in preset and not os.path.isdir(preset):
        raise ValueError(f"No keras-hub preset folder at this path. Received: backbone=keras_hub_preset:{preset}")
    # keras-hub forwards `image_shape` into the backbone's config, so a preset
    # saved at one size builds at the run's.
    return keras_hub.models.Backbone.from_preset(preset, **{"image_shape": (image_size, image_size, 3), **kwargs})


def configure_batch_norm(
    model: keras.layers.Layer,
    synchronized: bool = False,
    momentum: Optional[float] = None,
    epsilon: Optional[float] = None,
) -> int:
    """Sets every `BatchNormalization` layer in `model` (nested ones too) in place.

    Keras reads `synchronized`, `momentum` and `epsilon` when the layer is
    called, so a built layer keeps its weights and switches. This reaches the
    BN layers of any backbone (keras-cv, keras-hub, keras.applications, a
    user's model) without rebuilding it. A saved model keeps the settings
    where its config lists its layers (the built-in ResNets,
    keras.applications, functional models); keras-cv and keras-hub backbones
    are rebuilt from their constructor arguments on loading, with their own
    BN settings, so call this again after loading one to train it further.

    Args:
        model: a `keras.Model` or layer.
        synchronized: cross-replica batch statistics (TensorFlow backend).
        momentum: moving-statistics momentum; `None` keeps each layer's.
        epsilon: variance epsilon; `None` keeps each layer's.

    Returns:
        The number of BatchNormalization layers set.
    """
    if momentum is not None and not 0.0 <= momentum < 1.0:
        raise ValueError(f"`bn_momentum` must be in [0, 1). Received: bn_momentum={momentum!r}")
    if epsilon is not None and not epsilon > 0.0:
        raise ValueError(f"`bn_epsilon` must be > 0. Received: bn_epsilon={epsilon!r}")
    layers = batch_norm_layers(model)
    for layer in layers:
        layer.synchronized = bool(synchronized)
        if momentum is not None:
            layer.momentum = float(momentum)
        if epsilon is not None:
            layer.epsilon = float(epsilon)
    return len(layers)


def batch_norm_layers(model: keras.layers.Layer) -> List[keras.layers.BatchNormalization]:
    """Every `BatchNormalization` layer in `model`, nested ones included, in a fixed order."""
    return [
        layer
        for layer in model._flatten_layers(include_self=True, recursive=True)
        if isinstance(layer, keras.layers.BatchNormalization)
    ]


def build_backbone(
    name: str, image_size: int, synchronized: bool = False, backbone_kwargs: Optional[dict] = None
) -> keras.Model:
    """Builds the backbone `name`, returning a feature map or pooled features.

    Args:
        name: see the module docstring.
        image_size: input side in pixels.
        synchronized: cross-replica BatchNorm (the built-in ResNets; `build_encoder`
            sets it on every backbone).
        backbone_kwargs: constructor arguments for the prefix forms.
    """
    kwargs = backbone_kwargs or {}
    if name in _RESNETS:
        widths, blocks, stem = _RESNETS[name]
        return resnet(image_size, widths, blocks, stem, synchronized, name=name)
    if name == "resnet18":
        return _keras_cv_resnet18(image_size)
    if name == "resnet50":
        return keras.applications.ResNet50(weights=None, include_top=False, input_shape=(image_size, image_size, 3))
    prefix, _, cls = name.partition(":")
    if cls and prefix == "keras_cv":
        return _from_module("keras_cv", ("models", cls), image_size, kwargs)
    if cls and prefix == "keras_hub":
        return _keras_hub_backbone(cls, image_size, kwargs)
    if cls and prefix == "keras_hub_preset":
        return _keras_hub_preset(cls, image_size, kwargs)
    if cls and prefix == "applications":
        kwargs = {"weights": None, "include_top": False, **kwargs}
        return _from_module("keras", ("applications", cls), image_size, kwargs)
    check_backbone(name)


def build_encoder(
    backbone: Union[str, keras.Model],
    image_size: int,
    synchronized: bool = False,
    backbone_kwargs: Optional[dict] = None,
    name: str = "encoder",
    bn_momentum: Optional[float] = None,
    bn_epsilon: Optional[float] = None,
) -> keras.Model:
    """Wraps a backbone into an encoder: [0, 1] images -> pooled features.

    Args:
        backbone: a registry name or a `keras.Model`.
        image_size: input side in pixels.
        synchronized: cross-replica BatchNorm, on every BN layer of the backbone.
        backbone_kwargs: constructor arguments for the prefix forms.
        name: model name.
        bn_momentum, bn_epsilon: set on every BN layer of the backbone
            (`configure_batch_norm`); `None` keeps the backbone's own.

    Example:
    >>> encoder = build_encoder("resnet_tiny", 32)
    >>> encoder(keras.ops.zeros((2, 32, 32, 3))).shape
    (2, 128)
    """
    if isinstance(backbone, str):
        backbone = build_backbone(backbone, image_size, synchronized, backbone_kwargs)
    elif not isinstance(backbone, keras.Model):
        raise ValueError(f"`backbone` must be a name or a keras.Model. Received: backbone={backbone!r}")
    configure_batch_norm(backbone, synchronized, bn_momentum, bn_epsilon)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = keras.layers.Normalization(mean=IMAGENET_MEAN, variance=[s * s for s in IMAGENET_STD], name="imagenet_norm")(
        inputs
    )
    x = backbone(x)
    if len(x.shape) == 4:
        x = keras.layers.GlobalAveragePooling2D(name="pool")(x)
    elif len(x.shape) != 2:
        raise ValueError(f"The backbone must return [B, H, W, C] or [B, C]. Received: output shape={x.shape}")
    return keras.Model(inputs, x, name=name)
