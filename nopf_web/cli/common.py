"""What every entry point shares: one-line errors, exit codes, signal handling."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import sys
from collections.abc import Coroutine
from typing import Any, NoReturn

from nopf_web.inputs import one_line

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 2."""

    def error(self, message: str) -> NoReturn:
        # argparse quotes arguments raw ("unrecognized arguments: ..."): escaped, cut.
        self.exit(EXIT_USAGE, f"{self.prog}: error: {one_line(message)} "
                  f"(see {self.prog} --help)\n")


def raise_open_files_limit() -> int:
    """Lift the soft limit on open files to the hard one; the limit now in force.

    Every tunnelled connection holds two sockets (and the rendezvous one per
    waiting peer), so the usual soft limit of 1,024 would make a thousand
    streams fail with EMFILE. Servers such as nginx raise it the same way.
    Where the ``resource`` module does not exist (Windows), nothing changes.
    """
    try:
        import resource
    except ImportError:  # not Unix: no such limit to lift
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


def run_main(coro: Coroutine[Any, Any, int]) -> int:
    """Run ``coro``; SIGINT/SIGTERM cancel it, which it turns into a clean exit.

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

        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # Windows
                loop.add_signal_handler(sig, interrupt)
        try:
            return await coro
        except asyncio.CancelledError:
            if interrupted:
                return EXIT_INTERRUPTED
            raise

    try:
        return asyncio.run(wrapper())
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
