"""Audio views and encoder, each op checked against NumPy or a known answer."""

import dataclasses
import json
import math

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf.audio import augment
from byol_tf.audio.augment import audio_views, eval_waveforms, view_params
from byol_tf.audio.config import AudioAugmentConfig
from byol_tf.audio.encoder import LogOffset, build_audio_encoder
from byol_tf.heads import MLPHead
from byol_tf.model import BYOL, _clone

from conftest import assert_config_round_trip

RATE = 8000
N = 2000  # samples per view: 0.25 s at 8 kHz keeps every test fast
# Every op off: each test turns on the one it checks.
PLAIN = AudioAugmentConfig(
    sample_rate=RATE,
    num_samples=N,
    crop=False,
    max_shift=0,
    gain_db=(0.0, 0.0),
    noise_prob=0.0,
    time_masks=0,
    freq_masks=0,
)


def clips(batch=8, length=2600, seed=0):
    return np.random.default_rng(seed).uniform(-0.5, 0.5, (batch, length)).astype("float32")


def tone(hz, n=N, batch=1, rate=RATE):
    return np.tile(0.5 * np.sin(2 * np.pi * hz * np.arange(n) / rate), (batch, 1)).astype("float32")


def one_view(x, config, seed=(3, 4)):
    """The first view, with the draws it was made from."""
    seeds = tf.random.experimental.stateless_split(tf.constant(seed, tf.int64), num=2)
    params = view_params(seeds[0], x.shape[0], max(x.shape[1], config.num_samples), config)
    view = audio_views(x, tf.constant(seed), config)[0].numpy()
    return view, {k: v.numpy() for k, v in params.items()}


# --- config ---


def test_config_defaults_and_json_round_trip():
    config = AudioAugmentConfig()
    assert (config.sample_rate, config.num_samples, config.shift_samples) == (16000, 16000, 1600)
    assert math.isclose(config.freq_mask_fraction, 0.15)
    assert AudioAugmentConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    counted = AudioAugmentConfig(max_shift=400, max_freq_mask=13, num_mel_bins=64)
    assert counted.shift_samples == 400 and math.isclose(counted.freq_mask_fraction, 13 / 65)


