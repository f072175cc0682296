"""The synchronous driver: replicas on the workers, gradient sums in a fixed tree, pipelined.

Design (all-reduce style, the driver stays the authority):
- At the start each worker gets the model once, optimizer state included (replica.py).
- Step v: one task per virtual shard computes its gradient sum on its worker's replica at
  version v; a fixed pair-sum tree (plan.tree_pairs, G only) reduces them; the root sum goes
  to every worker (through a binary relay tree beyond two workers: each node sends at most
  twice what it receives; the root's sum itself runs on both workers that hold its two
  inputs where that sends no more, so two workers just swap halves). Each replica applies
  it inside its first task of step v + 1 with Sequential.apply_gradient_sum. Same code,
  same sum, same order: every replica holds the same bits, on any worker count. The
  driver receives only the step's counts and loss.
- The driver's model is brought to the replicas' version (`pull`: weights and optimizer
  state from one replica, 3·P once) every `pull_every` steps, for checkpoints, at epoch
  ends and at the end of fit: checkpoints are written from it. Until then the sums of the
  steps since stay on the workers: each replica keeps the root sums it summed or applied
  (beyond Dask's reach: see replica.py), so a killed worker costs no sum.
- Pipelined: step v + 1's tasks are queued behind step v's root before the driver waits for
  it, so Dask's round trips to the driver overlap the workers' work instead of adding to it.
  A shard's task reads its own batch: a step costs Dask one task per shard, the sums and
  the summary (each task costs the scheduler, the driver and the worker a few ms of the
  same cores). Prefetching the next batch on a worker thread was tried and taken out: it
  made a worker SIGKILLed mid-epoch lose sums the driver could not rebuild (2 runs in 4).
- Weights never travel per step. Anything lost (a worker killed, a worker that joined
  without a replica) fails the step; the driver then brings its model up to date, re-installs
  it where replicas are missing or behind, and runs the step again from its inputs: the
  same bits.
"""
import collections
import time
import uuid

import distributed

from cnnx.parallel import cluster, plan, replica, transport, wire, worker

PIPELINE_DEPTH = 2                        # steps queued on the workers at a time
PULL_EVERY = 8                            # steps between pulls: bounds the sums kept
CLOSE_WAIT_S = 30                         # how long close() lets released steps finish
RECOVERABLE = (*transport.LOST, TimeoutError, replica.ReplicaMissing,
               distributed.KilledWorker)


class _Step:
    """The futures of one submitted step."""

    def __init__(self, epoch, step, version, root, copies, summary, submitted):
        self.epoch, self.step, self.version = epoch, step, version
        self.root, self.summary, self.submitted = root, summary, submitted
        self.copies = copies              # {worker address: a future of the root sum there}


