"""Two BYOL views of a batch of sentences, as stateless `tf.strings` and ragged ops.

A view is a string again (tokens joined by single spaces), so the encoder
and the serving signature both take raw text and tokenise inside the graph.
Each view, drawn independently per sentence: a random contiguous span crop,
token dropout, token masking (`MASK_TOKEN`), then a local shuffle.

Evaluation preprocessing is the identity: raw sentences go straight into
the encoder, whose `TextVectorization` standardises them and keeps the first
`max_tokens` tokens.
"""

import dataclasses
from typing import Tuple

import tensorflow as tf
from byol_tf.checks import check as _check

# Lower-case letters only, so that it survives the encoder's standardisation
# (a "[MASK]" would become "mask", a real word); fastai's "xx" prefix marks it.
MASK_TOKEN = "xxmask"
# The punctuation Keras's TextVectorization strips ("lower_and_strip_punctuation").
STRIP_REGEX = r'[!"#$%&()\*\+,-\./:;<=>?@\[\\\]^_`{|}~\']'


@dataclasses.dataclass(frozen=True)
class TextAugmentConfig:
    """The two text views (the same distribution for both, drawn independently).

    The defaults suit short sentences (SST-2: 17 tokens on average, 48 at
    most): a crop keeps at least 60% and the three token-level noises touch
    about one token in ten each, so a view of a 10-token sentence still holds
    most of its sentiment words.

    Args:
        max_tokens: tokens per view, and the encoder's `sequence_length`; a
            longer text gets a random window of at most this many tokens.
        crop_fraction: range of the span crop's length, as a fraction of the
            text's tokens (rounded up, at least one token).
        token_dropout: probability that a token of the span is deleted.
        mask_prob: probability that a kept token becomes `MASK_TOKEN`.
        shuffle_window: after the other ops, tokens move at most this many
            places (0: no shuffle).
    """

    max_tokens: int = 48
    crop_fraction: Tuple[float, float] = (0.6, 1.0)
    token_dropout: float = 0.1
    mask_prob: float = 0.1
    shuffle_window: int = 2

    def __post_init__(self):
        for name in ("max_tokens", "shuffle_window"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool), name, value, "must be an int")
        _check(self.max_tokens >= 1, "max_tokens", self.max_tokens, "must be >= 1")
        _check(self.shuffle_window >= 0, "shuffle_window", self.shuffle_window, "must be >= 0")
        lo, hi = tuple(self.crop_fraction) if len(self.crop_fraction) == 2 else (0.0, -1.0)
        _check(0.0 < lo <= hi <= 1.0, "crop_fraction", self.crop_fraction, "must be (lo, hi) with 0 < lo <= hi <= 1")
        # 1.0 would delete every token; at least one is kept anyway, but that is no augmentation.
        _check(0.0 <= self.token_dropout < 1.0, "token_dropout", self.token_dropout, "must be in [0, 1)")
        _check(0.0 <= self.mask_prob <= 1.0, "mask_prob", self.mask_prob, "must be in [0, 1]")

    @classmethod
    def from_dict(cls, values: dict) -> "TextAugmentConfig":
        """From `dataclasses.asdict` output after a JSON round trip (lists back to tuples)."""
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in values.items()})


def standardize(texts) -> tf.Tensor:
    """Lower-cases (ASCII) and strips punctuation exactly as the encoder's `TextVectorization` does."""
    return tf.strings.regex_replace(tf.strings.lower(tf.convert_to_tensor(texts, tf.string)), STRIP_REGEX, "")


def tokenize(texts) -> tf.RaggedTensor:
    """`standardize`, then whitespace tokens: a ragged `tf.string [batch, None]`."""
    return tf.strings.split(standardize(texts))


