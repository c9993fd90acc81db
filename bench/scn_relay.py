"""The relay in ``nopf-server``: one stream relayed against direct TCP, and the relay
process's CPU seconds per GB.

A lab without NAT (so that a direct path exists); the real ``nopf-server`` on
rdv, relay on, no rate limit. The sender runs in b1, the receiver in a1 (threads
of this process entered into the namespaces; both the same code for both paths).
``direct``: b1 connects to a1's public address. ``relay``: a1 and b1 pair as a
relay-capable sharer and joiner (tests/e2e/relay_clients.py: mapping check,
hello, fire, relay message) and send through the relay connections of their
plans. Rounds alternate the order; figures are medians. The relay's cost is the
user + system CPU time of the ``nopf-server`` process during the transfer (its
splice threads; the bytes never enter Python), per GB moved.
"""

from __future__ import annotations

import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.paths import cpu_seconds, stop_proc
from bench.report import Progress, ScenarioResult, Target, bar_chart
from tests.e2e.relay_clients import relayed_pair
from tests.lab import Lab
from tests.programs import argv

NAME = "relay"
TITLE = "Relay: one stream through nopf-server's relay vs direct TCP, and its CPU per GB"
BUDGET_S = 120

PORT = 3012
DIRECT_PORT = 4300
CHUNK = 1 << 20
CPU_GOAL = 0.5  # CPU-s per GB of the relay process (issue 12)


def _receive(sock: socket.socket, out: dict[str, float]) -> None:
    buf = bytearray(CHUNK)
    total = 0
    while n := sock.recv_into(buf):
        total += n
    out["bytes"] = total
    out["end"] = time.perf_counter()
    sock.close()


def _transfer(sender: socket.socket, receiver: socket.socket, size: int) -> float:
    """Send ``size`` bytes, half-close; seconds until the receiver saw EOF."""
    out: dict[str, float] = {}
    thread = threading.Thread(target=_receive, args=(receiver, out), name="bench-relay-rx")
    thread.start()
    payload = memoryview(bytes(CHUNK))
    t0 = time.perf_counter()
    left = size
    while left > 0:
        sender.sendall(payload[:min(CHUNK, left)])
        left -= CHUNK
    sender.shutdown(socket.SHUT_WR)
    thread.join(600)
    sender.close()
    if out.get("bytes") != size:
        raise RuntimeError(f"the receiver got {out.get('bytes')} bytes of {size}")
    return out["end"] - t0


def _direct(lab: Lab, listener: socket.socket, size: int) -> tuple[float, float]:
    with lab.b1.enter():
        sender = socket.create_connection((lab.a1.ip, DIRECT_PORT), timeout=30)
    receiver, _ = listener.accept()
    return size / _transfer(sender, receiver, size) / 1e6, 0.0


