"""Audio building blocks: waveform views, a log-mel encoder and WAV / `.npz` loading.

Every view and the encoder's input is a waveform `[batch, num_samples]`, so
the image machinery above them (BYOL, EMA, training, export) applies as is.
"""

from byol_tf.audio.augment import audio_view, audio_views, eval_waveforms
from byol_tf.audio.config import AudioAugmentConfig
from byol_tf.audio.data import AudioData, load_audio, read_wav, resample_audio
from byol_tf.audio.encoder import LogOffset, build_audio_encoder

__all__ = [
    "AudioAugmentConfig",
    "AudioData",
    "LogOffset",
    "audio_view",
    "audio_views",
    "build_audio_encoder",
    "eval_waveforms",
    "load_audio",
    "read_wav",
    "resample_audio",
]
