"""``nopf-server``: the rendezvous service (seed discovery protocol)."""

from __future__ import annotations

import logging
import sys
from dataclasses import replace

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
        "IPv4 address and port (the NOPF-core seed discovery protocol).",
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


async def serve(host: str, port: int, limits: ServerLimits | None = None) -> int:
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
        await server.serve_forever()
    finally:
        await server.close()
        print(f"{PROG}: stopped after serving {server.stats.served} clients",
              file=sys.stderr, flush=True)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        port = parse_port(args.port, what="--port", allow_zero=True)
        limits = ServerLimits(
            max_connections=parse_count(args.max_connections, "--max-connections", 1_000_000),
            max_per_source=parse_count(args.max_per_source, "--max-per-source", 1_000_000))
    except BadAddress as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{PROG}: %(asctime)s %(message)s")
    code = run_main(serve(args.host, port, limits))
    return 0 if code == 130 else code  # SIGINT/SIGTERM is how a server stops


if __name__ == "__main__":
    sys.exit(main())
