"""Placement and transport on a Dask cluster, shared by the synchronous and asynchronous drivers."""
import concurrent.futures
import contextlib
import copy

import dask
from distributed.comm.core import CommClosedError

from cnnx.parallel import cluster

# data lost with a worker (FutureCancelledError), or a scatter to a worker that just died
LOST = (concurrent.futures.CancelledError, CommClosedError)


def place(client, value, timeout, workers=None, broadcast=False, direct=False):
    """A future of `value` on the workers: on every one (broadcast), or on the first of
    `workers` (default: the first connected worker), from which the others fetch it once.
    direct: the client sends it to that worker itself (one hop; the scheduler is only told
    where it is) instead of through the scheduler (two hops).
    A worker SIGKILLed a moment ago can stall a scatter to it for Dask's connect timeout
    (30 s; scatter's own timeout covers only the wait for workers), so it is bounded here
    and a retry can pick the next worker."""
    if broadcast:
        where = {"broadcast": True}
    else:
        workers = workers or cluster.worker_addresses(client)
        where = {"workers": workers[:1]} if workers else {}
    return client.sync(client._scatter, [value], hash=False, callback_timeout=timeout,
                       direct=direct or None, **where)[0]


def worker_copy(model, with_optimizer=False):
    """The model as workers need it: layers and loss; the optimizer's state (Adam's moments
    would triple every copy Dask moves) only for workers that step themselves."""
    shipped = copy.copy(model)
    if not with_optimizer:
        shipped.optimizer = None
    return shipped


def preferred_worker(shard, n_shards, n_workers):
    """Contiguous blocks of shards per worker: the tree's first sums then stay on one worker."""
    return shard * n_workers // n_shards


def transfer_bytes(dask_worker):
    """Bytes this worker has sent to other workers (and to clients that gathered from it)."""
    return dask_worker.transfer_outgoing_bytes_total


@contextlib.contextmanager
def large_arguments():
    """Submissions whose arguments are the weights by design (one round trip instead of a
    scatter and a submit): Dask's warning about large graphs (10 MB) does not apply."""
    with dask.config.set({"distributed.admin.large-graph-warning-threshold": "4 GiB"}):
        yield
