"""Kernel benchmarks: sgemm and conv-shaped GEMMs against numpy.matmul, 3x3 convolutions as a
fraction of the measured FMA peak, one conv layer against PyTorch (separate process), and the
memory-bound layers (pooling, BatchNorm, BatchNorm + ReLU, ReLU) against a copy.

    pytest benchmarks/test_kernels.py --benchmark-only
    pytest benchmarks/test_kernels.py -k memory_bound --benchmark-only    # memory-bound only

Ratios come from medians measured in the same run: each NumPy case runs right before its
cnnx twin, which records `ratio` = numpy median / cnnx median (> 1: cnnx is faster), and
`ratio_interleaved`, the same from rounds timed in alternation (robust to load drift on a
shared machine). Fractions of peak use an FMA peak measured just before each benchmark.
"""
import json
import os
import statistics
import subprocess
import time

import numpy as np
import pytest

import cnnx
from cnnx import _kernels, nn, ops

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
    baseline_time, candidate_time = interleaved_medians(baseline, candidate, rounds)
    return baseline_time / candidate_time


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


# ---------------------------------------------------------------------------- memory-bound
# Each case runs a layer's training forward or backward (the code a step runs, buffers
# reused) in alternation with a copy (cnnx's threaded copy kernel) of as many bytes as the
# layer must move at least, and records ratio_to_copy = copy time / layer time: 1.0 means
# the layer moves its data as fast as a copy moves the same bytes (>= 0.7 is issue 12's
# goal). Bytes the layer must move: what it reads and writes once, the max-pool index at
# one byte per output (2x2 windows need two bits); ratio_to_copy_best compares the fastest
# rounds of each (robust to other processes on a shared machine). BatchNorm needs its statistics before it
# can normalise, so it reads its input twice each way; ratio_to_copy_per_pass counts every
# pass's bytes (forward 3 arrays, backward 5) and says how fast the passes themselves run.
# The shapes are the papers' activations (batch 32 and 64): glasses' pool input 80x80x32,
# comics' 98x98x32 (and its second BatchNorm, 47x47x32), fashion's 26x26x32.
MEMORY_SHAPES = {"glasses": (80, 80, 32), "comics": (98, 98, 32), "comics2": (47, 47, 32),
                 "fashion": (26, 26, 32)}
MEMORY_CASES = [  # (layer kind, shapes it runs on)
    ("max_pool", ["glasses", "comics", "fashion"]),
    ("avg_pool", ["glasses", "comics", "fashion"]),
    ("batchnorm", ["comics", "comics2"]),
    ("batchnorm_relu", ["comics", "comics2"]),
    ("relu", ["comics", "comics2"]),
]
MEMORY_PARAMS = [(kind, shape, batch, direction) for kind, shapes in MEMORY_CASES
                 for shape in shapes for batch in (32, 64) for direction in ("forward", "backward")]


def memory_layers(kind, shape):
    """The built layers of one case (BatchNorm + ReLU fused when this cnnx can fuse)."""
    layers = {"max_pool": lambda: [nn.MaxPool2D(2)], "avg_pool": lambda: [nn.AvgPool2D(2)],
              "batchnorm": lambda: [nn.BatchNormalization()], "relu": lambda: [nn.ReLU()],
              "batchnorm_relu": lambda: [nn.BatchNormalization(), nn.ReLU()]}[kind]()
    fuse = getattr(nn.normalization, "fuse_batchnorm_relu", None)
    fused = bool(fuse(layers)) if fuse is not None else False
    for index, layer in enumerate(layers):
        layer.name = f"{kind}_{index}"
        layer.input_shape = shape
        layer.output_shape = tuple(layer.build(shape, np.random.default_rng(0)))
    return layers, fused


def least_bytes(kind, direction, size_in, size_out):
    """Bytes a layer's pass must move at least (float32 arrays of size_in, size_out values),
    and the bytes its passes move (BatchNorm reads its input twice)."""
    if kind == "max_pool":
        moved = 4 * (size_in + size_out) + size_out          # + the one-byte index
        return moved, moved
    if kind == "avg_pool":
        return 4 * (size_in + size_out), 4 * (size_in + size_out)
    if kind == "relu":           # backward reads y and grad_output, writes grad_input
        return (8 * size_in, 8 * size_in) if direction == "forward" else (12 * size_in,) * 2
    # BatchNorm (+ ReLU): forward x -> y; backward grad_output and x -> grad_input
    return (8 * size_in, 12 * size_in) if direction == "forward" else (12 * size_in, 20 * size_in)


