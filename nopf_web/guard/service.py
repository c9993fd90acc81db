"""The packet guard: one pydivert handle and one receive thread per protected window.

:meth:`DivertGuard.protect` (``async with``) opens a handle whose filter
covers exactly one window (our punch port to the peer, or to the rendezvous
during discovery; see :mod:`.filters`), waits until the kernel filter is
attached, and yields. A daemon thread runs pydivert's blocking receive loop
for that handle and simply does not re-inject what it receives: those RST /
FIN+ACK segments are dropped and counted. When the window ends the thread is
woken, drains what was already captured, closes the handle (which detaches
the kernel filter) and is joined before ``protect`` returns, so a FIN sent
after the window (the tunnel's clean close) leaves normally.

Opening a handle takes tens of milliseconds and a join up to a poll interval,
so ``protect`` waits for both in a worker thread (``asyncio.to_thread``): the
event loop keeps serving the dashboard and the other sessions meanwhile. The
receive thread itself is started from the caller's thread, whose network
namespace it inherits (see :mod:`.divert`).

The guard is a supervised background service: :meth:`start` / :meth:`stop`
(or ``async with guard:``) bracket its life; :meth:`stop` ends every open
window and leaves no filter behind. It is also stopped at interpreter exit.
Errors never break a punch: a window that cannot be protected is yielded
unprotected with ``Protection.error`` set, and the guard keeps the message
in :attr:`DivertGuard.last_error`.
"""

from __future__ import annotations

import asyncio
import atexit
import contextlib
import logging
import threading
from collections.abc import AsyncIterator, Callable
from types import TracebackType
from typing import TypeVar

from . import divert
from .base import Protection
from .filters import WindowRule, describe, window_drops, window_filter

__all__ = ["DivertGuard"]

log = logging.getLogger("nopf.guard")

# How long protect() waits for a handle to open before going on unprotected.
OPEN_TIMEOUT = 5.0

T = TypeVar("T")


class _Window(threading.Thread):
    """The receive loop of one window's handle."""

    def __init__(self, guard: DivertGuard, rule: WindowRule, protection: Protection) -> None:
        super().__init__(name=f"nopf-guard-{rule.local_port or 'any'}", daemon=True)
        self.guard = guard
        self.rule = rule
        self.protection = protection
        self.ready = threading.Event()
        self.error: str | None = None
        self._stopping = threading.Event()
        self._handle: divert.Handle | None = None

    def run(self) -> None:
        # This thread was started by the protecting thread and shares its
        # network namespace: the handle attaches to that namespace's interfaces.
        try:
            handle = divert.Handle(window_filter(self.rule))
        except divert.DivertError as exc:
            self.error = str(exc)
            self.ready.set()
            return
        self._handle = handle
        self.ready.set()
        try:
            self._loop(handle)
        except divert.DivertError as exc:
            self.error = str(exc)
            log.warning("guard window %s stopped: %s", self.rule, exc)
        finally:
            handle.close()

    def _loop(self, handle: divert.Handle) -> None:
        while True:
            stopping = self._stopping.is_set()
            try:
                # After stop: take only what is already queued (it is dropped either way,
                # but counted), then close.
                captured = handle.recv(0.0 if stopping else self.guard.poll_interval)
            except divert.HandleShutDown:
                return
            if captured is None:
                if stopping:
                    return
                continue
            seg = captured.segment
            if seg is not None and window_drops(self.rule, seg):
                self.guard._count(self.protection, describe(seg))
            else:
                # Not ours (an inexact kernel pre-filter): pass it on untouched.
                handle.reinject(captured)

    def stop(self) -> None:
        self._stopping.set()
        if self._handle is not None:
            self._handle.wake()
        self.join(self.guard.poll_interval + OPEN_TIMEOUT)


