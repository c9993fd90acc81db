"""The coordinated peer's asyncio driver: sockets for the pure machine.

:func:`coordinate` pairs by code through the rendezvous and returns a connected
socket to the peer, punched or relayed (:class:`PairedTunnel`). What to do, and when, is decided by
:class:`~nopf_web.sessions.coordination_machine.CoordinationMachine`; this
module only reads, feeds and acts: it opens the connections the machine asks
for (from the punch port, with TCP Fast Open where it can), reads them and
feeds the bytes, runs each punch with :class:`~nopf_web.punch.driver.PunchDriver`,
and calls the machine's timer. Every child task lives in one TaskGroup that
ends with :func:`coordinate`.

The words of the code never leave this process; encryption over the whole code
is the caller's business. The caller may hand in its SPAKE2 half (``pake``): its
message then travels with the coordination (the hello, or for the sharer a
pake message once its code exists), the peer's comes back in the fire, and the
SPAKE2 arithmetic is finished while the SYNs cross, so the tunnel only has the
key confirmation left to do.

:func:`share` and :func:`connect` are the same with keyword arguments.

:func:`meet_again` runs one *resume* meeting for an established tunnel (by its
resume id, no code) and returns a new connection to the peer with its path
kind (:class:`NewPath`): for a resumable tunnel whose path was lost, or that
tries to leave the relay for a direct path.

Paths: a punch runs :class:`~nopf_web.punch.driver.PunchDriver`; a relay path
opens a connection to the relay (TCP Fast Open where it can: the relay message
rides in the SYN) and runs
:class:`~nopf_web.sessions.relay_join_machine.RelayJoinMachine` on it, reading
exactly what it asks for, so that no byte after ``relayed`` (the tunnel's) is
read here.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import os
import socket
import time
from collections import Counter, deque
from collections.abc import Callable, Coroutine
from dataclasses import dataclass, field, fields
from typing import Any, Protocol

from nopf_web.happy_eyeballs import by_family, resolve_all
from nopf_web.pairing import parse_code
from nopf_web.prediction import PairFacts, Prediction, fire_facts
from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import Failure, PunchTimeout, Tactic
from nopf_web.rendezvous.client import (
    connected_within,
    coordinated_first,
    describe_connect_error,
    reach_rendezvous,
    socket_for_rendezvous,
)
from nopf_web.rendezvous.errors import RendezvousUnreachable
from nopf_web.roles import PeerRole
from nopf_web.sockets import (
    connect_nonblocking,
    require_readiness,
    try_fastopen,
    tune_stream,
    wait_connected,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import NatSummary

from .coordination_machine import (
    DEFAULT_PUNCH_TTL,
    READ_SIZE,
    AbandonPath,
    Action,
    AwaitHandshake,
    AwaitMapped,
    Close,
    Connect,
    CoordinationConfig,
    CoordinationMachine,
    Fail,
    FinishPake,
    Fired,
    Gathered,
    MakePake,
    Met,
    OpenPath,
    Paired,
    PathKind,
    Punch,
    Resume,
    Say,
    Send,
    ShowCode,
    Succeed,
    ViaRelay,
)
from .relay_join_machine import RelayFailed, RelayJoinMachine, RelayOutcome
from .timeline import Timeline

PORT_FREE_WAIT = 2.0  # s to wait for our end of the probe to close (one RTT)


class PakeHalf(Protocol):
    """One side's SPAKE2 (``nopf_web.tunnel.secure.Pake``), as coordination needs it."""

    @property
    def message(self) -> bytes: ...  # ours, for the peer (33 bytes)

    def finish(self, peer_message: bytes) -> None: ...  # never raises


PakeFactory = Callable[[str], PakeHalf]  # the full code -> our half
EventSink = Callable[[str], None]
PredictionSink = Callable[[Prediction, PairFacts], None]  # and the facts it came from


