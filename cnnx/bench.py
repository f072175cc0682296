"""`cnnx bench`: a short, self-contained report of this machine's speed with cnnx.

The full suites (with PyTorch side by side and cluster scaling) live in benchmarks/ and run
with `pytest benchmarks --benchmark-only`; this module needs only an installed cnnx. Every
figure is a median of several rounds and comes with a yardstick measured in the same run:
the FMA peak of this machine (cnnx.roofline's probe), the bandwidth of a plain copy, or
NumPy on the same operands. The training step is `Sequential.train_step`, the one `fit` runs.
"""
import contextlib
import statistics
import time

import numpy as np

from cnnx import architectures, nn, ops, optim, roofline
from cnnx._threads import get_num_threads, num_threads

# the networks of the papers at their own input shapes: (architecture, input shape, classes)
NETWORKS = {"glasses": ("glasses", (80, 80, 3), 2),
            "comics": ("comics", (100, 100, 1), 2),
            "comics_bn_dropout": ("comics_bn_dropout", (100, 100, 1), 2),
            "fashion": ("fashion", (28, 28, 1), 10)}


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


# ------------------------------------------------------------------------- training step

def training_setup(net, batch_size, seed=0):
    """A compiled network of NETWORKS (Adam, cross-entropy) and one random batch for it."""
    arch, input_shape, n_classes = NETWORKS[net]
    model = architectures.build(arch, input_shape, n_classes, seed=seed)
    model.compile(optim.Adam(1e-3), "sparse_categorical_crossentropy")
    rng = np.random.default_rng(seed)
    x = rng.random((batch_size, *input_shape), dtype=np.float32)
    y = rng.integers(0, n_classes, batch_size)
    return model, x, y


def step_function(model, x, y):
    """A callable running one train_step per call, each with the next step's key."""
    step = [0]

    def train_step():
        model.train_step(x, y, key=(0, step[0], 0))
        step[0] += 1
    return train_step


def layer_flops(layer, batch_size):
    """(forward, backward) flops of a Conv2D or Dense layer on one batch, else (0, 0).
    Backward is the kernel gradient, plus the input gradient unless the layer needs none."""
    if isinstance(layer, nn.Conv2D):
        kh, kw, c, f = layer.params["kernel"].shape
        oh, ow, _ = layer.output_shape
        forward = 2.0 * batch_size * oh * ow * kh * kw * c * f
    elif isinstance(layer, nn.Dense):
        forward = 2.0 * batch_size * layer.params["kernel"].size
    else:
        return 0.0, 0.0
    return forward, forward * (2 if layer.need_input_grad else 1)


def step_flops(model, batch_size):
    """Flops of the convolutions and matrix products of one training step."""
    return sum(sum(layer_flops(layer, batch_size)) for layer in model.layers)


def layer_bytes(layer, batch_size):
    """(forward, backward) bytes a memory-bound layer must move at least: its input and
    output (forward); grad_output, grad_input and what backward reads from the forward
    (backward). 0 for Conv2D, Dense and Flatten (a view), and for a ReLU layer whose
    BatchNormalization before it applies the ReLU (fused). A MaxPool2D that applies the
    ReLU backward of the layer before (masks_relu; that layer then skips its pass) also
    reads its output y in backward; one whose Conv2D pools its own output in its epilogue
    (pooled_in_conv) moves nothing forward: the pooled values and taps are the conv's
    output, written as it computes."""
    if isinstance(layer, (nn.Conv2D, nn.Dense, nn.Flatten)):
        return 0, 0
    if isinstance(getattr(layer, "activation", None), nn.activations.FusedReLU):
        return 0, 0
    size_in = batch_size * int(np.prod(layer.input_shape)) * 4
    size_out = batch_size * int(np.prod(layer.output_shape)) * 4
    saved = size_out                      # ReLU's y
    extra = 0
    if isinstance(layer, nn.Dropout):     # the keep mask, one byte per value
        saved = extra = size_out // 4
    if isinstance(layer, nn.BatchNormalization):
        saved = size_in
    if isinstance(layer, nn.MaxPool2D):   # the index: written forward, read backward
        saved = extra = size_out // 4 * layer.index_dtype().itemsize
        if layer.masks_relu:              # y > 0, the ReLU's mask at each max cell
            saved += size_out
        if layer.pooled_in_conv:
            return 0, size_out + size_in + saved
    return size_in + size_out + extra, size_out + size_in + saved


