"""Asynchronous drivers: Downpour, DynSGD, ADAG and EASGD with exactly-once commits.

The driver stays the authority on the weights. A unit of work is one shard's batch at one
step (downpour, dynsgd) or tau consecutive batches of one shard (adag, easgd); it is sent with
the weights of the current model version. When its result arrives it is committed under the
key (epoch, step, shard) with the version it started from; a key is applied once, however
many times Dask ran the task or delivered its result. Staleness = versions committed since
the unit started; it is recorded per worker, and the replay log lists commits in order.
"""
import collections
import json
import time

import numpy as np
from distributed import as_completed

from cnnx.parallel import cluster, transport, wire, worker
from cnnx.parallel.transport import LOST, preferred_worker


def run_epoch(trainer, epoch, epoch_plan, first_step, callbacks):
    """Run the units of one epoch with a bounded number in flight; returns commit records."""
    client = trainer.client
    window = trainer.mode_options.window
    pending = collections.deque(_units(epoch, epoch_plan, first_step, window))
    workers = cluster.wait_for_workers(client, trainer.worker_timeout, trainer.echo)
    slots = trainer.mode_options.max_in_flight or len(workers)
    in_flight, records = {}, []
    futures = as_completed()

    def submit_next():
        nonlocal workers
        unit = pending.popleft()
        for attempt in range(trainer.max_step_retries + 1):
            try:
                future, started_from = _submit(trainer, unit, workers)
                break
            except (*LOST, TimeoutError):         # its worker died a moment ago
                if attempt == trainer.max_step_retries:
                    raise
                time.sleep(0.5)
                workers = cluster.wait_for_workers(client, trainer.worker_timeout, trainer.echo)
        in_flight[future] = (unit, trainer.version, started_from, time.perf_counter())
        futures.add(future)

    for _ in range(min(slots, len(pending))):
        submit_next()
    for future in futures:
        unit, version, started_from, submitted = in_flight.pop(future)
        try:
            result = future.result()
        except worker.NonFiniteGradientError as error:
            raise worker.NonFiniteGradientError(
                f"{error}; training stopped: the model holds the weights of version "
                f"{trainer.version}") from None
        except LOST as error:
            trainer.echo(f"cnnx: unit {unit['key']} lost with a worker ({error}); resubmitting")
            workers = cluster.wait_for_workers(client, trainer.worker_timeout, trainer.echo)
            trainer.place_model()
            pending.appendleft(unit)
        else:
            record = commit(trainer, unit["key"], version, result, started_from)
            if record is not None:
                record["time_s"] = time.perf_counter() - submitted
                records.append(record)
                trainer.steps.append(record)
                for callback in callbacks:
                    callback(trainer, record)
        if pending:
            submit_next()
    return records


def replay_epoch(trainer, epoch, epoch_plan, first_step, callbacks):
    """Re-run one epoch's commits in the order of trainer.replay (a replay log), each unit on
    the weights of the version it saw then: the run is reproduced bit for bit, one unit at
    a time."""
    window = trainer.mode_options.window
    units = {unit["key"]: unit for unit in _units(epoch, epoch_plan, first_step, window)}
    records = []
    for entry in [e for e in trainer.replay if e["epoch"] == epoch]:
        key, version = (entry["epoch"], entry["step"], entry["shard"]), entry["version"]
        if key not in units:
            raise ValueError(f"DaskTrainer: the replay log commits {key}, which this run's "
                             f"plan does not have (different data, shards or batch size?)")
        centre, local = trainer.snapshots[version]
        workers = cluster.wait_for_workers(trainer.client, trainer.worker_timeout, trainer.echo)
        started_from = local.get(key[2], centre) if trainer.mode == "easgd" else centre
        future, _ = _submit(trainer, units[key], workers, started_from, version)
        record = commit(trainer, key, version, future.result(), started_from)
        records.append(record)
        trainer.steps.append(record)
        for callback in callbacks:
            callback(trainer, record)
    return records


def take_snapshot(trainer):
    """Keep the weights of the current version while a replayed commit still needs them."""
    needed = trainer.replay_needs
    for version in [v for v in trainer.snapshots if v < trainer.version and not needed[v]]:
        del trainer.snapshots[version]
    if needed[trainer.version]:
        trainer.snapshots[trainer.version] = (trainer.model.get_weights(),
                                              dict(trainer.local_weights))


def _units(epoch, epoch_plan, first_step, window):
    n_steps, n_shards = epoch_plan.shape[:2]
    return [{"key": (epoch, step, shard),
             "steps": list(range(step, min(step + window, n_steps))),
             "indices": [epoch_plan[s, shard] for s in range(step, min(step + window, n_steps))]}
            for step in range(first_step, n_steps, window) for shard in range(n_shards)]


