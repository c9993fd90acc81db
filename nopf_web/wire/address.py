"""Parsing of the ``IP:PORT`` / ``HOST:PORT`` text users type and the CLI prints.

Part of the one parsing layer (:mod:`nopf_web.inputs`): ports are ASCII digits
in range, hosts are IPv4 dotted quads, RFC 1123 names (ASCII) or, where a use takes
them, IPv6 addresses in brackets (``[2001:db8::1]:3012``), and every
failure is a :class:`~nopf_web.wire.errors.BadAddress` (an
:class:`~nopf_web.inputs.InputError`) naming its field.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Sequence
from typing import NamedTuple

from nopf_web.inputs import MAX_TEXT, is_ascii_digits, is_one_line, quote

from .errors import BadAddress

# One label of an RFC 1123 host name: 1-63 ASCII letters, digits and hyphens, neither
# first nor last a hyphen. Names are checked label by label (is_hostname): one pattern
# for the whole name, with its labels' dots optional, backtracked exponentially on
# a long name with a bad last character (26 characters took 4 s).
_LABEL = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?", re.ASCII)
MAX_HOSTNAME = 253  # characters, a trailing dot included


class Endpoint(NamedTuple):
    host: str
    port: int

    def __str__(self) -> str:
        if ":" in self.host:  # IPv6: [2001:db8::1]:3012
            return f"[{self.host}]:{self.port}"
        return f"{self.host}:{self.port}"


def _line(text: str, field: str) -> str:
    if not isinstance(text, str):
        raise BadAddress(f"{field} must be text, got {type(text).__name__}", field)
    if len(text) > MAX_TEXT:
        raise BadAddress(f"{field} is too long to be an address ({len(text):,} characters)",
                         field)
    text = text.strip()
    if not is_one_line(text):
        raise BadAddress(f"{field} {quote(text)} contains control or invalid characters", field)
    return text


def _split(text: str, field: str) -> tuple[str, str]:
    text = _line(text, field)
    if not text:
        raise BadAddress("empty address (expected IP:PORT)", field)
    host, sep, port = text.rpartition(":")
    if not sep or not host:
        raise BadAddress(f"{quote(text)} is not IP:PORT (missing ':PORT')", field)
    return host, port


def parse_port(text: str, *, what: str = "port", allow_zero: bool = False,
               field: str | None = None) -> int:
    """A TCP port: ASCII digits, 1-65535 (0 too with ``allow_zero``). ``what`` is how
    messages name it; ``field`` the input it came from (default: ``what``)."""
    field = field or what
    text = _line(text, field)
    if not is_ascii_digits(text) or len(text) > 5:
        raise BadAddress(f"{what} {quote(text)} is not a number between 1 and 65535", field)
    value = int(text)
    if not (0 if allow_zero else 1) <= value <= 65535:
        raise BadAddress(f"{what} {value} is out of range (1-65535)", field)
    return value


def parse_ipv4_endpoint(text: str, *, field: str = "address") -> Endpoint:
    """Parse a peer's public address: a dotted-quad IPv4 address and a port."""
    host, port = _split(text, field)
    shown = quote(text.strip())
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        raise BadAddress(f"{quote(host)} in {shown} is not an IPv4 address", field) from None
    return _usable_endpoint(ip, port, shown, field, "a peer address")


def _usable_endpoint(ip: ipaddress.IPv4Address | ipaddress.IPv6Address, port: str,
                     shown: str, field: str, what: str) -> Endpoint:
    """``ip`` and ``port`` (from ``shown``), unless ``ip`` is unspecified or multicast: an
    address that cannot be ``what``, a peer's or a rendezvous'."""
    if ip.is_unspecified or ip.is_multicast:
        raise BadAddress(f"{field} {shown}: {ip} cannot be {what}", field)
    return Endpoint(str(ip), parse_port(port, what=f"port in {shown}", field=field))


def parse_observed_endpoint(text: str, *, field: str = "address") -> Endpoint:
    """An address the rendezvous observed (a peer's, or its own as a peer reached it):
    ``IPv4:PORT``, or ``[IPv6]:PORT`` for a connection over IPv6 (any IPv6 address but
    the unspecified and multicast ones; no zone id)."""
    text = _line(text, field)
    if not text.startswith("["):
        return parse_ipv4_endpoint(text, field=field)
    return _bracketed_endpoint(text, field, "a peer address")


def parse_ipv6_endpoint(text: str, *, field: str = "address") -> Endpoint:
    """A peer's ``[IPv6]:PORT``: any IPv6 address but the unspecified and multicast
    ones; no zone id. (A use that wants only some, such as global unicast ones,
    checks the result.)"""
    return _bracketed_endpoint(_line(text, field), field, "a peer address")


