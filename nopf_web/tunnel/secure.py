"""Authenticated encryption over an already-connected TCP connection: the asyncio
driver of :mod:`nopf_web.tunnel.record_machine` (which has the protocol, its
wire formats and its security argument).

The driver reads, feeds, acts. One ``asyncio.BufferedProtocol`` receives
straight into the machine's record buffer (``recv_into``: up to 16 KiB at a
record boundary, so a small record takes one read; the rest of a larger one
together with the next header), and hands each record's plaintext to a
callback (the mux) or a queue (``recv``): no intermediate copies, no task
switch per record. Sending seals each record from the caller's buffers
(``writelines``) into a reused buffer and sends it straight on the socket when
the transport has nothing queued. The machine's one deadline (the peer's key
confirmation) is a ``call_at`` on the loop's clock.
"""

from __future__ import annotations

import asyncio
import socket
from collections import deque
from collections.abc import Callable, Iterable

from nopf_web.buffers import Buffer
from nopf_web.delegated import Delegated
from nopf_web.roles import PeerRole
from nopf_web.sockets import release_if_closed, stream_transport

from .errors import HandshakeError, TunnelError
from .record_machine import (
    CONFIRM_SIZE,
    DEFAULT_KEY_LIMITS,
    HANDSHAKE_TIMEOUT,
    HELLO_SIZE,
    MAX_RECORD,
    ChannelEnded,
    ChannelFailed,
    HandshakeDone,
    KeyLimits,
    Pake,
    PeerConfirmed,
    RecordEvent,
    RecordMachine,
    RecordReceived,
    Transmit,
    TunnelSecrets,
)

__all__ = ["CONFIRM_SIZE", "HANDSHAKE_TIMEOUT", "HELLO_SIZE", "MAX_RECORD", "Pake",
           "SecureChannel", "TunnelSecrets", "open_channel", "open_path"]

RecordSink = Callable[[bytes | memoryview], None]
EndSink = Callable[[Exception | None], None]  # None: clean end of stream

_PULL_QUEUE = 16  # records queued for recv() before reading pauses
# Transport write buffer: small, so a latency-sensitive frame never queues behind
# megabytes; the kernel's socket buffer is the real pipeline.
_WRITE_HIGH, _WRITE_LOW = 256 * 1024, 64 * 1024
_DISCARD_READ = 64 * 1024  # read size while lingering (see linger_close)


class _Protocol(asyncio.BufferedProtocol):
    """asyncio's callbacks, straight to the channel (and its machine)."""

    def __init__(self, channel: SecureChannel) -> None:
        self._channel = channel
        self._machine = channel._machine
        # Straight to the machine: asyncio calls it twice per record.
        self.get_buffer = self._machine.get_buffer  # type: ignore[method-assign]

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport = stream_transport(transport)
        transport.set_write_buffer_limits(_WRITE_HIGH, _WRITE_LOW)
        self._channel._transport = transport
        self._channel._protocol = self

    def discard_from_now(self) -> None:
        """Read and drop whatever arrives from now on, unparsed, until the peer's EOF."""
        scratch = memoryview(bytearray(_DISCARD_READ))
        self.get_buffer = lambda sizehint: scratch  # type: ignore[method-assign]
        self.buffer_updated = lambda nbytes: None  # type: ignore[method-assign]

    def get_buffer(self, sizehint: int) -> memoryview:
        return self._machine.get_buffer(sizehint)

    def buffer_updated(self, nbytes: int) -> None:
        events = self._machine.buffer_updated(nbytes)
        if events:
            channel = self._channel
            if channel._sink is not None and len(events) == 1 \
                    and type(event := events[0]) is RecordReceived:
                channel._sink(event.plaintext)  # the hot path: one record, push mode
            else:
                channel._handle(events)
        elif self._channel._on_progress is not None:  # part of a record
            self._channel._on_progress()

    def eof_received(self) -> bool:
        return False  # close our side too: the channel has no half-close

    def connection_lost(self, exc: Exception | None) -> None:
        self._channel._connection_lost(exc)

    def pause_writing(self) -> None:
        self._channel._write_paused = True

    def resume_writing(self) -> None:
        self._channel._write_paused = False
        self._channel._release_drain()