@dataclass(frozen=True)
class CoordinationSpec:
    rendezvous: Endpoint  # host name or IPv4 address, and port
    role: PeerRole  # server: share (get a code); client: join with ``code``
    code: str | None = None  # the sharer's code, as typed (client only)
    code_lifetime: float = 600.0  # how long a sharer waits for its peer
    punch_timeout: float = 30.0
    net_timeout: float = 5.0
    punch_ttl: int = DEFAULT_PUNCH_TTL
    punch_port: int = 0  # 0: a fresh port for every meeting (fresh NAT mappings too)
    bind_host: str = "0.0.0.0"
    candidates: DirectCandidates | None = None  # ours (None: no candidates in the hello)
    nat: NatSummary | None = None  # our doctor report, sent with the hello (None: none)
    # The rendezvous as the user named it, when ``rendezvous`` is one of its addresses: a
    # sharer whose connection breaks registers its code again through the next one.
    name: Endpoint | None = None


def _no_mapping() -> tuple[Endpoint, int] | None:
    return None


@dataclass(frozen=True)
class DirectCandidates:
    """Our direct candidates (:mod:`nopf_web.sessions.candidates` gathers them) and, for
    a mapped port, the listener it forwards to (the caller's: it lives as long as the
    mapping, across meetings). ``mapped`` reads the mapping as it is now (a renewal
    may move it): the public address and port, and the local port; None: none."""

    ipv6: tuple[Endpoint, ...] = ()
    listener: socket.socket | None = None
    mapped: Callable[[], tuple[Endpoint, int] | None] = _no_mapping

    @property
    def gathered(self) -> Gathered:
        now = self.mapped() if self.listener is not None else None
        if now is None:
            return Gathered(self.ipv6)
        return Gathered(self.ipv6, now[0], now[1])


@dataclass(frozen=True)
class PairedTunnel(Paired):
    """A pairing's tunnel: the socket is connected, NON-blocking, TCP_NODELAY, and the
    caller's to close.

    ``early``: bytes of the tunnel already read from the socket (they come before
    anything read from it). This driver reads a relay's messages exactly, so it is
    always empty here; it is part of the contract for drivers that read ahead."""

    sock: socket.socket = field(kw_only=True)
    early: bytes = field(default=b"", kw_only=True)


@dataclass(frozen=True)
class NewPath(Met):
    """A resume meeting's new connection to the peer (as :class:`PairedTunnel`'s socket:
    connected, non-blocking, TCP_NODELAY, the caller's); ``path`` says which kind."""

    sock: socket.socket = field(kw_only=True)
    early: bytes = field(default=b"", kw_only=True)


async def coordinate(spec: CoordinationSpec, *, pake: PakeFactory | None = None,
                     on_code: EventSink | None = None, on_event: EventSink | None = None,
                     on_punching: EventSink | None = None,
                     on_prediction: PredictionSink | None = None,
                     timeline: Timeline | None = None) -> PairedTunnel:
    """Pair through the rendezvous and punch; raise a typed error (one line) on failure.

    A malformed client code raises :class:`nopf_web.pairing.BadCode` before any
    traffic. Words that do not match are not detected here (the rendezvous never
    sees them): the caller's PAKE over ``PairedTunnel.code`` catches them.
    ``on_code`` gets the sharer's code as soon as it exists, ``on_event`` each
    progress line, ``on_punching`` (default: ``on_event``) the line of a punch
    that starts, ``on_prediction`` the path predicted when the fire comes (before the
    first SYN). ``timeline`` (optional) gets the attempt's marks as they happen.
    """
    require_readiness()  # before any traffic: one line on a Proactor loop
    code = parse_code(spec.code) if spec.code is not None else None
    server = await reach_rendezvous(spec.rendezvous, spec.net_timeout, on_event=on_event,
                                    coordinated=True)
    machine = CoordinationMachine(CoordinationConfig(
        role=spec.role, where=str(Endpoint(*server)), code=code,
        code_lifetime=spec.code_lifetime, punch_timeout=spec.punch_timeout,
        net_timeout=spec.net_timeout, punch_ttl=spec.punch_ttl, punch_port=spec.punch_port,
        bind_host=spec.bind_host, pake=pake is not None, nat=spec.nat,
        candidates=spec.candidates.gathered if spec.candidates else None))
    driver = _Driver(machine, server, spec.bind_host, spec.net_timeout, pake, on_code, on_event,
                     on_punching or on_event, on_prediction, timeline,
                     name=spec.name or spec.rendezvous)
    driver.mapped_listener = spec.candidates.listener if spec.candidates else None
    tunnel = await driver.run()
    assert isinstance(tunnel, PairedTunnel)
    return tunnel


