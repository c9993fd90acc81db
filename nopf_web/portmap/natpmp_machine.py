"""NAT-PMP (RFC 6886) client: codec and sans-IO machine.

Wire formats (RFC 6886 §3; every multi-byte number big-endian, §3), sent to UDP
port 5351 of the default gateway (§3.1):

External address request (§3.2), 2 bytes::

    Vers (1) = 0 | OP (1) = 0

External address response (§3.2), 12 bytes::

    Vers (1) = 0 | OP (1) = 128 | Result Code (2) | Seconds Since Start of Epoch (4)
    | External IPv4 Address (4, a.b.c.d in natural order; 0 and ignored on error)

Mapping request (§3.3), 12 bytes::

    Vers (1) = 0 | OP (1) = 1 UDP, 2 TCP | Reserved (2) = 0 | Internal Port (2)
    | Suggested External Port (2) | Requested Port Mapping Lifetime in Seconds (4)

Mapping response (§3.3), 16 bytes::

    Vers (1) = 0 | OP (1) = 128 + request OP | Result Code (2)
    | Seconds Since Start of Epoch (4) | Internal Port (2) | Mapped External Port (2)
    | Port Mapping Lifetime in Seconds (4)

Unsupported Version response (§3.5), 8 bytes, the answer to any version but 0::

    Vers (1) = 0 | OP (1) = 0 | Result Code (2) = 1 | Seconds Since Start of Epoch (4)

Deletion (§3.4) is a mapping request with lifetime 0 and suggested external
port 0; its success response has external port 0 and lifetime 0.

Requests are retransmitted 250 ms after the first, then at doubling intervals,
nine transmissions in all, the last one waited on for 64 s (§3.1). The caller
may give up sooner (``give_up_after``): the port mapper races for 250 ms.
Clients send one request at a time (§3.1): the external address first, then
the mapping.
"""

from __future__ import annotations

import enum
import struct
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

from nopf_web.portmap import exchange_machine as exchange
from nopf_web.portmap.exchange_machine import (
    BadField,
    BadLength,
    BadOpcode,
    BadVersion,
    Granted,
    Outcome,
    Question,
    Truncated,
    Unsupported,
    check_mapping,
    refused,
)

PROTOCOL = "NAT-PMP"
SERVER_PORT = 5351  # §3.1: requests go to this UDP port of the gateway
VERSION = 0  # §3: this document specifies version 0
PCP_VERSION = 2  # RFC 6886 §1.1: PCP shares the port with version 2
RESPONSE_BIT = 128  # §3: opcodes 128-255 are responses (128 + request opcode)
RECOMMENDED_LIFETIME = 7200  # §3.3: two hours

FIRST_INTERVAL = 0.25  # §3.1: wait 250 ms, then double
TRANSMISSIONS = 9  # §3.1: nine attempts, the last waited on for 64 s

_HEADER = struct.Struct("!BBH")  # Vers, OP, Result Code (responses) / Reserved (requests)
_ADDRESS_RESPONSE = struct.Struct("!BBHI4s")  # + epoch, external address: 12 bytes
_MAP_REQUEST = struct.Struct("!BBHHHI")  # Vers, OP, Reserved, ports, lifetime: 12 bytes
_MAP_RESPONSE = struct.Struct("!BBHIHHI")  # Vers, OP, Result, epoch, ports, lifetime: 16
_UNSUPPORTED_VERSION = struct.Struct("!BBHI")  # Vers, OP = 0, Result = 1, epoch: 8 bytes


class Opcode(enum.IntEnum):
    """Request opcodes (§3.2, §3.3); a response's opcode is 128 + these."""

    EXTERNAL_ADDRESS = 0
    MAP_UDP = 1
    MAP_TCP = 2


class ResultCode(enum.IntEnum):
    """§3.5. Codes not listed here are fatal errors of the request (§3.5)."""

    SUCCESS = 0
    UNSUPPORTED_VERSION = 1
    NOT_AUTHORIZED = 2  # "Not Authorized/Refused", e.g. the user turned the feature off
    NETWORK_FAILURE = 3  # e.g. the gateway has no DHCP lease itself
    OUT_OF_RESOURCES = 4
    UNSUPPORTED_OPCODE = 5


# --------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class ExternalAddressRequest:
    pass


@dataclass(frozen=True)
class MapRequest:
    opcode: Opcode  # MAP_UDP or MAP_TCP
    internal_port: int
    suggested_external_port: int
    lifetime: int  # 0 deletes (§3.4)


@dataclass(frozen=True)
class ExternalAddressResponse:
    result: int
    epoch: int
    external_address: IPv4Address


