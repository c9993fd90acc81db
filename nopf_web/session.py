"""One seed-mode session's life: discover, wait for the peer, punch, pipe.

The session owns its sockets and emits :class:`Event` values to subscribers
(the CLI printer, the dashboard's recorder and live page). It never prints,
never touches a database, and knows nothing of HTTP.

States::

    discovering -> waiting_peer -> punching -> connected -> closed
         \\______________\\______________\\___________\\-> failed
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import errno
import ipaddress
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from nopf_web.errors import NopfError
from nopf_web.guard.base import Guard, NullGuard, Protection
from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import PunchConfig, Tactic
from nopf_web.rendezvous.client import Discovery, discover, probe_mapping, resolve_ipv4
from nopf_web.sockets import enable_keepalive, tune_stream, wait_ready
from nopf_web.tunnel.pipe import Counters, Pipe
from nopf_web.wire.address import Endpoint


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


class LocalPortInUse(NopfError):
    pass


class ServiceUnavailable(NopfError):
    pass


class TunnelLost(NopfError):
    pass


SessionRole = Literal["server", "client"]


@dataclass(frozen=True)
class SessionSpec:
    role: SessionRole
    local_port: int
    rendezvous: Endpoint
    punch: PunchConfig = field(default_factory=PunchConfig)
    punch_port: int = 0  # 0: let the kernel choose
    bind_host: str = "0.0.0.0"
    local_host: str = "127.0.0.1"  # the service (server) or the listener (client)
    net_timeout: float = 5.0  # rendezvous and local-service connects


@dataclass(frozen=True)
class Event:
    kind: Literal["state", "public_address", "peer_address", "pipe_started", "log", "guard",
                  "code"]
    message: str
    at: float = field(default_factory=time.time)
    data: dict[str, Any] = field(default_factory=dict)


Subscriber = Callable[[Event], None]


class SessionBase:
    """What every kind of session shares: the state, its end, and events to subscribers
    (the CLI printer, the dashboard's recorder and live page)."""

    def __init__(self) -> None:
        self.state = State.DISCOVERING
        self.error: str | None = None
        self.guard_dropped = 0
        self.started_at = time.time()
        self.ended_at: float | None = None
        self._subscribers: list[Subscriber] = []

    def subscribe(self, fn: Subscriber) -> Callable[[], None]:
        self._subscribers.append(fn)
        return lambda: self._subscribers.remove(fn) if fn in self._subscribers else None

    def _emit(self, event: Event) -> None:
        for fn in list(self._subscribers):
            fn(event)

    def _log(self, message: str, **data: Any) -> None:
        self._emit(Event("log", message, data=data))

    def _set_state(self, state: State, message: str) -> None:
        self.state = state
        self._emit(Event("state", message, data={"state": state.value}))

    async def _live(self, life: Awaitable[None], ended: str) -> None:
        """Await a session's life and record how it ended: ``failed`` on a NopfError
        (re-raised), ``closed`` when stopped (cancelled) or when it ran out."""
        try:
            await life
        except NopfError as exc:
            self._end(State.FAILED, str(exc))
            raise
        except asyncio.CancelledError:
            self._end(State.CLOSED, "stopped")
            raise
        self._end(State.CLOSED, ended)

    def _end(self, state: State, message: str) -> None:
        """Enter a final state once; a failure's message becomes ``error``."""
        if not self.state.final:
            if state is State.FAILED:
                self.error = message
            self.ended_at = time.time()
            self._set_state(state, message)


class Session(SessionBase):
    def __init__(self, spec: SessionSpec, guard: Guard | None = None) -> None:
        super().__init__()
        self.spec = spec
        self.guard: Guard = guard or NullGuard("no guard configured")
        self.public_address: Endpoint | None = None
        self.peer_address: Endpoint | None = None
        self.counters = Counters()  # a_to_b: local -> peer (out), b_to_a: peer -> local (in)
        self.connections = 0
        self._peer_set: asyncio.Event | None = None
        self._pipe: Pipe | None = None
        self._task: asyncio.Task[Any] | None = None
        self._stop_requested = False

    @property
    def bytes_out(self) -> int:
        return self.counters.a_to_b

    @property
    def bytes_in(self) -> int:
        return self.counters.b_to_a

    # -- input ---------------------------------------------------------------

    def set_peer(self, peer: Endpoint) -> None:
        """Give the peer's public address (once, from stdin, a form or the API)."""
        if self.peer_address is not None:
            raise NopfError(f"the peer address is already set to {self.peer_address}")
        if self.state.final:
            raise NopfError(f"the session has already {self.state.value}")
        self.peer_address = peer
        self._emit(Event("peer_address", f"peer address set to {peer}", data={"peer": str(peer)}))
        if self._peer_set is not None:
            self._peer_set.set()

    def stop(self) -> None:
        """End the session from any state: abort the pipe, or cancel what it waits on."""
        self._stop_requested = True
        if self._pipe is not None:
            self._pipe.stop()
        elif self._task is not None and not self._task.done():
            self._task.cancel()

    # -- the life ------------------------------------------------------------

    async def run(self) -> None:
        """Run to the end; raise :class:`NopfError` (after the ``failed`` event) on failure."""
        self._peer_set = asyncio.Event()
        self._task = asyncio.current_task()
        if self._stop_requested:  # stopped before it started
            self._end(State.CLOSED, "stopped")
            return
        if self.peer_address is not None:
            self._peer_set.set()
        await self._live(self._life(), "the pipe ended")

    async def _life(self) -> None:
        listener: socket.socket | None = None
        try:
            if self.spec.role == "client":
                listener = self._listen()
            tunnel = await self._discover_and_punch()
            if self.spec.role == "server":
                local = await self._connect_service(tunnel)
            else:
                assert listener is not None
                local = await self._accept_local(listener, tunnel)
                listener.close()
            await self._pipe_until_done(local, tunnel)
        finally:
            if listener is not None:
                listener.close()

    def _listen(self) -> socket.socket:
        return listen_local(self.spec.local_host, self.spec.local_port)

    async def _discover_and_punch(self) -> socket.socket:
        spec = self.spec
        self._set_state(State.DISCOVERING, f"asking rendezvous {spec.rendezvous} for our address")
        server = await resolve_ipv4(spec.rendezvous, spec.net_timeout)
        found = await discover(server, spec.punch_port, bind_host=spec.bind_host,
                               timeout=spec.net_timeout)
        # The first connection closes normally so its 4-tuple frees up; the second,
        # whose mapping the punch inherits, closes under the guard (if any).
        try:
            async with self.guard.protect(found.local_port, server) as window:
                again = await probe_mapping(server, found, bind_host=spec.bind_host,
                                            timeout=spec.net_timeout)
        finally:
            self._guard_window_ended(window, "discovery")
        punch_port = found.local_port
        hint = None
        if again is not None and again != found.public:
            hint = (f"your NAT is symmetric: two connections from local port {punch_port} got "
                    f"public ports {found.public.port} and {again.port}, so the peer cannot "
                    "reach the one we punch from (only a peer without NAT can)")
            self._log(f"warning: {hint}")
            found = Discovery(again, punch_port)
        elif found.public.port != punch_port:
            hint = (f"our NAT changed the source port (local {punch_port}, public "
                    f"{found.public.port}); if it picks a new one per destination it is symmetric")
        self.public_address = found.public
        self._emit(Event("public_address", str(found.public),
                         data={"public": str(found.public), "punch_port": punch_port}))
        self._set_state(State.WAITING_PEER, "waiting for the peer's address")
        assert self._peer_set is not None
        await self._peer_set.wait()
        peer = self.peer_address
        assert peer is not None
        if peer.host == found.public.host and not ipaddress.ip_address(peer.host).is_loopback:
            self._log(f"the peer {peer} has our public IP: both are behind one NAT; this works "
                      "only if that NAT supports hairpinning")
        role = Tactic.ARM if spec.role == "server" else Tactic.CONNECT
        self._set_state(State.PUNCHING, f"punching to {peer}")
        driver = PunchDriver((spec.bind_host, punch_port), (peer.host, peer.port), role,
                             spec.punch, nat_hint=hint)
        try:
            async with self.guard.protect(punch_port, (peer.host, peer.port)) as window:
                tunnel = await driver.run()
        finally:  # also when the punch fails: its drops count, and are reported
            self._guard_window_ended(window, "punch")
        tune_stream(tunnel)
        enable_keepalive(tunnel)
        self._set_state(State.CONNECTED, f"tunnel to {peer} established")
        return tunnel

    def _guard_window_ended(self, window: Protection, what: str) -> None:
        self.guard_dropped += window.dropped
        if window.error is not None:
            self._emit(Event("guard", f"guard could not cover the {what}: {window.error}",
                             data={"dropped": self.guard_dropped, "error": window.error}))
        elif window.dropped:
            self._emit(Event("guard", f"guard dropped {window.dropped} RST/FIN packet(s) from "
                             f"port {window.local_port} during the {what}",
                             data={"dropped": self.guard_dropped}))

    async def _connect_service(self, tunnel: socket.socket) -> socket.socket:
        host, port = self.spec.local_host, self.spec.local_port
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            async with asyncio.timeout(self.spec.net_timeout):
                await loop.sock_connect(sock, (host, port))
        except (OSError, TimeoutError) as exc:
            sock.close()
            tunnel.close()
            why = ("nothing is listening there" if isinstance(exc, ConnectionRefusedError)
                   else "no answer within " f"{self.spec.net_timeout:g} s"
                   if isinstance(exc, TimeoutError) else str(exc.strerror))
            raise ServiceUnavailable(
                f"cannot reach the local service at {host}:{port} ({why}): start it, or "
                "check --localport"
            ) from None
        tune_stream(sock)
        return sock

    async def _accept_local(self, listener: socket.socket, tunnel: socket.socket) -> socket.socket:
        loop = asyncio.get_running_loop()
        self._log(f"tunnel ready: connect your application to "
                  f"{self.spec.local_host}:{self.spec.local_port}")
        accept = asyncio.ensure_future(loop.sock_accept(listener))
        closed = asyncio.ensure_future(_wait_eof(tunnel))
        try:
            done, _ = await asyncio.wait({accept, closed}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for fut in (accept, closed):
                if not fut.done():
                    fut.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await fut
        if accept not in done:
            tunnel.close()
            raise TunnelLost(
                f"the peer {self.peer_address} closed the tunnel before a local application "
                "connected (is the service behind the peer running?)"
            )
        conn, _addr = accept.result()
        tune_stream(conn)
        return conn

    async def _pipe_until_done(self, local: socket.socket, tunnel: socket.socket) -> None:
        self.connections += 1
        self._pipe = Pipe(local, tunnel, name=f"pipe-{self.spec.local_port}")
        self._pipe.counters = self.counters
        self._emit(Event(
            "pipe_started",
            f"Started pipe between localhost:{self.spec.local_port} - {self.peer_address}",
            data={"local_port": self.spec.local_port, "peer": str(self.peer_address)},
        ))
        result = await self._pipe.run()
        if result.error is not None:
            err = result.error
            what = err.strerror or str(err)
            if result.error_side == "b":
                raise TunnelLost(
                    f"connection to peer {self.peer_address} lost mid-transfer ({what}) after "
                    f"{self.bytes_out} bytes out, {self.bytes_in} in: the peer's nopf stopped "
                    "or the network dropped the connection"
                )
            raise TunnelLost(
                f"the local connection on port {self.spec.local_port} failed ({what}) after "
                f"{self.bytes_out} bytes out, {self.bytes_in} in"
            )


def listen_local(host: str, port: int, backlog: int = 8) -> socket.socket:
    """The client's local listener, bound before anything else so a busy port fails fast."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host, port))
        sock.listen(backlog)
        sock.setblocking(False)
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise LocalPortInUse(
                f"local port {port} is already in use on {host}: choose another --localport"
            ) from None
        raise LocalPortInUse(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    return sock


async def _wait_eof(sock: socket.socket) -> None:
    """Return when the peer closes ``sock`` (EOF or error); bytes are left unread."""
    while True:
        await wait_ready(sock, write=False)
        try:
            data = sock.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT)
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return
        # The peer's service spoke first (e.g. an SSH banner): that is not an end;
        # stop watching, it will be piped once the application connects.
        await asyncio.Future()
