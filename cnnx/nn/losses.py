"""Losses return the SUM over the samples given (the caller divides), and its gradient.

Each loss has two entry points:
  __call__(outputs, y)      -> (loss_sum, grad_outputs)   on the model's activated outputs
  from_logits(logits, y)    -> (loss_sum, grad_logits)    fused with the output activation
                                                          (softmax / sigmoid): stable at
                                                          extreme logits, gradient p - y.
"""
import operator

import numpy as np

from cnnx import _kernels, _threads
from cnnx.nn import activations

_TINY = 1e-7      # clip for probabilities on the unfused path (Keras' epsilon)
_FLOAT32, _INT64 = np.dtype(np.float32), np.dtype(np.int64)
_LIST_CHECK_SIZE = 4096     # labels up to this many are checked and counted as Python lists


class Loss:
    name = None
    fuses_with = None            # the output activation whose logits from_logits takes

    def check_labels(self, y, n_outputs, who):
        raise NotImplementedError

    def _numeric_labels(self, y, who):
        if type(y) is not np.ndarray:
            y = np.asarray(y)
        if y.dtype.kind not in "biuf":
            raise TypeError(f"{who}: {self.name} expects numeric labels (integer class "
                            f"indices), got an array of dtype {y.dtype}; convert them, e.g. "
                            f"y.astype(np.int64), or map class names to indices")
        return y

    def n_correct(self, outputs, y):
        raise NotImplementedError

    def get_config(self):
        return {"name": self.name}


class SparseCategoricalCrossentropy(Loss):
    """loss = -sum_i log p[i, y_i], y integer class indices in [0, classes)."""
    name = "sparse_categorical_crossentropy"
    fuses_with = activations.Softmax

    def check_labels(self, y, n_outputs, who):
        y = self._numeric_labels(y, who)
        if y.ndim != 1:
            raise ValueError(f"{who}: sparse_categorical_crossentropy expects labels of shape "
                             f"(N,), got {y.shape}")
        if y.size and y.dtype.kind not in "iu":           # not an integer dtype
            if not np.all(np.isfinite(y)) or np.any(y != np.round(y)):
                raise ValueError(f"{who}: labels must be integer class indices, got {y.dtype} "
                                 f"values such as {y[np.argmax(y != np.round(y))]!r}")
        if y.size and _out_of_range(y, n_outputs):
            raise ValueError(f"{who}: labels must lie in [0, {n_outputs}) for a model with "
                             f"{n_outputs} outputs, got min {y.min()}, max {y.max()}")
        return y if y.dtype == _INT64 else y.astype(np.int64)

    def __call__(self, probabilities, y):
        rows = np.arange(len(y))
        picked = np.clip(probabilities[rows, y], _TINY, 1.0)
        grad = np.zeros_like(probabilities)
        grad[rows, y] = -1 / picked
        return float(-np.log(picked.astype(np.float64)).sum()), grad

    def from_logits(self, logits, y):
        if logits.dtype == np.float32 and logits.ndim == 2:
            # one C pass per row: the loss in double and softmax - onehot, stable at any logit
            grad = np.empty(logits.shape, np.float32)
            loss_sum = _kernels.softmax_cross_entropy(
                _contiguous(logits, _FLOAT32), _contiguous(y, _INT64), grad,
                n_threads=_threads.get_num_threads())
            return loss_sum, grad
        return self._from_logits_numpy(logits, y)

    def _from_logits_numpy(self, logits, y):
        """The float64 reference (any dtype): log_softmax, then p - onehot."""
        rows = np.arange(len(y))
        log_p = activations.log_softmax(logits)
        grad = np.exp(log_p)                           # p - onehot(y)
        grad[rows, y] -= 1
        return float(-log_p[rows, y].astype(np.float64).sum()), grad

    def n_correct(self, outputs, y):
        predicted = outputs.argmax(axis=-1)
        if len(y) <= _LIST_CHECK_SIZE:       # a batch: as lists, away from NumPy's ufuncs
            return sum(map(operator.eq, predicted.tolist(), y.tolist()))
        return int(np.count_nonzero(predicted == y))


class BinaryCrossentropy(Loss):
    """loss = -sum_i [y_i log p_i + (1 - y_i) log(1 - p_i)], one sigmoid unit, y in {0, 1}."""
    name = "binary_crossentropy"
    fuses_with = activations.Sigmoid

    def check_labels(self, y, n_outputs, who):
        y = self._numeric_labels(y, who)
        if n_outputs != 1:
            raise ValueError(f"{who}: binary_crossentropy expects a model with 1 output unit, "
                             f"got {n_outputs}")
        if y.ndim == 2 and y.shape[1] == 1:
            y = y[:, 0]
        if y.ndim != 1:
            raise ValueError(f"{who}: binary_crossentropy expects labels of shape (N,) or "
                             f"(N, 1), got {y.shape}")
        if y.size and not np.all((y == 0) | (y == 1)):
            raise ValueError(f"{who}: binary_crossentropy labels must be 0 or 1, got values "
                             f"{np.unique(y[(y != 0) & (y != 1)])[:5]}")
        return y.astype(np.int64)

    def __call__(self, probabilities, y):
        p = np.clip(probabilities[:, 0].astype(np.float64), _TINY, 1 - _TINY)
        loss = -(y * np.log(p) + (1 - y) * np.log1p(-p)).sum()
        grad = ((p - y) / (p * (1 - p)))[:, None].astype(probabilities.dtype)
        return float(loss), grad

    def from_logits(self, logits, y):
        z = logits[:, 0]
        # -[y log s(z) + (1-y) log(1-s(z))] = max(z, 0) - y z + log(1 + exp(-|z|))
        z64 = z.astype(np.float64)
        loss = (np.maximum(z64, 0) - y * z64 + np.log1p(np.exp(-np.abs(z64)))).sum()
        grad = (activations.sigmoid(z) - y.astype(z.dtype))[:, None]
        return float(loss), grad

    def n_correct(self, outputs, y):
        return int(((outputs[:, 0] > 0.5) == y).sum())


def _contiguous(array, dtype):
    """array as a C-contiguous array of dtype: itself when it already is, without a call
    into NumPy (every call into NumPy shows in a small network's step)."""
    if isinstance(array, np.ndarray) and array.dtype == dtype and array.flags.c_contiguous:
        return array
    return np.ascontiguousarray(array, dtype=dtype)


def _out_of_range(y, n_outputs):
    """True when a label of y (any real dtype) lies outside [0, n_outputs).

    A training step checks its batch's labels: a batch's worth of integers goes through a
    Python list, whose min and max cost a few microseconds where NumPy's reductions cost
    ~40 (a step's kernels push NumPy's code out of the caches)."""
    if y.dtype.kind in "iu" and y.size <= _LIST_CHECK_SIZE:
        values = y.tolist()
        return min(values) < 0 or max(values) >= n_outputs
    return np.minimum.reduce(y, axis=None) < 0 or np.maximum.reduce(y, axis=None) >= n_outputs


_BY_NAME = {cls.name: cls for cls in (SparseCategoricalCrossentropy, BinaryCrossentropy)}


def get(loss):
    if isinstance(loss, Loss):
        return loss
    if isinstance(loss, dict):
        loss = loss["name"]
    if loss not in _BY_NAME:
        raise ValueError(f"unknown loss {loss!r}; expected one of {sorted(_BY_NAME)}")
    return _BY_NAME[loss]()
