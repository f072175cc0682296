"""What every experiment script shares: its command line, the data it reads, where and how
it writes tables, and the record of the machine a table was measured on.

Each script writes into one folder (docs/experiments/ for the published full runs; a
scratch folder for --quick) files named after itself:

    NAME.md     the table(s) as Markdown, with the machine, threads and wall time beside them
    NAME.csv    the main table as CSV
    NAME.json   every number measured, plus the run record (settings, machine, seconds)
    NAME_*.png  the plots
"""
import argparse
import csv
import datetime
import functools
import json
import os
import platform
import sys
import time
from typing import NamedTuple

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
PUBLISHED = os.path.join(REPO, "docs", "experiments")
QUICK_DEFAULT = os.path.join("cnnx-runs", "experiments-quick")
FASHION_MNIST_SAMPLE = os.path.join(HERE, "fashion_mnist_sample")


def parse_args(name, description, add_arguments=None, argv=None):
    """--quick, --out, --seed (+ the script's own flags); returns argparse.Namespace with
    `name` and `out` filled in (quick runs never overwrite the published files)."""
    parser = argparse.ArgumentParser(prog=f"experiments/{name}.py", description=description)
    parser.add_argument("--quick", action="store_true",
                        help="a small version that runs in a minute or two (what CI runs)")
    parser.add_argument("--out", default=None,
                        help=f"output folder (default: {os.path.relpath(PUBLISHED)} for a full "
                             f"run, {QUICK_DEFAULT} for --quick)")
    parser.add_argument("--seed", type=int, default=0, help="seed of data, weights and order")
    if add_arguments is not None:
        add_arguments(parser)
    args = parser.parse_args(argv)
    args.name = name
    args.out = args.out or (QUICK_DEFAULT if args.quick else PUBLISHED)
    os.makedirs(args.out, exist_ok=True)
    return args


def machine(threads=None):
    """Where and how a table was measured: host, CPU, cores, versions, kernel threads."""
    import cnnx

    return {"date": datetime.datetime.now().isoformat(timespec="seconds"),
            "host": platform.node(), "cpu": _cpu_model(),
            "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
            else os.cpu_count(),
            "python": platform.python_version(), "numpy": np.__version__,
            "cnnx": cnnx.__version__, "openmp": bool(cnnx.openmp_enabled()),
            "kernel threads": cnnx.get_num_threads() if threads is None else threads,
            "command": " ".join([os.path.relpath(sys.argv[0])] + sys.argv[1:])}


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


class Clock:
    """Wall time since creation; `lap()` the seconds since the previous lap."""

    def __init__(self):
        self.started = self.last = time.perf_counter()

    def lap(self):
        now = time.perf_counter()
        seconds, self.last = now - self.last, now
        return seconds

    @property
    def total(self):
        return time.perf_counter() - self.started


# ------------------------------------------------------------------------------ output

def path(args, suffix):
    """The output file NAME<suffix> of this script, e.g. path(args, "_curves.png")."""
    return os.path.join(args.out, f"{args.name}{suffix}")


def markdown_table(headers, rows):
    from cnnx import report

    return report.format_table(headers, rows)


