"""The papers' synchronous protocol, `Sync(weights="broadcast")`: kept for comparison and
for docs/experiments/communication.md, not the default (synchronous.py's replicas are).

Each step the driver sends the weights out (to one worker; the others fetch them from it),
one task per virtual shard returns its gradient sum, the sums reduce in the fixed pair-sum
tree (plan.tree_pairs: the order of additions depends on G only, so the weights are the same
bits on any worker count), and the driver applies the root with the model's own optimizer.
2·N·P·b bytes per step. A step that loses data with a worker is run again from its inputs.
"""
import time

from cnnx.parallel import cluster, plan, transport, wire, worker
from cnnx.parallel.transport import LOST, preferred_worker


class BroadcastSync:
    """Runs synchronous epochs with the weights sent out every step; yields one record per
    step. `spec(indices)` says what a worker task needs to read its samples."""

    def __init__(self, client, model, spec, n_shards, run_id, wire_dtype="float32",
                 max_step_retries=3, worker_timeout=60.0, scatter_timeout=20.0, echo=print):
        self.client, self.model, self.spec, self.n_shards = client, model, spec, n_shards
        self.run_id, self.wire_dtype = run_id, wire_dtype
        self.max_step_retries, self.worker_timeout = max_step_retries, worker_timeout
        self.scatter_timeout, self.echo = scatter_timeout, echo
        self.model_future = None

    def start(self):
        """The model (without optimizer state) on every worker, once per fit."""
        self._place_model()

    def close(self):
        self.model_future = None                  # the workers' copies are released

    def run_epoch(self, epoch, epoch_plan, first_step):
        for step in range(first_step, len(epoch_plan)):
            yield self._step(epoch, step, epoch_plan[step])

    def _place_model(self, attempt=0):
        self.model_future = self._place(transport.worker_copy(self.model), attempt,
                                        broadcast=attempt == 0)

    def _place(self, value, attempt=0, broadcast=False):
        """`value` on every worker (broadcast) or on one the others fetch from; a retry
        (attempt) picks the next worker, in case the first just died."""
        workers = cluster.worker_addresses(self.client)
        workers = workers[attempt % len(workers):] if workers else None
        return transport.place(self.client, value, self.scatter_timeout, workers, broadcast)

    def _step(self, epoch, step, step_plan):
        """One step, retried from its inputs if workers die and take data along."""
        for attempt in range(self.max_step_retries + 1):
            workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
            try:
                if attempt:
                    self._place_model(attempt)  # its copies may have died with the workers
                return self._step_once(epoch, step, step_plan, workers, attempt)
            except (*LOST, TimeoutError) as error:
                if attempt == self.max_step_retries:
                    raise
                self.echo(f"cnnx: step {step} of epoch {epoch} lost data or stalled with a "
                          f"worker ({type(error).__name__}); retrying it "
                          f"({attempt + 1}/{self.max_step_retries})")
        raise AssertionError("unreachable")

    def _step_once(self, epoch, step, step_plan, workers, attempt):
        started = time.perf_counter()
        weights = wire.encode(self.model.get_weights(), self.wire_dtype)
        weights_future = self._place(weights, attempt)     # other workers fetch it once
        scattered = time.perf_counter()
        prefix = f"cnnx-{self.run_id}-e{epoch}-s{step}-a{attempt}"
        leaves = [self._submit_shard(weights_future, step_plan[shard], (epoch, step, shard),
                                     workers, f"{prefix}-grad-{shard}")
                  for shard in range(len(step_plan))]
        root = self._reduce_tree(leaves, prefix)
        try:
            total, stats = root.result()
        except worker.NonFiniteGradientError as error:
            raise worker.NonFiniteGradientError(
                f"{error}; training stopped before applying step {step} of epoch {epoch}: the "
                f"model holds the weights after the previous step") from None
        received = time.perf_counter()
        self.model.apply_gradient_sum(wire.decoded(total))  # what Sequential.fit does per batch
        applied = time.perf_counter()
        del leaves, root, weights_future
        return _record(epoch, step, total, stats, workers, {
            "scatter_s": scattered - started, "wait_s": received - scattered,
            "optimizer_s": applied - received, "time_s": applied - started,
            "bytes_out": wire.nbytes(weights), "bytes_in": wire.nbytes(total.grads)})

    def _submit_shard(self, weights_future, indices, key, workers, task_key):
        preferred = workers[preferred_worker(key[2], self.n_shards, len(workers))]
        return self.client.submit(worker.shard_gradient, self.model_future, weights_future,
                                  self.spec(indices), key, self.wire_dtype, key=task_key,
                                  workers=[preferred], allow_other_workers=True, pure=False)

    def _reduce_tree(self, leaves, prefix):
        """Pair-sum tasks in a fixed tree: the order of every addition depends on G only."""
        nodes = leaves
        for depth, level in enumerate(plan.tree_pairs(len(leaves))):
            nodes = [nodes[pair[0]] if len(pair) == 1 else
                     self.client.submit(worker.sum_pair, nodes[pair[0]], nodes[pair[1]],
                                        key=f"{prefix}-sum-{depth}-{i}", pure=False)
                     for i, pair in enumerate(level)]
        return nodes[0]


def _record(epoch, step, total, stats, workers, phases):
    n = int(total.n_samples)
    compute = stats["compute_s"] / max(1, len(stats["worker"]))
    return dict(phases, epoch=epoch, step=step, n_samples=n,
                loss_sum=float(total.loss_sum), n_correct=int(total.n_correct),
                loss=float(total.loss_sum) / n, accuracy=int(total.n_correct) / n,
                images_per_s=n / phases["time_s"], compute_s=compute,
                max_shard_compute_s=stats["max_compute_s"], read_s=stats["read_s"],
                transfer_s=max(0.0, phases["wait_s"] - compute), workers=len(workers),
                tasks_per_worker=stats["worker"])
