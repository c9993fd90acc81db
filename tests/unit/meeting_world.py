"""A world of bytes for the coordinated peers' machines: two peers' coordination machines
and the rendezvous' own :class:`~nopf_web.rendezvous.server_machine.ServerMachine`, with
NATs as address rules and a fake clock. No sockets, no loop.

Each peer's actions are carried out as its asyncio driver would: connections to the
rendezvous become ``Accepted``/``Received`` events of the server machine (from the
peer's public address: a stable NAT keeps the local port, a symmetric one picks a
new port per connection), the server's ``Send``/``LastWord``/``Close`` come back as
the peer's ``received``/``closed``. A punch opens at once when neither NAT is
symmetric (else it fails at the end of its stage); a relay path runs a
:class:`~nopf_web.sessions.relay_join_machine.RelayJoinMachine` on a server connection,
read ``want()`` bytes at a time, as the driver does, and is joined when the server
starts the relay session.
"""

from __future__ import annotations

import heapq
import itertools
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

from nopf_web.errors import NopfError
from nopf_web.pairing import parse_code
from nopf_web.punch.machine import Failure, PunchTimeout
from nopf_web.rendezvous.server_machine import (
    Accepted,
    Action as ServerAction,
    Close,
    Event as ServerEvent,
    LastWord,
    Log,
    PeerClosed,
    Received,
    Reset,
    Send,
    ServerLimits,
    ServerMachine,
    StartRelay,
    StopRelay,
    Tick,
)
from nopf_web.roles import PeerRole
from nopf_web.sessions import coordination_machine as cm
from nopf_web.sessions.relay_join_machine import RelayFailed, RelayJoined, RelayJoinMachine
from nopf_web.wire.address import Endpoint
from nopf_web.wire.rendezvous import FrameReader, Hello, decode_client_message

RDV = ("198.51.100.2", 3012)
RDV6 = ("2001:db8:100::2", 3012)
# Each role's global IPv6 address and IPv6 punch port (its candidate, when it offers one).
V6: dict[str, Endpoint] = {"server": Endpoint("2001:db8:a::2", 41000),
                           "client": Endpoint("2001:db8:b::2", 42000)}
NatKind = Literal["none", "stable", "symmetric"]
PUNCH_TIME = 0.05  # s a punch between two punchable NATs takes
RTT = 0.02


@dataclass
class Side:
    """One peer: its machine, its network, and what became of it."""

    role: PeerRole
    nat: NatKind
    public_ip: str
    lan_ip: str
    machine: cm.CoordinationMachine | None = None
    said: list[str] = field(default_factory=list)
    result: cm.Paired | cm.Met | None = None
    error: NopfError | None = None
    code: str | None = None
    paths_opened: list[cm.PathKind] = field(default_factory=list)
    relay_hellos: list[bytes] = field(default_factory=list)  # what the relay got first
    hellos: list[Hello] = field(default_factory=list)  # sent to the rendezvous, in order
    # the peer's relay joins by path id, and the server connection of each
    joins: dict[int, tuple[int, RelayJoinMachine]] = field(default_factory=dict)

    @property
    def done(self) -> bool:
        return self.result is not None or self.error is not None


