"""`load_audio`: WAV folders and `.npz` arrays, bad files counted and named."""

import logging
import os

import numpy as np
import pytest
import tensorflow as tf

from byol_tf.audio.data import load_audio, read_wav, resample_audio

from conftest import SHARED_DATA

RATE = 8000


def write_wav(path, samples, rate=RATE):
    """A 16-bit PCM WAV from float samples `[time]` or `[time, channels]`."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    audio = np.asarray(samples, np.float32)
    audio = audio[:, None] if audio.ndim == 1 else audio
    tf.io.write_file(path, tf.audio.encode_wav(audio, rate))


def decoded(path):
    """TensorFlow's own reading of a 16-bit WAV, the reference: mono `[time]`."""
    audio, rate = tf.audio.decode_wav(tf.io.read_file(path))
    return audio.numpy().mean(axis=1), int(rate)


def tone(hz, seconds, rate=RATE):
    return 0.5 * np.sin(2 * np.pi * hz * np.arange(int(seconds * rate)) / rate)


@pytest.fixture
def folder(tmp_path):
    rng = np.random.default_rng(0)
    root = tmp_path / "clips"
    for cls, lengths in (("cat", (800, 1200)), ("dog", (1000,))):
        for i, n in enumerate(lengths):
            write_wav(str(root / cls / f"{i}.wav"), rng.uniform(-0.9, 0.9, n))
    write_wav(str(root / "dog" / "nested" / "deep.wav"), rng.uniform(-0.9, 0.9, (700, 2)))  # stereo
    good = (root / "cat" / "0.wav").read_bytes()
    (root / "cat" / "truncated.wav").write_bytes(good[:-101])
    (root / "dog" / "empty.wav").write_bytes(b"")
    (root / "dog" / "noise.wav").write_bytes(rng.bytes(300))
    (root / "dog" / "notes.txt").write_text("not audio")
    (root / "loose.wav").write_bytes(good)
    return root


def test_folder_classes_waveforms_and_skipped_files(folder):
    data = load_audio(str(folder), RATE)
    assert data.class_names == ("cat", "dog")
    np.testing.assert_array_equal(data.labels, [0, 0, 1, 1])
    assert data.waveforms.dtype == np.float32 and data.waveforms.shape == (4, 1200)  # the longest clip
    np.testing.assert_array_equal(data.lengths, [800, 1200, 1000, 700])
    for row, name, n in zip(data.waveforms, ("cat/0", "cat/1", "dog/0", "dog/nested/deep"), data.lengths):
        reference, _ = decoded(str(folder / f"{name}.wav"))
        np.testing.assert_allclose(row[:n], reference, atol=1e-7)
        assert not row[n:].any()
    reasons = {os.path.relpath(f, folder): r for f, r in data.skipped}
    assert set(reasons) == {"cat/truncated.wav", "dog/empty.wav", "dog/noise.wav", "dog/notes.txt", "loose.wav"}
    assert reasons["cat/truncated.wav"].startswith("truncated")
    assert reasons["dog/empty.wav"] == "empty file (0 bytes)"
    assert reasons["dog/noise.wav"] == "not a RIFF/WAVE file"
    assert reasons["dog/notes.txt"] == "not a .wav file"
    assert "class subfolder" in reasons["loose.wav"]


def test_skipped_files_are_logged_by_name(folder, caplog):
    with caplog.at_level(logging.WARNING):
        load_audio(str(folder), RATE)
    lines = [record.getMessage() for record in caplog.records]
    assert any(line.endswith("empty.wav: empty file (0 bytes)") for line in lines)
    assert any(line.startswith("Skipped 5 of the files") for line in lines)


def test_unlabelled_folder_and_clip_samples(tmp_path):
    for i, n in enumerate((500, 1500)):
        write_wav(str(tmp_path / f"{i}.wav"), np.full(n, 0.25))
    data = load_audio(str(tmp_path), RATE, clip_samples=1000)
    assert data.labels is None and data.class_names is None and data.skipped == ()
    assert data.waveforms.shape == (2, 1000)
    np.testing.assert_array_equal(data.lengths, [500, 1000])
    np.testing.assert_allclose(data.waveforms[0], np.r_[np.full(500, 0.25), np.zeros(500)], atol=1e-4)


def test_other_sample_rates_are_resampled_or_refused(tmp_path):
    # 400 Hz is periodic in 0.5 s at both rates, where spectral resampling is exact.
    write_wav(str(tmp_path / "a.wav"), tone(400, 0.5, rate=16000), rate=16000)
    data = load_audio(str(tmp_path), RATE)
    np.testing.assert_allclose(data.waveforms[0], tone(400, 0.5), atol=1e-4)  # int16 rounding
    with pytest.raises(ValueError, match=r"a\.wav is sampled at 16000 Hz.*Received: rate=16000"):
        load_audio(str(tmp_path), RATE, resample=False)


def test_resampling_removes_what_the_new_rate_cannot_hold():
    x = tone(400, 1.0, rate=16000) + tone(6000, 1.0, rate=16000)  # 6 kHz is above 8 kHz's Nyquist
    np.testing.assert_allclose(resample_audio(x, 16000, RATE), tone(400, 1.0), atol=1e-5)
    np.testing.assert_allclose(resample_audio(tone(400, 1.0), RATE, 16000), tone(400, 1.0, rate=16000), atol=1e-5)


