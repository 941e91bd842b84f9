"""The command lines, run as a user would, in subprocesses."""

import json
import zipfile
import os
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_script(name, *args, timeout=300):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", name), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )


# Runs a script once per case in one Python (TensorFlow imported once, not once a case):
# each case parses its own flags from their defaults; exit status and output are kept.
_CASES_DRIVER = """
import contextlib, io, json, runpy, sys
from absl import flags
script, cases, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
results = []
for args in cases:
    flags.FLAGS.unparse_flags()
    sys.argv = [script, *args]
    stdout, stderr, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            runpy.run_path(script, run_name="__main__")
        except SystemExit as error:
            code = error.code if isinstance(error.code, int) else int(error.code is not None)
    results.append([code, stdout.getvalue(), stderr.getvalue()])
    with open(out, "w") as f:
        json.dump(results, f)
"""


def run_script_cases(name, cases, tmp_path, timeout=300):
    """`run_script(name, *args)` for each `args` of `cases`, in one process: [(returncode, stdout, stderr)]."""
    out = str(tmp_path / f"{name}.cases.json")
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=ROOT)
    script = os.path.join(ROOT, "scripts", name)
    result = subprocess.run(
        [sys.executable, "-c", _CASES_DRIVER, script, json.dumps([list(c) for c in cases]), out],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=ROOT,
    )
    assert os.path.isfile(out), result.stderr[-3000:]
    with open(out) as f:
        results = json.load(f)
    assert len(results) == len(cases), result.stderr[-3000:]  # a case that crashed the process
    return results


TINY = ["--preset=demo", "--epochs=2", "--limit=256", "--batch_size=64", "--verbose=0", "--warmup_epochs=0"]


