"""MaxPool2D and AvgPool2D over NHWC inputs (Keras rules for strides and 'same' padding)."""
import numpy as np

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
        oh, ow, _ = self._output_shape(input_shape)
        if oh < 1 or ow < 1:
            raise ValueError(f"{kind}({self.pool_size}) needs H and W of at least "
                             f"{self.pool_size}, got H={h}, W={w}")
        return (oh, ow, c)

    def _output_shape(self, input_shape):
        h, w, c = input_shape
        return (ops.output_size(h, self.pool_size[0], self.strides[0], self.padding),
                ops.output_size(w, self.pool_size[1], self.strides[1], self.padding), c)

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size),
                "strides": list(self.strides), "padding": self.padding}


class MaxPool2D(_Pool2D):
    """y = max over each pool_size window.  (N, H, W, C) -> (N, OH, OW, C).
    In training, the output and grad_input live in buffers the next training step overwrites."""

    def forward(self, x, training=False, rng=None):
        out = None
        if training and x.dtype == np.float32 and x.ndim == 4:
            # reused from step to step: a fresh 80 MB output page-faults on every step
            shape = (len(x), *self._output_shape(x.shape[1:]))
            out = (self._workspace("output", shape, np.float32),
                   self._workspace("argmax", shape, np.int32))
        y, argmax = ops.max_pool2d_forward(x, self.pool_size, self.strides, self.padding,
                                           out=out)
        self._argmax = argmax if training else None    # where each max came from
        self._input_shape = x.shape
        return y

    def backward(self, grad_output):
        out = None
        if grad_output.dtype == np.float32:
            out = self._workspace("grad_input", self._input_shape, np.float32)
        return ops.max_pool2d_backward(grad_output, self._argmax, self._input_shape,
                                       pool_size=self.pool_size, strides=self.strides,
                                       padding=self.padding, out=out)


class AvgPool2D(_Pool2D):
    """y = mean over each window's real cells.  (N, H, W, C) -> (N, OH, OW, C)."""

    def forward(self, x, training=False, rng=None):
        self._input_shape = x.shape
        return ops.avg_pool2d_forward(x, self.pool_size, self.strides, self.padding)

    def backward(self, grad_output):
        return ops.avg_pool2d_backward(grad_output, self._input_shape, self.pool_size,
                                       self.strides, self.padding)


MaxPooling2D, AveragePooling2D = MaxPool2D, AvgPool2D      # Keras' long names
