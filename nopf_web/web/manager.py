"""The session manager: runs each session's engine as a named, supervised task and records it.

A session runs in one of two modes: ``coordinated`` (the default: a pairing
code, an encrypted tunnel carrying many connections) or ``seed`` (the seed's
manual exchange of public addresses, one plaintext connection). The manager
knows them only through the :class:`~nopf_web.sessions.engine.Engine`
contract: it starts one with :func:`~nopf_web.sessions.factory.make_engine`,
records what its events and snapshots say, and stops it with ``stop()``.

Sessions live here, not in request handlers: a browser tab closing changes
nothing. The manager's TaskGroup (:meth:`SessionManager.running`, entered by
the app's cleanup context) holds every session task and the ticker that
samples byte counters (the copy threads never call into Python per packet).
Stopping a session is ``engine.stop()`` and a bounded wait for its end; when
the app shuts down every running session is stopped so, and recorded as
``interrupted``.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import re
import secrets
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import Final, Literal

from nopf_web.db import HistoryStore, NewSession
from nopf_web.errors import NopfError
from nopf_web.guard.base import Guard
from nopf_web.pairing import BadCode, PairingCode, parse_code
from nopf_web.punch.machine import PunchConfig
from nopf_web.roles import PeerRole
from nopf_web.sessions.coordinated import CoordinatedSpec
from nopf_web.sessions.engine import Engine, Event, Mode, Snapshot, State
from nopf_web.sessions.errors import LocalPortInUse
from nopf_web.sessions.factory import EngineSpec, make_engine
from nopf_web.sessions.local import listen_local
from nopf_web.sessions.seed import SeedSpec
from nopf_web.wire.address import LOCAL_HOST, Endpoint
from nopf_web.wire.nat import NatSummary

from .hints import hint_for

log = logging.getLogger("nopf.web")

StopReason = Literal["stopped", "interrupted"]
CODE_LIFETIME: Final = 600.0  # s a sharer's code waits for its peer (what invitations say)
SHUTDOWN_WAIT: Final = 10.0  # s the app's shutdown waits for its sessions to end


_CODE_LIKE: Final = re.compile(r"\b([1-9][0-9]{0,5})-([a-z]+)-([a-z]+)\b")


def redact_codes(text: str) -> str:
    """``... 7-orbit-lantern ...`` -> ``... 7-… ...``: the nameplate alone is no secret (the
    rendezvous sees it), the words are."""
    def cut(match: re.Match[str]) -> str:
        try:
            parse_code(match.group(0))
        except BadCode:
            return match.group(0)
        return f"{match.group(1)}-…"
    return _CODE_LIKE.sub(cut, text)


def _diagnostics(s: Snapshot) -> dict[str, object]:
    """The pairing's timeline and setup time, for the history (none: nothing)."""
    if not s.timeline:
        return {}
    return {"timeline": json.dumps(list(s.timeline), separators=(",", ":")),
            "setup_ms": s.setup_ms}


