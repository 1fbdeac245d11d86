"""The local executor: model-written Python in isolated, resource-limited processes.

Each execution gets a fresh scratch directory (deleted afterwards) and a fresh interpreter started
through bubblewrap:

* the whole file system read-only, with the caller's home, ``/root``, ``/home``, ``/tmp`` and the
  caller's working directory hidden behind empty tmpfs mounts (the interpreter's prefix is bound
  back read-only so ``numpy``/``sympy`` import); the scratch directory is the only writable place;
* new user, pid, network, IPC and UTS namespaces: no network at all, no view of other processes,
  the whole process tree dies with the run (``--die-with-parent``, a new session);
* a per-worker unprivileged uid (when started as root) with rlimits: CPU seconds, address space,
  process count, file size, open files; a wall-clock timeout that kills the process group; stdout/stderr captured up to
  a cap (a run that prints more is stopped);
* a scrubbed environment (PATH, HOME, LANG and single-threaded BLAS only).

``workers`` executions run at once (one uid each); more wait. Without a working bubblewrap the
executor refuses to start unless ``allow_unconfined`` (rlimits and a uid only: for trusted code).
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sod_jax.sandbox.protocol import SandboxUnavailable, run_response, sandbox_error, validate_request

WORKDIR = "/tmp/sandbox"  # where the scratch directory appears inside the sandbox
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; Fedora: `dnf install "
                "bubblewrap`) or, for trusted code only, set sandbox.allow_unconfined: true")


@dataclass
class LocalSandboxConfig:
    workers: int = 8  # executions at once
    run_timeout: float = 10.0  # default wall-clock seconds (a request may ask for less or more)
    memory_limit_mb: int = 1024  # default address-space limit
    max_output_bytes: int = 1 << 20  # per stream; a run printing more is stopped
    scratch_mb: int = 64  # size of the /tmp tmpfs inside the sandbox
    max_processes: int = 64  # RLIMIT_NPROC for the worker's uid
    max_open_files: int = 256
    max_file_mb: int = 64  # RLIMIT_FSIZE
    python: str = sys.executable
    uid_base: int = 61000  # worker i runs as uid/gid uid_base + i
    allow_unconfined: bool = False
    hide: list[str] = field(default_factory=list)  # extra directories to hide


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for d in Path("/proc").iterdir():
        try:
            n += d.name.isdigit() and d.stat().st_uid == uid
        except OSError:
            continue
    return n


def _bwrap_works(python: str) -> Optional[str]:
    """None if bubblewrap can start ``python`` with all namespaces unshared, else why not."""
    bwrap = shutil.which("bwrap")
    if bwrap is None:
        return "bubblewrap (bwrap) is not installed"
    try:
        r = subprocess.run([bwrap, "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--unshare-all",
                            "--die-with-parent", python, "-c", "print('ok')"], capture_output=True, text=True,
                           timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"bwrap failed to start: {e}"
    if r.returncode != 0 or r.stdout.strip() != "ok":
        return f"bwrap cannot create namespaces here: {r.stderr.strip()[:300]}"
    return None


class LocalSandbox:
    """Async executor implementing :class:`sod_jax.sandbox.protocol.Sandbox`."""

    def __init__(self, config: Optional[LocalSandboxConfig] = None):
        self.cfg = config or LocalSandboxConfig()
        problem = _bwrap_works(self.cfg.python)
        self.confined = problem is None
        if not self.confined and not self.cfg.allow_unconfined:
            raise SandboxUnavailable(f"no process isolation available: {problem}; {INSTALL_HINT}")
        self._is_root = os.geteuid() == 0
        self._setpriv = shutil.which("setpriv")
        self._prlimit = shutil.which("prlimit")
        if self._prlimit is None:
            raise SandboxUnavailable("util-linux's prlimit is needed to set resource limits (`apt-get install -y "
                                     "util-linux`)")
        if self.confined and self._is_root and self._setpriv is None:
            raise SandboxUnavailable("running as root needs util-linux's setpriv to drop privileges inside the "
                                     "sandbox (`apt-get install -y util-linux`)")
        self._free: Optional[asyncio.Queue] = None
        self._prefixes = sorted({os.path.realpath(p) for p in (sys.prefix, sys.base_prefix,
                                                                 str(Path(self.cfg.python).resolve().parents[1]))})

    # -- command line ---------------------------------------------------------------------------

    def _hidden(self) -> list[str]:
        dirs = ["/tmp", "/var/tmp", "/root", "/home", "/run", str(Path.home()), os.getcwd(), *self.cfg.hide]
        out = []
        for d in dirs:
            d = os.path.realpath(d)
            if d != "/" and os.path.isdir(d) and d not in out:
                out.append(d)
        return sorted(out, key=len)  # parents before children

    def _argv(self, scratch: str, uid: Optional[int]) -> list[str]:
        """The command line of one run. As root, bubblewrap runs privileged (no user namespace) and
        ``setpriv`` inside drops to ``uid`` before exec'ing the program, so RLIMIT_NPROC (set before,
        inherited) binds (root is exempt from it) and the program holds no capabilities."""
        python = [self.cfg.python, "-E", "-s", "-B", "main.py"]
        if uid is not None:  # util-linux setpriv: drop to the worker's uid with no capabilities left
            python = [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                      "--"] + python
        if not self.confined:
            return python
        argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        hidden = self._hidden()
        for d in hidden:
            argv += ["--size", str(self.cfg.scratch_mb << 20), "--tmpfs", d] if d == "/tmp" else ["--tmpfs", d]
        made: set[str] = set()
        for p in self._prefixes:  # the interpreter and its packages, read-only, even if under a hidden dir
            for a in reversed(Path(p).parents):  # traversable parents (bwrap would make them 0700)
                a = str(a)
                if a not in made and any(a.startswith(h + "/") for h in hidden):
                    argv += ["--perms", "0755", "--dir", a]
                    made.add(a)
            argv += ["--ro-bind", p, p]
        argv += ["--bind", scratch, WORKDIR, "--chdir", WORKDIR]
        argv += (["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
                 if self._is_root else ["--unshare-all"])
        return argv + ["--die-with-parent", "--new-session", "--hostname", "sandbox"] + python

    def _limits(self, memory_mb: int, cpu_s: int) -> list[str]:
        """util-linux ``prlimit`` prefix setting the rlimits, then exec'ing the rest. (No
        ``preexec_fn``: it forces a full fork of this, possibly huge, process for every run.)"""
        cfg = self.cfg
        # As root the process limit only binds after the drop to the worker uid; otherwise it counts all
        # of this user's processes, so leave room for those.
        nproc = cfg.max_processes if self._is_root else _user_process_count() + cfg.max_processes
        lim = {"cpu": cpu_s, "fsize": cfg.max_file_mb << 20, "nofile": cfg.max_open_files, "core": 0,
               "as": memory_mb << 20, "nproc": nproc}
        return [self._prlimit] + [f"--{k}={v}:{v}" for k, v in lim.items()] + ["--"]

    # -- running ----------------------------------------------------------------------------------

    async def _worker(self) -> int:
        if self._free is None:
            self._free = asyncio.Queue()
            for i in range(self.cfg.workers):
                self._free.put_nowait(i)
        return await self._free.get()

    async def run(self, request: dict) -> dict:
        problem = validate_request(request)
        if problem:
            return sandbox_error(f"bad request: {problem}")
        worker = await self._worker()
        try:
            return await self._run(request, worker)
        except Exception as e:  # never an exception out of the executor: a SandboxError observation
            return sandbox_error(f"sandbox failure: {type(e).__name__}: {e}")
        finally:
            self._free.put_nowait(worker)

    async def _run(self, req: dict, worker: int) -> dict:
        cfg = self.cfg
        timeout = float(req.get("run_timeout") or cfg.run_timeout)
        memory_mb = int(req.get("memory_limit_MB") or cfg.memory_limit_mb)
        uid = cfg.uid_base + worker if (self._is_root and self.confined) else None
        scratch = tempfile.mkdtemp(prefix="sod_sandbox_")
        try:
            root = Path(scratch)
            for rel, content in (req.get("files") or {}).items():
                target = (root / rel).resolve()
                if root.resolve() not in target.parents:
                    return sandbox_error(f"bad request: file path {rel!r} leaves the scratch directory")
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(base64.b64decode(content or ""))
            (root / "main.py").write_text(req["code"])
            if uid is not None:
                for p in [root, *root.rglob("*")]:
                    os.chown(p, uid, uid)
            env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8",
                   "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *self._limits(memory_mb, int(timeout) + 1), *self._argv(scratch, uid), cwd=scratch, env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True)
            status, rc, out, err = await self._communicate(proc, (req.get("stdin") or "").encode(), timeout)
            if self.confined and rc == 1 and not out and err.startswith("bwrap:"):
                return sandbox_error(f"isolation set-up failed: {err.strip()}")
            return run_response(status, rc, out, err, time.monotonic() - t0)
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    async def _communicate(self, proc, stdin: bytes, timeout: float):
        cap = self.cfg.max_output_bytes
        over = asyncio.Event()

        async def read(stream) -> bytes:
            buf = bytearray()
            while True:
                chunk = await stream.read(65536)
                if not chunk:
                    return bytes(buf)
                if len(buf) < cap:
                    buf += chunk[: cap - len(buf)]
                if len(buf) >= cap:
                    over.set()

        async def feed() -> None:
            try:
                if stdin:
                    proc.stdin.write(stdin)
                    await proc.stdin.drain()
            except (BrokenPipeError, ConnectionResetError):
                pass
            finally:
                proc.stdin.close()

        readers = asyncio.gather(read(proc.stdout), read(proc.stderr), feed())
        waiter = asyncio.ensure_future(proc.wait())
        limit = asyncio.ensure_future(over.wait())
        done, _ = await asyncio.wait({waiter, limit}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        status = "Finished"
        if waiter not in done:
            status = "Error" if limit in done else "TimeLimitExceeded"
            self._kill(proc)
        limit.cancel()
        rc = await waiter
        try:
            out, err, _ = await asyncio.wait_for(readers, timeout=5)
        except asyncio.TimeoutError:  # a descendant kept the pipes open: the namespace kill closes them
            out, err = b"", b""
        text = lambda b: b.decode("utf-8", errors="replace")  # noqa: E731
        out_s, err_s = text(out), text(err)
        if status == "Error":
            err_s += f"\n[output limit of {cap} bytes exceeded; the run was stopped]"
        if status == "Finished" and rc is not None and rc < 0:
            sig = -rc
            err_s += f"\n[killed by signal {signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else sig}]"
            status = "Error"
        return status, rc, out_s, err_s

    @staticmethod
    def _kill(proc) -> None:
        for target in (lambda: os.killpg(proc.pid, signal.SIGKILL), proc.kill):
            try:
                target()
            except (ProcessLookupError, PermissionError):
                pass

    async def close(self) -> None:
        return None
