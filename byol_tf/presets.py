"""The named recipes (`PRESETS`) and `get_preset`, which applies and validates overrides."""

import dataclasses

from byol_tf.audio.config import AudioAugmentConfig
from byol_tf.config import MIN_IMAGE_SIZE, AugmentConfig, PretrainConfig
from byol_tf.text.augment import TextAugmentConfig

# CIFAR images are 32 px: a blur kernel of 10% of the side is 3 px and only
# erases the little detail there is, so CIFAR recipes (solo-learn, lightly)
# turn blur off; solarization stays asymmetric.
_CIFAR_AUGMENT = AugmentConfig(image_size=32, blur_prob=(0.0, 0.0))

PRESETS = {
    # The quickstart: a tiny ResNet on generated shapes, a few CPU minutes.
    "demo": PretrainConfig(
        preset="demo",
        backbone="resnet_tiny",
        image_size=32,
        batch_size=128,
        epochs=12,
        optimizer="lars",
        base_lr=1.0,
        weight_decay=1e-5,
        warmup_epochs=1,
        base_tau=0.99,
        projector_hidden=512,
        projection_dim=128,
        predictor_hidden=512,
        # The shapes' colours are random, so colour says nothing about the class:
        # full-strength hue and saturation jitter and frequent grayscale make
        # colour useless to BYOL too, and crops of at least 40% keep the shape in view.
        eval_crop_fraction=1.0,
        augment=dataclasses.replace(
            _CIFAR_AUGMENT,
            crop_scale=(0.6, 1.0),
            jitter_prob=1.0,
            brightness=0.6,
            contrast=0.6,
            saturation=0.9,
            hue=0.5,
            grayscale_prob=0.5,
        ),
    ),
    # Paper-style CIFAR-10 recipe for GPUs (solo-learn's BYOL CIFAR settings).
    "cifar10": PretrainConfig(
        preset="cifar10",
        backbone="resnet18_cifar",
        image_size=32,
        batch_size=256,
        epochs=1000,
        optimizer="lars",
        base_lr=1.0,
        weight_decay=1e-5,
        warmup_epochs=10,
        base_tau=0.99,
        eval_crop_fraction=1.0,
        augment=_CIFAR_AUGMENT,
    ),
    # The best 2 CPU cores reach in 20 minutes of wall time, planned to the
    # budget on whatever CPU runs it (`epochs` is the fallback without one;
    # `--epochs` trains that many instead). `byol-pretrain --preset=cifar10_cpu20
    # --data=train.npz --eval_data=test.npz` reached (BENCHMARKS.md) on 2 Zen 4
    # cores (AVX512_BF16, bfloat16 by "auto"): 59.9% kNN in 19:46 (14,831 steps)
    # with crops of 40-100%, 54.9% with --time_budget=10m, 62.7% with 40m;
    # 58.6% with 50-100% and with 30-100%, 56.2% with 20-100%, 53.9% with the
    # paper's 8-100% (a short run learns more from easier views). 58.9% in 19:40
    # (13,223 steps) on 2 Intel Xeon cores with AMX-BF16 (those figures with base
    # lr 2.0 and the schedules annealed to the run's end, schedule_horizon 1). On
    # 2 Zen 2 cores (AVX2 only, float32; 0.44x the Zen 4 steps): 58.3% in 19:50
    # (6,505 steps) with base lr 4.0 and the learning rate and tau laid over twice
    # the planned steps (schedule_horizon 2: the run ends halfway down both);
    # 57.8% with lr 3.0, 55.7% with 2.0, 53.1% with 2.0 and horizon 1; 51.7%
    # with --time_budget=10m. Batch 64 (53.8%) and 24 px views (52.2%) bought
    # more steps and learned less. On 2 Zen 3 cores, with the 20-100% crops
    # before: 48.7% in 20 minutes.
    # Each other choice won a 4-minute probe (BENCHMARKS.md, "What each choice
    # bought"): the tiny ResNet learns as much per minute as larger ones and gets
    # more epochs; batch 128 gives more steps; tau 0.96 lets the target keep up
    # in a short run; the predictor at 10x the learning rate (37.9-38.0% against
    # 35.2% in 4 minutes). Two 16 px multi-crop views (--augment=small_views=2)
    # cost 0.77x the steps and 2.8 points.
    "cifar10_cpu20": PretrainConfig(
        preset="cifar10_cpu20",
        backbone="resnet_tiny",
        image_size=32,
        batch_size=128,
        epochs=22,
        time_budget=1200.0,
        optimizer="lars",
        base_lr=4.0,
        weight_decay=1e-5,
        warmup_epochs=2,
        base_tau=0.96,
        schedule_horizon=2.0,
        predictor_lr_scale=10.0,
        precision="auto",
        projector_hidden=1024,
        projection_dim=128,
        predictor_hidden=1024,
        eval_crop_fraction=1.0,
        augment=dataclasses.replace(_CIFAR_AUGMENT, crop_scale=(0.4, 1.0)),
    ),
    # The paper's ImageNet recipe (Grill et al. 2020, Section 3.2).
    "imagenet": PretrainConfig(
        preset="imagenet",
        backbone="resnet50",
        image_size=224,
        batch_size=4096,
        epochs=1000,
        optimizer="lars",
        base_lr=0.2,
        weight_decay=1.5e-6,
        warmup_epochs=10,
        base_tau=0.996,
        precision="auto",  # bfloat16 on A100/H100-class GPUs (the paper trained in bfloat16 on TPUs)
    ),
}


