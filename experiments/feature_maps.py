"""What the network sees: feature maps of the comics base model, drawn by `cnnx visualize`.

The comics paper trained its base model ([CONV32 -> POOL]*2 -> FC128 -> FC) on grey comic
drawings and showed the feature maps of the trained network for an image, to see which
features it had learned to use.

This script reproduces the figure with cnnx's own command: it trains the same base model
(`cnnx.architectures.comics` at 28x28x1) on Fashion-MNIST T-shirt/top vs Shirt (the comic
drawings are not available here; this pair is grey, small and the hardest Fashion-MNIST pair
to tell apart), saves it in a run folder with the run.json record of its normalisation, writes
one test image per class as a PNG file, and runs the real command
`python -m cnnx.cli visualize MODEL IMAGE --out feature_maps_<class>.png` on each. Beside the
figures it measures, over test images of each class, how strongly every channel of each
layer responds, to say which channels tell the two classes apart and how many never fire.
"""
import json
import os
import re
import subprocess
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402

NAME = "feature_maps"
CLASSES = (0, 6)                          # Fashion-MNIST: T-shirt/top, Shirt
MAX_MAPS = 16


def settings_for(args):
    if args.quick:
        return {"train images": 2000, "test images": 400, "epochs": 1, "batch size": 32,
                "learning rate": 1e-3, "images for channel statistics": 100}
    return {"train images": None, "test images": None, "epochs": 2, "batch size": 32,
            "learning rate": 1e-3, "images for channel statistics": 400}


# ----------------------------------------------------------------------------- data

def recover_standardisation(x):
    """(mean, std) that common.fashion_mnist used: pixels 0 and 255 both occur, so the
    smallest and largest standardised values pin them; checked by the round trip."""
    low, high = float(x.min()), float(x.max())
    std = 255.0 / (high - low)
    mean = -low * std
    pixels = x * std + mean
    if not np.allclose(pixels, np.round(pixels), atol=2e-3):
        raise RuntimeError("feature_maps: cannot recover the uint8 pixels of the images")
    return mean, std


