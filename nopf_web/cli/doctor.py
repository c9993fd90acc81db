"""``nopf doctor``: what kind of NAT this machine is behind, measured against a rendezvous.

Output contract: the report on stdout (a short text, or with ``--json`` one JSON
object on one line: see :mod:`nopf_web.doctor.report`); exit 0 once measured,
even when parts could not be (the report says which and why), 1 when the
rendezvous cannot be reached (one line on stderr), 2 on bad input.
"""

from __future__ import annotations

import json

from nopf_web.doctor import DEFAULT_BUDGET, DoctorReport, run_doctor
from nopf_web.inputs import InputError
from nopf_web.rendezvous.errors import RendezvousError
from nopf_web.wire.address import DOCTOR_IPV4_ONLY, Endpoint, parse_host_endpoint, parse_port

from .common import EXIT_FAILURE, EXIT_OK, EXIT_USAGE, OneLineParser, fail, run_main
from .coordinated import DEFAULT_SERVERADDR

PROG = "nopf doctor"


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Measure the NAT between this machine and the internet against a "
        "rendezvous (nopf-server): its mapping and filtering, hairpinning, port mapping "
        "on the gateway, carrier-grade NAT, IPv6, and what it means for sharing.",
    )
    p.add_argument("-a", "--serveraddr", default=DEFAULT_SERVERADDR, metavar="HOST:PORT",
                   help=f"rendezvous (default {DEFAULT_SERVERADDR}, or $NOPF_SERVERADDR)")
    p.add_argument("--doctor-port", default=None, metavar="N",
                   help="its NAT doctor's port (default: the rendezvous port + 1)")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object (see docs/doctor.md for its keys)")
    return p


def render_text(report: DoctorReport) -> str:
    """The report for people: what it means, then one line per measured part."""
    lines = [f"{PROG}: measured against {report.rendezvous} in {report.elapsed_ms} ms", "",
             report.summary(), ""]
    facts = report.facts()
    width = max(len(label) for _key, label, _text in facts)
    lines += [f"  {label.ljust(width)}  {text}" for _key, label, text in facts]
    return "\n".join(lines)


async def _run(rendezvous: Endpoint, doctor_port: int | None, as_json: bool) -> int:
    try:
        report = await run_doctor(rendezvous, doctor_port=doctor_port, budget=DEFAULT_BUDGET)
    except RendezvousError as exc:
        return fail(PROG, str(exc), EXIT_FAILURE)
    if as_json:
        print(json.dumps(report.to_json(), separators=(",", ":")), flush=True)
    else:
        print(render_text(report), flush=True)
    return EXIT_OK


def main(argv: list[str]) -> int:
    args = build_parser().parse_args(argv)
    try:
        rendezvous = parse_host_endpoint(args.serveraddr, field="--serveraddr",
                                         no_ipv6=DOCTOR_IPV4_ONLY)
        doctor_port = (parse_port(args.doctor_port, what="--doctor-port")
                       if args.doctor_port is not None else None)
    except InputError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    return run_main(_run(rendezvous, doctor_port, args.json))
