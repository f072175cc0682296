"""Run one task per chunk, serially or on spawn-context processes, results in the parent.

Each task writes whole chunks it alone owns and returns a small JSON-able record; the parent
is the only writer of bookkeeping (attributes), so no two processes ever touch one object.
Spawn, not fork: libgomp (used by cnnx's kernels) hangs in a forked child.
"""
import multiprocessing
import os
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait


def default_workers(n_tasks):
    return max(1, min(os.cpu_count() or 1, n_tasks))


class ChunkRunner:
    """`with ChunkRunner(workers) as runner: for job_id, record in runner.run(fn, jobs): ...`

    `jobs` is a list of (job_id, args); `fn(*args)` must be a module-level function.
    Records arrive in completion order. Leaving the block early (an exception, Ctrl-C)
    cancels the jobs not yet started; started ones finish their own chunk and are dropped.
    """

    def __init__(self, workers=1):
        self.workers = int(workers)
        self._pool = None

    def __enter__(self):
        if self.workers > 1:
            self._pool = ProcessPoolExecutor(self.workers,
                                             mp_context=multiprocessing.get_context("spawn"))
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
                yield pending.pop(future), future.result()
