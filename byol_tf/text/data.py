"""Text sources (`load_text`) and the seeded stream of view pairs (`text_view_dataset`)."""

import csv
import dataclasses
import gzip
import io
import os
from typing import Mapping, Optional, Sequence, Tuple

import numpy as np
import tensorflow as tf
from absl import logging

from byol_tf.text.augment import TextAugmentConfig, text_views

# Keys of a `.npz`, in the order they are tried: `text` is what shared/data/sst2.py writes.
NPZ_TEXT_KEYS = ("text", "texts", "x")
NPZ_LABEL_KEYS = ("y", "labels", "label")
# Skips named one by one in the log; all of them are in `TextSet.skipped`.
LOGGED_SKIPS = 10


@dataclasses.dataclass(frozen=True, eq=False)
class TextSet:
    """Texts loaded into memory.

    Args:
        texts: object array of `str`, one example each.
        labels: int64 array, one per text, or `None` for unlabelled text.
        class_names: the class names (index = label), or `None` if unknown.
        skipped: `(item, reason)` for every file, line or row left out.
        source: where the texts came from.
    """

    texts: np.ndarray
    labels: Optional[np.ndarray] = None
    class_names: Optional[Tuple[str, ...]] = None
    skipped: Tuple[Tuple[str, str], ...] = ()
    source: str = ""

    def __len__(self) -> int:
        return len(self.texts)


def load_text(
    path: str,
    column: str = "text",
    label_column: Optional[str] = None,
    where: Optional[Mapping[str, str]] = None,
) -> TextSet:
    """Reads text examples from a folder, a text file, a CSV or an `.npz`.

    - A folder: every `.txt` file below it is one example (other files are
      ignored). When it has subfolders, each first-level subfolder is a
      class (sorted names) and files directly in the folder are skipped, as
      in `keras.utils.text_dataset_from_directory`.
    - `.csv` or `.csv.gz`: the `column` of each row; `label_column` gives
      labels (integers as they are, other values as indices into their
      sorted names); `where` keeps rows whose columns equal the given
      values, e.g. `{"split": "train"}` for shared/data/sst2/sst2.csv.gz.
    - `.npz`: texts under `text`, `texts` or `x`, labels under `y`, `labels`
      or `label`, optional `class_names` (what shared/data/sst2.py writes).
    - Any other file: one example per line.

    Items that are not UTF-8, hold NUL bytes (binary) or are blank are
    skipped, listed in `skipped` with the reason and logged.

    Args:
        path: the folder or file.
        column: the CSV column of the text.
        label_column: the CSV column of the labels, or `None`.
        where: CSV row filter, `{column: value}`.

    Returns:
        A `TextSet`.

    Example:
    >>> data = load_text("reviews.csv", column="review", label_column="stars")  # doctest: +SKIP
    """
    if os.path.isdir(path):
        texts, labels, class_names, skipped = _read_folder(path)
    elif not os.path.isfile(path):
        raise ValueError(f"No such file or folder. Received: path={path!r}")
    elif path.endswith((".csv", ".csv.gz")):
        texts, labels, class_names, skipped = _read_csv(path, column, label_column, where or {})
    elif path.endswith(".npz"):
        texts, labels, class_names, skipped = _read_npz(path)
    else:
        texts, labels, class_names, skipped = _read_lines(path)
    _log_skips(path, len(texts), skipped)
    if not texts:
        raise ValueError(
            f"No usable text in {path!r} ({len(skipped)} items skipped"
            f"{', first: ' + repr(skipped[0]) if skipped else ''}). Received: path={path!r}"
        )
    return TextSet(
        np.array(texts + [None], dtype=object)[:-1],  # the None keeps NumPy from splitting str into chars
        None if labels is None else np.asarray(labels, np.int64),
        None if class_names is None else tuple(class_names),
        tuple(skipped),
        path,
    )


def _problem(raw: bytes) -> Tuple[Optional[str], Optional[str]]:
    """`(text, None)` for usable bytes, else `(None, reason)`."""
    if b"\x00" in raw:
        return None, "binary (holds NUL bytes)"
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        return None, f"not UTF-8 (byte {raw[e.start]:#04x} at offset {e.start})"
    return (text, None) if text.strip() else (None, "empty")


def _read_folder(folder):
    classes = sorted(e.name for e in os.scandir(folder) if e.is_dir() and not e.name.startswith("."))
    # With classes, a top-level file has no label: skipped, as Keras ignores it.
    skipped = [
        (os.path.join(folder, n), "not inside a class subfolder, so it has no label") for n in _txt_files(folder)
    ]
    skipped = skipped if classes else []
    texts, labels = [], []
    for label, root in enumerate([os.path.join(folder, c) for c in classes] or [folder]):
        for directory, subdirs, _ in os.walk(root):
            subdirs.sort()
            for name in _txt_files(directory):
                file = os.path.join(directory, name)
                try:
                    with open(file, "rb") as f:
                        text, reason = _problem(f.read())
                except OSError as e:
                    text, reason = None, f"{type(e).__name__}: {e.strerror or e}"
                if text is None:
                    skipped.append((file, reason))
                else:
                    texts.append(text)
                    labels.append(label)
    return texts, (labels if classes else None), (classes or None), skipped


def _txt_files(directory):
    return sorted(e.name for e in os.scandir(directory) if e.is_file() and e.name.lower().endswith(".txt"))


def _read_lines(path):
    texts, skipped = [], []
    with open(path, "rb") as f:
        for number, line in enumerate(f, start=1):
            text, reason = _problem(line.rstrip(b"\r\n"))
            if text is None:
                skipped.append((f"{path}:{number}", reason))
            else:
                texts.append(text)
    return texts, None, None, skipped