def colour_npz(path, num, seed, size=32):
    """uint8 images whose class (of 3) is the dominant colour channel: any encoder's kNN separates them."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num) % 3)
    x = 0.3 * rng.random((num, size, size, 3))
    x[np.arange(num), :, :, labels] += 0.7
    np.savez(path, x=np.round(255 * x).astype(np.uint8), y=labels.astype(np.int64))
    return str(path)


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("runs")
    out = str(folder / "demo")
    # Labelled data whose answer is known, with the online linear probe; the views are smaller
    # than the encoder's 32 px.
    train, test = colour_npz(folder / "train.npz", 256, 0), colour_npz(folder / "test.npz", 120, 1)
    flags = ["--probe", "--probe_lr=0.05", "--view_size=24", "--crop_scale=0.3,0.9", "--augment=blur_sigma=0.2,1.5"]
    result = run_script("pretrain.py", *TINY, f"--data={train}", f"--eval_data={test}", *flags, f"--out={out}")
    assert result.returncode == 0, result.stderr[-3000:]
    return out, result


def test_pretrain_writes_the_run_folder(demo_run):
    out, result = demo_run
    for name in (
        "config.json",
        "metrics.csv",
        "encoder.keras",
        "summary.json",
        "checkpoints/byol.keras",
        "metrics.png",
        "embedding_map.png",
    ):
        assert os.path.getsize(os.path.join(out, name)) > 0, name
    assert os.listdir(os.path.join(out, "tensorboard"))
    summary = json.load(open(os.path.join(out, "summary.json")))
    # 256 images / 64 per batch = 4 steps per epoch, 2 epochs: tau ends just below 1.
    assert summary["steps"] == summary["total_steps"] == 8
    # Trained on 24 px views; evaluated, saved and served at 32 px.
    assert (summary["view_size"], summary["image_size"]) == (24, 32)
    augment = json.load(open(os.path.join(out, "config.json")))["augment"]
    assert augment["crop_scale"] == [0.3, 0.9] and augment["blur_sigma"] == [0.2, 1.5]
    encoder_config = zipfile.ZipFile(os.path.join(out, "encoder.keras")).read("config.json").decode()
    assert '"batch_shape": [null, 32, 32, 3]' in encoder_config
    assert 0.99 < summary["final"]["tau"] < 1.0
    # The classes are the dominant colour: the kNN monitor separates them
    # from any encoder's features, trained or at its random init (chance: 1/3).
    assert summary["knn_acc"] >= 0.95 and summary["knn_acc_random_init"] >= 0.95, summary
    assert "kNN top-1 (k=200)" in result.stdout
    header = open(os.path.join(out, "metrics.csv")).readline()
    for key in ("loss", "tau", "lr", "collapse_std", "knn_acc", "probe_acc", "val_probe_acc"):
        assert key in header
    # The probe is validated with the kNN monitor: every epoch here (--knn_every=1).
    # 8 steps train the probe only part way (the views' colour jitter and
    # grayscale blur the colour); on the 120 held-out images chance is 1/3
    # with a std of 0.043, so 0.5 is about 4 std above chance.
    assert summary["final"]["val_probe_acc"] > 0.5, summary["final"]
    assert "Online linear probe:" in result.stdout


def test_run_logs_its_strategy(demo_run):
    _, result = demo_run
    assert "strategy=_DefaultDistributionStrategy replicas=1" in result.stdout
    assert json.load(open(os.path.join(demo_run[0], "summary.json")))["status"] == "finished"


def test_finished_run_is_not_overwritten(demo_run):
    out, _ = demo_run
    before = open(os.path.join(out, "summary.json")).read()
    result = run_script("pretrain.py", *TINY, f"--out={out}")
    assert result.returncode != 0
    assert "--overwrite" in result.stderr and out in result.stderr
    assert open(os.path.join(out, "summary.json")).read() == before


# Each flag, then what its error must name; the case that configures two CPU replicas goes last.
BAD_FLAGS = [
    ("--epochs=-1", "--epochs=-1"),
    ("--batch_size=0", "--batch_size=0"),
    ("--backbone=resnet7", "backbone='resnet7'"),
    ("--preset=nope", "--preset=nope"),
    ("--data=/no/such/dir", "--data=/no/such/dir"),
    ("--image_size=4", "--image_size=4"),
    ("--view_size=4", "--view_size=4"),
    ("--predictor_lr_scale=0", "--predictor_lr_scale=0"),
    # Too small for the backbone (keras.applications ResNet50 needs 32 px).
    ("--backbone=resnet50 --image_size=16", "--image_size=16"),
    ("--backup_every_steps=0", "--backup_every_steps=0"),
    ("--limit=0", "--limit=0"),
    ("--cpu_replicas=0", "--cpu_replicas=0"),
    ("--collapse_patience=0", "--collapse_patience=0"),
    ("--collapse_threshold=-1", "--collapse_threshold=-1"),
    ("--on_collapse=maybe", "--on_collapse=maybe"),
    ("--strategy=nope", "--strategy=nope"),
    ("--precision=fp8", "--precision=fp8"),
    ("--crop_scale=0,1", "--crop_scale=(0.0, 1.0)"),
    ("--crop_scale=0.2", "--crop_scale=0.2"),
    ("--crop_scale=0.2,1 --preset=fsdd_audio", "--crop_scale=0.2,1, --preset=fsdd_audio"),
    ("--augment=nope=1", "--augment=nope=1"),
    ("--augment=brightness=1.5", "--augment=brightness=1.5"),
    ("--augment=blur_sigma=1", "--augment=blur_sigma=1"),
    ("--augment=crop_scale=0.3,1 --crop_scale=0.2,1", "--crop_scale=0.2,1"),
    ("--augment=small_views=2 --augment=small_view_fraction=0.2", "--augment=small_view_fraction=0.2"),
    ("--augment=small_views=-2", "--augment=small_views=-2"),
    ("--augment=small_views=2 --augment_on=device", "--augment_on='device'"),
    ("--probe_lr=0", "--probe_lr=0"),
    ("--time_budget=1m", "--epochs=2, --time_budget=1m"),  # TINY sets --epochs
    # The global batch must split over the replicas.
    ("--cpu_replicas=2 --batch_size=33", "--batch_size=33"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad_flags")
    cases = [[*TINY, *flag.split(), f"--out={folder / str(i)}"] for i, (flag, _) in enumerate(BAD_FLAGS)]
    return folder, run_script_cases("pretrain.py", cases, folder)


@pytest.mark.parametrize("index", range(len(BAD_FLAGS)), ids=[flag for flag, _ in BAD_FLAGS])
def test_bad_flags_fail_before_any_work(bad_flag_runs, index):
    folder, results = bad_flag_runs
    returncode, _, stderr = results[index]
    assert returncode != 0
    assert BAD_FLAGS[index][1] in stderr, stderr[-2000:]
    assert not os.path.exists(folder / str(index))


def test_probe_on_unlabelled_data_fails_naming_it(tmp_path):
    path = str(tmp_path / "x.npz")
    np.savez(path, x=np.zeros((256, 32, 32, 3), np.uint8))
    out = str(tmp_path / "run")
    result = run_script("pretrain.py", *TINY, "--probe", f"--data={path}", f"--out={out}", timeout=120)
    assert result.returncode != 0
    assert f"--data={path}" in result.stderr and "--probe" in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(out)


def test_folder_without_usable_image_fails_naming_it(tmp_path):
    folder = tmp_path / "junk"
    folder.mkdir()
    (folder / "a.jpg").write_text("not an image")
    (folder / "b.png").write_bytes(b"")
    out = str(tmp_path / "run")
    result = run_script("pretrain.py", *TINY, f"--data={folder}", f"--out={out}", timeout=120)
    assert result.returncode != 0
    # Files are only listed before training (streaming): too few for one batch is refused, naming the folder.
    assert str(folder) in result.stderr and "Not enough images for one batch" in result.stderr, result.stderr[-2000:]
    assert not os.path.exists(out)
