"""The Engine contract: what the dashboard, the CLI and the history recorder know of a
running session, whichever mode runs it.

An engine is created from its spec (see :mod:`.factory`), then its owner awaits
:meth:`Engine.run` (its whole life: that is "start") and may call
:meth:`Engine.stop` from anywhere to end it. Meanwhile :meth:`Engine.snapshot`
tells everything a page, the API, the CLI printer or the history recorder
shows of it, and :meth:`Engine.subscribe` delivers an :class:`Event` whenever
something happens. Engines never print, never touch a database and know
nothing of HTTP.

States::

    discovering -> waiting_peer -> punching -> connected -> closed
         \\______________\\______________\\___________\\-> failed
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import time
from collections.abc import AsyncIterator, Callable, Coroutine
from dataclasses import dataclass, field
from typing import Any, ClassVar, Final, Literal, Protocol

from nopf_web.errors import NopfError
from nopf_web.guard.base import GuardStatus
from nopf_web.prediction import Prediction
from nopf_web.roles import PeerRole
from nopf_web.sockets import require_readiness
from nopf_web.wire.address import LOCAL_HOST, Endpoint

from .coordination_machine import Timings, TunnelPath

Mode = Literal["coordinated", "seed"]
MODES: Final[tuple[Mode, ...]] = ("coordinated", "seed")


class State(enum.StrEnum):
    DISCOVERING = "discovering"
    WAITING_PEER = "waiting_peer"
    PUNCHING = "punching"
    CONNECTED = "connected"
    CLOSED = "closed"
    FAILED = "failed"

    @property
    def final(self) -> bool:
        return self in (State.CLOSED, State.FAILED)


@dataclass(frozen=True)
class Event:
    """Something that happened to a session.

    ``state`` (``data["state"]``), ``public_address``, ``peer_address``, ``code``
    (a sharer's pairing code exists), ``pipe_started`` (the session's connection
    to the peer carries data: seed mode's one pipe, coordinated mode's tunnel; a
    history connection starts), ``log``, ``guard`` (the packet guard's drops), ``path``
    (coordinated: the tunnel's path was lost, resumed, or moved back to direct;
    ``data["path"]``: the path carrying it now, None while resuming), ``prediction``
    (coordinated: the path predicted at the fire, before the first SYN; ``data``:
    the prediction's JSON and ``nat_pair``).
    """

    kind: Literal["state", "public_address", "peer_address", "pipe_started", "log", "guard",
                  "code", "path", "prediction"]
    message: str
    at: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


@dataclass(frozen=True)
class Snapshot:
    """Everything a page, the API, the CLI printer or the history recorder shows of a
    running (or ended) engine, at one instant."""

    mode: Mode
    role: PeerRole
    local_port: int
    rendezvous: Endpoint
    state: State
    started_at: float  # time.time()
    ended_at: float | None = None
    error: str | None = None  # why it failed
    public_address: Endpoint | None = None
    peer_address: Endpoint | None = None
    bytes_in: int = 0  # from the peer
    bytes_out: int = 0  # to the peer
    connections: int = 0  # seed: pipes; coordinated: the tunnel's streams
    code: str | None = None  # coordinated: the pairing code, once known
    path: TunnelPath | None = None  # coordinated: "public", "lan" or "relay", once up (live)
    resuming: bool = False  # coordinated: the path was lost; a new one is being found
    path_changes: int = 0  # coordinated: moves to another path (resumes, back to direct)
    relay: Endpoint | None = None  # coordinated, path "relay": the relay's address
    guard: GuardStatus | None = None  # the packet guard this engine uses (None: none)
    guard_dropped: int = 0  # packets the guard dropped in this session's windows
    timings: Timings | None = None  # coordinated: monotonic instants of the pairing
    secured_at: float | None = None  # coordinated: monotonic, the peer's confirmation checked
    prediction: Prediction | None = None  # coordinated: the path predicted at the fire
    nat_pair: str | None = None  # coordinated: "drop × symmetric" (sharer first), at the fire
    # coordinated: the pairing's timeline (nopf_web.sessions.timeline's JSON), as it grows
    timeline: tuple[dict[str, Any], ...] = ()
    setup_ms: float | None = None  # coordinated: pairing start -> the path opened
    local_host: str = LOCAL_HOST  # the service's (server) or the listener's (client) host
    # coordinated: the 2nd, 3rd... service (server), or the listener for each (client)
    more_local: tuple[Endpoint, ...] = ()


class Engine(Protocol):
    """One session's life in some mode (see the module docstring)."""

    async def run(self) -> None:
        """Live until the end: return once closed, raise the :class:`NopfError` it failed
        with (after its ``failed`` event). Cancelling it ends it as ``closed`` too."""

    def stop(self) -> None:
        """End the session from any state, from anywhere (idempotent); :meth:`run` then
        returns soon after."""

    def snapshot(self) -> Snapshot: ...

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        """Call ``fn`` with every event from now on; the result unsubscribes."""

    def set_peer(self, peer: Endpoint) -> None:
        """Give the peer's public address (seed mode, once); raises :class:`NopfError`
        when the engine takes none or not now."""


@contextlib.asynccontextmanager
async def task_group() -> AsyncIterator[asyncio.TaskGroup]:
    """``asyncio.TaskGroup`` that fails with the first error itself, not in an
    ExceptionGroup: an engine ends with one typed error, the one its callers catch."""
    try:
        async with asyncio.TaskGroup() as tg:
            yield tg
    except BaseExceptionGroup as group:
        first: BaseException = group
        while isinstance(first, BaseExceptionGroup):
            first = first.exceptions[0]
        raise first from None


class EngineBase:
    """What every engine shares: its state and end, its events to subscribers, and
    run/stop around the engine's own ``_life``."""

    mode: ClassVar[Mode]
    ended_message: ClassVar[str] = "ended"  # the ``closed`` event's message when it ran out

    def __init__(self, role: PeerRole, local_port: int, rendezvous: Endpoint,
                 local_host: str = LOCAL_HOST) -> None:
        self.role, self.local_port, self.rendezvous = role, local_port, rendezvous
        self.local_host = local_host
        self.state = State.DISCOVERING
        self.error: str | None = None
        self.started_at = time.time()
        self.ended_at: float | None = None
        self._subscribers: list[Subscriber] = []
        self._life_task: asyncio.Task[None] | None = None
        self._stop_requested = False

    # -- the contract ------------------------------------------------------------------

    async def run(self) -> None:
        if self._life_task is not None:
            raise RuntimeError("an engine runs once")
        try:
            require_readiness()  # a Proactor loop fails here, in one line, not mid-punch
            async with task_group() as tg:
                self._life_task = tg.create_task(
                    self._life(), name=f"{self.mode}-{self.role}-{self.local_port}")
                if self._stop_requested:  # stopped before it started
                    self._life_task.cancel()
        except NopfError as exc:
            self._end(State.FAILED, str(exc))
            raise
        except asyncio.CancelledError:
            self._end(State.CLOSED, "stopped")
            raise
        self._end(State.CLOSED, "stopped" if self._stop_requested else self.ended_message)

    def stop(self) -> None:
        self._stop_requested = True
        if self._stop_gently():
            return
        if self._life_task is not None:
            self._life_task.cancel()  # our own child: run() returns "stopped"

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def snapshot(self) -> Snapshot:
        """The fields every engine has; engines add theirs (``dataclasses.replace``)."""
        return Snapshot(self.mode, self.role, self.local_port, self.rendezvous, self.state,
                        self.started_at, self.ended_at, self.error,
                        local_host=self.local_host)

    # -- for the engines ----------------------------------------------------------------

    def _life(self) -> Coroutine[Any, Any, None]:
        raise NotImplementedError

    def _stop_gently(self) -> bool:
        """End the life without cancelling it, if the engine can (True: it will)."""
        return False

    def _emit(self, event: Event) -> None:
        for fn in list(self._subscribers):
            fn(event)

    def _log(self, message: str, **data: Any) -> None:
        self._emit(Event("log", message, data=data))

    def _set_state(self, state: State, message: str) -> None:
        self.state = state
        self._emit(Event("state", message, data={"state": state.value}))

    def _end(self, state: State, message: str) -> None:
        """Enter a final state once; a failure's message becomes ``error``."""
        if not self.state.final:
            if state is State.FAILED:
                self.error = message
            self.ended_at = time.time()
            self._set_state(state, message)
