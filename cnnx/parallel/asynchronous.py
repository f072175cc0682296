"""The asynchronous driver: Downpour, DynSGD, ADAG and EASGD with exactly-once commits.

Design (the driver stays the authority on the weights):
- A unit of work is one shard's batch at one step (Downpour, DynSGD) or tau consecutive
  batches of one shard (ADAG, EASGD). The model (layers, loss; no optimizer state) reaches
  every worker once per fit; a unit's task carries, as its own argument, the weights of the
  version it starts from: the scheduler hands them to the worker with the task. One round
  trip per unit: the submission goes out in the client's next batched message (nothing
  blocks on it), and the result comes back. The scheduler keeps a task's arguments until
  its result is released, so a worker killed mid-unit costs Dask a rerun, not the driver a
  resubmission. Weights above DIRECT_ABOVE_BYTES (measured crossover) are instead sent by
  the driver straight to the unit's worker, then the task is submitted: a blocking call
  more, but one data hop instead of two; those die with their worker, and the driver then
  resubmits the unit.
- When a result arrives it is committed under the key (epoch, step, shard) with the version
  it started from; a key is applied once, however many times Dask ran the task or
  delivered its result. Staleness = versions committed since the unit started; it is
  recorded per worker, and the replay log lists commits in order.
- A replay log of an earlier run (JSON lines) is re-run one unit at a time, each on the
  weights of the version it saw then (kept as snapshots while a later commit needs them):
  the run is reproduced bit for bit.
"""
import collections
import dataclasses
import json
import time
import uuid

from distributed import as_completed

from cnnx.parallel import cluster, transport, wire, worker
from cnnx.parallel.transport import LOST, preferred_worker

GRADIENT_MODES = ("downpour", "dynsgd")       # the others run local SGD windows
# Weights up to this size travel inside the task's message, through the scheduler, and no
# call blocks; larger ones are sent by the driver straight to the unit's worker (one hop
# instead of two, and the scheduler does not unpickle and re-pickle them) before the task
# is submitted. The crossover was measured: benchmarks/test_asynchronous.py, ..._protocol.
DIRECT_ABOVE_BYTES = 3 * 2**20


def read_replay_log(path):
    """The commits of a replay log, in order."""
    with open(path) as log:
        return [json.loads(line) for line in log if line.strip()]


