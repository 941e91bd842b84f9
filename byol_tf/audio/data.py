"""Audio clips from WAV folders or `.npz` arrays, as one in-memory array.

Folders follow `keras.utils.audio_dataset_from_directory`: first-level
subfolders are classes (names sorted) when there are any, else the files are
unlabelled. Files that cannot be used are skipped, logged and returned with
the reason; nothing is dropped silently. Only NumPy and the standard library
are used: WAVs are parsed here (PCM 8/16/24/32-bit and float, any channel
count), and other sample rates are resampled in the frequency domain.
"""

import dataclasses
import os
from typing import Optional, Sequence, Tuple

import numpy as np
from absl import logging

# Log this many skipped files one by one, then only their count.
LOG_FIRST_SKIPPED = 20
# Keys of `.npz` files, tried in order: FSDD's (`shared/data/fsdd.py`) first.
NPZ_WAVEFORM_KEYS = ("audio", "waveforms", "x")
NPZ_LABEL_KEYS = ("digit", "labels", "label", "y")


class WavError(ValueError):
    """A file that is not a readable WAV; the message is the reason."""


@dataclasses.dataclass(frozen=True, eq=False)
class AudioData:
    """Clips loaded by `load_audio`.

    Args:
        waveforms: float32 `[clips, clip_samples]` in [-1, 1], zero-padded or
            trimmed at the end.
        labels: int64 `[clips]` indices into `class_names`, or None.
        class_names: one name per class, or None.
        sample_rate: samples per second of `waveforms`.
        lengths: int64 `[clips]`, the real samples of each row (at most `clip_samples`).
        skipped: `(file, reason)` for every file (or `.npz` row) left out.
    """

    waveforms: np.ndarray
    labels: Optional[np.ndarray]
    class_names: Optional[Tuple[str, ...]]
    sample_rate: int
    lengths: np.ndarray
    skipped: Tuple[Tuple[str, str], ...] = ()

    @property
    def num_examples(self) -> int:
        return len(self.waveforms)


def load_audio(
    path: str,
    sample_rate: int,
    clip_samples: Optional[int] = None,
    split: Optional[str] = None,
    resample: bool = True,
) -> AudioData:
    """Loads a folder of WAV files or a `.npz` file into one array of clips.

    Args:
        path: a folder (`<path>/<class>/**/*.wav`, or WAVs directly in it for
            unlabelled data) or a `.npz` file with the clips under `audio`,
            `waveforms` or `x` (`[clips, time]`, int16 or float), labels
            under `digit`, `labels`, `label` or `y` (ints or strings), and
            optionally `sample_rate`, `lengths`, `class_names` and `split`.
        sample_rate: the rate to return; other rates are resampled.
        clip_samples: length of every row; default the longest clip (WAVs)
            or the array's length (`.npz`).
        split: for a `.npz` with a `split` key (FSDD's), keep the rows of this split.
        resample: False raises a ValueError on a file of another rate instead.

    Returns:
        An `AudioData`.

    Example:
    >>> data = load_audio("fsdd/fsdd.npz", 8000, split="test")  # doctest: +SKIP
    >>> data.waveforms.shape, data.class_names[:2]  # doctest: +SKIP
    ((300, 8000), ('0', '1'))
    """
    if isinstance(sample_rate, bool) or not isinstance(sample_rate, int) or sample_rate < 1:
        raise ValueError(f"`sample_rate` must be a positive int. Received: sample_rate={sample_rate!r}")
    if clip_samples is not None and (not isinstance(clip_samples, int) or clip_samples < 1):
        raise ValueError(f"`clip_samples` must be None or a positive int. Received: clip_samples={clip_samples!r}")
    if os.path.isdir(path):
        if split is not None:
            raise ValueError(
                f"`split` applies to `.npz` files only; pass the split's folder. Received: split={split!r}"
            )
        return _load_folder(path, sample_rate, clip_samples, resample)
    if os.path.isfile(path) and path.lower().endswith(".npz"):
        return _load_npz(path, sample_rate, clip_samples, split, resample)
    raise ValueError(f"`path` must be a folder of WAV files or a `.npz` file. Received: path={path!r}")


def _load_folder(folder, sample_rate, clip_samples, resample):
    files, labels, class_names, skipped = _list_folder(folder)
    if not files and not skipped:
        raise ValueError(f"The folder has no files. Received: path={folder!r}")
    clips, kept = [], []
    for file, label in zip(files, labels):
        try:
            samples, rate = read_wav(file)
        except (WavError, OSError) as error:
            skipped.append((file, str(error)))
            continue
        if rate != sample_rate and not resample:
            raise ValueError(
                f"{file} is sampled at {rate} Hz, not {sample_rate} Hz; pass resample=True. Received: rate={rate}"
            )
        clips.append(resample_audio(samples, rate, sample_rate) if rate != sample_rate else samples)
        kept.append(label)
    _log_skipped(folder, skipped)
    if not clips:
        raise ValueError(
            f"No readable WAV file in {folder} ({len(skipped)} skipped, first: {skipped[0][0]}: {skipped[0][1]}). "
            f"Received: path={folder!r}"
        )
    width = clip_samples or max(len(c) for c in clips)
    waveforms = np.zeros((len(clips), width), np.float32)
    for row, clip in zip(waveforms, clips):
        row[: min(len(clip), width)] = clip[:width]
    return AudioData(
        waveforms=waveforms,
        labels=np.asarray(kept, np.int64) if class_names else None,
        class_names=tuple(class_names) if class_names else None,
        sample_rate=sample_rate,
        lengths=np.minimum([len(c) for c in clips], width).astype(np.int64),
        skipped=tuple(skipped),
    )


