"""The NAT doctor against a real rendezvous and responder on loopback.

Loopback has no NAT, so the classification is "none, open, hairpin" and the
report says it means nothing; what is tested here is the rest: IPv6 through an
announced address, a missing responder, an unreachable or silent rendezvous,
every wait bounded. Port-mapping detection is off (``gateway=None``): it would
ask this machine's real gateway.
"""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from nopf_web.doctor import run_doctor
from nopf_web.rendezvous.doctor import DoctorResponder
from nopf_web.rendezvous.errors import RendezvousUnreachable
from nopf_web.wire.address import Endpoint
from tests.programs import free_port

# On uvloop too: the loop of nopf's commands on Linux (tests/conftest.py).
pytestmark = pytest.mark.uvloop_too


async def test_loopback_is_no_nat_and_ipv6_goes_through_the_announced_address(
        rendezvous: Endpoint) -> None:
    if not socket.has_ipv6:
        pytest.skip("no IPv6 on this machine")
    async with DoctorResponder("127.0.0.1", 0, ("::1",)) as doctor:
        report = await run_doctor(rendezvous, doctor_port=doctor.address[1], gateway=None)
    assert (report.mapping, report.filtering, report.hairpin) == ("none", "open", True)
    assert report.public_address is not None and report.public_address.startswith("127.0.0.1:")
    assert report.ipv6 is True
    assert report.ipv6_address is not None and report.ipv6_address.startswith("[::1]:")
    assert report.rendezvous_is_local and "says nothing about" in report.summary()
    assert report.port_mapping is None and report.reason("port_mapping") == "not asked"
    assert report.cgnat is False
    assert report.elapsed_ms < 1000


async def test_without_a_responder_the_report_says_what_is_missing(
        rendezvous: Endpoint) -> None:
    port = free_port()
    report = await run_doctor(rendezvous, doctor_port=port, gateway=None)
    assert report.public_address is not None
    # no NAT is plain from the discovery alone (public = local); filtering needs the doctor
    assert report.mapping == "none" and report.filtering is None
    assert f"no NAT doctor at 127.0.0.1:{port} (connection refused)" in (
        report.reason("filtering") or "")
    assert report.hairpin is True and report.ipv6 is False


async def test_an_unreachable_rendezvous_raises_one_line() -> None:
    port = free_port()
    started = time.monotonic()
    with pytest.raises(RendezvousUnreachable, match=f"^rendezvous 127.0.0.1:{port}: "
                                                   "connection refused$"):
        await run_doctor(Endpoint("127.0.0.1", port), gateway=None)
    assert time.monotonic() - started < 1.0


async def test_a_silent_rendezvous_costs_the_budget_and_no_more() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accepts, answers nothing
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    started = time.monotonic()
    try:
        with pytest.raises(RendezvousUnreachable,
                           match=f"^rendezvous 127.0.0.1:{port} did not answer within 0.5 s$"):
            await run_doctor(Endpoint("127.0.0.1", port), doctor_port=port, budget=0.5,
                             gateway=None)
    finally:
        server.close()
    assert 0.5 <= time.monotonic() - started < 1.0


async def test_a_name_that_does_not_resolve_is_unreachable() -> None:
    with pytest.raises(RendezvousUnreachable, match="could not resolve"):
        await run_doctor(Endpoint("doctor.invalid", 3012), gateway=None, budget=2.0)
