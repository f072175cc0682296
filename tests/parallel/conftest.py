"""Fixtures for the Dask tests: tiny stores, tiny models, one shared process cluster."""
import os

import numpy as np
import pytest

from cnnx import data, nn, optim

IMAGE = (8, 8, 1)


def learnable_arrays(n, seed=0):
    """Two classes: a bright 3x3 square top-left (class 1) or not (class 0), plus noise."""
    rng = np.random.default_rng(seed)
    y = (np.arange(n) % 2).astype(np.int64)
    rng.shuffle(y)
    x = rng.integers(0, 90, size=(n, *IMAGE)).astype(np.uint8)
    x[y == 1, 1:4, 1:4, :] += 150
    return x, y


def make_store(path, n=256, chunk_size=16, seed=0):
    x, y = learnable_arrays(n, seed)
    data.ingest_arrays(x, y, str(path), class_names=["plain", "square"], chunk_size=chunk_size)
    return data.open_dataset(str(path))


def tiny_model(seed=0, optimizer=None, dropout=0.25):
    model = nn.Sequential([nn.Conv2D(4, 3, padding="same", activation="relu"),
                           nn.MaxPool2D(2), nn.Flatten(),
                           nn.Dense(16, activation="relu"), nn.Dropout(dropout),
                           nn.Dense(2, activation="softmax")], input_shape=IMAGE, seed=seed)
    model.compile(optimizer=optimizer or optim.Adam(1e-2),
                  loss="sparse_categorical_crossentropy", metrics=["accuracy"])
    return model


@pytest.fixture(scope="session")
def store(tmp_path_factory):
    return make_store(tmp_path_factory.mktemp("stores") / "learnable.zarr")


@pytest.fixture(scope="session")
def cluster():
    """Two single-threaded worker processes on 127.0.0.1, shared by the session."""
    from distributed import Client, LocalCluster
    saved = dict(os.environ)
    local = LocalCluster(n_workers=2, threads_per_worker=1, processes=True, host="127.0.0.1",
                         dashboard_address=None)
    client = Client(local)
    os.environ.clear()
    os.environ.update(saved)        # the nanny writes OMP_NUM_THREADS=1 into our environment
    yield client
    client.close()
    local.close()


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)
