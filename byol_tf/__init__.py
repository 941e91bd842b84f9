"""byol-tf: BYOL self-supervised pretraining in Keras 3 on TensorFlow."""

__version__ = "0.1.0"

from byol_tf.config import AugmentConfig, PretrainConfig
from byol_tf.presets import PRESETS, get_preset
from byol_tf.ema import EMAUpdate, cosine_tau, update_target
from byol_tf.heads import MLPHead
from byol_tf.losses import infonce_loss, regression_loss, symmetric_loss
from byol_tf.build import build_byol
from byol_tf.model import BYOL, collapse_std, pooled_encoder
from byol_tf.optim import LARS, lars
from byol_tf.data.views import views
