"""Frozen run configurations: `AugmentConfig` and `PretrainConfig`.

Only scripts read flags; they turn flags into a `PretrainConfig` with
`byol_tf.presets.get_preset(name, **overrides)`. Every field is validated
here, and an error names the bad value.
"""

import dataclasses
import math
from typing import Optional, Tuple

# The names are declared where they are implemented; the config reads them there.
from byol_tf.audio.config import AudioAugmentConfig
from byol_tf.ema import BN_STATS_MODES
from byol_tf.losses import LOSSES
from byol_tf.optim import OPTIMIZERS
from byol_tf.precision import AUTO as AUTO_PRECISION
from byol_tf.text.augment import TextAugmentConfig
from byol_tf.checks import check as _check

AUGMENT_ON = ("host", "device")
MIN_IMAGE_SIZE = 8  # the smallest image or view side a config takes
PRECISIONS = ("float32", "mixed_float16", "mixed_bfloat16", AUTO_PRECISION)


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """The two asymmetric BYOL views (Grill et al. 2020, Table 6).

    Tuples of two values are (view 1, view 2). Probabilities are per image.

    Args:
        image_size: side of the square output views, in pixels.
        crop_scale: range of the crop's area, as a fraction of the image.
        crop_ratio: range of the crop's aspect ratio (width / height).
        flip_prob: probability of a horizontal flip.
        jitter_prob: probability of applying colour jitter.
        brightness: maximum brightness factor change (multiplicative).
        contrast: maximum contrast factor change.
        saturation: maximum saturation factor change.
        hue: maximum hue shift, as a fraction of the hue circle.
        grayscale_prob: probability of converting to grayscale.
        blur_prob: per view, probability of a Gaussian blur.
        blur_sigma: range of the blur's standard deviation, in pixels.
        blur_kernel_fraction: kernel size as a fraction of `image_size`.
        solarize_prob: per view, probability of solarization.
        solarize_threshold: pixels above it (in [0, 1]) are inverted.
        small_views: extra small views per image (multi-crop, Caron et al.
            2020); each one's prediction regresses both large views' targets.
        small_view_fraction: a small view's side, as a fraction of `image_size`.
        small_crop_scale: range of a small view's crop area (DINO's local
            crops; the large views keep `crop_scale`).
    """

    image_size: int = 224
    crop_scale: Tuple[float, float] = (0.08, 1.0)
    crop_ratio: Tuple[float, float] = (3.0 / 4.0, 4.0 / 3.0)
    flip_prob: float = 0.5
    jitter_prob: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale_prob: float = 0.2
    blur_prob: Tuple[float, float] = (1.0, 0.1)
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    blur_kernel_fraction: float = 0.1
    solarize_prob: Tuple[float, float] = (0.0, 0.2)
    solarize_threshold: float = 0.5
    small_views: int = 0
    small_view_fraction: float = 0.5
    small_crop_scale: Tuple[float, float] = (0.05, 0.4)

    def __post_init__(self):
        _check(self.image_size >= MIN_IMAGE_SIZE, "image_size", self.image_size, f"must be >= {MIN_IMAGE_SIZE}")
        _check(self.small_views >= 0, "small_views", self.small_views, "must be >= 0")
        _check(
            0.0 < self.small_view_fraction <= 1.0 and (self.small_views == 0 or self.small_view_size >= MIN_IMAGE_SIZE),
            "small_view_fraction",
            self.small_view_fraction,
            f"must be in (0, 1] and give small views of at least {MIN_IMAGE_SIZE} px (image_size={self.image_size})",
        )
        lo, hi = self.small_crop_scale
        _check(0.0 < lo <= hi <= 1.0, "small_crop_scale", self.small_crop_scale, "must satisfy 0 < lo <= hi <= 1")
        for name in ("flip_prob", "jitter_prob", "grayscale_prob", "solarize_threshold"):
            value = getattr(self, name)
            _check(0.0 <= value <= 1.0, name, value, "must be in [0, 1]")
        for name in ("blur_prob", "solarize_prob"):
            value = getattr(self, name)
            _check(
                len(value) == 2 and all(0.0 <= p <= 1.0 for p in value),
                name,
                value,
                "must be two probabilities in [0, 1]",
            )
        lo, hi = self.crop_scale
        _check(0.0 < lo <= hi <= 1.0, "crop_scale", self.crop_scale, "must satisfy 0 < lo <= hi <= 1")
        lo, hi = self.crop_ratio
        _check(0.0 < lo <= hi, "crop_ratio", self.crop_ratio, "must satisfy 0 < lo <= hi")
        lo, hi = self.blur_sigma
        _check(0.0 < lo <= hi, "blur_sigma", self.blur_sigma, "must satisfy 0 < lo <= hi")
        for name in ("brightness", "contrast", "saturation"):
            value = getattr(self, name)
            _check(0.0 <= value < 1.0, name, value, "must be in [0, 1)")
        _check(0.0 <= self.hue <= 0.5, "hue", self.hue, "must be in [0, 0.5]")

    @property
    def small_view_size(self) -> int:
        """The side of the small views, in pixels."""
        return int(round(self.image_size * self.small_view_fraction))

    def small_view_config(self) -> "AugmentConfig":
        """The views' config for the small views: their size and crop scale, the rest unchanged."""
        return dataclasses.replace(
            self,
            image_size=self.small_view_size,
            crop_scale=self.small_crop_scale,
            small_views=0,
            small_view_fraction=1.0,
        )

    @classmethod
    def from_dict(cls, values: dict) -> "AugmentConfig":
        """From `dataclasses.asdict` output after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


# The views of each modality (`byol_tf.modalities` holds the rest of what differs).
AUGMENT_CONFIGS = {"image": AugmentConfig, "audio": AudioAugmentConfig, "text": TextAugmentConfig}
MODALITIES = tuple(AUGMENT_CONFIGS)


@dataclasses.dataclass(frozen=True)
class PretrainConfig:
    """Everything that defines a BYOL pretraining run.

    Args:
        preset: name of the preset this config started from.
        modality: "image", "audio" or "text": the kind of example, which
            picks the views, the data, the encoder and the serving input
            (`byol_tf.modalities`).
        backbone: a name from `byol_tf.backbones.available_backbones()`;
            audio takes "audio_conv", text "text_gru" or "text_lstm".
        image_size: the encoder's resolution (images only): evaluation,
            export and serving resize to it, and the views are made at it
            unless `view_size` says otherwise.
        view_size: side of the training views, `None` for `image_size`. Smaller
            views make a step cheaper; the encoder stays at `image_size`. A
            random-resized crop magnifies the object, so a network trained on
            crops is evaluated best at a higher resolution than it trained at
            (Touvron et al. 2019, "FixRes").
        batch_size: global batch size, summed over replicas.
        epochs: passes over the training set (with `time_budget`, planned
            by the run instead).
        time_budget: seconds of wall time for the whole run
            (`byol_tf.budget_run`): after a measured warm-up the run plans
            its steps to end inside it; `None` trains for `epochs`.
        optimizer: one of `OPTIMIZERS`.
        base_lr: learning rate for a batch of 256; the peak is
            `base_lr * batch_size / 256`.
        weight_decay: decoupled from bias and BatchNorm parameters.
        momentum: for LARS and SGD.
        warmup_epochs: linear warm-up before the cosine decay.
        base_tau: EMA decay at step 0, cosine-annealed to 1 over the schedule.
        schedule_horizon: the learning rate's cosine and tau's are laid over
            this many times the run's steps (or its planned steps, with a
            time budget). 1.0 is the paper's; 2.0 ends a run halfway down
            both, which short runs learn more from (BENCHMARKS.md).
        bn_stats: how the target's BatchNorm moving statistics are kept:
            "own" (updated by the target's own forward passes), "ema" or "copy".
        projector_hidden, projection_dim: the projector MLP.
        predictor_hidden: the predictor MLP (output is `projection_dim`).
        predictor_lr_scale: the predictor's learning rate as a multiple of
            the schedule's (LARS only). A faster predictor keeps up with the
            moving target, which pays in short runs (BENCHMARKS.md).
        loss: "byol" (the paper's) or "infonce".
        temperature: for "infonce" only.
        augment: the two views: an `AugmentConfig`, `AudioAugmentConfig` or
            `TextAugmentConfig`, as `modality` says.
        seed: seeds data order, augmentation and initialisation.
        steps_per_execution: optimizer steps per compiled call.
        precision: a Keras dtype policy name, or "auto": mixed bfloat16 on
            CPUs with bfloat16 instructions and on NVIDIA GPUs of compute
            capability 8.0 on, float32 elsewhere
            (`byol_tf.precision`; a resumed run resolves it again).
        probe: train an online linear probe on the labels alongside BYOL
            (logged as `probe_acc`; the data must be labelled). It never
            changes the encoder.
        probe_lr: the probe's Adam learning rate.
        fast_kernels: train with `byol_tf.kernels`' fused BatchNorm and
            convolution paths (the same maths, faster on CPUs); images only.
        eval_crop_fraction: the evaluation preprocessing (kNN, linear
            evaluation, fine-tuning, serving) resizes the short side to
            `image_size / eval_crop_fraction` and centre-crops `image_size`:
            0.875 is the paper's ImageNet protocol (256 -> 224), 1.0 keeps the
            whole short side (CIFAR).
        bn_momentum, bn_epsilon: set on every BatchNorm layer of the encoder
            and heads; the paper's 0.9 and 1e-5 by default (keras-cv,
            keras-hub and keras.applications build 0.99 and 1.001e-5).
            `None` keeps each backbone's own.
        augment_on: "host" (`tf.data` makes the views) or "device": the host
            decodes, crops and flips, and the colour stages run inside the
            compiled train step on each replica (the same views, to float
            rounding; for GPUs and TPUs that the host cannot keep fed).
    """

    preset: str = "custom"
    modality: str = "image"
    backbone: str = "resnet18"
    image_size: int = 224
    view_size: Optional[int] = None
    batch_size: int = 256
    epochs: int = 100
    time_budget: Optional[float] = None
    optimizer: str = "lars"
    base_lr: float = 0.2
    weight_decay: float = 1.5e-6
    momentum: float = 0.9
    warmup_epochs: float = 10.0
    base_tau: float = 0.996
    schedule_horizon: float = 1.0
    bn_stats: str = "own"
    projector_hidden: int = 4096
    projection_dim: int = 256
    predictor_hidden: int = 4096
    predictor_lr_scale: float = 1.0
    loss: str = "byol"
    temperature: float = 0.1
    augment: AugmentConfig = dataclasses.field(default_factory=AugmentConfig)
    seed: int = 0
    steps_per_execution: int = 1
    precision: str = "float32"
    probe: bool = False
    probe_lr: float = 1e-3
    fast_kernels: bool = True
    eval_crop_fraction: float = 0.875
    bn_momentum: Optional[float] = 0.9
    bn_epsilon: Optional[float] = 1e-5
    augment_on: str = "host"

    def __post_init__(self):
        _check(self.image_size >= MIN_IMAGE_SIZE, "image_size", self.image_size, f"must be >= {MIN_IMAGE_SIZE}")
        _check(
            self.view_size is None or self.view_size >= MIN_IMAGE_SIZE,
            "view_size",
            self.view_size,
            f"must be None or >= {MIN_IMAGE_SIZE}",
        )
        _check(self.batch_size >= 2, "batch_size", self.batch_size, "must be >= 2")
        _check(self.epochs >= 1, "epochs", self.epochs, "must be >= 1")
        _check(self.time_budget is None or self.time_budget > 0, "time_budget", self.time_budget, "must be None or > 0")
        _check(self.optimizer in OPTIMIZERS, "optimizer", self.optimizer, f"must be one of {OPTIMIZERS}")
        _check(self.loss in LOSSES, "loss", self.loss, f"must be one of {tuple(LOSSES)}")
        _check(self.bn_stats in BN_STATS_MODES, "bn_stats", self.bn_stats, f"must be one of {BN_STATS_MODES}")
        _check(self.base_lr > 0, "base_lr", self.base_lr, "must be > 0")
        _check(self.weight_decay >= 0, "weight_decay", self.weight_decay, "must be >= 0")
        _check(self.predictor_lr_scale > 0, "predictor_lr_scale", self.predictor_lr_scale, "must be > 0")
        _check(
            self.predictor_lr_scale == 1.0 or self.optimizer == "lars",
            "predictor_lr_scale",
            self.predictor_lr_scale,
            f"must be 1.0 unless optimizer='lars' (optimizer={self.optimizer!r})",
        )
        _check(
            0 <= self.warmup_epochs <= self.epochs,
            "warmup_epochs",
            self.warmup_epochs,
            f"must be in [0, epochs] with epochs {self.epochs}",
        )
        _check(0.0 <= self.base_tau <= 1.0, "base_tau", self.base_tau, "must be in [0, 1]")
        _check(
            1.0 <= self.schedule_horizon < math.inf,
            "schedule_horizon",
            self.schedule_horizon,
            "must be finite and >= 1",
        )
        _check(self.temperature > 0, "temperature", self.temperature, "must be > 0")
        _check(self.probe_lr > 0, "probe_lr", self.probe_lr, "must be > 0")
        _check(isinstance(self.probe, bool), "probe", self.probe, "must be True or False")
        _check(isinstance(self.fast_kernels, bool), "fast_kernels", self.fast_kernels, "must be True or False")
        _check(0.0 < self.eval_crop_fraction <= 1.0, "eval_crop_fraction", self.eval_crop_fraction, "must be in (0, 1]")
        _check(
            self.bn_momentum is None or 0.0 <= self.bn_momentum < 1.0,
            "bn_momentum",
            self.bn_momentum,
            "must be None or in [0, 1)",
        )
        _check(self.bn_epsilon is None or self.bn_epsilon > 0.0, "bn_epsilon", self.bn_epsilon, "must be None or > 0")
        _check(self.augment_on in AUGMENT_ON, "augment_on", self.augment_on, f"must be one of {AUGMENT_ON}")
        _check(self.steps_per_execution >= 1, "steps_per_execution", self.steps_per_execution, "must be >= 1")
        for name in ("projector_hidden", "projection_dim", "predictor_hidden"):
            _check(getattr(self, name) >= 1, name, getattr(self, name), "must be >= 1")
        _check(self.precision in PRECISIONS, "precision", self.precision, f"must be one of {PRECISIONS}")
        _check(self.modality in MODALITIES, "modality", self.modality, f"must be one of {MODALITIES}")
        augment_class = AUGMENT_CONFIGS[self.modality]
        default_views = isinstance(self.augment, AugmentConfig) and self.augment == AugmentConfig(
            image_size=self.augment.image_size
        )
        if self.modality != "image" and default_views:
            # The image default left in place: the modality's own default views.
            object.__setattr__(self, "augment", augment_class())
        _check(
            isinstance(self.augment, augment_class),
            "augment",
            self.augment,
            f"must be an {augment_class.__name__} for modality={self.modality!r}",
        )
        if self.modality != "image":
            _check(self.augment_on == "host", "augment_on", self.augment_on, "must be 'host' for audio and text")
            _check(self.view_size is None, "view_size", self.view_size, "must be None for audio and text")
        else:
            # Multi-crop views are made on the host only (`DeviceViews` finishes pairs).
            _check(
                self.augment_on == "host" or not self.augment.small_views,
                "augment_on",
                self.augment_on,
                f"must be 'host' with small views (small_views={self.augment.small_views})",
            )
            if self.augment.image_size != self.train_size:
                # The views are made at the training resolution; keep one source of truth.
                object.__setattr__(self, "augment", dataclasses.replace(self.augment, image_size=self.train_size))

    @property
    def train_size(self) -> int:
        """The side of the training views: `view_size`, else `image_size`."""
        return self.view_size or self.image_size

    def schedule_steps(self, steps: int) -> int:
        """The steps the learning-rate and tau schedules are laid over, for a run of `steps`."""
        return max(1, round(self.schedule_horizon * int(steps)))

    @property
    def peak_lr(self) -> float:
        """The paper's linear scaling rule: base_lr * batch / 256."""
        return self.base_lr * self.batch_size / 256.0

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "PretrainConfig":
        values = dict(values)
        augment_class = AUGMENT_CONFIGS.get(values.get("modality", "image"), AugmentConfig)
        return cls(augment=augment_class.from_dict(values.pop("augment", {}) or {}), **values)
