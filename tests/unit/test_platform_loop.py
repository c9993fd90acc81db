"""The event loop of each platform: uvloop on Linux, asyncio's selector loop on Windows
(and macOS); on Windows, code that waits for socket readiness says so in one line on a
loop without add_reader/add_writer (Windows' default Proactor), here emulated by a loop
that lacks them."""

from __future__ import annotations

import asyncio
import signal
import socket
import sys
from collections.abc import Callable
from typing import Any

import pytest

from nopf_web.cli import common, peer
from nopf_web.punch.driver import PunchDriver
from nopf_web.punch.machine import PunchConfig, Tactic
from nopf_web.sessions.seed import SeedEngine, SeedSpec
from nopf_web.sockets import ReadinessUnsupported, require_readiness, wait_ready
from nopf_web.wire.address import Endpoint


class ProactorLikeLoop(asyncio.SelectorEventLoop):
    """What matters of Windows' ProactorEventLoop: no readiness callbacks."""

    def add_reader(self, fd: Any, callback: Any, *args: Any) -> None:  # type: ignore[override]
        raise NotImplementedError

    def add_writer(self, fd: Any, callback: Any, *args: Any) -> None:  # type: ignore[override]
        raise NotImplementedError

    def remove_reader(self, fd: Any) -> bool:
        raise NotImplementedError

    def remove_writer(self, fd: Any) -> bool:
        raise NotImplementedError


def run_on(factory: Callable[[], asyncio.AbstractEventLoop], coro: Any) -> Any:
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(coro)


def run_main_waiting_for_readiness(loop_ok: Callable[[asyncio.AbstractEventLoop], bool]) -> int:
    """``run_main`` of a coroutine that checks its loop with ``loop_ok``, then waits for
    a socket's readiness (what the punch and the seed session need of a loop)."""
    async def main() -> int:
        assert loop_ok(asyncio.get_running_loop())
        a, b = socket.socketpair()
        with a, b:
            a.setblocking(False)
            b.send(b"x")
            async with asyncio.timeout(5):
                await wait_ready(a, write=False)
        return 7

    saved = {sig: signal.getsignal(sig) for sig in common.STOP_SIGNALS}
    try:
        return common.run_main(main())
    finally:  # run_main holds stop signals until the process exits: not pytest's
        for sig, handler in saved.items():
            signal.signal(sig, handler)


def test_windows_gets_the_selector_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    assert common.event_loop_factory("win32") is asyncio.SelectorEventLoop
    assert common.event_loop_factory("darwin") is asyncio.new_event_loop
    monkeypatch.setattr(sys, "platform", "win32")
    assert common.event_loop_factory() is asyncio.SelectorEventLoop
    assert common.raise_open_files_limit() == 512  # no resource module asked on Windows


def test_run_main_runs_on_the_factorys_loop_and_readiness_works(
        monkeypatch: pytest.MonkeyPatch) -> None:
    made: list[asyncio.AbstractEventLoop] = []

    def factory() -> asyncio.AbstractEventLoop:
        made.append(asyncio.SelectorEventLoop())
        return made[-1]

    monkeypatch.setattr(common, "event_loop_factory", lambda: factory)
    assert run_main_waiting_for_readiness(lambda loop: loop is made[0]) == 7
    assert len(made) == 1


@pytest.mark.linux_only("uvloop is a dependency on Linux only")
def test_the_commands_run_on_uvloop_on_linux() -> None:
    import uvloop

    assert common.event_loop_factory("linux") is uvloop.new_event_loop
    assert common.event_loop_factory() is uvloop.new_event_loop
    with pytest.MonkeyPatch.context() as mp:  # not installed: asyncio's loop, no error
        mp.setitem(sys.modules, "uvloop", None)
        assert common.event_loop_factory("linux") is asyncio.new_event_loop

    assert run_main_waiting_for_readiness(lambda loop: isinstance(loop, uvloop.Loop)) == 7


def test_readiness_waits_fail_in_one_line_without_add_reader() -> None:
    async def main() -> None:
        a, b = socket.socketpair()
        with a, b:
            await wait_ready(a, write=False)

    with pytest.raises(ReadinessUnsupported) as caught:
        run_on(ProactorLikeLoop, main())
    message = str(caught.value)
    assert "\n" not in message
    assert "ProactorLikeLoop" in message and "add_reader" in message
    assert "SelectorEventLoop" in message


def test_a_known_proactor_is_refused_before_any_socket(monkeypatch: pytest.MonkeyPatch) -> None:
    # asyncio.ProactorEventLoop exists on Windows only; here the stand-in plays it.
    monkeypatch.setattr(asyncio, "ProactorEventLoop", ProactorLikeLoop, raising=False)

    async def punch() -> None:
        require_readiness()

    with pytest.raises(ReadinessUnsupported):
        run_on(ProactorLikeLoop, punch())
    driver = PunchDriver(("127.0.0.1", 0), ("127.0.0.1", 9), Tactic.CONNECT,
                         PunchConfig(timeout=1))
    with pytest.raises(ReadinessUnsupported):
        run_on(ProactorLikeLoop, driver.run())
    run_on(asyncio.SelectorEventLoop, punch())  # the selector loop passes


def test_an_engine_fails_with_the_one_line_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(asyncio, "ProactorEventLoop", ProactorLikeLoop, raising=False)
    engine = SeedEngine(SeedSpec(role="client", local_port=1, rendezvous=Endpoint("127.0.0.1", 9),
                                 bind_host="127.0.0.1"))
    with pytest.raises(ReadinessUnsupported):
        run_on(ProactorLikeLoop, engine.run())
    assert engine.error is not None and "event loop cannot wait" in engine.error


def test_the_nopf_command_prints_one_line_on_such_a_loop(
        monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setattr(asyncio, "ProactorEventLoop", ProactorLikeLoop, raising=False)
    monkeypatch.setattr(common, "event_loop_factory", lambda: ProactorLikeLoop)
    code = peer.main(["-p", "40999", "-a", "127.0.0.1:9", "--no-guard"])
    err = capsys.readouterr().err
    assert code == common.EXIT_FAILURE
    errors = [line for line in err.splitlines() if "error" in line]
    assert errors == [line for line in err.splitlines() if line.startswith("nopf: error: ")]
    assert len(errors) == 1 and "cannot wait for socket readiness" in errors[0]
    assert "Traceback" not in err
