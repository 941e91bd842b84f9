"""`--augment_on=device`: the host crops, the train step finishes the views."""

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from byol_tf import data
from byol_tf.config import AugmentConfig
from byol_tf.device_views import DeviceViews

CONFIG = AugmentConfig(image_size=16)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 256, (18 + i, 30 - i // 2, 3), dtype=np.uint8)).save(folder / f"{i:02d}.png")
    arrays = data.ArraySource(data.ImageSet(rng.integers(0, 256, (32, 20, 24, 3), dtype=np.uint8)))
    return {"arrays": arrays, "folder": data.open_source(str(folder))}


@pytest.mark.parametrize("kind", ["arrays", "folder"])
def test_device_views_are_the_host_views_on_any_split_of_the_batch(sources, kind):
    source = sources[kind]
    host = data.pretrain_dataset(source, 8, CONFIG, seed=3, autotune=False).take(3)
    device = data.pretrain_dataset(source, 8, CONFIG, seed=3, autotune=False, augment_on="device").take(3)
    layer = DeviceViews(CONFIG)
    for (view1, view2), crops in zip(host, device):
        assert crops["crops"].dtype == (tf.uint8 if kind == "folder" else tf.float32)
        assert crops["crops"].shape == (8, 2, 16, 16, 3)
        # The whole batch on one device, or in 2 and 4 replica shares.
        for shares in (1, 2, 4):
            size = 8 // shares
            parts = [layer({k: t[i * size : (i + 1) * size] for k, t in crops.items()}) for i in range(shares)]
            for view, host_view in ((0, view1), (1, view2)):
                got = np.concatenate([p[view].numpy() for p in parts])
                np.testing.assert_allclose(got, host_view.numpy(), rtol=0, atol=1e-6)


def test_device_views_round_trip_and_refuse_bad_settings():
    layer = DeviceViews(CONFIG)
    again = DeviceViews.from_config(layer.get_config())
    assert again.augment_config == CONFIG
    with pytest.raises(ValueError, match="augment_config=3"):
        DeviceViews(3)
    with pytest.raises(ValueError, match="augment_on='gpu'"):
        data.pretrain_dataset(np.zeros((8, 16, 16, 3), np.uint8), 4, CONFIG, augment_on="gpu")


def test_a_model_without_device_views_refuses_crops(sources):
    from byol_tf import get_preset
    from byol_tf.build import build_byol

    config = get_preset("demo", image_size=16, projector_hidden=8, projection_dim=4, predictor_hidden=8)
    model = build_byol(config)
    model.compile(optimizer="sgd")
    crops = next(iter(data.pretrain_dataset(sources["arrays"], 8, config.augment, augment_on="device")))
    with pytest.raises(ValueError, match="device_views=None"):
        model.train_step(crops)
