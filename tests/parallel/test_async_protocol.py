"""The asynchronous protocol on a real cluster: one round trip per unit, counted on the
scheduler, and the driver's state owned by the driver."""
import ast
import pathlib
import sys
import time

import cloudpickle
import numpy as np
import pytest
from distributed.diagnostics.plugin import SchedulerPlugin

from cnnx.parallel import ADAG, EASGD, DaskTrainer, Downpour, DynSGD
from parallel_helpers import tiny_model

cloudpickle.register_pickle_by_value(sys.modules[__name__])   # the scheduler runs KeyLog

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


@pytest.mark.parametrize("mode", [Downpour(), DynSGD(), ADAG(tau=2, local_learning_rate=0.1),
                                  EASGD(tau=2, local_learning_rate=0.1)],
                         ids=lambda mode: mode.name)
def test_units_carry_their_weights_no_scatter_per_unit(mode, cluster, store):
    """The model is placed once per fit; no unit scatters its weights first (that was a
    blocking round trip before each submission)."""
    wait_until_idle(cluster)                      # keys of earlier tests are gone
    cluster.register_plugin(KeyLog())
    try:
        trainer = DaskTrainer(tiny_model(), cluster, mode=mode, shards=4, **QUIET)
        trainer.fit(store, epochs=1, batch_size=32)
        wait_until_idle(cluster)                  # released futures reach the scheduler
        scattered = cluster.run_on_scheduler(scattered_keys)
    finally:
        cluster.unregister_scheduler_plugin(KeyLog.name)
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