def _list_folder(folder):
    """`(files, labels, class_names, skipped)`; hidden files and folders are ignored, as image folders do."""
    names = sorted(n for n in os.listdir(folder) if not n.startswith("."))
    class_names = [n for n in names if os.path.isdir(os.path.join(folder, n))]
    roots = [(os.path.join(folder, c), i) for i, c in enumerate(class_names)] if class_names else [(folder, -1)]
    files, labels, skipped = [], [], []
    for root, label in roots:
        for directory, subdirs, found in os.walk(root, followlinks=True):
            subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
            for name in sorted(n for n in found if not n.startswith(".")):
                file = os.path.join(directory, name)
                if not name.lower().endswith(".wav"):
                    skipped.append((file, "not a .wav file"))
                else:
                    files.append(file)
                    labels.append(label)
    if class_names:
        for name in names:
            if name not in class_names:
                skipped.append((os.path.join(folder, name), "not inside a class subfolder, so it has no label"))
    return files, labels, class_names, skipped


def _log_skipped(source, skipped):
    for file, reason in skipped[:LOG_FIRST_SKIPPED]:
        logging.warning("Skipped %s: %s", file, reason)
    if skipped:
        logging.warning("Skipped %d of the files of %s (see AudioData.skipped).", len(skipped), source)


def read_wav(path: str) -> Tuple[np.ndarray, int]:
    """A WAV file as float32 mono samples (channels averaged) and its sample rate.

    PCM is scaled as `tf.audio.decode_wav` scales 16-bit: by 1 / 2^(bits - 1)
    (8-bit PCM is unsigned, centred on 128); float WAVs are read as they are.

    Raises:
        WavError: the file is empty, not RIFF/WAVE, truncated or of an unknown format.
    """
    with open(path, "rb") as f:
        data = f.read()
    if not data:
        raise WavError("empty file (0 bytes)")
    if len(data) < 12 or data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        raise WavError("not a RIFF/WAVE file")
    chunks, pos = {}, 12
    while pos + 8 <= len(data):
        chunk_id, size = data[pos : pos + 4], int.from_bytes(data[pos + 4 : pos + 8], "little")
        body = data[pos + 8 : pos + 8 + size]
        if len(body) < size:
            raise WavError(f"truncated: chunk {chunk_id!r} declares {size} bytes, the file holds {len(body)}")
        chunks.setdefault(chunk_id, body)
        pos += 8 + size + (size & 1)  # chunks are padded to an even length
    if b"fmt " not in chunks or b"data" not in chunks:
        raise WavError(f"no {'fmt' if b'fmt ' not in chunks else 'data'} chunk")
    return _decode_pcm(chunks[b"fmt "], chunks[b"data"])


def _decode_pcm(fmt, body):
    if len(fmt) < 16:
        raise WavError(f"fmt chunk of {len(fmt)} bytes, fewer than 16")
    tag, channels, rate = int.from_bytes(fmt[0:2], "little"), int.from_bytes(fmt[2:4], "little"), fmt[4:8]
    bits = int.from_bytes(fmt[14:16], "little")
    if tag == 0xFFFE and len(fmt) >= 26:  # WAVE_FORMAT_EXTENSIBLE: the real tag opens the sub-format GUID
        tag = int.from_bytes(fmt[24:26], "little")
    width = bits // 8
    if channels < 1 or bits % 8 or (tag, bits) not in {(1, 8), (1, 16), (1, 24), (1, 32), (3, 32), (3, 64)}:
        raise WavError(f"unsupported format: tag {tag}, {bits} bits, {channels} channels")
    frame = width * channels
    if len(body) % frame:
        raise WavError(f"truncated: {len(body)} data bytes is not a whole number of {frame}-byte frames")
    if not body:
        raise WavError("no samples")
    raw = np.frombuffer(body, np.uint8)
    if tag == 3:
        x = np.frombuffer(body, f"<f{width}").astype(np.float32)
    elif bits == 8:
        x = (raw.astype(np.float32) - 128.0) / 128.0
    elif bits == 24:  # three little-endian bytes to the top of an int32
        x = (raw.reshape(-1, 3).astype(np.int32) << np.array([8, 16, 24])).sum(axis=1, dtype=np.int32)
        x = x.astype(np.float32) / 2.0**31
    else:
        x = np.frombuffer(body, f"<i{width}").astype(np.float32) / 2.0 ** (bits - 1)
    if not np.isfinite(x).all():
        raise WavError("non-finite samples")
    return x.reshape(-1, channels).mean(axis=1, dtype=np.float32), int.from_bytes(rate, "little")