def to_uint8(x, mean, std):
    return np.clip(np.round(x * std + mean), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------- model

def train(x_train, y_train, x_test, y_test, settings, seed):
    from cnnx import architectures, optim

    model = architectures.comics(input_shape=(28, 28, 1), n_classes=2, seed=seed)
    model.compile(optim.get("adam", learning_rate=settings["learning rate"]),
                  "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit(x_train, y_train, epochs=settings["epochs"], batch_size=settings["batch size"],
              verbose=0)
    loss, accuracy = model.evaluate(x_test, y_test)
    return model, float(loss), float(accuracy)


def save_run(model, folder, class_names, mean, std):
    """model.npz + the run.json fields `cnnx visualize` reads, as `cnnx train` writes them."""
    os.makedirs(folder, exist_ok=True)
    model.save(os.path.join(folder, "model.npz"))
    with open(os.path.join(folder, "run.json"), "w") as f:
        json.dump({"data": "fashion-mnist (T-shirt/top vs Shirt)", "image_shape": [28, 28, 1],
                   "class_names": list(class_names), "normalize": "standardize",
                   "mean": [float(mean)], "std": [float(std)]}, f, indent=2)
    return os.path.join(folder, "model.npz")


def most_confident(model, x_test, y_test):
    """Per class, the index of the test image the model gets right most confidently."""
    probabilities = model.predict(x_test)
    picks = []
    for label in range(probabilities.shape[1]):
        score = np.where(y_test == label, probabilities[:, label], -1.0)
        picks.append(int(np.argmax(score)))
    return picks, probabilities


def slug(name):
    return re.sub(r"[^a-z0-9]+", "_", name.lower()).strip("_")


# ------------------------------------------------------------------------- the command

def run_visualize(model_path, image_path, out_path):
    """The real command, in a child process: what a user types."""
    command = [sys.executable, "-m", "cnnx.cli", "visualize", model_path, image_path,
               "--out", out_path, "--max-maps", str(MAX_MAPS)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=common.REPO)
    if done.returncode != 0 or not os.path.exists(out_path):
        raise RuntimeError(f"`{' '.join(command)}` failed ({done.returncode}): {done.stderr}")
    return done.stdout.strip()


# ---------------------------------------------------------------------- channel statistics

def channel_statistics(model, x_test, y_test, n_images):
    """Per feature layer: mean activation of each channel for each class, and the fraction
    of channels that stay flat (one value over the whole map) on every image."""
    from cnnx import visualize

    per_class = {}
    flat = {}
    for label in np.unique(y_test):
        for index in np.flatnonzero(y_test == label)[:n_images]:
            for name, kind, maps in visualize.feature_maps(model, x_test[index]):
                per_class.setdefault(name, {}).setdefault(int(label), []).append(
                    maps.mean(axis=(0, 1)))
                is_flat = maps.max(axis=(0, 1)) == maps.min(axis=(0, 1))
                flat[name] = flat.get(name, True) & is_flat
    stats = []
    for name, by_class in per_class.items():
        means = {label: np.mean(values, axis=0) for label, values in by_class.items()}
        spread = np.std(np.concatenate([np.stack(v) for v in by_class.values()]), axis=0)
        # how far apart the classes' mean responses are, in units of the channel's spread
        separation = np.abs(means[0] - means[1]) / np.maximum(spread, 1e-6)
        best = int(np.argmax(separation))
        stats.append({"layer": name, "channels": int(len(spread)),
                      "never varying": int(flat[name].sum()),
                      "most class-specific channel": best,
                      "separation (std units)": float(separation[best]),
                      "mean response class 0": float(means[0][best]),
                      "mean response class 1": float(means[1][best])})
    return stats


# ------------------------------------------------------------------------------- report

def markdown(rows, stats, figures, inputs, accuracy, class_names, settings, commands):
    table = common.markdown_table(
        ["model", "data", "train images", "test images", "epochs", "test accuracy"], rows)
    stat_rows = [(s["layer"], s["channels"], s["never varying"], s["most class-specific channel"],
                  round(s["separation (std units)"], 2), round(s["mean response class 0"], 3),
                  round(s["mean response class 1"], 3)) for s in stats]
    stat_table = common.markdown_table(
        ["layer", "channels", "flat on every image", "most class-specific channel",
         "separation (std units)", f"mean response, {class_names[0]}",
         f"mean response, {class_names[1]}"], stat_rows)
    strongest = max(stats, key=lambda s: s["separation (std units)"])
    dead = sum(s["never varying"] for s in stats if "conv" in s["layer"])
    convs = sum(s["channels"] for s in stats if "conv" in s["layer"])
    higher = class_names[0] if strongest["mean response class 0"] > strongest[
        "mean response class 1"] else class_names[1]
    paper = (f"**Paper vs cnnx.** The comics paper showed the feature maps of its trained base "
             f"model for an input drawing, to see which features the network used. cnnx draws "
             f"the same figure with `cnnx visualize` for the same base model trained here on "
             f"Fashion-MNIST {class_names[0]} vs {class_names[1]} (the comics are not "
             f"available), test accuracy {accuracy:.3f}. Over the test images measured, the "
             f"channel that tells the classes apart best is channel "
             f"{strongest['most class-specific channel']} of {strongest['layer']} "
             f"({strongest['separation (std units)']:.2f} standard deviations between the class "
             f"means, stronger for {higher}); {dead} of the {convs} convolution channels never "
             f"vary on any of them (ReLUs that do not fire). The figures below are the "
             f"paper's kind of evidence: they show, map by map, which parts of the garment "
             f"each channel responds to.")
    images = [f"### {name}\n\nInput: ![{name} test image]({inputs[name]}) &nbsp; "
              f"`{commands[name]}`\n\n![feature maps of a {name} test image]({figures[name]})"
              for name in class_names]
    notes = (f"Training: comics base model (`cnnx.architectures.comics(input_shape=(28, 28, 1), "
             f"n_classes=2)`), Adam lr {settings['learning rate']}, batch "
             f"{settings['batch size']}, standardised with the training images' mean and std "
             f"(recorded in the run.json the command reads). Each figure shows the first "
             f"{MAX_MAPS} channels of every convolution and pooling layer, each map with its own "
             f"grey scale; the test image shown per class is the one the model classifies "
             f"correctly with the highest probability. Channel statistics over "
             f"{settings['images for channel statistics']} test images per class.")
    return [paper, "## Model and accuracy", table, "## Channels", stat_table, notes,
            "## Feature maps", *images]


def main(argv=None):
    args = common.parse_args(NAME, "Feature maps of the trained comics base model, drawn by "
                             "`cnnx visualize`", argv=argv)
    clock = common.Clock()
    settings = settings_for(args)
    source = common.fashion_mnist_source(args.quick)
    x_train, y_train, x_test, y_test, class_names = common.fashion_mnist(
        source, CLASSES, settings["train images"], settings["test images"], seed=args.seed)
    mean, std = recover_standardisation(x_train)
    model, loss, accuracy = train(x_train, y_train, x_test, y_test, settings, args.seed)
    print(f"{NAME}: test accuracy {accuracy:.4f} ({clock.lap():.0f} s)", flush=True)
    run_folder = (os.path.join(args.out, f"{NAME}_run") if args.quick
                  else os.path.join(common.REPO, "cnnx-runs", f"{NAME}_run"))
    model_path = save_run(model, run_folder, class_names, mean, std)
    picks, probabilities = most_confident(model, x_test, y_test)
    from skimage import io

    figures, inputs, commands, shown = {}, {}, {}, []
    for label, index in enumerate(picks):
        name = class_names[label]
        inputs[name] = os.path.basename(common.path(args, f"_input_{slug(name)}.png"))
        io.imsave(common.path(args, f"_input_{slug(name)}.png"),
                  to_uint8(x_test[index], mean, std)[..., 0], check_contrast=False)
        out = common.path(args, f"_{slug(name)}.png")
        print(run_visualize(model_path, common.path(args, f"_input_{slug(name)}.png"), out))
        figures[name] = os.path.basename(out)
        commands[name] = " ".join(["cnnx visualize", *(os.path.relpath(p, common.REPO) for p in (
            model_path, common.path(args, f"_input_{slug(name)}.png"))), "--out",
            os.path.relpath(out, common.REPO), f"--max-maps {MAX_MAPS}"])
        shown.append({"class": name, "test index": index,
                      "probability": float(probabilities[index, label])})
    stats = channel_statistics(model, x_test, y_test, settings["images for channel statistics"])
    rows = [("comics base (2x CONV32+POOL, FC128)", f"Fashion-MNIST {' vs '.join(class_names)}",
             len(y_train), len(y_test), settings["epochs"], round(accuracy, 4))]
    common.write_csv(args, ["model", "data", "train images", "test images", "epochs",
                            "test accuracy"], rows)
    common.write_results(
        args, "What the network sees: feature maps of the comics base model",
        markdown(rows, stats, figures, inputs, accuracy, class_names, settings, commands),
        {"test accuracy": accuracy, "test loss": loss, "train images": len(y_train),
         "test images": len(y_test), "images shown": shown, "channels": stats,
         "figures": figures, "inputs": inputs},
        clock, {**settings, "train images": len(y_train), "test images": len(y_test),
                "Fashion-MNIST files": source.description,
                "classes": class_names, "max maps": MAX_MAPS})


if __name__ == "__main__":
    main()
