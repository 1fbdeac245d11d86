"""The warm executor's zygote: runs INSIDE the sandbox (bubblewrap namespaces, the worker's uid, no
capabilities, read-only file system), imports the preloaded modules once and then forks one fresh
process per execution.

The host starts it as ``python -E -s -B -c <this file's source> <config JSON>`` (``preload``: modules
to import; ``keep``: the interpreter's directories as the sandbox names them) with a Unix socket
as fd 0 (stdlib only: the repository itself is hidden inside the sandbox). Protocol on the socket:

* host -> zygote: a 4-byte big-endian length with two file descriptors attached (the write ends of
  the execution's stdout and stderr pipes), then that many bytes of JSON: ``code``, ``stdin``,
  ``files`` (path -> base64), ``timeout`` (s), ``cpu_s``, ``memory_mb``, ``nproc``, ``fsize_mb``,
  ``nofile``, ``scratch_mb``, ``env``. During a run the single byte ``k`` asks for it to be killed.
* zygote -> host: one JSON line per message: ``{"ready": ...}`` once, then per execution
  ``{"rc": int, "timeout": bool, "seconds": float}`` (``rc`` negative: killed by that signal), or
  ``{"error": str}`` when the execution could not be set up.

Each execution (why it cannot reach the zygote or leave anything behind):

1. The zygote is non-dumpable (``PR_SET_DUMPABLE 0``): nothing of its uid may ptrace it or open its
   ``/proc/<pid>/mem``, ``environ`` or ``maps``; it is a child subreaper and never runs model code.
2. The execution process is forked straight into new user, mount, pid and IPC namespaces (a raw
   ``clone``; mapping only the worker uid) and is pid 1 of its pid namespace. (Where that clone
   cannot be called, a forked helper unshares the namespaces and forks it.)
   The zygote has no pid in that namespace, so ``kill``, ``ptrace``, ``pidfd_send_signal`` and
   ``process_vm_writev`` cannot name it; when pid 1 exits or is killed the kernel kills every process
   left in the namespace (the tree kill); SysV IPC and POSIX queues die with the IPC namespace.
3. The execution process mounts a fresh size-limited tmpfs on ``/tmp`` (its scratch directory
   ``/tmp/sandbox`` with the request's files and ``main.py``) and on ``/dev/shm``, binds the
   interpreter's directories that those cover back read-only (``keep`` in the config: a venv under
   ``/tmp``; held open before the tmpfs covers them), drops every
   capability (bounding, ambient, effective, permitted), sets its own rlimits (CPU, address space,
   processes, file size, open files, no core), a new session and a fresh ``__main__``, and runs the
   code.
4. What every execution starts with the same is prepared once in the zygote, never per execution
   (a forked process pays for every page it writes: each is copied): the signal dispositions of a
   fresh interpreter and an empty signal mask (whatever the zygote inherited), the stream objects
   of sys.stdin/stdout/stderr on fds 0/1/2 (built while those fds are of the execution's kinds,
   never read or written by the zygote, so each execution gets them unused; the zygote's own
   socket is off fd 0), and ``os.environ`` set to the request's
   environment (only when it differs from the last one; the zygote itself never uses it). Just
   before each fork the zygote reseeds numpy's global generator from the OS, so every execution
   draws its own numbers and none can know the next one's (the random module reseeds itself in
   every fork).

What an execution costs is mostly the kernel's: fork copies the page tables of the preloaded heap,
each page the execution writes is copied, exit frees it all. So the zygote collapses its heap into
2 MB huge pages once after the imports (``_collapse_heap``), binds the ctypes functions the
executions call up front (ctypes builds a function's object on first use), keeps whatever an
execution replaces in ``sys`` referenced (freeing it would write), and an execution writes its files
with raw descriptors and compiles ``main.py`` from the text it just wrote.

Nothing an execution changes (globals, modules, signal handlers, environment, threads, files,
children) exists in the zygote, and the next execution is a fresh fork of the untouched zygote.
"""

import atexit
import base64
import builtins
import ctypes
import errno
import json
import os
import platform
import resource
import select
import signal
import socket
import struct
import sys
import threading
import time
import traceback
import types

