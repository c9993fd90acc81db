"""Command line for the namespace lab.

python -m tests.lab up [--left MODE] [--right MODE] [--delay-ms MS] [--jitter-ms MS]
                       [--loss P] [--no-icmp-ratelimit] [--hairpin a|b]... [--rdv-second-ip]
                       [--prefix P] [--detach]
python -m tests.lab down PREFIX
python -m tests.lab cleanup          # labs whose owner process died
python -m tests.lab list
"""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import NoReturn

from tests.lab.topology import (
    MODES,
    Lab,
    LabError,
    cleanup_prefix,
    cleanup_stale,
    lab_unavailable_reason,
    list_labs,
)


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (no usage dump)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


def _probability(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"must be between 0 and 1: {text!r}")
    return value


def _milliseconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0: {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="python -m tests.lab",
        description="Simulated internet with NATs in network namespaces (needs root).",
    )
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    up = sub.add_parser("up", help="build a lab (foreground until Ctrl-C unless --detach)")
    up.add_argument("--left", choices=MODES, default="drop", help="NAT mode of site a")
    up.add_argument("--right", choices=MODES, default="drop", help="NAT mode of site b")
    up.add_argument(
        "--delay-ms",
        type=_milliseconds,
        default=0.0,
        help="delay per pass through the internet router",
    )
    up.add_argument("--jitter-ms", type=_milliseconds, default=0.0, help="± uniform jitter")
    up.add_argument("--loss", type=_probability, default=0.0, help="drop probability per pass")
    up.add_argument(
        "--no-icmp-ratelimit",
        action="store_true",
        help="routers answer every packet with ICMP (no kernel ICMP rate limit)",
    )
    up.add_argument(
        "--hairpin",
        action="append",
        choices=("a", "b"),
        default=[],
        help="this site's NAT hairpins (repeatable)",
    )
    up.add_argument(
        "--rdv-second-ip",
        action="store_true",
        help="give the rendezvous host a second address, 198.51.100.3",
    )
    up.add_argument("--prefix", help="namespace prefix (default: nl + 6 random hex digits)")
    up.add_argument(
        "--detach",
        action="store_true",
        help="leave the lab up and exit (remove it with `down PREFIX`)",
    )
    down = sub.add_parser("down", help="remove a lab by prefix")
    down.add_argument("prefix")
    sub.add_parser("cleanup", help="remove labs whose owner process is gone")
    sub.add_parser("list", help="list labs present on this machine")
    return parser


def _examples(lab: Lab) -> str:
    p = lab.prefix
    return "\n".join(
        [
            "examples:",
            f"  ip netns exec {p}-rdv python3 -m http.server 8000 --bind {lab.rdv.ip}",
            f'  ip netns exec {p}-a1 python3 -c "import urllib.request as u; '
            f"print(u.urlopen('http://{lab.rdv.ip}:8000/').status)\"",
            f"  ip netns exec {p}-natb nft list ruleset",
            f"  ip netns exec {p}-nata conntrack -L    # if conntrack is installed",
            f"  ip netns exec {p}-inet tcpdump -ni any",
            f"  ip netns exec {p}-b1 bash",
        ]
    )


def _up(args: argparse.Namespace) -> int:
    lab = Lab(
        args.left,
        args.right,
        prefix=args.prefix,
        delay_ms=args.delay_ms,
        jitter_ms=args.jitter_ms,
        loss=args.loss,
        persist=args.detach,
        icmp_ratelimit=not args.no_icmp_ratelimit,
        hairpin=tuple(args.hairpin),
        rdv_second_ip=args.rdv_second_ip,
    )
    stop = threading.Event()
    if not args.detach:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
            signal.signal(sig, lambda *_: stop.set())
    try:
        lab.up()
    except BaseException:
        lab.down()
        raise
    print(f"lab {lab.prefix} up in {lab.build_seconds or 0:.2f} s")
    print(lab.describe())
    print(_examples(lab))
    if args.detach:
        print(f"left running; remove with: python -m tests.lab down {lab.prefix}", flush=True)
        return 0
    print("Ctrl-C (or SIGTERM) tears it down.", flush=True)
    try:
        while not stop.wait(1.0):
            pass
    finally:
        lab.down()
        print(f"lab {lab.prefix} removed", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    prog = "python -m tests.lab"
    reason = lab_unavailable_reason(
        need_iptables=args.command == "up" and bool(args.delay_ms or args.jitter_ms or args.loss)
    )
    if args.command != "list" and reason:
        print(f"{prog}: error: {reason}", file=sys.stderr)
        return 1
    try:
        if args.command == "up":
            return _up(args)
        if args.command == "down":
            removed = cleanup_prefix(args.prefix)
            if not removed:
                print(f"{prog}: error: no lab with prefix {args.prefix!r}", file=sys.stderr)
                return 1
            print(f"removed {len(removed)} namespaces of {args.prefix}")
            return 0
        if args.command == "cleanup":
            stale = cleanup_stale()
            print(f"removed stale labs: {', '.join(stale)}" if stale else "no stale labs")
            return 0
        labs = list_labs()
        for prefix, namespaces in labs.items():
            print(f"{prefix}: {' '.join(namespaces)}")
        if not labs:
            print("no labs")
        return 0
    except LabError as exc:
        print(f"{prog}: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
