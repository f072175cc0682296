"""Kernel benchmarks: sgemm and conv-shaped GEMMs against numpy.matmul, 3x3 convolutions as a
fraction of the measured FMA peak, and one conv layer against PyTorch (separate process).

    pytest benchmarks/test_kernels.py --benchmark-only

Ratios come from medians measured in the same run: each NumPy case runs right before its
cnnx twin, which records `ratio` = numpy median / cnnx median (> 1: cnnx is faster), and
`ratio_interleaved`, the same from rounds timed in alternation (robust to load drift on a
shared machine). Fractions of peak use an FMA peak measured just before each benchmark.
"""
import json
import os
import subprocess

import numpy as np
import pytest

from cnnx import _kernels, ops

HERE = os.path.dirname(os.path.abspath(__file__))
GEMMS = [(1024, 1024, 1024),
         # (M, K, N) of conv layers: M = N*OH*OW pixels, K = 3*3*C, N = filters
         (6400, 27, 16), (102400, 27, 16), (102400, 144, 16), (102400, 144, 32),
         (25600, 288, 64), (6400, 288, 64)]
CONVS = [(32, 80, 80, 3, 16), (32, 80, 80, 16, 16), (32, 80, 80, 16, 32)]   # N, H, W, C, F
# the fashion net's second convolution ('valid': 13x13 -> 11x11; its backward pads by 2)
SMALL_CONVS = [(32, 13, 13, 32, 64), (64, 13, 13, 32, 64)]
PADDED_CONVS = [(shape, "same") for shape in CONVS] + [(shape, "valid") for shape in SMALL_CONVS]


def padded_id(case):
    shape, padding = case
    return f"{conv_id(shape)}-{padding}"


def interleaved_ratio(baseline, candidate, rounds=9):
    """median(baseline) / median(candidate), timed in alternation so load drift hits both."""
    import statistics
    import time
    times = {baseline: [], candidate: []}
    for _ in range(rounds):
        for function in (baseline, candidate):
            start = time.perf_counter()
            function()
            times[function].append(time.perf_counter() - start)
    return statistics.median(times[baseline]) / statistics.median(times[candidate])


def gemm_id(shape):
    return "M{}-K{}-N{}".format(*shape)


def conv_id(shape):
    n, h, w, c, f = shape
    return f"{n}x{h}x{w}x{c}->{f}"


def record(benchmark, medians, key, flops, n_threads, peak=None, baseline=None):
    median = benchmark.stats.stats.median
    medians[key] = median
    info = benchmark.extra_info
    info["n_threads"] = n_threads
    info["gflops"] = round(flops / median / 1e9, 2)
    if peak is not None:
        info["peak_gflops"] = round(peak, 1)
        info["fraction_of_peak"] = round(flops / median / 1e9 / peak, 3)
    if baseline is not None and baseline in medians:
        info["ratio"] = round(medians[baseline] / median, 3)


@pytest.mark.benchmark(group="sgemm")
@pytest.mark.parametrize("implementation", ["numpy", "cnnx"])
@pytest.mark.parametrize("shape", GEMMS, ids=gemm_id)
def test_sgemm(benchmark, shape, implementation, n_threads, medians, peak):
    m, k, n = shape
    rng = np.random.default_rng(0)
    a = rng.standard_normal((m, k)).astype(np.float32)
    b = rng.standard_normal((k, n)).astype(np.float32)
    c = np.empty((m, n), np.float32)
    if implementation == "numpy":
        benchmark(np.matmul, a, b, out=c)
    else:
        benchmark(_kernels.sgemm, a, b, c, n_threads=n_threads)
        np.testing.assert_allclose(c, a @ b, rtol=1e-3, atol=1e-3)     # fast and wrong is not fast
        benchmark.extra_info["ratio_interleaved"] = round(interleaved_ratio(
            lambda: np.matmul(a, b, out=c), lambda: _kernels.sgemm(a, b, c, n_threads=n_threads)), 3)
    key = (gemm_id(shape), n_threads)
    record(benchmark, medians, (implementation, *key), 2.0 * m * n * k, n_threads,
           peak[n_threads], ("numpy", *key) if implementation == "cnnx" else None)


def conv_operands(shape):
    n, h, w, c, f = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = (rng.standard_normal((3, 3, c, f)) * 0.1).astype(np.float32)
    bias = rng.standard_normal(f).astype(np.float32)
    grad_output = rng.standard_normal((n, h, w, f)).astype(np.float32)
    return x, kernel, bias, grad_output


def conv_flops(shape, passes, padding="same"):
    n, h, w, c, f = shape
    if padding == "valid":
        h, w = h - 2, w - 2
    return 2.0 * n * h * w * 9 * c * f * passes


@pytest.mark.benchmark(group="conv3x3-forward")
@pytest.mark.parametrize("case", PADDED_CONVS, ids=padded_id)
def test_conv3x3_forward(benchmark, case, n_threads, medians, peak):
    shape, padding = case
    x, kernel, bias, _ = conv_operands(shape)
    benchmark(ops.conv2d_forward, x, kernel, bias, 1, padding, True, n_threads)
    record(benchmark, medians, ("forward", padded_id(case), n_threads),
           conv_flops(shape, 1, padding), n_threads, peak[n_threads])


