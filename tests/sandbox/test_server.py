"""``sandbox serve`` over real HTTP: our fusion client, the sandbox-fusion package's own client, and
the client's retry / give-up behaviour against scripted servers."""

import asyncio
import socket
import threading
import time

import pytest
from aiohttp import web

from sod_jax.sandbox.fusion import FusionSandbox
from sod_jax.sandbox.protocol import run_request


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(sandbox_server):
    return sandbox_server


def call(url, req, **kw):
    async def go():
        client = FusionSandbox(url, **kw)
        try:
            return await client.run(req), client.attempts
        finally:
            await client.close()

    return asyncio.run(go())


def test_fusion_client_against_our_server(server):
    r, _ = call(server, run_request("import numpy\nprint(numpy.arange(5).sum())"))
    assert r["status"] == "Success" and r["run_result"]["stdout"] == "10\n"
    r, _ = call(server, run_request("import sys\nsys.exit(3)"))
    assert r["status"] == "Failed" and r["run_result"]["return_code"] == 3
    r, _ = call(server, run_request("while True: pass", run_timeout=1))
    assert r["run_result"]["status"] == "TimeLimitExceeded"
    r, _ = call(server, run_request("print(input())", stdin="via http"))
    assert r["run_result"]["stdout"] == "via http\n"
    r, attempts = call(server, {"code": "print(1)", "language": "cobol"})
    assert r["status"] == "SandboxError" and "HTTP 400" in r["message"] and attempts == 1  # 4xx: no retry


def test_concurrent_calls_through_the_server(server):
    async def go():
        client = FusionSandbox(server, max_concurrency=3)
        try:
            return await asyncio.gather(*[client.run(run_request(f"print({i})")) for i in range(8)])
        finally:
            await client.close()

    assert [r["run_result"]["stdout"] for r in asyncio.run(go())] == [f"{i}\n" for i in range(8)]


def test_sandbox_fusion_package_client(server):
    from sandbox_fusion import RunCodeRequest, RunStatus, run_code

    resp = run_code(RunCodeRequest(code="print(sum(range(10)))", language="python"), endpoint=server)
    assert resp.status == RunStatus.Success and resp.run_result.stdout == "45\n"
    resp = run_code(RunCodeRequest(code="raise SystemExit(2)", language="python"), endpoint=server)
    assert resp.status == RunStatus.Failed and resp.run_result.return_code == 2


class Scripted:
    """An aiohttp server answering /run_code with a scripted sequence of status codes."""

    def __init__(self, codes):
        self.codes, self.seen = list(codes), 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        async def handler(request):
            self.seen += 1
            code = self.codes.pop(0) if self.codes else 200
            if code == 200:
                return web.json_response({"status": "Success", "message": "", "run_result": {
                    "status": "Finished", "return_code": 0, "stdout": "ok\n", "stderr": "", "execution_time": 0}})
            return web.Response(status=code, text=f"scripted {code}")

        async def start():
            app = web.Application()
            app.router.add_post("/run_code", handler)
            self.runner = web.AppRunner(app)
            await self.runner.setup()
            await web.TCPSite(self.runner, "127.0.0.1", self.port).start()
            ready.set()

        self.thread = threading.Thread(target=lambda: (self.loop.run_until_complete(start()), self.loop.run_forever()),
                                       daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


@pytest.mark.parametrize("codes", [[503, 502], [429], [500, 429, 503]])
def test_retries_on_429_and_5xx(codes):
    srv = Scripted(codes)
    try:
        r, attempts = call(srv.url, run_request("x"), retries=3, backoff=0.01)
        assert r["status"] == "Success" and srv.seen == len(codes) + 1 == attempts
    finally:
        srv.stop()


def test_gives_up_with_an_error_observation():
    srv = Scripted([503] * 10)
    try:
        r, attempts = call(srv.url, run_request("x"), retries=2, backoff=0.01)
        assert r["status"] == "SandboxError" and "failed 3 times" in r["message"] and "HTTP 503" in r["message"]
        assert srv.seen == 3
    finally:
        srv.stop()


def test_server_down_is_an_error_observation_not_a_hang():
    t0 = time.monotonic()
    r, attempts = call(f"http://127.0.0.1:{free_port()}", run_request("x"), retries=2, backoff=0.01)
    assert r["status"] == "SandboxError" and attempts == 3 and "ClientConnector" in r["message"]
    assert time.monotonic() - t0 < 10
