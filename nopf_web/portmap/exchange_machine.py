"""What the NAT-PMP and PCP machines share: decode errors, outcomes, retransmission,
the epoch check.

Sans-IO: no sockets, no clock. Every method takes ``now`` (seconds, any monotonic
origin) and returns the datagrams to send; ``wake_at`` says when to call ``timer``.
"""

from __future__ import annotations

import enum
from collections.abc import Iterator
from dataclasses import dataclass
from ipaddress import IPv4Address

from nopf_web.errors import NopfError


class WireError(NopfError):
    """A datagram that is not a valid message; ``field`` names where it went wrong."""

    def __init__(self, protocol: str, field: str, detail: str) -> None:
        super().__init__(f"{protocol}: {field}: {detail}")
        self.protocol = protocol
        self.field = field


class Truncated(WireError):
    """The datagram ends inside ``field``."""

    def __init__(self, protocol: str, field: str, need: int, got: int) -> None:
        super().__init__(protocol, field, f"truncated ({need} bytes needed, {got} received)")
        self.need = need
        self.got = got


class BadLength(WireError):
    """A length rule is broken: trailing bytes, not a multiple of 4, too long."""


class BadVersion(WireError):
    """The version byte is not the one expected; ``value`` is what arrived."""

    def __init__(self, protocol: str, field: str, value: int, expected: int) -> None:
        super().__init__(protocol, field, f"version {value}, expected {expected}")
        self.value = value


class BadOpcode(WireError):
    """The opcode is unknown here, or not the answer to what was asked."""

    def __init__(self, protocol: str, field: str, value: int, detail: str = "") -> None:
        super().__init__(protocol, field, detail or f"unexpected opcode {value}")
        self.value = value


class BadField(WireError):
    """A field holds a value the protocol does not allow here."""


class NonceMismatch(WireError):
    """A PCP response whose Mapping Nonce is not the one of our request."""


@dataclass(frozen=True)
class Granted:
    """The gateway made (lifetime > 0) or deleted (lifetime 0) the mapping."""

    external_address: IPv4Address | None  # None: this exchange did not learn it
    external_port: int
    internal_port: int
    lifetime: int  # seconds granted (may be less than asked)
    epoch: int  # the gateway's seconds since its mapping state began


@dataclass(frozen=True)
class Refused:
    """The gateway answered with a result code other than success."""

    code: int
    name: str


@dataclass(frozen=True)
class Unsupported:
    """The gateway answered, but in the other protocol or version: this one is not spoken."""

    detail: str


@dataclass(frozen=True)
class NoAnswer:
    """No valid answer before giving up; ``ignored`` lists why datagrams were dropped."""

    sent: int
    waited: float
    ignored: tuple[str, ...] = ()


Outcome = Granted | Refused | Unsupported | NoAnswer


def refused(codes: type[enum.IntEnum], code: int) -> Refused:
    """The answer ``code``, named from the protocol's result codes ``codes``."""
    try:
        name = codes(code).name
    except ValueError:
        name = f"unknown result code {code}"
    return Refused(code, name)


def check_mapping(internal_port: int, lifetime: int) -> None:
    """The ranges both protocols carry (a 16-bit port, a 32-bit lifetime)."""
    if not 0 < internal_port < 65536:
        raise ValueError(f"internal port out of range: {internal_port}")
    if not 0 <= lifetime < 2**32:
        raise ValueError(f"lifetime out of range: {lifetime}")


class Epoch:
    """Detects a gateway that lost its mappings, from the epoch seconds it sends
    and our clock; a subclass has its protocol's rule in :meth:`_lost`."""

    def __init__(self) -> None:
        self._last: tuple[int, float] | None = None

    def observe(self, epoch: int, now: float) -> bool:
        """Record a received value; True when it shows a loss of mapping state."""
        lost = self._last is not None and self._lost(*self._last, epoch, now)
        self._last = (epoch, now)
        return lost

    def _lost(self, last_epoch: int, last_now: float, epoch: int, now: float) -> bool:
        raise NotImplementedError


