"""nopf-server: the rendezvous service (address discovery, seed-compatible).

On every accepted connection it writes the seed's 10-byte discovery reply
(see :mod:`nopf_web.wire.discovery`) without reading anything, then closes.
Anything the client sends is never read: garbage cannot confuse it.

Defences against hostile clients, all bounded:
- a global cap on open connections and a per-source-address cap, so a flood
  from one address cannot starve others; refused connections are reset at once;
- a write deadline per connection, so a client that never reads cannot pin
  a connection (10 bytes fit any socket buffer, but the close may not);
- problem logging is rate-limited per kind, one line per problem.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass, field

from nopf_web.wire.discovery import encode_reply

log = logging.getLogger("nopf.rendezvous")

DEFAULT_PORT = 3012


@dataclass(frozen=True)
class ServerLimits:
    max_connections: int = 4096
    max_per_source: int = 64
    write_timeout: float = 5.0
    log_interval: float = 10.0  # at most one line per problem kind per interval


@dataclass
class ServerStats:
    served: int = 0
    refused_flood: int = 0
    refused_capacity: int = 0
    failed: int = 0
    open_now: int = 0


@dataclass
class _ProblemLog:
    """One log line per problem kind per interval, with a count of the repeats."""

    interval: float
    _last: dict[str, float] = field(default_factory=dict)
    _suppressed: Counter[str] = field(default_factory=Counter)

    def problem(self, kind: str, message: str) -> None:
        now = time.monotonic()
        if now - self._last.get(kind, -1e9) < self.interval:
            self._suppressed[kind] += 1
            return
        extra = self._suppressed.pop(kind, 0)
        suffix = f" (and {extra} more like it)" if extra else ""
        self._last[kind] = now
        log.warning("%s%s", message, suffix)


class RendezvousServer:
    """Serve discovery replies; start with :meth:`start`, stop with :meth:`close`."""

    def __init__(
        self, host: str = "0.0.0.0", port: int = DEFAULT_PORT, limits: ServerLimits | None = None
    ) -> None:
        self.host = host
        self.port = port
        self.limits = limits or ServerLimits()
        self.stats = ServerStats()
        self._per_source: Counter[str] = Counter()
        self._server: asyncio.Server | None = None
        self._problems = _ProblemLog(self.limits.log_interval)

    @property
    def address(self) -> tuple[str, int]:
        """The bound address (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    async def start(self) -> None:
        self._server = await asyncio.start_server(
            self._handle, self.host, self.port, reuse_address=True, backlog=1024
        )

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            # Handlers finish within write_timeout; don't wait on stuck clients forever.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._server.wait_closed(), self.limits.write_timeout + 1)
            self._server = None

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        await self._server.serve_forever()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        source = str(peer[0]) if peer else "?"
        self.stats.open_now += 1
        self._per_source[source] += 1
        try:
            if self.stats.open_now > self.limits.max_connections:
                self.stats.refused_capacity += 1
                self._problems.problem(
                    "capacity", f"refused {source}: {self.limits.max_connections} connections open"
                )
                _reset(writer)
                return
            if self._per_source[source] > self.limits.max_per_source:
                self.stats.refused_flood += 1
                self._problems.problem(
                    "flood",
                    f"refused {source}: over {self.limits.max_per_source} open connections "
                    "from one address",
                )
                _reset(writer)
                return
            await self._reply(peer, writer)
        finally:
            self.stats.open_now -= 1
            self._per_source[source] -= 1
            if self._per_source[source] <= 0:
                del self._per_source[source]

    async def _reply(self, peer: tuple[str, int] | None, writer: asyncio.StreamWriter) -> None:
        try:
            if peer is None:
                raise ConnectionError("connection closed before it could be served")
            ip = str(peer[0]).removeprefix("::ffff:")  # IPv4-mapped on a dual-stack socket
            writer.write(encode_reply(ip, int(peer[1])))
            writer.close()
            await asyncio.wait_for(writer.wait_closed(), self.limits.write_timeout)
            self.stats.served += 1
        except TimeoutError:
            self.stats.failed += 1
            self._problems.problem(
                "timeout",
                f"gave up on {_fmt(peer)}: reply not delivered within "
                f"{self.limits.write_timeout} s",
            )
            _reset(writer)
        except (OSError, ValueError) as exc:
            self.stats.failed += 1
            self._problems.problem("error", f"could not serve {_fmt(peer)}: {exc}")
            _reset(writer)


def _fmt(peer: tuple[str, int] | None) -> str:
    return f"{peer[0]}:{peer[1]}" if peer else "?"


def _reset(writer: asyncio.StreamWriter) -> None:
    """Drop a connection with RST: no FIN handshake, no TIME_WAIT, no buffered data."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()
