"""Start ``python -m sod_jax.sandbox serve`` in a child process for tests.

The server's output goes to a log file, never to a pipe: a pipe that nobody reads fills up (64 KiB)
and blocks the server on its next log line."""

from __future__ import annotations

import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_server(workers: int = 4, *, mode: str | None = None, timeout: float = 120.0, extra_args=(),
                 log_dir: str | None = None):
    """Start the server on a free loopback port and wait until it answers ``/v1/ping``.

    Returns (process, base URL, log path); the caller terminates the process."""
    port = free_port()
    log_path = Path(log_dir or tempfile.mkdtemp(prefix="sod_sandbox_server_")) / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "sod_jax.sandbox", "serve", "--port", str(port), "--workers",
                                 str(workers), *(["--mode", mode] if mode else []), *extra_args],
                                stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/v1/ping", timeout=2).read() == b"pong":
                return proc, url, log_path
        except OSError:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"sandbox server did not start within {timeout:.0f} s; its log ({log_path}):\n"
                       + log_path.read_text(errors="replace")[-3000:])


def stop_server(proc) -> None:
    proc.terminate()
    try:
        proc.wait(10)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(10)
