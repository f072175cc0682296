"""Turn saved pytest-benchmark JSON into the README's tables and PNG plots.

    pytest benchmarks --benchmark-only --benchmark-json=bench.json
    python benchmarks/report.py bench.json --out docs/benchmarks

Writes <out>/results.md (one table per benchmark group: median time and every extra_info
figure) and, where the data is there, speedup.png (our kernels against NumPy and PyTorch),
training.png (images/s per network against PyTorch), scaling.png (efficiency and MB per
step against workers).
"""
import argparse
import json
import os
import sys
from collections import defaultdict

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from cnnx.report import pyplot, format_table, save_figure  # noqa: E402  (as cnnx runs)

SPEEDUP_KEYS = ("ratio", "speedup_vs_numpy", "speedup_vs_torch_best", "ratio_vs_torch_best")


def load(path):
    with open(path) as f:
        document = json.load(f)
    return document.get("machine_info", {}), document["benchmarks"]


def by_group(benchmarks):
    groups = defaultdict(list)
    for bench in benchmarks:
        groups[bench.get("group") or "ungrouped"].append(bench)
    return dict(sorted(groups.items()))


def _round(value):
    if isinstance(value, float):
        return float(f"{value:.4g}")
    return value


def group_table(benchmarks):
    keys = sorted({k for b in benchmarks for k, v in b.get("extra_info", {}).items()
                   if isinstance(v, (int, float, str))})
    rows = [[b["name"].split("[", 1)[-1].rstrip("]") if "[" in b["name"] else b["name"],
             b["stats"]["median"] * 1e3,
             *(_round(b.get("extra_info", {}).get(k, "")) for k in keys)]
            for b in benchmarks]
    return format_table(["case", "median ms", *keys], rows)


def markdown(machine, benchmarks):
    cpu = machine.get("cpu", {}).get("brand_raw", "unknown CPU")
    lines = [f"Machine: {cpu}, {machine.get('cpu', {}).get('count', '?')} cores, "
             f"Python {machine.get('python_version', '?')}. Medians of each benchmark's rounds.",
             ""]
    for group, members in by_group(benchmarks).items():
        lines += [f"### {group}", "", group_table(members), ""]
    return "\n".join(lines)


