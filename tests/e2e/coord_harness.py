"""Run coordinated-mode peers in-process, each in a thread entered into a lab host.

Every peer runs its own asyncio loop in its own thread (a thread's network
namespace is fixed once entered), so sockets it creates live in that host.
"""

from __future__ import annotations

import asyncio
import os
import queue
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Any, TypeVar

from nopf_web.sessions.candidates import direct_candidates
from nopf_web.sessions.coordination import PairedTunnel, PakeFactory, connect, share
from tests.lab import Host

T = TypeVar("T")
RDV = ("198.51.100.2", 3012)


class _Runner(threading.Thread):
    """Run one coroutine in ``host``; keep its result or exception."""

    def __init__(self, host: Host, make: Callable[[], Coroutine[Any, Any, T]], name: str) -> None:
        super().__init__(name=name, daemon=True)
        self.host = host
        self.make = make
        self.result: Any = None
        self.error: BaseException | None = None
        self.finished_at = 0.0

    def run(self) -> None:
        try:
            with self.host.enter():
                self.result = asyncio.run(self.make())
        except BaseException as exc:  # reported to the test
            self.error = exc
        self.finished_at = time.monotonic()


@dataclass(frozen=True)
class Gather:
    """What one side offers (:func:`~nopf_web.sessions.candidates.direct_candidates`)."""

    ipv6: bool = True
    port_mapping: bool = False


@dataclass
class PairOutcome:
    sharer: PairedTunnel | None
    joiner: PairedTunnel | None
    sharer_error: BaseException | None
    joiner_error: BaseException | None
    ready_at: float  # connect() called while the sharer waits with its code
    up_at: float  # both sides returned

    @property
    def ok(self) -> bool:
        return self.sharer is not None and self.joiner is not None

    @property
    def errors(self) -> list[str]:
        return [f"{type(e).__name__}: {e}" for e in (self.sharer_error, self.joiner_error)
                if e is not None]

    def close(self) -> None:
        for t in (self.sharer, self.joiner):
            if t is not None:
                t.sock.close()


def pair(sharer: Host, joiner: Host, *, punch_timeout: float = 10, rdv: tuple[str, int] = RDV,
         code_timeout: float = 10, wait: float = 40,
         on_event: Callable[[str, str], None] | None = None,
         pakes: tuple[PakeFactory, PakeFactory] | None = None,
         candidates: tuple[Gather, Gather] | None = None,
         joiner_rdv: tuple[str, int] | None = None) -> PairOutcome:
    """Share from ``sharer``, connect from ``joiner`` once the code is out; wait for both.

    ``on_event(side, message)`` gets each side's progress messages ("sharer"/"joiner").
    ``pakes``: the sharer's and the joiner's SPAKE2 factories (see ``coord.share``).
    ``candidates``: each side gathers its direct candidates as its :class:`Gather` says
    and offers them (None: neither offers any, the hellos as before). ``joiner_rdv``:
    the rendezvous as the joiner reaches it (default ``rdv``; e.g. its IPv6 address for
    a host with IPv6 only).
    """
    to_rdv = joiner_rdv or rdv
    sharer_pake, joiner_pake = pakes or (None, None)
    codes: queue.Queue[str] = queue.Queue()

    def sink(side: str) -> Callable[[str], None] | None:
        return None if on_event is None else (lambda message: on_event(side, message))

    async def sharing() -> PairedTunnel:
        if candidates is None:
            return await share(rdv, on_code=codes.put, punch_timeout=punch_timeout,
                               on_event=sink("sharer"), pake=sharer_pake)
        async with direct_candidates(ipv6=candidates[0].ipv6,
                                     port_mapping=candidates[0].port_mapping,
                                     on_event=sink("sharer")) as mine:
            return await share(rdv, on_code=codes.put, punch_timeout=punch_timeout,
                               on_event=sink("sharer"), pake=sharer_pake, candidates=mine)

    async def joining(code: str) -> PairedTunnel:
        if candidates is None:
            return await connect(to_rdv, code, punch_timeout=punch_timeout,
                                 on_event=sink("joiner"), pake=joiner_pake)
        async with direct_candidates(ipv6=candidates[1].ipv6,
                                     port_mapping=candidates[1].port_mapping,
                                     on_event=sink("joiner")) as mine:
            return await connect(to_rdv, code, punch_timeout=punch_timeout,
                                 on_event=sink("joiner"), pake=joiner_pake, candidates=mine)

    a = _Runner(sharer, sharing, "coord-sharer")
    a.start()
    try:
        code = codes.get(timeout=code_timeout)
    except queue.Empty:
        a.join(wait)
        raise AssertionError(f"no code from the sharer: {a.error!r}") from None
    ready = time.monotonic()
    b = _Runner(joiner, lambda: joining(code), "coord-joiner")
    b.start()
    a.join(wait)
    b.join(wait)
    assert not a.is_alive() and not b.is_alive(), "peers still running"
    return PairOutcome(a.result, b.result, a.error, b.error, ready,
                       max(a.finished_at, b.finished_at))


def exchange(x: PairedTunnel, y: PairedTunnel, size: int = 1 << 16) -> None:
    """Random bytes both ways at once, compared; the sockets are left open."""
    data = {id(x): os.urandom(size), id(y): os.urandom(size)}
    got: dict[int, bytes] = {}

    def pump(me: PairedTunnel, other: PairedTunnel) -> None:
        s = me.sock.dup()
        s.setblocking(True)
        s.settimeout(10)
        sender = threading.Thread(target=s.sendall, args=(data[id(me)],), daemon=True)
        sender.start()
        buf = b""
        while len(buf) < size:
            chunk = s.recv(size - len(buf))
            assert chunk, "peer closed early"
            buf += chunk
        got[id(me)] = buf
        sender.join(10)  # before closing the descriptor it sends on
        s.close()

    threads = [threading.Thread(target=pump, args=(x, y)),
               threading.Thread(target=pump, args=(y, x))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    ends = [(t.role, t.sock.getsockname(), t.sock.getpeername()) for t in (x, y)]
    assert got.get(id(x)) == data[id(y)] and got.get(id(y)) == data[id(x)], (
        f"data mismatch: {len(got.get(id(x), b''))} and {len(got.get(id(y), b''))} bytes "
        f"received; ends {ends}")


def handshake_rtt(host: Host, addr: tuple[str, int], samples: int = 5) -> float:
    """Median TCP connect time from ``host`` to ``addr``: one round trip."""
    times = []
    with host.enter():
        for _ in range(samples):
            t0 = time.monotonic()
            s = socket.create_connection(addr, timeout=5)
            times.append(time.monotonic() - t0)
            s.close()
            time.sleep(0.05)
    return sorted(times)[len(times) // 2]
