"""The projector and predictor MLPs: Linear -> BN -> ReLU -> Linear."""

import keras

# The predictor's layer name: its variables' paths start with it (`byol_tf.optim` scales their rate).
PREDICTOR_NAME = "predictor"


@keras.saving.register_keras_serializable(package="byol_tf")
class MLPHead(keras.layers.Layer):
    """BYOL's projector / predictor (Grill et al. 2020, Section 3.3).

    Args:
        hidden_dim: width of the hidden layer (4096 in the paper).
        output_dim: output width (256 in the paper).
        synchronized: use cross-replica (synchronised) BatchNorm, for
            `tf.distribute` strategies with several replicas.
        bn_momentum: BatchNorm moving-average momentum.
        **kwargs: passed to `keras.layers.Layer`.

    Example:
    >>> head = MLPHead(hidden_dim=64, output_dim=16)
    >>> head(keras.ops.ones((4, 32))).shape
    (4, 16)
    """

    def __init__(self, hidden_dim=4096, output_dim=256, synchronized=False, bn_momentum=0.9, bn_epsilon=1e-5, **kwargs):
        super().__init__(**kwargs)
        for name, value in (("hidden_dim", hidden_dim), ("output_dim", output_dim)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive int. Received: {name}={value!r}")
        self.hidden_dim = hidden_dim
        self.output_dim = output_dim
        self.synchronized = synchronized
        self.bn_momentum = bn_momentum
        self.bn_epsilon = bn_epsilon
        # The bias of the hidden layer is redundant: BatchNorm's beta follows.
        self.hidden = keras.layers.Dense(hidden_dim, use_bias=False, name="hidden")
        self.bn = keras.layers.BatchNormalization(
            momentum=bn_momentum, epsilon=bn_epsilon, synchronized=synchronized, name="bn"
        )
        self.out = keras.layers.Dense(output_dim, name="out")

    def build(self, input_shape):
        input_shape = tuple(input_shape)
        self.hidden.build(input_shape)
        self.bn.build(input_shape[:-1] + (self.hidden_dim,))
        self.out.build(input_shape[:-1] + (self.hidden_dim,))

    def call(self, inputs, training=None):
        x = self.hidden(inputs)
        x = self.bn(x, training=training)
        return self.out(keras.ops.relu(x))

    def compute_output_shape(self, input_shape):
        return tuple(input_shape)[:-1] + (self.output_dim,)

    def get_config(self):
        config = super().get_config()
        config.update(
            hidden_dim=self.hidden_dim,
            output_dim=self.output_dim,
            synchronized=self.synchronized,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        return config
