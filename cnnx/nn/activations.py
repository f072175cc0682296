"""Element-wise activations.  Each backward needs only the output y, so layers cache y alone."""
import numpy as np

from cnnx import _kernels, _threads


class Activation:
    name = None

    def forward(self, x):
        raise NotImplementedError

    def backward(self, y, grad_output):
        """grad_input from the forward output y and grad_output (which it may overwrite)."""
        raise NotImplementedError


class ReLU(Activation):
    name = "relu"

    def forward(self, x):
        return relu(x)

    def backward(self, y, grad_output):
        # in place: on conv outputs a fresh array costs as much as the multiply itself
        if (y.dtype == grad_output.dtype == np.float32 and y.flags.c_contiguous
                and grad_output.flags.c_contiguous and grad_output.flags.writeable):
            return _kernels.relu_backward(y, grad_output, n_threads=_threads.get_num_threads())
        return np.multiply(grad_output, y > 0, out=grad_output)


class FusedReLU(Activation):
    """A ReLU that the layer before already applies, in its forward and backward passes
    (BatchNormalization fused with the ReLU after it): values pass through here untouched,
    so no pass of its own remains. Saved as "relu", and fused again when rebuilt."""
    name = "relu"

    def forward(self, x):
        return x

    def backward(self, y, grad_output):
        return grad_output


class LeakyReLU(Activation):
    """y = x if x > 0 else alpha * x  (alpha > 0, so y > 0 exactly where x > 0)."""
    name = "leaky_relu"

    def __init__(self, alpha=0.01):
        if not alpha > 0:
            raise ValueError(f"leaky_relu expects alpha > 0, got {alpha}")
        self.alpha = alpha

    def forward(self, x):
        return np.where(x > 0, x, x * x.dtype.type(self.alpha))

    def backward(self, y, grad_output):
        return np.where(y > 0, grad_output, grad_output * grad_output.dtype.type(self.alpha))


class Sigmoid(Activation):
    name = "sigmoid"

    def forward(self, x):
        return sigmoid(x)

    def backward(self, y, grad_output):
        return grad_output * y * (1 - y)


class Tanh(Activation):
    name = "tanh"

    def forward(self, x):
        return np.tanh(x)

    def backward(self, y, grad_output):
        return grad_output * (1 - y * y)


class Softmax(Activation):
    """Over the last axis.  dx = y * (g - sum(g * y))."""
    name = "softmax"

    def forward(self, x):
        return softmax(x)

    def backward(self, y, grad_output):
        return y * (grad_output - (grad_output * y).sum(axis=-1, keepdims=True))


def relu(x, out=None):
    """max(x, 0) (a NaN kept), into `out` when given (a layer's buffer reused across steps):
    threaded C for float32, NumPy otherwise."""
    if x.dtype == np.float32 and x.flags.c_contiguous and x.size:
        out = np.empty_like(x) if out is None else out
        return _kernels.relu_forward(x, out, n_threads=_threads.get_num_threads())
    return np.maximum(x, 0, out=out)


def sigmoid(x):
    # exp of a non-positive number only: no overflow at extreme logits
    e = np.exp(-np.abs(x))
    return np.where(x >= 0, 1 / (1 + e), e / (1 + e)).astype(x.dtype, copy=False)


def softmax(x):
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def log_softmax(x):
    shifted = x - x.max(axis=-1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))


_BY_NAME = {"relu": ReLU, "leaky_relu": LeakyReLU, "sigmoid": Sigmoid, "tanh": Tanh,
            "softmax": Softmax}


def get(activation):
    """None, 'linear', an Activation, one of the names above, or a config from name_of."""
    if activation is None or activation == "linear":
        return None
    if isinstance(activation, Activation):
        return activation
    if isinstance(activation, dict):                     # {"name": "leaky_relu", "alpha": 0.2}
        options = {k: v for k, v in activation.items() if k != "name"}
        return _BY_NAME[activation["name"]](**options)
    if activation not in _BY_NAME:
        raise ValueError(f"unknown activation {activation!r}; expected one of "
                         f"{sorted(_BY_NAME)} or None")
    return _BY_NAME[activation]()


def name_of(activation):
    """What get() accepts back (a name, or a dict when an option differs), for get_config()."""
    if isinstance(activation, LeakyReLU) and activation.alpha != 0.01:
        return {"name": activation.name, "alpha": activation.alpha}
    return None if activation is None else activation.name
