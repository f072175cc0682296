"""What a run leaves for people to read: metrics tables, training curves, confusion matrices."""
import os

import numpy as np


def pyplot():
    # Agg: draws to files with no display, on servers and in CI alike
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def confusion_matrix(y_true, y_pred, n_classes):
    """counts[t, p] = how many samples of true class t were predicted as p."""
    counts = np.zeros((n_classes, n_classes), np.int64)
    np.add.at(counts, (np.asarray(y_true, np.int64), np.asarray(y_pred, np.int64)), 1)
    return counts


def per_class_report(counts, class_names):
    """Rows of (class, precision, recall, f1, support) from a confusion matrix."""
    rows = []
    for k, name in enumerate(class_names):
        true_positive = counts[k, k]
        predicted, support = counts[:, k].sum(), counts[k, :].sum()
        precision = true_positive / predicted if predicted else 0.0
        recall = true_positive / support if support else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        rows.append((name, float(precision), float(recall), float(f1), int(support)))
    return rows


def format_table(headers, rows):
    """A Markdown table (also readable as plain text in a terminal)."""
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h)
              for i, h in enumerate(headers)]
    line = lambda values: "| " + " | ".join(v.ljust(w) for v, w in zip(values, widths)) + " |"
    return "\n".join([line(headers), line(["-" * w for w in widths]), *map(line, cells)])


def _cell(value):
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def plot_history(history, path, title="Training curves"):
    """Loss and accuracy per epoch, train and validation, side by side, as a PNG."""
    save_figure(history_figure(history, title), path)


def history_figure(history, title="Training curves"):
    """The figure plot_history saves; epochs are numbered from 1 and ticked at integers."""
    plt = pyplot()
    from matplotlib.ticker import MaxNLocator

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    n_epochs = 0
    for key, ax, label in [("loss", ax_loss, "train"), ("val_loss", ax_loss, "validation"),
                           ("accuracy", ax_acc, "train"), ("val_accuracy", ax_acc, "validation")]:
        if history.get(key):
            epochs = np.arange(1, len(history[key]) + 1)
            n_epochs = max(n_epochs, len(epochs))
            ax.plot(epochs, history[key], marker="o", label=label)
    ax_loss.set(title="Loss", xlabel="epoch", ylabel="cross-entropy (mean per image)")
    ax_acc.set(title="Accuracy", xlabel="epoch", ylabel="accuracy", ylim=(0, 1.02))
    for ax in (ax_loss, ax_acc):
        # half an epoch of margin: with one epoch matplotlib's own limits (0.945-1.055)
        # leave no integer but 1 and its locator falls back to fractions
        ax.set_xlim(0.5, max(n_epochs, 1) + 0.5)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend()
    fig.suptitle(title)
    fig.tight_layout()
    return fig


def plot_confusion(counts, class_names, path, title="Confusion matrix (test set)"):
    """The confusion matrix as a heat map with the counts written in each cell."""
    plt = pyplot()
    size = max(4.0, 0.6 * len(class_names) + 2)
    fig, ax = plt.subplots(figsize=(size, size))
    image = ax.imshow(counts, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set(xlabel="predicted class", ylabel="true class", title=title)
    threshold = counts.max() / 2 if counts.size else 0
    for (t, p), value in np.ndenumerate(counts):
        ax.text(p, t, str(value), ha="center", va="center",
                color="white" if value > threshold else "black")
    fig.colorbar(image, ax=ax, fraction=0.046, label="images")
    fig.tight_layout()
    save_figure(fig, path)


def save_figure(fig, path):
    # written beside the target then renamed, so a reader never sees half a PNG
    temporary = f"{path}.tmp.png"
    fig.savefig(temporary, dpi=110)
    pyplot().close(fig)
    os.replace(temporary, path)
