"""`cnnx ingest --workers N` (a local Dask cluster) against the local path, through real
subprocesses: the same store bytes, progress bar, --overwrite, resume and --help."""
import os
import subprocess
import sys

import numpy as np
import pytest
import zarr
from PIL import Image

from cnnx import data

CNNX = os.path.join(os.path.dirname(sys.executable), "cnnx")
ARGS = ("--size", 12, 10, "--chunk-size", 3)


def cnnx(*args, timeout=300):
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.run([CNNX, *map(str, args)], capture_output=True, text=True,
                          timeout=timeout, env=env)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli-cluster") / "photos"
    rng = np.random.default_rng(2)
    for name in ("day", "night"):
        os.makedirs(root / name)
        for i in range(6):
            pixels = rng.integers(0, 256, (24, 32, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.{'jpg' if i % 2 else 'png'}")
    (root / "night" / "broken.jpg").write_bytes(b"\xff\xd8 no")
    return root


def contents(store):
    group = zarr.open_group(str(store), mode="r")
    return group["images"][...], group["labels"][...], group.attrs.asdict()


def test_cluster_and_local_commands_write_the_same_store(photos, tmp_path):
    local = cnnx("ingest", photos, tmp_path / "local.zarr", "--processes", 1, *ARGS)
    cluster = cnnx("ingest", photos, tmp_path / "cluster.zarr", "--workers", 2, *ARGS)
    for run in (local, cluster):
        assert run.returncode == 0, run.stderr
        assert "12 images" in run.stdout and "night/broken.jpg" in run.stdout
        assert "ingest: 100%" in run.stderr and "5/5" in run.stderr   # the same progress bar
    assert "Dask scheduler tcp://127.0.0.1:" in cluster.stdout
    (images_a, labels_a, attrs_a), (images_b, labels_b, attrs_b) = (
        contents(tmp_path / "local.zarr"), contents(tmp_path / "cluster.zarr"))
    np.testing.assert_array_equal(images_a, images_b)
    np.testing.assert_array_equal(labels_a, labels_b)
    assert attrs_a == attrs_b

    # other settings into the same store: refused in one line, then replaced with --overwrite
    refused = cnnx("ingest", photos, tmp_path / "cluster.zarr", "--workers", 2,
                   "--size", 8, 8)
    assert refused.returncode == 2
    assert refused.stderr.strip().splitlines()[-1].startswith("cnnx: error: ingest: ")
    assert "--overwrite" in refused.stderr
    replaced = cnnx("ingest", photos, tmp_path / "cluster.zarr", "--workers", 2,
                    "--size", 8, 8, "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert data.open_dataset(tmp_path / "cluster.zarr").image_shape == (8, 8, 3)


def test_cluster_command_resumes_an_interrupted_ingest(photos, tmp_path):
    store = tmp_path / "s.zarr"

    def stop_after_two(done, total):
        if done == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        data.ingest(photos, store, image_size=(12, 10), chunk_size=3, progress=stop_after_two)
    run = cnnx("ingest", photos, store, "--workers", 2, *ARGS)
    assert run.returncode == 0, run.stderr
    assert "resumed: 2 chunks were already written" in run.stdout


def test_help_names_both_paths_and_bad_counts_are_one_line():
    shown = cnnx("ingest", "--help")
    assert shown.returncode == 0
    for flag in ("--processes", "--scheduler ADDRESS", "--workers", "--overwrite",
                 "default: 80 80"):
        assert flag in shown.stdout
    for flag in ("--workers", "--processes"):
        run = cnnx("ingest", "a", "b.zarr", flag, 0)
        assert run.returncode == 2
        assert run.stderr.strip() == f"cnnx: error: {flag} must be a positive integer, got 0"
