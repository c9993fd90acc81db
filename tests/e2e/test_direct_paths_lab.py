"""More direct paths, with the real programs in the namespace lab (issue 17):

- two sites behind symmetric IPv4 NATs, with global IPv6 behind stateful firewalls,
  connect directly over IPv6: the bytes cross the sites' routers as IPv6 and the
  rendezvous host sees none of them;
- a sharer whose gateway maps a port (NAT-PMP, PCP, UPnP-IGD: each alone, and all
  three) and a connector behind a symmetric NAT connect directly through the mapped
  port, and the mapping is gone after the sharer exits (SIGINT and SIGTERM);
- a gateway whose external address differs from what the rendezvous sees (a second
  NAT in front of it) is not used: the pair goes through the relay;
- two dashboards take the mapped port, and stopping the sharing session (the
  dashboard still running) deletes the mapping.
"""

from __future__ import annotations

import re
import signal
import time
from pathlib import Path

import pytest

from tests.lab import Lab, gateway as lab_gateway
from tests.lab.fixtures import LabFactory

from .peers import (
    SERVICE,
    SIZE,
    TUNNEL,
    Peer,
    echo_service_on,
    round_trip,
    start_coordinated,
    start_rendezvous,
    stop,
    wait_for,
)
from .web_lab import Dashboard, both_connected, ended, join, share, two_dashboards

pytestmark = pytest.mark.lab

start = start_coordinated

PUBLIC_A = "203.0.113.2"  # nata's WAN address


def tunnel_up(s: Peer, c: Peer) -> tuple[str, str]:
    """The sharer's and the connector's stderr once each says its tunnel is up."""
    return wait_for(s, "encrypted tunnel to"), wait_for(c, "encrypted tunnel to")


@pytest.mark.parametrize(("left", "right"), [
    ("symmetric", "symmetric"),  # IPv4: relay only; IPv6 firewalls drop
    ("rst", "icmp"),  # IPv4 punchable; IPv6 firewalls refuse with RST / ICMPv6: IPv6 first
])
def test_sites_with_ipv6_connect_directly_over_ipv6(
        lab_factory: LabFactory, left: str, right: str) -> None:
    lab = lab_factory(left, right, ipv6=True)
    rdv = start_rendezvous(lab)
    rdv_bytes = lab.tcp_counter(lab.rdv, 3012)
    with echo_service_on(lab.a1):
        s = start(lab.a1, "share", "-p", str(SERVICE))
        c = start(lab.b1, "connect", s.line(10), "-p", str(TUNNEL))
        try:
            err_s, err_c = tunnel_up(s, c)
            assert f"tunnel up to [{lab.b1.ip6}]:" in err_s and "over IPv6" in err_s, (err_s, err_c)
            assert f"tunnel up to [{lab.a1.ip6}]:" in err_c and "over IPv6" in err_c, err_c
            # Predicted so at the fire, before the first SYN, whatever the IPv4 NATs.
            for err in (err_s, err_c):
                assert "predicted path ipv6: Both peers offered global IPv6" in err, err
            coordination = rdv_bytes.read()[1]
            v6_before = lab.forwarded6("a"), lab.forwarded6("b")
            round_trip(lab.b1)
            v6_after = lab.forwarded6("a"), lab.forwarded6("b")
        finally:
            codes = (stop(s)[0], c.wait(10))  # the joiner sees the peer close and ends
    assert codes == (0, 0), (s.stderr(), c.stderr())
    # The tunnel's bytes crossed both sites' routers as IPv6 (2 x SIZE plus overhead)...
    for before, after in zip(v6_before, v6_after, strict=True):
        assert after - before > 2 * SIZE, (v6_before, v6_after)
    # ...and the rendezvous host saw none of them: only the coordination.
    total = rdv_bytes.read()[1]
    assert total - coordination < 10_000 and total < 60_000, (coordination, total)
    rdv.terminate()
    logged = re.findall(r"predicted path (\w+): ", rdv.communicate(timeout=10)[1].decode())
    assert logged == ["ipv6"], logged  # the rendezvous predicted the same


def mapped_pair(lab: Lab, sig: signal.Signals, *, off: tuple[str, ...] = ()) -> None:
    """A mapped sharer (a1) and a symmetric connector (b1): a direct tunnel through the
    mapped port; after the sharer's exit by ``sig`` the gateway has no mapping left."""
    gw = lab_gateway.start(lab.nata, off=list(off))
    start_rendezvous(lab)
    rdv_bytes = lab.tcp_counter(lab.rdv, 3012)
    with echo_service_on(lab.a1):
        s = start(lab.a1, "share", "-p", str(SERVICE))
        code = s.line(10)
        err = wait_for(s, "offering the mapped port")
        assert f"port mapping: TCP {PUBLIC_A}:" in err, err
        assert gw.rules(), "the gateway made no rule"
        c = start(lab.b1, "connect", code, "-p", str(TUNNEL))
        try:
            err_s, err_c = tunnel_up(s, c)
            assert "over a mapped port" in err_s, err_s
            for err in (err_s, err_c):  # predicted so at the fire, before the first SYN
                assert "predicted path mapped: The sharer's gateway mapped a port" in err, err
            assert f"tunnel up to {PUBLIC_A}:" in err_c and "over a mapped port" in err_c, err_c
            coordination = rdv_bytes.read()[1]
            round_trip(lab.b1, 1 << 20)
        finally:
            s_code = stop(s, sig=sig)[0]  # the sharer's exit by this signal is the test
            # The connector ends by itself (the peer closed the tunnel, or, when the
            # close was cut short, the peer is lost): its exit status is not the test.
            c.wait(15)
    assert s_code == 0, (s.stderr(), c.stderr())
    assert rdv_bytes.read()[1] - coordination < 10_000  # not relayed
    gw.wait_for("delete", why="request")
    assert gw.rules() == "", "a mapping was left behind"


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_a_mapped_sharer_and_a_symmetric_connector_connect_directly(
        lab_factory: LabFactory, sig: signal.Signals) -> None:
    mapped_pair(lab_factory("drop", "symmetric"), sig)


