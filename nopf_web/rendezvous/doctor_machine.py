"""The NAT doctor's responder as one sans-IO machine: events in, actions out.

:class:`ResponderMachine` is the whole protocol logic of the doctor port that
``nopf-server`` runs beside the rendezvous (wire format:
:mod:`nopf_web.wire.doctor`), for every connection at once, without sockets or
a clock. A driver (:class:`nopf_web.rendezvous.doctor.DoctorResponder`) feeds it
what happened, with ``now`` on one clock, and carries out what it returns.

Events (:meth:`ResponderMachine.handle`)
    :class:`Accepted`   a connection came in: id, the peer's address and the
                        local address it reached, as the kernel reported them.
    :class:`Received`   bytes from a connection.
    :class:`PeerClosed` the peer's FIN.
    :class:`Lost`       the connection is gone.
    :class:`Dialed`     the dial-back asked by :class:`Dial` ended: its outcome.
    :class:`Tick`       the time is ``now``: call it at :attr:`next_deadline`.
    :class:`Shutdown`   the responder is stopping.

Actions
    :class:`Send`       write bytes.
    :class:`Close`      close gracefully; the machine resets after ``write_timeout``.
    :class:`Reset`      drop with RST; the machine has forgotten the connection.
    :class:`Dial`       connect to ``target`` from ``source`` (any port but the
                        listening one), wait at most ``timeout`` s, report
                        :class:`Dialed`. ``target`` is always the address the
                        connection came from: the check message carries none.
    :class:`CancelDial` stop that dial; no :class:`Dialed` is expected any more.
    :class:`Log`        one line for the operator.

Not a scanner: a dial-back goes only to the source of the connection that asked
for it (whose handshake proved the address), at most one per connection, and
at most ``dial_burst`` per source (an IPv4 address, or an IPv6 /64) then one per
``dial_interval`` seconds; at most ``max_dials`` at once. Every refusal is one
log line (at most ``log_burst`` per ``log_interval``, then one line counting the
rest). Connections are capped globally and per source, and every phase has a
deadline.
"""

from __future__ import annotations

import heapq
import ipaddress
from collections import OrderedDict
from dataclasses import dataclass, field

from nopf_web.wire.address import Endpoint
from nopf_web.wire.doctor import (
    MAX_OTHERS,
    Check,
    DialBack,
    DoctorError,
    DoctorMessageError,
    FrameReader,
    Icmp,
    Outcome,
    ResponderMessage,
    Seen,
    UnsupportedVersion,
    decode_client_message,
    encode,
)
from nopf_web.wire.errors import WireError

# Re-exported: the machine's own event and action vocabulary.
from .conn_events import (
    Accepted as Accepted,
    Close as Close,
    ConnId as ConnId,
    Log as Log,
    Lost as Lost,
    PeerClosed as PeerClosed,
    Received as Received,
    Reset as Reset,
    Send as Send,
    Shutdown as Shutdown,
    Tick as Tick,
)


@dataclass(frozen=True)
class DoctorLimits:
    max_connections: int = 1024
    max_per_source: int = 8
    check_timeout: float = 2.0  # s to get the check message after accept
    write_timeout: float = 5.0  # s a close may take before the connection is reset
    # Dial-backs per source: a burst, then one per interval (6 a minute).
    dial_burst: int = 5
    dial_interval: float = 10.0
    max_dials: int = 64  # under way at once, all sources together
    dial_grace: float = 1.0  # s past a dial's own timeout before the machine gives up on it
    max_sources: int = 10_000  # rate-limit entries kept (the least recently used go first)
    log_interval: float = 10.0
    log_burst: int = 20  # refusal lines per interval; the rest are counted in one line


@dataclass
class ResponderStats:
    checks: int = 0
    dials: int = 0
    refused_rate: int = 0
    refused_busy: int = 0
    refused_connections: int = 0
    bad_requests: int = 0
    open_now: int = 0


# Events (besides those of .conn_events) ---------------------------------------


@dataclass(frozen=True, slots=True)
class Dialed:
    """A dial-back ended. ``outcome`` None: it could not be made (``error`` says why)."""

    conn: ConnId
    outcome: Outcome | None
    source: tuple[str, int] | None  # where it was dialed from
    now: float
    elapsed: float = 0.0
    icmp: Icmp | None = None
    error: str | None = None


