"""The Layer base class: parallel params/grads dicts, a forward cache, Keras-style config."""
import numpy as np

from cnnx.nn import activations, initializers, regularizers


class Layer:
    """Subclasses implement build, forward and backward (right below it).

    params / grads: parallel dicts of trainable arrays; state: non-trainable arrays.
    Shapes passed to build and stored in input_shape / output_shape exclude the batch axis.
    """

    def __init__(self, name=None):
        self.name = name
        self.params, self.grads, self.state = {}, {}, {}
        self.regularizers = {}            # param name -> L1L2, for the params that have one
        self.input_shape = self.output_shape = None
        self.need_input_grad = True       # Sequential clears it on the first layer

    def __repr__(self):
        return f"{type(self).__name__}(name={self.name!r})"

    def __getstate__(self):
        # underscore attributes are forward caches and work buffers, grads the last
        # backward's output: never ship them (Dask pickles models to send them to workers,
        # and a used model would otherwise weigh twice its weights)
        state = {key: (None if key.startswith("_") else value)
                 for key, value in self.__dict__.items()}
        state["grads"] = {}
        return state

    def _workspace(self, name, shape, dtype):
        """A buffer reused from one training step to the next: fresh arrays over 32 MB are
        mmapped by glibc and page-fault on every step.  Its contents die with the step."""
        buffers = self.__dict__.get("_buffers")
        if buffers is None:                  # first use, or unpickled (buffers never travel)
            buffers = self._buffers = {}
        buffer = buffers.get(name)
        if buffer is None or buffer.shape != shape or buffer.dtype != dtype:
            buffer = buffers[name] = np.empty(shape, dtype)
        return buffer

    def build(self, input_shape, rng):
        """Create params for input_shape; return the output shape.  Default: shape-preserving."""
        return tuple(input_shape)

    def forward(self, x, training=False, rng=None):
        raise NotImplementedError

    def backward(self, grad_output):
        """Overwrite self.grads; return grad_input (None when need_input_grad is False).

        grad_output is a temporary the layer may overwrite (Sequential never reuses it).
        """
        raise NotImplementedError

    def check_input(self, x):
        if x.shape[1:] != self.input_shape:
            raise ValueError(f"layer {self.name!r} ({type(self).__name__}) expected input "
                             f"{(None, *self.input_shape)}, got {(None, *x.shape[1:])}")

    def count_params(self):
        return sum(p.size for p in self.params.values())

    def get_config(self):
        """A JSON-able dict from which from_config rebuilds this layer (without weights)."""
        return {"name": self.name}

    @classmethod
    def from_config(cls, config):
        return cls(**config)


class ActivatedLayer(Layer):
    """A layer followed by an optional activation: y = activation(z), z = the layer's maths.

    Subclasses compute z in forward and call _activate(z); backward calls
    _backward_linear(_activation_backward(grad_output)).  A loss fused with the activation
    (softmax + cross-entropy) takes the logits z and calls backward_logits(grad_z).
    """

    # True when the layer right after applies this layer's ReLU backward in its own pass (a
    # MaxPool2D: pooling.fuse_relu_into_max_pool); this backward then skips it.  A class
    # default, so that layers pickled before the fusion existed load unfused.
    relu_backward_by_next = False

    def __init__(self, activation=None, name=None):
        super().__init__(name)
        self.activation = activations.get(activation)
        self._y = self._z = None

    @property
    def fused_relu(self):
        """True when the kernels apply ReLU themselves (their relu=True epilogue)."""
        return isinstance(self.activation, activations.ReLU)

    def _activate(self, z, training):
        if self.activation is None or self.fused_relu:
            y = z                          # already activated by the kernel, or linear
        else:
            y = self.activation.forward(z)
        # backward needs y; a fused loss needs the logits z (softmax / sigmoid outputs)
        self._y, self._z = (y, z) if training else (None, None)
        return y

    def logits(self):
        """The pre-activation output of the last training forward."""
        return self._z

    def _activation_backward(self, grad_output):
        if self.activation is None or self.relu_backward_by_next:
            return grad_output
        return self.activation.backward(self._y, grad_output)

    def backward(self, grad_output):
        return self._backward_linear(self._activation_backward(grad_output))

    def backward_logits(self, grad_logits):
        return self._backward_linear(grad_logits)

    def _backward_linear(self, grad_z):
        raise NotImplementedError

    def get_config(self):
        return {**super().get_config(), "activation": activations.name_of(self.activation)}


class WeightedLayer(ActivatedLayer):
    """An ActivatedLayer with a kernel and an optional bias (Conv2D, Dense): each has an
    initializer and an optional regularizer."""

    def __init__(self, activation, use_bias, kernel_initializer, bias_initializer,
                 kernel_regularizer, bias_regularizer, name):
        super().__init__(activation, name)
        self.use_bias = use_bias
        self.kernel_initializer = initializers.get(kernel_initializer)
        self.bias_initializer = initializers.get(bias_initializer)
        self.kernel_regularizer = regularizers.get(kernel_regularizer)
        self.bias_regularizer = regularizers.get(bias_regularizer)
        self._x = None                     # backward needs the input for grads["kernel"]

    def _build_weights(self, kernel_shape, rng):
        """params "kernel" (kernel_shape) and "bias" (its last axis), their grads and penalties."""
        self.params = {"kernel": self.kernel_initializer(kernel_shape, rng)}
        if self.use_bias:
            self.params["bias"] = self.bias_initializer((kernel_shape[-1],), rng)
        self.grads = {name: None for name in self.params}
        self.regularizers = {name: reg for name, reg in
                             (("kernel", self.kernel_regularizer), ("bias", self.bias_regularizer))
                             if reg is not None and name in self.params}

    def get_config(self):
        return {**super().get_config(), "use_bias": self.use_bias,
                "kernel_initializer": initializers.name_of(self.kernel_initializer),
                "bias_initializer": initializers.name_of(self.bias_initializer),
                "kernel_regularizer": regularizer_config(self.kernel_regularizer),
                "bias_regularizer": regularizer_config(self.bias_regularizer)}


def regularizer_config(regularizer):
    return None if regularizer is None else regularizer.get_config()
