"""The local executor behind SandboxFusion's HTTP API: ``POST /run_code``, ``GET /v1/ping``.

One sandbox host can then serve a whole pod (``sandbox.backend: fusion`` on the trainers). The
server binds to loopback unless told otherwise: it runs arbitrary code for whoever can reach it.
"""

from __future__ import annotations

import json
import logging
from typing import Optional

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


def serve(sandbox: Sandbox, host: str = "127.0.0.1", port: int = 8080, access_log: Optional[str] = None) -> None:
    """Run the server until interrupted. Requests are logged (one line each) only to the file
    ``access_log`` when given: a per-request line on stderr would fill any pipe nobody reads and
    stall the server."""
    if host not in ("127.0.0.1", "localhost", "::1"):
        log.warning("sandbox server listening on %s: anyone who can reach it can run code here", host)
    access = None
    if access_log:
        access = logging.getLogger("sod_jax.sandbox.access")
        access.propagate = False  # only to the file, never to the console
        handler = logging.FileHandler(access_log)
        handler.setFormatter(logging.Formatter("%(message)s"))
        access.addHandler(handler)
        access.setLevel(logging.INFO)
    web.run_app(make_app(sandbox), host=host, port=port, print=lambda msg: log.info(msg), access_log=access)