class World:
    """``ipv6_only``: the roles whose hosts have IPv6 only (a global address, no NAT, a
    stateful firewall that a simultaneous open crosses): they reach the rendezvous at
    RDV6, and their IPv6 punches open when the peer offered IPv6 too."""

    def __init__(self, sharer_nat: NatKind = "stable", joiner_nat: NatKind = "stable", *,
                 limits: ServerLimits | None = None, now: float = 100.0,
                 ipv6_only: tuple[PeerRole, ...] = ()) -> None:
        self.now = now
        self.server = ServerMachine(limits)
        self.sides = {
            "server": Side("server", sharer_nat, "203.0.113.2",
                           "203.0.113.2" if sharer_nat == "none" else "10.0.1.2"),
            "client": Side("client", joiner_nat, "192.0.2.2",
                           "192.0.2.2" if joiner_nat == "none" else "10.0.2.2"),
        }
        for role in ipv6_only:
            side = self.sides[role]
            side.public_ip = side.lan_ip = V6[role].host
        self._cids = itertools.count(1)
        self._ports = itertools.count(40001)
        self._random_ports = itertools.count(20001, 7)
        # server conn id -> (side, the peer machine's conn id); relay conns: conn -1
        self.conns: dict[int, tuple[Side, int]] = {}
        self.by_peer: dict[tuple[str, int], int] = {}  # (role, machine conn) -> server cid
        self.timers: list[tuple[float, int, Callable[[], None]]] = []
        self._seq = itertools.count()
        self.log: list[str] = []
        self.relays: list[StartRelay] = []

    # -- starting peers -------------------------------------------------------------------

    def start(self, role: PeerRole, config: cm.CoordinationConfig) -> None:
        side = self.sides[role]
        side.machine = cm.CoordinationMachine(config)
        self._peer(side, side.machine.start(self.now))

    def share(self, **config: object) -> None:
        self.start("server", cm.CoordinationConfig(role="server", where="rdv", pake=True,
                                                   **config))  # type: ignore[arg-type]

    def join(self, **config: object) -> None:
        code = self.sides["server"].code
        assert code is not None, "no code yet"
        self.start("client", cm.CoordinationConfig(
            role="client", where="rdv", code=parse_code(code), pake=True,
            **config))  # type: ignore[arg-type]

    def resume(self, role: PeerRole, resume_id: bytes, *, direct_only: bool = False,
               punch_timeout: float = 30.0) -> None:
        self.start(role, cm.CoordinationConfig(
            role=role, where="rdv", punch_timeout=punch_timeout,
            resume=cm.Resume(resume_id, direct_only)))

    # -- the clock ------------------------------------------------------------------------

    def run(self, until: float = 120.0, stop: Callable[[], bool] | None = None) -> None:
        """Move the clock from deadline to deadline until ``stop()`` (default: both peers
        that started are done) or ``until`` seconds have passed."""
        end = self.now + until
        started = [s for s in self.sides.values() if s.machine is not None]
        stop = stop or (lambda: all(s.done for s in started))
        while not stop():
            at = self._next()
            if at is None or at > end:
                self.now = end
                return
            self.now = max(self.now, at)
            self._fire_due()

    def _next(self) -> float | None:
        times = [t for t, _, _ in self.timers[:1]]
        if (d := self.server.next_deadline) is not None:
            times.append(d)
        for side in self.sides.values():
            if side.machine is not None and (w := side.machine.wake_at) is not None:
                times.append(w)
            times += [j.deadline for _, j in side.joins.values() if not j.done]
        return min(times) if times else None

    def _fire_due(self) -> None:
        now = self.now
        while self.timers and self.timers[0][0] <= now:
            _, _, fn = heapq.heappop(self.timers)
            fn()
        if (d := self.server.next_deadline) is not None and d <= now:
            self._server(Tick(now))
        for side in self.sides.values():
            m = side.machine
            if m is not None and (w := m.wake_at) is not None and w <= now:
                self._peer(side, m.timer(now))
            for path, (_, join) in list(side.joins.items()):
                if not join.done and join.deadline <= now:
                    failed = join.timer(now)
                    if failed is not None:
                        self._relay_outcome(side, path, failed)

    def later(self, delay: float, fn: Callable[[], None]) -> None:
        heapq.heappush(self.timers, (self.now + delay, next(self._seq), fn))

    # -- the server's side ------------------------------------------------------------------

    def _server(self, event: ServerEvent) -> None:
        for action in self.server.handle(event):
            self._server_action(action)

    def _server_action(self, a: ServerAction) -> None:
        if isinstance(a, Log):
            self.log.append(a.line)
            return
        if isinstance(a, StopRelay):
            return
        if isinstance(a, StartRelay):
            self.relays.append(a)
            for cid in (a.a, a.b):
                self._to_peer(cid, a.greeting, closed=False)
            return
        if isinstance(a, Send | LastWord):
            self._to_peer(a.conn, a.data, closed=isinstance(a, LastWord))
        elif isinstance(a, Close):
            self._to_peer(a.conn, b"", closed=True)
        elif isinstance(a, Reset):
            self._to_peer(a.conn, b"", closed=True, error="Connection reset by peer")

    def _to_peer(self, cid: int, data: bytes, *, closed: bool, error: str | None = None,
                 ) -> None:
        if cid not in self.conns:
            return
        side, conn = self.conns[cid]
        if conn < 0:  # a relay connection: its join machine reads want() at a time
            path = -conn
            if path not in side.joins:
                return
            _, join = side.joins[path]
            view = memoryview(data)
            while view and not join.done:
                take = join.want()
                out = join.received(bytes(view[:take]), self.now)
                view = view[take:]
                if out is not None:
                    self._relay_outcome(side, path, out)
            if closed and not join.done:
                failed = join.closed(error, self.now)
                if failed is not None:
                    self._relay_outcome(side, path, failed)
            return
        m = side.machine
        assert m is not None
        if data:
            self._peer(side, m.received(conn, data, self.now))
        if closed:
            self.conns.pop(cid, None)
            self._peer(side, m.closed(conn, error, self.now))

    # -- a peer's side ------------------------------------------------------------------------

    def _accept(self, side: Side, local_port: int, conn: int) -> int:
        """The server accepts a connection of ``side`` (its machine's ``conn``; a relay
        path's: -path) from ``local_port``, seen from the NAT's mapping of it."""
        cid = next(self._cids)
        self.conns[cid] = (side, conn)
        port = local_port if side.nat != "symmetric" else next(self._random_ports)
        self._server(Accepted(cid, (side.public_ip, port), self.now, kernel_rtt=RTT,
                              local=RDV6 if ":" in side.public_ip else RDV))
        return cid

    def _peer(self, side: Side, actions: list[cm.Action]) -> None:
        m = side.machine
        assert m is not None
        # A connection completes after the rest of its batch was carried out (the driver
        # makes a SPAKE2 message while the SYN is out).
        actions = sorted(actions, key=lambda a: isinstance(a, cm.Connect))
        for a in actions:
            if isinstance(a, cm.Connect):
                port = a.port or next(self._ports)
                # Connected first (the server's reply comes after), its sends after the accept.
                then = m.connected(a.conn, Endpoint(side.lan_ip, port), False, self.now)
                self.by_peer[(side.role, a.conn)] = self._accept(side, port, a.conn)
                self._peer(side, then)
            elif isinstance(a, cm.Send):
                side.hellos += [msg for p in FrameReader().feed(a.data)
                                if isinstance(msg := decode_client_message(p), Hello)]
                cid = self.by_peer[(side.role, a.conn)]
                if cid in self.conns:
                    self._server(Received(cid, a.data, self.now, None))
            elif isinstance(a, cm.Close):
                cid = self.by_peer[(side.role, a.conn)]
                if self.conns.pop(cid, None) is not None:
                    self._server(PeerClosed(cid, self.now))
            elif isinstance(a, cm.MakePake):
                half = (b"B" if side.role == "client" else b"A") + bytes(32)
                self._peer(side, m.pake_made(half, self.now))
            elif isinstance(a, cm.ShowCode):
                side.code = a.code
            elif isinstance(a, cm.Say):
                side.said.append(a.text)
            elif isinstance(a, cm.OpenPath):
                side.paths_opened.append(a.how)
                self._open_path(side, a.path, a.how)
            elif isinstance(a, cm.AbandonPath):
                side.joins.pop(a.path, None)
            elif isinstance(a, cm.Succeed):
                side.result = a.paired
            elif isinstance(a, cm.Fail):
                side.error = a.error

    def _open_path(self, side: Side, path: int, how: cm.PathKind) -> None:
        m = side.machine
        assert m is not None
        if isinstance(how, cm.Punch):
            # IPv6 has no NAT: two firewalls that both sent a SYN let it through.
            punchable = (how.stage.path == "ipv6"
                         or "symmetric" not in (s.nat for s in self.sides.values()))
            if punchable:
                self.later(PUNCH_TIME, lambda: self._peer(side, m.path_opened(path, self.now)))
            else:
                failure = PunchTimeout("no SYN came back", Counter({Failure.SILENT: 1}))
                self.later(how.stage.budget,
                           lambda: self._peer(side, m.path_failed(path, failure, self.now)))
            return
        assert isinstance(how, cm.ViaRelay), how  # no mapped ports in this world
        join = RelayJoinMachine(how.stage, self.now, net_timeout=m.config.net_timeout)
        port = next(self._ports)
        side.joins[path] = (port, join)
        cid = self._accept(side, port, -path)
        side.relay_hellos.append(join.message)
        self._server(Received(cid, join.message, self.now, None))

    def _relay_outcome(self, side: Side, path: int, out: RelayJoined | RelayFailed) -> None:
        m = side.machine
        assert m is not None
        port, _ = side.joins.pop(path)
        if isinstance(out, RelayFailed):
            self._peer(side, m.path_failed(path, out.error, self.now))
        else:
            self._peer(side, m.path_opened(path, self.now, Endpoint(side.lan_ip, port)))