async def meet_again(rendezvous: Endpoint, role: PeerRole, resume_id: bytes, *,
                     direct_only: bool = False, timeout: float = 60.0,
                     net_timeout: float = 5.0, punch_ttl: int = DEFAULT_PUNCH_TTL,
                     bind_host: str = "0.0.0.0", punch_port: int = 0,
                     on_event: EventSink | None = None,
                     candidates: DirectCandidates | None = None) -> NewPath:
    """Meet the peer of an established tunnel again through the rendezvous and return a
    new connection to it (punched, or relayed unless ``direct_only``).

    ``role``: this side of the tunnel ("server": the sharer, "client": the joiner);
    ``resume_id``: the tunnel's resume id (RESUME_ID_SIZE bytes, the same on both
    sides); ``timeout``: the plan's budget (the punch stages and the relay together;
    the rendezvous uses the smaller of the two peers'). The first side to arrive
    waits up to RESUME_WAIT (30 s) for the other. Raises a typed error (one line):
    :class:`~nopf_web.sessions.errors.PeerDidNotResume`,
    :class:`~nopf_web.sessions.errors.SymmetricNat` (``direct_only`` and no punch
    can work), :class:`~nopf_web.sessions.errors.CoordinatedPunchTimeout`, a relay
    error (``RelayRefused``, ``RelayTimeout``) or a rendezvous error.
    The connection carries nothing yet: the tunnel's path handshake comes next.
    """
    server = await reach_rendezvous(rendezvous, net_timeout, on_event=on_event,
                                    coordinated=True)
    machine = CoordinationMachine(CoordinationConfig(
        role=role, where=str(Endpoint(*server)), punch_timeout=timeout,
        net_timeout=net_timeout, punch_ttl=punch_ttl, punch_port=punch_port,
        bind_host=bind_host, resume=Resume(resume_id, direct_only),
        candidates=candidates.gathered if candidates else None))
    driver = _Driver(machine, server, bind_host, net_timeout, None, None, on_event, on_event)
    driver.mapped_listener = candidates.listener if candidates else None
    path = await driver.run()
    assert isinstance(path, NewPath)
    return path


async def share(
    rendezvous: tuple[str, int], *, on_code: EventSink, timeout: float = 600,
    punch_timeout: float = 30, bind_host: str = "0.0.0.0", punch_port: int = 0,
    net_timeout: float = 5.0, punch_ttl: int = DEFAULT_PUNCH_TTL,
    on_event: EventSink | None = None, pake: PakeFactory | None = None,
    candidates: DirectCandidates | None = None,
) -> PairedTunnel:
    """Get a code (passed to ``on_code`` as soon as it exists), wait up to ``timeout``
    for a peer to use it, then punch for up to ``punch_timeout`` seconds."""
    return await coordinate(CoordinationSpec(
        Endpoint(*rendezvous), "server", code_lifetime=timeout, punch_timeout=punch_timeout,
        net_timeout=net_timeout, punch_ttl=punch_ttl, punch_port=punch_port,
        bind_host=bind_host, candidates=candidates), pake=pake, on_code=on_code,
        on_event=on_event)


async def connect(
    rendezvous: tuple[str, int], code: str, *, punch_timeout: float = 30,
    bind_host: str = "0.0.0.0", punch_port: int = 0, net_timeout: float = 5.0,
    punch_ttl: int = DEFAULT_PUNCH_TTL, on_event: EventSink | None = None,
    pake: PakeFactory | None = None, candidates: DirectCandidates | None = None,
) -> PairedTunnel:
    """Join the sharer of ``code`` and punch for up to ``punch_timeout`` seconds."""
    return await coordinate(CoordinationSpec(
        Endpoint(*rendezvous), "client", code=code, punch_timeout=punch_timeout,
        net_timeout=net_timeout, punch_ttl=punch_ttl, punch_port=punch_port,
        bind_host=bind_host, candidates=candidates), pake=pake, on_event=on_event)


