"""The comics paper's architecture variants: 3 depths x 4 variants on a grey binary task.

The paper (Ueno, Suenaga and Isahara 2017, "Classification of Two Comic Books based on
Convolutional Neural Networks", ADCAIJ 6(1)) told apart grey-scale panels of two four-scene
comics by the same artists with small CNNs: models with 2, 3 and 4 convolution layers, each
as a base network, with dropout, with dropout and BatchNormalization, and with an extra dense
layer, compared by their test loss and accuracy in one table, with training curves per model.

This script builds the same 3 x 4 grid with cnnx.nn layers and trains every cell in-process
with Sequential.fit, with one optimizer, learning rate, batch size, seed and epoch count for
all twelve.  What differs from the paper, and why:

- Data: the comic panels are not available here.  Fashion-MNIST reduced to two classes,
  T-shirt/top vs Shirt (the hardest pair of the ten), is a grey-scale binary task of the
  same kind that is far from trivial.  Images are 28x28 instead of the paper's panels, so
  every convolution pads ("same") to let four 2x2 poolings fit (28 -> 14 -> 7 -> 3 -> 1).
- Scale: 12,000 training images (of which a held-out part draws the validation curves),
  the official 2,000 test images of the two classes, and a few epochs, sized so that the
  twelve trainings fit in minutes on a 2-core CPU.
- Layers: model k is [CONV32 3x3 -> (BN) -> RELU -> POOL 2x2]*k -> FC128 -> FC2 softmax,
  cnnx.architectures.comics grown to k blocks.  "dropout" adds Dropout(0.25) after the
  convolution stack and Dropout(0.5) after each hidden dense layer (the rates of Keras'
  examples, which the paper's models followed in spirit); "dropout + BN" adds
  BatchNormalization between each convolution and its ReLU on top of that; "extra dense"
  is the base model with a second FC128.

    python experiments/comics_variants.py            # full run -> docs/experiments/
    python experiments/comics_variants.py --quick    # a small run of every path (CI)
"""
import os
import sys
import time

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "comics_variants"
CLASSES = (0, 6)                       # Fashion-MNIST T-shirt/top vs Shirt
CONV_LAYERS = (2, 3, 4)                # the paper's three models
FILTERS, HIDDEN = 32, 128              # cnnx.architectures.comics' widths
OPTIMIZER, LEARNING_RATE = "adam", 1e-3

# The four variants, as the switches each one turns on over the base model.
VARIANTS = {
    "base": dict(dropout=False, batchnorm=False, extra_dense=False),
    "dropout": dict(dropout=True, batchnorm=False, extra_dense=False),
    "dropout + BN": dict(dropout=True, batchnorm=True, extra_dense=False),
    "extra dense": dict(dropout=False, batchnorm=False, extra_dense=True),
}

FULL = dict(n_train=None, n_test=None, validation=2000, epochs=5, batch_size=32)
QUICK = dict(n_train=400, n_test=200, validation=100, epochs=2, batch_size=32)


def build_model(conv_layers, dropout, batchnorm, extra_dense, seed):
    """[CONV -> (BN) -> RELU -> POOL]*conv_layers -> FC128 (-> FC128) -> FC2 softmax."""
    from cnnx import nn

    layers = []
    for _ in range(conv_layers):
        if batchnorm:       # normalise the convolution's output before its nonlinearity
            layers += [nn.Conv2D(FILTERS, 3, padding="same"), nn.BatchNormalization(),
                       nn.ReLU()]
        else:
            layers.append(nn.Conv2D(FILTERS, 3, padding="same", activation="relu"))
        layers.append(nn.MaxPool2D(2))
    layers.append(nn.Flatten())
    if dropout:
        layers.append(nn.Dropout(0.25))
    for _ in range(2 if extra_dense else 1):
        layers.append(nn.Dense(HIDDEN, activation="relu"))
        if dropout:
            layers.append(nn.Dropout(0.5))
    layers.append(nn.Dense(len(CLASSES), activation="softmax"))
    return nn.Sequential(layers, input_shape=(28, 28, 1), seed=seed,
                         name=f"conv{conv_layers}")


