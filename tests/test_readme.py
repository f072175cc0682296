"""The README's code blocks, run as written.

How each fenced block is treated (by its language, and a marker comment on its first line
that a reader sees too):

  ```python   a script: run twice in a row (`python block.py`) in one fresh folder; both
              runs must exit 0.
  ```bash     commands, one per line: run in order with bash in one fresh folder holding
              what the README asks the reader to bring (READER_FILES); each must exit 0.
              `pip ...` and `pytest ...` are not run (CI installs cnnx and runs the suite:
              .ci/run runs the README's test command); in `pip install . && cnnx train`
              the `cnnx train` part runs.
  first line `# Template: ...`
              bash: its leading NAME=value lines are the values a reader replaces; the test
              replaces them with LOCAL_VALUES (127.0.0.1, a free port, ...) and runs the
              rest as written, `dask scheduler` / `dask worker` lines as background servers.
              python: compiled, not run (it needs infrastructure that cannot exist here).
  first line `# Slow: ...`
              checked, not run: `cnnx` commands must parse with cnnx's own parser, scripts
              and pytest paths must exist, other programs must be on PATH.
  ``` (no language) or ```text: shown text (diagrams, output); not run.
Any other language fails test_every_block_is_one_this_test_knows: teach this file first.
"""
import os
import py_compile
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from typing import NamedTuple

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
LANGUAGES = {"python", "bash", "text", ""}
NOT_RUN = ("pip", "pytest")                 # CI's part (see the module docstring)
SERVERS = (("dask", "scheduler"), ("dask", "worker"))
SECONDS_PER_COMMAND = 600


class Block(NamedTuple):
    language: str
    code: str
    line: int                               # where the fence opens in README.md

    @property
    def marker(self):
        first = self.code.split("\n", 1)[0]
        for marker in ("Template", "Slow"):
            if first.startswith(f"# {marker}:"):
                return marker
        return None

    def __str__(self):
        return f"README.md:{self.line} ```{self.language}"


def fenced_blocks(text):
    """Every fenced block of a Markdown text, in order."""
    blocks, opened = [], None
    for number, line in enumerate(text.splitlines(), 1):
        if line.startswith("```"):
            if opened is None:
                opened = (line[3:].strip().split(" ")[0], number, [])
            else:
                language, start, lines = opened
                blocks.append(Block(language, "\n".join(lines) + "\n", start))
                opened = None
        elif opened is not None:
            opened[2].append(line)
    assert opened is None, f"README.md:{opened[1]}: a fence is never closed"
    return blocks


BLOCKS = fenced_blocks(open(README, encoding="utf-8").read())


def blocks(language, marker=None):
    found = [b for b in BLOCKS if b.language == language and b.marker == marker]
    return pytest.mark.parametrize("block", found, ids=[f"line{b.line}" for b in found])


def test_every_block_is_one_this_test_knows():
    unknown = [str(b) for b in BLOCKS if b.language not in LANGUAGES]
    assert not unknown, f"no rule for these blocks' languages: {unknown}"
    kinds = {(b.language, b.marker) for b in BLOCKS}
    assert {("python", None), ("bash", None), ("bash", "Template")} <= kinds, kinds


# --------------------------------------------------------------------------- python

@pytest.mark.slow
@blocks("python")
def test_python_block_runs_as_a_script_twice_in_a_row(block, tmp_path):
    (tmp_path / "block.py").write_text(block.code)
    for run in ("first", "second"):
        done = subprocess.run([sys.executable, "block.py"], cwd=tmp_path, capture_output=True,
                              text=True, timeout=SECONDS_PER_COMMAND)
        assert done.returncode == 0, (f"{block}, {run} run, exit {done.returncode}:\n"
                                      + done.stdout[-2000:] + done.stderr[-4000:])


@blocks("python", "Template")
def test_python_template_compiles(block, tmp_path):
    (tmp_path / "template.py").write_text(block.code)
    py_compile.compile(str(tmp_path / "template.py"), doraise=True)


# ----------------------------------------------------------------------------- bash

def commands(line):
    """The commands of one README line to run: the line itself, or, when it chains CI's
    part (`pip install . && cnnx train`), only the other commands."""
    code = re.sub(r"\s+#.*$", "", line).strip()
    if not code or code.startswith("#"):
        return []
    parts = [part.strip() for part in code.split("&&")]
    if not any(part.split()[0] in NOT_RUN for part in parts):
        return [line]
    return [part for part in parts if part.split()[0] not in NOT_RUN]


@pytest.fixture
def reader_folder(tmp_path):
    """A fresh folder with what the README asks a reader to bring: photos/ (one sub-folder
    of images per class, one file in it not an image) and two images to predict."""
    from skimage import io

    from cnnx import data

    faces = data.load_faces()
    for label, name in enumerate(faces.class_names):
        folder = tmp_path / "photos" / name
        folder.mkdir(parents=True)
        for i, index in enumerate(np.flatnonzero(faces.labels == label)):
            suffix = ".png" if i % 2 else ".jpg"
            io.imsave(folder / f"{i:03d}{suffix}", faces.images[index, ..., 0],
                      check_contrast=False)
    (tmp_path / "photos" / "face" / "notes.jpg").write_text("not an image")
    io.imsave(tmp_path / "img1.png", faces.images[0, ..., 0], check_contrast=False)
    io.imsave(tmp_path / "img2.jpg", faces.images[150, ..., 0], check_contrast=False)
    return tmp_path