# -- sockets to the rendezvous ---------------------------------------------------------


async def open_from(server: tuple[str, int], bind_host: str, port: int, net_timeout: float,
                    *, fastopen: bool) -> tuple[socket.socket, bool]:
    """A connection to the rendezvous from ``port`` (0: any), waiting briefly while an
    earlier use of the port frees its 4-tuple. With ``fastopen`` the socket may come
    back with its connect deferred (True): the first send carries the SYN, and
    :func:`handshake_done` waits for the rest."""
    where = str(Endpoint(*server))  # "[v6]:port" over IPv6
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PORT_FREE_WAIT
    while True:
        sock = socket_for_rendezvous(bind_host, port)
        kept = False
        try:
            if fastopen and try_fastopen(sock):
                err = sock.connect_ex(server)
                if err == 0:
                    kept = True
                    return sock, True
                if err not in (errno.EINPROGRESS, errno.EALREADY):
                    raise OSError(err, os.strerror(err))
                # Not deferred (no Fast Open after all): the SYN is out, wait as usual.
                async with asyncio.timeout(net_timeout):
                    await wait_connected(sock)
            else:
                async with asyncio.timeout(net_timeout):
                    await connect_nonblocking(sock, server)
            kept = True
            return sock, False
        except TimeoutError:
            raise RendezvousUnreachable(
                f"rendezvous {where} did not answer the connection within {net_timeout:g} s"
            ) from None
        except OSError as exc:
            if exc.errno != errno.EADDRNOTAVAIL or loop.time() >= give_up:
                raise RendezvousUnreachable(
                    f"rendezvous {where}: {describe_connect_error(exc)}") from None
        finally:
            if not kept:
                sock.close()
        await asyncio.sleep(0.02)


async def handshake_done(sock: socket.socket, where: str, net_timeout: float) -> None:
    """Wait for a Fast Open connection's handshake, with :func:`open_from`'s errors."""
    await connected_within(wait_connected(sock), where, net_timeout)


# -- the driver ----------------------------------------------------------------------

_Input = Callable[[float], list[Action]]  # one event for the machine, given ``now``


