"""Synchronous training: bit-identical weights across worker counts, worker loss and resume."""
import collections
import os
import re
import signal
import threading
import time

import numpy as np
import pytest
from distributed import Client, LocalCluster

from cnnx.parallel import DaskTrainer, NonFiniteGradientError, plan
from parallel_helpers import assert_same_weights, tiny_model

SHARDS, BATCH, EPOCHS = 4, 32, 2


def train(client, store, callbacks=(), echo=lambda *a: None, **options):
    model = tiny_model()
    trainer = DaskTrainer(model, client, shards=options.pop("shards", SHARDS), progress=False,
                          echo=echo, **options)
    trainer.fit(store, epochs=EPOCHS, batch_size=BATCH, callbacks=callbacks)
    return model, trainer


@pytest.fixture(scope="module")
def reference(cluster, store):
    """The run every other run must reproduce bit for bit: G=4 on two workers."""
    model, trainer = train(cluster, store)
    return model.get_weights(), trainer


def test_sync_learns_and_records_phases(reference):
    _, trainer = reference
    assert len(trainer.steps) == EPOCHS * 256 // BATCH
    last = trainer.history[-1]
    assert last["accuracy"] > 0.9 and last["loss"] < trainer.history[0]["loss"]
    step = trainer.steps[-1]
    for phase in ("wait_s", "compute_s", "replica_apply_s", "images_per_s"):
        assert step[phase] > 0
    # weights and gradient sums stay on the workers (replicas); the driver gets the counts,
    # and every 8 steps the weights and optimizer state of one replica (3 P with Adam, and
    # its step count)
    weights = sum(a.nbytes for a in tiny_model().get_weights().values())
    assert [s["bytes_out"] for s in trainer.steps] == [0] * len(trainer.steps)
    assert [s["bytes_in"] for s in trainer.steps] == ([0] * 7 + [3 * weights + 8]) * EPOCHS
    assert sum(step["tasks_per_worker"].values()) == SHARDS


def test_traffic_counters_see_weights_and_gradients_crossing_workers(reference):
    # The plan for each step on two workers: one fetches the weights from the other, and the
    # top of the sum tree pulls a gradient sum across; both must count (Dask once weighed a
    # GradientSum at ~100 bytes, and this ratio was 1.7). Dask may copy more, never less.
    _, trainer = reference
    weights = sum(a.nbytes for a in tiny_model().get_weights().values())
    between = sum(epoch["bytes_between_workers"] for epoch in trainer.history)
    assert between >= 0.95 * 2 * weights * len(trainer.steps)


def test_one_worker_gives_the_same_bits_as_two(reference, store):
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        model, trainer = train(client, store)
    assert trainer.steps[-1]["workers"] == 1
    # one worker: nothing moves between workers (the driver's gather is bytes_in, counted
    # once); what is left is the names, stats and object headers around the tiny gradients
    last = trainer.history[-1]
    assert last["bytes_between_workers"] < 2048 * last["steps"]   # each step's counts, stats
    assert last["bytes_in"] > 0                      # the driver pulled the replica's state
    assert_same_weights(model.get_weights(), reference[0])


def test_broadcast_protocol_gives_the_same_bits_on_one_worker_as_on_two(cluster, store):
    """Sync(weights="broadcast") (broadcast.py): weights out and gradient sums back every
    step, the same pair-sum tree, the optimizer on the driver."""
    from cnnx.parallel import Sync
    two, trainer = train(cluster, store, mode=Sync(weights="broadcast"))
    assert trainer.steps[-1]["workers"] == 2
    assert all(step["bytes_out"] > 0 for step in trainer.steps)    # the weights, every step
    with LocalCluster(n_workers=1, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        one, _ = train(client, store, mode=Sync(weights="broadcast"))
    assert_same_weights(one.get_weights(), two.get_weights())
    assert trainer.history[-1]["accuracy"] > 0.9


def test_a_worker_killed_mid_epoch_changes_no_bit(reference, store):
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]

        def kill_during_next_step(trainer, record):
            if (record["epoch"], record["step"]) == (0, 2):
                threading.Timer(0.01, os.kill, (victim, signal.SIGKILL)).start()

        said = []
        model, trainer = train(client, store, callbacks=[kill_during_next_step],
                               scatter_timeout=5, echo=said.append)
        assert victim not in client.run(os.getpid).values()
    assert_same_weights(model.get_weights(), reference[0])