CLONE_NEWNS, CLONE_NEWIPC, CLONE_NEWUSER, CLONE_NEWPID = 0x00020000, 0x08000000, 0x10000000, 0x20000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 2, 4, 1 << 14, 1 << 18
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_CAPBSET_DROP, PR_SET_CHILD_SUBREAPER, PR_CAP_AMBIENT = 1, 4, 24, 36, 47
PR_CAP_AMBIENT_CLEAR_ALL = 4
SETUP_FAILED = 125  # exit code of an execution whose set-up failed (its stderr says why)
SETUP_PREFIX = "sod_jax sandbox set-up failed: "
WORKDIR = "/tmp/sandbox"

libc = ctypes.CDLL(None, use_errno=True)
_libc_gil = ctypes.PyDLL(None, use_errno=True)  # calls made holding the GIL, as os.fork does
_SYS_CLONE = {"x86_64": 56, "aarch64": 220, "ppc64le": 120, "s390x": 120}.get(platform.machine())
# ctypes looks a function up (and builds its object) on first use: done here, once, not in every fork
_before_fork = ctypes.pythonapi.PyOS_BeforeFork
_after_fork_parent = ctypes.pythonapi.PyOS_AfterFork_Parent
_after_fork_child = ctypes.pythonapi.PyOS_AfterFork_Child
_raw_syscall = _libc_gil.syscall
_raw_syscall.restype = ctypes.c_long
_raw_syscall.argtypes = [ctypes.c_long] + [ctypes.c_ulong] * 5
_capset = libc.capset


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def _check(ret, what):
    if ret != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{what}: {os.strerror(err)}")


libc.prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
libc.mount.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
MADV_COLLAPSE = 25
HUGE_PAGE = 1 << 21


def _prctl(option, arg):
    return libc.prctl(option, arg, 0, 0, 0)


def _mount_tmpfs(target, options):
    _check(libc.mount(b"tmpfs", target.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options.encode()),
           f"mount tmpfs on {target}")


MS_RDONLY, MS_REMOUNT, MS_BIND = 1, 32, 4096
SCRATCH_MOUNTS = ("/tmp", "/dev/shm")  # what each execution mounts its own empty tmpfs on
_KEEP = ()  # the interpreter's files under SCRATCH_MOUNTS (a venv under /tmp): bound back read-only


def _held_paths(paths):
    """(path, O_PATH descriptor) of each of ``paths`` under a scratch mount, opened before the scratch
    covers it; parents first, none inside another."""
    held = []
    for path in paths:
        if any(path.startswith(m + "/") for m in SCRATCH_MOUNTS) and not any(
                path.startswith(h + "/") for h, _ in held):
            try:
                held.append((path, os.open(path, os.O_PATH | os.O_CLOEXEC)))
            except OSError:
                continue
    return held


def _bind_back(held):
    """Bind each held path back read-only at its place on the fresh scratch tmpfs (the bind keeps
    the read-only flag of bubblewrap's bind it is copied from; checked, and set if it were not)."""
    for path, fd in held:
        parent = os.path.dirname(path)
        os.makedirs(parent, 0o755, exist_ok=True)
        if os.path.isdir(f"/proc/self/fd/{fd}"):
            os.makedirs(path, 0o755, exist_ok=True)
        else:
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
        source = f"/proc/self/fd/{fd}".encode()
        _check(libc.mount(source, path.encode(), None, MS_BIND | MS_REC, None), f"bind {path} back")
        os.close(fd)
        flags = os.statvfs(path).f_flag
        if not flags & os.ST_RDONLY:
            keep = (MS_NOSUID if flags & os.ST_NOSUID else 0) | (MS_NODEV if flags & os.ST_NODEV else 0)
            _check(libc.mount(None, path.encode(), None, MS_REMOUNT | MS_BIND | MS_RDONLY | keep, None),
                   f"make {path} read-only")


_CAPSET_ARGS = (_CapHeader(0x20080522, 0), (_CapData * 2)())  # version 3, this process: all sets empty
_prctl_held = _libc_gil.prctl  # a call too short to be worth releasing the GIL for (~40 of them in a row)
_prctl_held.argtypes = libc.prctl.argtypes


