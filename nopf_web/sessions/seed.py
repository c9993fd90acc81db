"""The seed's plaintext mode: discover, wait for the peer's address, punch, pipe.

Seed-compatible: the users exchange public addresses by hand (stdin, a form
or the API gives the peer's to :meth:`SeedEngine.set_peer`), the server arms
and the client connects (see :mod:`nopf_web.punch.machine`), then one plain
connection is piped between the local port and the peer. The packet guard
covers the discovery's second connection and the punch.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass, field, replace
from typing import ClassVar

from nopf_web.delegated import Delegated
from nopf_web.errors import NopfError
from nopf_web.guard.base import Guard, GuardStatus, NullGuard, Protection
from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import PunchConfig, Tactic
from nopf_web.rendezvous.client import Discovery, discover, probe_mapping, reach_rendezvous
from nopf_web.roles import PeerRole
from nopf_web.sockets import (
    connect_tcp,
    enable_keepalive,
    peek_nonblocking,
    tune_stream,
    wait_ready,
)
from nopf_web.tunnel.pipe import Counters, Pipe
from nopf_web.wire.address import LOCAL_HOST, Endpoint, local_text

from .engine import EngineBase, Event, Mode, Snapshot, State, task_group
from .errors import ServiceUnavailable, TunnelLost
from .local import exposure, listen_local


@dataclass(frozen=True)
class SeedSpec:
    role: PeerRole
    local_port: int
    rendezvous: Endpoint
    punch: PunchConfig = field(default_factory=PunchConfig)
    punch_port: int = 0  # 0: let the kernel choose
    bind_host: str = "0.0.0.0"
    local_host: str = LOCAL_HOST  # the service (server) or the listener (client)
    net_timeout: float = 5.0  # rendezvous and local-service connects


class SeedEngine(EngineBase):
    mode: ClassVar[Mode] = "seed"
    ended_message: ClassVar[str] = "the pipe ended"

    def __init__(self, spec: SeedSpec, guard: Guard | None = None) -> None:
        super().__init__(spec.role, spec.local_port, spec.rendezvous, spec.local_host)
        self.spec = spec
        self.guard: Guard = guard or NullGuard("no guard configured")
        self.guard_dropped = 0
        self.public_address: Endpoint | None = None
        self.peer_address: Endpoint | None = None
        self.counters = Counters()  # a_to_b: local -> peer (out), b_to_a: peer -> local (in)
        self.connections = 0
        self._peer_set = asyncio.Event()
        self._pipe: Pipe | None = None

    bytes_out = Delegated[int]("counters", "a_to_b")
    bytes_in = Delegated[int]("counters", "b_to_a")

    def snapshot(self) -> Snapshot:
        return replace(super().snapshot(), public_address=self.public_address,
                       peer_address=self.peer_address, bytes_in=self.bytes_in,
                       bytes_out=self.bytes_out, connections=self.connections,
                       guard=GuardStatus.of(self.guard), guard_dropped=self.guard_dropped)

    # -- input ---------------------------------------------------------------

    def set_peer(self, peer: Endpoint) -> None:
        """Give the peer's public address (once, from stdin, a form or the API)."""
        if self.peer_address is not None:
            raise NopfError(f"the peer address is already set to {self.peer_address}")
        if self.state.final:
            raise NopfError(f"the session has already {self.state.value}")
        self.peer_address = peer
        self._emit(Event("peer_address", f"peer address set to {peer}", data={"peer": str(peer)}))
        self._peer_set.set()

    def _stop_gently(self) -> bool:
        # A running pipe ends cleanly (both sides see a close, not a reset).
        if self._pipe is None:
            return False
        self._pipe.stop()
        return True

    # -- the life ------------------------------------------------------------

    async def _life(self) -> None:
        listener: socket.socket | None = None
        try:
            if self.spec.role == "client":
                listener = listen_local(self.spec.local_host, self.spec.local_port)
                if (warning := exposure(self.spec.local_host, self.spec.local_port)) is not None:
                    self._log(warning)
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

    async def _discover_and_punch(self) -> socket.socket:
        spec = self.spec
        self._set_state(State.DISCOVERING, f"asking rendezvous {spec.rendezvous} for our address")
        server = await reach_rendezvous(spec.rendezvous, spec.net_timeout, on_event=self._log)
        found = await discover(server, spec.punch_port, bind_host=spec.bind_host,
                               timeout=spec.net_timeout)
        # The first connection closes normally so its 4-tuple frees up; the second,
        # whose mapping the punch inherits, closes under the guard (if any).
        window: Protection | None = None
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
        await self._peer_set.wait()
        peer = self.peer_address
        assert peer is not None
        if peer.host == found.public.host and not ipaddress.ip_address(peer.host).is_loopback:
            self._log(f"the peer {peer} has our public IP: both are behind one NAT; this works "
                      "only if that NAT supports hairpinning")
        tactic = Tactic.ARM if spec.role == "server" else Tactic.CONNECT
        self._set_state(State.PUNCHING, f"punching to {peer}")
        driver = PunchDriver((spec.bind_host, punch_port), (peer.host, peer.port), tactic,
                             spec.punch, nat_hint=hint, on_notice=self._log)
        window = None
        try:
            async with self.guard.protect(punch_port, (peer.host, peer.port)) as window:
                tunnel = await driver.run()
        finally:  # also when the punch fails: its drops count, and are reported
            self._guard_window_ended(window, "punch")
        tune_stream(tunnel)
        enable_keepalive(tunnel)
        self._set_state(State.CONNECTED, f"tunnel to {peer} established")
        return tunnel

    def _guard_window_ended(self, window: Protection | None, what: str) -> None:
        if window is None:
            return
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
        try:
            async with asyncio.timeout(self.spec.net_timeout):
                sock = await connect_tcp(host, port)
        except (OSError, TimeoutError) as exc:
            tunnel.close()
            why = ("nothing is listening there" if isinstance(exc, ConnectionRefusedError)
                   else "no answer within " f"{self.spec.net_timeout:g} s"
                   if isinstance(exc, TimeoutError) else exc.strerror or str(exc))
            raise ServiceUnavailable(
                f"cannot reach the local service at {Endpoint(host, port)} ({why}): start it, or "
                "check --localport"
            ) from None
        tune_stream(sock)
        return sock

    async def _accept_local(self, listener: socket.socket, tunnel: socket.socket) -> socket.socket:
        """The first local application's connection; TunnelLost if the peer closes first."""
        loop = asyncio.get_running_loop()
        self._log("tunnel ready: connect your application to "
                  f"{Endpoint(self.spec.local_host, self.spec.local_port)}")
        async with task_group() as tg:  # whichever comes first ends the other
            accept = tg.create_task(loop.sock_accept(listener), name="seed-accept-local")
            closed = tg.create_task(_wait_eof(tunnel), name="seed-watch-tunnel")
            accept.add_done_callback(lambda _: closed.cancel())
            closed.add_done_callback(lambda _: accept.cancel())
        if accept.cancelled():
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
            f"Started pipe between {local_text(self.spec.local_host, self.spec.local_port)} - "
            f"{self.peer_address}",
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


async def _wait_eof(sock: socket.socket) -> None:
    """Return when the peer closes ``sock`` (EOF or error); bytes are left unread."""
    while True:
        await wait_ready(sock, write=False)
        try:
            data = peek_nonblocking(sock)  # MSG_DONTWAIT, or a non-blocking socket
        except BlockingIOError:
            continue
        except OSError:
            return
        if not data:
            return
        # The peer's service spoke first (e.g. an SSH banner): that is not an end;
        # stop watching, it will be piped once the application connects.
        await asyncio.Future()
