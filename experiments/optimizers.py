"""The optimizer study, and LARS against SGD at large batch, on Fashion-MNIST.

Part 1 (the optimizer study): one CNN (`cnnx.architectures.fashion`, the same seed, so the
same initial weights), trained with every optimizer cnnx has at its conventional learning
rate (the Keras defaults where Keras has one), on the same batches in the same order. It
records the training loss of every step and the test loss and accuracy after every epoch,
and plots all the training-loss curves on one figure, as optimizer comparisons usually do
(e.g. the figures of Kingma & Ba 2015, "Adam").

Part 2 (LARS, You, Gitman & Ginsburg 2017, "Large Batch Training of Convolutional
Networks"): the paper trained AlexNet, AlexNet-BN and ResNet-50 on ImageNet for a fixed
number of epochs at batch sizes up to 8K (AlexNet) and 32K (ResNet-50). Plain SGD with the
learning rate scaled linearly with the batch and a warm-up could not keep its small-batch
accuracy there; with layer-wise adaptive rate scaling (LARS: each layer's step is scaled
by eta * ||w|| / ||g||) plus warm-up the accuracy stayed close to the small-batch baseline.
Here the same CNN is trained with SGD+momentum and with LARS at batch sizes from 256 to
8192 for the same number of epochs (so a large batch takes fewer steps). A large batch is
the sum of micro-batch GradientSums, applied once: the same arithmetic as one big batch,
at the memory of a small one. Both optimizers use the paper's learning-rate policy: a
linear warm-up, then polynomial decay of power 2 to zero, with the peak rate scaled
linearly with the batch size.

What differs from the papers, and why: Fashion-MNIST (28x28 grey, 10 classes) instead of
ImageNet and a 225k-parameter CNN instead of AlexNet/ResNet-50, because this runs on a
2-core CPU in minutes; for the same reason part 1 trains on a subset of the 60,000
training images, and part 2 trains for only a couple of epochs, so the largest batches take
a few dozen steps, where the paper's took thousands.
"""
import math
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

from cnnx import architectures, optim  # noqa: E402

NAME = "optimizers"
TITLE = "Optimizers on Fashion-MNIST, and LARS vs SGD at large batch"

# Part 1: every optimizer cnnx has, at its conventional learning rate (Keras' defaults;
# Adadelta at the paper's 1.0 as cnnx defaults, Adagrad at the 0.01 of Keras <= 2.2).
# LARS has no Keras default: it gets part 2's rule (LARS_BASE_LR per 256 images, scaled
# linearly to the batch size).
STUDY = [("sgd", {"learning_rate": 0.01}),
         ("momentum", {"learning_rate": 0.01, "momentum": 0.9}),
         ("nesterov", {"learning_rate": 0.01, "momentum": 0.9}),
         ("adagrad", {"learning_rate": 0.01}),
         ("adadelta", {"learning_rate": 1.0}),
         ("rmsprop", {"learning_rate": 0.001}),
         ("adam", {"learning_rate": 0.001}),
         ("adamax", {"learning_rate": 0.002}),
         ("nadam", {"learning_rate": 0.001}),
         ("lars", {})]                                   # learning_rate filled in below

# Part 2: peak learning rates per 256 images, scaled linearly with the batch size.
# The bases were picked by hand from a few short probe runs, not searched by this script:
# SGD 0.05 and 0.1 per 256 both trained well at batch 256 (the smaller is the safer start
# for the linear rule); LARS 2 per 256 trained at batch 256 but its linearly scaled 64 at
# batch 8192 did clearly worse than 32, so LARS starts from 1 per 256.
SGD_BASE_LR = 0.05            # SGD + momentum 0.9
LARS_BASE_LR = 1.0            # LARS: momentum 0.9, weight decay 5e-4, eta 0.001 (the paper's)
LARS_OPTIONS = {"momentum": 0.9, "weight_decay": 5e-4, "eta": 0.001}
BASE_BATCH = 256
WARMUP_FRACTION = 0.25        # of the run's steps, linear from lr / warm-up steps to lr
MICRO_BATCH = 256             # large batches are sums of micro-batches of this size

