"""Scenario 6: rendezvous capacity - memory per waiting peer and pairings per second.

One real ``nopf-server`` process on loopback; this process simulates the peers
with asyncio clients speaking the coordinated protocol
(:mod:`nopf_web.wire.rendezvous`), each bound to one of many 127.x.y.z source
addresses so the server's per-source cap (64 open connections) is respected:

- waiting sharers: up to 10,000 sharers that sent their hello, got a nameplate
  and keep answering pings; the server's RSS (``/proc/PID/status``) is read as
  they accumulate, and its CPU share while all of them wait (pings only);
- pairings per second: workers that each run sharer + connector through the
  exchange (hello, nameplate, claim, fire to both; no punch) for a fixed
  window, against seed discovery requests per second from the same workers
  (connect, 10-byte reply, close) as the baseline, alternating.
"""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.paths import stop_proc
from bench.report import Progress, ScenarioResult, Target
from bench.scn_util import (
    fmt,
    label_plot,
    median,
    new_figure,
    raise_nofile,
    rss_kib,
    save_figure,
    table,
)
from bench.secure import cpu_seconds
from nopf_web.rendezvous.server import ServerLimits
from nopf_web.wire.discovery import REPLY_SIZE
from nopf_web.wire.rendezvous import (
    ErrorReply,
    Fire,
    Hello,
    ServerMessage,
    Welcome,
)
from tests.e2e.relay_clients import Coordination
from tests.programs import argv

NAME = "rendezvous"
TITLE = "Rendezvous capacity: memory per waiting peer, pairings per second"
BUDGET_S = 60

PER_SOURCE = 50  # connections per 127.x.y.z source, under the server's cap of 64
STEP_TIMEOUT = 10.0  # s for any one protocol step of a simulated peer
WAIT_LIMIT_S = 35.0  # s of opening waiting sharers per server, to stay within the budget
HOLD_S = 5.0  # s the server's CPU is watched while every sharer waits
LO = "127.0.0.1"


class ServerProc:
    """A rendezvous server process on loopback; its stderr is drained in a thread."""

    def __init__(self) -> None:
        cmd = argv("nopf-server", "--host", "127.0.0.1", "--port", "0")
        self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.PIPE)
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline().decode()
        if "listening on" not in line:
            self.stop()
            raise RuntimeError(f"rendezvous server did not start: {line.strip()!r}")
        self.port = int(line.rsplit(":", 1)[1])
        self.log: list[str] = []
        threading.Thread(target=self._drain, daemon=True).start()

    def _drain(self) -> None:
        assert self.proc.stderr is not None
        for raw in self.proc.stderr:
            self.log = [*self.log[-20:], raw.decode(errors="replace").rstrip()]

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)

    def cpu(self) -> float:
        return cpu_seconds(self.proc.pid)

    def stop(self) -> None:
        stop_proc(self.proc, grace=10)


def source(i: int, block: int = 1) -> str:
    """The ``i``-th loopback source address of ``block`` (127.block.x.y, y in 1..250)."""
    return f"127.{block}.{i // 250}.{i % 250 + 1}"


class Peer(Coordination):
    """One simulated coordinated-mode client connection (share or join): waits as long as
    its caller lets it, takes a refusal for an error and ends with a RST."""

    async def next(self, timeout: float | None = None) -> ServerMessage:
        msg = await super().next(timeout)
        if isinstance(msg, ErrorReply):
            raise RuntimeError(f"rendezvous refused: {msg.code}: {msg.message}")
        return msg

    def close(self) -> None:
        self.writer.transport.abort()  # RST: no FIN handshake left to the server


def hello(action: str, nameplate: int | None = None) -> Hello:
    return Hello("share" if action == "share" else "join", nameplate, (), None, 10.0)


# -- waiting sharers ----------------------------------------------------------------


@dataclass
class Waiting:
    tried: int
    held: int = 0
    refused: int = 0
    idle_kib: int = 0
    samples: list[tuple[int, int]] = field(default_factory=list)  # (held, RSS KiB)
    seconds: float = 0.0  # spent opening them (settling pauses excluded)
    hold_cpu: float = float("nan")  # server CPU share while all of them wait (pings, pongs)

    @property
    def kib_per_peer(self) -> float:
        if len(self.samples) < 2 or self.held == 0:
            return float("nan")
        return (self.samples[-1][1] - self.idle_kib) / self.samples[-1][0]


