"""Local TCP connections <-> tunnel streams, both ways, with half-close.

- Sharer (:func:`serve_share`): each stream the peer opens becomes a connection
  to the local service; if that connect fails the stream is reset with the reason.
- Connector (:func:`serve_connect`): each connection accepted on the local
  listener becomes a new stream.

EOF on one side becomes FIN (or ``shutdown(SHUT_WR)``) on the other; a
stream reset aborts the local connection with a TCP RST, and a failed local
connection resets its stream. Both functions run until the tunnel ends:
they return after a clean close and raise the tunnel's failure otherwise,
cancelling and awaiting every per-connection task on the way out.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
from collections.abc import Callable, Coroutine
from typing import Any

from nopf_web.wire.frames import ResetCode

from .errors import StreamReset, TunnelClosed, TunnelError
from .mux import Mux, Stream

LOCAL_READ = 256 * 1024
CONNECT_TIMEOUT = 5.0
_LINGER_RST = struct.pack("ii", 1, 0)  # SO_LINGER on, 0 s: close() sends RST

EventSink = Callable[[str], None]


def _quiet(_message: str) -> None:
    pass


async def serve_share(mux: Mux, service: tuple[str, int], *,
                      connect_timeout: float = CONNECT_TIMEOUT,
                      on_event: EventSink = _quiet) -> None:
    """Connect every stream the peer opens to ``service``; run until the tunnel ends."""
    handlers: set[asyncio.Task[None]] = set()

    async def accept_loop() -> None:
        while True:
            try:
                stream = await mux.accept_stream()
            except TunnelClosed:
                return
            _spawn(handlers, _share_one(stream, service, connect_timeout, on_event),
                   f"{mux.name}-share-{stream.stream_id}")

    await _run(mux, accept_loop(), f"{mux.name}-share-accept", handlers)


async def serve_connect(mux: Mux, listener: socket.socket | tuple[str, int], *,
                        on_event: EventSink = _quiet) -> None:
    """Turn every connection to ``listener`` into a stream; run until the tunnel ends.

    ``listener`` is a listening socket (left open: the caller owns it) or a
    ``(host, port)`` to listen on (closed on return).
    """
    owned = not isinstance(listener, socket.socket)
    sock = _listen(listener) if not isinstance(listener, socket.socket) else listener
    sock.setblocking(False)
    handlers: set[asyncio.Task[None]] = set()
    loop = asyncio.get_running_loop()

    async def accept_loop() -> None:
        while True:
            conn, _addr = await loop.sock_accept(sock)
            try:
                stream = await mux.open_stream()
            except TunnelError:
                conn.close()
                raise
            _spawn(handlers, _connect_one(stream, conn, on_event),
                   f"{mux.name}-connect-{stream.stream_id}")

    try:
        await _run(mux, accept_loop(), f"{mux.name}-connect-accept", handlers)
    finally:
        if owned:
            sock.close()


def _listen(addr: tuple[str, int]) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(addr)
        sock.listen(128)
    except BaseException:
        sock.close()
        raise
    return sock


def _spawn(handlers: set[asyncio.Task[None]], coro: Coroutine[Any, Any, None],
           name: str) -> None:
    task = asyncio.create_task(coro, name=name)
    handlers.add(task)
    task.add_done_callback(handlers.discard)


async def _run(mux: Mux, accept_coro: Coroutine[Any, Any, None], name: str,
               handlers: set[asyncio.Task[None]]) -> None:
    """Run an accept loop until the tunnel ends; then cancel and await everything."""
    accepting = asyncio.create_task(accept_coro, name=name)
    ended = asyncio.create_task(mux.wait_closed(), name=f"{name}-wait-closed")
    try:
        await asyncio.wait({accepting, ended}, return_when=asyncio.FIRST_COMPLETED)
        if accepting.done() and not accepting.cancelled():
            exc = accepting.exception()
            if exc is not None and not isinstance(exc, TunnelError):
                raise exc  # the listener failed: not the tunnel's fault
        await ended  # the tunnel's own verdict: None if closed cleanly
    finally:
        for task in (accepting, ended, *handlers):
            task.cancel()
        await asyncio.gather(accepting, ended, *handlers, return_exceptions=True)


async def _share_one(stream: Stream, service: tuple[str, int], timeout: float,
                     on_event: EventSink) -> None:
    host, port = service
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port, limit=LOCAL_READ)
    except (OSError, TimeoutError) as exc:
        why = (f"no answer within {timeout:g} s" if isinstance(exc, TimeoutError)
               else "nothing is listening there" if isinstance(exc, ConnectionRefusedError)
               else exc.strerror or str(exc))
        message = f"cannot reach the shared service at {host}:{port} ({why})"
        on_event(message)
        stream.reset(ResetCode.REFUSED, message)
        return
    await pipe(stream, reader, writer)


async def _connect_one(stream: Stream, conn: socket.socket, on_event: EventSink) -> None:
    try:
        reader, writer = await asyncio.open_connection(sock=conn, limit=LOCAL_READ)
    except OSError as exc:
        conn.close()
        stream.reset(ResetCode.CONNECTION_LOST, f"local connection failed: {exc}")
        return
    try:
        await pipe(stream, reader, writer)
    except StreamReset as exc:
        on_event(str(exc))


async def pipe(stream: Stream, reader: asyncio.StreamReader,
               writer: asyncio.StreamWriter) -> None:
    """Copy both ways between ``stream`` and a local connection until both ends finish.

    A local error resets the stream; a stream reset or tunnel failure aborts
    the local connection with RST and is re-raised (``StreamReset`` only if
    the peer reset it, as information for the caller).
    """
    up = asyncio.create_task(_local_to_stream(reader, stream),
                             name=f"stream-{stream.stream_id}-up")
    down = asyncio.create_task(_stream_to_local(stream, writer),
                               name=f"stream-{stream.stream_id}-down")
    try:
        done, _ = await asyncio.wait({up, down}, return_when=asyncio.FIRST_EXCEPTION)
        for task in done:
            exc = task.exception()
            if isinstance(exc, TunnelError):
                _abort_local(writer)
                raise exc
            if isinstance(exc, OSError):
                stream.reset(ResetCode.CONNECTION_LOST,
                             f"the local connection failed: {exc.strerror or exc}")
                _abort_local(writer)
                return
            if exc is not None:
                raise exc
        await asyncio.gather(up, down)
    finally:
        for task in (up, down):
            task.cancel()
        await asyncio.gather(up, down, return_exceptions=True)
        writer.close()


async def _local_to_stream(reader: asyncio.StreamReader, stream: Stream) -> None:
    while data := await reader.read(LOCAL_READ):
        await stream.write(data)
    stream.write_eof()


async def _stream_to_local(stream: Stream, writer: asyncio.StreamWriter) -> None:
    while data := await stream.read():
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()


def _abort_local(writer: asyncio.StreamWriter) -> None:
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, _LINGER_RST)
    writer.transport.abort()
