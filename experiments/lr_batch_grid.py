"""The glasses paper's learning rate x batch size grid, its input normalisation comparison
and its two architecture variations, reproduced with cnnx.

What the paper did (as issue 7 states it): trained INPUT -> [CONV -> RELU]*3 -> POOL ->
[FC -> RELU]*2 -> FC -> SOFTMAX with dropout on 80x80x3 photos of faces with and without
glasses, for every learning rate in {1e-1, 1e-2, 1e-3, 1e-4} and batch size in {16, 32, 64};
reported the train/test loss and accuracy of each cell as a table (rows learning rate,
columns batch size); compared standardised inputs with [0, 1] scaling and raw pixels (its
figures 1-2); and tried two variations of the network: more convolutional layers, and
doubled filters.

What this script does differently, and why:
- Data: the paper's photos are not available here, so the glasses grid runs on cnnx's
  synthetic faces with/without glasses (`cnnx.data.make_synthetic`, 80x80x3), and the same
  grid runs on scikit-image's bundled LFW subset (200 grey 25x25 faces vs non-faces), which
  is too easy for accuracy claims (a logistic regression scores 100%).
- Scale: under two thousand images and a few epochs per cell, so that the whole script
  (the 12 glasses cells of the 6.57 M-parameter network, the 12 cheap faces cells, two more
  normalisation runs and the two larger variations) fits in about 12 minutes on a 2-core
  CPU. The paper trained longer on more
  images; our absolute accuracies are therefore those of short runs.
- Optimizer: plain SGD (no momentum) at the grid's learning rates, so that the learning
  rate means the same thing in every cell; an adaptive optimizer would rescale the steps
  and blur the grid.
- Normalisation uses the training split's own per-channel mean and std (never the test
  split's).
- A cell whose loss turns NaN/inf is a result, not a crash: it is recorded as "diverged at
  epoch e step s".

    python experiments/lr_batch_grid.py            # full run into docs/experiments/
    python experiments/lr_batch_grid.py --quick    # small images, few images, 1 epoch
"""
import itertools
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

import cnnx  # noqa: E402
from cnnx import architectures, data, nn, optim  # noqa: E402

NAME = "lr_batch_grid"
LEARNING_RATES = (1e-1, 1e-2, 1e-3, 1e-4)
BATCH_SIZES = (16, 32, 64)
NORMALISATIONS = ("standardize", "scale", "none")
NORMALISATION_NAMES = {"standardize": "standardised (train mean/std)",
                       "scale": "scaled to [0, 1]", "none": "raw pixels 0-255"}
DATA_CACHE = os.path.join(common.REPO, "cnnx-runs", "experiment-data")

# Full: 1440 train / 360 test glasses images, 3 epochs per cell: the whole script (~20 trainings
# worth of the base network at ~150 images/s) fits in ~12 minutes on 2 idle cores.
# Quick: the same code paths on 32x32 images, a few images, one epoch.
FULL = {"glasses images": 1800, "glasses size": (80, 80), "glasses epochs": 3,
        "faces epochs": 20}
QUICK = {"glasses images": 200, "glasses size": (32, 32), "glasses epochs": 1,
         "faces epochs": 2}


# --------------------------------------------------------------------------------- data

def glasses_split(args, settings):
    """uint8 (x_train, y_train, x_test, y_test) of the synthetic glasses set, 80/20."""
    folder = args.out if args.quick else DATA_CACHE     # full runs reuse the store
    os.makedirs(folder, exist_ok=True)
    store = common.glasses_store(folder, settings["glasses images"], settings["glasses size"],
                                 args.seed)
    return common.read_split(store, 0.8, 0.2, seed=args.seed)


def faces_split(seed):
    """uint8 (x_train, y_train, x_test, y_test) of the bundled LFW subset, 80/20 stratified."""
    faces = data.load_faces()
    train, _, test = faces.split(0.8, 0.0, 0.2, seed=seed)
    return faces.images[train], faces.labels[train], faces.images[test], faces.labels[test]


def normalised(split, mode):
    """The split as float32 inputs; `standardize` uses the training images' statistics."""
    x_train, y_train, x_test, y_test = split
    mean, std = data.channel_stats(x_train)
    convert = lambda x: data.normalize(x, mode, mean=mean, std=std)
    return convert(x_train), y_train, convert(x_test), y_test


# ------------------------------------------------------------------------------ networks

def conv_relu(filters):
    return nn.Conv2D(filters, 3, padding="same", activation="relu")


