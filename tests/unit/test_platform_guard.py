"""The packet guard on Windows, as far as it can run here: the WinDivert filter strings
the guard opens for a session's windows, compiled and evaluated by pydivert's filter
language (WinDivert's compiler: bundled in libebpfdivert on Linux, WinDivert.dll on
Windows), and the one-line reasons a Windows user sees when the guard cannot run."""

from __future__ import annotations

import asyncio
import ctypes
import socket
import struct
import sys
import threading
from types import SimpleNamespace
from typing import Any, ClassVar

import pytest

from nopf_web.guard import divert, make_guard
from nopf_web.guard.divert import compile_error, filter_matches
from nopf_web.guard.service import DivertGuard

needs_filter_backend = pytest.mark.skipif(
    sys.platform == "darwin", reason="pydivert has no macOS backend, so no filter compiler")

RDV = ("198.51.100.2", 3012)
PEER = ("192.0.2.2", 40001)
PUNCH_PORT = 40000
FIN, SYN, RST, ACK = 0x01, 0x02, 0x04, 0x10


def packet(src: tuple[str, int], dst: tuple[str, int], flags: int) -> bytes:
    tcp = struct.pack("!HHIIBBHHH", src[1], dst[1], 1000, 2000 if flags & ACK else 0,
                      5 << 4, flags, 64240, 0, 0)
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), 1, 0, 64, socket.IPPROTO_TCP, 0,
                     socket.inet_aton(src[0]), socket.inet_aton(dst[0]))
    return ip + tcp


class RecordingHandle:
    """Stands in for the WinDivert handle (no driver here): records the filter the
    guard opens, receives nothing, closes when told."""

    opened: ClassVar[list[str]] = []

    def __init__(self, expr: str) -> None:
        self.expr = expr
        RecordingHandle.opened.append(expr)
        self._closed = threading.Event()

    def recv(self, timeout: float) -> divert.Captured | None:
        if self._closed.wait(timeout):
            raise divert.HandleShutDown("closed")
        return None

    def wake(self) -> None:
        self._closed.set()

    def reinject(self, captured: divert.Captured) -> None:
        raise AssertionError("nothing is captured here")

    def close(self) -> None:
        self._closed.set()


@needs_filter_backend
async def test_the_filters_the_guard_opens_are_valid_windivert_filters(
        monkeypatch: pytest.MonkeyPatch) -> None:
    RecordingHandle.opened = []
    monkeypatch.setattr(divert, "Handle", RecordingHandle)
    guard = DivertGuard(poll_interval=0.01)
    async with guard:
        # A seed session's two windows: discovery (any local port to the rendezvous),
        # then the punch (the punch port to the peer).
        async with guard.protect(0, RDV) as discovery:
            pass
        async with guard.protect(PUNCH_PORT, PEER) as punch:
            pass
    assert discovery.guarded and punch.guarded
    discovery_filter, punch_filter = RecordingHandle.opened
    assert punch_filter == (
        "outbound and tcp and tcp.SrcPort == 40000 and ip.DstAddr == 192.0.2.2 and "
        "tcp.DstPort == 40001 and ip.TOS != 4 and (tcp.Rst or (tcp.Fin and tcp.Ack))")
    for expr in (discovery_filter, punch_filter):
        assert compile_error(expr) is None, expr
    me = ("10.0.1.2", PUNCH_PORT)
    cases = [  # (packet, outbound, dropped by the punch window)
        (packet(me, PEER, RST | ACK), True, True),
        (packet(me, PEER, FIN | ACK), True, True),
        (packet(me, PEER, SYN), True, False),
        (packet(me, PEER, SYN | ACK), True, False),  # the simultaneous open's SYN-ACK
        (packet(PEER, me, SYN), False, False),
        (packet(me, ("192.0.2.3", 40001), RST), True, False),
    ]
    for raw, outbound, dropped in cases:
        assert filter_matches(punch_filter, raw, outbound=outbound) is dropped
    assert filter_matches(discovery_filter, packet(("10.0.1.2", 51234), RDV, FIN | ACK),
                          outbound=True)


def test_describe_windivert_errors_in_one_line() -> None:
    for code, words in [(1275, "Windows blocked the WinDivert driver (error 1275"),
                        (577, "signature"), (5, "needs Administrator on Windows"),
                        (1753, "Base Filtering Engine"), (654, "incompatible")]:
        exc = OSError(22, "the system's own words")
        exc.winerror = code  # type: ignore[attr-defined]  # as ctypes.WinError sets it
        text = divert._describe_open_error(exc)
        assert words in text and text.endswith(": running without it")
        assert "\n" not in text
    plain = divert._describe_open_error(OSError(99, "other"))
    assert "pydivert could not open a handle" in plain


def fake_pydivert(error: OSError) -> Any:
    class Divert:
        def __init__(self, expr: str, layer: object) -> None:
            self.expr = expr

        def open(self) -> None:
            raise error

    return SimpleNamespace(Divert=Divert, Layer=SimpleNamespace(NETWORK=0))


def test_windows_without_administrator(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "windll", SimpleNamespace(
        shell32=SimpleNamespace(IsUserAnAdmin=lambda: 0)), raising=False)
    guard = make_guard()
    assert not guard.active
    assert f"nopf: guard inactive: {guard.reason}" == (
        "nopf: guard inactive: the packet guard needs Administrator on Windows (to load the "
        "WinDivert driver): running without it")


def test_windows_with_the_driver_blocked(monkeypatch: pytest.MonkeyPatch) -> None:
    blocked = OSError(22, "This driver has been blocked from loading")
    blocked.winerror = 1275  # type: ignore[attr-defined]
    monkeypatch.setattr(sys, "platform", "win32")
    monkeypatch.setattr(ctypes, "windll", SimpleNamespace(
        shell32=SimpleNamespace(IsUserAnAdmin=lambda: 1)), raising=False)
    monkeypatch.setattr(divert, "_pydivert", lambda: fake_pydivert(blocked))
    guard = make_guard()
    assert not guard.active
    assert f"nopf: guard inactive: {guard.reason}" == (
        "nopf: guard inactive: Windows blocked the WinDivert driver (error 1275, "
        "ERROR_DRIVER_BLOCKED: security software, Memory integrity, or a virtual machine "
        "without driver support): running without it")


def test_macos_has_no_guard_and_says_so(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "platform", "darwin")
    guard = make_guard()
    assert not guard.active
    assert guard.reason == ("the packet guard has no backend on darwin (pydivert supports "
                            "Linux and Windows): running without it")


async def test_an_inactive_guard_still_lets_a_window_run(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # What every engine does on a system without the guard: protect() is a no-op.
    with monkeypatch.context() as m:
        m.setattr(sys, "platform", "darwin")
        guard = make_guard()
    async with guard.protect(PUNCH_PORT, PEER) as window:
        await asyncio.sleep(0)
    assert not window.guarded and window.dropped == 0
