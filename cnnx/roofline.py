"""Roofline helper: this machine's measured fp32 FMA peak, to report kernels as a fraction."""
import functools

from cnnx import _kernels

FLOPS_PER_ITERATION = 2 * 8 * 12      # 12 independent 8-wide FMA chains, 2 flops per lane


@functools.lru_cache(maxsize=None)
def fma_peak_gflops(n_threads=1, seconds=0.2, repeats=5):
    """Best of `repeats` runs of ~`seconds` each: GFLOP/s of pure FMA on n_threads threads
    (measured once per process and argument set; see measure_fma_peak_gflops)."""
    return measure_fma_peak_gflops(n_threads, seconds, repeats)


def measure_fma_peak_gflops(n_threads=1, seconds=0.2, repeats=5):
    """Like fma_peak_gflops, measured now: on a shared machine the peak a process can get
    moves with the load, so a fraction of peak is fairest against a peak measured alongside."""
    iterations = 1_000_000
    elapsed = _kernels.fma_peak_seconds(iterations, n_threads)
    iterations = max(int(iterations * seconds / max(elapsed, 1e-6)), 1000)
    best = min(_kernels.fma_peak_seconds(iterations, n_threads) for _ in range(repeats))
    return FLOPS_PER_ITERATION * iterations * n_threads / best / 1e9
