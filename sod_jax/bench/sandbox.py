"""Executions/s and latency of the isolated executor and the server against a bare subprocess."""

from __future__ import annotations

import argparse


def run(args: argparse.Namespace) -> list[dict]:
    import asyncio
    import sys
    import time

    import numpy as np

    from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request
    from sod_jax.sandbox.fusion import FusionSandbox

    N, C = args.runs, args.concurrency

    async def measure(one) -> tuple[float, list[float]]:
        sem = asyncio.Semaphore(C)
        lat: list[float] = []

        async def timed():
            async with sem:
                t = time.perf_counter()
                await one()
                lat.append(time.perf_counter() - t)

        await asyncio.gather(*[timed() for _ in range(min(C, N))])  # warm-up
        lat.clear()
        t0 = time.perf_counter()
        await asyncio.gather(*[timed() for _ in range(N)])
        return N / (time.perf_counter() - t0), lat

    async def bare():
        p = await asyncio.create_subprocess_exec(sys.executable, "-E", "-s", "-B", "-c", "print(1)",
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await p.communicate()

    local = LocalSandbox(LocalSandboxConfig(workers=C))

    async def via_local():
        r = await local.run(run_request("print(1)"))
        assert r["status"] == "Success", r

    server, url = _spawn_server(workers=C)
    rows = []
    try:
        async def run_all():
            client = FusionSandbox(url, max_concurrency=C)

            async def via_http():
                r = await client.run(run_request("print(1)"))
                assert r["status"] == "Success", r

            out = {"bare": await measure(bare), "local": await measure(via_local), "server": await measure(via_http)}
            await client.close()
            return out

        res = asyncio.run(run_all())
    finally:
        server.terminate()
        server.wait(10)
    base_rate, base_lat = res["bare"]
    for name in ("local", "server"):
        rate, lat = res[name]
        rows.append({"bench": "sandbox", "backend": name, "concurrency": C, "runs": N, "ours": round(rate, 1),
                     "baseline": round(base_rate, 1), "ratio": round(rate / base_rate, 3), "unit": "executions/s",
                     "p50_ms": round(float(np.percentile(lat, 50)) * 1e3, 1),
                     "p99_ms": round(float(np.percentile(lat, 99)) * 1e3, 1),
                     "baseline_p50_ms": round(float(np.percentile(base_lat, 50)) * 1e3, 1),
                     "baseline_p99_ms": round(float(np.percentile(base_lat, 99)) * 1e3, 1),
                     "isolation_overhead_p50_ms": round(float(np.percentile(lat, 50) - np.percentile(base_lat, 50)) * 1e3, 1),
                     "confined": local.confined})
    return rows


def _spawn_server(workers: int, timeout: float = 120.0):
    """``python -m sod_jax.sandbox serve`` on a free loopback port, its output to a log file (never
    to a pipe nobody reads: a full pipe would stall the server). Returns (process, base URL)."""
    import socket
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.request

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="sod_bench_sandbox_server_", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "sod_jax.sandbox", "serve", "--port", str(port), "--workers",
                             str(workers)], stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    log.close()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if urllib.request.urlopen(f"{url}/v1/ping", timeout=2).read() == b"pong":
                return proc, url
        except OSError:
            time.sleep(0.1)
    proc.kill()
    proc.wait(10)
    with open(log.name, errors="replace") as f:
        raise RuntimeError(f"sandbox server did not start; its log ({log.name}):\n{f.read()[-3000:]}")


def add_parser(sub) -> None:
    p = sub.add_parser("sandbox", help="isolated executor and HTTP server vs a bare subprocess")
    p.add_argument("--runs", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=8)
    p.set_defaults(fn=run)
