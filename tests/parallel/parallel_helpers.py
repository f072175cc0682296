"""Helpers for the Dask tests: tiny learnable stores, tiny models, a NaN-poisoned model."""
import numpy as np

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


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


class PoisonedSequential(nn.Sequential):
    poisoned_key = None

    def gradient(self, x, y, key=(0, 0, 0)):
        result = super().gradient(x, y, key)
        if tuple(key) == self.poisoned_key:
            name = next(iter(result.grads))
            result.grads[name] = np.full_like(result.grads[name], np.nan)
        return result


def poisoned_model(epoch, step, shard):
    model = PoisonedSequential([nn.Conv2D(4, 3, padding="same", activation="relu"),
                                nn.MaxPool2D(2), nn.Flatten(), nn.Dense(2, activation="softmax")],
                               input_shape=(8, 8, 1), seed=0)
    model.poisoned_key = (epoch, step, shard)
    model.compile(optimizer=optim.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


class SelfKillingSequential(nn.Sequential):
    """Logs every gradient it computes to `log_dir`; the first time it computes `kill_key` it
    SIGKILLs its own worker process mid-task, so Dask (or the driver) must run it again."""
    kill_key, log_dir = None, None

    def gradient(self, x, y, key=(0, 0, 0)):
        import os
        import signal
        with open(os.path.join(self.log_dir, "executions.txt"), "a") as log:
            log.write(" ".join(map(str, key)) + "\n")
        marker = os.path.join(self.log_dir, "killed")
        if tuple(key) == self.kill_key and not os.path.exists(marker):
            open(marker, "w").close()
            os.kill(os.getpid(), signal.SIGKILL)
        return super().gradient(x, y, key)


def self_killing_model(kill_key, log_dir):
    model = SelfKillingSequential([nn.Conv2D(4, 3, padding="same", activation="relu"),
                                   nn.MaxPool2D(2), nn.Flatten(),
                                   nn.Dense(2, activation="softmax")],
                                  input_shape=(8, 8, 1), seed=0)
    model.kill_key, model.log_dir = tuple(kill_key), str(log_dir)
    model.compile(optimizer=optim.Adam(1e-2), loss="sparse_categorical_crossentropy",
                  metrics=["accuracy"])
    return model


def shard_gradient_for_test(model, store, indices):
    """One shard's (GradientSum, stats) computed on a worker, as the async driver receives it."""
    from cnnx.data import open_dataset
    from cnnx.parallel import worker
    spec = {"store": store, "opener": open_dataset, "indices": np.asarray(indices),
            "normalize": "standardize", "augment": None, "seed": 0, "cache_bytes": 2**20}
    return worker.shard_gradient(model, model.get_weights(), spec, (5, 0, 0))
