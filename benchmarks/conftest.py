"""Shared helpers for the kernel benchmarks: thread counts, NumPy's BLAS threads, medians."""
import ctypes
import glob
import os

import numpy as np
import pytest

from cnnx import roofline

THREAD_COUNTS = [1, 2]


def _openblas():
    """NumPy's bundled OpenBLAS, to pin its thread count like ours (no threadpoolctl here)."""
    libs = glob.glob(os.path.join(os.path.dirname(np.__file__) + ".libs", "*openblas*"))
    for path in libs:
        lib = ctypes.CDLL(path)
        for name in ("scipy_openblas_set_num_threads64_", "scipy_openblas_set_num_threads",
                     "openblas_set_num_threads64_", "openblas_set_num_threads"):
            if hasattr(lib, name):
                return getattr(lib, name)
    return None


_set_blas_threads = _openblas()


def set_numpy_threads(n_threads):
    if _set_blas_threads is not None:
        _set_blas_threads(ctypes.c_int(n_threads))


@pytest.fixture(params=THREAD_COUNTS, ids=lambda n: f"{n}thr")
def n_threads(request):
    set_numpy_threads(request.param)
    yield request.param
    set_numpy_threads(os.cpu_count())


@pytest.fixture(scope="session")
def medians():
    """Medians of earlier benchmarks in this run, keyed by name, for ratios measured together."""
    return {}


@pytest.fixture
def peak():
    """fp32 FMA peak (GFLOP/s) per thread count, measured right before the benchmark: the
    machine is shared, and the peak this process can reach moves with the load."""
    return {n: roofline.measure_fma_peak_gflops(n_threads=n, seconds=0.05, repeats=3)
            for n in THREAD_COUNTS}

