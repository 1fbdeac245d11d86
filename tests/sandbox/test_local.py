"""The local executor contains hostile code and keeps serving, warm and cold alike; ordinary code runs
with numpy/sympy."""

import asyncio
import base64
import os
import socket
import time
import uuid
from pathlib import Path

import pytest

from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, SandboxUnavailable, run_request
from sod_jax.sandbox import local as local_mod
from sod_jax.sandbox.fusion import FusionSandbox

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def warm_sandbox():
    sb = LocalSandbox(LocalSandboxConfig(mode="warm", workers=2, max_output_bytes=1 << 20))
    yield sb
    asyncio.run(sb.close())


@pytest.fixture(scope="module")
def cold_sandbox():
    return LocalSandbox(LocalSandboxConfig(mode="cold", workers=2, max_output_bytes=1 << 20))


@pytest.fixture(scope="module", params=["warm", "cold", "fusion"])
def sandbox(request):
    """Every functional test runs against the warm and the cold executor directly, and through
    `sandbox serve` (warm) over HTTP with the fusion client."""
    if request.param != "fusion":
        return request.getfixturevalue(f"{request.param}_sandbox")
    url = request.getfixturevalue("sandbox_server")
    return FusionClientSync(url, LocalSandboxConfig(max_output_bytes=1 << 20))


class FusionClientSync:
    """A fresh FusionSandbox per call (each test runs its own event loop)."""

    def __init__(self, url, cfg):
        self.url, self.cfg = url, cfg

    async def run(self, request):
        client = FusionSandbox(self.url)
        try:
            return await client.run(request)
        finally:
            await client.close()


def run(sb, code, **kw):
    kw.setdefault("run_timeout", 5)
    return asyncio.run(sb.run(run_request(code, **kw)))


def still_serving(sb):
    r = run(sb, "print(6 * 7)")
    assert r["status"] == "Success" and r["run_result"]["stdout"] == "42\n", r


def host_processes_matching(text):
    found = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and text in (d / "cmdline").read_bytes().replace(b"\0", b" ").decode():
                found.append(int(d.name))
        except OSError:
            continue
    return found


def test_ordinary_code_numpy_sympy_stdin_files(sandbox):
    r = run(sandbox, "import numpy, sympy\nx = sympy.symbols('x')\nprint(numpy.arange(4).sum(), sympy.factor(x**2 - 1))")
    assert r["status"] == "Success" and r["run_result"]["stdout"] == "6 (x - 1)*(x + 1)\n"
    r = run(sandbox, "import sys\nprint(sys.stdin.read().upper())", stdin="hello")
    assert r["run_result"]["stdout"] == "HELLO\n"
    files = {"data/in.txt": base64.b64encode(b"41").decode()}
    r = run(sandbox, "print(int(open('data/in.txt').read()) + 1)", files=files)
    assert r["run_result"]["stdout"] == "42\n"


def test_exit_code_and_syntax_error_are_reported(sandbox):
    r = run(sandbox, "import sys\nprint('bye')\nsys.exit(3)")
    assert r["status"] == "Failed" and r["run_result"]["status"] == "Finished"
    assert r["run_result"]["return_code"] == 3 and r["run_result"]["stdout"] == "bye\n"
    r = run(sandbox, "def f(:\n  pass")
    assert r["status"] == "Failed" and "SyntaxError" in r["run_result"]["stderr"]
    still_serving(sandbox)


def test_infinite_loop_times_out(sandbox):
    t0 = time.monotonic()
    r = run(sandbox, "while True:\n    pass", run_timeout=1.5)
    assert r["run_result"]["status"] == "TimeLimitExceeded" and r["status"] == "Failed"
    assert time.monotonic() - t0 < 10
    still_serving(sandbox)


def test_memory_bomb(sandbox):
    r = run(sandbox, "x = bytearray(8 << 30)\nprint('allocated')", memory_limit_mb=512)
    assert r["status"] == "Failed" and "MemoryError" in r["run_result"]["stderr"]
    r = run(sandbox, "a = []\nwhile True:\n    a.append(bytearray(10 << 20))", memory_limit_mb=512)
    assert r["status"] == "Failed" and "allocated" not in r["run_result"]["stdout"]
    still_serving(sandbox)


def test_fork_bomb(sandbox):
    code = "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    t0 = time.monotonic()
    r = run(sandbox, code, run_timeout=2)
    assert r["status"] == "Failed" and time.monotonic() - t0 < 15
    time.sleep(0.5)
    assert sandbox_processes_left(sandbox.cfg) == []
    still_serving(sandbox)


def sandbox_processes_left(cfg, wait=3.0):
    """Host pids of processes running as a worker uid (of any backend) other than the warm zygotes:
    what an execution left behind. A zygote's fork (an execution) has the zygote's command line but
    lives in a nested pid namespace, so it is never mistaken for one. Polls up to ``wait`` seconds
    (processes being torn down)."""
    deadline = time.monotonic() + wait
    while (left := _worker_uid_processes(cfg)) and time.monotonic() < deadline:
        time.sleep(0.1)
    return left


