"""Coordinated mode, peer side: pair by code through the rendezvous, punch, return a socket.

:func:`share` gets a nameplate from the rendezvous, completes it into a code
with two local words and waits for a peer; :func:`connect` joins with a code.
Both then follow the rendezvous' plan (see :mod:`nopf_web.rendezvous.book`):
on its "fire" both start at the same moment, a full-TTL simultaneous open,
falling back to the seed's sequence (arm with a low TTL / connect) until the
plan's budget runs out.

Everything happens from one local port P: the coordination connection, then
the punch. The sharer first makes a plain discovery from P too (the NAT
mapping check: the rendezvous compares its answer with the address it sees on
the coordination connection); the joiner skips that check, which would cost it
three round trips, unless the rendezvous asks for it (``probe_required``:
against a symmetric sharer, the joiner's mapping decides the plan). The words
of the code never leave this process; encryption over the whole code is the
caller's business. The caller may hand in its SPAKE2 half (``pake``): its
message then travels with the coordination (the hello, or for the sharer a
pake message once its code exists), the peer's comes back in the fire, and
the SPAKE2 arithmetic is finished while the SYNs cross, so the tunnel only
has the key confirmation left to do. On Linux the hello rides in the SYN to
the rendezvous (TCP Fast Open) where the rendezvous host allows it.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import errno
import os
import socket
import time
from collections import Counter
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, Literal, Protocol

from nopf_web.errors import NopfError
from nopf_web.pairing import PairingCode, make_code, parse_code
from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import Failure, PunchConfig, PunchTimeout, Tactic
from nopf_web.sockets import (
    connect_nonblocking,
    reusable_socket,
    try_fastopen,
    tune_stream,
    wait_connected,
)
from nopf_web.wire.address import Endpoint
from nopf_web.wire.discovery import DiscoveryReader
from nopf_web.wire.errors import WireError
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    FrameReader,
    Hello,
    HelloAction,
    MessageError,
    PakeMessage,
    Ping,
    Pong,
    Probe,
    ServerMessage,
    Stage,
    Welcome,
    decode_server_message,
    encode,
)

from .client import resolve_ipv4
from .errors import RendezvousError, RendezvousProtocolError, RendezvousUnreachable

PORT_FREE_WAIT = 2.0  # s to wait for our end of the probe to close (one RTT)
DEFAULT_PUNCH_TTL = 2
# A punch that fails is coordinated again (fresh ports, a new fire time) while
# the punch timeout allows: the first attempt gets half of it, and an attempt
# is only started with at least MIN_ATTEMPT seconds left.
MIN_ATTEMPT = 2.0
MAX_ATTEMPTS = 3
RETRY_WAIT = 12.0  # s for the peer to fail its attempt too and ask again (rendezvous: 10)


class PakeHalf(Protocol):
    """One side's SPAKE2 (``nopf_web.tunnel.secure.Pake``), as coordination needs it."""

    @property
    def message(self) -> bytes: ...  # ours, for the peer (33 bytes)

    def finish(self, peer_message: bytes) -> None: ...  # never raises


PakeFactory = Callable[[str], PakeHalf]  # the full code -> our half


# Errors ---------------------------------------------------------------------------


class PairingError(NopfError):
    """Coordinated mode failed; the message is one line for the user."""


class UnknownCode(PairingError):
    pass


class CodeExpired(PairingError):
    pass


class CodeUsed(PairingError):
    pass


class TooManyGuesses(PairingError):
    pass


class PeerNeverArrived(PairingError):
    pass


class SymmetricNat(PairingError):
    pass


class _ProbeRequired(PairingError):
    """The rendezvous needs our NAT mapping check before it can plan (internal)."""

    port = 0  # the local port the check must run from


class RendezvousTooOld(PairingError):
    """The rendezvous speaks only the seed's discovery protocol."""


class CoordinatedPunchTimeout(PairingError):
    def __init__(self, message: str, outcomes: Counter[Failure]) -> None:
        super().__init__(message)
        self.outcomes = outcomes