def test_a_survivor_one_step_ahead_of_the_driver_changes_no_bit(reference, store):
    """The race behind test_a_worker_killed_mid_epoch_changes_no_bit's rare failures, made
    certain: the surviving replica has already applied the step whose summary dies with the
    killed worker, so no replica is at the driver's version and the driver must rebuild its
    model from the sums it kept; the copies of those sums on the survivor must serve (the
    copies on the dead worker would be recomputed from a version no replica holds)."""
    from cnnx.parallel import replica

    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        def survivor_ahead_then_kill(trainer, record):
            if (record["epoch"], record["step"]) != (0, 2):
                return
            driver = trainer._sync_driver
            head = driver.queue[0]                      # step 3, not yet seen by the driver
            head.summary.result()                       # its root sum exists on both workers
            victim = driver.workers[0]                  # holds the root and the summary
            survivor = next(address for address in head.copies if address != victim)
            # the survivor applies step 3's sum, as its next step's task would
            client.submit(replica.state_at, driver.run, head.version + 1,
                          head.copies[survivor], workers=[survivor], allow_other_workers=False,
                          pure=False).result()
            assert client.run(replica.version_of, driver.run,
                              workers=[survivor])[survivor] == driver.version + 1
            os.kill(client.run(os.getpid, workers=[victim])[victim], signal.SIGKILL)
            while victim in client.scheduler_info()["workers"]:
                time.sleep(0.05)

        said = []
        model, _ = train(client, store, callbacks=[survivor_ahead_then_kill],
                         scatter_timeout=5, echo=said.append)
    assert any("lost data or a model replica" in line for line in said)
    assert_same_weights(model.get_weights(), reference[0])


def test_every_replica_keeps_each_root_sum_from_when_it_is_summed(cluster, store):
    """A survivor still behind (it has not applied the last root yet) must hold that root
    outside Dask too: Dask marks its copy erred when a lost copy's recompute fails."""
    from cnnx.parallel import replica

    seen = []

    def check_after_the_queued_step(trainer, record):
        if (record["epoch"], record["step"]) != (0, 2):
            return
        driver = trainer._sync_driver
        head = driver.queue[0]
        head.summary.result()                          # step 3 summed, applied nowhere yet
        seen.append(cluster.run(replica.holds_sums, driver.run, driver.model_version,
                                head.version + 1))
        seen.append(cluster.run(replica.version_of, driver.run))

    train(cluster, store, callbacks=[check_after_the_queued_step])
    kept, versions = seen
    assert len(kept) == 2 and all(kept.values())
    assert set(versions.values()) == {3}               # step 3's root is not applied yet


@pytest.mark.parametrize("lost_on", ["one worker", "every worker"])
def test_lost_replicas_are_rebuilt_and_change_no_bit(reference, cluster, store, lost_on):
    """A worker that lost its replica (restarted, joined) fails its task; the driver brings
    its own model up to date (from another replica, or from the gradient sums it kept when
    none is left) and re-installs it there."""
    from cnnx.parallel import cluster as cluster_module, replica

    def lose_replicas(trainer, record):
        if (record["epoch"], record["step"]) in ((0, 2), (1, 5)):
            workers = cluster_module.worker_addresses(cluster)
            chosen = workers[:1] if lost_on == "one worker" else workers
            cluster.run(replica.drop, trainer._sync_driver.run, workers=chosen)

    said = []
    model, _ = train(cluster, store, callbacks=[lose_replicas], echo=said.append)
    assert sum("lost data or a model replica" in line for line in said) >= 2
    assert_same_weights(model.get_weights(), reference[0])


def test_validation_during_fit_runs_on_the_replicas(cluster, store):
    # the epoch-end validation uses the workers' replicas (no weights or model sent); it
    # must say what evaluate() after fit, on weights sent from the driver, says
    _, val, _ = store.split(0.75, 0.25, 0.0, seed=0)
    model = tiny_model()
    trainer = DaskTrainer(model, cluster, shards=SHARDS, progress=False, echo=lambda *a: None)
    trainer.fit(store, epochs=1, batch_size=BATCH, validation=val)
    after = trainer.evaluate(val)
    assert trainer.history[-1]["val_loss"] == pytest.approx(after["loss"], rel=1e-6)
    assert trainer.history[-1]["val_accuracy"] == after["accuracy"]


