"""What the guard drops, as pure functions: the WinDivert filter text and the same rule in Python.

A protected window covers one local port (the punch port) and one remote
endpoint (the peer, or the rendezvous during discovery). Inside it the guard
drops our *outbound* TCP segments that would end a NAT's tracking of that
address pair:

- any segment with RST set (RST and RST+ACK), and
- any segment with FIN and ACK set (a normal close).

Everything else passes: SYN, SYN-ACK, data and bare ACKs on the same pair,
every segment of other ports or to other hosts, and the resets nopf sends on
purpose, marked with the TOS byte :data:`~nopf_web.sockets.RESET_TOS` (the punch
ends a failed half-open handshake so, to clear our NAT's tracking of the pair:
see :func:`nopf_web.sockets.reset_close`).

:func:`window_filter` builds the expression in the WinDivert filter language,
which pydivert uses on both backends (WinDivert on Windows, eBPFDivert on
Linux). :func:`window_drops` states the same rule in Python; the guard checks
every packet the kernel hands it against it and re-injects anything that does
not match (which, with an exact filter, never happens). The unit tests hold
the two to each other.
"""

from __future__ import annotations

import ipaddress
from dataclasses import dataclass

from nopf_web.sockets import RESET_TOS

__all__ = [
    "CLOSE_FLAGS",
    "Segment",
    "WindowRule",
    "describe",
    "window_drops",
    "window_filter",
]

# The flags that close a connection: RST (with or without ACK) or FIN+ACK.
CLOSE_FLAGS = "(tcp.Rst or (tcp.Fin and tcp.Ack))"


@dataclass(frozen=True)
class WindowRule:
    """One protected window: our ``local_port`` (0: any) to ``remote`` (None: any).

    ``remote`` is ``(ipv4, port)``; a port of 0 means any port of that host.
    At least one of the two must be given: a window that would cover every
    RST and FIN of the machine is refused.
    """

    local_port: int
    remote: tuple[str, int] | None

    def __post_init__(self) -> None:
        if not 0 <= self.local_port <= 65535:
            raise ValueError(f"local port {self.local_port} is out of range (0-65535)")
        if self.remote is not None:
            host, port = self.remote
            try:
                ip = ipaddress.IPv4Address(host)
            except ValueError:
                raise ValueError(f"{host!r} is not an IPv4 address") from None
            if str(ip) != host:
                raise ValueError(f"{host!r} is not a canonical dotted-quad IPv4 address")
            if not 0 <= port <= 65535:
                raise ValueError(f"remote port {port} is out of range (0-65535)")
        if self.local_port == 0 and self.remote is None:
            raise ValueError("a guard window needs a local port or a remote address")


@dataclass(frozen=True)
class Segment:
    """The fields of one IPv4 TCP segment that the rule looks at."""

    src: str
    src_port: int
    dst: str
    dst_port: int
    outbound: bool
    syn: bool = False
    ack: bool = False
    fin: bool = False
    rst: bool = False
    tos: int = 0  # the IPv4 header's TOS byte (DSCP and ECN)


def window_filter(rule: WindowRule) -> str:
    """The WinDivert filter expression that captures what ``rule`` drops."""
    parts = ["outbound", "tcp"]
    if rule.local_port:
        parts.append(f"tcp.SrcPort == {rule.local_port}")
    if rule.remote is not None:
        host, port = rule.remote
        parts.append(f"ip.DstAddr == {host}")
        if port:
            parts.append(f"tcp.DstPort == {port}")
    parts.append(f"ip.TOS != {RESET_TOS}")
    parts.append(CLOSE_FLAGS)
    return " and ".join(parts)


def window_drops(rule: WindowRule, seg: Segment) -> bool:
    """True when ``rule`` drops ``seg`` (the filter's meaning, in Python)."""
    if not seg.outbound:
        return False
    if rule.local_port and seg.src_port != rule.local_port:
        return False
    if rule.remote is not None:
        host, port = rule.remote
        if seg.dst != host or (port and seg.dst_port != port):
            return False
    if seg.tos == RESET_TOS:
        return False
    return seg.rst or (seg.fin and seg.ack)


def describe(seg: Segment) -> str:
    """``RST+ACK 10.0.1.2:40000 -> 192.0.2.2:40001`` (for logs)."""
    flags = [name for name, on in (("SYN", seg.syn), ("FIN", seg.fin), ("RST", seg.rst),
                                   ("ACK", seg.ack)) if on]
    way = "" if seg.outbound else " (inbound)"
    return f"{'+'.join(flags) or 'none'} {seg.src}:{seg.src_port} -> {seg.dst}:{seg.dst_port}{way}"
