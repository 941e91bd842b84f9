import dataclasses
import os
import re

import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

from byol_tf import data
from byol_tf.config import AugmentConfig

SMALL_AUG = AugmentConfig(image_size=16, blur_prob=(0.0, 0.0))


def _rgb(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


# --- .npz -----------------------------------------------------------------


def test_npz_with_labels_and_class_names(tmp_path):
    x = np.stack([_rgb(16, 16, i) for i in range(5)])
    y = np.array([0, 1, 2, 1, 0])
    path = str(tmp_path / "d.npz")
    np.savez(path, x=x, y=y, class_names=np.array(["a", "b", "c"]))
    result = data.load_images(path, image_size=16)
    np.testing.assert_array_equal(result.images, x)
    np.testing.assert_array_equal(result.labels, y)
    assert result.labels.dtype == np.int64
    assert result.class_names == ["a", "b", "c"]
    assert result.num_skipped == 0 and result.skipped == []
    assert result.source == path


def test_npz_without_labels_grayscale_and_resize(tmp_path):
    gray = np.random.default_rng(0).integers(0, 256, (3, 20, 20), dtype=np.uint8)
    path = str(tmp_path / "g.npz")
    np.savez(path, x=gray)
    result = data.load_images(path, image_size=10)
    assert result.images.shape == (3, 10, 10, 3) and result.images.dtype == np.uint8
    assert result.labels is None and result.class_names is None
    # Gray stays gray: the three channels are equal.
    np.testing.assert_array_equal(result.images[..., 0], result.images[..., 2])
    # A constant image resizes to the same constant.
    np.savez(path, x=np.full((2, 20, 30, 1), 77, np.uint8))
    result = data.load_images(path, image_size=8)
    assert result.images.shape == (2, 8, 8, 3)
    assert np.all(result.images == 77)


@pytest.mark.parametrize("scale", [1.0, 255.0])
def test_npz_float_images(tmp_path, scale):
    x = np.stack([_rgb(8, 8, i) for i in range(2)])
    path = str(tmp_path / "f.npz")
    np.savez(path, x=x.astype(np.float32) / 255.0 * scale)
    result = data.load_images(path, image_size=8)
    np.testing.assert_array_equal(result.images, x)


def test_npz_errors(tmp_path):
    path = str(tmp_path / "bad.npz")
    np.savez(path, images=np.zeros((2, 8, 8, 3), np.uint8))
    with pytest.raises(ValueError, match="no `x` array"):
        data.load_images(path, 8)
    np.savez(path, x=np.zeros((2, 8, 8, 3), np.uint8), y=np.zeros(3))
    with pytest.raises(ValueError, match="one label per image"):
        data.load_images(path, 8)
    np.savez(path, x=np.full((2, 8, 8, 3), 300, np.int32))
    with pytest.raises(ValueError, match=r"\[0, 255\]"):
        data.load_images(path, 8)


# --- folders --------------------------------------------------------------


def _save(path, array, **kwargs):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(array, **kwargs).save(path)


@pytest.fixture
def image_folder(tmp_path):
    root = tmp_path / "images"
    good = {}  # path -> class name
    _save(str(root / "cat" / "a.png"), _rgb(20, 30, 1))
    good["cat/a.png"] = "cat"
    _save(str(root / "cat" / "sub" / "deep" / "b.JPG"), _rgb(40, 24, 2))
    good["cat/sub/deep/b.JPG"] = "cat"
    _save(str(root / "cat" / "c.bmp"), _rgb(16, 16, 3))
    good["cat/c.bmp"] = "cat"
    gif = Image.fromarray(_rgb(18, 18, 4))
    gif.save(str(root / "cat" / "d.gif"), save_all=True, append_images=[Image.fromarray(_rgb(18, 18, 5))])
    good["cat/d.gif"] = "cat"
    _save(str(root / "dog" / "gray.png"), _rgb(25, 25, 6)[..., 0])
    good["dog/gray.png"] = "dog"
    rgba = np.concatenate([_rgb(16, 16, 7), np.full((16, 16, 1), 128, np.uint8)], axis=-1)
    _save(str(root / "dog" / "rgba.png"), rgba)
    good["dog/rgba.png"] = "dog"
    gray16 = (np.arange(32 * 32).reshape(32, 32) * 60).astype(np.uint16)
    _save(str(root / "dog" / "deep16.png"), gray16)
    good["dog/deep16.png"] = "dog"
    _save(str(root / "emu" / "e.jpeg"), _rgb(12, 50, 8))
    good["emu/e.jpeg"] = "emu"
    # Bad files, to be skipped with a reason.
    (root / "dog" / "corrupt.jpg").write_bytes(np.random.default_rng(0).bytes(300))
    (root / "emu" / "empty.png").write_bytes(b"")
    # Ignored: not image extensions, hidden files and folders.
    (root / "cat" / "notes.txt").write_text("hello")
    (root / "cat" / ".hidden.png").write_bytes(b"junk")
    _save(str(root / ".cache" / "x.png"), _rgb(8, 8, 9))
    # A symlink back to the root must not make the walk loop.
    try:
        os.symlink(str(root), str(root / "cat" / "loop"))
    except OSError:
        pass
    return root, good


def test_folder_with_classes(image_folder):
    root, good = image_folder
    result = data.load_images(str(root), image_size=16)
    assert result.class_names == ["cat", "dog", "emu"]
    assert result.images.shape == (len(good), 16, 16, 3)
    assert result.images.dtype == np.uint8
    counts = np.bincount(result.labels, minlength=3)
    assert counts.tolist() == [sum(v == c for v in good.values()) for c in ["cat", "dog", "emu"]]

    skipped = {os.path.relpath(p, root): reason for p, reason in result.skipped}
    assert set(skipped) == {os.path.join("dog", "corrupt.jpg"), os.path.join("emu", "empty.png")}
    assert result.num_skipped == 2
    assert skipped[os.path.join("emu", "empty.png")] == "empty file"
    assert "Unknown image file format" in skipped[os.path.join("dog", "corrupt.jpg")]


def test_folder_decoding_details(image_folder):
    root, _ = image_folder
    result = data.load_images(str(root), image_size=16)
    # Images in walk order; the dog class is: deep16.png, gray.png, rgba.png.
    dog = result.images[result.labels == 1]
    deep16, gray, rgba = dog
    # Grayscale (8- and 16-bit) becomes three equal channels.
    for image in (deep16, gray):
        np.testing.assert_array_equal(image[..., 0], image[..., 1])
        np.testing.assert_array_equal(image[..., 0], image[..., 2])
    # 16 bits are scaled to 8, not truncated: the brightest pixels stay bright.
    assert deep16.max() > 200
    # RGBA keeps its colours (alpha dropped), it is not gray.
    assert not np.array_equal(rgba[..., 0], rgba[..., 1])
    # A same-size image is kept exactly (bmp, lossless).
    cat = result.images[result.labels == 0]
    np.testing.assert_array_equal(cat[1], _rgb(16, 16, 3))
    # The GIF gives its first frame, not the second.
    gif = cat[2].astype(float)
    frames = [np.asarray(Image.fromarray(_rgb(18, 18, s)).resize((16, 16), Image.BILINEAR), float) for s in (4, 5)]
    assert np.abs(gif - frames[0]).mean() < 0.5 * np.abs(gif - frames[1]).mean()


def test_folder_dangling_symlink_is_skipped(tmp_path):
    _save(str(tmp_path / "f" / "ok.png"), _rgb(8, 8))
    try:
        os.symlink(str(tmp_path / "missing.png"), str(tmp_path / "f" / "dangling.png"))
    except OSError:
        pytest.skip("symlinks unsupported here")
    result = data.load_images(str(tmp_path / "f"), image_size=8)
    assert len(result.images) == 1
    assert [os.path.basename(p) for p, _ in result.skipped] == ["dangling.png"]
    assert "No such file" in result.skipped[0][1] or "not found" in result.skipped[0][1].lower()


def test_folder_shorter_side_resize_and_centre_crop(tmp_path):
    # A 10x30 image: left, middle and right thirds in three colours. The
    # shorter side is already 10, so the centre crop is exactly the middle.
    image = np.zeros((10, 30, 3), np.uint8)
    image[:, :10] = (255, 0, 0)
    image[:, 10:20] = (0, 255, 0)
    image[:, 20:] = (0, 0, 255)
    _save(str(tmp_path / "f" / "wide.png"), image)
    result = data.load_images(str(tmp_path / "f"), image_size=10)
    assert result.labels is None and result.class_names is None
    np.testing.assert_array_equal(result.images[0], image[:, 10:20])
    # Upscaled x2: still the middle third only.
    result = data.load_images(str(tmp_path / "f"), image_size=20)
    assert result.images.shape == (1, 20, 20, 3)
    assert np.all(result.images[0, :, 2:-2] == (0, 255, 0))


def test_folder_limit(tmp_path):
    for i in range(12):
        _save(str(tmp_path / "f" / f"{i:02d}.png"), np.full((8, 8, 3), i * 20, np.uint8))
    (tmp_path / "f" / "bad.png").write_bytes(b"not a png")
    full = data.load_images(str(tmp_path / "f"), image_size=8)
    assert len(full.images) == 12 and full.num_skipped == 1
    # `limit` picks a fixed subset of the files (bad ones included), nothing else is opened.
    a = data.load_images(str(tmp_path / "f"), image_size=8, limit=5)
    b = data.load_images(str(tmp_path / "f"), image_size=8, limit=5)
    assert len(a.images) + a.num_skipped == 5 and a.images.shape[1:] == (8, 8, 3)
    np.testing.assert_array_equal(a.images, b.images)
    assert len(np.unique(a.images[:, 0, 0, 0])) == len(a.images)


def test_folder_top_level_images_with_classes_are_skipped(tmp_path):
    _save(str(tmp_path / "f" / "cls" / "a.png"), _rgb(8, 8))
    _save(str(tmp_path / "f" / "stray.png"), _rgb(8, 8))
    result = data.load_images(str(tmp_path / "f"), image_size=8)
    assert len(result.images) == 1 and result.class_names == ["cls"]
    assert [os.path.basename(p) for p, _ in result.skipped] == ["stray.png"]


def test_empty_folder_raises(tmp_path):
    folder = tmp_path / "empty"
    folder.mkdir()
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        data.load_images(str(folder), 8)
    (folder / "readme.txt").write_text("no images")
    with pytest.raises(ValueError, match=re.escape(str(folder))):
        data.load_images(str(folder), 8)


def test_folder_without_usable_image_raises(tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "a.jpg").write_bytes(b"garbage")
    (folder / "b.png").write_bytes(b"")
    with pytest.raises(ValueError, match="could be decoded") as info:
        data.load_images(str(folder), 8)
    assert str(folder) in str(info.value)


@pytest.mark.parametrize("source", ["/no/such/place", "/no/such/file.npz", "mnist", "s3://bucket/x"])
def test_unknown_source_raises(source):
    with pytest.raises(ValueError, match="Received: data="):
        data.load_images(source, 8)


def test_bad_arguments_raise(tmp_path):
    with pytest.raises(ValueError, match="image_size"):
        data.load_images("tfds:mnist", 0)
    with pytest.raises(ValueError, match="limit"):
        data.load_images("tfds:mnist", 8, limit=0)
    with pytest.raises(ValueError, match="Malformed TFDS source"):
        data.load_images("tfds:", 8)


# --- TFDS -----------------------------------------------------------------


def test_tfds_mock_grayscale_resized():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=7):
        result = data.load_images("tfds:mnist", image_size=16)
    assert result.images.shape == (7, 16, 16, 3) and result.images.dtype == np.uint8
    np.testing.assert_array_equal(result.images[..., 0], result.images[..., 1])
    assert result.labels.shape == (7,) and result.labels.dtype == np.int64
    assert result.class_names == [str(i) for i in range(10)]
    assert result.source == "tfds:mnist:train"


