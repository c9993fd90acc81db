"""The open live streams (server-sent events): counted, capped, and ended at shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator

from aiohttp import web

log = logging.getLogger("nopf.web")


class LiveStreams:
    """At most ``limit`` streams at once; :meth:`close` tells them all to end.

    Each stream's handler holds a :meth:`slot` while it streams, and waits for
    its next round with :meth:`pause`, which returns at once when the app
    shuts down. aiohttp waits for its handlers before the app's clean-up, so
    without this an open page would hold the shutdown for its whole timeout.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._closing = asyncio.Event()
        self._open: set[asyncio.Task[object]] = set()
        self._idle = asyncio.Event()
        self._idle.set()

    def __len__(self) -> int:
        return len(self._open)

    @property
    def closing(self) -> bool:
        return self._closing.is_set()

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        """Count the calling handler as a stream while the block runs; 503 if none is free."""
        if self.closing:
            raise web.HTTPServiceUnavailable(text="the dashboard is shutting down")
        if len(self._open) >= self.limit:
            raise web.HTTPServiceUnavailable(
                text=f"{self.limit} live pages are already open: close some, or reload later")
        task = asyncio.current_task()
        assert task is not None
        self._open.add(task)
        self._idle.clear()
        try:
            yield
        finally:
            self._open.discard(task)
            if not self._open:
                self._idle.set()

    async def pause(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if the app starts shutting down."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._closing.wait()

    async def close(self, timeout: float) -> None:
        """Tell every stream to end, and wait (at most ``timeout``) until they have."""
        self._closing.set()
        try:
            async with asyncio.timeout(timeout):
                await self._idle.wait()
        except TimeoutError:
            log.warning("%d live stream(s) still open %g s after the shutdown began",
                        len(self._open), timeout)
