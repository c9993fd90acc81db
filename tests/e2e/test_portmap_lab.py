"""The port mapper against the lab's test gateway (tests/lab/gateway.py) in ``nata``.

Site a's NAT is in ``rst`` mode, so an unmapped port answers a SYN from the
internet with a reset: "closed" is a quick ECONNREFUSED, and "open" is a real
TCP connection from b1 (behind the other NAT) through nata's DNAT to a1.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from ipaddress import IPv4Address
from typing import Any, TypeVar

import pytest

from nopf_web.portmap import (
    Mapping,
    MapProtocol,
    PortMapper,
    is_cgnat,
    unusable_reason,
    usable,
)
from tests.lab import gateway as lab_gateway
from tests.lab.fixtures import LabFactory
from tests.lab.topology import Host, Lab

pytestmark = pytest.mark.lab

T = TypeVar("T")
PORT = 5000
PUBLIC_A = "203.0.113.2"  # nata's WAN address
PUBLIC_B = "192.0.2.2"  # natb's: where b1's connections come from
GATEWAY_NAME = {MapProtocol.NATPMP: "natpmp", MapProtocol.PCP: "pcp", MapProtocol.UPNP: "upnp"}
OFF = {  # what the gateway turns off so that only this protocol answers
    MapProtocol.NATPMP: ("pcp", "upnp"),
    MapProtocol.PCP: ("natpmp", "upnp"),
    MapProtocol.UPNP: ("natpmp", "pcp"),
}


# --------------------------------------------------------------------------- helpers


def connect_from(host: Host, address: str, port: int) -> str:
    """TCP connect from ``host`` and send "hello": "ok", "timeout" or the errno name."""
    return host.attempt((address, port), 1.0, send=b"hello")


def accept_from(server: socket.socket) -> tuple[str, bytes]:
    conn, peer = server.accept()
    with conn:
        conn.settimeout(3)
        return peer[0], conn.recv(16)


def mapper(**kw: Any) -> PortMapper:
    kw.setdefault("timeout", 0.25)
    return PortMapper(**kw)


@pytest.fixture
def lab(lab_factory: LabFactory) -> Iterator[Lab]:
    yield lab_factory("rst", "drop")


def assert_closed(lab: Lab, gw: lab_gateway.GatewayProcess, port: int) -> None:
    assert gw.rules() == "", "an nft rule of the gateway is left"
    assert connect_from(lab.b1, PUBLIC_A, port) == "ECONNREFUSED"


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("protocol", list(MapProtocol), ids=lambda p: p.value)
def test_each_protocol_alone_opens_renews_and_closes_the_port(
        lab: Lab, protocol: MapProtocol) -> None:
    gw = lab_gateway.start(lab.nata, off=OFF[protocol], extra=["--max-lifetime", "2"])
    assert connect_from(lab.b1, PUBLIC_A, PORT) == "ECONNREFUSED"  # closed before

    async def main() -> tuple[Mapping, list[str], tuple[str, str], tuple[str, bytes], int]:
        server = lab.a1.listener(PORT, timeout=3)
        with server:
            async with mapper() as m:
                # UPnP-IGD v1 cannot answer with a shorter lease: it asks 2 s itself
                lifetime = 2 if protocol is MapProtocol.UPNP else 3600
                mapping = await m.map_tcp(PORT, lifetime=lifetime)
                assert mapping is not None, m.reasons
                first = await asyncio.to_thread(connect_from, lab.b1, PUBLIC_A,
                                                mapping.external_port)
                peer = await asyncio.to_thread(accept_from, server)
                # past the first lifetime (2 s): only a renewal keeps the port open
                await asyncio.sleep(2.6)
                later = await asyncio.to_thread(connect_from, lab.b1, PUBLIC_A,
                                                mapping.external_port)
                await asyncio.to_thread(accept_from, server)
                return mapping, list(m.reasons), (first, later), peer, m.renewals

    mapping, reasons, (first, later), peer, renewals = lab.a1.run_async(main)
    assert mapping.protocol is protocol
    assert mapping.external_address == IPv4Address(PUBLIC_A)
    assert mapping.internal_address == IPv4Address(lab.a1.ip)
    assert mapping.internal_port == PORT
    assert (first, later) == ("ok", "ok")
    assert peer == (PUBLIC_B, b"hello")  # b1's connection, through both NATs
    assert mapping.lifetime == 2  # NAT-PMP and PCP: clamped by the gateway
    assert renewals >= 2
    assert len(gw.seen("map", protocol=GATEWAY_NAME[protocol], renewal=True)) >= 2
    assert not gw.seen("delete", why="expiry")
    assert len(reasons) == 2  # the two protocols the gateway does not speak
    gw.wait_for("delete", why="request")
    assert_closed(lab, gw, mapping.external_port)


@pytest.mark.parametrize("table", ["shared", "separate"])
def test_the_race_picks_one_when_all_answer(lab: Lab, table: str) -> None:
    gw = lab_gateway.start(lab.nata, extra=["--separate"] if table == "separate" else [])

    async def main() -> tuple[Mapping, tuple[str, ...], str]:
        async with mapper() as m:
            mapping = await m.map_tcp(PORT)
            assert mapping is not None, m.reasons
            await asyncio.sleep(0.5)  # losers settle (tidy up what they were granted)
            return mapping, m.reasons, await asyncio.to_thread(gw.rules)

    mapping, reasons, rules = lab.a1.run_async(main)
    assert mapping.protocol in set(MapProtocol)
    losers = {p.value for p in MapProtocol} - {mapping.protocol.value}
    assert {r.split(":")[0] for r in reasons} == losers, reasons
    # while mapped, only the winner's port is open: a DNAT and a forward rule
    assert len(rules.splitlines()) == 2, rules
    assert f"dport {mapping.external_port} dnat" in rules
    created = gw.seen("map", renewal=False)
    deleted = gw.wait_for("delete", why="request") and gw.seen("delete")
    assert len(deleted) == len(created)
    assert_closed(lab, gw, mapping.external_port)


def test_a_lying_gateway_is_flagged_unusable(lab: Lab) -> None:
    gw = lab_gateway.start(lab.nata, external_ip="100.64.7.7")

    seen: list[str] = []

    def rendezvous() -> None:  # what a server on the internet sees of a1
        server = lab.rdv.listener(3012, timeout=3)
        with server:
            conn, peer = server.accept()
            conn.close()
            seen.append(peer[0])

    thread = threading.Thread(target=rendezvous)
    thread.start()
    time.sleep(0.1)

    async def main() -> tuple[Mapping, str]:
        async with mapper() as m:
            mapping = await m.map_tcp(PORT)
            assert mapping is not None, m.reasons
            status = await asyncio.to_thread(connect_from, lab.a1, lab.rdv.ip, 3012)
            return mapping, status

    mapping, status = lab.a1.run_async(main)
    thread.join(5)
    assert status == "ok" and seen == [PUBLIC_A]
    assert mapping.external_address == IPv4Address("100.64.7.7")
    assert is_cgnat(mapping.external_address)
    assert not usable(mapping, seen[0])
    reason = unusable_reason(mapping, seen[0])
    assert reason is not None and "carrier-grade" in reason and PUBLIC_A in reason
    assert usable(mapping, "100.64.7.7")
    gw.wait_for("delete", why="request")
    assert gw.rules() == ""


def assert_waited_its_budget(reason: str, name: str) -> None:
    """``reason`` says the race's 250 ms went by without an answer. It gives the time
    really waited: a timer late under load says a little more (CI saw 260 ms), never
    more than the whole attempt's bound (0.4 s)."""
    prefix = f"{name}: no answer from 10.0.1.1 within "
    assert reason.startswith(prefix) and reason.endswith(" ms"), reason
    assert 250 <= int(reason[len(prefix):-len(" ms")]) < 400, reason


