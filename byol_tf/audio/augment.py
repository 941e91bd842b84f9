"""The two BYOL views of a batch of waveforms, as vectorised stateless ops.

Every view stays a waveform `[batch, num_samples]`, so the encoder (and a
serving signature) takes raw audio: SpecAugment's time masks are zeroed
segments of the clip, and its frequency masks zeroed bands of the clip's real
FFT, with the band drawn on the mel scale so that it matches masking mel bins
of the encoder's front end. Randomness is stateless: the same `[2]` seed gives
the same views, bit for bit, eagerly, in `tf.function` and in `tf.data`.

A view is `apply_view_params(waveforms, view_params(...))`: the draws are
separate from the ops, so tests (and anyone debugging a view) can see them.
"""

import math
from typing import Dict, Tuple

import tensorflow as tf

from byol_tf.audio.config import AudioAugmentConfig

# The HTK mel scale, as `keras.layers.MelSpectrogram` uses it.
_MEL_BREAK_HZ = 700.0
_MEL_Q = 1127.0


def hz_to_mel(hz):
    return _MEL_Q * math.log1p(hz / _MEL_BREAK_HZ)


def mel_to_hz(mel):
    return _MEL_BREAK_HZ * (tf.exp(mel / _MEL_Q) - 1.0)


def audio_views(waveforms, seed, config: AudioAugmentConfig) -> Tuple[tf.Tensor, tf.Tensor]:
    """The two BYOL views of a batch of waveforms, each drawn independently.

    Args:
        waveforms: float `[batch, time]` in [-1, 1] (int16 is scaled by
            1/32768); clips shorter than `config.num_samples` are zero-padded
            at the end. The batch size and length may be unknown.
        seed: int32 or int64 tensor of shape `[2]`, for the stateless RNG.
        config: an `AudioAugmentConfig`.

    Returns:
        Two float32 tensors `[batch, config.num_samples]`. The gain and noise
        are not clipped, so a view may exceed [-1, 1] a little.

    Example:
    >>> config = AudioAugmentConfig(sample_rate=8000, num_samples=4000)
    >>> v1, v2 = audio_views(tf.zeros([4, 8000]), tf.constant([0, 1]), config)
    >>> v1.shape
    TensorShape([4, 4000])
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    waveforms = _float_batch(waveforms)
    return audio_view(waveforms, seeds[0], config), audio_view(waveforms, seeds[1], config)


def audio_view(waveforms, seed, config: AudioAugmentConfig) -> tf.Tensor:
    """One view; `audio_views(x, seed)` is this with the seeds `stateless_split(seed, 2)`."""
    waveforms = _pad_to(_float_batch(waveforms), config.num_samples)
    shape = tf.shape(waveforms)
    return apply_view_params(waveforms, view_params(seed, shape[0], shape[1], config), config)


def view_params(seed, batch, length, config: AudioAugmentConfig) -> Dict[str, tf.Tensor]:
    """Every random draw of one view, per clip of a batch of clips `length` samples long.

    Returns:
        A dict: `offset` int32 `[batch]` (crop start), `shift` int32 `[batch]`
        (samples, > 0 delays), `gain_db` `[batch]`, `snr_db` `[batch]` (+inf
        where no noise is added), `noise` `[batch, num_samples]` standard
        normal (only when `noise_prob` > 0), `time_start` and `time_width`
        int32 `[batch, time_masks]`, `freq_low` and `freq_high`
        `[batch, freq_masks]` in Hz.
    """
    keys = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=9)
    n = config.num_samples
    batch, length = tf.cast(batch, tf.int32), tf.cast(length, tf.int32)

    def uniform(i, *shape, minval=0.0, maxval=1.0):
        return tf.random.stateless_uniform(tf.stack([batch, *shape]), keys[i], minval, maxval)

    def below(u, count):  # floor(u * count) for u in [0, 1): a uniform integer in [0, count)
        count = tf.cast(count, tf.float32)
        return tf.cast(tf.minimum(tf.floor(u * count), count - 1.0), tf.int32)

    spare = length - n
    offset = below(uniform(0), spare + 1) if config.crop else tf.fill([batch], spare // 2)
    s = config.shift_samples
    params = {"offset": offset, "shift": below(uniform(1), 2 * s + 1) - s}
    params["gain_db"] = uniform(2, minval=config.gain_db[0], maxval=config.gain_db[1])
    snr = uniform(3, minval=config.snr_db[0], maxval=config.snr_db[1])
    params["snr_db"] = tf.where(uniform(4) < config.noise_prob, snr, math.inf)
    if config.noise_prob > 0:  # 2 M normals for 128 clips of 1 s at 16 kHz: skipped when unused
        params["noise"] = tf.random.stateless_normal(tf.stack([batch, n]), keys[5])
    draws = uniform(6, config.time_masks, 2)
    width = below(draws[..., 0], int(config.max_time_mask * n) + 1)
    params["time_width"], params["time_start"] = width, below(draws[..., 1], n - width + 1)
    # Frequency masks: a width up to the fraction of the mel range, placed uniformly in it.
    lo, hi = hz_to_mel(config.min_freq), hz_to_mel(config.sample_rate / 2.0)
    draws = uniform(7, config.freq_masks, 2)
    width_mel = draws[..., 0] * config.freq_mask_fraction * (hi - lo)
    start_mel = lo + draws[..., 1] * (hi - lo - width_mel)
    params["freq_low"], params["freq_high"] = mel_to_hz(start_mel), mel_to_hz(start_mel + width_mel)
    return params


def apply_view_params(waveforms, params: Dict[str, tf.Tensor], config: AudioAugmentConfig) -> tf.Tensor:
    """The view of `view_params`: crop, shift, gain, noise, frequency masks, then time masks.

    The masks come last, so masked samples and bands are exact zeros, as
    SpecAugment masks the final input.
    """
    x, n = _float_batch(waveforms), config.num_samples
    if config.shift_samples > 0:
        x = crop_and_shift(x, params["offset"], params["shift"], n, config.shift_mode)
    else:
        x = crop_waveforms(x, params["offset"], n)
    x = apply_gain(x, params["gain_db"])
    if config.noise_prob > 0:
        x = add_noise(x, params["noise"], params["snr_db"])
    if config.freq_masks > 0 and config.freq_mask_fraction > 0:
        x = frequency_mask(x, params["freq_low"], params["freq_high"], config.sample_rate)
    if config.time_masks > 0 and config.max_time_mask > 0:
        x = time_mask(x, params["time_start"], params["time_width"])
    return x


def crop_waveforms(waveforms, offsets, num_samples: int) -> tf.Tensor:
    """Row `i` of the result is `waveforms[i, offsets[i] : offsets[i] + num_samples]`."""
    return _gather_rows(waveforms, tf.cast(offsets, tf.int32)[:, None] + tf.range(num_samples)[None])


def shift_waveforms(waveforms, shifts, mode: str = "zeros") -> tf.Tensor:
    """Delays row `i` by `shifts[i]` samples (negative: earlier); "zeros" fills with silence, "roll" wraps."""
    n = waveforms.shape[1] or tf.shape(waveforms)[1]
    return crop_and_shift(waveforms, tf.zeros_like(shifts), shifts, n, mode)


def crop_and_shift(waveforms, offsets, shifts, num_samples, mode: str = "zeros") -> tf.Tensor:
    """`shift_waveforms(crop_waveforms(waveforms, offsets, num_samples), shifts, mode)` in one gather."""
    source = tf.range(num_samples)[None] - tf.cast(shifts, tf.int32)[:, None]
    start = tf.cast(offsets, tf.int32)[:, None]
    if mode == "roll":
        return _gather_rows(waveforms, start + tf.math.floormod(source, num_samples))
    moved = _gather_rows(waveforms, start + tf.clip_by_value(source, 0, num_samples - 1))
    return tf.where((source >= 0) & (source < num_samples), moved, tf.zeros_like(moved))


def _gather_rows(waveforms, index):
    """`waveforms[i, index[i, j]]` as one flat gather: 8x faster on CPU than `tf.gather(..., batch_dims=1)`."""
    shape = tf.shape(waveforms, out_type=tf.int64)
    rows = tf.range(shape[0])[:, None] * shape[1]
    flat = tf.gather(tf.reshape(waveforms, [-1]), tf.reshape(rows + tf.cast(index, tf.int64), [-1]))
    return tf.reshape(flat, tf.shape(index))


def apply_gain(waveforms, gain_db) -> tf.Tensor:
    """Scales row `i` by `gain_db[i]` dB (amplitude 10^(dB/20))."""
    # Products, not divisions: grappler rewrites `x / c` in graphs, and eager and graph views would differ.
    return waveforms * tf.pow(10.0, tf.cast(gain_db, tf.float32) * 0.05)[:, None]


def add_noise(waveforms, noise, snr_db) -> tf.Tensor:
    """Adds `noise` (standard normal) scaled to `snr_db` below each clip's mean power; +inf adds none."""
    power = tf.reduce_mean(tf.square(waveforms), axis=1)
    std = tf.sqrt(power * tf.pow(10.0, tf.cast(snr_db, tf.float32) * -0.1))
    return waveforms + std[:, None] * noise


