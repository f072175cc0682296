"""cnnx: convolutional networks trained fast on CPUs and scaled out over Dask."""
from cnnx._kernels import openmp_enabled
from cnnx._threads import get_num_threads, num_threads, set_num_threads

__version__ = "0.1.0"

from cnnx import nn, optim  # noqa: E402  (after the thread controls they use)

__all__ = ["openmp_enabled", "get_num_threads", "num_threads", "set_num_threads",
           "__version__", "nn", "optim"]