def test_a_silent_gateway_gives_none_with_a_reason_per_protocol(lab: Lab) -> None:
    lab_gateway.start(lab.nata, extra=["--silent"])

    async def main() -> tuple[Mapping | None, tuple[str, ...], float]:
        async with mapper() as m:
            start = time.monotonic()
            mapping = await m.map_tcp(PORT)
            return mapping, m.reasons, time.monotonic() - start

    mapping, reasons, elapsed = lab.a1.run_async(main)
    assert mapping is None
    assert [r.split(":")[0] for r in reasons] == ["NAT-PMP", "PCP", "UPnP-IGD"]
    assert_waited_its_budget(reasons[0], "NAT-PMP")
    assert_waited_its_budget(reasons[1], "PCP")
    assert reasons[2].startswith("UPnP-IGD: no SSDP answer from 10.0.1.1 within 250 ms")
    assert elapsed < 0.4


def test_no_gateway_service_fails_fast(lab: Lab) -> None:
    async def main() -> tuple[tuple[str, ...], float]:
        async with mapper() as m:
            start = time.monotonic()
            assert await m.map_tcp(PORT) is None
            return m.reasons, time.monotonic() - start

    reasons, elapsed = lab.a1.run_async(main)
    assert "refused (ICMP port unreachable on 5351)" in reasons[0]
    assert "refused (ICMP port unreachable on 5351)" in reasons[1]
    assert "no SSDP answer" in reasons[2]
    assert elapsed < 0.4


def test_permanent_only_upnp_leases_are_refused(lab: Lab) -> None:
    gw = lab_gateway.start(lab.nata, off=OFF[MapProtocol.UPNP], extra=["--only-permanent"])

    async def main() -> tuple[Mapping | None, tuple[str, ...]]:
        async with mapper(protocols=[MapProtocol.UPNP]) as m:
            return await m.map_tcp(PORT), m.reasons

    mapping, reasons = lab.a1.run_async(main)
    assert mapping is None
    assert reasons == ("UPnP-IGD: the gateway grants only permanent leases (725); refused, "
                       "a crash would leave the mapping",)
    assert not gw.seen("map") and gw.rules() == ""


@pytest.mark.parametrize("protocol", [MapProtocol.NATPMP, MapProtocol.PCP],
                         ids=lambda p: p.value)
