"""Linear evaluation: the protocol's pieces, and scripts/linear_eval.py end to end."""

import json
import os
import re

import numpy as np
import pytest

from byol_tf import data, eval_inputs, linear
from byol_tf.backbones import build_encoder
from test_scripts import colour_npz, run_script

RESULT_RE = re.compile(r"top1=([0-9.]+) top5=([0-9.]+)")


def tiny_run_dir(tmp_path_factory):
    """A real run folder from scripts/pretrain.py (demo preset, 1 epoch), made once per session."""
    run = tmp_path_factory.getbasetemp() / "tiny_byol_run"
    if not (run / "summary.json").exists():
        result = run_script(
            "pretrain.py",
            "--preset=demo",
            "--epochs=1",
            "--limit=128",
            "--batch_size=64",
            "--warmup_epochs=0",
            "--verbose=0",
            f"--out={run}",
            "--overwrite",
        )
        assert result.returncode == 0, result.stderr[-3000:]
    return str(run)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return tiny_run_dir(tmp_path_factory)


def separable_features(num, num_classes=8, dim=16, seed=0):
    """Gaussian clusters far apart: linearly separable with a wide margin."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(123).normal(0.0, 3.0, (num_classes, dim))
    labels = rng.integers(0, num_classes, num)
    return (centres[labels] + rng.normal(0.0, 0.3, (num, dim))).astype(np.float32), labels


@pytest.mark.parametrize("feature_norm", ["standardize", "l2"])
def test_linear_probe_separates_separable_features(feature_norm):
    x_train, y_train = separable_features(400)
    x_test, y_test = separable_features(200, seed=1)
    result = linear.train_linear(x_train, y_train, x_test, y_test, epochs=20, batch_size=64, feature_norm=feature_norm)
    assert result["top1"] >= 0.98, result
    assert result["top5"] >= result["top1"]
    assert result["num_classes"] == 8 and result["num_train"] == 400 and result["num_test"] == 200


def test_linear_probe_cannot_learn_random_labels():
    # The counterpart of the test above: held-out accuracy must stay near chance.
    x_train, _ = separable_features(400)
    x_test, _ = separable_features(200, seed=1)
    rng = np.random.default_rng(0)
    result = linear.train_linear(
        x_train, rng.integers(0, 8, 400), x_test, rng.integers(0, 8, 200), epochs=20, batch_size=64
    )
    assert result["top1"] < 0.35, result


def test_topk_accuracy():
    logits = np.array([[0.1, 0.5, 0.4], [0.9, 0.05, 0.05], [0.2, 0.3, 0.5]])
    labels = np.array([2, 0, 0])
    assert linear.topk_accuracy(logits, labels, 1) == pytest.approx(1 / 3)
    assert linear.topk_accuracy(logits, labels, 2) == pytest.approx(2 / 3)
    assert linear.topk_accuracy(logits, labels, 5) == 1.0  # k is clipped to the number of classes


@pytest.mark.parametrize("fraction, per_class", [(0.01, 1), (0.1, 10), (0.25, 25)])
def test_label_subset_is_class_balanced(fraction, per_class):
    labels = data.make_shapes(1000, image_size=8, seed=3).labels
    index = linear.class_balanced_subset(labels, fraction, seed=0)
    assert len(index) == round(fraction * 1000) == 10 * per_class
    assert len(np.unique(index)) == len(index)
    np.testing.assert_array_equal(np.bincount(labels[index], minlength=10), [per_class] * 10)
    np.testing.assert_array_equal(index, linear.class_balanced_subset(labels, fraction, seed=0))
    assert not np.array_equal(index, linear.class_balanced_subset(labels, fraction, seed=1))


def test_label_subset_edge_cases():
    labels = np.array([0] * 90 + [1] * 10)
    index = linear.class_balanced_subset(labels, 0.3, seed=0)  # 15 per class wanted, class 1 has 10
    np.testing.assert_array_equal(np.bincount(labels[index]), [15, 10])
    np.testing.assert_array_equal(linear.class_balanced_subset(labels, 1.0), np.arange(100))
    with pytest.raises(ValueError, match=r"Received: fraction=0"):
        linear.class_balanced_subset(labels, 0)


def test_bad_arguments_name_the_value():
    x, y = separable_features(20)
    with pytest.raises(ValueError, match=r"Received: feature_norm='bn'"):
        linear.train_linear(x, y, x, y, feature_norm="bn")
    with pytest.raises(ValueError, match=r"Received: num_classes=3"):
        linear.train_linear(x, y, x, y, num_classes=3)
    with pytest.raises(ValueError, match=r"Received: train_features.shape=\(20, 16\), test_features.shape=\(20, 8\)"):
        linear.train_linear(x, y, x[:, :8], y)


def colour_set(num, seed, size=16):
    """An ImageSet whose class (of 3) is the dominant colour: linearly separable from any encoder's features."""
    rng = np.random.default_rng(seed)
    labels = rng.permutation(np.arange(num) % 3)
    x = 0.3 * rng.random((num, size, size, 3))
    x[np.arange(num), :, :, labels] += 0.7
    return data.ImageSet(np.round(255 * x).astype(np.uint8), labels.astype(np.int64), ["r", "g", "b"])