def _read_csv(path, column, label_column, where):
    opener = gzip.open if path.endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    # surrogateescape keeps undecodable bytes as lone surrogates, so one bad row is skipped, not the file.
    reader = csv.DictReader(io.StringIO(raw.decode("utf-8", "surrogateescape"), newline=""))
    wanted = [column] + ([label_column] if label_column else []) + list(where)
    missing = [name for name in wanted if name not in (reader.fieldnames or [])]
    if missing:
        raise ValueError(f"{path!r} has no column {missing[0]!r}; it has {reader.fieldnames}. Received: {missing[0]!r}")
    texts, raw_labels, skipped = [], [], []
    for row in reader:
        if any(row[key] != str(value) for key, value in where.items()):
            continue
        text, reason = _problem(row[column].encode("utf-8", "surrogateescape"))
        if text is None:
            skipped.append((f"{path}:{reader.line_num}", reason))
        else:
            texts.append(text)
            raw_labels.append(row[label_column] if label_column else None)
    if not label_column:
        return texts, None, None, skipped
    labels, class_names = _label_indices(raw_labels, path, label_column)
    return texts, labels, class_names, skipped


def _label_indices(values, path, label_column):
    """Integer labels as they are (no class names), any other values as indices into their sorted set."""
    try:
        return [int(v) for v in values], None
    except ValueError:
        names = sorted(set(values))
        logging.info("%s: labels of column %r are names; classes %s", path, label_column, names)
        return [names.index(v) for v in values], names


def _read_npz(path):
    try:
        # allow_pickle=False: an .npz from elsewhere must not run code on load.
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError) as e:
        raise ValueError(f"Cannot read {path!r} as an .npz of strings ({e}). Received: path={path!r}") from None
    key = next((k for k in NPZ_TEXT_KEYS if k in arrays), None)
    if key is None or arrays[key].dtype.kind not in "US" or arrays[key].ndim != 1:
        raise ValueError(
            f"{path!r} needs a 1-D str or bytes array under one of {NPZ_TEXT_KEYS}. Received: keys={sorted(arrays)}"
        )
    label_key = next((k for k in NPZ_LABEL_KEYS if k in arrays), None)
    labels = None if label_key is None else arrays[label_key].astype(np.int64)
    if labels is not None and labels.shape != arrays[key].shape:
        raise ValueError(f"{path!r}: one label per text needed. Received: {label_key} shape={labels.shape}")
    texts, kept, skipped = [], [], []
    for i, value in enumerate(arrays[key].tolist()):
        text, reason = _problem(value if isinstance(value, bytes) else value.encode("utf-8", "surrogatepass"))
        if text is None:
            skipped.append((f"{path}[{i}]", reason))
        else:
            texts.append(text)
            kept.append(i)
    class_names = [str(n) for n in arrays["class_names"].tolist()] if "class_names" in arrays else None
    return texts, None if labels is None else labels[kept], class_names, skipped


def _log_skips(path, loaded, skipped):
    if not skipped:
        return
    logging.warning("Loaded %d texts from %s, skipped %d:", loaded, path, len(skipped))
    for item, reason in skipped[:LOGGED_SKIPS]:
        logging.warning("  skipped %s: %s", item, reason)
    if len(skipped) > LOGGED_SKIPS:
        logging.warning("  ... and %d more (see `skipped`)", len(skipped) - LOGGED_SKIPS)


def text_view_dataset(
    texts: Sequence,
    batch_size: int,
    config: TextAugmentConfig,
    seed: int = 0,
    start_step: int = 0,
    autotune: bool = True,
) -> tf.data.Dataset:
    """An endless, seeded stream of `(view1, view2)` `tf.string [batch_size]` batches for `BYOL.fit`.

    As the image array pipeline: epoch `e` is the stateless permutation
    `[seed, -1 - e]` of the texts cut into full batches, and batch `i`
    (counted across epochs, from `start_step` on resume) gets the views of
    seed `[seed, i]`. The dataset carries `byol_steps_per_epoch`. `autotune=False`
    turns off tf.data's autotuning thread, which can hold a short `fit` idle
    for seconds after it ends (tests).

    Example:
    >>> pairs = text_view_dataset(["a good film", "a bad one"], 2, TextAugmentConfig())
    >>> pairs.byol_steps_per_epoch
    1
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or not 1 <= batch_size <= len(texts):
        raise ValueError(
            f"`batch_size` must be an int in [1, {len(texts)}] (the texts). Received: batch_size={batch_size!r}"
        )
    steps = len(texts) // batch_size
    texts_t = tf.constant(list(texts), tf.string)
    seed_t = tf.constant(int(seed), tf.int64)

    def make_views(index):
        epoch, position = index // steps, index % steps
        order = tf.random.experimental.stateless_shuffle(
            tf.range(len(texts), dtype=tf.int64), tf.stack([seed_t, -1 - epoch])
        )
        batch = tf.gather(texts_t, order[position * batch_size : (position + 1) * batch_size])
        view1, view2 = text_views(tf.ensure_shape(batch, [batch_size]), tf.stack([seed_t, index]), config)
        return tf.ensure_shape(view1, [batch_size]), tf.ensure_shape(view2, [batch_size])

    ds = tf.data.Dataset.counter(start=int(start_step), dtype=tf.int64)
    ds = ds.map(make_views, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).prefetch(tf.data.AUTOTUNE)
    options = tf.data.Options()
    options.autotune.enabled = bool(autotune)
    options.deterministic = True
    ds = ds.with_options(options)
    ds.byol_steps_per_epoch = steps
    return ds