def load_data(source, sizes, seed):
    """Train / validation (held out of the official train set at random) / official test."""
    x, y, x_test, y_test, class_names = common.fashion_mnist(
        source, classes=CLASSES, n_train=sizes["n_train"], n_test=sizes["n_test"], seed=seed)
    order = np.random.default_rng((seed, 3)).permutation(len(y))
    held, kept = np.sort(order[:sizes["validation"]]), np.sort(order[sizes["validation"]:])
    return (x[kept], y[kept]), (x[held], y[held]), (x_test, y_test), class_names


def train_one(conv_layers, variant, data, sizes, seed):
    """Fit one cell of the grid; its curves, test loss/accuracy, size and speed."""
    (x, y), validation, (x_test, y_test), _ = data
    model = build_model(conv_layers, seed=seed, **VARIANTS[variant])
    from cnnx import optim

    model.compile(optim.get(OPTIMIZER, learning_rate=LEARNING_RATE),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    started = time.perf_counter()
    history = model.fit(x, y, batch_size=sizes["batch_size"], epochs=sizes["epochs"],
                        validation_data=validation, verbose=0)
    seconds = time.perf_counter() - started
    test_loss, test_accuracy = model.evaluate(x_test, y_test)
    return {"conv layers": conv_layers, "variant": variant,
            "params": int(model.count_params()),
            "test loss": float(test_loss), "test accuracy": float(test_accuracy),
            "seconds per epoch": seconds / sizes["epochs"],
            "train images per second": len(x) * sizes["epochs"] / seconds,
            # other programs on the machine stretch wall times: keep the evidence beside them
            "load average (1 min)": os.getloadavg()[0],
            "history": {k: [float(v) for v in values]
                        for k, values in history.history.items()}}


def cell(runs, conv_layers, variant):
    return next(r for r in runs if r["conv layers"] == conv_layers and r["variant"] == variant)


# ------------------------------------------------------------------------------- tables

def grid_table(runs, key, fmt):
    """The paper's layout: one row per model, one column per variant."""
    headers = ["model"] + list(VARIANTS)
    rows = [[f"{k} conv layers"] + [fmt(cell(runs, k, v)[key]) for v in VARIANTS]
            for k in CONV_LAYERS]
    return common.markdown_table(headers, rows)


def seconds_table(runs):
    """Seconds per epoch per cell, with the machine's load average when that cell finished."""
    headers = ["model"] + list(VARIANTS)
    rows = [[f"{k} conv layers"] + [f"{cell(runs, k, v)['seconds per epoch']:.1f} s "
                                    f"(load {cell(runs, k, v)['load average (1 min)']:.1f})"
                                    for v in VARIANTS] for k in CONV_LAYERS]
    return common.markdown_table(headers, rows)


def load_note(runs):
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    loads = [r["load average (1 min)"] for r in runs]
    fastest = min(runs, key=lambda r: r["seconds per epoch"])
    # this run's own kernel threads make a load of about `cores`; more means other programs
    if max(loads) <= cores + 0.5:
        return (f"The 1-minute load average stayed at {max(loads):.1f} or below on {cores} "
                f"cores, about what this run's own kernel threads make: the seconds are those "
                f"of a machine to itself.")
    return (f"The machine was shared during this run: the 1-minute load average reached "
            f"{max(loads):.1f} on {cores} cores, so these seconds include waiting for the CPU "
            f"and compare cells only where the loads are alike. The fastest cell, "
            f"{fastest['conv layers']} conv layers {fastest['variant']}, took "
            f"{fastest['seconds per epoch']:.1f} s per epoch at load "
            f"{fastest['load average (1 min)']:.1f}.")


def csv_rows(runs):
    headers = ["conv layers", "variant", "params", "test loss", "test accuracy",
               "final train loss", "final train accuracy", "final validation loss",
               "final validation accuracy", "seconds per epoch",
               "load average (1 min)"]
    rows = [[r["conv layers"], r["variant"], r["params"], f"{r['test loss']:.4f}",
             f"{r['test accuracy']:.4f}", f"{r['history']['loss'][-1]:.4f}",
             f"{r['history']['accuracy'][-1]:.4f}", f"{r['history']['val_loss'][-1]:.4f}",
             f"{r['history']['val_accuracy'][-1]:.4f}", f"{r['seconds per epoch']:.2f}",
             f"{r['load average (1 min)']:.2f}"]
            for r in runs]
    return headers, rows


# -------------------------------------------------------------------------------- plots

def plot_curves(args, runs, conv_layers, sizes):
    """Loss and accuracy per epoch of the four variants of one model, train and validation."""
    plt = common.pyplot()
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(11, 4.4))
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for colour, variant in zip(colours, VARIANTS):
        history = cell(runs, conv_layers, variant)["history"]
        epochs = np.arange(1, len(history["loss"]) + 1)
        for ax, key in ((ax_loss, "loss"), (ax_acc, "accuracy")):
            ax.plot(epochs, history[key], color=colour, marker="o", linestyle="-")
            ax.plot(epochs, history[f"val_{key}"], color=colour, marker="s", linestyle="--")
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (mean per image)")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy (fraction correct)")
    for ax in (ax_loss, ax_acc):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    # one legend for colour (variant) and one for line style (train / validation)
    variant_keys = [Line2D([], [], color=c, lw=2, label=v) for c, v in zip(colours, VARIANTS)]
    split_keys = [Line2D([], [], color="grey", ls="-", marker="o", label="train"),
                  Line2D([], [], color="grey", ls="--", marker="s", label="validation")]
    ax_loss.legend(handles=variant_keys + split_keys, fontsize=8)
    ax_acc.legend(handles=variant_keys + split_keys, fontsize=8)
    fig.suptitle(f"{conv_layers} conv layers: training curves of the four variants "
                 f"(T-shirt/top vs Shirt, {sizes['train']} train / {sizes['val']} validation "
                 f"images)", fontsize=10)
    fig.tight_layout()
    return common.save_figure(fig, args, f"_conv{conv_layers}.png")


