"""MaxPool2D and AvgPool2D over NHWC inputs (Keras rules for strides and 'same' padding)."""
from cnnx import ops
from cnnx.nn.layer import Layer


class _Pool2D(Layer):
    def __init__(self, pool_size=2, strides=None, padding="valid", name=None):
        super().__init__(name)
        kind = type(self).__name__
        if padding not in ops.PADDINGS:
            raise ValueError(f"{kind} expects padding 'valid' or 'same', got {padding!r}")
        self.pool_size = ops._pair(pool_size, f"{kind} pool_size")
        self.strides = ops._pair(strides if strides is not None else self.pool_size,
                                 f"{kind} strides")
        self.padding = padding

    def build(self, input_shape, rng):
        kind = type(self).__name__
        if len(input_shape) != 3:
            raise ValueError(f"{kind}({self.pool_size}) expected input (N, H, W, C), got "
                             f"{(None, *input_shape)}")
        h, w, c = input_shape
        oh = ops.output_size(h, self.pool_size[0], self.strides[0], self.padding)
        ow = ops.output_size(w, self.pool_size[1], self.strides[1], self.padding)
        if oh < 1 or ow < 1:
            raise ValueError(f"{kind}({self.pool_size}) needs H and W of at least "
                             f"{self.pool_size}, got H={h}, W={w}")
        return (oh, ow, c)

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size),
                "strides": list(self.strides), "padding": self.padding}


class MaxPool2D(_Pool2D):
    """y = max over each pool_size window.  (N, H, W, C) -> (N, OH, OW, C)."""

    def forward(self, x, training=False, rng=None):
        y, argmax = ops.max_pool2d_forward(x, self.pool_size, self.strides, self.padding)
        self._argmax = argmax if training else None    # where each max came from
        self._input_shape = x.shape
        return y

    def backward(self, grad_output):
        return ops.max_pool2d_backward(grad_output, self._argmax, self._input_shape)


class AvgPool2D(_Pool2D):
    """y = mean over each window's real cells.  (N, H, W, C) -> (N, OH, OW, C)."""

    def forward(self, x, training=False, rng=None):
        self._input_shape = x.shape
        return ops.avg_pool2d_forward(x, self.pool_size, self.strides, self.padding)

    def backward(self, grad_output):
        return ops.avg_pool2d_backward(grad_output, self._input_shape, self.pool_size,
                                       self.strides, self.padding)


MaxPooling2D, AveragePooling2D = MaxPool2D, AvgPool2D      # Keras' long names
