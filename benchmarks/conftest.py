"""Shared helpers for the kernel benchmarks: thread counts, NumPy's BLAS threads, medians."""
import ctypes
import glob
import os
import sys

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


def pytest_addoption(parser):
    parser.addoption("--torch-python", default=sys.executable,
                     help="the Python whose torch the PyTorch yardsticks run on, in their own "
                          "process (default: this one)")


@pytest.fixture(scope="session")
def torch_python(request):
    return request.config.getoption("--torch-python")


@pytest.fixture
def peak():
    """fp32 FMA peak (GFLOP/s) per thread count, measured right before the benchmark by
    cnnx.roofline's probe: the machine is shared, and the peak this process can reach moves
    with the load."""
    return {n: roofline.measure_fma_peak_gflops(n_threads=n, seconds=0.05, repeats=3)
            for n in THREAD_COUNTS}


@pytest.fixture
def copy_bandwidth():
    """GB/s (read + written) of cnnx's threaded copy of 256 MB per thread count, measured
    right before the benchmark: the yardstick of the memory-bound kernels."""
    return {n: roofline.measure_copy_gbytes_per_s(n_threads=n, megabytes=256, repeats=3)
            for n in THREAD_COUNTS}

