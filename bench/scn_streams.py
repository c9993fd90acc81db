"""Scenario 2: many concurrent streams through the encrypted tunnel vs direct TCP.

A lab with no NAT on either side (so a direct path exists) and the real
programs: ``nopf-server`` on rdv, ``nopf share -p 3000`` in a1 in front of an
echo service, ``nopf connect CODE -p 3010`` in b1. For N = 1, 10, 100, 1,000
concurrent connections from b1, each echoes its share of random bytes and
checks what comes back by SHA-256; the baseline is the same N connections
direct from b1 to the echo service in a1 across the lab, alternating rounds.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.report import Progress, ScenarioResult, Target
from bench.scn_util import fmt, median, new_figure, raise_nofile, save_figure, table
from tests.e2e.peers import Peer, start_coordinated, start_rendezvous
from tests.lab import Host, Lab

NAME = "streams"
TITLE = "Many concurrent streams through the encrypted tunnel"
BUDGET_S = 60

SERVICE_PORT = 3000
LOCAL_PORT = 3010
BATCH_TIMEOUT = 60.0  # s for one batch of N streams

# The echo service, a process of its own (like a real service): asyncio, a deep
# backlog for 1,000 simultaneous connections. Arguments: host, port (0: any); it
# prints the port it listens on. The soak scenario runs it too.
ECHO = """
import asyncio, resource, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))

async def echo(reader, writer):
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def main():
    server = await asyncio.start_server(echo, sys.argv[1], int(sys.argv[2]), backlog=4096)
    print(server.sockets[0].getsockname()[1], flush=True)
    await server.serve_forever()

asyncio.run(main())
"""


# The kernel's TCP counters that explain a reset stream (nstat, per namespace): a
# local listener's accept queue that overflowed (the connections the kernel could
# not queue are reset: 93-118 of 1,000 with a backlog of 128), or RSTs sent.
COUNTERS = ("TcpExtListenOverflows", "TcpExtListenDrops", "TcpExtSyncookiesSent",
            "TcpOutRsts", "TcpEstabResets")


def counters(host: Host) -> dict[str, int]:
    """The :data:`COUNTERS` of ``host``'s namespace now."""
    out = host.run(["nstat", "-az", *COUNTERS], check=False).stdout.decode()
    values = {}
    for line in out.splitlines():
        cols = line.split()
        if len(cols) >= 2 and cols[0] in COUNTERS and cols[1].isascii() and cols[1].isdigit():
            values[cols[0]] = int(cols[1])
    return values


@dataclass
class Batch:
    streams: int
    seconds: float
    bytes_each: int
    errors: int
    first_error: str = ""
    kernel: dict[str, dict[str, int]] = field(default_factory=dict)  # host -> counter rises

    @property
    def mb_s(self) -> float:
        return self.streams * self.bytes_each / self.seconds / 1e6


async def batch(addr: tuple[str, int], count: int, size: int) -> Batch:
    """``count`` concurrent connections to ``addr``, each echoing ``size`` random bytes."""
    failures: list[str] = []
    # Made before the clock starts: the batch measures the path, not the generator.
    payloads = [os.urandom(size) for _ in range(count)]
    digests = [hashlib.sha256(p).digest() for p in payloads]

    async def one(i: int) -> None:
        data = payloads[i]
        try:
            reader, writer = await asyncio.open_connection(*addr, limit=1 << 20)
            try:
                async def send() -> None:
                    for off in range(0, size, 1 << 18):
                        writer.write(data[off:off + (1 << 18)])
                        await writer.drain()
                    writer.write_eof()

                sender = asyncio.create_task(send())
                got = hashlib.sha256()
                received = 0
                try:
                    while chunk := await reader.read(1 << 18):
                        got.update(chunk)
                        received += len(chunk)
                    await sender
                finally:
                    sender.cancel()
                    with contextlib.suppress(asyncio.CancelledError, OSError):
                        await sender
                if got.digest() != digests[i]:
                    failures.append(f"stream {i}: {received} of {size} bytes, hash differs")
            finally:
                writer.close()
        except OSError as exc:
            failures.append(f"stream {i}: {exc}")

    t0 = time.perf_counter()
    tasks = [asyncio.create_task(one(i)) for i in range(count)]
    _, pending = await asyncio.wait(tasks, timeout=BATCH_TIMEOUT)
    for t in pending:
        t.cancel()
    elapsed = time.perf_counter() - t0
    if pending:
        failures += [f"{len(pending)} streams unfinished after {BATCH_TIMEOUT:g} s"] * len(pending)
    return Batch(count, elapsed, size, len(failures), failures[0] if failures else "")