def test_tfds_mock_split_in_source_and_limit():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=10):
        result = data.load_images("tfds:cifar10:test", image_size=32, split="ignored", limit=4)
    assert result.images.shape == (4, 32, 32, 3)
    assert result.source == "tfds:cifar10:test"
    assert len(result.class_names) == 10


def test_tfds_source_parsing():
    match = data.pipeline._TFDS_RE.match("tfds:imagenette/320px:1.0.0:train[:10%]")
    assert match.group("name") == "imagenette/320px:1.0.0"
    assert match.group("split") == "train[:10%]"
    match = data.pipeline._TFDS_RE.match("tfds:cifar10")
    assert match.group("name") == "cifar10" and match.group("split") is None


def test_tfds_unknown_dataset_raises():
    pytest.importorskip("tensorflow_datasets")
    with pytest.raises(ValueError, match="Unknown TFDS dataset"):
        data.load_images("tfds:no_such_dataset_xyz", 8)


# --- pipelines ------------------------------------------------------------


def _first_batches(ds, n):
    return [(a.numpy(), b.numpy()) for a, b in ds.take(n)]


def test_pretrain_dataset_shapes_and_range():
    images = data.make_shapes(24, image_size=16).images
    ds = data.pretrain_dataset(images, 8, SMALL_AUG, seed=1, autotune=False)
    v1, v2 = next(iter(ds))
    assert v1.shape == (8, 16, 16, 3) and v2.shape == (8, 16, 16, 3)
    assert v1.dtype == tf.float32 and v2.dtype == tf.float32
    assert float(tf.reduce_min(v1)) >= 0.0 and float(tf.reduce_max(v1)) <= 1.0
    assert not np.allclose(v1.numpy(), v2.numpy())
    # The batch dimension is static, as drop_remainder promises.
    assert ds.element_spec[0].shape.as_list() == [8, 16, 16, 3]
    assert data.steps_per_epoch(24, 8) == 3 and data.steps_per_epoch(25, 8) == 3