def copy_of(n_bytes, n_threads):
    source = np.ones(max(n_bytes // 8, 1), np.float32)
    target = np.empty_like(source)
    _kernels.copy(source, target, n_threads=n_threads)       # first touch outside timing
    return lambda: _kernels.copy(source, target, n_threads=n_threads)


def interleaved_times(first, second, rounds=15):
    """Seconds of each call of first and second, called in alternation."""
    times = ([], [])
    for _ in range(rounds):
        for function, record in ((first, times[0]), (second, times[1])):
            started = time.perf_counter()
            function()
            record.append(time.perf_counter() - started)
    return times


def interleaved_medians(first, second, rounds=11):
    return tuple(statistics.median(t) for t in interleaved_times(first, second, rounds))


def memory_id(case):
    kind, shape, batch, direction = case
    return f"{kind}-{shape}-batch{batch}-{direction}"


@pytest.mark.benchmark(group="memory-bound")
@pytest.mark.parametrize("case", MEMORY_PARAMS, ids=memory_id)
def test_memory_bound(benchmark, case, n_threads, copy_bandwidth):
    kind, shape_name, batch, direction = case
    shape = MEMORY_SHAPES[shape_name]
    layers, fused = memory_layers(kind, shape)
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch, *shape), dtype=np.float32)
    grad_output = rng.standard_normal((batch, *layers[-1].output_shape), dtype=np.float32)

    def forward():
        values = x
        for layer in layers:
            values = layer.forward(values, training=True)
        return values

    def backward():
        # a layer may overwrite grad_output; of these only the unfused ReLU does, and
        # masking it again changes nothing
        grad = grad_output
        for layer in reversed(layers):
            grad = layer.backward(grad)
        return grad

    with cnnx.num_threads(n_threads):
        forward()
        run = forward if direction == "forward" else backward
        run()
        benchmark.pedantic(run, rounds=5, warmup_rounds=1)
        size_out = grad_output.size
        least, per_pass = least_bytes(kind, direction, x.size, size_out)
        copy_times, layer_times = interleaved_times(copy_of(least, n_threads), run)
        copy_time, layer_time = statistics.median(copy_times), statistics.median(layer_times)
        info = benchmark.extra_info
        info.update(n_threads=n_threads, fused=fused, megabytes=round(least / 2**20, 1),
                    ratio_to_copy=round(copy_time / layer_time, 3),
                    # best against best: the rounds no other process took the core from
                    # (a loaded shared machine; the medians say what a step sees there)
                    ratio_to_copy_best=round(min(copy_times) / min(layer_times), 3),
                    gbytes_per_s=round(least / layer_time / 1e9, 2),
                    copy_256mb_gbytes_per_s=round(copy_bandwidth[n_threads], 2),
                    fraction_of_256mb_copy=round(least / layer_time / 1e9
                                                 / copy_bandwidth[n_threads], 3),
                    omp_max_threads=cnnx.get_num_threads())
        if per_pass != least:
            info["ratio_to_copy_per_pass"] = round(copy_time / layer_time * per_pass / least, 3)


@pytest.mark.benchmark(group="batchnorm-relu-step")
@pytest.mark.parametrize("batch", [32, 64], ids=lambda b: f"batch{b}")
def test_batchnorm_relu_fusion_in_a_step(benchmark, batch, n_threads):
    """One train_step of the comics BatchNorm + dropout net with each BatchNormalization fused
    with its ReLU, against the same net unfused, in alternation: speedup = unfused / fused."""
    from cnnx import bench
    fuse = getattr(nn.normalization, "fuse_batchnorm_relu", None)
    if fuse is None:
        pytest.skip("this cnnx cannot fuse BatchNormalization with ReLU")
    fused, x, y = bench.training_setup("comics_bn_dropout", batch)   # Sequential fuses
    unfused, _, _ = bench.training_setup("comics_bn_dropout", batch)
    pairs = [(layer, following) for layer, following in zip(unfused.layers, unfused.layers[1:])
             if isinstance(layer, nn.BatchNormalization)]
    for batchnorm, relu in pairs:                       # the two layers apart again
        assert batchnorm.fused_relu
        batchnorm.fused_relu = False
        relu.activation = nn.activations.ReLU()
    assert len(pairs) == 2 and fuse(fused.layers) == 0   # fused once, when built
    fused_against_unfused(benchmark, fused, unfused, x, y, n_threads)