def test_different_shard_counts_differ(reference, cluster, store):
    """The bit-identity tests can fail: G changes the summation order and the dropout keys."""
    model, _ = train(cluster, store, shards=2)
    assert any(not np.array_equal(model.get_weights()[k], reference[0][k]) for k in reference[0])


def test_one_shard_equals_sequential_fit_on_the_same_batches(cluster, store):
    model, trainer = train(cluster, store, shards=1)
    expected = tiny_model()
    owned = plan.shard_indices(np.arange(len(store)), store.chunk_size, 1)
    for epoch in range(EPOCHS):
        order = plan.epoch_plan(owned, trainer.seed, epoch, BATCH).reshape(-1)
        images, labels = store.read(order)
        expected.fit(store.normalize(images), labels, batch_size=BATCH, epochs=epoch + 1,
                     initial_epoch=epoch, shuffle=False, verbose=0)
    assert_same_weights(model.get_weights(), expected.get_weights())


class Crash(Exception):
    pass


def test_resumed_run_ends_bit_identical(reference, cluster, store, tmp_path):
    def crash(trainer, record):
        if (record["epoch"], record["step"]) == (1, 4):
            raise Crash

    with pytest.raises(Crash):
        model = tiny_model()
        trainer = DaskTrainer(model, cluster, shards=SHARDS, progress=False, checkpoint_every=3,
                              echo=lambda *a: None)
        trainer.fit(store, epochs=EPOCHS, batch_size=BATCH, checkpoint_dir=tmp_path,
                    callbacks=[crash])
    resumed = tiny_model()
    trainer = DaskTrainer(resumed, cluster, shards=SHARDS, progress=False, checkpoint_every=3,
                          echo=lambda *a: None)
    trainer.fit(store, epochs=EPOCHS, batch_size=BATCH, checkpoint_dir=tmp_path, resume=True)
    assert trainer.steps[0]["epoch"] == 1 and trainer.steps[0]["step"] == 3
    assert_same_weights(resumed.get_weights(), reference[0])
    expected_optimizer = reference[1].model.optimizer.state_dict()
    assert_same_weights(resumed.optimizer.state_dict(), expected_optimizer)
    assert [h["epoch"] for h in trainer.history] == [0, 1]
    assert_same_history(trainer.history, reference[1].history)


def test_resume_without_a_checkpoint_starts_from_the_beginning(reference, cluster, store,
                                                                tmp_path):
    model = tiny_model()
    messages = []
    trainer = DaskTrainer(model, cluster, shards=SHARDS, progress=False, echo=messages.append)
    trainer.fit(store, epochs=EPOCHS, batch_size=BATCH, checkpoint_dir=tmp_path / "new",
                resume=True)
    assert any("no checkpoint" in message for message in messages)
    assert_same_weights(model.get_weights(), reference[0])


def assert_same_history(resumed, uninterrupted):
    """The resumed epoch's entry covers the steps before the crash too: equal to the
    uninterrupted run's (times and traffic aside: checkpoints pull the weights)."""
    for got, expected in zip(resumed, uninterrupted, strict=True):
        for name in ("epoch", "steps", "loss", "accuracy"):
            assert got[name] == expected[name], (got["epoch"], name)


def test_resume_refuses_another_architecture_or_optimizer(cluster, store, tmp_path):
    from cnnx import nn, optim
    trainer = DaskTrainer(tiny_model(), cluster, shards=SHARDS, progress=False,
                          echo=lambda *a: None)
    trainer.fit(store, epochs=1, batch_size=BATCH, checkpoint_dir=tmp_path)
    wider = nn.Sequential([nn.Conv2D(8, 3, padding="same", activation="relu"),
                           nn.MaxPool2D(2), nn.Flatten(),
                           nn.Dense(16, activation="relu"), nn.Dropout(0.25),
                           nn.Dense(2, activation="softmax")], input_shape=(8, 8, 1), seed=0)
    wider.compile(optimizer=optim.Adam(1e-2), loss="sparse_categorical_crossentropy")
    with pytest.raises(ValueError, match=r"another model architecture: layers\[0\]\.config"
                                         r"\.filters was 4, this run has 8"):
        DaskTrainer(wider, cluster, shards=SHARDS, progress=False, echo=lambda *a: None).fit(
            store, epochs=2, batch_size=BATCH, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"another optimizer: name was 'Adam', this run has 'SGD'"):
        DaskTrainer(tiny_model(optimizer=optim.SGD(1e-2)), cluster, shards=SHARDS,
                    progress=False, echo=lambda *a: None).fit(
            store, epochs=2, batch_size=BATCH, checkpoint_dir=tmp_path, resume=True)
    with pytest.raises(ValueError, match=r"another optimizer: learning_rate\.learning_rate was "
                                         r"0\.01, this run has 0\.001"):
        DaskTrainer(tiny_model(optimizer=optim.Adam(1e-3)), cluster, shards=SHARDS,
                    progress=False, echo=lambda *a: None).fit(
            store, epochs=2, batch_size=BATCH, checkpoint_dir=tmp_path, resume=True)


