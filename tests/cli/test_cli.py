"""The `cnnx` command end to end, through subprocesses, on a tiny store of real image files."""
import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
from skimage import io

sys.path.insert(0, str(Path(__file__).resolve().parent))        # tests/cli/commandline.py
from commandline import CNNX, cnnx, write_image_folder  # noqa: E402

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    source = write_image_folder(root / "images")
    result = cnnx("ingest", source, root / "tiny.zarr", "--size", 16, 16, "--chunk-size", 8,
                  "--processes", 1)
    assert result.returncode == 0, result.stderr
    return root / "tiny.zarr"


@pytest.fixture(scope="module")
def trained_run(store, tmp_path_factory):
    out = tmp_path_factory.mktemp("run")
    result = cnnx("train", "--data", store, "--epochs", 2, "--batch-size", 8, "--workers", 1,
                  "--out", out, "--quiet")
    return out, result


def test_script_is_installed():
    assert os.access(CNNX, os.X_OK), f"the `cnnx` entry point is missing at {CNNX}"


def test_help_for_every_subcommand():
    for command in ["ingest", "synth", "train", "evaluate", "predict", "grid", "bench"]:
        result = cnnx(command, "--help")
        assert result.returncode == 0, (command, result.stderr)
        assert "usage: cnnx " + command in result.stdout


def test_ingest_reports_what_it_wrote(store):
    from cnnx import data

    dataset = data.open_dataset(str(store))
    assert len(dataset) == 48
    assert tuple(dataset.image_shape) == (16, 16, 3)
    assert list(dataset.class_names) == ["bright_left", "dark_left"]


def test_train_writes_every_output_file(trained_run):
    out, result = trained_run
    assert result.returncode == 0, result.stderr[-3000:]
    for name in ["model.npz", "architecture.json", "run.json", "history.csv", "curves.png",
                 "confusion.png", "report.md"]:
        assert (out / name).is_file(), f"{name} missing from the run folder"
    for picture in ["curves.png", "confusion.png"]:
        assert (out / picture).read_bytes()[:8] == PNG_SIGNATURE
        assert io.imread(out / picture).ndim == 3        # decodes as a real image
    history = (out / "history.csv").read_text().splitlines()
    assert len(history) == 1 + 2                         # header + one row per epoch
    report = (out / "report.md").read_text()
    assert "test accuracy" in report and "images/s" in report
    assert "dashboard" in result.stdout or "Dask scheduler" in result.stdout
    assert "test accuracy" in result.stdout


def test_evaluate_prints_metrics_and_confusion(trained_run, store):
    out, _ = trained_run
    result = cnnx("evaluate", out / "model.npz", "--data", store)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy" in result.stdout
    assert "true \\ predicted" in result.stdout
    assert "bright_left" in result.stdout and "dark_left" in result.stdout


def test_evaluate_refuses_the_test_split_of_another_store(trained_run, tmp_path):
    out, _ = trained_run
    other = write_image_folder(tmp_path / "other", n_per_class=8, seed=1)
    assert cnnx("ingest", other, tmp_path / "other.zarr", "--size", 16, 16,
                "--processes", 1).returncode == 0
    result = cnnx("evaluate", out / "model.npz", "--data", tmp_path / "other.zarr")
    assert result.returncode == 2 and "--split all" in result.stderr
    result = cnnx("evaluate", out / "model.npz", "--data", tmp_path / "other.zarr",
                  "--split", "all")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 16 images" in result.stdout


def test_predict_json_names_a_known_class(trained_run, tmp_path):
    out, _ = trained_run
    image = np.zeros((40, 30, 3), np.uint8)
    image[:, :15] = 230                                  # bright left half, other size
    io.imsave(tmp_path / "query.png", image, check_contrast=False)
    result = cnnx("predict", out / "model.npz", tmp_path / "query.png", "--json")
    assert result.returncode == 0, result.stderr[-3000:]
    row = json.loads(result.stdout.strip().splitlines()[-1])
    assert row["class"] in ("bright_left", "dark_left")
    assert 0.0 <= row["probability"] <= 1.0
    assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)