def run_line(command, folder, block):
    done = subprocess.run(["bash", "-c", command], cwd=folder, capture_output=True, text=True,
                          timeout=SECONDS_PER_COMMAND)
    assert done.returncode == 0, (f"{block}: `{command}` exited {done.returncode}:\n"
                                  + done.stdout[-2000:] + done.stderr[-3000:])
    return done


@pytest.mark.slow
@blocks("bash")
def test_bash_block_runs_as_written(block, reader_folder):
    ran = 0
    for line in block.code.splitlines():
        for command in commands(line):
            run_line(command, reader_folder, block)
            ran += 1
    assert ran, (f"{block}: nothing here runs (only pip/pytest); mark it `# Slow:` if it "
                 "is CI's or a long job")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return str(s.getsockname()[1])


# What a template's NAME=value lines become here: every machine is this one.
LOCAL_VALUES = {
    "HEAD": "127.0.0.1",
    "PORT": free_port,                      # not 8786: other clusters may run here
    "CORES": "2",
    "SOURCE": "photos",                     # the reader's folder the fixture makes
    "STORE": "photos-cluster.zarr",         # written by the template's own `cnnx ingest`
}


def template_values(block):
    """The template's NAME=value lines, with the value this test gives each."""
    values = {}
    for line in block.code.splitlines():
        match = re.match(r"([A-Z_][A-Z0-9_]*)=", line)
        if match:
            name = match.group(1)
            assert name in LOCAL_VALUES, (f"{block}: no local value for {name}; add one to "
                                          "LOCAL_VALUES in tests/test_readme.py")
            local = LOCAL_VALUES[name]
            values[name] = local() if callable(local) else local
    return values


def substitute(line, values):
    for name, value in values.items():
        line = re.sub(rf"\${{{name}}}|\${name}\b", value, line)
    return line


def wait_for_scheduler(address, workers, deadline):
    from distributed import Client

    with Client(address, timeout=max(1, deadline - time.monotonic())) as client:
        client.wait_for_workers(workers, timeout=max(1, deadline - time.monotonic()))


@pytest.mark.slow
@blocks("bash", "Template")
def test_bash_template_runs_with_local_values(block, reader_folder):
    values = template_values(block)
    assert values, f"{block}: a bash template names its values as NAME=value lines"
    servers, scheduler, n_workers = [], None, 0
    try:
        for line in block.code.splitlines():
            if re.match(r"[A-Z_][A-Z0-9_]*=", line):
                continue
            for command in commands(substitute(line, values)):
                words = shlex.split(command, comments=True)
                if tuple(words[:2]) not in SERVERS:
                    if servers:
                        wait_for_scheduler(scheduler, n_workers, time.monotonic() + 120)
                    run_line(command, reader_folder, block)
                    continue
                log = open(reader_folder / f"server{len(servers)}.log", "w")
                servers.append(subprocess.Popen(words, cwd=reader_folder, stdout=log,
                                                stderr=subprocess.STDOUT,
                                                start_new_session=True))
                if words[1] == "scheduler":
                    port = words[words.index("--port") + 1] if "--port" in words else "8786"
                    scheduler, n_workers = f"tcp://{values['HEAD']}:{port}", 0
                else:
                    n_workers += int(words[words.index("--nworkers") + 1]
                                     if "--nworkers" in words else 1)
        assert scheduler is None or servers, block
    finally:
        for server in reversed(servers):    # the process groups this test started
            os.killpg(server.pid, signal.SIGTERM)
        for server in servers:
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait()


@blocks("bash", "Slow")
def test_slow_block_commands_exist_and_parse(block):
    from cnnx.cli import build_parser

    for line in block.code.splitlines():
        code = re.sub(r"\s+#.*$", "", line).strip()
        for part in filter(None, (p.strip() for p in code.split("&&"))):
            if part.startswith("#"):
                continue
            words = shlex.split(part)
            if words[0] == "cnnx":
                try:
                    build_parser().parse_args(words[1:])
                except SystemExit as error:
                    pytest.fail(f"{block}: `{part}` does not parse (exit {error.code})")
            elif words[0] == "python":
                script = os.path.join(REPO, words[1])
                assert os.path.isfile(script), f"{block}: {words[1]} is not in the repository"
                py_compile.compile(script, doraise=True)
            elif words[0] == "pytest":
                paths = [w for w in words[1:] if not w.startswith("-")]
                assert all(os.path.exists(os.path.join(REPO, p)) for p in paths), part
            elif words[0] != "pip":
                assert shutil.which(words[0]), f"{block}: {words[0]} is not installed"
