"""`cnnx bench`: a short, self-contained report of this machine's speed with cnnx.

The full suites (with PyTorch side by side and cluster scaling) live in benchmarks/ and run
with `pytest benchmarks --benchmark-only`; this module needs only an installed cnnx. Every
figure is a median of several rounds and comes with a yardstick measured in the same run:
the FMA peak of this machine, or NumPy on the same operands.
"""
import statistics
import time

import numpy as np

from cnnx import architectures, ops, optim, roofline
from cnnx._threads import get_num_threads, num_threads


def median_seconds(fn, rounds, warmup=1):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_sgemm(size, threads, rounds):
    rng = np.random.default_rng(0)
    a = rng.standard_normal((size, size), dtype=np.float32)
    b = rng.standard_normal((size, size), dtype=np.float32)
    with num_threads(threads):
        ours = median_seconds(lambda: ops.dense_forward(a, b, None), rounds)
    numpy = median_seconds(lambda: a @ b, rounds)
    flops = 2.0 * size**3
    return {"gflops": flops / ours / 1e9, "numpy_gflops": flops / numpy / 1e9,
            "speedup_vs_numpy": numpy / ours}


def bench_conv(shape, threads, rounds):
    """3x3 'same' convolution, forward and backward (input + kernel gradients)."""
    n, h, w, c, f = shape
    rng = np.random.default_rng(0)
    x = rng.standard_normal((n, h, w, c), dtype=np.float32)
    kernel = rng.standard_normal((3, 3, c, f), dtype=np.float32) * 0.1
    bias = np.zeros(f, np.float32)
    grad_output = rng.standard_normal((n, h, w, f), dtype=np.float32)
    flops = 2.0 * n * h * w * 9 * c * f
    forward = median_seconds(lambda: ops.conv2d_forward(x, kernel, bias, 1, "same",
                                                        n_threads=threads), rounds)
    backward = median_seconds(lambda: ops.conv2d_backward(x, kernel, grad_output, 1, "same",
                                                          n_threads=threads), rounds)
    return {"forward_gflops": flops / forward / 1e9,
            "backward_gflops": 2 * flops / backward / 1e9}


def bench_training(name, input_shape, n_classes, batch_size, threads, rounds):
    """Images/s of one full step (forward, backward, optimizer) of a named network."""
    model = architectures.build(name, input_shape, n_classes, seed=0)
    model.compile(optim.Adam(1e-3), "sparse_categorical_crossentropy", metrics=["accuracy"])
    rng = np.random.default_rng(0)
    x = rng.standard_normal((batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, n_classes, batch_size)
    step = [0]

    def train_step():
        result = model.gradient(x, y, key=(0, step[0], 0))
        model.apply_gradients(result.mean_grads(), result.state)
        step[0] += 1

    with num_threads(threads):
        seconds = median_seconds(train_step, rounds)
    return {"images_per_s": batch_size / seconds, "parameters": model.count_params()}


def run(quick=False, threads=None):
    """Every measurement, as a JSON-able dict."""
    threads = threads or sorted({1, get_num_threads()})
    rounds = 3 if quick else 7
    results = {"threads": threads, "rounds": rounds, "peak_gflops": {}, "sgemm": {},
               "conv3x3": {}, "training": {}}
    sgemm_size = 512 if quick else 1024
    conv_shape = (8 if quick else 32, 80, 80, 16, 16)
    nets = [("fashion", (28, 28, 1), 10, 64)]
    if not quick:
        nets.append(("glasses", (80, 80, 3), 2, 64))
    for t in threads:
        results["peak_gflops"][t] = roofline.fma_peak_gflops(t)
        results["sgemm"][t] = bench_sgemm(sgemm_size, t, rounds)
        results["conv3x3"][t] = bench_conv(conv_shape, t, rounds)
        results["training"][t] = {name: bench_training(name, shape, classes, batch, t, rounds)
                                  for name, shape, classes, batch in nets}
    results["shapes"] = {"sgemm": sgemm_size, "conv3x3 (N, H, W, C, F)": conv_shape,
                         "training batch": 64}
    return results


def format_report(results):
    lines = [f"cnnx bench: medians of {results['rounds']} rounds; "
             f"shapes {results['shapes']}", ""]
    header = "| threads | FMA peak GFLOP/s | sgemm GFLOP/s (x NumPy) | conv3x3 fwd % peak " \
             "| conv3x3 bwd % peak | training images/s |"
    lines += [header, "|---|---|---|---|---|---|"]
    for t in results["threads"]:
        peak = results["peak_gflops"][t]
        sgemm, conv = results["sgemm"][t], results["conv3x3"][t]
        training = ", ".join(f"{name} {r['images_per_s']:.0f}"
                             for name, r in results["training"][t].items())
        lines.append(f"| {t} | {peak:.1f} | {sgemm['gflops']:.1f} "
                     f"({sgemm['speedup_vs_numpy']:.2f}x) "
                     f"| {100 * conv['forward_gflops'] / peak:.0f}% "
                     f"| {100 * conv['backward_gflops'] / peak:.0f}% | {training} |")
    lines += ["", "NumPy runs with its own BLAS threads; the full suites with PyTorch and "
                  "cluster scaling: pytest benchmarks --benchmark-only"]
    return "\n".join(lines)
