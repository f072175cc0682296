"""DaskTrainer: train one model on a Dask cluster, synchronously or asynchronously.

A facade: the mode object picks the driver that runs the epochs (synchronous.py: replicas
on the workers, the default; broadcast.py: the papers' weights-out protocol;
asynchronous.py: Downpour, DynSGD, ADAG, EASGD). What every mode shares lives here: the
plan of shards and steps, the epoch tally and history, validation, checkpoints and resume.
"""
import json
import uuid

import numpy as np

from cnnx.parallel import (asynchronous, broadcast, checkpoint, cluster, modes, plan, records,
                           synchronous, transport, wire, worker)

MODES = tuple(modes.MODES)
OLDER_MODE_KEYWORDS = ("learning_rate", "tau", "alpha", "max_in_flight", "sync_weights")


def _default_opener(store):
    from cnnx.data import open_dataset
    return open_dataset(store)


class DaskTrainer:
    """Data-parallel training of `model` (a compiled cnnx.nn.Sequential) over Dask.

    client: a distributed.Client, a scheduler address ("tcp://host:8786"), or None for a
        LocalCluster on 127.0.0.1 with one single-threaded worker per core (closed by close()).
    mode: a mode object from cnnx.parallel.modes, holding its own options: Sync() (the
        default: G virtual shards per step, a fixed pair-sum tree, bit-reproducible; model
        replicas on the workers), Downpour(), DynSGD() (gradients applied on arrival, DynSGD
        scaled by 1/(staleness+1)), ADAG(tau, local_learning_rate) (tau local SGD steps, the
        change scaled by 1/(staleness+1)), EASGD(tau, alpha, local_learning_rate) (tau local
        steps, elastic exchange with the centre). The older form, a name ("sync", "downpour",
        "dynsgd", "adag", "easgd") with learning_rate=, tau=, alpha=, max_in_flight=,
        sync_weights= keywords, still works and builds the same objects.
    shards: G, the number of virtual shards a step's batch is split into (default: the number
        of workers at the start). Same seed and G give the same weights on any worker count.
    wire_dtype: "float32" or "bfloat16" for weights and gradients on the wire.
    replay_log: a path; asynchronous modes append each applied commit to it (JSON lines).
    replay: a replay log of an earlier asynchronous run: re-run its commits in that order,
        each on the weights it saw, to reproduce the run bit for bit (one unit at a time).
    """

    def __init__(self, model, client=None, mode="sync", shards=None, *, seed=0,
                 wire_dtype="float32", normalize="standardize", augment=None,
                 cache_bytes=512 * 2**20, checkpoint_every=None, worker_timeout=60.0,
                 connect_timeout=cluster.DEFAULT_CONNECT_TIMEOUT, replay_log=None, replay=None,
                 max_step_retries=3, scatter_timeout=20.0, progress=True, opener=None,
                 echo=print, **mode_options):
        self.mode_options = _mode_object(mode, mode_options)
        mode = self.mode_options.name
        if shards is not None and (not isinstance(shards, int) or shards < 1):
            raise ValueError(f"DaskTrainer: shards must be a positive integer, got {shards!r}")
        self.model, self.mode, self.shards, self.seed = model, mode, shards, seed
        self.wire_dtype = wire.check_format(wire_dtype)
        self.normalize, self.augment, self.cache_bytes = normalize, augment, cache_bytes
        self.checkpoint_every, self.worker_timeout = checkpoint_every, worker_timeout
        self.max_step_retries, self.progress, self.echo = max_step_retries, progress, echo
        self.opener = opener or _default_opener
        self.scatter_timeout = scatter_timeout
        self.client, self._owned_cluster = cluster.connect(client, connect_timeout, echo=echo)
        self._owns_client = self.client is not client       # we opened it: we close it
        self._dataset = None
        self._sync_driver = self._broadcast_driver = self._tally = None
        self.n_shards = shards                    # G, fixed by fit when shards is None
        self.history, self.steps = [], []
        self.run_id = uuid.uuid4().hex[:8]
        # the asynchronous modes' driver owns their commit state for the trainer's lifetime
        self.async_driver = None if mode == "sync" else asynchronous.AsyncDriver(
            self.client, model, self.mode_options, self.shard_spec, wire_dtype=self.wire_dtype,
            replay_log=replay_log, replay=replay, max_step_retries=max_step_retries,
            worker_timeout=worker_timeout, scatter_timeout=scatter_timeout, echo=echo)

    # ----------------------------------------------------------------- async state, read-only
    @property
    def commits(self):
        """Asynchronous modes: one record per applied commit, in order."""
        return self.async_driver.commits if self.async_driver else []

    @property
    def staleness(self):
        """Asynchronous modes: worker address -> the staleness of each of its commits."""
        return self.async_driver.staleness if self.async_driver else {}

    @property
    def version(self):
        """Asynchronous modes: the number of commits applied to the model."""
        return self.async_driver.version if self.async_driver else 0

    @property
    def duplicates(self):
        """Asynchronous modes: results that arrived for a unit already applied (not applied)."""
        return self.async_driver.duplicates if self.async_driver else 0

    # ----------------------------------------------------------------- lifecycle
    def close(self):
        """Close the Client and LocalCluster this trainer opened (a given Client stays open)."""
        if self._owns_client:
            self.client.close()
            self._owns_client = False
        if self._owned_cluster is not None:
            self._owned_cluster.close()
            self._owned_cluster = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # ----------------------------------------------------------------- fit
    def fit(self, dataset, epochs, batch_size, indices=None, validation=None,
            checkpoint_dir=None, resume=False, callbacks=()):
        """Train for `epochs` epochs of global batches of `batch_size`; returns self.history.

        dataset: a cnnx.data Dataset (or its store path); workers reopen it by `store`.
        indices: the training samples (default: all). validation: indices into the same
            dataset, evaluated on the workers at each epoch end.
        checkpoint_dir: written every `checkpoint_every` steps and at each epoch end;
            resume=True continues from the checkpoint there."""
        if isinstance(dataset, str):
            dataset = self.opener(dataset)
        self._dataset = dataset
        self._store = str(dataset.store)
        workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
        n_shards = self.n_shards = self.shards or len(workers)
        shard_batch = plan.per_shard_batch(batch_size, n_shards)
        samples = np.arange(len(dataset)) if indices is None else np.asarray(indices, np.int64)
        owned = plan.shard_indices(samples, dataset.chunk_size, n_shards)
        self._meta = {"mode": self.mode, "seed": self.seed, "shards": n_shards,
                      "batch_size": batch_size, "wire_dtype": self.wire_dtype}
        if checkpoint_dir is not None:            # what a resume must match
            self._meta.update(architecture=_json_form(self.model.get_config()),
                              optimizer=_optimizer_config(self.model))
        start_epoch, start_step, saved_tally = 0, 0, None
        if resume and checkpoint_dir is not None:
            start_epoch, start_step, saved_tally = self._restore(checkpoint_dir)
        self._sync_driver = self._broadcast_driver = None
        if self.mode == "sync" and self.mode_options.weights == "replicated":
            self._sync_driver = synchronous.ReplicatedSync(
                self.client, self.model, self.shard_spec, self.wire_dtype,
                self.max_step_retries, self.worker_timeout, self.echo)
            self._sync_driver.start()
        elif self.mode == "sync":
            self._broadcast_driver = broadcast.BroadcastSync(
                self.client, self.model, self.shard_spec, n_shards, self.run_id,
                self.wire_dtype, self.max_step_retries, self.worker_timeout,
                self.scatter_timeout, self.echo)
            self._broadcast_driver.start()
        else:
            self.async_driver.start()
        try:
            self._fit_epochs(epochs, start_epoch, start_step, saved_tally, owned, shard_batch,
                             validation, checkpoint_dir, list(callbacks))
            self.pull()
        except BaseException:
            self._pull_if_possible()
            raise
        finally:
            for driver in (self._sync_driver, self._broadcast_driver, self.async_driver):
                if driver is not None:
                    driver.close()               # releases the workers' copies
            self._sync_driver = self._broadcast_driver = None
        return self.history

    def pull(self, quiet=False):
        """The model, brought up to date with the workers' replicas (sync mode keeps the
        weights on the workers during fit and updates the driver's model at checkpoints,
        epoch ends, every few steps and at the end; a callback that needs the weights of
        the step it sees calls this).  quiet: see ReplicatedSync.pull."""
        if self._sync_driver is not None:
            before = self._sync_driver.pulled_bytes
            self._sync_driver.pull(quiet)
            if self._tally is not None:           # what the driver received counts as bytes_in
                self._tally.sums["bytes_in"] += self._sync_driver.pulled_bytes - before
        return self.model

    def _pull_if_possible(self):
        """On the way out of a failed fit: the model takes the last completed step if the
        cluster can still tell it (the error that stopped fit matters more than this one)."""
        try:
            self.pull(quiet=True)
        except Exception as error:
            self.echo(f"cnnx: the model keeps the weights of an earlier step ({error})")

    def _fit_epochs(self, epochs, start_epoch, start_step, saved_tally, owned, shard_batch,
                    validation, checkpoint_dir, callbacks):
        for epoch in range(start_epoch, epochs):
            epoch_plan = plan.epoch_plan(owned, self.seed, epoch, shard_batch)
            first = start_step if epoch == start_epoch else 0
            self._tally = records.EpochTally(epoch, saved_tally if first else None)
            self._between_baseline = (self._worker_transfer_bytes(), self._tally.sums["bytes_in"])
            if self.mode == "sync":
                self._sync_epoch(epoch, epoch_plan, first, checkpoint_dir, callbacks)
            else:
                self._async_epoch(epoch, epoch_plan, first, callbacks)
            self.pull()
            self._count_between_workers()
            summary = self._tally.summary()
            if validation is not None:
                summary.update(self.evaluate(validation, prefix="val_"))
            self.history.append(summary)
            self._echo_epoch(summary)
            if checkpoint_dir is not None:
                self.save_checkpoint(checkpoint_dir, epoch + 1, 0)

    # ----------------------------------------------------------------- sync
    def _sync_epoch(self, epoch, epoch_plan, first_step, checkpoint_dir, callbacks):
        bar = _progress(len(epoch_plan), first_step, f"epoch {epoch}", self.progress)
        driver = self._sync_driver or self._broadcast_driver
        steps = driver.run_epoch(epoch, epoch_plan, first_step)
        try:
            for record in steps:
                step = record["step"]
                self._tally.add(record)
                self.steps.append(record)
                bar.update(1)
                bar.set_postfix(loss=f"{record['loss']:.4f}", acc=f"{record['accuracy']:.3f}",
                                img_s=f"{record['images_per_s']:.0f}")
                if (checkpoint_dir is not None and self.checkpoint_every
                        and (step + 1) % self.checkpoint_every == 0 and step + 1 < len(epoch_plan)):
                    self.save_checkpoint(checkpoint_dir, epoch, step + 1)
                for callback in callbacks:
                    callback(self, record)
        finally:
            steps.close()
            bar.close()

    # ----------------------------------------------------------------- async
    def _async_epoch(self, epoch, epoch_plan, first_step, callbacks):
        for record in self.async_driver.run_epoch(epoch, epoch_plan, first_step):
            self._tally.add(record)
            self.steps.append(record)
            for callback in callbacks:
                callback(self, record)

    # ----------------------------------------------------------------- validation
    def evaluate(self, indices=None, prefix="", dataset=None):
        """Loss and accuracy of the current weights on `indices` (default: all samples) of
        `dataset` (default: the one fit trained on), computed on the workers."""
        if dataset is not None:
            self._dataset = self.opener(dataset) if isinstance(dataset, str) else dataset
            self._store = str(self._dataset.store)
        if self._dataset is None:
            raise ValueError("DaskTrainer.evaluate: called before fit() without a dataset; "
                             "pass dataset= (a cnnx.data Dataset or its store path)")
        if indices is None:
            indices = np.arange(len(self._dataset))
        workers = cluster.wait_for_workers(self.client, self.worker_timeout, self.echo)
        indices = np.sort(np.asarray(indices, np.int64))
        chunk_of = indices // self._dataset.chunk_size
        groups = [indices[chunk_of % len(workers) == i] for i in range(len(workers))]
        kept = [(self.shard_spec(group), address) for group, address in zip(groups, workers)
                if len(group)]
        if self._sync_driver is not None:         # during fit: on the replicas, nothing sent
            if any(layer.regularizers for layer in self.model.layers):
                self.pull()                       # the penalty below reads the weights
            futures = self._sync_driver.evaluate_tasks(*zip(*kept))
        else:
            weights_future = self._place(wire.encode(self.model.get_weights(), self.wire_dtype))
            # after fit() the workers' model copies were released; evaluate() must work then
            model_future = ((self._broadcast_driver and self._broadcast_driver.model_future)
                            or (self.async_driver and self.async_driver.model_future)
                            or self._place(transport.worker_copy(self.model), broadcast=True))
            futures = [self.client.submit(worker.evaluate_batch, model_future, weights_future,
                                          spec, workers=[address], allow_other_workers=True,
                                          pure=False)
                       for spec, address in kept]
        results = self.client.gather(futures)
        loss_sum = sum(r[0] for r in results)
        n_correct = sum(r[1] for r in results)
        n = sum(r[2] for r in results)
        # regularisation included, as Sequential.evaluate (and Keras) report it
        loss = loss_sum / n + self.model.regularization_loss()
        return {f"{prefix}loss": loss, f"{prefix}accuracy": n_correct / n}

    # ----------------------------------------------------------------- checkpoints
    def save_checkpoint(self, directory, epoch, step):
        """Checkpoint the state that resumes at (epoch, step)."""
        self.pull()
        meta = dict(self._meta, epoch=epoch, step=step, history=self.history,
                    commits=len(self.commits))
        if step:                                  # mid-epoch: the steps done so far count too
            self._count_between_workers()
            meta["epoch_so_far"] = self._tally.to_meta()
        optimizer = getattr(self.model, "optimizer", None)
        state = optimizer.state_dict() if optimizer is not None else {}
        return checkpoint.save_checkpoint(directory, self.model.get_weights(), state, meta)

    def _restore(self, directory):
        # the settings a resume must match first, then every entry's name, shape and dtype,
        # all before any weight is read
        loaded = checkpoint.load_checkpoint(directory, self.model.get_weights(),
                                            check_meta=lambda meta: self._check_meta(
                                                directory, meta))
        if loaded is None:
            self.echo(f"cnnx: no checkpoint in {directory}; starting from the beginning")
            return 0, 0, None
        weights, optimizer_state, meta = loaded
        self.model.set_weights(weights)
        if optimizer_state:
            self.model.optimizer.load_state_dict(optimizer_state)
        self.history = list(meta.get("history", []))
        self.echo(f"cnnx: resuming from {directory} at epoch {meta['epoch']}, step {meta['step']}")
        return meta["epoch"], meta["step"], meta.get("epoch_so_far")

    def _check_meta(self, directory, meta):
        for name in ("mode", "seed", "shards", "batch_size"):
            if meta[name] != self._meta[name]:
                raise ValueError(f"DaskTrainer: the checkpoint in {directory} was written with "
                                 f"{name}={meta[name]!r}, this run has {self._meta[name]!r}")
        for name, what in (("architecture", "model architecture"), ("optimizer", "optimizer")):
            if name in meta and meta[name] != self._meta[name]:
                raise ValueError(
                    f"DaskTrainer: the checkpoint in {directory} was written for another "
                    f"{what}: {_difference(meta[name], self._meta[name])}; resume with the "
                    f"{what} it was written with, or train into a new checkpoint directory")

    # ----------------------------------------------------------------- helpers
    def _place(self, value, broadcast=False):
        """`value` on every worker (broadcast) or on one the others fetch from."""
        return transport.place(self.client, value, self.scatter_timeout,
                               cluster.worker_addresses(self.client) or None, broadcast)

    def shard_spec(self, indices):
        """What a worker task needs to read and prepare the samples `indices`."""
        return {"store": self._store, "opener": self.opener, "indices": np.asarray(indices),
                "normalize": self.normalize, "augment": self.augment, "seed": self.seed,
                "cache_bytes": self.cache_bytes}

    def _worker_transfer_bytes(self):
        """Bytes workers have sent to each other so far (Dask's own counter)."""
        try:
            counts = self.client.run(transport.transfer_bytes)
        except Exception:                         # a worker leaving mid-call; not worth failing
            return 0
        return int(sum(counts.values()))

    def _count_between_workers(self):
        """Add what workers sent each other since the last count to the epoch's tally. Dask's
        counter also holds what workers sent the driver: the gathered gradient sums, already
        counted in bytes_in."""
        transferred, bytes_in = self._worker_transfer_bytes(), self._tally.sums["bytes_in"]
        before, bytes_in_before = self._between_baseline
        self._tally.sums["bytes_between_workers"] += max(
            0, transferred - before - (bytes_in - bytes_in_before))
        self._between_baseline = (transferred, bytes_in)

    def _echo_epoch(self, s):
        parts = [f"epoch {s['epoch']}", f"{s['images_per_s']:.0f} img/s"]
        parts += [f"{k} {s[k]:.4f}" for k in ("loss", "accuracy", "val_loss", "val_accuracy")
                  if k in s]
        parts.append(f"{(s['bytes_out'] + s['bytes_in'] + s['bytes_between_workers']) / 1e6:.1f} MB moved this epoch")
        self.echo("cnnx: " + ", ".join(parts))


