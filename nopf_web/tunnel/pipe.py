"""The plain pipe: copy bytes both ways between two connected TCP sockets.

One OS thread per direction with blocking sockets: on Linux the bytes move
with ``os.splice`` through a kernel pipe (zero-copy, no Python buffer), else
with ``recv_into`` on one reusable 1 MiB buffer. EOF on one side becomes
``shutdown(SHUT_WR)`` on the other, so half-closed connections keep working;
the pipe ends when both directions have ended. An error in either direction
(e.g. the peer's RST) stops both and is reported.

Threads rather than the event loop: a copy loop in C (splice) releases the
GIL and measured several times faster than asyncio streams; the event loop
only waits on a future.

``NOPF_PIPE_COPY`` picks the method: ``splice`` (default on Linux) or
``buffer`` (portable loop). (A kernel-side BPF sockmap redirect was tried and
removed: it measured slower than splice; see docs/BENCHMARKS.md.)
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import socket
import sys
import threading
from collections.abc import Callable
from dataclasses import dataclass, field

CHUNK = 1 << 20
_F_SETPIPE_SZ = 1031
COPY_METHODS = ("splice", "buffer")
_log = logging.getLogger(__name__)


def copy_method() -> str:
    """The method NOPF_PIPE_COPY asks for; splice where the OS has it, else buffer."""
    wanted = os.environ.get("NOPF_PIPE_COPY", "splice")
    if wanted not in COPY_METHODS:
        wanted = "splice"
    if wanted == "splice" and not hasattr(os, "splice"):
        return "buffer"
    return wanted


@dataclass
class Counters:
    """Bytes moved; written by the copy threads, read by anyone (ints are atomic)."""

    a_to_b: int = 0
    b_to_a: int = 0


@dataclass
class PipeResult:
    error: OSError | None = None
    error_side: str | None = None  # "a" or "b": the side whose socket failed
    counters: Counters = field(default_factory=Counters)


def _errside(exc: OSError, reading: str, writing: str) -> str:
    """Which socket an error came from: splice/recv errors are the reader's."""
    return reading if getattr(exc, "_nopf_read", False) else writing


def _no_limit() -> int:
    return CHUNK


def copy_splice(src: socket.socket, dst: socket.socket, add: Callable[[int], None], *,
                limit: Callable[[], int] = _no_limit, pipe_size: int = CHUNK) -> None:
    """Copy ``src`` to ``dst`` through a kernel pipe (Linux): the bytes never enter
    Python. Each read takes at most ``limit()`` bytes (0 stops); ``add(n)`` counts
    what was written. Ends at EOF; a read error is marked as the reader's."""
    if sys.platform != "linux":  # never chosen there: os.splice is Linux's
        raise NotImplementedError("splice is Linux-only")
    rfd, wfd = os.pipe()
    try:
        with contextlib.suppress(OSError):
            import fcntl

            fcntl.fcntl(wfd, _F_SETPIPE_SZ, pipe_size)
        sfd, dfd = src.fileno(), dst.fileno()
        while (most := limit()) > 0:
            try:
                n = os.splice(sfd, wfd, most, flags=os.SPLICE_F_MOVE)
            except OSError as exc:
                exc._nopf_read = True  # type: ignore[attr-defined, unused-ignore]
                raise
            if n == 0:
                return
            left = n
            while left:
                left -= os.splice(rfd, dfd, left, flags=os.SPLICE_F_MOVE)
            add(n)
    finally:
        os.close(rfd)
        os.close(wfd)


def copy_buffer(src: socket.socket, dst: socket.socket, add: Callable[[int], None], *,
                limit: Callable[[], int] = _no_limit) -> None:
    """:func:`copy_splice` anywhere: ``recv_into`` one reusable buffer, ``sendall``."""
    buf = bytearray(CHUNK)
    view = memoryview(buf)
    while (most := limit()) > 0:
        try:
            n = src.recv_into(buf, most)
        except OSError as exc:
            exc._nopf_read = True  # type: ignore[attr-defined]
            raise
        if n == 0:
            return
        dst.sendall(view[:n])
        add(n)


class _Adder:
    def __init__(self, counters: Counters, attr: str) -> None:
        self._counters = counters
        self._attr = attr

    def __call__(self, n: int) -> None:
        setattr(self._counters, self._attr, getattr(self._counters, self._attr) + n)


class Pipe:
    """Pipe sockets ``a`` and ``b`` until both directions end; owns and closes both."""

    def __init__(self, a: socket.socket, b: socket.socket, *, name: str = "pipe",
                 use_splice: bool | None = None, copy: str | None = None) -> None:
        self.a, self.b = a, b
        self.name = name
        self.counters = Counters()
        if copy is None:
            copy = copy_method() if use_splice is None else ("splice" if use_splice else "buffer")
        self.copy = copy  # the method asked for; after run(), the one used
        self._use_splice = copy != "buffer" and hasattr(os, "splice")
        self._lock = threading.Lock()
        self._result = PipeResult(counters=self.counters)
        self._stopping = False

    def stop(self) -> None:
        """Abort both directions (from any thread)."""
        self._stopping = True
        for s in (self.a, self.b):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)

    async def run(self) -> PipeResult:
        loop = asyncio.get_running_loop()
        remaining = 2
        finished: asyncio.Future[None] = loop.create_future()

        def one_done() -> None:
            nonlocal remaining
            remaining -= 1
            if remaining == 0 and not finished.done():
                finished.set_result(None)

        for s in (self.a, self.b):
            s.setblocking(True)
        threads = [
            threading.Thread(target=self._direction, name=f"{self.name}-{src}>{dst}",
                             args=(src, dst, loop, one_done), daemon=True)
            for src, dst in (("a", "b"), ("b", "a"))
        ]
        for t in threads:
            t.start()
        try:
            await asyncio.shield(finished)
        except asyncio.CancelledError:
            self.stop()
            await asyncio.shield(finished)
            raise
        finally:
            for s in (self.a, self.b):
                s.close()
        return self._result

    def _direction(self, src_name: str, dst_name: str, loop: asyncio.AbstractEventLoop,
                   done: object) -> None:
        src: socket.socket = getattr(self, src_name)
        dst: socket.socket = getattr(self, dst_name)
        add = _Adder(self.counters, f"{src_name}_to_{dst_name}")
        try:
            (copy_splice if self._use_splice else copy_buffer)(src, dst, add)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # propagate the half-close
        except OSError as exc:
            if not self._stopping:
                with self._lock:
                    if self._result.error is None and exc.errno not in (errno.EBADF,):
                        self._result.error = exc
                        self._result.error_side = _errside(exc, src_name, dst_name)
            self.stop()
        finally:
            assert callable(done)
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(done)
