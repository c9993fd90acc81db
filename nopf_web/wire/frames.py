"""Tunnel multiplexing frames, as a pure codec (no sockets, no asyncio).

Many streams share one secure channel. The channel's records carry a byte
stream of frames; a frame may straddle records, so the decoder buffers.

Every frame has a 9-byte header, then its payload::

    offset  size  field       encoding
    0       1     type        u8, one of FrameType below
    1       4     stream id   u32 big-endian; 0 for connection frames
    5       4     length      u32 big-endian, payload bytes, at most MAX_PAYLOAD
    9       len   payload     depends on the type

    type  name           stream id  payload
    1     OPEN           != 0       empty, or 1 byte: u8 service index (see below);
                                    the sender opens this stream
    2     DATA           != 0       1..MAX_PAYLOAD bytes of stream data
    3     WINDOW_UPDATE  != 0       4 bytes: u32 BE credit increment, 1..2^31-1
    4     FIN            != 0       empty: the sender will send no more data
    5     RST            != 0       u32 BE reason code, then 0..MAX_REASON bytes UTF-8 text
    6     PING           0          8 bytes, echoed in a PONG: opaque, or an
                                    announcement (see PING payloads below)
    7     PONG           0          the 8 bytes of the PING it answers
    8     GOAWAY         0          u32 BE reason code, then 0..MAX_REASON bytes UTF-8 text

Stream ids: the server (the sharer) opens odd ids, the client even ids, so
both can open streams without agreeing first. Flow control is per stream:
each side may send a stream at most its credit of DATA bytes; the initial
credit is fixed by the protocol (``INITIAL_WINDOW``) and grows by each
WINDOW_UPDATE the receiver sends as its application consumes data.

PING payloads (8 bytes). A clock, u64 big-endian (the mux sends its
monotonic clock in ns and reads the RTT from the PONG), never starts with
0xFF (that would be some 580 years of uptime). One that starts with 0xFF is
an announcement::

    offset  size  field
    0       1     0xFF
    1       3     what: b"rec" or b"svc"
    4       4     u32 big-endian: for b"rec", the largest record the sender
                  takes, in bytes of frames (RECORD_BUDGET); for b"svc", how
                  many services a sharer shares (1..MAX_SERVICES)

A peer that announces ``rec`` takes DATA payloads up to MAX_PAYLOAD and
records of up to that many bytes of frames. Older peers do not announce and
take BASE_MAX_PAYLOAD in records of BASE_RECORD_BUDGET, which every peer
takes; they answer an announcement with its PONG, as any PING, which the
announcer ignores; an announcement of something unknown is answered and
ignored the same way.

Services. A sharer may share several services (``nopf share -p 3000 -p
3001``); it announces ``svc`` before ``rec``, in its first record. An OPEN
with an empty payload is for service 0, the only one older peers know; an
OPEN for service 1..MAX_SERVICES-1 carries its index in one byte. A connector
sends that byte only to a sharer that announced more than one service (an
older sharer rejects it as a malformed frame); it knows an older sharer by its
``rec`` that came with no ``svc`` before it.

Any violation (unknown type, length over the limit or wrong for the type,
stream id 0 where one is needed or vice versa, bad UTF-8, zero increment)
raises :class:`FrameError`; it is checked as soon as the header is complete,
so a hostile length never makes the decoder wait for or buffer 4 GiB.
"""

from __future__ import annotations

import enum
import struct
from typing import NamedTuple

from nopf_web.buffers import Buffer, unchanging

from .errors import WireError

HEADER = struct.Struct("!BII")  # type u8, stream id u32 BE, payload length u32 BE
HEADER_SIZE = HEADER.size  # 9
# A lone bulk stream fills a whole record with one frame: fewer frames, less
# per-frame work on both ends. Every peer takes a BASE_MAX_PAYLOAD frame in a
# record of BASE_RECORD_BUDGET bytes of frames; a peer that announces (PING
# payloads above) takes MAX_PAYLOAD in records of up to RECORD_BUDGET (1 KiB
# more, for control frames).
CONTROL_ROOM = 1024  # bytes of a record's budget beyond its largest DATA frame
BASE_MAX_PAYLOAD = 256 * 1024
BASE_RECORD_BUDGET = BASE_MAX_PAYLOAD + CONTROL_ROOM
MAX_PAYLOAD = 1020 * 1024
RECORD_BUDGET = MAX_PAYLOAD + CONTROL_ROOM
MAX_REASON = 256  # bytes of UTF-8 text in RST / GOAWAY
MAX_STREAM_ID = 0xFFFF_FFFF
MAX_INCREMENT = 0x7FFF_FFFF
INITIAL_WINDOW = 256 * 1024  # per-stream credit each side starts with, in bytes
PING_SIZE = 8
_ANNOUNCE = struct.Struct("!B3sI")  # 0xFF, b"rec", u32 BE bytes of frames per record
_ANNOUNCE_MARK, _ANNOUNCE_RECORD, _ANNOUNCE_SERVICES = 0xFF, b"rec", b"svc"
MAX_SERVICES = 16  # services one sharer shares over one tunnel (OPEN's index: 0..15)
_U32 = struct.Struct("!I")


