"""Coordinated mode (``nopf share`` / ``nopf connect``): pair by code, punch or relay,
authenticate, multiplex, and keep the tunnel up across path changes.

    server (shares local_port):  coordinate() -> code -> PairedTunnel
    client (listens on it):      coordinate(code) -> PairedTunnel
    both:  SPAKE2 over the whole code -> AES-GCM records -> ResumableChannel -> Mux
           (the SPAKE2 messages travel through the rendezvous with the coordination;
           the tunnel carries the key confirmation, and records follow it at once)
           server: every stream the peer opens -> 127.0.0.1:<local_port>
           client: every connection to 127.0.0.1:<local_port> -> a stream

The mux runs over a :class:`~nopf_web.tunnel.resumable.ResumableChannel`, which
watches each path (liveness, RST) and replays what the peer has not
acknowledged over the next one, so no stream notices a path change. The
engine's path keeper (:class:`~nopf_web.sessions.path_machine.PathMachine` and
its driver here) gives the channel those paths: when the path is lost, both
peers meet again through the rendezvous by the tunnel's resume id
(:func:`~nopf_web.sessions.coordination.meet_again`: the punch, then the relay),
within the resume budget; while the tunnel runs over the relay, they try a
direct path in the background (5, 10, 20, 30, 30... s) and the leader moves the
tunnel there. While the path is fine nothing talks to the rendezvous: a tunnel
outlives ``nopf-server``.
"""

from __future__ import annotations

import asyncio
import functools
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import ClassVar

from nopf_web.errors import NopfError
from nopf_web.prediction import PairFacts, Prediction, nat_pair
from nopf_web.rendezvous.client import reach_rendezvous
from nopf_web.rendezvous.errors import RendezvousProtocolError
from nopf_web.roles import PeerRole
from nopf_web.tunnel.errors import PeerLost, TunnelError
from nopf_web.tunnel.forward import serve_connect, serve_share
from nopf_web.tunnel.mux import Mux
from nopf_web.tunnel.resumable import ResumableChannel
from nopf_web.tunnel.resume_machine import (
    MIN_TIMEOUT,
    NeedPath,
    PathLost,
    PathSelected,
    PeerClosed,
    ResumeEvent,
    TunnelFailed,
)
from nopf_web.tunnel.secure import Pake
from nopf_web.wire.address import LOCAL_HOST, Endpoint, is_loopback, local_listing, local_text
from nopf_web.wire.frames import MAX_SERVICES
from nopf_web.wire.nat import NatSummary

from .candidates import direct_candidates
from .coordination import (
    CoordinationSpec,
    DirectCandidates,
    NewPath,
    PairedTunnel,
    coordinate,
    meet_again,
)
from .coordination_machine import TUNNEL_PATHS, Timings, TunnelPath, path_words
from .engine import EngineBase, Event, Mode, Snapshot, State, task_group
from .local import exposure, listen_local
from .path_machine import (
    UPGRADE_DELAYS,
    Cancel,
    Meet,
    PathAction,
    PathMachine,
    Report,
    backoff,
)
from .timeline import Timeline

DEFAULT_KEEPALIVE = 15.0  # s; well under common NAT idle timeouts (30 s and up)
# Without --resume-budget: this many keepalive intervals (60 s at the default 15 s).
# A peer that stays unreachable that long is lost, as "three missed keepalives" was
# before the tunnel could resume.
RESUME_KEEPALIVES = 4