def glasses_variant(filters, input_shape, n_classes, seed):
    """[CONV -> RELU]*len(filters) -> POOL -> [FC -> RELU -> DROPOUT]*2 -> FC -> SOFTMAX:
    the paper's network with other convolution stacks (its base is filters (16, 16, 32))."""
    return nn.Sequential([*(conv_relu(f) for f in filters), nn.MaxPool2D(2), nn.Flatten(),
                          nn.Dense(128, activation="relu"), nn.Dropout(0.5),
                          nn.Dense(128, activation="relu"), nn.Dropout(0.5),
                          nn.Dense(n_classes, activation="softmax")],
                         input_shape=input_shape, seed=seed)


# The paper's two variations. "More conv layers" adds two CONV -> RELU blocks of 32 filters
# before the pool (the same 40x40x32 reaches the FC layers, so only the convolutions change);
# "doubled filters" doubles every convolution's width (16, 16, 32 -> 32, 32, 64), which also
# doubles the first FC layer's input.
VARIANTS = {
    "base": ("[CONV -> RELU]*3 (16, 16, 32) -> POOL -> FC ...",
             lambda shape, classes, seed: architectures.glasses(shape, classes, seed)),
    "more conv layers": ("[CONV -> RELU]*5 (16, 16, 32, 32, 32) -> POOL -> FC ...",
                         lambda shape, classes, seed: glasses_variant((16, 16, 32, 32, 32),
                                                                      shape, classes, seed)),
    "doubled filters": ("[CONV -> RELU]*3 (32, 32, 64) -> POOL -> FC ...",
                        lambda shape, classes, seed: glasses_variant((32, 32, 64), shape,
                                                                     classes, seed)),
}


# ------------------------------------------------------------------------------ training

class TrainingRecorder(nn.Callback):
    """Per-epoch logs, per-batch training loss and per-epoch training seconds (validation
    excluded). Lives outside fit, so what was recorded survives a divergence."""

    def __init__(self, n_samples, batch_size):
        self.n_samples, self.batch_size = n_samples, batch_size
        self.epochs, self.batch_losses, self.train_seconds = [], [], []

    def on_epoch_begin(self, epoch, logs=None):
        self._started = self._last_batch = time.perf_counter()
        self._sum, self._seen = 0.0, 0

    def on_train_batch_end(self, step, logs=None):
        # fit logs the running mean over the epoch; its difference is this batch's loss
        seen = min((step + 1) * self.batch_size, self.n_samples)
        loss_sum = logs["loss"] * seen
        self.batch_losses.append((loss_sum - self._sum) / (seen - self._seen))
        self._sum, self._seen = loss_sum, seen
        self._last_batch = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.train_seconds.append(self._last_batch - self._started)
        self.epochs.append({key: float(value) for key, value in logs.items()
                            if key != "images/s"})


def train_once(build, inputs, learning_rate, batch_size, epochs, seed):
    """Train a fresh network with plain SGD; the result of one cell (diverged or not).

    Train loss/accuracy are what fit reports for the last epoch (the mean over its batches,
    dropout on), as Keras reports them; test loss/accuracy from evaluating the test split
    after the last epoch (fit's validation, dropout off).
    """
    x_train, y_train, x_test, y_test = inputs
    model = build(x_train.shape[1:], int(max(y_train.max(), y_test.max())) + 1, seed)
    model.compile(optim.get("sgd", learning_rate=learning_rate), metrics=["accuracy"])
    recorder = TrainingRecorder(len(x_train), batch_size)
    started = time.perf_counter()
    diverged_at = None
    try:
        # overflow on the way to a divergence is expected here: fit reports it as NaN loss
        with np.errstate(over="ignore", invalid="ignore"):
            model.fit(x_train, y_train, batch_size=batch_size, epochs=epochs,
                      validation_data=(x_test, y_test), callbacks=[recorder], verbose=0)
    except nn.NonFiniteLossError as error:
        diverged_at = {"epoch": error.epoch + 1, "step": error.step + 1}     # 1-based
    result = {"learning_rate": learning_rate, "batch_size": batch_size, "epochs": epochs,
              "status": "ok" if diverged_at is None else "diverged", "diverged_at": diverged_at,
              "parameters": int(model.count_params()),
              "seconds": time.perf_counter() - started,
              "train seconds per epoch": (float(np.mean(recorder.train_seconds))
                                          if recorder.train_seconds else None),
              "per epoch": recorder.epochs, "batch losses": recorder.batch_losses,
              "train loss": None, "train accuracy": None,
              "test loss": None, "test accuracy": None}
    if diverged_at is None:
        last = recorder.epochs[-1]
        result.update({"train loss": last["loss"], "train accuracy": last["accuracy"],
                       "test loss": last["val_loss"], "test accuracy": last["val_accuracy"]})
    return result


