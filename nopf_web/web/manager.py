"""The session manager: runs each session as a named, supervised task and records it.

A session runs in one of two modes: ``coordinated`` (the default: a pairing
code, an encrypted tunnel carrying many connections, :class:`PairedSession`)
or ``seed`` (the seed's manual exchange of public addresses, one plaintext
connection, :class:`Session`). Both engines emit the same events.

Sessions live here, not in request handlers: a browser tab closing changes
nothing. Every session task is owned (kept in ``_sessions``), awaited on
stop and cancelled on shutdown; what happens to a session is recorded in the
history store through the engine's events, and byte counters are sampled
by one ticker task (the copy threads never call into Python per packet).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import re
import secrets
import socket
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from nopf_web.db import HistoryStore, Mode, NewSession
from nopf_web.errors import NopfError
from nopf_web.guard.base import Guard
from nopf_web.paired import PairedSession, PairedSpec
from nopf_web.pairing import BadCode, PairingCode, parse_code
from nopf_web.punch.machine import PunchConfig
from nopf_web.session import Event, Session, SessionRole, SessionSpec, State
from nopf_web.wire.address import Endpoint

from .hints import hint_for

log = logging.getLogger("nopf.web")

StopReason = Literal["stopped", "interrupted"]
CODE_LIFETIME: Final = 600.0  # s a sharer's code waits for its peer (what invitations say)
Engine = Session | PairedSession


def guard_status(guard: Guard) -> dict[str, Any]:
    """``{"active", "reason", "dropped"}``: what pages and ``GET /api/guard`` show."""
    return {"active": guard.active, "reason": guard.reason, "dropped": guard.dropped}


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


class CreateError(ValueError):
    """A session cannot be created: ``field`` names the input at fault."""

    def __init__(self, field_name: str, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.field = field_name
        self.status = status


async def cancel_and_wait(task: asyncio.Task[None], timeout: float,
                          interval: float = 0.5) -> None:
    """Cancel ``task`` until it ends (or ``timeout`` passes).

    Repeated because Python 3.11's ``asyncio.wait_for`` swallows a cancellation
    that arrives just as the awaited operation completes (CPython gh-86296),
    which would leave a stopped session running. The interval leaves a task
    time to finish its own clean-up before it is cancelled again.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done() and loop.time() < deadline:
        task.cancel()
        await asyncio.wait({task}, timeout=min(interval, max(0.0, deadline - loop.time())))


@dataclass
class ManagedSession:
    id: str
    share_token: str
    label: str
    session: Engine
    mode: Mode = "seed"
    task: asyncio.Task[None] | None = None
    events: deque[Event] = field(default_factory=lambda: deque(maxlen=300))
    outcome: str | None = None
    error: str | None = None
    hint: str | None = None
    stop_reason: StopReason | None = None
    samples: deque[tuple[float, int, int]] = field(default_factory=lambda: deque(maxlen=3))
    recorded: tuple[int, int, int] = (0, 0, 0)
    connection_open: bool = False  # a connection row is recorded and not yet ended

    @property
    def live(self) -> bool:
        return self.task is not None and not self.task.done()

    def rates(self, now: float) -> tuple[float, float]:
        """Bytes per second (in, out) over the last few seconds; 0 once ended."""
        if not self.live or not self.samples:
            return 0.0, 0.0
        t0, in0, out0 = self.samples[0]
        span = now - t0
        if span < 0.2:
            return 0.0, 0.0
        s = self.session
        return max(0.0, (s.bytes_in - in0) / span), max(0.0, (s.bytes_out - out0) / span)


