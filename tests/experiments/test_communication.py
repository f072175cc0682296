"""experiments/communication.py --quick runs and writes a meaningful table, JSON and plot."""
import json
import math
import re

import pytest

NAME = "communication"


@pytest.fixture(scope="module")
def outputs(run_quick):
    out, _ = run_quick(NAME)
    with open(out / f"{NAME}.json") as f:
        return out, json.load(f)


def test_every_model_worker_count_and_wire_is_measured(outputs):
    _, results = outputs
    rows = results["results"]["rows"]
    cells = {(r["model"], r["workers"], r["wire"]) for r in rows}
    assert cells == {(m, n, w) for m in ("small", "fashion") for n in (1, 2)
                     for w in ("float32", "bfloat16")}
    for r in rows:
        for key in ("measured MB/step", "model MB/step", "measured MB/epoch",
                    "cnnx counters MB/step"):
            assert math.isfinite(r[key]) and r[key] > 0, (r, key)
        # the analytic model is a floor: nothing sent is less than weights out + gradients back
        assert 0.95 <= r["measured / model"] < 3, r
        assert r["model MB/step"] == pytest.approx(
            2 * r["workers"] * r["params"] * {"float32": 4, "bfloat16": 2}[r["wire"]] / 1e6)
        fetches = [r[f"{kind} fetches/step"] for kind in ("weights", "gradients", "model")]
        if r["workers"] == 1:
            assert r["worker<->worker MB/step"] == 0 and fetches == [0, 0, 0]
        else:
            # every other worker fetches the step's weights, and the tree moves N-1 gradients
            assert r["worker<->worker MB/step"] > 0
            assert fetches[0] >= r["workers"] - 1 and fetches[1] >= r["workers"] - 1
        assert r["model object MB"] > r["params"] * 4 / 1e6


def test_bfloat16_sends_about_half_and_bigger_models_send_more(outputs):
    _, results = outputs
    rows = {(r["model"], r["workers"], r["wire"]): r for r in results["results"]["rows"]}
    for n in (1, 2):
        assert rows["fashion", n, "float32"]["params"] > rows["small", n, "float32"]["params"]
        assert (rows["fashion", n, "float32"]["measured MB/step"]
                > rows["small", n, "float32"]["measured MB/step"])
    half = rows["small", 1, "bfloat16"]["measured MB/step"] / rows["small", 1, "float32"][
        "measured MB/step"]
    assert 0.45 < half < 0.55


def test_machine_record_and_markdown(outputs):
    out, results = outputs
    assert results["machine"]["kernel threads"] == 1 and results["machine"]["cores"] >= 1
    assert results["wall time (s)"] > 0 and results["quick"] is True
    text = (out / f"{NAME}.md").read_text()
    assert "Paper vs cnnx" in text and "| model" in text
    assert (out / f"{NAME}.csv").read_text().count("\n") == 1 + 8
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and all((out / link).is_file() for link in links)


def test_plot_decodes_and_is_not_blank(outputs):
    from skimage import io

    out, _ = outputs
    image = io.imread(out / f"{NAME}_mb_per_epoch.png")
    assert image.ndim == 3 and image.shape[0] > 200 and image.std() > 0
