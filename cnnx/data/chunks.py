"""Run one task per chunk, on this process, on local spawn processes or on Dask workers.

Each task writes whole chunks it alone owns and returns a small JSON-able record; the caller
is the only writer of bookkeeping (attributes), so no two processes ever touch one object.
The three runners share one interface, so ingest and synth have one code path:

    with chunk_runner(workers, client) as runner:
        for job_id, record in runner.run(fn, jobs): ...

`jobs` is a list of (job_id, args); `fn(*args)` must be a module-level function. Records
arrive in completion order. Leaving the block early (an exception, Ctrl-C) cancels the jobs
not yet started; started ones finish their own chunk and are dropped.

Local processes are started with spawn, not fork: libgomp (used by cnnx's kernels) hangs in
a forked child. Spawn re-runs the caller's script in each child: a script without
`if __name__ == "__main__":` gets main_guard_message instead of a BrokenProcessPool.
"""
import multiprocessing
import os
import sys
import threading
import time
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

PARENT_POLL_SECONDS = 0.5


def default_workers(n_tasks):
    return max(1, min(os.cpu_count() or 1, n_tasks))


def chunk_runner(workers=1, client=None, who="cnnx"):
    """The runner for a Dask `client` when given, else for `workers` local processes;
    `who` (e.g. "data.ingest") opens its error messages."""
    return DaskRunner(client) if client is not None else ChunkRunner(workers, who)


def main_guard_message(who):
    script = getattr(sys.modules.get("__main__"), "__file__", None) or "your script"
    return (f"{who}: its worker processes could not start: Python starts them with spawn, "
            f"which re-runs {script} from the top in each one; put the code that calls "
            f"{who} under `if __name__ == \"__main__\":`")


def check_not_bootstrapping(who):
    """Refuse to run inside a spawned child that is still importing the caller's script."""
    if getattr(multiprocessing.current_process(), "_inheriting", False):
        raise RuntimeError(main_guard_message(who))


class ChunkRunner:
    """Serial for workers=1, else a pool of spawn processes that exit with their parent."""

    def __init__(self, workers=1, who="cnnx"):
        self.workers = int(workers)
        self.who = who
        self._pool = None
        self._started = None

    def __enter__(self):
        if self.workers > 1:
            check_not_bootstrapping(self.who)
            context = multiprocessing.get_context("spawn")
            self._started = context.Event()
            self._pool = ProcessPoolExecutor(self.workers, mp_context=context,
                                             initializer=_start_worker,
                                             initargs=(self._started, os.getpid()))
        return self

    def __exit__(self, *exc):
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        return False

    def run(self, fn, jobs):
        if self._pool is None:
            for job_id, args in jobs:
                yield job_id, fn(*args)
            return
        # keep a bounded number of jobs queued so an interruption cancels the rest quickly
        pending, queue = {}, list(reversed(jobs))
        while queue or pending:
            while queue and len(pending) < 2 * self.workers:
                job_id, args = queue.pop()
                pending[self._pool.submit(fn, *args)] = job_id
            done, _ = wait(pending, return_when=FIRST_COMPLETED)
            for future in done:
                yield pending.pop(future), self._result(future)

    def _result(self, future):
        try:
            return future.result()
        except BrokenProcessPool:
            if not self._started.is_set():  # no child got past importing the main script
                raise RuntimeError(main_guard_message(self.who)) from None
            raise BrokenProcessPool(f"{self.who}: a worker process died (killed, or out of "
                                    "memory?); run the same call again, it resumes") from None


def _start_worker(started, parent_pid):
    """Pool initializer: say we got past bootstrapping; exit when the parent is gone."""
    started.set()

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(PARENT_POLL_SECONDS)
        os._exit(1)                           # orphaned: nobody will collect our results
    threading.Thread(target=watch, daemon=True, name="exit-with-parent").start()


class DaskRunner:
    """One Dask task per job, submitted at once (the scheduler balances the workers);
    a task lost with a killed worker is recomputed by Dask."""

    def __init__(self, client):
        self.client = client
        self._futures = []

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        if self._futures:
            self.client.cancel(self._futures)
            self._futures = []
        return False

    def run(self, fn, jobs):
        from distributed import as_completed
        futures = {self.client.submit(fn, *args, pure=False): job_id for job_id, args in jobs}
        self._futures = list(futures)
        for future in as_completed(futures):
            yield futures[future], future.result()
            future.release()
        self._futures = []