class FrameError(WireError):
    """Bytes that are not a valid tunnel frame; the connection must be dropped."""


class FrameType(enum.IntEnum):
    OPEN = 1
    DATA = 2
    WINDOW_UPDATE = 3
    FIN = 4
    RST = 5
    PING = 6
    PONG = 7
    GOAWAY = 8


class ResetCode(enum.IntEnum):
    """Reason codes carried by RST (and GOAWAY); unknown codes are kept as ints."""

    CANCEL = 0  # the application dropped the stream
    REFUSED = 1  # the sharer could not reach its local service
    PROTOCOL_ERROR = 2
    FLOW_CONTROL = 3  # the peer sent more than its credit
    INTERNAL = 4
    TOO_MANY_STREAMS = 5
    CONNECTION_LOST = 6  # the local TCP connection failed


class OpenFrame(NamedTuple):
    stream_id: int
    service: int = 0  # which of the sharer's services (0: the first, or its only one)


class DataFrame(NamedTuple):
    stream_id: int
    data: bytes | memoryview  # a zero-copy slice when fed ``bytes`` or a view of bytes


class WindowUpdateFrame(NamedTuple):
    stream_id: int
    increment: int


class FinFrame(NamedTuple):
    stream_id: int


class ResetFrame(NamedTuple):
    stream_id: int
    code: int
    message: str


class PingFrame(NamedTuple):
    opaque: bytes


class PongFrame(NamedTuple):
    opaque: bytes


class GoAwayFrame(NamedTuple):
    code: int
    message: str


Frame = (OpenFrame | DataFrame | WindowUpdateFrame | FinFrame | ResetFrame | PingFrame | PongFrame
         | GoAwayFrame)

_STREAM_TYPES = frozenset(
    {FrameType.OPEN, FrameType.DATA, FrameType.WINDOW_UPDATE, FrameType.FIN, FrameType.RST}
)
_TYPES = {t.value: t for t in FrameType}
_DATA_KIND = FrameType.DATA.value
# Allowed payload length per type: (min, max).
_LENGTHS = {
    FrameType.OPEN: (0, 1),
    FrameType.DATA: (1, MAX_PAYLOAD),
    FrameType.WINDOW_UPDATE: (4, 4),
    FrameType.FIN: (0, 0),
    FrameType.RST: (4, 4 + MAX_REASON),
    FrameType.PING: (PING_SIZE, PING_SIZE),
    FrameType.PONG: (PING_SIZE, PING_SIZE),
    FrameType.GOAWAY: (4, 4 + MAX_REASON),
}


# -- encoding ----------------------------------------------------------------


def _stream_id(stream_id: int) -> int:
    if not 0 < stream_id <= MAX_STREAM_ID:
        raise FrameError(f"stream id {stream_id} out of range 1..{MAX_STREAM_ID}")
    return stream_id


def _reason(code: int, message: str) -> bytes:
    if not 0 <= code <= 0xFFFF_FFFF:
        raise FrameError(f"reason code {code} out of range")
    text = message.encode("utf-8")
    if len(text) > MAX_REASON:  # informational text: cut at a character boundary
        text = text[:MAX_REASON].decode("utf-8", "ignore").encode("utf-8")
    return _U32.pack(code) + text


def encode_data_header(stream_id: int, length: int) -> bytes:
    """The 9-byte header of a DATA frame, for writers that send the payload separately."""
    if not 0 < length <= MAX_PAYLOAD:
        raise FrameError(f"DATA payload of {length} bytes (allowed 1..{MAX_PAYLOAD})")
    return HEADER.pack(FrameType.DATA, _stream_id(stream_id), length)


def encode_data(stream_id: int, data: bytes | memoryview) -> bytes:
    return encode_data_header(stream_id, len(data)) + data


def encode_open(stream_id: int, service: int = 0) -> bytes:
    """OPEN for ``service``: empty for service 0, as every peer reads it."""
    if service == 0:
        return HEADER.pack(FrameType.OPEN, _stream_id(stream_id), 0)
    if not 0 < service < MAX_SERVICES:
        raise FrameError(f"service {service} out of range 0..{MAX_SERVICES - 1}")
    return HEADER.pack(FrameType.OPEN, _stream_id(stream_id), 1) + bytes((service,))


def encode_window_update(stream_id: int, increment: int) -> bytes:
    if not 0 < increment <= MAX_INCREMENT:
        raise FrameError(f"window increment {increment} out of range 1..{MAX_INCREMENT}")
    return HEADER.pack(FrameType.WINDOW_UPDATE, _stream_id(stream_id), 4) + _U32.pack(increment)


