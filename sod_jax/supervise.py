"""A thin parent process for multi-process jobs, so that a lost coordinator is reported by name.

When process 0 (which runs JAX's coordination service) dies, JAX's C++ runtime ends every other
process itself (a fatal log line and ``abort()``) the moment it polls the service and finds it
gone; no Python code of that process runs again, so it cannot say what happened. Under
:func:`supervised`, the CLI's work runs in a child process and this parent only waits for it:
when the child is ended by a signal it did not get from the parent, the parent checks whether
process 0's coordinator still answers and says which process was lost, in the same one-line form
as a failed collective (``error: process 1 lost process 0 ...``), then exits 1.

The parent forwards SIGTERM / SIGINT / SIGHUP to the child (a preemption notice reaches the job
once), and the child dies with its parent (``PR_SET_PDEATHSIG``), so killing the parent kills the
job. Only ``python -m sod_jax.<cli>`` processes of a multi-process job supervise themselves (an in-process ``main()``
call, e.g. from a test, never re-executes its interpreter); ``SOD_JAX_SUPERVISE=0`` turns it off.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
from typing import Optional

CHILD_ENV = "SOD_JAX_SUPERVISED"  # set in the child: its info file's path
PARENT_ENV = "SOD_JAX_SUPERVISOR_PID"
OFF_ENV = "SOD_JAX_SUPERVISE"
FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


def cli_module(argv: Optional[list] = None) -> Optional[str]:
    """``sod_jax.X`` when this interpreter was started as ``python ... -m sod_jax.X`` (not pytest or
    another program that calls a CLI's ``main``), else None."""
    argv = list(sys.orig_argv if argv is None else argv)
    if "-m" not in argv or argv.index("-m") + 1 >= len(argv):
        return None
    module = argv[argv.index("-m") + 1]
    return module if module.startswith("sod_jax.") else None


def in_child() -> bool:
    return bool(os.environ.get(CHILD_ENV))


def supervised() -> Optional[int]:
    """Run this CLI's command line again as a child and wait for it; returns the exit code for the
    parent to return, or None when this process is to do the work itself (it is the child, or it
    was not started as ``python -m sod_jax.X``, or ``SOD_JAX_SUPERVISE=0``)."""
    if in_child() or os.environ.get(OFF_ENV, "1") == "0" or cli_module() is None:
        return None
    fd, info = tempfile.mkstemp(prefix="sod_jax_supervisor_", suffix=".json")
    os.close(fd)
    pending: list[int] = []
    child: list[subprocess.Popen] = []

    def forward(signum, _frame):
        if child and child[0].poll() is None:
            child[0].send_signal(signum)
        else:
            pending.append(signum)

    old = {s: signal.signal(s, forward) for s in FORWARDED}
    try:
        # The child is in its own process group: a signal to the parent's group (Ctrl-C, a
        # scheduler's SIGTERM) reaches it once, through the parent.
        env = {**os.environ, CHILD_ENV: info, PARENT_ENV: str(os.getpid())}
        child.append(subprocess.Popen([sys.executable, *sys.orig_argv[1:]], env=env, process_group=0))
        for s in pending:
            child[0].send_signal(s)
        return _exit_code(child[0].wait(), info)
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        try:
            os.unlink(info)
        except OSError:
            pass


def _exit_code(rc: int, info_path: str) -> int:
    if rc >= 0:
        return rc
    sig = -rc
    try:
        info = json.loads(open(info_path).read() or "{}")
    except (OSError, ValueError):
        info = {}
    me, coordinator = info.get("process"), info.get("coordinator")
    if me not in (None, 0) and coordinator and not coordinator_answers(coordinator):
        print(f"error: process {me} lost process 0 (the coordinator at {coordinator}, which runs JAX's coordination "
              f"service, no longer answers; JAX ended this process with {signal.Signals(sig).name}); restart every "
              "process with the same command to resume from the last checkpoint", file=sys.stderr, flush=True)
        return 1
    name = signal.Signals(sig).name if sig in signal.Signals._value2member_map_ else str(sig)
    who = f"process {me}" if me is not None else "the job"
    print(f"error: {who} was ended by {name} (see the messages above)", file=sys.stderr, flush=True)
    return 128 + sig


def coordinator_answers(address: str, timeout_s: float = 3.0) -> bool:
    """A TCP connection to ``host:port`` opens within ``timeout_s``."""
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=timeout_s):
            return True
    except (OSError, ValueError):
        return False


def child_started() -> None:
    """In the child, first thing: die with the parent."""
    if in_child():
        _die_with_parent()


def child_joined(process_index: int, coordinator: Optional[str]) -> None:
    """In the child, once the cluster is joined: tell the parent who this process is."""
    path = os.environ.get(CHILD_ENV)
    if not path:
        return
    try:
        with open(path, "w") as f:
            json.dump({"process": process_index, "coordinator": coordinator}, f)
    except OSError:
        pass


def _die_with_parent() -> None:
    """``prctl(PR_SET_PDEATHSIG, SIGKILL)`` (Linux): a parent killed with SIGKILL takes the job with it."""
    if not sys.platform.startswith("linux"):
        return
    import ctypes

    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        return
    if str(os.getppid()) != os.environ.get(PARENT_ENV, str(os.getppid())):
        os._exit(1)  # the parent died before prctl took effect


__all__ = ["child_joined", "child_started", "cli_module", "coordinator_answers", "supervised"]
