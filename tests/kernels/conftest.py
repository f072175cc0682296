"""Fixtures for the kernel tests: run a test on each micro-kernel the CPU offers."""
import numpy as np
import pytest

from cnnx import _kernels

ISAS = ["avx2", "generic"] if _kernels.cpu_has_avx2_fma() else ["generic"]


@pytest.fixture(params=ISAS)
def isa(request):
    """Force one GEMM micro-kernel for the test, then go back to the automatic choice."""
    assert _kernels.set_isa(request.param) == request.param
    yield request.param
    _kernels.set_isa("auto")


def f32(rng, shape):
    return rng.standard_normal(shape).astype(np.float32)



