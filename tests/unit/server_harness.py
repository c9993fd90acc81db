"""The rendezvous server's machine driven as its tests drive it: a fake clock and the
connections a ``ServerMachine`` talks to, as their clients see them (every byte, and how
the server ended each), with the addresses the tests use."""

from __future__ import annotations

from dataclasses import dataclass, field

from nopf_web.rendezvous.server_machine import (
    Accepted,
    Action,
    AskBook,
    Close,
    ConnId,
    Event,
    LastWord,
    Log,
    Lost,
    PeerClosed,
    PollNode,
    Received,
    Reset,
    Send,
    ServerLimits,
    ServerMachine,
    StartRelay,
    StopRelay,
    Tick,
    ToNode,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import REPLY6_SIZE, REPLY_SIZE
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    PakeMessage,
    Ping,
    Pong,
    ServerMessage,
    Welcome,
    decode_server_message,
    encode,
)

SHARER_IP, JOINER_IP = "203.0.113.2", "198.51.100.7"
RDV = ("198.51.100.2", 3012)  # the rendezvous' own address, as every client reaches it
RDV6 = ("2001:db8:100::2", 3012)  # ...and as an IPv6 client does
LAN_A, LAN_B = Endpoint("10.0.1.2", 4000), Endpoint("10.0.2.2", 5000)


@dataclass
class Peer:
    """One connection as its client sees it: every byte and how the server ended it."""

    id: ConnId
    ipv6: bool = False  # over IPv6: the 22-byte reply
    data: bytearray = field(default_factory=bytearray)
    fin: bool = False  # LastWord's FIN
    ended: str | None = None  # "close" | "reset" | "relayed" (handed to the driver)
    sent_at: list[tuple[float, bytes]] = field(default_factory=list)

    @property
    def reply(self) -> bytes:
        return bytes(self.data[:self.reply_size])

    @property
    def reply_size(self) -> int:
        return REPLY6_SIZE if self.ipv6 else REPLY_SIZE

    def messages(self) -> list[ServerMessage]:
        frames = FrameReader()
        return [decode_server_message(p)
                for p in frames.feed(bytes(self.data[self.reply_size:]))]

    def last(self) -> ServerMessage:
        return self.messages()[-1]


