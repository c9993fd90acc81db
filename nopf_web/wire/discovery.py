"""The seed's address-discovery reply (nopf-server → peer), as a pure codec.

Wire format, sent by the rendezvous on every accepted TCP connection, before
reading anything, then the rendezvous closes:

    offset  size  field   encoding
    0       4     ip      the peer's observed IPv4 address, network byte order
    4       2     port    the peer's observed TCP port, big-endian (network order)
    6       4     trailer the bytes b"END\\0"

Total: 10 bytes. The seed has no version field and no length prefix, so a
reader must consume exactly 10 bytes (it cannot rely on EOF: the seed's
README firewalls the server's FIN away).

Over IPv6 (not the seed's: its clients are IPv4-only, and an IPv4 connection
always gets the 10 bytes above) nopf-server writes the same fields for the
IPv6 address, then closes:

    offset  size  field   encoding
    0       16    ip      the peer's observed IPv6 address, network byte order
    16      2     port    the peer's observed TCP port, big-endian
    18      4     trailer the bytes b"END\0"

Total: 22 bytes (REPLY6_SIZE). A reader knows which to expect from the family
of its own connection (``DiscoveryReader(ipv6=True)``).
"""

from __future__ import annotations

import ipaddress
import struct

from .errors import WireError

REPLY_TRAILER = b"END\x00"
_HEAD = struct.Struct("!4sH")  # ip (4 bytes, network order), port (u16, big-endian)
REPLY_SIZE = _HEAD.size + len(REPLY_TRAILER)  # 10
_HEAD6 = struct.Struct("!16sH")  # ip (16 bytes, network order), port (u16, big-endian)
REPLY6_SIZE = _HEAD6.size + len(REPLY_TRAILER)  # 22


def _encode(family: type[ipaddress.IPv4Address | ipaddress.IPv6Address],
            head: struct.Struct, ip: str, port: int) -> bytes:
    try:
        packed = family(ip).packed
    except ValueError as exc:
        raise WireError(f"not an IPv{family.version} address: {ip!r}") from exc
    if not 0 <= port <= 0xFFFF:
        raise WireError(f"port out of range: {port}")
    return head.pack(packed, port) + REPLY_TRAILER


def _decode(family: type[ipaddress.IPv4Address | ipaddress.IPv6Address],
            head: struct.Struct, what: str, data: bytes) -> tuple[str, int]:
    size = head.size + len(REPLY_TRAILER)
    if len(data) != size:
        raise WireError(f"{what} must be {size} bytes, got {len(data)}")
    if data[head.size :] != REPLY_TRAILER:
        raise WireError(f"discovery reply has no END\\0 trailer: {data.hex()}")
    raw_ip, port = head.unpack_from(data)
    if port == 0:
        raise WireError("discovery reply carries port 0")
    return str(family(raw_ip)), port


def encode_reply(ip: str, port: int) -> bytes:
    """Encode the 10-byte discovery reply for an observed IPv4 ``ip:port``."""
    return _encode(ipaddress.IPv4Address, _HEAD, ip, port)


def encode_reply6(ip: str, port: int) -> bytes:
    """Encode the 22-byte IPv6 discovery reply for an observed IPv6 ``ip:port``."""
    return _encode(ipaddress.IPv6Address, _HEAD6, ip, port)


def decode_reply6(data: bytes) -> tuple[str, int]:
    """Decode a complete IPv6 discovery reply; raise :class:`WireError` if it is not one."""
    return _decode(ipaddress.IPv6Address, _HEAD6, "IPv6 discovery reply", data)


def decode_reply(data: bytes) -> tuple[str, int]:
    """Decode a complete discovery reply; raise :class:`WireError` if it is not one."""
    return _decode(ipaddress.IPv4Address, _HEAD, "discovery reply", data)


class DiscoveryReader:
    """Sans-IO accumulator: feed bytes as they arrive, get the address once complete.

    Extra bytes after the 10-byte reply are a protocol violation (the seed
    server closes right after the trailer), so they are reported instead of
    silently ignored.
    """

    def __init__(self, *, ipv6: bool = False) -> None:
        self._buf = bytearray()
        self._size = REPLY6_SIZE if ipv6 else REPLY_SIZE
        self._decode = decode_reply6 if ipv6 else decode_reply

    @property
    def needed(self) -> int:
        """How many more bytes complete the reply (0 when complete)."""
        return max(0, self._size - len(self._buf))

    def feed(self, data: bytes) -> tuple[str, int] | None:
        self._buf += data
        if len(self._buf) > self._size:
            raise WireError(f"discovery reply longer than {self._size} bytes")
        if len(self._buf) < self._size:
            return None
        return self._decode(bytes(self._buf))