def test_grid_prints_one_row_per_cell(store, tmp_path):
    result = cnnx("grid", "--data", store, "--lrs", 0.01, 0.001, "--batch-sizes", 8, 16,
                  "--epochs", 1, "--workers", 1, "--out", tmp_path, "--quiet")
    assert result.returncode == 0, result.stderr[-3000:]
    table = (tmp_path / "grid.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0.0")]
    assert len(rows) == 4
    assert "test accuracy" in result.stdout


def test_config_file_sets_defaults_and_flags_override(store, tmp_path):
    config = tmp_path / "cnnx.toml"
    config.write_text('[train]\nepochs = 1\narch = "no-such-net"\n')
    result = cnnx("--config", config, "train", "--data", store, "--out", tmp_path / "a")
    assert result.returncode == 2
    assert "unknown architecture 'no-such-net'" in result.stderr     # the config was read
    result = cnnx("--config", config, "train", "--data", store, "--arch", "small",
                  "--epochs", 1, "--workers", 1, "--quiet", "--out", tmp_path / "b")
    assert result.returncode == 0, result.stderr[-3000:]                # flags won
    assert len((tmp_path / "b" / "history.csv").read_text().splitlines()) == 1 + 1
    config.write_text('[train]\nepoch = 1\n')
    result = cnnx("--config", config, "train", "--data", store, cwd=tmp_path)
    assert result.returncode == 2 and "unknown keys ['epoch']" in result.stderr


@pytest.mark.parametrize("args, message", [
    (["train", "--data", "/no/such/store.zarr"], "no Zarr store at '/no/such/store.zarr'"),
    (["evaluate", "/no/model.npz", "--data", "faces"], "no model file at '/no/model.npz'"),
    (["train", "--scheduler", "tcp://127.0.0.1:9", "--data", "STORE"],
     "could not reach a Dask scheduler at 'tcp://127.0.0.1:9'"),
    (["train", "--optimizer", "adamw"], "unknown optimizer 'adamw'"),
    (["train", "--resume"], "--resume continues the run in --out DIR"),
], ids=["missing-store", "missing-model", "unreachable-scheduler", "unknown-optimizer",
        "resume-without-out"])
def test_errors_are_one_line_and_exit_2(args, message, store, tmp_path):
    args = [str(store) if a == "STORE" else a for a in args]
    result = cnnx(*args, timeout=60, cwd=tmp_path)
    assert result.returncode == 2
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_model_file_from_elsewhere_is_refused(tmp_path, store, trained_run):
    out, _ = trained_run
    foreign = tmp_path / "model.npz"
    np.savez(foreign, weights=np.zeros(3))
    (tmp_path / "run.json").write_text((out / "run.json").read_text())
    result = cnnx("evaluate", foreign, "--data", store)
    assert result.returncode == 2
    assert "is not a model saved by cnnx" in result.stderr
    assert "Traceback" not in result.stderr


def test_unknown_architecture_is_refused_before_anything_starts(store, tmp_path):
    result = cnnx("train", "--data", store, "--arch", "resnet9000", cwd=tmp_path)
    assert result.returncode == 2
    assert "unknown architecture 'resnet9000'" in result.stderr
    assert "Dask scheduler" not in result.stdout
    assert not (tmp_path / "cnnx-runs").exists()


def test_bench_quick_writes_a_report_and_json(tmp_path):
    result = cnnx("bench", "--quick", "--threads", 1, "--json", tmp_path / "bench.json")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "FMA peak GFLOP/s" in result.stdout
    figures = json.loads((tmp_path / "bench.json").read_text())
    assert figures["peak_gflops"]["1"] > 0
    assert figures["sgemm"]["1"]["gflops"] > 0
    assert figures["training"]["1"]["fashion"]["images_per_s"] > 0


def test_synth_then_train_on_the_synthetic_store(tmp_path):
    store = tmp_path / "glasses.zarr"
    result = cnnx("synth", store, "--n", 64, "--size", 32, 32, "--chunk-size", 16,
                  "--processes", 1)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "64 images" in result.stdout
    again = cnnx("synth", store, "--n", 32, "--size", 32, 32, "--chunk-size", 16,
                 "--processes", 1)
    assert again.returncode == 2 and "overwrite" in again.stderr      # never mixed silently
    replaced = cnnx("synth", store, "--n", 32, "--size", 32, 32, "--chunk-size", 16,
                    "--processes", 1, "--overwrite")
    assert replaced.returncode == 0 and "32 images" in replaced.stdout
