"""Communication of synchronous data-parallel training: MB moved per step and per epoch.

The paper (the glasses paper) trained its network on a cluster and reported the megabytes
sent across the network as the number of workers grew: data parallelism pays for its speed
with traffic, weights out to every worker and gradients back, every step.

This script measures the same quantity for cnnx's DaskTrainer (sync mode) on real
LocalClusters of 1, 2, 4 and 8 single-threaded worker processes on this one machine, for three
of the papers' networks (small, fashion, glasses; all at the glasses input, 80x80x3, 2
classes: 0.2 M, 2.7 M and 6.6 M parameters) and both wire formats (float32, bfloat16).
The traffic is loopback TCP rather than a real network; the bytes the trainer plans do not
depend on where the peers run. What Dask adds to the plan (e.g. fetching the model object
again after its active memory manager dropped a broadcast copy) is measured and reported
beside the model, from Dask's own transfer log, not modelled.

What is measured, per step (the first step of each run is left out: it opens connections):
  * on the wire: a counter wrapped around Dask's TCP `write` in the driver and in every worker
    counts the bytes each process writes on each connection; connections are classified by
    their two ends (driver <-> worker, worker <-> worker). Client <-> scheduler traffic (both
    in the driver process here) and the nannies' heartbeats are left out.
  * cnnx's own counters: DaskTrainer's history (bytes_out + bytes_in per step, and Dask's
    transfer_outgoing_bytes_total per epoch for worker <-> worker), for comparison.
and compared with an analytic model read off the trainer's code (P parameters, b bytes a
value on the wire, N workers, G = N virtual shards):
  * weights: the driver encodes them once and places them on ONE worker (P*b), and the other
    N-1 workers fetch them from it (N-1 more copies): N*P*b;
  * gradients: each shard returns P*b; a fixed pair-sum tree adds them in G-1 `sum_pair` tasks,
    each of which fetches at least one operand from another worker when the shards ran on
    different workers (G-1 copies), and the root sum goes back to the driver (one more): N*P*b.
  * together 2*N*P*b per step, 2*P*b of it between driver and workers.
Per epoch = MB per step x the steps of one epoch of 8000 training images (a 10,000-image
glasses set split 80/20; the convention of this table, any other size scales it) at a global
batch of 64 (125 steps): the global batch stays fixed as N grows, as in cnnx's sync mode (each
worker takes 64/N images).
"""
import collections
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from cnnx.parallel import wiretap  # noqa: E402

NAME = "communication"
IMAGE_SHAPE = (80, 80, 3)
GLOBAL_BATCH = 64
EPOCH_IMAGES = 8000                       # an epoch: 80% of a 10,000-image glasses set
STEPS_MEASURED = 4                        # after one warm-up step
CHUNK_SIZE = 8                            # small chunks: every worker count gets equal shards
DATA_FOLDER = os.path.join(common.REPO, "cnnx-runs", "experiment-data")
WIRES = ("float32", "bfloat16")
BYTES_PER_VALUE = {"float32": 4, "bfloat16": 2}


def add_arguments(parser):
    parser.add_argument("--workers", type=int, nargs="+", default=None,
                        help="worker counts (default 1 2 4 8; --quick: 1 2)")
    parser.add_argument("--models", nargs="+", default=None,
                        help="architectures (default small fashion glasses; --quick: small "
                             "fashion)")


# ------------------------------------------------------------------------ the wire tap
# cnnx.parallel.wiretap counts the bytes on Dask's sockets in every process; this runs in
# each worker too and reads what it fetched from other workers.

def count_fetches(dask_worker):
    """What this worker has fetched from other workers so far, by kind of data (the keys
    name it: the trainer scatters "Sequential-..." (the model object) and "WireArrays-..."
    (a step's weights); its tasks are "cnnx-...-grad-..." / "cnnx-...-sum-...")."""
    counts = collections.Counter()
    for transfer in dask_worker.transfer_incoming_log:
        for key in transfer["keys"]:
            key = str(key)
            kind = ("model" if key.startswith("Sequential-") else
                    "weights" if key.startswith(("WireArrays-", "dict-")) else
                    "gradients" if key.startswith("cnnx-") else "other")
            counts[kind] += 1
    return dict(counts)


def tap_snapshot(client):
    """Bytes written per connection by the driver and every worker, and the workers' fetches."""
    return {"bytes": {"driver": wiretap.read(), **client.run(wiretap.read)},
            "fetches": client.run(count_fetches)}


