"""The NAT doctor's report: its JSON both ways, its size, and what it says."""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given, strategies as st

from nopf_web.doctor.report import (
    FILTERINGS,
    KEYS,
    NAT_MAPPINGS,
    PORT_MAPPING_PROTOCOLS,
    REASON_KEYS,
    DoctorReport,
    ReportError,
)
from nopf_web.wire.doctor import Icmp
from nopf_web.wire.rendezvous import MAX_FRAME

ip4 = st.tuples(*[st.integers(1, 254)] * 4).map(lambda t: ".".join(map(str, t)))
endpoint = st.builds(lambda ip, port: f"{ip}:{port}", ip4, st.integers(1, 65535))
line = st.text(st.characters(min_codepoint=32, max_codepoint=126), max_size=200)
reports = st.builds(
    DoctorReport,
    rendezvous=endpoint,
    public_address=st.none() | endpoint,
    local_address=st.none() | endpoint,
    mapping=st.none() | st.sampled_from(NAT_MAPPINGS),
    mapping_by=st.sampled_from([(), ("port",), ("port", "address")]),
    port_preserved=st.none() | st.booleans(),
    port_step=st.none() | st.integers(-65535, 65535),
    filtering=st.none() | st.sampled_from(FILTERINGS),
    icmp=st.none() | st.builds(Icmp, st.integers(0, 255), st.integers(0, 255), st.none() | ip4),
    hairpin=st.none() | st.booleans(),
    port_mapping=st.none() | st.lists(st.sampled_from(PORT_MAPPING_PROTOCOLS), unique=True)
    .map(tuple),
    gateway_address=st.none() | ip4,
    cgnat=st.none() | st.booleans(),
    ipv6=st.booleans(),
    ipv6_address=st.none() | st.just("[2001:db8::1]:40000"),
    rtt_ms=st.none() | st.floats(0, 10_000).map(lambda f: round(f, 1)),
    elapsed_ms=st.integers(0, 3_600_000),
    measured_at=st.floats(0, 4e9).map(lambda f: round(f, 3)),
    reasons=st.dictionaries(st.sampled_from(sorted(REASON_KEYS)), line, max_size=4)
    .map(lambda d: tuple(sorted(d.items()))),
)


@given(reports, st.booleans())
def test_the_json_round_trips_through_text(report: DoctorReport, explain: bool) -> None:
    text = json.dumps(report.to_json(explain=explain))
    assert DoctorReport.from_json(json.loads(text)) == report


@given(reports)
def test_every_key_is_there_in_the_documented_order(report: DoctorReport) -> None:
    obj = report.to_json()
    assert tuple(obj)[:len(KEYS)] == KEYS and list(obj)[-1] == "summary"
    assert isinstance(obj["summary"], str) and obj["summary"]


def test_a_full_report_fits_easily_in_a_rendezvous_hello() -> None:
    worst = DoctorReport(
        rendezvous="rendezvous.some-long-domain.example:3012",
        public_address="203.0.113.222:65535", local_address="192.168.100.200:65535",
        mapping="address-and-port-dependent", mapping_by=("port", "address"),
        port_preserved=False, port_step=-65535, filtering="icmp",
        icmp=Icmp(3, 13, "203.0.113.254"), hairpin=False,
        port_mapping=PORT_MAPPING_PROTOCOLS, gateway_address="100.64.255.255", cgnat=True,
        ipv6=True, ipv6_address="[2001:db8:ffff:ffff:ffff:ffff:ffff:ffff]:65535",
        rtt_ms=1234.5, elapsed_ms=4000, measured_at=1.8e9,
        reasons=(("cgnat", "x" * 120), ("ipv6", "y" * 120)))
    compact = json.dumps(worst.to_json(explain=False), separators=(",", ":"))
    assert len(compact) < 1024 < MAX_FRAME


def good() -> dict[str, Any]:
    return DoctorReport("198.51.100.2:3012", mapping="endpoint-independent",
                        filtering="drop").to_json()


