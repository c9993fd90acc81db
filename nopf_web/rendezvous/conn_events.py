"""Connection events and actions shared by nopf-server's sans-IO machines.

The rendezvous (:mod:`.server_machine`) and the NAT doctor's responder
(:mod:`.doctor_machine`) each hold many TCP connections for a driver that owns
the sockets. The driver reports what the kernel said with these events, every
one stamped with ``now`` from the driver's single clock, and carries out these
actions. Fields a machine has no use for keep their defaults.

The coordinated peer's machine (:mod:`nopf_web.sessions.coordination_machine`)
holds its own connections to the rendezvous: it says :class:`Send` and
:class:`Close` too.
"""

from __future__ import annotations

from dataclasses import dataclass

ConnId = int  # opaque to the machines; unique for a machine's lifetime


# Events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Accepted:
    conn: ConnId
    peer: tuple[str, int] | None  # as the kernel reported it (None: already gone)
    now: float
    kernel_rtt: float | None = None  # s, TCP_INFO's smoothed RTT; None: none known
    syn_data: bool = False  # the SYN carried data the kernel accepted (TCP Fast Open)
    local: tuple[str, int] | None = None  # our address the peer reached


@dataclass(frozen=True, slots=True)
class Received:
    conn: ConnId
    data: bytes
    now: float
    kernel_rtt: float | None = None  # as of now


@dataclass(frozen=True, slots=True)
class PeerClosed:
    conn: ConnId
    now: float


@dataclass(frozen=True, slots=True)
class Lost:
    conn: ConnId
    now: float
    error: str | None = None  # None: closed after our close
    writing: bool = False  # a write of ours failed (the reply could not be delivered)


@dataclass(frozen=True, slots=True)
class Tick:
    now: float


@dataclass(frozen=True, slots=True)
class Shutdown:
    """Stop: reset every connection the machine may drop (``force``: every one)."""

    now: float
    force: bool = False


# Actions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Send:
    conn: ConnId
    data: bytes


@dataclass(frozen=True, slots=True)
class Close:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Reset:
    conn: ConnId


@dataclass(frozen=True, slots=True)
class Log:
    kind: str  # what the line is about, for the machine's own rate limit
    line: str
