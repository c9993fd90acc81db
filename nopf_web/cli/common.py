"""What every entry point shares: one-line errors, exit codes, signal handling, and
the event loop (uvloop on Linux, asyncio's selector loop elsewhere: see
:func:`event_loop_factory`)."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
import threading
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn

from nopf_web import __version__
from nopf_web.inputs import one_line

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2; and
    ``--version`` on every command."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                          help="print the version and exit")

    def error(self, message: str) -> NoReturn:
        # argparse quotes arguments raw ("unrecognized arguments: ..."): escaped, cut.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} "
                  f"(see {self.prog} --help)\n")


def add_punch_timeout(p: argparse.ArgumentParser, flag: str = "--timeout") -> None:
    """The punch's give-up time, in seconds (a string: parse_seconds checks it)."""
    p.add_argument(flag, default="30", metavar="SECONDS",
                   help="give up punching after this many seconds (default 30)")


def add_no_guard(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-guard", action="store_true",
                   help="do not block the punch port's RST/FIN packets")


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one; the limit now in force.

    Every tunnelled connection holds two sockets (and the rendezvous one per
    waiting peer), so the usual soft limit of 1,024 would make a thousand
    streams fail with EMFILE. Servers such as nginx raise it the same way.
    Where the ``resource`` module does not exist (Windows), nothing changes:
    there the selector loop's select() is what bounds sockets (see
    :func:`event_loop_factory`).
    """
    if sys.platform == "win32":
        return 512  # no RLIMIT_NOFILE: what select() on Windows takes per call
    try:
        import resource
    except ImportError:  # a Unix without it: no such limit to lift
        return 1 << 30
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = 1 << 20  # an "unlimited" hard limit still needs a number for the soft one
    if soft == resource.RLIM_INFINITY or soft >= hard:
        return soft
    with contextlib.suppress(ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, resource.getrlimit(
            resource.RLIMIT_NOFILE)[1]))
        return hard
    return soft


def fail(prog: str, message: str, code: int = EXIT_FAILURE) -> int:
    print(f"{prog}: error: {one_line(message)}", file=sys.stderr, flush=True)
    return code


def event_loop_factory(platform: str | None = None) -> Callable[[], asyncio.AbstractEventLoop]:
    """The event loop every entry point runs on.

    On Linux, uvloop (libuv's loop, a compiled extension): the tunnel's per-record
    work around the loop costs less there than in asyncio's pure-Python selector
    loop: the encrypted tunnel's CPU per GB falls by about a tenth with ten
    streams, a few per cent with one (BENCHMARKS.md, "uvloop on Linux"). Without
    uvloop installed (a source tree run as it is) asyncio's loop. Elsewhere
    asyncio's selector loop, the platform we have not run uvloop on (macOS)
    included. The punch, the seed session and the doctor wait
    for socket readiness with ``loop.add_reader``/``add_writer`` (a connect's
    completion, a peer's EOF), which Windows' default loop, the Proactor (IOCP),
    does not implement; there the selector loop runs on select(), which takes at
    most 512 sockets (about 250 tunnelled connections at once), and has no
    subprocess support (nopf needs none).
    """
    platform = sys.platform if platform is None else platform
    if platform == "win32":
        return asyncio.SelectorEventLoop
    if platform == "linux":
        try:
            import uvloop  # a dependency on Linux only (pyproject.toml)
        except ImportError:  # run from a source tree without it: slower, not broken
            return asyncio.new_event_loop
        return uvloop.new_event_loop
    return asyncio.new_event_loop


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def hold_stop_signals_while_exiting() -> None:
    """From now on the first SIGINT/SIGTERM is ignored (the program is already on
    its way out with its exit status); a second one kills it as usual, so an exit
    that hangs can still be stopped."""
    def second_one_kills(sig: int, _frame: object) -> None:
        signal.signal(sig, signal.SIG_DFL)
        signal.raise_signal(sig)

    def first_one(_sig: int, _frame: object) -> None:
        for sig in STOP_SIGNALS:
            signal.signal(sig, second_one_kills)

    if threading.current_thread() is not threading.main_thread():
        return  # only the main thread may set handlers (run_main in a test thread)
    for sig in STOP_SIGNALS:
        signal.signal(sig, first_one)


def run_main(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro`` on the event loop of :func:`event_loop_factory`;
    SIGINT/SIGTERM cancel it, which it turns into a clean exit.

    The open-files limit is lifted first (see :func:`raise_open_files_limit`).
    """
    raise_open_files_limit()

    async def wrapper() -> int:
        loop = asyncio.get_running_loop()
        task = asyncio.current_task()
        assert task is not None
        interrupted = False

        def interrupt() -> None:
            nonlocal interrupted
            interrupted = True
            task.cancel()

        for sig in STOP_SIGNALS:
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
                loop.add_signal_handler(sig, interrupt)
        try:
            return await coro
        except asyncio.CancelledError:
            if interrupted:
                return EXIT_INTERRUPTED
            raise
        finally:
            # The work is over: a stop signal from here on must not turn an exit
            # with its status into a kill (closing the loop would reset SIGTERM to
            # the default action, and interpreter shutdown still takes a while).
            for sig in STOP_SIGNALS:
                with contextlib.suppress(NotImplementedError, RuntimeError):
                    loop.remove_signal_handler(sig)
            hold_stop_signals_while_exiting()

    try:
        with asyncio.Runner(loop_factory=event_loop_factory()) as runner:
            return runner.run(wrapper())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