# Real photos at 96 px, 20 CPU-minutes (BENCHMARKS.md, "Photo folders"):
#   byol-pretrain --preset=photos96_cpu20 --data=imagewoof/train --eval_data=imagewoof/val --out=runs/woof
# cifar10_cpu20's short-run recipe on a tiny ResNet whose stem downsamples 4x,
# trained on 80 px views of crops of 35-100% and evaluated at 96 px. Imagewoof kNN
# over random init in the 20-minute budget on 2 Zen 4 cores, seeds 0-4: +12.75,
# +13.4, +15.0, +11.5, +13.25 (mean +13.2, 30.3% against 17.15%); +11.9 on an Intel
# Xeon; +7.9 on an AVX2-only Zen 2 (float32, 0.4x the steps), +8.75 there with the
# schedule horizon of 2 it inherits (the others with 1); +10.9 with 96 px views
# and 20-100% crops. Seeds spread by 3.5 points, so one run proves little:
# resnet_tiny on 64 px views (+14.5, +10.75) is no better.
# Gentler colour, wider or deeper nets, multi-crop small views, other tau, lr,
# batch or weight decay did no better (BENCHMARKS.md); it keeps the base lr 2.0
# those runs had (lr 4.0, cifar10_cpu20's since 2026-12-08, was no better on Zen 4).
PRESETS["photos96_cpu20"] = dataclasses.replace(
    PRESETS["cifar10_cpu20"],
    preset="photos96_cpu20",
    backbone="resnet_tiny_stem4",
    image_size=96,
    view_size=80,
    epochs=110,
    base_lr=2.0,
    warmup_epochs=3,
    base_tau=0.97,
    eval_crop_fraction=0.875,
    augment=AugmentConfig(crop_scale=(0.35, 1.0)),  # made at view_size (PretrainConfig sets it)
)


# Audio and text encoders are small (100k parameters): the paper's 4096-wide heads would cost
# more than the encoder.
_SMALL_HEADS = dict(projector_hidden=512, projection_dim=128, predictor_hidden=512)

# Spoken digits (FSDD: 8 kHz, clips up to 1 s), a 10-minute budget: 72.3% kNN, +15.7 over
# random init, on 2 Zen 3 cores (BENCHMARKS.md, "Audio and text"):
#   byol-pretrain --preset=fsdd_audio --data=fsdd.npz:train --eval_data=fsdd.npz:test --out=runs/fsdd
# A 98k-parameter log-mel conv net; the views shift, gain, add noise and mask.
PRESETS["fsdd_audio"] = PretrainConfig(
    preset="fsdd_audio",
    modality="audio",
    backbone="audio_conv",
    batch_size=128,
    epochs=56,
    time_budget=600.0,
    optimizer="lars",
    base_lr=1.0,
    weight_decay=1e-5,
    warmup_epochs=2,
    base_tau=0.97,
    fast_kernels=False,
    **_SMALL_HEADS,
    augment=AudioAugmentConfig(sample_rate=8000, num_samples=8000, num_mel_bins=64),
)

# Movie-review sentences (SST-2), 60 epochs, 8 minutes on 2 Zen 3 cores (BENCHMARKS.md, "Audio and text"):
#   byol-pretrain --preset=sst2_text --data=sst2.csv.gz:train --eval_data=sst2.csv.gz:dev --out=runs/sst2
# A bidirectional GRU over a vocabulary adapted to the training text; Adam
# (as recurrent nets usually train) at 3e-3, which beat 1e-3 in a 30-epoch
# probe (BENCHMARKS.md, "Text"), and small heads.
PRESETS["sst2_text"] = PretrainConfig(
    preset="sst2_text",
    modality="text",
    backbone="text_gru",
    batch_size=256,
    epochs=60,
    optimizer="adam",
    base_lr=3e-3,
    weight_decay=0.0,
    warmup_epochs=1,
    base_tau=0.97,
    fast_kernels=False,
    **_SMALL_HEADS,
    augment=TextAugmentConfig(),
)


def get_preset(name: str, **overrides) -> PretrainConfig:
    """Returns preset `name` with `overrides` applied and validated.

    Args:
        name: a key of `PRESETS`.
        **overrides: `PretrainConfig` fields; `augment` takes a dict of
            `AugmentConfig` fields to change. A new `image_size` scales a
            preset's `view_size` with it, unless `view_size` is given too.
    """
    if name not in PRESETS:
        raise ValueError(f"Unknown preset; expected one of {sorted(PRESETS)}. Received: preset={name!r}")
    base = PRESETS[name]
    fields = {f.name for f in dataclasses.fields(PretrainConfig)}
    for key in overrides:
        if key not in fields:
            raise ValueError(f"Unknown config field. Received: {key}={overrides[key]!r}")
    if "epochs" in overrides and overrides.get("time_budget") is not None:
        raise ValueError(
            "Train for a number of epochs or to a time budget, not both. "
            f"Received: epochs={overrides['epochs']!r}, time_budget={overrides['time_budget']!r}"
        )
    if "epochs" in overrides:
        overrides["time_budget"] = None  # epochs asked for: the preset's budget no longer applies
    if base.view_size and "image_size" in overrides and "view_size" not in overrides:
        # The preset's views are a fraction of its encoder's size; a new size keeps the fraction.
        overrides["view_size"] = max(MIN_IMAGE_SIZE, round(base.view_size * overrides["image_size"] / base.image_size))
    augment_overrides = overrides.pop("augment", None) or {}
    augment = dataclasses.replace(base.augment, **augment_overrides)
    return dataclasses.replace(base, augment=augment, **overrides)
