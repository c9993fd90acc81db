"""How long the NAT doctor takes, per lab NAT kind: median and max of N runs.

For each kind it builds a lab (10 ms per pass through the internet router, so
20 ms round trips; rdv with its second address), runs a rendezvous and doctor
responder on rdv in-process, with the dial-back rate limit lifted (the default,
5 then 6 a minute, would refuse most of the runs), and the ICMP rate limit off
in the routers (Linux answers 6, then 1 a second: the ``icmp`` kind would read
as ``drop`` after the sixth run), then measures from a1 N times in a row.
Without a port-mapping gateway, the SSDP search's 250 ms wait is the floor; the
last row has one that answers.
Prints a Markdown table; each run must classify right or the script fails.

    sudo .venv/bin/python -m bench.doctor [--runs 10] [--delay-ms 10]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import threading
from collections.abc import Callable

from nopf_web.doctor import DoctorReport, run_doctor
from nopf_web.rendezvous.doctor import DoctorLimits, DoctorResponder
from nopf_web.rendezvous.server import RendezvousServer
from nopf_web.wire.address import Endpoint
from tests.lab import Lab, gateway as lab_gateway
from tests.lab.topology import RDV_IP, RDV_IP2, Host

# mode, hairpin, a port-mapping gateway on the NAT, expected (mapping, filtering, hairpin)
KINDS: list[tuple[str, bool, bool, tuple[str, str, bool]]] = [
    ("none", False, False, ("none", "open", True)),
    ("drop", False, False, ("endpoint-independent", "drop", False)),
    ("rst", False, False, ("endpoint-independent", "rst", False)),
    ("icmp", False, False, ("endpoint-independent", "icmp", False)),
    ("symmetric", False, False, ("address-and-port-dependent", "drop", False)),
    ("drop", True, False, ("endpoint-independent", "drop", True)),
    ("rst", False, True, ("endpoint-independent", "rst", False)),
]


def in_thread(host: Host, fn: Callable[[], None]) -> threading.Thread:
    def target() -> None:
        with host.enter():
            fn()
    thread = threading.Thread(target=target, daemon=True)
    thread.start()
    return thread


def serve(rdv: Host, ready: threading.Event, stop: threading.Event) -> threading.Thread:
    async def main() -> None:
        server = RendezvousServer("0.0.0.0", 3012)
        await server.start()
        limits = DoctorLimits(dial_burst=1000, dial_interval=0.001)
        async with DoctorResponder("0.0.0.0", 3013, (RDV_IP2,), limits):
            ready.set()
            await asyncio.to_thread(stop.wait)
        await server.close()
    return in_thread(rdv, lambda: asyncio.run(main()))


def measure(lab: Lab, runs: int) -> list[DoctorReport]:
    reports: list[DoctorReport] = []

    async def main() -> None:
        for _ in range(runs):
            reports.append(await run_doctor(Endpoint(RDV_IP, 3012)))
    in_thread(lab.a1, lambda: asyncio.run(main())).join(120)
    return reports


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--delay-ms", type=float, default=10.0)
    args = ap.parse_args()
    rows = ["| NAT kind | mapping, filtering, hairpin | median | max |", "|---|---|---|---|"]
    failed = False
    for mode, hairpin, gateway, expected in KINDS:
        with Lab(mode, "drop", delay_ms=args.delay_ms, rdv_second_ip=True,
                 hairpin=("a",) if hairpin else (), icmp_ratelimit=False) as lab:
            if gateway:
                lab_gateway.start(lab.nata)
            ready, stop = threading.Event(), threading.Event()
            server = serve(lab.rdv, ready, stop)
            ready.wait(10)
            reports = measure(lab, args.runs)
            stop.set()
            server.join(10)
        wrong = [r for r in reports if (r.mapping, r.filtering, r.hairpin) != expected]
        failed |= bool(wrong) or len(reports) != args.runs
        ms = [r.elapsed_ms for r in reports]
        name = mode + (" + hairpin" if hairpin else "") + (
            " + gateway (UPnP-IGD, NAT-PMP, PCP)" if gateway else "")
        verdict = ", ".join(str(x).lower() for x in expected)
        if wrong:
            verdict += f" (WRONG {len(wrong)}x: {wrong[0].to_json(explain=False)})"
        rows.append(f"| {name} | {verdict} | {statistics.median(ms):.0f} ms | {max(ms)} ms |")
        print(rows[-1], file=sys.stderr, flush=True)
    print("\n".join(rows))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