def _drop_capabilities():
    drop = _prctl_held
    for cap in range(64):  # the bounding set first (needs CAP_SETPCAP, which goes last)
        if drop(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            break  # EINVAL: past the last capability this kernel knows
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL)
    _check(_capset(ctypes.byref(_CAPSET_ARGS[0]), _CAPSET_ARGS[1]), "capset")


# -- one execution (runs in the forked processes only) --------------------------------------------

def _clone_into_namespaces():
    """fork() straight into new user, mount, pid and IPC namespaces (the child is pid 1 there): a raw
    clone(2) wrapped in the interpreter's own before/after-fork hooks. Returns 0 in the child, the
    child's pid here, or None if this machine's clone cannot be called this way."""
    if _SYS_CLONE is None:
        return None
    flags = CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC | signal.SIGCHLD
    _before_fork()
    pid = _raw_syscall(_SYS_CLONE, flags, 0, 0, 0, 0)
    if pid == 0:
        _after_fork_child()
        return 0
    err = ctypes.get_errno()
    _after_fork_parent()
    if pid < 0:
        raise OSError(err, f"clone into new namespaces: {os.strerror(err)}")
    return pid


def _id_maps(uid, gid):
    """What a new user namespace's /proc files get: only our own uid and gid, mapped to themselves."""
    return ((b"/proc/self/setgroups", b"deny"), (b"/proc/self/uid_map", b"%d %d 1" % (uid, uid)),
            (b"/proc/self/gid_map", b"%d %d 1" % (gid, gid)))


_ID_MAPS = _id_maps(os.getuid(), os.getgid())  # the zygote's ids: the same for every execution


def _map_own_ids(maps):
    _prctl(PR_SET_DUMPABLE, 1)  # this copy only: its own /proc files must be writable for the id maps
    for path, text in maps:
        fd = os.open(path, os.O_WRONLY)  # raw descriptors: no file objects to build
        try:
            os.write(fd, text)
        finally:
            os.close(fd)


def _helper(req, out_fd, err_fd, report_fd):
    """In the zygote's fork (where a raw clone is not available): new namespaces, then fork the
    execution (pid 1 there) and exit."""
    maps = _id_maps(os.getuid(), os.getgid())
    _check(libc.unshare(CLONE_NEWUSER | CLONE_NEWNS | CLONE_NEWPID | CLONE_NEWIPC), "unshare")
    _map_own_ids(maps)
    pid = os.fork()
    if pid == 0:
        os.close(report_fd)
        try:
            _execution(req, out_fd, err_fd)
        except BaseException as e:  # set-up failed before any model code ran
            try:
                os.write(err_fd, f"{SETUP_PREFIX}{type(e).__name__}: {e}\n".encode())
            finally:
                os._exit(SETUP_FAILED)
    os.write(report_fd, f"{pid}\n".encode())
    os._exit(0)


def _execution(req, out_fd, err_fd):
    """pid 1 of the execution's namespaces: private scratch, no capabilities, own limits; run the code."""
    _check(libc.mount(None, b"/", None, MS_REC | MS_PRIVATE, None), "make mounts private")
    held = _held_paths(_KEEP) if _KEEP else ()
    _mount_tmpfs("/tmp", f"size={int(req['scratch_mb'])}m,mode=0755")
    if os.path.isdir("/dev/shm"):
        _mount_tmpfs("/dev/shm", f"size={int(req['scratch_mb'])}m,mode=1777")
    if held:
        _bind_back(held)
    os.mkdir(WORKDIR, 0o755)
    for rel, content in (req.get("files") or {}).items():
        path = os.path.join(WORKDIR, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_file(path, base64.b64decode(content or ""))
    _write_file(os.path.join(WORKDIR, "main.py"), req["code"].encode("utf-8"))
    if req.get("stdin"):
        stdin_path = "/tmp/.stdin"
        _write_file(stdin_path, req["stdin"].encode())
        in_fd = os.open(stdin_path, os.O_RDONLY)
        os.unlink(stdin_path)  # the open descriptor is all that is left of it
    else:  # nothing to read: the same end of file, without a file to write
        in_fd = os.open(os.devnull, os.O_RDONLY)
    os.chdir(WORKDIR)
    for fd, target in ((in_fd, 0), (out_fd, 1), (err_fd, 2)):
        if fd != target:
            os.dup2(fd, target)
    os.closerange(3, 1 << 20)  # the control socket and everything else of the zygote's
    _drop_capabilities()
    for res, value in ((resource.RLIMIT_CPU, int(req["cpu_s"])), (resource.RLIMIT_AS, int(req["memory_mb"]) << 20),
                       (resource.RLIMIT_NPROC, int(req["nproc"])), (resource.RLIMIT_FSIZE, int(req["fsize_mb"]) << 20),
                       (resource.RLIMIT_NOFILE, int(req["nofile"])), (resource.RLIMIT_CORE, 0)):
        resource.setrlimit(res, (value, value))
    os.setsid()
    # environment and signal dispositions: already the execution's, set in the zygote (_prepare)
    _run_main(os.path.join(WORKDIR, "main.py"), req["code"])


def _write_file(path, data):
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)  # no file object to build
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
    finally:
        os.close(fd)


