"""Scenario 4: connection setup time vs RTT, seed mode and coordinated mode.

One drop/drop lab per delay (``delay_ms`` on every packet the internet router
forwards, so the RTT between the two sites is about twice that); the RTT is
measured, not assumed: median TCP handshake from a1 and from b1 to the
rendezvous host, a path that crosses the router once each way like the
peer-to-peer path. Real ``nopf`` processes in a1 (service side) and b1.

- seed: ``nopf -t server`` in a1 and ``nopf -t client`` in b1 have both printed
  their public address ("both ready"); each is given the other's at the same
  moment;
- coordinated: ``nopf share`` in a1 has printed its code; ``nopf connect CODE``
  is started in b1. The clock starts before the process does; the time until
  it listens on its local port (the first thing it does once started) is its
  start-up (Python and imports), reported apart: the target is judged from
  there, when both peers are ready. Run twice: with TCP Fast Open accepted by
  the rendezvous host (``net.ipv4.tcp_fastopen=0x203`` in rdv, as the README
  recommends to operators: the hello rides in the SYN) and without (``0x1``,
  the Linux default).

Until: one byte an application writes into b1's local port arrives at the
service behind a1 ("first byte through"). Runs alternate between the modes.
"""

from __future__ import annotations

import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from bench.report import Progress, ScenarioResult, Target
from bench.scn_util import (
    fmt,
    in_rtts,
    label_plot,
    median,
    new_figure,
    save_figure,
    setup_target,
    table,
)
from tests.e2e.coord_harness import handshake_rtt
from tests.e2e.coord_setup_timing import TFO_SYSCTL
from tests.e2e.peers import Peer, listening, start_coordinated, start_peer, start_rendezvous
from tests.lab import Host, Lab

NAME = "setup"
TITLE = "Connection setup time vs RTT (seed and coordinated mode)"
BUDGET_S = 120

SERVICE_PORT = 3000
STEP_TIMEOUT = 30.0  # s: any one wait of a run (a line printed, the byte arriving)
RDV_ADDR = ("198.51.100.2", 3012)
MODES = ("seed", "coordinated", "coordinated, no TFO")
# Fast Open on the rendezvous host, per mode (seed mode does not use it).
TFO = {"seed": "on", "coordinated": "on", "coordinated, no TFO": "off"}


def measure_rtt(lab: Lab) -> float:
    """Median TCP handshake a1 -> rdv and b1 -> rdv: one crossing of the router each way."""
    return median([handshake_rtt(lab.a1, RDV_ADDR), handshake_rtt(lab.b1, RDV_ADDR)])


def first_byte(client: Host, port: int, service: socket.socket, t0: float,
               wait: float = STEP_TIMEOUT) -> tuple[float, float]:
    """Seconds from ``t0`` until a byte written into ``client``'s local ``port`` reaches
    ``service``, and until that port accepted the app's connection (the app retries
    while the program starts); each wait ends after ``wait`` s."""
    errors: list[BaseException] = []
    listening: list[float] = []

    def app() -> None:
        try:
            with client.enter():
                while True:
                    try:
                        sock = socket.create_connection(("127.0.0.1", port), timeout=5)
                        listening.append(time.monotonic() - t0)
                        break
                    except ConnectionRefusedError:  # the program is still starting
                        if time.monotonic() - t0 > wait:
                            raise
                        time.sleep(0.005)
            sock.sendall(b"!")
            sock.settimeout(wait)
            with sock:
                sock.recv(1)  # held open until the tunnel closes it
        except OSError as exc:
            errors.append(exc)

    threading.Thread(target=app, daemon=True).start()
    service.settimeout(wait)
    try:
        conn, _ = service.accept()
        with conn:
            conn.settimeout(wait)
            if conn.recv(1) != b"!":
                raise RuntimeError("the service got something other than the app's byte")
            through = time.monotonic() - t0
            if not listening:
                raise RuntimeError("the byte arrived before the app saw its connection accepted")
            return through, listening[0]
    except TimeoutError:
        raise RuntimeError(f"no byte through within {wait:g} s "
                           f"(app: {errors[0] if errors else 'connected'})") from None


