"""The port mapper's pure helpers: default gateway, the CGNAT rule, Mapping text."""

from __future__ import annotations

from ipaddress import IPv4Address
from pathlib import Path

import pytest

from nopf_web.portmap import (
    Mapping,
    MapProtocol,
    NoGatewayError,
    default_gateway,
    is_cgnat,
    unusable_reason,
    usable,
)

HEADER = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n"


def route_table(tmp_path: Path, *rows: str) -> Path:
    path = tmp_path / "route"
    path.write_text(HEADER + "".join(rows), encoding="utf-8")
    return path


def row(dest: str, gateway: str, flags: str, metric: int, mask: str, iface: str = "eth0") -> str:
    return f"{iface}\t{dest}\t{gateway}\t{flags}\t0\t0\t{metric}\t{mask}\t0\t0\t0\n"


def test_default_gateway_reads_little_endian_hex(tmp_path: Path) -> None:
    table = route_table(
        tmp_path,
        row("0001000A", "00000000", "0001", 0, "00FFFFFF"),  # 10.0.1.0/24, on link
        row("00000000", "0101000A", "0003", 0, "00000000"),  # default via 10.0.1.1
    )
    assert default_gateway(table) == IPv4Address("10.0.1.1")


def test_lowest_metric_wins_and_down_routes_are_skipped(tmp_path: Path) -> None:
    table = route_table(
        tmp_path,
        row("00000000", "FE01A8C0", "0003", 600, "00000000", "wlan0"),  # 192.168.1.254
        row("00000000", "0101000A", "0002", 0, "00000000"),  # not up
        row("00000000", "0100A8C0", "0003", 100, "00000000"),  # 192.168.0.1
    )
    assert default_gateway(table) == IPv4Address("192.168.0.1")


def test_no_default_route(tmp_path: Path) -> None:
    table = route_table(tmp_path, row("0001000A", "00000000", "0001", 0, "00FFFFFF"))
    with pytest.raises(NoGatewayError, match="no IPv4 default gateway"):
        default_gateway(table)


def mapping(external: str) -> Mapping:
    return Mapping(MapProtocol.PCP, IPv4Address(external), 6000, 5000, 7200, 100.0,
                   IPv4Address("10.0.1.2"))


def test_usable_only_when_the_rendezvous_sees_the_same_address() -> None:
    assert usable(mapping("203.0.113.2"), "203.0.113.2")
    assert usable(mapping("203.0.113.2"), IPv4Address("203.0.113.2"))
    assert not usable(mapping("203.0.113.9"), "203.0.113.2")
    reason = unusable_reason(mapping("100.64.0.1"), "203.0.113.2")
    assert reason is not None
    assert "carrier-grade NAT" in reason and "203.0.113.2" in reason
    assert unusable_reason(mapping("192.168.1.5"), "203.0.113.2") is not None


@pytest.mark.parametrize(("address", "cgnat"), [
    ("100.63.255.255", False), ("100.64.0.0", True), ("100.127.255.255", True),
    ("100.128.0.0", False), ("10.0.0.1", False),
])
def test_cgnat_range_is_100_64_slash_10(address: str, cgnat: bool) -> None:
    assert is_cgnat(address) is cgnat


def test_mapping_reads_as_one_line() -> None:
    assert str(mapping("203.0.113.2")) == \
        "TCP 203.0.113.2:6000 -> 10.0.1.2:5000 via PCP, lifetime 7200 s"