def _run_main(path, source):
    """Run ``path`` (its text is ``source``) as a fresh ``__main__`` the way ``python path`` would,
    then exit the process."""
    # fds 0/1/2 are now the execution's; the stream objects on them were built by the zygote, never used
    sys.stdin, sys.stdout, sys.stderr = _STDIO
    sys.__stdin__, sys.__stdout__, sys.__stderr__ = _STDIO
    sys.argv = [path]
    sys.path[0] = WORKDIR  # the script's directory
    main = types.ModuleType("__main__")
    main.__file__, main.__builtins__, main.__spec__, main.__loader__ = path, builtins, None, None
    sys.modules["__main__"] = main
    rc = 0
    try:
        code = compile(source, path, "exec")  # the text just written there: no need to read it back
    except SyntaxError as e:
        traceback.print_exception(type(e), e, None)
        code, rc = None, 1
    if code is not None:
        try:
            exec(code, main.__dict__)
        except SystemExit as e:
            rc = _exit_code(e)
        except BaseException as e:  # noqa: BLE001 - the interpreter's top-level handler, minus this frame
            traceback.print_exception(type(e), e, e.__traceback__.tb_next)
            rc = 130 if isinstance(e, KeyboardInterrupt) else 1
    try:
        threading._shutdown()  # join non-daemon threads, as interpreter exit does
        atexit._run_exitfuncs()
    except SystemExit as e:
        rc = _exit_code(e)
    except BaseException:  # noqa: BLE001
        traceback.print_exc()
    for stream in (sys.stdout, sys.stderr):
        try:
            stream.flush()
        except BaseException:  # noqa: BLE001 - a closed or broken pipe: nothing more to say
            pass
    os._exit(rc)


def _exit_code(e):
    if e.code is None:
        return 0
    if isinstance(e.code, int):
        return e.code & 0xFF
    try:
        print(e.code, file=sys.stderr)
    except BaseException:  # noqa: BLE001
        pass
    return 1


# -- the zygote's loop --------------------------------------------------------------------------

_STDIO = None  # (stdin, stdout, stderr) for the executions, built once by _build_stdio
# what an execution replaces in sys, kept referenced here so that no fork frees it (freeing writes)
_REPLACED = (sys.stdin, sys.stdout, sys.stderr, sys.argv)
_ENV = None  # the environment os.environ holds now, as last set for an execution
_MT_KEY = None  # numpy (when preloaded): the buffer the next execution's generator state is drawn into


def _build_stdio():
    """The execution's sys.stdin/stdout/stderr, built once here on fds 0/1/2 (``closefd=False``) while
    those are of the kinds the execution's will be (0 a seekable file, 1 and 2 pipes), so the streams'
    cached properties (seekable, buffer size) are right; the zygote never reads or writes them, so
    every execution starts with them untouched and empty. Returns the three streams."""
    saved = os.dup(1), os.dup(2)
    r, w = os.pipe()
    try:
        os.dup2(w, 1)
        os.dup2(w, 2)
        return (open(0, "r", encoding="utf-8", closefd=False),
                open(1, "w", encoding="utf-8", closefd=False),
                open(2, "w", encoding="utf-8", errors="backslashreplace", buffering=1, closefd=False))
    finally:
        os.dup2(saved[0], 1)
        os.dup2(saved[1], 2)
        for fd in (*saved, r, w):
            os.close(fd)