@dataclass(frozen=True)
class CoordinatedSpec:
    role: PeerRole  # "server" shares local_port, "client" listens on it
    local_port: int
    rendezvous: Endpoint
    code: str | None = None  # required for the client
    code_lifetime: float = 600.0  # how long a sharer waits for its peer
    punch_timeout: float = 30.0
    keepalive: float = DEFAULT_KEEPALIVE
    local_host: str = LOCAL_HOST  # the service (server) or the listener (client)
    # More services (server: its 2nd, 3rd... -p), or the listeners for the sharer's
    # 2nd, 3rd... services (client); the tunnel carries them all.
    more_local: tuple[Endpoint, ...] = ()
    net_timeout: float = 5.0
    # How long a lost path may take to be replaced before the tunnel fails (None:
    # RESUME_KEEPALIVES x keepalive).
    resume_budget: float | None = None
    # While relayed, the first try of a direct path this long after the relay was
    # selected; then doubling, at most every UPGRADE_CAP (30 s).
    retry_direct: float = UPGRADE_DELAYS[0]
    # Ask the gateway for a mapped port (NAT-PMP, PCP, UPnP-IGD) and offer it. The
    # sharer waits for the gateway's answer before its hello; the connector asks in the
    # background and offers it once granted (its hello never waits; both peers check it
    # at the fire against the address the rendezvous saw). Deleted when the session ends.
    port_mapping: bool = True
    ipv6: bool = True  # offer our global IPv6 addresses (the ladder's "ipv6" rung)
    # Our NAT doctor's report (compact), sent with the hello so that the rendezvous and
    # both peers predict the path (None: none is sent).
    nat: NatSummary | None = None

    def __post_init__(self) -> None:
        if self.role == "client" and not self.code:
            raise ValueError("a client session needs the sharer's pairing code")
        if self.keepalive <= 0:
            raise ValueError("keepalive must be positive")
        if self.resume_budget is not None and self.resume_budget <= 0:
            raise ValueError("the resume budget must be positive")
        if self.retry_direct <= 0:
            raise ValueError("the direct path's retry delay must be positive")
        if len(self.local_sides) > MAX_SERVICES:
            raise ValueError(f"one tunnel carries at most {MAX_SERVICES} services")

    @property
    def local_sides(self) -> tuple[Endpoint, ...]:
        """Every local side, the first one's (``local_host``/``local_port``) first."""
        return (Endpoint(self.local_host, self.local_port), *self.more_local)

    @property
    def budget(self) -> float:
        """The resume budget in force (seconds)."""
        if self.resume_budget is not None:
            return self.resume_budget
        return RESUME_KEEPALIVES * self.keepalive


# -- the tunnel's API, in one place ----------------------------------------------------


def _make_pake(role: PeerRole, code: str) -> Pake:
    return Pake(role, code)


def _make_channel(spec: CoordinatedSpec, tunnel: PairedTunnel, pake: Pake | None,
                  on_event: Callable[[ResumeEvent], None]) -> ResumableChannel:
    """The tunnel's channel: SPAKE2 in-band over the code when the rendezvous forwarded
    no SPAKE2 messages (``pake`` None), else the key confirmation only."""
    return ResumableChannel(
        tunnel.role, code=tunnel.code if pake is None else None, pake=pake,
        handshake_timeout=spec.net_timeout * 2, on_event=on_event,
        # A keepalive under the usual 1 s silence limit shortens that limit too.
        keepalive=spec.keepalive, min_timeout=min(MIN_TIMEOUT, spec.keepalive / 2),
        resume_budget=spec.budget,
        name=f"tunnel-{spec.local_port}")


def _make_mux(channel: ResumableChannel, spec: CoordinatedSpec, name: str) -> Mux:
    # The resume layer watches each path and replaces it; the mux's own dead-peer
    # limit only catches a peer whose tunnel stays silent beyond the resume budget.
    return Mux(channel, role=spec.role, keepalive=spec.keepalive,
               dead_after=spec.budget + 3 * spec.keepalive, name=name,
               services=len(spec.local_sides) if spec.role == "server" else None)


def _one_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


# -- the engine ------------------------------------------------------------------------


