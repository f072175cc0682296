"""The command line as a new user meets it (issue 11): the README's commands work as written,
and every mistake gets one line on stderr and exit status 2, before anything starts.

All through the installed `cnnx` script in subprocesses, on real image files and real
Dask clusters; one model trained on the bundled faces set serves most tests."""
import contextlib
import importlib.metadata
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
from skimage import io

sys.path.insert(0, str(Path(__file__).resolve().parent))        # tests/cli/commandline.py
from commandline import CNNX, cnnx, cnnx_env, write_photo_folder  # noqa: E402

from cnnx import report  # noqa: E402

PHOTO_CLASSES = {"cat": "chelsea", "coffee": "coffee"}


def one_error_line(result, *named):
    """The result failed with exit 2 and exactly one stderr line naming every `named`."""
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("cnnx"), lines
    for text in named:
        assert text in lines[0], lines[0]
    return lines[0]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """The user's working folder: runs/faces trained as the README does it, relative paths."""
    folder = tmp_path_factory.mktemp("user")
    trained = cnnx("train", "--data", "faces", "--epochs", 1, "--batch-size", 8,
                   "--workers", 1, "--out", "runs/faces", "--quiet", cwd=folder)
    assert trained.returncode == 0, trained.stderr[-3000:]
    return folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """photos.zarr from 30 real photo files of two classes, made with `cnnx ingest`."""
    folder = tmp_path_factory.mktemp("photos")
    write_photo_folder(folder / "photos", PHOTO_CLASSES, n_per_class=15)
    ingested = cnnx("ingest", "photos", "photos.zarr", "--size", 16, 16, "--processes", 1,
                    cwd=folder)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    assert "30" in ingested.stdout
    return folder


# -------------------------------------------------------------- 1. README's evaluate form

def test_evaluate_as_the_readme_writes_it(workdir):
    result = cnnx("evaluate", "runs/faces/model.npz", "--data", "faces", cwd=workdir)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "accuracy" in result.stdout and "true \\ predicted" in result.stdout
    # the test split: 15% of the 200 faces
    assert "on 30 images" in result.stdout


def test_evaluate_from_another_working_folder(workdir):
    result = cnnx("evaluate", workdir / "runs" / "faces" / "model.npz", "--data", "faces",
                  cwd=workdir / "runs")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "on 30 images" in result.stdout


# -------------------------------------------------------------- 2. a finished run stays

def test_train_refuses_to_replace_a_finished_run(workdir):
    model = workdir / "runs" / "faces" / "model.npz"
    before = model.read_bytes()
    result = cnnx("train", "--data", "faces", "--epochs", 1, "--batch-size", 8, "--workers", 1,
                  "--out", "runs/faces", "--quiet", cwd=workdir)
    one_error_line(result, "runs/faces", "finished run", "--resume", "--overwrite")
    assert "Dask scheduler" not in result.stdout
    assert model.read_bytes() == before