_ERRORS: dict[str, type[PairingError]] = {
    "unknown_code": UnknownCode, "expired": CodeExpired, "used": CodeUsed,
    "too_many_guesses": TooManyGuesses, "symmetric_nat": SymmetricNat,
    "probe_required": _ProbeRequired,
}


# The result -----------------------------------------------------------------------


@dataclass(frozen=True)
class Timings:
    """``time.monotonic()`` instants of one pairing, for measurements."""

    started: float  # share() / connect() called
    hello_sent: float  # the coordination hello left
    fire: float  # the fire instruction arrived (the punch starts)
    connected: float  # the socket is connected
    probed: float | None = None  # the NAT mapping check finished (None: not run)
    rdv_connected: float = 0.0  # the coordination connection was established


@dataclass(frozen=True)
class PairedTunnel:
    sock: socket.socket  # connected, NON-blocking, TCP_NODELAY; the caller owns it
    role: Literal["A", "B"]  # A = the sharer (encryption/mux server), B = the connector
    code: str  # the full code, e.g. "7-orbit-lantern"
    peer: Endpoint  # the address that answered
    path: Literal["public", "lan"]
    local: Endpoint  # our end of the tunnel (host as bound, punch port)
    public: Endpoint  # our public address, as the rendezvous saw it
    rtt: float  # s, the rendezvous' estimate of the peer-to-peer round trip
    timings: Timings
    attempt: int = 1  # 2 and up: the punch worked after coordinating again
    # The peer's SPAKE2 message from the fire, already passed to our half's
    # finish(); None: both sides run SPAKE2 in-band on the tunnel.
    peer_pake: bytes | None = None


EventSink = Callable[[str], None]


# API ------------------------------------------------------------------------------


async def share(
    rendezvous: tuple[str, int], *, on_code: Callable[[str], None], timeout: float = 600,
    punch_timeout: float = 30, bind_host: str = "0.0.0.0", punch_port: int = 0,
    net_timeout: float = 5.0, punch_ttl: int = DEFAULT_PUNCH_TTL,
    on_event: EventSink | None = None, pake: PakeFactory | None = None,
) -> PairedTunnel:
    """Get a code (passed to ``on_code`` as soon as it exists), wait up to ``timeout``
    for a peer to use it, then punch for up to ``punch_timeout`` seconds.

    ``pake(code)``, called once the code exists, gives our SPAKE2 half; its
    message is sent to the rendezvous for the peer."""
    started = time.monotonic()
    code: PairingCode | None = None
    half: PakeHalf | None = None

    async def wait_for_peer(ctl: _Control) -> Fire:
        nonlocal code
        welcome = await ctl.expect(net_timeout, "pairing code (nameplate)")
        if not isinstance(welcome, Welcome):
            raise RendezvousProtocolError(f"rendezvous {ctl.where} sent {welcome!r:.60} "
                                          "instead of a nameplate")
        nonlocal half
        code = make_code(welcome.nameplate)
        _say(on_event, f"pairing code {code} (valid {welcome.expires_in / 60:g} min)")
        on_code(str(code))
        if pake is not None:  # nobody waits for us yet: the SPAKE2 arithmetic is free here
            half = pake(str(code))
            await ctl.send(PakeMessage(half.message))
        left = timeout - (time.monotonic() - started)
        try:
            msg = await ctl.next_message(max(0.0, left))
        except TimeoutError:
            raise PeerNeverArrived(f"no peer used the pairing code within {timeout:g} s") from None
        except CodeExpired as exc:  # the rendezvous' lifetime was shorter than ours
            raise PeerNeverArrived(f"the peer never arrived: {exc}") from None
        return _expect_fire(msg, ctl.where)

    fire, ctl_info = await _coordinate(rendezvous, "share", None, wait_for_peer, started,
                                       _first_budget(punch_timeout), bind_host, punch_port,
                                       net_timeout, on_event, None)
    assert code is not None
    return await _punch_and_retry(
        _Retry(rendezvous, code.nameplate, punch_timeout, bind_host, punch_port, net_timeout),
        fire, ctl_info, "A", str(code), punch_ttl, on_event, half)