def test_pretrain_dataset_deterministic_and_fresh_each_epoch():
    # A single image: every batch holds that image, so any difference between
    # batches comes from the augmentation alone.
    images = np.repeat(data.make_shapes(1, image_size=16).images, 4, axis=0)
    ds = data.pretrain_dataset(images, 4, SMALL_AUG, seed=3, autotune=False)
    first = _first_batches(ds, 3)
    again = _first_batches(data.pretrain_dataset(images, 4, SMALL_AUG, seed=3, autotune=False), 3)
    for (a1, a2), (b1, b2) in zip(first, again):
        np.testing.assert_array_equal(a1, b1)
        np.testing.assert_array_equal(a2, b2)
    # One batch per epoch here: epochs 1, 2 and 3 must all be augmented differently.
    assert not np.allclose(first[0][0], first[1][0])
    assert not np.allclose(first[0][0], first[2][0])
    other = _first_batches(data.pretrain_dataset(images, 4, SMALL_AUG, seed=4, autotune=False), 1)
    assert not np.allclose(first[0][0], other[0][0])


# Every augmentation off: the views are the images themselves.
IDENTITY_AUG = AugmentConfig(
    image_size=8,
    crop_scale=(1.0, 1.0),
    crop_ratio=(1.0, 1.0),
    flip_prob=0.0,
    jitter_prob=0.0,
    grayscale_prob=0.0,
    blur_prob=(0.0, 0.0),
    solarize_prob=(0.0, 0.0),
)


