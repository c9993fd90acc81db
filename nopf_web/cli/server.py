"""``nopf-server``: the rendezvous service (seed discovery protocol, coordinated mode) and,
on the next port, the NAT doctor's responder (``nopf doctor``)."""

from __future__ import annotations

import contextlib
import ipaddress
import logging
import sys
from dataclasses import replace

from nopf_web.rendezvous.doctor import DoctorResponder
from nopf_web.rendezvous.server import (
    DEFAULT_PORT,
    RendezvousServer,
    ServerLimits,
    fastopen_hint,
)
from nopf_web.wire.address import parse_port
from nopf_web.wire.errors import BadAddress

from .common import (
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    fail,
    parse_count,
    raise_open_files_limit,
    run_main,
)

PROG = "nopf-server"


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Rendezvous for nopf peers: tells every connecting client its public "
        "IPv4 address and port (the NOPF-core seed discovery protocol), pairs coordinated "
        "peers, and answers `nopf doctor` on the next port.",
    )
    p.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    p.add_argument("--port", default=str(DEFAULT_PORT),
                   help=f"TCP port to listen on (default {DEFAULT_PORT})")
    defaults = ServerLimits()
    p.add_argument("--max-connections", default=str(defaults.max_connections),
                   help="connections open at once, waiting sharers included; more are "
                   f"refused (default {defaults.max_connections:,}, about 3 KiB each)")
    p.add_argument("--max-per-source", default=str(defaults.max_per_source),
                   help="connections open at once from one IP address "
                   f"(default {defaults.max_per_source})")
    p.add_argument("--doctor-port", default=None, metavar="N",
                   help="TCP port of the NAT doctor responder (default: --port + 1; 0 with "
                   "--port 0 picks a free one)")
    p.add_argument("--no-doctor", action="store_true",
                   help="do not answer NAT doctor probes (nopf doctor) or dial back")
    p.add_argument("--doctor-address", action="append", default=[], metavar="IP",
                   help="another address of this host (IPv4 or IPv6) that clients can reach: "
                   "the doctor answers there too and tells clients, so that they can tell "
                   "address-dependent NAT mappings apart and test IPv6 (repeatable)")
    return p


# Descriptors the server needs besides its clients' sockets (listener, epoll, logs...).
_SPARE_FDS = 64


def _fit_open_files(limits: ServerLimits) -> ServerLimits:
    """Lower ``max_connections`` to what the open-files limit allows, saying so."""
    allowed = raise_open_files_limit() - _SPARE_FDS
    if limits.max_connections <= allowed:
        return limits
    print(f"{PROG}: the open-files limit allows only {max(allowed, 1):,} connections "
          f"(asked for {limits.max_connections:,}); raise it with ulimit -n",
          file=sys.stderr, flush=True)
    return replace(limits, max_connections=max(allowed, 1))


async def serve(host: str, port: int, limits: ServerLimits | None = None, *,
                doctor_port: int | None = None, doctor_addresses: tuple[str, ...] = (),
                doctor_required: bool = False) -> int:
    """Run the rendezvous (and, unless ``doctor_port`` is None, the NAT doctor's
    responder) until cancelled. A doctor port that cannot be bound stops the server
    only if it was asked for (``doctor_required``); else it is one line and the
    rendezvous runs alone."""
    server = RendezvousServer(host, port, _fit_open_files(limits or ServerLimits()))
    try:
        await server.start()
    except OSError as exc:
        return fail(PROG, f"cannot listen on {host}:{port}: {exc.strerror or exc}")
    bound = server.address
    print(f"{PROG}: listening on {bound[0]}:{bound[1]}", file=sys.stderr, flush=True)
    hint = fastopen_hint()  # the sysctl is the operator's: only say so
    if hint is not None:
        print(f"{PROG}: {hint}", file=sys.stderr, flush=True)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if doctor_port is not None:
                try:
                    doctor = await stack.enter_async_context(
                        DoctorResponder(host, doctor_port, doctor_addresses))
                except OSError as exc:
                    why = (f"cannot listen on {host}:{doctor_port} for the NAT doctor: "
                           f"{exc.strerror or exc}")
                    if doctor_required:
                        return fail(PROG, f"{why} (choose another --doctor-port, or "
                                    "--no-doctor)")
                    print(f"{PROG}: NAT doctor off: {why} (choose --doctor-port)",
                          file=sys.stderr, flush=True)
                else:
                    others = "".join(f", {a}" for a in doctor.addresses)
                    print(f"{PROG}: NAT doctor on {doctor.address[0]}:{doctor.address[1]}"
                          f"{others}", file=sys.stderr, flush=True)
            await server.serve_forever()
    finally:
        await server.close()
        print(f"{PROG}: stopped after serving {server.stats.served} clients",
              file=sys.stderr, flush=True)
    return EXIT_OK


def _doctor_options(args: object, port: int) -> tuple[int | None, tuple[str, ...]]:
    a = vars(args)
    if a["no_doctor"]:
        if a["doctor_port"] is not None or a["doctor_address"]:
            raise BadAddress("--no-doctor cannot be combined with --doctor-port or "
                             "--doctor-address")
        return None, ()
    if a["doctor_port"] is not None:
        doctor_port = parse_port(a["doctor_port"], what="--doctor-port", allow_zero=True)
    elif port == 0:
        doctor_port = 0
    elif port == 65535:
        raise BadAddress("--port 65535 leaves no default doctor port: give --doctor-port")
    else:
        doctor_port = port + 1
    if doctor_port == port and port != 0:
        raise BadAddress(f"--doctor-port must differ from --port ({port})")
    addresses = []
    for text in a["doctor_address"]:
        try:
            ip = ipaddress.ip_address(text.strip().strip("[]"))
        except ValueError:
            raise BadAddress(f"--doctor-address {text!r} is not an IP address") from None
        if ip.is_unspecified or ip.is_multicast:
            raise BadAddress(f"--doctor-address {ip} cannot be a host address")
        addresses.append(str(ip))
    if len(addresses) > 4:
        raise BadAddress("at most 4 --doctor-address")
    return doctor_port, tuple(dict.fromkeys(addresses))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        port = parse_port(args.port, what="--port", allow_zero=True)
        limits = ServerLimits(
            max_connections=parse_count(args.max_connections, "--max-connections", 1_000_000),
            max_per_source=parse_count(args.max_per_source, "--max-per-source", 1_000_000))
        doctor_port, doctor_addresses = _doctor_options(args, port)
    except BadAddress as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{PROG}: %(asctime)s %(message)s")
    code = run_main(serve(args.host, port, limits, doctor_port=doctor_port,
                          doctor_addresses=doctor_addresses,
                          doctor_required=args.doctor_port is not None or
                          bool(doctor_addresses)))
    return 0 if code == 130 else code  # SIGINT/SIGTERM is how a server stops


if __name__ == "__main__":
    sys.exit(main())
