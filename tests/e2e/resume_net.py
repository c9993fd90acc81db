"""Loopback "network" for the resumable tunnel's tests: every connection between
the two peers goes through a small proxy that can kill it (an RST to both
ends, via SO_LINGER 0) or turn it into a black hole (nothing crosses any more,
both ends stay up), and a path manager that gives the tunnel a new connection
whenever one side asks for it (NeedPath)."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any

from nopf_web.tunnel.resumable import ResumableChannel
from nopf_web.tunnel.resume_machine import NeedPath, PathKind, ResumeEvent
from tests.loopback import tcp_pair

_LINGER_RST = struct.pack("ii", 1, 0)


class Link:
    """One TCP connection A <-> proxy <-> B."""

    def __init__(self, net: Network, kind: PathKind) -> None:
        self.kind: PathKind = kind
        self.a, self._pa = tcp_pair()  # peer A's socket, the proxy's end towards A
        self._pb, self.b = tcp_pair()
        self.frozen = asyncio.Event()
        self.carried = 0
        self._carrying = asyncio.Event()  # set whenever bytes crossed
        for s in (self._pa, self._pb):
            s.setblocking(False)
        self._tasks = [
            net.tasks.create_task(self._copy(self._pa, self._pb), name=f"link-{kind}-a>b"),
            net.tasks.create_task(self._copy(self._pb, self._pa), name=f"link-{kind}-b>a"),
        ]

    async def _copy(self, src: socket.socket, dst: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError):
            while data := await loop.sock_recv(src, 1 << 18):
                if self.frozen.is_set():  # a black hole: no FIN, no RST, nothing
                    await asyncio.Future()
                await loop.sock_sendall(dst, data)
                self.carried += len(data)
                self._carrying.set()
            with contextlib.suppress(OSError):
                dst.shutdown(socket.SHUT_WR)

    async def until_carried(self, at_least: int) -> None:
        while self.carried < at_least:
            self._carrying.clear()
            await self._carrying.wait()

    def freeze(self) -> None:
        self.frozen.set()

    async def reset(self) -> None:
        """Kill the connection: both peers get an RST."""
        for t in self._tasks:
            t.cancel()
        await asyncio.wait(self._tasks)
        for s in (self._pa, self._pb):
            with contextlib.suppress(OSError):
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
            s.close()

    async def stop(self) -> None:
        await self.reset()
        for s in (self.a, self.b):
            s.close()


@dataclass
class Network:
    tasks: asyncio.TaskGroup
    links: list[Link] = field(default_factory=list)

    def link(self, kind: PathKind = "public") -> Link:
        link = Link(self, kind)
        self.links.append(link)
        return link


@contextlib.asynccontextmanager
async def network() -> AsyncIterator[Network]:
    async with asyncio.TaskGroup() as tasks:
        net = Network(tasks)
        try:
            yield net
        finally:
            for link in net.links:
                await link.stop()


@dataclass
class Peer:
    """One side's channel and what it heard."""

    channel: ResumableChannel
    need: asyncio.Event  # shared: a side asked for a new path
    events: list[tuple[float, ResumeEvent]] = field(default_factory=list)
    news: asyncio.Event = field(default_factory=asyncio.Event)

    def on_event(self, event: ResumeEvent) -> None:
        self.events.append((time.monotonic(), event))
        self.news.set()
        if isinstance(event, NeedPath):
            self.need.set()

    async def until(self, done: Callable[[], bool]) -> None:
        """Until ``done()``, checked after each event this side hears."""
        while not done():
            self.news.clear()
            await self.news.wait()

    def of(self, kind: type) -> list[ResumeEvent]:
        return [e for _, e in self.events if isinstance(e, kind)]

    def when(self, kind: type) -> list[float]:
        return [t for t, e in self.events if isinstance(e, kind)]


def peers(code: str = "7-orbit-lantern", **options: Any) -> tuple[Peer, Peer]:
    need = asyncio.Event()
    a = Peer(None, need)  # type: ignore[arg-type]
    b = Peer(None, need)  # type: ignore[arg-type]
    a.channel = ResumableChannel("server", code=code, on_event=a.on_event, name="a", **options)
    b.channel = ResumableChannel("client", code=code, on_event=b.on_event, name="b", **options)
    return a, b


async def connect(net: Network, a: Peer, b: Peer, kind: PathKind = "public", *,
                  first: bool = False) -> Link:
    """A new link, added on both sides at once (as after a rendezvous)."""
    link = net.link(kind)
    async with asyncio.timeout(15):
        await asyncio.gather(a.channel.add_path(link.a, kind, first=first),
                             b.channel.add_path(link.b, kind, first=first))
    return link


async def path_manager(net: Network, a: Peer, b: Peer, kind: PathKind = "public") -> None:
    """Whenever a side asks for a path, a new link (both sides at once)."""
    while True:
        await a.need.wait()
        a.need.clear()
        await connect(net, a, b, kind)
        async with asyncio.timeout(5):  # the follower moves when SELECT arrives
            await b.until(lambda: b.channel.kind is not None)
        a.need.clear()  # the other side's request was for the same loss