def accuracy_at_start(build, inputs, seed):
    """Test accuracy of the untrained network (every run starts from these weights)."""
    x_train, y_train, x_test, y_test = inputs
    model = build(x_train.shape[1:], int(max(y_train.max(), y_test.max())) + 1, seed)
    model.compile("sgd", metrics=["accuracy"])
    loss, accuracy = model.evaluate(x_test, y_test)
    return {"test loss": float(loss), "test accuracy": float(accuracy)}


def run_grid(label, inputs, epochs, seed):
    cells = []
    for learning_rate in LEARNING_RATES:
        for batch_size in BATCH_SIZES:
            cell = train_once(VARIANTS["base"][1], inputs, learning_rate, batch_size, epochs,
                              seed)
            cells.append(cell)
            print(f"{label}: lr {learning_rate:g} batch {batch_size}: {describe(cell)} "
                  f"({cell['seconds']:.0f} s)", flush=True)
    return cells


def describe(cell):
    if cell["status"] == "diverged":
        return diverged_text(cell)
    return (f"test accuracy {cell['test accuracy']:.3f}, test loss {cell['test loss']:.3f}, "
            f"train accuracy {cell['train accuracy']:.3f}")


def diverged_text(cell):
    return f"diverged at epoch {cell['diverged_at']['epoch']} step {cell['diverged_at']['step']}"


def best_cell(cells):
    """The finished cell with the highest test accuracy (ties: the lower test loss)."""
    finished = [c for c in cells if c["status"] == "ok"]
    if not finished:
        return None
    return max(finished, key=lambda c: (c["test accuracy"], -c["test loss"]))


def comparison_cells(cells):
    """Where the normalisations and variations are compared: the grid's best cell and the
    best cell one learning rate lower, so that a result does not hang on one learning rate
    (a single cell at the largest stable rate can sit at the edge of divergence)."""
    best = best_cell(cells)
    if best is None:
        return [(1e-2, 32)]
    chosen = [(best["learning_rate"], best["batch_size"])]
    lower = [rate for rate in LEARNING_RATES if rate < best["learning_rate"]]
    if lower:
        runner_up = best_cell([c for c in cells if c["learning_rate"] == max(lower)])
        if runner_up is not None:
            chosen.append((runner_up["learning_rate"], runner_up["batch_size"]))
    return chosen


def cell_name(cell):
    return f"lr {cell['learning_rate']:g}, batch {cell['batch_size']}"


# -------------------------------------------------------------------------------- tables

METRICS = (("test accuracy", "Test accuracy"), ("test loss", "Test loss"),
           ("train accuracy", "Train accuracy"), ("train loss", "Train loss"))


def grid_table(cells, metric):
    """The paper's layout: a row per learning rate, a column per batch size."""
    by_key = {(c["learning_rate"], c["batch_size"]): c for c in cells}
    rows = []
    for learning_rate in LEARNING_RATES:
        row = [f"{learning_rate:g}"]
        for batch_size in BATCH_SIZES:
            cell = by_key[(learning_rate, batch_size)]
            row.append(diverged_text(cell) if cell["status"] == "diverged"
                       else f"{cell[metric]:.3f}")
        rows.append(row)
    return common.markdown_table(["lr \\ batch", *(str(b) for b in BATCH_SIZES)], rows)


def grid_tables(cells):
    return "\n\n".join(f"**{title}**\n\n{grid_table(cells, metric)}" for metric, title in METRICS)


def csv_rows(grids):
    rows = []
    for dataset, cells in grids.items():
        for c in cells:
            rows.append([dataset, c["learning_rate"], c["batch_size"], c["epochs"], c["status"],
                         diverged_text(c) if c["status"] == "diverged" else "",
                         *(_rounded(c[metric]) for metric, _ in METRICS),
                         round(c["seconds"], 2)])
    return rows


CSV_HEADERS = ["dataset", "learning_rate", "batch_size", "epochs", "status", "diverged",
               *(metric.replace(" ", "_") for metric, _ in METRICS), "seconds"]


def _rounded(value, digits=4):
    return None if value is None else round(value, digits)


def normalisation_table(comparisons):
    rows = []
    for comparison, mode in itertools.product(comparisons, NORMALISATIONS):
        run = comparison["runs"][mode]
        rows.append([cell_name(comparison), NORMALISATION_NAMES[mode],
                     diverged_text(run) if run["status"] == "diverged" else "finished",
                     *(("-" if run[m] is None else f"{run[m]:.3f}") for m in
                       ("train loss", "train accuracy", "test loss", "test accuracy"))])
    return common.markdown_table(["cell", "inputs", "run", "train loss", "train accuracy",
                                  "test loss", "test accuracy"], rows)