@dataclass(frozen=True)
class MapResponse:
    opcode: Opcode  # the request's opcode (the wire carries 128 + it)
    result: int
    epoch: int
    internal_port: int
    external_port: int
    lifetime: int


@dataclass(frozen=True)
class UnsupportedVersionResponse:
    epoch: int


Request = ExternalAddressRequest | MapRequest
Response = ExternalAddressResponse | MapResponse | UnsupportedVersionResponse


def encode_request(request: Request) -> bytes:
    if isinstance(request, ExternalAddressRequest):
        return bytes([VERSION, Opcode.EXTERNAL_ADDRESS])
    if request.opcode not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise ValueError(f"not a mapping opcode: {request.opcode}")
    return _MAP_REQUEST.pack(
        VERSION,
        request.opcode,
        0,  # Reserved: zero on transmission (§3.3)
        request.internal_port,
        request.suggested_external_port,
        request.lifetime,
    )


def encode_response(response: Response) -> bytes:
    if isinstance(response, UnsupportedVersionResponse):
        return _UNSUPPORTED_VERSION.pack(
            VERSION, 0, ResultCode.UNSUPPORTED_VERSION, response.epoch
        )
    if isinstance(response, ExternalAddressResponse):
        return _ADDRESS_RESPONSE.pack(
            VERSION,
            RESPONSE_BIT + Opcode.EXTERNAL_ADDRESS,
            response.result,
            response.epoch,
            response.external_address.packed,
        )
    return _MAP_RESPONSE.pack(
        VERSION,
        RESPONSE_BIT + response.opcode,
        response.result,
        response.epoch,
        response.internal_port,
        response.external_port,
        response.lifetime,
    )


def _need(data: bytes, size: int, field: str) -> None:
    if len(data) < size:
        raise Truncated(PROTOCOL, field, size, len(data))


def _exact(data: bytes, size: int, what: str) -> None:
    if len(data) > size:
        raise BadLength(PROTOCOL, "length", f"{len(data)} bytes, a {what} has {size}")


def _version(data: bytes) -> None:
    _need(data, 1, "Vers")
    if data[0] != VERSION:
        raise BadVersion(PROTOCOL, "Vers", data[0], VERSION)


def decode_request(data: bytes) -> Request:
    """A request as a gateway reads it (the test gateway has its own reader)."""
    _version(data)
    _need(data, 2, "OP")
    op = data[1]
    if op == Opcode.EXTERNAL_ADDRESS:
        _exact(data, 2, "external address request")
        return ExternalAddressRequest()
    if op not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise BadOpcode(PROTOCOL, "OP", op)
    for size, field in ((4, "Reserved"), (6, "Internal Port"), (8, "Suggested External Port"),
                        (12, "Requested Port Mapping Lifetime")):
        _need(data, size, field)
    _exact(data, 12, "mapping request")
    _, _, _, internal, suggested, lifetime = _MAP_REQUEST.unpack(data)
    return MapRequest(Opcode(op), internal, suggested, lifetime)


def decode_response(data: bytes) -> Response:
    """Strict: right version, a response opcode, exactly the length of its format."""
    _version(data)
    _need(data, 2, "OP")
    op = data[1]
    _need(data, 4, "Result Code")
    _need(data, 8, "Seconds Since Start of Epoch")
    if op == 0:  # §3.5: only the Unsupported Version answer carries OP 0
        _, _, result, epoch = _UNSUPPORTED_VERSION.unpack_from(data)
        if result != ResultCode.UNSUPPORTED_VERSION:
            raise BadOpcode(PROTOCOL, "OP", op, f"request opcode 0 with result code {result}")
        _exact(data, 8, "Unsupported Version response")
        return UnsupportedVersionResponse(epoch)
    if op < RESPONSE_BIT:
        raise BadOpcode(PROTOCOL, "OP", op, f"opcode {op} is a request, not a response")
    request_op = op - RESPONSE_BIT
    if request_op == Opcode.EXTERNAL_ADDRESS:
        _need(data, 12, "External IPv4 Address")
        _exact(data, 12, "external address response")
        _, _, result, epoch, address = _ADDRESS_RESPONSE.unpack(data)
        return ExternalAddressResponse(result, epoch, IPv4Address(address))
    if request_op not in (Opcode.MAP_UDP, Opcode.MAP_TCP):
        raise BadOpcode(PROTOCOL, "OP", op)
    _need(data, 10, "Internal Port")
    _need(data, 12, "Mapped External Port")
    _need(data, 16, "Port Mapping Lifetime")
    _exact(data, 16, "mapping response")
    _, _, result, epoch, internal, external, lifetime = _MAP_RESPONSE.unpack(data)
    return MapResponse(Opcode(request_op), result, epoch, internal, external, lifetime)


# --------------------------------------------------------------------------- timing