def encode_fin(stream_id: int) -> bytes:
    return HEADER.pack(FrameType.FIN, _stream_id(stream_id), 0)


def encode_reset(stream_id: int, code: int, message: str = "") -> bytes:
    payload = _reason(code, message)
    return HEADER.pack(FrameType.RST, _stream_id(stream_id), len(payload)) + payload


def _ping_like(kind: FrameType, opaque: bytes) -> bytes:
    if len(opaque) != PING_SIZE:
        raise FrameError(f"{kind.name} carries exactly {PING_SIZE} bytes, got {len(opaque)}")
    return HEADER.pack(kind, 0, PING_SIZE) + opaque


def encode_ping(opaque: bytes) -> bytes:
    return _ping_like(FrameType.PING, opaque)


def encode_pong(opaque: bytes) -> bytes:
    return _ping_like(FrameType.PONG, opaque)


def announce_records(budget: int) -> bytes:
    """The PING payload that says we take records of up to ``budget`` bytes of frames."""
    if not BASE_RECORD_BUDGET <= budget <= RECORD_BUDGET:
        raise ValueError(f"record budget must be {BASE_RECORD_BUDGET}..{RECORD_BUDGET}")
    return _ANNOUNCE.pack(_ANNOUNCE_MARK, _ANNOUNCE_RECORD, budget)


def announce_services(count: int) -> bytes:
    """The PING payload in which a sharer says how many services it shares."""
    if not 1 <= count <= MAX_SERVICES:
        raise ValueError(f"a sharer shares 1..{MAX_SERVICES} services, not {count}")
    return _ANNOUNCE.pack(_ANNOUNCE_MARK, _ANNOUNCE_SERVICES, count)


def announced_services(opaque: bytes) -> int | None:
    """How many services a PING payload announces (clamped to 1..MAX_SERVICES); None
    for a clock or an announcement of something else."""
    if not is_announcement(opaque):
        return None
    _mark, what, count = _ANNOUNCE.unpack(opaque)
    if what != _ANNOUNCE_SERVICES:
        return None
    return min(max(int(count), 1), MAX_SERVICES)


def is_announcement(opaque: bytes) -> bool:
    """A PING payload that is an announcement, not a clock (its PONG carries no RTT)."""
    return len(opaque) == PING_SIZE and opaque[0] == _ANNOUNCE_MARK


def announced_records(opaque: bytes) -> int | None:
    """The record budget a PING payload announces, clamped to what we can send
    (BASE_RECORD_BUDGET..RECORD_BUDGET); None for a clock or an announcement of
    something else (a later version's: ignored, as an older peer ignores ours)."""
    if not is_announcement(opaque):
        return None
    _mark, what, budget = _ANNOUNCE.unpack(opaque)
    if what != _ANNOUNCE_RECORD:
        return None
    return min(max(int(budget), BASE_RECORD_BUDGET), RECORD_BUDGET)


def encode_goaway(code: int, message: str = "") -> bytes:
    payload = _reason(code, message)
    return HEADER.pack(FrameType.GOAWAY, 0, len(payload)) + payload


def encode(frame: Frame) -> bytes:
    """Encode any frame value (the decoder's output type)."""
    match frame:
        case DataFrame(sid, data):
            return encode_data(sid, data)
        case OpenFrame(sid, service):
            return encode_open(sid, service)
        case WindowUpdateFrame(sid, inc):
            return encode_window_update(sid, inc)
        case FinFrame(sid):
            return encode_fin(sid)
        case ResetFrame(sid, code, message):
            return encode_reset(sid, code, message)
        case PingFrame(opaque):
            return encode_ping(opaque)
        case PongFrame(opaque):
            return encode_pong(opaque)
        case GoAwayFrame(code, message):
            return encode_goaway(code, message)
    raise FrameError(f"not a frame: {frame!r}")  # pragma: no cover - exhaustive above


# -- decoding ----------------------------------------------------------------


def _check_header(kind: int, stream_id: int, length: int) -> FrameType:
    ftype = _TYPES.get(kind)  # not FrameType(kind): an enum call costs a microsecond
    if ftype is None:
        raise FrameError(f"unknown frame type {kind}")
    low, high = _LENGTHS[ftype]
    if not low <= length <= high:
        raise FrameError(f"{ftype.name} frame with a {length}-byte payload "
                         f"(allowed {low}..{high})")
    if ftype in _STREAM_TYPES:
        if stream_id == 0:
            raise FrameError(f"{ftype.name} frame on stream 0")
    elif stream_id != 0:
        raise FrameError(f"{ftype.name} frame on stream {stream_id} (must be 0)")
    return ftype


