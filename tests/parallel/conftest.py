"""Fixtures for the Dask tests: a tiny store and one shared two-worker process cluster."""
import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))   # --import-mode=importlib: make helpers importable
from parallel_helpers import make_store  # noqa: E402


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("stores") / "learnable.zarr")


@pytest.fixture(scope="session")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1, shared by the session."""
    from distributed import Client, LocalCluster
    saved = dict(os.environ)
    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address="127.0.0.1:0")
    client = Client(local)
    os.environ.clear()
    os.environ.update(saved)        # the nanny writes OMP_NUM_THREADS=1 into our environment
    yield client
    client.close()
    local.close()
