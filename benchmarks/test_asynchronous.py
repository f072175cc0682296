"""Asynchronous DaskTrainer: how a unit's weights reach its worker, and units per second
against an older commit.

    pytest benchmarks/test_asynchronous.py -s -p no:randomly --benchmark-json async.json
    CNNX_ASYNC_MODES=downpour,adag pytest benchmarks/test_asynchronous.py -s -k baseline

test_unit_protocol_by_payload (one process, one LocalCluster of 2 workers, the three ways
interleaved, median of REPS): the time from sending a unit's weights to its (trivial)
task's result, for payloads from the fashion net's 0.9 MB to the glasses net's 26 MB:
- "scatter": a blocking scatter through the scheduler, then the submission (up to f07c0db);
- "in task": the weights as the task's argument, nothing blocks (now, up to the crossover);
- "direct": the driver sends them straight to the worker, then submits (now, above it).
It prints the crossover between the last two; asynchronous.DIRECT_ABOVE_BYTES is set from it.

test_units_per_second_against_baseline: the whole driver, fits of both nets.

The baseline (default f07c0db: a blocking scatter of each unit's weights, then its
submission) is checked out in a temporary `git worktree`; its kernels are this tree's
build when csrc/ and the Cython boundary are the same, else built there. Each round runs
both trees in fresh processes (PYTHONPATH picks the tree, in the driver and in the Dask
workers it starts), alternating, on a LocalCluster of 2 single-thread workers, shards=2:
epoch 0 warms, epoch 1 is timed (units committed / seconds). The figure is the median of
the ratios new/old of adjacent runs; the machine is shared, so only ratios taken in one run
count.
Nets: fashion (0.9 MB of weights) and glasses (26 MB), whose weights now travel with the
task through the scheduler instead of being scattered to the worker first.
"""
import json
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

import numpy as np

# net: (input shape, classes, global batch = 2 shards, steps per epoch): small shards, so
# that a unit's protocol is a visible part of its time on this shared 2-core machine
NETS = {"fashion": ((28, 28, 1), 10, 32, 32), "glasses": ((80, 80, 3), 2, 16, 8)}
BASELINE = os.environ.get("CNNX_ASYNC_BASELINE", "f07c0db")
MODES = os.environ.get("CNNX_ASYNC_MODES", "downpour").split(",")
ROUNDS = int(os.environ.get("CNNX_ASYNC_ROUNDS", "3"))
REPS = int(os.environ.get("CNNX_ASYNC_REPS", "30"))
PAYLOAD_MB = (0.9, 2, 4, 8, 16, 26)
HERE = pathlib.Path(__file__).resolve()
ROOT = HERE.parents[1]
KERNEL_SOURCES = ("csrc", "cnnx/_kernels.pyx", "setup.py")


# ---------------------------------------------------------------- one measurement (a process)

