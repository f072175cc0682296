"""Full training step (`Sequential.train_step`: forward, backward, Adam) in images/s on the
networks of cnnx.architectures, against PyTorch in separate processes: its best configuration
(channels_last, tcmalloc preloaded) and out of the box (NCHW, glibc malloc).

    pytest benchmarks/test_training.py --benchmark-only -p no:xdist \\
        --torch-python /path/to/python-with-torch
    pytest benchmarks/test_training.py -k "fashion and batch64" --benchmark-only   # one cell

test_training_step, per cell: images_per_s, torch_best / torch_default images/s, the ratios,
the fraction of the FMA peak (measured alongside by cnnx.roofline's probe) the step's
convolutions and matrix products reach, and the OpenMP threads in force.
test_step_profile (batch 64): where a step's time goes, layer by layer, as a fraction of the
FMA peak (convolution, dense) or of the copy bandwidth (memory-bound layers), and each
convolution inside the step against the same convolution alone.
test_python_overhead (fashion, batch 32; goal: under 3% of the step): the time a step spends
outside the C kernels' calls, measured inside each step, plus the Cython boundary's fixed
cost per call (a call on one float) times the calls a step makes, and where the outside time
sits (the median gap before each kernel call, in the step's order; the largest printed):

    pytest benchmarks/test_training.py -k python_overhead --benchmark-only -p no:xdist -s
"""
import ctypes.util
import contextlib
import json
import os
import statistics
import subprocess
import time
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import cnnx
from cnnx import _kernels, bench

TORCH_SCRIPT = Path(__file__).with_name("torch_training.py")
TCMALLOC = "libtcmalloc_minimal.so.4"


@lru_cache(maxsize=None)
def torch_images_per_s(python, net, batch, threads, best):
    """PyTorch in a child process; None when torch (or tcmalloc for `best`) is missing."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [python, str(TORCH_SCRIPT), net, str(batch), str(threads)]
    if best:
        if ctypes.util.find_library("tcmalloc_minimal") is None:
            return None
        env["LD_PRELOAD"] = TCMALLOC
        command.append("--channels-last")
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=900)
    if done.returncode != 0:
        if "No module named 'torch'" in done.stderr:
            return None
        raise RuntimeError(f"torch_training.py failed: {done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])["images_per_s"]


@pytest.mark.benchmark(group="training step")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"{t}thr")
@pytest.mark.parametrize("batch", [16, 32, 64], ids=lambda b: f"batch{b}")
@pytest.mark.parametrize("net", list(bench.NETWORKS))
def test_training_step(benchmark, net, batch, threads, peak, torch_python):
    model, x, y = bench.training_setup(net, batch)
    with cnnx.num_threads(threads):
        benchmark.pedantic(bench.step_function(model, x, y), rounds=10, warmup_rounds=2)
        kernel_threads = cnnx.get_num_threads()          # what the kernels were told
    ours = batch / benchmark.stats["median"]
    info = benchmark.extra_info
    info.update(images_per_s=ours, threads=threads, kernel_threads=kernel_threads,
                omp_num_threads_env=os.environ.get("OMP_NUM_THREADS"),
                peak_gflops=peak[threads],
                fraction_of_fma_peak=bench.step_flops(model, batch) / benchmark.stats["median"]
                / 1e9 / peak[threads])
    for config, best in (("torch_best", True), ("torch_default", False)):
        theirs = torch_images_per_s(torch_python, net, batch, threads, best)
        if theirs is not None:
            info[f"{config}_images_per_s"] = theirs
            info[f"ratio_vs_{config}"] = ours / theirs
    assert np.isfinite(model.params[f"{model.layers[0].name}/kernel"]).all()


@pytest.mark.benchmark(group="step profile")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"{t}thr")
@pytest.mark.parametrize("net", list(bench.NETWORKS))
def test_step_profile(benchmark, net, threads, peak, copy_bandwidth):
    batch = 64
    model, x, y = bench.training_setup(net, batch)
    profile = bench.profile_step(model, x, y, threads, rounds=5, peak_gflops=peak[threads],
                                 copy_gbytes_per_s=copy_bandwidth[threads])
    alone = bench.conv_alone(model, batch, threads, rounds=5, peak_gflops=peak[threads])
    with cnnx.num_threads(threads):
        benchmark.pedantic(bench.step_function(model, x, y), rounds=3, warmup_rounds=1)
    info = benchmark.extra_info
    info.update(step_ms=profile["step_ms"], fraction_of_fma_peak=profile["fraction_of_fma_peak"],
                peak_gflops=peak[threads], copy_gbytes_per_s=copy_bandwidth[threads])
    for row in profile["layers"]:
        key = f"{row['layer']} {row['pass']}".replace(" ", "_")
        info[f"{key}_share"] = row["share"]
        for fraction in ("fraction_of_fma_peak", "fraction_of_copy_bandwidth"):
            if fraction in row:
                info[f"{key}_{fraction}"] = row[fraction]
    for index, fractions in alone.items():
        for kind, value in fractions.items():
            info[f"{index}_Conv2D_alone_{kind}"] = value
    print(f"\n{net}, {threads} thread(s), batch {batch}:\n{bench.format_profile(profile)}\n"
          f"convolutions alone (fraction of peak): {alone}")


@contextlib.contextmanager
def kernel_clock():
    """Record every call into cnnx._kernels while inside: yields a list that gets (name,
    started, ended) per call. The ops look _kernels' functions up at each call, so wrapping
    the module's attributes sees them all."""
    calls = []
    originals = {name: value for name, value in vars(_kernels).items()
                 if callable(value) and not name.startswith("_") and not isinstance(value, type)}

    def recorded(name, function):
        def call(*args, **kwargs):
            started = time.perf_counter()
            try:
                return function(*args, **kwargs)
            finally:
                calls.append((name, started, time.perf_counter()))
        return call
    for name, function in originals.items():
        setattr(_kernels, name, recorded(name, function))
    try:
        yield calls
    finally:
        for name, function in originals.items():
            setattr(_kernels, name, function)


