"""Streaming sources: crops from the original image, hostile files, shards, exact resume."""

import dataclasses
import io
import math
import os

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from byol_tf import data
from byol_tf.augment import crop_window, small_seed
from byol_tf.config import AugmentConfig
from byol_tf.data import crops

# Crops and flips only, so a view is exactly crop -> resize -> flip -> round.
CROP_ONLY = AugmentConfig(
    image_size=16, jitter_prob=0.0, grayscale_prob=0.0, blur_prob=(0.0, 0.0), solarize_prob=(0.0, 0.0)
)


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _torchvision_window(height, width, tries, offsets, scale=(0.08, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop.get_params, written out, with given uniforms instead of torch.rand."""
    area = height * width
    for u_area, u_ratio in tries:
        target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area)
        aspect = math.exp(math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * u_ratio)
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(offsets[0] * (height - h + 1)), int(offsets[1] * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < ratio[0]:
        w, h = width, int(round(width / ratio[0]))
    elif in_ratio > ratio[1]:
        h, w = height, int(round(height * ratio[1]))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


@pytest.mark.parametrize("height, width", [(300, 200), (40, 400), (400, 40), (7, 9)])
def test_crop_window_is_torchvision_random_resized_crop(height, width):
    rng = np.random.default_rng(height + width)
    tries, offsets = rng.random((64, 10, 2)), rng.random((64, 2))
    # Some rows where no try is valid, to reach the fallback (areas over the image).
    tries[:8, :, 0] = 1.0
    config = AugmentConfig(crop_scale=(0.08, 1.0) if height > 10 else (0.9, 1.0))
    config = AugmentConfig(crop_scale=(0.08, 1.0))
    got = crop_window(
        tf.fill([64], float(height)),
        tf.fill([64], float(width)),
        tf.constant(tries, tf.float32),
        tf.constant(offsets, tf.float32),
        config,
    )
    got = np.stack([g.numpy() for g in got], axis=1).astype(int)
    expected = np.array([_torchvision_window(height, width, t, o) for t, o in zip(tries, offsets)])
    # float32 against float64 can round a size differently at an exact .5: allow one pixel, rarely.
    assert np.mean(np.all(got == expected, axis=1)) > 0.95
    assert np.abs(got - expected).max() <= 1
    assert np.all(got[:, 0] + got[:, 2] <= height) and np.all(got[:, 1] + got[:, 3] <= width)


def _drawn_windows(key, height, width, scale=(0.08, 1.0)):
    """The windows and flips `two_crops` draws for `key`, via the torchvision reference above."""
    u = tf.random.stateless_uniform([2, 23], key).numpy()
    tries, offsets, flips = u[:, :20].reshape(2, 10, 2), u[:, 20:22], u[:, 22] < 0.5
    return [_torchvision_window(height, width, t, o, scale) for t, o in zip(tries, offsets)], flips


def _bilinear(image, top, left, h, w, size):
    """NumPy bilinear resize of a window with half-pixel centres, clamped to the window (as PIL and OpenCV sample)."""

    def coords(start, length):
        return np.clip(start + (np.arange(size) + 0.5) * length / size - 0.5, start, start + length - 1)

    ys, xs = coords(top, h), coords(left, w)
    y0, x0 = np.floor(ys).astype(int), np.floor(xs).astype(int)
    y1, x1 = np.minimum(y0 + 1, image.shape[0] - 1), np.minimum(x0 + 1, image.shape[1] - 1)
    fy, fx = (ys - y0)[:, None, None], (xs - x0)[None, :, None]
    im = image.astype(float)
    return (
        (1 - fy) * (1 - fx) * im[y0][:, x0]
        + (1 - fy) * fx * im[y0][:, x1]
        + fy * (1 - fx) * im[y1][:, x0]
        + fy * fx * im[y1][:, x1]
    )


@pytest.mark.parametrize("height, width", [(60, 90), (12, 20)])  # windows larger, and smaller, than the views
def test_views_are_bilinear_crops_of_the_original_image(height, width):
    image = _rgb(height, width, 0)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    for position in range(6):
        key = crops.view_key(3, position)
        views = crops.two_crops(tf.constant(png.getvalue()), key, CROP_ONLY).numpy()
        windows, flips = _drawn_windows(key, height, width)
        for view, (top, left, h, w), flip in zip(views, windows, flips):
            ref = _bilinear(image, top, left, h, w, 16)
            ref = ref[:, ::-1] if flip else ref
            # float32 sampling coordinates against float64: a fraction of a level, then rounding.
            assert np.abs(view.astype(float) - ref).max() <= 1.01


def test_small_views_are_bilinear_crops_at_their_own_scale_and_leave_the_large_views_alone():
    image = _rgb(60, 90, 1)
    png = io.BytesIO()
    Image.fromarray(image).save(png, format="PNG")
    config = dataclasses.replace(CROP_ONLY, small_views=2, small_view_fraction=0.5, small_crop_scale=(0.05, 0.4))
    for position in range(4):
        key = crops.view_key(3, position)
        large, small = (v.numpy() for v in crops.view_crops(tf.constant(png.getvalue()), key, config))
        np.testing.assert_array_equal(large, crops.two_crops(tf.constant(png.getvalue()), key, CROP_ONLY).numpy())
        assert small.shape == (2, 8, 8, 3)
        windows, flips = _drawn_windows(small_seed(key), 60, 90, (0.05, 0.4))
        for view, (top, left, h, w), flip in zip(small, windows, flips):
            assert h * w <= 0.4 * 60 * 90 * 1.1
            ref = _bilinear(image, top, left, h, w, 8)
            ref = ref[:, ::-1] if flip else ref
            assert np.abs(view.astype(float) - ref).max() <= 1.01


# 757x1001: libjpeg's 1/8 decode has ceil(757/8) rows, not 757/8: windows must map by the ratio.
@pytest.mark.parametrize("height, width", [(600, 800), (757, 1001)])
def test_large_jpeg_crops_decode_at_a_dct_scale_close_to_the_full_decode(height, width):
    # A smooth image: a 1/2 to 1/8 DCT-scaled decode is an antialiased downscale of it.
    yy, xx = np.mgrid[0:height, 0:width]
    smooth = np.stack([128 + 100 * np.sin(xx / 40.0), 128 + 100 * np.cos(yy / 50.0), np.full(xx.shape, 90.0)], -1)
    jpeg = io.BytesIO()
    Image.fromarray(smooth.astype(np.uint8)).save(jpeg, format="JPEG", quality=95)
    config = AugmentConfig(
        image_size=32,
        crop_scale=(0.5, 1.0),
        jitter_prob=0.0,
        grayscale_prob=0.0,
        blur_prob=(0.0, 0.0),
        solarize_prob=(0.0, 0.0),
        small_views=2,
        small_crop_scale=(0.05, 0.4),
    )
    full = np.asarray(Image.open(io.BytesIO(jpeg.getvalue())).convert("RGB"))
    for position in range(4):
        key = crops.view_key(0, position)
        large, small = (v.numpy().astype(float) for v in crops.view_crops(tf.constant(jpeg.getvalue()), key, config))
        for views, view_key, scale, size in [(large, key, (0.5, 1.0), 32), (small, small_seed(key), (0.05, 0.4), 16)]:
            windows, flips = _drawn_windows(view_key, height, width, scale)
            for view, (top, left, h, w), flip in zip(views, windows, flips):
                assert min(h, w) >= 2 * size  # so the decode was scaled
                ref = _bilinear(full, top, left, h, w, size)
                ref = ref[:, ::-1] if flip else ref
                assert np.abs(view - ref).mean() < 3.0


@pytest.fixture
def hostile_folder(tmp_path):
    """Good images of many sizes with bad files in the middle of the listing."""
    root = tmp_path / "photos"
    good = []
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(9):
            size = (20 + 7 * i, 50 - 3 * i)
            path = root / c / f"{i:02d}.{'jpg' if i % 2 else 'png'}"
            Image.fromarray(_rgb(*size, seed=i)).save(str(path))
            good.append(str(path))
    jpeg = io.BytesIO()
    Image.fromarray(_rgb(40, 40, 9)).save(jpeg, format="JPEG")
    bad = {
        root / "a" / "03b_truncated.jpg": jpeg.getvalue()[:200],
        root / "a" / "05b_empty.png": b"",
        root / "b" / "02b_text.jpg": b"this is not an image",
        root / "b" / "06b_corrupt.png": b"\x89PNG\r\n\x1a\n" + bytes(8) + b"IHDR" + bytes(8) + os.urandom(100),
    }
    for path, contents in bad.items():
        path.write_bytes(contents)
    return str(root), good, sorted(str(p) for p in bad)


def test_hostile_files_are_skipped_named_and_counted_while_streaming(hostile_folder):
    root, good, bad = hostile_folder
    source = data.open_source(root)
    assert isinstance(source, data.FolderSource) and source.num_examples == len(good) + len(bad)
    tracker = data.StreamPosition(source)
    ds = data.pretrain_dataset(source, 4, CROP_ONLY, seed=0, tracker=tracker, with_labels=True, autotune=False)
    steps = 2 * len(good) // 4  # two epochs of good images
    for (v1, v2), labels in ds.take(steps):
        assert v1.shape == (4, 16, 16, 3) and labels.shape == (4,)
    assert sorted(name for name, _ in source.skips.items()) == bad
    reasons = dict(source.skips.items())
    assert reasons[bad[1]] == "empty file"
    assert "Unknown image file format" in reasons[bad[2]]
    # Every bad file once per epoch: two epochs of records consumed.
    assert tracker.after(steps) == 2 * len(good) + 2 * len(bad)
    assert source.num_skipped == len(bad)


def test_small_views_stream_after_the_large_ones(hostile_folder):
    root, good, bad = hostile_folder
    config = dataclasses.replace(CROP_ONLY, small_views=3, small_view_fraction=0.75)
    pairs = data.pretrain_dataset(data.open_source(root), 4, CROP_ONLY, seed=2, autotune=False)
    multi = data.pretrain_dataset(data.open_source(root), 4, config, seed=2, autotune=False)
    for (v1, v2), views in zip(pairs.take(5), multi.take(5)):
        assert [tuple(v.shape) for v in views] == [(4, 16, 16, 3)] * 2 + [(4, 12, 12, 3)] * 3
        np.testing.assert_array_equal(views[0].numpy(), v1.numpy())
        np.testing.assert_array_equal(views[1].numpy(), v2.numpy())
        for view in views[2:]:
            assert 0.0 <= view.numpy().min() and view.numpy().max() <= 1.0
        # Three different crops of each image, not one crop three times.
        assert not np.allclose(views[2].numpy(), views[3].numpy())


def test_resume_from_a_stream_position_gives_the_same_batches(hostile_folder):
    root, good, bad = hostile_folder
    source = data.open_source(root)
    tracker = data.StreamPosition(source)
    full = [
        v1.numpy()
        for v1, _ in data.pretrain_dataset(source, 4, CROP_ONLY, seed=5, tracker=tracker, autotune=False).take(9)
    ]
    for step in (3, 5, 7):
        # A killed run resumes from the backup's position, which is past skipped files.
        position = tracker.after(step)
        resumed = data.pretrain_dataset(
            data.open_source(root), 4, CROP_ONLY, seed=5, start_step=step, start_position=position, autotune=False
        )
        for expected, (v1, _) in zip(full[step:], resumed.take(9 - step)):
            np.testing.assert_array_equal(v1.numpy(), expected)


def test_shards_keep_original_bytes_and_stream_like_the_folder(hostile_folder, tmp_path):
    root, good, bad = hostile_folder
    index = data.write_shards(root, str(tmp_path / "shards"), shard_size=5)
    # Header-level bad files are left out at writing, with reasons; the truncated JPEG passes its header.
    assert index["num_examples"] == len(good) + 1 and len(index["skipped"]) == 3
    names = {}
    for shard in index["shards"]:
        for record in tf.data.TFRecordDataset(str(tmp_path / "shards" / shard["file"])):
            example = tf.io.parse_single_example(record, data.record_sources.SHARD_FEATURES)
            names[example["image/filename"].numpy().decode()] = example
    for path in good:
        example = names[os.path.relpath(path, root)]
        with open(path, "rb") as f:
            assert example["image/encoded"].numpy() == f.read()  # no re-encoding
        assert example["image/class/label"].numpy() == ("ab".index(os.path.basename(os.path.dirname(path))))
    source = data.open_source(str(tmp_path / "shards"))
    assert isinstance(source, data.ShardSource) and source.class_names == ["a", "b"]
    steps = 2 * len(good) // 4  # two epochs
    batches = list(data.pretrain_dataset(source, 4, CROP_ONLY, seed=0, autotune=False).take(steps))
    assert len(batches) == steps
    # The truncated JPEG in the middle of a shard is skipped and named while training.
    assert [name for name, _ in source.skips.items()] == [f"{source.name}: a/03b_truncated.jpg"]
    with pytest.raises(ValueError, match="already holds shards"):
        data.write_shards(root, str(tmp_path / "shards"))


def test_eval_dataset_streams_a_folder_through_the_eval_preprocessing(hostile_folder):
    root, good, bad = hostile_folder
    source = data.open_source(root)
    images, labels = [], []
    for x, y in data.eval_dataset(source, 16, crop_fraction=0.875, batch_size=5):
        images.append(x.numpy())
        labels.append(y.numpy())
    images, labels = np.concatenate(images), np.concatenate(labels)
    assert len(images) == len(good) and labels.tolist() == [0] * 9 + [1] * 9
    assert sorted(name for name, _ in source.skips.items()) == bad
    # Image 0 of class a is the 20x50 PNG: short side to floor(16 / 0.875) = 18, long int(18 * 50 / 20) = 45,
    # centre crop at (1, 14) -- worked out by hand, checked against PIL's resize.
    first = _rgb(20, 50, 0)
    ref = (
        np.stack(
            [
                np.asarray(Image.fromarray(first[..., c].astype(np.float32), mode="F").resize((45, 18), Image.BILINEAR))
                for c in range(3)
            ],
            -1,
        )[1:17, 14:30]
        / 255.0
    )
    np.testing.assert_allclose(images[0], ref, atol=1e-5)


def test_any_tf_data_dataset_of_images_streams():
    # Decoded images of six different sizes, with labels.
    ds = tf.data.Dataset.range(6).map(
        lambda i: (tf.cast(tf.fill(tf.stack([12 + 5 * i, 30 - 2 * i, 3]), 40 * i), tf.uint8), i % 2)
    )
    with pytest.raises(ValueError, match="num_examples"):
        data.DatasetSource(ds.filter(lambda x, y: True))
    source = data.DatasetSource(ds)
    assert source.labelled and source.num_examples == 6
    (v1, v2), labels = next(iter(data.pretrain_dataset(source, 3, CROP_ONLY, with_labels=True, autotune=False)))
    assert v1.shape == (3, 16, 16, 3) and set(labels.numpy().tolist()) <= {0, 1}
    # A constant image stays constant through crop and resize: each view is one of the six values.
    values = np.unique(np.round(v1.numpy() * 255))
    assert set(values.tolist()) <= {0.0, 40.0, 80.0, 120.0, 160.0, 200.0}


def test_tfds_source_streams_encoded_images():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=12):
        source = data.open_source("tfds:cifar10", split="train")
        assert isinstance(source, data.TfdsSource) and source.num_examples == 12
        assert len(source.class_names) == 10
        (v1, _), labels = next(iter(data.pretrain_dataset(source, 4, CROP_ONLY, with_labels=True, autotune=False)))
        assert v1.shape == (4, 16, 16, 3) and labels.dtype == tf.int64


def test_open_source_errors_name_the_value(tmp_path):
    with pytest.raises(ValueError, match="No image files"):
        (tmp_path / "empty").mkdir()
        data.open_source(str(tmp_path / "empty"))
    (tmp_path / "s").mkdir()
    (tmp_path / "s" / "index.json").write_text("{not json")
    with pytest.raises(ValueError, match="Not a shard folder"):
        data.open_source(str(tmp_path / "s"))
    with pytest.raises(ValueError, match="limit=0"):
        data.open_source("shapes", limit=0)


def test_a_source_with_nothing_decodable_is_refused_not_streamed_forever(tmp_path):
    for i in range(6):
        (tmp_path / f"{i}.jpg").write_bytes(b"not an image " + bytes([i]))
    with pytest.raises(ValueError, match=r"None of the first 256 images could be decoded.*Unknown image file format"):
        data.check_decodable(str(tmp_path))
    Image.fromarray(_rgb(20, 20, 0)).save(str(tmp_path / "9.png"))
    data.check_decodable(str(tmp_path))  # one good file is enough to start


def _names(records, key, root=""):
    return [os.path.relpath(r[key].decode(), root) if root else r[key].decode() for r in records]


def test_folder_workers_split_every_epoch_of_files(hostile_folder):
    root, good, bad = hostile_folder
    source = data.open_source(root)
    everything = sorted(os.path.relpath(p, root) for p in good + bad)
    streams = []
    for worker in range(3):
        share = source.share_size((3, worker))
        records = list(source.train_records(7, 0, (3, worker)).take(2 * share).as_numpy_iterator())
        assert [int(r["position"]) for r in records] == list(range(2 * share))
        names = _names(records, "path", root)
        streams.append((names[:share], names[share:]))
        # A pure function of (seed, epoch): the same stream again, and a resume mid-way continues it.
        again = source.train_records(7, 3, (3, worker)).take(2 * share - 3).as_numpy_iterator()
        assert _names(list(again), "path", root) == names[3:]
    for epoch in range(2):
        # Every file once per epoch, in exactly one worker's share.
        assert sorted(sum((s[epoch] for s in streams), [])) == everything
    assert streams[0][0] != streams[0][1]  # each epoch reshuffles


@pytest.mark.parametrize("workers, file_level", [(3, True), (2, False)])
def test_shard_workers_split_files_when_they_balance(tmp_path, workers, file_level):
    root = tmp_path / "photos"
    root.mkdir()
    for i in range(15):
        Image.fromarray(_rgb(10 + i, 12, seed=i)).save(str(root / f"{i:02d}.png"))
    index = data.write_shards(str(root), str(tmp_path / "shards"), shard_size=5)
    source = data.open_source(str(tmp_path / "shards"))
    assert source.counts == [5, 5, 5]
    # Each shard file's names, read directly.
    files = [
        {
            tf.io.parse_single_example(r, data.record_sources.SHARD_FEATURES)["image/filename"].numpy().decode()
            for r in tf.data.TFRecordDataset(str(tmp_path / "shards" / s["file"]))
        }
        for s in index["shards"]
    ]
    seen = []
    for worker in range(workers):
        size = len(range(worker, 15, workers))
        seen.append(_names(list(source.train_records(0, 0, (workers, worker)).take(size).as_numpy_iterator()), "name"))
    # One pass of every worker covers each record once.
    assert sorted(sum(seen, [])) == sorted(set().union(*files))
    # 3 shards over 3 workers: a whole file each; over 2 they cannot balance, so records are split.
    whole_files = all(set(names) in files for names in seen)
    assert whole_files == file_level
