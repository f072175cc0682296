"""The roofline yardsticks: an FMA peak a real core can reach, a clock, a copy."""
import numpy as np
import pytest

from cnnx import _kernels, roofline


def test_fma_peak_is_at_most_what_the_core_can_issue_per_cycle(isa):
    # A probe whose chains the compiler merged into one dependent chain credits 12 FMAs per
    # FMA latency: 48 flops/cycle on Zen 4, 1.5x the hardware's 32. Noise only lowers the
    # peak, and peak and clock are measured interleaved, so the bound holds on a busy machine.
    flops_per_cycle = roofline.measure_fma_flops_per_cycle(seconds=0.02, repeats=8)
    assert flops_per_cycle <= roofline.MAX_FLOPS_PER_CYCLE * 1.1
    if isa == "avx2":       # 12 chains of 8 lanes keep both FMA pipes busy: near 32
        assert flops_per_cycle >= 8


def test_clock_is_a_plausible_cpu_frequency():
    assert 0.3 < roofline.measure_clock_ghz(seconds=0.01) < 7.0


def test_fma_peak_is_positive_for_each_thread_count():
    assert roofline.fma_peak_gflops(n_threads=1, seconds=0.01) > 1.0
    assert roofline.measure_fma_peak_gflops(n_threads=2, seconds=0.01, repeats=2) > 1.0


@pytest.mark.parametrize("size", [1, 4095, 4097, 3 * 4096 + 5])
@pytest.mark.parametrize("n_threads", [1, 2, 3])
def test_copy_copies_every_element(size, n_threads, rng):
    source = rng.standard_normal(size).astype(np.float32)
    target = np.zeros_like(source)
    _kernels.copy(source, target, n_threads=n_threads)
    assert np.array_equal(source, target)


def test_copy_bandwidth_is_positive():
    assert roofline.measure_copy_gbytes_per_s(1, megabytes=8, repeats=2) > 0.1
