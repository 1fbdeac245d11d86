"""Host side of the warm executor: one zygote process per worker (see ``zygote.py`` for what runs
inside the sandbox and why an execution cannot reach it), its socket protocol, and the output pipes
of one execution.

A zygote that exits, stops answering or breaks the protocol is killed (its whole bubblewrap tree)
and a new one is started for the next execution.
"""

from __future__ import annotations

import array
import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
from pathlib import Path
from typing import Optional

ZYGOTE_SOURCE = (Path(__file__).with_name("zygote.py")).read_text()


class ZygoteDied(RuntimeError):
    """The zygote exited or its socket closed."""


class Zygote:
    """One worker's zygote: a long-lived interpreter inside the worker's sandbox that forks executions."""

    def __init__(self, argv: list[str], env: dict[str, str], start_timeout: float = 300.0, umask: int = 0o022):
        self.argv, self.env, self.start_timeout, self.umask = argv, env, start_timeout, umask
        self.proc: Optional[subprocess.Popen] = None
        self.sock: Optional[socket.socket] = None
        self._buf = b""
        self.starts = 0  # how many times a zygote was started for this worker
        self.missing: list[str] = []  # preload modules the interpreter could not import

    @property
    def pid(self) -> Optional[int]:
        """Host pid of the sandbox process tree's root (bubblewrap)."""
        return self.proc.pid if self.proc is not None else None

    def alive(self) -> bool:
        return self.proc is not None and self.sock is not None and self.proc.poll() is None

    async def ensure(self) -> None:
        """Start the zygote unless it is running; wait until it has imported its modules."""
        if self.alive():
            return
        self.stop()
        parent, child = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            # stdout to /dev/null, stderr to ours: the zygote itself writes nothing unless it fails
            self.proc = subprocess.Popen(self.argv, stdin=child, stdout=subprocess.DEVNULL, env=self.env, cwd="/",
                                         start_new_session=True, umask=self.umask)
        finally:
            child.close()
        parent.setblocking(False)
        self.sock, self._buf = parent, b""
        self.starts += 1
        try:
            msg = await asyncio.wait_for(self.reply(), self.start_timeout)
        except (asyncio.TimeoutError, ZygoteDied, OSError, ValueError) as e:
            self.stop()
            raise ZygoteDied(f"the sandbox zygote did not start: {type(e).__name__}: {e}") from None
        if not msg.get("ready"):
            self.stop()
            raise ZygoteDied(f"the sandbox zygote did not start: {msg}")
        self.missing = list(msg.get("missing", []))

    async def reply(self) -> dict:
        """The zygote's next JSON line."""
        loop = asyncio.get_running_loop()
        while b"\n" not in self._buf:
            chunk = await loop.sock_recv(self.sock, 65536)
            if not chunk:
                raise ZygoteDied("the sandbox zygote exited")
            self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    async def send(self, request: dict, fds: list[int]) -> None:
        """One execution request with the write ends of its stdout and stderr pipes attached."""
        body = json.dumps(request).encode()
        # 4 bytes into an idle socket never block; the descriptors travel with them (SCM_RIGHTS)
        self.sock.sendmsg([struct.pack("!I", len(body))], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        await asyncio.get_running_loop().sock_sendall(self.sock, body)

    def kill_run(self) -> None:
        """Ask the zygote to kill the running execution (it answers with the usual reply)."""
        try:
            self.sock.send(b"k")
        except OSError:
            pass

    def stop(self) -> None:
        """Kill the zygote and everything in its sandbox."""
        if self.sock is not None:
            try:  # a read still registered on this descriptor would steal the next zygote's messages
                asyncio.get_running_loop().remove_reader(self.sock.fileno())
            except RuntimeError:  # no running loop: nothing registered
                pass
            self.sock.close()
            self.sock = None
        if self.proc is not None:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
            self.proc = None


async def drain(fd: int, cap: int, over: asyncio.Event) -> bytes:
    """Read a non-blocking pipe to EOF keeping the first ``cap`` bytes; set ``over`` past the cap
    (and keep reading, so the writer never blocks). Closes ``fd``."""
    loop = asyncio.get_running_loop()
    buf = bytearray()
    eof = loop.create_future()

    def on_readable() -> None:
        while True:
            try:
                chunk = os.read(fd, 1 << 16)
            except BlockingIOError:
                return
            except OSError:
                chunk = b""
            if not chunk:
                loop.remove_reader(fd)
                if not eof.done():
                    eof.set_result(None)
                return
            if len(buf) < cap:
                buf.extend(chunk[: cap - len(buf)])
            if len(buf) >= cap:
                over.set()

    loop.add_reader(fd, on_readable)
    try:
        await eof
    finally:
        loop.remove_reader(fd)
        os.close(fd)
    return bytes(buf)


def pipe() -> tuple[int, int]:
    """(non-blocking read end, write end), both close-on-exec."""
    r, w = os.pipe2(os.O_CLOEXEC)
    os.set_blocking(r, False)
    return r, w