def variants_table(comparisons):
    rows = []
    for comparison, (name, (description, _)) in itertools.product(comparisons,
                                                                   VARIANTS.items()):
        run = comparison["runs"][name]
        base_seconds = comparison["runs"]["base"]["train seconds per epoch"]
        per_epoch = run["train seconds per epoch"]
        rows.append([cell_name(comparison), name, description,
                     f"{run['parameters'] / 1e6:.2f} M",
                     diverged_text(run) if run["status"] == "diverged" else "finished",
                     *(("-" if run[m] is None else f"{run[m]:.3f}") for m in
                       ("train accuracy", "test loss", "test accuracy")),
                     "-" if per_epoch is None else f"{per_epoch:.1f}",
                     "-" if per_epoch is None or not base_seconds
                     else f"{per_epoch / base_seconds:.2f}x"])
    return common.markdown_table(["cell", "network", "convolutions", "parameters", "run",
                                  "train accuracy", "test loss", "test accuracy",
                                  "s / epoch (training)", "vs base"], rows)


# --------------------------------------------------------------------------------- plots

def plot_heatmaps(args, grids, titles):
    """Test accuracy over the grid, one panel per dataset, every cell annotated."""
    plt = common.pyplot()
    fig, axes = plt.subplots(1, len(grids), figsize=(5.6 * len(grids), 5.0), squeeze=False,
                             layout="constrained")
    image = None
    for ax, (dataset, cells) in zip(axes[0], grids.items()):
        by_key = {(c["learning_rate"], c["batch_size"]): c for c in cells}
        values = np.full((len(LEARNING_RATES), len(BATCH_SIZES)), np.nan)
        for i, learning_rate in enumerate(LEARNING_RATES):
            for j, batch_size in enumerate(BATCH_SIZES):
                cell = by_key[(learning_rate, batch_size)]
                if cell["status"] == "ok":
                    values[i, j] = cell["test accuracy"]
                    text = f"{cell['test accuracy']:.3f}"
                else:
                    text = (f"diverged\nepoch {cell['diverged_at']['epoch']} "
                            f"step {cell['diverged_at']['step']}")
                dark = np.isnan(values[i, j]) or values[i, j] < 0.75
                ax.text(j, i, text, ha="center", va="center", fontsize=10,
                        color="white" if dark and not np.isnan(values[i, j]) else "black")
        cmap = plt.get_cmap("viridis").copy()
        cmap.set_bad("lightgrey")            # diverged cells
        image = ax.imshow(np.ma.masked_invalid(values), cmap=cmap, vmin=0.5, vmax=1.0,
                          aspect="auto")
        ax.set_xticks(range(len(BATCH_SIZES)), [str(b) for b in BATCH_SIZES])
        ax.set_yticks(range(len(LEARNING_RATES)), [f"{lr:g}" for lr in LEARNING_RATES])
        ax.set_xlabel("batch size (images per SGD step)")
        ax.set_ylabel("learning rate (plain SGD)")
        ax.set_title(titles[dataset].replace(", ", "\n", 1), fontsize=10)
    fig.colorbar(image, ax=axes[0].tolist(), label="test accuracy (fraction; 0.5 = chance)")
    fig.suptitle("Learning rate x batch size: test accuracy of the glasses network "
                 "(grey: diverged)")
    return common.save_figure(fig, args, "_heatmap.png")


def plot_normalisation(args, comparisons, starts, n_train, title):
    """The paper's figures 1-2, one row per compared cell: training loss and test accuracy
    per epoch for standardised, [0, 1]-scaled and raw inputs on the same axes."""
    plt = common.pyplot()
    fig, axes = plt.subplots(len(comparisons), 2, figsize=(12, 4.2 * len(comparisons)),
                             squeeze=False)
    for comparison, (ax_loss, ax_accuracy) in zip(comparisons, axes):
        plot_normalisation_row(ax_loss, ax_accuracy, comparison, starts, n_train)
    handles, labels = axes[0][1].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=len(labels), fontsize=9)
    fig.suptitle(f"Input normalisation: {title}; plain SGD")
    fig.tight_layout(rect=(0, 0.05, 1, 1))
    return common.save_figure(fig, args, "_normalisation.png")