def fused_against_unfused(benchmark, fused, unfused, x, y, n_threads, **info):
    """Time one train_step of `fused` against the same net `unfused`, in alternation, after
    checking that one step of each gives the same weights bit for bit."""
    from cnnx import bench
    fused_step, unfused_step = bench.step_function(fused, x, y), bench.step_function(unfused, x, y)
    with cnnx.num_threads(n_threads):
        unfused_step()
        fused_step()
        for name, value in unfused.get_weights().items():
            assert np.array_equal(fused.get_weights()[name], value), name
        benchmark.pedantic(fused_step, rounds=5, warmup_rounds=0)
        unfused_time, fused_time = interleaved_medians(unfused_step, fused_step, rounds=7)
    benchmark.extra_info.update(info, n_threads=n_threads, fused_ms=round(fused_time * 1e3, 2),
                                unfused_ms=round(unfused_time * 1e3, 2),
                                speedup=round(unfused_time / fused_time, 3))


@pytest.mark.benchmark(group="relu-max-pool-step")
@pytest.mark.parametrize("batch", [32, 64], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("net", ["comics", "glasses"])
def test_relu_max_pool_fusion_in_a_step(benchmark, net, batch, n_threads):
    """One train_step of a paper net with each MaxPool2D applying the ReLU backward of the
    Conv2D before it (which skips its pass over the whole gradient), against the same net
    unfused, in alternation: speedup = unfused / fused."""
    from cnnx import bench
    fuse = getattr(nn.pooling, "fuse_relu_into_max_pool", None)
    if fuse is None:
        pytest.skip("this cnnx cannot fold the ReLU backward into the max-pool backward")
    fused, x, y = bench.training_setup(net, batch)                  # Sequential fuses
    unfused, _, _ = bench.training_setup(net, batch)
    pairs = [(conv, pool) for conv, pool in zip(unfused.layers, unfused.layers[1:])
             if isinstance(pool, nn.MaxPool2D)]
    for conv, pool in pairs:                                        # the pairs apart again
        assert conv.relu_backward_by_next and pool.masks_relu
        conv.relu_backward_by_next = pool.masks_relu = False
    assert pairs and fuse(fused.layers) == len(pairs)               # idempotent re-fusion
    fused_against_unfused(benchmark, fused, unfused, x, y, n_threads, net=net)


@pytest.mark.benchmark(group="relu-max-pool-backward")
@pytest.mark.parametrize("batch", [32, 64], ids=lambda b: f"batch{b}")
def test_relu_mask_in_max_pool_backward(benchmark, batch, n_threads):
    """The two passes the fusion replaces, on comics' first conv output (98x98x32): the
    max-pool backward then ReLU's backward over the whole gradient, against one max-pool
    backward applying the mask (relu_y): speedup = unfused / fused."""
    if "relu_y" not in (ops.max_pool2d_backward.__doc__ or ""):
        pytest.skip("this cnnx cannot fold the ReLU backward into the max-pool backward")
    rng = np.random.default_rng(0)
    x = np.maximum(rng.standard_normal((batch, 98, 98, 32), dtype=np.float32), 0)
    y, taps = ops.max_pool2d_forward(x, 2, 2, "valid")
    grad_output = rng.standard_normal(y.shape, dtype=np.float32)
    unfused_out, fused_out = np.empty_like(x), np.empty_like(x)

    def unfused():
        ops.max_pool2d_backward(grad_output, taps, x.shape, n_threads=n_threads, pool_size=2,
                                out=unfused_out)
        _kernels.relu_backward(x, unfused_out, n_threads=n_threads)

    def fused():
        ops.max_pool2d_backward(grad_output, taps, x.shape, n_threads=n_threads, pool_size=2,
                                out=fused_out, relu_y=y)

    unfused()
    fused()
    assert np.array_equal(fused_out.view(np.uint32), unfused_out.view(np.uint32))
    benchmark.pedantic(fused, rounds=5, warmup_rounds=1)
    unfused_time, fused_time = interleaved_medians(unfused, fused, rounds=11)
    benchmark.extra_info.update(n_threads=n_threads, fused_ms=round(fused_time * 1e3, 2),
                                unfused_ms=round(unfused_time * 1e3, 2),
                                speedup=round(unfused_time / fused_time, 3))


# ---------------------------------------------------------------------------- first layers
# The papers' first convolutions (C = 1 or 3): their backward is the kernel and bias
# gradients only (the input gradient is never needed). Issue 12 asks >= 50% of the FMA peak.
FIRST_LAYER_CONVS = [  # (N, H, W, C, F), padding
    ((32, 80, 80, 3, 16), "same"), ((64, 80, 80, 3, 16), "same"),        # glasses
    ((32, 100, 100, 1, 32), "valid"), ((64, 100, 100, 1, 32), "valid"),  # comics
    ((32, 28, 28, 1, 32), "valid"), ((64, 28, 28, 1, 32), "valid"),      # fashion
]


@pytest.mark.benchmark(group="first-layer-grad-kernel")
@pytest.mark.parametrize("case", FIRST_LAYER_CONVS, ids=padded_id)
def test_first_layer_grad_kernel(benchmark, case, n_threads, medians, peak):
    shape, padding = case
    x, kernel, _, _ = conv_operands(shape)
    rng = np.random.default_rng(1)
    grad_output = rng.standard_normal(
        ops.conv2d_forward(x, kernel, None, 1, padding).shape).astype(np.float32)
    _, grad_kernel, grad_bias = benchmark(ops.conv2d_backward, x, kernel, grad_output, 1,
                                          padding, False, n_threads)
    flops = conv_flops(shape, 1, padding)
    record(benchmark, medians, ("first-layer-grad-kernel", padded_id(case), n_threads), flops,
           n_threads, peak[n_threads])
    # best against best: the rounds no other process took a core from (a shared machine)
    benchmark.extra_info["fraction_of_peak_best"] = round(
        flops / benchmark.stats.stats.min / 1e9 / peak[n_threads], 3)
    expected = np.einsum("nhwk,nhwf->kf", _im2col3x3(x, padding).astype(np.float64),
                         grad_output.astype(np.float64))          # fast and wrong is not fast
    np.testing.assert_allclose(grad_kernel.reshape(expected.shape), expected, rtol=1e-3,
                               atol=1e-3 * np.sqrt(grad_output[..., 0].size))
    np.testing.assert_allclose(grad_bias, grad_output.sum(axis=(0, 1, 2), dtype=np.float64),
                               rtol=1e-3, atol=1e-3 * np.sqrt(grad_output[..., 0].size))


def _im2col3x3(x, padding):
    """(N, OH, OW, 9*C): the 3x3 windows of x, stride 1, taps in (i, j, c) order."""
    if padding == "same":
        x = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
    oh, ow = x.shape[1] - 2, x.shape[2] - 2
    return np.concatenate([x[:, i:i + oh, j:j + ow] for i in range(3) for j in range(3)],
                          axis=3)


# ------------------------------------------------ max-pool in the convolution's epilogue
# (the convpool block: fused vs unfused Conv2D(relu) + MaxPool2D(2), alone and in a step)

# N, H, W, C, F of 3x3 'valid' convolutions followed by a 2x2 max-pool: the comics and
# fashion first layers (bound by writing their output) and comics' second layer
CONV_POOLS = [(32, 100, 100, 1, 32), (64, 100, 100, 1, 32), (32, 28, 28, 1, 32),
              (64, 28, 28, 1, 32), (32, 49, 49, 32, 32)]


def conv_pool_pair(shape, n_threads):
    """(unfused, fused, convolution alone) forwards of a 3x3 'valid' conv (ReLU) + 2x2
    max-pool, each writing into its own buffers reused from call to call (as a training step
    does), after checking that the first two give the same bits."""
    n, h, w, c, f = shape
    x, kernel, bias, _ = conv_operands(shape)
    geometry = ops.conv_geometry((h, w, c), 3, f, 1, "valid")
    oh, ow = geometry.output_size
    conv_out = np.empty((n, oh, ow, f), np.float32)
    pooled_shape = (n, oh // 2, ow // 2, f)
    unfused_out = (np.empty(pooled_shape, np.float32), np.empty(pooled_shape, np.uint8))
    fused_out = (np.empty(pooled_shape, np.float32), np.empty(pooled_shape, np.uint8))

    def unfused():
        ops.conv2d_forward(x, kernel, bias, relu=True, n_threads=n_threads, out=conv_out,
                           geometry=geometry)
        ops.max_pool2d_forward(conv_out, 2, n_threads=n_threads, out=unfused_out)

    def fused():
        ops.conv2d_max_pool_forward(x, kernel, bias, 2, relu=True, n_threads=n_threads,
                                    out=fused_out, geometry=geometry)

    def convolution():
        ops.conv2d_forward(x, kernel, bias, relu=True, n_threads=n_threads, out=conv_out,
                           geometry=geometry)

    unfused()
    fused()
    for expected, got in zip(unfused_out, fused_out):
        assert np.array_equal(expected.view(np.uint8), got.view(np.uint8))
    return unfused, fused, convolution


@pytest.mark.benchmark(group="conv-max-pool-forward")
@pytest.mark.parametrize("shape", CONV_POOLS, ids=conv_id)
def test_conv_max_pool_forward(benchmark, shape, n_threads, peak):
    """Conv2D(relu) + MaxPool2D(2) forward, the pool in the convolution's epilogue (the
    output never written) against the two kernels apart, in alternation: speedup =
    unfused / fused; fraction_of_peak: the fused forward's conv flops over the FMA peak
    measured just before (the first layers' goal: >= 50%)."""
    if not hasattr(ops, "conv2d_max_pool_forward"):
        pytest.skip("this cnnx cannot pool in the convolution's epilogue")
    unfused, fused, convolution = conv_pool_pair(shape, n_threads)
    benchmark.pedantic(fused, rounds=5, warmup_rounds=1)
    unfused_times, fused_times = interleaved_times(unfused, fused, rounds=21)
    unfused_time, fused_time = statistics.median(unfused_times), statistics.median(fused_times)
    # the convolution alone (no pooling at all), the fused pass's floor
    convolution_times, _ = interleaved_times(convolution, fused, rounds=11)
    flops, top = conv_flops(shape, 1, "valid"), peak[n_threads]
    benchmark.extra_info.update(
        n_threads=n_threads, fused_ms=round(fused_time * 1e3, 2),
        unfused_ms=round(unfused_time * 1e3, 2), speedup=round(unfused_time / fused_time, 3),
        # best against best: the rounds no other process took the core from (shared machine)
        speedup_best=round(min(unfused_times) / min(fused_times), 3),
        peak_gflops=round(top, 1),
        fused_fraction_of_peak=round(flops / fused_time / 1e9 / top, 3),
        unfused_fraction_of_peak=round(flops / unfused_time / 1e9 / top, 3),
        fused_fraction_of_peak_best=round(flops / min(fused_times) / 1e9 / top, 3),
        convolution_fraction_of_peak_best=round(flops / min(convolution_times) / 1e9 / top, 3),
        omp_max_threads=cnnx.get_num_threads())


@pytest.mark.benchmark(group="conv-max-pool-step")
@pytest.mark.parametrize("batch", [32, 64], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("net", ["comics", "fashion"])
def test_conv_max_pool_fusion_in_a_step(benchmark, net, batch, n_threads):
    """One train_step of a paper net with each Conv2D(relu) pooling its own output (its
    MaxPool2D in the epilogue), against the same net with the pairs apart in the forward
    (the ReLU backward still in the pool's backward), in alternation: speedup =
    unfused / fused."""
    from cnnx import bench
    fused, x, y = bench.training_setup(net, batch)                  # Sequential fuses
    unfused, _, _ = bench.training_setup(net, batch)
    pairs = [conv for conv in unfused.layers if getattr(conv, "max_pool", None) is not None]
    if not pairs:
        pytest.skip("this cnnx cannot pool in the convolution's epilogue")
    for conv in pairs:                                              # the forwards apart
        conv.max_pool = None
    fused_against_unfused(benchmark, fused, unfused, x, y, n_threads, net=net,
                          pairs=len(pairs))


# ------------------------------------------------------------- strided convolutions
# The comics paper's 5x5 stride-2 layers run on the general path (the GEMM frame packing
# im2col panels straight from x; the grad input gathers through the stride-dilated geometry):
# its share of the FMA peak, forward and backward, 'valid' padding.
STRIDED_CONVS = [(32, 100, 100, 1, 32), (32, 48, 48, 32, 32)]     # N, H, W, C, F; 5x5, s 2


@pytest.mark.benchmark(group="conv5x5-stride2")
@pytest.mark.parametrize("direction", ["forward", "backward"])
@pytest.mark.parametrize("shape", STRIDED_CONVS, ids=conv_id)
def test_conv5x5_stride2(benchmark, shape, direction, n_threads, medians, peak):
    n, h, w, c, f = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, c)).astype(np.float32)
    kernel = (rng.standard_normal((5, 5, c, f)) * 0.1).astype(np.float32)
    out_h, out_w = (h - 5) // 2 + 1, (w - 5) // 2 + 1
    input_grad = c > 3                          # a first layer never needs its input gradient
    if direction == "forward":
        benchmark(ops.conv2d_forward, x, kernel, None, (2, 2), "valid", True, n_threads)
        passes = 1
    else:
        grad_output = rng.standard_normal((n, out_h, out_w, f)).astype(np.float32)
        benchmark(ops.conv2d_backward, x, kernel, grad_output, (2, 2), "valid", input_grad,
                  n_threads)
        passes = 2 if input_grad else 1
    flops = 2.0 * n * out_h * out_w * 25 * c * f * passes
    record(benchmark, medians, (direction, "5x5s2", conv_id(shape), n_threads), flops,
           n_threads, peak[n_threads])
