"""Roofline yardsticks measured on this machine: the fp32 FMA peak, the clock it runs at,
and the memory bandwidth of a plain copy, so kernels can be reported as fractions of them.

The machine may be shared: every figure is the best of several short runs, and a fraction
of peak is fairest against a peak measured alongside (the measure_* functions measure now;
the others measure once per process and argument set).
"""
import functools
import time

import numpy as np

from cnnx import _kernels

FLOPS_PER_ITERATION = 2 * 8 * 12      # 12 independent 8-wide FMA chains, 2 flops per lane
ADDS_PER_ITERATION = 64               # dependent integer adds per add-chain iteration
# 2 FMA pipes x 8 fp32 lanes x 2 flops: the most any x86-64 core issues from 256-bit code
MAX_FLOPS_PER_CYCLE = 32


def _scaled_iterations(run, seconds):
    """Iterations that make run(iterations) last about `seconds`."""
    iterations = 100_000
    elapsed = run(iterations)
    return max(int(iterations * seconds / max(elapsed, 1e-6)), 1000)


@functools.lru_cache(maxsize=None)
def fma_peak_gflops(n_threads=1, seconds=0.2, repeats=5):
    """GFLOP/s of pure FMA on n_threads threads: the best of `repeats` runs of ~`seconds`."""
    return measure_fma_peak_gflops(n_threads, seconds, repeats)


def measure_fma_peak_gflops(n_threads=1, seconds=0.2, repeats=5):
    """Like fma_peak_gflops, measured now."""
    def run(iterations):
        return _kernels.fma_peak_seconds(iterations, n_threads)
    iterations = _scaled_iterations(run, seconds)
    best = min(run(iterations) for _ in range(repeats))
    return FLOPS_PER_ITERATION * iterations * n_threads / best / 1e9


def measure_clock_ghz(seconds=0.05, repeats=5):
    """This core's clock, from a chain of dependent integer adds (one cycle each)."""
    def run(iterations):
        return _kernels.add_chain_seconds(iterations)
    iterations = _scaled_iterations(run, seconds)
    best = min(run(iterations) for _ in range(repeats))
    return ADDS_PER_ITERATION * iterations / best / 1e9


def measure_fma_flops_per_cycle(seconds=0.05, repeats=10):
    """fp32 flops per cycle of one thread of the FMA probe: the best of `repeats` interleaved
    (peak, clock) pairs. At most MAX_FLOPS_PER_CYCLE on a real core; more means the probe's
    chains were merged and it credits flops that never ran."""
    peaks, clocks = [], []
    for _ in range(repeats):
        peaks.append(measure_fma_peak_gflops(1, seconds, repeats=1))
        clocks.append(measure_clock_ghz(seconds, repeats=1))
    return max(peaks) / max(clocks)


@functools.lru_cache(maxsize=None)
def copy_gbytes_per_s(n_threads=1, megabytes=256, repeats=5):
    """Memory bandwidth of a threaded copy (bytes read + bytes written per second / 1e9)."""
    return measure_copy_gbytes_per_s(n_threads, megabytes, repeats)


def measure_copy_gbytes_per_s(n_threads=1, megabytes=256, repeats=5):
    """Like copy_gbytes_per_s, measured now: the best of `repeats` copies of `megabytes`
    (large enough to leave every cache) by cnnx's own threaded copy kernel."""
    source = np.ones(megabytes * 2**20 // 4, np.float32)
    target = np.empty_like(source)
    _kernels.copy(source, target, n_threads=n_threads)          # first touch outside timing
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        _kernels.copy(source, target, n_threads=n_threads)
        times.append(time.perf_counter() - started)
    return 2 * source.nbytes / min(times) / 1e9
