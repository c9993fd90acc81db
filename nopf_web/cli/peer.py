"""``nopf``: the peer, compatible with the NOPF-core seed command line.

Output contract: the first stdout line is our public ``IP:PORT``; then one
``IP:PORT`` line is read from stdin (the peer's public address); when the
pipe starts, ``Started pipe between localhost:<localport> - <ip>:<port>`` is
printed to stdout. Everything else goes to stderr.
"""

from __future__ import annotations

import asyncio
import sys
import threading

from nopf_web.errors import NopfError
from nopf_web.guard import make_guard
from nopf_web.guard.base import Guard, NullGuard
from nopf_web.inputs import MAX_TEXT, InputError, parse_int, parse_seconds
from nopf_web.punch.machine import PunchConfig
from nopf_web.roles import PeerRole
from nopf_web.sessions.engine import Engine, Event, task_group
from nopf_web.sessions.factory import make_engine
from nopf_web.sessions.seed import SeedSpec
from nopf_web.wire.address import (
    SEED_IPV4_ONLY,
    Endpoint,
    parse_host_endpoint,
    parse_ipv4_endpoint,
    parse_local_endpoint,
)

from . import coordinated, doctor
from .common import (
    EXIT_FAILURE,
    EXIT_OK,
    EXIT_USAGE,
    OneLineParser,
    add_no_guard,
    add_punch_timeout,
    fail,
    run_main,
)

PROG = "nopf"
PEER_FIELD = "peer address"  # the stdin line's name in errors


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="Connect a TCP port to a peer behind another NAT by TCP hole punching. "
        "The server enters the client's address first, then the client enters the server's. "
        "(Seed-compatible, plaintext. See also: nopf share --help, nopf connect --help: "
        "pairing codes, encrypted, many connections.)",
    )
    p.add_argument("-p", "--localport", required=True, metavar="[HOST:]PORT",
                   help="server: your service's port on 127.0.0.1, or HOST:PORT for one on "
                   "another machine; client: the port your application connects to on "
                   "127.0.0.1, or ADDRESS:PORT (e.g. 0.0.0.0:3010 for other machines too)")
    p.add_argument("-a", "--serveraddr", required=True, metavar="HOST:PORT",
                   help="nopf-server (rendezvous) address, e.g. 198.51.100.2:3012")
    p.add_argument("-t", "--type", default="client", metavar="TYPE",
                   help='"s" or "server" for the server role; anything else is a client '
                   "(default: client)")
    add_punch_timeout(p)
    p.add_argument("--punch-ttl", default="2", metavar="TTL",
                   help="TTL of the server's arming SYNs: enough to pass your own NAT, too "
                   "little to reach the peer's (default 2; 0 sends full-TTL SYNs)")
    add_no_guard(p)
    return p


def _spec(args: object) -> SeedSpec:
    a = vars(args)
    role: PeerRole = "server" if a["type"].strip().lower() in ("s", "server") else "client"
    ttl = parse_int(a["punch_ttl"], "--punch-ttl", 0, 255)
    if ttl == 1:
        raise InputError("--punch-ttl", "--punch-ttl must be 0 or 2-255, got 1")
    local = parse_local_endpoint(a["localport"], listen=role == "client")
    return SeedSpec(
        role=role,
        local_host=local.host,
        local_port=local.port,
        rendezvous=parse_host_endpoint(a["serveraddr"], field="--serveraddr",
                                       no_ipv6=SEED_IPV4_ONLY),
        punch=PunchConfig(timeout=parse_seconds(a["timeout"], "--timeout"), arm_ttl=ttl),
    )


def _make_guard(disabled: bool) -> Guard:
    if disabled:
        return NullGuard("disabled with --no-guard")
    return make_guard()


def _printer(event: Event) -> None:
    if event.kind == "public_address":
        print(event.message, flush=True)  # first stdout line: the contract
        print(f"{PROG}: this is your public address; give it to the peer, then enter the "
              "peer's IP:PORT", file=sys.stderr, flush=True)
    elif event.kind == "pipe_started":
        print(event.message, flush=True)
    elif event.kind == "state" and event.data.get("state") == "failed":
        pass  # the error line printed on exit says it once
    elif event.kind in ("state", "log", "guard"):
        print(f"{PROG}: {event.message}", file=sys.stderr, flush=True)


def _resolve(fut: asyncio.Future[str], value: str | InputError) -> None:
    if fut.done():
        return
    if isinstance(value, InputError):
        fut.set_exception(value)
    else:
        fut.set_result(value)


def _read_line_in_thread() -> asyncio.Future[str]:
    """Read one stdin line in a daemon thread (never blocks interpreter exit)."""
    loop = asyncio.get_running_loop()
    fut: asyncio.Future[str] = loop.create_future()

    def reader() -> None:
        line: str | InputError
        try:
            line = sys.stdin.readline(MAX_TEXT + 2)  # an endless line costs no memory
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            line = InputError(PEER_FIELD, f"cannot read the peer's address from stdin: {exc}")
        loop.call_soon_threadsafe(_resolve, fut, line)

    threading.Thread(target=reader, name="stdin-peer-address", daemon=True).start()
    return fut


def _parse_peer_line(line: str) -> Endpoint:
    if not line:
        raise InputError(PEER_FIELD, "stdin closed before the peer's address (IP:PORT) was "
                         "entered")
    try:
        return parse_ipv4_endpoint(line, field=PEER_FIELD)
    except InputError as exc:
        raise InputError(PEER_FIELD, f"bad peer address: {exc}") from None


async def _give_peer(engine: Engine, have_public: asyncio.Event) -> None:
    """Once our public address is out, read the peer's from stdin and give it."""
    await have_public.wait()
    engine.set_peer(_parse_peer_line(await _read_line_in_thread()))


async def run_session(spec: SeedSpec, guard: Guard) -> int:
    engine = make_engine(spec, guard)
    engine.subscribe(_printer)
    have_public = asyncio.Event()
    engine.subscribe(lambda e: have_public.set() if e.kind == "public_address" else None)
    if not guard.active:
        print(f"{PROG}: guard inactive: {guard.reason}", file=sys.stderr, flush=True)
    try:
        async with task_group() as tg:
            running = tg.create_task(engine.run(), name=f"session-{spec.role}-{spec.local_port}")
            peer = tg.create_task(_give_peer(engine, have_public), name="peer-address")
            running.add_done_callback(lambda _: peer.cancel())  # no peer to wait for now
    except InputError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    except NopfError as exc:
        return fail(PROG, str(exc), EXIT_FAILURE)
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("share", "connect"):
        return coordinated.main(argv[0], argv[1:])  # type: ignore[arg-type]
    if argv and argv[0] == "doctor":
        return doctor.main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        spec = _spec(args)
    except InputError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    guard = _make_guard(args.no_guard)
    guard.start()
    try:
        code = run_main(run_session(spec, guard))
    finally:
        guard.stop()  # no packet filter outlives the process's work
    if code == 130:
        print(f"{PROG}: interrupted", file=sys.stderr, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
