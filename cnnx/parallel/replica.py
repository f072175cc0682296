"""Worker-resident model replicas for synchronous training (all-reduce style).

Each worker process keeps one compiled copy of the model, optimizer state included, per run.
Every step's gradient sum reaches every worker once, and each applies it with the same
code as the driver (Sequential.apply_gradient_sum), so all replicas and the driver's model
hold the same bits at the same version: weights never travel per step. A replica is found
by its run id and must be at the version a task expects; a worker that lost it (killed,
restarted, or new) raises ReplicaMissing, and the driver re-installs it from its own model.

A replica keeps the root sums it summed or applied since the driver's model last caught up
(`kept`), so that a worker killed costs no sum: the driver rebuilds its model from a
survivor's. Dask's own copies cannot serve: a copy lost with its worker is recomputed from
its lineage, which needs replicas at versions the survivors may have passed (one may already
have applied a step whose summary died), and a failed recompute marks every result that
depends on it erred, even results still held in memory on a survivor.
"""
import dataclasses
import time

import numpy as np

from cnnx.nn import Dense
from cnnx.parallel import factors, wire, worker

_replicas = {}                            # run id -> _Replica


class ReplicaMissing(RuntimeError):
    """This worker holds no replica of the run at the version a task needs."""


class _Replica:
    def __init__(self, model, version):
        self.model, self.version = model, version
        # Dense layers whose kernel gradient may travel as factors (factors.py)
        self.factored = [layer for layer in model.layers if isinstance(layer, Dense)
                         and factors.smaller_as_factors(8, *layer.params["kernel"].shape)]
        self._products = {}               # "layer/kernel" -> the buffer factors multiply into
        self.kept = {}                    # step v -> its root sum (it takes v to v + 1)

    def product_buffer(self, name, shape):
        buffer = self._products.get(name)
        if buffer is None or buffer.shape != shape:
            buffer = self._products[name] = np.empty(shape, np.float32)
        return buffer

    def apply(self, total):
        """One optimizer step from a root sum: its factors multiplied out into buffers kept
        across steps (apply_gradient_sum holds no reference to them afterwards)."""
        grads = {name: (g.materialise(out=self.product_buffer(name, g.shape))
                        if isinstance(g, factors.KernelFactors) else g)
                 for name, g in wire.decode(total.grads).items()}
        self.model.apply_gradient_sum(dataclasses.replace(total, grads=grads))
        self.kept[self.version] = total
        self.version += 1

    def forget_sums_before(self, version):
        for old in [v for v in self.kept if v < version]:
            del self.kept[old]

    def gradient(self, x, y, key, wire_dtype):
        """model.gradient(x, y, key), each large Dense kernel's gradient as its factors
        (computed as such: the layer skips its kernel GEMM) while they are the smaller."""
        for layer in self.factored:
            layer.kernel_grad_as_factors = (
                wire_dtype == "float32"
                and factors.smaller_as_factors(len(x), *layer.params["kernel"].shape))
        result = self.model.gradient(x, y, key=key)
        for layer in self.factored:
            if layer.kernel_grad_as_factors:
                result.grads[f"{layer.name}/kernel"] = factors.from_layer(layer)
        return result


def install(run, model, version):
    """Keep `model` (compiled, optimizer state included) as this worker's replica of `run`."""
    with worker._lock:
        _replicas[run] = _Replica(model, version)
    return version


def version_of(run):
    """The version of this worker's replica of `run`, or None."""
    replica = _replicas.get(run)
    return None if replica is None else replica.version


def drop(run):
    with worker._lock:
        _replicas.pop(run, None)


def _at_version(run, version, previous):
    """The replica of `run`, brought to `version` by applying `previous` (the gradient sum
    of step version - 1) if it is one step behind."""
    replica = _replicas.get(run)
    if replica is not None and previous is not None and replica.version == version - 1:
        total, _ = previous
        replica.apply(total)
    if replica is None or replica.version != version:
        have = "none" if replica is None else f"version {replica.version}"
        raise ReplicaMissing(f"worker {worker.worker_name()} holds {have} of the model replica "
                             f"of run {run}, a task needs version {version}")
    return replica


def replica_gradient(run, version, previous, spec, key, wire_dtype="float32", keep_from=0):
    """(GradientSum of one virtual shard, stats) on this worker's replica at `version`.

    previous: the (GradientSum, stats) of step version - 1, or None when the replica is
    already there (fresh install). spec: the batch spec of the shard's samples.
    key = (epoch, step, shard). keep_from: the driver's model is at least at this version,
    so the replica may drop the sums it applied before."""
    x, y, read_s = worker.timed_batch(spec, key)
    with worker._lock:
        start, start_cpu = time.perf_counter(), time.thread_time()
        replica = _at_version(run, version, previous)
        replica.forget_sums_before(keep_from)
        applied, applied_cpu = time.perf_counter(), time.thread_time()
        result = replica.gradient(x, y, tuple(key), wire_dtype)
        computed, computed_cpu = time.perf_counter(), time.thread_time()
    worker.check_finite(result, key)
    # encode copies: a layer's backward overwrites its grads, and this result outlives the task
    result.grads = wire.encode(result.grads, wire_dtype)
    return result, worker.leaf_stats(computed - applied, read_s, apply_s=applied - start,
                                     cpu_s=(computed_cpu - applied_cpu, applied_cpu - start_cpu))


def evaluate_replica(run, version, previous, spec):
    """worker.evaluate_batch on this worker's replica at `version` (no weights sent)."""
    return worker.evaluate_model(spec, lambda: _at_version(run, version, previous).model)


def summary(root):
    """What the driver needs of a step's gradient sum to record it: the counts, not the sum."""
    total, stats = root
    return int(total.n_samples), float(total.loss_sum), int(total.n_correct), stats


def _state(model):
    """(weights, optimizer state) as WireArrays: Dask then sizes them exactly (it samples 10
    entries of a plain dict: Adam's state of a 6-parameter net was weighed 12.8-18.3 KB for
    13.4 KB, and the bytes counted between workers jumped by as much)."""
    return wire.WireArrays(model.get_weights()), wire.WireArrays(model.optimizer.state_dict())


def state_at(run, version, previous):
    """(weights, optimizer state) of this worker's replica at `version` (see _at_version)."""
    with worker._lock:
        return _state(_at_version(run, version, previous).model)


def state_if_at(run, version):
    """(weights, optimizer state) if this worker's replica is at `version`, else None."""
    with worker._lock:
        replica = _replicas.get(run)
        if replica is None or replica.version != version:
            return None
        return _state(replica.model)


def root_sum(run, step, left, right):
    """worker.sum_pair at the top of a step's tree, the sum kept by this worker's replica."""
    root = worker.sum_pair(left, right)
    with worker._lock:
        replica = _replicas.get(run)
        if replica is not None and replica.version <= step:
            replica.kept[step] = root[0]
    return root


def holds_sums(run, first, stop):
    """Whether this worker's replica of `run` kept the root sums of steps first..stop - 1."""
    replica = _replicas.get(run)
    return replica is not None and all(v in replica.kept for v in range(first, stop))


def sums_between(run, first, stop):
    """The root sums of steps first..stop - 1 this worker's replica kept, in order."""
    with worker._lock:
        return [_replicas[run].kept[v] for v in range(first, stop)]


def relay(value):
    """The value itself, held by one more worker: the nodes of a broadcast tree."""
    return value