def write_csv(args, headers, rows, suffix=".csv"):
    with open(path(args, suffix), "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(headers)
        writer.writerows(rows)


def write_results(args, title, sections, results, clock, settings, threads=None):
    """NAME.md (title, the sections in order, then the run record) and NAME.json.

    sections: Markdown strings (tables, notes, image links), joined by blank lines.
    results: everything measured, JSON-serialisable (numpy scalars are converted).
    """
    record = {"settings": settings, "machine": machine(threads),
              "wall time (s)": round(clock.total, 1), "quick": bool(args.quick),
              "seed": args.seed}
    run_lines = markdown_table(["", "value"], [(k, v) for k, v in
                                               {**settings, **record["machine"],
                                                "wall time (s)": record["wall time (s)"],
                                                "seed": args.seed}.items()])
    text = "\n\n".join([f"# {title}", *sections, "## How this was measured", run_lines]) + "\n"
    _atomic_write(path(args, ".md"), text)
    _atomic_write(path(args, ".json"),
                  json.dumps({"title": title, "results": results, **record}, indent=1,
                             default=_plain) + "\n")
    print(f"{args.name}: wrote {path(args, '.md')} and {path(args, '.json')} "
          f"({clock.total:.0f} s)")


def _plain(value):
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot write {type(value).__name__} to JSON")


def _atomic_write(target, text):
    temporary = f"{target}.tmp"
    with open(temporary, "w") as f:
        f.write(text)
    os.replace(temporary, target)


def pyplot():
    from cnnx import report

    return report.pyplot()


def save_figure(fig, args, suffix):
    from cnnx import report

    report.save_figure(fig, path(args, suffix))
    return os.path.basename(path(args, suffix))


# -------------------------------------------------------------------------------- data

class FashionSource(NamedTuple):
    """The folder of Fashion-MNIST IDX files a run reads, and how its tables name them."""
    directory: str
    description: str


@functools.lru_cache(maxsize=None)         # decided (and said) once per run
def fashion_mnist_source(quick):
    """Debian's full Fashion-MNIST when installed. Without it a --quick run reads the
    sample shipped in experiments/fashion_mnist_sample (and says so); a full run stops
    with how to install the full set."""
    from cnnx.data.datasets import FASHION_MNIST_DIR

    if os.path.isdir(FASHION_MNIST_DIR):
        return FashionSource(FASHION_MNIST_DIR, f"Fashion-MNIST ({FASHION_MNIST_DIR})")
    if not quick:
        sys.exit(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR} is missing): install "
                 "it with `sudo apt-get install dataset-fashion-mnist`, or run with --quick "
                 "to use the sample in experiments/fashion_mnist_sample")
    sample = ("the sample in experiments/fashion_mnist_sample (the first 6000 training and "
              "1000 test images)")
    print(f"Fashion-MNIST is not installed ({FASHION_MNIST_DIR}); this --quick run reads "
          f"{sample}", flush=True)
    return FashionSource(FASHION_MNIST_SAMPLE, f"Fashion-MNIST, {sample}")


def fashion_mnist(source, classes=None, n_train=None, n_test=None, seed=0):
    """Fashion-MNIST's official train/test split as standardised float32 NHWC arrays.

    source: a FashionSource (fashion_mnist_source(args.quick)). classes: keep only these
        labels, renumbered 0..k-1 in the order given (e.g. (0, 6): T-shirt/top vs Shirt,
        the hardest pair). n_train/n_test: a stratified-by-chance subset of that size,
        drawn with `seed` (None, or more than there are: all). Standardised with the
        training subset's per-channel mean and std.
    Returns (x_train, y_train, x_test, y_test, class_names).
    """
    from cnnx import data

    train, test = data.load_fashion_mnist(source.directory)
    names = list(train.class_names)
    parts = []
    for part, n, salt in ((train, n_train, 1), (test, n_test, 2)):
        images, labels = part.images, part.labels
        if classes is not None:
            keep = np.isin(labels, classes)
            images, labels = images[keep], labels[keep]
            labels = _renumber(labels, classes)
        if n is not None and n < len(labels):
            pick = np.sort(np.random.default_rng((seed, salt)).permutation(len(labels))[:n])
            images, labels = images[pick], labels[pick]
        parts.append((images, labels))
    (x_train, y_train), (x_test, y_test) = parts
    mean, std = _channel_stats(x_train)
    # divides by std, where data.normalize multiplies by 1/std: the published tables came
    # from this rounding, so it stays to keep them reproducible bit for bit
    standardise = lambda x: ((x.astype(np.float32) - mean) / std).astype(np.float32)
    class_names = names if classes is None else [names[c] for c in classes]
    return standardise(x_train), y_train, standardise(x_test), y_test, class_names


def _renumber(labels, classes):
    lookup = np.full(max(classes) + 1, -1, np.int64)
    lookup[list(classes)] = np.arange(len(classes))
    return lookup[labels]


def _channel_stats(images):
    from cnnx import data

    mean, std = data.channel_stats(images)
    return mean.astype(np.float32), np.maximum(std, 1e-6).astype(np.float32)


def glasses_store(folder, n, image_size=(80, 80), seed=0):
    """A Zarr store of `n` synthetic faces with/without glasses in `folder` (made once)."""
    from cnnx import data

    store = os.path.join(folder, f"glasses-{n}-{image_size[0]}x{image_size[1]}-s{seed}.zarr")
    data.make_synthetic(store, n, image_size=image_size, seed=seed)
    return data.open_dataset(store)


def read_split(dataset, train=0.8, test=0.2, seed=0):
    """(uint8 train images, labels, uint8 test images, labels) of a store, stratified."""
    train_idx, _, test_idx = dataset.split(train, 0.0, test, seed=seed)
    x_train, y_train = dataset.read(np.sort(train_idx))
    x_test, y_test = dataset.read(np.sort(test_idx))
    return x_train, y_train, x_test, y_test