def intervals() -> Iterator[float]:
    """Waits after each transmission (§3.1): 0.25, 0.5, 1 ... 64 s, nine in all."""
    for attempt in range(TRANSMISSIONS):
        yield FIRST_INTERVAL * 2**attempt


class Epoch(exchange.Epoch):
    """From Seconds Since Start of Epoch (§3.6). Expected value: the last one
    plus 7/8 of the time elapsed on our clock; more than 2 s below that means
    the gateway rebooted or reset its table.
    """

    def _lost(self, last_epoch: int, last_now: float, epoch: int, now: float) -> bool:
        expected = last_epoch + (now - last_now) * 7 / 8
        return epoch < expected - 2


def _spoken(data: bytes) -> ExternalAddressResponse | MapResponse | Unsupported:
    """A response, or Unsupported where the gateway speaks PCP or another version."""
    if data[:1] == bytes([PCP_VERSION]):
        return Unsupported("the gateway answered in PCP (version 2), not NAT-PMP")
    response = decode_response(data)
    if isinstance(response, UnsupportedVersionResponse):
        return Unsupported("the gateway answered Unsupported Version to version 0")
    return response


# --------------------------------------------------------------------------- the machine


class NatPmpMapping(Question):
    """Map (or delete, ``lifetime=0``) one port, learning the external address first.

    ``start``/``receive``/``timer`` return the datagrams to send to the gateway's
    port 5351; ``outcome`` is set when done. Datagrams that are not the answer
    (malformed, stale, for another port) are ignored, as RFC 6886 wants, and
    listed in a NoAnswer outcome.
    """

    def __init__(
        self,
        internal_port: int,
        lifetime: int,
        *,
        suggested_external_port: int | None = None,
        opcode: Opcode = Opcode.MAP_TCP,
        ask_external_address: bool = True,
        give_up_after: float | None = None,
    ) -> None:
        check_mapping(internal_port, lifetime)
        if lifetime == 0:  # §3.4: a deletion suggests port 0 and needs no address
            suggested = 0
            ask_external_address = False
        else:
            suggested = (internal_port if suggested_external_port is None
                         else suggested_external_port)
        self.request = MapRequest(opcode, internal_port, suggested, lifetime)
        self._map_bytes = encode_request(self.request)
        self._ask_address = ask_external_address
        self._address: IPv4Address | None = None
        first = encode_request(ExternalAddressRequest()) if ask_external_address \
            else self._map_bytes
        super().__init__(first, intervals(), give_up_after)

    @property
    def mapping_requested(self) -> bool:
        """True once the mapping request itself has been sent (it may have been acted on)."""
        return self.asking == self._map_bytes

    def _answer(self, data: bytes, now: float) -> Outcome | None:
        response = _spoken(data)
        if isinstance(response, Unsupported):
            return response
        if isinstance(response, ExternalAddressResponse):
            return self._on_address(response, now)
        return self._on_mapping(response)

    def _on_address(self, response: ExternalAddressResponse, now: float) -> Outcome | None:
        if not self._ask_address or self._address is not None:
            self._ignore(f"{PROTOCOL}: OP: unasked external address response")
            return None
        if response.result != ResultCode.SUCCESS:
            return refused(ResultCode, response.result)
        self._address = response.external_address
        self._ask_next(self._map_bytes, intervals(), now)
        return None

    def _on_mapping(self, response: MapResponse) -> Outcome | None:
        if not self.mapping_requested or response.opcode != self.request.opcode:
            self._ignore(f"{PROTOCOL}: OP: response to opcode {response.opcode}, not ours")
            return None
        if response.internal_port != self.request.internal_port:
            # §3.5: the internal port identifies which request an answer is for
            raise BadField(PROTOCOL, "Internal Port",
                           f"{response.internal_port}, asked {self.request.internal_port}")
        if response.result != ResultCode.SUCCESS:
            return refused(ResultCode, response.result)
        return Granted(self._address, response.external_port, response.internal_port,
                       response.lifetime, response.epoch)


class NatPmpExternalAddress(Question):
    """Ask only the external address: the NAT doctor's probe (detection, no mapping)."""

    def __init__(self, *, give_up_after: float | None = None) -> None:
        super().__init__(encode_request(ExternalAddressRequest()), intervals(), give_up_after)

    def _answer(self, data: bytes, now: float) -> Outcome | None:
        response = _spoken(data)
        if isinstance(response, Unsupported):
            return response
        if not isinstance(response, ExternalAddressResponse):
            self._ignore(f"{PROTOCOL}: OP: mapping response to an address request")
            return None
        if response.result != ResultCode.SUCCESS:
            return refused(ResultCode, response.result)
        return Granted(response.external_address, 0, 0, 0, response.epoch)
