"""``nopf-server``: the rendezvous service (seed discovery protocol, coordinated mode, relay)
and, on the next port, the NAT doctor's responder (``nopf doctor``)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import logging
import sys
from dataclasses import replace

from nopf_web.inputs import InputError, parse_count, parse_rate, quote
from nopf_web.rendezvous.cluster import (
    PASSWORD_ENV,
    URL_ENV,
    BadRedisUrl,
    RedisConfig,
    SharedNode,
    new_node_id,
)
from nopf_web.rendezvous.doctor import DoctorResponder
from nopf_web.rendezvous.server import (
    DEFAULT_HOSTS,
    DEFAULT_PORT,
    RendezvousServer,
    ServerLimits,
    fastopen_hint,
)
from nopf_web.rendezvous.server_machine import RelayLimits
from nopf_web.wire.address import (
    Endpoint,
    parse_ip,
    parse_listen_host,
    parse_observed_endpoint,
    parse_port,
)

from .common import (
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    fail,
    raise_open_files_limit,
    run_main,
)

PROG = "nopf-server"


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Rendezvous for nopf peers: tells every connecting client its public "
        "IPv4 address and port (the NOPF-core seed discovery protocol), pairs coordinated "
        "peers by code, relays the pairs that hole punching cannot connect (on the same "
        "port; the relay copies encrypted bytes it cannot read), and answers `nopf doctor` "
        "on the next port.",
    )
    p.add_argument("--host", action="append", default=None, metavar="IP",
                   help="address to listen on, repeatable (default: 0.0.0.0 and ::, every "
                   "IPv4 and IPv6 address, IPv6 skipped with a note where the host has none; "
                   "--host 127.0.0.1 listens there only)")
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
    relay = RelayLimits()
    p.add_argument("--no-relay", action="store_true",
                   help="do not relay: plans are punch-only, as for peers that cannot relay")
    p.add_argument("--relay-max-sessions", default=str(relay.max_sessions), metavar="N",
                   help="relay sessions at once (each holds 2 sockets and 2 threads); more "
                   f"are refused (default {relay.max_sessions})")
    p.add_argument("--relay-max-per-source", default=str(relay.max_per_source), metavar="N",
                   help="relay sessions at once with a side at one IP address "
                   f"(default {relay.max_per_source})")
    p.add_argument("--relay-rate", default=None, metavar="BYTES_PER_S",
                   help="bytes per second per relay session, both directions together, "
                   "with K, M, G (x1000) or Ki, Mi, Gi (x1024), e.g. 12.5M (100 Mbit/s); "
                   "0: no limit (default)")
    p.add_argument("--relay-address", action="append", default=None, metavar="IP:PORT",
                   help="the relay address given to peers, IPv4 or [IPv6]:PORT; once per "
                   "family (default: the address each peer reached this server on; set it "
                   "behind a port forward or a NAT)")
    p.add_argument("--redis", default=None, metavar="URL",
                   help="share codes, waiting peers and relay work with other nopf-server "
                   "nodes through Redis: redis://[:PASSWORD@]HOST[:PORT][/DB], or rediss:// "
                   f"for TLS (default: ${URL_ENV}; the password may come from "
                   f"${PASSWORD_ENV}). Without it the state stays in this process")
    return p


__all__ = ["build_parser", "describe_rate", "describe_relay", "main", "parse_rate", "serve"]


def _redis_config(url: str | None) -> RedisConfig | None:
    """The checked --redis URL (or $NOPF_REDIS_URL), None without; InputError if bad."""
    try:
        config = RedisConfig.from_env(url)
    except BadRedisUrl as exc:
        raise InputError("--redis", str(exc)) from None
    if config is not None:
        try:
            import redis.asyncio  # noqa: F401 - only checked here: the optional dependency
        except ImportError:
            raise InputError("--redis", "--redis needs the redis package: pip install "
                             "'nopf-web[redis]'"
                             ) from None
    return config


def _listen_ip(text: str) -> str:
    """One --host: an IP address to listen on (unspecified ones too: 0.0.0.0, ::)."""
    host = parse_listen_host(text, field="--host")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        raise InputError("--host", f"--host {quote(host)} is not an IP address") from None
    return host


def describe_rate(rate: float) -> str:
    """``2 MB/s``, ``12.5 MB/s``, ``512 KB/s``."""
    for unit, size in (("GB/s", 1e9), ("MB/s", 1e6), ("KB/s", 1e3)):
        if rate >= size:
            return f"{rate / size:.4g} {unit}"
    return f"{rate:g} B/s"


def describe_relay(relay: RelayLimits) -> str:
    if not relay.enabled:
        return "relay off (--no-relay): plans are punch-only"
    rate = "no rate limit" if not relay.rate else f"{describe_rate(relay.rate)} each"
    where = "" if not relay.addresses else ", at " + " and ".join(map(str, relay.addresses))
    return (f"relay on: up to {relay.max_sessions} sessions, {relay.max_per_source} per "
            f"address, {rate}{where}")


# Descriptors the server needs besides its clients' sockets (listener, epoll, logs...).
_SPARE_FDS = 64


def _fit_open_files(limits: ServerLimits) -> ServerLimits:
    """Lower ``max_connections`` to what the open-files limit allows, saying so."""
    allowed = raise_open_files_limit() - _SPARE_FDS
    if limits.max_connections <= allowed:
        return limits
    why = ("on Windows the select() event loop takes 512 sockets, which"
           if sys.platform == "win32" else "the open-files limit")
    fix = "" if sys.platform == "win32" else "; raise it with ulimit -n"
    print(f"{PROG}: {why} allows only {max(allowed, 1):,} connections "
          f"(asked for {limits.max_connections:,}){fix}", file=sys.stderr, flush=True)
    return replace(limits, max_connections=max(allowed, 1))


async def serve(host: str | tuple[str, ...], port: int, limits: ServerLimits | None = None,
                *, doctor_port: int | None = None, doctor_addresses: tuple[str, ...] = (),
                doctor_required: bool = False, optional_hosts: tuple[str, ...] = (),
                redis: RedisConfig | None = None) -> int:
    """Run the rendezvous on every ``host`` (one port) and, unless ``doctor_port`` is
    None, the NAT doctor's responder on the first, until cancelled. A host in
    ``optional_hosts`` that cannot be bound (the default ``::`` on a host without
    IPv6) is one line. A doctor port that cannot be bound stops the server only if
    it was asked for (``doctor_required``); else it is one line and the rendezvous
    runs alone. ``redis``: one node of a rendezvous shared through Redis."""
    hosts = (host,) if isinstance(host, str) else host
    limits = _fit_open_files(limits or ServerLimits())
    node = None if redis is None else new_node_id()
    server = RendezvousServer(hosts, port, limits, node=node)
    shared = None
    if redis is not None:
        shared = SharedNode(redis, server.feed, lambda: server.relay_load, node=node,
                            limits=limits.pairing)
        server.share_through(shared)
    try:
        skipped = await server.start(optional=optional_hosts)
    except OSError as exc:
        where = ", ".join(str(Endpoint(h, port)) for h in hosts)
        return fail(PROG, f"cannot listen on {where}: {exc.strerror or exc}")
    bound = ", ".join(str(Endpoint(*a)) for a in server.addresses)
    print(f"{PROG}: listening on {bound}", file=sys.stderr, flush=True)  # first: scripts wait
    for missing, error in skipped:
        print(f"{PROG}: not listening on {Endpoint(missing, server.address[1])}: "
              f"{error.strerror or error}", file=sys.stderr, flush=True)
    host = hosts[0]
    print(f"{PROG}: {describe_relay(server.limits.relay)}", file=sys.stderr, flush=True)
    hint = fastopen_hint()  # the sysctl is the operator's: only say so
    if hint is not None:
        print(f"{PROG}: {hint}", file=sys.stderr, flush=True)
    if shared is not None:
        print(f"{PROG}: node {shared.node}, sharing pairings through Redis at "
              f"{shared.config.where}", file=sys.stderr, flush=True)
    try:
        async with contextlib.AsyncExitStack() as stack:
            if shared is not None:
                group = await stack.enter_async_context(asyncio.TaskGroup())
                group.create_task(shared.run(), name="redis-node")
            if doctor_port is not None:
                try:
                    doctor = await stack.enter_async_context(
                        DoctorResponder(host, doctor_port, doctor_addresses))
                except OSError as exc:
                    why = (f"cannot listen on {Endpoint(host, doctor_port)} for the NAT doctor: "
                           f"{exc.strerror or exc}")
                    if doctor_required:
                        return fail(PROG, f"{why} (choose another --doctor-port, or "
                                    "--no-doctor)")
                    print(f"{PROG}: NAT doctor off: {why} (choose --doctor-port)",
                          file=sys.stderr, flush=True)
                else:
                    others = "".join(f", {a}" for a in doctor.addresses)
                    print(f"{PROG}: NAT doctor on {Endpoint(*doctor.address)}"
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
            raise InputError("--no-doctor", "--no-doctor cannot be combined with "
                             "--doctor-port or --doctor-address")
        return None, ()
    if a["doctor_port"] is not None:
        doctor_port = parse_port(a["doctor_port"], what="--doctor-port", allow_zero=True)
    elif port == 0:
        doctor_port = 0
    elif port == 65535:
        raise InputError("--port", "--port 65535 leaves no default doctor port: give "
                         "--doctor-port")
    else:
        doctor_port = port + 1
    if doctor_port == port and port != 0:
        raise InputError("--doctor-port", f"--doctor-port must differ from --port ({port})")
    if len(a["doctor_address"]) > 4:
        raise InputError("--doctor-address", "at most 4 --doctor-address")
    addresses = [str(parse_ip(text, field="--doctor-address")) for text in a["doctor_address"]]
    return doctor_port, tuple(dict.fromkeys(addresses))


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        hosts = tuple(dict.fromkeys(_listen_ip(text) for text in args.host)) \
            if args.host else DEFAULT_HOSTS
        port = parse_port(args.port, what="--port", allow_zero=True)
        limits = ServerLimits(
            max_connections=parse_count(args.max_connections, "--max-connections", 1_000_000),
            max_per_source=parse_count(args.max_per_source, "--max-per-source", 1_000_000),
            relay=_relay_limits(args))
        doctor_port, doctor_addresses = _doctor_options(args, port)
        redis = _redis_config(args.redis)
    except InputError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format=f"{PROG}: %(asctime)s %(message)s")
    code = run_main(serve(hosts, port, limits, doctor_port=doctor_port,
                          doctor_addresses=doctor_addresses,
                          doctor_required=args.doctor_port is not None or
                          bool(doctor_addresses), redis=redis,
                          optional_hosts=() if args.host else DEFAULT_HOSTS[1:]))
    return 0 if code == 130 else code  # SIGINT/SIGTERM is how a server stops


def _relay_limits(args: argparse.Namespace) -> RelayLimits:
    if args.no_relay:
        for flag, value in (("--relay-rate", args.relay_rate),
                            ("--relay-address", args.relay_address)):
            if value is not None:
                raise InputError(flag, f"{flag} makes no sense with --no-relay")
        return RelayLimits(enabled=False)
    addresses: list[Endpoint] = []
    for text in args.relay_address or ():
        address = parse_observed_endpoint(text, field="--relay-address")  # names the flag
        if any((":" in a.host) == (":" in address.host) for a in addresses):
            raise InputError("--relay-address", "--relay-address: given twice for IPv"
                             f"{6 if ':' in address.host else 4}: one address per family")
        addresses.append(address)
    return RelayLimits(
        max_sessions=parse_count(args.relay_max_sessions, "--relay-max-sessions", 1_000_000),
        max_per_source=parse_count(args.relay_max_per_source, "--relay-max-per-source",
                                   1_000_000),
        rate=0.0 if args.relay_rate is None else parse_rate(args.relay_rate),
        addresses=tuple(addresses))


if __name__ == "__main__":
    sys.exit(main())
