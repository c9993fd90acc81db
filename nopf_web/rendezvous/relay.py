"""The relay's copier: two joined connections, bytes copied both ways, never read.

:class:`RelayLink` is what ``nopf-server`` does with a relay session once its
machine has joined the two sides (:class:`~nopf_web.rendezvous.server_machine.StartRelay`):
one OS thread per direction with blocking sockets, as in :mod:`nopf_web.tunnel.pipe`
(whose copy loops this uses, with a rate limit added): on Linux the bytes move
with ``os.splice`` through a kernel pipe, so they never enter Python at all; else
``recv_into`` one reusable buffer and ``sendall``. Nothing is parsed, nothing
added: each side first gets the machine's ``greeting`` (the ``relayed`` frame),
then exactly the other side's bytes. EOF in one direction becomes
``shutdown(SHUT_WR)`` on the other (half-close works end to end); an error in
either (a reset, a timeout) resets both, so each peer sees its path break the
way a direct connection would. :meth:`RelayLink.stop` ends it from any thread.

The rate limit is a :class:`TokenBucket` both directions draw from (the
session's total, as a VPS bills its traffic), checked before each read; a read
takes at most what the bucket allows (at least one quantum), so the rate holds
within one quantum over any interval.
"""

from __future__ import annotations

import contextlib
import errno
import os
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from nopf_web.sockets import LINGER_RESET
from nopf_web.tunnel.pipe import copy_buffer, copy_method, copy_splice

CHUNK = 1 << 20  # bytes per splice/recv at most
# The kernel pipe of a splice direction: bytes moved per pair of splice calls. The
# relay's CPU per GB in the lab (bench/scn_relay.py): 0.69 s with the default 64 KiB,
# 0.35 with 256 KiB, 0.28-0.33 with 1 MiB. An unprivileged user's pipes share
# fs.pipe-user-pages-soft (64 MiB by default; past it, new pipes get 8 KiB): at
# 256 KiB the default 64 sessions (128 pipes) take 32 MiB of it.
PIPE_SIZE = 256 * 1024
QUANTUM_MIN = 16 * 1024  # bytes: the smallest read a rate-limited direction waits for
BURST_SECONDS = 0.25  # a limited session may send this long at full speed after idling


class TokenBucket:
    """``rate`` bytes/s with a burst of ``burst`` bytes; shared by threads.

    :meth:`allowance` waits until the balance is positive and says how much the
    next read may take; :meth:`spend` debits what it took (the balance may go
    below zero by at most one read: the next wait is that much longer).
    """

    def __init__(self, rate: float, burst: float | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if rate <= 0:
            raise ValueError("a token bucket needs a positive rate")
        self.rate = rate
        self.quantum = int(max(QUANTUM_MIN, rate / 100))  # <= ~100 wake-ups/s
        self.burst = max(float(self.quantum), burst if burst is not None
                         else rate * BURST_SECONDS)
        self._clock = clock
        self._lock = threading.Lock()
        self._balance = float(self.quantum)  # the first read goes at once
        self._at = clock()

    def _refill(self) -> float:
        now = self._clock()
        self._balance = min(self.burst, self._balance + (now - self._at) * self.rate)
        self._at = now
        return self._balance

    def allowance(self, stopped: threading.Event) -> int:
        """Bytes the next read may take (>= 1), after waiting as needed; 0: stopped."""
        while True:
            with self._lock:
                balance = self._refill()
                if balance > 0:
                    return max(self.quantum, int(balance))
                wait = -balance / self.rate
            if stopped.wait(wait):
                return 0

    def spend(self, n: int) -> None:
        with self._lock:
            self._refill()
            self._balance -= n


@dataclass
class RelayOutcome:
    """How a relay session ended."""

    a_to_b: int = 0  # bytes copied from side a (the sharer's) to side b
    b_to_a: int = 0
    error: str | None = None  # the socket error that ended it (both sides were reset)
    stopped: bool = False  # ended by stop()


class RelayLink:
    """Copy between connected sockets ``a`` and ``b`` until both directions end.

    Owns and closes both sockets. ``on_end`` is called once, from the last copy
    thread to finish, with the :class:`RelayOutcome` (a driver hands it to its
    event loop with ``call_soon_threadsafe``).
    """

    def __init__(self, a: socket.socket, b: socket.socket, *, greeting: bytes = b"",
                 rate: float = 0.0, name: str = "relay",
                 on_end: Callable[[RelayOutcome], None] | None = None,
                 copy: str | None = None) -> None:
        self.a, self.b = a, b
        self.name = name
        self.greeting = greeting
        self.bucket = TokenBucket(rate) if rate > 0 else None
        self.outcome = RelayOutcome()
        self.copy = copy or copy_method()
        self._use_splice = self.copy == "splice" and hasattr(os, "splice")
        self._on_end = on_end
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._running = 2
        self._closed = False
        self._threads = [
            threading.Thread(target=self._direction, args=(src, dst), daemon=True,
                             name=f"{name}-{src}>{dst}")
            for src, dst in (("a", "b"), ("b", "a"))]

    def start(self) -> None:
        for s in (self.a, self.b):
            s.setblocking(True)
        for t in self._threads:
            t.start()

    def stop(self) -> None:
        """End both directions now (from any thread); both sides see a reset."""
        with self._lock:
            self.outcome.stopped = True
        self._stopped.set()
        self._break()

    def join(self, timeout: float) -> bool:
        """Wait up to ``timeout`` s in all for both threads; True if both ended."""
        deadline = time.monotonic() + timeout
        for t in self._threads:
            if t.is_alive():
                t.join(max(0.0, deadline - time.monotonic()))
        return not any(t.is_alive() for t in self._threads)

    def _break(self) -> None:
        """Reset both connections: blocked copies return at once, peers see RST (after
        a FIN: shutdown is what wakes a blocked splice; the close then resets)."""
        with self._lock:  # never on a descriptor _finished closed (it could be reused)
            if self._closed:
                return
            for s in (self.a, self.b):
                with contextlib.suppress(OSError):
                    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)

    def _direction(self, src_name: str, dst_name: str) -> None:
        src: socket.socket = getattr(self, src_name)
        dst: socket.socket = getattr(self, dst_name)
        attr = f"{src_name}_to_{dst_name}"

        def spend(n: int) -> None:
            if self.bucket is not None:
                self.bucket.spend(n)
            setattr(self.outcome, attr, getattr(self.outcome, attr) + n)

        try:
            if self.greeting:
                dst.sendall(self.greeting)  # before any of the other side's bytes
            if self._use_splice:
                copy_splice(src, dst, spend, limit=self._limit, pipe_size=PIPE_SIZE)
            else:
                copy_buffer(src, dst, spend, limit=self._limit)
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)  # the half-close, passed on
        except OSError as exc:
            with self._lock:
                if (self.outcome.error is None and not self.outcome.stopped
                        and exc.errno != errno.EBADF):
                    self.outcome.error = f"{exc.strerror or exc} ({src_name}>{dst_name})"
            self._stopped.set()
            self._break()
        finally:
            self._finished()

    def _finished(self) -> None:
        with self._lock:
            self._running -= 1
            if self._running:
                return
            self._closed = True
            for s in (self.a, self.b):
                s.close()
        if self._on_end is not None:
            self._on_end(self.outcome)

    def _limit(self) -> int:
        if self.bucket is None:
            return CHUNK
        return min(CHUNK, self.bucket.allowance(self._stopped))
