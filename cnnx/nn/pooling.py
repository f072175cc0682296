"""MaxPool2D and AvgPool2D over NHWC inputs (Keras rules for strides and 'same' padding)."""
import numpy as np

from cnnx import ops
from cnnx.nn import activations
from cnnx.nn.convolution import Conv2D
from cnnx.nn.layer import ActivatedLayer, Layer

# Windows that tile the input (strides == pool_size) of at most this many cells keep their
# max's position as one byte (the tap inside the window) instead of an int32 cell index:
# pooling is memory-bound, and the index is written in forward and read back in backward.
# (Overlapping windows keep int32 cells: their backward scatters, and taps would first need
# a check that each lands inside its clipped window.)
_MAX_TAPS_PER_BYTE = 256


class _Pool2D(Layer):
    # worked out at build (ops.pool_geometry) and handed to the kernels; a class default, so
    # that layers pickled before it existed, or used unbuilt, pass their arguments instead
    geometry = None

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
        self.geometry = ops.pool_geometry(input_shape, self.pool_size, self.strides,
                                          self.padding)
        return (oh, ow, c)

    def _geometry_for(self, shape):
        """The built geometry when it describes an input of this shape (N, H, W, C)."""
        geometry = self.geometry
        return geometry if geometry is not None and geometry.input_size == shape[1:] else None

    def _output_shape(self, input_shape):
        h, w, c = input_shape
        return (ops.output_size(h, self.pool_size[0], self.strides[0], self.padding),
                ops.output_size(w, self.pool_size[1], self.strides[1], self.padding), c)

    def get_config(self):
        return {**super().get_config(), "pool_size": list(self.pool_size),
                "strides": list(self.strides), "padding": self.padding}


class MaxPool2D(_Pool2D):
    """y = max over each pool_size window.  (N, H, W, C) -> (N, OH, OW, C).
    In training, the output and grad_input live in buffers the next training step overwrites.

    Right after a layer with activation="relu" (a Conv2D, or a ReLU layer), it can take
    that layer's ReLU backward over (take_relu_backward_of): its own backward then routes
    each gradient times (y > 0), y its output (the ReLU's output at the max cell), and the
    layer before skips its pass over the whole gradient: the same bits, one pass fewer.
    """

    masks_relu = False       # True: this backward applies the ReLU backward of the layer before
    pooled_in_conv = False   # True: the Conv2D before does this layer's training forward
    _pooled = None           # the output the Conv2D before pooled for this layer (take_pooled)

    def take_relu_backward_of(self, previous_layer):
        """Apply previous_layer's ReLU backward in this backward when previous_layer is an
        ActivatedLayer with activation "relu" (not one fused into a BatchNormalization).
        Returns True when fused.  A Sequential calls it on each MaxPool2D and the layer
        before (fuse_relu_into_max_pool)."""
        if not (isinstance(previous_layer, ActivatedLayer)
                and isinstance(previous_layer.activation, activations.ReLU)):
            return False
        previous_layer.relu_backward_by_next = True
        self.masks_relu = True
        return True

    def pool_in_forward_of(self, previous_layer):
        """Let previous_layer, a Conv2D whose ReLU backward this layer applies, do this
        layer's training forward in its own (Conv2D.max_pool): its output is then pooled
        band by band where it is made and never written whole.  Returns True when fused:
        stride-1 convolutions, windows that tile the output from its top left
        (ops.can_fuse_max_pool).  The same bits; the backward needs only this layer's output
        (the ReLU mask) and taps."""
        if not (isinstance(previous_layer, Conv2D) and previous_layer.relu_backward_by_next
                and self.masks_relu
                and ops.can_fuse_max_pool(previous_layer.geometry, self.pool_size,
                                          self.strides, self.padding)):
            return False
        previous_layer.max_pool = self
        self.pooled_in_conv = True
        return True

    def take_pooled(self, y, argmax, input_shape):
        """The Conv2D before has pooled its training output (input_shape) into y and argmax
        (uint8 taps) for this layer; the next forward(y, training=True) returns y as it is."""
        self._pooled = self._relu_y = y
        self._argmax = argmax
        self._input_shape = input_shape

    def index_dtype(self):
        """What training keeps per output for the backward: a uint8 tap inside the window
        when windows tile the input (a quarter of the bytes), else an int32 cell index."""
        taps = self.pool_size[0] * self.pool_size[1]
        tiling = self.strides == self.pool_size and taps <= _MAX_TAPS_PER_BYTE
        return np.dtype(np.uint8 if tiling else np.int32)

    def forward(self, x, training=False, rng=None):
        pooled, self._pooled = self._pooled, None
        if training and x is pooled:               # the Conv2D before did this forward
            return x
        out = None
        if training and x.dtype == np.float32 and x.ndim == 4:
            # reused from step to step: a fresh 80 MB output page-faults on every step
            shape = (len(x), *self._output_shape(x.shape[1:]))
            out = (self._workspace("output", shape, np.float32),
                   self._workspace("argmax", shape, self.index_dtype()))
        y, argmax = ops.max_pool2d_forward(x, self.pool_size, self.strides, self.padding,
                                           out=out, geometry=self._geometry_for(x.shape))
        # where each max came from: a uint8 tap inside the window, or an int32 cell index
        self._argmax = argmax if training else None
        # the ReLU's output at each max cell, for the backward's mask: the output buffer,
        # which only the next training forward overwrites
        self._relu_y = y if training and self.masks_relu else None
        self._input_shape = x.shape
        return y

    def backward(self, grad_output):
        out = None
        if grad_output.dtype == np.float32:
            out = self._workspace("grad_input", self._input_shape, np.float32)
        relu_y = None
        if self.masks_relu:
            relu_y = self._relu_y
            if relu_y is None:
                raise ValueError(f"layer {self.name!r} (MaxPool2D) applies the ReLU backward "
                                 f"of the layer before and needs its training forward's "
                                 f"output; call forward(x, training=True) before backward")
        return ops.max_pool2d_backward(grad_output, self._argmax, self._input_shape,
                                       pool_size=self.pool_size, strides=self.strides,
                                       padding=self.padding, out=out, relu_y=relu_y,
                                       geometry=self._geometry_for(self._input_shape))


