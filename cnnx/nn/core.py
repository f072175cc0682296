"""Dense, Flatten, Dropout and the stand-alone activation layers."""
import math

import numpy as np

from cnnx import _kernels, _threads, ops
from cnnx.nn import activations
from cnnx.nn.layer import ActivatedLayer, Layer, WeightedLayer


class Dense(WeightedLayer):
    """y = activation(x @ kernel + bias).   x (N, in_features) -> y (N, units).

    kernel_grad_as_factors: when set, backward does not form grads["kernel"] = x^T @ grad_z
    (an in x units GEMM); it leaves grads["kernel"] None and keeps the two factors in
    `kernel_factors` = (x, grad_z) until the next forward. cnnx.parallel's replicas set it
    on large kernels, whose factors travel instead and are multiplied out once per step."""
    kernel_grad_as_factors = False

    def __init__(self, units, activation=None, use_bias=True, kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", kernel_regularizer=None, bias_regularizer=None,
                 name=None):
        super().__init__(activation, use_bias, kernel_initializer, bias_initializer,
                         kernel_regularizer, bias_regularizer, name)
        if int(units) != units or units < 1:
            raise ValueError(f"Dense expects a positive number of units, got {units!r}")
        self.units = int(units)

    def build(self, input_shape, rng):
        if len(input_shape) != 1:
            raise ValueError(f"Dense({self.units}) expected a flat input (N, features), got "
                             f"{(None, *input_shape)}; add Flatten() before it")
        (in_features,) = input_shape
        self._build_weights((in_features, self.units), rng)
        return (self.units,)

    def forward(self, x, training=False, rng=None):
        self._x = x if training else None          # backward needs x for grads["kernel"]
        self._kernel_factors = None
        kernel, bias = self.params["kernel"], self.params.get("bias")
        if _kernel_operands(x, kernel, bias):
            # straight to the kernel, which checks the shapes (ops.dense_forward checks
            # them first in Python, on every call of every step)
            z = _kernels.sgemm(x, kernel, np.empty((len(x), self.units), np.float32), bias,
                               self.fused_relu, n_threads=_threads.get_num_threads())
        else:
            z = ops.dense_forward(x, kernel, bias, relu=self.fused_relu)
        return self._activate(z, training)

    def _backward_linear(self, grad_z):
        x, kernel = self._x, self.params["kernel"]
        as_factors = self.kernel_grad_as_factors and x.dtype == np.float32
        if as_factors:
            grad_z = np.ascontiguousarray(grad_z)           # kept: one of the two factors
        elif not _kernel_operands(x, kernel, grad_z):
            grad_input, grad_kernel, grad_bias = ops.dense_backward(
                x, kernel, grad_z, need_input_grad=self.need_input_grad)
            self.grads["kernel"] = grad_kernel
            if self.use_bias:
                self.grads["bias"] = grad_bias
            return grad_input
        # ops.dense_backward's kernel calls, in its order, without its Python checks
        n_threads = _threads.get_num_threads()
        if as_factors:
            # the kernel gradient stays as its factors (x, grad_z): no in x units GEMM
            self.grads["kernel"] = None
            self._kernel_factors = (x, grad_z)
        else:
            self.grads["kernel"] = _kernels.sgemm(            # (I, N) @ (N, U)
                x, grad_z, np.empty(kernel.shape, np.float32), transpose_a=True,
                n_threads=n_threads)
        if self.use_bias:
            self.grads["bias"] = _kernels.column_sums(
                grad_z, np.empty(self.units, np.float32), n_threads=n_threads)
        if not self.need_input_grad:
            return None
        return _kernels.sgemm(grad_z, kernel, np.empty(x.shape, np.float32),  # (N, U) @ (U, I)
                              transpose_b=True, n_threads=n_threads)

    @property
    def kernel_factors(self):
        """(x, grad_z) of the last backward with kernel_grad_as_factors set, else None; the
        arrays are the layer's own until the next forward (copy what must outlive it)."""
        return getattr(self, "_kernel_factors", None)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _kernel_operands(*arrays):
    """True when the kernels take these arrays as they are: float32 and C-contiguous (None,
    a missing bias, passes). Anything else goes through ops, which converts or refuses."""
    for array in arrays:               # a loop, not all(...): this runs on every call
        if array is not None and not (isinstance(array, np.ndarray)
                                      and array.dtype == np.float32
                                      and array.flags.c_contiguous):
            return False
    return True


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1 * d2 * ...), C-order like Keras channels-last."""

    def build(self, input_shape, rng):
        return (math.prod(input_shape),)          # np.prod would wrap around at 2**63

    def forward(self, x, training=False, rng=None):
        return x.reshape(len(x), -1)

    def backward(self, grad_output):
        return grad_output.reshape(len(grad_output), *self.input_shape)


class Dropout(Layer):
    """Training: y = x * keep / (1 - rate), keep ~ Bernoulli(1 - rate). Inference: y = x.

    The mask comes from a counter-based generator (Philox4x64-10, in C) keyed by two draws
    from the rng passed in, so it depends on (seed, epoch, step, shard) and the layer's
    place only, never on the thread count. In training the output and grad_input live in
    buffers the next training step overwrites."""

    def __init__(self, rate, name=None):
        super().__init__(name)
        if not 0 <= rate < 1:
            raise ValueError(f"Dropout expects 0 <= rate < 1, got {rate}")
        self.rate = float(rate)
        self._keep = None

    def forward(self, x, training=False, rng=None):
        if not training or self.rate == 0:
            self._keep = None
            return x
        if rng is None:
            raise ValueError(f"layer {self.name!r} (Dropout) needs an rng in training; "
                             f"Sequential passes np.random.default_rng((seed, epoch, step, shard))")
        key = rng.integers(0, 2**64, size=2, dtype=np.uint64)
        n_threads = _threads.get_num_threads()
        self._keep = _kernels.dropout_mask(self._workspace("keep", x.shape, np.uint8), key,
                                           self.rate, n_threads=n_threads)
        return self._apply(x, "output")

    def _apply(self, values, buffer):
        """values * (keep ? 1 / (1 - rate) : 0): the forward on x, the backward on grads."""
        scale = values.dtype.type(1 / (1 - self.rate))
        if values.dtype == np.float32 and values.flags.c_contiguous:
            return _kernels.dropout_apply(values, self._keep, scale,
                                          self._workspace(buffer, values.shape, np.float32),
                                          n_threads=_threads.get_num_threads())
        return values * np.where(self._keep, scale, values.dtype.type(0))

    def backward(self, grad_output):
        return grad_output if self._keep is None else self._apply(grad_output, "grad_input")

    def get_config(self):
        return {**super().get_config(), "rate": self.rate}


class Activation(ActivatedLayer):
    """y = activation(x), as a layer of its own (Keras' layers.Activation)."""

    def __init__(self, activation, name=None):
        super().__init__(activation, name)

    def forward(self, x, training=False, rng=None):
        if self.fused_relu:
            # training: a buffer reused across steps (a fresh 80 MB array page-faults each step)
            out = self._workspace("output", x.shape, x.dtype) if training else None
            z = activations.relu(x, out=out)
        else:
            z = x
        return self._activate(z, training)

    def _backward_linear(self, grad_z):
        return grad_z


class ReLU(Activation):
    def __init__(self, name=None):
        super().__init__("relu", name)

    def get_config(self):
        return {"name": self.name}


class LeakyReLU(Activation):
    def __init__(self, alpha=0.01, name=None):
        super().__init__(activations.LeakyReLU(alpha), name)

    def get_config(self):
        return {"name": self.name, "alpha": self.activation.alpha}


class Softmax(Activation):
    def __init__(self, name=None):
        super().__init__("softmax", name)

    def get_config(self):
        return {"name": self.name}