def _bracketed_endpoint(text: str, field: str, what: str) -> Endpoint:
    """``[IPv6]:PORT`` (``text`` already one stripped line); ``what`` it must be."""
    host, sep, port = text.rpartition("]:")
    shown = quote(text)
    try:
        if not sep or "%" in host:
            raise ValueError
        ip = ipaddress.IPv6Address(host[1:])
    except ValueError:
        raise BadAddress(f"{shown} is not [IPv6]:PORT", field) from None
    return _usable_endpoint(ip, port, shown, field, what)


def is_hostname(text: str) -> bool:
    """An RFC 1123 host name: dot-separated labels (:data:`_LABEL`), at most
    :data:`MAX_HOSTNAME` characters, one trailing dot allowed. Linear in its length."""
    if not 0 < len(text) <= MAX_HOSTNAME:
        return False
    labels = (text[:-1] if text.endswith(".") else text).split(".")
    return all(_LABEL.fullmatch(label) for label in labels)


def parse_host(host: str, *, field: str = "host", shown: str | None = None,
               what: str = "an address to connect to") -> str:
    """An IPv4 address (canonical form) or an RFC 1123 host name: a host to connect to,
    so neither 0.0.0.0 nor a multicast address (which cannot be ``what``), as with IPv6."""
    try:
        ip = ipaddress.IPv4Address(host)
    except ValueError:
        if host.replace(".", "").isdigit() or not is_hostname(host):
            where = f" in {shown}" if shown else ""
            raise BadAddress(f"{quote(host)}{where} is not an IPv4 address or host name",
                             field) from None
        return host
    if ip.is_unspecified or ip.is_multicast:
        raise BadAddress(f"{field} {shown or quote(host)}: {ip} cannot be {what}", field)
    return str(ip)


# Why seed mode refuses an IPv6 rendezvous (its discovery reply carries an IPv4 address).
SEED_IPV4_ONLY = "seed mode speaks the seed's IPv4-only protocol"
# Why the NAT doctor does: it measures the IPv4 NAT with that protocol's discovery (a host
# name's IPv6 addresses it checks as well).
DOCTOR_IPV4_ONLY = ("the NAT doctor measures the IPv4 NAT with the seed's IPv4-only "
                    "discovery (and checks IPv6 through a host name's addresses)")


def parse_host_endpoint(text: str, *, field: str = "address",
                        no_ipv6: str | None = None) -> Endpoint:
    """Parse a rendezvous address: an IPv4 address, a host name or an IPv6 address in
    brackets (``[2001:db8::1]:3012``), and a port. ``no_ipv6``: why this use refuses an
    IPv6 address (:data:`SEED_IPV4_ONLY`): the one-line error says so. An IPv6 address
    without brackets is refused whatever the use: its last group cannot be told from a
    port."""
    line = _line(text, field)
    if line.startswith("["):
        endpoint = _bracketed_endpoint(line, field, "a rendezvous address")
        if no_ipv6 is not None:
            raise BadAddress(f"{field} {quote(line)} is an IPv6 address: {no_ipv6}; give an "
                             "IPv4 address or a host name", field)
        return endpoint
    host, port = _split(line, field)
    shown = quote(line)
    if ":" in host:
        try:
            example = f"[{ipaddress.IPv6Address(host)}]:{port}"
        except ValueError:
            example = "[2001:db8::1]:3012"
        raise BadAddress(f"{field} {shown} is ambiguous: put an IPv6 address in brackets, "
                         f"as in {quote(example)}", field)
    return Endpoint(parse_host(host, field=field, shown=shown, what="a rendezvous address"),
                    parse_port(port, what=f"port in {shown}", field=field))


def parse_ip(text: str, *, field: str = "address") -> ipaddress.IPv4Address | ipaddress.IPv6Address:
    """A host's own IPv4 or IPv6 address (brackets forgiven; no zone id), neither
    unspecified nor multicast."""
    bare = _line(text, field).strip("[]")
    if "%" in bare or not bare.isascii():
        raise BadAddress(f"{field} {quote(bare)} is not an IP address", field)
    try:
        ip = ipaddress.ip_address(bare)
    except ValueError:
        raise BadAddress(f"{field} {quote(bare)} is not an IP address", field) from None
    if ip.is_unspecified or ip.is_multicast:
        raise BadAddress(f"{field} {ip} cannot be a host address", field)
    return ip


