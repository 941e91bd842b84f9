"""The text encoder: raw strings -> `TextVectorization` -> embedding -> bidirectional RNN -> masked mean.

The vocabulary is a constructor argument of the `TextVectorization` layer,
so it is part of the model's config: `keras.models.clone_model` (BYOL's
target network) and `.keras` save/load keep it without an `adapt` call.
"""

import collections
from typing import Iterable, List, Sequence

import keras
import numpy as np

from byol_tf.text.augment import MASK_TOKEN, tokenize

CELLS = {"gru": keras.layers.GRU, "lstm": keras.layers.LSTM}


def adapt_vocabulary(texts: Iterable, max_vocab: int = 10000, chunk: int = 4096) -> List[str]:
    """The training text's most frequent tokens, after the encoder's standardisation and split.

    Ties are broken alphabetically, so the list does not depend on the order
    of `texts`.

    Args:
        texts: str or bytes sentences (the training split only).
        max_vocab: the longest list to return, the mask token included.
        chunk: sentences tokenised per TF call.

    Returns:
        `[MASK_TOKEN, most frequent, ...]`, at most `max_vocab` tokens, for
        `build_text_encoder` (which adds the padding and OOV tokens).

    Example:
    >>> adapt_vocabulary(["a good film", "a bad film", "a film"], max_vocab=3)
    ['xxmask', 'a', 'film']
    """
    if isinstance(max_vocab, bool) or not isinstance(max_vocab, int) or max_vocab < 2:
        raise ValueError(
            f"`max_vocab` must be an int >= 2 (the mask token and a word). Received: max_vocab={max_vocab!r}"
        )
    texts = list(texts)
    counts = collections.Counter()
    for first in range(0, len(texts), chunk):
        counts.update(tokenize(np.asarray(texts[first : first + chunk], dtype=object)).flat_values.numpy().tolist())
    counts.pop(MASK_TOKEN.encode(), None)
    words = sorted(counts.items(), key=lambda item: (-item[1], item[0]))[: max_vocab - 1]
    if not words:
        raise ValueError(f"`texts` hold no tokens to build a vocabulary from. Received: {len(texts)} texts")
    return [MASK_TOKEN] + [word.decode("utf-8") for word, _ in words]


@keras.saving.register_keras_serializable(package="byol_tf")
class MaskedMeanPooling(keras.layers.Layer):
    """Mean over the unmasked time steps of `[batch, time, features]`.

    Unlike `GlobalAveragePooling1D`, a row with no tokens at all (an empty
    or all-punctuation string at serving time) gives zeros, not NaN.

    Example:
    >>> x = keras.ops.ones((2, 3, 4))
    >>> tuple(MaskedMeanPooling()(x).shape)
    (2, 4)
    """

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.supports_masking = True

    def call(self, inputs, mask=None):
        if mask is None:
            return keras.ops.mean(inputs, axis=1)
        weights = keras.ops.cast(mask, inputs.dtype)[:, :, None]
        total = keras.ops.sum(inputs * weights, axis=1)
        return total / keras.ops.maximum(keras.ops.sum(weights, axis=1), 1.0)

    def compute_mask(self, inputs, mask=None):
        return None

    def compute_output_shape(self, input_shape):
        return (input_shape[0], input_shape[2])


def build_text_encoder(
    vocabulary: Sequence[str],
    sequence_length: int,
    embedding_dim: int = 64,
    units: int = 32,
    cell: str = "gru",
    dropout: float = 0.0,
    name: str = "text_encoder",
) -> keras.Model:
    """A functional encoder from `tf.string [batch]` to features `[batch, 2 * units]`.

    Strings are standardised as `byol_tf.text.augment.standardize` does
    (lower-case, punctuation stripped), split on whitespace and cut or padded
    to `sequence_length` tokens. Padding (id 0) is masked in the RNN and the
    pooling; unknown words share the OOV id 1.

    Args:
        vocabulary: the tokens from `adapt_vocabulary` (the mask token first),
            without the padding and OOV tokens, which the layer adds.
        sequence_length: tokens kept per text; `TextAugmentConfig.max_tokens`.
        embedding_dim: width of the token embedding.
        units: units of the RNN in each direction. The defaults (64, 32) run
            a forward+backward pass at about 2,400 sentences/s at batch 256
            on 2 shared cores (48 tokens; 64/64 gives about 1,300/s).
        cell: "gru" or "lstm".
        dropout: dropout on the embedded tokens (0 to leave them alone).
        name: the model's name.

    Returns:
        A `keras.Model` whose input is named "text".

    Example:
    >>> encoder = build_text_encoder(["xxmask", "good", "bad"], sequence_length=8, embedding_dim=8, units=4)
    >>> tuple(encoder(np.array(["Good film!", ""])).shape)
    (2, 8)
    """
    vocabulary = _check_args(vocabulary, sequence_length, embedding_dim, units, cell, dropout)
    inputs = keras.Input(shape=(), dtype="string", name="text")
    ids = keras.layers.TextVectorization(
        vocabulary=vocabulary,
        output_mode="int",
        output_sequence_length=sequence_length,
        standardize="lower_and_strip_punctuation",
        split="whitespace",
        name="vectorize",
    )(inputs)
    # +2: the padding (0) and OOV (1) ids that TextVectorization puts before the vocabulary.
    x = keras.layers.Embedding(len(vocabulary) + 2, embedding_dim, mask_zero=True, name="embedding")(ids)
    if dropout:
        x = keras.layers.Dropout(dropout, name="embedding_dropout")(x)
    x = keras.layers.Bidirectional(
        CELLS[cell](
            units,
            return_sequences=True,
        ),
        name=f"bi_{cell}",
    )(x)
    features = MaskedMeanPooling(name="pool")(x)
    return keras.Model(inputs, features, name=name)


def _check_args(vocabulary, sequence_length, embedding_dim, units, cell, dropout):
    vocabulary = [str(token) for token in vocabulary]
    if not vocabulary or len(set(vocabulary)) != len(vocabulary) or "" in vocabulary or "[UNK]" in vocabulary:
        raise ValueError(
            "`vocabulary` must be non-empty, without repeats, '' or '[UNK]' (the layer adds those). "
            f"Received: vocabulary={vocabulary[:10]!r}{' ...' if len(vocabulary) > 10 else ''}"
        )
    if MASK_TOKEN not in vocabulary:
        raise ValueError(
            f"`vocabulary` must hold the mask token {MASK_TOKEN!r} (see `adapt_vocabulary`). "
            f"Received: vocabulary={vocabulary[:10]!r}{' ...' if len(vocabulary) > 10 else ''}"
        )
    for arg, value in (("sequence_length", sequence_length), ("embedding_dim", embedding_dim), ("units", units)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{arg}` must be a positive int. Received: {arg}={value!r}")
    if cell not in CELLS:
        raise ValueError(f"`cell` must be one of {sorted(CELLS)}. Received: cell={cell!r}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout!r}")
    return vocabulary
