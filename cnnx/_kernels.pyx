# cython: language_level=3
"""Cython driver for the C kernels: checks what memoryviews cannot, releases the GIL."""

cdef extern from "cnnx_kernels.h" nogil:
    int cnnx_openmp_enabled()


def openmp_enabled():
    """True when the kernels were compiled with OpenMP."""
    return bool(cnnx_openmp_enabled())
