"""PNG plots of a pretraining run: its training curves and an embedding map.

- `metrics.png`: loss, tau, lr, collapse_std, knn_acc and (with the online
  probe) probe_acc and val_probe_acc against the epoch,
  read from `RUN/metrics.csv`. Empty and `NA` cells (epochs without a kNN
  evaluation) are skipped; after a resume, a repeated epoch keeps its last row.
- `embedding_map.png`: the encoder's features of labelled images projected
  to 2-D with PCA (computed with numpy's SVD of the centred features, no
  scikit-learn) and coloured by label.
- `budget_curve.png` (`plot_budget_curve`): the kNN accuracy of several
  time-budgeted runs against their budgets, with their random-init baselines.

Figures are drawn with matplotlib's Agg canvas on `matplotlib.figure.Figure`
objects, never through `pyplot`: no window, and the caller's global backend
is left alone.
"""

import csv
import os

import numpy as np

from byol_tf.evaluation import embed_dataset
from byol_tf.run_dir import RunDir

METRICS = ("loss", "tau", "lr", "collapse_std", "knn_acc", "probe_acc", "val_probe_acc")


def _new_figure(width, height):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(figure)
    return figure


def read_metrics(path):
    """Reads a `CSVLogger` file into per-metric series.

    Args:
        path: a run's `metrics.csv` (an `epoch` column, 0-based, then one
            column per metric).

    Returns:
        A dict `name -> (epochs, values)` of numpy arrays, epochs 1-based;
        each series holds only the epochs that have a numeric value.
    """
    if not os.path.exists(path):
        raise ValueError(f"No metrics file. Received: path={path!r}")
    rows = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or "epoch" not in reader.fieldnames:
            raise ValueError(
                f"Expected a CSV file with an `epoch` column. Received: path={path!r}, columns={reader.fieldnames}"
            )
        for row in reader:
            # A resumed run appends the epochs it redoes: the last row wins.
            rows[int(float(row["epoch"]))] = row
    series = {}
    for name in reader.fieldnames:
        if name == "epoch":
            continue
        points = []
        for epoch in sorted(rows):
            try:
                value = float(rows[epoch].get(name) or "nan")
            except ValueError:
                value = float("nan")
            if np.isfinite(value):
                points.append((epoch + 1, value))
        if points:
            epochs, values = zip(*points)
            series[name] = (np.asarray(epochs), np.asarray(values))
    return series


def plot_metrics(metrics_csv, out_path, names=METRICS):
    """Plots `names` from `metrics_csv` against the epoch, one subplot each.

    Args:
        metrics_csv: path to a run's `metrics.csv`.
        out_path: the PNG to write.
        names: metrics to plot; those absent from the file are left out.

    Returns:
        `out_path`.
    """
    series = read_metrics(metrics_csv)
    present = [name for name in names if name in series]
    if not present:
        raise ValueError(f"None of the metrics {list(names)} has a value. Received: metrics_csv={metrics_csv!r}")
    from matplotlib.ticker import MaxNLocator

    cols = min(3, len(present))
    rows = -(-len(present) // cols)
    figure = _new_figure(4.0 * cols, 3.0 * rows)
    for i, name in enumerate(present):
        axes = figure.add_subplot(rows, cols, i + 1)
        epochs, values = series[name]
        # Markers, so a metric logged once (kNN at the end only) still shows.
        axes.plot(epochs, values, marker="o", markersize=3)
        axes.set_title(name)
        axes.set_xlabel("epoch")
        axes.xaxis.set_major_locator(MaxNLocator(integer=True))
        axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(out_path)
    return out_path


def pca_2d(features):
    """Projects features onto their first two principal components.

    PCA is the SVD of the centred feature matrix (numpy only): the rows of
    `Vt` are the principal directions, so `centred @ Vt[:2].T` are the
    coordinates along the two of largest variance.

    Args:
        features: float `[N, D]`, N >= 2.

    Returns:
        float32 `[N, 2]` (the second column is 0 when D == 1).
    """
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"Expected features [N, D] with N >= 2. Received: features.shape={x.shape}")
    centred = x - x.mean(axis=0)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    coords = centred @ vt[:2].T
    if coords.shape[1] < 2:
        coords = np.concatenate([coords, np.zeros((len(x), 1))], axis=1)
    return coords.astype(np.float32)