def stop(*peers: Peer) -> None:
    for p in peers:
        if p.proc.poll() is None:
            p.proc.terminate()
    for p in peers:
        try:
            p.proc.wait(10)
        except subprocess.TimeoutExpired:
            p.proc.kill()
            p.proc.wait(5)


def seed_once(lab: Lab, service: socket.socket, port: int) -> tuple[float, float]:
    s = start_peer(lab.a1, "server", SERVICE_PORT, timeout=STEP_TIMEOUT)
    c = start_peer(lab.b1, "client", port, timeout=STEP_TIMEOUT)
    try:
        sp, cp = s.line(STEP_TIMEOUT), c.line(STEP_TIMEOUT)
        if not (sp and cp):
            raise RuntimeError(f"no public address: {s.stderr()} {c.stderr()}")
        t0 = time.monotonic()
        s.enter(cp)
        c.enter(sp)
        return first_byte(lab.b1, port, service, t0)
    finally:
        stop(s, c)


def coord_start(host: Host, *args: str) -> Peer:
    return start_coordinated(host, *args, keepalive=None)


def coord_once(lab: Lab, service: socket.socket, port: int) -> tuple[float, float]:
    s = coord_start(lab.a1, "share", "-p", str(SERVICE_PORT))
    peers = [s]
    try:
        code = s.line(STEP_TIMEOUT)
        if not code:
            raise RuntimeError(f"nopf share printed no code: {s.stderr()}")
        t0 = time.monotonic()
        peers.append(coord_start(lab.b1, "connect", code, "-p", str(port)))
        return first_byte(lab.b1, port, service, t0)
    finally:
        stop(*peers)