def _id_images(num):
    """Images whose red channel is 20 x their index, so a view shows which image it is."""
    images = np.zeros((num, 8, 8, 3), np.uint8)
    images[:, :, :, 0] = (np.arange(num) * 20)[:, None, None]
    return images


def _ids(view):
    return np.round(view[:, 4, 4, 0].numpy() * 255 / 20).astype(int)


def test_in_memory_small_views_are_of_the_same_images_and_leave_the_large_views_alone():
    images = _id_images(11)
    large = dataclasses.replace(IDENTITY_AUG, image_size=16)
    multi = dataclasses.replace(large, small_views=2, small_view_fraction=0.5, small_crop_scale=(1.0, 1.0))
    pairs = data.pretrain_dataset(images, 5, large, seed=0, autotune=False)
    views = data.pretrain_dataset(images, 5, multi, seed=0, autotune=False)
    assert [spec.shape.as_list() for spec in views.element_spec] == [[5, 16, 16, 3]] * 2 + [[5, 8, 8, 3]] * 2
    for (v1, v2), (m1, m2, s1, s2) in zip(pairs.take(4), views.take(4)):
        np.testing.assert_array_equal(m1.numpy(), v1.numpy())
        np.testing.assert_array_equal(m2.numpy(), v2.numpy())
        # A whole-image crop of a flat image: each small view shows its row's image.
        np.testing.assert_array_equal(np.round(s1[:, 2, 2, 0].numpy() * 255 / 20), _ids(v1))
        np.testing.assert_array_equal(np.round(s2[:, 2, 2, 0].numpy() * 255 / 20), _ids(v1))