SMOOTHING = 25                # steps in the moving average of the plotted training loss


def add_arguments(parser):
    parser.add_argument("--threads", type=int, default=None,
                        help="kernel threads (default: cnnx's own choice)")


def sizes(quick):
    """How much data and how many epochs each part uses (quick: everything, tiny)."""
    if quick:
        return {"study_train": 1024, "study_epochs": 2, "study_batch": 32,
                "large_train": 2048, "large_epochs": 2, "test": 1000,
                "batch_sizes": [256, 1024, 2048]}
    return {"study_train": 12000, "study_epochs": 3, "study_batch": 32,
            "large_train": 60000, "large_epochs": 2, "test": None,
            "batch_sizes": [256, 1024, 2048, 4096, 8192]}


# ---------------------------------------------------------------------------- training

def new_model(seed, optimizer):
    model = architectures.fashion(seed=seed)
    model.compile(optimizer, metrics=["accuracy"])
    return model


def batch_order(n, seed, epoch):
    """The same shuffled order for every optimizer and batch size of one epoch."""
    return np.random.default_rng((seed, 1, epoch)).permutation(n)


def train_step(model, x, y, index, key):
    """One optimizer step on the images `index`: the gradient summed over micro-batches
    (identical maths to one big batch, in bounded memory), then the model's own update.
    Returns the step's mean training loss; a non-finite one leaves the weights alone."""
    total = None
    for part, begin in enumerate(range(0, len(index), MICRO_BATCH)):
        micro = index[begin : begin + MICRO_BATCH]
        result = model.gradient(x[micro], y[micro], key=(*key, part))
        total = result if total is None else total + result
    loss = total.loss_sum / total.n_samples
    if np.isfinite(loss):
        model.apply_gradient_sum(total)
    return loss


def train(model, data, batch_size, epochs, seed, on_epoch_end=None):
    """Train for `epochs` over data = (x, y, x_test, y_test). Returns the per-step training
    losses and whether the loss diverged (training stops at the first non-finite loss)."""
    x, y = data[0], data[1]
    losses, step = [], 0
    for epoch in range(epochs):
        order = batch_order(len(x), seed, epoch)
        for begin in range(0, len(x), batch_size):
            loss = train_step(model, x, y, order[begin : begin + batch_size], (epoch, step))
            losses.append(float(loss))
            step += 1
            if not np.isfinite(loss):
                return losses, True
        if on_epoch_end is not None:
            on_epoch_end(epoch)
    return losses, False


def test(model, data):
    """(test loss or None when it is not finite, test accuracy) on the test set."""
    loss, accuracy = model.evaluate(data[2], data[3])
    return (float(loss) if np.isfinite(loss) else None), float(accuracy)


def moving_average(values, window):
    """Mean of the last `window` values at each step (fewer at the start)."""
    sums = np.cumsum(np.insert(np.asarray(values, np.float64), 0, 0.0))
    ends = np.arange(1, len(values) + 1)
    starts = np.maximum(ends - window, 0)
    return (sums[ends] - sums[starts]) / (ends - starts)


# ------------------------------------------------------------------ part 1: the study

def study_options(name, options, batch_size):
    if name == "lars":
        return {"learning_rate": LARS_BASE_LR * batch_size / BASE_BATCH, **LARS_OPTIONS}
    return dict(options)


def run_study(data, size, seed):
    runs = []
    for name, options in STUDY:
        options = study_options(name, options, size["study_batch"])
        model = new_model(seed, optim.get(name, **options))
        clock, epochs = common.Clock(), []

        def evaluate(epoch):
            loss, accuracy = test(model, data)
            epochs.append({"epoch": epoch + 1, "test loss": loss, "test accuracy": accuracy})

        losses, diverged = train(model, data, size["study_batch"], size["study_epochs"],
                                 seed, evaluate)
        seconds = clock.total
        if diverged:
            evaluate(len(epochs))
        final = moving_average(losses, SMOOTHING)[-1]
        runs.append({"optimizer": name, "options": options, "step losses": losses,
                     "final train loss": float(final) if np.isfinite(final) else None,
                     "epochs": epochs, "diverged": diverged,
                     "test loss": epochs[-1]["test loss"],
                     "test accuracy": epochs[-1]["test accuracy"],
                     "seconds": round(seconds, 1)})
        print(f"  {name:9s} lr {options['learning_rate']:<6g} test accuracy "
              f"{epochs[-1]['test accuracy']:.4f}  ({seconds:.0f} s)", flush=True)
    return runs


