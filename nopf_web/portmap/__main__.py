"""python -m nopf_web.portmap detect | map PORT: try the port mapper by hand.

``map`` prints the mapping (or one reason per protocol and exits 1), keeps it
renewed, and deletes it on Ctrl-C or SIGTERM (exit 0). Errors are one line.
"""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys
from ipaddress import IPv4Address

from nopf_web.portmap.client import MapProtocol, PortMapper
from nopf_web.portmap.errors import PortMapError


async def _detect(args: argparse.Namespace) -> int:
    async with PortMapper(args.gateway, protocols=args.protocols) as mapper:
        detection = await mapper.detect()
    print(f"gateway {detection.gateway}")
    for probe in detection.probes:
        print(probe.detail)
    return 0 if detection.answering else 1


async def _map(args: argparse.Namespace) -> int:
    task = asyncio.current_task()
    assert task is not None
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
    async with PortMapper(args.gateway, protocols=args.protocols) as mapper:
        mapping = await mapper.map_tcp(args.port, lifetime=args.lifetime)
        if mapping is None:
            for reason in mapper.reasons:
                print(reason, file=sys.stderr)
            return 1
        print(f"mapped {mapping}", flush=True)
        try:
            reason = await mapper.wait_lost()
        except asyncio.CancelledError:
            print("deleting the mapping", file=sys.stderr, flush=True)
            raise
        print(f"lost: {reason}", file=sys.stderr)
        return 1


def _protocols(text: str) -> tuple[MapProtocol, ...]:
    names = {p.value.lower(): p for p in MapProtocol} | {"natpmp": MapProtocol.NATPMP,
                                                          "upnp": MapProtocol.UPNP}
    try:
        return tuple(names[n.strip().lower()] for n in text.split(","))
    except KeyError as exc:
        raise argparse.ArgumentTypeError(f"unknown protocol {exc.args[0]!r}") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m nopf_web.portmap", description=__doc__)
    parser.add_argument("--gateway", type=IPv4Address, help="default: the default route's")
    parser.add_argument("--protocols", type=_protocols, default=tuple(MapProtocol),
                        help="comma-separated: nat-pmp,pcp,upnp (default: all)")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("detect", help="which protocols answer on the gateway")
    mapping = sub.add_parser("map", help="map a TCP port until interrupted")
    mapping.add_argument("port", type=int)
    mapping.add_argument("--lifetime", type=int, default=7200)
    args = parser.parse_args(argv)
    try:
        return asyncio.run(_detect(args) if args.command == "detect" else _map(args))
    except PortMapError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, asyncio.CancelledError):
        return 0  # Ctrl-C / SIGTERM: the mapping was deleted on the way out


if __name__ == "__main__":
    sys.exit(main())