def test_pretrain_dataset_each_epoch_is_a_permutation():
    # The id written in each image shows the order the pipeline serves them in.
    ds = data.pretrain_dataset(_id_images(11), 5, IDENTITY_AUG, seed=0, autotune=False)
    ids = [_ids(v1) for v1, _ in ds.take(6)]
    epochs = [np.concatenate(ids[0:2]), np.concatenate(ids[2:4]), np.concatenate(ids[4:6])]
    for epoch in epochs:
        # 2 full batches per epoch; the 11th image is the dropped remainder.
        assert len(set(epoch.tolist())) == 10 and set(epoch.tolist()) <= set(range(11))
    assert not np.array_equal(epochs[0], epochs[1])


def test_pretrain_dataset_start_batch_continues_the_same_stream():
    # The stream is a pure function of (seed, batch index): starting at batch s
    # serves exactly batches s, s+1, ... of the stream started at 0, across epochs.
    images = data.make_shapes(20, image_size=16).images  # 2 batches of 8 an epoch
    full = _first_batches(data.pretrain_dataset(images, 8, SMALL_AUG, seed=2, autotune=False), 7)
    for start in (1, 2, 5):
        part = _first_batches(
            data.pretrain_dataset(images, 8, SMALL_AUG, seed=2, autotune=False, start_step=start), 7 - start
        )
        for (a1, a2), (b1, b2) in zip(full[start:], part):
            np.testing.assert_array_equal(a1, b1)
            np.testing.assert_array_equal(a2, b2)
    # Far-away positions are computed directly, not by iterating up to them.
    far = data.pretrain_dataset(images, 8, SMALL_AUG, seed=2, autotune=False, start_step=10**12)
    v1, _ = next(iter(far))
    assert v1.shape == (8, 16, 16, 3)
    with pytest.raises(ValueError, match="start_step=-1"):
        data.pretrain_dataset(images, 8, SMALL_AUG, start_step=-1)


