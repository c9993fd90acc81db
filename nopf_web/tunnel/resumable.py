"""A channel that survives its TCP connections: the asyncio driver of
:mod:`nopf_web.tunnel.resume_machine` (which has the protocol: numbered
records, acks, replay, path selection, liveness).

:class:`ResumableChannel` is a :class:`nopf_web.tunnel.mux.Channel`, so a
:class:`~nopf_web.tunnel.mux.Mux` (and the forwarders) run over it as over a
:class:`~nopf_web.tunnel.secure.SecureChannel`. Underneath, one
``SecureChannel`` per TCP connection (a *path*): the first runs the tunnel's
handshake (``code`` in-band, or ``pake`` from the rendezvous), later ones
the path handshake with the secrets the first one confirmed.

    channel = ResumableChannel("server", pake=pake, on_event=events.put_nowait)
    await channel.add_path(sock, "public", first=True)   # today's handshake
    async with Mux(channel, role="server", dead_after=...) as mux: ...
    # on NeedPath (or to upgrade a relayed tunnel): a new connection, then
    await channel.add_path(new_sock, "relay")             # path handshake; the
                                                          # leader selects it

The driver reads, feeds, acts: records from any connection go to the machine,
which hands back the mux's bytes in order (:class:`Deliver`) and what to send
where (:class:`Send`); one loop timer (``call_at``, or ``call_soon`` for an
ack that is due now) stands for every deadline of the machine. No task of its
own: everything runs in the connections' callbacks and the callers' awaits.

Give the mux a ``dead_after`` longer than the resume budget: while the
tunnel resumes nothing reaches it, and this layer already watches each path.
"""

from __future__ import annotations

import asyncio
import ctypes
import socket
import sys
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from nopf_web.buffers import Buffer
from nopf_web.roles import PeerRole, other

from .errors import HandshakeError, TunnelClosed, TunnelError
from .record_machine import (
    DEFAULT_KEY_LIMITS,
    HANDSHAKE_TIMEOUT,
    KeyLimits,
    Pake,
    TunnelSecrets,
)
from .resume_machine import (
    ACK_DELAY,
    CANDIDATE_TIMEOUT,
    KEEPALIVE,
    MIN_TIMEOUT,
    REPLAY_CAP,
    RESUME_BUDGET,
    RTT_FACTOR,
    SWITCH_GRACE,
    ClosePath,
    Deliver,
    NeedPath,
    PathFailed,
    PathKind,
    PathLost,
    PathSelected,
    PathState,
    PathStatus,
    PeerClosed,
    ResumeEvent,
    ResumeMachine,
    Send,
    TunnelFailed,
    Writable,
)
from .secure import SecureChannel, open_channel, open_path

__all__ = ["ChannelStats", "PathInfo", "ResumableChannel"]

# How long a connection closed cleanly may take to flush before it is reset: a
# dead path never flushes, and its socket must not linger.
CLOSE_FLUSH = 2.0

# glibc malloc (see _keep_freed_memory): allocations up to this come from the
# heap, and this much freed heap is kept rather than given back to the system.
_MMAP_THRESHOLD = 1 << 20
_TRIM_THRESHOLD = 32 << 20
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3

EventSink = Callable[[ResumeEvent], None]
# What the owner hears about (the rest is the driver's business).
_NEWS = (PathSelected, PathLost, PathFailed, NeedPath, TunnelFailed, PeerClosed)


@dataclass(frozen=True, slots=True)
class PathInfo:
    """One connection, now or when it ended: wire bytes (records, handshake),
    mux bytes carried (replays included) and records."""

    id: int
    kind: PathKind
    status: PathStatus
    wire_in: int
    wire_out: int
    data_in: int
    data_out: int
    records_in: int
    records_out: int
    rtt: float | None
    key_updates: tuple[int, int] = (0, 0)  # record-key updates (sent, received)


@dataclass(frozen=True, slots=True)
class ChannelStats:
    """``kind``: the path carrying the tunnel now (None while resuming);
    ``resumes``: moves to another path; ``paths``: every connection so far."""

    kind: PathKind | None
    resumes: int
    replayed: int
    duplicates: int
    unacked_bytes: int
    paths: tuple[PathInfo, ...]


def _keep_freed_memory() -> None:
    """Tune glibc's malloc for buffers kept until acknowledged (no-op elsewhere).

    The resume layer keeps the mux's buffers (the 256 KiB ``bytes`` of each
    local read) until the peer acknowledges them, a few MB at a time. With
    glibc's defaults each ack then freed enough at the top of the heap to have
    it trimmed, and the next reads faulted the pages in again: 12-18 % more CPU
    per GB on ``bench.secure``. Copying each message into a ring of our own
    instead cost even more (a copy into memory that is rarely in cache). Keeping
    up to 32 MiB of freed heap, and serving allocations below 1 MiB from the
    heap (setting one threshold turns off glibc's own adjustment of the
    other), brings the cost back to noise. Process-wide, idempotent.
    """
    if not sys.platform.startswith("linux"):  # glibc's knobs; other C libraries differ
        return
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):  # not glibc (or no symbol table): leave it
        return
    mallopt(_M_MMAP_THRESHOLD, _MMAP_THRESHOLD)
    mallopt(_M_TRIM_THRESHOLD, _TRIM_THRESHOLD)


