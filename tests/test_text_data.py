"""Text sources and the view stream."""

import csv
import gzip
import os

import numpy as np
import pytest

from byol_tf.text import MASK_TOKEN, TextAugmentConfig, load_text, text_view_dataset

SST2 = os.path.join(os.path.dirname(__file__), "..", "..", "shared", "data", "sst2", "sst2.csv.gz")


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return str(path)


def reasons(result):
    return {os.path.basename(item): reason for item, reason in result.skipped}


def test_folder_with_classes_counts_and_names_bad_files(tmp_path):
    write(tmp_path / "pos" / "a.txt", b"a fine film")
    write(tmp_path / "pos" / "deeper" / "b.txt", "caf\u00e9 au lait".encode())
    write(tmp_path / "neg" / "c.txt", b"dull\nand long")
    bad = write(tmp_path / "neg" / "latin1.txt", b"na\xefve plot")
    write(tmp_path / "neg" / "binary.txt", b"GIF89a\x00\x01\x02")
    write(tmp_path / "neg" / "blank.txt", b"  \n\t")
    write(tmp_path / "neg" / "notes.md", b"not a .txt: ignored, as Keras does")
    write(tmp_path / "stray.txt", b"no class")
    data = load_text(str(tmp_path))
    assert data.class_names == ("neg", "pos")
    assert list(data.texts) == ["dull\nand long", "a fine film", "caf\u00e9 au lait"]
    assert data.labels.dtype == np.int64 and list(data.labels) == [0, 1, 1]
    assert reasons(data) == {
        "latin1.txt": "not UTF-8 (byte 0xef at offset 2)",
        "binary.txt": "binary (holds NUL bytes)",
        "blank.txt": "empty",
        "stray.txt": "not inside a class subfolder, so it has no label",
    }
    assert (bad, "not UTF-8 (byte 0xef at offset 2)") in data.skipped


def test_folder_without_classes_is_unlabelled(tmp_path):
    write(tmp_path / "1.txt", b"one")
    write(tmp_path / "2.txt", b"two")
    data = load_text(str(tmp_path))
    assert list(data.texts) == ["one", "two"] and data.labels is None and data.class_names is None


def test_lines_file_skips_bad_lines_by_number(tmp_path):
    path = write(tmp_path / "lines.txt", b"first line\r\n\nthird \xff\xfe\nfourth\x00\nfifth\n")
    data = load_text(path)
    assert list(data.texts) == ["first line", "fifth"]
    assert data.skipped == (
        (f"{path}:2", "empty"),
        (f"{path}:3", "not UTF-8 (byte 0xff at offset 6)"),
        (f"{path}:4", "binary (holds NUL bytes)"),
    )


def test_csv_columns_labels_and_filter(tmp_path):
    rows = [("train", "1", "great fun"), ("train", "0", ""), ("dev", "1", "skip me"), ("train", "0", "bad, bad")]
    path = tmp_path / "reviews.csv"
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "label", "review"])
        writer.writerows(rows)
    with open(path, "ab") as f:
        f.write(b'train,1,"ol\xe9 \xe9"\n')
    data = load_text(str(path), column="review", label_column="label", where={"split": "train"})
    assert list(data.texts) == ["great fun", "bad, bad"] and list(data.labels) == [1, 0]
    assert data.skipped == ((f"{path}:3", "empty"), (f"{path}:6", "not UTF-8 (byte 0xe9 at offset 2)"))
    named = load_text(str(path), column="review", label_column="split")
    assert named.class_names == ("dev", "train") and list(named.labels) == [1, 0, 1]
    with pytest.raises(ValueError, match="no column 'text'"):
        load_text(str(path))
    zipped = write(tmp_path / "reviews.csv.gz", gzip.compress(path.read_bytes()))
    assert list(load_text(zipped, column="review", where={"split": "dev"}).texts) == ["skip me"]


def test_npz_in_the_sst2_script_format_and_bytes(tmp_path):
    path = str(tmp_path / "train.npz")
    np.savez(
        path, text=np.array(["a good film", "a bad one"]), y=np.array([1, 0]), class_names=["negative", "positive"]
    )
    data = load_text(path)
    assert list(data.texts) == ["a good film", "a bad one"] and list(data.labels) == [1, 0]
    assert data.class_names == ("negative", "positive")
    other = str(tmp_path / "bytes.npz")
    np.savez(other, x=np.array([b"ok", b"\xff", b" "]), labels=np.array([3, 4, 5]))
    data = load_text(other)
    assert list(data.texts) == ["ok"] and list(data.labels) == [3]
    assert [reason for _, reason in data.skipped] == ["not UTF-8 (byte 0xff at offset 0)", "empty"]


def test_empty_or_missing_source_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match=r"No usable text .*2 items skipped"):
        load_text(write(tmp_path / "blank.txt", b"\n \n"))
    with pytest.raises(ValueError, match="No usable text"):
        load_text(str(tmp_path))  # holds only blank.txt
    with pytest.raises(ValueError, match="Received: path="):
        load_text(str(tmp_path / "missing.txt"))


@pytest.mark.skipif(not os.path.exists(SST2), reason="shared/data/sst2 is not here")
def test_sst2_train_split():
    data = load_text(SST2, column="text", label_column="label", where={"split": "train"})
    assert len(data) == 6920 and data.skipped == ()
    assert np.bincount(data.labels).tolist() == [3310, 3610]


def test_view_stream_is_seeded_resumable_and_covers_an_epoch():
    texts = [f"Sentence {i}, word{i}!" for i in range(12)]
    plain = TextAugmentConfig(crop_fraction=(1.0, 1.0), token_dropout=0.0, mask_prob=0.0, shuffle_window=0)
    stream = text_view_dataset(texts, 4, plain, seed=3, autotune=False)
    assert stream.byol_steps_per_epoch == 3
    epoch = [v.decode() for view1, _ in stream.take(3) for v in view1.numpy()]
    assert sorted(epoch) == sorted(f"sentence {i} word{i}" for i in range(12))
    config = TextAugmentConfig()
    full = [tuple(v.numpy().tolist() for v in pair) for pair in text_view_dataset(texts, 4, config, 3).take(5)]
    resumed = [
        tuple(v.numpy().tolist() for v in p) for p in text_view_dataset(texts, 4, config, 3, start_step=2).take(3)
    ]
    assert resumed == full[2:]
    other = [tuple(v.numpy().tolist() for v in p) for p in text_view_dataset(texts, 4, config, 4).take(5)]
    assert other != full
    assert all(v for pair in full for view in pair for v in view)
    with pytest.raises(ValueError, match="Received: batch_size=13"):
        text_view_dataset(texts, 13, config)
    assert MASK_TOKEN == "xxmask"