async def hold_waiting(server: ServerProc, count: int, progress: Progress,
                       limit_s: float, hold_s: float) -> Waiting:
    """Open ``count`` waiting sharers in eight steps, reading the server's RSS after each;
    no new step starts after ``limit_s`` seconds (``tried`` then says how many were).
    Then the server's CPU share is watched for ``hold_s`` seconds (0: not)."""
    result = Waiting(0, idle_kib=server.rss_kib())
    result.samples.append((0, result.idle_kib))
    peers: list[Peer] = []
    keepers: list[asyncio.Task[None]] = []
    gate = asyncio.Semaphore(200)  # connection setups in flight (the server's backlog is 1024)

    async def one(i: int) -> None:
        async with gate:
            try:
                peer = await Peer.open((LO, server.port), source(i // PER_SOURCE),
                                       hello("share"))
                async with asyncio.timeout(STEP_TIMEOUT):
                    msg = await peer.next()
                if not isinstance(msg, Welcome):
                    raise RuntimeError(f"expected a nameplate, got {msg!r:.60}")
            except (OSError, RuntimeError, asyncio.IncompleteReadError, TimeoutError):
                result.refused += 1
                return
        peers.append(peer)
        keepers.append(asyncio.create_task(keep(peer)))

    async def keep(peer: Peer) -> None:
        with contextlib.suppress(OSError, RuntimeError, ConnectionError):
            await peer.next()  # answers pings until cancelled; nothing else is due

    try:
        steps = 8
        for s in range(steps):
            if result.seconds > limit_s:
                progress(f"  time limit: stopping at {result.tried} sharers tried")
                break
            lo, hi = count * s // steps, count * (s + 1) // steps
            result.tried = hi
            t0 = time.perf_counter()
            await asyncio.gather(*(one(i) for i in range(lo, hi)))
            result.seconds += time.perf_counter() - t0
            await asyncio.sleep(0.3)  # the server settles (quick pings answered)
            result.samples.append((len(peers), server.rss_kib()))
            progress(f"  {len(peers)} sharers waiting, {result.refused} refused, server RSS "
                     f"{result.samples[-1][1] / 1024:.1f} MiB")
        result.held = len(peers)
        if hold_s > 0:
            cpu0, t0 = server.cpu(), time.perf_counter()
            await asyncio.sleep(hold_s)
            result.hold_cpu = (server.cpu() - cpu0) / (time.perf_counter() - t0)
            progress(f"  server CPU while they wait: {result.hold_cpu * 100:.0f} %")
    finally:
        for task in keepers:
            task.cancel()
        await asyncio.gather(*keepers, return_exceptions=True)
        for peer in peers:
            peer.close()
    return result


# -- pairings and discoveries per second ----------------------------------------------


# Why one simulated exchange can fail under load (each is counted as an error).
FAILURES = (OSError, RuntimeError, AssertionError, asyncio.IncompleteReadError, TimeoutError)


async def for_window(window: float, workers: int, attempt: Callable[[int], Awaitable[object]],
                     first: int = 0) -> tuple[int, int]:
    """Workers ``first``... each call ``attempt(w)`` again and again for ``window`` s:
    (attempts done, attempts failed)."""
    done = errors = 0
    deadline = time.monotonic() + window

    async def worker(w: int) -> None:
        nonlocal done, errors
        while time.monotonic() < deadline:
            try:
                await attempt(w)
                done += 1
            except FAILURES:
                errors += 1

    await asyncio.gather(*(worker(w) for w in range(first, first + workers)))
    return done, errors


async def one_pair(share_port: int, join_port: int, w: int) -> float:
    """Worker ``w``'s sharer/connector exchange, the sharer through ``share_port``, the
    connector through ``join_port``: seconds from the connector's connect to both fire
    instructions in hand."""
    peers: list[Peer] = []
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            sharer = await Peer.open((LO, share_port), source(2 * w, 2), hello("share"))
            peers.append(sharer)
            welcome = await sharer.next()
            assert isinstance(welcome, Welcome), welcome
            t0 = time.perf_counter()
            joiner = await Peer.open((LO, join_port), source(2 * w + 1, 2),
                                     hello("join", welcome.nameplate))
            peers.append(joiner)
            fires = await asyncio.gather(sharer.next(), joiner.next())
            took = time.perf_counter() - t0
        if not all(isinstance(f, Fire) for f in fires):
            raise RuntimeError(f"expected two fire instructions, got {fires!r:.80}")
        return took
    finally:
        for p in peers:
            p.close()


async def discovery(port: int, w: int) -> None:
    """Worker ``w``'s seed discovery request: connect, the 10-byte reply, close."""
    async with asyncio.timeout(STEP_TIMEOUT):
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, local_addr=(source(w, 3), 0))
        await reader.readexactly(REPLY_SIZE)
    writer.close()


async def pairings(port: int, workers: int, window: float) -> tuple[int, int]:
    """Complete sharer/connector exchanges for ``window`` s: (pairs, errors)."""
    return await for_window(window, workers, lambda w: one_pair(port, port, w))


async def discoveries(port: int, workers: int, window: float) -> tuple[int, int]:
    """Seed discovery requests (connect, 10-byte reply, close) for ``window`` s."""
    return await for_window(window, workers, lambda w: discovery(port, w))