def frequency_mask(waveforms, low_hz, high_hz, sample_rate: int) -> tf.Tensor:
    """Zeroes the real-FFT bins of row `i` whose frequency lies in any band `[low_hz[i, k], high_hz[i, k]]`."""
    n = waveforms.shape[1] or tf.shape(waveforms)[1]
    spectrum = tf.signal.rfft(waveforms)
    hz = tf.cast(tf.range(tf.shape(spectrum)[1]), tf.float32)[None] * (float(sample_rate) / tf.cast(n, tf.float32))
    keep = _outside(hz, low_hz, high_hz, inclusive=True)
    return tf.signal.irfft(spectrum * tf.cast(keep, spectrum.dtype), fft_length=tf.reshape(n, [1]))


def time_mask(waveforms, starts, widths) -> tf.Tensor:
    """Zeroes samples `starts[i, k] .. starts[i, k] + widths[i, k] - 1` of row `i`, for every mask `k`."""
    t = tf.range(tf.shape(waveforms)[1])[None]
    starts = tf.cast(starts, tf.int32)
    keep = _outside(t, starts, starts + tf.cast(widths, tf.int32), inclusive=False)
    return tf.where(keep, waveforms, tf.zeros_like(waveforms))


def _outside(positions, lows, highs, inclusive):
    """Where `positions` `[1, n]` lie outside every band `lows[:, k]`..`highs[:, k]` `[batch, masks]`."""
    keep = tf.ones([tf.shape(lows)[0], tf.shape(positions)[1]], tf.bool)
    # A loop over the (few) masks: 4x faster than one `[batch, masks, n]` comparison.
    for k in range(lows.shape[1]):
        low, high = lows[:, k : k + 1], highs[:, k : k + 1]
        inside = (positions >= low) & ((positions <= high) if inclusive else (positions < high))
        keep = keep & ~inside
    return keep