def in_host(host: Host, coro_fn: Any, *args: Any) -> Batch:
    """Run ``coro_fn(*args)`` on a fresh event loop in a thread entered into ``host``."""
    out: list[Batch] = []
    errors: list[BaseException] = []

    def body() -> None:
        try:
            with host.enter():
                out.append(asyncio.run(coro_fn(*args)))
        except BaseException as exc:  # re-raised in the caller
            errors.append(exc)

    t = threading.Thread(target=body, name=f"streams-{host.name}", daemon=True)
    t.start()
    t.join(BATCH_TIMEOUT + 30)
    if errors:
        raise errors[0]
    if not out:
        raise RuntimeError(f"stream batch in {host.name} did not finish within "
                           f"{BATCH_TIMEOUT + 30:g} s")
    return out[0]


def start_tunnel(lab: Lab) -> tuple[Peer, Peer]:
    """``nopf share`` in a1 and ``nopf connect`` in b1; returns once both are up."""
    procs: list[Peer] = []
    for host, args in ((lab.a1, ["share", "-p", str(SERVICE_PORT)]), (lab.b1, None)):
        if args is None:
            code = procs[0].line(15)
            if not code:
                raise RuntimeError(f"nopf share printed no code: {procs[0].stderr()}")
            args = ["connect", code, "-p", str(LOCAL_PORT)]
        procs.append(start_coordinated(host, *args, keepalive=None))
    deadline = time.monotonic() + 30
    for peer in procs:
        while "encrypted tunnel to" not in peer.stderr():
            if peer.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"nopf {peer.role}: no tunnel within 30 s: {peer.stderr()}")
            time.sleep(0.05)
    return procs[0], procs[1]


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    counts = (1, 10, 100, 1000)
    total = (4 if quick else 64) * 1_000_000  # bytes echoed per batch, split over the streams
    rounds = 1 if quick else 3
    raise_nofile(8192)  # 1,000 client sockets, plus the asyncio loop's own
    data: dict[str, Any] = {"counts": counts, "bytes_per_batch": total, "rounds": rounds}
    runs: dict[str, dict[int, list[Batch]]] = {"direct": {}, "tunnel": {}}
    with Lab("none", "none") as lab:
        start_rendezvous(lab)
        echo = lab.a1.popen([sys.executable, "-c", ECHO, "0.0.0.0", str(SERVICE_PORT)],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        assert echo.stdout is not None
        if echo.stdout.readline().strip() != str(SERVICE_PORT).encode():
            raise RuntimeError("the echo service in a1 did not start")
        progress("nopf share in a1, nopf connect in b1")
        ends = start_tunnel(lab)
        paths = {"direct": (lab.a1.ip, SERVICE_PORT), "tunnel": ("127.0.0.1", LOCAL_PORT)}
        for n in counts:
            size = max(16 * 1024, total // n)
            for r in range(rounds):
                for path, addr in paths.items():
                    hosts = {"a1": lab.a1, "b1": lab.b1}
                    before = {name: counters(h) for name, h in hosts.items()}
                    b = in_host(lab.b1, batch, addr, n, size)
                    for name, h in hosts.items():
                        was = before[name]
                        b.kernel[name] = {k: v - was.get(k, 0) for k, v in counters(h).items()
                                          if v != was.get(k, 0)}
                    runs[path].setdefault(n, []).append(b)
                    progress(f"{n} streams x {size // 1024} KiB, round {r + 1}/{rounds}, "
                             f"{path}: {b.mb_s:.1f} MB/s, {b.errors} errors")
        # What the tunnel ends said about streams they reset (the cause of tunnel errors).
        said = [f"nopf {p.role}: {line.strip()}" for p in ends for line in p.stderr().splitlines()
                if "reset" in line.lower() or "error" in line.lower()]
    data["runs"] = {path: {n: [{"seconds": b.seconds, "bytes_each": b.bytes_each,
                                "errors": b.errors, "first_error": b.first_error,
                                "mb_s": b.mb_s, "kernel": b.kernel} for b in bs]
                           for n, bs in per.items()}
                    for path, per in runs.items()}

    rows = []
    med: dict[str, list[float]] = {"direct": [], "tunnel": []}
    errors: dict[str, int] = {"direct": 0, "tunnel": 0}
    for n in counts:
        d = median([b.mb_s for b in runs["direct"][n]])
        t = median([b.mb_s for b in runs["tunnel"][n]])
        med["direct"].append(d)
        med["tunnel"].append(t)
        ed = sum(b.errors for b in runs["direct"][n])
        et = sum(b.errors for b in runs["tunnel"][n])
        errors["direct"] += ed
        errors["tunnel"] += et
        rows.append([f"{n:,}", f"{runs['tunnel'][n][0].bytes_each // 1024:,} KiB",
                     fmt(d, ".1f"), fmt(t, ".1f"), fmt(t / d, ".2f"),
                     f"{ed}/{n * rounds}", f"{et}/{n * rounds}"])
    data["median_mb_s"] = med
    data["tunnel_end_messages"] = said[:50]
    first = next((b.first_error for per in runs.values() for bs in per.values() for b in bs
                  if b.first_error), "")
    md = [
        "Lab with no NAT on either side; `nopf share` (a1) and `nopf connect` (b1) as real "
        "processes paired through `nopf-server` on rdv, in front of an asyncio echo service "
        "in a1. N connections from b1 open at once, each sends its share of "
        f"{total / 1e6:g} MB of random bytes, reads the echo back and compares SHA-256. "
        "Throughput = bytes echoed / wall time of the batch (every byte crosses the "
        f"tunnel twice). Baseline: the same N connections from b1 straight to the echo "
        f"service across the lab, alternating; median of {rounds} round(s).",
        "",
        table(["streams", "per stream", "direct MB/s", "tunnel MB/s", "ratio",
               "direct errors", "tunnel errors"], rows),
    ]
    if first:
        md += ["", f"First error seen by the application: `{first[:200]}`"]
    if said:
        md += ["", f"The tunnel ends logged {len(said)} stream reset/error line(s), e.g.:", ""]
        md += [f"- `{line[:240]}`" for line in dict.fromkeys(said[:3])]

    fig, ax = new_figure()
    ax.plot(counts, med["direct"], marker="o", label="direct TCP (baseline)")
    ax.plot(counts, med["tunnel"], marker="s", label="nopf encrypted tunnel")
    ax.set_xscale("log")
    ax.set_xlabel("concurrent streams")
    ax.set_ylabel("aggregate echo throughput (MB/s)")
    ax.set_title("Many streams: aggregate throughput vs N")
    ax.grid(alpha=0.3, which="both")
    ax.legend()
    plot = save_figure(fig, outdir / "streams_throughput.png")

    top = counts[-1]
    targets = [Target(f"{top:,} concurrent streams",
                      "no errors: every stream's data echoed intact (issue 7)",
                      f"{errors['tunnel']} of {top * rounds:,} streams failed",
                      errors["tunnel"] == 0 and all(b.errors == 0 for bs in runs["tunnel"].values()
                                                     for b in bs))]
    return ScenarioResult(NAME, TITLE, data, "\n".join(md), [plot], targets)


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