# -- the scenario ----------------------------------------------------------------------


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    peers = 1000 if quick else 10_000
    rounds, window, workers = (1, 1.5, 32) if quick else (2, 2.5, 32)
    raise_nofile(4 * peers + 1024)  # ours and, inherited, the server's
    data: dict[str, Any] = {"peers": peers, "window_s": window, "rounds": rounds,
                            "workers": workers, "per_source": PER_SOURCE}

    waits: dict[str, Waiting] = {}
    progress(f"nopf-server: {peers} waiting sharers")
    server = ServerProc()
    try:
        waits["nopf-server"] = asyncio.run(hold_waiting(
            server, peers, progress, WAIT_LIMIT_S, 1.0 if quick else HOLD_S))
    finally:
        server.stop()
    data["waiting"] = {k: {"tried": w.tried, "held": w.held, "refused": w.refused,
                           "idle_rss_kib": w.idle_kib, "samples_held_rss_kib": w.samples,
                           "open_seconds": w.seconds, "kib_per_peer": w.kib_per_peer,
                           "server_cpu_share_holding": w.hold_cpu}
                       for k, w in waits.items()}

    rates: dict[str, list[float]] = {"discovery": [], "pairing": []}
    busy: dict[str, list[float]] = {"discovery": [], "pairing": []}
    errs = {"discovery": 0, "pairing": 0}
    server = ServerProc()
    try:
        for r in range(rounds):
            for kind, fn in (("discovery", discoveries), ("pairing", pairings)):
                progress(f"round {r + 1}/{rounds}: {kind} for {window:g} s, {workers} workers")
                cpu0, t0 = server.cpu(), time.perf_counter()
                count, errors = asyncio.run(fn(server.port, workers, window))
                elapsed = time.perf_counter() - t0
                rates[kind].append(count / elapsed)
                busy[kind].append((server.cpu() - cpu0) / elapsed)
                errs[kind] += errors
                progress(f"  {count / elapsed:.0f}/s, {errors} errors, server CPU "
                         f"{busy[kind][-1] * 100:.0f} %")
                time.sleep(0.3)  # closes drain before the next window
    finally:
        server.stop()
    data["rates_per_s"] = rates
    data["server_cpu_share"] = busy
    data["errors"] = errs

    pair_rate, disc_rate = median(rates["pairing"]), median(rates["discovery"])
    stock = waits["nopf-server"]
    rows = [[f"{label}", w.tried, w.held, w.refused, fmt(w.idle_kib / 1024, ".1f"),
             fmt(w.samples[-1][1] / 1024, ".1f"), fmt(w.kib_per_peer, ".1f"),
             fmt(w.held / w.seconds if w.seconds else float("nan")),
             fmt(w.hold_cpu * 100, ".0f", " %")]
            for label, w in waits.items()]
    md = [
        f"One rendezvous process on loopback; up to {peers:,} simulated sharers (asyncio, "
        f"{PER_SOURCE} per 127.x.y.z source address, answering pings) send their hello, "
        "get a nameplate and wait. Server RSS from `/proc/PID/status`; \"registered/s\" is "
        "how fast they got their nameplates (200 connection setups in flight); the last "
        f"column is the server's CPU share over {HOLD_S:g} s once all wait (it pings each "
        f"waiting sharer every {ServerLimits().ping_interval:g} s).",
        "",
        table(["server", "sharers tried", "held waiting", "refused", "idle RSS MiB",
               "RSS MiB, all held", "KiB per waiting peer", "registered/s",
               "server CPU, all waiting"], rows),
        "",
        f"`nopf-server` with its defaults (`--max-connections "
        f"{ServerLimits().max_connections}`) held {stock.held:,} of {stock.tried:,} "
        "sharers tried" + (", the rest were reset at once." if stock.refused else "."),

        "",
        f"Throughput, {workers} concurrent workers, {rounds} alternating {window:g}-s windows "
        "each (median); one pairing = sharer hello → nameplate → connector hello → fire to "
        "both (no punch); the baseline is the seed discovery (connect, 10-byte reply, close) "
        "from the same workers:",
        "",
        table(["exchange", "per second (median)", "ratio to discovery", "errors",
               "server CPU"],
              [["seed discovery", fmt(disc_rate), "1.00", errs["discovery"],
                fmt(median(busy["discovery"]) * 100, ".0f", " %")],
               ["coordinated pairing", fmt(pair_rate), fmt(pair_rate / disc_rate, ".2f"),
                errs["pairing"], fmt(median(busy["pairing"]) * 100, ".0f", " %")]]),
        "",
        "A server CPU share under 100 % means the simulated clients (one Python process "
        "on the other core) were the limit, so the server's capacity is at least this.",
    ]

    fig, ax = new_figure()
    for label, w in waits.items():
        ax.plot([h for h, _ in w.samples], [k / 1024 for _, k in w.samples], marker="o",
                label=label)
    label_plot(ax, "waiting sharers held", "server RSS (MiB)",
               "Rendezvous memory vs waiting peers")
    plot = save_figure(fig, outdir / "rendezvous_memory.png")

    targets = [Target(
        f"{peers:,} waiting peers on one server",
        f"hold {peers:,} simulated peers (issue 7)",
        f"{stock.held:,} of {stock.tried:,} held by nopf-server, "
        f"{fmt(stock.kib_per_peer, '.1f')} KiB each",
        stock.held >= peers)]
    return ScenarioResult(NAME, TITLE, data, "\n".join(md), [plot], targets)


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