def _worker_uid_processes(cfg):
    uids = range(cfg.uid_base, cfg.uid_base + 64)
    zygote_depth = None
    left = []
    for d in Path("/proc").iterdir():
        try:
            if not d.name.isdigit() or d.stat().st_uid not in uids:
                continue
            depth = len(next(line for line in (d / "status").read_text().splitlines()
                             if line.startswith("NSpid:")).split()) - 1
            is_zygote = "warm executor's zygote" in (d / "cmdline").read_bytes().decode(errors="replace")
        except (OSError, StopIteration):
            continue
        if is_zygote and zygote_depth is None:
            zygote_depth = depth
        left.append((int(d.name), depth, is_zygote))
    if zygote_depth is not None:
        zygote_depth = min(dep for _, dep, z in left if z)
    return [pid for pid, dep, z in left if not (z and dep == zygote_depth)]


def test_huge_output_is_capped(sandbox):
    r = run(sandbox, "import sys\nsys.stdout.write('x' * 100_000_000)\nsys.stdout.flush()")
    rr = r["run_result"]
    assert r["status"] == "Failed" and rr["status"] == "Error" and "output limit" in rr["stderr"]
    assert len(rr["stdout"]) == sandbox.cfg.max_output_bytes
    still_serving(sandbox)


def test_cannot_touch_callers_home_repo_or_secrets(sandbox, monkeypatch):
    canary = Path.home() / f"sod_canary_{uuid.uuid4().hex}"
    canary.write_text("canary-secret")
    target = REPO / f"pwned_{uuid.uuid4().hex}.txt"
    monkeypatch.setenv("SOD_TEST_SECRET", "s3cret-value")
    try:
        code = (f"import os\n"
                f"for path in ({str(canary)!r}, {str(target)!r}):\n"
                f"    try:\n"
                f"        open(path, 'w').write('pwned')\n"
                f"        print('wrote', path)\n"
                f"    except OSError as e:\n"
                f"        print('denied', type(e).__name__)\n"
                f"try:\n"
                f"    print('read', open({str(canary)!r}).read())\n"
                f"except OSError as e:\n"
                f"    print('unreadable', type(e).__name__)\n"
                f"print('env', os.environ.get('SOD_TEST_SECRET'))\n")
        r = run(sandbox, code)
        out = r["run_result"]["stdout"]
        assert "wrote" not in out and out.count("denied") == 2, out
        assert "canary-secret" not in out and "unreadable" in out
        assert "s3cret-value" not in out and "env None" in out
        assert canary.read_text() == "canary-secret" and not target.exists()
    finally:
        canary.unlink()
        target.unlink(missing_ok=True)


def test_no_network(sandbox):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    listener.settimeout(1.0)
    port = listener.getsockname()[1]
    try:
        code = (f"import socket\ntry:\n    socket.create_connection(('127.0.0.1', {port}), timeout=2)\n"
                f"    print('connected')\nexcept OSError as e:\n    print('blocked', type(e).__name__)")
        r = run(sandbox, code)
        assert "blocked" in r["run_result"]["stdout"]
        with pytest.raises(socket.timeout):
            listener.accept()
    finally:
        listener.close()


def test_cannot_kill_the_parent(sandbox):
    code = (f"import os, signal\n"
            f"for pid in ({os.getpid()}, os.getppid(), 1):\n"
            f"    try:\n"
            f"        os.kill(pid, signal.SIGKILL)\n"
            f"        print('sent', pid)\n"
            f"    except OSError as e:\n"
            f"        print('failed', pid, type(e).__name__)\n")
    run(sandbox, code)
    still_serving(sandbox)  # this process is alive to ask


@pytest.mark.parametrize("ending", ["while True:\n    pass", "print('done')"])
def test_children_do_not_outlive_the_run(sandbox, ending):
    marker = str(900000 + os.getpid() % 1000)
    code = f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\n{ending}"
    r = run(sandbox, code, run_timeout=1.5)
    assert r["run_result"]["status"] in ("TimeLimitExceeded", "Finished")
    time.sleep(0.5)
    assert host_processes_matching(f"sleep {marker}") == []


def test_concurrent_runs(sandbox):
    async def many():
        return await asyncio.gather(*[sandbox.run(run_request(f"print({i} * 2)")) for i in range(8)])

    outs = asyncio.run(many())
    assert [o["run_result"]["stdout"] for o in outs] == [f"{i * 2}\n" for i in range(8)]


def test_bad_requests_are_sandbox_errors(sandbox):
    r = asyncio.run(sandbox.run({"code": "print(1)", "language": "cpp"}))
    assert r["status"] == "SandboxError" and "language 'cpp' is not supported" in r["message"]
    r = asyncio.run(sandbox.run(run_request("print(1)", files={"../escape.txt": ""})))
    assert r["status"] == "SandboxError" and "leaves the scratch directory" in r["message"]
    r = asyncio.run(sandbox.run({"language": "python"}))
    assert r["status"] == "SandboxError" and "'code' must be a string" in r["message"]


def test_refuses_without_isolation_unless_allowed(monkeypatch):
    real_which = local_mod.shutil.which
    monkeypatch.setattr(local_mod.shutil, "which", lambda name: None if name == "bwrap" else real_which(name))
    with pytest.raises(SandboxUnavailable, match="apt-get install -y bubblewrap"):
        LocalSandbox()
    sb = LocalSandbox(LocalSandboxConfig(allow_unconfined=True))
    assert not sb.confined
    r = run(sb, "print('unconfined')")
    assert r["run_result"]["stdout"] == "unconfined\n"