def need_input_grad(shape):
    return shape[3] > 3        # the first layer (RGB input) never needs its input gradient


@pytest.mark.benchmark(group="conv3x3-backward")
@pytest.mark.parametrize("case", PADDED_CONVS, ids=padded_id)
def test_conv3x3_backward(benchmark, case, n_threads, medians, peak):
    shape, padding = case
    x, kernel, _, _ = conv_operands(shape)
    grad_output = ops.conv2d_forward(x, kernel, None, 1, padding)   # its shape, any values
    benchmark(ops.conv2d_backward, x, kernel, grad_output, 1, padding, need_input_grad(shape),
              n_threads)
    passes = 2 if need_input_grad(shape) else 1
    record(benchmark, medians, ("backward", padded_id(case), n_threads),
           conv_flops(shape, passes, padding), n_threads, peak[n_threads])


def torch_median(python, shape, n_threads, channels_last, tcmalloc):
    """Median seconds of PyTorch conv forward+backward on one shape, in a fresh process."""
    env = dict(os.environ, OMP_NUM_THREADS=str(n_threads))
    if tcmalloc:
        env["LD_PRELOAD"] = "libtcmalloc_minimal.so.4"
    command = [python, os.path.join(HERE, "torch_conv.py"), "--threads", str(n_threads),
               "--shape", conv_id(shape)]
    command += ["--channels-last"] if channels_last else []
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        return None
    return json.loads(done.stdout.strip().splitlines()[-1])[conv_id(shape)]


def torch_installed(python):
    return subprocess.run([python, "-c", "import torch"], capture_output=True).returncode == 0


def conv_layer_step(x, kernel, bias, grad_output, n_threads, input_grad):
    y = ops.conv2d_forward(x, kernel, bias, 1, "same", False, n_threads)
    return y, ops.conv2d_backward(x, kernel, grad_output, 1, "same", input_grad, n_threads)


@pytest.mark.benchmark(group="conv-layer-vs-torch")
@pytest.mark.parametrize("shape", CONVS, ids=conv_id)
def test_conv_layer_against_torch(benchmark, shape, n_threads, peak, torch_python):
    """One conv layer forward + backward (input gradient skipped for the RGB layer, as in
    torch_conv.py). PyTorch runs in its own process right after ours, so both see the same
    load: best = channels_last + tcmalloc, default = NCHW + glibc malloc."""
    if not torch_installed(torch_python):
        pytest.skip("torch is not installed")
    x, kernel, bias, grad_output = conv_operands(shape)
    benchmark(conv_layer_step, x, kernel, bias, grad_output, n_threads, need_input_grad(shape))
    median = benchmark.stats.stats.median
    passes = 3 if need_input_grad(shape) else 2
    info = benchmark.extra_info
    info["n_threads"] = n_threads
    info["gflops"] = round(conv_flops(shape, passes) / median / 1e9, 2)
    info["fraction_of_peak"] = round(conv_flops(shape, passes) / median / 1e9 / peak[n_threads], 3)
    for config, channels_last, tcmalloc in (("best", True, True), ("default", False, False)):
        torch_time = torch_median(torch_python, shape, n_threads, channels_last, tcmalloc)
        if torch_time is not None:
            info[f"torch_{config}_ms"] = round(torch_time * 1e3, 2)
            info[f"speedup_vs_torch_{config}"] = round(torch_time / median, 3)


@pytest.mark.benchmark(group="dense-51200x128")
@pytest.mark.parametrize("direction", ["forward", "backward"])
def test_dense_memory_bound(benchmark, direction, n_threads, peak):
    """The papers' first dense layer: (32, 51200) @ (51200, 128), memory-bound on the weights."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((32, 51200)).astype(np.float32)
    kernel = (rng.standard_normal((51200, 128)) * 0.01).astype(np.float32)
    bias = np.zeros(128, np.float32)
    grad_output = rng.standard_normal((32, 128)).astype(np.float32)
    if direction == "forward":
        def ours():
            return ops.dense_forward(x, kernel, bias, True, n_threads)

        def numpy_version():
            return np.maximum(x @ kernel + bias, 0)
        passes = 1
    else:
        def ours():
            return ops.dense_backward(x, kernel, grad_output, True, n_threads)

        def numpy_version():
            return grad_output @ kernel.T, x.T @ grad_output, grad_output.sum(axis=0)
        passes = 2
    benchmark(ours)
    record(benchmark, {}, None, 2.0 * 32 * 51200 * 128 * passes, n_threads, peak[n_threads])
    benchmark.extra_info["weights_gb_per_s"] = round(
        51200 * 128 * 4 * passes / benchmark.stats.stats.median / 1e9, 2)
    benchmark.extra_info["ratio_interleaved"] = round(interleaved_ratio(numpy_version, ours), 3)
