"""Asynchronous modes: they learn, record staleness, and commit every unit exactly once."""
import collections
import json

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster

import parallel_helpers
from cnnx.parallel import ADAG, EASGD, DaskTrainer, Downpour, DynSGD, Sync
from parallel_helpers import assert_same_weights, tiny_model

cloudpickle.register_pickle_by_value(parallel_helpers)      # workers cannot import it


MODE_OBJECTS = {"downpour": Downpour(), "dynsgd": DynSGD(),
                "adag": ADAG(tau=2, local_learning_rate=0.1),
                "easgd": EASGD(tau=2, alpha=0.5, local_learning_rate=0.1)}


@pytest.mark.parametrize("mode", list(MODE_OBJECTS))
def test_async_mode_learns_and_records_staleness(mode, cluster, store, tmp_path):
    _, val, _ = store.split(0.75, 0.25, 0.0, seed=0)
    model = tiny_model()
    trainer = DaskTrainer(model, cluster, mode=MODE_OBJECTS[mode], shards=4, progress=False,
                          echo=lambda *a: None, replay_log=tmp_path / "replay.jsonl")
    trainer.fit(store, epochs=3, batch_size=32, validation=val)
    assert trainer.mode == mode
    assert trainer.history[-1]["val_accuracy"] > 0.9
    window = 1 if mode in ("downpour", "dynsgd") else 2
    assert len(trainer.commits) == 3 * 4 * (8 // window)
    assert len(trainer.staleness) == 2 and all(trainer.staleness.values())
    assert max(max(s) for s in trainer.staleness.values()) >= 1    # two units in flight
    replay = (tmp_path / "replay.jsonl").read_text().splitlines()
    assert len(replay) == len(trainer.commits)


def test_a_result_delivered_twice_is_applied_once(cluster, store):
    model = tiny_model()
    trainer = DaskTrainer(model, cluster, mode="downpour", shards=4, progress=False,
                          echo=lambda *a: None)
    trainer.fit(store, epochs=1, batch_size=32)
    future = cluster.submit(parallel_helpers.shard_gradient_for_test, model,
                            store.store, [0, 1, 2, 3], pure=False)
    result = future.result()
    before = model.get_weights()
    assert trainer.async_driver.commit((5, 0, 0), trainer.version, result) is not None
    after_first = model.get_weights()
    assert trainer.async_driver.commit((5, 0, 0), trainer.version, result) is None
    assert trainer.duplicates == 1
    assert_same_weights(model.get_weights(), after_first)
    assert any(not np.array_equal(before[k], after_first[k]) for k in before)


def test_a_task_rerun_after_its_worker_died_commits_once(store, tmp_path):
    model = parallel_helpers.self_killing_model((0, 3, 1), tmp_path)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        trainer = DaskTrainer(model, client, mode="downpour", shards=4, progress=False,
                              echo=lambda *a: None)
        trainer.fit(store, epochs=1, batch_size=32)
    executions = collections.Counter((tmp_path / "executions.txt").read_text().splitlines())
    assert executions["0 3 1"] == 2                          # killed once, run again
    keys = [(c["epoch"], c["step"], c["shard"]) for c in trainer.commits]
    assert len(keys) == len(set(keys)) == 8 * 4
    assert (0, 3, 1) in keys


@pytest.mark.parametrize("mode", ["dynsgd", "easgd"])
def test_replay_log_reproduces_an_async_run_bit_for_bit(mode, cluster, store, tmp_path):
    log = tmp_path / "replay.jsonl"
    options = dict(mode=mode, shards=4, learning_rate=0.1, tau=2, progress=False,
                   echo=lambda *a: None)
    model = tiny_model()
    DaskTrainer(model, cluster, replay_log=log, **options).fit(store, epochs=2, batch_size=32)
    replayed = tiny_model()
    trainer = DaskTrainer(replayed, cluster, replay=log, **options)
    trainer.fit(store, epochs=2, batch_size=32)
    assert_same_weights(replayed.get_weights(), model.get_weights())
    original = [json.loads(line)["staleness"] for line in log.read_text().splitlines()]
    assert [c["staleness"] for c in trainer.commits] == original
    assert max(original) >= 1             # the run really was asynchronous


def test_mode_names_with_keywords_build_the_same_mode_objects(cluster):
    def options(mode, **keywords):
        return DaskTrainer(tiny_model(), cluster, mode=mode, progress=False,
                           echo=lambda *a: None, **keywords).mode_options

    assert options("adag", tau=3, learning_rate=0.2) == ADAG(tau=3, local_learning_rate=0.2)
    assert options("easgd", alpha=0.25) == EASGD(alpha=0.25)
    assert options("sync", sync_weights="broadcast") == Sync(weights="broadcast")
    assert options("dynsgd", max_in_flight=3) == DynSGD(max_in_flight=3)
    with pytest.raises(TypeError, match=r"\['tau'\] belong inside the mode object"):
        options(ADAG(), tau=2)
    with pytest.raises(ValueError, match="ADAG: tau must be a positive integer, got 0"):
        ADAG(tau=0)
    with pytest.raises(ValueError, match=r"EASGD: alpha must be in \(0, 1\], got 2"):
        EASGD(alpha=2)
    with pytest.raises(ValueError, match="mode must be one of .* got 'hogwild'"):
        options("hogwild")


def test_dynsgd_scales_by_staleness_inside_the_optimizer_pass(cluster, store):
    """DynSGD applies a gradient sum over n samples of staleness s as the mean over n·(s+1):
    the optimizer's fused pass divides, so no scaled copy of any gradient is made."""
    import tracemalloc

    from cnnx import nn, optim
    model = nn.Sequential([nn.Conv2D(4, 3, padding="same", activation="relu"),
                           nn.MaxPool2D(2), nn.Flatten(), nn.Dense(4096, activation="relu"),
                           nn.Dense(2, activation="softmax")],
                          input_shape=parallel_helpers.IMAGE, seed=0)
    model.compile(optimizer=optim.SGD(0.1), loss="sparse_categorical_crossentropy")
    total, stats = parallel_helpers.shard_gradient_for_test(model, store.store, range(16))
    trainer = DaskTrainer(model, cluster, mode="dynsgd", shards=4, progress=False,
                          echo=lambda *a: None)
    trainer.async_driver.version = 2                          # two commits since it started
    before = model.get_weights()
    tracemalloc.start()
    try:
        record = trainer.async_driver.commit((0, 0, 0), 0, (total, stats))
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record["staleness"] == 2
    for name, grad in total.grads.items():
        expected = before[name] - 0.1 * grad.astype(np.float64) / (total.n_samples * 3)
        np.testing.assert_allclose(model.get_weights()[name], expected, rtol=1e-5,
                                   atol=1e-7, err_msg=name)
    kernel_bytes = total.grads["dense/kernel"].nbytes            # 1 MB
    assert peak < kernel_bytes / 4, f"the commit allocated {peak} bytes at its peak"