def run(progress: Progress, quick: bool, outdir: Path) -> ScenarioResult:
    delays = (0, 20) if quick else (0, 20, 100)
    runs = 1 if quick else 3
    results: dict[int, dict[str, Any]] = {}
    for delay in delays:
        with Lab("drop", "drop", delay_ms=delay) as lab:
            start_rendezvous(lab)
            rtt = measure_rtt(lab)
            times: dict[str, list[float]] = {m: [] for m in MODES}
            errors: dict[str, list[str]] = {m: [] for m in MODES}
            starts: list[float] = []  # coordinated: `nopf connect` started -> it listens
            # coordinated: listening -> byte through
            after: dict[str, list[float]] = {m: [] for m in MODES[1:]}
            with listening(lab.a1, SERVICE_PORT) as service:
                for i in range(runs):
                    for k, mode in enumerate(MODES):
                        lab.rdv.run(["sysctl", "-qw",
                                     f"net.ipv4.tcp_fastopen={TFO_SYSCTL[TFO[mode]]}"])
                        once = seed_once if mode == "seed" else coord_once
                        try:
                            t, up = once(lab, service, 3010 + len(MODES) * i + k)
                            times[mode].append(t)
                            if mode != "seed":
                                starts.append(up)
                                after[mode].append(t - up)
                            progress(f"delay {delay} ms/hop (RTT {rtt * 1000:.0f} ms), "
                                     f"{mode} run {i + 1}/{runs}: {t * 1000:.0f} ms")
                        except (RuntimeError, AssertionError, OSError) as exc:
                            errors[mode].append(str(exc)[:300])
                            progress(f"delay {delay} ms/hop, {mode} run {i + 1}: FAILED {exc}")
            results[delay] = {"rtt_s": rtt, "seconds": times, "errors": errors,
                              "process_start_s": starts, "after_start_s": after}

    rows = []
    targets = []
    for delay, r in results.items():
        rtt = r["rtt_s"]
        start = median(r["process_start_s"])
        seed = median(r["seconds"]["seed"])
        goal = setup_target(rtt)
        for mode in MODES[1:]:
            whole, rest = median(r["seconds"][mode]), median(r["after_start_s"][mode])
            rows.append([f"{delay} ms", fmt(rtt * 1000, ".1f"), mode,
                         fmt(seed * 1000), fmt(in_rtts(seed, rtt), ".1f"),
                         fmt(whole * 1000), fmt(start * 1000), fmt(rest * 1000),
                         fmt(in_rtts(rest, rtt), ".1f"), fmt(goal * 1000),
                         "yes" if rest <= goal else "no"])
            fails = len(r["errors"][mode])
            targets.append(Target(
                f"{mode} setup at {delay} ms/hop (RTT {rtt * 1000:.0f} ms)",
                "<= 3 RTTs + 100 ms from both peers ready (issue 6)",
                f"{fmt(rest * 1000)} ms ({fmt(in_rtts(rest, rtt), '.1f')} RTTs) after "
                f"`nopf connect` started up ({fmt(start * 1000)} ms of start-up; "
                f"{fmt(whole * 1000)} ms in all); target {goal * 1000:.0f} ms"
                + (f"; {fails} failed runs" if fails else ""),
                rest <= goal and fails == 0))
    md = [
        "Drop/drop lab, one per delay; `delay` is added to every packet crossing the internet "
        "router (both ways), so the RTT between the sites is about twice it. RTT measured: "
        "median TCP handshake a1 → rdv and b1 → rdv. Times are from \"both peers ready\" to "
        "an application's first byte arriving at the service behind the sharer/server, "
        f"median of {runs} run(s) per cell, modes alternating. Seed: both `nopf -t server|client` "
        "printed their public address, then each is given the other's at once. Coordinated: "
        "`nopf share` printed its code, then `nopf connect CODE` is started; \"start-up\" is "
        "the time until that process accepts on its local port (Python and its imports, the "
        "first thing it does), \"after start-up\" the rest: from both peers ready, the figure "
        "judged against the target (issue 6: within 3 RTTs + 100 ms). \"coordinated\" has the "
        "rendezvous host accept TCP Fast Open (`net.ipv4.tcp_fastopen=0x203`, as the README "
        "recommends), so the hello rides in the SYN; \"no TFO\" is the Linux default (`0x1`).",
        "",
        table(["delay/hop", "RTT ms", "mode", "seed ms", "seed RTTs", "coordinated ms in all",
               "start-up ms", "after start-up ms", "after start-up RTTs", "target ms",
               "met"], rows),
    ]
    failures = [(d, m, e) for d, r in results.items() for m, es in r["errors"].items()
                for e in es]
    if failures:
        md += ["", "Failed runs:", ""] + [f"- {d} ms, {m}: `{e}`" for d, m, e in failures]

    fig, ax = new_figure()
    rtts = [r["rtt_s"] * 1000 for r in results.values()]
    ax.plot(rtts, [median(r["seconds"]["seed"]) * 1000 for r in results.values()],
            marker="o", label="seed mode")
    for mode, marker in (("coordinated", "s"), ("coordinated, no TFO", "^")):
        ax.plot(rtts, [median(r["after_start_s"][mode]) * 1000 for r in results.values()],
                marker=marker, label=f"{mode} (after start-up)")
    ax.plot(rtts, [setup_target(r / 1000) * 1000 for r in rtts], linestyle="--",
            color="grey", label="target: 3 RTTs + 100 ms")
    label_plot(ax, "measured RTT between the sites (ms)", "ready → first byte through (ms)",
               "Connection setup time vs RTT")
    plot = save_figure(fig, outdir / "setup_vs_rtt.png")
    data = {"delays_ms": delays, "runs": runs,
            "results": {str(d): r for d, r in results.items()}}
    return ScenarioResult(NAME, TITLE, data, "\n".join(md), [plot], targets)


if __name__ == "__main__":
    from bench.report import standalone

    sys.exit(standalone(__name__))