def test_overwrite_replaces_a_finished_run(workdir, tmp_path):
    shutil.copytree(workdir / "runs" / "faces", tmp_path / "again")
    old_model = (tmp_path / "again" / "model.npz").read_bytes()
    result = cnnx("train", "--data", "faces", "--epochs", 1, "--batch-size", 10,
                  "--workers", 1, "--seed", 3, "--out", "again", "--overwrite", "--quiet",
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert (tmp_path / "again" / "model.npz").read_bytes() != old_model
    assert re.search(r"\| batch size +\| 10 +\|", (tmp_path / "again" / "report.md").read_text())


# -------------------------------------------------------------- 3. a small photo folder

def test_small_folder_trains_with_a_shard_count_that_fits(photos):
    # 30 photos in one chunk: 2 workers would leave the second shard empty
    result = cnnx("train", "--data", "photos.zarr", "--arch", "small", "--epochs", 1,
                  "--batch-size", 8, "--workers", 2, "--out", "small", "--quiet", cwd=photos)
    assert result.returncode == 0, result.stderr[-3000:]
    assert re.search(r"\| shards +\| 1 +\|", (photos / "small" / "report.md").read_text())


def test_small_folder_names_the_flags_when_shards_cannot_fit(photos):
    result = cnnx("train", "--data", "photos.zarr", "--arch", "small", "--epochs", 1,
                  "--batch-size", 8, "--workers", 2, "--shards", 2, cwd=photos)
    one_error_line(result, "--shards 2", "--batch-size 8")
    assert "Dask scheduler" not in result.stdout        # refused before a cluster started
    assert "batch_size" not in result.stderr and "chunk_size" not in result.stderr


def test_small_folder_with_the_readme_batch_size(photos):
    # the README's `--batch-size 64 --workers 2` on 30 photos (22 for training)
    result = cnnx("train", "--data", "photos.zarr", "--arch", "glasses", "--epochs", 10,
                  "--batch-size", 64, "--workers", 2, cwd=photos)
    one_error_line(result, "--batch-size 64", "holds 22 of the 30 images")
    assert "Dask scheduler" not in result.stdout
    assert not (photos / "cnnx-runs").exists()


# -------------------------------------------------------------- 4. numbers

@pytest.mark.parametrize("flags, named", [
    (["--batch-size", 0], "--batch-size"),
    (["--epochs", -1], "--epochs"),
    (["--epochs", 0], "--epochs"),
    (["--workers", 0], "--workers"),
    (["--lr", -0.1], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--shards", 0], "--shards"),
    (["--seed", -1], "--seed"),
    (["--batch-size", 32, "--shards", 3], "--shards 3"),
], ids=lambda v: " ".join(map(str, v)) if isinstance(v, list) else None)
def test_train_refuses_bad_numbers_before_anything_starts(flags, named, tmp_path):
    result = cnnx("train", "--data", "faces", *flags, cwd=tmp_path, timeout=60)
    one_error_line(result, named)
    assert "Dask scheduler" not in result.stdout
    assert list(tmp_path.iterdir()) == []               # no run folder, no data written


@pytest.mark.parametrize("args, named", [
    (["grid", "--lrs", 0.1, 0, "--batch-sizes", 16], "--lrs"),
    (["grid", "--batch-sizes", 16, -8], "--batch-sizes"),
    (["synth", "out.zarr", "--n", 0], "--n"),
    (["synth", "out.zarr", "--n", 8, "--size", 0, 16], "--size"),
    (["visualize", "model.npz", "image.png", "--max-maps", 0], "--max-maps"),
    (["bench", "--threads", 0], "--threads"),
], ids=["grid-lr", "grid-batch", "synth-n", "synth-size", "visualize-maps", "bench-threads"])
def test_other_commands_refuse_bad_numbers(args, named, tmp_path):
    result = cnnx(*args, cwd=tmp_path, timeout=60)
    one_error_line(result, named)
    assert list(tmp_path.iterdir()) == []


def test_numbers_from_a_config_file_are_checked_too(tmp_path):
    (tmp_path / "run.toml").write_text("[train]\nbatch-size = 0\n")
    result = cnnx("--config", "run.toml", "train", cwd=tmp_path, timeout=60)
    one_error_line(result, "--batch-size")


# -------------------------------------------------------------- 5. damaged model files

def test_truncated_model_file_is_one_line(workdir, tmp_path):
    whole = (workdir / "runs" / "faces" / "model.npz").read_bytes()
    (tmp_path / "model.npz").write_bytes(whole[: len(whole) // 2])
    for command in (["evaluate", "model.npz", "--data", "faces"],
                    ["predict", "model.npz", "x.png"]):
        result = cnnx(*command, cwd=tmp_path, timeout=60)
        one_error_line(result, "'model.npz'", "truncated")


def test_text_file_named_model_npz_is_one_line_without_pickle_advice(tmp_path):
    (tmp_path / "model.npz").write_text("my notes about the model\n")
    result = cnnx("evaluate", "model.npz", "--data", "faces", cwd=tmp_path, timeout=60)
    line = one_error_line(result, "'model.npz'", "not a model file")
    assert "pickle" not in line


# -------------------------------------------------------------- 6. predict, one bad file

def test_predict_reports_every_image_when_one_is_bad(workdir, tmp_path):
    from skimage import data as samples

    io.imsave(tmp_path / "a.png", samples.camera()[100:300, 150:350], check_contrast=False)
    io.imsave(tmp_path / "b.png", samples.astronaut()[:200, 150:350], check_contrast=False)
    (tmp_path / "notes.jpg").write_text("not a picture")
    model = workdir / "runs" / "faces" / "model.npz"
    result = cnnx("predict", model, "a.png", "b.png", "notes.jpg", "--json", cwd=tmp_path)
    rows = [json.loads(line) for line in result.stdout.strip().splitlines()]
    assert [row["path"] for row in rows] == ["a.png", "b.png", "notes.jpg"]
    for row in rows[:2]:
        assert row["class"] in ("face", "non_face") and "error" not in row
        assert sum(row["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
    assert "class" not in rows[2]
    assert rows[2]["error"].startswith("cannot read image")
    one_error_line(result, "1 of 3 images", "notes.jpg")

    plain = cnnx("predict", model, "a.png", "notes.jpg", cwd=tmp_path)
    assert plain.returncode == 2
    assert plain.stdout.splitlines()[0].startswith("a.png: ")
    assert plain.stdout.splitlines()[1].startswith("notes.jpg: error: cannot read image")


# -------------------------------------------------------------- 7. other classes

def test_model_on_a_store_with_other_classes_is_one_line(workdir, tmp_path):
    write_photo_folder(tmp_path / "three", {"cat": "chelsea", "coffee": "coffee",
                                             "rocket": "rocket"}, n_per_class=3)
    ingested = cnnx("ingest", "three", "three.zarr", "--size", 25, 25, "--grayscale",
                    "--processes", 1, cwd=tmp_path)
    assert ingested.returncode == 0, ingested.stderr[-3000:]
    model = workdir / "runs" / "faces" / "model.npz"
    for split in ("all", "test"):
        result = cnnx("evaluate", model, "--data", "three.zarr", "--split", split, cwd=tmp_path)
        one_error_line(result, "2 classes", "face, non_face", "has 3", "cat, coffee, rocket")


# -------------------------------------------------------------- 8. Ctrl-C

def interrupt_training(cwd, out, *moments, timeout=120):
    """Start `cnnx train` in its own process group (as a shell starts a job); at each moment
    (a function of the process, true when it has come) send SIGINT to the whole group, as
    a terminal's Ctrl-C does, unless training has ended by then. Returns (exit status,
    stdout, stderr)."""
    with open(cwd / "stdout.txt", "w") as stdout, open(cwd / "stderr.txt", "w") as stderr:
        process = subprocess.Popen(
            [CNNX, "train", "--data", "faces", "--epochs", "1000", "--batch-size", "8",
             "--workers", "2", "--out", out, "--quiet"], cwd=cwd, stdout=stdout, stderr=stderr,
            env=cnnx_env(), start_new_session=True)
        try:
            for moment in moments:
                deadline = time.monotonic() + timeout
                while process.poll() is None and not moment(process):
                    assert time.monotonic() < deadline, "training did not get going"
                    time.sleep(0.05)
                if process.poll() is not None:
                    break
                os.killpg(process.pid, signal.SIGINT)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
            status = process.wait(timeout=60)
        finally:
            if process.poll() is None:
                os.killpg(process.pid, signal.SIGKILL)
                process.wait()
    time.sleep(1)               # anything the workers still had to say
    return status, (cwd / "stdout.txt").read_text(), (cwd / "stderr.txt").read_text()


def test_ctrl_c_during_training_is_one_line_that_says_how_to_resume(workdir, tmp_path):
    shutil.copytree(workdir / "runs" / "faces" / "data", tmp_path / "run" / "data")
    checkpoint = tmp_path / "run" / "checkpoints" / "checkpoint.npz"
    status, stdout, stderr = interrupt_training(tmp_path, "run",
                                                lambda process: checkpoint.exists())
    assert status == 130
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr[-3000:]
    assert "interrupted" in lines[0] and "--resume" in lines[0]


def test_ctrl_c_while_the_workers_start_prints_no_tracebacks(tmp_path):
    """Workers interrupted while they import and start printed pages of tracebacks. Now
    they ignore Ctrl-C; the driver stops at once or, when a thread of its own swallowed
    the signal during the start, at the next Ctrl-C (sent once training runs)."""
    checkpoint = tmp_path / "runs" / "early" / "checkpoints" / "checkpoint.npz"

    def workers_starting(process):
        # the worker processes exist but are still importing
        return len(psutil.Process(process.pid).children(recursive=True)) >= 2

    status, stdout, stderr = interrupt_training(tmp_path, "runs/early", workers_starting,
                                                lambda process: checkpoint.exists())
    assert status == 130
    lines = stderr.strip().splitlines()
    assert "Traceback" not in stderr
    assert len(lines) == 1, stderr[-3000:]
    assert lines[0].startswith("cnnx: interrupted")
    # a run interrupted before its first checkpoint leaves no folder behind
    assert (tmp_path / "runs").exists() == checkpoint.exists()


# -------------------------------------------------------------- 9. help, version, leftovers

def test_help_shows_defaults_and_explains_the_modes():
    result = cnnx("train", "--help")
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    for default in ["(default: 12)", "(default: 32)", "(default: 0.001)", "(default: adam)",
                    "(default: sync)", "(default: 0)"]:
        assert default in text, default
    assert "--shards SHARDS virtual shards per step" in text
    assert "default: the number of workers, fewer if the data is too small" in text
    for mode in ["sync", "downpour", "dynsgd", "adag", "easgd"]:
        assert f"\n  {mode} " in result.stdout, mode
    assert "--seed SEED seed of the initial weights" in text
    grid = " ".join(cnnx("grid", "--help").stdout.split())
    assert "learning rates, one grid row each (default: 0.1 0.01 0.001 0.0001)" in grid
    assert "global batch sizes, one grid column each (default: 16 32 64)" in grid
    for command in ("ingest", "synth"):
        text = " ".join(cnnx(command, "--help").stdout.split())
        assert "height and width in pixels" in text and "(default: 80 80)" in text, command


def test_version_and_bare_command():
    version = cnnx("--version")
    assert version.returncode == 0
    assert version.stdout.strip() == f"cnnx {importlib.metadata.version('cnnx')}"
    bare = cnnx()
    assert bare.returncode == 0 and bare.stderr == ""
    assert bare.stdout.startswith("usage: cnnx") and "train" in bare.stdout


def test_a_failed_run_leaves_no_folder_in_cnnx_runs(workdir, photos, tmp_path):
    shutil.copytree(photos / "photos.zarr", tmp_path / "photos.zarr")
    # fails after the cluster started: the faces model's architecture takes 25x25x1
    result = cnnx("train", "--data", "photos.zarr", "--arch", workdir / "runs/faces/model.npz",
                  "--epochs", 1, "--batch-size", 8, "--workers", 1, "--quiet", cwd=tmp_path)
    one_error_line(result, "takes images of (25, 25, 1)")
    assert "Dask scheduler" in result.stdout
    assert not (tmp_path / "cnnx-runs").exists()


def test_one_epoch_curves_have_integer_ticks(workdir, tmp_path):
    history = {"loss": [0.7], "accuracy": [0.55], "val_loss": [0.6], "val_accuracy": [0.6]}
    figure = report.history_figure(history)
    for axes in figure.axes:
        low, high = axes.get_xlim()
        assert [tick for tick in axes.get_xticks() if low <= tick <= high] == [1]
    history = {key: list(np.linspace(0.9, 0.1, 12)) for key in history}
    for axes in report.history_figure(history).axes:
        low, high = axes.get_xlim()
        ticks = [tick for tick in axes.get_xticks() if low <= tick <= high]
        assert ticks == [round(tick) for tick in ticks] and min(ticks) >= 1 and max(ticks) == 12
    # the 1-epoch run's own curves.png is a real PNG
    assert io.imread(workdir / "runs" / "faces" / "curves.png").ndim == 3
