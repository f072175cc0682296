"""Conv2D: y = activation(conv(x, kernel) + bias), NHWC input, HWIO kernel (like Keras)."""
from cnnx import ops
from cnnx.nn.layer import WeightedLayer


class Conv2D(WeightedLayer):
    """x (N, H, W, C) -> y (N, OH, OW, filters); kernel (KH, KW, C, filters), bias (filters,)."""

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
        oh = ops.output_size(h, kh, sh, self.padding)
        ow = ops.output_size(w, kw, sw, self.padding)
        if oh < 1 or ow < 1:
            raise ValueError(f"Conv2D(filters={self.filters}, kernel_size={self.kernel_size}) "
                             f"does not fit its input {(None, h, w, c)} with padding "
                             f"{self.padding!r}")
        self._build_weights((kh, kw, c, self.filters), rng)
        return (oh, ow, self.filters)

    def forward(self, x, training=False, rng=None):
        self._x = x if training else None          # backward needs x for grads["kernel"]
        z = ops.conv2d_forward(x, self.params["kernel"], self.params.get("bias"),
                               self.strides, self.padding, relu=self.fused_relu)
        return self._activate(z, training)

    def _backward_linear(self, grad_z):
        grad_input, grad_kernel, grad_bias = ops.conv2d_backward(
            self._x, self.params["kernel"], grad_z, self.strides, self.padding,
            need_input_grad=self.need_input_grad)
        self.grads["kernel"] = grad_kernel
        if self.use_bias:
            self.grads["bias"] = grad_bias
        return grad_input

    def get_config(self):
        return {**super().get_config(), "filters": self.filters,
                "kernel_size": list(self.kernel_size), "strides": list(self.strides),
                "padding": self.padding}
