"""cnnx.visualize and `cnnx visualize MODEL IMAGE`: feature maps of conv and pooling layers."""
import json
import os
import subprocess
import sys

import numpy as np
import pytest
import reference
from skimage import io

from cnnx import nn, visualize


def tiny_model(seed=0, channels=1):
    return nn.Sequential([
        nn.Conv2D(4, 3, activation="relu"), nn.MaxPool2D(2),
        nn.Conv2D(6, 3, padding="same"), nn.Dropout(0.5), nn.AvgPool2D(2),
        nn.Flatten(), nn.Dense(2, activation="softmax"),
    ], input_shape=(12, 12, channels), seed=seed)


# ------------------------------------------------------------------------ library

def test_feature_maps_equal_a_manual_forward_through_the_layers(rng):
    model = tiny_model()
    image = rng.standard_normal((12, 12, 1)).astype(np.float32)
    maps = visualize.feature_maps(model, image)

    assert [(name, kind) for name, kind, _ in maps] == [
        ("conv2d", "Conv2D"), ("max_pooling2d", "MaxPool2D"), ("conv2d_1", "Conv2D"),
        ("average_pooling2d", "AvgPool2D")]
    x, expected = image[np.newaxis], []
    for layer in model.layers:
        x = layer.forward(x, training=False)
        if type(layer).__name__ in ("Conv2D", "MaxPool2D", "AvgPool2D"):
            expected.append(x[0])
    for (_, _, got), want in zip(maps, expected):
        assert got.dtype == np.float32 and got.shape == want.shape
        np.testing.assert_array_equal(got, want)
    assert [m.shape for _, _, m in maps] == [(10, 10, 4), (5, 5, 4), (5, 5, 6), (2, 2, 6)]


def test_first_map_is_the_activated_convolution(rng):
    model = tiny_model()
    image = rng.standard_normal((12, 12, 1)).astype(np.float32)
    first = visualize.feature_maps(model, image)[0][2]
    conv = model.layers[0]
    want = reference.conv2d(image[np.newaxis], conv.params["kernel"], conv.params["bias"],
                            1, "valid", relu=True)[0]
    np.testing.assert_allclose(first, want, rtol=1e-4, atol=1e-5)
    assert (first >= 0).all()


def test_feature_maps_refuse_an_image_of_the_wrong_shape():
    with pytest.raises(ValueError, match=r"takes images of \(12, 12, 1\)"):
        visualize.feature_maps(tiny_model(), np.zeros((12, 12, 3), np.float32))


def test_model_input_uses_the_run_record_or_the_image_statistics():
    pixels = np.arange(12 * 12, dtype=np.uint8).reshape(12, 12, 1)
    x, note = visualize.model_input(pixels, {"normalize": "standardize", "mean": [10.0],
                                             "std": [2.0]})
    np.testing.assert_allclose(x, (pixels - 10.0) / 2.0)
    assert "run.json" in note
    x, note = visualize.model_input(pixels, None)
    assert abs(float(x.mean())) < 1e-5 and float(x.std()) == pytest.approx(1, abs=1e-4)
    assert "own mean and std" in note


def test_plot_writes_a_non_blank_png(tmp_path, rng):
    model = tiny_model()
    pixels = rng.integers(0, 256, (12, 12, 1)).astype(np.uint8)
    maps = visualize.feature_maps(model, visualize.model_input(pixels, None)[0])
    path = visualize.plot_feature_maps(pixels, maps, str(tmp_path / "maps.png"), max_maps=3)
    image = io.imread(path)
    assert image.ndim == 3 and image.std() > 0


# ------------------------------------------------------------------------ command

def cnnx(*args, cwd):
    env = dict(os.environ, PYTHONUNBUFFERED="1", MPLBACKEND="Agg")
    return subprocess.run([sys.executable, "-m", "cnnx.cli", *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=240, env=env)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory):
    """A model trained for a few steps, saved with a run.json like `cnnx train` writes."""
    folder = tmp_path_factory.mktemp("visualize")
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (32, 12, 12, 3)).astype(np.uint8)
    labels = (images[:, :, :6].mean(axis=(1, 2, 3)) > 127).astype(np.int64)
    mean, std = images.reshape(-1, 3).mean(0), images.reshape(-1, 3).std(0)
    model = tiny_model(channels=3)
    model.compile("adam", "sparse_categorical_crossentropy", metrics=["accuracy"])
    model.fit((images - mean) / std, labels, epochs=2, batch_size=8, verbose=0)
    model.save(str(folder / "model.npz"))
    (folder / "run.json").write_text(json.dumps({
        "image_shape": [12, 12, 3], "class_names": ["dark", "bright"],
        "normalize": "standardize", "mean": mean.tolist(), "std": std.tolist()}))
    io.imsave(folder / "photo.png", rng.integers(0, 256, (30, 40, 3)).astype(np.uint8),
              check_contrast=False)
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    return folder


def test_visualize_writes_the_png_and_says_where(run_folder):
    out = run_folder / "maps" / "photo.png"
    done = cnnx("visualize", "model.npz", "photo.png", "--out", out, "--max-maps", 4,
                cwd=run_folder)
    assert done.returncode == 0, done.stderr
    assert str(out) in done.stdout
    image = io.imread(out)
    assert image.ndim == 3 and image.shape[0] > 300 and image.std() > 0


@pytest.mark.parametrize("model, image, named", [
    ("missing.npz", "photo.png", "missing.npz"),
    ("photo.png", "photo.png", "photo.png"),           # not a model file
    ("model.npz", "missing.png", "missing.png"),
    ("model.npz", "broken.png", "broken.png"),
])
def test_bad_paths_print_one_line_and_exit_2(run_folder, model, image, named):
    done = cnnx("visualize", model, image, cwd=run_folder)
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cnnx: error:") and named in lines[0]
    assert "Traceback" not in done.stderr


def test_visualize_help(run_folder):
    done = cnnx("visualize", "--help", cwd=run_folder)
    assert done.returncode == 0
    assert "--max-maps" in done.stdout and "--out" in done.stdout
