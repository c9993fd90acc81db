"""``nopf share`` / ``nopf connect``: coordinated mode (pairing code, encrypted, many connections).

Output contract: ``nopf share`` prints the pairing code alone on its first
stdout line, then runs until interrupted; everything else goes to stderr.
SIGINT/SIGTERM close the tunnel cleanly and exit 0.
"""

from __future__ import annotations

import functools
import os
import sys
from typing import Literal

from nopf_web.errors import NopfError
from nopf_web.inputs import InputError, parse_seconds
from nopf_web.pairing import parse_code
from nopf_web.sessions.coordinated import DEFAULT_KEEPALIVE, RESUME_KEEPALIVES, CoordinatedSpec
from nopf_web.sessions.engine import Event
from nopf_web.sessions.factory import make_engine
from nopf_web.sessions.path_machine import UPGRADE_CAP, UPGRADE_DELAYS
from nopf_web.wire.address import parse_host_endpoint, parse_local_sides
from nopf_web.wire.frames import MAX_SERVICES

from .common import (
    EXIT_FAILURE,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    add_punch_timeout,
    fail,
    run_main,
)

PROG = "nopf"
# No public rendezvous exists: default to a local one (nopf-server or the dashboard's).
DEFAULT_SERVERADDR = os.environ.get("NOPF_SERVERADDR", "127.0.0.1:3012")


def build_parser(command: Literal["share", "connect"]) -> OneLineParser:
    p = OneLineParser(
        prog=f"{PROG} {command}",
        description=(
            "Share a TCP service: print a pairing code, wait for the peer, then carry "
            "every connection it makes to LOCALPORT (on 127.0.0.1, or HOST:PORT), encrypted."
            if command == "share" else
            "Join a shared service with its pairing code: connections to LOCALPORT (on "
            "127.0.0.1, or ADDRESS:PORT) reach the sharer's service, encrypted."),
    )
    if command == "connect":
        p.add_argument("code", help="the pairing code the sharer printed, e.g. 7-orbit-lantern")
    p.add_argument("-p", "--localport", required=True, metavar="[HOST:]PORT",
                   action="append",
                   help="the service to share: a port on 127.0.0.1, or HOST:PORT for one "
                   "on another machine (e.g. 192.168.1.20:80; IPv6 in brackets); again "
                   f"for more services over the same code (at most {MAX_SERVICES})"
                   if command == "share" else
                   "where your applications connect: a port on 127.0.0.1, or ADDRESS:PORT "
                   "(e.g. 0.0.0.0:3010 for other machines too; IPv6 in brackets); again "
                   "for the sharer's 2nd, 3rd... service, in its order")
    p.add_argument("-a", "--serveraddr", default=DEFAULT_SERVERADDR, metavar="HOST:PORT",
                   help=f"rendezvous (default {DEFAULT_SERVERADDR}, or $NOPF_SERVERADDR); "
                   "an IPv6 address in brackets, e.g. [2001:db8::1]:3012")
    if command == "share":
        p.add_argument("--code-lifetime", default="600", metavar="SECONDS",
                       help="how long to wait for the peer to use the code (default 600)")
    add_punch_timeout(p)
    p.add_argument("--keepalive", default=str(int(DEFAULT_KEEPALIVE)), metavar="SECONDS",
                   help="tunnel keepalive interval (default "
                   f"{DEFAULT_KEEPALIVE:g}); a lost path is replaced within the resume budget")
    p.add_argument("--resume-budget", metavar="SECONDS",
                   help="how long a lost path may take to be replaced (meeting the peer "
                   "again through the rendezvous) before the tunnel fails (default "
                   f"{RESUME_KEEPALIVES} x --keepalive: "
                   f"{RESUME_KEEPALIVES * DEFAULT_KEEPALIVE:g})")
    p.add_argument("--retry-direct", default=f"{UPGRADE_DELAYS[0]:g}", metavar="SECONDS",
                   help="while relayed, first try a direct path this long after the relay "
                   f"was chosen, then doubling, at most every {UPGRADE_CAP:g} s (default "
                   f"{UPGRADE_DELAYS[0]:g})")
    p.add_argument("--no-port-mapping", action="store_true",
                   help="do not ask the gateway to forward a port (NAT-PMP, PCP, "
                   "UPnP-IGD); by default a mapped port is offered to the peer, renewed, "
                   "and deleted on exit" + ("" if command == "share" else
                                            " (asked alongside the pairing, never delaying "
                                            "it: offered once granted)"))
    p.add_argument("--no-ipv6", action="store_true",
                   help="do not offer our global IPv6 addresses as a direct path")
    return p


def _printer(event: Event, *, services: int = 1) -> None:
    if event.kind == "code":
        print(event.message, flush=True)  # first stdout line: the code, alone
        ports = " ".join(["-p PORT"] * services)
        which = f" (a port for each of the {services} services, in order)" if services > 1 \
            else ""
        print(f"{PROG}: give the peer this code: nopf connect {event.message} {ports}{which}",
              file=sys.stderr, flush=True)
    elif event.kind == "state" and event.data.get("state") == "failed":
        pass  # the error line printed on exit says it once
    elif event.kind in ("state", "log", "guard", "path", "prediction"):
        print(f"{PROG}: {event.message}", file=sys.stderr, flush=True)


async def _run(spec: CoordinatedSpec) -> int:
    engine = make_engine(spec)
    engine.subscribe(functools.partial(
        _printer, services=len(spec.local_sides) if spec.role == "server" else 1))
    try:
        await engine.run()
    except NopfError as exc:
        return fail(PROG, str(exc), EXIT_FAILURE)
    return EXIT_OK


def main(command: Literal["share", "connect"], argv: list[str]) -> int:
    args = build_parser(command).parse_args(argv)
    try:
        code = str(parse_code(args.code)) if command == "connect" else None
        first, *more = parse_local_sides(args.localport, listen=command == "connect",
                                         most=MAX_SERVICES)
        spec = CoordinatedSpec(
            role="server" if command == "share" else "client",
            local_host=first.host,
            local_port=first.port,
            more_local=tuple(more),
            rendezvous=parse_host_endpoint(args.serveraddr, field="--serveraddr"),
            code=code,
            code_lifetime=parse_seconds(args.code_lifetime, "--code-lifetime")
            if command == "share" else 600.0,
            punch_timeout=parse_seconds(args.timeout, "--timeout"),
            keepalive=parse_seconds(args.keepalive, "--keepalive"),
            resume_budget=parse_seconds(args.resume_budget, "--resume-budget")
            if args.resume_budget is not None else None,
            retry_direct=parse_seconds(args.retry_direct, "--retry-direct",
                                       maximum=UPGRADE_CAP),
            port_mapping=not args.no_port_mapping,
            ipv6=not args.no_ipv6,
        )
    except InputError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    code_ = run_main(_run(spec))
    if code_ == EXIT_INTERRUPTED:
        print(f"{PROG}: closed", file=sys.stderr, flush=True)
        return EXIT_OK  # interrupting is how these long-running commands end
    return code_