class CoordinatedEngine(EngineBase):
    """Ends ``closed`` when stopped or when the peer closes cleanly."""

    mode: ClassVar[Mode] = "coordinated"
    ended_message: ClassVar[str] = "the peer closed the tunnel"

    def __init__(self, spec: CoordinatedSpec) -> None:
        super().__init__(spec.role, spec.local_port, spec.rendezvous, spec.local_host)
        self.spec = spec
        self.code: str | None = spec.code
        self.public_address: Endpoint | None = None
        self.peer_address: Endpoint | None = None
        self.path: TunnelPath | None = None  # the path carrying the tunnel (the last one)
        self.relay: Endpoint | None = None  # path "relay": where
        self.resuming = False  # the path was lost and no new one carries the tunnel yet
        self._candidates: DirectCandidates | None = None  # ours, while the session lives
        self.path_changes = 0  # moves to another path (resumes and upgrades)
        self._mux: Mux | None = None
        self._channel: ResumableChannel | None = None
        self._keeper: _PathKeeper | None = None
        self._early_news: list[ResumeEvent] = []  # the channel's, before the keeper runs
        self._met: NewPath | None = None  # the latest meeting's connection
        self._tunnel_failure: TunnelError | None = None
        # Monotonic instants of the setup, for measurements: the pairing's, and
        # when the secure channel (SPAKE2 + confirmation) was up.
        self.timings: Timings | None = None
        self.secured_at: float | None = None
        self._pake: Pake | None = None  # our SPAKE2 half, made as soon as the code exists
        self.prediction: Prediction | None = None
        self.nat_pair: str | None = None
        self.timeline: Timeline | None = None  # the pairing's (not the resume meetings')

    @property
    def bytes_in(self) -> int:
        return self._mux.bytes_in if self._mux else 0

    @property
    def bytes_out(self) -> int:
        return self._mux.bytes_out if self._mux else 0

    @property
    def connections(self) -> int:
        return self._mux.total_streams if self._mux else 0

    @property
    def channel(self) -> ResumableChannel | None:
        """The tunnel's channel once it exists (its ``stats()``: paths, resumes)."""
        return self._channel

    def snapshot(self) -> Snapshot:
        return replace(super().snapshot(), public_address=self.public_address,
                       peer_address=self.peer_address, bytes_in=self.bytes_in,
                       bytes_out=self.bytes_out, connections=self.connections, code=self.code,
                       path=self.path, relay=self.relay, timings=self.timings,
                       secured_at=self.secured_at, resuming=self.resuming,
                       path_changes=self.path_changes, prediction=self.prediction,
                       nat_pair=self.nat_pair,
                       timeline=tuple(self.timeline.to_json()) if self.timeline else (),
                       setup_ms=self._setup_ms(), more_local=self.spec.more_local)

    def set_peer(self, peer: Endpoint) -> None:
        raise NopfError("a coordinated session pairs by its code: it takes no peer address")

    def _setup_ms(self) -> float | None:
        if self.timeline is None:
            return None
        for mark in self.timeline.marks:
            if mark.kind == "path":
                return float(mark.data["setup_ms"])
        return None

    def _predicted(self, prediction: Prediction, facts: PairFacts) -> None:
        self.prediction, self.nat_pair = prediction, nat_pair(facts)
        self._emit(Event("prediction", f"predicted path {prediction.path}: {prediction.why}",
                         data={**prediction.to_json(), "nat_pair": self.nat_pair}))

    # -- the life -----------------------------------------------------------

    async def _life(self) -> None:
        spec = self.spec
        # A rendezvous on loopback: both peers are on this host, and nothing of ours
        # (a gateway's mapping, global addresses) has a use.
        remote = not is_loopback(spec.rendezvous.host)
        async with direct_candidates(
                ipv6=spec.ipv6 and remote,
                port_mapping=spec.port_mapping and remote,
                wait_mapping=spec.role == "server",
                on_event=self._log) as candidates:
            self._candidates = candidates
            try:
                await self._tunnel_life()
            finally:
                self._candidates = None

    async def _tunnel_life(self) -> None:
        spec = self.spec
        listeners: list[socket.socket] = []
        try:
            if spec.role == "client":
                # Every local connection is a stream: a burst of them (a browser,
                # a load test) must not overflow the accept queue and be reset.
                for side in spec.local_sides:
                    listeners.append(listen_local(side.host, side.port,
                                                  backlog=socket.SOMAXCONN))
                    if (warning := exposure(side.host, side.port)) is not None:
                        self._log(warning)
            paired = await self._pair()
            if paired.early:  # the secure channel reads its socket from the tunnel's first byte
                paired.sock.close()
                raise RendezvousProtocolError(
                    f"{len(paired.early)} bytes of the tunnel were read before it started")
            self.timings = paired.timings
            self.public_address, self.peer_address = paired.public, paired.peer
            self.path, self.relay = paired.path, paired.relay
            self._emit(Event("public_address", str(paired.public),
                             data={"public": str(paired.public)}))
            self._emit(Event("peer_address", f"peer {paired.peer}",
                             data={"peer": str(paired.peer)}))
            self._set_state(State.PUNCHING, f"authenticating {paired.peer} with the code")
            # A rendezvous that forwarded no SPAKE2 messages: the whole handshake in-band.
            channel = _make_channel(spec, paired,
                                    self._pake if paired.peer_pake is not None else None,
                                    self._on_channel_event)
            self._channel = channel
            await channel.add_path(paired.sock, paired.path, first=True)
            self._mux = _make_mux(channel, spec, f"mux-{spec.local_port}")
            await self._mux.start()
            try:
                await self._tunnel(paired, channel, self._mux, listeners)
            except PeerLost as exc:
                if exc is self._tunnel_failure:  # the resume budget ran out
                    raise PeerLost(f"lost the peer: {exc}") from None
                raise
            finally:
                await self._mux.close()
        finally:
            for listener in listeners:
                listener.close()

    async def _tunnel(self, paired: PairedTunnel, channel: ResumableChannel, mux: Mux,
                      listeners: list[socket.socket]) -> None:
        spec = self.spec
        async with task_group() as tg:
            # Serving starts before the peer's key confirmation is checked: our
            # records may follow our own confirmation at once (a connection the
            # application made while we paired goes out now), and the channel
            # opens nothing of the peer's before its confirmation checks out.
            if spec.role == "server":
                serve = serve_share(mux, (spec.local_host, spec.local_port),
                                    more=spec.more_local,
                                    connect_timeout=spec.net_timeout, on_event=self._log)
            else:
                serve = serve_connect(mux, listeners[0], more=listeners[1:],
                                      on_event=self._log)
            serving = tg.create_task(serve, name=f"serve-{spec.local_port}")
            await channel.confirmed()  # PairingMismatch / HandshakeTimeout end it
            self.secured_at = time.monotonic()
            why = f", {paired.why}" if paired.why else ""
            self._set_state(State.CONNECTED, f"encrypted tunnel to {paired.peer} up "
                            f"({paired.over}{why}); " + self._ready_hint())
            self._emit(Event(
                "pipe_started", "Started tunnel between "
                + ", ".join(local_text(*side) for side in spec.local_sides)
                + f" - {paired.peer}",
                data={"local_port": spec.local_port, "peer": str(paired.peer),
                      "path": paired.path}))
            keeper = self._keeper = _PathKeeper(self, channel, tg, PathMachine(
                paired.path, asyncio.get_running_loop().time(), resume_budget=spec.budget,
                upgrade_delays=backoff(spec.retry_direct)))
            for event in self._early_news:
                keeper.heard(event)
            self._early_news.clear()
            tg.create_task(keeper.run(), name=f"paths-{spec.local_port}")
            # A clean end (either side closed): nothing more to keep.
            serving.add_done_callback(lambda _task: keeper.stop())

    # -- the channel's news -----------------------------------------------------------

    def _on_channel_event(self, event: ResumeEvent) -> None:
        """From the channel's callbacks: the snapshot follows at once, the keeper next."""
        if isinstance(event, PathSelected):
            self._selected(event)
        elif isinstance(event, PathLost):
            self.resuming = True
        elif isinstance(event, TunnelFailed):
            self._tunnel_failure = event.error
        if self._keeper is not None:
            self._keeper.heard(event)
        else:
            self._early_news.append(event)

    def _selected(self, event: PathSelected) -> None:
        kind = event.kind
        if kind not in TUNNEL_PATHS:  # the ladder makes no other kind
            return
        path: TunnelPath = kind
        met = self._met
        self.path, self.resuming = path, False
        self.relay = met.relay if met is not None and path == "relay" else None
        self.path_changes += 1
        if met is not None and met.path == path and met.peer != self.peer_address:
            self.peer_address = met.peer
            self._emit(Event("peer_address", f"peer {met.peer}", data={"peer": str(met.peer)}))

    def _said(self, report: Report) -> None:
        """A line of the path keeper: a ``path`` event (the CLI prints it, the history
        keeps it), with where the tunnel runs now."""
        data: dict[str, object] = {"news": report.kind,
                                   "path": None if self.resuming else self.path}
        if self.path == "relay" and self.relay is not None:
            data["relay"] = str(self.relay)
        self._emit(Event("path", report.text, data=data))

    async def _pair(self) -> PairedTunnel:
        spec = self.spec
        self._set_state(State.DISCOVERING, f"contacting rendezvous {spec.rendezvous}")
        self.timeline = timeline = Timeline(time.monotonic())
        timeline.add(timeline.origin, "start", f"pairing through {spec.rendezvous} "
                     f"({'with' if spec.nat else 'without'} a NAT report)")
        server = await reach_rendezvous(spec.rendezvous, spec.net_timeout, on_event=self._log,
                                        coordinated=True)
        if spec.role == "client":
            self._set_state(State.WAITING_PEER, f"joining the sharer of {spec.code}")
        return await coordinate(
            CoordinationSpec(Endpoint(*server), spec.role, code=spec.code,
                             code_lifetime=spec.code_lifetime, punch_timeout=spec.punch_timeout,
                             net_timeout=spec.net_timeout, nat=spec.nat,
                             name=spec.rendezvous, candidates=self._candidates),
            pake=self._new_pake, on_code=self._got_code, on_event=self._log,
            on_punching=self._punching, on_prediction=self._predicted, timeline=timeline)

    def _new_pake(self, code: str) -> Pake:
        self._pake = _make_pake(self.spec.role, code)
        return self._pake

    def _got_code(self, code: str) -> None:
        self.code = code
        self._emit(Event("code", code, data={"code": code}))
        self._set_state(State.WAITING_PEER, "waiting for the peer to use the code")

    def _punching(self, message: str) -> None:
        if self.state is State.PUNCHING:
            self._log(message)
        else:
            self._set_state(State.PUNCHING, message)

    def _ready_hint(self) -> str:
        where = local_listing(self.spec.local_sides)  # which side reaches which service
        if self.spec.role == "server":
            return f"the peer's connections arrive at {where}"
        return f"connect your applications to {where}"