def study_rows(runs):
    return [(run["optimizer"], _lr_text(run["options"]), _number(run["final train loss"]),
             _number(run["test loss"]), round(run["test accuracy"], 4), run["seconds"])
            for run in runs]


STUDY_HEADERS = ["optimizer", "learning rate", "final train loss (moving avg)", "test loss",
                 "test accuracy", "seconds"]


def _lr_text(options):
    extra = "".join(f", {k} {v}" for k, v in options.items() if k != "learning_rate")
    return f"{options['learning_rate']:g}{extra}"


def _number(value, digits=4):
    return "diverged" if value is None else round(value, digits)


def plot_study_losses(args, runs, size):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(9, 5.5))
    for run in runs:
        losses = np.asarray(run["step losses"])
        finite = np.isfinite(losses)
        smooth = moving_average(losses[finite], SMOOTHING)
        images = (np.arange(len(losses))[finite] + 1) * size["study_batch"]
        lr = run["options"]["learning_rate"]
        ax.plot(images, smooth, label=f"{run['optimizer']} (lr {lr:g})")
    ax.set_yscale("log")
    ax.set(title=f"Training loss, fashion CNN, batch {size['study_batch']} "
                 f"(moving average of {SMOOTHING} steps)",
           xlabel="training images seen", ylabel="cross-entropy (mean per image, log scale)")
    ax.grid(alpha=0.3, which="both")
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    return common.save_figure(fig, args, "_loss.png")


def plot_study_accuracy(args, runs):
    plt = common.pyplot()
    fig, ax = plt.subplots(figsize=(8, 5))
    for run in runs:
        epochs = [e["epoch"] for e in run["epochs"]]
        ax.plot(epochs, [e["test accuracy"] for e in run["epochs"]], marker="o",
                label=run["optimizer"])
    ax.set(title="Test accuracy after each epoch (official test set)", xlabel="epoch",
           ylabel="test accuracy (fraction correct)")
    ax.set_xticks(sorted({e["epoch"] for run in runs for e in run["epochs"]}))
    ax.grid(alpha=0.3)
    ax.legend(ncol=2, fontsize="small")
    fig.tight_layout()
    return common.save_figure(fig, args, "_test_accuracy.png")


def study_findings(runs):
    ranked = sorted(runs, key=lambda run: -run["test accuracy"])
    best, worst = ranked[0], ranked[-1]
    finished = [run for run in runs if run["final train loss"] is not None]
    lowest = min(finished, key=lambda run: run["final train loss"])
    diverged = [run["optimizer"] for run in runs if run["diverged"]]
    text = (f"Measured: after the last epoch {best['optimizer']} has the best test accuracy "
            f"({best['test accuracy']:.4f}) and {worst['optimizer']} the worst "
            f"({worst['test accuracy']:.4f}); {lowest['optimizer']} ends with the lowest "
            f"training loss ({lowest['final train loss']:.4f}). Ranked by test accuracy: "
            + ", ".join(run["optimizer"] for run in ranked) + ".")
    if diverged:
        text += f" Diverged (non-finite loss): {', '.join(diverged)}."
    return text


# ------------------------------------------------------------ part 2: LARS at large batch

class WarmupPolynomial:
    """The paper's policy: linear warm-up to `peak` over `warmup` steps, then
    peak * (1 - t / T)^2 over the remaining T steps (a callable step -> lr for cnnx.optim)."""

    def __init__(self, peak, total_steps, warmup):
        self.peak, self.total, self.warmup = float(peak), int(total_steps), int(warmup)

    def __call__(self, step):
        if step < self.warmup:
            return self.peak * (step + 1) / self.warmup
        decay_steps = max(self.total - self.warmup, 1)
        return self.peak * (1 - min(step - self.warmup, decay_steps) / decay_steps) ** 2


