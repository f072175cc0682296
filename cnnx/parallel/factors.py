"""A Dense kernel's gradient as its two exact factors, when they are smaller than it.

Summed over a batch, a Dense layer's kernel gradient is inputs^T @ grad_z, with inputs
(rows, in) and grad_z (rows, out). While rows * (in + out) < in * out the two factors are
smaller than the (in, out) product (the glasses net's 51200x128 kernel: 32 rows are 6.6 MB
instead of 26 MB), and a sum of such gradients is the product of the stacked factors.
KernelFactors travels in GradientSum.grads in place of the array: adding two stacks them
(or multiplies out once stacking stops paying); `materialise` computes the product with the
same GEMM call as ops.dense_backward, so one shard's factors give that layer's own bits.
Which sums stack and which multiply out depends on the row counts only (G and the batch),
so runs stay bit-identical on any worker count.
"""
import sys

import numpy as np
from dask.sizeof import sizeof

from cnnx import _kernels, _threads


class KernelFactors:
    """inputs^T @ grad_z, kept as the two factors. inputs (rows, in), grad_z (rows, out)."""
    __array_ufunc__ = None                    # ndarray + KernelFactors -> our __radd__
    dtype = np.dtype(np.float32)

    def __init__(self, inputs, grad_z):
        self.inputs, self.grad_z = inputs, grad_z

    @property
    def shape(self):
        return (self.inputs.shape[1], self.grad_z.shape[1])

    @property
    def nbytes(self):
        return self.inputs.nbytes + self.grad_z.nbytes

    def materialise(self, out=None):
        """The (in, out) product, into `out` when given (a buffer reused across steps: a
        fresh 26 MB array page-faults on every step)."""
        product = np.empty(self.shape, np.float32) if out is None else out
        # (in, rows) @ (rows, out)
        _kernels.sgemm(self.inputs, self.grad_z, product, transpose_a=True,
                       n_threads=_threads.resolve(None))
        return product

    def all_finite(self):
        return bool(np.isfinite(self.inputs).all() and np.isfinite(self.grad_z).all())

    def __add__(self, other):
        if isinstance(other, KernelFactors):
            rows = len(self.inputs) + len(other.inputs)
            if smaller_as_factors(rows, *self.shape):
                return KernelFactors(np.concatenate([self.inputs, other.inputs]),
                                     np.concatenate([self.grad_z, other.grad_z]))
            return self.materialise() + other.materialise()
        return self.materialise() + other

    def __radd__(self, other):
        return other + self.materialise()


def smaller_as_factors(rows, in_features, units):
    return rows * (in_features + units) < in_features * units


def materialised(array):
    return array.materialise() if isinstance(array, KernelFactors) else array


@sizeof.register(KernelFactors)
def _sizeof_kernel_factors(factors):
    return sys.getsizeof(factors) + factors.nbytes


def from_layer(layer):
    """The kernel gradient factors a Dense layer kept in its last backward
    (kernel_grad_as_factors), as copies: the layer reuses its buffers in its next step,
    and a task's result outlives it."""
    inputs, grad_z = layer.kernel_factors
    return KernelFactors(np.array(inputs, np.float32, order="C"),
                         np.array(grad_z, np.float32, order="C"))
