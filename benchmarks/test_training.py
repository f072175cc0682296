"""Full training step (forward, backward, Adam) in images/s on the issue's networks, against
PyTorch in separate processes: its best configuration (channels_last, tcmalloc preloaded)
and out of the box (NCHW, glibc malloc).

    pytest benchmarks/test_training.py --benchmark-only -p no:xdist
    pytest benchmarks/test_training.py -k "fashion and 64" --benchmark-only     # one cell

extra_info per case: images_per_s, torch_best / torch_default images/s, the ratios, and the
OpenMP threads in force.  Glasses also reports the fraction of the FMA peak reached.
"""
import ctypes.util
import json
import os
import subprocess
import sys
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest

import cnnx
from cnnx import nn, optim

TORCH_SCRIPT = Path(__file__).with_name("torch_training.py")
TCMALLOC = "libtcmalloc_minimal.so.4"
# measured FMA peak of this machine (GFLOP/s; issue 3) and the glasses step's cost per image
PEAK_GFLOPS = {1: 102.0, 2: 198.0}
GLASSES_GFLOP_PER_IMAGE = 0.32


def glasses():
    return nn.Sequential([
        nn.Conv2D(16, 3, padding="same", activation="relu"),
        nn.Conv2D(16, 3, padding="same", activation="relu"),
        nn.Conv2D(32, 3, padding="same", activation="relu"),
        nn.MaxPool2D(2), nn.Flatten(),
        nn.Dense(128, activation="relu"), nn.Dropout(0.5),
        nn.Dense(128, activation="relu"), nn.Dropout(0.5),
        nn.Dense(2, activation="softmax"),
    ], input_shape=(80, 80, 3), seed=0)


def comics(batch_norm=False):
    def bn():
        return [nn.BatchNormalization()] if batch_norm else []
    return nn.Sequential([
        nn.Conv2D(32, 3, activation="relu"), *bn(), nn.MaxPool2D(2),
        nn.Conv2D(32, 3, activation="relu"), *bn(), nn.MaxPool2D(2), nn.Flatten(),
        nn.Dense(128, activation="relu"), *([nn.Dropout(0.5)] if batch_norm else []),
        nn.Dense(1, activation="sigmoid"),
    ], input_shape=(100, 100, 1), seed=0)


def fashion():
    return nn.Sequential([
        nn.Conv2D(32, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(64, 3, activation="relu"), nn.MaxPool2D(2), nn.Flatten(),
        nn.Dense(128, activation="relu"), nn.Dense(10, activation="softmax"),
    ], input_shape=(28, 28, 1), seed=0)


NETWORKS = {"glasses": (glasses, "sparse_categorical_crossentropy", 2),
            "comics": (comics, "binary_crossentropy", 2),
            "comics_bn": (lambda: comics(batch_norm=True), "binary_crossentropy", 2),
            "fashion": (fashion, "sparse_categorical_crossentropy", 10)}


@lru_cache(maxsize=None)
def torch_images_per_s(net, batch, threads, best):
    """PyTorch in a child process; None when torch (or tcmalloc for `best`) is missing."""
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    command = [sys.executable, str(TORCH_SCRIPT), net, str(batch), str(threads)]
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
@pytest.mark.parametrize("net", list(NETWORKS))
def test_training_step(benchmark, net, batch, threads):
    build, loss, classes = NETWORKS[net]
    model = build()
    model.compile(optim.Adam(1e-3), loss)
    rng = np.random.default_rng(0)
    x = rng.random((batch, *model.input_shape), dtype=np.float32)
    y = rng.integers(0, 2 if loss == "binary_crossentropy" else classes, batch)
    step = [0]

    def train_step():
        result = model.gradient(x, y, key=(0, step[0], 0))
        model.apply_gradients(result.mean_grads(), result.state)
        step[0] += 1

    with cnnx.num_threads(threads):
        benchmark.pedantic(train_step, rounds=10, warmup_rounds=2)
        kernel_threads = cnnx.get_num_threads()          # what the kernels were told
    ours = batch / benchmark.stats["median"]
    info = benchmark.extra_info
    info.update(images_per_s=ours, threads=threads, kernel_threads=kernel_threads,
                omp_num_threads_env=os.environ.get("OMP_NUM_THREADS"))
    for config, best in (("torch_best", True), ("torch_default", False)):
        theirs = torch_images_per_s(net, batch, threads, best)
        if theirs is not None:
            info[f"{config}_images_per_s"] = theirs
            info[f"ratio_vs_{config}"] = ours / theirs
    if net == "glasses":
        info["fraction_of_fma_peak"] = ours * GLASSES_GFLOP_PER_IMAGE / PEAK_GFLOPS[threads]
    assert np.isfinite(model.params[f"{model.layers[0].name}/kernel"]).all()
