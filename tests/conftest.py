"""Suite-wide setup: the lab fixtures, the event loops nopf runs on, and ``linux_only``."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable

import pytest

from tests.programs import check_programs_run_this_tree

pytest_plugins = ["tests.lab.fixtures"]

if sys.platform == "win32":
    # As nopf's commands run (nopf_web.cli.common.event_loop_factory): the punch waits
    # for readiness with add_reader/add_writer, which the default Proactor loop lacks.
    asyncio.set_event_loop_policy(asyncio.WindowsSelectorEventLoopPolicy())


LoopFactory = Callable[[], asyncio.AbstractEventLoop]


def pytest_asyncio_loop_factories(
        config: pytest.Config, item: pytest.Item) -> dict[str, LoopFactory]:
    """Async tests run on asyncio's loop (nopf's on Windows and macOS, and the web
    tests' client); those marked ``uvloop_too`` on uvloop as well, on Linux, where
    nopf's commands run on it (nopf_web.cli.common.event_loop_factory)."""
    factories: dict[str, LoopFactory] = {
        "asyncio": asyncio.SelectorEventLoop if sys.platform == "win32" else asyncio.new_event_loop}
    if sys.platform == "linux" and item.get_closest_marker("uvloop_too") is not None:
        import uvloop

        factories["uvloop"] = uvloop.new_event_loop
    return factories


def pytest_sessionstart(session: pytest.Session) -> None:
    check_programs_run_this_tree()


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip ``linux_only`` tests off Linux (saying why); on Linux they always run,
    under CI=true too."""
    if sys.platform.startswith("linux"):
        return
    for item in items:
        marker = item.get_closest_marker("linux_only")
        if marker is not None:
            why = marker.args[0] if marker.args else "needs Linux"
            item.add_marker(pytest.mark.skip(reason=f"linux_only: {why}"))
