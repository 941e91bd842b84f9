"""Run plots: metrics.csv parsing, PCA, valid PNG files, scripts/plot_run.py."""

import os

import numpy as np
import pytest
import tensorflow as tf

from byol_tf import data, plots
from byol_tf.backbones import build_encoder
from test_linear import tiny_run_dir
from test_scripts import run_script

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"

# As CSVLogger writes it: kNN only on some epochs ("NA" or empty otherwise),
# and epoch 1 written twice, as after a resume.
METRICS_CSV = """epoch,collapse_std,knn_acc,loss,lr,tau
0,0.05,NA,3.0,0.1,0.990
1,0.06,0.30,2.5,0.2,0.995
1,0.07,0.35,2.4,0.2,0.995
2,0.08,,2.0,0.1,0.999
"""


def assert_png(path, min_side=100):
    """A non-empty, decodable PNG that is not a blank canvas."""
    with open(path, "rb") as f:
        raw = f.read()
    assert raw[:8] == PNG_SIGNATURE, path
    image = tf.io.decode_png(raw).numpy()
    assert image.ndim == 3 and image.shape[2] in (3, 4) and min(image.shape[:2]) >= min_side, image.shape
    assert image[..., :3].std() > 1.0, "blank image"


def test_read_metrics_skips_empty_cells_and_keeps_the_last_row(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    series = plots.read_metrics(str(path))
    epochs, loss = series["loss"]
    np.testing.assert_array_equal(epochs, [1, 2, 3])
    np.testing.assert_allclose(loss, [3.0, 2.4, 2.0])
    epochs, knn = series["knn_acc"]
    np.testing.assert_array_equal(epochs, [2])
    np.testing.assert_allclose(knn, [0.35])


def test_plot_metrics_writes_a_png(tmp_path):
    path = tmp_path / "metrics.csv"
    path.write_text(METRICS_CSV)
    out = plots.plot_metrics(str(path), str(tmp_path / "metrics.png"))
    assert_png(out)
    (tmp_path / "empty.csv").write_text("epoch,loss\n0,NA\n")
    with pytest.raises(ValueError, match="Received: metrics_csv="):
        plots.plot_metrics(str(tmp_path / "empty.csv"), str(tmp_path / "empty.png"))


def test_budget_curve_reads_budgeted_runs_in_budget_order(tmp_path):
    import json

    for name, budget_s, knn in (("b20", 1200.0, 0.5), ("b10", 600.0, 0.4)):
        os.makedirs(tmp_path / name)
        summary = dict(status="finished", time_budget=budget_s, run_seconds=budget_s - 5, steps=10, knn_acc=knn)
        (tmp_path / name / "summary.json").write_text(json.dumps({**summary, "knn_acc_random_init": 0.3}))
    rows = plots.budget_rows([str(tmp_path / "b20"), str(tmp_path / "b10")])
    assert [(row["time_budget_s"], row["knn_acc"]) for row in rows] == [(600.0, 0.4), (1200.0, 0.5)]
    assert_png(plots.plot_budget_curve(rows, str(tmp_path / "curve.png")))
    (tmp_path / "b10" / "summary.json").write_text(json.dumps({"status": "finished", "knn_acc": 0.4}))
    with pytest.raises(ValueError, match="time-budgeted run.*Received: run_dir="):
        plots.budget_rows([str(tmp_path / "b10")])


def test_pca_finds_the_directions_of_largest_variance():
    rng = np.random.default_rng(0)
    basis, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    # Standard deviations 5, 2, then small, along random orthogonal directions.
    x = (rng.normal(size=(500, 6)) * [5.0, 2.0, 0.3, 0.2, 0.1, 0.1]) @ basis.T + 7.0
    coords = plots.pca_2d(x)
    assert coords.shape == (500, 2)
    np.testing.assert_allclose(coords.mean(0), 0.0, atol=1e-4)
    np.testing.assert_allclose(coords.std(0), [5.0, 2.0], rtol=0.1)
    # Up to sign, the coordinates are the projections on the top two covariance eigenvectors.
    _, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    expected = (x - x.mean(0)) @ vectors[:, ::-1][:, :2]
    for i in range(2):
        assert abs(np.corrcoef(coords[:, i], expected[:, i])[0, 1]) > 0.9999


def test_embedding_map_writes_a_png(tmp_path):
    encoder = build_encoder("resnet_tiny", 16)
    images = data.make_shapes(40, image_size=16, num_classes=4, seed=1)
    out = plots.plot_embedding_map(encoder, images, str(tmp_path / "map.png"), max_points=30)
    assert_png(out)
    unlabelled = data.ImageSet(images=images.images)
    with pytest.raises(ValueError, match="unlabelled"):
        plots.plot_embedding_map(encoder, unlabelled, str(tmp_path / "map2.png"))


def test_plot_run_script(tmp_path_factory):
    run_dir = tiny_run_dir(tmp_path_factory)
    for name in ("metrics.png", "embedding_map.png"):
        if os.path.exists(os.path.join(run_dir, name)):
            os.remove(os.path.join(run_dir, name))
    result = run_script("plot_run.py", run_dir, "--eval_data=shapes", "--eval_limit=200")
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ("metrics.png", "embedding_map.png"):
        path = os.path.join(run_dir, name)
        assert f"Wrote {path}" in result.stdout
        assert_png(path)
    bad = run_script("plot_run.py", "/no/such/run", timeout=60)
    assert bad.returncode != 0 and "RUN=/no/such/run" in bad.stderr
