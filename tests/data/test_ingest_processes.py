"""Ingest's local processes as a careless user meets them: two ingests into one store, a killed
parent, and a script without a main guard (real subprocesses, real files)."""
import os
import subprocess
import sys
import time

import numpy as np
import pytest
from PIL import Image

from cnnx import data


def write_pngs(root, n_per_class, size=8):
    rng = np.random.default_rng(1)
    for name in ("a", "b"):
        os.makedirs(root / name, exist_ok=True)
        for i in range(n_per_class):
            pixels = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


def alive(pid):
    """True while `pid` runs (a zombie waiting for its reaper counts as gone)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            return "\nState:\tZ" not in status.read()
    except FileNotFoundError:
        return False


SLOW_INGEST = """
import sys, time
from cnnx import data

def slowly(done, total):
    if done == 1:
        print("started", flush=True)
    time.sleep(0.4)

if __name__ == "__main__":
    data.ingest(sys.argv[1], sys.argv[2], image_size=(8, 8), chunk_size=2, workers=1,
                progress=slowly)
"""


def test_a_second_ingest_into_the_same_store_is_told_another_holds_it(tmp_path):
    source = write_pngs(tmp_path / "src", 5)
    store = tmp_path / "s.zarr"
    script = tmp_path / "slow.py"
    script.write_text(SLOW_INGEST)
    first = subprocess.Popen([sys.executable, str(script), str(source), str(store)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert first.stdout.readline() == b"started\n", first.stderr.read().decode()
        with pytest.raises(BlockingIOError, match=r"another ingest \(pid \d+ on .*\) is "
                                                  "writing .*s.zarr' right now"):
            data.ingest(source, store, image_size=(8, 8), chunk_size=2)
        with pytest.raises(BlockingIOError, match="another ingest"):   # --overwrite waits too
            data.ingest(source, store, image_size=(8, 8), chunk_size=2, overwrite=True)
    finally:
        assert first.wait(timeout=120) == 0, first.stderr.read().decode()
    summary = data.ingest(source, store, image_size=(8, 8), chunk_size=2)   # done: returns it
    data.ingest(source, tmp_path / "fresh.zarr", image_size=(8, 8), chunk_size=2)
    resumed, fresh = data.open_dataset(store), data.open_dataset(tmp_path / "fresh.zarr")
    assert summary.n_images == len(fresh) == 10
    for a, b in zip(resumed.read(np.arange(10)), fresh.read(np.arange(10))):
        np.testing.assert_array_equal(a, b)
    assert not os.path.exists(f"{store}.lock")


KILLED_PARENT = """
import multiprocessing, os, signal, sys
from cnnx import data

def die_after_one(done, total):
    if done == 1:
        print(" ".join(str(p.pid) for p in multiprocessing.active_children()), flush=True)
        os.kill(os.getpid(), signal.SIGKILL)

if __name__ == "__main__":
    data.ingest(sys.argv[1], sys.argv[2], image_size=(8, 8), chunk_size=2, workers=2,
                progress=die_after_one)
"""


def test_a_killed_parent_takes_its_pool_processes_with_it(tmp_path):
    source = write_pngs(tmp_path / "src", 10)
    script = tmp_path / "killed.py"
    script.write_text(KILLED_PARENT)
    # stderr to a file: orphans would hold a pipe open, and reading it would wait for them
    with open(tmp_path / "stderr", "wb") as stderr:
        parent = subprocess.Popen([sys.executable, str(script), str(source),
                                   str(tmp_path / "s.zarr")], stdout=subprocess.PIPE,
                                  stderr=stderr)
        children = [int(pid) for pid in parent.stdout.readline().split()]
        assert parent.wait(timeout=120) == -9, (tmp_path / "stderr").read_text()
    assert len(children) == 2
    deadline = time.monotonic() + 10
    while any(alive(pid) for pid in children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = [pid for pid in children if alive(pid)]
    for pid in left:                       # don't leave them behind when the test fails
        os.kill(pid, 9)
    assert not left, f"pool processes {left} outlived their killed parent"


NO_MAIN_GUARD = """
import sys
from cnnx import data

data.ingest(sys.argv[1], sys.argv[2], image_size=(8, 8))
"""


def test_a_script_without_main_guard_is_told_to_add_one(tmp_path):
    source = write_pngs(tmp_path / "src", 256, size=4)      # 512 files: ingest uses processes
    script = tmp_path / "no_guard.py"
    script.write_text(NO_MAIN_GUARD)
    run = subprocess.run([sys.executable, str(script), str(source), str(tmp_path / "s.zarr")],
                         capture_output=True, timeout=300)
    assert run.returncode == 1
    last_line = run.stderr.decode().strip().splitlines()[-1]
    assert last_line.startswith("RuntimeError: data.ingest: its worker processes could not "
                                "start"), last_line
    assert f're-runs {script} from the top' in last_line
    assert 'under `if __name__ == "__main__":`' in last_line
