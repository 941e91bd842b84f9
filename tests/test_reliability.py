"""Reliability: exact resume after SIGKILL, NaN and collapse guards, hostile image folders.

Tiny runs: the demo preset with resnet_tiny at 16 px, a few dozen images.
"""

import io
import json
import os
import signal
import subprocess
import sys
import time
import zipfile

import h5py
import keras
import numpy as np
import pytest
from PIL import Image

from byol_tf import backup as backups
from byol_tf import data, training
from byol_tf.presets import get_preset

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _script(*args, env=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT, **(env or {}))
    return subprocess.Popen(
        # byol-pretrain, plus the pause hook that BYOL_TF_TEST_PAUSE_AT_STEP turns on.
        [sys.executable, os.path.join(ROOT, "tests", "workers", "pretrain.py"), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
        cwd=ROOT,
    )


def _finish(process, timeout=400):
    out, err = process.communicate(timeout=timeout)
    return process.returncode, out, err


def _h5_arrays(keras_file):
    """Every array in the weights of a `.keras` file, by path (weights and optimizer)."""
    with zipfile.ZipFile(keras_file) as archive:
        blob = archive.read("model.weights.h5")
    arrays = {}
    with h5py.File(io.BytesIO(blob), "r") as f:
        f.visititems(lambda name, obj: arrays.__setitem__(name, obj[()]) if isinstance(obj, h5py.Dataset) else None)
    return arrays


# 128 images / 32 = 4 steps an epoch, 3 epochs = 12 steps; backups at steps 5 and 10.
RESUME_ARGS = [
    "--preset=demo",
    "--backbone=resnet_tiny",
    "--image_size=16",
    "--limit=128",
    "--batch_size=32",
    "--epochs=3",
    "--warmup_epochs=0",
    "--verbose=0",
    "--knn_every=100",
    "--backup_every_steps=5",
    "--deterministic",
    "--seed=3",
]


def test_resume_after_sigkill_is_bit_identical(tmp_path):
    straight, killed = str(tmp_path / "straight"), str(tmp_path / "killed")
    marker = str(tmp_path / "paused.json")
    # Both start at once: the uninterrupted run, and one parked after step 7
    # (the backup of step 5 is written; step 7 is mid-epoch 2) and SIGKILLed there.
    reference = _script(*RESUME_ARGS, f"--out={straight}")
    victim = _script(
        *RESUME_ARGS, f"--out={killed}", env={"BYOL_TF_TEST_PAUSE_AT_STEP": "7", "BYOL_TF_TEST_PAUSE_MARKER": marker}
    )
    deadline = time.time() + 400
    while not os.path.exists(marker):
        assert victim.poll() is None, victim.communicate()[1][-3000:]
        assert time.time() < deadline, "the run never reached step 7"
        time.sleep(0.2)
    victim.send_signal(signal.SIGKILL)
    victim.communicate()
    assert victim.returncode == -signal.SIGKILL
    saved = backups.read_backup(os.path.join(killed, "backup"))
    assert saved["step"] == 5 and saved["epoch"] == 1 and saved["batch_in_epoch"] == 1
    assert not os.path.exists(os.path.join(killed, "summary.json"))

    # Another configuration must not resume this run: it names the fields and values.
    code, _, err = _finish(_script(*RESUME_ARGS, "--batch_size=16", "--seed=4", f"--out={killed}"), timeout=200)
    assert code != 0
    assert "batch_size: 32" in err and "vs 16 now" in err and "seed: 3" in err, err[-2000:]
    assert backups.read_backup(os.path.join(killed, "backup"))["step"] == 5

    code, out, err = _finish(_script(*RESUME_ARGS, f"--out={killed}"))
    assert code == 0, err[-3000:]
    assert f"Resumed from step 5 (backup in {os.path.join(killed, 'backup')})" in out
    code, _, err = _finish(reference)
    assert code == 0, err[-3000:]

    for run in (straight, killed):
        summary = json.load(open(os.path.join(run, "summary.json")))
        assert summary["status"] == "finished" and summary["steps"] == 12
        assert not os.path.exists(os.path.join(run, "backup"))
        epochs = [line.split(",")[0] for line in open(os.path.join(run, "metrics.csv")).read().split()[1:]]
        assert epochs == ["0", "1", "2"], epochs  # one row per epoch, none repeated by the resume
    for name in ("checkpoints/byol.keras", "encoder.keras"):
        a, b = _h5_arrays(os.path.join(straight, name)), _h5_arrays(os.path.join(killed, name))
        assert a.keys() == b.keys() and len(a) > 20
        different = [k for k in a if not np.array_equal(a[k], b[k])]
        assert not different, f"{name}: {len(different)} arrays differ, e.g. {different[:5]}"
    # What was compared includes the optimizer's state, not only the model's
    # variables (which hold the online and target networks and tau).
    keys = _h5_arrays(os.path.join(killed, "checkpoints/byol.keras")).keys()
    assert any(k.startswith("optimizer/vars/") for k in keys) and any(k.startswith("vars/") for k in keys)


# --- guards, in-process -----------------------------------------------------------


def _tiny_config(**overrides):
    values = dict(
        backbone="resnet_tiny",
        image_size=16,
        batch_size=16,
        epochs=3,
        warmup_epochs=0,
        projector_hidden=32,
        projection_dim=16,
        predictor_hidden=32,
    )
    values.update(overrides)
    return get_preset("demo", **values)


@pytest.fixture(scope="module")
def tiny_images():
    return data.make_shapes(64, image_size=16, seed=0)  # 4 steps an epoch at batch 16


class PoisonAt(keras.callbacks.Callback):
    """Sets an encoder kernel to NaN just before the optimizer step with this 0-based index."""

    def __init__(self, step):
        super().__init__()
        self.step = step

    def on_train_batch_begin(self, batch, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            kernel = next(v for v in self.model.encoder.trainable_variables if len(v.shape) == 4)
            kernel.assign(np.full(kernel.shape, np.nan, "float32"))


def _all_finite(arrays):
    return all(np.all(np.isfinite(v)) for v in arrays.values() if np.issubdtype(np.asarray(v).dtype, np.floating))


def test_nan_stops_and_keeps_the_last_good_checkpoint(tmp_path, tiny_images, capsys):
    out = str(tmp_path / "run")
    # Step 5 (0-based) is the second step of epoch 2: the epoch-end checkpoint of
    # step 4 and the backup of step 4 are the last good states.
    summary = training.run_pretraining(
        _tiny_config(),
        tiny_images,
        out,
        backup_every_steps=2,
        verbose=0,
        autotune=False,
        callbacks=[PoisonAt(5)],
    )
    printed = capsys.readouterr().out
    assert summary["status"] == "stopped_nan"
    assert summary["steps"] == 6
    assert json.load(open(os.path.join(out, "summary.json")))["status"] == "stopped_nan"
    checkpoint = os.path.join(out, "checkpoints", "byol.keras")
    assert "step 6" in summary["message"] and checkpoint in printed and "Last good state" in printed
    arrays = _h5_arrays(checkpoint)
    assert _all_finite(arrays)
    model = keras.saving.load_model(checkpoint, safe_mode=True)
    assert int(model.optimizer.iterations.numpy()) == 4
    saved = backups.read_backup(os.path.join(out, "backup"))
    assert saved["step"] == 4
    with h5py.File(saved["weights_path"], "r") as f:
        values = []
        f.visititems(lambda name, obj: values.append(obj[()]) if isinstance(obj, h5py.Dataset) else None)
    assert all(np.all(np.isfinite(v)) for v in values if np.issubdtype(np.asarray(v).dtype, np.floating))
    # No encoder is exported from a NaN state.
    assert not os.path.exists(os.path.join(out, "encoder.keras"))


def _constant_backbone():
    """An encoder that outputs the same features for every image: a collapsed network."""
    return keras.Sequential(
        [
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 1, kernel_initializer="zeros", bias_initializer="ones", trainable=False),
            keras.layers.GlobalAveragePooling2D(),
        ]
    )


@pytest.mark.parametrize("action", ["stop", "warn"])
def test_collapse_is_detected_within_patience(tmp_path, tiny_images, capsys, action):
    out = str(tmp_path / "run")
    summary = training.run_pretraining(
        _tiny_config(epochs=2),
        tiny_images,
        out,
        verbose=0,
        autotune=False,
        backbone=_constant_backbone(),
        collapse_patience=3,
        on_collapse=action,
    )
    printed = capsys.readouterr().out
    if action == "stop":
        assert summary["status"] == "stopped_collapse"
        assert summary["steps"] == 3  # detected at the K-th collapsed step
        assert "collapse_std stayed below" in summary["message"]
        assert "No good checkpoint" in printed  # it was collapsed from the start
        assert not os.path.exists(os.path.join(out, "encoder.keras"))
    else:
        assert summary["status"] == "finished" and summary["steps"] == 8
        assert "WARNING: Representation collapse" in printed
    assert json.load(open(os.path.join(out, "summary.json")))["status"] == summary["status"]


def test_healthy_run_does_not_trip_the_collapse_guard(tmp_path, tiny_images):
    summary = training.run_pretraining(
        _tiny_config(epochs=1), tiny_images, str(tmp_path / "run"), verbose=0, autotune=False, collapse_patience=1
    )
    assert summary["status"] == "finished"


def test_resume_refuses_other_data(tmp_path, tiny_images):
    out = str(tmp_path / "run")
    training.run_pretraining(
        _tiny_config(epochs=2),
        tiny_images,
        out,
        verbose=0,
        autotune=False,
        callbacks=[PoisonAt(5)],
        backup_every_steps=1,
    )
    os.remove(os.path.join(out, "summary.json"))  # as if killed, with its backup of step 5
    fewer = data.ImageSet(images=tiny_images.images[:48], labels=tiny_images.labels[:48], source="fewer")
    with pytest.raises(ValueError, match="num_train_images: 64 in the backup vs 48 now"):
        training.run_pretraining(_tiny_config(epochs=2), fewer, out, verbose=0, autotune=False)


# --- hostile image folders --------------------------------------------------------


def _rgb(h, w, seed):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _encoded(image, fmt, **kwargs):
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return buffer.getvalue()


def _hostile_folder(root):
    """A folder of good images, odd-but-valid images and bad files; returns (good, bad) names."""
    os.makedirs(root)
    good, bad = set(), {}

    def write(name, payload):
        with open(os.path.join(os.fsencode(root), os.fsencode(name) if isinstance(name, str) else name), "wb") as f:
            f.write(payload)

    for i in range(24):
        write(f"plain{i:02d}.png", _encoded(Image.fromarray(_rgb(20, 20, i)), "PNG"))
        good.add(f"plain{i:02d}.png")
    photo = Image.fromarray(_rgb(64, 64, 99))
    odd = {
        "cmyk.jpg": _encoded(Image.new("CMYK", (24, 24), (200, 30, 10, 0)), "JPEG"),
        "deep16.png": _encoded(Image.fromarray((np.arange(24 * 24).reshape(24, 24) * 100).astype(np.uint16)), "PNG"),
        "gray.png": _encoded(Image.fromarray(_rgb(20, 20, 1)[..., 0]), "PNG"),
        "rgba.png": _encoded(Image.fromarray(np.dstack([_rgb(20, 20, 2), np.full((20, 20), 90, np.uint8)])), "PNG"),
        "anim.gif": _encoded(
            Image.fromarray(_rgb(20, 20, 3)), "GIF", save_all=True, append_images=[Image.fromarray(_rgb(20, 20, 4))]
        ),
        "photo.JPEG": _encoded(photo, "JPEG"),
        "pic.bmp": _encoded(Image.fromarray(_rgb(20, 20, 5)), "BMP"),
        "pic.webp": _encoded(Image.fromarray(_rgb(20, 20, 6)), "WEBP"),
    }
    for name, payload in odd.items():
        write(name, payload)
        good.add(name)
    latin1 = b"caf\xe9.png"  # not valid UTF-8
    write(latin1, _encoded(Image.fromarray(_rgb(20, 20, 7)), "PNG"))
    good.add(os.fsdecode(latin1))

    bad["empty.jpg"] = "empty file"
    write("empty.jpg", b"")
    bad["truncated.jpg"] = "JPEG"
    write("truncated.jpg", _encoded(photo, "JPEG")[:300])
    bad["truncated.png"] = "PNG"
    write("truncated.png", _encoded(photo, "PNG")[:400])
    bad["notes.jpg"] = "Unknown image file format"
    write("notes.jpg", b"this is a text file, not a JPEG\n")
    bad["huge.png"] = "too large: 8000x8000"
    write("huge.png", _encoded(Image.new("L", (8000, 8000)), "PNG"))
    bad["loop_a.png"] = "symbolic links"
    bad["loop_b.png"] = "symbolic links"
    os.symlink(os.path.join(root, "loop_b.png"), os.path.join(root, "loop_a.png"))
    os.symlink(os.path.join(root, "loop_a.png"), os.path.join(root, "loop_b.png"))
    bad["self.png"] = "symbolic links"
    os.symlink(os.path.join(root, "self.png"), os.path.join(root, "self.png"))
    bad["dangling.png"] = "No such file"
    os.symlink(os.path.join(root, "missing.png"), os.path.join(root, "dangling.png"))
    # (A folder link back up the tree would make this a labelled folder; test_data covers it.)
    write("locked.png", _encoded(Image.fromarray(_rgb(20, 20, 8)), "PNG"))
    os.chmod(os.path.join(root, "locked.png"), 0)
    try:
        open(os.path.join(root, "locked.png"), "rb").close()
        good.add("locked.png")  # root (as in CI containers) reads it anyway: then it is a good file
    except PermissionError:
        bad["locked.png"] = "Permission denied"
    return good, bad


def test_hostile_folder_is_loaded_and_trained_on(tmp_path):
    root = str(tmp_path / "hostile")
    good, bad = _hostile_folder(root)
    result = data.load_images(root, image_size=16)
    skipped = {os.path.basename(p): reason for p, reason in result.skipped}
    assert set(skipped) == set(bad), (sorted(skipped), sorted(bad))
    for name, expected in bad.items():
        assert expected in skipped[name], (name, skipped[name])
    assert result.num_skipped == len(bad) and len(result) == len(good)
    assert result.images.shape == (len(good), 16, 16, 3)
    # The CMYK JPEG keeps its colour (mostly cyan-free red), not garbage.
    names = sorted(good, key=lambda n: os.fsencode(n))
    cmyk = result.images[names.index("cmyk.jpg")].reshape(-1, 3).mean(0)
    expected = np.asarray(Image.new("CMYK", (1, 1), (200, 30, 10, 0)).convert("RGB")).reshape(3)
    assert np.abs(cmyk - expected).max() < 40, (cmyk, expected)

    summary = training.run_pretraining(_tiny_config(epochs=1), result, str(tmp_path / "run"), verbose=0, autotune=False)
    assert summary["status"] == "finished" and summary["num_skipped"] == len(bad)


def test_folder_without_usable_image_names_it(tmp_path):
    root = str(tmp_path / "hopeless")
    os.makedirs(root)
    open(os.path.join(root, "a.jpg"), "wb").close()
    with open(os.path.join(root, "b.png"), "w") as f:
        f.write("text")
    with pytest.raises(ValueError, match="could be decoded") as info:
        data.load_images(root, 16)
    assert root in str(info.value)


def test_header_sizes_without_decoding(tmp_path):
    for fmt, ext in (("PNG", "png"), ("JPEG", "jpg"), ("GIF", "gif"), ("BMP", "bmp"), ("WEBP", "webp")):
        path = str(tmp_path / f"x.{ext}")
        Image.fromarray(_rgb(13, 29, 0)).save(path, fmt)
        with open(path, "rb") as f:
            assert data.files.header_size(f.read()) == (29, 13), fmt


def test_resume_in_process_after_a_nan_stop(tmp_path, tiny_images, capsys):
    # A NaN at step 6 (0-based) stops the run with its backup of step 6 kept; a
    # rerun (summary removed, as after a kill) resumes there and finishes, and
    # the NaN epoch's metrics row is replaced, not repeated.
    out = str(tmp_path / "run")
    config = _tiny_config(epochs=2)
    stopped = training.run_pretraining(
        config, tiny_images, out, verbose=0, autotune=False, backup_every_steps=1, callbacks=[PoisonAt(6)]
    )
    assert stopped["status"] == "stopped_nan"
    assert backups.read_backup(os.path.join(out, "backup"))["step"] == 6
    os.remove(os.path.join(out, "summary.json"))
    capsys.readouterr()
    summary = training.run_pretraining(config, tiny_images, out, verbose=0, autotune=False)
    assert f"Resumed from step 6 (backup in {os.path.join(out, 'backup')})" in capsys.readouterr().out
    assert summary["status"] == "finished" and summary["steps"] == 8 and summary["resumed_from_step"] == 6
    rows = open(os.path.join(out, "metrics.csv")).read().split()[1:]
    assert [r.split(",")[0] for r in rows] == ["0", "1"] and "nan" not in rows[1].lower()
    assert _all_finite(_h5_arrays(os.path.join(out, "checkpoints", "byol.keras")))


def test_resume_accepts_a_config_written_before_newer_fields(tmp_path):
    config = get_preset("demo")
    saved = config.to_dict()
    # A run folder from before the online probe existed.
    del saved["probe"], saved["probe_lr"]
    (tmp_path / "config.json").write_text(json.dumps(saved))
    assert training.check_resume(str(tmp_path), config) is False  # nothing to resume, and no refusal
    with pytest.raises(ValueError, match="epochs: 12 in .* vs 13 now"):
        training.check_resume(str(tmp_path), get_preset("demo", epochs=13))
