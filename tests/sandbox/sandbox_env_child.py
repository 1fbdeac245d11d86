"""Run one snippet through the local executor (warm, cold, cold with the launcher's fallback) and
through ``python -m sod_jax.sandbox serve``, from whatever interpreter and process state this script
was started with (a venv's python, ignored signals, a umask). Prints one JSON object: mode ->
{status, stdout, stderr}.

Usage: ``python sandbox_env_child.py '{"code": ..., "modes": ["warm", "cold", "cold-fallback", "serve"]}'``
(the repository on PYTHONPATH; the sandbox itself never sees it)."""

import asyncio
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request

from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request
from sod_jax.sandbox import local


def result(r):
    rr = r.get("run_result") or {}
    return {"status": r.get("status"), "stdout": rr.get("stdout", ""),
            "stderr": rr.get("stderr", "") or r.get("message", "")}


def direct(mode, code):
    if mode == "cold-fallback":  # as where `env` cannot reset signals: the interpreter resets them itself
        local._env_resets_signals = lambda: None
        mode = "cold"
    sb = LocalSandbox(LocalSandboxConfig(mode=mode, workers=1))
    try:
        return result(asyncio.run(sb.run(run_request(code, run_timeout=60))))
    finally:
        asyncio.run(sb.close())


def served(code):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile(prefix="sod_sandbox_env_serve_", suffix=".log", delete=False)
    proc = subprocess.Popen([sys.executable, "-m", "sod_jax.sandbox", "serve", "--port", str(port), "--workers", "1"],
                            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if urllib.request.urlopen(f"{url}/v1/ping", timeout=2).read() == b"pong":
                    break
            except OSError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    return {"status": "no server", "stdout": "", "stderr": open(log.name).read()[-3000:]}
                time.sleep(0.1)
        body = json.dumps(run_request(code, run_timeout=60)).encode()
        req = urllib.request.Request(f"{url}/run_code", data=body, headers={"Content-Type": "application/json"})
        return result(json.loads(urllib.request.urlopen(req, timeout=180).read()))
    finally:
        proc.kill()  # (it may have been started with SIGTERM ignored)
        proc.wait(30)
        os.unlink(log.name)


def main():
    args = json.loads(sys.argv[1])
    out = {}
    for mode in args["modes"]:
        out[mode] = served(args["code"]) if mode == "serve" else direct(mode, args["code"])
    print(json.dumps(out))


if __name__ == "__main__":
    main()
