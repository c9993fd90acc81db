"""The coordinated peer's machine driven as its tests drive it: ``Peer`` plays the
asyncio driver (carries out and records the actions) and lets a test play the rendezvous
and the clock; the addresses and bytes the tests use."""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Sequence
from typing import TypeVar

from nopf_web.pairing import PairingCode, parse_code
from nopf_web.roles import PeerRole
from nopf_web.sessions.coordination_machine import (
    Action,
    AwaitHandshake,
    Close,
    Connect,
    CoordinationConfig,
    CoordinationMachine,
    Fail,
    MakePake,
    Say,
    Send,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import encode_reply
from nopf_web.wire.rendezvous import (
    ClientMessage,
    FrameReader,
    Probe,
    ServerMessage,
    decode_client_message,
    encode,
)

T = TypeVar("T")
RDV = "198.51.100.2:3012"
LOCAL = "10.0.0.2"
PUBLIC = Endpoint("203.0.113.2", 40001)
PEER = Endpoint("192.0.2.2", 50000)
CODE = PairingCode(7, ("orbit", "lantern"))
OUR_PAKE = b"A" + bytes(32)
NET = 5.0


def reply(ep: Endpoint = PUBLIC) -> bytes:
    return encode_reply(ep.host, ep.port)


def frames(*msgs: ServerMessage) -> bytes:
    return b"".join(encode(m) for m in msgs)


def chunks(data: bytes, cuts: Iterable[int]) -> list[bytes]:
    points = sorted({c for c in cuts if 0 < c < len(data)})
    return [data[a:b] for a, b in zip([0, *points], [*points, len(data)], strict=True)]


OWNER = bytes(range(200, 216))  # the sharer's owner secret (hello.owner)


class Peer:
    """Plays the asyncio driver: carries out the machine's actions, records them, and
    lets a test play the rendezvous (bytes in, closes) and the clock."""

    def __init__(self, role: PeerRole, *, pake: bool = True, **config: float) -> None:
        code = parse_code(str(CODE)) if role == "client" else None
        self.machine = CoordinationMachine(
            CoordinationConfig(role=role, where=RDV, code=code, pake=pake, net_timeout=NET,
                               **config),  # type: ignore[arg-type]
            make_code=lambda n: PairingCode(n, CODE.words), entropy=lambda n: OWNER[:n])
        self.now = 0.0
        self.actions: list[Action] = []
        self.sent: dict[int, bytes] = {}
        self.next_port = 40000
        self.ports: dict[int, int] = {}
        self.local = LOCAL  # our address on every connection (an IPv6 one: over IPv6)

    # -- the driver's side --------------------------------------------------------

    def feed(self, actions: Sequence[Action]) -> list[Action]:
        queue, done = deque(actions), []
        while queue:
            action = queue.popleft()
            done.append(action)
            if isinstance(action, MakePake):
                queue.extend(self.machine.pake_made(OUR_PAKE, self.now))
            elif isinstance(action, Send):
                self.sent[action.conn] = self.sent.get(action.conn, b"") + action.data
        self.actions += done
        return done

    def start(self) -> list[Action]:
        return self.feed(self.machine.start(self.now))

    def connect(self, *, deferred: bool = False) -> int:
        """The last Connect succeeds (from its port, or a fresh one for port 0)."""
        action = self.last(Connect)
        port = action.port or self.fresh_port()
        self.ports[action.conn] = port
        self.feed(self.machine.connected(action.conn, Endpoint(self.local, port), deferred,
                                         self.now))
        if deferred:
            assert self.actions[-1] == AwaitHandshake(action.conn)
            self.feed(self.machine.established(action.conn, self.now))
        return action.conn

    def fresh_port(self) -> int:
        self.next_port += 1
        return self.next_port

    def says(self, conn: int, data: bytes, cuts: Iterable[int] = ()) -> list[Action]:
        out: list[Action] = []
        for chunk in chunks(data, cuts):
            out += self.feed(self.machine.received(conn, chunk, self.now))
        return out

    def closes(self, conn: int, error: str | None = None) -> list[Action]:
        return self.feed(self.machine.closed(conn, error, self.now))

    def at(self, now: float) -> list[Action]:
        self.now = now
        return self.feed(self.machine.timer(now))

    # -- what happened --------------------------------------------------------------

    def last(self, kind: type[T]) -> T:
        return next(a for a in reversed(self.actions) if isinstance(a, kind))

    def of(self, kind: type[Action]) -> list[Action]:
        return [a for a in self.actions if isinstance(a, kind)]

    def said(self) -> list[str]:
        return [a.text for a in self.actions if isinstance(a, Say)]

    def client_frames(self, conn: int) -> list[ClientMessage]:
        return [decode_client_message(p) for p in FrameReader().feed(self.sent.get(conn, b""))]

    def failure(self) -> BaseException:
        fails = self.of(Fail)
        assert len(fails) == 1, self.actions
        assert isinstance(fails[0], Fail)
        return fails[0].error

    def probe(self, port: int = 0, cuts: Iterable[int] = ()) -> int:
        """Answer the NAT mapping check that the machine just asked for."""
        action = self.last(Connect)
        assert (action.port, action.fastopen) == (port, False)
        conn = self.connect()
        assert self.client_frames(conn) == [Probe()]
        self.says(conn, reply() + b"ignored", cuts)
        self.closes(conn)
        assert Close(conn) in self.actions
        return self.ports[conn]