def _collapse_heap():
    """Best effort: back the zygote's anonymous private memory (the preloaded modules' objects) with
    2 MB huge pages (``MADV_COLLAPSE``, Linux 6.1+). Every fork copies the page tables of this memory
    and every execution's exit frees them: one PMD entry per 2 MB instead of 512 PTEs. A copy-on-write
    fault in a fork then splits only the huge page it touches, back into 4 KB pages, and copies one.
    Only ranges already populated are collapsed; no ``MADV_HUGEPAGE``, so memory faulted in later
    (the executions' own) keeps the system's policy. Any failure (an older kernel: EINVAL; no free
    huge pages: EAGAIN/ENOMEM) leaves the memory as it was; the zygote works the same, only slower.
    Returns the number of ranges collapsed."""
    done = 0
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
    except OSError:
        return 0
    for line in lines:
        parts = line.split()
        if len(parts) < 5 or parts[1] != "rw-p" or (len(parts) > 5 and parts[5] != "[heap]"):
            continue  # file mappings, stacks, vdso: not the interpreter's heap
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        lo, hi = (lo + HUGE_PAGE - 1) & -HUGE_PAGE, hi & -HUGE_PAGE
        if hi > lo and libc.madvise(lo, hi - lo, MADV_COLLAPSE) == 0:
            done += 1
    return done


def _prepare(req):
    """Per execution, in the zygote just before the fork: the request's environment (when it differs
    from the last one) and a fresh numpy generator state (the zygote itself never uses either)."""
    global _ENV
    env = req["env"]
    if env != _ENV:  # the same for every execution of a worker: in practice set once
        os.environ.clear()
        os.environ.update(env)
        _ENV = dict(env)
    if _MT_KEY is not None:  # a state of its own for this execution (every fork would otherwise draw
        # the same numbers): all 624 words of numpy's global Mersenne Twister straight from the OS.
        # (numpy's seed() expands 128 bits from the OS through SeedSequence: ten times the time and
        # twice the pages written, each one a page fault after the previous fork.)
        memoryview(_MT_KEY).cast("B")[:] = os.urandom(_MT_KEY.nbytes)
        sys.modules["numpy"].random.set_state(("MT19937", _MT_KEY, 624))  # 624: regenerate on first draw


def _recv_exact(sock, n):
    buf = bytearray()
    while len(buf) < n:
        chunk = sock.recv(min(n - len(buf), 1 << 20))
        if not chunk:
            return None
        buf += chunk
    return bytes(buf)


def _launch(req, fds):
    """Start one execution; returns (pid of its pid 1 as seen here, None) or (None, error)."""
    global _SYS_CLONE
    _prepare(req)
    if _SYS_CLONE is not None:
        try:
            pid = _clone_into_namespaces()
        except OSError as e:
            if e.errno not in (errno.EINVAL, errno.ENOSYS):
                return None, str(e)
            _SYS_CLONE = None  # fall back to the helper for this and later executions
        else:
            if pid == 0:
                try:
                    _map_own_ids(_ID_MAPS)
                    _execution(req, fds[0], fds[1])
                except BaseException as e:  # set-up failed before any model code ran
                    try:
                        os.write(fds[1], f"{SETUP_PREFIX}{type(e).__name__}: {e}\n".encode())
                    finally:
                        os._exit(SETUP_FAILED)
            for fd in fds:
                os.close(fd)
            return pid, None
    r, w = os.pipe()
    helper = os.fork()
    if helper == 0:
        try:
            os.close(r)
            _helper(req, fds[0], fds[1], w)
        except BaseException as e:  # noqa: BLE001
            os.write(w, f"error {type(e).__name__}: {e}\n".encode())
        os._exit(1)
    os.close(w)
    for fd in fds:
        os.close(fd)
    data = b""
    while chunk := os.read(r, 4096):
        data += chunk
    os.close(r)
    os.waitpid(helper, 0)  # after this the execution's parent is this (sub)reaper
    text = data.decode(errors="replace").strip()
    if not text or not text.split()[0].isdigit():
        return None, text or "the execution helper died"
    return int(text), None