def gaps_between_kernels(calls, started, ended):
    """{"NN before kernel": seconds}: the time outside the kernels before each call of one
    step (the Python of the layer that makes the call, and of whatever ran since the last
    call), and after the last."""
    gaps, previous = {}, started
    for index, (name, call_started, call_ended) in enumerate(calls):
        gaps[f"{index:02d} before {name}"] = call_started - previous
        previous = call_ended
    gaps["after the last kernel"] = ended - previous
    return gaps


def python_overhead(net, batch, threads, rounds):
    """Median step (ms) and, measured inside the same steps, the median time outside the
    kernels' calls; the boundary's fixed cost per call (ms) and the calls per step; the
    median gap (us) before each kernel call of a step, in the step's order."""
    model, x, y = bench.training_setup(net, batch)
    run = bench.step_function(model, x, y)
    one, target = np.ones(1, np.float32), np.empty(1, np.float32)
    steps, outside, boundary, gaps = [], [], [], []
    with cnnx.num_threads(threads):
        for _ in range(10):
            run()                                       # buffers and optimizer slots built
        for _ in range(rounds):                         # interleaved: the load moves
            started = time.perf_counter()
            run()
            steps.append(time.perf_counter() - started)
            with kernel_clock() as recorded:
                started = time.perf_counter()
                run()
                ended = time.perf_counter()
            gaps.append(gaps_between_kernels(recorded, started, ended))
            outside.append(sum(gaps[-1].values()))     # the step less its kernels' calls
            calls = len(recorded)
            started = time.perf_counter()
            for _ in range(100):
                _kernels.copy(one, target, n_threads=1)
            boundary.append((time.perf_counter() - started) / 100)
    return {"step_ms": 1e3 * statistics.median(steps),
            "outside_kernels_ms": 1e3 * statistics.median(outside),
            "boundary_ms_per_call": 1e3 * statistics.median(boundary), "calls": calls,
            "gaps_us": {name: 1e6 * statistics.median(step[name] for step in gaps)
                        for name in gaps[0]}}


@pytest.mark.benchmark(group="python overhead")
@pytest.mark.parametrize("threads", [1, 2], ids=lambda t: f"{t}thr")
def test_python_overhead(benchmark, threads):
    result = python_overhead("fashion", 32, threads, rounds=100)
    model, x, y = bench.training_setup("fashion", 32)
    with cnnx.num_threads(threads):
        benchmark.pedantic(bench.step_function(model, x, y), rounds=20, warmup_rounds=5)
    step = result["step_ms"]
    boundary = result["boundary_ms_per_call"] * result["calls"]
    result.update(outside_share=result["outside_kernels_ms"] / step,
                  with_boundary_share=(result["outside_kernels_ms"] + boundary) / step,
                  threads=threads, load_average=os.getloadavg()[0])
    benchmark.extra_info.update(result)
    print(f"\nfashion, batch 32, {threads} thread(s): step {step:.2f} ms; outside the kernels "
          f"{result['outside_kernels_ms']:.3f} ms ({100 * result['outside_share']:.1f}%); "
          f"with the boundary ({result['calls']} calls x "
          f"{1e3 * result['boundary_ms_per_call']:.2f} us) "
          f"{100 * result['with_boundary_share']:.1f}%; load {result['load_average']:.2f}")
    largest = sorted(result["gaps_us"].items(), key=lambda item: -item[1])[:8]
    print("largest gaps between kernel calls (median us): "
          + ", ".join(f"{name} {us:.1f}" for name, us in largest))