def test_resume_checks_the_checkpoint_s_weights_before_reading_them(cluster, store, tmp_path):
    from cnnx import nn
    from cnnx.parallel import checkpoint
    trainer = DaskTrainer(tiny_model(), cluster, shards=SHARDS, progress=False,
                          echo=lambda *a: None)
    trainer.fit(store, epochs=1, batch_size=BATCH, checkpoint_dir=tmp_path)
    weights, optimizer_state, meta = checkpoint.load_checkpoint(tmp_path)
    name = next(key for key, value in weights.items() if value.ndim == 2)
    weights[name] = np.zeros((4096, 4096), np.float32)       # same meta, a foreign entry
    checkpoint.save_checkpoint(tmp_path, weights, optimizer_state, meta)
    model = tiny_model()
    before = model.get_weights()
    with pytest.raises(nn.ArchiveError, match=re.escape(name)):
        DaskTrainer(model, cluster, shards=SHARDS, progress=False, echo=lambda *a: None).fit(
            store, epochs=2, batch_size=BATCH, checkpoint_dir=tmp_path, resume=True)
    assert_same_weights(model.get_weights(), before)         # nothing was loaded


def test_an_evaluation_cut_short_finishes_before_the_replicas_go(cluster, store):
    """Ctrl-C while the epoch's validation runs on the replicas: fit stops, and closing the
    driver must let the evaluation tasks finish before it drops the replicas (they failed
    with ReplicaMissing, and their workers logged tracebacks over the one-line message)."""
    from cnnx.parallel import cluster as cluster_module
    started = []

    def evaluate_then_stop(trainer, record):
        if (record["epoch"], record["step"]) != (EPOCHS - 1, 256 // BATCH - 1):
            return                                    # the last step: no step queued behind
        workers = cluster_module.worker_addresses(trainer.client)
        specs = [trainer.shard_spec(np.arange(i * 64, i * 64 + 64)) for i in range(4)]
        started.extend(trainer._sync_driver.evaluate_tasks(specs, workers * 2))
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        train(cluster, store, callbacks=[evaluate_then_stop])
    assert len(started) == 4
    assert [future.status for future in started] == ["finished"] * 4


DRIVER = """
import sys, time
sys.path.insert(0, {helpers!r})
from parallel_helpers import tiny_model
from cnnx.parallel import DaskTrainer

def slow_down(trainer, record):          # leaves the test time to kill us between checkpoints
    time.sleep(0.2)

trainer = DaskTrainer(tiny_model(), {address!r}, shards={shards}, progress=False,
                      checkpoint_every=3)
trainer.fit({store!r}, epochs={epochs}, batch_size={batch}, checkpoint_dir={directory!r},
            callbacks=[slow_down])
"""


def test_driver_killed_with_sigkill_then_resumed_ends_bit_identical(reference, cluster, store,
                                                                   tmp_path):
    import subprocess
    import sys
    import time

    from cnnx.parallel import checkpoint

    script = DRIVER.format(helpers=os.path.dirname(__file__),
                           address=cluster.scheduler.address, shards=SHARDS, store=store.store,
                           epochs=EPOCHS, batch=BATCH, directory=str(tmp_path))
    driver = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    while not os.path.exists(checkpoint.checkpoint_path(tmp_path)):
        assert driver.poll() is None, driver.stderr.read().decode()[-2000:]
        assert time.monotonic() < deadline, "the driver wrote no checkpoint in 120 s"
        time.sleep(0.05)
    time.sleep(0.5)                                    # a few steps past the checkpoint
    os.kill(driver.pid, signal.SIGKILL)
    driver.wait()
    assert driver.returncode == -signal.SIGKILL        # killed mid-run, not finished
    resumed = tiny_model()
    trainer = DaskTrainer(resumed, cluster, shards=SHARDS, progress=False, checkpoint_every=3,
                          echo=lambda *a: None)
    trainer.fit(store, epochs=EPOCHS, batch_size=BATCH, checkpoint_dir=tmp_path, resume=True)
    assert len(trainer.steps) < EPOCHS * 256 // BATCH  # it really started from a checkpoint
    assert_same_weights(resumed.get_weights(), reference[0])
    assert_same_weights(resumed.optimizer.state_dict(),
                        reference[1].model.optimizer.state_dict())
    assert_same_history(trainer.history, reference[1].history)


def test_bfloat16_wire_halves_the_gradient_traffic_and_still_learns(reference, cluster, store):
    model, trainer = train(cluster, store, wire_dtype="bfloat16")
    fp32 = sum(a.nbytes for a in model.params.values())
    between = sum(epoch["bytes_between_workers"] for epoch in trainer.history)
    float32_between = sum(epoch["bytes_between_workers"] for epoch in reference[1].history)
    # two workers: each step one shard's sum crosses to the root, the root's back: 2 P
    # in float32, P in bfloat16
    assert float32_between - between > 0.8 * len(trainer.steps) * fp32
    assert trainer.history[-1]["accuracy"] > 0.9


def test_nan_gradients_stop_naming_shard_and_step_with_state_intact(cluster, store):
    import cloudpickle
    import parallel_helpers
    cloudpickle.register_pickle_by_value(parallel_helpers)   # workers cannot import it
    model = parallel_helpers.poisoned_model(epoch=0, step=3, shard=2)
    trainer = DaskTrainer(model, cluster, shards=SHARDS, progress=False, echo=lambda *a: None)
    seen = []
    with pytest.raises(NonFiniteGradientError, match=r"shard 2 of step 3 \(epoch 0\)"):
        trainer.fit(store, epochs=1, batch_size=BATCH,
                    callbacks=[lambda t, r: seen.append(t.pull().get_weights())])
    assert len(seen) == 3
    assert_same_weights(model.get_weights(), seen[-1])


def wide_model():
    """A Dense kernel (64 x 256) whose gradient travels as factors, stacked up to the root."""
    from cnnx import nn, optim
    from parallel_helpers import IMAGE

    model = nn.Sequential([nn.Flatten(), nn.Dense(256, activation="relu"),
                           nn.Dense(2, activation="softmax")], input_shape=IMAGE)
    model.compile(optimizer=optim.Adam(1e-2), loss="sparse_categorical_crossentropy")
    return model


def test_two_workers_exchange_halves_instead_of_sending_the_sum_back(cluster, store):
    # G=2 on two workers: each worker sums the root itself from the other's half (the same
    # inputs, the same order), so per step each half crosses once; before, one half went up
    # and the stacked sum, twice its size, came back down (three halves per step)
    from dask.sizeof import sizeof

    from cnnx.parallel import replica, wire

    trainer = DaskTrainer(wide_model(), cluster, shards=2, progress=False, echo=lambda *a: None)
    trainer.fit(store, epochs=1, batch_size=BATCH)
    images, labels = store.read(np.arange(BATCH // 2))
    half = replica._Replica(wide_model(), 0).gradient(store.normalize(images), labels,
                                                      (0, 0, 0), "float32")
    half.grads = wire.encode(half.grads)
    half_bytes = sizeof(half)
    assert half_bytes < 0.6 * sum(a.nbytes for a in wide_model().params.values())
    epoch = trainer.history[-1]
    per_step = epoch["bytes_between_workers"] / epoch["steps"]
    assert 1.9 * half_bytes < per_step < 2.4 * half_bytes


def test_a_step_costs_dask_one_task_per_shard_the_sums_and_the_summary(cluster, store):
    # each task costs the scheduler, the driver and a worker a few ms of the same cores: a
    # step on two workers is 2 shard tasks + the root summed on both + the summary; each
    # shard task reads its own batch (no task of its own)
    from distributed import get_task_stream

    with get_task_stream(cluster) as stream:
        _, trainer = train(cluster, store, shards=2)
    # step task keys: "{run}-a{attempt}-v{version}-{kind}-...", run = "cnnx-{hex}"
    step_task = re.compile(r"cnnx-[0-9a-f]+-a\d+-v\d+-([a-z]+)")
    kinds = collections.Counter(found.group(1) for found in
                                (step_task.match(str(task["key"])) for task in stream.data)
                                if found)
    steps = len(trainer.steps)
    assert kinds == {"grad": 2 * steps, "sum": 2 * steps, "summary": steps}
