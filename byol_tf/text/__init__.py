"""BYOL on text: views of sentences, a vocabulary and RNN encoder, and text sources."""

from byol_tf.text.augment import MASK_TOKEN, TextAugmentConfig, standardize, text_view, text_views, tokenize
from byol_tf.text.data import TextSet, load_text, text_view_dataset
from byol_tf.text.encoder import MaskedMeanPooling, adapt_vocabulary, build_text_encoder

__all__ = [
    "MASK_TOKEN",
    "MaskedMeanPooling",
    "TextAugmentConfig",
    "TextSet",
    "adapt_vocabulary",
    "build_text_encoder",
    "load_text",
    "standardize",
    "text_view",
    "text_view_dataset",
    "text_views",
    "tokenize",
]