class SecureChannel:
    """Encrypted, authenticated records over one TCP connection (from :func:`open_channel`).

    Sending: ``write``/``writelines`` encrypt at once and queue on the transport;
    ``drain`` waits while too much is queued. Receiving, either pull (``await
    recv()``: one record's plaintext, ``b""`` at a clean end) or push
    (``start(on_record, on_end)``: every record to ``on_record``, then
    ``on_end(None)`` at a clean end or ``on_end(error)``); the callbacks must
    not raise.
    """

    def __init__(self, sock: socket.socket, machine: RecordMachine) -> None:
        self._sock = sock  # the transport's socket, for direct sends (see _send)
        self._machine = machine
        self._transport: asyncio.Transport | None = None
        self._protocol: _Protocol | None = None
        self._lingering = False  # linger_close(): our side is finished, the peer's not yet
        loop = asyncio.get_running_loop()
        self._loop = loop
        self._handshake: asyncio.Future[None] = loop.create_future()
        self._confirmed: asyncio.Future[None] = loop.create_future()
        # Retrieved here so an unawaited failure is not logged: the channel's
        # end (on_end / recv) reports it too.
        for future in (self._handshake, self._confirmed):
            future.add_done_callback(lambda f: f.cancelled() or f.exception())
        self._timer: asyncio.TimerHandle | None = None
        self._records: deque[bytes] = deque()
        self._sink: RecordSink | None = None
        self._on_end: EndSink | None = None
        self._ended = False
        self._end_error: Exception | None = None
        self._closed = asyncio.Event()
        self._readable = asyncio.Event()
        self._write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._on_confirmed: Callable[[], None] | None = None
        self._on_progress: Callable[[], None] | None = None

    def watch(self, *, on_confirmed: Callable[[], None] | None = None,
              on_progress: Callable[[], None] | None = None) -> None:
        """Callbacks for a layer above (the resume layer): ``on_confirmed`` when
        the peer's confirmation checks out (before any of its records is
        delivered), ``on_progress`` when bytes arrive that do not complete a record."""
        self._on_confirmed = on_confirmed
        self._on_progress = on_progress

    role = Delegated[PeerRole]("_machine")
    peer_role = Delegated[PeerRole]("_machine")
    wire_bytes_in = Delegated[int]("_machine", "bytes_in")
    key_updates = Delegated[tuple[int, int]](
        "_machine", doc="Record-key updates (sent, received) on this connection.")
    wire_bytes_out = Delegated[int]("_machine", "bytes_out")
    is_confirmed = Delegated[bool](
        "_machine", "confirmed", doc="The peer's key confirmation checked out.")
    secrets = Delegated[TunnelSecrets | None](
        "_machine",
        doc="What later paths of this tunnel need (once confirmed); see the record machine.")

    @property
    def ended(self) -> bool:
        """The channel is over (its socket may still be closing)."""
        return self._ended

    @property
    def closed(self) -> bool:
        """Its socket is closed."""
        return self._closed.is_set()

    @property
    def write_buffer_size(self) -> int:
        return self._transport.get_write_buffer_size() if self._transport else 0

    async def confirmed(self) -> None:
        """Wait until the peer's key confirmation has been checked.

        Returns at once after the in-band handshake (it checked it already).
        After an early-data open (``pake``) it raises :class:`PairingMismatch`,
        :class:`HandshakeTimeout` or :class:`HandshakeError` as the in-band
        handshake would have.
        """
        await asyncio.shield(self._confirmed)

    # -- sending --------------------------------------------------------------

    def write(self, data: Buffer) -> None:
        """Encrypt ``data`` into one or more records and queue them for sending."""
        self.writelines((data,))

    def writelines(self, parts: Iterable[Buffer]) -> None:
        """Like ``write(b"".join(parts))``, without building the joined copy."""
        for record in self._machine.seal(parts):
            self._send(record)

    def _send(self, data: memoryview | bytes) -> None:
        """Send ``data`` (possibly a reused buffer: not kept after the call) in order."""
        transport = self._transport
        assert transport is not None
        if not transport.get_write_buffer_size() and not transport.is_closing():
            # Nothing queued in the transport, so writing to the socket directly
            # keeps the order; it saves the transport's copy of the buffer.
            try:
                data = data[self._sock.send(data) :]
            except (BlockingIOError, InterruptedError):
                pass
            except OSError:
                pass  # the transport's own write below meets the error and reports it
            if not data:
                return
        transport.write(bytes(data))  # a copy: the transport may keep what it is given

    @property
    def writing_paused(self) -> bool:
        """Too much is queued in the transport: :meth:`drain` would wait."""
        return self._write_paused and not self._ended

    async def drain(self) -> None:
        if self._write_paused and not self._ended:
            self._drain_waiter = self._loop.create_future()
            try:
                await self._drain_waiter
            finally:
                self._drain_waiter = None

    def _release_drain(self) -> None:
        if self._drain_waiter is not None and not self._drain_waiter.done():
            self._drain_waiter.set_result(None)

    # -- receiving ------------------------------------------------------------

    async def recv(self) -> bytes:
        """The next record's plaintext; ``b""`` when the peer ended the stream cleanly."""
        if self._sink is not None:
            raise RuntimeError("recv() on a channel started in push mode")
        while not self._records:
            if self._ended:
                if self._end_error is not None:
                    raise self._end_error
                return b""
            self._readable.clear()
            await self._readable.wait()
        if len(self._records) == _PULL_QUEUE and not self._ended and self._transport:
            self._transport.resume_reading()
        return self._records.popleft()

    def start(self, on_record: RecordSink, on_end: EndSink) -> None:
        """Push mode: deliver every record (queued ones first) to ``on_record``."""
        while self._records:
            on_record(self._records.popleft())
        self._sink, self._on_end = on_record, on_end
        if self._transport is not None:
            self._transport.resume_reading()
        if self._ended:
            on_end(self._end_error)

    # -- ending ---------------------------------------------------------------

    def close(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.close()

    def linger_close(self) -> None:
        """Close without risking what we sent last: FIN after what is queued, then
        read and drop the peer's bytes until its own FIN, and close. Closing a socket
        with the peer's bytes unread sends an RST instead of a FIN, and an RST can
        destroy our last records (the tunnel's CLOSE) before the peer reads them. The
        caller bounds the wait (:meth:`abort` after a deadline: a peer may never close)."""
        transport, protocol = self._transport, self._protocol
        if transport is None or protocol is None or transport.is_closing() \
                or not transport.can_write_eof():
            self.close()
            return
        self._lingering = True
        # Our side is finished: nothing more goes out. The instance's own writelines
        # shadows the method, so the hot path checks no flag on every record.
        self.writelines = _write_nothing  # type: ignore[method-assign]
        protocol.discard_from_now()
        try:
            transport.write_eof()
        except OSError:  # asyncio's shuts down at once: the peer had reset it already
            self.abort()
            return
        transport.resume_reading()

    def abort(self) -> None:
        if self._transport is not None and not self.closed:
            self._transport.abort()

    async def wait_closed(self) -> None:
        await self._closed.wait()

    # -- the machine's events -------------------------------------------------

    def _handle(self, events: list[RecordEvent]) -> None:
        for event in events:
            if type(event) is RecordReceived:  # the hot path first
                if self._sink is not None:
                    self._sink(event.plaintext)
                    continue
                plain = event.plaintext  # recv() gives bytes (and frees the slot)
                self._records.append(plain if type(plain) is bytes else bytes(plain))
                if len(self._records) >= _PULL_QUEUE and self._transport is not None:
                    self._transport.pause_reading()
                self._readable.set()
            elif type(event) is Transmit:
                assert self._transport is not None
                if not self._lingering:
                    self._transport.write(event.data)
            elif type(event) is HandshakeDone:
                if not self._handshake.done():
                    self._handshake.set_result(None)
            elif type(event) is PeerConfirmed:
                self._sync_timer()
                if not self._confirmed.done():
                    self._confirmed.set_result(None)
                if self._on_confirmed is not None:
                    self._on_confirmed()
            elif isinstance(event, ChannelFailed):
                self._finish(event.error)
                if event.flush:
                    self.close()
                else:
                    self.abort()
            elif type(event) is ChannelEnded:
                self._finish(None)

    def _begin(self) -> None:
        self._handle(self._machine.start(self._loop.time()))
        self._sync_timer()

    def _sync_timer(self) -> None:
        """One loop timer at the machine's deadline, or none."""
        deadline = self._machine.next_deadline
        if self._timer is not None and (deadline is None or self._timer.when() != deadline):
            self._timer.cancel()
            self._timer = None
        if deadline is not None and self._timer is None:
            self._timer = self._loop.call_at(deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._handle(self._machine.timer(self._loop.time()))
        self._sync_timer()

    def _connection_lost(self, exc: Exception | None) -> None:
        # Closed first: close() and abort() must not reach the finished transport.
        # asyncio calls connection_lost straight from the last send of a transport
        # closed with sends queued, and an abort() from inside that call runs
        # connection_lost again, on the transport's cleared fields (a logged
        # traceback). The machine's failure below asks for one when a record is cut.
        self._closed.set()
        self._handle(self._machine.connection_lost(exc))
        self._finish(exc)  # if the machine did not say it ended (it was done already)
        self._release_drain()

    def _finish(self, exc: Exception | None) -> None:
        if self._ended:
            return
        self._ended = True
        self._end_error = exc
        self._sync_timer()
        for future in (self._handshake, self._confirmed):
            if not future.done():
                future.set_exception(exc or HandshakeError(
                    "secure handshake: the channel ended before the peer's key confirmation"))
        self._readable.set()
        if self._on_end is not None:
            self._on_end(exc)


def _write_nothing(parts: Iterable[Buffer]) -> None:
    """A lingering channel's writelines: our side was finished (see linger_close)."""


async def open_channel(sock: socket.socket, *, role: PeerRole, code: str,
                       timeout: float = HANDSHAKE_TIMEOUT, pake: Pake | None = None,
                       limits: KeyLimits = DEFAULT_KEY_LIMITS) -> SecureChannel:
    """Authenticate the peer on a connected TCP socket with ``code``; the channel owns it.

    ``role``: ``"server"`` shares the service, ``"client"`` connects to it;
    exactly one side must be each. Raises :class:`PairingMismatch` if the peer
    used another code, :class:`HandshakeTimeout` naming the step it waited for,
    and :class:`HandshakeError` for anything else. On failure the socket is closed.

    With ``pake`` (SPAKE2 already exchanged through the rendezvous and
    finished) only the key confirmation runs here, and without a wait: the
    channel is returned as soon as our confirmation tag is sent, so records may
    follow it at once. Nothing the peer sends is delivered before its tag has
    been checked; :meth:`SecureChannel.confirmed` waits for that check and
    raises the same errors (``PairingMismatch`` on a wrong code).

    ``limits``: when record keys are updated (see the record machine; tests set
    low ones).
    """
    return await _open(sock, lambda: (
        RecordMachine.handshake(role, code, timeout=timeout, limits=limits) if pake is None
        else RecordMachine.confirm_only(role, pake, timeout=timeout, limits=limits)))


async def open_path(sock: socket.socket, *, role: PeerRole, secrets: TunnelSecrets,
                    timeout: float = HANDSHAKE_TIMEOUT,
                    limits: KeyLimits = DEFAULT_KEY_LIMITS) -> SecureChannel:
    """A later connection of a tunnel whose first one confirmed ``secrets``: the
    path handshake (no SPAKE2; see the record machine). Returns once our
    confirm is sent (the peer's hello is in); :meth:`SecureChannel.confirmed`
    waits for the peer's, raising :class:`PathRejected` if it does not prove the
    key, :class:`HandshakeTimeout` or :class:`HandshakeError`. The channel owns
    ``sock``; on failure it is closed."""
    return await _open(
        sock, lambda: RecordMachine.path(role, secrets, timeout=timeout, limits=limits))


async def _open(sock: socket.socket, make_machine: Callable[[], RecordMachine]) -> SecureChannel:
    """A channel of ``make_machine()`` on ``sock``, returned once the machine's
    handshake says so; ``sock`` is closed on any failure."""
    try:
        machine = make_machine()
    except BaseException:
        sock.close()
        raise
    channel = SecureChannel(sock, machine)
    await _attach(sock, channel)
    try:
        channel._begin()
        await channel._handshake
    except TunnelError:
        raise  # the channel closed (or aborted) the connection as the failure needs
    except BaseException:  # cancelled, or a bug: never leave the connection open
        channel.abort()
        raise
    return channel


async def _attach(sock: socket.socket, channel: SecureChannel) -> None:
    """The channel's protocol on ``sock`` (which it owns from now on, even on failure)."""
    sock.setblocking(False)
    sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    loop = asyncio.get_running_loop()
    try:
        transport, _ = await loop.create_connection(lambda: _Protocol(channel), sock=sock)
    except BaseException:
        sock.close()
        raise
    release_if_closed(transport, sock)  # a peer that reset it at once: see there