def large_batch_optimizer(name, batch_size, total_steps):
    base = SGD_BASE_LR if name == "sgd" else LARS_BASE_LR
    peak = base * batch_size / BASE_BATCH
    lr = WarmupPolynomial(peak, total_steps, max(1, round(WARMUP_FRACTION * total_steps)))
    if name == "sgd":
        return optim.get("momentum", learning_rate=lr, momentum=0.9), peak
    return optim.get("lars", learning_rate=lr, **LARS_OPTIONS), peak


def run_large_batch(data, size, seed):
    runs = []
    n = len(data[0])
    for batch_size in size["batch_sizes"]:
        steps = math.ceil(n / batch_size) * size["large_epochs"]
        for name in ("sgd", "lars"):
            optimizer, peak = large_batch_optimizer(name, batch_size, steps)
            model, clock = new_model(seed, optimizer), common.Clock()
            losses, diverged = train(model, data, batch_size, size["large_epochs"], seed)
            loss, accuracy = test(model, data)
            final = losses[-1] if np.isfinite(losses[-1]) else None
            runs.append({"batch size": batch_size, "optimizer": name, "peak lr": peak,
                         "steps": steps, "step losses": losses, "diverged": diverged,
                         "final train loss": final, "test loss": loss,
                         "test accuracy": accuracy, "seconds": round(clock.total, 1)})
            print(f"  batch {batch_size:5d} {name:4s} peak lr {peak:<7g} {steps:4d} steps: "
                  f"test accuracy {accuracy:.4f}{' (diverged)' if diverged else ''} "
                  f"({clock.total:.0f} s)", flush=True)
    return runs


LARGE_HEADERS = ["batch size", "steps", "SGD peak lr", "SGD test accuracy", "SGD test loss",
                 "LARS peak lr", "LARS test accuracy", "LARS test loss"]


def large_batch_rows(runs):
    rows = []
    for batch_size in sorted({run["batch size"] for run in runs}):
        sgd, lars = (_find(runs, batch_size, name) for name in ("sgd", "lars"))
        rows.append((batch_size, sgd["steps"], sgd["peak lr"], round(sgd["test accuracy"], 4),
                     _number(sgd["test loss"]), lars["peak lr"],
                     round(lars["test accuracy"], 4), _number(lars["test loss"])))
    return rows


def _find(runs, batch_size, name):
    return next(run for run in runs if run["batch size"] == batch_size
                and run["optimizer"] == name)


def plot_large_batch(args, runs):
    plt = common.pyplot()
    fig, (ax_accuracy, ax_loss) = plt.subplots(1, 2, figsize=(11, 4.5))
    batch_sizes = sorted({run["batch size"] for run in runs})
    for name, label, marker in (("sgd", "SGD + momentum (linear lr scaling, warm-up)", "o"),
                                ("lars", "LARS (linear lr scaling, warm-up)", "s")):
        chosen = [_find(runs, b, name) for b in batch_sizes]
        ax_accuracy.plot(batch_sizes, [run["test accuracy"] for run in chosen], marker=marker,
                         label=label)
        losses = [np.nan if run["test loss"] is None else run["test loss"] for run in chosen]
        ax_loss.plot(batch_sizes, losses, marker=marker, label=label)
    ax_accuracy.set(title="Test accuracy vs batch size (same epochs)",
                    xlabel="batch size (images per step, log2 scale)",
                    ylabel="test accuracy (fraction correct)")
    ax_loss.set(title="Test loss vs batch size (same epochs)",
                xlabel="batch size (images per step, log2 scale)",
                ylabel="test cross-entropy (mean per image)")
    for ax in (ax_accuracy, ax_loss):
        ax.set_xscale("log", base=2)
        ax.set_xticks(batch_sizes, [str(b) for b in batch_sizes])
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.tight_layout()
    return common.save_figure(fig, args, "_large_batch.png")


