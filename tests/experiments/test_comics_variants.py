"""experiments/comics_variants.py --quick runs and writes every table and plot it promises."""
import csv
import json
import math
import re

import pytest

NAME = "comics_variants"
MODELS = (2, 3, 4)
VARIANTS = ("base", "dropout", "dropout + BN", "extra dense")


@pytest.fixture(scope="module")
def out(run_quick):
    folder, _ = run_quick(NAME)
    return folder


@pytest.fixture(scope="module")
def record(out):
    with open(out / f"{NAME}.json") as f:
        return json.load(f)


def test_every_model_and_variant_was_trained_and_tested(record):
    runs = record["results"]["runs"]
    assert sorted((r["conv layers"], r["variant"]) for r in runs) == \
        sorted((k, v) for k in MODELS for v in VARIANTS)
    epochs = record["settings"]["epochs"]
    for run in runs:
        assert 0 <= run["test accuracy"] <= 1
        assert math.isfinite(run["test loss"]) and run["test loss"] > 0
        assert run["seconds per epoch"] > 0 and run["params"] > 0
        assert run["load average (1 min)"] >= 0
        for key in ("loss", "accuracy", "val_loss", "val_accuracy"):
            values = run["history"][key]
            assert len(values) == epochs and all(math.isfinite(v) for v in values)
        assert all(0 <= v <= 1 for v in run["history"]["val_accuracy"])


def test_variants_change_the_networks_as_described(record):
    params = {(r["conv layers"], r["variant"]): r["params"] for r in record["results"]["runs"]}
    for k in MODELS:
        assert params[(k, "dropout")] == params[(k, "base")]          # dropout has no weights
        assert params[(k, "dropout + BN")] == params[(k, "base")] + 4 * 32 * k   # 4 per channel
        assert params[(k, "extra dense")] == params[(k, "base")] + 128 * 128 + 128
    # deeper models pool more: fewer inputs to the first dense layer
    assert params[(2, "base")] > params[(3, "base")] > params[(4, "base")]


def test_run_record_has_the_machine_threads_and_wall_time(record):
    assert record["quick"] is True
    assert record["machine"]["kernel threads"] >= 1 and record["machine"]["cores"] >= 1
    assert record["wall time (s)"] > 0


def test_csv_has_one_row_per_cell(out):
    with open(out / f"{NAME}.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(MODELS) * len(VARIANTS)
    assert all(0 <= float(row["test accuracy"]) <= 1 for row in rows)


def test_markdown_has_the_paper_layout_and_links_existing_plots(out, record):
    text = (out / f"{NAME}.md").read_text()
    for heading in ("## Test loss", "## Test accuracy", "## Paper vs cnnx",
                    "## How this was measured"):
        assert heading in text
    assert "| model " in text and all(f"| {v}" in text or f" {v} |" in text for v in VARIANTS)
    accuracy_table = text.split("## Test accuracy", 1)[1].split("##", 1)[0]
    for k in MODELS:
        assert f"| {k} conv layers" in accuracy_table
    for finding in record["results"]["findings"]:
        assert finding in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert len(links) == 4 and all((out / link).is_file() for link in links)


def test_plots_decode_and_are_not_blank(out):
    from matplotlib import image

    names = [f"{NAME}_conv{k}.png" for k in MODELS] + [f"{NAME}_test_accuracy.png"]
    for name in names:
        pixels = image.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0


def test_the_record_names_the_fashion_mnist_files_read(record, sample_expected):
    files = record["settings"]["Fashion-MNIST files"]
    assert ("experiments/fashion_mnist_sample" in files) == sample_expected, files