class ReplicatedSync:
    """Runs synchronous epochs on worker replicas of `model`; yields one record per step."""

    def __init__(self, client, model, spec, wire_dtype="float32", max_step_retries=3,
                 worker_timeout=60.0, echo=print):
        self.client, self.model, self.spec = client, model, spec
        self.wire_dtype, self.max_step_retries = wire_dtype, max_step_retries
        self.worker_timeout, self.echo = worker_timeout, echo
        self.run = f"cnnx-{uuid.uuid4().hex[:8]}"
        self.version = 0                  # steps whose sums are known (replicas reach it)
        self.model_version = 0            # steps the driver's own model has taken
        self.roots = []                   # root futures of the steps model_version..version-1
        self.attempt = 0                  # bumps on every recovery: fresh task keys
        self.previous = None              # {worker: root copy} the next submitted step applies
        self.last_root = None             # the root future of step version - 1
        self.last_copies = None           # and its copies, {worker address: future}
        self.workers = []
        self.last_arrival = None
        self.pulled_bytes = 0             # weights and optimizer state the driver received
        self.released = []                # summaries of steps nobody waits for any more
        self.queue = collections.deque()  # the steps run_epoch has submitted, not yet yielded

    # ------------------------------------------------------------------ replicas
    def start(self):
        """Install the replicas (once per fit: the model reaches each worker once)."""
        self.workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
        self._install(self.workers)

    def close(self):
        # a released step still running would find its replica gone, and its worker would
        # log the failure with a traceback (after Ctrl-C, pages of them): let them finish.
        # A consumer that stopped (Ctrl-C, an error) leaves run_epoch suspended, its own
        # finally not run yet: release its queue here.
        self._cancel(self.queue)
        try:
            distributed.wait(self.released, timeout=CLOSE_WAIT_S)
        except Exception:                 # a timeout, or the cluster closing: drop anyway
            pass
        self.released = []
        try:
            self.client.run(replica.drop, self.run, on_error="return")
        except Exception:                 # the cluster may be closing; replicas die with it
            pass

    def _install(self, addresses):
        model = transport.worker_copy(self.pull(), with_optimizer=True)
        self.client.run(replica.install, self.run, model, self.version, workers=addresses,
                        on_error="return")
        self.previous = None

    def _repair(self):
        """Re-install the driver's model wherever a replica is missing or not at its version."""
        self.workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
        versions = self.client.run(replica.version_of, self.run, on_error="return")
        stale = [address for address in self.workers if versions.get(address) != self.version]
        if stale:
            self._install(stale)
        self.previous = None

    # ------------------------------------------------------------------ the driver's model
    def pull(self, quiet=False):
        """Bring the driver's model (weights and optimizer state) to the replicas' version:
        from a replica when one is there, else by applying the kept sums itself.

        quiet: on the way out of a failed fit, where released steps may have moved the
        replicas past the version, ask only for a replica exactly at it (no task that
        fails, whose worker would log a traceback)."""
        if self.model_version == self.version:
            return self.model
        state = None
        if self.roots and not quiet:
            try:
                state = self.client.submit(
                    replica.state_at, self.run, self.version, self.roots[-1],
                    key=f"{self.run}-a{self.attempt}-state-{self.version}",
                    workers=self.workers[:1], allow_other_workers=True, pure=False).result()
            except RECOVERABLE:
                state = None
        if state is None:
            found = self.client.run(replica.state_if_at, self.run, self.version,
                                    on_error="return")
            state = next((s for s in found.values() if isinstance(s, tuple)), None)
        if state is not None:
            weights, optimizer_state = state
            self.pulled_bytes += wire.nbytes(weights) + wire.nbytes(optimizer_state)
            self.model.set_weights(weights)
            self.model.optimizer.load_state_dict(optimizer_state)
        else:
            self._apply_kept_sums()
        self.model_version, self.roots = self.version, []
        return self.model

    def _apply_kept_sums(self):
        """No replica is at the version: take the sums of the steps since in order, as the
        replicas did: from a replica that kept them all (it may be past the version: it
        applied a step whose summary was lost with another worker), else from the roots the
        driver holds (Dask recomputes what it lost of them, where replicas allow)."""
        first, stop = self.model_version, self.version
        sums = self._sums_kept_by_a_replica(first, stop)
        if sums is None:
            try:
                sums = [total for total, _ in self.client.gather(self.roots)]
            except Exception as error:
                raise RuntimeError(
                    f"DaskTrainer: the gradient sums of steps {first}..{stop - 1} of this fit "
                    f"were lost with the workers that held them ({error}); resume from the "
                    f"last checkpoint") from error
        for total in sums:
            self.pulled_bytes += wire.nbytes(total.grads)
            self.model.apply_gradient_sum(wire.materialised(total))

    def _sums_kept_by_a_replica(self, first, stop):
        holding = self.client.run(replica.holds_sums, self.run, first, stop, on_error="return")
        for address, holds in holding.items():
            if holds is True:
                found = self.client.run(replica.sums_between, self.run, first, stop,
                                        workers=[address], on_error="return")
                if isinstance(found.get(address), list):
                    return found[address]
        return None

    def evaluate_tasks(self, specs, workers):
        """Futures of (loss_sum, n_correct, n) of each spec on the replicas, as they are
        now; between two steps (no step queued: the replicas are at most at version)."""
        copies = self.last_copies or {}
        futures = [self.client.submit(replica.evaluate_replica, self.run, self.version,
                                      copies.get(address, self.last_root), spec,
                                      workers=[address], allow_other_workers=True, pure=False)
                   for spec, address in zip(specs, workers)]
        # close() lets them finish before it drops the replicas (an evaluation cut short by
        # Ctrl-C would find its replica gone, and its worker would log a traceback)
        self.released = [future for future in self.released if not future.done()] + futures
        return futures

    def _welcome_new_workers(self, queued):
        """Give workers that joined a replica at the driver's version; the next step's tasks
        bring it up to date (this works with at most one step still queued)."""
        workers = cluster.worker_addresses(self.client)
        joined = sorted(set(workers) - set(self.workers))
        if joined and queued <= 1:
            self._install_keeping_previous(joined)
        if workers and (not joined or queued <= 1):
            self.workers = workers

    def _install_keeping_previous(self, addresses):
        previous = self.previous
        self._install(addresses)
        self.previous = previous

    # ------------------------------------------------------------------ steps
    def run_epoch(self, epoch, epoch_plan, first_step):
        """Yield the record of each step from first_step on, in order, once its sum is known
        (a consumer may pull, checkpoint or stop between two records)."""
        queue = self.queue = collections.deque()
        following, retries = first_step, 0
        try:
            while following < len(epoch_plan) or queue:
                while following < len(epoch_plan) and len(queue) < PIPELINE_DEPTH:
                    queue.append(self._submit(epoch, following, epoch_plan[following],
                                              self.version + len(queue)))
                    following += 1
                head = queue[0]
                try:
                    summary = head.summary.result()
                except worker.NonFiniteGradientError as error:
                    self._cancel(queue)
                    self.pull()
                    raise worker.NonFiniteGradientError(
                        f"{error}; training stopped before applying step {head.step} of epoch "
                        f"{epoch}: the model holds the weights after the previous step") from None
                except RECOVERABLE as error:
                    retries += 1
                    if retries > self.max_step_retries:
                        raise
                    self.echo(f"cnnx: step {head.step} of epoch {epoch} lost data or a model "
                              f"replica with a worker ({type(error).__name__}); retrying it "
                              f"({retries}/{self.max_step_retries})")
                    following = head.step
                    self._cancel(queue)
                    self.attempt += 1
                    self._repair()
                    continue
                retries = 0
                queue.popleft()
                record = self._take(head, summary)
                if len(self.roots) >= PULL_EVERY:
                    before = self.pulled_bytes
                    self.pull()
                    record["bytes_in"] = self.pulled_bytes - before
                self._welcome_new_workers(len(queue))
                yield record
        finally:
            self._cancel(queue)

    def _cancel(self, queue):
        """Release the queued steps (they fail or finish unseen). Not client.cancel: this
        Dask's scheduler asserts on cancelling a task whose input erred and drops the
        client's connection with every future of the fit."""
        self.released = [summary for summary in self.released if not summary.done()]
        self.released += [step.summary for step in queue]
        queue.clear()
        self.previous = self.last_copies

    def _submit(self, epoch, step, step_plan, version):
        """Submit step `step`'s tasks: one per shard (its batch read in the task), the sum
        tree, the summary."""
        started = time.perf_counter()
        prefix = f"{self.run}-a{self.attempt}-v{version}"
        sources = self._broadcast(self.previous, prefix)
        leaves = []
        for shard in range(len(step_plan)):
            where = self.workers[transport.preferred_worker(shard, len(step_plan),
                                                            len(self.workers))]
            key = (epoch, step, shard)
            leaves.append(self.client.submit(
                replica.replica_gradient, self.run, version, sources.get(where),
                self.spec(step_plan[shard]), key, self.wire_dtype, self.model_version,
                key=f"{prefix}-grad-{shard}", workers=[where], allow_other_workers=True,
                pure=False))
        root, copies = self._reduce(leaves, prefix, step_plan, version)
        summary = self.client.submit(replica.summary, root, key=f"{prefix}-summary",
                                     workers=self.workers[:1], allow_other_workers=True,
                                     pure=False)
        self.previous = copies
        return _Step(epoch, step, version, root, copies, summary, submitted=started)

    def _broadcast(self, copies, prefix):
        """{worker address: a future of the root sum held there}, from `copies` (the workers
        that summed it): Dask fetches it for the first two workers from where it was summed;
        beyond that a binary tree of relays, so no worker sends the sum more than twice plus
        once to the driver."""
        if not copies:
            return {}
        held = dict(copies)
        root = held.setdefault(self.workers[0], next(iter(copies.values())))
        for child, parent in enumerate(plan.broadcast_parents(len(self.workers))):
            where = self.workers[child]
            if parent is None or where in held:
                continue
            if parent == 0 and child == 1:
                held[where] = root
            else:
                held[where] = self.client.submit(replica.relay, held[self.workers[parent]],
                                                 key=f"{prefix}-relay-{child}", workers=[where],
                                                 allow_other_workers=True, pure=False)
        return held

    def _reduce(self, leaves, prefix, step_plan, version):
        """Pair-sum tasks in a fixed tree: the order of every addition depends on G only.
        Each sum runs where its left input is, so the root ends on the first worker; the
        root's own sum runs twice, where each of its two inputs is (the same inputs in the
        same order: the same bits), so the two halves are exchanged once each way at the
        same time instead of one half going up and the whole sum coming back down.

        Returns (root, {worker address: a future of the root sum held there})."""
        nodes, homes = leaves, [transport.preferred_worker(shard, len(step_plan),
                                                           len(self.workers))
                                for shard in range(len(leaves))]
        copies, parents = {}, plan.broadcast_parents(len(self.workers))
        for depth, level in enumerate(plan.tree_pairs(len(leaves))):
            if len(level) == 1 and self._sums_root_twice(homes[level[0][0]],
                                                         homes[level[0][1]], parents):
                left, right = nodes[level[0][0]], nodes[level[0][1]]
                where = self.workers[homes[level[0][1]]]
                copies[where] = self._sum(left, right, f"{prefix}-sum-{depth}-copy", where,
                                          root_of=version)
            root_of = version if len(level) == 1 else None
            nodes = [nodes[pair[0]] if len(pair) == 1 else
                     self._sum(nodes[pair[0]], nodes[pair[1]], f"{prefix}-sum-{depth}-{i}",
                               self.workers[homes[pair[0]]], root_of)
                     for i, pair in enumerate(level)]
            homes = [homes[pair[0]] for pair in level]
        copies[self.workers[homes[0]]] = nodes[0]
        return nodes[0], copies

    def _sum(self, left, right, key, where, root_of=None):
        """A pair-sum task on `where`; at the root (root_of: the step) the replica there
        keeps the sum it made."""
        if root_of is None:
            return self.client.submit(worker.sum_pair, left, right, key=key, workers=[where],
                                      allow_other_workers=True, pure=False)
        return self.client.submit(replica.root_sum, self.run, root_of, left, right, key=key,
                                  workers=[where], allow_other_workers=True, pure=False)

    @staticmethod
    def _sums_root_twice(left_home, right_home, parents):
        """Whether the root's right input's worker sums the root itself: when the broadcast
        tree would send it the root straight from the root's worker (always with two
        workers), which then sends its half instead, so no worker sends more than before."""
        return left_home == 0 and right_home != 0 and parents[right_home] == 0

    def _take(self, head, summary):
        """The step's record; its sum stays on the workers (kept for pull)."""
        n, loss_sum, n_correct, stats = summary
        self.version += 1
        self.roots.append(head.root)
        self.last_root, self.last_copies = head.root, head.copies
        received = time.perf_counter()
        # pipelined: a step takes the time between two sums arriving (or since submission)
        since = head.submitted if self.last_arrival is None else max(self.last_arrival,
                                                                     head.submitted)
        self.last_arrival = received
        seconds = received - since
        compute = stats["compute_s"] / max(1, len(stats["worker"]))
        return {"epoch": head.epoch, "step": head.step, "n_samples": n, "loss_sum": loss_sum,
                "n_correct": n_correct, "loss": loss_sum / n, "accuracy": n_correct / n,
                "time_s": seconds, "images_per_s": n / seconds,
                "scatter_s": 0.0, "wait_s": seconds, "optimizer_s": 0.0,
                "compute_s": compute, "max_shard_compute_s": stats["max_compute_s"],
                "max_shard_compute_cpu_s": stats.get("max_compute_cpu_s", 0.0),
                "replica_apply_cpu_s": stats.get("max_apply_cpu_s", 0.0),
                "replica_apply_s": stats.get("max_apply_s", 0.0), "read_s": stats["read_s"],
                "transfer_s": max(0.0, seconds - stats["max_compute_s"]
                                  - stats.get("max_apply_s", 0.0)),
                "bytes_out": 0, "bytes_in": 0,
                "workers": len(self.workers), "tasks_per_worker": stats["worker"]}
