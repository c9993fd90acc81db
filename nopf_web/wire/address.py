"""Parsing of the ``IP:PORT`` / ``HOST:PORT`` text users type and the CLI prints."""

from __future__ import annotations

import ipaddress
import re
from typing import NamedTuple

from .errors import BadAddress

# RFC 1123 host names: labels of letters, digits and hyphens.
_HOSTNAME = re.compile(r"^(?=.{1,253}$)([A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?\.?)+$")


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6: [2001:db8::1]:3012
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _split(text: str) -> tuple[str, str]:
    text = text.strip()
    if not text:
        raise BadAddress("empty address (expected IP:PORT)")
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise BadAddress(f"{text!r} is not IP:PORT (missing ':PORT')")
    return host, port


def parse_port(text: str, *, what: str = "port", allow_zero: bool = False) -> int:
    text = text.strip()
    if not text.isdigit() or len(text) > 5:
        raise BadAddress(f"{what} {text!r} is not a number between 1 and 65535")
    value = int(text)
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise BadAddress(f"{what} {value} is out of range (1-65535)")
    return value


def parse_ipv4_endpoint(text: str) -> Endpoint:
    """Parse a peer's public address: a dotted-quad IPv4 address and a port."""
    host, port = _split(text)
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise BadAddress(f"{host!r} in {text.strip()!r} is not an IPv4 address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise BadAddress(f"{ip} cannot be a peer address")
    return Endpoint(str(ip), parse_port(port, what=f"port in {text.strip()!r}"))


def parse_host_endpoint(text: str) -> Endpoint:
    """Parse a rendezvous address: an IPv4 address or a host name, and a port."""
    host, port = _split(text)
    try:
        host = str(ipaddress.IPv4Address(host))
    except ValueError:
        if host.replace(".", "").isdigit() or not _HOSTNAME.match(host):
            raise BadAddress(
                f"{host!r} in {text.strip()!r} is not an IPv4 address or host name"
            ) from None
    return Endpoint(host, parse_port(port, what=f"port in {text.strip()!r}"))
