"""Text views, vocabulary and encoder, each checked against plain Python or a known answer."""

import collections
import dataclasses
import json
import math
import re

import keras
import numpy as np
import pytest
import tensorflow as tf

from byol_tf.heads import MLPHead
from byol_tf.model import BYOL, _clone
from byol_tf.text import (
    MASK_TOKEN,
    TextAugmentConfig,
    adapt_vocabulary,
    build_text_encoder,
    text_view,
    text_view_dataset,
    text_views,
    tokenize,
)

# Keras's "lower_and_strip_punctuation", written again in plain Python (ASCII text only).
PUNCTUATION = re.compile(r"[!\"#$%&()*+,\-./:;<=>?@\[\\\]^_`{|}~']")
PLAIN = dict(crop_fraction=(1.0, 1.0), token_dropout=0.0, mask_prob=0.0, shuffle_window=0)


def reference_tokens(text):
    return PUNCTUATION.sub("", text.lower()).split()


def numbered(n, prefix="t"):
    """A sentence of `n` distinct tokens, so every output token tells where it came from."""
    return " ".join(f"{prefix}{i}" for i in range(n))


def view_tokens(sentences, seed, config):
    return [v.decode().split() for v in text_view(tf.constant(sentences), tf.constant(seed), config).numpy()]


# --- config ---------------------------------------------------------------------------------------------------------


def test_config_json_round_trip():
    config = TextAugmentConfig(max_tokens=32, crop_fraction=(0.5, 0.9), shuffle_window=3)
    assert TextAugmentConfig.from_dict(json.loads(json.dumps(dataclasses.asdict(config)))) == config


@pytest.mark.parametrize(
    "kwargs, received",
    [
        (dict(token_dropout=1.5), "token_dropout=1.5"),
        (dict(token_dropout=1.0), "token_dropout=1.0"),
        (dict(mask_prob=-0.1), "mask_prob=-0.1"),
        (dict(crop_fraction=(0.8, 0.5)), "crop_fraction=(0.8, 0.5)"),
        (dict(crop_fraction=(0.0, 0.5)), "crop_fraction=(0.0, 0.5)"),
        (dict(max_tokens=0), "max_tokens=0"),
        (dict(max_tokens=4.0), "max_tokens=4.0"),
        (dict(shuffle_window=-1), "shuffle_window=-1"),
    ],
)
def test_config_errors_name_the_value(kwargs, received):
    with pytest.raises(ValueError, match=re.escape(f"Received: {received}")):
        TextAugmentConfig(**kwargs)


# --- views ----------------------------------------------------------------------------------------------------------


def test_standardisation_matches_python_reference():
    texts = ["Don't STOP -- it's (great)!", "  a,b  c.d  ", "[MASK] x_y wo n't -lrb- 3.5/10", "!!!"]
    assert [[t.decode() for t in row] for row in tokenize(texts).to_list()] == [reference_tokens(t) for t in texts]
    # With every op off, a view is the standardised text.
    views = text_view(tf.constant(texts), tf.constant([0, 0]), TextAugmentConfig(**PLAIN)).numpy()
    assert [v.decode() for v in views] == [" ".join(reference_tokens(t)) or MASK_TOKEN for t in texts]


def test_span_crop_is_a_contiguous_span_of_the_configured_length():
    config = TextAugmentConfig(max_tokens=20, **{**PLAIN, "crop_fraction": (0.3, 0.7)})
    lengths = list(range(1, 61))
    sizes = collections.defaultdict(list)
    starts = collections.defaultdict(set)
    for seed in range(20):
        for n, view in zip(lengths, view_tokens([numbered(n) for n in lengths], [seed, 7], config)):
            start, size = int(view[0][1:]), len(view)
            assert view == [f"t{i}" for i in range(start, start + size)]
            assert start + size <= n
            lo = min(max(math.ceil(0.3 * n), 1), n, 20)
            hi = min(max(math.ceil(0.7 * n), 1), n, 20)
            assert lo <= size <= hi, (n, size)
            sizes[n].append(size)
            starts[n].add(start)
    # Over the draws the length spans the range and the window moves.
    assert min(sizes[20]) <= 8 and max(sizes[20]) >= 12
    assert len(starts[60]) > 10


def test_long_text_gets_a_window_of_max_tokens():
    config = TextAugmentConfig(max_tokens=16, **PLAIN)
    views = [view_tokens([numbered(200)], [seed, 0], config)[0] for seed in range(5)]
    starts = {int(v[0][1:]) for v in views}
    for view in views:
        start = int(view[0][1:])
        assert view == [f"t{i}" for i in range(start, start + 16)]
    assert len(starts) > 1


