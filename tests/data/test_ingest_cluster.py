"""Ingest on a real Dask LocalCluster: the same store bytes as a local ingest on any number of
workers, through a worker SIGKILL and a driver SIGKILL, and a clear error when the workers
cannot reach the store."""
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import zarr
from PIL import Image

from cnnx import data

distributed = pytest.importorskip("distributed")

SETTINGS = {"image_size": (12, 10), "chunk_size": 3}


def write_photos(root, n_per_class=7, seed=0):
    """Two classes of noisy JPEGs and PNGs of several sizes and modes, plus two broken files."""
    rng = np.random.default_rng(seed)
    for label, name in enumerate(("cats", "dogs")):
        os.makedirs(root / name, exist_ok=True)
        for i in range(n_per_class):
            size = (int(rng.integers(30, 70)), int(rng.integers(30, 70)))
            pixels = rng.integers(0, 256, (*size, 3), dtype=np.uint8)
            image = Image.fromarray(pixels).convert(("RGB", "L", "RGBA")[i % 3])
            if i % 2:
                image.convert("RGB" if image.mode == "RGBA" else image.mode).save(
                    root / name / f"{i}.jpg", quality=85)
            else:
                image.save(root / name / f"{i}.png")
    (root / "dogs" / "broken.jpg").write_bytes(b"\xff\xd8\xff not really")
    (root / "cats" / "empty.png").write_bytes(b"")
    return root


def store_contents(store):
    """Every array's bytes and every attribute of a store."""
    group = zarr.open_group(str(store), mode="r")
    return ({name: group[name][...] for name in ("images", "labels")}, group.attrs.asdict())


def assert_same_store(a, b):
    (arrays_a, attrs_a), (arrays_b, attrs_b) = store_contents(a), store_contents(b)
    for name in arrays_a:
        assert arrays_a[name].dtype == arrays_b[name].dtype
        np.testing.assert_array_equal(arrays_a[name], arrays_b[name], err_msg=name)
    assert attrs_a == attrs_b


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    return write_photos(tmp_path_factory.mktemp("cluster-photos") / "photos")


@pytest.fixture(scope="module")
def local_store(photos, tmp_path_factory):
    store = tmp_path_factory.mktemp("local") / "local.zarr"
    data.ingest(photos, store, workers=1, **SETTINGS)
    return store


@pytest.fixture(scope="module")
def client():
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster) as connected:
        yield connected


def test_cluster_ingest_equals_local_on_one_and_two_workers(photos, local_store, client,
                                                            tmp_path):
    summary = data.ingest(photos, tmp_path / "two.zarr", client=client, **SETTINGS)
    assert summary.n_images == 14 and len(summary.skipped) == 2
    assert_same_store(tmp_path / "two.zarr", local_store)
    with distributed.LocalCluster(n_workers=1, threads_per_worker=1, processes=True,
                                  host="127.0.0.1", dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster) as one:
        data.ingest(photos, tmp_path / "one.zarr", client=one, **SETTINGS)
    assert_same_store(tmp_path / "one.zarr", local_store)
    # and on two local processes, through the same runner interface
    data.ingest(photos, tmp_path / "processes.zarr", workers=2, **SETTINGS)
    assert_same_store(tmp_path / "processes.zarr", local_store)


def test_worker_killed_mid_ingest_still_gives_the_same_store(photos, local_store, client,
                                                             tmp_path):
    pids = client.run(os.getpid)
    killed = []

    def kill_a_busy_worker(done, total):
        if done == 1 and not killed:
            busy = [worker for worker, keys in client.processing().items() if keys]
            victim = (busy or sorted(pids))[0]
            os.kill(pids[victim], signal.SIGKILL)
            killed.append(victim)
    data.ingest(photos, tmp_path / "s.zarr", client=client, progress=kill_a_busy_worker,
                **SETTINGS)
    assert killed
    assert_same_store(tmp_path / "s.zarr", local_store)
    client.wait_for_workers(2, timeout=60)          # the nanny restarts it for later tests


KILLED_DRIVER = """
import os, signal, sys, time
from cnnx import data

def die_after_three(done, total):
    if done == 2:                      # the driver records finished chunks once a second
        time.sleep(1.2)
    if done == 3:                      # a hard crash of the driver: nothing cleans up
        os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    data.ingest(sys.argv[1], sys.argv[2], image_size=(12, 10), chunk_size=3,
                client=sys.argv[3], progress=die_after_three)
"""


def test_driver_killed_then_resumed_on_the_cluster(photos, local_store, client, tmp_path):
    script = tmp_path / "driver.py"
    script.write_text(KILLED_DRIVER)
    store = tmp_path / "s.zarr"
    run = subprocess.run([sys.executable, str(script), str(photos), str(store),
                          client.scheduler.address], capture_output=True, timeout=180)
    assert run.returncode == -9, run.stderr.decode()
    with pytest.raises(ValueError, match="incomplete"):
        data.open_dataset(store)
    summary = data.ingest(photos, store, client=client, **SETTINGS)
    assert summary.resumed_chunks >= 2
    assert_same_store(store, local_store)


def test_local_processes_and_a_cluster_together_are_refused(photos, client, tmp_path):
    with pytest.raises(ValueError, match="workers=2 counts local processes"):
        data.ingest(photos, tmp_path / "s.zarr", workers=2, client=client, **SETTINGS)


def test_store_the_workers_cannot_reach_is_named(photos, client):
    with pytest.raises(ValueError, match="Dask worker .* cannot open the store "
                                         "'memory://unreachable'.*reachable from every worker"):
        data.ingest(photos, "memory://unreachable", client=client, **SETTINGS)


def test_memory_source_and_store_on_an_in_process_cluster(photos, local_store):
    """memory:// lives in one process: it works with threads as workers (processes=False)."""
    import fsspec
    memory = fsspec.filesystem("memory")
    for root, _, files in os.walk(photos):
        for file in files:
            relative = os.path.relpath(os.path.join(root, file), photos)
            memory.pipe(f"/cluster-src/{relative}", open(os.path.join(root, file), "rb").read())
    with distributed.LocalCluster(n_workers=2, threads_per_worker=1, processes=False,
                                  dashboard_address="127.0.0.1:0") as cluster, \
            distributed.Client(cluster) as in_process:
        data.ingest("memory://cluster-src", "memory://cluster-store", client=in_process,
                    **SETTINGS)
    group = zarr.open_group("memory://cluster-store", mode="r")
    local = zarr.open_group(str(local_store), mode="r")
    np.testing.assert_array_equal(group["images"][...], local["images"][...])
    np.testing.assert_array_equal(group["labels"][...], local["labels"][...])
    assert group.attrs["skipped"] == local.attrs["skipped"]
    assert group.attrs["mean"] == local.attrs["mean"]


def test_an_unreachable_scheduler_is_reported_by_ingest_not_by_the_trainer(photos, tmp_path):
    with pytest.raises(ConnectionError, match=r"^ingest: could not reach a Dask scheduler at "
                                              r"'tcp://127.0.0.1:9'"):
        data.ingest(photos, tmp_path / "s.zarr", client="tcp://127.0.0.1:9", **SETTINGS)
    assert not (tmp_path / "s.zarr").exists()