class Exchange:
    """One request, sent again after each interval until answered or given up.

    ``intervals`` are the waits after the 1st, 2nd... transmission; when they run
    out, or at ``give_up_after`` seconds from the start (whichever comes first),
    the exchange has failed.
    """

    def __init__(
        self, request: bytes, intervals: Iterator[float], give_up_after: float | None
    ) -> None:
        self.request = request
        self._intervals = intervals
        self._give_up_after = give_up_after
        self._started = 0.0
        self._deadline: float | None = None
        self._next: float | None = None
        self.sent = 0
        self.gave_up = False

    @property
    def wake_at(self) -> float | None:
        if self.gave_up or self._next is None:
            return None
        if self._deadline is None:
            return self._next
        return min(self._next, self._deadline)

    def start(self, now: float) -> list[bytes]:
        self._started = now
        if self._give_up_after is not None:
            self._deadline = now + self._give_up_after
        return self._send(now)

    def timer(self, now: float) -> list[bytes]:
        """Retransmit or give up when due; nothing otherwise."""
        if self.gave_up or self._next is None:
            return []
        if self._deadline is not None and now >= self._deadline:
            self.gave_up = True
            return []
        if now < self._next:
            return []
        return self._send(now)

    def waited(self, now: float) -> float:
        return now - self._started

    def _send(self, now: float) -> list[bytes]:
        interval = next(self._intervals, None)
        if interval is None:  # the last transmission's wait is over
            self.gave_up = True
            self._next = None
            return []
        self.sent += 1
        self._next = now + interval
        return [self.request]


class Question:
    """One request, retransmitted until an answer decides it (or giving up).

    A subclass says in :meth:`_answer` what a datagram decides: an outcome, or
    None for a datagram that is not the answer (:meth:`_ignore` says why, for a
    :class:`NoAnswer`) or that leads to the next request (:meth:`_ask_next`).
    A :class:`WireError` it raises is such a datagram too: RFC 6886 and RFC 6887
    both want those dropped, not acted on. ``give_up_after`` bounds all the
    requests together.
    """

    def __init__(self, request: bytes, intervals: Iterator[float],
                 give_up_after: float | None) -> None:
        self._exchange = Exchange(request, intervals, give_up_after)
        self._give_up_after = give_up_after
        self._deadline: float | None = None
        self._sent_before = 0  # by the requests answered already
        self._next: list[bytes] = []  # the next request's first transmission
        self._ignored: list[str] = []
        self._started: float | None = None
        self.outcome: Outcome | None = None

    @property
    def wake_at(self) -> float | None:
        return None if self.outcome is not None else self._exchange.wake_at

    @property
    def asking(self) -> bytes | None:
        """The request now being sent (None before :meth:`start`)."""
        return None if self._started is None else self._exchange.request

    def start(self, now: float) -> list[bytes]:
        self._started = now
        if self._give_up_after is not None:
            self._deadline = now + self._give_up_after
        return self._exchange.start(now)

    def timer(self, now: float) -> list[bytes]:
        if self.outcome is not None or self._started is None:
            return []
        out = self._exchange.timer(now)
        if self._exchange.gave_up:
            self.outcome = NoAnswer(self._sent_before + self._exchange.sent,
                                    now - self._started, tuple(self._ignored))
        return out

    def receive(self, data: bytes, now: float) -> list[bytes]:
        if self.outcome is not None or self._started is None:
            return []
        try:
            self.outcome = self._answer(data, now)
        except WireError as exc:
            self._ignore(str(exc))
        out, self._next = self._next, []
        return out

    def _ask_next(self, request: bytes, intervals: Iterator[float], now: float) -> None:
        """Send ``request`` next (the answer to this one called for it), within
        what is left of ``give_up_after``."""
        self._sent_before += self._exchange.sent
        remaining = None if self._deadline is None else max(0.0, self._deadline - now)
        self._exchange = Exchange(request, intervals, remaining)
        self._next = self._exchange.start(now)

    def _ignore(self, why: str) -> None:
        self._ignored.append(why)

    def _answer(self, data: bytes, now: float) -> Outcome | None:
        raise NotImplementedError
