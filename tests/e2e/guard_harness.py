"""Run real punches between two lab hosts, with or without the packet guard.

Shared by ``tests/e2e/test_guard_lab.py`` and ``bench/guard_matrix.py``.

Each side is a thread that moves into its host's network namespace and runs
what ``nopf``'s session runs there: discovery against the rendezvous (the
second, symmetric-NAT probe inside a guard window), then
:class:`~nopf_web.punch.driver.PunchDriver` inside a guard window on the
punch port, then one byte each way through the tunnel and a normal close
(after the window). The guard is the real
:class:`~nopf_web.guard.service.DivertGuard`; its receive threads start from
the side's thread and so live in the host's namespace too.

:class:`NatCounters` adds an nftables table of counters to a NAT namespace:
what the inside host sent towards the internet, counted where it enters the
NAT from the LAN (before the NAT's own filter can drop it) - the packet-level
evidence of what left the host.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

from nopf_web.guard.base import Guard, NullGuard
from nopf_web.guard.service import DivertGuard
from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import PunchConfig, PunchTimeout, Tactic
from nopf_web.rendezvous.client import discover, probe_mapping
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.sockets import connect_nonblocking, reusable_socket, start_connect
from tests.lab.topology import Host, Lab

RDV_PORT = 3012


# --------------------------------------------------------------------------- rendezvous


@contextlib.contextmanager
def rendezvous(host: Host, port: int = RDV_PORT) -> Iterator[tuple[str, int]]:
    """nopf's rendezvous server, in a thread inside ``host``'s namespace."""
    ready = threading.Event()
    stop: list[asyncio.AbstractEventLoop] = []
    failure: list[BaseException] = []

    async def serve() -> None:
        server = RendezvousServer("0.0.0.0", port)
        await server.start()
        stop.append(asyncio.get_running_loop())
        ready.set()
        try:
            await asyncio.Future()
        finally:
            await server.close()

    def main() -> None:
        with host.enter():
            try:
                asyncio.run(serve())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:
                failure.append(exc)
                ready.set()

    thread = threading.Thread(target=main, name="rendezvous", daemon=True)
    thread.start()
    if not ready.wait(10) or failure:
        raise RuntimeError(f"rendezvous did not start: {failure}")
    try:
        yield host.ip, port
    finally:
        loop = stop[0]

        def cancel_all() -> None:
            for task in asyncio.all_tasks(loop):
                task.cancel()

        loop.call_soon_threadsafe(cancel_all)
        thread.join(10)


# --------------------------------------------------------------------------- NAT counters


class NatCounters:
    """nftables counters in a NAT namespace, on packets arriving from its LAN.

    Every rule is ``<match> counter comment "<name>"`` in a forward-hook chain
    at priority -200 (before conntrack's NAT and the NAT's filter), so it
    counts what the inside host put on the wire.
    """

    def __init__(self, nat: Host, rules: dict[str, str]) -> None:
        self.nat = nat
        self.table = f"guardcount_{secrets.token_hex(3)}"
        self.rules = rules

    def __enter__(self) -> NatCounters:
        lines = [f"table ip {self.table} {{",
                 "  chain counting {",
                 "    type filter hook forward priority -200; policy accept;"]
        for name, match in self.rules.items():
            lines.append(f'    iifname "lan" {match} counter comment "{name}"')
        lines += ["  }", "}"]
        self._nft(["-f", "-"], "\n".join(lines) + "\n")
        return self

    def __exit__(self, *exc: object) -> None:
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            self._nft(["delete", "table", "ip", self.table])

    def read(self) -> dict[str, int]:
        out = self._nft(["-j", "list", "table", "ip", self.table])
        counts: dict[str, int] = {}
        for item in json.loads(out)["nftables"]:
            rule = item.get("rule")
            if not rule:
                continue
            packets = next((e["counter"]["packets"] for e in rule["expr"] if "counter" in e), 0)
            counts[str(rule.get("comment", ""))] = int(packets)
        return counts

    def _nft(self, args: list[str], stdin: str | None = None) -> str:
        proc = subprocess.run(self.nat.command(["nft", *args]), input=stdin, text=True,
                              capture_output=True, timeout=20, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"nft {' '.join(args)} in {self.nat.ns}: {proc.stderr.strip()}")
        return proc.stdout


def close_rules(src_ip: str, sport: int | None = None, not_dst: str | None = None
                ) -> dict[str, str]:
    """Counter rules for RST, FIN+ACK and SYN segments from ``src_ip``.

    ``sport`` limits them to one source port, ``not_dst`` leaves out one
    destination (e.g. the rendezvous, to count only what goes to the peer).
    """
    base = f"ip saddr {src_ip}"
    if not_dst is not None:
        base += f" ip daddr != {not_dst}"
    base += " meta l4proto tcp"
    if sport is not None:
        base += f" tcp sport {sport}"
    return {
        "rst": f"{base} tcp flags & rst == rst",
        "finack": f"{base} tcp flags & (fin | ack) == fin | ack",
        "syn": f"{base} tcp flags & (syn | ack) == syn",
    }


# --------------------------------------------------------------------------- one punch


@dataclass(frozen=True)
class Side:
    """One peer: where it runs, its role, whether it is guarded, when it fires."""

    host: Host
    role: Tactic
    guard: bool
    delay: float = 0.0  # seconds after both learned the other's address
    config: PunchConfig = field(default_factory=PunchConfig)
    strategy: str = "nopf"  # "nopf": PunchDriver; "seed": the seed's one-shot sequence


@dataclass
class SideResult:
    ok: bool = False
    error: str | None = None
    seconds: float | None = None  # punch start to connected
    attempts: int = 0
    outcomes: dict[str, int] = field(default_factory=dict)
    punch_port: int = 0
    public: tuple[str, int] | None = None
    dropped_discovery: int = 0
    dropped_punch: int = 0
    guarded: bool = False
    guard_error: str | None = None
    echoed: bool = False  # a byte went each way through the tunnel
    closed_cleanly: bool = False  # the peer's FIN arrived after our close


@dataclass
class PairResult:
    server: SideResult
    client: SideResult

    @property
    def ok(self) -> bool:
        return self.server.ok and self.client.ok and self.server.echoed and self.client.echoed

    @property
    def dropped(self) -> int:
        return sum(s.dropped_discovery + s.dropped_punch for s in (self.server, self.client))


class _Exchange:
    """The two sides swap public addresses, like users pasting them to each other."""

    def __init__(self) -> None:
        self.barrier = threading.Barrier(2, timeout=30)
        self.public: dict[str, tuple[str, int]] = {}
        self.t0 = 0.0
        self.connected = threading.Barrier(2, timeout=120)

    def swap(self, me: str, other: str, public: tuple[str, int]) -> tuple[tuple[str, int], float]:
        self.public[me] = public
        if self.barrier.wait() == 0:
            self.t0 = time.monotonic() + 0.3  # common clock: both fire relative to this
        self.barrier.wait()
        return self.public[other], self.t0


async def _run_side(side: Side, me: str, other: str, rdv: tuple[str, int], ex: _Exchange,
                    guard: Guard, result: SideResult) -> None:
    # As Session does: a first discovery, then a second one from the same port
    # (the symmetric-NAT probe) whose close happens under the guard.
    found = await discover(rdv, 0, timeout=5)
    async with guard.protect(found.local_port, rdv) as window:
        await probe_mapping(rdv, found, timeout=5)
    result.dropped_discovery = window.dropped
    result.punch_port = found.local_port
    result.public = (found.public.host, found.public.port)
    loop = asyncio.get_running_loop()
    peer, t0 = await loop.run_in_executor(None, ex.swap, me, other, result.public)

    def count(attempt: int, ttl: int | None) -> None:
        result.attempts = attempt

    tunnel: socket.socket | None = None
    async with guard.protect(found.local_port, peer) as window:
        result.guarded = window.guarded
        result.guard_error = window.error
        await asyncio.sleep(max(0.0, t0 + side.delay - time.monotonic()))
        start = time.monotonic()
        try:
            if side.strategy == "seed":
                tunnel = await _seed_punch(side, found.local_port, peer)
            else:
                driver = PunchDriver(("0.0.0.0", found.local_port), peer, side.role,
                                     side.config, on_attempt=count)
                tunnel = await driver.run()
        except PunchTimeout as exc:
            result.error = str(exc)
            result.outcomes = {k.value: v for k, v in exc.outcomes.items()}
        except (OSError, TimeoutError) as exc:
            result.error = f"{type(exc).__name__}: {exc}"
        else:
            result.ok = True
            result.seconds = time.monotonic() - start
    result.dropped_punch = window.dropped
    # Both sides hold their tunnel until both punches ended: a side that
    # succeeded must not close while the other is still punching.
    await loop.run_in_executor(None, ex.connected.wait)
    try:
        if tunnel is not None:
            tunnel.setblocking(False)
            await loop.sock_sendall(tunnel, me.encode()[:1])
            got = await asyncio.wait_for(loop.sock_recv(tunnel, 1), 5)
            result.echoed = got == other.encode()[:1]
    except (OSError, TimeoutError) as exc:
        result.error = f"tunnel check failed: {exc!r}"
    await loop.run_in_executor(None, ex.connected.wait)
    if tunnel is None:
        return
    try:
        tunnel.shutdown(socket.SHUT_WR)  # our FIN, outside every guard window
        rest = await asyncio.wait_for(loop.sock_recv(tunnel, 1), 5)
        result.closed_cleanly = rest == b""
    except (OSError, TimeoutError) as exc:
        result.error = result.error or f"tunnel close failed: {exc!r}"
    finally:
        tunnel.close()


async def _seed_punch(side: Side, port: int, peer: tuple[str, int]) -> socket.socket:
    """The seed's sequence, written from its description (one shot, no retries).

    Server: a SYN from the punch port, that socket abandoned (closed: on Linux
    a socket in SYN_SENT closes without a packet), then a listener on the same
    port accepts the peer. Client: one connect from the punch port, with only
    the kernel's SYN retransmissions, until the timeout.
    """
    loop = asyncio.get_running_loop()
    timeout = side.config.timeout
    if side.role is Tactic.ARM:
        first = reusable_socket("0.0.0.0", port)
        try:
            start_connect(first, peer)
        finally:
            first.close()
        listener = reusable_socket("0.0.0.0", port)
        listener.listen(4)
        try:
            conn, _ = await asyncio.wait_for(loop.sock_accept(listener), timeout)
        finally:
            listener.close()
        return conn
    sock = reusable_socket("0.0.0.0", port)
    try:
        await asyncio.wait_for(connect_nonblocking(sock, peer), timeout)
    except BaseException:
        sock.close()
        raise
    return sock


def _side_thread(side: Side, me: str, other: str, rdv: tuple[str, int], ex: _Exchange,
                 result: SideResult) -> None:
    with side.host.enter():
        guard: Guard = DivertGuard() if side.guard else NullGuard("off for this run")
        guard.start()
        try:
            asyncio.run(_run_side(side, me, other, rdv, ex, guard, result))
        except BaseException as exc:
            result.error = result.error or f"side crashed: {exc!r}"
            ex.barrier.abort()
            ex.connected.abort()
        finally:
            guard.stop()


def punch_pair(server: Side, client: Side, rdv: tuple[str, int]) -> PairResult:
    """Run one punch between ``server`` (seed server role) and ``client``; wait for both."""
    ex = _Exchange()
    results = PairResult(SideResult(), SideResult())
    threads = [
        threading.Thread(target=_side_thread, args=(server, "server", "client", rdv, ex,
                                                    results.server), daemon=True),
        threading.Thread(target=_side_thread, args=(client, "client", "server", rdv, ex,
                                                    results.client), daemon=True),
    ]
    for t in threads:
        t.start()
    limit = max(server.config.timeout, client.config.timeout) + 60
    for t in threads:
        t.join(limit)
    if any(t.is_alive() for t in threads):
        raise RuntimeError("a punch side did not finish")
    return results


def summarize(results: list[PairResult]) -> dict[str, float | int | None]:
    ok = [r for r in results if r.ok]
    times = sorted(max(r.server.seconds or 0.0, r.client.seconds or 0.0) for r in ok)
    return {
        "runs": len(results),
        "ok": len(ok),
        "median_s": times[len(times) // 2] if times else None,
        "dropped": sum(r.dropped for r in results),
    }


__all__ = [
    "RDV_PORT",
    "Lab",
    "NatCounters",
    "PairResult",
    "Side",
    "SideResult",
    "close_rules",
    "punch_pair",
    "rendezvous",
    "summarize",
]
