"""`AudioAugmentConfig`: the two BYOL views of a waveform, as a frozen dataclass.

It imports nothing from `byol_tf.config` (only `byol_tf.checks`), so that the core config can import it.
"""

import dataclasses
import math
from typing import Tuple
from byol_tf.checks import check as _check

SHIFT_MODES = ("zeros", "roll")


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_range(value) -> bool:
    return (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
        and value[0] <= value[1]
    )


def _fraction_or_count(value, limit) -> bool:
    """`value` < 1 is a fraction; from 1 up it is a whole count, at most `limit`."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0.0 <= value:
        return False
    return value < 1.0 or (float(value).is_integer() and value <= limit)


@dataclasses.dataclass(frozen=True)
class AudioAugmentConfig:
    """The two BYOL views of a waveform: crop, shift, gain, noise, SpecAugment-style masks.

    Every view stays a waveform `[batch, num_samples]` (see `byol_tf.audio.augment`).
    The defaults are BYOL-A's and SpecAugment's, scaled to short clips: a
    +-6 dB gain (loudness says nothing about content), noise on half the clips
    at 10-40 dB SNR (audible but never drowning the signal), two time masks of
    up to 10% and two frequency masks of up to 15% of the mel range
    (SpecAugment's LibriSpeech policy masks up to 27 of 80 bins, too much for
    digits), and shifts of up to 10% that move the sound within the clip.

    Args:
        sample_rate: samples per second of the waveforms.
        num_samples: length of the views, the model's input length.
        crop: take a random window of `num_samples` from longer clips; False
            takes the centre window (as `eval_waveforms`).
        max_shift: largest time shift, as a fraction of `num_samples` (< 1)
            or a whole number of samples (>= 1); 0 turns shifting off.
        shift_mode: "zeros" (the clip moves and silence fills in) or "roll"
            (the end wraps round to the start).
        gain_db: range of the random gain, in dB.
        noise_prob: probability of adding Gaussian noise to a clip.
        snr_db: range of the noise's signal-to-noise ratio, in dB, relative
            to the clip's own mean power.
        time_masks: number of time masks (zeroed segments) per clip.
        max_time_mask: largest time mask, as a fraction of `num_samples`.
        freq_masks: number of frequency masks (zeroed FFT bands) per clip.
        max_freq_mask: largest frequency mask, as a fraction of the mel range
            (< 1) or a whole number of mel bins (>= 1).
        num_mel_bins, min_freq: the mel scale the frequency masks are drawn
            on; match the encoder's front end (`build_audio_encoder`).
    """

    sample_rate: int = 16000
    num_samples: int = 16000
    crop: bool = True
    max_shift: float = 0.1
    shift_mode: str = "zeros"
    gain_db: Tuple[float, float] = (-6.0, 6.0)
    noise_prob: float = 0.5
    snr_db: Tuple[float, float] = (10.0, 40.0)
    time_masks: int = 2
    max_time_mask: float = 0.1
    freq_masks: int = 2
    max_freq_mask: float = 0.15
    num_mel_bins: int = 64
    min_freq: float = 20.0

    def __post_init__(self):
        _check(
            _is_int(self.sample_rate) and self.sample_rate >= 1, "sample_rate", self.sample_rate, "must be an int >= 1"
        )
        _check(
            _is_int(self.num_samples) and self.num_samples >= 2, "num_samples", self.num_samples, "must be an int >= 2"
        )
        _check(isinstance(self.crop, bool), "crop", self.crop, "must be True or False")
        _check(
            _fraction_or_count(self.max_shift, self.num_samples - 1),
            "max_shift",
            self.max_shift,
            f"must be a fraction in [0, 1) or a whole number of samples below num_samples={self.num_samples}",
        )
        _check(self.shift_mode in SHIFT_MODES, "shift_mode", self.shift_mode, f"must be one of {SHIFT_MODES}")
        for name in ("gain_db", "snr_db"):
            value = getattr(self, name)
            _check(_is_range(value), name, value, "must be two finite numbers (lo, hi) with lo <= hi")
        _check(0.0 <= self.noise_prob <= 1.0, "noise_prob", self.noise_prob, "must be in [0, 1]")
        for name in ("time_masks", "freq_masks", "num_mel_bins"):
            value = getattr(self, name)
            least = 1 if name == "num_mel_bins" else 0
            _check(_is_int(value) and value >= least, name, value, f"must be an int >= {least}")
        _check(0.0 <= self.max_time_mask <= 1.0, "max_time_mask", self.max_time_mask, "must be in [0, 1]")
        _check(
            _fraction_or_count(self.max_freq_mask, self.num_mel_bins),
            "max_freq_mask",
            self.max_freq_mask,
            f"must be a fraction in [0, 1) or a whole number of mel bins up to num_mel_bins={self.num_mel_bins}",
        )
        nyquist = self.sample_rate / 2.0
        _check(
            0.0 <= self.min_freq < nyquist, "min_freq", self.min_freq, f"must be in [0, sample_rate / 2 = {nyquist})"
        )

    @property
    def shift_samples(self) -> int:
        """`max_shift` in samples."""
        return int(self.max_shift) if self.max_shift >= 1 else int(self.max_shift * self.num_samples)

    @property
    def freq_mask_fraction(self) -> float:
        """`max_freq_mask` as a fraction of the mel range (a bin is 1 / (num_mel_bins + 1) of it, as in Keras)."""
        return self.max_freq_mask / (self.num_mel_bins + 1) if self.max_freq_mask >= 1 else float(self.max_freq_mask)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: dict) -> "AudioAugmentConfig":
        """From `to_dict` output after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})
