"""One coordinated-mode session's life: pair by code, punch, authenticate, multiplex.

The counterpart of :mod:`nopf_web.session` (the seed's plaintext mode) for
``nopf share`` / ``nopf connect`` and the dashboard: the same states, the
same :class:`~nopf_web.session.Event` values out, so the CLI printer and the
dashboard's recorder subscribe to either alike.

    sharer ("server"):  rendezvous share() -> code -> PairedTunnel (role A)
    joiner ("client"):  rendezvous connect(code) -> PairedTunnel (role B)
    both:               SPAKE2 over the whole code -> AES-GCM records -> Mux
                        (the SPAKE2 messages travel through the rendezvous with the
                        coordination; the tunnel carries the key confirmation, and
                        records follow it at once)
                        server: every stream the peer opens -> 127.0.0.1:<local_port>
                        client: every connection to 127.0.0.1:<local_port> -> a stream
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from dataclasses import dataclass

from nopf_web.rendezvous.client import resolve_ipv4
from nopf_web.roles import spake_side
from nopf_web.session import Event, SessionBase, SessionRole, State, listen_local
from nopf_web.sessions import coordination as coord
from nopf_web.sessions.coordination_machine import Timings
from nopf_web.tunnel.forward import serve_connect, serve_share
from nopf_web.tunnel.mux import Mux
from nopf_web.tunnel.secure import Pake, SecureChannel, open_channel
from nopf_web.wire.address import Endpoint

DEFAULT_KEEPALIVE = 15.0  # s; well under common NAT idle timeouts (30 s and up)


@dataclass(frozen=True)
class PairedSpec:
    role: SessionRole  # "server" shares local_port, "client" listens on it
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


class PairedSession(SessionBase):
    """Run with :meth:`run`; ends ``closed`` when stopped or when the peer closes cleanly."""

    def __init__(self, spec: PairedSpec) -> None:
        super().__init__()
        self.spec = spec
        self.code: str | None = spec.code
        self.public_address: Endpoint | None = None
        self.peer_address: Endpoint | None = None
        self.path: str | None = None
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

    # -- the life -----------------------------------------------------------

    async def run(self) -> None:
        await self._live(self._life(), "the peer closed the tunnel")

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
            self.timings = paired.timings
            self.public_address, self.peer_address = paired.public, paired.peer
            self.path = paired.path
            self._emit(Event("public_address", str(paired.public),
                             data={"public": str(paired.public)}))
            self._emit(Event("peer_address", f"peer {paired.peer}",
                             data={"peer": str(paired.peer)}))
            self._set_state(State.PUNCHING, f"authenticating {paired.peer} with the code")
            channel = await self._open(paired)
            self._mux = Mux(channel, initiator=paired.role == "server", keepalive=spec.keepalive,
                            dead_after=spec.keepalive * 3, name=f"mux-{spec.local_port}")
            await self._mux.start()
            # Serving starts before the peer's key confirmation is checked: our
            # records may follow our own confirmation at once (a connection the
            # application made while we paired goes out now), and the channel
            # opens nothing of the peer's before its confirmation checks out.
            if spec.role == "server":
                serve = serve_share(self._mux, (spec.local_host, spec.local_port),
                                    connect_timeout=spec.net_timeout, on_event=self._log)
            else:
                assert listener is not None
                serve = serve_connect(self._mux, listener, on_event=self._log)
            serving = asyncio.create_task(serve, name=f"serve-{spec.local_port}")
            try:
                await channel.confirmed()  # PairingMismatch / HandshakeTimeout end the session
                self.secured_at = time.monotonic()
                self._set_state(State.CONNECTED, f"encrypted tunnel to {paired.peer} up "
                                f"(over the {paired.path} path); " + self._ready_hint())
                await serving
            finally:
                serving.cancel()
                with contextlib.suppress(BaseException):
                    await serving
                await self._mux.close()
        finally:
            if listener is not None:
                listener.close()

    async def _open(self, paired: coord.PairedTunnel) -> SecureChannel:
        timeout = self.spec.net_timeout * 2
        if paired.peer_pake is not None and self._pake is not None:
            self._pake.finish(paired.peer_pake)  # done already while punching: a no-op
            return await open_channel(paired.sock, role=spake_side(paired.role),
                                      code=paired.code, timeout=timeout, pake=self._pake)
        # A rendezvous that forwarded no SPAKE2 messages: the whole handshake in-band.
        return await open_channel(paired.sock, role=spake_side(paired.role), code=paired.code,
                                  timeout=timeout)

    def _make_pake(self, code: str) -> Pake:
        self._pake = Pake(spake_side(self.spec.role), code)
        return self._pake

    async def _pair(self) -> coord.PairedTunnel:
        spec = self.spec
        self._set_state(State.DISCOVERING, f"contacting rendezvous {spec.rendezvous}")
        server = await resolve_ipv4(spec.rendezvous, spec.net_timeout)
        if spec.role == "server":
            return await coord.share(server, on_code=self._got_code, timeout=spec.code_lifetime,
                                     punch_timeout=spec.punch_timeout,
                                     net_timeout=spec.net_timeout, on_event=self._progress,
                                     pake=self._make_pake)
        assert spec.code is not None
        self._set_state(State.WAITING_PEER, f"joining the sharer of {spec.code}")
        return await coord.connect(server, spec.code, punch_timeout=spec.punch_timeout,
                                   net_timeout=spec.net_timeout, on_event=self._progress,
                                   pake=self._make_pake)

    def _got_code(self, code: str) -> None:
        self.code = code
        self._emit(Event("code", code, data={"code": code}))
        self._set_state(State.WAITING_PEER, "waiting for the peer to use the code")

    def _progress(self, message: str) -> None:
        if message.startswith("punching") and self.state is not State.PUNCHING:
            self._set_state(State.PUNCHING, message)
        else:
            self._log(message)

    def _ready_hint(self) -> str:
        where = f"{self.spec.local_host}:{self.spec.local_port}"
        if self.spec.role == "server":
            return f"the peer's connections arrive at {where}"
        return f"connect your applications to {where}"