class DivertGuard:
    """The pydivert guard (see the module docstring). Thread-safe."""

    def __init__(self, poll_interval: float = 0.1) -> None:
        self.poll_interval = poll_interval
        self.last_error: str | None = None
        self._lock = threading.Lock()
        self._windows: set[_Window] = set()
        self._dropped = 0
        self._started = False
        self._stopped = False

    # -- status --------------------------------------------------------------

    @property
    def active(self) -> bool:
        return not self._stopped

    @property
    def reason(self) -> str | None:
        return "the guard was stopped" if self._stopped else None

    @property
    def dropped(self) -> int:
        return self._dropped

    @property
    def open_windows(self) -> list[Protection]:
        with self._lock:
            return [w.protection for w in self._windows]

    def _count(self, protection: Protection, what: str) -> None:
        with self._lock:
            protection.dropped += 1
            self._dropped += 1
        log.info("guard dropped %s", what)

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        """Start supervising (idempotent); ``protect`` also starts it on first use."""
        with self._lock:
            if self._started:
                return
            self._started = True
        atexit.register(self.stop)

    def stop(self) -> None:
        """End every open window (detaching its filter); later windows are unprotected."""
        with self._lock:
            self._stopped = True
            windows = list(self._windows)
        for window in windows:
            window.stop()
        with contextlib.suppress(Exception):
            atexit.unregister(self.stop)

    async def __aenter__(self) -> DivertGuard:
        self.start()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await asyncio.to_thread(self.stop)  # joins the open windows' threads

    # -- windows -------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def protect(self, local_port: int,
                      peer: tuple[str, int] | None) -> AsyncIterator[Protection]:
        """Drop our RST / FIN+ACK from ``local_port`` to ``peer`` until the block ends.

        ``local_port`` 0 (not yet chosen) covers every local port to ``peer``.
        Returns once the kernel filter is attached (tens of milliseconds), without
        holding the event loop; a cancellation meanwhile is delivered once the
        window is closed again, so no filter outlives the block.
        """
        protection = Protection(local_port, peer)
        window = self._start_window(protection)
        try:
            if window is not None and not await _in_thread(self._opened, window, protection):
                window = None
            yield protection
        finally:
            if window is not None:
                await _in_thread(self._close, window, protection)

    def _start_window(self, protection: Protection) -> _Window | None:
        """Start the window's receive thread from this thread (its network namespace)."""
        if self._stopped:
            protection.error = "the guard was stopped"
            return None
        self.start()
        try:
            rule = WindowRule(protection.local_port, protection.peer)
        except ValueError as exc:
            protection.error = f"nothing to guard: {exc}"
            return None
        window = _Window(self, rule, protection)
        with self._lock:
            self._windows.add(window)
        window.start()
        return window

    def _opened(self, window: _Window, protection: Protection) -> bool:
        """Wait (blocking) until the window's handle is open; False if it never opens."""
        if not window.ready.wait(OPEN_TIMEOUT) or window.error is not None:
            protection.error = window.error or (
                f"the pydivert handle did not open within {OPEN_TIMEOUT:g} s")
            self.last_error = protection.error
            window.stop()
            with self._lock:
                self._windows.discard(window)
            log.warning("guard window %s unprotected: %s", window.rule, protection.error)
            return False
        protection.guarded = True
        if self._stopped:  # stop() ran while we were opening
            window.stop()
        return True

    def _close(self, window: _Window, protection: Protection) -> None:
        """End the window (blocking: the receive thread is joined, the filter detached)."""
        window.stop()
        with self._lock:
            self._windows.discard(window)
        if window.error and not protection.error:
            protection.error = window.error
            self.last_error = window.error


async def _in_thread(fn: Callable[[_Window, Protection], T], window: _Window,
                     protection: Protection) -> T:
    """``fn(window, protection)`` in a worker thread, awaited to its end even if the caller
    is cancelled meanwhile (a half-opened window must still be closed): the cancellation
    is re-raised once it has ended."""
    work = asyncio.create_task(asyncio.to_thread(fn, window, protection),
                               name=f"guard-{fn.__name__.strip('_')}-{window.rule.local_port}")
    cancelled: asyncio.CancelledError | None = None
    while not work.done():
        try:
            await asyncio.shield(work)
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        work.exception()  # retrieved (if any): the cancellation is what the caller gets
        raise cancelled
    return work.result()