@pytest.mark.parametrize(
    "field, value",
    [
        ("gain_db", (3, 1)),
        ("snr_db", (10.0,)),
        ("noise_prob", 1.5),
        ("max_shift", 2.5),
        ("max_shift", 16000),
        ("max_freq_mask", 70),
        ("max_time_mask", -0.1),
        ("time_masks", 1.5),
        ("shift_mode", "wrap"),
        ("crop", "yes"),
        ("num_samples", 1),
        ("min_freq", 9000.0),
    ],
)
def test_config_errors_name_the_value(field, value):
    with pytest.raises(ValueError, match=f"Received: {field}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        AudioAugmentConfig(**{field: value})


# --- the ops, one at a time ---


def test_crops_are_windows_of_the_source():
    x = clips(batch=16, length=3000)
    view, params = one_view(x, dataclasses.replace(PLAIN, crop=True))
    offsets = params["offset"]
    assert offsets.min() >= 0 and offsets.max() <= 1000 and len(set(offsets)) > 8
    for row, source, offset in zip(view, x, offsets):
        np.testing.assert_array_equal(row, source[offset : offset + N])


def test_centre_crop_without_crop_and_short_clips_are_padded():
    x = clips(batch=2, length=2501)
    np.testing.assert_array_equal(audio_views(x, [0, 0], PLAIN)[0], x[:, 250:2250])
    short = clips(batch=2, length=1500)
    np.testing.assert_array_equal(audio_views(short, [0, 0], PLAIN)[1], np.pad(short, [(0, 0), (0, 500)]))


@pytest.mark.parametrize("mode", ["zeros", "roll"])
def test_time_shift_matches_numpy(mode):
    x = clips(batch=16, length=N)
    view, params = one_view(x, dataclasses.replace(PLAIN, max_shift=0.2, shift_mode=mode))
    shifts = params["shift"]
    assert np.abs(shifts).max() <= 400 and (shifts > 0).any() and (shifts < 0).any()
    for row, source, s in zip(view, x, shifts):
        if mode == "roll":
            expected = np.roll(source, s)
        else:
            expected = np.zeros_like(source)
            expected[max(s, 0) : N + min(s, 0)] = source[max(-s, 0) : N - max(s, 0)]
        np.testing.assert_array_equal(row, expected)


def test_gain_scales_rms_by_its_decibels():
    x = clips(batch=32, length=N)
    view, params = one_view(x, dataclasses.replace(PLAIN, gain_db=(-12.0, 6.0)))
    gain = params["gain_db"]
    assert gain.min() >= -12.0 and gain.max() <= 6.0 and gain.std() > 2.0
    rms = lambda a: np.sqrt(np.mean(np.square(a.astype(np.float64)), axis=1))  # noqa: E731
    np.testing.assert_allclose(rms(view) / rms(x), 10.0 ** (gain / 20.0), rtol=1e-5)


def test_noise_has_the_drawn_snr():
    x = tone(440, n=16000, batch=64) * np.linspace(0.1, 1.0, 64)[:, None].astype("float32")
    config = dataclasses.replace(PLAIN, num_samples=16000, noise_prob=0.5, snr_db=(0.0, 30.0))
    view, params = one_view(x, config)
    snr = params["snr_db"]
    noisy = np.isfinite(snr)
    assert 16 <= noisy.sum() <= 48  # about half
    np.testing.assert_array_equal(view[~noisy], x[~noisy])
    noise = view[noisy].astype(np.float64) - x[noisy]
    measured = 10 * np.log10(np.mean(np.square(x[noisy].astype(np.float64)), 1) / np.mean(np.square(noise), 1))
    np.testing.assert_allclose(measured, snr[noisy], atol=0.3)  # 16,000 samples: the power is within ~1%


def test_frequency_mask_removes_a_tone_inside_the_band_only():
    # Tones on FFT bins of the 2,000-sample clip (4 Hz apart), so each is one bin.
    inside, outside = tone(1000, batch=2), tone(2000, batch=2)
    low, high = tf.constant([[900.0], [800.0]]), tf.constant([[1100.0], [1500.0]])
    energy = lambda a: np.sum(np.square(a.astype(np.float64)), axis=1)  # noqa: E731
    masked_in = augment.frequency_mask(inside, low, high, RATE).numpy()
    masked_out = augment.frequency_mask(outside, low, high, RATE).numpy()
    assert np.all(energy(masked_in) < 1e-8 * energy(inside))
    np.testing.assert_allclose(masked_out, outside, atol=1e-5)


def test_drawn_frequency_masks_are_mel_bands_and_mask_the_view():
    config = dataclasses.replace(PLAIN, freq_masks=2, max_freq_mask=10, num_mel_bins=40)
    x = tone(1000, batch=64) + tone(252, batch=64)  # FFT bins 250 and 63
    view, params = one_view(x, config)
    low, high = params["freq_low"], params["freq_high"]
    mel = lambda hz: 1127.0 * np.log1p(hz / 700.0)  # noqa: E731
    span = mel(RATE / 2) - mel(config.min_freq)
    assert low.min() >= config.min_freq - 1e-3 and high.max() <= RATE / 2 + 1e-2
    assert np.all(mel(high) - mel(low) <= 10 / 41 * span + 1e-3)
    # NumPy: zero the rfft bins inside either band.
    hz = np.fft.rfftfreq(N, 1 / RATE)
    keep = ~((hz >= low[..., None]) & (hz <= high[..., None])).any(axis=1)
    expected = np.fft.irfft(np.fft.rfft(x.astype(np.float64)) * keep, N)
    np.testing.assert_allclose(view, expected, atol=1e-5)
    assert (~keep[:, 250]).any() and (~keep[:, 63]).any()  # some draws do hit the tones


def test_time_masks_zero_exactly_the_drawn_segments():
    x = clips(batch=16, length=N) + 0.6  # no sample is zero by chance
    view, params = one_view(x, dataclasses.replace(PLAIN, time_masks=3, max_time_mask=0.2))
    starts, widths = params["time_start"], params["time_width"]
    assert widths.max() <= 400 and widths.max() > 100 and np.all(starts + widths <= N)
    t = np.arange(N)
    masked = ((t >= starts[..., None]) & (t < (starts + widths)[..., None])).any(axis=1)
    np.testing.assert_array_equal(view == 0, masked)
    np.testing.assert_array_equal(view[~masked], x[~masked])


def test_whole_view_matches_numpy_composition():
    config = AudioAugmentConfig(sample_rate=RATE, num_samples=N, noise_prob=1.0, max_freq_mask=0.3)
    x = clips(batch=8, length=2400)
    view, p = one_view(x, config)
    ref = np.stack([row[o : o + N] for row, o in zip(x.astype(np.float64), p["offset"])])
    ref = np.stack(
        [
            np.concatenate([np.zeros(max(s, 0)), r[max(-s, 0) : N - max(s, 0)], np.zeros(max(-s, 0))])
            for r, s in zip(ref, p["shift"])
        ]
    )
    ref *= 10 ** (p["gain_db"] / 20)[:, None]
    ref += np.sqrt(np.mean(ref**2, 1) / 10 ** (p["snr_db"] / 10))[:, None] * p["noise"]
    hz = np.fft.rfftfreq(N, 1 / RATE)
    keep = ~((hz >= p["freq_low"][..., None]) & (hz <= p["freq_high"][..., None])).any(axis=1)
    ref = np.fft.irfft(np.fft.rfft(ref) * keep, N)
    t = np.arange(N)
    ref[((t >= p["time_start"][..., None]) & (t < (p["time_start"] + p["time_width"])[..., None])).any(1)] = 0
    np.testing.assert_allclose(view, ref, atol=2e-5)


# --- seeds and graphs ---


def test_same_seed_same_views_in_eager_function_and_tf_data():
    config = AudioAugmentConfig(sample_rate=RATE, num_samples=N)
    x = clips(batch=8, length=2500)
    eager = [v.numpy() for v in audio_views(x, tf.constant([5, 6], tf.int32), config)]
    again = [v.numpy() for v in audio_views(x, tf.constant([5, 6], tf.int64), config)]
    graph = tf.function(lambda w, s: audio_views(w, s, config))(x, tf.constant([5, 6]))
    # Unknown batch size and length inside `Dataset.map`.
    ds = tf.data.Dataset.from_tensors(x).map(lambda w: audio_views(w, tf.constant([5, 6]), config))
    mapped = next(iter(ds))
    for v in (again, graph, mapped):
        for a, b in zip(eager, v):
            np.testing.assert_array_equal(a, np.asarray(b))
    other = audio_views(x, tf.constant([5, 7]), config)
    assert not np.array_equal(eager[0], other[0].numpy())
    assert not np.array_equal(eager[0], eager[1])  # the two views are drawn independently


def test_views_in_a_dataset_map_with_unknown_batch():
    config = AudioAugmentConfig(sample_rate=RATE, num_samples=N)
    ds = tf.data.Dataset.from_tensor_slices(clips(batch=10, length=2200)).batch(4)
    ds = ds.enumerate().map(lambda step, w: audio_views(w, tf.stack([tf.constant(0, tf.int64), step]), config))
    shapes = [tuple(v1.shape) for v1, _ in ds]
    assert shapes == [(4, N), (4, N), (2, N)]
    assert ds.element_spec[0].shape.as_list() == [None, N]


def test_views_reject_a_single_clip():
    with pytest.raises(ValueError, match=r"Received: waveforms.shape=\(2000,\)"):
        audio_views(np.zeros(N, "float32"), [0, 0], PLAIN)


# --- evaluation preprocessing ---


@pytest.mark.parametrize("length", [2000, 2601, 2600, 1234])
def test_eval_waveforms_centre_crops_or_pads_as_numpy(length):
    x = clips(batch=3, length=length)
    start = (length - N) // 2
    expected = x[:, start : start + N] if length >= N else np.pad(x, [(0, 0), (0, N - length)])
    np.testing.assert_array_equal(eval_waveforms(x, N), expected)
    np.testing.assert_array_equal(eval_waveforms(x[0], N), expected[0])
    serve = tf.function(lambda w: eval_waveforms(w, N), input_signature=[tf.TensorSpec([None, None], tf.float32)])
    np.testing.assert_array_equal(serve(x), expected)
    int16 = (x * 32767).astype(np.int16)  # int16 is scaled as tf.audio.decode_wav scales it
    np.testing.assert_array_equal(eval_waveforms(int16, N), eval_waveforms(int16.astype("float32") / 32768, N))


# --- encoder ---


def small_encoder(**kwargs):
    return build_audio_encoder(RATE, N, num_mel_bins=32, filters=(8, 16), **kwargs)


def test_encoder_shapes_config_clone_and_save(tmp_path):
    encoder = small_encoder()
    x = tf.constant(clips(batch=4, length=N))
    out = encoder(x, training=False).numpy()
    assert out.shape == (4, 16) and np.isfinite(out).all()
    rebuilt = keras.Model.from_config(encoder.get_config())
    assert rebuilt.get_config() == encoder.get_config()
    clone = _clone(encoder, None)
    np.testing.assert_allclose(clone(x, training=False), out, atol=1e-6)
    path = str(tmp_path / "encoder.keras")
    encoder.save(path)
    np.testing.assert_allclose(keras.models.load_model(path)(x, training=False), out, atol=1e-6)


def test_encoder_front_end_is_log_mel_of_keras():
    encoder = small_encoder()
    x = tone(1000, batch=2)
    mel = keras.layers.MelSpectrogram(
        fft_length=256, sequence_length=200, sequence_stride=80, sampling_rate=RATE, num_mel_bins=32, power_to_db=False
    )(x)
    front = keras.Model(encoder.input, encoder.get_layer("log").output)
    np.testing.assert_allclose(front(x), np.log(mel.numpy() + 1e-6), atol=1e-4)
    assert_config_round_trip(LogOffset(1e-3))


@pytest.mark.parametrize(
    "arg, value", [("num_samples", 0), ("filters", (8, 0)), ("stem_stride", 0), ("window_ms", 0.1)]
)
def test_encoder_errors_name_the_value(arg, value):
    with pytest.raises(ValueError, match=f"{arg}={value!r}".replace("(", r"\(").replace(")", r"\)")):
        build_audio_encoder(**{"sample_rate": RATE, "num_samples": N, arg: value})


def test_byol_fits_one_step_on_audio_views():
    config = AudioAugmentConfig(sample_rate=RATE, num_samples=N, num_mel_bins=32)
    ds = tf.data.Dataset.from_tensors(clips(batch=8, length=2400)).repeat()
    ds = ds.enumerate().map(lambda step, w: audio_views(w, tf.stack([tf.constant(0, tf.int64), step]), config))
    model = BYOL(small_encoder(), MLPHead(32, 16, name="projector"), MLPHead(32, 16, name="predictor"))
    model.compile(optimizer=keras.optimizers.SGD(0.05))
    before = [w.numpy().copy() for w in model.encoder.trainable_weights]
    history = model.fit(ds, steps_per_epoch=1, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])
    assert any(not np.allclose(a, w.numpy()) for a, w in zip(before, model.encoder.trainable_weights))
    assert model(eval_waveforms(clips(batch=2, length=3000), N)).shape == (2, 16)
