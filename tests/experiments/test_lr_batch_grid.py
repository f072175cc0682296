"""experiments/lr_batch_grid.py --quick runs and writes every table and plot it promises;
a diverged cell is recorded as a result, not a crash."""
import csv
import importlib.util
import itertools
import json
import math
import os
import re

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SCRIPT = os.path.join(REPO, "experiments", "lr_batch_grid.py")
LEARNING_RATES = [1e-1, 1e-2, 1e-3, 1e-4]
BATCH_SIZES = [16, 32, 64]
MODES = ["standardize", "scale", "none"]
VARIANTS = ["base", "more conv layers", "doubled filters"]
PLOTS = ["lr_batch_grid_heatmap.png", "lr_batch_grid_normalisation.png"]


@pytest.fixture(scope="module")
def run(run_quick):
    out, _ = run_quick("lr_batch_grid")
    with open(out / "lr_batch_grid.json") as f:
        record = json.load(f)
    markdown = (out / "lr_batch_grid.md").read_text()
    return out, record, markdown


@pytest.fixture(scope="module")
def script():
    spec = importlib.util.spec_from_file_location("lr_batch_grid_under_test", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def check_finished(run_record, epochs):
    for metric in ("train accuracy", "test accuracy"):
        assert 0.0 <= run_record[metric] <= 1.0, metric
    for metric in ("train loss", "test loss"):
        assert math.isfinite(run_record[metric]) and run_record[metric] > 0, metric
    assert len(run_record["per epoch"]) == epochs
    assert len(run_record["batch losses"]) > 0
    assert np.isfinite(run_record["batch losses"]).all()
    assert run_record["train seconds per epoch"] > 0


def check_cell(cell, epochs):
    assert cell["status"] in ("ok", "diverged")
    assert cell["seconds"] > 0 and cell["parameters"] > 0
    if cell["status"] == "ok":
        assert cell["diverged_at"] is None
        check_finished(cell, epochs)
    else:
        assert cell["diverged_at"]["epoch"] >= 1 and cell["diverged_at"]["step"] >= 1
        assert cell["test accuracy"] is None


@pytest.mark.parametrize("dataset", ["glasses", "faces"])
def test_every_grid_cell_is_recorded_with_sane_numbers(run, dataset):
    _, record, _ = run
    cells = record["results"]["grids"][dataset]
    assert [(c["learning_rate"], c["batch_size"]) for c in cells] == list(
        itertools.product(LEARNING_RATES, BATCH_SIZES))
    epochs = record["settings"][f"{dataset} epochs"]
    for cell in cells:
        check_cell(cell, epochs)
    assert any(c["status"] == "ok" for c in cells)


def test_markdown_has_the_four_tables_per_dataset_in_the_papers_layout(run):
    _, _, markdown = run
    for title in ("Test accuracy", "Test loss", "Train accuracy", "Train loss"):
        assert markdown.count(f"**{title}**") == 2, title
    headers = [line for line in markdown.splitlines() if line.startswith("| lr \\ batch")]
    assert len(headers) == 8
    assert all(re.findall(r"\d+", h) == ["16", "32", "64"] for h in headers)
    for learning_rate in ("0.1", "0.01", "0.001", "0.0001"):
        rows = [line for line in markdown.splitlines()
                if line.startswith(f"| {learning_rate} ")]
        assert len(rows) == 8, learning_rate
        for row in rows:
            cells = [c.strip() for c in row.strip("|").split("|")][1:]
            assert len(cells) == 3
            assert all(re.fullmatch(r"\d+\.\d{3}|diverged at epoch \d+ step \d+", c)
                       for c in cells), row
    for section in ("## Input normalisation", "## Architecture variations", "## Paper vs cnnx",
                    "Measured:", "too easy"):
        assert section in markdown, section


def test_csv_holds_every_cell_of_both_grids(run):
    out, _, _ = run
    with open(out / "lr_batch_grid.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 2 * len(LEARNING_RATES) * len(BATCH_SIZES)
    assert {r["dataset"] for r in rows} == {"glasses", "faces"}
    for row in rows:
        if row["status"] == "ok":
            assert 0.0 <= float(row["test_accuracy"]) <= 1.0
        else:
            assert row["diverged"].startswith("diverged at epoch")


def test_normalisations_and_variants_run_at_the_compared_grid_cells(run):
    _, record, markdown = run
    results = record["results"]
    epochs = record["settings"]["glasses epochs"]
    cells = [(c["learning_rate"], c["batch_size"]) for c in results["compared cells"]]
    assert 1 <= len(cells) <= 2
    assert all(lr in LEARNING_RATES and b in BATCH_SIZES for lr, b in cells)
    grid = {(c["learning_rate"], c["batch_size"]): c for c in results["grids"]["glasses"]}
    for part, names in (("normalisation", MODES), ("variants", VARIANTS)):
        comparisons = results[part]
        assert [(c["learning_rate"], c["batch_size"]) for c in comparisons] == cells
        for comparison in comparisons:
            assert list(comparison["runs"]) == names
            for run_record in comparison["runs"].values():
                assert run_record["learning_rate"] == comparison["learning_rate"]
                assert run_record["batch_size"] == comparison["batch_size"]
                check_cell(run_record, epochs)
            # the standardised base run is the grid's own cell, not a second training
            reused = comparison["runs"][names[0]]
            assert reused == grid[(comparison["learning_rate"], comparison["batch_size"])]
    for mode in MODES:
        assert 0.0 <= results["accuracy at start"][mode]["test accuracy"] <= 1.0
    for comparison in results["variants"]:
        base = comparison["runs"]["base"]["parameters"]
        assert comparison["runs"]["more conv layers"]["parameters"] > base
        assert comparison["runs"]["doubled filters"]["parameters"] > 1.5 * base
    rows = markdown.split("## Architecture variations")[1].split("## Paper vs cnnx")[0]
    assert sum(line.startswith("| lr ") for line in rows.splitlines()) == 3 * len(cells)
    rows = markdown.split("## Input normalisation")[1].split("## Architecture variations")[0]
    assert sum(line.startswith("| lr ") for line in rows.splitlines()) == 3 * len(cells)


def test_machine_record(run):
    _, record, markdown = run
    machine = record["machine"]
    assert machine["kernel threads"] >= 1 and machine["cores"] >= 1
    assert record["wall time (s)"] > 0 and record["quick"] is True
    assert "kernel threads" in markdown and "wall time (s)" in markdown


def test_plots_decode_are_not_blank_and_are_linked(run):
    import matplotlib.image

    out, _, markdown = run
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", markdown)
    assert sorted(links) == sorted(PLOTS)
    for name in PLOTS:
        pixels = matplotlib.image.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 200
        assert pixels.std() > 0.01, name


def test_a_diverging_cell_is_recorded_not_raised(script):
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, 12, 12, 1), dtype=np.uint8)
    labels = rng.integers(0, 2, 64)
    inputs = script.normalised((images, labels, images[:16], labels[:16]), "none")
    with np.errstate(all="ignore"):
        cell = script.train_once(script.VARIANTS["base"][1], inputs, 1e6, 16, 2, seed=0)
    assert cell["status"] == "diverged"
    assert cell["diverged_at"]["epoch"] == 1 and cell["diverged_at"]["step"] >= 1
    assert cell["test accuracy"] is None
    cells = [dict(cell, learning_rate=lr, batch_size=b)
             for lr, b in itertools.product(LEARNING_RATES, BATCH_SIZES)]
    table = script.grid_table(cells, "test accuracy")
    assert table.count(script.diverged_text(cell)) == len(cells)
