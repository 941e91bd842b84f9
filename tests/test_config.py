import dataclasses

import pytest

from byol_tf import config, presets
from byol_tf.config import AUGMENT_CONFIGS


def test_presets_are_valid_and_named():
    for name, preset in presets.PRESETS.items():
        assert preset.preset == name
        assert isinstance(preset.augment, AUGMENT_CONFIGS[preset.modality])
        if preset.modality == "image":
            assert preset.augment.image_size == preset.train_size  # the views are made at the training size


def test_paper_recipe_defaults():
    paper = presets.PRESETS["imagenet"]
    assert paper.base_tau == 0.996 and paper.base_lr == 0.2 and paper.weight_decay == 1.5e-6
    assert (paper.projector_hidden, paper.projection_dim, paper.predictor_hidden) == (4096, 256, 4096)
    assert paper.warmup_epochs == 10 and paper.optimizer == "lars" and paper.loss == "byol"
    aug = paper.augment
    assert aug.blur_prob == (1.0, 0.1) and aug.solarize_prob == (0.0, 0.2)
    assert aug.crop_scale == (0.08, 1.0) and aug.jitter_prob == 0.8 and aug.grayscale_prob == 0.2
    assert (aug.brightness, aug.contrast, aug.saturation, aug.hue) == (0.4, 0.4, 0.2, 0.1)
    assert paper.peak_lr == pytest.approx(0.2 * 4096 / 256)


def test_get_preset_overrides_and_image_size_follows():
    cfg = presets.get_preset("demo", image_size=48, epochs=3, augment={"flip_prob": 0.0})
    assert cfg.image_size == 48 and cfg.augment.image_size == 48 and cfg.epochs == 3
    assert cfg.augment.flip_prob == 0.0
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.epochs = 4


def test_view_size_sets_the_views_and_leaves_the_encoder_size():
    cfg = presets.get_preset("cifar10_cpu20", view_size=24)
    assert (cfg.image_size, cfg.augment.image_size, cfg.train_size) == (32, 24, 24)
    assert config.PretrainConfig.from_dict(cfg.to_dict()) == cfg
    plain = presets.get_preset("cifar10_cpu20")
    assert (plain.view_size, plain.augment.image_size, plain.train_size) == (None, 32, 32)
    with pytest.raises(ValueError, match="view_size=4"):
        presets.get_preset("cifar10_cpu20", view_size=4)
    with pytest.raises(ValueError, match="view_size=24"):
        presets.get_preset("fsdd_audio", view_size=24)


def test_a_new_image_size_scales_a_presets_smaller_views():
    base = presets.PRESETS["photos96_cpu20"]
    assert base.view_size < base.image_size  # the preset trains on smaller views
    cfg = presets.get_preset("photos96_cpu20", image_size=2 * base.image_size)
    assert (cfg.image_size, cfg.view_size, cfg.augment.image_size) == (
        2 * base.image_size,
        2 * base.view_size,
        2 * base.view_size,
    )
    both = presets.get_preset("photos96_cpu20", image_size=160, view_size=100)
    assert (both.image_size, both.view_size) == (160, 100)  # an explicit view size wins
    assert presets.get_preset("cifar10_cpu20", image_size=48).view_size is None  # no views of its own


@pytest.mark.parametrize(
    "overrides, message",
    [
        ({"batch_size": 0}, "batch_size=0"),
        ({"epochs": -1}, "epochs=-1"),
        ({"optimizer": "rmsprop"}, "optimizer='rmsprop'"),
        ({"base_tau": 1.5}, "base_tau=1.5"),
        ({"schedule_horizon": 0.5}, "schedule_horizon=0.5"),
        ({"schedule_horizon": float("inf")}, "schedule_horizon=inf"),
        ({"augment": {"blur_prob": (1.2, 0.0)}}, "blur_prob=(1.2, 0.0)"),
        ({"nonsense": 1}, "nonsense=1"),
        ({"augment": {"small_views": -1}}, "small_views=-1"),
        ({"augment": {"small_views": 2, "small_view_fraction": 0.1}}, "small_view_fraction=0.1"),
        ({"augment": {"small_crop_scale": (0.5, 0.2)}}, "small_crop_scale=(0.5, 0.2)"),
        ({"augment": {"small_views": 2}, "augment_on": "device"}, "augment_on='device'"),
    ],
)
def test_bad_values_are_named(overrides, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        presets.get_preset("demo", **overrides)


def test_small_views_follow_the_view_size():
    cfg = presets.get_preset("cifar10_cpu20", view_size=24, augment={"small_views": 2, "small_view_fraction": 0.5})
    assert (cfg.augment.small_views, cfg.augment.small_view_size) == (2, 12)
    small = cfg.augment.small_view_config()
    assert (small.image_size, small.crop_scale, small.small_views) == (12, (0.05, 0.4), 0)
    assert small.blur_prob == cfg.augment.blur_prob and small.solarize_prob == cfg.augment.solarize_prob
    assert config.PretrainConfig.from_dict(cfg.to_dict()) == cfg


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset='nope'"):
        presets.get_preset("nope")


def test_dict_round_trip():
    cfg = presets.get_preset("cifar10_cpu20", seed=3)
    assert config.PretrainConfig.from_dict(cfg.to_dict()) == cfg
    # A run folder written before `schedule_horizon` existed resumes with the paper's 1.0.
    old = {k: v for k, v in presets.get_preset("demo").to_dict().items() if k != "schedule_horizon"}
    assert config.PretrainConfig.from_dict(old).schedule_horizon == 1.0
