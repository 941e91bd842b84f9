"""scripts/benchmark.py in tiny configurations, benchmarks/augment_stages.py, and the
mixed-precision fast path checked against the float32 reference path."""

import os
import re
import subprocess
import sys
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf import losses
from byol_tf.presets import get_preset
from byol_tf.build import build_byol
from test_scripts import run_script_cases

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
    "--backbone=resnet_tiny",
    "--image_size=16",
    "--batch_size=8",
    "--steps=3",
    "--warmup=1",
    "--projector_hidden=32",
]


RUNS = [
    ["--what=augment", *TINY],
    ["--what=step", *TINY, "--nofast_kernels"],
    ["--what=fit", *TINY[:-2], "--steps=4", "--warmup=2", "--steps_per_execution=2", "--projector_hidden=32"],
]


@pytest.fixture(scope="module")
def benchmark_runs(tmp_path_factory):
    return run_script_cases("benchmark.py", RUNS, tmp_path_factory.mktemp("benchmark"))


@pytest.mark.parametrize("index", range(len(RUNS)), ids=["augment", "step", "fit"])
def test_benchmark_prints_images_per_sec(benchmark_runs, index):
    args = RUNS[index]
    returncode, stdout, stderr = benchmark_runs[index]
    result = types.SimpleNamespace(returncode=returncode, stdout=stdout, stderr=stderr)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.strip().splitlines()
    match = re.fullmatch(r"images_per_sec=(\S+)", lines[-1])
    assert match, result.stdout
    median = re.search(r"^median_step_s=(\d+\.\d+)$", result.stdout, re.M)
    assert median, result.stdout
    # The rate is the images over the time that the script prints: all
    # `--steps` batches of 8 over `elapsed_s` for augment, one batch over the
    # median step otherwise. Seconds print to 1e-6, the rate to 1e-3: the two
    # roundings add (half of 1e-3, and the rate's share of 1e-6 s, with a margin).
    if "--what=augment" in args:
        seconds, images = float(re.search(r"^elapsed_s=(\d+\.\d+)$", result.stdout, re.M).group(1)), 3 * 8
        assert re.search(r"^warmup_s=\d+\.\d+$", result.stdout, re.M), result.stdout
    else:
        seconds, images = float(median.group(1)), 8
    assert seconds > 0
    rate = images / seconds
    assert float(match.group(1)) == pytest.approx(rate, rel=0, abs=0.5e-3 + rate * 0.6e-6 / seconds)
    assert "tensorflow=" in result.stdout and "devices=" in result.stdout
    assert "backbone=resnet_tiny image_size=16 batch_size=8" in result.stdout
    assert f"fast_kernels={'--nofast_kernels' not in args}" in result.stdout


BAD_FLAGS = [
    ("--what=nope", "--what"),
    ("--batch_size=0", "--batch_size=0"),
    ("--steps=0", "--steps=0"),
    ("--precision=float8", "--precision"),
    ("--backbone=resnet7", "--backbone='resnet7'"),
]


@pytest.fixture(scope="module")
def bad_flag_runs(tmp_path_factory):
    cases = [["--what=step", *TINY, flag] for flag, _ in BAD_FLAGS]
    return run_script_cases("benchmark.py", cases, tmp_path_factory.mktemp("bad_flags"))


@pytest.mark.parametrize("index", range(len(BAD_FLAGS)), ids=[flag for flag, _ in BAD_FLAGS])
def test_bad_flags_fail_naming_the_flag(bad_flag_runs, index):
    returncode, stdout, stderr = bad_flag_runs[index]
    assert returncode != 0
    assert BAD_FLAGS[index][1] in stderr, stderr[-2000:]
    assert "images_per_sec=" not in stdout


def _forward_loss(model, view1, view2):
    """The BYOL loss of `train_step`, through a forward pass only."""
    z1 = model.target_projector(model.target_encoder(view1, training=True), training=True)
    z2 = model.target_projector(model.target_encoder(view2, training=True), training=True)
    p1 = model.predictor(model.projector(model.encoder(view1, training=True), training=True), training=True)
    p2 = model.predictor(model.projector(model.encoder(view2, training=True), training=True), training=True)
    return p1, tf.reduce_mean(losses.symmetric_loss(p1, p2, z1, z2))


def test_mixed_bfloat16_loss_matches_float32():
    config = get_preset(
        "imagenet",
        backbone="resnet_tiny",
        image_size=16,
        batch_size=8,
        projector_hidden=32,
        predictor_hidden=32,
        projection_dim=16,
    )
    rng = np.random.default_rng(0)
    view1 = tf.constant(rng.random((8, 16, 16, 3), dtype=np.float32))
    view2 = tf.constant(np.clip(view1.numpy() + 0.1 * rng.standard_normal(view1.shape), 0, 1).astype(np.float32))
    results = {}
    reference_weights = None
    try:
        for policy in ("float32", "mixed_bfloat16"):
            keras.mixed_precision.set_global_policy(policy)
            keras.utils.set_random_seed(0)
            model = build_byol(config)
            if reference_weights is None:
                reference_weights = model.get_weights()
            else:
                # Same model: the variables are float32 under both policies.
                model.set_weights(reference_weights)
            results[policy] = _forward_loss(model, view1, view2)
    finally:
        keras.mixed_precision.set_global_policy("float32")
    p_ref, loss_ref = results["float32"]
    p_fast, loss_fast = results["mixed_bfloat16"]
    # The fast path really computes in bfloat16, and the loss comes back in float32.
    assert p_ref.dtype == tf.float32 and p_fast.dtype == tf.bfloat16
    assert loss_ref.dtype == tf.float32 and loss_fast.dtype == tf.float32
    assert 0.0 < float(loss_ref) < 8.0
    # bfloat16 keeps 8 significant bits: the loss of a bfloat16 forward pass
    # stays within its unit roundoff, 2**-9 relative (about 5e-4 here), as
    # the rounding errors of the 8 pairs average rather than add up.
    np.testing.assert_allclose(float(loss_fast), float(loss_ref), rtol=2**-9)


def test_augment_stages_script_times_every_stage():
    # The stage timer calls the library's private functions, so it breaks silently when they change.
    script = os.path.join(ROOT, "benchmarks", "augment_stages.py")
    args = [sys.executable, script, "--image_size=16", "--batch_size=8", "--repeats=1"]
    result = subprocess.run(args, capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    timed = [line for line in result.stdout.splitlines() if re.search(r" [\d.]+ ms/batch +\d+ img/s$", line)]
    assert len(timed) == 13, result.stdout