def plot_speedups(benchmarks, path):
    """One bar per benchmark that recorded a ratio against a yardstick (1.0 = parity)."""
    bars = []
    for b in benchmarks:
        info = b.get("extra_info", {})
        for key in SPEEDUP_KEYS:
            if isinstance(info.get(key), (int, float)):
                bars.append((f"{b.get('group')}: {b['name'].split('[', 1)[-1].rstrip(']')}",
                             key.replace("_", " "), info[key]))
    if not bars:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(9, 0.35 * len(bars) + 1.5))
    labels = [f"{name} ({key})" for name, key, _ in bars]
    ax.barh(range(len(bars)), [v for *_, v in bars], color="tab:blue")
    ax.axvline(1.0, color="black", lw=1, ls="--", label="parity")
    ax.set_yticks(range(len(bars)), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="speed-up (yardstick time / cnnx time)", title="cnnx against its yardsticks")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def plot_training(benchmarks, path):
    """Images/s per network and thread count: cnnx against PyTorch (best and default)."""
    # training steps only: the cases measured against PyTorch (data benchmarks report images/s too)
    cases = [b for b in benchmarks if "images_per_s" in b.get("extra_info", {})
             and any(k.startswith("torch_") for k in b["extra_info"])]
    if not cases:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(10, 4.5))
    names = [b["name"].split("[", 1)[-1].rstrip("]") for b in cases]
    x = range(len(cases))
    series = [("cnnx", "images_per_s"), ("PyTorch best", "torch_best_images_per_s"),
              ("PyTorch default", "torch_default_images_per_s")]
    width = 0.27
    for i, (label, key) in enumerate(series):
        values = [b["extra_info"].get(key, 0) or 0 for b in cases]
        if any(values):
            ax.bar([p + (i - 1) * width for p in x], values, width, label=label)
    ax.set_xticks(list(x), names, rotation=45, ha="right", fontsize=7)
    ax.set_yscale("log")
    ax.set(ylabel="images/s (training step, log scale)",
           title="Training throughput per network: cnnx vs PyTorch CPU")
    ax.grid(alpha=0.3, axis="y")
    ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def scaling_points(benchmarks):
    """{net: [(workers, efficiency, MB per step, kind)]} from either layout of extra_info:
    flat (workers, efficiency, mb_per_step) or the scaling suite's nested one_worker /
    two_workers records with efficiency_2 and modelled_efficiency_4/8."""
    nets = defaultdict(list)
    for b in benchmarks:
        info = b.get("extra_info", {})
        net = info.get("net") or b["name"].split("[", 1)[-1].rstrip("]")
        if "workers" in info:
            nets[net].append((info["workers"], info.get("efficiency"), info.get("mb_per_step"),
                              "measured"))
        elif isinstance(info.get("two_workers"), dict):
            for record, efficiency in ((info["one_worker"], 1.0),
                                       (info["two_workers"], info.get("efficiency_2"))):
                moved = sum(record.get(k, 0) for k in ("bytes_out_per_step", "bytes_in_per_step",
                                                       "bytes_between_workers_per_step"))
                nets[net].append((record["workers"], efficiency, moved / 1e6, "measured"))
            for workers in (4, 8):
                if f"modelled_efficiency_{workers}" in info:
                    nets[net].append((workers, info[f"modelled_efficiency_{workers}"], None,
                                      "modelled"))
        elif isinstance(info.get("two"), dict) and "efficiency_2" in info:
            nets[f"DDP {net}"] += [(1, 1.0, None, "measured"), (2, info["efficiency_2"], None,
                                                                 "measured")]
    return nets


def plot_scaling(benchmarks, path):
    """Scaling efficiency and MB per step against the number of workers, per network."""
    nets = scaling_points(benchmarks)
    if not nets:
        return False
    plt = pyplot()
    fig, (ax_eff, ax_mb) = plt.subplots(1, 2, figsize=(10, 4))
    for net, points in sorted(nets.items()):
        points.sort()
        measured = [p for p in points if p[3] == "measured" and p[1] is not None]
        line, = ax_eff.plot([p[0] for p in measured], [p[1] for p in measured], "o-",
                            label=f"{net} (measured)")
        modelled = [measured[-1]] + [p for p in points if p[3] == "modelled"]
        if len(modelled) > 1:
            ax_eff.plot([p[0] for p in modelled], [p[1] for p in modelled], "o--",
                        color=line.get_color(), alpha=0.6, label=f"{net} (modelled)")
        traffic = [p for p in points if p[2] is not None]
        if traffic:
            ax_mb.plot([p[0] for p in traffic], [p[2] for p in traffic], "o-", label=net)
    ax_eff.set(xlabel="workers", ylabel="scaling efficiency", title="Synchronous scaling",
               ylim=(0, 1.1))
    from matplotlib.ticker import MaxNLocator
    ax_mb.set(xlabel="workers", ylabel="MB moved per step", title="Traffic per step")
    for ax in (ax_eff, ax_mb):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.tight_layout()
    save_figure(fig, path)
    return True


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", nargs="+", help="pytest-benchmark JSON files")
    parser.add_argument("--out", default="docs/benchmarks", help="folder for results.md and PNGs")
    args = parser.parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    machine, benchmarks = {}, []
    for path in args.json:
        info, found = load(path)
        machine = machine or info
        benchmarks += found
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(machine, benchmarks))
    written = ["results.md"]
    for name, plot in [("speedup.png", plot_speedups), ("training.png", plot_training),
                       ("scaling.png", plot_scaling)]:
        if plot(benchmarks, os.path.join(args.out, name)):
            written.append(name)
    print(f"wrote {', '.join(written)} in {args.out}")


if __name__ == "__main__":
    main()
