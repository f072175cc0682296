"""Finding a Dask cluster: an existing Client, a scheduler address, or a LocalCluster we own.

Clusters started here listen on 127.0.0.1 only: Dask runs pickled code sent by its peers.
For several hosts, give every scheduler, worker and client a
`distributed.security.Security(tls_ca_file=..., tls_client_cert=..., tls_client_key=...,
require_encryption=True)` and use `tls://` addresses; pass the Client you built that way.
"""
import asyncio
import concurrent.futures
import os
import time

DEFAULT_CONNECT_TIMEOUT = 10.0


def default_worker_count():
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


def start_local_cluster(n_workers=None, memory_limit="auto", dashboard=True):
    """A process-based LocalCluster on 127.0.0.1: one single-threaded worker per core."""
    from distributed import LocalCluster
    dashboard_address = "127.0.0.1:0" if dashboard else None
    return LocalCluster(n_workers=n_workers or default_worker_count(), threads_per_worker=1,
                        processes=True, host="127.0.0.1", dashboard_address=dashboard_address,
                        memory_limit=memory_limit)


def _have_bokeh():
    try:
        import bokeh  # noqa: F401
    except ImportError:
        return False
    return True


def connect(client=None, timeout=DEFAULT_CONNECT_TIMEOUT, n_workers=None, echo=print,
            who="DaskTrainer"):
    """(client, owned) where owned is the LocalCluster we started (close it), or None.

    `client` is a distributed.Client, a scheduler address such as "tcp://127.0.0.1:8786",
    or None for a LocalCluster on this machine. `who` starts every error message."""
    from distributed import Client
    if isinstance(client, Client):
        return client, None
    if client is None:
        cluster = start_local_cluster(n_workers)
        connected = Client(cluster)
        owned = cluster
    elif isinstance(client, str):
        unreachable = (f"{who}: could not reach a Dask scheduler at {client!r} within "
                       f"{timeout:g} s (is `dask scheduler` running there, and is the address "
                       f"right?)")
        check_scheduler(client, timeout, unreachable)
        try:
            connected = Client(client, timeout=timeout)
        except (OSError, TimeoutError) as error:
            raise ConnectionError(f"{unreachable}: {error}") from None
        owned = None
    else:
        raise TypeError(f"{who}: client must be a distributed.Client, a scheduler address "
                        f"string or None, got {type(client).__name__}")
    link = connected.dashboard_link if _have_bokeh() and owned is not None else None
    echo(f"cnnx: Dask scheduler {connected.scheduler.address}"
         + (f", dashboard {link}" if link else ""))
    return connected, owned


def check_scheduler(address, timeout, unreachable):
    """Raise ConnectionError unless a Dask peer answers Dask's handshake at `address` within
    `timeout` s. Dask's Client waits for the handshake without a deadline (an HTTP server
    there hangs it for minutes) and trusts the length prefix of what comes back (a port
    answering other bytes made it allocate exabytes)."""
    from distributed.comm import connect as dask_connect

    async def handshake():
        comm = await asyncio.wait_for(dask_connect(address, timeout=timeout), timeout)
        await comm.close()

    # a thread of its own: the caller may already run an event loop (Jupyter)
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        try:
            pool.submit(asyncio.run, handshake()).result()
        except (OSError, asyncio.TimeoutError, TimeoutError) as error:
            raise ConnectionError(f"{unreachable}: {type(error).__name__}: {error}") from None
        except Exception as error:               # garbage decoded as a Dask message
            raise ConnectionError(f"{unreachable}: something else answers there, not a Dask "
                                  f"scheduler ({type(error).__name__}: {error})") from None


def worker_addresses(client):
    """The addresses of the workers connected now, sorted."""
    return sorted(client.scheduler_info(n_workers=-1)["workers"])


def wait_for_workers(client, timeout, echo=print):
    """The worker addresses, once there is at least one; TimeoutError after `timeout` s."""
    workers = worker_addresses(client)
    if workers:
        return workers
    echo(f"cnnx: no Dask workers are connected to {client.scheduler.address}; "
         f"waiting up to {timeout:g} s for one to join")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        time.sleep(0.2)
        workers = worker_addresses(client)
        if workers:
            return workers
    raise TimeoutError(f"DaskTrainer: no Dask workers joined {client.scheduler.address} within "
                       f"{timeout:g} s; start some (`dask worker {client.scheduler.address}`) "
                       f"or raise worker_timeout")