@contextlib.contextmanager
def layer_timer(model):
    """Record each layer's forward and backward wall time (and the optimizer's) while inside:
    yields {(index, "forward" | "backward"), "optimizer" -> [seconds, ...]}."""
    times = {}

    def timed(obj, attribute, key):
        original = getattr(obj, attribute)

        def wrapper(*args, **kwargs):
            started = time.perf_counter()
            result = original(*args, **kwargs)
            times.setdefault(key, []).append(time.perf_counter() - started)
            return result
        setattr(obj, attribute, wrapper)
        return obj, attribute

    patched = [timed(model.optimizer, "apply", "optimizer")]
    for index, layer in enumerate(model.layers):
        patched.append(timed(layer, "forward", (index, "forward")))
        for attribute in ("backward", "backward_logits"):
            if hasattr(layer, attribute):
                patched.append(timed(layer, attribute, (index, "backward")))
    try:
        yield times
    finally:
        for obj, attribute in patched:
            del obj.__dict__[attribute]            # back to the class's method


def profile_step(model, x, y, threads, rounds=5, peak_gflops=None, copy_gbytes_per_s=None):
    """Where one train_step's time goes: per layer forward/backward medians (ms), the share
    of the step, and the fraction of the FMA peak (convolution, dense) or of the copy
    bandwidth (memory-bound layers) each reaches; the optimizer; the rest (loss, Python)."""
    peak_gflops = peak_gflops or roofline.measure_fma_peak_gflops(threads, 0.05, 3)
    copy_gbytes_per_s = copy_gbytes_per_s or roofline.measure_copy_gbytes_per_s(threads, 256, 3)
    batch_size = len(x)
    run = step_function(model, x, y)
    with num_threads(threads):
        run()                                                   # warm-up, buffers built
        with layer_timer(model) as times:
            steps = [median_seconds(run, 1, warmup=0) for _ in range(rounds)]
    step = statistics.median(steps)
    rows, accounted = [], 0.0
    for index, layer in enumerate(model.layers):
        flops, moved = layer_flops(layer, batch_size), layer_bytes(layer, batch_size)
        for pass_index, kind in enumerate(("forward", "backward")):
            if (index, kind) not in times:
                continue
            seconds = statistics.median(times[(index, kind)])
            accounted += seconds
            row = {"layer": f"{index} {type(layer).__name__}", "pass": kind,
                   "ms": 1e3 * seconds, "share": seconds / step}
            if flops[pass_index]:
                row["fraction_of_fma_peak"] = flops[pass_index] / seconds / 1e9 / peak_gflops
            elif moved[pass_index]:
                row["fraction_of_copy_bandwidth"] = (moved[pass_index] / seconds / 1e9
                                                     / copy_gbytes_per_s)
            rows.append(row)
    optimizer = statistics.median(times["optimizer"])
    accounted += optimizer
    parameter_bytes = 4 * model.count_params()
    # Adam reads param, grad, m, v and writes param, m, v
    rows.append({"layer": "optimizer", "pass": type(model.optimizer).__name__,
                 "ms": 1e3 * optimizer, "share": optimizer / step,
                 "fraction_of_copy_bandwidth": 7 * parameter_bytes / optimizer / 1e9
                 / copy_gbytes_per_s})
    rows.append({"layer": "rest", "pass": "loss, mean gradients, Python", "ms":
                 1e3 * (step - accounted), "share": (step - accounted) / step})
    return {"step_ms": 1e3 * step, "images_per_s": batch_size / step,
            "fraction_of_fma_peak": step_flops(model, batch_size) / step / 1e9 / peak_gflops,
            "peak_gflops": peak_gflops, "copy_gbytes_per_s": copy_gbytes_per_s, "layers": rows}


def conv_alone(model, batch_size, threads, rounds=5, peak_gflops=None):
    """Each Conv2D layer of the model timed by itself on random operands of its shapes:
    {index: {"forward_fraction", "backward_fraction"}} of the FMA peak (ReLU fused as in
    the step; backward = kernel gradient + input gradient where the layer needs it)."""
    peak_gflops = peak_gflops or roofline.measure_fma_peak_gflops(threads, 0.05, 3)
    rng = np.random.default_rng(0)
    results = {}
    for index, layer in enumerate(model.layers):
        if not isinstance(layer, nn.Conv2D):
            continue
        x = rng.standard_normal((batch_size, *layer.input_shape), dtype=np.float32)
        grad_output = rng.standard_normal((batch_size, *layer.output_shape), dtype=np.float32)
        kernel, bias = layer.params["kernel"], layer.params.get("bias")
        forward = median_seconds(lambda: ops.conv2d_forward(
            x, kernel, bias, layer.strides, layer.padding, relu=layer.fused_relu,
            n_threads=threads), rounds)
        backward = median_seconds(lambda: ops.conv2d_backward(
            x, kernel, grad_output, layer.strides, layer.padding,
            need_input_grad=layer.need_input_grad, n_threads=threads), rounds)
        flops = layer_flops(layer, batch_size)
        results[index] = {"forward_fraction": flops[0] / forward / 1e9 / peak_gflops,
                          "backward_fraction": flops[1] / backward / 1e9 / peak_gflops}
    return results