@pytest.mark.parametrize(("change", "words"), [
    ({"mapping": "symmetric"}, "mapping = 'symmetric' is not one of"),
    ({"filtering": "ICMP"}, "filtering"),
    ({"version": 2}, "version 2 is not 1"),
    ({"version": True}, "version True is not 1"),
    ({"extra": 1}, "unknown key(s) in the doctor report: extra"),
    ({"port_step": 70000}, "port_step"),
    ({"hairpin": 1}, "hairpin must be true or false"),
    ({"ipv6": None}, "ipv6 must be true or false"),
    ({"mapping_by": ["port", "port"]}, "mapping_by"),
    ({"port_mapping": ["miniupnpd"]}, "port_mapping"),
    ({"reasons": {"nope": "x"}}, "unknown key 'nope'"),
    ({"reasons": {"ipv6": "a\nb"}}, "reasons.ipv6"),
    ({"reasons": []}, "reasons must be an object"),
    ({"icmp": {"type": 3, "code": 300, "from": None}}, "icmp.code"),
    ({"icmp": {"type": 3}}, "icmp must be"),
    ({"elapsed_ms": -1}, "elapsed_ms"),
    ({"measured_at": float("inf")}, "measured_at"),
    ({"rtt_ms": "fast"}, "rtt_ms"),
    ({"public_address": 5}, "public_address"),
])
def test_bad_json_names_the_key(change: dict[str, Any], words: str) -> None:
    obj = good() | change
    with pytest.raises(ReportError, match=words.replace("(", r"\(").replace(")", r"\)")):
        DoctorReport.from_json(obj)


def test_a_missing_key_is_named() -> None:
    obj = good()
    del obj["hairpin"]
    with pytest.raises(ReportError, match="lacks 'hairpin'"):
        DoctorReport.from_json(obj)
    with pytest.raises(ReportError):
        DoctorReport.from_json([])  # type: ignore[arg-type]


@pytest.mark.parametrize(("report", "words"), [
    (DoctorReport("198.51.100.2:3012", mapping="endpoint-independent"),
     "you can share with anyone except peers behind symmetric NATs"),
    (DoctorReport("198.51.100.2:3012", mapping="address-and-port-dependent"),
     "Behind a symmetric NAT: direct connections only to peers without NAT; otherwise nopf "
     "will relay."),
    (DoctorReport("198.51.100.2:3012", mapping="address-dependent"), "Behind a symmetric NAT"),
    (DoctorReport("198.51.100.2:3012", mapping="none", filtering="open"),
     "No NAT: this machine has a public address, so you can share with anyone."),
    (DoctorReport("198.51.100.2:3012", mapping="none", filtering="rst"), "A firewall"),
])
def test_the_summary_says_what_it_means(report: DoctorReport, words: str) -> None:
    assert words in report.summary()


def test_the_facts_read_as_sentences() -> None:
    report = DoctorReport(
        "198.51.100.2:3012", public_address="203.0.113.2:40000",
        local_address="10.0.1.2:40000", mapping="address-and-port-dependent",
        mapping_by=("port",), port_preserved=False, port_step=2, filtering="rst",
        hairpin=True, port_mapping=("UPnP-IGD", "PCP"), gateway_address="203.0.113.2",
        cgnat=False, reasons=(("ipv6", "the rendezvous has no IPv6 address"),))
    facts = {key: text for key, _label, text in report.facts()}
    assert facts["public_address"] == "203.0.113.2:40000 (this machine: 10.0.1.2:40000)"
    assert facts["mapping"].startswith("address-and-port-dependent (symmetric)")
    assert "each new mapping +2" in facts["mapping"]
    assert facts["filtering"].startswith("rst: ")
    assert facts["hairpin"].startswith("yes")
    assert facts["port_mapping"] == ("UPnP-IGD, PCP answer on your gateway (its external "
                                     "address: 203.0.113.2)")
    assert facts["cgnat"] == "no"
    assert facts["ipv6"] == "no: the rendezvous has no IPv6 address"
    assert report.rendezvous_mapping() == "symmetric"
    assert DoctorReport("x:1").rendezvous_mapping() == "unknown"
    assert DoctorReport("x:1", mapping="endpoint-independent").rendezvous_mapping() == "stable"