class Harness:
    """A machine, a fake clock and the peers it talks to."""

    def __init__(self, limits: ServerLimits | None = None, book: object = None,
                 now: float = 100.0, **kwargs: object) -> None:
        self.m = ServerMachine(limits, book, **kwargs)  # type: ignore[arg-type]
        self.now = now
        self.peers: dict[ConnId, Peer] = {}
        self.logs: list[Log] = []
        self.relays: list[StartRelay] = []
        self.stopped: list[StopRelay] = []
        self.shared: list[AskBook | ToNode | PollNode] = []  # to the shared book, other nodes
        self._next = 0

    def feed(self, event: Event) -> list[Action]:
        actions = self.m.handle(event)
        for a in actions:
            if isinstance(a, Log):
                self.logs.append(a)
                continue
            if isinstance(a, StopRelay):
                self.stopped.append(a)
                continue
            if isinstance(a, AskBook | ToNode | PollNode):
                self.shared.append(a)
                continue
            if isinstance(a, StartRelay):
                self.relays.append(a)
                for cid in (a.a, a.b):
                    peer = self.peers[cid]
                    assert peer.ended is None and not peer.fin, f"relay of an ended {peer}"
                    peer.data += a.greeting
                    peer.ended = "relayed"
                continue
            peer = self.peers[a.conn]
            # After a close, only a reset (the close did not complete in time).
            assert peer.ended is None or (peer.ended == "close" and isinstance(a, Reset)), (
                f"action on an ended connection: {a}")
            if isinstance(a, Send | LastWord):
                assert not peer.fin, "bytes after our FIN"
                peer.data += a.data
                peer.sent_at.append((self.now, a.data))
                peer.fin = isinstance(a, LastWord)
            else:
                peer.ended = "close" if isinstance(a, Close) else "reset"
        return actions

    def connect(self, ip: str = JOINER_IP, port: int | None = None, *, rtt: float | None = 0.02,
                syn_data: bool = False, local: tuple[str, int] | None = RDV) -> Peer:
        self._next += 1
        v6 = ":" in ip and not ip.startswith("::ffff:")
        peer = self.peers[self._next] = Peer(self._next, v6)
        if v6 and local == RDV:
            local = RDV6  # an IPv6 client reaches our IPv6 address
        self.feed(Accepted(peer.id, (ip, port or 40000 + self._next), self.now, rtt, syn_data,
                           local))
        return peer

    def send(self, peer: Peer, data: bytes, rtt: float | None = None) -> list[Action]:
        return self.feed(Received(peer.id, data, self.now, rtt))

    def pong(self, peer: Peer) -> None:
        """Answer every ping ``peer`` has received, as a live client would."""
        for msg in peer.messages():
            if isinstance(msg, Ping):
                self.send(peer, encode(Pong(msg.seq)))

    def close(self, peer: Peer) -> list[Action]:
        return self.feed(PeerClosed(peer.id, self.now))

    def live_peer(self, which: int) -> Peer | None:
        """The ``which``-th (modulo) of the peers whose connection is still up, if any."""
        alive = [p for p in self.peers.values() if p.ended is None and p.id in self.m.conns
                 and not self.m.conns[p.id].gone]
        return alive[which % len(alive)] if alive else None

    def nameplates(self) -> list[int]:
        """Every nameplate the welcomes gave out so far ([1] before the first, so that a
        join always has one to try)."""
        return [m.nameplate for p in self.peers.values() for m in p.messages()
                if isinstance(m, Welcome)] or [1]

    def fuzz_op(self, op: str, peer: Peer, which: int, dt: float) -> None:
        """The fuzz scripts' common ops on a live ``peer``: "pong", "close", "lost" (while
        writing for one ``which`` in three); any other op advances the clock ``dt`` s."""
        if op == "pong":
            self.pong(peer)
        elif op == "close":
            self.close(peer)
        elif op == "lost":
            self.lost(peer, writing=which % 3 == 0)
        else:
            self.advance(dt)

    def lost(self, peer: Peer, error: str = "[Errno 104] Connection reset by peer",
             writing: bool = False) -> list[Action]:
        return self.feed(Lost(peer.id, self.now, error, writing))

    def advance(self, seconds: float) -> list[Action]:
        """Move the clock, delivering every tick that falls due on the way, as a driver's
        timer would."""
        end = self.now + seconds
        actions: list[Action] = []
        while (at := self.m.next_deadline) is not None and at <= end:
            self.now = max(self.now, at)
            actions += self.feed(Tick(self.now))
        self.now = end
        return actions

    def hello(self, hello: Hello, ip: str = JOINER_IP, *, rtt: float | None = 0.02,
              syn_data: bool = False) -> Peer:
        peer = self.connect(ip, rtt=rtt, syn_data=syn_data)
        self.send(peer, encode(hello), rtt)
        return peer

    def share(self, ip: str = SHARER_IP, *, rtt: float = 0.02, probe: Endpoint | None = None,
              pake: bytes | None = None) -> tuple[Peer, int]:
        peer = self.hello(Hello("share", None, (LAN_A,), probe, 10), ip, rtt=rtt)
        welcome = peer.messages()[0]
        assert isinstance(welcome, Welcome), peer.messages()
        if pake is not None:
            self.send(peer, encode(PakeMessage(pake)), rtt)
        return peer, welcome.nameplate

    def join(self, nameplate: int, ip: str = JOINER_IP, *, rtt: float | None = 0.06,
             action: str = "join", probe: Endpoint | None = None, pake: bytes | None = None,
             syn_data: bool = False) -> Peer:
        return self.hello(Hello(action, nameplate, (LAN_B,), probe, 10, pake=pake),  # type: ignore[arg-type]
                          ip, rtt=rtt, syn_data=syn_data)

    def invariants(self) -> None:
        m = self.m
        assert m.stats.open_now == len(m.conns) >= 0
        # A connection the machine holds was not reset or handed over (it may be closing).
        assert all(self.peers[c].ended in (None, "close") for c in m.conns)


def error_of(peer: Peer) -> ErrorReply:
    msg = peer.last()
    assert isinstance(msg, ErrorReply), msg
    return msg


def fires(sharer: Peer, joiner: Peer) -> tuple[Fire, Fire]:
    s, j = sharer.last(), joiner.last()
    assert isinstance(s, Fire) and isinstance(j, Fire), (s, j)
    return s, j