def text_views(sentences, seed, config: TextAugmentConfig) -> Tuple[tf.Tensor, tf.Tensor]:
    """Two independent views of each sentence.

    Args:
        sentences: `tf.string [batch]` (the batch size may be unknown).
        seed: int32 or int64 tensor of shape `[2]`; the same seed gives the
            same views, eagerly, in `tf.function` and in `tf.data`.
        config: a `TextAugmentConfig`.

    Returns:
        `(view1, view2)`, each `tf.string [batch]`: standardised tokens
        joined by spaces, never empty (a text without tokens gives `MASK_TOKEN`).

    Example:
    >>> v1, v2 = text_views(tf.constant(["A fine, funny film."]), tf.constant([0, 1]), TextAugmentConfig())
    >>> v1.shape, v2.dtype
    (TensorShape([1]), tf.string)
    """
    seeds = tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=2)
    tokens = tokenize(sentences)
    return _view(tokens, seeds[0], config), _view(tokens, seeds[1], config)


def text_view(sentences, seed, config: TextAugmentConfig) -> tf.Tensor:
    """One view of `sentences` from `seed`: `tf.string [batch]`.

    `text_views` draws each of its two views this way, from a split of its seed.
    """
    return _view(tokenize(sentences), tf.cast(seed, tf.int64), config)


def _view(tokens, seed, config):
    keys = tf.random.experimental.stateless_split(seed, num=5)
    dense = tokens.to_tensor(default_value="")
    lengths = tokens.row_lengths()
    keep = _span(lengths, tf.shape(dense, out_type=tf.int64), keys[0], keys[1], config)
    keep = _dropout(keep, keys[2], config.token_dropout)
    if config.mask_prob > 0:
        masked = tf.random.stateless_uniform(tf.shape(dense), keys[3]) < config.mask_prob
        dense = tf.where(masked & keep, MASK_TOKEN, dense)
    view = _local_shuffle(tf.ragged.boolean_mask(dense, keep), keys[4], config.shuffle_window)
    joined = tf.strings.reduce_join(view, axis=1, separator=" ")
    return tf.where(lengths > 0, joined, MASK_TOKEN)


def _span(lengths, shape, key_length, key_start, config):
    """`[batch, time]` bool: a contiguous span of `ceil(f * n)` tokens, f ~ U(crop_fraction), at most max_tokens."""
    n = tf.cast(lengths, tf.float32)
    fraction = tf.random.stateless_uniform(shape[:1], key_length, *config.crop_fraction)
    longest = tf.minimum(lengths, config.max_tokens)
    size = tf.minimum(tf.maximum(tf.cast(tf.math.ceil(fraction * n), tf.int64), 1), longest)
    room = lengths - size
    start = tf.cast(tf.random.stateless_uniform(shape[:1], key_start) * tf.cast(room + 1, tf.float32), tf.int64)
    # u * (room + 1) can round up to room + 1 in float32.
    start = tf.minimum(start, room)[:, None]
    position = tf.range(shape[1])[None, :]
    return (position >= start) & (position < start + size[:, None])


def _dropout(keep, key, rate):
    """Deletes each kept token with probability `rate`, sparing the one with the largest draw."""
    if rate <= 0:
        return keep
    draws = tf.where(keep, tf.random.stateless_uniform(tf.shape(keep), key), -1.0)
    # The largest draw of a row survives whenever any token does, so this only acts on rows that lost them all.
    spared = draws >= tf.reduce_max(draws, axis=1, keepdims=True)
    return keep & ((draws >= rate) | spared)


def _local_shuffle(view, key, window):
    """Sorts each row by `position + U(0, window + 1)`: a permutation moving no token more than `window` places."""
    if window <= 0:
        return view
    dense = view.to_tensor(default_value="")
    lengths = view.row_lengths()
    shape = tf.shape(dense)
    position = tf.cast(tf.range(shape[1]), tf.float32)[None, :]
    noisy = position + tf.random.stateless_uniform(shape, key, maxval=float(window + 1))
    # Padding sorts last; a stable sort breaks float ties by position, which keeps the bound.
    noisy = tf.where(position < tf.cast(lengths, tf.float32)[:, None], noisy, float("inf"))
    order = tf.argsort(noisy, axis=1, stable=True)
    return tf.RaggedTensor.from_tensor(tf.gather(dense, order, batch_dims=1), lengths=lengths)