def _relayed(lab: Lab, server: subprocess.Popen[bytes], size: int) -> tuple[float, float]:
    pair = relayed_pair(lab.a1, lab.b1, (lab.rdv.ip, PORT))
    before = cpu_seconds([server.pid])
    seconds = _transfer(pair.joiner, pair.sharer, size)  # b1 -> relay -> a1
    # The session ends when the receiver's close has gone through the relay too.
    time.sleep(0.05)
    cpu = cpu_seconds([server.pid]) - before
    return size / seconds / 1e6, cpu / (size / 1e9)


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    size = 128_000_000 if quick else 1_000_000_000
    rounds = 1 if quick else 5
    runs: dict[str, list[float]] = {"direct": [], "relay": []}
    cpu: list[float] = []
    with Lab("none", "none") as lab:
        server = lab.rdv.popen(argv("nopf-server", "--port", str(PORT)), stderr=subprocess.PIPE)
        try:
            assert server.stderr is not None
            line = server.stderr.readline().decode()
            if "listening on" not in line:
                raise RuntimeError(f"nopf-server did not start: {line.strip()!r}")
            relay_line = server.stderr.readline().decode().strip()
            threading.Thread(target=server.stderr.read, daemon=True).start()  # drain
            with lab.a1.enter():
                listener = socket.create_server(("0.0.0.0", DIRECT_PORT))
            try:
                for r in range(rounds):
                    order = ("direct", "relay") if r % 2 == 0 else ("relay", "direct")
                    for name in order:
                        if name == "direct":
                            mbs, _ = _direct(lab, listener, size)
                        else:
                            mbs, per_gb = _relayed(lab, server, size)
                            cpu.append(round(per_gb, 3))
                        runs[name].append(round(mbs, 1))
                        progress(f"round {r + 1}/{rounds}: {name} {mbs:.0f} MB/s"
                                 + (f", relay {cpu[-1]:.2f} CPU-s/GB" if name == "relay"
                                    else ""))
            finally:
                listener.close()
        finally:
            stop_proc(server)
    med = {n: statistics.median(v) for n, v in runs.items()}
    data: dict[str, Any] = {
        "size_mb": size // 1_000_000, "rounds": rounds, "mb_s": runs,
        "median_mb_s": {n: round(v, 1) for n, v in med.items()},
        "ratio": round(med["relay"] / med["direct"], 3),
        "relay_cpu_s_per_gb": cpu, "median_relay_cpu_s_per_gb": statistics.median(cpu),
        "server": relay_line,
    }
    return ScenarioResult(NAME, TITLE, data, _markdown(data), _plots(data, outdir),
                          _targets(data))


def _targets(data: dict[str, Any]) -> list[Target]:
    per_gb = data["median_relay_cpu_s_per_gb"]
    return [Target("relay process CPU per GB relayed", f"<= {CPU_GOAL} CPU-s/GB (issue 12)",
                   f"{per_gb:.2f} CPU-s/GB at {data['median_mb_s']['relay']:.0f} MB/s",
                   per_gb <= CPU_GOAL)]


def _markdown(data: dict[str, Any]) -> str:
    d = data
    rows = [f"| direct TCP | {d['median_mb_s']['direct']:.0f} | 1.00 | - | "
            f"{', '.join(f'{v:.0f}' for v in d['mb_s']['direct'])} |",
            f"| through the relay | {d['median_mb_s']['relay']:.0f} | {d['ratio']:.2f} | "
            f"{d['median_relay_cpu_s_per_gb']:.2f} | "
            f"{', '.join(f'{v:.0f}' for v in d['mb_s']['relay'])} |"]
    return "\n".join([
        f"One stream of {d['size_mb']:,} MB from b1 to a1 in a lab without NAT, "
        f"{d['rounds']} alternating rounds (median). The relay path: a1 and b1 pair through "
        "the real `nopf-server` on rdv as relay-capable peers and send through the relay "
        "connections of their plans (raw bytes, no tunnel: the relay's own cost). CPU: "
        "user + system seconds of the `nopf-server` process during the transfer, per GB "
        "(its two splice threads; the bytes never enter Python). The sender and the "
        "receiver are threads of the benchmark process on the same 2 cores, so the relay "
        "competes with them for CPU: the ratio is a floor on this machine, not the "
        "relay's ceiling.", "",
        "| path | MB/s (median) | ratio to direct | relay CPU-s per GB | runs (MB/s) |",
        "|---|---|---|---|---|", *rows, "",
        f"- server: {d['server']}",
    ])


def _plots(data: dict[str, Any], outdir: Path) -> list[Path]:
    return [bar_chart(
        outdir / "relay.png", "One stream, direct vs relayed (label: relay CPU)",
        "MB/s (median)", ["direct TCP", "through the relay"],
        {"MB/s": [data["median_mb_s"]["direct"], data["median_mb_s"]["relay"]]},
        {"MB/s": ["", f"{data['median_relay_cpu_s_per_gb']:.2f} CPU-s/GB"]})]


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
