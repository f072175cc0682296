"""The asynchronous protocol on a real cluster: one round trip per unit, counted on the
scheduler, and the driver's state owned by the driver."""
import ast
import collections
import pathlib
import sys
import time

import cloudpickle
import numpy as np
import pytest
from distributed import Client, LocalCluster
from distributed.diagnostics.plugin import SchedulerPlugin

import parallel_helpers
from cnnx.parallel import ADAG, EASGD, DaskTrainer, Downpour, DynSGD
from parallel_helpers import tiny_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the scheduler runs KeyLog
cloudpickle.register_pickle_by_value(parallel_helpers)      # workers cannot import it

PARALLEL = pathlib.Path(__file__).parents[2] / "cnnx" / "parallel"
QUIET = dict(progress=False, echo=lambda *a: None)


class KeyLog(SchedulerPlugin):
    """Every key the scheduler sees move, and those it sends a worker to compute. A key
    that never runs on a worker is data the client put there (a scatter)."""
    name = "cnnx-key-log"

    def __init__(self):
        self.seen, self.computed = set(), set()

    def transition(self, key, start, finish, *args, **kwargs):
        self.seen.add(key)
        if finish == "processing":
            self.computed.add(key)


def scattered_keys(dask_scheduler):
    log = dask_scheduler.plugins[KeyLog.name]
    return sorted(map(str, log.seen - log.computed))


def scheduler_idle(dask_scheduler):
    return len(dask_scheduler.tasks) == 0


def wait_until_idle(client, seconds=30):
    deadline = time.monotonic() + seconds
    while not client.run_on_scheduler(scheduler_idle) and time.monotonic() < deadline:
        time.sleep(0.05)


def fit_counting_scatters(client, store, mode, direct_above=None):
    """(trainer, keys the client scattered) of a one-epoch fit."""
    wait_until_idle(client)                       # keys of earlier tests are gone
    client.register_plugin(KeyLog())
    try:
        trainer = DaskTrainer(tiny_model(), client, mode=mode, shards=4, **QUIET)
        if direct_above is not None:
            trainer.async_driver.direct_above = direct_above
        trainer.fit(store, epochs=1, batch_size=32)
        wait_until_idle(client)                   # released futures reach the scheduler
        return trainer, client.run_on_scheduler(scattered_keys)
    finally:
        client.unregister_scheduler_plugin(KeyLog.name)


@pytest.mark.parametrize("mode", [Downpour(), DynSGD(), ADAG(tau=2, local_learning_rate=0.1),
                                  EASGD(tau=2, local_learning_rate=0.1)],
                         ids=lambda mode: mode.name)
def test_units_carry_their_weights_no_scatter_per_unit(mode, cluster, store):
    """The model is placed once per fit; no unit scatters its weights first (that was a
    blocking round trip before each submission)."""
    trainer, scattered = fit_counting_scatters(cluster, store, mode)
    units = len(trainer.commits)
    assert units == 4 * 8 // mode.window
    assert len(scattered) == 1, (f"{len(scattered)} scattered keys for {units} units: "
                                 f"{scattered[:4]}")
    assert sum(c["bytes_out"] for c in trainer.commits) == units * sum(
        a.nbytes for a in trainer.model.get_weights().values())


def test_evaluate_before_and_after_an_async_fit(cluster, store):
    model = tiny_model()
    trainer = DaskTrainer(model, cluster, mode=Downpour(), shards=4, **QUIET)
    before = trainer.evaluate(np.arange(64), dataset=store)
    assert trainer.version == 0 and trainer.commits == [] and trainer.duplicates == 0
    trainer.fit(store, epochs=1, batch_size=32)
    after = trainer.evaluate(np.arange(64))
    assert trainer.version == len(trainer.commits) == 32
    assert after["loss"] < before["loss"]


def test_the_trainer_forwards_read_only_async_state(cluster):
    trainer = DaskTrainer(tiny_model(), cluster, mode=Downpour(), **QUIET)
    for name in ("version", "commits", "staleness", "duplicates"):
        with pytest.raises(AttributeError):
            setattr(trainer, name, None)
    assert DaskTrainer(tiny_model(), cluster, **QUIET).async_driver is None


def test_no_module_in_parallel_imports_the_trainer_but_the_package():
    for path in PARALLEL.glob("*.py"):
        if path.name == "__init__.py":
            continue
        imported = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                imported |= {f"{node.module}.{a.name}" for a in node.names} | {node.module}
            elif isinstance(node, ast.Import):
                imported |= {a.name for a in node.names}
        assert not any(name.startswith("cnnx.parallel.trainer") for name in imported), path.name
        assert "cnnx.parallel.DaskTrainer" not in imported, path.name


def test_the_async_driver_reads_no_trainer_member():
    source = (PARALLEL / "asynchronous.py").read_text()
    assert "trainer." not in source



def test_large_weights_go_straight_to_their_worker(cluster, store):
    """Above the crossover, each unit's weights are placed on its worker first."""
    trainer, scattered = fit_counting_scatters(cluster, store, Downpour(), direct_above=0)
    assert len(trainer.commits) == 32
    assert len(scattered) == 1 + 32
    assert len({(c["epoch"], c["step"], c["shard"]) for c in trainer.commits}) == 32


@pytest.mark.parametrize("direct_above", [None, 0], ids=["in-the-task", "placed-first"])
def test_a_unit_whose_worker_was_killed_commits_once(direct_above, store, tmp_path):
    """In the task, the weights survive with the scheduler and Dask reruns the unit;
    placed first, they die with the worker and the driver resubmits it."""
    model = parallel_helpers.self_killing_model((0, 2, 0), tmp_path)
    with LocalCluster(n_workers=2, threads_per_worker=1, host="127.0.0.1",
                      dashboard_address="127.0.0.1:0") as local, Client(local) as client:
        trainer = DaskTrainer(model, client, mode=Downpour(), shards=4, **QUIET)
        if direct_above is not None:
            trainer.async_driver.direct_above = direct_above
        trainer.fit(store, epochs=1, batch_size=32)
    executions = collections.Counter((tmp_path / "executions.txt").read_text().splitlines())
    assert executions["0 2 0"] == 2
    keys = [(c["epoch"], c["step"], c["shard"]) for c in trainer.commits]
    assert len(keys) == len(set(keys)) == 32 and trainer.version == 32