def fetches_between(before, after):
    """Fetches by all workers between two snapshots, by kind."""
    totals = collections.Counter()
    for worker, counts in after["fetches"].items():
        for kind, n in counts.items():
            totals[kind] += n - before["fetches"].get(worker, {}).get(kind, 0)
    return totals


def classify_bytes(before, after):
    """Bytes written between two snapshots, summed by the kind of connection."""
    before, after = before["bytes"], after["bytes"]
    ends = {process: {local for local, _ in counts} for process, counts in after.items()}
    owner = {address: process for process, locals_ in ends.items() for address in locals_}
    totals = collections.Counter()
    for process, counts in after.items():
        for (local, peer), n in counts.items():
            written = n - before.get(process, {}).get((local, peer), 0)
            other = owner.get(peer)
            if other is None or other == process:
                kind = "other"            # nannies, or client <-> scheduler inside the driver
            elif "driver" in (process, other):
                kind = "driver<->worker"
            else:
                kind = "worker<->worker"
            totals[kind] += written
    return totals


# ------------------------------------------------------------------------ measuring

def make_store(seed):
    """STEPS x 64 synthetic glasses faces in chunks of 8: every shard count divides them."""
    from cnnx import data

    n = (1 + STEPS_MEASURED) * GLOBAL_BATCH
    store = os.path.join(DATA_FOLDER, f"communication-glasses-{n}-c{CHUNK_SIZE}-s{seed}.zarr")
    data.make_synthetic(store, n, image_size=IMAGE_SHAPE[:2], seed=seed, chunk_size=CHUNK_SIZE)
    return data.open_dataset(store)


def build_model(name, seed):
    from cnnx import architectures

    model = architectures.build(name, IMAGE_SHAPE, n_classes=2, seed=seed)
    model.compile("sgd")
    return model


def measure(client, dataset, model_name, wire, seed):
    """One sync epoch of 1 + STEPS_MEASURED steps; bytes of the steps after the first."""
    from cnnx.parallel import DaskTrainer, Sync

    model = build_model(model_name, seed)
    snapshots = []
    # the papers' protocol (weights out, gradients back every step), which this study counts;
    # cnnx's default keeps replicas on the workers and sends no weights per step
    trainer = DaskTrainer(model, client, mode=Sync(weights="broadcast"), seed=seed,
                          wire_dtype=wire, progress=False, echo=lambda *_: None)
    history = trainer.fit(dataset, epochs=1, batch_size=GLOBAL_BATCH,
                          callbacks=[lambda _trainer, _record: snapshots.append(
                              tap_snapshot(client))])
    steps = len(snapshots) - 1
    assert steps == STEPS_MEASURED, f"expected {STEPS_MEASURED + 1} steps, ran {steps + 1}"
    wire_bytes = classify_bytes(snapshots[0], snapshots[-1])
    fetches = {kind: 0 for kind in ("weights", "gradients", "model")}
    fetches.update(fetches_between(snapshots[0], snapshots[-1]))
    epoch = history[0]
    counters = (epoch["bytes_out"] + epoch["bytes_in"]) / epoch["steps"]
    between = epoch["bytes_between_workers"] / epoch["steps"]
    return {"params": int(sum(w.size for w in model.get_weights().values())),
            "driver<->worker MB/step": wire_bytes["driver<->worker"] / steps / 1e6,
            "worker<->worker MB/step": wire_bytes["worker<->worker"] / steps / 1e6,
            "cnnx counters MB/step": (counters + between) / 1e6,
            "cnnx counters worker<->worker MB/step": between / 1e6,
            **{f"{kind} fetches/step": n / steps for kind, n in fetches.items()}}


def model_mb_per_step(params, workers, wire):
    """The analytic model: N*P*b for the weights + N*P*b for the gradients."""
    return 2 * workers * params * BYTES_PER_VALUE[wire] / 1e6