def large_batch_findings(runs):
    batch_sizes = sorted({run["batch size"] for run in runs})
    small, large = batch_sizes[0], batch_sizes[-1]
    parts = []
    for name, label in (("sgd", "SGD"), ("lars", "LARS")):
        before, after = _find(runs, small, name), _find(runs, large, name)
        change = after["test accuracy"] - before["test accuracy"]
        parts.append(f"{label} goes from {before['test accuracy']:.4f} at batch {small} to "
                     f"{after['test accuracy']:.4f} at batch {large} "
                     f"({100 * change:+.1f} points{', diverged' if after['diverged'] else ''})")
    sgd_large, lars_large = _find(runs, large, "sgd"), _find(runs, large, "lars")
    better = "LARS" if lars_large["test accuracy"] > sgd_large["test accuracy"] else "SGD"
    wins = sum(_find(runs, b, "lars")["test accuracy"] > _find(runs, b, "sgd")["test accuracy"]
               for b in batch_sizes)
    held = (_find(runs, small, "lars")["test accuracy"]
            - lars_large["test accuracy"]) <= 0.01
    return (f"Measured: {parts[0]}; {parts[1]}. At batch {large} {better} is ahead "
            f"({lars_large['test accuracy']:.4f} LARS vs {sgd_large['test accuracy']:.4f} SGD); "
            f"LARS is ahead at {wins} of {len(batch_sizes)} batch sizes. LARS's accuracy "
            + ("holds within 1 point" if held else "does not hold within 1 point")
            + f" from batch {small} to {large} at this epoch budget.")


# ------------------------------------------------------------------------------ main

def main(argv=None):
    args = common.parse_args(NAME, __doc__.splitlines()[0], add_arguments, argv)
    import cnnx

    if args.threads:
        cnnx.set_num_threads(args.threads)
    clock, size = common.Clock(), sizes(args.quick)
    source = common.fashion_mnist_source(args.quick)
    study_data = common.fashion_mnist(source, n_train=size["study_train"], n_test=size["test"],
                                      seed=args.seed)[:4]
    print(f"part 1: {len(STUDY)} optimizers, {len(study_data[0])} training images, "
          f"{size['study_epochs']} epochs", flush=True)
    study = run_study(study_data, size, args.seed)
    study_seconds = clock.lap()
    large_data = common.fashion_mnist(source, n_train=size["large_train"], n_test=size["test"],
                                      seed=args.seed)[:4]
    print(f"part 2: batch sizes {size['batch_sizes']}, {len(large_data[0])} training images, "
          f"{size['large_epochs']} epochs", flush=True)
    large = run_large_batch(large_data, size, args.seed)
    large_seconds = clock.lap()

    rows, large_rows = study_rows(study), large_batch_rows(large)
    common.write_csv(args, STUDY_HEADERS, rows)
    common.write_csv(args, LARGE_HEADERS, large_rows, suffix="_large_batch.csv")
    common.write_csv(args, ["optimizer", "step", "images seen", "training loss",
                            f"moving average ({SMOOTHING} steps)"],
                     curve_rows(study, size["study_batch"]), suffix="_curves.csv")
    figures = {"loss": plot_study_losses(args, study, size),
               "accuracy": plot_study_accuracy(args, study),
               "large": plot_large_batch(args, large)}
    settings = {"Fashion-MNIST files": source.description,
                "part 1 training images": len(study_data[0]),
                "part 1 epochs": size["study_epochs"], "part 1 batch size": size["study_batch"],
                "part 2 training images": len(large_data[0]),
                "part 2 epochs": size["large_epochs"], "part 2 batch sizes": size["batch_sizes"],
                "part 2 micro-batch": MICRO_BATCH, "test images": len(study_data[2]),
                "part 1 seconds": round(study_seconds, 1),
                "part 2 seconds": round(large_seconds, 1)}
    sections = markdown_sections(study, large, rows, large_rows, figures, size)
    results = {"study": [_json_safe(run) for run in study],
               "large batch": [_json_safe(run) for run in large],
               "study table": {"headers": STUDY_HEADERS, "rows": rows},
               "large batch table": {"headers": LARGE_HEADERS, "rows": large_rows},
               "schedules": schedules_record(), "figures": figures}
    common.write_results(args, TITLE, sections, results, clock, settings)


def _json_safe(run):
    """The run with non-finite step losses written as null (JSON has no NaN)."""
    losses = [loss if np.isfinite(loss) else None for loss in run["step losses"]]
    return {**run, "step losses": losses}


