"""Happy Eyeballs (RFC 8305) as a pure machine: which address to try, and when.

A host name may resolve to several addresses of both families. Trying them one
after the other makes a broken first address cost a whole connect timeout;
trying them all at once floods the network. RFC 8305 does neither:

- **Order** (§4): the addresses as the resolver sorted them, interleaved by
  family starting with IPv6 (the First Address Family Count is 1): v6, v4, v6,
  v4... Duplicates are dropped. A caller with a reason to prefer IPv4 (the
  coordinated peer: see :func:`nopf_web.rendezvous.client.coordinated_first`)
  starts with IPv4 instead (``first=4``), and may try several of it before the
  other family (``first_count``), as §4 allows.
- **Stagger** (§5): start the first attempt; start the next one when the
  previous attempt failed or ``CONNECTION_ATTEMPT_DELAY`` (250 ms) passed
  without a connection, whichever comes first. Attempts already started keep
  running.
- **Winner**: the first attempt that connects; every other is cancelled.
- **Failure**: when every address was tried and every attempt failed; the
  error lists each address with its reason.

No sockets, no clock: events carry ``now``, actions say what to start or
cancel. The asyncio driver is :mod:`nopf_web.happy_eyeballs`.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

from nopf_web.wire.address import Endpoint

CONNECTION_ATTEMPT_DELAY = 0.25  # s (RFC 8305 §5: recommended 250 ms, at least 100 ms)


def is_ipv6(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).version == 6
    except ValueError:
        return ":" in host


Family = Literal[4, 6]


def interleave(addresses: Iterable[tuple[str, int]], first: Family = 6,
               first_count: int = 1) -> list[tuple[str, int]]:
    """RFC 8305 §4: the resolver's order, ``first_count`` addresses of the ``first``
    family (IPv6 unless told; the First Address Family Count), then the families
    alternating, the other one first."""
    unique = list(dict.fromkeys(addresses))
    v6 = [a for a in unique if is_ipv6(a[0])]
    v4 = [a for a in unique if not is_ipv6(a[0])]
    lead, other = (v6, v4) if first == 6 else (v4, v6)
    count = max(1, first_count)
    out, lead = lead[:count], lead[count:]
    for i in range(max(len(lead), len(other))):
        out += other[i:i + 1] + lead[i:i + 1]
    return out


@dataclass(frozen=True)
class StartAttempt:
    """Connect to ``addresses[index]``; report :meth:`HappyEyeballs.connected` or
    :meth:`HappyEyeballs.failed` with the index."""

    index: int
    address: tuple[str, int]


@dataclass(frozen=True)
class CancelAttempt:
    """Another attempt won: close this one's socket."""

    index: int


@dataclass(frozen=True)
class Won:
    index: int
    address: tuple[str, int]


@dataclass(frozen=True)
class AllFailed:
    """Every address failed: ``reasons`` pairs each with its one-line error."""

    reasons: tuple[tuple[tuple[str, int], str], ...]

    @property
    def message(self) -> str:
        return "; ".join(f"{Endpoint(*a)}: {why}" for a, why in self.reasons)


Action = StartAttempt | CancelAttempt | Won | AllFailed


@dataclass
class HappyEyeballs:
    """Feed events, carry out the actions in order; :attr:`wake_at` is the next
    instant :meth:`timer` must be called."""

    addresses: Sequence[tuple[str, int]]
    delay: float = CONNECTION_ATTEMPT_DELAY
    first: Family = 6  # the family tried first (RFC 8305 §4: IPv6, unless preferred)
    first_count: int = 1  # its addresses tried before the other family's first
    done: bool = False
    wake_at: float | None = None
    _next: int = 0
    _running: set[int] = field(default_factory=set)
    _reasons: dict[int, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.addresses = interleave(self.addresses, self.first, self.first_count)
        if not self.addresses:
            raise ValueError("no address to connect to")

    def start(self, now: float) -> list[Action]:
        return self._start_next(now)

    def timer(self, now: float) -> list[Action]:
        if self.done or self.wake_at is None or now < self.wake_at:
            return []
        return self._start_next(now)

    def connected(self, index: int, now: float) -> list[Action]:
        if self.done or index not in self._running:
            return []
        self._running.discard(index)
        self.done, self.wake_at = True, None
        actions: list[Action] = [CancelAttempt(i) for i in sorted(self._running)]
        self._running.clear()
        return [*actions, Won(index, self.addresses[index])]

    def failed(self, index: int, reason: str, now: float) -> list[Action]:
        if self.done or index not in self._running:
            return []
        self._running.discard(index)
        self._reasons[index] = reason
        if self._next < len(self.addresses):
            return self._start_next(now)  # a failure starts the next one at once (§5)
        if self._running:
            return []
        self.done, self.wake_at = True, None
        return [AllFailed(tuple((self.addresses[i], self._reasons[i])
                                for i in sorted(self._reasons)))]

    def _start_next(self, now: float) -> list[Action]:
        index = self._next
        if index >= len(self.addresses):
            self.wake_at = None
            return []
        self._next += 1
        self._running.add(index)
        self.wake_at = now + self.delay if self._next < len(self.addresses) else None
        return [StartAttempt(index, self.addresses[index])]