def test_token_dropout_rate_and_order():
    config = TextAugmentConfig(**{**PLAIN, "token_dropout": 0.3})
    kept = total = 0
    for seed in range(8):
        for view in view_tokens([numbered(40)] * 64, [seed, 1], config):
            positions = [int(t[1:]) for t in view]
            assert positions == sorted(set(positions)), "dropout must keep order and not repeat"
            kept, total = kept + len(view), total + 40
    # 20,480 draws: the standard error of the rate is about 0.003.
    assert abs(1 - kept / total - 0.3) < 0.02


def test_views_are_never_empty():
    config = TextAugmentConfig(crop_fraction=(0.01, 0.02), token_dropout=0.99, mask_prob=1.0, shuffle_window=3)
    sentences = ["a", "b c", numbered(30), "", "?!", "x " * 50]
    for seed in range(10):
        for view in view_tokens(sentences, [seed, 0], config):
            assert len(view) >= 1
    heavy_dropout = TextAugmentConfig(**{**PLAIN, "token_dropout": 0.99})
    assert all(len(v) == 1 for v in view_tokens([numbered(3)] * 50, [1, 2], heavy_dropout))
    assert view_tokens(["", "..."], [0, 0], TextAugmentConfig()) == [[MASK_TOKEN], [MASK_TOKEN]]


def test_masking_rate_uses_the_reserved_token():
    config = TextAugmentConfig(**{**PLAIN, "mask_prob": 0.2})
    masked = total = 0
    for seed in range(8):
        for view in view_tokens([numbered(40)] * 64, [seed, 2], config):
            assert len(view) == 40
            for i, token in enumerate(view):
                assert token in (f"t{i}", MASK_TOKEN)
            masked, total = masked + view.count(MASK_TOKEN), total + 40
    assert abs(masked / total - 0.2) < 0.02


@pytest.mark.parametrize("window", [1, 3])
def test_local_shuffle_is_a_permutation_within_the_window(window):
    config = TextAugmentConfig(**{**PLAIN, "shuffle_window": window})
    moves = collections.Counter()
    for seed in range(5):
        for view in view_tokens([numbered(30)] * 32, [seed, 3], config):
            assert sorted(view, key=lambda t: int(t[1:])) == numbered(30).split()
            for position, token in enumerate(view):
                moves[abs(int(token[1:]) - position)] += 1
    assert max(moves) == window
    assert moves[0] < 0.9 * sum(moves.values())


def test_same_seed_same_views_everywhere():
    config = TextAugmentConfig()
    sentences = tf.constant([numbered(25, p) for p in "abcdefgh"])
    eager = text_views(sentences, tf.constant([5, 6]), config)
    as_int32 = text_views(sentences, tf.constant([5, 6], tf.int32), config)
    traced = tf.function(lambda s, seed: text_views(s, seed, config), reduce_retracing=True)
    graph = traced(sentences, tf.constant([5, 6], tf.int64))
    mapped = next(iter(tf.data.Dataset.from_tensors(sentences).map(lambda s: text_views(s, [5, 6], config))))
    for other in (as_int32, graph, mapped):
        for a, b in zip(eager, other):
            np.testing.assert_array_equal(a.numpy(), b.numpy())
    other_seed = text_views(sentences, tf.constant([5, 7]), config)
    assert not np.array_equal(eager[0].numpy(), other_seed[0].numpy())
    assert not np.array_equal(eager[0].numpy(), eager[1].numpy()), "the two views must be drawn independently"


def test_unknown_batch_size_in_a_graph():
    config = TextAugmentConfig()
    fn = tf.function(lambda s: text_views(s, tf.constant([0, 1]), config))
    concrete = fn.get_concrete_function(tf.TensorSpec([None], tf.string))
    assert [o.shape.as_list() for o in concrete.structured_outputs] == [[None], [None]]
    assert fn(tf.constant(["a b c", "d"]))[0].shape == (2,)


# --- vocabulary and encoder -----------------------------------------------------------------------------------------


def test_vocabulary_matches_a_counter_top_k():
    rng = np.random.default_rng(0)
    words = ["Film", "film!", "good", "BAD", "plot,", "xxmask", "(actor)", "it's", "a", "the", "dull"]
    texts = [" ".join(rng.choice(words, size=rng.integers(1, 12))) for _ in range(300)]
    counts = collections.Counter(t for text in texts for t in reference_tokens(text) if t != MASK_TOKEN)
    expected = [MASK_TOKEN] + [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))][:5]
    assert adapt_vocabulary(texts, max_vocab=6) == expected
    assert adapt_vocabulary(texts[::-1], max_vocab=6, chunk=7) == expected
    with pytest.raises(ValueError, match="Received: max_vocab=1"):
        adapt_vocabulary(texts, max_vocab=1)