class AsyncDriver:
    """Runs asynchronous epochs of `model` in `mode` (a cnnx.parallel.modes object);
    yields one record per commit. `spec(indices)` is what a task needs to read a shard."""

    def __init__(self, client, model, mode, spec, *, wire_dtype="float32", replay_log=None,
                 replay=None, max_step_retries=3, worker_timeout=60.0, scatter_timeout=20.0,
                 echo=print):
        self.client, self.model, self.mode, self.spec = client, model, mode, spec
        self.wire_dtype, self.max_step_retries = wire_dtype, max_step_retries
        self.worker_timeout, self.scatter_timeout, self.echo = (worker_timeout,
                                                                 scatter_timeout, echo)
        self.run = f"cnnx-{uuid.uuid4().hex[:8]}-{mode.name}"
        self.version = 0                   # commits applied so far
        self.applied = set()               # their keys (epoch, step, shard)
        self.duplicates = 0                # results that arrived for a key already applied
        self.commits = []                  # one record per commit, in order
        self.staleness = {}                # worker address -> staleness of its commits
        self.local_weights = {}            # EASGD: shard -> its worker-side weights
        self.replay_log = replay_log       # where commits are appended (JSON lines)
        self.replay = None if replay is None else read_replay_log(replay)
        self.replay_needs = collections.Counter(e["version"] for e in self.replay or [])
        self.snapshots = {}                # replay: version -> (weights, EASGD locals)
        self.model_future = None
        self.direct_above = DIRECT_ABOVE_BYTES

    # ------------------------------------------------------------------ the model on workers
    def start(self):
        """The model (without optimizer state) on every worker, once per fit."""
        self.model_future = transport.place(self.client, transport.worker_copy(self.model),
                                            self.scatter_timeout, broadcast=True)

    def close(self):
        self.model_future = None          # the workers' copies are released

    def _restart(self):
        """The model on the workers again after some died with their copies; a worker
        killed a moment ago can fail the scatter, so it is retried. Returns the workers."""
        for attempt in range(self.max_step_retries + 1):
            workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
            try:
                self.start()
                return workers
            except (*LOST, TimeoutError):
                if attempt == self.max_step_retries:
                    raise
                time.sleep(0.5)
        raise AssertionError("unreachable")

    # ------------------------------------------------------------------ epochs
    def run_epoch(self, epoch, epoch_plan, first_step):
        """Yield the record of each commit of the epoch's units from first_step on."""
        if self.replay is not None:
            return self._replay_epoch(epoch, epoch_plan, first_step)
        return self._live_epoch(epoch, epoch_plan, first_step)

    def _live_epoch(self, epoch, epoch_plan, first_step):
        """Units in arrival order, with a bounded number in flight."""
        pending = collections.deque(_units(epoch, epoch_plan, first_step, self.mode.window))
        workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
        slots = self.mode.max_in_flight or len(workers)
        in_flight, futures = {}, as_completed()

        def submit_next():
            nonlocal workers
            unit = pending.popleft()
            submitted = time.perf_counter()
            future, started_from, sent, workers = self._submit(unit, workers,
                                                               epoch_plan.shape[1])
            in_flight[future] = (unit, self.version, started_from, sent, submitted)
            futures.add(future)

        for _ in range(min(slots, len(pending))):
            submit_next()
        for future in futures:
            unit, version, started_from, sent, submitted = in_flight.pop(future)
            try:
                result = future.result()
            except worker.NonFiniteGradientError as error:
                raise worker.NonFiniteGradientError(
                    f"{error}; training stopped: the model holds the weights of version "
                    f"{self.version}") from None
            except LOST as error:   # weights placed on a worker, or the model, died with it
                self.echo(f"cnnx: unit {unit['key']} lost with a worker ({error}); "
                          f"resubmitting")
                workers = self._restart()
                pending.appendleft(unit)
            else:
                record = self.commit(unit["key"], version, result, started_from)
                if record is not None:
                    record.update(time_s=time.perf_counter() - submitted, bytes_out=sent)
                    yield record
            if pending:
                submit_next()

    def _replay_epoch(self, epoch, epoch_plan, first_step):
        """The replay log's commits of this epoch in its order, one unit at a time, each on
        the weights of the version it saw then."""
        if not self.snapshots:
            self._take_snapshot()
        units = {unit["key"]: unit
                 for unit in _units(epoch, epoch_plan, first_step, self.mode.window)}
        for entry in [e for e in self.replay if e["epoch"] == epoch]:
            key, version = (entry["epoch"], entry["step"], entry["shard"]), entry["version"]
            if key not in units:
                raise ValueError(f"DaskTrainer: the replay log commits {key}, which this "
                                 f"run's plan does not have (different data, shards or batch "
                                 f"size?)")
            centre, local = self.snapshots[version]
            workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
            started_from = local.get(key[2], centre) if self.mode.name == "easgd" else centre
            submitted = time.perf_counter()
            future, _, sent, _ = self._submit(units[key], workers, epoch_plan.shape[1],
                                              started_from, version)
            record = self.commit(key, version, future.result(), started_from)
            record.update(time_s=time.perf_counter() - submitted, bytes_out=sent)
            yield record

    def _take_snapshot(self):
        """Keep the weights of the current version while a replayed commit still needs them."""
        needed = self.replay_needs
        for version in [v for v in self.snapshots if v < self.version and not needed[v]]:
            del self.snapshots[version]
        if needed[self.version]:
            self.snapshots[self.version] = (self.model.get_weights(), dict(self.local_weights))

    # ------------------------------------------------------------------ one unit
    def _submit(self, unit, workers, n_shards, started_from=None, version=None):
        """(future, started_from, bytes sent, workers): the unit submitted, with its
        starting weights as an argument. Large weights are placed on the worker first; a
        worker that died a moment ago can fail that, and then the next one is tried."""
        for attempt in range(self.max_step_retries + 1):
            try:
                return (*self._submit_once(unit, workers, n_shards, started_from, version),
                        workers)
            except (*LOST, TimeoutError):
                if attempt == self.max_step_retries:
                    raise
                time.sleep(0.5)
                workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
        raise AssertionError("unreachable")

    def _submit_once(self, unit, workers, n_shards, started_from=None, version=None):
        """Up to direct_above bytes of weights nothing waits here: they reach the worker
        with the task; larger weights are sent to the worker first (DIRECT_ABOVE_BYTES)."""
        epoch, step, shard = unit["key"]
        version = self.version if version is None else version
        if started_from is None:
            started_from = (self.local_weights.get(shard) if self.mode.name == "easgd"
                            else None) or self.model.get_weights()
        # started_from is a fresh copy nobody changes in place: the wire may share it
        weights = wire.encode(started_from, self.wire_dtype, copy=False)
        preferred = workers[preferred_worker(shard, n_shards, len(workers))]
        sent = wire.nbytes(weights)
        if sent > self.direct_above:
            weights = transport.place(self.client, weights, self.scatter_timeout, [preferred],
                                      direct=True)
        options = dict(key=f"{self.run}-e{epoch}-s{step}-g{shard}-v{version}",
                       workers=[preferred], allow_other_workers=True, pure=False)
        with transport.large_arguments():
            if self.mode.name in GRADIENT_MODES:
                future = self.client.submit(worker.shard_gradient, self.model_future, weights,
                                            self.spec(unit["indices"][0]), unit["key"],
                                            self.wire_dtype, **options)
            else:
                keys = [(epoch, s, shard) for s in unit["steps"]]
                future = self.client.submit(worker.local_sgd, self.model_future, weights,
                                            [self.spec(i) for i in unit["indices"]], keys,
                                            self.mode.local_learning_rate, self.wire_dtype,
                                            **options)
        return future, started_from, sent

    def commit(self, key, version, result, started_from=None):
        """Apply one unit's result unless its key was applied already; returns its record
        or None."""
        key = tuple(int(k) for k in key)
        if key in self.applied:
            self.duplicates += 1
            return None
        staleness = self.version - version
        if self.mode.name in GRADIENT_MODES:
            total, stats = result
            self._apply_gradient(total, staleness + 1 if self.mode.name == "dynsgd" else 1)
            n, loss_sum, n_correct = total.n_samples, total.loss_sum, total.n_correct
            address, compute_s = next(iter(stats["worker"])), stats["compute_s"]
            bytes_in = wire.nbytes(total.grads)
        else:
            params, loss_sum, n_correct, n, compute_s, address = result
            bytes_in = wire.nbytes(params)
            params = wire.decode(params)
            if self.mode.name == "adag":
                self._apply_change(params, started_from, 1.0 / (staleness + 1))
            else:
                self._elastic_exchange(key[2], params)
        self.version += 1
        self.applied.add(key)
        if self.replay is not None:
            self.replay_needs[version] -= 1
            self._take_snapshot()
        record = {"epoch": key[0], "step": key[1], "shard": key[2], "version": version,
                  "staleness": staleness, "worker": address, "n_samples": int(n),
                  "loss_sum": float(loss_sum), "n_correct": int(n_correct),
                  "loss": float(loss_sum) / n, "accuracy": int(n_correct) / n,
                  "compute_s": float(compute_s), "bytes_in": bytes_in}
        self.commits.append(record)
        self.staleness.setdefault(address, []).append(staleness)
        if self.replay_log is not None:
            with open(self.replay_log, "a") as log:
                log.write(json.dumps({k: record[k] for k in ("epoch", "step", "shard",
                                                             "version", "staleness",
                                                             "worker")}) + "\n")
        return record

    def _apply_gradient(self, total, weight):
        """Downpour: the gradient sum's mean. DynSGD (weight = staleness + 1): the mean over
        n·weight samples, i.e. the mean scaled by 1/(staleness+1), divided inside the
        optimizer's own pass (no scaled copy of any gradient)."""
        total = wire.decoded(total)
        self.model.apply_gradient_sum(dataclasses.replace(
            total, n_samples=total.n_samples * weight))

    def _apply_change(self, params, started_from, scale):
        """ADAG: centre += scale * (worker's weights after its window - weights it started
        from)."""
        centre = self.model.get_weights()
        self.model.set_weights({name: centre[name] + scale * (params[name] - started_from[name])
                                for name in centre})

    def _elastic_exchange(self, shard, params):
        """EASGD: d = alpha (local - centre); the local copy moves back by d, the centre
        by +d."""
        centre = self.model.get_weights()
        alpha = self.mode.alpha
        difference = {name: alpha * (params[name] - centre[name]) for name in centre}
        self.local_weights[shard] = {name: params[name] - difference[name] for name in centre}
        self.model.set_weights({name: centre[name] + difference[name] for name in centre})


def _units(epoch, epoch_plan, first_step, window):
    n_steps, n_shards = epoch_plan.shape[:2]
    return [{"key": (epoch, step, shard),
             "steps": list(range(step, min(step + window, n_steps))),
             "indices": [epoch_plan[s, shard] for s in range(step, min(step + window, n_steps))]}
            for step in range(first_step, n_steps, window) for shard in range(n_shards)]
