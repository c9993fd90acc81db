"""Coordinated mode (``nopf share`` / ``nopf connect``): pair by code, punch, authenticate,
multiplex.

    server (shares local_port):  coordinate() -> code -> PairedTunnel
    client (listens on it):      coordinate(code) -> PairedTunnel
    both:  SPAKE2 over the whole code -> AES-GCM records -> Mux
           (the SPAKE2 messages travel through the rendezvous with the coordination;
           the tunnel carries the key confirmation, and records follow it at once)
           server: every stream the peer opens -> 127.0.0.1:<local_port>
           client: every connection to 127.0.0.1:<local_port> -> a stream
"""

from __future__ import annotations

import socket
import time
from dataclasses import dataclass, replace
from typing import ClassVar

from nopf_web.errors import NopfError
from nopf_web.rendezvous.client import resolve_ipv4
from nopf_web.rendezvous.errors import RendezvousProtocolError
from nopf_web.roles import PeerRole
from nopf_web.tunnel.forward import serve_connect, serve_share
from nopf_web.tunnel.mux import Mux
from nopf_web.tunnel.secure import Pake, SecureChannel, open_channel
from nopf_web.wire.address import Endpoint

from .coordination import CoordinationSpec, PairedTunnel, coordinate
from .coordination_machine import Timings, TunnelPath
from .engine import EngineBase, Event, Mode, Snapshot, State, task_group
from .local import listen_local

DEFAULT_KEEPALIVE = 15.0  # s; well under common NAT idle timeouts (30 s and up)


@dataclass(frozen=True)
class CoordinatedSpec:
    role: PeerRole  # "server" shares local_port, "client" listens on it
    local_port: int
    rendezvous: Endpoint
    code: str | None = None  # required for the client
    code_lifetime: float = 600.0  # how long a sharer waits for its peer
    punch_timeout: float = 30.0
    keepalive: float = DEFAULT_KEEPALIVE
    local_host: str = "127.0.0.1"
    net_timeout: float = 5.0

    def __post_init__(self) -> None:
        if self.role == "client" and not self.code:
            raise ValueError("a client session needs the sharer's pairing code")
        if self.keepalive <= 0:
            raise ValueError("keepalive must be positive")


# -- the tunnel's API, in one place ----------------------------------------------------


def _make_pake(role: PeerRole, code: str) -> Pake:
    return Pake(role, code)


async def _open_channel(tunnel: PairedTunnel, pake: Pake | None,
                        timeout: float) -> SecureChannel:
    return await open_channel(tunnel.sock, role=tunnel.role, code=tunnel.code,
                              timeout=timeout, pake=pake)


def _make_mux(channel: SecureChannel, role: PeerRole, keepalive: float, name: str) -> Mux:
    return Mux(channel, role=role, keepalive=keepalive,
               dead_after=keepalive * 3, name=name)


# -- the engine ------------------------------------------------------------------------


class CoordinatedEngine(EngineBase):
    """Ends ``closed`` when stopped or when the peer closes cleanly."""

    mode: ClassVar[Mode] = "coordinated"
    ended_message: ClassVar[str] = "the peer closed the tunnel"

    def __init__(self, spec: CoordinatedSpec) -> None:
        super().__init__(spec.role, spec.local_port, spec.rendezvous)
        self.spec = spec
        self.code: str | None = spec.code
        self.public_address: Endpoint | None = None
        self.peer_address: Endpoint | None = None
        self.path: TunnelPath | None = None
        self.relay: Endpoint | None = None  # path "relay": where
        self._mux: Mux | None = None
        # Monotonic instants of the setup, for measurements: the pairing's, and
        # when the secure channel (SPAKE2 + confirmation) was up.
        self.timings: Timings | None = None
        self.secured_at: float | None = None
        self._pake: Pake | None = None  # our SPAKE2 half, made as soon as the code exists

    @property
    def bytes_in(self) -> int:
        return self._mux.bytes_in if self._mux else 0

    @property
    def bytes_out(self) -> int:
        return self._mux.bytes_out if self._mux else 0

    @property
    def connections(self) -> int:
        return self._mux.total_streams if self._mux else 0

    def snapshot(self) -> Snapshot:
        return replace(super().snapshot(), public_address=self.public_address,
                       peer_address=self.peer_address, bytes_in=self.bytes_in,
                       bytes_out=self.bytes_out, connections=self.connections, code=self.code,
                       path=self.path, relay=self.relay, timings=self.timings,
                       secured_at=self.secured_at)

    def set_peer(self, peer: Endpoint) -> None:
        raise NopfError("a coordinated session pairs by its code: it takes no peer address")

    # -- the life -----------------------------------------------------------

    async def _life(self) -> None:
        spec = self.spec
        listener: socket.socket | None = None
        try:
            if spec.role == "client":
                # Every local connection is a stream: a burst of them (a browser,
                # a load test) must not overflow the accept queue and be reset.
                listener = listen_local(spec.local_host, spec.local_port,
                                        backlog=socket.SOMAXCONN)
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
            channel = await _open_channel(
                paired, self._pake if paired.peer_pake is not None else None,
                timeout=spec.net_timeout * 2)
            self._mux = _make_mux(channel, spec.role, spec.keepalive, f"mux-{spec.local_port}")
            await self._mux.start()
            try:
                async with task_group() as tg:
                    # Serving starts before the peer's key confirmation is checked: our
                    # records may follow our own confirmation at once (a connection the
                    # application made while we paired goes out now), and the channel
                    # opens nothing of the peer's before its confirmation checks out.
                    if spec.role == "server":
                        serve = serve_share(self._mux, (spec.local_host, spec.local_port),
                                            connect_timeout=spec.net_timeout,
                                            on_event=self._log)
                    else:
                        assert listener is not None
                        serve = serve_connect(self._mux, listener, on_event=self._log)
                    tg.create_task(serve, name=f"serve-{spec.local_port}")
                    await channel.confirmed()  # PairingMismatch / HandshakeTimeout end it
                    self.secured_at = time.monotonic()
                    why = f", {paired.why}" if paired.why else ""
                    self._set_state(State.CONNECTED, f"encrypted tunnel to {paired.peer} up "
                                    f"({paired.over}{why}); " + self._ready_hint())
                    self._emit(Event(
                        "pipe_started", f"Started tunnel between localhost:{spec.local_port} "
                        f"- {paired.peer}", data={"local_port": spec.local_port,
                                                  "peer": str(paired.peer),
                                                  "path": paired.path}))
            finally:
                await self._mux.close()
        finally:
            if listener is not None:
                listener.close()

    async def _pair(self) -> PairedTunnel:
        spec = self.spec
        self._set_state(State.DISCOVERING, f"contacting rendezvous {spec.rendezvous}")
        server = await resolve_ipv4(spec.rendezvous, spec.net_timeout)
        if spec.role == "client":
            self._set_state(State.WAITING_PEER, f"joining the sharer of {spec.code}")
        return await coordinate(
            CoordinationSpec(Endpoint(*server), spec.role, code=spec.code,
                             code_lifetime=spec.code_lifetime, punch_timeout=spec.punch_timeout,
                             net_timeout=spec.net_timeout),
            pake=self._new_pake, on_code=self._got_code, on_event=self._log,
            on_punching=self._punching)

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
        where = f"{self.spec.local_host}:{self.spec.local_port}"
        if self.spec.role == "server":
            return f"the peer's connections arrive at {where}"
        return f"connect your applications to {where}"