def make_store(folder, net):
    from cnnx import data
    shape, classes, batch, steps = NETS[net]
    path = os.path.join(folder, f"async-{net}.zarr")
    if not os.path.exists(path):
        rng = np.random.default_rng(0)
        n = batch * steps
        x = rng.integers(0, 256, (n, *shape), dtype=np.uint8)
        data.ingest_arrays(x, np.arange(n) % classes, path, chunk_size=batch // 2)
    return data.open_dataset(path)


def measure(net, mode, folder):
    """Units/s of epoch 1 of a two-epoch asynchronous fit, in this process's cnnx, and the
    overhead per unit: each of the 2 workers runs one unit at a time, so a unit's cycle is
    epoch time x 2 / units, of which the task's compute (Dask's task stream: read, weights
    in, gradient) is the work and the rest is the protocol."""
    from distributed import Client, LocalCluster, get_task_stream

    from cnnx import architectures, optim
    from cnnx.parallel import DaskTrainer

    dataset = make_store(folder, net)
    model = architectures.build(net, dataset.image_shape, len(dataset.class_names))
    model.compile(optimizer=optim.Adam(1e-3))
    batch = NETS[net][2]
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        client.wait_for_workers(2, timeout=120)
        trainer = DaskTrainer(model, client, mode=mode, shards=2, tau=2, learning_rate=0.01,
                              progress=False, echo=lambda *a: None)
        with get_task_stream(client) as stream:
            trainer.fit(dataset, epochs=2, batch_size=batch)
    timed = [c for c in trainer.commits if c["epoch"] == 1]
    seconds = trainer.history[1]["time_s"]
    computes = [part["stop"] - part["start"] for task in stream.data
                if "-e1-s" in str(task["key"]) for part in task["startstops"]
                if part["action"] == "compute"]
    cycle = seconds * 2 / len(timed)
    return {"units_per_s": len(timed) / seconds, "units": len(timed), "epoch_s": seconds,
            "cycle_s": cycle, "compute_s": statistics.fmean(computes),
            "overhead_s": cycle - statistics.fmean(computes),
            "weights_mb": sum(a.nbytes for a in model.params.values()) / 1e6}


# ---------------------------------------------------------------- the baseline tree

def kernels_unchanged(commit):
    return subprocess.run(["git", "-C", str(ROOT), "diff", "--quiet", commit, "--",
                           *KERNEL_SOURCES]).returncode == 0


def checkout_baseline(commit, folder):
    tree = os.path.join(folder, f"cnnx-{commit}")
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", tree, commit],
                   check=True, capture_output=True)
    built = list((ROOT / "cnnx").glob("_kernels*.so"))
    if built and kernels_unchanged(commit):
        for path in built:
            shutil.copy(path, os.path.join(tree, "cnnx"))
    else:
        subprocess.run([sys.executable, "setup.py", "build_ext", "--inplace"], cwd=tree,
                       check=True, capture_output=True)
    return tree


def run_in(tree, net, mode, folder):
    """measure() in a fresh process whose cnnx is `tree`'s."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    done = subprocess.run([sys.executable, str(HERE), net, mode, folder], env=env, cwd=tree,
                          check=True, capture_output=True, text=True, timeout=900)
    return json.loads(done.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- the protocol alone

def received(weights):
    """A unit's task without the work: the weights arrived; a few bytes go back."""
    return sum(a.nbytes for a in weights.values())


def one_unit(client, way, weights, where):
    from cnnx.parallel import transport
    options = dict(workers=[where], allow_other_workers=True, pure=False)
    started = time.perf_counter()
    if way == "in task":
        with transport.large_arguments():
            future = client.submit(received, weights, **options)
    else:
        placed = transport.place(client, weights, 20.0, [where], direct=way == "direct")
        future = client.submit(received, placed, **options)
    assert future.result() == sum(a.nbytes for a in weights.values())
    return time.perf_counter() - started


def protocol_by_payload():
    from distributed import Client, LocalCluster

    from cnnx.parallel import asynchronous, wire
    ways = ("scatter", "in task", "direct")
    results = {}
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as cluster, Client(cluster) as client:
        where = sorted(client.scheduler_info()["workers"])[0]
        for megabytes in PAYLOAD_MB:
            rng = np.random.default_rng(0)            # random: nothing to compress
            weights = wire.encode({"w": rng.standard_normal(int(megabytes * 1e6 / 4),
                                                            np.float32)}, copy=False)
            times = {way: [] for way in ways}
            for _ in range(REPS):
                for way in ways:
                    times[way].append(one_unit(client, way, weights, where))
            results[f"{megabytes}MB"] = {way: statistics.median(t) for way, t in times.items()}
    direct_wins = [mb for mb in PAYLOAD_MB
                   if results[f"{mb}MB"]["direct"] < results[f"{mb}MB"]["in task"]]
    return {"ms": {size: {way: t * 1e3 for way, t in r.items()} for size, r in results.items()},
            "direct_wins_from_mb": direct_wins[0] if direct_wins else None,
            "library_direct_above_mb": asynchronous.DIRECT_ABOVE_BYTES / 2**20,
            "loadavg": open("/proc/loadavg").read().split()[:3]}


