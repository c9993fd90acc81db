"""``nopf-web`` opening the dashboard in a browser: when it does (Windows, macOS, a
Linux desktop) and when not (--no-browser, no display, SSH, CI and tests), and that
it opens the URL it printed (with the token in LAN mode) once it listens."""

from __future__ import annotations

import asyncio
import sys
import webbrowser
from pathlib import Path

import pytest

from nopf_web.cli import web
from nopf_web.web import WebConfig
from nopf_web.wire.address import Endpoint

DESKTOP = {"DISPLAY": ":0", "HOME": "/home/u"}


@pytest.mark.parametrize(("env", "platform", "why"), [
    ({}, "win32", None),
    ({}, "darwin", None),
    (DESKTOP, "linux", None),
    ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", None),
    ({}, "linux", "no graphical display"),
    ({"HOME": "/root"}, "freebsd14", "no graphical display"),
    ({**DESKTOP, "SSH_CONNECTION": "198.51.100.7 50000 10.0.0.2 22"}, "linux", "an SSH session"),
    ({"SSH_TTY": "/dev/pts/1"}, "darwin", "an SSH session"),
    ({**DESKTOP, "CI": "true"}, "linux", "running under CI or tests"),
    ({"CI": "true"}, "win32", "running under CI or tests"),
    ({"PYTEST_CURRENT_TEST": "x"}, "darwin", "running under CI or tests"),
])
def test_when_the_browser_opens(env: dict[str, str], platform: str, why: str | None) -> None:
    assert web.browser_refusal(env, platform) == why


def test_no_browser_flag_and_a_missing_display_win(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("CI", "PYTEST_CURRENT_TEST", "SSH_CONNECTION", "SSH_CLIENT", "SSH_TTY",
                 "WAYLAND_DISPLAY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DISPLAY", ":0")
    parser = web.build_parser()
    monkeypatch.setattr(sys, "platform", "linux")
    assert web._wants_browser(parser.parse_args([]))
    assert not web._wants_browser(parser.parse_args(["--no-browser"]))
    monkeypatch.delenv("DISPLAY")
    assert not web._wants_browser(parser.parse_args([]))  # a Linux box without a display
    monkeypatch.setattr(sys, "platform", "win32")
    assert not web._wants_browser(parser.parse_args(["--no-browser"]))


async def serve_until_listening(config: WebConfig, browser: bool, opened: list[str],
                                capsys: pytest.CaptureFixture[str]) -> tuple[str, str]:
    """Run the dashboard until it has said it is ready (and, with ``browser``, opened
    the browser); its stdout and stderr."""
    out = err = ""
    task = asyncio.create_task(web.serve(config, browser=browser), name="test-nopf-web")
    try:
        async with asyncio.timeout(10):
            while not (opened if browser else "press Ctrl+C" in err):
                assert not task.done(), err
                await asyncio.sleep(0.02)
                got = capsys.readouterr()
                out, err = out + got.out, err + got.err
        await asyncio.sleep(0.1)  # anything opened after "ready" would be caught below
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    got = capsys.readouterr()
    return out + got.out, err + got.err


def recording(opened: list[str]) -> object:
    def open_(url: str) -> bool:
        opened.append(url)
        return True
    return open_


def config(tmp_path: Path, host: str = "127.0.0.1") -> WebConfig:
    return WebConfig(db_path=tmp_path / "h.db", host=host, port=0,
                     rendezvous_listen=Endpoint("127.0.0.1", 0), guard=False)


@pytest.mark.parametrize("lan", [False, True])
async def test_the_printed_url_is_opened_once_listening(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
        lan: bool) -> None:
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", recording(opened))
    cfg = config(tmp_path, "0.0.0.0" if lan else "127.0.0.1")
    out, err = await serve_until_listening(cfg, True, opened, capsys)
    assert opened == [out.splitlines()[0]]
    assert ("?token=" in opened[0]) is lan
    assert "opened the dashboard in your browser" in err


async def test_without_browser_nothing_is_opened(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    opened: list[str] = []
    monkeypatch.setattr(webbrowser, "open", recording(opened))
    out, err = await serve_until_listening(config(tmp_path), False, opened, capsys)
    assert out.startswith("http://127.0.0.1:")
    assert opened == [] and "opened the dashboard" not in err
