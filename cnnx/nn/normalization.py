"""BatchNormalization over the last axis (channels of NHWC, features of (N, F))."""
import numpy as np

from cnnx import _kernels, _threads
from cnnx.nn import activations
from cnnx.nn.core import Activation
from cnnx.nn.layer import Layer


class BatchNormalization(Layer):
    """y = gamma * (x - mean) / sqrt(var + epsilon) + beta, per channel.

    Training uses the batch's mean and (biased) variance and moves the moving statistics
    toward them: moving = momentum * moving + (1 - momentum) * batch.  Inference uses the
    moving statistics.  Defaults are Keras': momentum 0.99, epsilon 1e-3.
    In training the output lives in a buffer the next training forward overwrites.
    float32 training runs on the C kernels (per-channel sums in double, fixed order: the
    same bits for any thread count); float64 (the gradient checks) on NumPy.

    Followed by a ReLU layer, it can take that ReLU over (fuse_following_relu): the forward
    then writes max(y, 0) in its one output pass and the backward applies ReLU's mask inside
    its own two passes, with the same results as the two layers apart.
    """

    fused_relu = False       # True: this layer applies the ReLU layer after it
    _on_kernels = False      # True: the last training forward ran on the C kernels

    def __init__(self, momentum=0.99, epsilon=1e-3, name=None):
        super().__init__(name)
        if not 0 <= momentum < 1 or epsilon <= 0:
            raise ValueError(f"BatchNormalization expects 0 <= momentum < 1 and epsilon > 0, "
                             f"got momentum={momentum}, epsilon={epsilon}")
        self.momentum, self.epsilon = float(momentum), float(epsilon)
        self._cache = None

    def fuse_following_relu(self, next_layer):
        """Apply next_layer's ReLU here when next_layer is a ReLU layer (nn.ReLU, or
        nn.Activation("relu")), which then passes values through: one pass over the
        activation forward and none backward instead of a ReLU pass each way.  Returns True
        when fused.  A Sequential calls it on each BatchNormalization and the layer after."""
        if not (isinstance(next_layer, Activation)
                and isinstance(next_layer.activation, activations.ReLU)):
            return False
        self.fused_relu = True
        next_layer.activation = activations.FusedReLU()
        return True

    def build(self, input_shape, rng):
        channels = input_shape[-1]
        self.params = {"gamma": np.ones(channels, np.float32),
                       "beta": np.zeros(channels, np.float32)}
        self.grads = {name: None for name in self.params}
        self.state = {"moving_mean": np.zeros(channels, np.float32),
                      "moving_variance": np.ones(channels, np.float32)}
        return tuple(input_shape)

    # Both passes work on x seen as (M, C), M = N*H*W samples per channel, and fold the
    # per-channel constants together so that each touches the big arrays as few times as
    # possible (BatchNorm is memory-bound); big results go to reused work buffers.

    def forward(self, x, training=False, rng=None):
        if training and _fast(x):
            return self._forward_float32(x)
        gamma = self.params["gamma"].astype(x.dtype, copy=False)
        beta = self.params["beta"].astype(x.dtype, copy=False)
        flat = x.reshape(-1, x.shape[-1])                      # (M, C)
        if not training:
            self._cache = None
            inv_std = 1 / np.sqrt(self.state["moving_variance"] + self.epsilon)
            scale = (gamma * inv_std).astype(x.dtype)
            y = flat * scale
            y += (beta - self.state["moving_mean"] * scale).astype(x.dtype)
            return self._relu(y).reshape(x.shape)
        self._on_kernels = False       # the backward must not take the kernels' mask
        count = len(flat)
        mean = np.einsum("mc->c", flat) / count
        y = np.subtract(flat, mean, out=self._workspace("output", flat.shape, x.dtype))
        variance = np.einsum("mc,mc->c", y, y) / count
        inv_std = (1 / np.sqrt(variance + self.epsilon)).astype(x.dtype)
        for name, batch in (("moving_mean", mean), ("moving_variance", variance)):
            moving = self.state[name]
            moving[...] = self.momentum * moving + (1 - self.momentum) * batch
        y *= gamma * inv_std
        y += beta
        y = self._relu(y)
        self._cache = (flat, mean, inv_std, y)
        return y.reshape(x.shape)

    def _forward_float32(self, x):
        """The training forward on the C kernels: one read pass for both sums (in double),
        one pass for y = x * scale + shift."""
        flat = x.reshape(-1, x.shape[-1])                      # (M, C)
        n_threads = _threads.get_num_threads()
        # shifted by the first sample: sum (x - k)^2 has no cancellation when |mean| >> std
        shift = np.ascontiguousarray(flat[0])
        sums, squares = _kernels.channel_sums(flat, a_shift=shift, b_shift=shift,
                                              n_threads=n_threads)
        count = len(flat)
        offset = sums / count                                  # mean of x - k
        mean = shift + offset
        variance = np.maximum(squares / count - offset * offset, 0.0)
        inv_std = 1 / np.sqrt(variance + self.epsilon)
        for name, batch in (("moving_mean", mean), ("moving_variance", variance)):
            moving = self.state[name]
            moving[...] = self.momentum * moving + (1 - self.momentum) * batch
        scale = (self.params["gamma"] * inv_std).astype(np.float32)
        # (x - mean) * scale + beta: centred first, as the maths reads (x * scale - mean *
        # scale would cancel in float32 when |mean| >> std); max(., 0) when fused
        mean32 = mean.astype(np.float32)
        y = _kernels.channel_affine(flat, scale, self.params["beta"],
                                    self._workspace("output", flat.shape, np.float32),
                                    a_shift=mean32, relu=self.fused_relu, n_threads=n_threads)
        self._cache, self._on_kernels = (flat, mean, inv_std, y), True
        # the fused ReLU's mask, recomputed from x by the backward as the forward decided it
        self._relu_mask = ((mean32, scale, self.params["beta"].copy()) if self.fused_relu
                           else None)
        return y.reshape(x.shape)

    def _relu(self, y):
        """The fused ReLU on the NumPy paths (the ReLU layer's own function)."""
        return activations.relu(y) if self.fused_relu else y

    def _backward_float32(self, grad_output):
        flat, mean, inv_std, _ = self._cache
        grad = grad_output.reshape(-1, grad_output.shape[-1])  # (M, C)
        n_threads = _threads.get_num_threads()
        shift = mean.astype(np.float32)                        # near the mean: no cancellation
        # fused: grad * (y > 0) replaces grad in both passes, y > 0 recomputed from x
        mask = self._relu_mask
        grad_beta, grad_times_x = _kernels.channel_sums(grad, flat, b_shift=shift,
                                                        relu_mask=mask, n_threads=n_threads)
        # sum(g * x_hat) with x_hat = (x - mean) * inv_std, without forming x_hat
        grad_gamma = inv_std * (grad_times_x - (mean - shift) * grad_beta)
        self.grads["beta"] = grad_beta.astype(np.float32)
        self.grads["gamma"] = grad_gamma.astype(np.float32)
        # dx = k g + b (x - mean) + c per channel (backward's regrouping, x centred)
        count = len(grad)
        k = self.params["gamma"] * inv_std
        b = -k * inv_std * grad_gamma / count
        c = -k * grad_beta / count
        out = self._workspace("backward", grad.shape, np.float32)
        _kernels.channel_affine(grad, k.astype(np.float32), c.astype(np.float32), out,
                                b=flat, b_scale=b.astype(np.float32), b_shift=shift,
                                relu_mask=mask, n_threads=n_threads)
        return out.reshape(grad_output.shape)

    def backward(self, grad_output):
        if self._on_kernels and _fast(grad_output):
            return self._backward_float32(grad_output)
        flat, mean, inv_std, y = self._cache
        if self.fused_relu:                                    # ReLU's backward first
            grad_output = grad_output * (y.reshape(grad_output.shape) > 0)
        grad = grad_output.reshape(-1, grad_output.shape[-1])  # (M, C)
        count = len(grad)
        grad_beta = np.einsum("mc->c", grad)
        # sum(g * x_hat) with x_hat = (x - mean) * inv_std, without forming x_hat
        grad_gamma = inv_std * (np.einsum("mc,mc->c", grad, flat) - mean * grad_beta)
        self.grads["beta"], self.grads["gamma"] = grad_beta, grad_gamma
        # dx = k (g - sum(g)/M - x_hat sum(g x_hat)/M), k = gamma inv_std, regrouped per
        # channel as dx = k g + b x + c
        k = self.params["gamma"].astype(grad.dtype) * inv_std
        b = -k * inv_std * grad_gamma / count
        c = k * (mean * inv_std * grad_gamma - grad_beta) / count
        grad_input = np.multiply(grad, k, out=grad)            # grad_output is ours to overwrite
        grad_input += np.multiply(flat, b, out=self._workspace("backward", flat.shape, flat.dtype))
        grad_input += c
        return grad_input.reshape(grad_output.shape)

    def get_config(self):
        return {**super().get_config(), "momentum": self.momentum, "epsilon": self.epsilon}


def _fast(array):
    """float32, C-contiguous, not empty: the C kernels' operands."""
    return array.dtype == np.float32 and array.flags.c_contiguous and array.size > 0


def fuse_batchnorm_relu(layers):
    """Let each BatchNormalization in `layers` (a model's layers, in order) apply the ReLU
    layer right after it (BatchNormalization.fuse_following_relu); returns how many pairs
    were fused. The same results, two passes fewer per pair and step."""
    return sum(layer.fuse_following_relu(following)
               for layer, following in zip(layers, layers[1:])
               if isinstance(layer, BatchNormalization))