def _submit(trainer, unit, workers, started_from=None, version=None):
    """Scatter the unit's starting weights to its preferred worker and submit its task."""
    epoch, step, shard = unit["key"]
    version = trainer.version if version is None else version
    preferred = workers[preferred_worker(shard, trainer.n_shards, len(workers))]
    if started_from is not None:
        pass
    elif trainer.mode == "easgd":
        started_from = trainer.local_weights.get(shard) or trainer.model.get_weights()
    else:
        started_from = trainer.model.get_weights()
    weights_future = transport.place(trainer.client, wire.encode(started_from, trainer.wire_dtype),
                                     trainer.scatter_timeout, [preferred])
    task_key = f"cnnx-{trainer.run_id}-{trainer.mode}-e{epoch}-s{step}-g{shard}-v{version}"
    options = dict(key=task_key, workers=[preferred], allow_other_workers=True, pure=False)
    if trainer.mode in ("downpour", "dynsgd"):
        future = trainer.client.submit(worker.shard_gradient, trainer.model_future,
                                       weights_future, trainer.shard_spec(unit["indices"][0]),
                                       unit["key"], trainer.wire_dtype, **options)
    else:
        keys = [(epoch, s, shard) for s in unit["steps"]]
        future = trainer.client.submit(worker.local_sgd, trainer.model_future, weights_future,
                                       [trainer.shard_spec(i) for i in unit["indices"]], keys,
                                       trainer.mode_options.local_learning_rate,
                                       trainer.wire_dtype,
                                       **options)
    return future, started_from


def commit(trainer, key, version, result, started_from=None):
    """Apply one unit's result unless its key was applied already; returns its record or None."""
    key = tuple(int(k) for k in key)
    if key in trainer.applied:
        trainer.duplicates += 1
        return None
    staleness = trainer.version - version
    if trainer.mode in ("downpour", "dynsgd"):
        total, stats = result
        scale = 1.0 / (staleness + 1) if trainer.mode == "dynsgd" else 1.0
        _apply_gradient(trainer, total, scale)
        n, loss_sum, n_correct = total.n_samples, total.loss_sum, total.n_correct
        address = next(iter(stats["worker"]))
    else:
        params, loss_sum, n_correct, n, _, address = result
        params = wire.decode(params)
        if trainer.mode == "adag":
            _apply_change(trainer, params, started_from, 1.0 / (staleness + 1))
        else:
            _elastic_exchange(trainer, key[2], params)
    trainer.version += 1
    trainer.applied.add(key)
    if trainer.replay is not None:
        trainer.replay_needs[version] -= 1
        take_snapshot(trainer)
    record = {"epoch": key[0], "step": key[1], "shard": key[2], "version": version,
              "staleness": staleness, "worker": address, "n_samples": int(n),
              "loss_sum": float(loss_sum), "n_correct": int(n_correct),
              "loss": float(loss_sum) / n, "accuracy": int(n_correct) / n}
    trainer.commits.append(record)
    trainer.staleness.setdefault(address, []).append(staleness)
    if trainer.replay_log is not None:
        with open(trainer.replay_log, "a") as log:
            log.write(json.dumps({k: record[k] for k in ("epoch", "step", "shard", "version",
                                                         "staleness", "worker")}) + "\n")
    return record


def _apply_gradient(trainer, total, scale):
    total = wire.decoded(total)
    if scale != 1.0:          # DynSGD: the same as a gradient sum scaled by 1/(staleness+1)
        grads = {name: g * np.float32(scale) for name, g in total.mean_grads().items()}
        trainer.model.apply_gradients(grads, total.state)
    else:
        trainer.model.apply_gradient_sum(total)


def _apply_change(trainer, params, started_from, scale):
    """ADAG: centre += scale * (worker's weights after its window - weights it started from)."""
    centre = trainer.model.get_weights()
    trainer.model.set_weights({name: centre[name] + scale * (params[name] - started_from[name])
                               for name in centre})


def _elastic_exchange(trainer, shard, params):
    """EASGD: d = alpha (local - centre); the local copy moves back by d, the centre by +d."""
    centre = trainer.model.get_weights()
    alpha = trainer.mode_options.alpha
    difference = {name: alpha * (params[name] - centre[name]) for name in centre}
    trainer.local_weights[shard] = {name: params[name] - difference[name] for name in centre}
    trainer.model.set_weights({name: centre[name] + difference[name] for name in centre})
