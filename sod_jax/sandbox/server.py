"""The local executor behind SandboxFusion's HTTP API: ``POST /run_code``, ``GET /v1/ping``.

One sandbox host can then serve a whole pod (``sandbox.backend: fusion`` on the trainers). The
server binds to loopback unless told otherwise: it runs arbitrary code for whoever can reach it.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from sod_jax.sandbox.protocol import Sandbox, validate_request

log = logging.getLogger(__name__)


def make_app(sandbox: Sandbox) -> web.Application:
    async def run_code(request: web.Request) -> web.Response:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            return web.json_response({"status": "SandboxError", "message": "request body is not valid JSON"},
                                     status=400)
        problem = validate_request(body)
        if problem:
            return web.json_response({"status": "SandboxError", "message": f"bad request: {problem}"}, status=400)
        return web.json_response(await sandbox.run(body))

    async def ping(_: web.Request) -> web.Response:
        return web.Response(text="pong")

    app = web.Application(client_max_size=64 << 20)
    app.router.add_post("/run_code", run_code)
    app.router.add_get("/v1/ping", ping)

    async def on_cleanup(_app):
        await sandbox.close()

    app.on_cleanup.append(on_cleanup)
    return app


def serve(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 8080) -> None:
    """Run the server until interrupted."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("sandbox server listening on %s: anyone who can reach it can run code here", host)
    web.run_app(make_app(sandbox), host=host, port=port, print=lambda msg: log.info(msg))


def spawn(workers: int = 4, port: int = 0, timeout: float = 20.0):
    """Start ``python -m sod_jax.sandbox serve`` in a child process on loopback and wait until it
    answers ``/v1/ping``. Returns (process, base URL); the caller terminates the process."""
    import socket
    import subprocess
    import sys
    import time
    import urllib.request

    if not port:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "sod_jax.sandbox", "serve", "--port", str(port), "--workers",
                             str(workers)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if urllib.request.urlopen(f"{url}/v1/ping", timeout=1).read() == b"pong":
                return proc, url
        except OSError:
            time.sleep(0.1)
        if proc.poll() is not None:
            break
    proc.kill()
    raise RuntimeError("sandbox server did not start: " + proc.stdout.read().decode(errors="replace"))