def plot_embedding_map(encoder, eval_set, out_path, max_points=2000, seed=0, crop_fraction=1.0, batches=None):
    """Scatter plot of the PCA of the encoder's features, coloured by label.

    Args:
        encoder: images in [0, 1] `[B, S, S, 3]` -> features `[B, D]`.
        eval_set: a labelled `byol_tf.data.ImageSet` or source.
        out_path: the PNG to write.
        max_points: embed and plot at most this many images (a fixed random
            subset in memory, the first ones of a streamed source), to keep
            the plot readable and quick.
        seed: seeds that subset.
        crop_fraction: the evaluation preprocessing's (`preprocess_eval`).
        batches: instead of images, the encoder's inputs as `(inputs, labels)`
            batches (`byol_tf.run_eval.eval_data`: audio, text); `eval_set`
            then only names the classes.

    Returns:
        `out_path`.
    """
    from byol_tf import data

    source = data.open_source(eval_set)
    if not source.labelled:
        raise ValueError(
            f"The embedding map is coloured by label. Received: eval_set from {source.name!r} (unlabelled)"
        )
    if batches is None and isinstance(source, data.ArraySource) and source.num_examples > max_points:
        index = np.sort(np.random.default_rng(seed).choice(source.num_examples, max_points, replace=False))
        source = data.ArraySource(data.ImageSet(source.images[index], source.labels[index], source.class_names))
    if batches is None:
        batches = data.eval_dataset(source, int(encoder.input_shape[1]), crop_fraction, batch_size=250)
    features, labels = embed_dataset(encoder, batches.unbatch().take(max_points).batch(250))
    coords, labels = pca_2d(features[:max_points]), labels[:max_points]
    classes = np.unique(labels)
    names = source.class_names
    figure = _new_figure(7.0, 6.0)
    axes = figure.add_subplot(1, 1, 1)
    from matplotlib import colormaps

    cmap = colormaps["tab10" if len(classes) <= 10 else "tab20"]
    for i, c in enumerate(classes):
        mask = labels == c
        label = names[c] if names is not None and c < len(names) else str(c)
        axes.scatter(coords[mask, 0], coords[mask, 1], s=6, alpha=0.7, color=cmap(i % cmap.N), label=label)
    if len(classes) <= 20:  # beyond that a legend hides the plot
        axes.legend(markerscale=2, fontsize=7, loc="best")
    axes.set_title(f"PCA of encoder features ({len(labels)} examples)")
    axes.set_xlabel("PC 1")
    axes.set_ylabel("PC 2")
    figure.tight_layout()
    figure.savefig(out_path)
    return out_path


def plot_run(run_dir, eval_set=None, encoder=None, max_points=2000, crop_fraction=1.0, batches=None):
    """Writes a run's plots into its folder.

    Args:
        run_dir: a run folder with `metrics.csv` (and `encoder.keras` for the
            embedding map).
        eval_set: optional labelled `byol_tf.data.ImageSet`; with it,
            `embedding_map.png` is written too.
        encoder: the encoder to embed with; default `RUN/encoder.keras`
            (pass the in-memory one to skip reloading it).
        max_points, crop_fraction, batches: see `plot_embedding_map`.

    Returns:
        A dict `name -> path` of the PNGs written.

    Example:
    >>> plot_run("runs/demo", eval_set=data.make_shapes(2000, seed=1))
    {'metrics': 'runs/demo/metrics.png', 'embedding_map': 'runs/demo/embedding_map.png'}
    """
    run = RunDir(run_dir)
    written = {"metrics": plot_metrics(run.metrics_file, run.metrics_plot)}
    if eval_set is not None:
        encoder = run.load_encoder() if encoder is None else encoder
        written["embedding_map"] = plot_embedding_map(
            encoder, eval_set, run.embedding_plot, max_points, crop_fraction=crop_fraction, batches=batches
        )
    return written


def budget_rows(run_dirs):
    """One row per finished, time-budgeted run folder: its budget, wall time and kNN accuracies, by budget."""
    rows = []
    for run_dir in run_dirs:
        summary = RunDir(run_dir).read_summary()
        if summary.get("status") != "finished" or not summary.get("time_budget") or "knn_acc" not in summary:
            raise ValueError(
                f"Expected a finished, time-budgeted run with a kNN accuracy. Received: run_dir={run_dir!r}"
            )
        rows.append(
            {
                "run_dir": run_dir,
                "time_budget_s": summary["time_budget"],
                "run_seconds": summary.get("run_seconds"),
                "steps": summary["steps"],
                "knn_acc": summary["knn_acc"],
                "knn_acc_random_init": summary.get("knn_acc_random_init"),
            }
        )
    return sorted(rows, key=lambda row: row["time_budget_s"])


def plot_budget_curve(rows, out_path):
    """Plots `budget_rows` as kNN top-1 (%) against the budget (minutes); returns `out_path`."""
    if not rows:
        raise ValueError("Expected at least one budgeted run. Received: rows=[]")
    minutes = [row["time_budget_s"] / 60 for row in rows]
    figure = _new_figure(5.0, 3.5)
    axes = figure.add_subplot(1, 1, 1)
    axes.plot(minutes, [100 * row["knn_acc"] for row in rows], marker="o", label="learned")
    if all(row["knn_acc_random_init"] is not None for row in rows):
        axes.plot(minutes, [100 * row["knn_acc_random_init"] for row in rows], marker="x", label="random init")
    axes.set_xlabel("time budget (minutes)")
    axes.set_ylabel("kNN top-1 (%)")
    axes.grid(alpha=0.3)
    axes.legend()
    figure.tight_layout()
    figure.savefig(out_path)
    return out_path