def test_read_wav_formats_match_known_values(tmp_path):
    def raw_wav(tag, bits, channels, payload):
        fmt = tag.to_bytes(2, "little") + channels.to_bytes(2, "little") + RATE.to_bytes(4, "little")
        fmt += (RATE * channels * bits // 8).to_bytes(4, "little") + (channels * bits // 8).to_bytes(2, "little")
        fmt += bits.to_bytes(2, "little")
        body = b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt + b"data" + len(payload).to_bytes(4, "little")
        return b"RIFF" + (len(body) + len(payload)).to_bytes(4, "little") + body + payload

    cases = {
        "u8": (1, 8, np.array([0, 128, 255], np.uint8).tobytes(), [-1.0, 0.0, 127 / 128]),
        "s24": (1, 24, b"\x00\x00\x80" + b"\x00\x00\x40" + b"\xff\xff\xff", [-1.0, 0.5, -(2.0**-23)]),
        "f32": (3, 32, np.array([0.25, -0.5, 1.0], "<f4").tobytes(), [0.25, -0.5, 1.0]),
    }
    for name, (tag, bits, payload, expected) in cases.items():
        path = tmp_path / f"{name}.wav"
        path.write_bytes(raw_wav(tag, bits, 1, payload))
        samples, rate = read_wav(str(path))
        assert rate == RATE
        np.testing.assert_allclose(samples, expected, atol=1e-7, err_msg=name)
    (tmp_path / "alaw.wav").write_bytes(raw_wav(6, 8, 1, b"\x00\x01"))
    with pytest.raises(ValueError, match="unsupported format: tag 6"):
        read_wav(str(tmp_path / "alaw.wav"))


def test_empty_or_unreadable_folders_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="has no files"):
        load_audio(str(tmp_path), RATE)
    (tmp_path / "x.wav").write_bytes(b"")
    with pytest.raises(ValueError, match=r"No readable WAV file .*1 skipped.*x\.wav: empty file"):
        load_audio(str(tmp_path), RATE)
    with pytest.raises(ValueError, match="Received: path="):
        load_audio(str(tmp_path / "missing"), RATE)


def test_npz_with_fsdd_keys(tmp_path):
    rng = np.random.default_rng(0)
    audio = rng.integers(-32768, 32767, (6, 900)).astype(np.int16)
    path = str(tmp_path / "fsdd_like.npz")
    split = np.array(["train", "test", "train", "test", "train", "train"])
    lengths = np.array([900, 800, 700, 600, 500, 400])
    np.savez(path, audio=audio, digit=np.array([0, 1, 2, 0, 1, 2]), split=split, lengths=lengths, sample_rate=RATE)
    data = load_audio(path, RATE, split="test")
    np.testing.assert_array_equal(data.waveforms, audio[[1, 3]] / 32768.0)
    np.testing.assert_array_equal(data.labels, [1, 0])
    assert data.class_names == ("0", "1", "2") and data.labels.dtype == np.int64
    np.testing.assert_array_equal(data.lengths, [800, 600])
    with pytest.raises(ValueError, match=r"no rows of split 'val'.*Received: split='val'"):
        load_audio(path, RATE, split="val")
    half = load_audio(path, 4000, clip_samples=500)
    assert half.waveforms.shape == (6, 500) and half.sample_rate == 4000
    np.testing.assert_array_equal(half.lengths, [450, 400, 350, 300, 250, 200])


def test_npz_with_x_y_keys_and_bad_rows(tmp_path):
    x = np.random.default_rng(1).uniform(-1, 1, (4, 300)).astype(np.float32)
    x[2, 5] = np.nan
    path = str(tmp_path / "xy.npz")
    np.savez(path, x=x[..., None], y=np.array(["yes", "no", "no", "yes"]))
    data = load_audio(path, RATE, clip_samples=400)
    assert data.class_names == ("no", "yes")
    np.testing.assert_array_equal(data.labels, [1, 0, 1])
    np.testing.assert_array_equal(data.waveforms, np.pad(x[[0, 1, 3]], [(0, 0), (0, 100)]))
    assert data.skipped == ((f"{path}[2]", "non-finite samples"),)
    np.savez(str(tmp_path / "bad.npz"), sound=x)
    with pytest.raises(ValueError, match=r"Received: keys=\['sound'\]"):
        load_audio(str(tmp_path / "bad.npz"), RATE)


FSDD = os.path.join(SHARED_DATA, "fsdd", "fsdd.npz")


@pytest.mark.skipif(not os.path.exists(FSDD), reason="shared/data/fsdd is not in this checkout")
def test_fsdd_test_split():
    data = load_audio(FSDD, RATE, split="test")
    assert data.waveforms.shape == (300, 8000) and data.class_names == tuple(str(d) for d in range(10))
    np.testing.assert_array_equal(np.bincount(data.labels), np.full(10, 30))
    assert np.abs(data.waveforms).max() <= 1.0 and data.lengths.max() <= 8000
    padding = np.arange(8000)[None] >= data.lengths[:, None]
    assert not data.waveforms[padding].any() and np.abs(data.waveforms[~padding]).max() > 0.1
