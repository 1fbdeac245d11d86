"""Nothing one execution does survives into the next one on the same worker (warm and cold alike), an
execution cannot reach its zygote, and a zygote that dies is replaced."""

import asyncio
import os
import signal
import time

import pytest
from test_local import host_processes_matching, sandbox_processes_left

from sod_jax.sandbox import LocalSandbox, LocalSandboxConfig, run_request


@pytest.fixture(scope="module", params=["warm", "cold"])
def one_worker(request):
    """A single worker, so consecutive executions share it."""
    sb = LocalSandbox(LocalSandboxConfig(mode=request.param, workers=1))
    yield sb
    asyncio.run(sb.close())


def run(sb, code, **kw):
    kw.setdefault("run_timeout", 5)
    r = asyncio.run(sb.run(run_request(code, **kw)))
    assert r["run_result"] is not None, r
    return r


def out(sb, code, **kw):
    r = run(sb, code, **kw)
    assert r["status"] == "Success", r
    return r["run_result"]["stdout"]


def zygote_identity(sb):
    return sb.zygote_pids(), sb.zygote_starts


LEAKS = {
    "module monkeypatched": (
        "import math, numpy, json\nmath.pi = 3\nnumpy.sum = lambda *a, **k: 'patched'\njson.dumps = None\n",
        "import math, numpy, json\nprint(math.pi, numpy.sum([1, 2]), json.dumps(1))\n",
        "3.141592653589793 3 1\n"),
    "global set": (
        "import builtins, sys, types\nbuiltins.LEAK = 1\nsys.modules['leaky'] = types.ModuleType('leaky')\n"
        "sys.path.insert(0, '/leak')\nsys.setrecursionlimit(50)\n",
        "import builtins, sys\nprint(hasattr(builtins, 'LEAK'), 'leaky' in sys.modules, '/leak' in sys.path, "
        "sys.getrecursionlimit() > 50)\n",
        "False False False True\n"),
    "file written": (
        "import os\nopen('leak.txt', 'w').write('x')\nos.mkdir('d')\n"
        "for path in ('/tmp/leak2', '/dev/shm/leak3'):  # writable in warm mode (fresh tmpfs), not in cold\n"
        "    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n",
        "import os\nprint(sorted(os.listdir('.')), os.path.exists('/tmp/leak2'), os.path.exists('/dev/shm/leak3'))\n",
        "['main.py'] False False\n"),
    "signal handler": (
        "import signal\nsignal.signal(signal.SIGTERM, lambda *a: None)\nsignal.signal(signal.SIGINT, signal.SIG_IGN)\n"
        "signal.signal(signal.SIGALRM, lambda *a: None)\nsignal.alarm(1)\n",
        "import signal, time\ntime.sleep(1.5)\nprint(signal.getsignal(signal.SIGTERM) is signal.SIG_DFL, "
        "signal.getsignal(signal.SIGINT) is signal.default_int_handler, "
        "signal.getsignal(signal.SIGALRM) is signal.SIG_DFL)\n",
        "True True True\n"),
    "environment": (
        "import os\nos.environ['LEAK'] = '1'\nos.putenv('LEAK2', '1')\nos.environ['PATH'] = '/leak'\n",
        "import os\nprint(os.environ.get('LEAK'), os.environ.get('LEAK2'), os.environ['PATH'])\n",
        "None None /usr/local/bin:/usr/bin:/bin\n"),
    "background thread": (
        "import threading, time\n"
        "def spin():\n    while True:\n        open('/tmp/sandbox/from_thread', 'a').write('x')\n        time.sleep(0.01)\n"
        "threading.Thread(target=spin, daemon=True).start()\ntime.sleep(0.1)\n",
        "import os, threading, time\ntime.sleep(0.2)\nprint(threading.active_count(), os.path.exists('from_thread'))\n",
        "1 False\n"),
    "standard streams changed": (  # the warm executor's stream objects are built once, in the zygote
        "import io, sys\nsys.stdout.write('unflushed')\nsys.stdout.reconfigure(line_buffering=True, errors='ignore')\n"
        "sys.stdin.close()\nsys.stderr = io.StringIO()\nsys.__stdout__ = None\nimport os\nos._exit(0)\n",
        "import sys\nprint(sys.stdout.line_buffering, sys.stdout.errors != 'ignore', sys.stdin.closed, repr(sys.stdin.read()), "
        "sys.stderr is sys.__stderr__, sys.stdout is sys.__stdout__)\n",
        "False True False '' True True\n"),
}


@pytest.mark.parametrize("leak", list(LEAKS))
def test_state_does_not_leak_into_the_next_execution(one_worker, leak):
    first, second, expected = LEAKS[leak]
    before = zygote_identity(one_worker)
    r = run(one_worker, first)
    assert r["status"] == "Success", r["run_result"]
    assert out(one_worker, second) == expected
    if one_worker.mode == "warm":
        assert zygote_identity(one_worker) == before or before == ({}, 0)  # same zygote served both


def test_every_execution_draws_its_own_random_numbers(one_worker):
    code = "import numpy, random\nprint(numpy.random.randint(1 << 62), numpy.random.rand(), random.getrandbits(64))\n"
    draws = [out(one_worker, code).split() for _ in range(3)]
    for column in zip(*draws):  # numpy's global generator and the random module, each run differently
        assert len(set(column)) == 3, draws


