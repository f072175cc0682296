"""One writer per store: a lock that a second ingest into the same store runs into at once.

A local store is locked with flock on a `<store>.lock` file beside it (the kernel drops the
lock when its holder dies, even by SIGKILL, so a killed run never blocks its resume); a
memory:// store with an in-process lock. Remote URLs (s3://...) have no lock: fsspec offers
no atomic create-if-absent on every filesystem, so two writers there are not detected.
"""
import os
import socket
import threading
from contextlib import contextmanager

_in_process_locks = {}
_in_process_guard = threading.Lock()


@contextmanager
def store_lock(url, who):
    """Hold the store at `url` for one writer; BlockingIOError when another holds it."""
    if url.startswith("memory://"):
        with _in_process_guard:
            lock = _in_process_locks.setdefault(url, threading.Lock())
        if not lock.acquire(blocking=False):
            raise BlockingIOError(_busy(who, url, "in this process"))
        try:
            yield
        finally:
            lock.release()
    elif "://" in url:
        yield
    else:
        path = os.path.abspath(url).rstrip(os.sep) + ".lock"
        fd = _acquire(path, who, url)
        try:
            yield
        finally:
            try:
                os.unlink(path)              # while still holding it: see _acquire
            except FileNotFoundError:        # someone removed the folder; nothing to undo
                pass
            os.close(fd)


def _acquire(path, who, url):
    import fcntl
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 200).decode(errors="replace") or "starting"
            os.close(fd)
            raise BlockingIOError(_busy(who, url, holder)) from None
        try:
            current = os.stat(path).st_ino
        except FileNotFoundError:
            current = None
        if current == os.fstat(fd).st_ino:
            break
        os.close(fd)                         # the last holder removed the file we locked
    os.ftruncate(fd, 0)
    os.write(fd, f"pid {os.getpid()} on {socket.gethostname()}".encode())
    return fd


def _busy(who, url, holder):
    return (f"{who}: another {who} ({holder}) is writing {url!r} right now; wait for it to "
            "finish (running this again then returns its summary) or write another store")
