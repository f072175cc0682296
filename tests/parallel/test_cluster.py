"""Clusters: a scheduler address, our own LocalCluster, bad addresses, stores and elasticity."""
import json
import shutil
import subprocess
import sys
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

from cnnx.parallel import DaskTrainer, StoreError
from parallel_helpers import assert_same_weights, tiny_model

QUIET = {"progress": False, "echo": lambda *a: None}


def dask_command(*args):
    return [sys.executable, "-m", "distributed.cli.dask_" + args[0], *args[1:]]


@pytest.fixture
def scheduler_and_two_workers(tmp_path):
    """`dask scheduler` and two `dask worker` processes on 127.0.0.1, as a user starts them."""
    scheduler_file = tmp_path / "scheduler.json"
    processes = [subprocess.Popen(
        dask_command("scheduler", "--host", "127.0.0.1", "--port", "0",
                     "--dashboard-address", "127.0.0.1:0", "--scheduler-file", str(scheduler_file)),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not scheduler_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(0.2)
        address = json.loads(scheduler_file.read_text())["address"]
        for _ in range(2):
            processes.append(subprocess.Popen(
                dask_command("worker", address, "--nthreads", "1", "--host", "127.0.0.1",
                             "--no-dashboard"), stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL))
        yield address
    finally:
        for process in reversed(processes):
            process.terminate()
        for process in processes:
            process.wait(timeout=30)


def test_training_through_a_scheduler_address(scheduler_and_two_workers, cluster, store):
    model = tiny_model()
    trainer = DaskTrainer(model, scheduler_and_two_workers, shards=4, **QUIET)
    assert trainer.client.scheduler.address == scheduler_and_two_workers
    trainer.client.wait_for_workers(2, timeout=30)
    trainer.fit(store, epochs=1, batch_size=32)
    trainer.client.close()
    assert trainer.steps[-1]["workers"] == 2
    expected = tiny_model()
    DaskTrainer(expected, cluster, shards=4, **QUIET).fit(store, epochs=1, batch_size=32)
    assert_same_weights(model.get_weights(), expected.get_weights())


def test_no_client_starts_a_local_cluster_on_localhost(store):
    said = []
    with DaskTrainer(tiny_model(), None, shards=2, progress=False, echo=said.append) as trainer:
        assert trainer.client.scheduler.address.startswith("tcp://127.0.0.1:")
        workers = trainer.client.scheduler_info()["workers"].values()
        assert all(w["nthreads"] == 1 for w in workers) and len(workers) >= 1
        trainer.fit(store, epochs=1, batch_size=32)
    assert "dashboard http://127.0.0.1:" in said[0]


def test_unreachable_scheduler_fails_fast_and_clearly():
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=r"could not reach a Dask scheduler at "
                                              r"'tcp://127.0.0.1:9' within 2 s"):
        DaskTrainer(tiny_model(), "tcp://127.0.0.1:9", connect_timeout=2, **QUIET)
    assert time.monotonic() - started < 15


def test_a_store_the_workers_cannot_open_names_store_and_worker(cluster, store, tmp_path):
    path = tmp_path / "moved.zarr"
    shutil.copytree(store.store, path)
    dataset = type(store)(str(path))        # opened here, on the driver
    shutil.rmtree(path)                      # ... and gone by the time the workers look
    trainer = DaskTrainer(tiny_model(), cluster, shards=4, **QUIET)
    with pytest.raises(StoreError, match=rf"worker tcp://127\.0\.0\.1:\d+ cannot .*{path}"):
        trainer.fit(dataset, epochs=1, batch_size=32)


def test_no_workers_waits_with_a_message_then_times_out(store):
    said = []
    with LocalCluster(n_workers=0, host="127.0.0.1", dashboard_address="127.0.0.1:0") as local, \
            Client(local) as client:
        trainer = DaskTrainer(tiny_model(), client, shards=4, worker_timeout=1,
                              progress=False, echo=said.append)
        started = time.monotonic()
        with pytest.raises(TimeoutError, match="no Dask workers joined .* within 1 s"):
            trainer.fit(store, epochs=1, batch_size=32)
        assert time.monotonic() - started < 10
    assert any("waiting up to 1 s" in line for line in said)


def test_a_worker_that_joins_mid_run_gets_work_and_changes_no_bit(cluster, store):
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        def grow(trainer, record):
            if record["step"] == 1 and record["epoch"] == 0:
                local.scale(2)
                client.wait_for_workers(2, timeout=30)

        model = tiny_model()
        trainer = DaskTrainer(model, client, shards=4, **QUIET)
        trainer.fit(store, epochs=1, batch_size=32, callbacks=[grow])
    assert trainer.steps[0]["workers"] == 1 and trainer.steps[-1]["workers"] == 2
    assert len(trainer.steps[-1]["tasks_per_worker"]) == 2
    expected = tiny_model()
    DaskTrainer(expected, cluster, shards=4, **QUIET).fit(store, epochs=1, batch_size=32)
    assert_same_weights(model.get_weights(), expected.get_weights())


@pytest.fixture
def http_server():
    """A real HTTP server on 127.0.0.1 in a thread: what a mistyped port often reaches."""
    import http.server
    import threading
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def chatty_server():
    """A socket server on 127.0.0.1 that answers every connection with bytes that are not
    Dask's (an SSH or SMTP banner, say)."""
    import socketserver
    import threading

    class Banner(socketserver.BaseRequestHandler):
        def handle(self):
            self.request.sendall(b"SSH-2.0-OpenSSH_9.2p1 Debian-2\r\n" * 4)
            self.request.recv(1024)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Banner)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"tcp://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.mark.parametrize("server", ["http_server", "chatty_server"])
def test_a_scheduler_address_where_something_else_listens_fails_fast(server, request):
    address = request.getfixturevalue(server)
    started = time.monotonic()
    with pytest.raises(ConnectionError, match=rf"could not reach a Dask scheduler at "
                                              rf"'{address}' within 2 s"):
        DaskTrainer(tiny_model(), address, connect_timeout=2, **QUIET)
    assert time.monotonic() - started < 15


def test_close_closes_the_client_it_opened_from_an_address(cluster):
    trainer = DaskTrainer(tiny_model(), cluster.scheduler.address, **QUIET)
    assert trainer.client.status == "running"
    trainer.close()
    assert trainer.client.status == "closed"
    assert cluster.status == "running"                # a Client we were given stays open
    DaskTrainer(tiny_model(), cluster, **QUIET).close()
    assert cluster.status == "running"


def test_evaluate_works_before_fit(cluster, store):
    model = tiny_model()
    trainer = DaskTrainer(model, cluster, **QUIET)
    result = trainer.evaluate(np.arange(64), dataset=store)
    x, y = store.read(np.arange(64))
    loss, accuracy = model.evaluate(store.normalize(x), y)
    assert result["accuracy"] == pytest.approx(accuracy)
    assert result["loss"] == pytest.approx(loss, rel=1e-5)
    with pytest.raises(ValueError, match="before fit.*dataset="):
        DaskTrainer(model, cluster, **QUIET).evaluate(np.arange(64))