class MeetingFailed(NopfError):
    """A meeting with the peer ended without a new connection (one line: why)."""


_Input = Callable[[float], list[PathAction]]  # one input of the machine, given ``now``


class _PathKeeper:
    """The driver of :class:`PathMachine`: feeds it the channel's news and the
    meetings' outcomes, runs each meeting as a named child of the engine's
    TaskGroup (nothing fire-and-forget), and calls its timer."""

    def __init__(self, engine: CoordinatedEngine, channel: ResumableChannel,
                 tg: asyncio.TaskGroup, machine: PathMachine) -> None:
        self.engine = engine
        self.channel = channel
        self.tg = tg
        self.machine = machine
        self.loop = asyncio.get_running_loop()
        self.inbox: asyncio.Queue[_Input | None] = asyncio.Queue()
        self.meetings: dict[int, asyncio.Task[str | None]] = {}
        self.adding: set[int] = set()  # meetings whose connection is in the path handshake

    def heard(self, event: ResumeEvent) -> None:
        machine = self.machine
        if isinstance(event, PathSelected):
            self._post(functools.partial(machine.selected, event.kind, event.previous,
                                         event.after))
        elif isinstance(event, PathLost):
            self._post(functools.partial(machine.lost, event.kind, event.why,
                                         event.silent_for, event.timed_out))
        elif isinstance(event, NeedPath):
            self._post(machine.need)
        elif isinstance(event, (TunnelFailed, PeerClosed)):
            self.stop()

    def stop(self) -> None:
        self.inbox.put_nowait(None)

    def _post(self, event: _Input) -> None:
        self.inbox.put_nowait(event)

    async def run(self) -> None:
        machine, loop = self.machine, self.loop
        try:
            while True:
                deadline = machine.next_deadline
                try:
                    async with asyncio.timeout(None if deadline is None
                                               else max(0.0, deadline - loop.time())):
                        item = await self.inbox.get()
                except TimeoutError:
                    self._act(machine.timer(loop.time()))
                    continue
                if item is None:
                    self._act(machine.stop())
                    return
                self._act(item(loop.time()))
        finally:
            for attempt, task in self.meetings.items():
                if attempt not in self.adding:
                    task.cancel()

    def _act(self, actions: list[PathAction]) -> None:
        for action in actions:
            if isinstance(action, Meet):
                task = self.tg.create_task(self._meeting(action),
                                           name=f"{action.kind}-{action.attempt}-"
                                                f"{self.engine.spec.local_port}")
                self.meetings[action.attempt] = task
                task.add_done_callback(functools.partial(self._ended, action))
            elif isinstance(action, Cancel):
                running = self.meetings.get(action.attempt)
                # A connection in the path handshake may be the one the leader picks:
                # it ends by itself, within the handshake timeout.
                if running is not None and action.attempt not in self.adding:
                    running.cancel()
            elif isinstance(action, Report):
                self.engine._said(action)

    def _ended(self, meet: Meet, task: asyncio.Task[str | None]) -> None:
        self.meetings.pop(meet.attempt, None)
        self.adding.discard(meet.attempt)
        if task.cancelled():
            self._post(functools.partial(self.machine.met, meet.attempt, cancelled=True))
            return
        if task.exception() is not None:  # a bug: the group fails with it
            return
        why = task.result()
        if why is not None and meet.kind == "resume":
            self.channel.attempt_failed(f"meeting through the rendezvous: {why}")
        self._post(functools.partial(self.machine.met, meet.attempt, error=why))

    async def _meeting(self, meet: Meet) -> str | None:
        """Meet the peer again and add the new connection to the tunnel; None, or why
        not (one line: a failure is the machine's news, never the group's)."""
        try:
            await self._meet_and_add(meet)
        except NopfError as exc:
            return _one_line(exc)
        return None

    async def _meet_and_add(self, meet: Meet) -> None:
        engine, spec = self.engine, self.engine.spec
        resume_id = self.channel.resume_id
        assert resume_id is not None  # the first path was confirmed
        left = None if meet.deadline is None else meet.deadline - self.loop.time()
        try:
            async with asyncio.timeout(left):
                new = await meet_again(
                    spec.rendezvous, spec.role, resume_id, direct_only=meet.direct_only,
                    timeout=meet.timeout, net_timeout=spec.net_timeout,
                    on_event=engine._log if meet.kind == "resume" else None,
                    candidates=engine._candidates)
        except TimeoutError:
            raise MeetingFailed("the resume budget ran out during the meeting") from None
        if new.early:  # the path handshake reads the socket from the tunnel's first byte
            new.sock.close()
            raise MeetingFailed(f"{len(new.early)} bytes of the new connection were read "
                                "before it joined the tunnel")
        engine._met = new
        self.adding.add(meet.attempt)
        engine._log(f"a new connection {path_words(new.path, new.relay)} to {new.peer}: "
                    "joining the tunnel")
        await self.channel.add_path(new.sock, new.path)