class SessionManager:
    def __init__(self, store: HistoryStore, guard: Guard, default_rendezvous: Endpoint, *,
                 punch_timeout: float = 30.0, max_live: int = 32, keep_finished: int = 100,
                 tick: float = 1.0) -> None:
        self.store = store
        self.guard = guard
        self.default_rendezvous = default_rendezvous
        self.punch_timeout = punch_timeout
        self.max_live = max_live
        self.keep_finished = keep_finished
        self.tick = tick
        self._sessions: dict[str, ManagedSession] = {}
        self._by_share: dict[str, str] = {}
        self._ticker: asyncio.Task[None] | None = None
        self._closing = False

    # -- life ----------------------------------------------------------------

    def start(self) -> None:
        if self._ticker is None:
            self._ticker = asyncio.create_task(self._tick_loop(), name="nopf-session-ticker")

    async def close(self) -> None:
        """Stop every session (recorded as interrupted) and the ticker; await them all."""
        self._closing = True
        running = [ms for ms in self._sessions.values() if ms.live]
        for ms in running:
            ms.stop_reason = "interrupted"
        tasks = [ms.task for ms in running if ms.task is not None]
        await asyncio.gather(*(cancel_and_wait(task, 10.0) for task in tasks))
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self.tick)
            self.sample(time.time())

    def sample(self, now: float) -> None:
        """Record progress of live sessions (one coalesced update each, if anything moved)."""
        for ms in self._sessions.values():
            if not ms.live:
                continue
            s = ms.session
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
        return sorted(self._sessions.values(), key=lambda ms: ms.session.started_at,
                      reverse=True)

    def live_count(self) -> int:
        return sum(1 for ms in self._sessions.values() if ms.live)

    # -- commands ----------------------------------------------------------------

    def create(self, role: SessionRole, local_port: int, rendezvous: Endpoint | None = None,
               label: str = "", *, mode: Mode = "coordinated",
               code: PairingCode | None = None) -> ManagedSession:
        """Start a session task; raise :class:`CreateError` naming the field at fault.

        A coordinated client needs the sharer's ``code``; nothing else takes one.
        """
        if (code is not None) != ((mode, role) == ("coordinated", "client")):
            raise CreateError("code", "a coordinated client session, and only it, takes the "
                              "sharer's pairing code")
        if self._closing:
            raise CreateError("session", "the dashboard is shutting down", status=503)
        if self.live_count() >= self.max_live:
            raise CreateError("session", f"{self.max_live} sessions are already running: stop "
                              "one first", status=409)
        if role == "client":
            self._check_client_port(local_port)
        session: Engine
        if mode == "coordinated":
            session = PairedSession(PairedSpec(
                role=role, local_port=local_port,
                rendezvous=rendezvous or self.default_rendezvous,
                code=str(code) if code is not None else None, code_lifetime=CODE_LIFETIME,
                punch_timeout=self.punch_timeout))
        else:
            session = Session(SessionSpec(role=role, local_port=local_port,
                                          rendezvous=rendezvous or self.default_rendezvous,
                                          punch=PunchConfig(timeout=self.punch_timeout)),
                              self.guard)
        ms = ManagedSession(id=secrets.token_hex(6), share_token=secrets.token_urlsafe(24),
                            label=label, session=session, mode=mode)
        self.store.add_session(NewSession(
            id=ms.id, role=role, local_port=local_port, rendezvous=str(session.spec.rendezvous),
            label=label, share_token=ms.share_token, state=session.state.value,
            started_at=session.started_at, mode=mode))
        session.subscribe(lambda event: self._on_event(ms, event))
        self._sessions[ms.id] = ms
        self._by_share[ms.share_token] = ms.id
        ms.task = asyncio.create_task(self._supervise(ms), name=f"nopf-session-{ms.id}")
        self._prune()
        return ms

    def _check_client_port(self, port: int) -> None:
        for other in self._sessions.values():
            spec = other.session.spec
            if other.live and spec.role == "client" and spec.local_port == port:
                raise CreateError("local_port", f"local port {port} is already used by client "
                                  f"session {other.id}: choose another one")
        # Catch the common mistake now rather than as a failed session a moment later.
        with socket.socket() as probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError as exc:
                why = "is already in use" if exc.errno == errno.EADDRINUSE else \
                    f"cannot be used ({exc.strerror})"
                raise CreateError("local_port", f"local port {port} {why} on this machine: "
                                  "choose another one") from None

    def set_peer(self, ms: ManagedSession, peer: Endpoint) -> None:
        """Give the peer's address; raises :class:`NopfError` if set already or ended."""
        if not isinstance(ms.session, Session):
            raise NopfError("a coordinated session pairs by its code: it takes no peer address")
        if not ms.live:
            raise NopfError(f"the session has already ended ({ms.outcome or 'stopped'})")
        ms.session.set_peer(peer)

    async def stop(self, ms: ManagedSession, wait: float = 5.0) -> None:
        """Stop a session and wait (briefly) until it has ended and been recorded."""
        if not ms.live:
            return
        ms.stop_reason = "stopped"
        task = ms.task
        assert task is not None
        s = ms.session
        if isinstance(s, Session) and s.state is State.CONNECTED and s.connections:
            # End the pipe cleanly: both sides see a close, not a reset. (A coordinated
            # session closes its tunnel cleanly when its task is cancelled.)
            s.stop()
            await asyncio.wait({task}, timeout=wait)
        await cancel_and_wait(task, wait)

    # -- recording ---------------------------------------------------------------

    def _on_event(self, ms: ManagedSession, event: Event) -> None:
        ms.events.append(event)
        s = ms.session
        # The database gets the code only once it is spent (see _finish).
        message = redact_codes(event.message) if ms.mode == "coordinated" else event.message
        self.store.add_event(ms.id, event.at, event.kind, message)
        if event.kind == "state":
            self.store.update_session(ms.id, state=s.state.value)
            if (isinstance(s, PairedSession) and s.state is State.CONNECTED
                    and not ms.connection_open):
                # The one encrypted tunnel is this session's connection; its streams are
                # counted in ``connections``.
                ms.connection_open = True
                self.store.connection_started(ms.id, event.at, str(s.peer_address))
                self.store.update_session(ms.id, path=s.path)
        elif event.kind == "public_address":
            self.store.update_session(ms.id, public_address=str(s.public_address))
        elif event.kind == "peer_address":
            self.store.update_session(ms.id, peer_address=str(s.peer_address))
        elif event.kind == "pipe_started":
            ms.connection_open = True
            self.store.connection_started(ms.id, event.at, str(s.peer_address))
            self.store.update_session(ms.id, connections=s.connections)

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
        s = ms.session
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
        final: dict[str, object] = {}
        if isinstance(s, PairedSession) and s.code:
            # Written only now: the code is single use, and used or dead once the session ends.
            final["code"] = s.code
        self.store.update_session(
            ms.id, state=state, outcome=ms.outcome, error=ms.error, hint=ms.hint,
            ended_at=ended, bytes_in=s.bytes_in, bytes_out=s.bytes_out,
            connections=s.connections, **final)
        if ms.connection_open:
            ms.connection_open = False
            self.store.connection_ended(ms.id, ended, s.bytes_in, s.bytes_out, ms.outcome,
                                        ms.error)
        self.store.add_event(ms.id, ended, "outcome", f"session {ms.outcome}")
        ms.events.append(Event("state", f"session {ms.outcome}", at=ended,
                               data={"outcome": ms.outcome}))

    def _prune(self) -> None:
        """Forget the oldest finished sessions beyond ``keep_finished`` (history keeps them)."""
        finished = [ms for ms in self.sessions() if not ms.live]
        for ms in finished[self.keep_finished:]:
            del self._sessions[ms.id]
            self._by_share.pop(ms.share_token, None)
