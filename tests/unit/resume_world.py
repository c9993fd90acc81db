"""An in-memory world for the resume machine's tests: two peers, each a mux
machine over a resume machine over one record machine per connection, and
connections that carry bytes only when the test says so, get cut at any
point (what was in flight is lost), freeze (a black hole) or get replaced.
No sockets, no clock: the world's ``now`` is the only time."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field

from nopf_web.roles import PeerRole
from nopf_web.tunnel.mux_machine import (
    MuxMachine,
    PeerServices,
    StreamData,
    StreamDone,
    StreamEof,
    StreamFailed,
    StreamOpened,
    StreamWritable,
    TunnelEnded,
)
from nopf_web.tunnel.record_machine import (
    DEFAULT_KEY_LIMITS,
    ChannelEnded,
    ChannelFailed,
    KeyLimits,
    Pake,
    PeerConfirmed,
    PlainSlot,
    RecordEvent,
    RecordMachine,
    RecordReceived,
    Transmit,
    TunnelSecrets,
)
from nopf_web.tunnel.resume_machine import (
    ClosePath,
    Deliver,
    NeedPath,
    PathFailed,
    PathKind,
    PathLost,
    PathSelected,
    PeerClosed,
    ResumeEvent,
    ResumeMachine,
    Send,
    TunnelFailed,
    Writable,
)

CODE = "7-orbit-lantern"


@dataclass
class End:
    """One peer's end of one connection."""

    side: Side
    conn: Conn
    path: int
    rm: RecordMachine
    out: bytearray = field(default_factory=bytearray)  # written, not yet carried
    closed: bool = False  # this end closed (or saw the end)
    fin: bool = False  # closed cleanly: the peer sees EOF once ``out`` is carried

    @property
    def other(self) -> End:
        a, b = self.conn.ends
        return b if self is a else a


class Conn:
    """One TCP connection between the two peers."""

    def __init__(self, kind: PathKind) -> None:
        self.kind: PathKind = kind
        self.ends: tuple[End, End] = ()  # type: ignore[assignment]
        self.frozen = False  # a black hole: nothing is carried any more

    @property
    def alive(self) -> bool:
        return not all(e.closed for e in self.ends)


class Side:
    def __init__(self, world: World, role: PeerRole, **resume_options: object) -> None:
        self.world = world
        self.role: PeerRole = role
        self.resume = ResumeMachine(role, **resume_options)  # type: ignore[arg-type]
        self.mux = MuxMachine(role=role, keepalive=500.0, dead_after=1000.0, name=role)
        self.ends: dict[int, End] = {}
        self.got: dict[int, bytearray] = {}
        self.eof: set[int] = set()
        self.failed: list[object] = []  # stream failures and tunnel ends: none expected
        self.events: list[ResumeEvent] = []  # everything but Send/Deliver
        self.need_path = False
        self.secrets: TunnelSecrets | None = None
        self.confirmed: list[Conn] = []  # connections in the order this side confirmed them

    @property
    def now(self) -> float:
        return self.world.now

    # -- the mux ---------------------------------------------------------------------

    def pump(self) -> None:
        """Hand the mux's frames to the resume layer while it takes them."""
        while self.mux.wants_to_send and not self.resume.writing_paused \
                and self.resume.state == "open":
            parts, events = self.mux.data_to_send(self.now)
            self.mux_events(events)
            if not parts:
                break
            self.act(self.resume.send(parts, self.now))

    def mux_events(self, events: Sequence[object]) -> None:
        for event in events:
            if isinstance(event, StreamData):
                self.got.setdefault(event.stream_id, bytearray()).extend(event.data)
                self.mux.consumed(event.stream_id, len(event.data))
            elif isinstance(event, StreamOpened):
                self.got.setdefault(event.stream_id, bytearray())
            elif isinstance(event, StreamEof):
                self.eof.add(event.stream_id)
            elif isinstance(event, StreamFailed | TunnelEnded):
                self.failed.append(event)
            else:
                # PeerServices: a rec announcement tells how many services (1 here).
                assert isinstance(event, StreamDone | StreamWritable | PeerServices)

    # -- the resume layer's events ---------------------------------------------------

    def act(self, events: list[ResumeEvent]) -> None:
        for event in events:
            if isinstance(event, Send):
                end = self.ends[event.path]
                assert not end.closed, f"{self.role} sent on closed path {event.path}"
                for record in end.rm.seal(event.parts):
                    end.out += record
            elif isinstance(event, Deliver):
                # A view (no copy) of a buffer that does not change while viewed:
                # the record's own bytes, or a slot it was opened into.
                assert type(event.data) is memoryview and type(event.data.obj) in (PlainSlot,
                                                                                    bytes)
                self.mux_events(self.mux.receive(event.data, self.now))
            else:
                self.events.append(event)
                if isinstance(event, ClosePath):
                    self.world.close(self.ends[event.path], abort=event.abort)
                elif isinstance(event, NeedPath):
                    self.need_path = True
                elif isinstance(event, PathSelected):
                    self.need_path = False
                elif isinstance(event, TunnelFailed | PeerClosed):
                    self.failed.append(event)
                else:
                    assert isinstance(event, PathLost | PathFailed | Writable)

    def record_events(self, end: End, events: list[RecordEvent]) -> None:
        for event in events:
            if isinstance(event, RecordReceived):
                self.act(self.resume.receive(end.path, event.plaintext, self.now))
            elif isinstance(event, Transmit):
                end.out += event.data
            elif isinstance(event, PeerConfirmed):
                if end.conn is self.world.conns[0] and self.secrets is None:
                    self.secrets = end.rm.secrets
                self.confirmed.append(end.conn)
                self.act(self.resume.path_confirmed(end.path, self.now))
            elif isinstance(event, ChannelFailed | ChannelEnded):
                error = event.error if isinstance(event, ChannelFailed) else None
                self.world.close(end, abort=isinstance(event, ChannelFailed))
                self.act(self.resume.path_closed(end.path, error, self.now))

    def lost(self, end: End, error: Exception | None) -> None:
        """The connection under ``end`` ended (as the driver hears it)."""
        if end.closed:
            return
        end.closed = True
        self.record_events(end, end.rm.connection_lost(error))

    def tick(self) -> None:
        self.act(self.resume.timer(self.now))
        self.mux_events(self.mux.timer(self.now))
        for end in list(self.ends.values()):
            if not end.closed:
                self.record_events(end, end.rm.timer(self.now))
        self.pump()


