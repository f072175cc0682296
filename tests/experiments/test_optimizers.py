"""experiments/optimizers.py --quick runs and writes every table and plot it promises."""
import json
import math
import re

import numpy as np
import pytest

OPTIMIZERS = ["sgd", "momentum", "nesterov", "adagrad", "adadelta", "rmsprop", "adam",
              "adamax", "nadam", "lars"]
PLOTS = ["optimizers_loss.png", "optimizers_test_accuracy.png", "optimizers_large_batch.png"]


@pytest.fixture(scope="module")
def run(run_quick):
    out, _ = run_quick("optimizers")
    with open(out / "optimizers.json") as f:
        return out, json.load(f, parse_constant=_reject)     # strict JSON: no NaN/Infinity


def _reject(constant):
    raise ValueError(f"optimizers.json holds {constant}, which is not JSON")


def test_every_optimizer_has_a_row_with_sane_numbers(run):
    _, record = run
    study = {row["optimizer"]: row for row in record["results"]["study"]}
    assert list(study) == OPTIMIZERS
    table = record["results"]["study table"]
    assert [row[0] for row in table["rows"]] == OPTIMIZERS
    assert all(len(row) == len(table["headers"]) for row in table["rows"])
    for name, row in study.items():
        assert 0.0 <= row["test accuracy"] <= 1.0, name
        assert row["seconds"] > 0, name
        assert len(row["epochs"]) == record["settings"]["part 1 epochs"], name
        losses = np.array(row["step losses"])
        assert len(losses) > 0 and np.isfinite(losses).all(), name   # none diverges here
        assert math.isfinite(row["final train loss"]) and row["final train loss"] > 0, name
    # every optimizer learns something: better than chance on 10 classes
    assert max(row["test accuracy"] for row in study.values()) > 0.3


def test_large_batch_table_has_both_optimizers_at_every_batch_size(run):
    _, record = run
    batch_sizes = record["settings"]["part 2 batch sizes"]
    assert len(batch_sizes) >= 3 and max(batch_sizes) > 256
    runs = record["results"]["large batch"]
    assert {(r["batch size"], r["optimizer"]) for r in runs} == {
        (b, name) for b in batch_sizes for name in ("sgd", "lars")}
    for r in runs:
        assert 0.0 <= r["test accuracy"] <= 1.0
        assert r["test loss"] is None or (math.isfinite(r["test loss"]) and r["test loss"] > 0)
        assert r["peak lr"] > 0 and r["steps"] >= 1
    steps = {r["batch size"]: r["steps"] for r in runs}
    assert [steps[b] for b in sorted(steps)] == sorted(steps.values(), reverse=True)
    rows = record["results"]["large batch table"]["rows"]
    assert [row[0] for row in rows] == sorted(batch_sizes)


def test_machine_record_and_wall_time(run):
    _, record = run
    assert record["quick"] is True
    assert record["machine"]["kernel threads"] >= 1
    assert record["machine"]["cores"] >= 1
    assert record["wall time (s)"] > 0
    assert record["settings"]["part 1 seconds"] > 0 and record["settings"]["part 2 seconds"] > 0


def test_plots_decode_and_are_not_blank(run):
    import matplotlib.image

    out, _ = run
    for name in PLOTS:
        image = matplotlib.image.imread(str(out / name))
        assert image.ndim == 3 and image.shape[0] > 200 and image.shape[1] > 200, name
        assert image.std() > 0, name


def test_markdown_has_tables_findings_and_working_links(run):
    out, record = run
    text = (out / "optimizers.md").read_text()
    for header in ("## Part 1", "## Part 2", "## Paper vs cnnx", "## How this was measured"):
        assert header in text
    for name in OPTIMIZERS:
        assert re.search(rf"^\| {name} ", text, re.MULTILINE), name
    assert "Measured:" in text
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(PLOTS)
    assert all((out / link).is_file() for link in links)
    for csv_name in ("optimizers.csv", "optimizers_large_batch.csv", "optimizers_curves.csv"):
        lines = (out / csv_name).read_text().splitlines()
        assert len(lines) > 1, csv_name


def test_the_record_names_the_fashion_mnist_files_read(run, sample_expected):
    _, record = run
    files = record["settings"]["Fashion-MNIST files"]
    assert ("experiments/fashion_mnist_sample" in files) == sample_expected, files
