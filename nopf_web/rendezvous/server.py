"""nopf-server: the rendezvous service (seed discovery, and coordinated mode).

The protocol is :class:`~nopf_web.rendezvous.server_machine.ServerMachine`
(sans-IO: what is sent, when, and what is refused, for every connection). This
module is its asyncio driver, and only that: one :class:`asyncio.Protocol` per
connection hands the machine what the kernel reports (accepts with the
observed address and ``TCP_INFO``, bytes, FINs, losses), one timer delivers
the machine's next deadline, and the machine's actions become writes, FINs,
closes and resets (``SO_LINGER`` 0). Times are read from one clock. The
connection plumbing is :class:`~nopf_web.rendezvous.conn_driver.ConnDriver`,
shared with the NAT doctor's responder.

A relay session the machine joins (:class:`StartRelay`) leaves the event loop:
both sockets are taken out of their transports (a duplicate descriptor keeps
each connection open while asyncio lets go of its own) and handed to a
:class:`~nopf_web.rendezvous.relay.RelayLink` (two copy threads, splice, the
session's rate limit), which reports the end back to the loop, and so to the
machine (:class:`RelayEnded`). :meth:`RendezvousServer.close` stops every
session and joins its threads, bounded.

Defences against hostile clients, all in the machine and all bounded: a global
and a per-source cap on open connections (refused ones are reset at once); a
deadline on every phase of a connection, closes included, so a client that
never reads cannot pin one; one log line per problem kind per interval;
frames of at most 4 KiB, one waiting code per connection, failed claims
limited per source address, codes single-use and expiring.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import sys
import time
from collections.abc import Callable, Sequence
from typing import Protocol

from nopf_web.delegated import Delegated
from nopf_web.sockets import enable_fastopen_server

from .book import NameplateBook
from .conn_driver import ConnDriver, reset_connection
from .relay import RelayLink, RelayOutcome
from .server_machine import (
    Action,
    AskBook,
    ConnId,
    Event,
    LastWord,
    PollNode,
    RelayEnded,
    RelayId,
    ServerLimits,
    ServerMachine,
    ServerStats,
    Shutdown,
    StartRelay,
    StopRelay,
    ToNode,
)
from .shared import BookOp, NodeId, NodeMessage

__all__ = ["DEFAULT_HOSTS", "DEFAULT_PORT", "RendezvousServer", "ServerLimits", "ServerStats",
           "fastopen_hint"]

RELAY_JOIN_TIMEOUT = 2.0  # s close() waits for stopped relay threads to end

log = logging.getLogger("nopf.rendezvous")

DEFAULT_PORT = 3012
# Both families by default: one IPv4 and one IPv6-only socket (IPV6_V6ONLY, so an IPv4
# client always arrives on the IPv4 socket and sees its address as the seed reply has it).
DEFAULT_HOSTS = ("0.0.0.0", "::")
# net.ipv4.tcp_fastopen bits: server enabled, and data accepted without a cookie
# (the coordinated client sends its hello with TCP_FASTOPEN_NO_COOKIE).
TFO_SERVER_ENABLE = 0x2
TFO_SERVER_COOKIE_NOT_REQD = 0x200
FASTOPEN_SYSCTL = "/proc/sys/net/ipv4/tcp_fastopen"


class SharedLink(Protocol):
    """Where a node of a shared rendezvous sends its book operations and node messages
    (:class:`nopf_web.rendezvous.cluster.SharedNode`); answers come back through
    :meth:`RendezvousServer.feed`."""

    def ask(self, conn: ConnId | None, op: BookOp) -> None: ...
    def deliver(self, node: NodeId, messages: tuple[NodeMessage, ...],
                conn: ConnId | None) -> None: ...
    def poll(self) -> None: ...


class RendezvousServer(ConnDriver):
    """Serve discovery replies and coordinated mode; :meth:`start`, then :meth:`close`."""

    KERNEL_FACTS = True  # the machine takes TCP_INFO's RTT where there is one
    _log = log

    def __init__(
        self, host: str | Sequence[str] = "0.0.0.0", port: int = DEFAULT_PORT,
        limits: ServerLimits | None = None, *, clock: Callable[[], float] = time.monotonic,
        node: NodeId | None = None,
    ) -> None:
        """``node``: this node's id in a rendezvous shared through Redis; then
        :meth:`share_through` must be given the link before :meth:`start`."""
        self.hosts = (host,) if isinstance(host, str) else tuple(host)
        if not self.hosts:
            raise ValueError("no address to listen on")
        self.host = self.hosts[0]
        self.port = port
        self.limits = limits or ServerLimits()
        super().__init__(clock)
        self._machine = ServerMachine(self.limits, NameplateBook(self.limits.pairing, clock),
                                      node=node)
        self._shared: SharedLink | None = None
        self._server: asyncio.Server | None = None  # the first host's
        self._others: list[asyncio.Server] = []  # the other hosts', on the same port
        self._drained: asyncio.Event | None = None  # set by close(): no link left
        self._relays: dict[RelayId, RelayLink] = {}  # sessions being copied

    def share_through(self, link: SharedLink) -> None:
        self._shared = link

    def feed(self, event: Event) -> None:
        """An event from the shared state (``BookAnswer``, ``FromNode``, ``StoreHealth``)."""
        self._feed(event)
        self._check_drained()

    relay_load = Delegated[int](
        "_machine", doc="Relay sessions waiting or copied now (a shared rendezvous spreads them).")
    stats = Delegated[ServerStats]("_machine")

    @property
    def book(self) -> NameplateBook[ConnId]:
        book = self._machine.book
        assert isinstance(book, NameplateBook)
        return book

    @property
    def address(self) -> tuple[str, int]:
        """The first host's bound address (useful with port 0)."""
        if self._server is None or not self._server.sockets:
            raise RuntimeError("server not started")
        host, port = self._server.sockets[0].getsockname()[:2]
        return str(host), int(port)

    @property
    def addresses(self) -> list[tuple[str, int]]:
        """Every bound address, the first host's first (all on one port)."""
        if self._server is None:
            raise RuntimeError("server not started")
        return [(str(s.getsockname()[0]), int(s.getsockname()[1]))
                for server in (self._server, *self._others) for s in server.sockets]

    async def start(self, *, optional: Sequence[str] = ()) -> list[tuple[str, OSError]]:
        """Listen on every host, all on one port (with port 0, the one the first host
        got). A host in ``optional`` that cannot be bound (no IPv6 on this machine) is
        skipped and returned with its error; any other failure raises."""
        skipped: list[tuple[str, OSError]] = []
        port = self.port
        try:
            for host in self.hosts:
                try:
                    server = await self._listen(host, port)
                except OSError as exc:
                    if host not in optional or host == self.hosts[0]:
                        raise
                    skipped.append((host, exc))
                    continue
                if self._server is None:
                    self._server = server
                    port = server.sockets[0].getsockname()[1]
                else:
                    self._others.append(server)
        except BaseException:
            for server in self._others:
                server.close()
            if self._server is not None:
                self._server.close()
            self._server, self._others = None, []
            raise
        # Its own address per family, for a pair split across families and nodes.
        self._machine.listening(self.addresses)
        return skipped

    async def _listen(self, host: str, port: int) -> asyncio.Server:
        loop = asyncio.get_running_loop()
        # SO_REUSEADDR restarts past TIME_WAIT on Unix; on Windows it would let a
        # second server share the port, so there it stays off. asyncio sets
        # IPV6_V6ONLY on IPv6 sockets: "::" takes IPv6 clients only.
        server = await loop.create_server(
            self._new_link, host, port, reuse_address=sys.platform != "win32",
            backlog=1024)
        # A coordinated client's hello may ride in its SYN: one round trip less (Linux).
        # Whether the kernel takes it is the host's sysctl (see fastopen_hint()).
        for sock in server.sockets:
            enable_fastopen_server(sock)
        return server

    async def close(self) -> None:
        """Stop listening, reset coordinated connections (waiting sharers would hold
        theirs for minutes) and stop relay sessions, give the rest ``write_timeout``
        + 1 s to end on their own deadlines, then reset what is left; the relay
        threads are joined (at most ``RELAY_JOIN_TIMEOUT`` more)."""
        if self._server is None:
            return
        server, self._server = self._server, None
        others, self._others = self._others, []
        server.close()
        for other in others:
            other.close()
        self._feed(Shutdown(self._clock()))
        if self._links or self._relays:
            self._drained = asyncio.Event()
            with contextlib.suppress(TimeoutError):  # then reset below, not an error
                async with asyncio.timeout(self.limits.write_timeout + 1):
                    await self._drained.wait()
            self._drained = None
        self._feed(Shutdown(self._clock(), force=True))
        if self._relays:
            relays = list(self._relays.values())
            self._relays.clear()
            for link in relays:
                link.stop()
            stuck = await asyncio.to_thread(_join_all, relays, RELAY_JOIN_TIMEOUT)
            if stuck:
                log.warning("%d relay sessions did not stop within %g s", stuck,
                            RELAY_JOIN_TIMEOUT)
        self._timer.cancel()
        for other in others:
            await other.wait_closed()
        await server.wait_closed()

    async def serve_forever(self) -> None:
        if self._server is None:
            await self.start()
        assert self._server is not None
        async with asyncio.TaskGroup() as tasks:
            for i, other in enumerate(self._others):
                tasks.create_task(other.serve_forever(), name=f"rendezvous-listener-{i + 1}")
            await self._server.serve_forever()

    # -- the machine's driver ---------------------------------------------------------

    def _feed(self, event: Event) -> None:
        for action in self._machine.handle(event):
            self._act(action)
        if self._machine.notes:
            for line in self._machine.notes:
                log.info("%s", line)
            self._machine.notes.clear()
        self._timer.arm(self._machine.next_deadline)

    def _act(self, action: Action) -> None:
        if isinstance(action, StartRelay):
            self._start_relay(action)
            return
        if isinstance(action, StopRelay):
            relay = self._relays.get(action.session)
            if relay is not None:
                relay.stop()
            return
        if isinstance(action, AskBook | ToNode | PollNode):
            shared = self._shared
            if shared is None:
                log.warning("a shared-state action without --redis: %s", type(action).__name__)
            elif isinstance(action, AskBook):
                shared.ask(action.conn, action.op)
            elif isinstance(action, ToNode):
                shared.deliver(action.node, action.messages, action.conn)
            else:
                shared.poll()
            return
        if isinstance(action, LastWord):
            self._send(action.conn, action.data, fin=True)
        else:
            self._act_common(action)

    def _connection_gone(self) -> None:
        self._check_drained()

    def _check_drained(self) -> None:
        if self._drained is not None and not self._links and not self._relays:
            self._drained.set()

    # -- relay sessions ------------------------------------------------------------------

    def _start_relay(self, action: StartRelay) -> None:
        """Take both connections out of asyncio and start copying between them."""
        socks: list[socket.socket] = []
        error = None
        for cid in (action.a, action.b):
            link = self._links.pop(cid, None)  # its connection_lost is ignored from now on
            if link is None or link.transport is None or link.sock is None:
                error = "a connection was gone before it was joined"
                continue
            transport = link.transport
            try:
                if transport.is_closing() or transport.get_write_buffer_size():
                    # Gone, or our reply still queued in asyncio (never seen: it is the
                    # first thing a connection gets, ten bytes): cannot hand it over.
                    raise OSError(f"connection {cid} cannot be handed over")
                # A second descriptor keeps the connection open when the loop closes
                # its own; nothing is written or read in between (the loop is here).
                # socket.dup(), not os.dup(): on Windows a socket is no C runtime file
                # descriptor, and dup() duplicates it with WSADuplicateSocket there.
                # (uvloop's transport socket, a pseudo-socket, has dup() too.)
                socks.append(link.sock.dup())
                transport.abort()
            except OSError as exc:
                error = str(exc)
                reset_connection(link.sock, transport)
        if error is not None or len(socks) != 2:
            for sock in socks:
                reset_connection(sock, None)
            self._feed(RelayEnded(action.session, self._clock(), error=error))
            self._check_drained()
            return
        loop = asyncio.get_running_loop()
        session = action.session

        def ended(outcome: RelayOutcome) -> None:  # in the last copy thread
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody to tell
                loop.call_soon_threadsafe(self._relay_ended, session, outcome)

        relay = RelayLink(socks[0], socks[1], greeting=action.greeting, rate=action.rate,
                          name=f"relay-{session}", on_end=ended)
        self._relays[session] = relay
        relay.start()

    def _relay_ended(self, session: RelayId, outcome: RelayOutcome) -> None:
        relay = self._relays.pop(session, None)
        if relay is not None:
            relay.join(0.1)  # its last thread called us as its last act
        self._feed(RelayEnded(session, self._clock(), outcome.a_to_b, outcome.b_to_a,
                              outcome.error))
        self._check_drained()


def fastopen_hint(path: str = FASTOPEN_SYSCTL) -> str | None:
    """One line for the operator if this host's sysctl keeps hellos out of SYNs, else None.

    Reads the sysctl of the calling process' network namespace; never changes it.
    """
    if not sys.platform.startswith("linux"):
        return None
    try:
        with open(path) as f:
            value = int(f.read().strip(), 0)
    except (OSError, ValueError):
        return None
    wanted = TFO_SERVER_ENABLE | TFO_SERVER_COOKIE_NOT_REQD
    if value & wanted == wanted:
        return None
    return ("TCP Fast Open is off on this host: setup takes one round trip more; enable "
            f"with sysctl -w net.ipv4.tcp_fastopen={value | wanted:#x}")


def _join_all(links: list[RelayLink], timeout: float) -> int:
    """Join every link's threads within ``timeout`` s in all; how many are still running."""
    deadline = time.monotonic() + timeout
    return sum(not link.join(max(0.0, deadline - time.monotonic())) for link in links)