def smoothed_losses(run, n_train):
    """(epochs, per-batch training loss smoothed over ~1/10 epoch) of one run."""
    losses = np.asarray(run["batch losses"], np.float64)
    steps_per_epoch = -(-n_train // run["batch_size"])
    window = max(1, min(steps_per_epoch // 10, losses.size))
    if losses.size == 0:
        return np.empty(0), np.empty(0)
    smooth = np.convolve(losses, np.ones(window) / window, mode="valid")
    return (np.arange(smooth.size) + window) / steps_per_epoch, smooth


def plot_normalisation_row(ax_loss, ax_accuracy, comparison, starts, n_train):
    # colour, line style and marker differ, so that overlapping curves stay visible
    styles = {"standardize": ("tab:blue", "-", "o"), "scale": ("tab:orange", "--", "s"),
              "none": ("tab:red", ":", "^")}
    runs = comparison["runs"]
    curves = {mode: smoothed_losses(runs[mode], n_train) for mode in NORMALISATIONS}
    # the axis fits the finished runs: a diverging run's loss (up to ~1e30) would flatten
    # them; its points above the axis are drawn on the top edge instead
    finished = [y for mode, (_, y) in curves.items()
                if runs[mode]["status"] == "ok" and y.size]
    top = 2 * max(y.max() for y in finished) if finished else None
    for mode in NORMALISATIONS:
        run, (colour, line, marker) = runs[mode], styles[mode]
        x, y = curves[mode]
        notes = [diverged_text(run)] if run["status"] == "diverged" else []
        if top is not None and y.size and y.max() > top:
            notes.append(f"loss up to {y.max():.0e}, drawn on the top edge")
            y = np.minimum(y, top)
        if notes:
            ax_loss.text(0.02, 0.97 - 0.07 * NORMALISATIONS.index(mode),
                         f"{NORMALISATION_NAMES[mode]}: {'; '.join(notes)}",
                         transform=ax_loss.transAxes, fontsize=8, va="top", color=colour)
        ax_loss.plot(x, y, color=colour, linestyle=line, marker=marker if y.size < 5 else None,
                     label=NORMALISATION_NAMES[mode])
        epochs = np.arange(len(run["per epoch"]) + 1)
        accuracy = [starts[mode]["test accuracy"]] + [e["val_accuracy"] for e in run["per epoch"]]
        ax_accuracy.plot(epochs, accuracy, marker=marker, markersize=7, color=colour,
                         linestyle=line, label=NORMALISATION_NAMES[mode])
    ax_loss.set_yscale("log")
    if top is not None:
        ax_loss.set_ylim(top=top * 1.2)
    ax_loss.set_xlabel("epoch (passes over the training set)")
    ax_loss.set_ylabel("training loss (cross-entropy, log)\nmean over ~1/10 epoch, dropout on",
                       fontsize=9)
    ax_loss.set_title(f"{cell_name(comparison)}: training loss per batch", fontsize=10)
    ax_accuracy.set_xticks(range(max(len(run["per epoch"]) for run in runs.values()) + 1))
    ax_accuracy.set_xlabel("epoch (0 = before training)")
    ax_accuracy.set_ylabel("test accuracy (fraction)")
    ax_accuracy.set_ylim(0, 1.02)
    ax_accuracy.axhline(0.5, color="grey", linestyle=":", label="chance")
    ax_accuracy.set_title(f"{cell_name(comparison)}: test accuracy after each epoch",
                          fontsize=10)
    for ax in (ax_loss, ax_accuracy):
        ax.grid(alpha=0.3)


# ------------------------------------------------------------------------------ findings

def grid_findings(cells, n_test):
    """Sentences computed from one grid's numbers."""
    best = best_cell(cells)
    if best is None:
        return "Every cell diverged."
    half_width = 1.96 * np.sqrt(best["test accuracy"] * (1 - best["test accuracy"]) / n_test)
    sentences = [f"The best cell is lr {best['learning_rate']:g}, batch {best['batch_size']} "
                 f"(test accuracy {best['test accuracy']:.3f}, +/- {half_width:.3f} at 95% "
                 f"over {n_test} test images)."]
    close = [c for c in cells if c is not best and c["status"] == "ok"
             and c["test accuracy"] >= best["test accuracy"] - half_width]
    if close:
        sentences.append("Also within that interval of the best: "
                         + ", ".join(f"lr {c['learning_rate']:g} batch {c['batch_size']}"
                                     for c in close) + ".")
    by_rate = []
    for learning_rate in LEARNING_RATES:
        row = [c for c in cells if c["learning_rate"] == learning_rate]
        finished = [c["test accuracy"] for c in row if c["status"] == "ok"]
        diverged = [c["batch_size"] for c in row if c["status"] == "diverged"]
        text = (f"lr {learning_rate:g}: mean test accuracy {np.mean(finished):.3f}"
                if finished else f"lr {learning_rate:g}: no finished cell")
        if diverged:
            text += f" (diverged at batch {', '.join(map(str, diverged))})"
        by_rate.append(text)
    sentences.append("By learning rate (mean over the batch sizes that finished): "
                     + "; ".join(by_rate) + ".")
    row = {c["batch_size"]: c for c in cells if c["learning_rate"] == best["learning_rate"]
           and c["status"] == "ok"}
    if len(row) > 1:
        order = sorted(row, key=lambda b: (-row[b]["test accuracy"], b))
        accuracies = [row[b]["test accuracy"] for b in sorted(row)]
        trend = ""
        if all(a > b for a, b in zip(accuracies, accuracies[1:])):
            trend = ": the smaller the batch (the more SGD steps per epoch), the better"
        elif all(a < b for a, b in zip(accuracies, accuracies[1:])):
            trend = ": the larger the batch, the better"
        sentences.append(f"At lr {best['learning_rate']:g} the batch sizes rank "
                         + ranking([(f"batch {b}", row[b]["test accuracy"]) for b in order])
                         + trend + ".")
    return " ".join(sentences)


def ranking(labelled):
    """'a (0.900) > b (0.800) = c (0.800)' from (label, value) pairs sorted best first."""
    text = f"{labelled[0][0]} ({labelled[0][1]:.3f})"
    for (_, previous), (label, value) in zip(labelled, labelled[1:]):
        text += f" {'=' if round(value, 3) == round(previous, 3) else '>'} {label} ({value:.3f})"
    return text


def normalisation_findings(comparisons):
    return " ".join(f"At {cell_name(c)}: {normalisation_sentences(c['runs'])}"
                    for c in comparisons)


def normalisation_sentences(runs):
    finished = {m: r for m, r in runs.items() if r["status"] == "ok"}
    parts = []
    if finished:
        order = sorted(finished, key=lambda m: -finished[m]["test accuracy"])
        parts.append("test accuracy after training: " + ranking(
            [(NORMALISATION_NAMES[m], finished[m]["test accuracy"]) for m in order]) + ".")
    for mode, run in runs.items():
        if run["status"] == "diverged":
            parts.append(f"With {NORMALISATION_NAMES[mode]} the run {diverged_text(run)}.")
    return " ".join(parts)


def variant_findings(comparisons):
    return " ".join(f"At {cell_name(c)}: {variant_sentences(c['runs'])}" for c in comparisons)


def variant_sentences(variants):
    base = variants["base"]
    parts = []
    for name in VARIANTS:
        if name == "base":
            continue
        run = variants[name]
        if run["status"] == "diverged" or base["status"] == "diverged":
            parts.append(f"{name}: " + (diverged_text(run) if run["status"] == "diverged"
                                        else "the base diverged"))
            continue
        change = run["test accuracy"] - base["test accuracy"]
        slower = run["train seconds per epoch"] / base["train seconds per epoch"]
        parts.append(f"{name} {run['test accuracy']:.3f} test accuracy vs "
                     f"{base['test accuracy']:.3f} for the base ({change:+.3f}), "
                     f"{run['parameters'] / 1e6:.2f} M parameters, {slower:.1f}x the base's "
                     f"time per epoch")
    return "; ".join(parts) + "."


# ----------------------------------------------------------------------------------- main

def main(argv=None):
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv)
    settings = dict(QUICK if args.quick else FULL)
    threads = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") \
        else os.cpu_count()
    cnnx.set_num_threads(threads)          # all cores, whatever OMP_NUM_THREADS says
    clock = common.Clock()

    glasses = glasses_split(args, settings)
    faces = faces_split(args.seed)
    print(f"{NAME}: data ready ({clock.lap():.1f} s); {threads} kernel threads", flush=True)
    epochs = settings["glasses epochs"]

    # 1. the grid, on both sets, standardised inputs
    glasses_inputs = {mode: normalised(glasses, mode) for mode in NORMALISATIONS}
    grids = {"glasses": run_grid("glasses", glasses_inputs["standardize"], epochs, args.seed),
             "faces": run_grid("faces", normalised(faces, "standardize"),
                               settings["faces epochs"], args.seed)}
    seconds = {"grid": clock.lap()}

    # 2. normalisation at the compared cells; each standardised run is that grid cell
    cells = comparison_cells(grids["glasses"])
    grid_cell = {(c["learning_rate"], c["batch_size"]): c for c in grids["glasses"]}
    normalisation = [compare(cell, {"standardize": grid_cell[cell]}, NORMALISATIONS,
                             lambda mode: (VARIANTS["base"][1], glasses_inputs[mode]),
                             epochs, args.seed) for cell in cells]
    starts = {mode: accuracy_at_start(VARIANTS["base"][1], glasses_inputs[mode], args.seed)
              for mode in NORMALISATIONS}
    seconds["normalisation"] = clock.lap()

    # 3. the paper's two variations at the same cells, standardised inputs
    variants = [compare(cell, {"base": grid_cell[cell]}, VARIANTS,
                        lambda name: (VARIANTS[name][1], glasses_inputs["standardize"]),
                        epochs, args.seed) for cell in cells]
    seconds["variants"] = clock.lap()

    measured = {"grids": grids,
                "compared cells": [{"learning_rate": lr, "batch_size": b} for lr, b in cells],
                "normalisation": normalisation, "accuracy at start": starts,
                "variants": variants,
                "data": {name: {"train": len(split[0]), "test": len(split[2]),
                                "shape": list(split[0].shape[1:])}
                         for name, split in (("glasses", glasses), ("faces", faces))},
                "seconds": seconds}
    titles = dataset_titles(measured, settings)
    figures = {"heatmap": plot_heatmaps(args, grids, titles),
               "normalisation": plot_normalisation(args, normalisation, starts,
                                                   len(glasses[0]), titles["glasses"])}
    common.write_csv(args, CSV_HEADERS, csv_rows(grids))
    settings.update({"optimizer": "plain SGD", "learning rates": list(LEARNING_RATES),
                     "batch sizes": list(BATCH_SIZES),
                     "glasses size": "x".join(map(str, settings["glasses size"])),
                     **{f"{part} seconds": round(value, 1) for part, value in seconds.items()}})
    common.write_results(args, "Learning rate x batch size grid (the glasses paper)",
                         markdown_sections(args, measured, settings, titles, figures, threads),
                         measured, clock, settings, threads=threads)


def compare(cell, known, names, setup, epochs, seed):
    """{"learning_rate", "batch_size", "runs": {name: run}} at one cell: the runs in `known`
    are reused, the others trained with setup(name) -> (build, inputs)."""
    runs = dict(known)
    for name in names:
        if name not in runs:
            build, inputs = setup(name)
            runs[name] = train_once(build, inputs, *cell, epochs, seed)
            print(f"lr {cell[0]:g} batch {cell[1]}, {name}: {describe(runs[name])}", flush=True)
    return {"learning_rate": cell[0], "batch_size": cell[1],
            "runs": {name: runs[name] for name in names}}


def dataset_titles(measured, settings):
    def title(name, label, epochs):
        sizes = measured["data"][name]
        shape = "x".join(map(str, sizes["shape"]))
        return (f"{label}, {shape}, {sizes['train']} train / {sizes['test']} test, "
                f"{plural(epochs, 'epoch')}")
    return {"glasses": title("glasses", "Synthetic glasses", settings["glasses epochs"]),
            "faces": title("faces", "LFW faces vs non-faces", settings["faces epochs"])}


def markdown_sections(args, measured, settings, titles, figures, threads):
    grids, normalisation, variants = (measured["grids"], measured["normalisation"],
                                      measured["variants"])
    cells = " and ".join(cell_name(c) for c in measured["compared cells"])
    epochs = plural(settings["glasses epochs"], "epoch")
    shape = "x".join(map(str, measured["data"]["glasses"]["shape"]))
    command = f"python experiments/{NAME}.py{' --quick' if args.quick else ''}"
    faces_test = measured["data"]["faces"]["test"]
    return [
        f"The glasses paper's grid of learning rate x batch size, trained with cnnx "
        f"(`{command}`). Network: INPUT -> [CONV -> RELU]*3 -> POOL -> "
        f"[FC -> RELU -> DROPOUT 0.5]*2 -> FC -> SOFTMAX (`cnnx.architectures.glasses`, "
        f"{grids['glasses'][0]['parameters'] / 1e6:.2f} M parameters at {shape}). Optimizer: "
        f"plain SGD (no momentum, no decay) so that the learning rate means the same in every "
        f"cell. Every cell starts from the same weights (seed {args.seed}) and sees the "
        f"batches in the same order. Inputs standardised with the training split's "
        f"per-channel mean and std. Train loss and accuracy are what fit reports for the last "
        f"epoch (mean over its batches, dropout on); test loss and accuracy are measured "
        f"after training. \"Diverged at epoch e step s\" (1-based) means the loss became "
        f"NaN/inf there and the run stopped.",
        f"![Test accuracy over the learning rate x batch size grid]({figures['heatmap']})",
        f"## {titles['glasses']}",
        grid_tables(grids["glasses"]),
        "Measured: " + grid_findings(grids["glasses"], measured["data"]["glasses"]["test"]),
        f"## {titles['faces']}",
        f"This set is too easy for accuracy claims (a logistic regression scores 100% on "
        f"it; with {faces_test} test images one error is {100 / faces_test:.1f} points): read "
        f"it as a check that the grid runs end to end and of which cells diverge, not as a "
        f"measure of the network.",
        grid_tables(grids["faces"]),
        "Measured: " + grid_findings(grids["faces"], measured["data"]["faces"]["test"]),
        "## Input normalisation (the paper's figures 1-2)",
        f"The base network on the synthetic glasses at {cells} (the grid's best cell and the "
        f"best cell one learning rate lower), {epochs}, with inputs standardised, scaled "
        f"to [0, 1], or left as raw 0-255 pixels; same weights and order in all three. The "
        f"test loss clips each probability at 1e-7 (Keras' epsilon: at most 16.1 per image), "
        f"the training loss comes from the logits unclipped, so with raw pixels the two can "
        f"differ by orders of magnitude.",
        normalisation_table(normalisation),
        f"![Training loss and test accuracy per epoch for the three input normalisations]"
        f"({figures['normalisation']})",
        f"Measured: {normalisation_findings(normalisation)}",
        "## Architecture variations",
        f"The paper's two variations at the same cells ({cells}; standardised inputs, "
        f"{epochs}); seconds per epoch count training only (no evaluation), on {threads} "
        f"threads.",
        variants_table(variants),
        f"Measured: {variant_findings(variants)}",
        "## Paper vs cnnx",
        paper_vs_cnnx(grids, normalisation, variants, settings,
                      measured["data"]["glasses"]["train"]),
    ]


def plural(count, word):
    return f"{count} {word}{'' if count == 1 else 's'}"


def paper_vs_cnnx(grids, normalisation, variants, settings, n_train):
    best = best_cell(grids["glasses"])
    diverged = [c for c in grids["glasses"] if c["status"] == "diverged"]
    slowest = [c for c in grids["glasses"] if c["learning_rate"] == min(LEARNING_RATES)
               and c["status"] == "ok"]
    ours = []
    if best is not None:
        ours.append(f"the best cell was lr {best['learning_rate']:g} with batch "
                    f"{best['batch_size']} ({best['test accuracy']:.3f} test accuracy)")
    if diverged:
        rates = sorted({c["learning_rate"] for c in diverged}, reverse=True)
        ours.append(f"{len(diverged)} of {len(grids['glasses'])} cells diverged (at lr "
                    f"{', '.join(f'{rate:g}' for rate in rates)})")
    if slowest:
        ours.append(f"at lr {min(LEARNING_RATES):g} the network stayed at "
                    f"{max(c['test accuracy'] for c in slowest):.3f} test accuracy at best "
                    f"(chance: 0.5) "
                    f"after {plural(settings['glasses epochs'], 'epoch')}")
    tops = []
    for comparison in normalisation:
        finished = {m: r for m, r in comparison["runs"].items() if r["status"] == "ok"}
        if finished:
            top = max(finished, key=lambda m: finished[m]["test accuracy"])
            tops.append(f"{NORMALISATION_NAMES[top]} at {cell_name(comparison)}")
    if tops:
        ours.append("the input normalisation with the highest test accuracy was "
                    + " and ".join(tops))
    wins = [f"{name} at {cell_name(comparison)}" for comparison in variants
            for name, run in comparison["runs"].items()
            if name != "base" and run["status"] == "ok"
            and comparison["runs"]["base"]["status"] == "ok"
            and run["test accuracy"] > comparison["runs"]["base"]["test accuracy"]]
    n_comparisons = len(variants) * (len(VARIANTS) - 1)
    ours.append(f"a variation beat the base's test accuracy in {len(wins)} of "
                f"{n_comparisons} comparisons" + (f" ({', '.join(wins)})" if wins else ""))
    return (
        "The paper (as the issue describes it) reports train/test loss and accuracy over "
        "this grid, compares standardised, [0, 1]-scaled and raw inputs, and tries more "
        "convolutional layers and doubled filters; its photos, epochs and numbers are not "
        "available here, so we compare the shape of the results, not the figures. In cnnx, "
        + "; ".join(ours) + ". "
        f"Why the numbers differ from the paper's: drawn faces instead of photos (a "
        f"different task, and a small set: {n_train} training images), "
        f"{plural(settings['glasses epochs'], 'epoch')} per cell so that the whole grid fits "
        f"in ~12 minutes on a 2-core CPU (small learning rates are cut off long before they "
        f"could converge: the grid measures how far each cell gets in a fixed budget), and "
        f"plain SGD.")


if __name__ == "__main__":
    main()