def run_all(args, dataset, worker_counts, model_names):
    from distributed import Client

    from cnnx.parallel.cluster import start_local_cluster

    wiretap.install()
    rows, amm_policies, object_mb = [], [], {}
    for n_workers in worker_counts:
        saved = dict(os.environ)
        with start_local_cluster(n_workers, dashboard=False) as local, Client(local) as client:
            os.environ.clear()
            os.environ.update(saved)      # the nanny writes OMP_NUM_THREADS=1 into ours
            client.run(wiretap.install)
            amm_policies = client.run_on_scheduler(active_memory_policies)
            for model_name in model_names:
                for wire in WIRES:
                    measured = measure(client, dataset, model_name, wire, args.seed)
                    row = {"model": model_name, "workers": n_workers, "wire": wire, **measured}
                    row["measured MB/step"] = (row["driver<->worker MB/step"]
                                               + row["worker<->worker MB/step"])
                    row["model MB/step"] = model_mb_per_step(row["params"], n_workers, wire)
                    row["model object MB"] = object_mb.setdefault(model_name,
                                                                  model_object_mb(model_name))
                    row["measured / model"] = row["measured MB/step"] / row["model MB/step"]
                    row["steps/epoch"] = math.ceil(EPOCH_IMAGES / GLOBAL_BATCH)
                    row["measured MB/epoch"] = row["measured MB/step"] * row["steps/epoch"]
                    row["model MB/epoch"] = row["model MB/step"] * row["steps/epoch"]
                    rows.append(row)
                    print(f"{NAME}: {model_name:8s} {n_workers} workers {wire:8s} "
                          f"{row['measured MB/step']:8.2f} MB/step measured, "
                          f"{row['model MB/step']:8.2f} model", flush=True)
    return rows, amm_policies


def active_memory_policies(dask_scheduler):
    """The policies of Dask's active memory manager on this scheduler (none when it is off)."""
    manager = dask_scheduler.extensions.get("amm")
    return sorted(type(policy).__name__ for policy in manager.policies) if manager else []


# ------------------------------------------------------------------------ reporting

TABLE = ["model", "params", "workers", "wire", "measured MB/step", "driver<->worker MB/step",
         "worker<->worker MB/step", "model MB/step", "measured / model",
         "fetches/step: weights / gradients / model (plan N-1 / N-1 / 0)",
         "cnnx counters MB/step", "measured MB/epoch"]


def table_rows(rows):
    return [[r["model"], r["params"], r["workers"], r["wire"]]
            + [round(r[c], 3) for c in TABLE[4:9]]
            + [" / ".join(f"{r[f'{kind} fetches/step']:.2f}".rstrip("0").rstrip(".")
                          for kind in ("weights", "gradients", "model")),
               round(r["cnnx counters MB/step"], 3),
               int(round(r["measured MB/epoch"]))]
            for r in rows]