async def connect(
    rendezvous: tuple[str, int], code: str, *, punch_timeout: float = 30,
    bind_host: str = "0.0.0.0", punch_port: int = 0, net_timeout: float = 5.0,
    punch_ttl: int = DEFAULT_PUNCH_TTL, on_event: EventSink | None = None,
    pake: PakeFactory | None = None,
) -> PairedTunnel:
    """Join the sharer of ``code`` and punch for up to ``punch_timeout`` seconds.

    A malformed code raises :class:`nopf_web.pairing.BadCode` before any network
    traffic. Words that do not match are not detected here (the rendezvous never
    sees them): the caller's PAKE over ``PairedTunnel.code`` catches them.
    ``pake(code)`` gives our SPAKE2 half; its message goes in the hello.
    """
    started = time.monotonic()
    parsed = parse_code(code)
    halves: list[PakeHalf] = []

    def our_message() -> bytes | None:
        # Called while the coordination connection's SYN is out: its round
        # trip hides the SPAKE2 arithmetic.
        if pake is None:
            return None
        if not halves:
            halves.append(pake(str(parsed)))
        return halves[0].message

    async def wait_for_fire(ctl: _Control) -> Fire:
        # The rendezvous answers within about one round trip (plus a ping where
        # its kernel gives no RTT); allow the network timeout on top.
        return _expect_fire(await ctl.expect(net_timeout + 2, "fire instruction"), ctl.where)

    fire, ctl_info = await _coordinate(rendezvous, "join", parsed.nameplate, wait_for_fire,
                                       started, _first_budget(punch_timeout), bind_host,
                                       punch_port, net_timeout, on_event, our_message)
    return await _punch_and_retry(
        _Retry(rendezvous, parsed.nameplate, punch_timeout, bind_host, punch_port, net_timeout),
        fire, ctl_info, "B", str(parsed), punch_ttl, on_event, halves[0] if halves else None)


# Coordination ----------------------------------------------------------------------


@dataclass(frozen=True)
class _CtlInfo:
    local: Endpoint  # (bind_host, P)
    started: float
    hello_sent: float
    fire: float
    punch_timeout: float
    probed: float | None = None
    rdv_connected: float = 0.0


class _Control:
    """The coordination connection, from port P: seed reply first, then frames."""

    def __init__(self, sock: socket.socket, where: str) -> None:
        self.sock = sock
        self.where = where
        self.frames = FrameReader()
        self.pending: list[bytes] = []
        self.seen = 0  # messages received

    async def send(self, msg: Hello | Pong | Probe | PakeMessage) -> None:
        await asyncio.get_running_loop().sock_sendall(self.sock, encode(msg))

    async def recv(self, n: int) -> bytes:
        try:
            chunk = await asyncio.get_running_loop().sock_recv(self.sock, n)
        except OSError as exc:
            raise RendezvousProtocolError(
                f"rendezvous {self.where} broke the connection ({exc.strerror or exc})"
            ) from None
        return chunk

    async def read_discovery(self) -> Endpoint:
        reader = DiscoveryReader()
        while reader.needed:
            chunk = await self.recv(reader.needed)
            if not chunk:
                raise RendezvousProtocolError(f"rendezvous {self.where} closed before its "
                                              "discovery reply (is it a nopf-server?)")
            try:
                result = reader.feed(chunk)
            except WireError as exc:
                raise RendezvousProtocolError(f"rendezvous {self.where}: {exc}") from None
        assert result is not None
        return Endpoint(*result)

    async def expect(self, timeout: float, what: str) -> ServerMessage:
        """``next_message``, with a timeout error that says what we waited for."""
        try:
            return await self.next_message(timeout)
        except TimeoutError:
            raise RendezvousProtocolError(
                f"rendezvous {self.where} sent no {what} within {timeout:g} s") from None

    async def next_message(self, timeout: float) -> ServerMessage:
        """The next message that is not a ping (pings are answered at once)."""
        async with asyncio.timeout(timeout):
            while True:
                while not self.pending:
                    try:
                        chunk = await self.recv(4096)
                    except RendezvousProtocolError:
                        if self.seen:
                            raise
                        chunk = b""  # a seed server resets: our hello went unread
                    if not chunk and not self.seen:
                        raise RendezvousTooOld(
                            f"rendezvous {self.where} closed the connection after the discovery "
                            "reply: it speaks only the seed protocol, so pairing codes need a "
                            "newer nopf-server")
                    if not chunk:
                        raise RendezvousProtocolError(
                            f"rendezvous {self.where} closed the connection unexpectedly")
                    try:
                        self.pending += self.frames.feed(chunk)
                    except MessageError as exc:
                        raise RendezvousProtocolError(f"rendezvous {self.where}: {exc}") from None
                self.seen += 1
                try:
                    msg = decode_server_message(self.pending.pop(0))
                except MessageError as exc:
                    raise RendezvousProtocolError(f"rendezvous {self.where}: {exc}") from None
                if isinstance(msg, Ping):
                    await self.send(Pong(msg.seq))
                    continue
                if isinstance(msg, ErrorReply) and msg.code in _ERRORS:
                    raise _ERRORS[msg.code](msg.message)
                return msg