@pytest.mark.parametrize("protocol", ["natpmp", "pcp", "upnp"])
def test_each_mapping_protocol_alone_gives_the_direct_path(
        lab_factory: LabFactory, protocol: str) -> None:
    others = tuple(p for p in ("natpmp", "pcp", "upnp") if p != protocol)
    mapped_pair(lab_factory("drop", "symmetric"), signal.SIGINT, off=others)


def test_a_mapped_connector_and_a_symmetric_sharer_connect_directly(
        lab_factory: LabFactory) -> None:
    # The connector's gateway maps (it asks in the background: its hello never waits);
    # the sharer's NAT is symmetric, so no punch can work and the sharer dials the
    # connector's mapped port: at once if the mapping was granted before the
    # connector's hello left, else at the first try to leave the relay.
    lab = lab_factory("symmetric", "drop")
    gw = lab_gateway.start(lab.natb)
    public_b = lab.b.public_ip
    start_rendezvous(lab)
    rdv_bytes = lab.tcp_counter(lab.rdv, 3012)
    direct = ("--retry-direct", "1")
    s = start(lab.a1, "share", "-p", str(SERVICE), extra=direct)
    with echo_service_on(lab.a1):
        code = s.line(10)
        c = start(lab.b1, "connect", code, "-p", str(TUNNEL), extra=direct)
        try:
            wait_for(c, f"port mapping: TCP {public_b}:")
            deadline = time.monotonic() + 30
            while not re.search(r"tunnel up to \S+ over a mapped port|back to direct \(mapped\)",
                                s.stderr()):
                assert time.monotonic() < deadline and s.proc.poll() is None, s.stderr()
                time.sleep(0.1)
            wait_for(c, "encrypted tunnel to")
            err_s = s.stderr()
            assert re.search(rf"(tunnel up to|a new connection over a mapped port to) "
                             rf"{public_b}:", err_s), err_s
            before = rdv_bytes.read()[1]
            round_trip(lab.b1, 1 << 20)
            assert rdv_bytes.read()[1] - before < 10_000  # not relayed
        finally:
            c_code = stop(c)[0]  # the connector's exit deletes its mapping
            s.wait(15)
    assert c_code == 0, (c.stderr(), s.stderr())
    gw.wait_for("delete", why="request")
    assert gw.rules() == "", "a mapping was left behind"


def test_a_gateway_behind_another_nat_is_not_used(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "symmetric")
    gw = lab_gateway.start(lab.nata, external_ip="100.64.7.7")  # a CGNAT address: a lie
    start_rendezvous(lab)
    with echo_service_on(lab.a1):
        s = start(lab.a1, "share", "-p", str(SERVICE))
        code = s.line(10)
        err = wait_for(s, "not offering the mapped port 100.64.7.7:")
        assert f"is not {PUBLIC_A}, the one the rendezvous sees" in err, err
        c = start(lab.b1, "connect", code, "-p", str(TUNNEL))
        try:
            err_c = wait_for(c, "encrypted tunnel to")
            assert "tunnel up over the relay" in err_c, err_c
            assert "mapped" not in err_c, err_c
        finally:
            codes = (stop(s)[0], c.wait(10))
    assert codes == (0, 0), (s.stderr(), c.stderr())
    gw.wait_for("delete", why="request")  # not used, and still deleted on exit
    assert gw.rules() == ""


def test_dashboards_take_the_mapped_port_and_a_stopped_session_deletes_it(
        lab_factory: LabFactory, dashboards: list[Dashboard], tmp_path: Path) -> None:
    lab = lab_factory("drop", "symmetric")
    gw = lab_gateway.start(lab.nata)
    dash_a, dash_b = two_dashboards(lab, tmp_path, dashboards)
    with echo_service_on(lab.a1):
        server = share(dash_a, local_port=SERVICE)
        assert gw.rules(), "the sharing session made no mapping"
        client = join(dash_b, server["code"], local_port=TUNNEL)
        server, client = both_connected(dash_a, server, dash_b, client)
        assert server["path"] == client["path"] == "mapped"
        page = dash_b.text(f"/sessions/{client['id']}")
        assert 'data-path="mapped"' in page and "through a port the gateway maps" in page
        round_trip(lab.b1, 256 * 1024)
        dash_a.call("DELETE", f"/api/sessions/{server['id']}")  # the dashboard stays up
        gw.wait_for("delete", why="request")
        assert gw.rules() == "", "the stopped session left its mapping behind"
        dash_b.wait(client["id"], "end", ended)
    history = dash_b.call("GET", "/api/history?limit=5")["sessions"]
    assert (history[0]["id"], history[0]["path"]) == (client["id"], "mapped")
    assert "direct to a mapped port" in dash_b.text("/history")


def test_no_port_mapping_asks_the_gateway_nothing(lab_factory: LabFactory) -> None:
    lab = lab_factory("drop", "drop")
    gw = lab_gateway.start(lab.nata)
    start_rendezvous(lab)
    s = start(lab.a1, "share", "-p", str(SERVICE), "--no-port-mapping")
    try:
        s.line(10)  # the code: the hello has gone, with whatever it offered
        assert "port mapping" not in s.stderr() and "mapped port" not in s.stderr()
    finally:
        assert stop(s) == (0,)
    assert not gw.seen("map") and gw.rules() == ""