def parse_listen_host(text: str, *, field: str = "--host") -> str:
    """Where to listen: an IPv4 or IPv6 address (unspecified ones included: 0.0.0.0,
    ::) or a host name."""
    bare = _line(text, field)
    inner = bare[1:-1] if bare.startswith("[") and bare.endswith("]") else bare
    if "%" not in inner and inner.isascii():
        try:
            return str(ipaddress.ip_address(inner))
        except ValueError:
            pass
    if is_hostname(bare) and not bare.replace(".", "").isdigit():
        return bare
    raise BadAddress(f"{field} {quote(bare)} is not an IP address or host name", field)


LOCAL_HOST = "127.0.0.1"  # a bare --localport's host: the service, or where we listen


def parse_local_endpoint(text: str, *, field: str = "--localport",
                         listen: bool) -> Endpoint:
    """The local side of a session: ``PORT`` (on :data:`LOCAL_HOST`) or ``HOST:PORT``.

    ``listen`` False: the service a sharer connects each stream to, an IPv4 address,
    a host name or ``[IPv6]`` (a NAS on the LAN, say). ``listen`` True: where a
    connector listens for its applications, an IP address of this machine
    (``0.0.0.0`` or ``[::]`` for all of them); a name is refused, since what is bound
    is an address.
    """
    line = _line(text, field)
    if is_ascii_digits(line):
        return Endpoint(LOCAL_HOST, parse_port(line, what=field, field=field))
    host, sep, port = line.rpartition(":")
    shown = quote(line)
    if not sep or not host:
        raise BadAddress(f"{field} {shown} is not a port or HOST:PORT", field)
    if listen:
        inner = host[1:-1] if host.startswith("[") and host.endswith("]") else host
        try:
            if "%" in inner or not inner.isascii() or (inner != host) != (":" in inner):
                raise ValueError
            ip = ipaddress.ip_address(inner)
        except ValueError:
            raise BadAddress(f"{field} {shown}: {quote(host)} is not an IP address to "
                             "listen on (this machine's, 0.0.0.0 or [::] for all; IPv6 "
                             "in brackets)", field) from None
        if ip.is_multicast:
            raise BadAddress(f"{field} {shown}: cannot listen on a multicast address", field)
        return Endpoint(str(ip), parse_port(port, what=f"port in {shown}", field=field))
    if line.startswith("["):
        return _bracketed_endpoint(line, field, "a service address")
    if ":" in host:
        raise BadAddress(f"{field} {shown} is ambiguous: put an IPv6 address in brackets, "
                         "as in '[2001:db8::1]:3000'", field)
    return Endpoint(parse_host(host, field=field, shown=shown, what="a service address"),
                    parse_port(port, what=f"port in {shown}", field=field))


def parse_local_sides(texts: Sequence[str], *, field: str = "--localport", listen: bool,
                      most: int) -> tuple[Endpoint, ...]:
    """Several local sides, in order (a tunnel's service 1, 2...): each as
    :func:`parse_local_endpoint` takes it, at most ``most``, none twice."""
    if not texts:
        raise BadAddress(f"{field} is empty (expected a port or HOST:PORT)", field)
    if len(texts) > most:
        raise BadAddress(f"{field} names {len(texts)} services: one tunnel carries at "
                         f"most {most}", field)
    sides = tuple(parse_local_endpoint(text, field=field, listen=listen) for text in texts)
    for i, side in enumerate(sides):
        if side in sides[:i]:
            raise BadAddress(f"{field} {side} is given twice", field)
    return sides


def local_text(host: str, port: int) -> str:
    """How messages name the local side: ``localhost:PORT`` for the default host (the
    seed's wording, which scripts read), ``HOST:PORT`` otherwise."""
    return f"localhost:{port}" if host == LOCAL_HOST else str(Endpoint(host, port))


def local_listing(sides: Sequence[object]) -> str:
    """Local sides in a sentence, in service order: ``127.0.0.1:22``, or
    ``127.0.0.1:22 (service 1), 192.168.1.20:80 (service 2)``."""
    if len(sides) == 1:
        return str(sides[0])
    return ", ".join(f"{side} (service {i})" for i, side in enumerate(sides, 1))


def is_loopback(host: str) -> bool:
    """Whether ``host`` (an address, IPv6 bracketed or not, or a name) is this machine's
    alone: a loopback address, or ``localhost``."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare).is_loopback
    except ValueError:
        return bare.lower().rstrip(".") == "localhost"


def parse_listen_endpoint(text: str, *, field: str) -> Endpoint:
    """``HOST:PORT`` to listen on (port 0: any free one); IPv6 in brackets."""
    host, sep, port = _line(text, field).rpartition(":")
    if not sep or not host:
        raise BadAddress(f"{field} {quote(text.strip())} is not HOST:PORT", field)
    return Endpoint(parse_listen_host(host, field=field).strip("[]"),
                    parse_port(port, what=f"{field} port", field=field, allow_zero=True))