def _expect_fire(msg: ServerMessage, where: str) -> Fire:
    if isinstance(msg, Fire):
        return msg
    if isinstance(msg, ErrorReply):
        raise PairingError(f"rendezvous {where}: {msg.message}")
    raise RendezvousProtocolError(f"rendezvous {where} sent {type(msg).__name__} where a fire "
                                  "instruction was due")


async def _probe(server: tuple[str, int], bind_host: str, port: int,
                 net_timeout: float) -> tuple[Endpoint, int]:
    """A discovery from ``port`` (0: any) that the rendezvous closes first, at once.

    Returns the address it saw and our port. The rendezvous' FIN comes first,
    so by the time our own close is acknowledged its side is in TIME_WAIT and
    our next SYN from the same 4-tuple is welcome (see ``Probe``).
    """
    where = f"{server[0]}:{server[1]}"
    sock = await _connect_from(server, bind_host, port, net_timeout)
    try:
        ctl = _Control(sock, where)
        await ctl.send(Probe())
        async with asyncio.timeout(net_timeout):
            public = await ctl.read_discovery()
            # Until its FIN. A seed-only server resets instead (our probe frame went
            # unread); that frees the 4-tuple too, and the next step names the problem.
            with contextlib.suppress(RendezvousProtocolError):
                while await ctl.recv(64):
                    pass
        return public, int(sock.getsockname()[1])
    except TimeoutError:
        raise RendezvousProtocolError(f"rendezvous {where} did not answer a probe within "
                                      f"{net_timeout:g} s (is it a nopf-server?)") from None
    finally:
        sock.close()


async def _connect_from(server: tuple[str, int], bind_host: str, port: int,
                        net_timeout: float) -> socket.socket:
    """Connect from ``port``, waiting briefly while an earlier use of it frees the 4-tuple."""
    sock, _ = await _open_from(server, bind_host, port, net_timeout, fastopen=False)
    return sock


async def _open_from(server: tuple[str, int], bind_host: str, port: int, net_timeout: float,
                     *, fastopen: bool) -> tuple[socket.socket, bool]:
    """Like :func:`_connect_from`; with ``fastopen`` the socket may come back with its
    connect deferred (True): the caller's first send carries the SYN, and it then
    waits for the handshake with :func:`_handshake_done`."""
    where = f"{server[0]}:{server[1]}"
    loop = asyncio.get_running_loop()
    give_up = loop.time() + PORT_FREE_WAIT
    while True:
        try:
            sock = reusable_socket(bind_host, port)
        except OSError as exc:
            raise RendezvousUnreachable(f"cannot bind {bind_host}:{port} for the rendezvous: "
                                        f"{exc.strerror or exc}") from None
        try:
            if fastopen and try_fastopen(sock):
                err = sock.connect_ex(server)
                if err == 0:
                    return sock, True
                if err not in (errno.EINPROGRESS, errno.EALREADY):
                    raise OSError(err, os.strerror(err))
                # Not deferred (no Fast Open after all): the SYN is out, wait as usual.
                async with asyncio.timeout(net_timeout):
                    await wait_connected(sock)
                return sock, False
            async with asyncio.timeout(net_timeout):
                await connect_nonblocking(sock, server)
            return sock, False
        except TimeoutError:
            sock.close()
            raise RendezvousUnreachable(
                f"rendezvous {where} did not answer the connection within {net_timeout:g} s"
            ) from None
        except OSError as exc:
            sock.close()
            if exc.errno != errno.EADDRNOTAVAIL or loop.time() >= give_up:
                raise RendezvousUnreachable(
                    f"rendezvous {where}: {exc.strerror or exc}") from None
        await asyncio.sleep(0.02)