def test_unit_protocol_by_payload(benchmark):
    result = benchmark.pedantic(protocol_by_payload, rounds=1, iterations=1)
    benchmark.extra_info.update(result)
    print(f"\nms from sending a unit's weights to its result (median of {REPS}, load "
          f"{' '.join(result['loadavg'])}):")
    for size, ms in result["ms"].items():
        print(f"  {size:>6}: " + ", ".join(f"{way} {t:.1f}" for way, t in ms.items())
              + f"; in task / scatter {ms['in task'] / ms['scatter']:.2f}, "
                f"direct / scatter {ms['direct'] / ms['scatter']:.2f}")
    print(f"  direct beats in-task from {result['direct_wins_from_mb']} MB; the library "
          f"switches above {result['library_direct_above_mb']:.0f} MiB")
    assert set(result["ms"]) == {f"{mb}MB" for mb in PAYLOAD_MB}


# ---------------------------------------------------------------- the whole driver

def test_units_per_second_against_baseline(benchmark, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("async"))
    parent = tempfile.mkdtemp(prefix="cnnx-baseline-")
    baseline = checkout_baseline(BASELINE, parent)
    try:
        results = benchmark.pedantic(compare_all, args=(baseline, folder), rounds=1,
                                     iterations=1)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", baseline],
                       capture_output=True)
        shutil.rmtree(parent, ignore_errors=True)
    benchmark.extra_info.update(results)
    for name, result in results.items():
        ms = lambda values: [round(v * 1e3) for v in values]  # noqa: E731
        print(f"\n{name}: {result['new']['units_per_s']:.2f} units/s vs "
              f"{result['old']['units_per_s']:.2f} at {BASELINE}; median of paired ratios "
              f"{result['ratio']:.2f}x {[round(r, 2) for r in result['pair_ratios']]}; "
              f"overhead per unit {result['overhead_ratio']:.2f}x of the baseline's "
              f"(ms, rounds: new {ms(result['new_overheads'])}, old "
              f"{ms(result['old_overheads'])}; units/s new "
              f"{[round(r, 2) for r in result['new_rounds']]}, old "
              f"{[round(r, 2) for r in result['old_rounds']]})")
    assert all(r["new"]["units"] == r["old"]["units"] for r in results.values())


def compare_all(baseline, folder):
    results = {}
    for net in NETS:
        for mode in MODES:
            news, olds = [], []
            for _ in range(ROUNDS):                 # alternating: the load comes and goes
                olds.append(run_in(baseline, net, mode, folder))
                news.append(run_in(ROOT, net, mode, folder))
            new, old = median_run(news), median_run(olds)
            pairs = [n["units_per_s"] / o["units_per_s"] for n, o in zip(news, olds)]
            results[f"{net}-{mode}"] = {
                "ratio": statistics.median(pairs), "pair_ratios": pairs, "new": new, "old": old,
                "overhead_ratio": (statistics.median(r["overhead_s"] for r in news)
                                   / statistics.median(r["overhead_s"] for r in olds)),
                "new_rounds": [r["units_per_s"] for r in news],
                "old_rounds": [r["units_per_s"] for r in olds],
                "new_overheads": [r["overhead_s"] for r in news],
                "old_overheads": [r["overhead_s"] for r in olds],
                "loadavg": open("/proc/loadavg").read().split()[:3]}
    return results


def median_run(runs):
    """The round with the median units/s (the upper one of an even count)."""
    return sorted(runs, key=lambda r: r["units_per_s"])[len(runs) // 2]


if __name__ == "__main__":
    print(json.dumps(measure(*sys.argv[1:4])))
