"""`--scheduler` pointing at a port where something other than Dask listens (issue 11).

The API half (cnnx.parallel.cluster.connect raising ConnectionError within its connect
timeout instead of hanging or allocating what the garbage says) lives in cluster.py; this is
what the user sees: one line naming the address, exit 2, no run folder left behind."""
import http.server
import socket
import sys
import threading
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))        # tests/cli/commandline.py
from commandline import cnnx  # noqa: E402


def serve_http():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), http.server.SimpleHTTPRequestHandler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server.server_address[1], server.shutdown


def serve_garbage():
    """A port that answers every connection with bytes that are not Dask's protocol."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def answer():
        listener.settimeout(0.2)
        while not stop.is_set():
            try:
                connection, _ = listener.accept()
            except TimeoutError:
                continue
            with connection:
                connection.sendall(b"\xff" * 64 + b"SSH-2.0-not-a-dask-scheduler\r\n" * 4)
                time.sleep(0.5)

    threading.Thread(target=answer, daemon=True).start()

    def close():
        stop.set()
        listener.close()

    return listener.getsockname()[1], close


@pytest.mark.parametrize("serve", [serve_http, serve_garbage], ids=["http", "garbage"])
def test_scheduler_address_of_another_service_is_one_line(serve, tmp_path):
    port, close = serve()
    address = f"tcp://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        result = cnnx("train", "--scheduler", address, "--data", "faces", "--out", "run",
                      cwd=tmp_path, timeout=120)
        elapsed = time.monotonic() - started
    finally:
        close()
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 2, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith("cnnx: error:"), result.stderr[-3000:]
    assert address in lines[0]
    assert elapsed < 60                       # the connect timeout (10 s), not a hang
    assert not (tmp_path / "run").exists()