def bench_training(net, batch_size, threads, rounds):
    """Images/s of one full train_step (forward, backward, Adam) of a named network."""
    model, x, y = training_setup(net, batch_size)
    with num_threads(threads):
        seconds = median_seconds(step_function(model, x, y), rounds)
    return {"images_per_s": batch_size / seconds, "parameters": model.count_params(),
            "gflop_per_step": step_flops(model, batch_size) / 1e9}


def run(quick=False, threads=None):
    """Every measurement, as a JSON-able dict."""
    threads = threads or sorted({1, get_num_threads()})
    rounds = 3 if quick else 7
    results = {"threads": threads, "rounds": rounds, "peak_gflops": {}, "clock_ghz": None,
               "copy_gbytes_per_s": {}, "sgemm": {}, "conv3x3": {}, "training": {}}
    sgemm_size = 512 if quick else 1024
    conv_shape = (8 if quick else 32, 80, 80, 16, 16)
    batch = 64
    nets = ["fashion"] if quick else ["fashion", "glasses"]
    results["clock_ghz"] = roofline.measure_clock_ghz()
    for t in threads:
        results["peak_gflops"][t] = roofline.measure_fma_peak_gflops(t)
        results["copy_gbytes_per_s"][t] = roofline.measure_copy_gbytes_per_s(
            t, 64 if quick else 256)
        results["sgemm"][t] = bench_sgemm(sgemm_size, t, rounds)
        results["conv3x3"][t] = bench_conv(conv_shape, t, rounds)
        results["training"][t] = {net: bench_training(net, batch, t, rounds) for net in nets}
    results["shapes"] = {"sgemm": sgemm_size, "conv3x3 (N, H, W, C, F)": conv_shape,
                         "training batch": batch}
    return results


def format_report(results):
    lines = [f"cnnx bench: medians of {results['rounds']} rounds; "
             f"shapes {results['shapes']}; clock {results['clock_ghz']:.2f} GHz "
             f"(dependent-add chain)", ""]
    header = "| threads | FMA peak GFLOP/s | copy GB/s | sgemm GFLOP/s (x NumPy) " \
             "| conv3x3 fwd % peak | conv3x3 bwd % peak | training images/s (% peak) |"
    lines += [header, "|---|---|---|---|---|---|---|"]
    for t in results["threads"]:
        peak = results["peak_gflops"][t]
        sgemm, conv = results["sgemm"][t], results["conv3x3"][t]
        training = ", ".join(
            f"{name} {r['images_per_s']:.0f} "
            f"({100 * r['images_per_s'] / results['shapes']['training batch'] * r['gflop_per_step'] / peak:.0f}%)"
            for name, r in results["training"][t].items())
        lines.append(f"| {t} | {peak:.1f} | {results['copy_gbytes_per_s'][t]:.1f} "
                     f"| {sgemm['gflops']:.1f} ({sgemm['speedup_vs_numpy']:.2f}x) "
                     f"| {100 * conv['forward_gflops'] / peak:.0f}% "
                     f"| {100 * conv['backward_gflops'] / peak:.0f}% | {training} |")
    lines += ["", "NumPy runs with its own BLAS threads; the full suites with PyTorch and "
                  "cluster scaling: pytest benchmarks --benchmark-only"]
    return "\n".join(lines)


def format_profile(profile):
    """A markdown table of profile_step's result."""
    lines = [f"step {profile['step_ms']:.1f} ms, {profile['images_per_s']:.0f} images/s, "
             f"{100 * profile['fraction_of_fma_peak']:.0f}% of the FMA peak "
             f"({profile['peak_gflops']:.0f} GFLOP/s; copy {profile['copy_gbytes_per_s']:.1f} "
             f"GB/s)", "", "| layer | pass | ms | share | % FMA peak | % copy bandwidth |",
             "|---|---|---|---|---|---|"]
    for row in profile["layers"]:
        peak = row.get("fraction_of_fma_peak")
        copy = row.get("fraction_of_copy_bandwidth")
        lines.append(f"| {row['layer']} | {row['pass']} | {row['ms']:.2f} "
                     f"| {100 * row['share']:.1f}% | {'' if peak is None else f'{100 * peak:.0f}%'} "
                     f"| {'' if copy is None else f'{100 * copy:.0f}%'} |")
    return "\n".join(lines)
