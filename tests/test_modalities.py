"""Audio and text on the shared core: config, data, views in the pipeline, training, kNN, export, CLI."""

import csv
import json
import os
import re

import numpy as np
import pytest
import tensorflow as tf

from byol_tf import data as data_lib
from byol_tf import get_preset, modalities, training
from byol_tf.audio.config import AudioAugmentConfig
from byol_tf.config import AugmentConfig, PretrainConfig
from byol_tf.export import EXTRA_DIR, METADATA_FILE, export_run
from byol_tf.run_dir import RunDir
from byol_tf.text.augment import TextAugmentConfig
from test_scripts import run_script, run_script_cases

RATE, SAMPLES = 8000, 2000
WORDS = {0: ["good", "great", "lovely", "fine"], 1: ["bad", "awful", "dull", "poor"]}


def tones(n, seed=0, length=SAMPLES):
    """Labelled clips: class c is a tone at 400 * (c + 1) Hz with random amplitude and noise."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, n)
    t = np.arange(length) / RATE
    x = [
        rng.uniform(0.2, 0.6) * np.sin(2 * np.pi * 400 * (c + 1) * t) + 0.02 * rng.standard_normal(length)
        for c in labels
    ]
    return np.asarray(x, np.float32), labels


def sentences(n, seed=0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, n)
    filler = ["the", "film", "was", "a", "plot", "story"]
    texts = [
        " ".join(rng.permutation(list(rng.choice(WORDS[c], 3)) + list(rng.choice(filler, 4)))) + "!" for c in labels
    ]
    return texts, labels


@pytest.fixture(scope="module")
def audio_npz(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("audio") / "tones.npz")
    x, y = tones(160)
    split = np.where(np.arange(160) < 128, "train", "test")
    np.savez(path, audio=x, digit=y, split=split, sample_rate=np.int64(RATE))
    return path


@pytest.fixture(scope="module")
def text_csv(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("text") / "reviews.csv")
    texts, labels = sentences(160)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["split", "label", "text"])
        for i, (text, label) in enumerate(zip(texts, labels)):
            writer.writerow(["train" if i < 128 else "dev", int(label), text])
    return path


def audio_config(**overrides):
    values = dict(batch_size=32, epochs=2, warmup_epochs=0, projector_hidden=64, projection_dim=32, predictor_hidden=64)
    values.update(overrides)
    return get_preset("fsdd_audio", augment=dict(num_samples=SAMPLES, sample_rate=RATE, num_mel_bins=32), **values)


def text_config(**overrides):
    values = dict(batch_size=32, epochs=2, warmup_epochs=0, projector_hidden=64, projection_dim=32, predictor_hidden=64)
    values.update(overrides)
    return get_preset("sst2_text", augment=dict(max_tokens=12), **values)


# --- config ---------------------------------------------------------------


def test_modality_picks_its_views_and_round_trips():
    assert isinstance(PretrainConfig(modality="audio").augment, AudioAugmentConfig)
    assert isinstance(PretrainConfig(modality="text").augment, TextAugmentConfig)
    for name in ("fsdd_audio", "sst2_text"):
        config = get_preset(name)
        assert PretrainConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    # Configs written before the modality field load as images.
    old = get_preset("demo").to_dict()
    del old["modality"]
    assert PretrainConfig.from_dict(old).modality == "image"


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        (dict(modality="video"), "modality='video'"),
        (dict(modality="audio", augment=TextAugmentConfig()), "AudioAugmentConfig"),
        (dict(modality="text", augment=AugmentConfig(image_size=64, flip_prob=0.1)), "TextAugmentConfig"),
        (dict(modality="audio", augment_on="device"), "augment_on='device'"),
    ],
)
def test_bad_modality_settings_name_the_value(kwargs, fragment):
    with pytest.raises(ValueError, match=re.escape(fragment)):
        PretrainConfig(**kwargs)


# --- data -----------------------------------------------------------------


def test_split_spec_and_loading(audio_npz, text_csv, tmp_path):
    assert modalities.split_spec(audio_npz + ":test") == (audio_npz, "test")
    assert modalities.split_spec(audio_npz) == (audio_npz, None)
    odd = tmp_path / "a:b.txt"  # an existing path with a colon is a path
    odd.write_text("one line\n")
    assert modalities.split_spec(str(odd)) == (str(odd), None)

    test = training.load_source(audio_npz + ":test", audio_config())
    assert (test.num_examples, test.modality, test.examples.shape[1]) == (32, "audio", SAMPLES)
    np.testing.assert_array_equal(test.labels, np.load(audio_npz)["digit"][128:])
    dev = training.load_source(text_csv + ":dev", text_config())
    assert (dev.num_examples, dev.modality) == (32, "text")
    assert dev.examples[0] == sentences(160)[0][128]
    whole = training.load_source(text_csv, text_config(), limit=50)
    assert whole.num_examples == 50


def test_data_of_another_modality_is_refused(audio_npz, tmp_path):
    source = training.load_source(audio_npz + ":train", audio_config())
    with pytest.raises(ValueError, match="the run is text"):
        modalities.open_examples(source, text_config())
    with pytest.raises(ValueError, match="holds audio examples"):
        training.run_pretraining(text_config(), source, str(tmp_path / "run"))


def _rows(array):
    return {row.tobytes() for row in np.asarray(array)}


def test_audio_pipeline_makes_views_of_its_examples(audio_npz):
    source = training.load_source(audio_npz + ":train", audio_config())
    plain = AudioAugmentConfig(
        sample_rate=RATE, num_samples=SAMPLES, crop=False, max_shift=0, gain_db=(0, 0), noise_prob=0,
        time_masks=0, freq_masks=0,
    )  # fmt: skip
    (v1, v2), labels = next(iter(data_lib.pretrain_dataset(source, 32, plain, seed=3, with_labels=True)))
    # No augmentation: both views are exactly the batch's clips, in the same order, with their labels.
    np.testing.assert_array_equal(v1, v2)
    assert _rows(v1) <= _rows(source.examples)
    by_row = {row.tobytes(): label for row, label in zip(source.examples, source.labels)}
    assert [by_row[row.tobytes()] for row in np.asarray(v1)] == list(labels.numpy())
    # The preset's views: the same for the same seed and step, different between the two views.
    config = audio_config().augment
    a = next(iter(data_lib.pretrain_dataset(source, 32, config, seed=3)))
    b = next(iter(data_lib.pretrain_dataset(source, 32, config, seed=3)))
    np.testing.assert_array_equal(a[0], b[0])
    assert a[0].shape == (32, SAMPLES) and not np.allclose(a[0], a[1])
    with pytest.raises(ValueError, match="AudioAugmentConfig"):
        data_lib.pretrain_dataset(source, 32, AugmentConfig())


def _standardise(text):
    return " ".join(re.sub(r"[^\w\s]", "", text.lower()).split())


def test_text_pipeline_makes_views_of_its_sentences(text_csv):
    source = training.load_source(text_csv + ":train", text_config())
    plain = TextAugmentConfig(
        max_tokens=48, crop_fraction=(1.0, 1.0), token_dropout=0.0, mask_prob=0.0, shuffle_window=0
    )
    v1, v2 = next(iter(data_lib.pretrain_dataset(source, 32, plain, seed=1)))
    expected = {_standardise(t) for t in source.examples}
    assert {t.decode() for t in v1.numpy()} <= expected
    np.testing.assert_array_equal(v1, v2)
    noisy, _ = next(iter(data_lib.pretrain_dataset(source, 32, TextAugmentConfig(token_dropout=0.5), seed=1)))
    assert not {t.decode() for t in noisy.numpy()} <= expected


# --- training, kNN, export --------------------------------------------------


@pytest.fixture(scope="module")
def audio_run(audio_npz, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("audio_run") / "run")
    config = audio_config()
    train = training.load_source(audio_npz + ":train", config)
    test = training.load_source(audio_npz + ":test", config)
    summary = training.run_pretraining(config, train, out, eval_set=test, verbose=0)
    return out, config, summary, test


@pytest.fixture(scope="module")
def text_run(text_csv, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("text_run") / "run")
    config = text_config(probe=True)
    train = training.load_source(text_csv + ":train", config)
    test = training.load_source(text_csv + ":dev", config)
    summary = training.run_pretraining(config, train, out, eval_set=test, verbose=0)
    return out, config, summary, test


@pytest.mark.parametrize("fixture", ["audio_run", "text_run"])
def test_runs_finish_with_knn_and_random_init(fixture, request):
    out, config, summary, _ = request.getfixturevalue(fixture)
    assert summary["status"] == "finished" and summary["modality"] == config.modality
    assert summary["steps"] == 2 * (128 // 32)
    for key in ("knn_acc", "knn_acc_random_init"):
        assert 0.0 <= summary[key] <= 1.0
    for name in ("encoder.keras", "metrics.png", "embedding_map.png"):
        assert os.path.isfile(os.path.join(out, name)), name


def test_text_run_trains_the_probe_and_keeps_its_vocabulary(text_run, text_csv):
    out, config, summary, _ = text_run
    assert "probe_acc" in summary["final"] and "val_probe_acc" in summary["final"]
    encoder = RunDir(out).load_encoder()
    vectorizer = next(layer for layer in encoder.layers if isinstance(layer, tf.keras.layers.TextVectorization))
    vocabulary = vectorizer.get_vocabulary()
    train_words = {w for t in sentences(160)[0][:128] for w in _standardise(t).split()}
    # Padding, OOV, then the mask token and exactly the training words.
    assert vocabulary[:2] == ["", "[UNK]"] and set(vocabulary[2:]) == train_words | {"xxmask"}


def test_audio_export_serves_the_encoder(audio_run, tmp_path):
    out, config, _, test = audio_run
    version = export_run(out, str(tmp_path / "served"))
    served = tf.saved_model.load(version)
    encoder = RunDir(out).load_encoder()
    clips = test.examples[:5]
    # Longer clips are centre-cropped, shorter ones zero-padded at the end (NumPy here).
    longer = np.pad(clips, [(0, 0), (300, 300)])
    shorter = clips[:, :1500]
    expected = encoder(clips, training=False).numpy()
    got = served.signatures["serving_default"](waveforms=tf.constant(longer))["embedding"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    padded = np.pad(shorter, [(0, 0), (0, SAMPLES - 1500)])
    got = served.signatures["serving_default"](waveforms=tf.constant(shorter))["embedding"].numpy()
    np.testing.assert_allclose(got, encoder(padded, training=False).numpy(), atol=1e-5)
    with open(os.path.join(version, EXTRA_DIR, METADATA_FILE)) as f:
        metadata = json.load(f)
    assert (metadata["modality"], metadata["sample_rate"], metadata["num_samples"]) == ("audio", RATE, SAMPLES)
    assert json.loads(served.metadata().numpy().decode()) == metadata


def test_text_export_serves_the_encoder(text_run, tmp_path):
    out, config, _, test = text_run
    version = export_run(out, str(tmp_path / "served"))
    served = tf.saved_model.load(version)
    encoder = RunDir(out).load_encoder()
    texts = list(test.examples[:6]) + ["An UNSEEN word, zyzzyva!"]
    expected = encoder(tf.constant(texts), training=False).numpy()
    got = served.signatures["serving_default"](text=tf.constant(texts))["embedding"].numpy()
    np.testing.assert_allclose(got, expected, atol=1e-5)
    with open(os.path.join(version, EXTRA_DIR, METADATA_FILE)) as f:
        metadata = json.load(f)
    vocabulary = next(
        layer for layer in encoder.layers if isinstance(layer, tf.keras.layers.TextVectorization)
    ).vocabulary_size()
    assert (metadata["modality"], metadata["vocabulary_size"]) == ("text", vocabulary)


def test_cli_pretrains_and_exports_text(text_csv, tmp_path):
    run = str(tmp_path / "run")
    common = [f"--data={text_csv}:train", "--batch_size=32", "--epochs=1", "--verbose=0"]
    (code, stdout, stderr), (bad_code, _, bad_stderr) = run_script_cases(
        "pretrain.py",
        [
            ["--preset=sst2_text", f"--out={run}", f"--eval_data={text_csv}:dev", *common],
            ["--preset=sst2_text", f"--out={run}2", "--backbone=resnet18", *common],
        ],
        tmp_path,
    )
    assert code == 0, stderr[-3000:]
    assert "128 text examples" in stdout and "kNN top-1" in stdout
    assert bad_code != 0 and "Received: --backbone='resnet18'" in bad_stderr
    result = run_script("export.py", f"--run_dir={run}", f"--out={tmp_path / 'sm'}", timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "text: string [batch]" in result.stdout
    evaluate = [f"--run_dir={run}", "--epochs=3", f"--data={text_csv}:train", f"--eval_data={text_csv}:dev"]
    for code, stdout, stderr in run_script_cases("linear_eval.py", [evaluate, [*evaluate, "--random_init"]], tmp_path):
        assert code == 0, stderr[-3000:]
        assert "128 train features, 32 test, 2 classes" in stdout and "top1=" in stdout