def test_linear_eval_from_images_with_flips():
    encoder = build_encoder("resnet_tiny", 16)
    train, test = colour_set(48, seed=0), colour_set(30, seed=1)
    result = linear.linear_eval(encoder, train, test, label_fraction=0.5, flip_augment=True, epochs=30)
    # Half of the labels (8 per class), each image also mirrored.
    assert result["num_train"] == 48 and result["num_test"] == 30 and result["num_classes"] == 3
    # Dominant colours are separable even on a random-init encoder's features.
    assert result["top1"] >= 0.9, result
    # Shuffled test labels: the same classifier scores about chance (1/3, std 0.086 on 30 images).
    shuffled = data.ImageSet(test.images, np.random.default_rng(0).permutation(test.labels), test.class_names)
    result = linear.linear_eval(encoder, train, shuffled, label_fraction=0.5, flip_augment=True, epochs=30)
    assert result["top1"] < 0.7, result
    features = linear.embed_with_flips(encoder, train.images[:3], 16)
    mirrored = linear.embed_with_flips(encoder, train.images[:3, :, ::-1], 16)
    np.testing.assert_allclose(features[:3], mirrored[3:], atol=1e-5)


def test_random_init_encoder_is_rebuilt_from_the_run(run_dir):
    trained, config = eval_inputs.load_encoder(run_dir)
    random, _ = eval_inputs.load_encoder(run_dir, random_init=True)
    assert config.preset == "demo" and eval_inputs.encoder_image_size(random) == config.image_size
    assert [w.shape for w in trained.weights] == [w.shape for w in random.weights]
    # Pretraining moved the weights away from the init the run started from.
    assert any(not np.allclose(a, b) for a, b in zip(trained.get_weights(), random.get_weights()))
    with pytest.raises(ValueError, match="Received: run_dir=None"):
        eval_inputs.load_encoder(encoder_path=os.path.join(run_dir, "encoder.keras"), random_init=True)


def test_linear_eval_script(run_dir, tmp_path):
    # Colour classes: the answer is known (separable from any encoder's features).
    train, test = colour_npz(tmp_path / "train.npz", 400, 0), colour_npz(tmp_path / "test.npz", 120, 1)
    result = run_script(
        "linear_eval.py",
        f"--run_dir={run_dir}",
        f"--data={train}",
        f"--eval_data={test}",
        "--limit=300",
        "--eval_limit=90",
        "--epochs=5",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    top1, top5 = map(float, RESULT_RE.search(result.stdout).groups())
    assert top1 >= 0.9 and top5 == 1.0  # 3 classes: top-5 is every class
    record = json.load(open(os.path.join(run_dir, "linear_eval.json")))
    assert record["top1"] == pytest.approx(top1, abs=1e-4) and record["top5"] == pytest.approx(top5, abs=1e-4)
    assert record["num_train"] == 300 and record["num_test"] == 90 and record["data"] == train


@pytest.mark.parametrize(
    "flag, expected",
    [
        ("--label_fraction=0", "--label_fraction=0"),
        ("--epochs=0", "--epochs=0"),
        ("--run_dir=/no/such/run", "--run_dir=/no/such/run"),
    ],
)
def test_linear_eval_script_bad_flags(run_dir, flag, expected):
    result = run_script("linear_eval.py", f"--run_dir={run_dir}", flag, timeout=120)
    assert result.returncode != 0
    assert expected in result.stderr, result.stderr[-2000:]
