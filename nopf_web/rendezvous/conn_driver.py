"""What nopf-server's asyncio drivers share: the accepted connections of one machine.

The rendezvous (:class:`~nopf_web.rendezvous.server.RendezvousServer`) and the
NAT doctor's responder (:class:`~nopf_web.rendezvous.doctor.DoctorResponder`)
each drive one sans-IO machine holding many TCP connections
(:mod:`.conn_events`). A :class:`ConnDriver` keeps those connections: one
:class:`ConnLink` protocol per accepted socket hands the machine what the kernel
reports (accepts, bytes, FINs, losses), the actions it returns on them
(:class:`Send`, :class:`Close`, :class:`Reset`) become writes, closes and
resets, its :class:`Log` lines go to the driver's logger, and one
:class:`DeadlineTimer` delivers its next deadline. Times are read from one
clock. A subclass feeds its machine (:meth:`ConnDriver._feed`) and carries
out the machine's other actions.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Callable
from typing import ClassVar

from nopf_web.sockets import LINGER_RESET, kernel_rtt, stream_transport, tcp_facts

from .conn_events import (
    Accepted,
    Close,
    ConnId,
    Log,
    Lost,
    PeerClosed,
    Received,
    Reset,
    Send,
    Tick,
)
from .deadline import DeadlineTimer

__all__ = ["ConnDriver", "ConnEvent", "ConnLink", "reset_connection"]

# The events a ConnDriver itself feeds; a machine's own event type is a wider union.
ConnEvent = Accepted | Received | PeerClosed | Lost | Tick


class ConnLink(asyncio.Protocol):
    """One accepted connection: tells the driver's machine what its socket reports."""

    __slots__ = ("_driver", "id", "sock", "transport", "write_failed")

    def __init__(self, driver: ConnDriver) -> None:
        self._driver = driver
        self.id: ConnId = 0
        self.transport: asyncio.Transport | None = None
        self.sock: socket.socket | None = None
        self.write_failed = False  # a write of ours failed (asyncio reports why later)

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self._driver._accepted(self, stream_transport(transport))

    def data_received(self, data: bytes) -> None:
        driver = self._driver
        rtt = kernel_rtt(self.sock) if driver.KERNEL_FACTS else None
        driver._feed(Received(self.id, data, driver._clock(), rtt))

    def eof_received(self) -> bool:
        self._driver._feed(PeerClosed(self.id, self._driver._clock()))
        return True  # our direction stays open: the machine closes it

    def connection_lost(self, exc: Exception | None) -> None:
        self._driver._lost(self, exc)


class ConnDriver:
    """The connections of one machine; listeners are made with :meth:`_new_link`."""

    # Report TCP_INFO's RTT and TCP Fast Open with accepts and reads (one getsockopt
    # each): only for a machine that uses them.
    KERNEL_FACTS: ClassVar[bool] = False
    _log: ClassVar[logging.Logger]  # where the machine's Log lines go

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock  # the one clock: every `now` the machine gets
        self._links: dict[ConnId, ConnLink] = {}
        self._next_id: ConnId = 0
        self._timer = DeadlineTimer(clock, lambda now: self._feed(Tick(now)))

    def _feed(self, event: ConnEvent) -> None:
        """Hand the machine ``event``, carry out its actions, arm the timer."""
        raise NotImplementedError

    def _connection_gone(self) -> None:
        """A connection left :attr:`_links` (for a driver waiting until none is left)."""

    def _new_link(self) -> ConnLink:
        """The protocol factory for the driver's listeners."""
        return ConnLink(self)

    def _accepted(self, link: ConnLink, transport: asyncio.Transport) -> None:
        self._next_id += 1
        link.id = self._next_id
        link.transport = transport
        link.sock = transport.get_extra_info("socket")
        self._links[link.id] = link
        peer = transport.get_extra_info("peername")
        local = transport.get_extra_info("sockname")
        # None on Windows, or not asked for: a machine that wants an RTT pings instead.
        facts = tcp_facts(link.sock) if self.KERNEL_FACTS else None
        self._feed(Accepted(link.id, (str(peer[0]), int(peer[1])) if peer else None,
                            self._clock(), facts.rtt if facts else None,
                            bool(facts and facts.syn_data),
                            (str(local[0]), int(local[1])) if local else None))

    def _lost(self, link: ConnLink, exc: Exception | None) -> None:
        if self._links.pop(link.id, None) is None:
            return  # reset by us: the machine has forgotten it already
        error = None if exc is None else str(exc) or type(exc).__name__
        self._feed(Lost(link.id, self._clock(), error, link.write_failed))
        self._connection_gone()

    def _send(self, conn: ConnId, data: bytes, *, fin: bool = False) -> None:
        """Write ``data`` (then a FIN with ``fin``) to ``conn`` if it is still ours."""
        link = self._links.get(conn)
        if link is None or link.transport is None:
            return
        transport = link.transport
        transport.write(data)
        if fin and transport.can_write_eof():
            try:
                transport.write_eof()
            except OSError:  # asyncio's shuts down at once: the client had reset it
                transport.abort()
        if transport.is_closing():  # the write failed: connection_lost says why
            link.write_failed = True

    def _act_common(self, action: Send | Close | Reset | Log) -> None:
        """Carry out an action of the machine that every driver shares."""
        if isinstance(action, Log):
            self._log.warning("%s", action.line)
            return
        if isinstance(action, Send):
            self._send(action.conn, action.data)
            return
        link = self._links.get(action.conn)
        if link is None or link.transport is None:
            return
        if isinstance(action, Close):
            link.transport.close()
        else:
            del self._links[action.conn]
            reset_connection(link.sock, link.transport)
            self._connection_gone()


def reset_connection(sock: socket.socket | None, transport: asyncio.Transport | None) -> None:
    """Drop a connection with RST: no FIN handshake, no TIME_WAIT, no buffered data."""
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RESET)
    if transport is not None:
        transport.abort()
    elif sock is not None:
        sock.close()
