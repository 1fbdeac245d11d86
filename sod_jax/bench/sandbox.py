"""Executions/s and latency of the sandbox: the warm executor against the cold one, the cold one
against a bare subprocess, and the HTTP server path.

The local variants (warm, cold, bare ``python -c``) are timed alternately in rounds within one run,
so all of them see the same machine conditions; rates are total runs over total time per variant,
latency percentiles over all runs. Rows:

* ``backend=local mode=warm``: ours = warm, baseline = cold (the warm executor's speed-up);
* ``backend=local mode=cold``: ours = cold, baseline = the bare subprocess (``python -c`` with the
  sandbox's flags and environment, no isolation: the price of isolation);
* ``backend=server``: ``sandbox serve`` (warm, ``--concurrency`` workers) through the fusion client at
  each ``--server-concurrency``; baseline = the bare subprocess.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

import numpy as np

from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request
from sod_jax.sandbox.fusion import FusionSandbox


def run(args: argparse.Namespace) -> list[dict]:
    N, C, rounds = args.runs, args.concurrency, max(1, min(args.rounds, args.runs))
    server_cs = [int(c) for c in str(args.server_concurrency).split(",") if c.strip()]
    code = args.code

    def ok(r: dict) -> None:
        if r["status"] != "Success":
            raise RuntimeError(f"sandbox bench: an execution failed: {r}")

    async def measure(one, n: int, c: int) -> tuple[float, list[float]]:
        """(seconds for n calls at concurrency c, per-call latencies)."""
        sem = asyncio.Semaphore(c)
        lat: list[float] = []

        async def timed():
            async with sem:
                t = time.perf_counter()
                await one()
                lat.append(time.perf_counter() - t)

        t0 = time.perf_counter()
        await asyncio.gather(*[timed() for _ in range(n)])
        return time.perf_counter() - t0, lat

    warm = LocalSandbox(LocalSandboxConfig(mode="warm", workers=C))
    cold = LocalSandbox(LocalSandboxConfig(mode="cold", workers=C))
    env = cold._env()  # the same interpreter flags and environment as a sandboxed run, no isolation

    async def bare():
        p = await asyncio.create_subprocess_exec(sys.executable, "-E", "-s", "-B", "-c", code, env=env,
                                                 stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
        await p.communicate()

    async def via(sb):
        ok(await sb.run(run_request(code)))

    variants = {"warm": lambda: via(warm), "cold": lambda: via(cold), "bare": bare}
    stats = {k: [0.0, []] for k in variants}

    async def local_rounds():
        for name, one in variants.items():  # warm-up: starts every zygote, fills caches
            await measure(one, C, C)
        sizes = [N // rounds + (i < N % rounds) for i in range(rounds)]
        for i, n in enumerate(sizes):
            order = list(variants) if i % 2 == 0 else list(reversed(variants))
            for name in order:
                seconds, lat = await measure(variants[name], n, C)
                stats[name][0] += seconds
                stats[name][1] += lat
            if args.progress:
                print(f"sandbox bench: round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
        await warm.close()
        await cold.close()

    asyncio.run(local_rounds())

    server_stats = {}
    if server_cs:
        server, url = _spawn_server(workers=C)
        try:
            async def server_runs():
                for c in server_cs:
                    client = FusionSandbox(url, max_concurrency=c)

                    async def via_http():
                        ok(await client.run(run_request(code)))

                    await measure(via_http, C, c)  # warm-up
                    server_stats[c] = await measure(via_http, N, c)
                    await client.close()

            asyncio.run(server_runs())
        finally:
            server.terminate()
            server.wait(30)

    def pct(lat, q):
        return round(float(np.percentile(lat, q)) * 1e3, 1)

    def row(ours, base, **extra):
        (o_s, o_lat), (b_s, b_lat) = ours, base
        o_rate, b_rate = len(o_lat) / o_s, len(b_lat) / b_s
        return {"bench": "sandbox", **extra, "runs": len(o_lat), "ours": round(o_rate, 1),
                "baseline": round(b_rate, 1), "ratio": round(o_rate / b_rate, 3), "unit": "executions/s",
                "p50_ms": pct(o_lat, 50), "p99_ms": pct(o_lat, 99),
                "baseline_p50_ms": pct(b_lat, 50), "baseline_p99_ms": pct(b_lat, 99), "confined": warm.confined}

    rows = [row(stats["warm"], stats["cold"], backend="local", mode="warm", baseline_name="cold", concurrency=C),
            row(stats["cold"], stats["bare"], backend="local", mode="cold", baseline_name="bare subprocess",
                concurrency=C)]
    for c in server_cs:
        rows.append(row(server_stats[c], stats["bare"], backend="server", mode="warm", baseline_name="bare subprocess",
                        concurrency=c, server_workers=C, baseline_concurrency=C))
    return rows


def _spawn_server(workers: int, timeout: float = 600.0):
    """``python -m sod_jax.sandbox serve`` on a free loopback port, its output to a log file (never
    to a pipe nobody reads: a full pipe would stall the server). Returns (process, base URL)."""

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
    p = sub.add_parser("sandbox", help="warm vs cold executor, bare subprocess, HTTP server: executions/s, p50/p99",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--runs", type=int, default=200, help="executions per variant (and per server concurrency)")
    p.add_argument("--concurrency", type=int, default=8, help="executions in flight locally (= workers of each executor)")
    p.add_argument("--server-concurrency", default="8,32",
                   help="comma-separated client concurrencies for the server path ('' skips it)")
    p.add_argument("--rounds", type=int, default=4, help="alternation rounds for warm / cold / bare")
    p.add_argument("--code", default="print(1)", help="the program every execution runs")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no per-round progress on stderr")
    p.set_defaults(fn=run)
