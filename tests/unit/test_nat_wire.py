"""The compact NAT report on the wire: its codec, and the hello's ``nat`` and the fire's
``peer_nat`` (optional: a message without them is byte for byte what it was)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, strategies as st

from nopf_web.doctor.report import FILTERINGS, NAT_MAPPINGS, PORT_MAPPING_PROTOCOLS, DoctorReport
from nopf_web.wire.address import Endpoint
from nopf_web.wire.nat import (
    FILTERINGS as WIRE_FILTERINGS,
    KEYS,
    MAPPINGS,
    PORT_MAPPINGS,
    NatSummary,
    NatSummaryError,
)
from nopf_web.wire.rendezvous import (
    Fire,
    Hello,
    MessageError,
    Stage,
    decode_client_message,
    decode_server_message,
    encode,
)

summaries = st.builds(
    NatSummary,
    st.none() | st.sampled_from(sorted(MAPPINGS)),
    st.none() | st.sampled_from(sorted(WIRE_FILTERINGS)),
    st.none() | st.booleans(),
    st.none() | st.lists(st.sampled_from(sorted(PORT_MAPPINGS)), unique=True).map(tuple),
    st.none() | st.booleans(),
    st.booleans())
PUB = Endpoint("203.0.113.2", 40001)
PEER = Endpoint("192.0.2.2", 50000)


def test_the_wire_names_are_the_doctors() -> None:
    assert set(NAT_MAPPINGS) == MAPPINGS
    assert set(FILTERINGS) == WIRE_FILTERINGS
    assert set(PORT_MAPPING_PROTOCOLS) == PORT_MAPPINGS


def test_from_a_doctor_report() -> None:
    report = DoctorReport("198.51.100.2:3012", mapping="endpoint-independent", filtering="rst",
                          hairpin=False, port_mapping=("UPnP-IGD",), cgnat=True, ipv6=False)
    s = NatSummary.from_report(report)
    assert s == NatSummary("endpoint-independent", "rst", False, ("UPnP-IGD",), True, False)
    assert s.kind == "rst" and not s.symmetric
    assert NatSummary("address-dependent").kind == "symmetric"
    assert NatSummary("none").kind == "none" and NatSummary().kind == "unknown"


@given(summaries)
def test_a_summary_round_trips_in_every_message_that_carries_it(s: NatSummary) -> None:
    assert NatSummary.from_wire(json.loads(json.dumps(s.to_wire()))) == s
    for hello in (Hello("join", 7, (PUB,), None, 15.0, relay=True, nat=s),
                  Hello("resume", None, (PUB,), PUB, 15.0, resume_id=b"r" * 16, side="join",
                        nat=s)):
        assert decode_client_message(encode(hello)[4:]) == hello
    fire = Fire(PUB, PEER, (Stage("public", PEER, "arm", 4.0),), 40.0, peer_nat=s)
    assert decode_server_message(encode(fire)[4:]) == fire
    assert len(json.dumps(s.to_wire())) < 160


def test_messages_without_it_are_unchanged() -> None:
    hello = encode(Hello("join", 7, (PUB,), None, 15.0, relay=True))
    assert b'"nat"' not in hello
    assert hello[4:] == (b'{"type":"hello","version":2,"action":"join","nameplate":7,'
                         b'"lan":["203.0.113.2:40001"],"probe":null,"punch_timeout":15.0,'
                         b'"relay":true}')
    fire = encode(Fire(PUB, PEER, (Stage("public", PEER, "arm", 4.0),), 40.0))
    assert b"peer_nat" not in fire


BAD = [
    ({"mapping": "cone"}, "nat.mapping = 'cone' is not one of"),
    ({"filtering": 1}, "nat.filtering = 1 is not one of"),
    ({"hairpin": "yes"}, "nat.hairpin must be true, false or null"),
    ({"cgnat": 0}, "nat.cgnat must be true, false or null"),
    ({"ipv6": None}, "nat.ipv6 must be true or false"),
    ({"port_mapping": ["PCP", "PCP"]}, "distinct protocols"),
    ({"port_mapping": "PCP"}, "distinct protocols"),
    ({"port_mapping": ["SOCKS"]}, "port_mapping[] = 'SOCKS'"),
    ({"extra": 1}, "unknown key(s): extra"),
]


@pytest.mark.parametrize(("change", "message"), BAD)
def test_a_bad_summary_is_refused_naming_the_key(change: dict[str, object], message: str,
                                                 ) -> None:
    obj = {**NatSummary("none", "open", True, (), False, False).to_wire(), **change}
    with pytest.raises(NatSummaryError) as err:
        NatSummary.from_wire(obj)
    assert message in str(err.value)
    hello = {"type": "hello", "version": 2, "action": "join", "nameplate": 7, "lan": [],
             "probe": None, "punch_timeout": 15.0, "nat": obj}
    with pytest.raises(MessageError) as err2:
        decode_client_message(json.dumps(hello).encode())
    assert message.replace("nat.", "hello.nat.") in str(err2.value) or message in str(err2.value)


def test_missing_keys_null_and_non_objects_are_refused() -> None:
    with pytest.raises(NatSummaryError, match="lacks key"):
        NatSummary.from_wire({k: None for k in KEYS[:-1]})
    with pytest.raises(NatSummaryError, match="must be an object"):
        NatSummary.from_wire(None)
    fire = {"type": "fire", "public": str(PUB.host) + ":1", "peer_public": "192.0.2.2:2",
            "plan": [{"path": "public", "peer": "192.0.2.2:2", "punch": "arm", "budget": 4}],
            "rtt_ms": 1, "note": None, "peer_nat": None}
    with pytest.raises(MessageError, match=r"fire\.peer_nat must be an object"):
        decode_server_message(json.dumps(fire).encode())
