import keras
import numpy as np
import pytest

from byol_tf.heads import MLPHead
from conftest import assert_config_round_trip


def test_shape_structure_and_config():
    head = MLPHead(hidden_dim=64, output_dim=8, name="projector")
    y = head(np.ones((4, 16), "float32"))
    assert y.shape == (4, 8)
    assert head.hidden.units == 64 and head.out.units == 8 and head.bn is not None
    clone = assert_config_round_trip(head)
    assert clone.hidden_dim == 64 and clone.output_dim == 8


def test_bad_width_is_named():
    with pytest.raises(ValueError, match="hidden_dim=0"):
        MLPHead(hidden_dim=0)


def test_keras_save_reload(tmp_path):
    inputs = keras.Input((16,))
    model = keras.Model(inputs, MLPHead(32, 8)(inputs))
    path = str(tmp_path / "head.keras")
    model.save(path)
    reloaded = keras.saving.load_model(path, safe_mode=True)
    x = np.random.default_rng(0).random((3, 16)).astype("float32")
    np.testing.assert_allclose(model(x).numpy(), reloaded(x).numpy(), atol=1e-6)