def curve_rows(runs, batch_size):
    rows = []
    for run in runs:
        smooth = moving_average(run["step losses"], SMOOTHING)
        for step, (loss, average) in enumerate(zip(run["step losses"], smooth), 1):
            rows.append((run["optimizer"], step, step * batch_size, f"{loss:.5g}",
                         f"{average:.5g}"))
    return rows


def schedules_record():
    return {"base batch": BASE_BATCH, "sgd base lr": SGD_BASE_LR, "sgd momentum": 0.9,
            "lars base lr": LARS_BASE_LR,
            **{f"lars {k}": v for k, v in LARS_OPTIONS.items()},
            "warm-up fraction": WARMUP_FRACTION, "decay power": 2,
            "micro-batch": MICRO_BATCH, "smoothing window (steps)": SMOOTHING}


def markdown_sections(study, large, rows, large_rows, figures, size):
    return [
        "## Part 1: the optimizer study",
        f"The fashion CNN (`cnnx.architectures.fashion`: conv32-pool-conv64-pool-fc128-fc10, "
        f"225,034 weights), the same initial weights (seed) and the same batches in the same "
        f"order for every optimizer: {size['study_epochs']} epochs over "
        f"{size['study_train']} training images (a random subset of the 60,000, to fit "
        f"the time budget), batch {size['study_batch']}, constant learning rate (Keras' "
        f"defaults where Keras has one; Adagrad at 0.01, Adadelta at the paper's 1.0; LARS at "
        f"part 2's {LARS_BASE_LR:g} per {BASE_BATCH} images scaled to the batch, momentum 0.9, "
        f"weight decay 5e-4, eta 0.001). Test loss and accuracy on the official Fashion-MNIST "
        f"test set. The final training loss is the moving average of the last {SMOOTHING} "
        f"steps' losses.",
        common.markdown_table(STUDY_HEADERS, rows),
        f"![Training loss of every optimizer]({figures['loss']})",
        f"![Test accuracy per epoch of every optimizer]({figures['accuracy']})",
        study_findings(study),
        "## Part 2: LARS vs SGD at large batch",
        f"The same CNN and initial weights, {size['large_epochs']} epochs over "
        f"{size['large_train']} training images at every "
        f"batch size (so a larger batch takes fewer steps). A batch larger than "
        f"{MICRO_BATCH} is the sum of micro-batch gradients of {MICRO_BATCH} images, applied "
        f"once (the same arithmetic as one big batch). Learning rate, for both optimizers: "
        f"peak = base x batch / {BASE_BATCH} (linear scaling; SGD base {SGD_BASE_LR:g} with "
        f"momentum 0.9, LARS base {LARS_BASE_LR:g} with momentum 0.9, weight decay 5e-4, "
        f"eta 0.001), reached by a linear warm-up over the first "
        f"{WARMUP_FRACTION:.0%} of the steps, then peak x (1 - t/T)^2 to zero over the rest "
        f"(the paper's polynomial policy). A run whose loss becomes non-finite stops and "
        f"is marked diverged.",
        common.markdown_table(LARGE_HEADERS, large_rows),
        f"![Test accuracy and loss vs batch size, SGD and LARS]({figures['large']})",
        "## Paper vs cnnx",
        "You, Gitman & Ginsburg (2017) report that on ImageNet, SGD with a linearly scaled "
        "learning rate and warm-up could not keep its small-batch accuracy as the batch grew "
        "to several thousand images, while LARS (plus warm-up) kept AlexNet-BN at batch 8K "
        "and ResNet-50 at 32K close to their small-batch accuracy for the same number of epochs. "
        + large_batch_findings(large)
        + f" The scale differs: Fashion-MNIST and a small CNN for {size['large_epochs']} "
        f"epochs, so batch {max(size['batch_sizes'])} takes only "
        f"{_find(large, max(size['batch_sizes']), 'sgd')['steps']} steps (the paper's runs "
        f"took thousands); with so few steps the number of updates, not only the "
        f"optimizer, limits accuracy at the largest batches.",
    ]


if __name__ == "__main__":
    main()
