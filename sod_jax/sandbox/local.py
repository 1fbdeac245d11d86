"""The local executor: model-written Python in isolated, resource-limited processes.

Two modes share one sandbox definition. ``cold``: each execution gets a fresh scratch directory
(deleted afterwards) and a fresh interpreter started through bubblewrap. ``warm`` (default): each
worker keeps one "zygote" interpreter started through the same bubblewrap command line (same
namespaces, uid, rlimits and read-only file system) with the ``preload`` modules imported, and each
execution is a fresh fork of it in its own user, mount, pid and IPC namespaces, with its own tmpfs
scratch directory, limits and session, killed as a whole namespace on timeout (``zygote.py`` says
how it is kept from the zygote). A zygote that dies is replaced. The sandbox, in both modes:

* the whole file system read-only, with the caller's home, ``/root``, ``/home``, ``/tmp`` and the
  caller's working directory hidden behind empty tmpfs mounts; the interpreter's own files (its
  prefixes, standard library and site-packages, asked of the interpreter itself: a venv under
  ``/tmp``, in the home directory or a checkout's ``.venv``, a conda prefix) are bound back
  read-only over them, and in warm mode again over each execution's own ``/tmp``, so lazy imports
  work; only those directories show, never their hidden parents' other files; the scratch
  directory is the only writable place;
* new user, pid, network, IPC and UTS namespaces: no network at all, no view of other processes,
  the whole process tree dies with the run (``--die-with-parent``, a new session);
* a per-worker unprivileged uid (when started as root) with rlimits: CPU seconds, address space,
  process count, file size, open files; a wall-clock timeout that kills the process group; stdout/stderr captured up to
  a cap (a run that prints more is stopped);
* a scrubbed environment (PATH, HOME, LANG and single-threaded BLAS only), umask 022, and every
  signal at its default disposition and unblocked (``env --default-signal``), whatever this process
  ignores or blocks (``nohup``, a non-interactive shell's ``&``, a batch launcher).

``workers`` executions run at once (one uid each); more wait. Without a working bubblewrap the
executor refuses to start unless ``allow_unconfined`` (rlimits and a uid only: for trusted code;
always cold). Warm-mode differences a program could notice: it runs as pid 1 of its namespace,
its stdin is an (unlinked) file rather than a pipe, ``/proc`` is the worker's, and the string hash
seed (``PYTHONHASHSEED``) is drawn once per zygote rather than per run.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import functools
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from sod_jax.sandbox import warm as _warm
from sod_jax.sandbox import zygote as _zygote
from sod_jax.sandbox.protocol import SandboxUnavailable, run_response, sandbox_error, validate_request

log = logging.getLogger(__name__)

WORKDIR = "/tmp/sandbox"  # where the scratch directory appears inside the sandbox
PRELOAD = ["numpy", "sympy", "math", "cmath", "fractions", "decimal", "itertools", "functools", "collections",
           "heapq", "bisect", "re", "json", "string", "statistics", "random", "datetime"]
UMASK = 0o022  # every execution's, warm and cold, whatever this process's is
GRACE_S = 5.0  # how long past its time limit a warm execution may take to be reported before its zygote is replaced
INSTALL_HINT = ("install bubblewrap (Debian/Ubuntu: `apt-get install -y bubblewrap`; Fedora: `dnf install "
                "bubblewrap`) or, for trusted code only, set sandbox.allow_unconfined: true")


@dataclass
class LocalSandboxConfig:
    mode: str = "warm"  # warm: fork each run from a pre-started isolated interpreter; cold: a new sandbox per run
    preload: list[str] = field(default_factory=lambda: list(PRELOAD))  # warm: modules imported once per worker
    workers: int = 8  # executions at once
    run_timeout: float = 10.0  # default wall-clock seconds (a request may ask for less or more)
    memory_limit_mb: int = 1024  # default address-space limit
    max_output_bytes: int = 1 << 20  # per stream; a run printing more is stopped
    scratch_mb: int = 64  # size of the /tmp tmpfs inside the sandbox
    max_processes: int = 64  # RLIMIT_NPROC for the worker's uid
    max_open_files: int = 256
    max_file_mb: int = 64  # RLIMIT_FSIZE
    python: str = sys.executable
    # worker i runs as uid/gid uid_base + i. Sandboxes sharing uids share their process limits (a
    # fork bomb in one makes the other's forks fail), so separate services on one host (or parallel
    # test processes) each set their own range, e.g. through SOD_JAX_SANDBOX_UID_BASE.
    uid_base: int = field(default_factory=lambda: int(os.environ.get("SOD_JAX_SANDBOX_UID_BASE", "61000")))
    allow_unconfined: bool = False
    hide: list[str] = field(default_factory=list)  # extra directories to hide

    def __post_init__(self):
        if self.mode not in ("warm", "cold"):
            raise ValueError(f"sandbox mode must be 'warm' or 'cold', got {self.mode!r}")
        if self.workers < 1:
            raise ValueError(f"sandbox workers must be >= 1, got {self.workers}")

    @classmethod
    def from_config(cls, sandbox_cfg) -> "LocalSandboxConfig":
        """From the ``sandbox`` section of :class:`sod_jax.config.Config` (any object with its fields)."""
        return cls(mode=getattr(sandbox_cfg, "mode", "warm"), workers=sandbox_cfg.workers,
                   run_timeout=sandbox_cfg.run_timeout, memory_limit_mb=sandbox_cfg.memory_limit_mb,
                   allow_unconfined=sandbox_cfg.allow_unconfined)


def _user_process_count() -> int:
    uid = os.getuid()
    n = 0
    for d in Path("/proc").iterdir():
        try:
            n += d.name.isdigit() and d.stat().st_uid == uid
        except OSError:
            continue
    return n


_LAYOUT_PROBE = """\
import json, site, sys, sysconfig
paths = sysconfig.get_paths()
print(json.dumps({"prefixes": [sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix],
                  "dirs": [paths.get(k) for k in ("stdlib", "platstdlib", "purelib", "platlib")]
                          + site.getsitepackages() + [sysconfig.get_config_var("LIBDIR")],
                  "path": sys.path}))