def _text(payload: bytes, ftype: FrameType) -> tuple[int, str]:
    try:
        message = payload[4:].decode("utf-8")
    except UnicodeDecodeError:
        raise FrameError(f"{ftype.name} reason is not UTF-8") from None
    return _U32.unpack_from(payload)[0], message


def _build(ftype: FrameType, stream_id: int, payload: bytes) -> Frame:
    if ftype is FrameType.WINDOW_UPDATE:
        increment = _U32.unpack(payload)[0]
        if not 0 < increment <= MAX_INCREMENT:
            raise FrameError(f"window increment {increment} out of range 1..{MAX_INCREMENT}")
        return WindowUpdateFrame(stream_id, increment)
    if ftype is FrameType.OPEN:
        if not payload:
            return OpenFrame(stream_id)
        if not 0 < payload[0] < MAX_SERVICES:  # one encoding per service: 0 is empty
            raise FrameError(f"OPEN for service {payload[0]} (allowed 1..{MAX_SERVICES - 1}; "
                             "service 0 has an empty OPEN)")
        return OpenFrame(stream_id, payload[0])
    if ftype is FrameType.FIN:
        return FinFrame(stream_id)
    if ftype is FrameType.RST:
        code, message = _text(payload, ftype)
        return ResetFrame(stream_id, code, message)
    if ftype is FrameType.PING:
        return PingFrame(payload)
    if ftype is FrameType.PONG:
        return PongFrame(payload)
    code, message = _text(payload, ftype)
    return GoAwayFrame(code, message)


class FrameDecoder:
    """Sans-IO frame parser: ``feed`` bytes as they arrive, get the complete frames.

    DATA payloads parsed straight from a fed ``bytes`` object (immutable) are
    memoryview slices of it, not copies; anything else is copied.
    A :class:`FrameError` is final: the stream of frames is out of sync, so the
    decoder refuses further input and the caller must drop the connection.
    """

    def __init__(self) -> None:
        self._buf = bytearray()
        self._error: FrameError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held while waiting for the rest of a frame."""
        return len(self._buf)

    def feed(self, data: Buffer) -> list[Frame]:
        if self._error is not None:
            raise FrameError(f"decoder already failed: {self._error}")
        try:
            return self._feed(data)
        except FrameError as exc:
            self._error = exc
            raise

    def whole_data(self, data: bytes | memoryview) -> tuple[int, memoryview] | None:
        """``data`` as one valid DATA frame's (stream id, payload view), if it is
        exactly that, nothing is pending and it is ``bytes`` or a view of ``bytes``
        or of a buffer that does not change while viewed (a bulk sender's every
        record); else None, and nothing was consumed:
        :meth:`feed` it. Saves the frame list and tuple per record."""
        n = len(data) - HEADER_SIZE
        if n <= 0 or self._buf or self._error is not None:
            return None
        kind, stream_id, length = HEADER.unpack_from(data)
        if kind != _DATA_KIND or length != n or n > MAX_PAYLOAD or stream_id == 0:
            return None
        if type(data) is bytes:
            return stream_id, memoryview(data)[HEADER_SIZE:]
        if type(data) is memoryview and unchanging(data):
            return stream_id, data[HEADER_SIZE:]
        return None

    def _feed(self, data: Buffer) -> list[Frame]:
        # Parse straight from the caller's bytes when nothing is pending (the
        # usual case: writers put whole frames in a record), so only the tail of
        # a straddling frame is ever copied into the buffer.
        if self._buf:
            self._buf += data
            src: Buffer = self._buf
        else:
            src = data
        frames: list[Frame] = []
        pos = 0
        view = memoryview(src)
        # DATA payloads may be views of the caller's buffer only if nobody can
        # change it: bytes, or a view of bytes or of a buffer that says so (a
        # resumable tunnel's records).
        zero_copy = type(src) is bytes or (type(src) is memoryview and unchanging(src))
        end = len(view)
        while end - pos >= HEADER_SIZE:
            kind, stream_id, length = HEADER.unpack_from(view, pos)
            # The hot path, a valid DATA header, checked inline (what _check_header
            # checks for DATA); anything else is checked there.
            is_data = kind == _DATA_KIND and 0 < length <= MAX_PAYLOAD and stream_id != 0
            if not is_data:
                ftype = _check_header(kind, stream_id, length)
            start = pos + HEADER_SIZE
            if end - start < length:
                break
            pos = start + length
            if is_data:
                frames.append(DataFrame(stream_id, view[start:pos] if zero_copy
                                        else bytes(view[start:pos])))
            else:
                frames.append(_build(ftype, stream_id, bytes(view[start:pos])))
        rest = bytes(view[pos:]) if src is not self._buf and pos < end else b""
        del view  # release our export of the buffer before resizing it
        if src is self._buf:
            del self._buf[:pos]
        elif rest:
            self._buf = bytearray(rest)
        return frames
