"""experiments/trainers.py --quick runs and writes a complete, sane set of outputs."""
import csv
import json
import math
import re

import pytest

TRAINERS = ("single", "sync", "downpour", "dynsgd", "adag", "easgd")
MODELS = ("MLP", "CNN")
PNGS = ("trainers_time.png", "trainers_accuracy.png", "trainers_budget.png")


@pytest.fixture(scope="module")
def run(run_quick):
    out, _ = run_quick("trainers")
    with open(out / "trainers.json") as f:
        record = json.load(f)
    return out, record


def test_grid_has_every_trainer_model_and_batch_size(run):
    _, record = run
    batch_sizes = record["settings"]["batch sizes"]
    assert len(batch_sizes) >= 2
    cells = {(c["model"], c["trainer"], c["batch_size"]): c for c in record["results"]["grid"]}
    assert set(cells) == {(m, t, b) for m in MODELS for t in TRAINERS for b in batch_sizes}
    for cell in cells.values():
        assert math.isfinite(cell["seconds"]) and 0 < cell["seconds"] < 300
        assert 0.0 <= cell["accuracy"] <= 1.0
        assert cell["mean_staleness"] >= 0
    # one epoch of SGD on Fashion-MNIST must beat chance (10 classes) for every trainer
    for model in MODELS:
        best = max(cells[(model, t, b)]["accuracy"] for t in TRAINERS for b in batch_sizes)
        assert best > 0.3, model
    mlp = [cells[("MLP", t, batch_sizes[0])]["accuracy"] for t in TRAINERS]
    assert min(mlp) > 0.2, mlp


def test_budget_curves_are_monotone_in_time_and_in_range(run):
    _, record = run
    curves = record["results"]["budget"]
    assert {(c["model"], c["trainer"]) for c in curves} == {(m, t) for m in MODELS
                                                            for t in TRAINERS}
    epochs = int(record["settings"]["budget"].split()[0])
    for curve in curves:
        assert len(curve["seconds"]) == len(curve["accuracy"]) == epochs + 1
        assert curve["seconds"][0] == 0.0
        assert all(b > a for a, b in zip(curve["seconds"], curve["seconds"][1:]))
        assert all(0.0 <= a <= 1.0 for a in curve["accuracy"])
    for model in MODELS:
        finding = record["results"]["budget_findings"][model]
        assert set(finding["final"]) == set(TRAINERS)
        assert all(s >= 0 for s in finding["seconds_to_target"].values())


def test_findings_are_computed_and_stated(run):
    out, record = run
    findings = record["results"]["findings"]
    text = (out / "trainers.md").read_text()
    for model in MODELS:
        assert findings[model]["most_robust"] in TRAINERS[1:]
        assert f"**{model}, robustness:**" in text and f"**{model}, Downpour:**" in text
    assert "## Paper vs cnnx" in text


def test_markdown_tables_follow_the_papers_layout(run):
    out, record = run
    text = (out / "trainers.md").read_text()
    batch_sizes = record["settings"]["batch sizes"]
    header = "| trainer "
    assert text.count(header) >= 3        # one grid table per model + the budget table
    for b in batch_sizes:
        assert f"batch {b}" in text
    for label in ("single trainer", "synchronous", "Downpour", "DynSGD", "ADAG", "EASGD"):
        assert len(re.findall(rf"^\| {label} +\|", text, flags=re.M)) == 3, label
    cells = re.findall(r"(\d+\.\d+) s · (\d\.\d{3})", text)
    assert len(cells) == len(MODELS) * len(TRAINERS) * len(batch_sizes)


def test_csvs_hold_every_row(run):
    out, record = run
    with open(out / "trainers.csv") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(record["results"]["grid"])
    assert all(0 <= float(r["test accuracy after epoch 1"]) <= 1 for r in rows)
    with open(out / "trainers_budget.csv") as f:
        assert len(list(csv.DictReader(f))) == sum(len(c["seconds"])
                                                   for c in record["results"]["budget"])


def test_machine_record(run):
    _, record = run
    assert record["quick"] is True
    assert record["machine"]["kernel threads"] == 1
    assert record["machine"]["cores"] >= 1
    assert record["settings"]["workers"] == 2
    assert record["settings"]["kernel threads per worker"] == [1]
    assert 0 < record["wall time (s)"] < 600


def test_plots_decode_and_links_resolve(run):
    out, _ = run
    from matplotlib import image

    text = (out / "trainers.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert sorted(links) == sorted(PNGS)
    for name in links:
        assert (out / name).is_file()
        pixels = image.imread(out / name)
        assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 400
        assert pixels.std() > 0


def test_the_record_names_the_fashion_mnist_files_read(run, sample_expected):
    _, record = run
    files = record["settings"]["Fashion-MNIST files"]
    assert ("experiments/fashion_mnist_sample" in files) == sample_expected, files
    assert record["settings"]["test images"] == (1000 if sample_expected else 1024)