def test_pretrain_dataset_labels_follow_their_images():
    images = _id_images(11)
    labels = (np.arange(11) * 7) % 4  # any labels, known per image
    source = data.ImageSet(images, labels)
    plain = data.pretrain_dataset(source, 5, SMALL_AUG, seed=0, autotune=False)
    labelled = data.pretrain_dataset(source, 5, SMALL_AUG, seed=0, autotune=False, with_labels=True)
    for (v1, v2), ((l1, l2), y) in zip(plain.take(4), labelled.take(4)):
        # Labels change nothing in the views.
        np.testing.assert_array_equal(v1.numpy(), l1.numpy())
        np.testing.assert_array_equal(v2.numpy(), l2.numpy())
        assert y.dtype == tf.int64 and y.shape == (5,)
    identity = data.pretrain_dataset(source, 5, IDENTITY_AUG, seed=0, autotune=False, with_labels=True)
    for (v1, _), y in identity.take(4):
        np.testing.assert_array_equal(y.numpy(), labels[_ids(v1)])
    with pytest.raises(ValueError, match=r"labels with shape=\(3,\)"):
        data.ImageSet(images, np.zeros(3, int))
    with pytest.raises(ValueError, match="unlabelled"):
        data.pretrain_dataset(images, 5, SMALL_AUG, with_labels=True)


def test_pretrain_dataset_too_small_raises():
    images = np.zeros((5, 8, 8, 3), np.uint8)
    with pytest.raises(ValueError, match=r"5 images, batch_size=8"):
        data.pretrain_dataset(images, 8, SMALL_AUG)


def test_eval_dataset_keeps_order_and_remainder():
    shapes = data.make_shapes(10, image_size=16)
    ds = data.eval_dataset(shapes, image_size=8, batch_size=4)
    batches = list(ds)
    assert [len(y) for _, y in batches] == [4, 4, 2]
    labels = np.concatenate([y.numpy() for _, y in batches])
    np.testing.assert_array_equal(labels, shapes.labels)
    x = batches[0][0]
    assert x.shape == (4, 8, 8, 3) and x.dtype == tf.float32
    assert 0.0 <= float(tf.reduce_min(x)) and float(tf.reduce_max(x)) <= 1.0
    # Unlabelled arrays get label -1; the images are the same.
    only_images = list(data.eval_dataset(shapes.images, image_size=8, batch_size=4))
    np.testing.assert_array_equal(only_images[0][0].numpy(), x.numpy())
    assert set(only_images[0][1].numpy().tolist()) == {-1}


# --- generated shapes -----------------------------------------------------


def test_make_shapes():
    a = data.make_shapes(200, image_size=24, seed=5)
    b = data.make_shapes(200, image_size=24, seed=5)
    c = data.make_shapes(200, image_size=24, seed=6)
    np.testing.assert_array_equal(a.images, b.images)
    np.testing.assert_array_equal(a.labels, b.labels)
    assert not np.array_equal(a.images, c.images)
    assert a.images.shape == (200, 24, 24, 3) and a.images.dtype == np.uint8
    assert a.labels.dtype == np.int64
    assert np.bincount(a.labels).tolist() == [20] * 10
    assert a.class_names == list(data.SHAPE_CLASSES)
    assert a.images.min() < 30 and a.images.max() > 225
    # Every image shows two clearly different colours (shape vs background).
    spread = a.images.reshape(200, -1, 3).astype(int)
    assert np.all((spread.max(axis=1) - spread.min(axis=1)).max(axis=1) > 60)
    small = data.make_shapes(7, num_classes=3)
    assert sorted(np.bincount(small.labels).tolist()) == [2, 2, 3]
    assert small.class_names == ["circle", "square", "triangle"]


def test_make_shapes_not_solved_by_mean_colour():
    # The class must not be readable from colour statistics: the mean colours
    # of the classes overlap (nearest class-mean colour is near chance).
    s = data.make_shapes(2000, image_size=16, seed=0)
    colour = s.images.reshape(2000, -1, 3).mean(axis=1)
    centres = np.stack([colour[s.labels == k].mean(axis=0) for k in range(10)])
    guess = np.argmin(((colour[:, None] - centres[None]) ** 2).sum(-1), axis=1)
    assert (guess == s.labels).mean() < 0.25


@pytest.mark.parametrize(
    "kwargs", [{"num_images": 0}, {"num_images": 5, "num_classes": 11}, {"num_images": 5, "image_size": 4}]
)
def test_make_shapes_bad_arguments(kwargs):
    with pytest.raises(ValueError, match="Received"):
        data.make_shapes(**kwargs)