class CreateError(ValueError):
    """A session cannot be created: ``field`` names the input at fault."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field_name
        self.status = status


@dataclass
class ManagedSession:
    id: str
    share_token: str
    label: str
    session: Engine  # the session's engine
    task: asyncio.Task[None] | None = None  # its supervisor, in the manager's TaskGroup
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=300))
    outcome: str | None = None
    error: str | None = None
    hint: str | None = None
    stop_reason: StopReason | None = None
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=3))
    recorded: tuple[int, int, int] = (0, 0, 0)
    connection_open: bool = False  # a connection row is recorded and not yet ended

    @property
    def mode(self) -> Mode:
        return self.session.snapshot().mode

    @property
    def live(self) -> bool:
        return self.task is not None and not self.task.done()

    def rates(self, now: float, snap: Snapshot | None = None) -> tuple[float, float]:
        """Bytes per second (in, out) over the last few seconds; 0 once ended."""
        if not self.live or not self.samples:
            return 0.0, 0.0
        t0, in0, out0 = self.samples[0]
        span = now - t0
        if span < 0.2:
            return 0.0, 0.0
        s = snap or self.session.snapshot()
        return max(0.0, (s.bytes_in - in0) / span), max(0.0, (s.bytes_out - out0) / span)


class SessionManager:
    def __init__(self, store: HistoryStore, guard: Guard, default_rendezvous: Endpoint, *,
                 punch_timeout: float = 30.0, max_live: int = 32, keep_finished: int = 100,
                 tick: float = 1.0,
                 nat_report: Callable[[], NatSummary | None] | None = None,
                 port_mapping: bool = True) -> None:
        self.store = store
        # Our NAT doctor's last report (never waits): coordinated hellos carry it.
        self.nat_report = nat_report
        self.guard = guard
        self.default_rendezvous = default_rendezvous
        self.punch_timeout = punch_timeout
        self.port_mapping = port_mapping  # coordinated sessions map a port on the gateway
        self.max_live = max_live
        self.keep_finished = keep_finished
        self.tick = tick
        self._sessions: dict[str, ManagedSession] = {}
        self._by_share: dict[str, str] = {}
        self._tasks: asyncio.TaskGroup | None = None

    # -- life ----------------------------------------------------------------

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[SessionManager]:
        """The manager's life: a TaskGroup that holds the ticker and every session task.

        On exit every running session is stopped, recorded as ``interrupted`` and
        awaited. (aiohttp may leave a cleanup context from another task than the one
        that entered it; the group's children never fail, a session's failure being
        recorded rather than raised, so that task is never cancelled by the group.)
        """
        async with asyncio.TaskGroup() as tg:
            ticker = tg.create_task(self._tick_loop(), name="nopf-session-ticker")
            self._tasks = tg
            try:
                yield self
            finally:
                self._tasks = None  # no new sessions from here on
                running = [ms for ms in self._sessions.values() if ms.live]
                for ms in running:
                    ms.stop_reason = "interrupted"
                await self._end(running, SHUTDOWN_WAIT)
                ticker.cancel()

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.sample(time.time())

    def sample(self, now: float) -> None:
        """Record progress of live sessions (one coalesced update each, if anything moved)."""
        for ms in self._sessions.values():
            if not ms.live:
                continue
            s = ms.session.snapshot()
            ms.samples.append((now, s.bytes_in, s.bytes_out))
            progress = (s.bytes_in, s.bytes_out, s.connections)
            if progress != ms.recorded:
                ms.recorded = progress
                self.store.update_session(ms.id, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
                                          connections=s.connections)

    # -- queries ---------------------------------------------------------------

    def get(self, session_id: str) -> ManagedSession | None:
        return self._sessions.get(session_id)

    def by_share(self, token: str) -> ManagedSession | None:
        session_id = self._by_share.get(token)
        return self._sessions.get(session_id) if session_id else None

    def sessions(self) -> list[ManagedSession]:
        """Sessions held in memory (live ones and recent finished ones), newest first."""
        return sorted(self._sessions.values(), key=lambda ms: ms.session.snapshot().started_at,
                      reverse=True)

    def live_count(self) -> int:
        return sum(1 for ms in self._sessions.values() if ms.live)

    # -- commands ----------------------------------------------------------------

    def create(self, role: PeerRole, local_port: int, rendezvous: Endpoint | None = None,
               label: str = "", *, mode: Mode = "coordinated",
               code: PairingCode | None = None,
               port_mapping: bool | None = None,
               local_host: str = LOCAL_HOST,
               more_local: tuple[Endpoint, ...] = ()) -> ManagedSession:
        """Start a session task; raise :class:`CreateError` naming the field at fault.

        A coordinated client needs the sharer's ``code``; nothing else takes one.
        ``port_mapping`` (None: the dashboard's setting) lets a coordinated session ask
        the gateway for a mapped port. ``local_host``: the service's host (server), or
        the address to listen on (client). ``more_local`` (coordinated): the 2nd, 3rd...
        service (server), or the listener for each of the sharer's (client).
        """
        if (code is not None) != ((mode, role) == ("coordinated", "client")):
            raise CreateError("code", "a coordinated client session, and only it, takes the "
                              "sharer's pairing code")
        if more_local and mode != "coordinated":
            raise CreateError("local_port", "a seed session carries one connection: give "
                              "one local port")
        if self._tasks is None:
            raise CreateError("session", "the dashboard is shutting down", status=503)
        if self.live_count() >= self.max_live:
            raise CreateError("session", f"{self.max_live} sessions are already running: stop "
                              "one first", status=409)
        if role == "client":
            self._check_client_ports((Endpoint(local_host, local_port), *more_local))
        rendezvous = rendezvous or self.default_rendezvous
        spec: EngineSpec
        if mode == "coordinated":
            spec = CoordinatedSpec(role=role, local_host=local_host, local_port=local_port,
                                   rendezvous=rendezvous,
                                   code=str(code) if code is not None else None,
                                   code_lifetime=CODE_LIFETIME, punch_timeout=self.punch_timeout,
                                   nat=self.nat_report() if self.nat_report else None,
                                   port_mapping=self.port_mapping if port_mapping is None
                                   else port_mapping, more_local=more_local)
        else:
            spec = SeedSpec(role=role, local_host=local_host, local_port=local_port,
                            rendezvous=rendezvous,
                            punch=PunchConfig(timeout=self.punch_timeout))
        engine = make_engine(spec, self.guard)
        ms = ManagedSession(id=secrets.token_hex(6), share_token=secrets.token_urlsafe(24),
                            label=label, session=engine)
        snap = engine.snapshot()
        self.store.add_session(NewSession(
            id=ms.id, role=role, local_port=local_port, rendezvous=str(snap.rendezvous),
            label=label, share_token=ms.share_token, state=snap.state.value,
            started_at=snap.started_at, mode=snap.mode, local_host=local_host,
            more_local=tuple(str(side) for side in more_local)))
        engine.subscribe(lambda event: self._on_event(ms, event))
        self._sessions[ms.id] = ms
        self._by_share[ms.share_token] = ms.id
        ms.task = self._tasks.create_task(self._supervise(ms), name=f"nopf-session-{ms.id}")
        self._prune()
        return ms

    def _check_client_ports(self, sides: tuple[Endpoint, ...]) -> None:
        for other in self._sessions.values():
            snap = other.session.snapshot()
            if not other.live or snap.role != "client":
                continue
            taken = {snap.local_port, *(side.port for side in snap.more_local)}
            for port in (side.port for side in sides if side.port in taken):
                raise CreateError("local_port", f"local port {port} is already used by "
                                  f"client session {other.id}: choose another one")
        # Catch the common mistake now rather than as a failed session a moment later.
        # The session's own binds (listen_local), tried together and closed: the same
        # socket options, and one side of this session cannot take another's port.
        with contextlib.ExitStack() as held:
            for host, port in sides:
                try:
                    held.callback(listen_local(host, port).close)
                except LocalPortInUse as exc:
                    if exc.error.errno == errno.EADDRNOTAVAIL:
                        raise CreateError("local_port", f"{host} is not an address of this "
                                          "machine: choose one of its own, or 0.0.0.0") from None
                    why = "is already in use" if exc.error.errno == errno.EADDRINUSE else \
                        f"cannot be used ({exc.error.strerror})"
                    raise CreateError("local_port", f"local port {port} {why} on this "
                                      "machine: choose another one") from None

    def set_peer(self, ms: ManagedSession, peer: Endpoint) -> None:
        """Give the peer's address; raises :class:`NopfError` when the engine takes none
        (coordinated), has one already, or has ended."""
        if not ms.live:
            raise NopfError(f"the session has already ended ({ms.outcome or 'stopped'})")
        ms.session.set_peer(peer)

    async def stop(self, ms: ManagedSession, wait: float = 5.0) -> None:
        """Stop a session and wait (briefly) until it has ended and been recorded."""
        if not ms.live:
            return
        ms.stop_reason = "stopped"
        await self._end([ms], wait)

    async def _end(self, sessions: Iterable[ManagedSession], wait: float) -> None:
        """``stop()`` each engine, then wait up to ``wait`` seconds for its end; an engine
        that does not end when asked is cancelled (and given as long again)."""
        tasks = set()
        for ms in sessions:
            ms.session.stop()
            if ms.task is not None:
                tasks.add(ms.task)
        if not tasks:
            return
        _, late = await asyncio.wait(tasks, timeout=wait)
        if late:
            for task in late:
                log.warning("%s did not end within %g s of its stop: cancelling it",
                            task.get_name(), wait)
                task.cancel()
            await asyncio.wait(late, timeout=wait)

    # -- recording ---------------------------------------------------------------

    def _on_event(self, ms: ManagedSession, event: Event) -> None:
        ms.events.append(event)
        s = ms.session.snapshot()
        # The database gets the code only once it is spent (see _finish).
        self.store.add_event(ms.id, event.at, event.kind, redact_codes(event.message))
        if event.kind == "state":
            self.store.update_session(ms.id, state=s.state.value)
        elif event.kind == "public_address":
            self.store.update_session(ms.id, public_address=str(s.public_address))
        elif event.kind == "peer_address":
            self.store.update_session(ms.id, peer_address=str(s.peer_address))
        elif event.kind == "path" and s.path is not None:
            # The tunnel moved (resumed, or back to direct): the history keeps the
            # path it runs over now, and this event's line says what happened.
            self.store.update_session(ms.id, path=s.path)
        elif event.kind == "prediction" and s.prediction is not None:
            self.store.update_session(ms.id, predicted_path=s.prediction.path,
                                      prediction=s.prediction.why, nat_pair=s.nat_pair)
        elif event.kind == "pipe_started":
            # The session's connection to the peer (seed: the pipe; coordinated: the
            # tunnel, whose streams are counted in ``connections``).
            ms.connection_open = True
            self.store.connection_started(ms.id, event.at, str(s.peer_address))
            self.store.update_session(ms.id, connections=s.connections, path=s.path,
                                      **_diagnostics(s))

    async def _supervise(self, ms: ManagedSession) -> None:
        try:
            await ms.session.run()
        except NopfError as exc:
            self._finish(ms, exc)
        except asyncio.CancelledError:
            self._finish(ms, None)
            raise
        except Exception as exc:  # an engine bug must not take the dashboard down
            log.exception("session %s crashed", ms.id)
            self._finish(ms, exc)
        else:
            self._finish(ms, None)

    def _finish(self, ms: ManagedSession, exc: BaseException | None) -> None:
        s = ms.session.snapshot()
        if ms.stop_reason is not None:
            ms.outcome = ms.stop_reason
        elif exc is not None or s.state is State.FAILED:
            ms.outcome = "failed"
            ms.error = s.error or f"internal error: {exc!r}"
            ms.hint = hint_for(exc)
        else:
            ms.outcome = "closed"
        ended = s.ended_at or time.time()
        state = s.state.value if s.state.final else State.FAILED.value
        # The code is written only now: it is single use, and used or dead once the
        # session ends.
        final: dict[str, object] = {"code": s.code} if s.code else {}
        self.store.update_session(
            ms.id, state=state, outcome=ms.outcome, error=ms.error, hint=ms.hint,
            ended_at=ended, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
            connections=s.connections, **final, **_diagnostics(s))
        if ms.connection_open:
            ms.connection_open = False
            self.store.connection_ended(ms.id, ended, s.bytes_in, s.bytes_out, ms.outcome,
                                        ms.error)
        self.store.add_event(ms.id, ended, "outcome", f"session {ms.outcome}")
        ms.events.append(Event("state", f"session {ms.outcome}", at=ended,
                               data={"outcome": ms.outcome}))

    def forget(self, session_ids: Iterable[str]) -> None:
        """Drop ended sessions from memory (deleted from the history); a live one stays."""
        for session_id in session_ids:
            ms = self._sessions.get(session_id)
            if ms is not None and not ms.live:
                self._drop(ms)

    def _prune(self) -> None:
        """Forget the oldest finished sessions beyond ``keep_finished`` (history keeps them)."""
        finished = [ms for ms in self.sessions() if not ms.live]
        for ms in finished[self.keep_finished:]:
            self._drop(ms)

    def _drop(self, ms: ManagedSession) -> None:
        del self._sessions[ms.id]
        self._by_share.pop(ms.share_token, None)