@pytest.mark.parametrize("how", ["daemon", "plain"])
def test_child_processes_do_not_survive(one_worker, how):
    marker = str(800000 + os.getpid() % 1000 + (7 if how == "daemon" else 0))
    if how == "daemon":  # double fork + new session: not in the run's process group any more
        code = (f"import os, subprocess\nif os.fork() == 0:\n    os.setsid()\n"
                f"    subprocess.Popen(['sleep', '{marker}'], start_new_session=True)\n    os._exit(0)\n"
                f"import time\ntime.sleep(0.3)\nprint('parent done')\n")
    else:
        code = f"import subprocess\nsubprocess.Popen(['sleep', '{marker}'])\nprint('parent done')\n"
    assert out(one_worker, code) == "parent done\n"
    time.sleep(0.3)
    assert host_processes_matching(f"sleep {marker}") == []
    assert out(one_worker, "import os\nprint(len([p for p in os.listdir('/proc') if p.isdigit()]) > 0)\n") == "True\n"
    assert sandbox_processes_left(one_worker.cfg) == []


ATTACK = r'''
import ctypes, os, signal
libc = ctypes.CDLL(None, use_errno=True)
me = os.getpid()
hits = []
for pid in range(1, 400):  # every pid this namespace could name
    if pid == me:
        continue
    try:
        os.kill(pid, 0)
        hits.append(('signal', pid))
    except OSError:
        pass
    if libc.ptrace(16, pid, None, None) == 0:  # PTRACE_ATTACH
        hits.append(('ptrace', pid))
outer_me = os.readlink('/proc/self')  # this process's pid in the namespace /proc shows
seen = []
for entry in os.listdir('/proc'):  # every process /proc shows, the zygote included
    if not entry.isdigit() or entry == outer_me:
        continue
    seen.append(entry)
    for name in ('mem', 'environ', 'maps'):
        try:
            with open(f'/proc/{entry}/{name}', 'r+b' if name == 'mem' else 'rb') as f:
                f.read(1)
            hits.append((name, entry))
        except OSError:
            pass
    try:
        fd = os.open(f'/proc/{entry}', os.O_RDONLY | os.O_DIRECTORY)
        if libc.syscall(424, fd, signal.SIGKILL, None, 0) == 0:  # pidfd_send_signal via a /proc dir fd
            hits.append(('pidfd', entry))
        os.close(fd)
    except OSError:
        pass
try:
    os.kill(-1, signal.SIGKILL)  # everything this process may signal, itself excepted
except OSError:
    pass
print('hits', hits)
print('others seen', len(seen) > 0)
'''


def test_execution_cannot_reach_its_zygote(one_worker):
    out(one_worker, "print('warm-up')")
    before = zygote_identity(one_worker)
    r = run(one_worker, ATTACK)
    expected = "hits []\nothers seen True\n" if one_worker.mode == "warm" else "hits []\n"
    assert r["run_result"]["stdout"].startswith(expected), r
    still = out(one_worker, "print('still here')")
    assert still == "still here\n"
    assert zygote_identity(one_worker) == before  # the same zygote, never restarted


def test_dead_zygote_is_replaced():
    sb = LocalSandbox(LocalSandboxConfig(mode="warm", workers=1))
    try:
        assert out(sb, "print(1)") == "1\n"
        (pid,) = sb.zygote_pids().values()
        os.killpg(pid, signal.SIGKILL)
        time.sleep(0.2)
        assert out(sb, "print(2)") == "2\n"  # a new zygote started for this run
        assert sb.zygote_starts == 2 and list(sb.zygote_pids().values()) != [pid]
    finally:
        asyncio.run(sb.close())
    assert sb.zygote_pids() == {}


def test_warm_runs_in_nested_namespaces_without_capabilities():
    sb = LocalSandbox(LocalSandboxConfig(mode="warm", workers=1))
    try:
        code = ("import os\nst = open('/proc/self/status').read()\n"
                "caps = [l.split()[1] for l in st.splitlines() if l.startswith(('CapEff', 'CapPrm', 'CapBnd', 'CapAmb'))]\n"
                "print(os.getpid(), os.getppid(), os.getuid() == os.stat('.').st_uid, set(caps))\n")
        assert out(sb, code) == "1 0 True {'0000000000000000'}\n"
    finally:
        asyncio.run(sb.close())


def test_mode_is_checked():
    with pytest.raises(ValueError, match="'warm' or 'cold'"):
        LocalSandboxConfig(mode="hot")


def test_from_config_passes_mode():
    from sod_jax.config import Config

    cfg = Config()
    assert LocalSandboxConfig.from_config(cfg.sandbox).mode == "warm"
    cfg.sandbox.mode = "cold"
    lc = LocalSandboxConfig.from_config(cfg.sandbox)
    assert (lc.mode, lc.workers, lc.run_timeout) == ("cold", cfg.sandbox.workers, cfg.sandbox.run_timeout)


def test_cancelled_run_frees_its_worker_and_replaces_the_zygote():
    sb = LocalSandbox(LocalSandboxConfig(mode="warm", workers=1))

    async def go():
        assert (await sb.run(run_request("print(1)")))["status"] == "Success"  # the zygote is up
        task = asyncio.ensure_future(sb.run(run_request("import time\ntime.sleep(60)", run_timeout=120)))
        waiting = asyncio.ensure_future(sb.run(run_request("print('next')")))
        await asyncio.sleep(1)
        task.cancel()
        return await asyncio.wait_for(waiting, 300)

    try:
        r = asyncio.run(go())
        assert r["run_result"]["stdout"] == "next\n" and sb.zygote_starts == 2
    finally:
        asyncio.run(sb.close())