class ResumableChannel:
    """Records over whichever connection carries the tunnel; see the module docstring.

    ``role`` (``"server"`` shares and leads path selection, ``"client"``
    follows); ``code`` or ``pake`` authenticate the first path as
    :func:`~nopf_web.tunnel.secure.open_channel` does. ``on_event`` hears
    :class:`PathSelected`, :class:`PathLost`, :class:`PathFailed`,
    :class:`NeedPath`, :class:`TunnelFailed` and :class:`PeerClosed` (it must
    not raise). The other options are the machine's.
    """

    def __init__(self, role: PeerRole, *, code: str | None = None, pake: Pake | None = None,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT,
                 on_event: EventSink | None = None, replay_cap: int = REPLAY_CAP,
                 keepalive: float = KEEPALIVE, min_timeout: float = MIN_TIMEOUT,
                 rtt_factor: float = RTT_FACTOR, ack_delay: float = ACK_DELAY,
                 switch_grace: float = SWITCH_GRACE,
                 candidate_timeout: float = CANDIDATE_TIMEOUT,
                 resume_budget: float = RESUME_BUDGET, name: str = "tunnel",
                 key_limits: KeyLimits = DEFAULT_KEY_LIMITS) -> None:
        if (code is None) == (pake is None):
            raise ValueError("give the pairing code or the pake, not both")
        self.role: PeerRole = role
        self.name = name
        self._code = code
        self._pake = pake
        self.handshake_timeout = handshake_timeout
        self.key_limits = key_limits  # every path's record keys (tests set low ones)
        self._on_event = on_event
        self._machine = ResumeMachine(
            role, replay_cap=replay_cap, keepalive=keepalive, min_timeout=min_timeout,
            rtt_factor=rtt_factor, ack_delay=ack_delay, switch_grace=switch_grace,
            candidate_timeout=candidate_timeout, resume_budget=resume_budget)
        self._loop = asyncio.get_running_loop()
        _keep_freed_memory()
        self._conns: dict[int, SecureChannel] = {}
        self._unclosed: set[SecureChannel] = set()  # ended, socket not yet closed
        self._closing: dict[int, asyncio.TimerHandle] = {}  # clean closes not yet flushed
        # Every path so far, as the machine sees it (kept after it ended), and
        # the wire bytes of those whose connection ended.
        self._states: dict[int, PathState] = {}
        self._wire: dict[int, tuple[int, int]] = {}
        self._updates: dict[int, tuple[int, int]] = {}  # key updates of ended paths
        self._first: SecureChannel | None = None
        self._secrets: TunnelSecrets | None = None
        self._active: SecureChannel | None = None  # the connection we send on
        self._sink: Callable[[bytes | memoryview], None] | None = None
        self._on_end: Callable[[Exception | None], None] | None = None
        self._pending: list[memoryview] = []  # delivered before start()
        self._ended = False
        self._end_error: Exception | None = None
        self._done = asyncio.Event()
        self._writable = asyncio.Event()  # the replay buffer has room again
        self._timer: asyncio.TimerHandle | asyncio.Handle | None = None
        self._timer_at = 0.0

    # -- observation ------------------------------------------------------------------

    @property
    def peer_role(self) -> PeerRole:
        return other(self.role)

    @property
    def resume_id(self) -> bytes | None:
        """The tunnel's name at the rendezvous for a resume (once the first path
        confirmed); reveals nothing of the key."""
        return self._secrets.resume_id if self._secrets is not None else None

    @property
    def kind(self) -> PathKind | None:
        """The kind of path carrying the tunnel now (None while resuming)."""
        active = self._machine.active
        return active.kind if active is not None else None

    @property
    def ended(self) -> bool:
        return self._ended

    def stats(self) -> ChannelStats:
        s = self._machine.stats()
        paths = []
        for path, p in self._states.items():
            conn = self._conns.get(path)
            wire = (conn.wire_bytes_in, conn.wire_bytes_out) if conn is not None \
                else self._wire.get(path, (0, 0))
            updates = conn.key_updates if conn is not None else self._updates.get(path, (0, 0))
            paths.append(PathInfo(path, p.kind, p.status, *wire, p.data_in, p.data_out,
                                  p.records_in, p.records_out, p.srtt, updates))
        return ChannelStats(s.kind, s.resumes, s.replayed, s.duplicates, s.unacked_bytes,
                            tuple(paths))

    async def confirmed(self) -> None:
        """Wait for the first path's key confirmation (as ``SecureChannel.confirmed``)."""
        if self._first is None:
            raise RuntimeError("add the first path first")
        await self._first.confirmed()

    # -- paths ------------------------------------------------------------------------

    async def add_path(self, sock: socket.socket, kind: PathKind, *,
                       first: bool = False) -> int:
        """Run the tunnel over ``sock`` too (the channel owns it from now on); the
        path's id.

        ``first``: the tunnel's first connection, with today's handshake; this
        returns when records may be sent and raises what ``open_channel``
        raises. Later connections run the path handshake; this returns once the
        peer proved the key on it (the leader then selects it if it is the best
        path), and raises :class:`PathRejected`, :class:`HandshakeTimeout` or
        :class:`HandshakeError` if not: the tunnel goes on either way.
        """
        if first:
            if self._first is not None:
                sock.close()
                raise RuntimeError("the tunnel already has its first path")
            # The code is unused when a pake is given.
            conn = await open_channel(sock, role=self.role, code=self._code or "",
                                      timeout=self.handshake_timeout, pake=self._pake,
                                      limits=self.key_limits)
            self._first = conn
            path = self._machine.add_path(kind, self._loop.time(), first=True)
            self._attach(path, conn)
            self._active = conn
            if conn.is_confirmed:  # the in-band handshake checked it already
                self._path_confirmed(path, conn)
            return path
        secrets = self._secrets
        if secrets is None or self._ended:
            sock.close()
            if self._ended:
                raise self._end_error or TunnelClosed("the tunnel was closed")
            raise TunnelError("the tunnel's first path is not confirmed yet: nothing to "
                              "resume")
        path = self._machine.add_path(kind, self._loop.time())
        state = self._machine.path(path)
        assert state is not None
        self._states[path] = state
        try:
            conn = await open_path(sock, role=self.role, secrets=secrets,
                                   timeout=self.handshake_timeout, limits=self.key_limits)
        except BaseException as exc:
            error = exc if isinstance(exc, Exception) else HandshakeError(
                "path handshake: cancelled")
            self._apply(self._machine.path_closed(path, error, self._loop.time()))
            raise
        self._attach(path, conn)
        try:
            await conn.confirmed()
        except asyncio.CancelledError:
            conn.abort()
            raise
        return path

    def attempt_failed(self, why: str) -> None:
        """A try at a new path failed before reaching the tunnel (``why``: one line,
        e.g. the rendezvous could not be reached): the tunnel's failure names it if
        the resume budget ends."""
        self._machine.attempt_failed(why)

    def _attach(self, path: int, conn: SecureChannel) -> None:
        machine, now = self._machine, self._loop.time
        state = machine.path(path)
        assert state is not None
        self._states[path] = state
        self._conns[path] = conn

        def on_record(plain: bytes | memoryview) -> None:
            events = machine.receive(path, plain, now())
            if len(events) == 1 and type(event := events[0]) is Deliver \
                    and self._sink is not None:
                self._sink(event.data)  # the hot path: one record of mux bytes
            elif events:
                self._apply(events)
            if machine.rearm:
                self._arm()

        def on_progress() -> None:
            machine.progress(path, now())
            if machine.rearm:
                self._arm()

        conn.watch(on_confirmed=lambda: self._path_confirmed(path, conn),
                   on_progress=on_progress)
        conn.start(on_record, lambda exc: self._path_ended(path, conn, exc))

    def _path_confirmed(self, path: int, conn: SecureChannel) -> None:
        if conn is self._first and self._secrets is None:
            self._secrets = conn.secrets
        self._apply(self._machine.path_confirmed(path, self._loop.time()))
        self._arm()

    def _path_ended(self, path: int, conn: SecureChannel, exc: Exception | None) -> None:
        flush = self._closing.pop(path, None)
        if flush is not None:
            flush.cancel()
        self._forget(path, conn)
        self._apply(self._machine.path_closed(path, exc, self._loop.time()))
        self._arm()

    def _forget(self, path: int, conn: SecureChannel) -> None:
        if self._conns.get(path) is conn:
            self._wire[path] = (conn.wire_bytes_in, conn.wire_bytes_out)
            self._updates[path] = conn.key_updates
            del self._conns[path]
            if not conn.closed:  # its socket closes a little later: wait_closed waits
                self._unclosed.add(conn)
        self._unclosed = {c for c in self._unclosed if not c.closed}
        if self._active is conn:
            self._active = None

    # -- the Channel the mux runs over ------------------------------------------------

    def write(self, data: Buffer) -> None:
        self.writelines((data,))

    def writelines(self, parts: Iterable[Buffer]) -> None:
        """Carry ``parts`` (joined) as one numbered message; raises once the tunnel ended."""
        events = self._machine.send(parts, self._loop.time())
        if len(events) == 1 and type(event := events[0]) is Send \
                and (conn := self._conns.get(event.path)) is not None and not conn.ended:
            conn.writelines(event.parts)  # the hot path: one record on the active path
        elif events:
            self._apply(events)
        if self._machine.rearm:
            self._arm()

    @property
    def writing_paused(self) -> bool:
        """The replay buffer is full, or the active connection's transport is."""
        if self._ended:
            return False
        active = self._active
        return self._machine.writing_paused or (active is not None and active.writing_paused)

    async def drain(self) -> None:
        """Wait until writing may go on (or the tunnel ended)."""
        while not self._ended:
            if self._machine.writing_paused:
                self._writable.clear()
                await self._writable.wait()
            elif (active := self._active) is not None and active.writing_paused:
                await active.drain()
            else:
                return

    def start(self, on_record: Callable[[bytes | memoryview], None],
              on_end: Callable[[Exception | None], None]) -> None:
        """Deliver the mux's bytes, in order, to ``on_record`` (what came before
        first); ``on_end`` once: ``None`` after a clean end, else the failure."""
        pending, self._pending = self._pending, []
        for data in pending:
            on_record(data)
        self._sink, self._on_end = on_record, on_end
        if self._ended:
            on_end(self._end_error)

    def close(self) -> None:
        """End the tunnel cleanly: the peer hears CLOSE, every connection is closed."""
        self._apply(self._machine.close(self._loop.time()))
        self._finish(None)

    def abort(self) -> None:
        self._apply(self._machine.abort(TunnelClosed("the tunnel was aborted")))
        self._finish(None)

    async def wait_closed(self) -> None:
        """Wait until the tunnel ended and each connection's socket is closed."""
        await self._done.wait()
        for conn in [*self._conns.values(), *self._unclosed]:
            await conn.wait_closed()

    # -- the machine's events ---------------------------------------------------------

    def _apply(self, events: list[ResumeEvent]) -> None:
        for event in events:
            kind = type(event)
            if kind is Send:
                assert isinstance(event, Send)
                conn = self._conns.get(event.path)
                if conn is not None and not conn.ended:
                    conn.writelines(event.parts)
            elif kind is Deliver:
                assert isinstance(event, Deliver)
                if self._sink is not None:
                    self._sink(event.data)
                else:
                    self._pending.append(event.data)
            elif kind is ClosePath:
                assert isinstance(event, ClosePath)
                self._close_path(event)
            elif kind is Writable:
                self._writable.set()
            else:
                if kind is PathSelected:
                    assert isinstance(event, PathSelected)
                    self._active = self._conns.get(event.path)
                    self._writable.set()
                elif kind is PathLost:
                    self._active = None
                elif kind is TunnelFailed:
                    assert isinstance(event, TunnelFailed)
                    self._finish(event.error)
                elif kind is PeerClosed:
                    self._finish(None)
                if self._on_event is not None and isinstance(event, _NEWS):
                    self._on_event(event)

    def _close_path(self, event: ClosePath) -> None:
        conn = self._conns.get(event.path)
        if conn is None:
            return
        if conn is self._active:
            self._active = None
        if event.abort:
            conn.abort()
            return
        conn.linger_close()
        if event.path not in self._closing:
            # Reset it if it has not flushed and ended by then (a dead path never does).
            self._closing[event.path] = self._loop.call_later(
                CLOSE_FLUSH, self._reset_unflushed, event.path, conn)

    def _reset_unflushed(self, path: int, conn: SecureChannel) -> None:
        self._closing.pop(path, None)
        conn.abort()

    def _finish(self, error: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = error
        self._active = None
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._writable.set()
        self._done.set()
        if self._on_end is not None:
            self._on_end(error)

    # -- the one timer ----------------------------------------------------------------

    def _arm(self) -> None:
        """The loop timer at the machine's next deadline, if that is earlier than
        the one set (a later one fires first, finds nothing due and re-arms)."""
        machine = self._machine
        machine.rearm = False
        deadline = machine.next_deadline
        if deadline is None:
            machine.armed(self._timer_at if self._timer is not None else None)
            return
        if self._timer is not None:
            if self._timer_at <= deadline:
                machine.armed(self._timer_at)
                return
            self._timer.cancel()
        self._timer_at = deadline
        machine.armed(deadline)
        if deadline <= self._loop.time():
            self._timer = self._loop.call_soon(self._on_timer)
        else:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._machine.armed(None)
        self._apply(self._machine.timer(self._loop.time()))
        if not self._ended:
            self._arm()