VOCAB = [MASK_TOKEN, "good", "bad", "film", "plot", "the", "a"]
SENTENCES = tf.constant(["A good film.", "The plot, bad!", "unknown words here", "", "good good good film"])


def small_encoder(**kwargs):
    return build_text_encoder(VOCAB, kwargs.pop("sequence_length", 8), embedding_dim=8, units=6, **kwargs)


@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_encoder_shapes_and_empty_text(cell):
    features = small_encoder(cell=cell)(SENTENCES).numpy()
    assert features.shape == (5, 12)
    assert np.isfinite(features).all()
    np.testing.assert_array_equal(features[3], 0.0)  # no tokens: the masked mean of nothing


def test_padding_is_masked():
    short, long = small_encoder(sequence_length=6), small_encoder(sequence_length=20)
    long.set_weights(short.get_weights())
    np.testing.assert_allclose(short(SENTENCES).numpy(), long(SENTENCES).numpy(), atol=1e-6)


def test_vocabulary_survives_config_clone_and_save(tmp_path):
    encoder = small_encoder()
    expected = encoder(SENTENCES).numpy()
    vocabulary = encoder.get_layer("vectorize").get_vocabulary()
    assert vocabulary == ["", "[UNK]", *VOCAB]
    rebuilt = keras.Model.from_config(encoder.get_config())
    assert rebuilt.get_layer("vectorize").get_vocabulary() == vocabulary
    clone = _clone(encoder, None)
    path = str(tmp_path / "encoder.keras")
    encoder.save(path)
    loaded = keras.models.load_model(path)
    for copy in (clone, loaded):
        assert copy.get_layer("vectorize").get_vocabulary() == vocabulary
        np.testing.assert_allclose(copy(SENTENCES).numpy(), expected, atol=1e-6)


@pytest.mark.parametrize(
    "kwargs, received",
    [
        (dict(cell="rnn"), "cell='rnn'"),
        (dict(units=0), "units=0"),
        (dict(vocabulary=["good", "bad"]), "vocabulary=['good', 'bad']"),
    ],
)
def test_encoder_errors_name_the_value(kwargs, received):
    args = {"vocabulary": VOCAB, "sequence_length": 8, **kwargs}
    with pytest.raises(ValueError, match=re.escape(f"Received: {received}")):
        build_text_encoder(**args)


def test_byol_fits_on_string_views():
    texts = [f"{a} {b} film with {c} plot" for a in ("a", "the") for b in ("good", "bad") for c in ("dull", "fine")] * 4
    config = TextAugmentConfig(max_tokens=8)
    encoder = build_text_encoder(adapt_vocabulary(texts, 50), config.max_tokens, embedding_dim=8, units=8)
    model = BYOL(encoder, MLPHead(16, 8, name="projector"), MLPHead(16, 8, name="predictor"), base_tau=0.9)
    model.compile(optimizer=keras.optimizers.SGD(0.1))
    before = [w.numpy().copy() for w in encoder.weights]
    target_before = [w.numpy().copy() for w in model.target_encoder.weights]
    pairs = text_view_dataset(texts, 8, config, seed=1, autotune=False)
    history = model.fit(pairs, epochs=1, steps_per_epoch=2, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    assert any(not np.allclose(a, w.numpy()) for a, w in zip(before, encoder.weights))
    assert any(not np.allclose(a, w.numpy()) for a, w in zip(target_before, model.target_encoder.weights))
    assert model(tf.constant(["a good film"])).shape == (1, 16)


def test_savedmodel_signature_takes_raw_strings(tmp_path):
    encoder = small_encoder()
    archive = keras.export.ExportArchive()
    archive.track(encoder)
    archive.add_endpoint(
        "serving_default",
        lambda text: {"embedding": encoder(text, training=False)},
        input_signature=[tf.TensorSpec([None], tf.string, name="text")],
    )
    archive.write_out(str(tmp_path / "served"))
    served = tf.saved_model.load(str(tmp_path / "served")).signatures["serving_default"]
    np.testing.assert_allclose(served(text=SENTENCES)["embedding"].numpy(), encoder(SENTENCES).numpy(), atol=1e-6)
