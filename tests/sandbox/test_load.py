"""Sustained load through `sandbox serve` (loopback only): 5000 executions at concurrency 64 while the
server's own output goes to a pipe drained by a deliberately slow reader. No failures, the server
still answers /v1/ping, and its memory stays flat."""

import asyncio
import subprocess
import sys
import threading
import time
import urllib.request

import pytest
from support.sandbox_server import free_port, stop_server

from sod_jax.sandbox.fusion import FusionSandbox
from sod_jax.sandbox.protocol import run_request

REQUESTS, CONCURRENCY, WARMUP = 5000, 64, 200


def rss_mb(pid):
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


class SlowReader(threading.Thread):
    """Reads the server's output 256 bytes at a time, 20 times a second (~5 KB/s)."""

    def __init__(self, stream):
        super().__init__(daemon=True)
        self.stream, self.data = stream, bytearray()

    def run(self):
        while chunk := self.stream.read1(256) if hasattr(self.stream, "read1") else self.stream.read(256):
            self.data += chunk
            time.sleep(0.05)


@pytest.mark.slow
def test_5000_requests_at_concurrency_64_with_a_slow_output_reader():
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "sod_jax.sandbox", "serve", "--port", str(port), "--workers", "8"],
                            stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    reader = SlowReader(proc.stdout)
    reader.start()
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                assert urllib.request.urlopen(f"{url}/v1/ping", timeout=2).read() == b"pong"
                break
            except OSError:
                assert proc.poll() is None and time.monotonic() < deadline, bytes(reader.data)[-2000:]
                time.sleep(0.2)

        async def load(start, n):
            client = FusionSandbox(url, max_concurrency=CONCURRENCY, retries=0)  # a failure stays a failure
            try:
                return await asyncio.gather(*[client.run(run_request(f"print({i} * 2)"))
                                              for i in range(start, start + n)])
            finally:
                await client.close()

        def failures(start, results):
            return [(start + i, r) for i, r in enumerate(results)
                    if r["status"] != "Success" or r["run_result"]["stdout"] != f"{(start + i) * 2}\n"]

        warm = asyncio.run(load(0, WARMUP))  # every worker's zygote started, allocator steady
        assert failures(0, warm) == []
        before = rss_mb(proc.pid)
        results = asyncio.run(load(WARMUP, REQUESTS))
        after = rss_mb(proc.pid)
        bad = failures(WARMUP, results)
        assert bad == [], f"{len(bad)} of {REQUESTS} failed; first: {bad[:3]}"
        assert urllib.request.urlopen(f"{url}/v1/ping", timeout=10).read() == b"pong"
        print(f"server RSS before {before:.1f} MB, after {REQUESTS} requests {after:.1f} MB")
        assert after - before < 32, (before, after)
        assert proc.poll() is None
    finally:
        stop_server(proc)
