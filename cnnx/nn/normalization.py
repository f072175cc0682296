"""BatchNormalization over the last axis (channels of NHWC, features of (N, F))."""
import numpy as np

from cnnx.nn.layer import Layer


class BatchNormalization(Layer):
    """y = gamma * (x - mean) / sqrt(var + epsilon) + beta, per channel.

    Training uses the batch's mean and (biased) variance and moves the moving statistics
    toward them: moving = momentum * moving + (1 - momentum) * batch.  Inference uses the
    moving statistics.  Defaults are Keras': momentum 0.99, epsilon 1e-3.
    """

    def __init__(self, momentum=0.99, epsilon=1e-3, name=None):
        super().__init__(name)
        if not 0 <= momentum < 1 or epsilon <= 0:
            raise ValueError(f"BatchNormalization expects 0 <= momentum < 1 and epsilon > 0, "
                             f"got momentum={momentum}, epsilon={epsilon}")
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self._cache = None

    def build(self, input_shape, rng):
        channels = input_shape[-1]
        self.params = {"gamma": np.ones(channels, np.float32),
                       "beta": np.zeros(channels, np.float32)}
        self.grads = {name: None for name in self.params}
        self.state = {"moving_mean": np.zeros(channels, np.float32),
                      "moving_variance": np.ones(channels, np.float32)}
        return tuple(input_shape)

    def forward(self, x, training=False, rng=None):
        axes = tuple(range(x.ndim - 1))               # all but the channel axis
        gamma, beta = self.params["gamma"], self.params["beta"]
        if not training:
            self._cache = None
            inv_std = 1 / np.sqrt(self.state["moving_variance"] + self.epsilon)
            scale = (gamma * inv_std).astype(x.dtype)
            return x * scale + (beta - self.state["moving_mean"] * scale).astype(x.dtype)
        mean = x.mean(axis=axes)
        centred = x - mean
        variance = np.square(centred).mean(axis=axes)
        inv_std = (1 / np.sqrt(variance + self.epsilon)).astype(x.dtype)
        x_hat = centred * inv_std
        self._cache = (x_hat, inv_std)
        for name, batch in (("moving_mean", mean), ("moving_variance", variance)):
            moving = self.state[name]
            moving[...] = self.momentum * moving + (1 - self.momentum) * batch
        return x_hat * gamma.astype(x.dtype) + beta.astype(x.dtype)

    def backward(self, grad_output):
        x_hat, inv_std = self._cache
        axes = tuple(range(grad_output.ndim - 1))
        count = grad_output.size // grad_output.shape[-1]          # samples per channel
        self.grads["beta"] = grad_output.sum(axis=axes)
        self.grads["gamma"] = (grad_output * x_hat).sum(axis=axes)
        # dx = inv_std / m * (m * g_hat - sum(g_hat) - x_hat * sum(g_hat * x_hat)), g_hat = g * gamma
        gamma = self.params["gamma"].astype(grad_output.dtype)
        return (gamma * inv_std / count) * (count * grad_output - self.grads["beta"]
                                            - x_hat * self.grads["gamma"])

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}