def resample_audio(waveforms: np.ndarray, rate: int, new_rate: int) -> np.ndarray:
    """Band-limited resampling of the last axis by zero-padding or truncating its spectrum.

    Exact for signals periodic in the clip; content above the new Nyquist
    frequency is removed, so downsampling does not alias.
    """
    x = np.asarray(waveforms, np.float32)
    n = x.shape[-1]
    new_n = int(round(n * new_rate / rate))
    spectrum = np.fft.rfft(x, axis=-1)
    bins = min(spectrum.shape[-1], new_n // 2 + 1)
    out = np.zeros((*x.shape[:-1], new_n // 2 + 1), spectrum.dtype)
    out[..., :bins] = spectrum[..., :bins]
    return (np.fft.irfft(out, new_n, axis=-1) * (new_n / n)).astype(np.float32)


def _load_npz(path, sample_rate, clip_samples, split, resample):
    with np.load(path, allow_pickle=False) as npz:
        arrays = {key: npz[key] for key in npz.files}
    waveform_key = next((k for k in NPZ_WAVEFORM_KEYS if k in arrays), None)
    if waveform_key is None:
        raise ValueError(f"{path} has none of the keys {NPZ_WAVEFORM_KEYS}. Received: keys={sorted(arrays)}")
    rows = np.ones(len(arrays[waveform_key]), bool)
    if split is not None:
        if "split" not in arrays:
            raise ValueError(f"{path} has no `split` key to select from. Received: split={split!r}")
        rows = arrays["split"].astype(str) == split
        if not rows.any():
            found = sorted(set(arrays["split"].astype(str)))
            raise ValueError(f"{path} has no rows of split {split!r}; it has {found}. Received: split={split!r}")
    x = _npz_float(arrays[waveform_key][rows], path, waveform_key)
    n = x.shape[1]
    lengths = arrays["lengths"][rows].astype(np.int64) if "lengths" in arrays else np.full(len(x), n, np.int64)
    rate = int(arrays["sample_rate"]) if "sample_rate" in arrays else sample_rate
    if rate != sample_rate:
        if not resample:
            raise ValueError(
                f"{path} is sampled at {rate} Hz, not {sample_rate} Hz; pass resample=True. Received: rate={rate}"
            )
        x = resample_audio(x, rate, sample_rate)
        lengths = np.round(lengths * sample_rate / rate).astype(np.int64)
    labels, class_names = _npz_labels(arrays, rows)
    finite = np.isfinite(x).all(axis=1)
    skipped = tuple((f"{path}[{i}]", "non-finite samples") for i in np.flatnonzero(rows)[~finite])
    _log_skipped(path, list(skipped))
    width = clip_samples or x.shape[1]
    x = x[finite][:, :width]
    x = np.pad(x, [(0, 0), (0, width - x.shape[1])])
    return AudioData(
        waveforms=np.ascontiguousarray(x, np.float32),
        labels=None if labels is None else labels[finite],
        class_names=class_names,
        sample_rate=sample_rate,
        lengths=np.minimum(lengths[finite], width),
        skipped=skipped,
    )


def _npz_float(x, path, key):
    if x.ndim == 3 and x.shape[2] == 1:
        x = x[..., 0]
    if x.ndim != 2:
        raise ValueError(f"{path}: `{key}` must be [clips, time] or [clips, time, 1]. Received: shape={x.shape}")
    if x.dtype == np.uint8:
        return (x.astype(np.float32) - 128.0) / 128.0
    if np.issubdtype(x.dtype, np.signedinteger):
        return x.astype(np.float32) / float(-np.iinfo(x.dtype).min)
    if np.issubdtype(x.dtype, np.floating):
        return x.astype(np.float32)
    raise ValueError(f"{path}: `{key}` must hold integer or float samples. Received: dtype={x.dtype}")


def _npz_labels(arrays, rows) -> Tuple[Optional[np.ndarray], Optional[Tuple[str, ...]]]:
    """Integer labels with their class names; string labels become indices into their sorted names."""
    key = next((k for k in NPZ_LABEL_KEYS if k in arrays), None)
    if key is None:
        return None, None
    values = arrays[key]
    if values.dtype.kind in "USO":
        names, labels = np.unique(values.astype(str), return_inverse=True)
        return labels[rows].astype(np.int64), tuple(str(n) for n in names)
    labels = values.astype(np.int64)
    if labels.size and labels.min() < 0:
        raise ValueError(f"Labels must be >= 0. Received: {key} minimum={labels.min()}")
    if "class_names" in arrays:
        names: Sequence = arrays["class_names"].astype(str)
    else:
        names = [str(i) for i in range(int(labels.max()) + 1)]
    return labels[rows], tuple(str(n) for n in names)
