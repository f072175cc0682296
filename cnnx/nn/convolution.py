"""Conv2D: y = activation(conv(x, kernel) + bias), NHWC input, HWIO kernel (like Keras)."""
import numpy as np

from cnnx import ops
from cnnx.nn.layer import WeightedLayer


class Conv2D(WeightedLayer):
    """x (N, H, W, C) -> y (N, OH, OW, filters); kernel (KH, KW, C, filters), bias (filters,).
    In training, the output and grad_input live in buffers the next training step overwrites."""

    def __init__(self, filters, kernel_size, strides=1, padding="valid", activation=None,
                 use_bias=True, kernel_initializer="glorot_uniform", bias_initializer="zeros",
                 kernel_regularizer=None, bias_regularizer=None, name=None):
        super().__init__(activation, use_bias, kernel_initializer, bias_initializer,
                         kernel_regularizer, bias_regularizer, name)
        if int(filters) != filters or filters < 1:
            raise ValueError(f"Conv2D expects a positive number of filters, got {filters!r}")
        if padding not in ops.PADDINGS:
            raise ValueError(f"Conv2D(filters={filters}) expects padding 'valid' or 'same', "
                             f"got {padding!r}")
        self.filters = int(filters)
        self.kernel_size = ops._pair(kernel_size, "Conv2D kernel_size")
        self.strides = ops._pair(strides, "Conv2D strides")
        self.padding = padding

    def build(self, input_shape, rng):
        if len(input_shape) != 3:
            raise ValueError(f"Conv2D(filters={self.filters}) expected input (N, H, W, C), "
                             f"got {(None, *input_shape)}")
        h, w, c = input_shape
        (kh, kw), (sh, sw) = self.kernel_size, self.strides
        if (ops.output_size(h, kh, sh, self.padding) < 1
                or ops.output_size(w, kw, sw, self.padding) < 1):
            raise ValueError(f"Conv2D(filters={self.filters}, kernel_size={self.kernel_size}) "
                             f"does not fit its input {(None, h, w, c)} with padding "
                             f"{self.padding!r}")
        # worked out once here; every forward and backward hands it down to the kernels
        self.geometry = ops.conv_geometry(input_shape, self.kernel_size, self.filters,
                                          self.strides, self.padding)
        self._build_weights((kh, kw, c, self.filters), rng)
        return (*self.geometry.output_size, self.filters)

    def forward(self, x, training=False, rng=None):
        self._x = x if training else None          # backward needs x for grads["kernel"]
        out = None
        if training and x.dtype == np.float32:
            # reused from step to step: a fresh 80 MB output page-faults on every step
            out = self._workspace("output", (len(x), *self.geometry.output_size,
                                             self.filters), np.float32)
        z = ops.conv2d_forward(x, self.params["kernel"], self.params.get("bias"),
                               relu=self.fused_relu, out=out, geometry=self.geometry)
        return self._activate(z, training)

    def _backward_linear(self, grad_z):
        out = None
        if self.need_input_grad and self._x.dtype == np.float32:
            out = self._workspace("grad_input", self._x.shape, np.float32)
        grad_input, grad_kernel, grad_bias = ops.conv2d_backward(
            self._x, self.params["kernel"], grad_z, need_input_grad=self.need_input_grad,
            out=out, geometry=self.geometry)
        self.grads["kernel"] = grad_kernel
        if self.use_bias:
            self.grads["bias"] = grad_bias
        return grad_input

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": list(self.kernel_size), "strides": list(self.strides),
                "padding": self.padding}