Event = Accepted | Received | PeerClosed | Lost | Dialed | Tick | Shutdown


# Actions (besides those of .conn_events) --------------------------------------


@dataclass(frozen=True, slots=True)
class Dial:
    conn: ConnId
    target: tuple[str, int]  # the connection's own peer address, always
    source: str  # local address to dial from (any port)
    timeout: float


@dataclass(frozen=True, slots=True)
class CancelDial:
    conn: ConnId


Action = Send | Close | Reset | Dial | CancelDial | Log


# State -------------------------------------------------------------------------


class _Phase:
    CHECK = "check"  # waiting for the check message
    DIALING = "dialing"
    CLOSING = "closing"


@dataclass
class _Conn:
    id: ConnId
    peer: Endpoint
    local: tuple[str, int] | None
    source: str  # rate-limit key: the IPv4 address or the IPv6 /64
    phase: str
    deadline: float
    reader: FrameReader = field(default_factory=FrameReader)


def source_key(ip: str) -> str:
    """Whom a rate limit applies to: an IPv4 address, or an IPv6 /64 (one subscriber's)."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


def _plain(ip: str) -> str:
    """An IPv4-mapped IPv6 address (dual-stack listener) as plain IPv4."""
    addr = ipaddress.ip_address(ip)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return str(addr.ipv4_mapped)
    return str(addr)


class _Buckets:
    """Token buckets per source: ``burst`` tokens, one more every ``interval`` s."""

    def __init__(self, burst: int, interval: float, max_entries: int) -> None:
        self.burst = burst
        self.interval = interval
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, at

    def take(self, key: str, now: float) -> float | None:
        """Take a token: None if granted, else the seconds until one is free."""
        tokens, at = self._entries.pop(key, (float(self.burst), now))
        tokens = min(float(self.burst), tokens + max(0.0, now - at) / self.interval)
        if tokens >= 1.0:
            self._entries[key] = (tokens - 1.0, now)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            return None
        self._entries[key] = (tokens, now)
        return (1.0 - tokens) * self.interval

    def __len__(self) -> int:
        return len(self._entries)


class _LogLimiter:
    """At most ``burst`` lines per ``interval``; the rest are counted in one later line."""

    def __init__(self, burst: int, interval: float) -> None:
        self.burst = burst
        self.interval = interval
        self._window = -float("inf")
        self._used = 0
        self._dropped = 0

    def line(self, text: str, now: float) -> list[Action]:
        out: list[Action] = []
        if now - self._window >= self.interval:
            if self._dropped:
                out.append(Log("doctor", f"{self._dropped} more refusal(s) not logged in the last "
                               f"{self.interval:g} s"))
            self._window, self._used, self._dropped = now, 0, 0
        if self._used < self.burst:
            self._used += 1
            out.append(Log("doctor", text))
        else:
            self._dropped += 1
        return out


class ResponderMachine:
    """Every doctor connection at once (see the module doc)."""

    def __init__(self, limits: DoctorLimits | None = None, addresses: tuple[str, ...] = ()
                 ) -> None:
        self.limits = limits or DoctorLimits()
        # Announced addresses: answered on the same port, told to every client ("others").
        self.addresses = tuple(str(ipaddress.ip_address(a)) for a in addresses)[:MAX_OTHERS + 1]
        self.stats = ResponderStats()
        self._conns: dict[ConnId, _Conn] = {}
        self._per_source: dict[str, int] = {}
        self._dials: set[ConnId] = set()
        self._buckets = _Buckets(self.limits.dial_burst, self.limits.dial_interval,
                                 self.limits.max_sources)
        self._log = _LogLimiter(self.limits.log_burst, self.limits.log_interval)
        self._timers: list[tuple[float, ConnId]] = []
        self._stopping = False

    # -- introspection ----------------------------------------------------------------

    @property
    def next_deadline(self) -> float | None:
        while self._timers:
            at, conn = self._timers[0]
            c = self._conns.get(conn)
            if c is not None and c.deadline == at:
                return at
            heapq.heappop(self._timers)  # stale
        return None

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def dials_under_way(self) -> int:
        return len(self._dials)

    @property
    def tracked_sources(self) -> int:
        return len(self._buckets)

    # -- events -----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if isinstance(event, Accepted):
            return self._accepted(event)
        if isinstance(event, Tick | Shutdown):
            return self._tick(event.now) if isinstance(event, Tick) else self._shutdown()
        conn = self._conns.get(event.conn)
        if conn is None:
            return []  # already forgotten (reset by us, or a late report)
        if isinstance(event, Received):
            return self._received(conn, event)
        if isinstance(event, PeerClosed):
            return self._peer_closed(conn, event.now)
        if isinstance(event, Lost):
            return self._forget(conn, cancel=True)
        return self._dialed(conn, event)

    def _accepted(self, ev: Accepted) -> list[Action]:
        lim = self.limits
        if ev.peer is None:
            return [Reset(ev.conn)]
        peer = Endpoint(_plain(ev.peer[0]), ev.peer[1])
        key = source_key(peer[0])
        if self._stopping:
            return [Reset(ev.conn)]
        if len(self._conns) >= lim.max_connections or \
                self._per_source.get(key, 0) >= lim.max_per_source:
            self.stats.refused_connections += 1
            return [Reset(ev.conn), *self._log.line(
                f"doctor: refused a connection from {peer[0]}: too many open "
                f"({len(self._conns)} in all, {self._per_source.get(key, 0)} from {key})",
                ev.now)]
        local = (_plain(ev.local[0]), ev.local[1]) if ev.local else None
        conn = _Conn(ev.conn, peer, local, key, _Phase.CHECK, ev.now + lim.check_timeout)
        self._conns[conn.id] = conn
        self._per_source[key] = self._per_source.get(key, 0) + 1
        self.stats.open_now = len(self._conns)
        self._arm(conn)
        return []

    def _received(self, conn: _Conn, ev: Received) -> list[Action]:
        if conn.phase != _Phase.CHECK:
            return []  # one message per connection; what follows is ignored
        try:
            frames = conn.reader.feed(ev.data)
        except WireError as exc:  # a length out of range: not a doctor client
            return self._bad(conn, str(exc), ev.now)
        if not frames:
            return []
        if len(frames) > 1 or conn.reader.buffered:
            return self._bad(conn, "one check message per connection, then nothing", ev.now)
        try:
            check = decode_client_message(frames[0])
        except UnsupportedVersion as exc:
            return self._refuse(conn, DoctorError("unsupported_version", str(exc)), ev.now)
        except DoctorMessageError as exc:
            return self._bad(conn, str(exc), ev.now)
        return self._check(conn, check, ev.now)

    def _check(self, conn: _Conn, check: Check, now: float) -> list[Action]:
        self.stats.checks += 1
        local_ip = conn.local[0] if conn.local else None
        others = tuple(a for a in self.addresses if a != local_ip)[:MAX_OTHERS]
        out: list[Action] = [self._send(conn, Seen(conn.peer, others))]
        if not check.dial_back:
            return [*out, *self._close(conn, now)]
        lim = self.limits
        if len(self._dials) >= lim.max_dials:
            self.stats.refused_busy += 1
            return [*out, *self._log.line(
                f"doctor: refused a dial-back to {conn.peer}: "
                f"{len(self._dials)} under way already", now),
                *self._refuse(conn, DoctorError("busy", "too many dial-backs under way; "
                                                "try again in a few seconds"), now)]
        wait = self._buckets.take(conn.source, now)
        if wait is not None:
            self.stats.refused_rate += 1
            retry = round(wait + 0.05, 1)
            return [*out, *self._log.line(
                f"doctor: refused a dial-back to {conn.peer}: more than "
                f"{lim.dial_burst} from {conn.source} lately (next in {retry:g} s)", now),
                *self._refuse(conn, DoctorError(
                    "rate_limited", f"too many dial-backs to {conn.source} lately",
                    retry), now)]
        timeout = check.wait_ms / 1000
        self.stats.dials += 1
        self._dials.add(conn.id)
        conn.phase = _Phase.DIALING
        conn.deadline = now + timeout + lim.dial_grace
        self._arm(conn)
        return [*out, Dial(conn.id, conn.peer, self._dial_source(conn), timeout)]

    def _dial_source(self, conn: _Conn) -> str:
        """Dial from another of our addresses of the peer's family if there is one: an
        unsolicited SYN from a stranger, as a peer's would be. Else from the address
        the probe reached (another port: the driver binds port 0)."""
        family = ":" in conn.peer[0]
        local = conn.local[0] if conn.local else None
        for address in self.addresses:
            if (":" in address) == family and address != local:
                return address
        if local is not None:
            return local
        return "::" if family else "0.0.0.0"

    def _dialed(self, conn: _Conn, ev: Dialed) -> list[Action]:
        if conn.phase != _Phase.DIALING:
            return []
        self._dials.discard(conn.id)
        if ev.outcome is None or ev.source is None:
            why = (ev.error or "unknown error")[:150]
            msg: ResponderMessage = DoctorError("dial_failed",
                                                f"the responder could not dial back: {why}")
            lines = self._log.line(f"doctor: dial-back to {conn.peer} "
                                   f"failed on our side: {ev.error}", ev.now)
        else:
            msg = DialBack(ev.outcome, Endpoint(_plain(ev.source[0]), ev.source[1]),
                           max(0, min(60_000, round(ev.elapsed * 1000))),
                           ev.icmp if ev.outcome == "icmp" else None)
            lines = []
        return [*lines, self._send(conn, msg), *self._close(conn, ev.now)]

    def _peer_closed(self, conn: _Conn, now: float) -> list[Action]:
        if conn.phase == _Phase.CLOSING:
            return []  # its answer to our close: Lost follows
        # The client gave up: nothing more to tell it.
        out: list[Action] = []
        if conn.id in self._dials:
            self._dials.discard(conn.id)
            out.append(CancelDial(conn.id))
        return [*out, *self._close(conn, now)]

    def _tick(self, now: float) -> list[Action]:
        out: list[Action] = []
        while self._timers and self._timers[0][0] <= now:
            at, cid = heapq.heappop(self._timers)
            conn = self._conns.get(cid)
            if conn is None or conn.deadline != at:
                continue
            if conn.phase == _Phase.CHECK:
                if conn.reader.buffered:
                    out += self._bad(conn, "incomplete check message", now)
                else:
                    out += self._close(conn, now)  # said nothing: nothing to answer
            elif conn.phase == _Phase.DIALING:
                # The driver bounds its dial by the timeout; this only guards against a
                # dial that never reports.
                self._dials.discard(conn.id)
                out += [CancelDial(conn.id), *self._forget(conn, cancel=False), Reset(conn.id)]
            else:
                out += [*self._forget(conn, cancel=False), Reset(conn.id)]
        return out

    def _shutdown(self) -> list[Action]:
        self._stopping = True
        out: list[Action] = []
        for conn in list(self._conns.values()):
            out += [*self._forget(conn, cancel=True), Reset(conn.id)]
        return out

    # -- helpers ----------------------------------------------------------------------

    def _send(self, conn: _Conn, msg: ResponderMessage) -> Send:
        return Send(conn.id, encode(msg))

    def _close(self, conn: _Conn, now: float) -> list[Action]:
        conn.phase = _Phase.CLOSING
        conn.deadline = now + self.limits.write_timeout
        self._arm(conn)
        return [Close(conn.id)]

    def _bad(self, conn: _Conn, why: str, now: float) -> list[Action]:
        self.stats.bad_requests += 1
        return [*self._log.line(f"doctor: bad request from {conn.peer}: "
                                f"{why}", now),
                *self._refuse(conn, DoctorError("bad_request", why[:200]), now)]

    def _refuse(self, conn: _Conn, error: DoctorError, now: float) -> list[Action]:
        return [self._send(conn, error), *self._close(conn, now)]

    def _forget(self, conn: _Conn, *, cancel: bool) -> list[Action]:
        self._conns.pop(conn.id, None)
        left = self._per_source.get(conn.source, 1) - 1
        if left > 0:
            self._per_source[conn.source] = left
        else:
            self._per_source.pop(conn.source, None)
        self.stats.open_now = len(self._conns)
        if conn.id in self._dials:
            self._dials.discard(conn.id)
            return [CancelDial(conn.id)] if cancel else []
        return []

    def _arm(self, conn: _Conn) -> None:
        heapq.heappush(self._timers, (conn.deadline, conn.id))
