"""experiments/feature_maps.py --quick trains, runs `cnnx visualize` and writes its report."""
import json
import math
import re

import numpy as np
import pytest

NAME = "feature_maps"
CLASSES = ("T-shirt/top", "Shirt")


@pytest.fixture(scope="module")
def outputs(run_quick):
    out, stdout = run_quick(NAME)
    with open(out / f"{NAME}.json") as f:
        return out, json.load(f), stdout


def test_accuracy_and_channel_statistics(outputs, sample_expected, fashion_mnist_sample):
    _, results, _ = outputs
    r = results["results"]
    # one quick epoch on 2000 images (1150 from the sample): well above chance on this hard
    # pair, below perfect
    assert 0.6 < r["test accuracy"] <= 1 and math.isfinite(r["test loss"])
    files = results["settings"]["Fashion-MNIST files"]
    assert ("experiments/fashion_mnist_sample" in files) == sample_expected, files
    if sample_expected:          # fewer T-shirts and shirts than asked for: all are used
        from cnnx import data

        parts = data.load_fashion_mnist(fashion_mnist_sample)
        expected = tuple(int(np.isin(part.labels, (0, 6)).sum()) for part in parts)
    else:
        expected = (2000, 400)
    assert (r["train images"], r["test images"]) == expected
    layers = [s["layer"] for s in r["channels"]]
    assert layers == ["conv2d", "max_pooling2d", "conv2d_1", "max_pooling2d_1"]
    for s in r["channels"]:
        assert s["channels"] == 32 and 0 <= s["never varying"] <= 32
        assert 0 <= s["most class-specific channel"] < 32
        assert math.isfinite(s["separation (std units)"]) and s["separation (std units)"] >= 0
    assert [shown["class"] for shown in r["images shown"]] == list(CLASSES)
    assert all(0.5 < shown["probability"] <= 1 for shown in r["images shown"])


def test_the_run_says_when_it_reads_the_sample(outputs, sample_expected):
    _, _, stdout = outputs
    said = "this --quick run reads the sample in experiments/fashion_mnist_sample" in stdout
    assert said == sample_expected, stdout[:500]


def test_the_command_wrote_one_figure_per_class(outputs):
    from skimage import io

    out, results, stdout = outputs
    for name in CLASSES:
        figure = out / results["results"]["figures"][name]
        assert f"written to {figure}" in stdout        # the real command's own line
        image = io.imread(figure)
        assert image.ndim == 3 and image.shape[0] > 500 and image.std() > 0
        picture = io.imread(out / results["results"]["inputs"][name])
        assert picture.shape == (28, 28) and picture.std() > 0


def test_machine_record_and_markdown(outputs):
    out, results, _ = outputs
    assert results["machine"]["kernel threads"] >= 1 and results["machine"]["cores"] >= 1
    assert results["wall time (s)"] > 0 and results["quick"] is True
    text = (out / f"{NAME}.md").read_text()
    assert "Paper vs cnnx" in text and "| test accuracy" in text
    assert f"{results['results']['test accuracy']:.3f}" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 4 and all((out / link).is_file() for link in links)
    assert (out / f"{NAME}.csv").read_text().count("\n") == 2
