"""``nopf-web``: the local web dashboard (sessions, live status, history, LAN sharing).

The first stdout line is the dashboard's URL (with ``?token=`` in LAN mode);
everything else goes to stderr. Bad input and start-up failures are one line
on stderr and a non-zero exit. Once it listens, the dashboard opens in the
user's browser where one can show it (see :func:`browser_refusal`).
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import sys
import webbrowser
from collections.abc import Mapping
from pathlib import Path

from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError

from nopf_web.errors import NopfError
from nopf_web.inputs import InputError, one_line, parse_seconds, quote
from nopf_web.rendezvous.server import DEFAULT_PORT
from nopf_web.resources import ResourceMissing
from nopf_web.web import WebConfig, create_app
from nopf_web.web.keys import GUARD
from nopf_web.wire.address import (
    parse_host_endpoint,
    parse_listen_endpoint,
    parse_listen_host,
    parse_port,
)

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

PROG = "nopf-web"
BROWSER_TIMEOUT = 5.0  # s to wait for the browser launcher before going on without it


def default_db_path() -> Path:
    """``$XDG_DATA_HOME/nopf/history.sqlite3`` (``~/.local/share`` when unset)."""
    base = os.environ.get("XDG_DATA_HOME") or ""
    root = Path(base) if os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "nopf" / "history.sqlite3"


def build_parser() -> OneLineParser:
    p = OneLineParser(
        prog=PROG,
        description="The nopf dashboard: create server and client sessions in the browser, "
        "watch them connect, and review their history.",
    )
    p.add_argument("--host", default="127.0.0.1",
                   help="address to serve the dashboard on (default 127.0.0.1; a non-loopback "
                   "address such as 0.0.0.0 is LAN mode: every device needs the printed token)")
    p.add_argument("--port", default="8080", help="dashboard port (default 8080; 0: any free)")
    p.add_argument("--db", metavar="PATH",
                   help=f"history database (default {default_db_path()})")
    p.add_argument("--rendezvous", metavar="HOST:PORT",
                   help="the nopf-server that sessions use by default; without it an embedded "
                   "rendezvous runs in this process")
    p.add_argument("--rendezvous-listen", metavar="HOST:PORT",
                   default=f"127.0.0.1:{DEFAULT_PORT}",
                   help=f"where the embedded rendezvous listens (default 127.0.0.1:{DEFAULT_PORT}"
                   "; port 0: any free)")
    add_punch_timeout(p, "--punch-timeout")
    p.add_argument("--no-port-mapping", action="store_true",
                   help="sharing sessions do not ask the gateway to forward a port (NAT-PMP, "
                   "PCP, UPnP-IGD)")
    add_no_guard(p)
    p.add_argument("--no-browser", action="store_true",
                   help="do not open the dashboard in a browser on start (by default it "
                   "opens on Windows, macOS and Linux desktops; never over SSH, in CI or "
                   "without a display)")
    return p


def _db_path(text: str) -> Path:
    """A file path the OS can take (no NUL, encodable): sqlite and mkdir raise
    ValueError, not OSError, on the others."""
    try:
        if "\0" in text:
            raise ValueError("NUL in path")
        os.fsencode(text)
    except (ValueError, UnicodeError):
        raise InputError("--db", f"--db {quote(text)} is not a usable file path") from None
    return Path(text).expanduser()


def browser_refusal(env: Mapping[str, str], platform: str | None = None) -> str | None:
    """Why the dashboard should not open a browser here (None: open it).

    Not under CI or a test run (``CI``, ``PYTEST_CURRENT_TEST``), not in an SSH
    session (the browser would open on the remote machine's screen, if any),
    and on Linux and other Unixes only with a graphical display (``DISPLAY`` or
    ``WAYLAND_DISPLAY``). Windows and macOS always have a screen to open on.
    """
    if env.get("CI") or env.get("PYTEST_CURRENT_TEST"):
        return "running under CI or tests"
    if any(env.get(name) for name in ("SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY")):
        return "an SSH session"
    system = sys.platform if platform is None else platform
    if system not in ("win32", "darwin") and not (env.get("DISPLAY")
                                                  or env.get("WAYLAND_DISPLAY")):
        return "no graphical display"
    return None


async def open_browser(url: str) -> None:
    """Open ``url`` in the user's browser, in a thread (a launcher may be slow)."""
    try:
        async with asyncio.timeout(BROWSER_TIMEOUT):
            opened = await asyncio.to_thread(webbrowser.open, url)
    except TimeoutError:
        opened = True  # still starting: it will show up, or not; nothing to wait for
    except webbrowser.Error:
        opened = False
    if opened:
        _note("opened the dashboard in your browser (--no-browser: do not)")
    else:
        _note(f"could not open a browser: open {url} yourself")


def _config(args: object) -> WebConfig:
    a = vars(args)
    host = parse_listen_host(a["host"], field="--host")
    timeout = parse_seconds(a["punch_timeout"], "--punch-timeout", maximum=3600)
    return WebConfig(
        db_path=_db_path(a["db"]) if a["db"] else default_db_path(),
        host=host,
        port=parse_port(a["port"], what="--port", allow_zero=True),
        rendezvous=parse_host_endpoint(a["rendezvous"], field="--rendezvous")
        if a["rendezvous"] else None,
        rendezvous_listen=parse_listen_endpoint(a["rendezvous_listen"],
                                                field="--rendezvous-listen"),
        guard=not a["no_guard"],
        punch_timeout=timeout,
        port_mapping=not a["no_port_mapping"],
    )


def _wants_browser(args: object) -> bool:
    return not vars(args)["no_browser"] and browser_refusal(os.environ) is None


def _url(config: WebConfig, port: int) -> str:
    host = "127.0.0.1" if config.host in ("0.0.0.0", "::") else _bracket(config.host)
    url = f"http://{host}:{port}/"
    return f"{url}?token={config.access_token}" if config.lan_mode else url


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _note(message: str) -> None:
    print(f"{PROG}: {message}", file=sys.stderr, flush=True)


async def serve(config: WebConfig, *, browser: bool = False) -> int:
    """Serve the dashboard until cancelled; with ``browser``, open it once listening."""
    app = create_app(config)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    try:
        try:
            await runner.setup()  # opens the database, starts the rendezvous and the manager
            # SO_REUSEADDR restarts past TIME_WAIT on Unix; on Windows it would let
            # another program bind the dashboard's port too, so there it stays off.
            site = web.TCPSite(runner, config.host, config.port,
                               reuse_address=sys.platform != "win32")
            await site.start()
        except NopfError as exc:
            return fail(PROG, str(exc))
        except OSError as exc:
            return fail(PROG, f"cannot serve the dashboard on {config.host}:{config.port} "
                        f"({exc.strerror or exc}): choose another --port")
        port = int(runner.addresses[0][1])
        print(_url(config, port), flush=True)
        _note(f"dashboard at {_url(config, port)}")
        if config.lan_mode:
            _note(f"LAN mode: from another device open http://<this machine's address "
                  f"({socket.gethostname()})>:{port}/?token={config.access_token}")
        _note(f"history in {config.db_path}")
        guard = app[GUARD]
        if not guard.active:
            _note(f"guard inactive: {guard.reason}")
        _note("press Ctrl+C to stop")
        if browser:
            await open_browser(_url(config, port))
        await asyncio.Event().wait()  # until SIGINT/SIGTERM cancels us
        return EXIT_OK
    finally:
        await runner.cleanup()


def one_line_unparsable_requests(record: logging.LogRecord) -> bool:
    """aiohttp answers a request it cannot parse (bytes that are not HTTP, such as raw
    non-ASCII in the query) with a 400, then logs it with a traceback: one line says
    what happened."""
    error = record.exc_info[1] if record.exc_info else None
    if isinstance(error, HttpProcessingError):
        said = record.getMessage()
        record.msg, record.args = "%s: %s (answered %s)", (said, one_line(error.message),
                                                           error.code)
        record.exc_info = record.exc_text = None
    return True


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        config = _config(args)
    except InputError as exc:
        return fail(PROG, str(exc), EXIT_USAGE)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr,
                        format=f"{PROG}: %(asctime)s %(name)s %(message)s")
    logging.getLogger("nopf").setLevel(logging.INFO)
    logging.getLogger("aiohttp.server").addFilter(one_line_unparsable_requests)
    try:
        code = run_main(serve(config, browser=_wants_browser(args)))
    except ResourceMissing as exc:
        return fail(PROG, str(exc), EXIT_FAILURE)
    return EXIT_OK if code == 130 else code  # SIGINT/SIGTERM is how a dashboard stops


if __name__ == "__main__":
    sys.exit(main())
