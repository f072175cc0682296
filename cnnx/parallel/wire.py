"""Wire formats for weights and gradients: float32, or bfloat16 to halve the traffic.

bfloat16 is the top half of a float32; encoding rounds to nearest even and keeps NaN a NaN.
Encoded dicts carry their format in the dtype: uint16 arrays are bfloat16 bits.

Dask sizes what it stores and moves with `dask.sizeof`, which samples 10 entries of a longer
dict and sees into no dataclass: a network's weights or a GradientSum would be mis-sized, and
with them Dask's memory accounting and its transfer counters (the "MB moved" cnnx reports).
Encoded dicts are therefore a WireArrays, and both it and GradientSum get an exact sizeof.
"""
import dataclasses
import sys

import numpy as np
from dask.sizeof import sizeof

from cnnx.nn.gradient_sum import GradientSum
from cnnx.parallel.factors import KernelFactors
from cnnx.parallel.factors import materialised as materialised_array

FORMATS = ("float32", "bfloat16")


def check_format(wire_dtype):
    if wire_dtype not in FORMATS:
        raise ValueError(f"wire_dtype must be one of {FORMATS}, got {wire_dtype!r}")
    return wire_dtype


def to_bfloat16(array):
    """float32 array -> uint16 bfloat16 bits (round to nearest even)."""
    bits = np.ascontiguousarray(array, np.float32).view(np.uint32)
    rounding = ((bits >> 16) & 1) + np.uint32(0x7FFF)
    rounded = ((bits + rounding) >> 16).astype(np.uint16)
    nan = np.isnan(array)
    if nan.any():
        rounded[nan] = 0x7FC0
    return rounded


def from_bfloat16(bits):
    """uint16 bfloat16 bits -> float32 array."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


class WireArrays(dict):
    """{name: array} as it travels: a plain dict that Dask sizes exactly (see above)."""


@sizeof.register(WireArrays)
def _sizeof_wire_arrays(arrays):
    return sys.getsizeof(arrays) + sum(sizeof(name) + sizeof(a) for name, a in arrays.items())


@sizeof.register(GradientSum)
def _sizeof_gradient_sum(total):
    return sys.getsizeof(total) + sizeof(WireArrays(total.grads)) + sizeof(WireArrays(total.state))


def encode(arrays, wire_dtype="float32", copy=True):
    """The dict of float32 arrays in the wire format: a copy, or (copy=False, for arrays
    nobody else holds) the same float32 arrays."""
    if check_format(wire_dtype) == "bfloat16":
        return WireArrays({name: to_bfloat16(a) if a.dtype == np.float32 else np.array(a)
                           for name, a in arrays.items()})
    return WireArrays({name: a if isinstance(a, KernelFactors) else np.array(a, copy=copy)
                       for name, a in arrays.items()})


def decode(arrays):
    """float32 arrays from a dict in any wire format (float32 ones pass through)."""
    return {name: from_bfloat16(a) if a.dtype == np.uint16 else a for name, a in arrays.items()}


def decoded(total):
    """A GradientSum like `total` with float32 grads (Dense kernels may stay factored);
    `total` itself stays as it was (Dask may hand the same object to another task)."""
    return dataclasses.replace(total, grads=decode(total.grads))


def materialised(total):
    """A GradientSum like `total` with every gradient a float32 array, ready to apply."""
    return dataclasses.replace(total, grads={name: materialised_array(a)
                                             for name, a in decode(total.grads).items()})


def dtype_of(arrays):
    return "bfloat16" if any(a.dtype == np.uint16 for a in arrays.values()) else "float32"


def nbytes(arrays):
    return int(sum(a.nbytes for a in arrays.values()))