def test_a_gateway_answering_too_late_keeps_no_mapping(lab: Lab, protocol: MapProtocol) -> None:
    # it makes the mapping at once but answers after the race gave up (250 ms)
    gw = lab_gateway.start(lab.nata, off=OFF[protocol], extra=["--answer-delay-ms", "400"])

    async def main() -> tuple[Mapping | None, tuple[str, ...]]:
        async with mapper() as m:
            return await m.map_tcp(PORT), m.reasons

    mapping, reasons = lab.a1.run_async(main)
    assert mapping is None
    assert_waited_its_budget(reasons[list(MapProtocol).index(protocol)], protocol.value)
    assert gw.seen("map", renewal=False)
    gw.wait_for("delete", why="request")
    assert gw.rules() == ""


def test_cancelling_map_tcp_mid_race_keeps_no_mapping(lab: Lab) -> None:
    gw = lab_gateway.start(lab.nata, off=OFF[MapProtocol.PCP],
                           extra=["--answer-delay-ms", "1000"])

    async def main() -> None:
        async with mapper(timeout=3.0) as m:
            task = asyncio.create_task(m.map_tcp(PORT), name="race")
            await asyncio.to_thread(gw.wait_for, "answer-held", 5.0)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                async with asyncio.timeout(3):
                    await task

    lab.a1.run_async(main)
    gw.wait_for("delete", 2.0, why="request")
    assert gw.rules() == ""


@pytest.mark.parametrize("protocol", list(MapProtocol), ids=lambda p: p.value)
def test_cancellation_mid_renewal_deletes_the_mapping(lab: Lab, protocol: MapProtocol) -> None:
    gw = lab_gateway.start(lab.nata, off=OFF[protocol],
                           extra=["--max-lifetime", "2", "--renew-delay-ms", "1500"])

    async def main() -> int:
        mapped = asyncio.Event()
        port: list[int] = []

        async def hold() -> None:
            async with mapper(protocols=[protocol]) as m:
                mapping = await m.map_tcp(PORT, lifetime=2)
                assert mapping is not None, m.reasons
                port.append(mapping.external_port)
                mapped.set()
                await asyncio.sleep(3600)

        task = asyncio.create_task(hold(), name="holder")
        async with asyncio.timeout(5):
            await mapped.wait()
        # the renewal at 1 s is answered 1.5 s late: cancel while it is in flight
        await asyncio.to_thread(gw.wait_for, "renew-received", 5.0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            async with asyncio.timeout(3):
                await task
        return port[0]

    port = lab.a1.run_async(main)
    event = gw.wait_for("delete", 2.0)
    assert event["why"] == "request"
    assert_closed(lab, gw, port)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_cli_deletes_the_mapping_on_signal(lab: Lab, sig: signal.Signals) -> None:
    gw = lab_gateway.start(lab.nata)
    proc = lab.a1.popen([sys.executable, "-m", "nopf_web.portmap", "map", str(PORT)],
                        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                        env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.stdout is not None
    line = proc.stdout.readline().decode()
    assert line.startswith(f"mapped TCP {PUBLIC_A}:"), line
    assert gw.rules()
    proc.send_signal(sig)
    assert proc.wait(5) == 0
    gw.wait_for("delete", why="request")
    assert_closed(lab, gw, int(line.split(":")[1].split()[0]))


def test_detect_names_the_protocols_that_answer(lab: Lab) -> None:
    gw = lab_gateway.start(lab.nata, off=["pcp"])

    async def main() -> Any:
        async with mapper() as m:
            return await m.detect()

    detection = lab.a1.run_async(main)
    assert detection.gateway == IPv4Address(lab.nata.lan_ip)
    assert detection.answering == (MapProtocol.NATPMP, MapProtocol.UPNP)
    natpmp, pcp, upnp = detection.probes
    assert natpmp.external_address == upnp.external_address == IPv4Address(PUBLIC_A)
    assert "NAT-PMP" in pcp.detail  # a NAT-PMP-only gateway's Unsupported Version
    assert not gw.seen("map") and gw.rules() == ""


def test_time_to_a_mapping(lab: Lab) -> None:
    """Median of 10 per protocol alone and for the race (printed with -s)."""
    figures: dict[str, float] = {}
    for name, options in [*((p.value, OFF[p]) for p in MapProtocol), ("race", ())]:
        gw = lab_gateway.start(lab.nata, off=options)

        async def main() -> list[float]:
            times = []
            for _ in range(10):
                async with mapper() as m:
                    start = time.monotonic()
                    mapping = await m.map_tcp(PORT)
                    times.append(time.monotonic() - start)
                    assert mapping is not None, m.reasons
            return times

        times = lab.a1.run_async(main, timeout=60)
        figures[name] = statistics.median(times) * 1000
        gw.stop()
        assert gw.rules() == ""
    print("\ntime to a mapping (median of 10, ms): " +
          ", ".join(f"{k} {v:.1f}" for k, v in figures.items()))
    assert all(v < 250 for v in figures.values()), figures