class AvgPool2D(_Pool2D):
    """y = mean over each window's real cells.  (N, H, W, C) -> (N, OH, OW, C).
    In training (float32), the output and grad_input live in buffers the next training step
    overwrites."""

    def forward(self, x, training=False, rng=None):
        self._input_shape = x.shape
        self._reuse = training and _fast(x)
        if not self._reuse:
            return ops.avg_pool2d_forward(x, self.pool_size, self.strides, self.padding)
        y = self._workspace("output", (len(x), *self._output_shape(x.shape[1:])), np.float32)
        return ops.avg_pool2d_forward(x, self.pool_size, self.strides, self.padding, out=y,
                                      geometry=self._geometry_for(x.shape))

    def backward(self, grad_output):
        if not (self._reuse and _fast(grad_output)):
            return ops.avg_pool2d_backward(grad_output, self._input_shape, self.pool_size,
                                           self.strides, self.padding)
        grad_input = self._workspace("grad_input", self._input_shape, np.float32)
        return ops.avg_pool2d_backward(grad_output, self._input_shape, self.pool_size,
                                       self.strides, self.padding, out=grad_input,
                                       geometry=self._geometry_for(self._input_shape))


def fuse_relu_into_max_pool(layers):
    """Let each MaxPool2D in `layers` (a model's layers, in order) apply the ReLU backward of
    the layer right before it (MaxPool2D.take_relu_backward_of), and, where that layer is a
    Conv2D that can (MaxPool2D.pool_in_forward_of), let it pool its own training output;
    returns how many ReLU pairs were fused.  The same bits, one pass over the ReLU output's
    gradient fewer per pair and step, and the pooled convolutions' output never written."""
    fused = 0
    for previous, layer in zip(layers, layers[1:]):
        if isinstance(layer, MaxPool2D) and layer.take_relu_backward_of(previous):
            layer.pool_in_forward_of(previous)
            fused += 1
    return fused


def _fast(array):
    """float32, 4-d, C-contiguous, not empty: the kernels' operands, taken without a copy."""
    return (array.dtype == np.float32 and array.ndim == 4 and array.flags.c_contiguous
            and array.size > 0)


MaxPooling2D, AveragePooling2D = MaxPool2D, AvgPool2D      # Keras' long names
