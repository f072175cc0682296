"""Conv2D: y = activation(conv(x, kernel) + bias), NHWC input, HWIO kernel (like Keras)."""
import numpy as np

from cnnx import ops
from cnnx.nn.layer import WeightedLayer


class Conv2D(WeightedLayer):
    """x (N, H, W, C) -> y (N, OH, OW, filters); kernel (KH, KW, C, filters), bias (filters,).
    In training, the output and grad_input live in buffers the next training step overwrites.

    max_pool: a MaxPool2D right after this layer whose training forward this layer does in
    its own (pooling.fuse_relu_into_max_pool sets it): each band of output is pooled where it
    is made, the full output never reaches memory, and the forward returns the pooled output
    (the MaxPool2D then hands it on).  A class default, so layers pickled before the fusion
    load unfused."""

    max_pool = None

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
        if training and self._pools_in_forward(x):
            return self._forward_pooled(x)
        out = None
        if training and x.dtype == np.float32:
            # reused from step to step: a fresh 80 MB output page-faults on every step
            out = self._workspace("output", (len(x), *self.geometry.output_size,
                                             self.filters), np.float32)
        z = ops.conv2d_forward(x, self.params["kernel"], self.params.get("bias"),
                               relu=self.fused_relu, out=out, geometry=self.geometry)
        return self._activate(z, training)

    def _pools_in_forward(self, x):
        # the pool's backward must apply this layer's ReLU backward: nothing keeps the output
        pool = self.max_pool
        return (pool is not None and x.dtype == np.float32 and self.relu_backward_by_next
                and pool.masks_relu)

    def _forward_pooled(self, x):
        """The training forward with the max-pool's: -> the pool's output; the pool gets its
        output, taps and input shape for its backward (MaxPool2D.take_pooled)."""
        pool = self.max_pool
        output_shape = (len(x), *self.geometry.output_size, self.filters)
        pooled_shape = (len(x), *pool.output_shape)
        out = (self._workspace("pooled", pooled_shape, np.float32),
               self._workspace("taps", pooled_shape, np.uint8))
        pooled, taps = ops.conv2d_max_pool_forward(
            x, self.params["kernel"], self.params.get("bias"), pool.pool_size, pool.padding,
            relu=True, out=out, geometry=self.geometry)
        self._y = self._z = None                  # the pool's backward applies the ReLU's
        pool.take_pooled(pooled, taps, output_shape)
        return pooled

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