class _Driver:
    def __init__(self, machine: CoordinationMachine, server: tuple[str, int], bind_host: str,
                 net_timeout: float, pake: PakeFactory | None, on_code: EventSink | None,
                 on_event: EventSink | None, on_punching: EventSink | None,
                 on_prediction: PredictionSink | None = None,
                 timeline: Timeline | None = None, *,
                 name: Endpoint | None = None) -> None:
        self.machine = machine
        self.server = server
        self.name = name  # the rendezvous as given: its other addresses, when one fails
        self.bind_host, self.net_timeout = bind_host, net_timeout
        self.pake = pake
        self.half: PakeHalf | None = None
        self.on_code, self.on_event, self.on_punching = on_code, on_event, on_punching
        self.inbox: asyncio.Queue[_Input] = asyncio.Queue()
        self.conns: dict[int, socket.socket] = {}
        self.tasks: dict[tuple[str, int], asyncio.Task[None]] = {}  # (kind, id) -> task
        self.opened: dict[int, socket.socket] = {}  # path -> its connected socket
        self.early: dict[int, bytes] = {}  # path -> the tunnel's bytes already read
        self.tg: asyncio.TaskGroup | None = None
        self.mapped_listener: socket.socket | None = None  # our mapped port's (the caller's)
        self.on_prediction = on_prediction
        self.timeline = timeline
        self.stages: dict[int, str] = {}  # path -> its stage's words, for the timeline
        self._began: dict[int, float] = {}  # a deferred connection's connect() call
        self._first_fire: float | None = None

    def _mark(self, kind: str, text: str, **data: Any) -> None:
        if self.timeline is not None:
            self.timeline.add(time.monotonic(), kind, text, **data)

    async def run(self) -> PairedTunnel | NewPath:
        failure: Exception | None = None
        tunnel: PairedTunnel | NewPath | None = None
        try:
            async with asyncio.TaskGroup() as tg:
                self.tg = tg
                try:
                    tunnel = await self._loop()
                except Exception as exc:  # carried out of the group as is, not as a group
                    failure = exc
                finally:
                    for task in self.tasks.values():
                        task.cancel()
        finally:
            # Every child has ended: no reader or writer is registered on these any more.
            for sock in [*self.conns.values(), *self.opened.values()]:
                if tunnel is None or sock is not tunnel.sock:
                    sock.close()
        if failure is not None:
            raise failure
        assert tunnel is not None
        return tunnel

    async def _loop(self) -> PairedTunnel | NewPath:
        machine = self.machine
        pending: deque[Action] = deque(machine.start(time.monotonic()))
        while True:
            while pending:
                done = await self._act(pending.popleft(), pending)
                if done is not None:
                    return done
            wake = machine.wake_at
            now = time.monotonic()
            if wake is not None and wake <= now:
                pending.extend(machine.timer(now))
                continue
            try:
                async with asyncio.timeout(None if wake is None else wake - now):
                    event = await self.inbox.get()
            except TimeoutError:
                pending.extend(machine.timer(time.monotonic()))
                continue
            pending.extend(event(time.monotonic()))

    async def _act(self, action: Action, pending: deque[Action],
                   ) -> PairedTunnel | NewPath | None:
        machine = self.machine
        if isinstance(action, Send):
            sock = self.conns.get(action.conn)
            if sock is not None:
                try:
                    await asyncio.get_running_loop().sock_sendall(sock, action.data)
                except OSError as exc:
                    self._post(machine.closed, action.conn, exc.strerror or str(exc))
        elif isinstance(action, Connect):
            self._spawn("conn", action.conn, self._open(action))
            await asyncio.sleep(0)  # the connect task sends its SYN before we go on
        elif isinstance(action, AwaitHandshake):
            self._spawn("handshake", action.conn, self._handshake(action.conn))
        elif isinstance(action, Close):
            self._drop(action.conn)
        elif isinstance(action, MakePake):
            assert self.pake is not None
            self.half = self.pake(action.code)
            pending.extend(machine.pake_made(self.half.message, time.monotonic()))
        elif isinstance(action, FinishPake):
            assert self.half is not None
            await asyncio.sleep(0)  # the path's first SYN leaves, then the maths
            self.half.finish(action.peer_message)  # runs while that SYN crosses
        elif isinstance(action, ShowCode):
            if self.on_code is not None:
                self.on_code(action.code)
        elif isinstance(action, Say):
            sink = self.on_punching if action.punching else self.on_event
            if sink is not None:
                sink(action.text)
        elif isinstance(action, Fired):
            self._fired(action)
        elif isinstance(action, OpenPath):
            how = action.how
            self._mark_stage(action.path, how)
            body = (self._punch(action.path, how) if isinstance(how, Punch)
                    else self._await_mapped(action.path, how) if isinstance(how, AwaitMapped)
                    else self._relay(action.path, how))
            self._spawn("path", action.path, body)
        elif isinstance(action, AbandonPath):
            task = self.tasks.pop(("path", action.path), None)
            if task is not None:
                task.cancel()
            sock = self.opened.pop(action.path, None)
            self.early.pop(action.path, None)
            if sock is not None:
                sock.close()
        elif isinstance(action, Succeed):
            if self.timeline is not None:
                # A sharer's setup starts when its peer arrives (its first fire): the
                # wait for a peer to use the code is no setup. A joiner's, at its start.
                now = time.monotonic()
                began = (self._first_fire if self.machine.config.role == "server"
                         and self._first_fire is not None else self.timeline.origin)
                setup = round((now - began) * 1000, 1)
                self._mark("path", f"path chosen: {action.paired.path} "
                           f"({self.stages.get(action.path, '')}), set up in {setup:.0f} ms",
                           path=action.paired.path, setup_ms=setup)
            sock = self.opened.pop(action.path)
            early = self.early.pop(action.path, b"")
            values = {f.name: getattr(action.paired, f.name) for f in fields(action.paired)}
            if isinstance(action.paired, Paired):
                return PairedTunnel(**values, sock=sock, early=early)
            return NewPath(**values, sock=sock, early=early)
        elif isinstance(action, Fail):
            self._mark("failed", str(action.error).splitlines()[0] if str(action.error)
                       else type(action.error).__name__)
            raise action.error
        return None

    def _fired(self, action: Fired) -> None:
        fire = action.fire
        if self._first_fire is None:
            self._first_fire = time.monotonic()
        if action.number > 1:
            self._mark("retry", f"coordinated again: attempt {action.number}",
                       attempt=action.number)
        plan = ", ".join([*(f"{s.path} {s.punch} {s.budget:.3g} s" for s in fire.plan),
                          *([f"relay {fire.relay.budget:.3g} s"] if fire.relay else [])])
        data: dict[str, Any] = {"attempt": action.number, "rtt_ms": fire.rtt_ms}
        if action.prediction is not None:
            data["prediction"] = action.prediction.to_json()
        self._mark("fire", f"fire instruction (attempt {action.number}): {plan}; peer "
                   f"round trip about {fire.rtt_ms:.0f} ms", **data)
        if action.prediction is not None and self.on_prediction is not None:
            cfg = self.machine.config
            facts = self.machine.facts or fire_facts(fire, cfg.role, cfg.nat)
            self.on_prediction(action.prediction, facts)

    def _mark_stage(self, path: int, how: PathKind) -> None:
        if isinstance(how, AwaitMapped):
            self.stages[path] = f"mapped, accept on local port {how.port}"
            self._mark("stage", f"mapped port: accept from {how.peer_ip} on local port "
                       f"{how.port}, {how.budget:.3g} s", path="mapped", tactic="accept",
                       budget_s=how.budget, peer=how.peer_ip)
        elif isinstance(how, Punch):
            words = f"{how.stage.path} {how.stage.punch} to {how.stage.peer}"
            self.stages[path] = f"{how.stage.path}, {how.stage.punch}"
            self._mark("stage", f"punch: {words}, {how.stage.budget:.3g} s", path=how.stage.path,
                       tactic=how.stage.punch, budget_s=how.stage.budget, peer=str(how.stage.peer))
        else:
            self.stages[path] = f"via {how.stage.relay}"
            self._mark("stage", f"relay at {how.stage.relay}, {how.stage.budget:.3g} s",
                       path="relay", budget_s=how.stage.budget, peer=str(how.stage.relay))

    # -- children: each reports to the inbox, never raises into the group --------------

    def _post(self, event: Callable[..., list[Action]], *args: Any) -> None:
        """Queue ``event(*args, now)`` for the machine (``now``: when it is handled)."""
        self.inbox.put_nowait(functools.partial(event, *args))

    def _spawn(self, kind: str, key: int, body: Coroutine[Any, Any, None]) -> None:
        assert self.tg is not None
        self.tasks[(kind, key)] = self.tg.create_task(self._reporting(body),
                                                      name=f"coord-{kind}-{key}")

    async def _reporting(self, body: Coroutine[Any, Any, None]) -> None:
        try:
            await body
        except Exception as exc:  # a bug, or an error no event covers: end coordinate()
            self._post(_reraise, exc)

    async def _next_server(self) -> None:
        """Move to the rendezvous' next address (its name resolved again: the nodes of a
        shared rendezvous behind one name); the same one if it has no other. The family
        reach_rendezvous tries first keeps its addresses first (an IPv4 connection is
        the one our IPv4 punch is planned from), then the other family's."""
        if self.name is None:
            return
        try:
            found = await resolve_all(self.name, self.net_timeout)
        except RendezvousUnreachable:
            return  # keep the address we have: the next try resolves again
        order = by_family(found, coordinated_first(found))
        at = order.index(self.server) + 1 if self.server in order else 0
        self.server = order[at % len(order)]

    async def _open(self, action: Connect) -> None:
        if action.rotate:
            await self._next_server()
        began = time.monotonic()
        try:
            sock, deferred = await open_from(self.server, _bind_for(self.server[0], self.bind_host),
                                             action.port, self.net_timeout,
                                             fastopen=action.fastopen)
        except RendezvousUnreachable as exc:
            self._post(self.machine.connect_failed, action.conn, exc)
            return
        if deferred:
            self._began[action.conn] = began
        else:
            self._rendezvous_up(action.conn, began, sock)
        self.conns[action.conn] = sock
        if not deferred:
            self._spawn("read", action.conn, self._read(action.conn, sock))
        local = Endpoint(*sock.getsockname()[:2])
        self._post(self.machine.connected, action.conn, local, deferred)

    async def _handshake(self, conn: int) -> None:
        sock = self.conns[conn]
        try:
            await handshake_done(sock, str(Endpoint(*self.server)), self.net_timeout)
        except RendezvousUnreachable as exc:
            self._post(self.machine.connect_failed, conn, exc)
            return
        self._rendezvous_up(conn, self._began.pop(conn, time.monotonic()), sock, fastopen=True)
        self._spawn("read", conn, self._read(conn, sock))
        self._post(self.machine.established, conn)

    def _rendezvous_up(self, conn: int, began: float, sock: socket.socket, *,
                       fastopen: bool = False) -> None:
        rtt = round((time.monotonic() - began) * 1000, 1)
        how = " (the hello in its SYN)" if fastopen else ""
        self._mark("rendezvous", f"rendezvous connection {conn} up in {rtt:.1f} ms{how}, "
                   f"from port {sock.getsockname()[1]}", rtt_ms=rtt, conn=conn)

    async def _read(self, conn: int, sock: socket.socket) -> None:
        loop = asyncio.get_running_loop()
        machine = self.machine
        while True:
            try:
                data = await loop.sock_recv(sock, READ_SIZE)
            except OSError as exc:
                self._post(machine.closed, conn, exc.strerror or str(exc))
                return
            if not data:
                self._post(machine.closed, conn, None)
                return
            self._post(machine.received, conn, data)

    async def _punch(self, path: int, how: Punch) -> None:
        peer = how.stage.peer
        stage = how.stage.path

        def syn(attempt: int, ttl: int | None) -> None:
            self._mark("syn", f"SYN #{attempt} ({stage}) to {peer}, TTL "
                       f"{ttl if ttl is not None else 'default'}", attempt=attempt, ttl=ttl,
                       stage=stage)

        def answer(attempt: int, what: str, detail: str) -> None:
            self._mark("answer", f"SYN #{attempt} ({stage}): {what} ({detail})",
                       attempt=attempt, answer=what, detail=detail, stage=stage)

        driver = PunchDriver((how.local.host, how.local.port), (peer.host, peer.port),
                             Tactic.ARM if how.stage.punch == "arm" else Tactic.CONNECT,
                             how.config, nat_hint=how.nat_hint, on_notice=self.on_event,
                             on_attempt=syn if self.timeline is not None else None,
                             on_answer=answer if self.timeline is not None else None)
        try:
            sock = await driver.run()
        except PunchTimeout as exc:
            self._mark("stage_failed", f"{stage} punch failed: {str(exc).splitlines()[0]}",
                       stage=stage)
            self._post(self.machine.path_failed, path, exc)
            return
        tune_stream(sock)
        self.opened[path] = sock
        # A path from any port (to a mapped port) says which one it got.
        local = Endpoint(*sock.getsockname()[:2]) if how.local.port == 0 else None
        self.inbox.put_nowait(functools.partial(self.machine.path_opened, path, local=local))

    async def _await_mapped(self, path: int, how: AwaitMapped) -> None:
        """Accept the peer's connection to our mapped port (from the peer's public IP,
        any port) on the listener the caller holds, within the rung's budget."""
        listener = self.mapped_listener
        loop = asyncio.get_running_loop()
        refused = 0
        try:
            if listener is None or listener.getsockname()[1] != how.port:
                raise TimeoutError
            async with asyncio.timeout(how.budget):
                while True:
                    sock, addr = await loop.sock_accept(listener)
                    if str(addr[0]).removeprefix("::ffff:") == how.peer_ip:
                        break
                    refused += 1  # not the peer: a scanner, or another NAT's user
                    sock.close()
        except TimeoutError:
            others = f" ({refused} connection(s) from other addresses closed)" if refused else ""
            self._post(self.machine.path_failed, path, PunchTimeout(
                f"no connection from {how.peer_ip} to our mapped port within "
                f"{how.budget:.3g} s{others}", Counter({Failure.SILENT: 1})))
            return
        sock.setblocking(False)
        tune_stream(sock)
        self.opened[path] = sock
        local = Endpoint(*sock.getsockname()[:2])
        self.inbox.put_nowait(functools.partial(self.machine.path_opened, path, local=local))

    async def _relay(self, path: int, how: ViaRelay) -> None:
        """A connection to the relay, joined with the peer's (or the typed failure)."""
        relay = how.stage.relay
        join = RelayJoinMachine(how.stage, time.monotonic(), net_timeout=self.net_timeout)
        try:  # from a fresh port: the punch port's mappings are the punch's
            sock, deferred = await open_from((relay.host, relay.port),
                                             _bind_for(relay.host, how.bind_host), 0,
                                             self.net_timeout, fastopen=True)
        except RendezvousUnreachable as exc:
            self._post(self.machine.path_failed, path, RendezvousUnreachable(f"relay: {exc}"))
            return
        kept = False
        try:
            outcome = await _join_relay(sock, deferred, join)
            if isinstance(outcome, RelayFailed):
                self._post(self.machine.path_failed, path, outcome.error)
                return
            tune_stream(sock)
            self.opened[path], self.early[path] = sock, outcome.early
            kept = True
        finally:
            if not kept:
                sock.close()
        local = Endpoint(*sock.getsockname()[:2])
        self.inbox.put_nowait(functools.partial(self.machine.path_opened, path, local=local))

    def _drop(self, conn: int) -> None:
        """End a connection now: its tasks cancelled, the selector told before the close
        (so a reused descriptor number is never confused), the socket closed."""
        for kind in ("conn", "handshake", "read"):
            task = self.tasks.pop((kind, conn), None)
            if task is not None:
                task.cancel()
        sock = self.conns.pop(conn, None)
        if sock is None:
            return
        loop = asyncio.get_running_loop()
        with contextlib.suppress(OSError, ValueError, NotImplementedError):  # Proactor: none
            loop.remove_reader(sock.fileno())
            loop.remove_writer(sock.fileno())
        sock.close()