def plot(args, rows, model_names):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(10, 5), layout="constrained")
    colors = dict(zip(model_names, plt.rcParams["axes.prop_cycle"].by_key()["color"]))
    for model_name in model_names:
        for wire, style in (("float32", "-"), ("bfloat16", "--")):
            mine = [r for r in rows if r["model"] == model_name and r["wire"] == wire]
            params = mine[0]["params"]
            ax.plot([r["workers"] for r in mine], [r["measured MB/epoch"] for r in mine],
                    style, marker="o", color=colors[model_name],
                    label=f"{model_name} ({params / 1e6:.2f} M params), {wire}")
            ax.plot([r["workers"] for r in mine], [r["model MB/epoch"] for r in mine],
                    linestyle="none", marker="x", color=colors[model_name], alpha=0.6)
    ax.plot([], [], linestyle="none", marker="x", color="grey", label="analytic model 2·N·P·b")
    workers = sorted({r["workers"] for r in rows})
    ax.set_xscale("log", base=2)
    ax.set_xticks(workers, [str(w) for w in workers])
    ax.set_yscale("log")
    ax.set_xlabel("number of workers N (single-threaded Dask worker processes)")
    ax.set_ylabel("MB sent across the network per epoch (log)")
    ax.set_title(f"Sync data parallelism: traffic per epoch\n({EPOCH_IMAGES} images, global "
                 f"batch {GLOBAL_BATCH}; solid float32, dashed bfloat16 wire)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.02, 1), handlelength=3.5)
    return common.save_figure(fig, args, "_mb_per_epoch.png")


def findings(rows, amm_policies):
    """Sentences computed from the measured rows."""
    lines = []
    ratios = [r["measured / model"] for r in rows]
    within = sum(abs(x - 1) <= 0.1 for x in ratios)
    worst = max(rows, key=lambda r: r["measured / model"])
    lines.append(f"Measured bytes per step are within 10% of the analytic model 2·N·P·b in "
                 f"{within} of {len(rows)} runs (measured/model {min(ratios):.2f}-"
                 f"{max(ratios):.2f}); the largest excess, {worst['measured / model']:.2f}x, is "
                 f"{worst['model']} on {worst['workers']} workers ({worst['wire']}).")
    excess = [r for r in rows if r["measured / model"] > 1.1]
    if excess:
        exact = [r for r in rows if r["measured / model"] <= 1.1 and r["workers"] > 1]
        refetch = np.mean([r["model fetches/step"] for r in excess])
        refetch_exact = np.mean([r["model fetches/step"] for r in exact]) if exact else 0.0
        explained = sum(explained_mb(r) for r in excess) / sum(
            r["measured MB/step"] - r["model MB/step"] for r in excess)
        runs = f"{len(excess)} run" + ("s" if len(excess) > 1 else "")
        sizes = ", ".join(f"{name} {mb:.1f} MB ({mb * 1e6 / (4 * params):.1f}x 4·P)"
                          for name, mb, params in dict.fromkeys(
                              (r["model"], r["model object MB"], r["params"]) for r in excess))
        lines.append(f"In the {runs} above the model, workers fetched the model object itself "
                     f"(the Sequential the trainer broadcasts once per fit) {refetch:.2f} times "
                     f"per step on average, against {refetch_exact:.2f} in the multi-worker runs "
                     f"that match the model; the plan has 0. The scheduler runs Dask's active "
                     f"memory manager ({', '.join(amm_policies) or 'no policy'}), which drops "
                     f"replicas that no queued task needs, so the broadcast copies do not stay "
                     f"on the workers; each fetch moves the pickled model, its float32 "
                     f"weights whatever the wire format ({sizes}). Those model fetches and any weight or gradient fetches beyond "
                     f"the plan's N-1 account for {explained:.0%} of the excess bytes.")
    halving = [b["measured MB/step"] / f["measured MB/step"] for f in rows for b in rows
               if f["wire"] == "float32" and b["wire"] == "bfloat16"
               and (f["model"], f["workers"]) == (b["model"], b["workers"])]
    planned = [b["model MB/step"] / f["model MB/step"] for f in rows for b in rows
               if f["wire"] == "float32" and b["wire"] == "bfloat16"
               and (f["model"], f["workers"]) == (b["model"], b["workers"])]
    lines.append(f"bfloat16 on the wire moves {np.median(halving):.2f}x the bytes of float32 "
                 f"(median; {min(halving):.2f}-{max(halving):.2f}x over the pairs, the model "
                 f"says {np.median(planned):.2f}x: every weight and gradient is 2 bytes "
                 f"instead of 4).")
    for model_name in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == model_name and r["wire"] == "float32"]
        low, high = mine[0], mine[-1]
        growth = high["measured MB/step"] / low["measured MB/step"]
        plural = "s" if low["workers"] > 1 else ""
        lines.append(f"{model_name} (float32): {low['measured MB/step']:.2f} MB/step on "
                     f"{low['workers']} worker{plural} -> {high['measured MB/step']:.2f} on "
                     f"{high['workers']} ({growth:.1f}x "
                     f"for {high['workers'] / low['workers']:.0f}x the workers), "
                     f"{high['measured MB/epoch'] / 1e3:.2f} GB per epoch on {high['workers']}.")
    under = [r["cnnx counters MB/step"] / r["measured MB/step"] for r in rows if r["workers"] > 1]
    if under:
        biggest = max(rows, key=lambda r: r["params"])
        estimate, true_bytes = dask_size_of_gradient(biggest["model"])
        sizing = (f"Dask sizes one {biggest['model']} GradientSum at {estimate / 1e6:.1f} MB "
                  f"(true {true_bytes / 1e6:.1f} MB)")
        if estimate < 0.5 * true_bytes:
            sizing += (", so the gradient transfers between workers go almost uncounted by "
                       "Dask's transfer counter, which the trainer adds")
        # with one worker nothing moves between workers; the driver gathers P*b per step
        alone = [r["cnnx counters worker<->worker MB/step"] / (r["model MB/step"] / 2)
                 for r in rows if r["workers"] == 1]
        counted_alone = ""
        if alone and max(alone) > 0.5:
            counted_alone = (f" With one worker, where nothing moves between workers, "
                             f"bytes_between_workers still reads {min(alone):.2f}-"
                             f"{max(alone):.2f}x the gradient the driver gathers each step: "
                             f"Dask's transfer counter also counts what a worker sends to the "
                             f"scheduler, so the driver's gather is counted twice.")
        lines.append(f"DaskTrainer's own counters (bytes_out + bytes_in + "
                     f"bytes_between_workers) report {min(under):.2f}-{max(under):.2f}x the "
                     f"bytes measured on the sockets with 2+ workers; {sizing}.{counted_alone}")
    return lines