async def _handshake_done(sock: socket.socket, where: str, net_timeout: float) -> None:
    """Wait for a Fast Open connection's handshake, with :func:`_open_from`'s errors."""
    try:
        async with asyncio.timeout(net_timeout):
            await wait_connected(sock)
    except TimeoutError:
        raise RendezvousUnreachable(
            f"rendezvous {where} did not answer the connection within {net_timeout:g} s"
        ) from None
    except OSError as exc:
        raise RendezvousUnreachable(f"rendezvous {where}: {exc.strerror or exc}") from None


async def _coordinate(
    rendezvous: tuple[str, int], action: HelloAction, nameplate: int | None,
    wait: Callable[[_Control], Coroutine[Any, Any, Fire]],
    started: float, punch_timeout: float, bind_host: str, punch_port: int, net_timeout: float,
    on_event: EventSink | None, pake_message: Callable[[], bytes | None] | None,
) -> tuple[Fire, _CtlInfo]:
    server = await resolve_ipv4(Endpoint(*rendezvous), net_timeout)
    port = punch_port
    probed: Endpoint | None = None
    probed_at: float | None = None
    # The sharer checks its NAT mapping while nobody waits for it. The joiner is on
    # the clock (three round trips for the check): it skips it unless the
    # rendezvous says the plan depends on it (a symmetric sharer), or the first
    # punch failed (then the check may name the cause).
    need_probe = action != "join"
    hello_retried = False
    while True:
        if need_probe:
            probed, port = await _probe(server, bind_host, port, net_timeout)
            probed_at = time.monotonic()
        try:
            return await _hello_and_wait(server, action, nameplate, wait, started,
                                         punch_timeout, bind_host, port, probed, probed_at,
                                         net_timeout, on_event, pake_message)
        except RendezvousTooOld:
            # nopf-server closes a connection whose hello has not come within a second,
            # as it closes seed clients: a hello lost and retransmitted (TCP's first
            # timeout is a second) looks the same. A seed-only server closes again.
            if hello_retried:
                raise
            hello_retried = True
            _say(on_event, "the rendezvous closed before answering our hello; trying once "
                 "more (a lost packet, or a rendezvous that speaks only the seed protocol)")
        except _ProbeRequired as exc:
            if need_probe:  # asked twice: the rendezvous is confused
                raise RendezvousProtocolError(f"rendezvous {server[0]}:{server[1]} asked "
                                              "for a NAT mapping check it already had") from None
            need_probe, port = True, exc.port
            _say(on_event, "the sharer's NAT is symmetric: checking ours")