async def _join_relay(sock: socket.socket, deferred: bool,
                      join: RelayJoinMachine) -> RelayOutcome:
    """Send the relay message (in the SYN with Fast Open), then read exactly what the
    machine asks for until it knows the outcome."""
    loop = asyncio.get_running_loop()
    try:
        await loop.sock_sendall(sock, join.message)
        if deferred:
            await handshake_done(sock, join.where, join.net_timeout)
    except OSError as exc:
        return RelayFailed(RendezvousUnreachable(f"relay {join.where}: "
                                                 f"{exc.strerror or exc}"))
    except RendezvousUnreachable as exc:
        return RelayFailed(RendezvousUnreachable(f"relay: {exc}"))
    while True:
        try:
            async with asyncio.timeout(max(0.0, join.deadline - time.monotonic())):
                data = await loop.sock_recv(sock, join.want())
        except TimeoutError:
            # The deadline passed (the loop's clock said so): its failure, whatever ours says.
            out: RelayOutcome | None = join.timer(max(time.monotonic(), join.deadline))
        except OSError as exc:
            out = join.closed(exc.strerror or str(exc), time.monotonic())
        else:
            out = (join.received(data, time.monotonic()) if data
                   else join.closed(None, time.monotonic()))
        if out is not None:
            return out


def _bind_for(target: str, bind_host: str) -> str:
    """Where a connection to ``target`` binds: ``bind_host``, but the IPv6 wildcard for
    an IPv6 target when bound to the IPv4 one (the default): a rendezvous reached over
    IPv6, and its relay."""
    return "::" if ":" in target and bind_host == "0.0.0.0" else bind_host


def _reraise(exc: Exception, now: float) -> list[Action]:
    raise exc


__all__ = [
    "CoordinationSpec",
    "DirectCandidates",
    "NewPath",
    "PairedTunnel",
    "PakeFactory",
    "PakeHalf",
    "connect",
    "coordinate",
    "meet_again",
    "share",
]