def explained_mb(row):
    """MB/step that the fetches beyond the plan account for: model objects at the size a worker
    sends one (measured), extra weights and gradients at P·b."""
    plan = row["workers"] - 1
    extra = (max(0.0, row["weights fetches/step"] - plan)
             + max(0.0, row["gradients fetches/step"] - plan))
    return (row["model fetches/step"] * row["model object MB"]
            + extra * BYTES_PER_VALUE[row["wire"]] * row["params"] / 1e6)


def model_object_mb(model_name):
    """MB of the model object as a worker sends it to another: pickled after the worker ran a
    gradient with it (cnnx leaves the gradients and work buffers out of the pickle; the
    float32 weights go)."""
    import pickle

    model = build_model(model_name, 0)
    x = np.zeros((2, *IMAGE_SHAPE), np.float32)
    model.gradient(x, np.zeros(2, np.int64))
    return len(pickle.dumps(model, protocol=5)) / 1e6


def dask_size_of_gradient(model_name):
    """(Dask's size estimate, true bytes) of one float32 GradientSum of this model."""
    from dask.sizeof import sizeof

    from cnnx.nn import GradientSum

    weights = build_model(model_name, 0).get_weights()
    gradient = GradientSum(grads={k: np.zeros_like(v) for k, v in weights.items()},
                           n_samples=1, loss_sum=0.0)
    return int(sizeof(gradient)), int(sum(v.nbytes for v in weights.values()))


def markdown(rows, figure, lines):
    paper = ("**Paper vs cnnx.** The glasses paper reported the MB sent across the network by "
             "its distributed training as the number of workers grew (the issue: \"MB sent "
             "across the network\"). cnnx's synchronous trainer sends weights out and gradients "
             "back every step, so its plan sends 2·N·P·b per step (N workers, P parameters, b "
             "bytes a value), linear in the workers and the model size; measured here on "
             "loopback TCP:")
    bullets = "\n".join(f"- {line}" for line in lines)
    notes = (f"Measured: bytes written on Dask's TCP connections by the driver and the workers "
             f"over {STEPS_MEASURED} sync steps after a warm-up step, global batch "
             f"{GLOBAL_BATCH}, one virtual shard per worker. Per epoch = MB/step x "
             f"{math.ceil(EPOCH_IMAGES / GLOBAL_BATCH)} steps ({EPOCH_IMAGES} training images "
             f"at batch {GLOBAL_BATCH}); the global batch is fixed, so per-epoch traffic grows "
             f"with N like per-step traffic. Model: 2·N·P·b (weights placed on one worker and "
             f"fetched by the N-1 others; gradients summed in a pair-sum tree, N-1 transfers, "
             f"root back to the driver). Fetches: data the workers fetched from each other (Dask's "
             f"transfer log), by kind: a step's weights, gradient sums, and the model object "
             f"(broadcast once per fit, so 0 in the plan). \"cnnx counters\" "
             f"= DaskTrainer history (bytes_out + bytes_in + bytes_between_workers) per step.")
    return [paper, bullets, "## MB per step and per epoch",
            common.markdown_table(TABLE, table_rows(rows)), notes,
            f"![MB per epoch vs workers]({figure})"]


def main(argv=None):
    args = common.parse_args(NAME, "MB moved per step and per epoch by sync training vs "
                             "workers, model size and wire format", add_arguments, argv)
    clock = common.Clock()
    worker_counts = args.workers or ([1, 2] if args.quick else [1, 2, 4, 8])
    model_names = args.models or (["small", "fashion"] if args.quick
                                  else ["small", "fashion", "glasses"])
    dataset = make_store(args.seed)
    rows, amm_policies = run_all(args, dataset, worker_counts, model_names)
    figure = plot(args, rows, model_names)
    lines = findings(rows, amm_policies)
    common.write_csv(args, TABLE, table_rows(rows))
    settings = {"workers": worker_counts, "models": model_names,
                "image shape": "x".join(map(str, IMAGE_SHAPE)), "global batch": GLOBAL_BATCH,
                "steps measured": STEPS_MEASURED, "epoch images": EPOCH_IMAGES,
                "threads per worker": 1, "transport": "TCP over 127.0.0.1 (LocalCluster)",
                "Dask active memory manager": ", ".join(amm_policies) or "off"}
    common.write_results(args, "Communication: MB moved by synchronous training",
                         markdown(rows, figure, lines),
                         {"rows": rows, "findings": lines}, clock, settings, threads=1)


if __name__ == "__main__":
    main()
