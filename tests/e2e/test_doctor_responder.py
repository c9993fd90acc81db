"""The NAT doctor's responder (asyncio driver and nopf-server flags), on loopback.

What a NAT does to the dial-back is the lab's business (tests/e2e/test_doctor_lab.py);
here the loopback answers for itself: a listening port accepts ("open"), a closed
one resets ("rst").
"""

from __future__ import annotations

import asyncio
import socket
import subprocess
from collections.abc import AsyncIterator
from typing import IO

import pytest

from nopf_web.rendezvous.doctor import DoctorLimits, DoctorResponder
from nopf_web.wire.address import Endpoint
from nopf_web.wire.doctor import (
    Check,
    DialBack,
    DoctorError,
    FrameReader,
    Seen,
    decode_responder_message,
    encode,
)
from tests.programs import argv, free_port, serving

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too


@pytest.fixture
async def responder() -> AsyncIterator[DoctorResponder]:
    async with DoctorResponder("127.0.0.1", 0, ("::1",), DoctorLimits(dial_burst=2)) as doctor:
        yield doctor


async def exchange(addr: tuple[str, int], message: bytes, *, listen: bool,
                   family: int = socket.AF_INET) -> tuple[list[object], int]:
    """Send ``message`` from a port we also listen on (``listen``); every message back."""
    loop = asyncio.get_running_loop()
    listener = None
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((addr[0], 0))
    port = sock.getsockname()[1]
    if listen:
        listener = socket.socket(family, socket.SOCK_STREAM)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        listener.bind((addr[0], port))
        listener.listen()
    sock.setblocking(False)
    try:
        await loop.sock_connect(sock, addr)
        await loop.sock_sendall(sock, message)
        reader = FrameReader()
        out: list[object] = []
        async with asyncio.timeout(5):
            while chunk := await loop.sock_recv(sock, 4096):
                out += [decode_responder_message(f) for f in reader.feed(chunk)]
        return out, port
    finally:
        sock.close()
        if listener is not None:
            listener.close()


async def test_an_open_port_is_open_and_a_closed_one_resets(
        responder: DoctorResponder) -> None:
    addr = responder.address
    (seen, result), port = await exchange(addr, encode(Check(True, 500)), listen=True)
    assert seen == Seen(Endpoint("127.0.0.1", port), ("::1",))
    assert isinstance(result, DialBack) and result.outcome == "open"
    assert result.source.host == "127.0.0.1" and result.source.port not in (port, addr[1])
    (seen, result), port = await exchange(addr, encode(Check(True, 500)), listen=False)
    assert isinstance(result, DialBack) and result.outcome == "rst" and result.ms < 500


async def test_the_dial_back_rate_limit_holds_on_real_sockets(
        responder: DoctorResponder) -> None:
    for _ in range(2):
        msgs, _port = await exchange(responder.address, encode(Check(True, 300)), listen=False)
        assert isinstance(msgs[1], DialBack)
    msgs, _port = await exchange(responder.address, encode(Check(True, 300)), listen=False)
    assert isinstance(msgs[1], DoctorError) and msgs[1].code == "rate_limited"
    assert responder.stats.refused_rate == 1


async def test_the_other_address_answers_too(responder: DoctorResponder) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    (seen,), port = await exchange(("::1", responder.address[1]), encode(Check(False, 300)),
                                   listen=False, family=socket.AF_INET6)
    assert seen == Seen(Endpoint("::1", port), ())  # the address it reached is not "other"


async def test_leaving_cancels_dials_under_way() -> None:
    loop = asyncio.get_running_loop()
    async with DoctorResponder("127.0.0.1", 0) as doctor:
        sock = socket.socket()
        sock.setblocking(False)
        await loop.sock_connect(sock, doctor.address)
        await loop.sock_sendall(sock, encode(Check(True, 3000)))
        for _ in range(100):
            if doctor.stats.dials:
                break
            await asyncio.sleep(0.01)
    sock.close()
    assert doctor.stats.dials == 1


def read_until(stream: IO[str], marker: str, most: int = 8) -> list[str]:
    """The program's start-up lines up to the first holding ``marker`` (at most ``most``:
    the order of its one-line notices is not part of the contract)."""
    lines: list[str] = []
    while len(lines) < most and not any(marker in line for line in lines):
        line = stream.readline()
        if not line:
            break
        lines.append(line)
    return lines


def test_server_program_starts_the_doctor_on_the_next_port() -> None:
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port),
                 "--doctor-port", str(free_port())) as stderr:
        lines = read_until(stderr, "NAT doctor")
        doctor = next(line for line in lines if "NAT doctor on" in line)
        doctor_port = int(doctor.rsplit(":", 1)[1])
        msgs, _ = asyncio.run(exchange(("127.0.0.1", doctor_port), encode(Check(False, 300)),
                                       listen=False))
        assert isinstance(msgs[0], Seen)


def test_server_program_default_doctor_port_and_no_doctor() -> None:
    port = free_port()
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port)) as stderr:
        lines = read_until(stderr, "NAT doctor")
        # port + 1, unless something else holds it: then the rendezvous runs alone
        assert any(f"NAT doctor on 127.0.0.1:{port + 1}" in line or "NAT doctor off" in line
                   for line in lines), lines
    with serving("nopf-server", "--host", "127.0.0.1", "--port", str(port),
                 "--no-doctor") as stderr:
        line = stderr.readline()
        assert "listening on" in line
        with socket.socket() as s, pytest.raises(ConnectionRefusedError):
            s.connect(("127.0.0.1", port + 1))


def test_server_program_doctor_port_in_use_is_one_line_when_asked_for() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        taken = busy.getsockname()[1]
        proc = subprocess.run(argv("nopf-server", "--host", "127.0.0.1", "--port",
                                   str(free_port()), "--doctor-port", str(taken)),
                              capture_output=True, text=True, timeout=20)
    assert proc.returncode == 1
    assert f"cannot listen on 127.0.0.1:{taken} for the NAT doctor" in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(("args", "needle"), [
    (["--doctor-port", "70000"], "--doctor-port"),
    (["--no-doctor", "--doctor-port", "4000"], "--no-doctor cannot be combined"),
    (["--doctor-address", "not-an-ip"], "is not an IP address"),
    (["--port", "4000", "--doctor-port", "4000"], "must differ from --port"),
    (["--port", "65535"], "give --doctor-port"),
])
def test_server_program_bad_doctor_flags_are_one_line(args: list[str], needle: str) -> None:
    proc = subprocess.run(argv("nopf-server", *args), capture_output=True, text=True,
                          timeout=20)
    assert proc.returncode == 2
    assert proc.stderr.count("\n") == 1 and needle in proc.stderr