def _mode_object(mode, options):
    """A mode object from DaskTrainer's mode argument and its older keywords."""
    unknown = sorted(set(options) - set(OLDER_MODE_KEYWORDS))
    if unknown:
        raise TypeError(f"DaskTrainer: unexpected keyword arguments {unknown}")
    if isinstance(mode, str):
        return modes.from_name(mode, **options)
    if not isinstance(mode, tuple(modes.MODES.values())):
        raise TypeError(f"DaskTrainer: mode must be a mode object (cnnx.parallel.Sync(), "
                        f"ADAG(tau=4), ...) or its name, got {type(mode).__name__}")
    if options:
        raise TypeError(f"DaskTrainer: {sorted(options)} belong inside the mode object; "
                        f"got mode={mode!r} and them as keywords")
    return mode


def _json_form(value):
    """value as it reads back from a checkpoint's JSON (tuples become lists)."""
    return json.loads(json.dumps(value))


def _optimizer_config(model):
    optimizer = getattr(model, "optimizer", None)
    return None if optimizer is None else _json_form(optimizer.get_config())


def _difference(saved, current, path=""):
    """The first place where two JSON values differ, in words."""
    if isinstance(saved, dict) and isinstance(current, dict):
        # the kind ("name", "class_name") first: a different kind explains the rest
        for key in sorted(set(saved) | set(current),
                          key=lambda k: (k not in ("name", "class_name"), str(k))):
            if saved.get(key) != current.get(key):
                where = f"{path}.{key}" if path else str(key)
                return _difference(saved.get(key), current.get(key), where)
    if isinstance(saved, list) and isinstance(current, list) and len(saved) == len(current):
        for i, (a, b) in enumerate(zip(saved, current)):
            if a != b:
                return _difference(a, b, f"{path}[{i}]")
    return f"{path or 'it'} was {saved!r}, this run has {current!r}"


class _NoBar:
    def update(self, n):
        pass

    def set_postfix(self, **kw):
        pass

    def close(self):
        pass


def _progress(total, initial, description, enabled):
    if not enabled:
        return _NoBar()
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc=description, unit="step", leave=False)