class World:
    def __init__(self, seed: int = 0, **resume_options: object) -> None:
        self.now = 1000.0
        # Every connection's record key limits (tests set low ones before connecting).
        self.key_limits: KeyLimits = DEFAULT_KEY_LIMITS
        self.rng = random.Random(seed)
        self.a = Side(self, "server", **resume_options)
        self.b = Side(self, "client", **resume_options)
        self.conns: list[Conn] = []
        self.a.mux.start(self.now)
        self.b.mux.start(self.now)

    # -- connections -----------------------------------------------------------------

    def connect(self, kind: PathKind = "public") -> Conn:
        """A new connection on both sides: the first runs the tunnel's handshake,
        later ones the path handshake."""
        conn = Conn(kind)
        first = not self.conns
        ends = []
        if first:  # SPAKE2 through the rendezvous: the tunnel starts with confirmations
            pakes = {"server": Pake("server", CODE), "client": Pake("client", CODE)}
            pakes["server"].finish(pakes["client"].message)
            pakes["client"].finish(pakes["server"].message)
        for side in (self.a, self.b):
            if first:
                rm = RecordMachine.confirm_only(side.role, pakes[side.role],
                                                limits=self.key_limits)
            else:
                assert side.secrets is not None
                rm = RecordMachine.path(side.role, side.secrets, limits=self.key_limits)
            path = side.resume.add_path(kind, self.now, first=first) if first else \
                side.resume.add_path(kind, self.now)
            end = End(side, conn, path, rm)
            side.ends[path] = end
            ends.append(end)
        conn.ends = (ends[0], ends[1])
        self.conns.append(conn)
        for end in ends:
            end.side.record_events(end, end.rm.start(self.now))
            end.side.pump()
        return conn

    def close(self, end: End, *, abort: bool) -> None:
        """``end``'s side closes it: the peer sees an RST at once (abort), or
        EOF after what is in flight (clean)."""
        if end.closed:
            return
        end.closed = True
        other = end.other
        if abort:
            end.out.clear()
            other.out.clear()
            if not end.conn.frozen:  # an RST does not cross a black hole either
                other.side.lost(other, ConnectionResetError(104, "Connection reset by peer"))
        else:
            end.fin = True

    def cut(self, conn: Conn, keep: tuple[int, int]) -> None:
        """The connection breaks: each direction carries only ``keep`` more bytes
        (at any point, inside a record too), then both ends get an RST."""
        for end, n in zip(conn.ends, keep, strict=True):
            self.carry(end, n)
        for end in conn.ends:
            end.out.clear()
        for end in conn.ends:
            end.side.lost(end, ConnectionResetError(104, "Connection reset by peer"))

    def carry(self, src: End, n: int | None = None) -> bool:
        """Up to ``n`` (all if None) bytes from ``src`` to its peer; True if any."""
        dst = src.other
        if src.conn.frozen or dst.closed:
            return False
        take = len(src.out) if n is None else min(n, len(src.out))
        moved = False
        if take:
            data = bytes(src.out[:take])
            del src.out[:take]
            events = dst.rm.receive_data(data)
            if not events:  # part of a record: the driver reports progress
                dst.side.resume.progress(dst.path, self.now)
            dst.side.record_events(dst, events)
            moved = True
        if src.fin and not src.out and not dst.closed:
            dst.side.lost(dst, None)
            moved = True
        return moved

    # -- running ---------------------------------------------------------------------

    def step(self, max_bytes: int | None = None) -> bool:
        """Carry bytes on every live connection in random order; True if any moved."""
        moved = False
        ends = [e for c in self.conns for e in c.ends if e.out or e.fin]
        self.rng.shuffle(ends)
        for end in ends:
            moved |= self.carry(end, max_bytes)
        for side in (self.a, self.b):
            side.pump()
        return moved or any((e.out or e.fin) and not c.frozen and not e.other.closed
                            for c in self.conns for e in c.ends)

    def advance(self, dt: float) -> None:
        self.now += dt
        for side in (self.a, self.b):
            side.tick()

    def settle(self, limit: float = 300.0, *, max_bytes: int | None = None) -> None:
        """Run until nothing moves and nothing is due: new connections when asked
        for, time when idle (a frozen path is found by liveness)."""
        start = self.now
        while self.now - start < limit:
            if self.step(max_bytes):
                continue
            if self.a.need_path or self.b.need_path:
                self.a.need_path = self.b.need_path = False
                self.connect(self.rng.choice(["public", "relay", "lan"]))
                continue
            deadlines = [d for d in (self.a.resume.next_deadline, self.b.resume.next_deadline,
                                     *(e.rm.next_deadline for c in self.conns for e in c.ends
                                       if not e.closed))
                         if d is not None]
            if self.done() or not deadlines:
                return
            self.advance(max(0.001, min(deadlines) - self.now))
        raise AssertionError(f"the world did not settle within {limit} s")

    def done(self) -> bool:
        return all(not s.mux.wants_to_send and not s.resume.unacked_bytes
                   for s in (self.a, self.b))