def plot_test_accuracy(args, runs, n_test):
    """Grouped bars: test accuracy of every model x variant."""
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 4.4))
    width = 0.8 / len(VARIANTS)
    positions = np.arange(len(CONV_LAYERS))
    accuracies = [r["test accuracy"] for r in runs]
    for i, variant in enumerate(VARIANTS):
        values = [cell(runs, k, variant)["test accuracy"] for k in CONV_LAYERS]
        bars = ax.bar(positions + (i - (len(VARIANTS) - 1) / 2) * width, values, width,
                      label=variant)
        ax.bar_label(bars, fmt="%.3f", fontsize=7, padding=1)
    # zoom on the measured range (bars from 0 would hide differences of a point or two)
    low = max(0.0, min(accuracies) - 0.05)
    ax.set(xticks=positions, xticklabels=[f"{k} conv layers" for k in CONV_LAYERS],
           ylim=(low, min(1.0, max(accuracies) + 0.04)), xlabel="model",
           ylabel=f"test accuracy (fraction correct)\naxis starts at {low:.2f}",
           title=f"Test accuracy, T-shirt/top vs Shirt ({n_test} test images)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(title="variant", fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1))
    fig.tight_layout()
    return common.save_figure(fig, args, "_test_accuracy.png")


# ----------------------------------------------------------------------------- findings

def findings(runs):
    """Sentences computed from the measured numbers (nothing here is decided in advance)."""
    best = max(runs, key=lambda r: r["test accuracy"])
    worst = min(runs, key=lambda r: r["test accuracy"])
    mean_by_variant = {v: np.mean([cell(runs, k, v)["test accuracy"] for k in CONV_LAYERS])
                       for v in VARIANTS}
    mean_by_model = {k: np.mean([cell(runs, k, v)["test accuracy"] for v in VARIANTS])
                     for k in CONV_LAYERS}
    best_variant = max(mean_by_variant, key=mean_by_variant.get)
    best_model = max(mean_by_model, key=mean_by_model.get)
    winners = {k: max(VARIANTS, key=lambda v: cell(runs, k, v)["test accuracy"])
               for k in CONV_LAYERS}
    gap = {v: np.mean([cell(runs, k, v)["history"]["accuracy"][-1]
                       - cell(runs, k, v)["history"]["val_accuracy"][-1] for k in CONV_LAYERS])
           for v in VARIANTS}

    def effect(variant, against):
        return mean_by_variant[variant] - mean_by_variant[against]

    lines = [
        f"The best cell is {best['conv layers']} conv layers, {best['variant']}: test "
        f"accuracy {best['test accuracy']:.4f} (loss {best['test loss']:.4f}); the worst is "
        f"{worst['conv layers']} conv layers, {worst['variant']} "
        f"({worst['test accuracy']:.4f}), a spread of "
        f"{100 * (best['test accuracy'] - worst['test accuracy']):.1f} points.",
        "Best variant per model: " + "; ".join(f"{k} conv layers: {winners[k]}"
                                              for k in CONV_LAYERS) + ".",
        f"Averaged over the three models, {best_variant} scores best "
        f"({mean_by_variant[best_variant]:.4f}); dropout changes test accuracy by "
        f"{100 * effect('dropout', 'base'):+.1f} points over base, BatchNorm on top of "
        f"dropout by {100 * effect('dropout + BN', 'dropout'):+.1f} points, and the extra "
        f"dense layer by {100 * effect('extra dense', 'base'):+.1f} points over base.",
        f"Averaged over the variants, the {best_model}-conv-layer model scores best "
        f"(" + ", ".join(f"{k} layers {mean_by_model[k]:.4f}" for k in CONV_LAYERS) + ").",
        "Final-epoch train minus validation accuracy (the overfitting gap, mean over models): "
        + ", ".join(f"{v} {100 * gap[v]:+.1f}" for v in VARIANTS) + " points.",
    ]
    return lines, {"mean test accuracy by variant": mean_by_variant,
                   "mean test accuracy by model": mean_by_model,
                   "best variant per model": winners, "overfitting gap": gap,
                   "best cell": [best["conv layers"], best["variant"]]}


def standard_error(runs, n_test):
    """The binomial standard error of a test accuracy at the grid's mean accuracy."""
    p = np.mean([r["test accuracy"] for r in runs])
    return float(np.sqrt(p * (1 - p) / n_test))


# --------------------------------------------------------------------------------- main

def main(argv=None):
    args = common.parse_args(NAME, __doc__.splitlines()[0], argv=argv)
    clock = common.Clock()
    sizes = dict(QUICK if args.quick else FULL)
    source = common.fashion_mnist_source(args.quick)
    data = load_data(source, sizes, args.seed)
    (x, _), (x_val, _), (x_test, _), class_names = data
    sizes.update(train=len(x), val=len(x_val), test=len(x_test))
    print(f"{NAME}: {sizes['train']} train, {sizes['val']} validation, {sizes['test']} test "
          f"images ({' vs '.join(class_names)}), {sizes['epochs']} epochs "
          f"({clock.lap():.1f} s to load)")

    runs = []
    for conv_layers in CONV_LAYERS:
        for variant in VARIANTS:
            run = train_one(conv_layers, variant, data, sizes, args.seed)
            runs.append(run)
            print(f"  {conv_layers} conv, {variant:<12} {run['params']:>7} params  "
                  f"test loss {run['test loss']:.4f} acc {run['test accuracy']:.4f}  "
                  f"{run['seconds per epoch']:.1f} s/epoch", flush=True)

    curve_files = [plot_curves(args, runs, k, sizes) for k in CONV_LAYERS]
    bar_file = plot_test_accuracy(args, runs, sizes["test"])
    common.write_csv(args, *csv_rows(runs))
    sentences, summary = findings(runs)

    sections = [
        f"Three models (2, 3 and 4 convolution layers) x four variants, trained on "
        f"Fashion-MNIST reduced to two grey classes ({' vs '.join(class_names)}): "
        f"{sizes['train']} training images, {sizes['val']} held out for the validation "
        f"curves, the official {sizes['test']} test images for the tables. "
        f"{OPTIMIZER.capitalize()} at learning rate {LEARNING_RATE:g}, batch "
        f"{sizes['batch_size']}, {sizes['epochs']} epochs and seed {args.seed} for all "
        f"twelve; the model after the last epoch is tested.",
        "## Test loss (cross-entropy, mean per image)",
        grid_table(runs, "test loss", lambda v: f"{v:.4f}"),
        "## Test accuracy",
        grid_table(runs, "test accuracy", lambda v: f"{v:.4f}"),
        "## Parameters and seconds per epoch",
        "Parameters as Keras counts them (BatchNorm's moving statistics included). Seconds "
        "per epoch are the fit's wall time divided by the epochs: one pass over the training "
        "images plus the validation pass.",
        grid_table(runs, "params", lambda v: f"{v:,}"),
        seconds_table(runs),
        load_note(runs),
        "## Paper vs cnnx",
        "The paper classified grey-scale panels of two four-scene comics by the same "
        "artists with small CNNs; its abstract concludes that a CNN classifies "
        "non-photographic grey-scale images efficiently. As cnnx's issue 7 gives it, the "
        "paper compared models of 2, 3 and 4 convolution layers, each as a base model, with "
        "dropout, with dropout and BatchNormalization, and with an extra dense layer, by "
        "test loss and accuracy. Its numbers are not copied here: compare this table's "
        "layout with the paper's. Here the data are "
        "Fashion-MNIST T-shirts vs shirts at 28x28 (not comic panels), trained for "
        f"{sizes['epochs']} epochs on a 2-core CPU, so absolute numbers differ; the "
        "comparison is between variants and depths under one fixed recipe, from a single "
        f"seed. One binomial standard error of a test accuracy near "
        f"{np.mean([r['test accuracy'] for r in runs]):.2f} on {sizes['test']} images is "
        f"{100 * standard_error(runs, sizes['test']):.1f} points: smaller differences "
        "between cells are not evidence of a better variant.",
        "What cnnx measured:",
        "\n".join(f"- {s}" for s in sentences),
        "## Plots",
        f"![Test accuracy of every model and variant]({bar_file})",
        *[f"![Training curves, {k} conv layers]({f})" for k, f in zip(CONV_LAYERS, curve_files)],
    ]
    settings = {"data": f"Fashion-MNIST classes {CLASSES} ({' vs '.join(class_names)})",
                "Fashion-MNIST files": source.description,
                "train / validation / test images":
                    f"{sizes['train']} / {sizes['val']} / {sizes['test']}",
                "optimizer": f"{OPTIMIZER}, learning rate {LEARNING_RATE:g}",
                "batch size": sizes["batch_size"], "epochs": sizes["epochs"],
                "conv filters / hidden units": f"{FILTERS} / {HIDDEN}"}
    results = {"runs": runs, "summary": summary, "findings": sentences,
               "variants": VARIANTS, "conv layers": list(CONV_LAYERS),
               "images": {"curves": curve_files, "test accuracy": bar_file}}
    common.write_results(args, f"Comics paper architecture variants on {' vs '.join(class_names)}",
                         sections, results, clock, settings)


if __name__ == "__main__":
    main()