def _serve_one(sock, req, fds):
    t0 = time.monotonic()
    pid, error = _launch(req, fds)
    if error:
        return {"error": error}
    pidfd = os.pidfd_open(pid)
    deadline = t0 + float(req["timeout"])
    timed_out = host_gone = exited = False
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                timed_out = True
                break
            ready = select.select([sock, pidfd], [], [], left)[0]
            if pidfd in ready:
                exited = True
                break
            if sock in ready:
                host_gone = not sock.recv(1)  # b"k": stop the run; b"": the host went away
                break
        if not exited:
            os.kill(pid, signal.SIGKILL)  # pid 1 of its namespace: the kernel kills all of it
        _, status = os.waitpid(pid, 0)
    finally:
        os.close(pidfd)
    while True:  # anything else reparented here
        try:
            if os.waitpid(-1, os.WNOHANG)[0] == 0:
                break
        except ChildProcessError:
            break
    if host_gone:
        sys.exit(0)
    return {"rc": os.waitstatus_to_exitcode(status), "timeout": timed_out, "seconds": time.monotonic() - t0}


def _default_signals():
    """Every signal as a fresh interpreter has it when started with all dispositions at their
    defaults (what the cold executor's launcher gives it): default, except SIGINT (Python's handler)
    and SIGPIPE and SIGXFSZ (ignored by the interpreter); none blocked. Whatever the zygote inherited."""
    for sig in signal.valid_signals():
        if sig in (signal.SIGKILL, signal.SIGSTOP):
            continue
        handler = signal.SIG_IGN if sig in (signal.SIGPIPE, getattr(signal, "SIGXFSZ", None)) else signal.SIG_DFL
        try:
            signal.signal(sig, signal.default_int_handler if sig == signal.SIGINT else handler)
        except (OSError, ValueError):  # the C library's own real-time signals
            pass
    signal.pthread_sigmask(signal.SIG_SETMASK, ())


def main():
    global _STDIO, _MT_KEY, _KEEP
    cfg = json.loads(sys.argv[1])
    _KEEP = tuple(os.path.normpath(p) for p in cfg.get("keep", ()))
    sock = socket.socket(fileno=os.dup(0))  # off fd 0, which becomes /dev/null: see _build_stdio
    sock.setblocking(True)
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.close(null)
    missing = []
    for name in cfg.get("preload", []):
        try:
            __import__(name)
        except Exception as e:  # noqa: BLE001 - a module this interpreter lacks is simply not preloaded
            missing.append(f"{name}: {type(e).__name__}")
    if "numpy" in sys.modules:  # its first seeding is slow (lazy set-up): pay it once, not per execution
        np = sys.modules["numpy"]
        np.random.seed()
        _MT_KEY = np.empty(624, np.uint32)
    _STDIO = _build_stdio()
    _default_signals()  # the executions' dispositions (never changed here)
    import gc

    gc.collect()
    gc.freeze()  # the collector never walks (and so never copies) the preloaded objects in a fork
    _collapse_heap()
    _prctl(PR_SET_DUMPABLE, 0)
    _prctl(PR_SET_CHILD_SUBREAPER, 1)
    _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)
    sock.sendall(json.dumps({"ready": True, "missing": missing}).encode() + b"\n")
    while True:
        head, fds, _, _ = socket.recv_fds(sock, 4, 2)
        if not head:
            return
        if len(head) < 4:
            head += _recv_exact(sock, 4 - len(head)) or b""
        body = _recv_exact(sock, struct.unpack("!I", head)[0]) if len(head) == 4 else None
        if body is None or len(fds) != 2:
            for fd in fds:
                os.close(fd)
            return
        try:
            reply = _serve_one(sock, json.loads(body), fds)
        except Exception as e:  # noqa: BLE001 - report it; the zygote itself stays
            reply = {"error": f"{type(e).__name__}: {e}"}
        sock.sendall(json.dumps(reply).encode() + b"\n")


if __name__ == "__main__":
    main()
