"""What the network sees: the feature maps of every convolution and pooling layer for one image.

The comics paper looked at the feature maps of its trained network to see which features of
the drawings it had learned to use. `cnnx visualize MODEL IMAGE` does the same for a saved
cnnx model: it runs one image through the layers in inference mode and draws, for each
Conv2D and pooling layer, a grid of its output channels (after the layer's activation), each
a small grey image with its own contrast, under the input image.
"""
import json
import math
import os

import numpy as np

DEFAULT_MAX_MAPS = 16
COLUMNS = 8                                 # maps per row of a layer's block


def _feature_layer_types():
    from cnnx import nn

    return nn.Conv2D, nn.MaxPool2D, nn.AvgPool2D


def feature_maps(model, image):
    """[(layer name, layer kind, maps float32 (H, W, C))] for each Conv2D and pooling layer.

    image: float32 (H, W, C), normalised the way the model was trained (model.input_shape).
    The layers run in inference mode (dropout off, BatchNorm's moving statistics)."""
    x = np.ascontiguousarray(np.asarray(image, np.float32)[np.newaxis])
    if x.shape[1:] != tuple(model.input_shape):
        raise ValueError(f"feature_maps: the model takes images of {tuple(model.input_shape)}, "
                         f"got {tuple(x.shape[1:])}")
    model.layers[0].check_input(x)
    kinds = _feature_layer_types()
    maps = []
    for layer in model.layers:
        x = layer.forward(x, training=False)
        if isinstance(layer, kinds):
            # a copy: a layer may reuse its output buffer on the next call
            maps.append((layer.name, type(layer).__name__, np.array(x[0], np.float32)))
    return maps


# ------------------------------------------------------------------------- the image

def read_run_info(model_path):
    """The run.json `cnnx train` wrote beside the model, or None when there is none."""
    path = os.path.join(os.path.dirname(os.path.abspath(model_path)), "run.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def model_input(pixels, run_info):
    """uint8 (H, W, C) -> (float32 model input, a note on how it was normalised).

    With the run's record: the run's normalisation and training statistics. Without one:
    standardised with this image's own per-channel mean and std (the model may have been
    trained on other statistics, so the note says so)."""
    from cnnx import data

    batch = pixels[np.newaxis]
    if run_info is not None:
        mode = run_info.get("normalize", "standardize")
        mean, std = run_info.get("mean"), run_info.get("std")
        x = data.normalize(batch, mode, mean=None if mean is None else np.asarray(mean),
                           std=None if std is None else np.asarray(std))
        return x[0], f"normalised as in training ({mode}, from run.json)"
    x = data.normalize(batch, "standardize", *data.channel_stats(pixels))
    return x[0], "no run.json beside the model: standardised with this image's own mean and std"


# ------------------------------------------------------------------------- the figure

def plot_feature_maps(pixels, maps, path, max_maps=DEFAULT_MAX_MAPS, title=None, note=None):
    """One PNG: the input image on top, then a block per layer of up to `max_maps` channels."""
    from cnnx import report

    plt = report.pyplot()
    blocks = [(name, kind, layer_maps, min(max_maps, layer_maps.shape[-1]))
              for name, kind, layer_maps in maps]
    rows = [math.ceil(shown / COLUMNS) for *_, shown in blocks]
    columns = min(COLUMNS, max(shown for *_, shown in blocks))
    # heights in map rows; the input block is two rows tall, each block adds room for its title
    heights = [2.6] + [r + 0.45 for r in rows]
    fig = plt.figure(figsize=(1.15 * columns + 0.4, 1.15 * sum(heights) + 0.5),
                     layout="constrained")
    fig.suptitle(title or "Feature maps", fontsize=11)
    parts = fig.subfigures(len(heights), 1, height_ratios=heights)
    _draw_input(parts[0], pixels, note)
    for part, (name, kind, layer_maps, shown), n_rows in zip(parts[1:], blocks, rows):
        _draw_block(part, name, kind, layer_maps, shown, n_rows, columns)
    report.save_figure(fig, path)
    return path


def _draw_input(part, pixels, note):
    ax = part.subplots()
    grey = pixels.shape[-1] == 1
    ax.imshow(pixels[..., 0] if grey else pixels, cmap="gray" if grey else None,
              vmin=0, vmax=255)
    ax.set_axis_off()
    height, width, channels = pixels.shape
    label = f"input image, {height}x{width}x{channels}"
    part.suptitle(label + (f"\n{note}" if note else ""), fontsize=8.5)


def _draw_block(part, name, kind, layer_maps, shown, n_rows, columns):
    height, width, channels = layer_maps.shape
    which = f"channels 0-{shown - 1} of {channels}" if shown < channels else f"{channels} channels"
    part.suptitle(f"{name} ({kind}): {height}x{width}x{channels}, {which}; grey, each map "
                  f"its own contrast", fontsize=8.5)
    axes = np.atleast_1d(part.subplots(n_rows, columns, squeeze=False)).ravel()
    for channel, ax in enumerate(axes):
        ax.set_axis_off()
        if channel >= shown:
            continue
        image = layer_maps[..., channel]
        low, high = float(image.min()), float(image.max())
        # a constant map (e.g. a ReLU that never fires) is drawn black, not as noise
        ax.imshow(image, cmap="gray", vmin=low, vmax=high if high > low else low + 1,
                  interpolation="nearest")
        ax.set_title(f"{channel}" + ("" if high > low else " (flat)"), fontsize=6.5, pad=1.5)


# ------------------------------------------------------------------------- the command

def visualize(model_path, image_path, out=None, max_maps=DEFAULT_MAX_MAPS):
    """Load a saved model and an image file, write the feature-map PNG; returns its path.

    Problems the user can fix raise cnnx.runs.UserError (the CLI prints them as one line)."""
    from cnnx import data
    from cnnx.runs import UserError, load_cnnx_model

    if max_maps < 1:
        raise UserError(f"--max-maps must be at least 1, got {max_maps}")
    model = load_cnnx_model(model_path)
    height, width, channels = model.input_shape
    if channels not in (1, 3):
        raise UserError(f"{model_path!r} takes {channels}-channel images; visualize reads grey "
                        f"(1) or RGB (3) images")
    try:
        pixels = data.load_image(image_path, (height, width), grayscale=channels == 1)
    except (data.BadImage, OSError) as error:
        reason = error.strerror if isinstance(error, OSError) and error.strerror else error
        raise UserError(f"cannot read image {image_path!r}: {reason}") from None
    x, note = model_input(pixels, read_run_info(model_path))
    maps = feature_maps(model, x)
    if not maps:
        raise UserError(f"{model_path!r} has no Conv2D or pooling layer to show")
    out = out or f"{os.path.splitext(os.path.basename(image_path))[0]}-feature-maps.png"
    if os.path.dirname(out):
        os.makedirs(os.path.dirname(out), exist_ok=True)
    title = (f"What {os.path.basename(model_path)} sees in {os.path.basename(image_path)}: "
             f"{_predicted(model, x, model_path)}")
    return plot_feature_maps(pixels, maps, out, max_maps=max_maps, title=title, note=note)


def _predicted(model, x, model_path):
    """'predicted <class> (p)' using the run's class names when there are any."""
    probabilities = model.predict(x[np.newaxis])[0]
    info = read_run_info(model_path) or {}
    names = info.get("class_names") or [str(k) for k in range(len(probabilities))]
    best = int(np.argmax(probabilities))
    return f"predicted {names[best]} ({probabilities[best]:.2f})"