"""


@functools.lru_cache(maxsize=None)
def _interpreter_layout(python: str) -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    """(prefixes, stdlib/site-packages/lib dirs, sys.path) of ``python`` started as the sandbox starts
    it (``-E -s``: no PYTHONPATH, no user site). Empty when it cannot be asked."""
    try:
        r = subprocess.run([python, "-E", "-s", "-c", _LAYOUT_PROBE], capture_output=True, text=True, timeout=60,
                           cwd="/", env={"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"})
        info = json.loads((r.stdout.strip().splitlines() or [""])[-1])
    except (OSError, subprocess.TimeoutExpired, ValueError) as e:
        log.warning("sandbox: cannot ask %s where its files are (%s)", python, e)
        return (), (), ()
    clean = lambda xs: tuple(x for x in xs if isinstance(x, str) and os.path.isabs(x))  # noqa: E731
    return clean(info.get("prefixes", [])), clean(info.get("dirs", [])), clean(info.get("path", []))


def _within(path: str, top: str) -> bool:
    """``path`` is ``top`` or below it (both normalized absolute paths)."""
    return path == top or path.startswith(top.rstrip("/") + "/")


def interpreter_paths(python: str) -> list[str]:
    """The places the sandbox's interpreter needs to run and import its packages: its prefixes (a
    venv's and its base's: the standard library, site-packages, shared libraries such as a conda
    prefix's ``lib``), the directory of the interpreter's binary and of ``python`` itself, the
    standard library and site-packages directories, a venv's ``pyvenv.cfg``, and the entries of its
    ``sys.path`` inside those prefixes. Entries that ``.pth`` files add from elsewhere (an editable
    install's source tree, such as a checkout) are not part of the environment and are left out.
    Normalized absolute paths, as the interpreter names them (symlinks not resolved)."""
    prefixes, dirs, path = _interpreter_layout(python)
    exe = os.path.abspath(python)
    real_exe = os.path.realpath(exe)
    homes = [*prefixes, os.path.dirname(os.path.dirname(real_exe))]
    out = [*prefixes, os.path.dirname(exe), os.path.dirname(real_exe), homes[-1], *dirs]
    out += [os.path.join(p, "pyvenv.cfg") for p in prefixes]
    out += [p for p in path if any(_within(os.path.normpath(p), os.path.normpath(h)) for h in homes)]
    seen: dict[str, None] = {}
    for p in out:
        p = os.path.normpath(p)
        if os.path.isabs(p) and os.path.exists(p):
            seen.setdefault(p)
    return list(seen)


def exposed_paths(needed: list[str], hidden: list[str], covered: list[str]) -> list[tuple[str, str]]:
    """(source, destination) read-only binds that make ``needed`` visible again where ``covered``
    (the hidden directories and whatever else the sandbox mounts over) hides them. A needed path is
    bound at its real location and, when it is reached through a symlink, at the path it is named
    by too. Nothing that is, or contains, a ``hidden`` directory is bound (it would show the user's
    files again: a prefix that is the home directory is replaced by its finer parts); a path inside
    another bound one comes with it. Sorted parents first."""
    hidden = [os.path.realpath(h) for h in hidden]
    binds: dict[str, str] = {}
    for p in needed:
        real = os.path.realpath(p)
        if any(_within(h, real) for h in hidden):
            continue
        for dest in (real, os.path.normpath(os.path.abspath(p))):
            if dest in binds or not any(_within(dest, c) and dest != c for c in covered):
                continue
            if any(_within(h, dest) for h in hidden):
                continue
            binds[dest] = real
    out: list[tuple[str, str]] = []
    for dest in sorted(binds, key=lambda d: (d.count("/"), d)):
        if not any(_within(dest, d) for _, d in out):
            out.append((binds[dest], dest))
    return out


@functools.lru_cache(maxsize=None)
def _env_resets_signals() -> Optional[str]:
    """Path of an ``env`` that takes ``--default-signal`` (GNU coreutils 8.31+): it resets every
    signal to its default disposition and unblocks it before exec'ing the rest. None if there is none."""
    env = shutil.which("env")
    if env is None:
        return None
    try:
        r = subprocess.run([env, "--default-signal", "true"], capture_output=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return env if r.returncode == 0 else None


# Where ``env --default-signal`` is missing: the sandbox's interpreter resets the signals and execs the rest.
_RESET_SIGNALS = ("import os, signal, sys\n"
                  "for s in signal.valid_signals():\n"
                  "    if s not in (signal.SIGKILL, signal.SIGSTOP):\n"
                  "        try:\n"
                  "            signal.signal(s, signal.SIG_DFL)\n"
                  "        except (OSError, ValueError):\n"
                  "            pass\n"
                  "signal.pthread_sigmask(signal.SIG_SETMASK, ())\n"
                  "os.execv(sys.argv[1], sys.argv[1:])\n")


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
        self.mode = self.cfg.mode if self.confined else "cold"  # warm needs the namespaces
        if self.mode != self.cfg.mode:
            log.warning("sandbox: warm mode needs bubblewrap; running unconfined executions cold")
        self._pool = _WorkerPool(self.cfg.workers)
        self._zygotes: dict[int, _warm.Zygote] = {}
        self._finalizer = weakref.finalize(self, _stop_all, self._zygotes)
        self._needed = interpreter_paths(self.cfg.python) if self.confined else []
        self._reset_env = _env_resets_signals()

    # -- command line ---------------------------------------------------------------------------

    def _hidden(self) -> list[str]:
        dirs = ["/tmp", "/var/tmp", "/root", "/home", "/run", str(Path.home()), os.getcwd(), *self.cfg.hide]
        out = []
        for d in dirs:
            d = os.path.realpath(d)
            if d != "/" and os.path.isdir(d) and d not in out:
                out.append(d)
        return sorted(out, key=len)  # parents before children

    def _exposed(self, hidden: list[str]) -> list[tuple[str, str]]:
        """(source, destination) read-only binds of the interpreter's files that the hidden
        directories (and bubblewrap's own ``/dev``) would otherwise cover: wherever the environment
        lives (under ``/tmp``, the home directory, a checkout's ``.venv``), only it is shown."""
        return exposed_paths(self._needed, hidden, [*hidden, "/dev"])

    def _launcher(self) -> list[str]:
        """The first command of every run and zygote: every signal back to its default disposition
        and unblocked, whatever this process ignores or blocks (a trainer started under ``nohup``, in
        the background of a non-interactive shell, by a batch launcher), so an execution starts the
        same however the trainer was started."""
        if self._reset_env:
            return [self._reset_env, "--default-signal", "--"]
        return [self.cfg.python, "-E", "-s", "-S", "-c", _RESET_SIGNALS]

    def _argv(self, scratch: Optional[str], uid: Optional[int], program: Optional[list[str]] = None) -> list[str]:
        """The command line of one run. As root, bubblewrap runs privileged (no user namespace) and
        ``setpriv`` inside drops to ``uid`` before exec'ing the program, so RLIMIT_NPROC (set before,
        inherited) binds (root is exempt from it) and the program holds no capabilities."""
        python = program or [self.cfg.python, "-E", "-s", "-B", "main.py"]
        if uid is not None:  # util-linux setpriv: drop to the worker's uid with no capabilities left
            python = [self._setpriv, f"--reuid={uid}", f"--regid={uid}", "--clear-groups", "--inh-caps=-all",
                      "--"] + python
        if not self.confined:
            return python
        argv = ["bwrap", "--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc"]
        hidden = self._hidden()
        for d in hidden:
            argv += ["--size", str(self.cfg.scratch_mb << 20), "--tmpfs", d] if d == "/tmp" else ["--tmpfs", d]
        covered = [*hidden, "/dev"]
        made: set[str] = set()
        for src, dest in self._exposed(hidden):  # the interpreter and its packages, read-only, after the tmpfs
            for a in reversed(Path(dest).parents):  # traversable parents (bwrap would make them 0700)
                a = str(a)
                if a not in made and any(a.startswith(h.rstrip("/") + "/") for h in covered):
                    argv += ["--perms", "0755", "--dir", a]
                    made.add(a)
            argv += ["--ro-bind", src, dest]
        argv += ["--bind", scratch, WORKDIR, "--chdir", WORKDIR] if scratch else ["--chdir", "/"]
        argv += (["--unshare-pid", "--unshare-net", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
                 if self._is_root else ["--unshare-all"])
        return argv + ["--die-with-parent", "--new-session", "--hostname", "sandbox"] + python

    def _limits(self, memory_mb: Optional[int], cpu_s: Optional[int]) -> list[str]:
        """util-linux ``prlimit`` prefix setting the rlimits, then exec'ing the rest. (No
        ``preexec_fn``: it forces a full fork of this, possibly huge, process for every run.)"""
        cfg = self.cfg
        # As root the process limit only binds after the drop to the worker uid; otherwise it counts all
        # of this user's processes, so leave room for those.
        nproc = cfg.max_processes if self._is_root else _user_process_count() + cfg.max_processes
        lim = {"cpu": cpu_s if cpu_s is not None else "unlimited", "fsize": cfg.max_file_mb << 20,
               "nofile": cfg.max_open_files, "core": 0,
               "as": memory_mb << 20 if memory_mb is not None else "unlimited", "nproc": nproc}
        return self._launcher() + [self._prlimit] + [f"--{k}={v}:{v}" for k, v in lim.items()] + ["--"]

    # -- running ----------------------------------------------------------------------------------

    async def run(self, request: dict) -> dict:
        problem = validate_request(request)
        if problem:
            return sandbox_error(f"bad request: {problem}")
        problem = _bad_file_path(request)
        if problem:
            return sandbox_error(f"bad request: {problem}")
        worker = await self._pool.acquire()
        try:
            if self.mode == "warm":
                return await self._run_warm(request, worker)
            return await self._run(request, worker)
        except Exception as e:  # never an exception out of the executor: a SandboxError observation
            return sandbox_error(f"sandbox failure: {type(e).__name__}: {e}")
        finally:
            self._pool.release(worker)

    def _env(self) -> dict[str, str]:
        return {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": WORKDIR, "LANG": "C.UTF-8",
                "OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "MPLBACKEND": "Agg"}

    def _uid(self, worker: int) -> Optional[int]:
        return self.cfg.uid_base + worker if (self._is_root and self.confined) else None

    async def _run(self, req: dict, worker: int) -> dict:
        cfg = self.cfg
        timeout = float(req.get("run_timeout") or cfg.run_timeout)
        memory_mb = int(req.get("memory_limit_MB") or cfg.memory_limit_mb)
        uid = self._uid(worker)
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
            env = self._env()
            t0 = time.monotonic()
            proc = await asyncio.create_subprocess_exec(
                *self._limits(memory_mb, int(timeout) + 1), *self._argv(scratch, uid), cwd=scratch, env=env,
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
                start_new_session=True, umask=UMASK)
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
        return self._outcome(status, rc, out, err)

    def _outcome(self, status: str, rc: Optional[int], out: bytes, err: bytes):
        """(status, rc, stdout, stderr) as reported, from the raw ones."""
        cap = self.cfg.max_output_bytes
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

    # -- warm mode --------------------------------------------------------------------------------

    def _zygote(self, worker: int) -> _warm.Zygote:
        z = self._zygotes.get(worker)
        if z is None:
            cfg = self.cfg
            # the interpreter's files the execution's own /tmp and /dev/shm would cover: bound back there
            keep = [dest for _, dest in self._exposed(self._hidden())] if self.confined else []
            program = [cfg.python, "-E", "-s", "-B", "-c", _warm.ZYGOTE_SOURCE,
                       json.dumps({"preload": cfg.preload, "keep": keep})]
            argv = self._limits(None, None) + self._argv(None, self._uid(worker), program)
            z = self._zygotes[worker] = _warm.Zygote(argv, self._env(), umask=UMASK)
        return z

    async def _run_warm(self, req: dict, worker: int) -> dict:
        z = self._zygote(worker)
        try:
            return await self._run_warm_on(z, req)
        except BaseException:  # cancelled or failed mid-protocol: its state is unknown, so replace it
            z.stop()
            raise

    async def _run_warm_on(self, z: _warm.Zygote, req: dict) -> dict:
        cfg = self.cfg
        timeout = float(req.get("run_timeout") or cfg.run_timeout)
        await z.ensure()
        request = {"code": req["code"], "stdin": req.get("stdin") or "", "files": req.get("files") or {},
                   "timeout": timeout, "cpu_s": int(timeout) + 1,
                   "memory_mb": int(req.get("memory_limit_MB") or cfg.memory_limit_mb), "nproc": cfg.max_processes,
                   "fsize_mb": cfg.max_file_mb, "nofile": cfg.max_open_files, "scratch_mb": cfg.scratch_mb,
                   "env": self._env()}
        (out_r, out_w), (err_r, err_w) = _warm.pipe(), _warm.pipe()
        t0 = time.monotonic()
        try:
            await z.send(request, [out_w, err_w])
        except OSError as e:
            os.close(out_r), os.close(err_r)
            z.stop()
            return sandbox_error(f"the sandbox worker's zygote was gone ({e}); it is replaced on the next run")
        finally:
            os.close(out_w), os.close(err_w)
        over = asyncio.Event()
        readers = asyncio.gather(_warm.drain(out_r, cfg.max_output_bytes, over),
                                 _warm.drain(err_r, cfg.max_output_bytes, over))
        reply = asyncio.ensure_future(z.reply())
        limit = asyncio.ensure_future(over.wait())
        try:
            return await self._await_warm(z, t0, timeout, readers, reply, limit, over)
        finally:  # cancelled: nothing may stay registered on descriptors that get closed and reused
            for fut in (reply, limit, readers):
                fut.cancel()

    async def _await_warm(self, z, t0, timeout, readers, reply, limit, over) -> dict:
        done, _ = await asyncio.wait({reply, limit}, timeout=timeout + GRACE_S, return_when=asyncio.FIRST_COMPLETED)
        status = "Finished"
        if reply not in done:
            status = "Error" if limit in done else "TimeLimitExceeded"
            z.kill_run()
        limit.cancel()
        try:  # (no timer for what is already there: the usual case)
            msg = reply.result() if reply.done() else await asyncio.wait_for(reply, GRACE_S)
        except (asyncio.TimeoutError, _warm.ZygoteDied, OSError, ValueError) as e:
            z.stop()  # hung or dead: kill its whole sandbox (this run with it); a new one starts next time
            msg = {"error": f"the sandbox worker's zygote failed ({type(e).__name__}: {e}); it is replaced"}
        try:
            out, err = readers.result() if readers.done() else await asyncio.wait_for(readers, 5)
        except asyncio.TimeoutError:
            out, err = b"", b""
        if "error" in msg:
            return sandbox_error(f"isolation set-up failed: {msg['error']}")
        rc = msg["rc"]
        if rc == _zygote.SETUP_FAILED and err.startswith(_zygote.SETUP_PREFIX.encode()):
            return sandbox_error(f"isolation set-up failed: {err.decode(errors='replace').strip()}")
        if msg.get("timeout") and status == "Finished":
            status = "TimeLimitExceeded"
        return run_response(*self._outcome(status, rc, out, err), time.monotonic() - t0)

    def zygote_pids(self) -> dict[int, int]:
        """worker -> host pid of its running zygote sandbox (bubblewrap) process (diagnostics, tests)."""
        return {w: z.pid for w, z in self._zygotes.items() if z.alive()}

    @property
    def zygote_starts(self) -> int:
        """Zygotes started so far (one per used worker, plus one per replacement)."""
        return sum(z.starts for z in self._zygotes.values())

    async def close(self) -> None:
        _stop_all(self._zygotes)


def _stop_all(zygotes: dict) -> None:
    for z in zygotes.values():
        z.stop()


def _bad_file_path(req: dict) -> Optional[str]:
    for rel in req.get("files") or {}:
        if os.path.isabs(rel) or ".." in Path(rel).parts or not Path(rel).parts:
            return f"file path {rel!r} leaves the scratch directory"
    return None


class _WorkerPool:
    """Worker ids handed out one run at a time, across event loops and threads (a run on one loop
    never waits on a queue bound to another). Last released, first reused: under light load only a
    few workers (and their zygotes) are ever started."""

    def __init__(self, n: int):
        self._free = list(reversed(range(n)))
        self._waiters: collections.deque = collections.deque()
        self._lock = threading.Lock()

    async def acquire(self) -> int:
        with self._lock:
            if self._free:
                return self._free.pop()
            fut = asyncio.get_running_loop().create_future()
            self._waiters.append(fut)
        try:
            return await fut
        except asyncio.CancelledError:
            if fut.done() and not fut.cancelled():  # handed over just as the waiter was cancelled
                self.release(fut.result())
            raise

    def release(self, worker: int) -> None:
        with self._lock:
            while self._waiters:
                fut = self._waiters.popleft()
                try:
                    fut.get_loop().call_soon_threadsafe(self._hand_over, fut, worker)
                    return
                except RuntimeError:  # that loop is closed
                    continue
            self._free.append(worker)

    def _hand_over(self, fut, worker: int) -> None:
        if fut.done():  # the waiter was cancelled meanwhile: give the worker to the next one
            self.release(worker)
        else:
            fut.set_result(worker)