async def _hello_and_wait(
    server: tuple[str, int], action: HelloAction, nameplate: int | None,
    wait: Callable[[_Control], Coroutine[Any, Any, Fire]], started: float,
    punch_timeout: float, bind_host: str, port: int, probed: Endpoint | None,
    probed_at: float | None, net_timeout: float, on_event: EventSink | None,
    pake_message: Callable[[], bytes | None] | None,
) -> tuple[Fire, _CtlInfo]:
    connecting = asyncio.create_task(
        _open_from(server, bind_host, port, net_timeout, fastopen=True), name="coord-connect")
    try:
        # The task runs up to its first wait: the SYN is out (with Fast Open it
        # waits for the hello, so the SPAKE2 arithmetic comes first).
        await asyncio.sleep(0)
        message = pake_message() if pake_message is not None else None
        sock, deferred = await connecting
    except BaseException:
        connecting.cancel()
        with contextlib.suppress(BaseException):
            await connecting
        raise
    rdv_connected = time.monotonic()
    port = int(sock.getsockname()[1])
    ctl = _Control(sock, f"{server[0]}:{server[1]}")
    try:
        lan = Endpoint(*sock.getsockname()[:2])
        hello = Hello(action, nameplate, (lan,), probed, punch_timeout, pake=message)
        if deferred:
            try:
                await ctl.send(hello)  # SYN + hello
            except OSError as exc:
                raise RendezvousUnreachable(
                    f"rendezvous {ctl.where}: {exc.strerror or exc}") from None
            hello_sent = time.monotonic()
            await _handshake_done(sock, ctl.where, net_timeout)
            rdv_connected = time.monotonic()
        else:
            await ctl.send(hello)
            hello_sent = time.monotonic()
        try:
            async with asyncio.timeout(net_timeout):
                public = await ctl.read_discovery()
        except TimeoutError:
            raise RendezvousProtocolError(f"rendezvous {ctl.where} sent no address within "
                                          f"{net_timeout:g} s (is it a nopf-server?)") from None
        if probed is not None and public != probed:
            _say(on_event, f"our NAT gave public ports {probed.port} then {public.port} "
                 f"from local port {port}: it looks symmetric")
        _say(on_event, f"public address {public} (local port {port})")
        try:
            fire = await wait(ctl)
        except _ProbeRequired as exc:
            # The rendezvous closed first: our port is free again once our FIN is acknowledged.
            with contextlib.suppress(OSError, TimeoutError, RendezvousProtocolError):
                async with asyncio.timeout(net_timeout):
                    while await ctl.recv(64):
                        pass
            exc.port = port
            raise
    finally:
        sock.close()
    fired = time.monotonic()
    return fire, _CtlInfo(Endpoint(bind_host, port), started, hello_sent, fired, punch_timeout,
                          probed_at, rdv_connected)


# Retries ---------------------------------------------------------------------------


def _first_budget(punch_timeout: float) -> float:
    """The first attempt's share of the punch timeout (the rest is for retries)."""
    if punch_timeout < 2 * MIN_ATTEMPT:
        return punch_timeout
    return max(MIN_ATTEMPT, punch_timeout / 2)


@dataclass(frozen=True)
class _Retry:
    rendezvous: tuple[str, int]
    nameplate: int
    punch_timeout: float  # for all attempts together, from the first fire
    bind_host: str
    punch_port: int  # 0: a fresh port per attempt (fresh NAT mappings too)
    net_timeout: float


async def _punch_and_retry(retry: _Retry, fire: Fire, ctl: _CtlInfo, role: Literal["A", "B"],
                           code: str, punch_ttl: int, on_event: EventSink | None,
                           half: PakeHalf | None) -> PairedTunnel:
    deadline = ctl.fire + retry.punch_timeout
    attempt = 1
    while True:
        try:
            tunnel = await _punch(fire, ctl, role, code, punch_ttl, on_event, half)
            return dataclasses.replace(tunnel, attempt=attempt)
        except CoordinatedPunchTimeout as failed:
            left = deadline - time.monotonic()
            # A symmetric NAT facing another NAT fails again the same way.
            if attempt >= MAX_ATTEMPTS or left < MIN_ATTEMPT or fire.hopeless:
                raise
            attempt += 1
            _say(on_event, f"punch attempt {attempt - 1} failed ({failed}); coordinating again "
                 f"with fresh sockets (attempt {attempt}, {left:.1f} s left)")
            try:
                fire, ctl = await _coordinate_again(retry, role, left, on_event, half)
            except (PairingError, RendezvousError) as exc:
                _say(on_event, f"could not coordinate again: {exc}")
                raise failed from None


async def _coordinate_again(retry: _Retry, role: Literal["A", "B"], left: float,
                            on_event: EventSink | None, half: PakeHalf | None,
                            ) -> tuple[Fire, _CtlInfo]:
    async def wait_for_fire(ctl: _Control) -> Fire:
        # The peer asks again when its own attempt has failed, about when ours did;
        # one that stopped never does: wait no longer than the punch timeout allows.
        wait = min(retry.net_timeout + RETRY_WAIT, max(1.0, left))
        return _expect_fire(
            await ctl.expect(wait, "fire instruction for a second attempt (the peer did not "
                             "coordinate again)"), ctl.where)

    action: HelloAction = "reshare" if role == "A" else "rejoin"
    # Our SPAKE2 half is unused (no tunnel ran it): the same message goes again.
    return await _coordinate(retry.rendezvous, action, retry.nameplate, wait_for_fire,
                             time.monotonic(), left, retry.bind_host, retry.punch_port,
                             retry.net_timeout, on_event,
                             None if half is None else (lambda: half.message))