def eval_waveforms(waveforms, num_samples: int) -> tf.Tensor:
    """The one evaluation preprocessing: the centre `num_samples`, or the clip zero-padded at the end.

    Longer clips lose `(time - num_samples) // 2` samples at the start;
    shorter ones are padded at the end, as `load_audio` pads clips, so a short
    recording served raw meets the model as it met it in training.

    Args:
        waveforms: float `[time]` or `[batch, time]` (int16 is scaled by 1/32768), any length.
        num_samples: the model's input length.

    Returns:
        float32 `[num_samples]` or `[batch, num_samples]`.
    """
    x = _as_float(waveforms)
    leading = x.shape[:-1]
    x = _pad_to(x, num_samples)
    start = (tf.shape(x)[-1] - num_samples) // 2
    return tf.ensure_shape(x[..., start : start + num_samples], [*leading, num_samples])


def _pad_to(waveforms, num_samples):
    """Zero-pads the last axis at the end up to `num_samples`."""
    short = tf.maximum(num_samples - tf.shape(waveforms)[-1], 0)
    paddings = tf.concat([tf.zeros([tf.rank(waveforms) - 1, 2], tf.int32), [[0, short]]], axis=0)
    return tf.pad(waveforms, paddings)


def _as_float(waveforms):
    waveforms = tf.convert_to_tensor(waveforms)
    if waveforms.dtype == tf.int16:
        return tf.cast(waveforms, tf.float32) / 32768.0
    return tf.cast(waveforms, tf.float32)


def _float_batch(waveforms):
    x = _as_float(waveforms)
    if x.shape.rank is not None and x.shape.rank != 2:
        raise ValueError(f"`waveforms` must be a batch [batch, time]. Received: waveforms.shape={x.shape}")
    return x
