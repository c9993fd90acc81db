"""PCP (RFC 6887) client for MAP and ANNOUNCE: codec and sans-IO machine.

Wire formats (RFC 6887; every number big-endian, addresses 16 bytes with IPv4
as IPv4-mapped IPv6 ``::ffff:a.b.c.d``, §5), to UDP port 5351 of the default
gateway (§8.1). A message is at most 1100 bytes and a multiple of 4 (§7, §8.3).

Request header (§7.1), 24 bytes::

    Version (1) = 2 | R (1 bit) = 0, Opcode (7 bits) | Reserved (2) = 0
    | Requested Lifetime (4) | PCP Client's IP Address (16)

Response header (§7.2), 24 bytes::

    Version (1) = 2 | R (1 bit) = 1, Opcode (7 bits) | Reserved (1) | Result Code (1)
    | Lifetime (4) | Epoch Time (4) | Reserved (12)

MAP opcode-specific data (§11.1), 36 bytes after the header, request and response::

    Mapping Nonce (12) | Protocol (1; 6 = TCP) | Reserved (3)
    | Internal Port (2) | Suggested (request) / Assigned (response) External Port (2)
    | Suggested / Assigned External IP Address (16)

ANNOUNCE (§14.1) has no opcode-specific data. Options (§7.3) follow::

    Option Code (1) | Reserved (1) | Option Length (2) | data, zero-padded to 4 bytes

A MAP with Requested Lifetime 0 deletes the mapping (§11.3, §15); renewing
is the same request again with the same nonce (§11.2.1). Retransmission (§8.1.1):
first after RT = (1 + RAND) x IRT, then RT = (2 + RAND) x RTprev, capped at
(1 + RAND) x MRT, with IRT 3 s, MRT 1024 s, no count or duration limit
(MRC = MRD = 0) and RAND uniform in [-0.1, +0.1]. The caller bounds it with
``give_up_after`` (the port mapper races for 250 ms).
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from ipaddress import IPv4Address, IPv6Address

from nopf_web.portmap import exchange_machine as exchange
from nopf_web.portmap.exchange_machine import (
    BadField,
    BadLength,
    BadOpcode,
    BadVersion,
    Granted,
    NonceMismatch,
    Outcome,
    Question,
    Truncated,
    Unsupported,
    check_mapping,
    refused,
)

PROTOCOL = "PCP"
SERVER_PORT = 5351  # §8.1 (shared with NAT-PMP, RFC 6886 §1.1)
VERSION = 2  # §7, §9 (version 1 must not be used; 0 is NAT-PMP)
NATPMP_VERSION = 0
MAX_MESSAGE = 1100  # §7: a PCP message is at most 1100 bytes
HEADER_SIZE = 24  # §7.1, §7.2
MAP_SIZE = 36  # §11.1
NONCE_SIZE = 12  # §11.1: 96 bits
R_BIT = 0x80  # §7.1/§7.2: the top bit of the second byte, 1 in responses
TCP = 6  # §11.1: IANA protocol number
ALL_ZEROS_V4 = IPv6Address("::ffff:0.0.0.0")  # §5, §11.1: "no preference" for IPv4

IRT = 3.0  # §8.1.1: initial retransmission time, seconds
MRT = 1024.0  # §8.1.1: maximum retransmission time, seconds

_REQUEST_HEADER = struct.Struct("!BBHI16s")
_RESPONSE_HEADER = struct.Struct("!BBBBII12s")
_MAP = struct.Struct("!12sB3sHH16s")
_OPTION_HEADER = struct.Struct("!BBH")


class Opcode(enum.IntEnum):
    """§7.1 and §19.2 (PEER is not used here)."""

    ANNOUNCE = 0
    MAP = 1
    PEER = 2


class ResultCode(enum.IntEnum):
    """§7.4."""

    SUCCESS = 0
    UNSUPP_VERSION = 1
    NOT_AUTHORIZED = 2
    MALFORMED_REQUEST = 3
    UNSUPP_OPCODE = 4
    UNSUPP_OPTION = 5
    MALFORMED_OPTION = 6
    NETWORK_FAILURE = 7
    NO_RESOURCES = 8
    UNSUPP_PROTOCOL = 9
    USER_EX_QUOTA = 10
    CANNOT_PROVIDE_EXTERNAL = 11
    ADDRESS_MISMATCH = 12
    EXCESSIVE_REMOTE_PEERS = 13


def mapped(address: IPv4Address) -> IPv6Address:
    """IPv4 as the IPv4-mapped IPv6 address PCP carries (§5)."""
    return IPv6Address(b"\0" * 10 + b"\xff\xff" + address.packed)


def unmapped(address: IPv6Address) -> IPv4Address | None:
    """The IPv4 address inside an IPv4-mapped one; None for a real IPv6 address."""
    return address.ipv4_mapped


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Option:
    code: int
    data: bytes


@dataclass(frozen=True)
class MapData:
    """MAP opcode-specific data (§11.1): suggested in requests, assigned in responses."""

    nonce: bytes
    protocol: int
    internal_port: int
    external_port: int
    external_address: IPv6Address


@dataclass(frozen=True)
class Request:
    opcode: Opcode
    lifetime: int
    client_address: IPv6Address
    map: MapData | None = None  # required for MAP, absent for ANNOUNCE
    options: tuple[Option, ...] = ()


@dataclass(frozen=True)
class Response:
    opcode: Opcode
    result: int
    lifetime: int
    epoch: int
    map: MapData | None = None  # absent from ANNOUNCE and from short error answers
    options: tuple[Option, ...] = field(default=())


def _encode_options(options: tuple[Option, ...]) -> bytes:
    out = b""
    for option in options:
        pad = -len(option.data) % 4
        out += _OPTION_HEADER.pack(option.code, 0, len(option.data)) + option.data + b"\0" * pad
    return out


def _encode_map(data: MapData) -> bytes:
    if len(data.nonce) != NONCE_SIZE:
        raise ValueError(f"a mapping nonce has {NONCE_SIZE} bytes, not {len(data.nonce)}")
    return _MAP.pack(data.nonce, data.protocol, b"\0\0\0", data.internal_port,
                     data.external_port, data.external_address.packed)


def encode_request(request: Request) -> bytes:
    out = _REQUEST_HEADER.pack(VERSION, request.opcode, 0, request.lifetime,
                               request.client_address.packed)
    if request.opcode == Opcode.MAP:
        if request.map is None:
            raise ValueError("a MAP request needs its MAP data")
        out += _encode_map(request.map)
    return out + _encode_options(request.options)


def encode_response(response: Response) -> bytes:
    out = _RESPONSE_HEADER.pack(VERSION, R_BIT | response.opcode, 0, response.result,
                                response.lifetime, response.epoch, b"\0" * 12)
    if response.map is not None:
        out += _encode_map(response.map)
    return out + _encode_options(response.options)


def _check_frame(data: bytes) -> None:
    """§7 and §8.3: version, size, multiple of 4."""
    if not data:
        raise Truncated(PROTOCOL, "Version", 1, 0)
    if data[0] != VERSION:
        raise BadVersion(PROTOCOL, "Version", data[0], VERSION)
    if len(data) > MAX_MESSAGE:
        raise BadLength(PROTOCOL, "length", f"{len(data)} bytes, at most {MAX_MESSAGE}")
    if len(data) < HEADER_SIZE:
        field_name = "Opcode" if len(data) < 2 else "header"
        raise Truncated(PROTOCOL, field_name, HEADER_SIZE, len(data))
    if len(data) % 4:
        raise BadLength(PROTOCOL, "length", f"{len(data)} bytes, not a multiple of 4")


def _decode_options(data: bytes, offset: int) -> tuple[Option, ...]:
    options: list[Option] = []
    while offset < len(data):
        if len(data) - offset < _OPTION_HEADER.size:
            raise Truncated(PROTOCOL, "Option header", _OPTION_HEADER.size, len(data) - offset)
        code, _, length = _OPTION_HEADER.unpack_from(data, offset)
        offset += _OPTION_HEADER.size
        padded = length + (-length % 4)
        if len(data) - offset < padded:
            raise Truncated(PROTOCOL, f"Option {code} data", padded, len(data) - offset)
        options.append(Option(code, data[offset:offset + length]))
        offset += padded
    return tuple(options)


def _decode_map(data: bytes, what: str) -> MapData:
    if len(data) < HEADER_SIZE + MAP_SIZE:
        raise Truncated(PROTOCOL, f"{what} MAP data", MAP_SIZE, len(data) - HEADER_SIZE)
    nonce, protocol, _, internal, external, address = _MAP.unpack_from(data, HEADER_SIZE)
    return MapData(nonce, protocol, internal, external, IPv6Address(address))


def _opcode(data: bytes, *, response: bool) -> Opcode:
    r_bit = bool(data[1] & R_BIT)
    if r_bit != response:
        raise BadField(PROTOCOL, "R", "set in a request" if r_bit else "clear in a response")
    value = data[1] & ~R_BIT
    if value not in (Opcode.ANNOUNCE, Opcode.MAP):
        raise BadOpcode(PROTOCOL, "Opcode", value, f"opcode {value} is not ANNOUNCE or MAP")
    return Opcode(value)


def decode_request(data: bytes) -> Request:
    """A request as a server reads it (the test gateway has its own reader)."""
    _check_frame(data)
    opcode = _opcode(data, response=False)
    _, _, _, lifetime, client = _REQUEST_HEADER.unpack_from(data)
    body: MapData | None = None
    offset = HEADER_SIZE
    if opcode == Opcode.MAP:
        body = _decode_map(data, "request")
        offset += MAP_SIZE
    return Request(opcode, lifetime, IPv6Address(client), body, _decode_options(data, offset))


def decode_response(data: bytes) -> Response:
    """Strict, per §7.2 and §8.3; a MAP success must carry its MAP data.

    An error answer may stop after the header (a server that could not parse
    the request has nothing to echo).
    """
    _check_frame(data)
    opcode = _opcode(data, response=True)
    _, _, _, result, lifetime, epoch, _ = _RESPONSE_HEADER.unpack_from(data)
    body: MapData | None = None
    offset = HEADER_SIZE
    if opcode == Opcode.MAP and (result == ResultCode.SUCCESS or len(data) > HEADER_SIZE):
        body = _decode_map(data, "response")
        offset += MAP_SIZE
    return Response(opcode, result, lifetime, epoch, body, _decode_options(data, offset))


def match_map_response(response: Response, request: Request) -> None:
    """§11.4: an answer to ``request`` has its nonce, protocol and internal port.

    Raises the WireError saying which field differs; the machine then ignores it.
    """
    assert request.map is not None
    if response.opcode != Opcode.MAP:
        raise BadOpcode(PROTOCOL, "Opcode", response.opcode, "not a MAP response")
    if response.map is None:
        return  # a header-only error answer: nothing to match, it is about our request
    if response.map.nonce != request.map.nonce:
        raise NonceMismatch(PROTOCOL, "Mapping Nonce", "not the nonce of our request")
    if response.map.protocol != request.map.protocol:
        raise BadField(PROTOCOL, "Protocol",
                       f"{response.map.protocol}, asked {request.map.protocol}")
    if response.map.internal_port != request.map.internal_port:
        raise BadField(PROTOCOL, "Internal Port",
                       f"{response.map.internal_port}, asked {request.map.internal_port}")


# --------------------------------------------------------------------------- timing


def intervals(rand: Callable[[], float]) -> Iterator[float]:
    """§8.1.1 with RAND = rand() scaled from [0, 1) to [-0.1, +0.1); endless."""

    def jitter() -> float:
        return (rand() - 0.5) / 5

    rt = (1 + jitter()) * IRT
    while True:
        yield rt
        rt = (2 + jitter()) * rt
        if rt > MRT:
            rt = (1 + jitter()) * MRT


class Epoch(exchange.Epoch):
    """§8.5, from Epoch Time: it went back, or it and our clock disagree."""

    def _lost(self, last_epoch: int, last_now: float, epoch: int, now: float) -> bool:
        if epoch + 2 < last_epoch:  # went back in time
            return True
        client_delta = now - last_now
        server_delta = epoch - last_epoch
        return (client_delta + 2 < server_delta - server_delta / 16
                or server_delta + 2 < client_delta - client_delta / 16)


# --------------------------------------------------------------------------- the machines


class _PcpExchange(Question):
    """One PCP request to the server, until a matching answer or giving up."""

    def __init__(self, request: Request, rand: Callable[[], float],
                 give_up_after: float | None) -> None:
        super().__init__(encode_request(request), intervals(rand), give_up_after)
        self.request = request
        self.response: Response | None = None

    def _answer(self, data: bytes, now: float) -> Outcome | None:
        if data[:1] == bytes([NATPMP_VERSION]):
            # RFC 6887 §9 / RFC 6886 §1.1: a NAT-PMP-only server answers Unsupported Version
            return Unsupported("the gateway answered in NAT-PMP (version 0), not PCP")
        response = decode_response(data)
        if self.request.opcode == Opcode.MAP:
            match_map_response(response, self.request)
        elif response.opcode != self.request.opcode:
            raise BadOpcode(PROTOCOL, "Opcode", response.opcode, "not our opcode")
        self.response = response
        if response.result == ResultCode.UNSUPP_VERSION:
            return Unsupported(f"the gateway does not support PCP version {VERSION}")
        if response.result != ResultCode.SUCCESS:
            return refused(ResultCode, response.result)
        return self._granted(response)

    def _granted(self, response: Response) -> Outcome:
        return Granted(None, 0, 0, response.lifetime, response.epoch)


class PcpMapping(_PcpExchange):
    """MAP one port (lifetime > 0, also renews with the same nonce) or delete it (0).

    ``rand`` gives floats in [0, 1) for the retransmission jitter.
    """

    def __init__(
        self,
        *,
        client_address: IPv4Address,
        internal_port: int,
        lifetime: int,
        nonce: bytes,
        rand: Callable[[], float],
        suggested_external_port: int | None = None,
        suggested_external_address: IPv4Address | None = None,
        protocol: int = TCP,
        give_up_after: float | None = None,
    ) -> None:
        check_mapping(internal_port, lifetime)
        suggested_port = internal_port if suggested_external_port is None \
            else suggested_external_port
        suggested_address = ALL_ZEROS_V4 if suggested_external_address is None \
            else mapped(suggested_external_address)
        request = Request(
            Opcode.MAP,
            lifetime,
            mapped(client_address),
            MapData(nonce, protocol, internal_port, suggested_port, suggested_address),
        )
        super().__init__(request, rand, give_up_after)

    def _granted(self, response: Response) -> Outcome:
        body = response.map
        if body is None:  # decode_response requires MAP data on success
            raise AssertionError("MAP success without MAP data")
        return Granted(unmapped(body.external_address), body.external_port,
                       body.internal_port, response.lifetime, response.epoch)


class PcpAnnounce(_PcpExchange):
    """ANNOUNCE (§14.1): does a PCP server answer? The NAT doctor's probe."""

    def __init__(self, *, client_address: IPv4Address, rand: Callable[[], float],
                 give_up_after: float | None = None) -> None:
        super().__init__(Request(Opcode.ANNOUNCE, 0, mapped(client_address)), rand,
                         give_up_after)