# The punch -------------------------------------------------------------------------


async def _punch(fire: Fire, ctl: _CtlInfo, role: Literal["A", "B"], code: str, punch_ttl: int,
                 on_event: EventSink | None, half: PakeHalf | None) -> PairedTunnel:
    failures: list[tuple[Stage, PunchTimeout]] = []
    # Both sides sent a SPAKE2 message (else the rendezvous forwards neither).
    peer_pake = fire.peer_pake if half is not None else None
    to_finish = peer_pake
    local = (ctl.local.host, ctl.local.port)
    for stage in fire.plan:
        public = stage.path == "public"
        config = PunchConfig(
            timeout=stage.budget,
            # On a LAN there is no NAT between us to open with a short-lived SYN.
            arm_ttl=punch_ttl if public else 0,
            first_shot=public,
        )
        _say(on_event, f"punching to {stage.peer} ({stage.path}, {stage.punch})")
        driver = PunchDriver(local, (stage.peer.host, stage.peer.port),
                             Tactic.ARM if stage.punch == "arm" else Tactic.CONNECT, config,
                             nat_hint=fire.note)
        punching = asyncio.create_task(driver.run(), name=f"coord-punch-{stage.path}")
        try:
            if to_finish is not None:
                assert half is not None
                await asyncio.sleep(0)  # the driver sends its first SYN, then the maths
                half.finish(to_finish)  # runs while that SYN crosses
                to_finish = None
            sock = await punching
        except PunchTimeout as exc:
            failures.append((stage, exc))
            continue
        except BaseException:
            punching.cancel()
            with contextlib.suppress(BaseException):
                await punching
            raise
        tune_stream(sock)
        connected = time.monotonic()
        _say(on_event, f"tunnel up to {stage.peer} over the {stage.path} path")
        return PairedTunnel(
            sock, role, code, stage.peer, stage.path, ctl.local, fire.public,
            fire.rtt_ms / 1000, Timings(ctl.started, ctl.hello_sent, ctl.fire, connected,
                                        ctl.probed, ctl.rdv_connected),
            peer_pake=peer_pake,
        )
    raise _punch_failed(fire, failures)


def _punch_failed(fire: Fire, failures: list[tuple[Stage, PunchTimeout]]) -> PairingError:
    outcomes: Counter[Failure] = Counter()
    for _, exc in failures:
        outcomes.update(exc.outcomes)
    total = sum(s.budget for s, _ in failures)
    tried = ", ".join(f"{s.peer} ({s.path})" for s, _ in failures)
    rejected = outcomes[Failure.REFUSED] + outcomes[Failure.UNREACHABLE]
    if fire.note:
        cause = fire.note
    elif rejected:
        cause = (f"the peer's NAT rejected our SYNs {rejected} time(s) (RST/ICMP) and its own "
                 "SYN never reached us: the peer may have stopped, or a firewall blocks it")
    else:
        cause = ("no SYN from the peer ever arrived: a NAT or firewall on the path probably "
                 "maps each destination to a new port (symmetric) or blocks the connection")
    return CoordinatedPunchTimeout(
        f"no connection to the peer within {total:g} s (tried {tried}): {cause}", outcomes)


def _say(sink: EventSink | None, message: str) -> None:
    if sink is not None:
        sink(message)


__all__ = [
    "CodeExpired",
    "CodeUsed",
    "CoordinatedPunchTimeout",
    "PairedTunnel",
    "PairingError",
    "PakeHalf",
    "PeerNeverArrived",
    "RendezvousError",
    "RendezvousTooOld",
    "SymmetricNat",
    "Timings",
    "TooManyGuesses",
    "UnknownCode",
    "connect",
    "share",
]
