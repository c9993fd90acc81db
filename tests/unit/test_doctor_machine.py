"""The NAT doctor's plan-and-classify machine, against modelled NATs: no sockets, no clock.

A small model of a NAT (mapping behaviour, port allocation) answers the
machine's probes in the order their SYNs leave; the answers are then fed back
in any order (hypothesis), as a network would deliver them.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings, strategies as st

from nopf_web.doctor.machine import (
    DIAL_WAIT_MAX,
    DIAL_WAIT_MIN,
    Action,
    Check,
    DetectGateway,
    DialedBack,
    Discover,
    DoctorMachine,
    Event,
    Failed,
    GatewayDone,
    Hairpin,
    HairpinDone,
    Observed,
    Resolved,
    ResolveIPv6,
    dial_wait,
)
from nopf_web.doctor.report import DoctorReport
from nopf_web.wire.address import Endpoint
from nopf_web.wire.doctor import Icmp

RDV = Endpoint("198.51.100.2", 3012)
SECOND = "198.51.100.3"
PORTS = (40000, 40001)  # the driver's slots P and P2
PUBLIC_IP, LOCAL_IP = "203.0.113.2", "10.0.1.2"


@dataclass
class Nat:
    """How a NAT maps (local port, destination) to a public address."""

    kind: str  # one of KINDS
    preserve: bool = True  # keep the local port when it is free
    step: int | None = 1  # a new port is the last one + step; None: random
    rng: random.Random = field(default_factory=lambda: random.Random(7))
    table: dict[tuple[object, ...], Endpoint] = field(default_factory=dict)
    last: int = 20000

    @property
    def local_ip(self) -> str:
        return PUBLIC_IP if self.kind == "none" else LOCAL_IP

    def map(self, port: int, target: Endpoint) -> Endpoint:
        if self.kind == "none":
            return Endpoint(PUBLIC_IP, port)
        key: tuple[object, ...] = {
            "endpoint-independent": (port,),
            "address-dependent": (port, target.host),
            "address-and-port-dependent": (port, target),
        }[self.kind]
        if key not in self.table:
            used = {e.port for e in self.table.values()}
            if self.preserve and port not in used:
                chosen = port
            elif self.step is None:
                chosen = self.rng.randrange(1024, 65536)
            else:
                self.last += self.step
                chosen = self.last
            self.table[key] = Endpoint(PUBLIC_IP, chosen)
        return self.table[key]


@dataclass
class World:
    """Everything else the probes meet."""

    nat: Nat
    doctor: bool = True  # the rendezvous runs a doctor responder
    others: tuple[str, ...] = (SECOND,)
    filtering: str = "drop"
    icmp: Icmp | None = None
    hairpin: bool = False
    gateway: GatewayDone = field(default_factory=lambda: GatewayDone((), (), "none", 0.0))
    aaaa: tuple[str, ...] = ()
    ipv6: bool = False  # IPv6 reaches the doctor
    reachable: bool = True
    lost: set[str] = field(default_factory=set)  # kinds of answers that never come


def answers(world: World, action: Action, now: float) -> list[list[Event]]:
    """The events a probe causes, as chains (each chain's events arrive in order)."""
    nat = world.nat
    if isinstance(action, Discover | Check):
        target = action.target
        port = PORTS[action.slot] if action.slot is not None else 50000
        if ":" in target.host:
            if world.ipv6 and world.doctor:
                return [[Observed(action.probe, Endpoint("2001:db8::5", port),
                                  Endpoint("2001:db8::5", port), now)]]
            return [[Failed(action.probe, "network unreachable", now)]]
        if not world.reachable or (isinstance(action, Check) and not world.doctor):
            return [[Failed(action.probe, "connection refused", now)]]
        if isinstance(action, Discover) and "discover" in world.lost:
            return []
        seen = Observed(action.probe, Endpoint(nat.local_ip, port), nat.map(port, target), now,
                        0.02, world.others if isinstance(action, Check) else ())
        if isinstance(action, Check) and action.dial_back:
            if "dial" in world.lost:
                return [[seen]]
            return [[seen, DialedBack(world.filtering, now, world.icmp)]]  # type: ignore[arg-type]
        return [[seen]]
    if isinstance(action, Hairpin):
        return [] if "hairpin" in world.lost else [[HairpinDone(world.hairpin, "x", now)]]
    if isinstance(action, DetectGateway):
        return [] if "gateway" in world.lost else [[world.gateway]]
    assert isinstance(action, ResolveIPv6)
    return [[Resolved(world.aaaa, now, None if world.aaaa else "no AAAA record")]]


def run(world: World, *, seed: int = 0, name: str | None = None,
        expire_at: float | None = None) -> tuple[DoctorMachine, DoctorReport, list[Action]]:
    rng = random.Random(seed)
    machine = DoctorMachine(RDV, 3013, name=name, now=0.0)
    chains: list[list[Event]] = []
    every: list[Action] = []
    now = 0.0

    def emit(actions: list[Action]) -> None:
        every.extend(actions)
        for action in actions:  # in order: the NAT allocates in SYN order
            chains.extend(answers(world, action, now))

    emit(machine.start())
    while chains and not (machine.done and machine.unreachable):
        chain = chains.pop(rng.randrange(len(chains)))
        now += 0.01
        event = chain.pop(0)
        if chain:
            chains.append(chain)
        emit(machine.handle(event))
    if expire_at is not None:
        machine.expire(expire_at)
    assert machine.done
    return machine, machine.report(expire_at or now, 1.8e9), every


KINDS = ("none", "endpoint-independent", "address-dependent", "address-and-port-dependent")


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(KINDS), st.booleans(), st.sampled_from([1, 2, -1, 7, None]),
       st.booleans(), st.integers(0, 2**32))
def test_the_mapping_is_classified_whatever_the_order_of_answers(
        kind: str, preserve: bool, step: int | None, second: bool, seed: int) -> None:
    world = World(Nat(kind, preserve, step), others=(SECOND,) if second else ())
    _m, report, _ = run(world, seed=seed)
    if kind == "address-dependent" and not second:
        # one rendezvous address cannot tell it from endpoint-independent: said so
        assert report.mapping == "endpoint-independent"
        assert report.mapping_by == ("port",)
        assert "address-dependent not ruled out" in report.facts()[1][2]
    else:
        assert report.mapping == kind
    assert report.public_address is not None
    if kind == "none":
        assert report.port_preserved is True and report.port_step is None
        assert report.cgnat is False
    elif preserve:
        # the first mapping of each local port keeps it; a symmetric NAT's next ones cannot
        assert report.port_preserved is (kind == "endpoint-independent"
                                         or (kind == "address-dependent" and not second))
    else:
        assert report.port_preserved is False
        if kind == "address-and-port-dependent" or (kind == "address-dependent" and second):
            # four or five new mappings in SYN order: a constant step is found, a random not
            assert report.port_step == step
        elif kind == "endpoint-independent":
            assert report.port_step is None  # two mappings: one difference proves nothing
    assert (report.symmetric is True) == (report.mapping in ("address-dependent",
                                                             "address-and-port-dependent"))


def test_the_plan_sends_in_order_and_follows_up() -> None:
    machine, report, actions = run(World(Nat("endpoint-independent")), name="rdv.example")
    assert actions[:5] == [
        Discover(0, 0, RDV), Check(1, 0, Endpoint(RDV.host, 3013), True),
        Discover(2, 1, RDV), Check(3, 1, Endpoint(RDV.host, 3013)), ResolveIPv6("rdv.example")]
    assert actions.count(DetectGateway()) == 1
    assert Check(4, 0, Endpoint(SECOND, 3013)) in actions
    assert [a for a in actions if isinstance(a, Hairpin)] == [
        Hairpin(Endpoint(PUBLIC_IP, PORTS[0]))]
    assert report.mapping_by == ("port", "address")
    with pytest.raises(RuntimeError):
        machine.start()


@pytest.mark.parametrize(("filtering", "icmp"), [
    ("open", None), ("drop", None), ("rst", None), ("icmp", Icmp(3, 13, PUBLIC_IP))])
def test_filtering_and_hairpin_are_what_the_probes_met(filtering: str,
                                                       icmp: Icmp | None) -> None:
    _m, report, _ = run(World(Nat("endpoint-independent"), filtering=filtering, icmp=icmp,
                              hairpin=filtering == "open"))
    assert report.filtering == filtering and report.icmp == icmp
    assert report.hairpin is (filtering == "open")
    if icmp is not None:
        assert "type 3, code 13, from 203.0.113.2" in dict(
            (k, t) for k, _l, t in report.facts())["filtering"]


def test_without_a_doctor_it_says_what_could_not_be_measured() -> None:
    machine, report, _ = run(World(Nat("endpoint-independent"), doctor=False))
    assert machine.unreachable is None
    assert report.public_address == f"{PUBLIC_IP}:{PORTS[0]}"
    assert report.mapping is None and report.filtering is None
    why = report.reason("mapping")
    assert why is not None and "no NAT doctor at 198.51.100.2:3013 (connection refused)" in why
    assert "no NAT doctor" in (report.reason("filtering") or "")
    assert report.hairpin is False  # measured anyway: it needs only our public address
    assert report.port_mapping == () and report.ipv6 is False
    assert "NAT doctor did not answer" in (report.reason("ipv6") or "")
    assert "could not tell what kind of NAT" in report.summary()


def test_an_unreachable_rendezvous_is_known_at_once() -> None:
    machine, report, actions = run(World(Nat("endpoint-independent"), reachable=False))
    assert machine.unreachable == "connection refused"
    assert not any(isinstance(a, DetectGateway | Hairpin) for a in actions)  # nothing sent
    assert report.public_address is None


def test_at_the_deadline_what_is_missing_is_not_measured() -> None:
    world = World(Nat("endpoint-independent"), lost={"dial", "gateway", "hairpin"})
    machine = DoctorMachine(RDV, 3013, now=10.0)
    chains: list[list[Event]] = []
    for action in machine.start():
        chains += answers(world, action, 10.05)
    while chains:
        for follow in machine.handle(chains.pop(0)[0]):
            chains += answers(world, follow, 10.1)
    assert not machine.done
    machine.expire(11.5)
    assert machine.done
    assert machine.handle(HairpinDone(True, "late", 11.6)) == []  # too late to count
    report = machine.report(11.5, 1.8e9)
    assert report.mapping == "endpoint-independent"
    assert report.filtering is None and report.hairpin is None and report.port_mapping is None
    assert report.reason("filtering") == "the dial-back: no answer within 1500 ms"
    assert report.reason("hairpin") == "no answer within 1500 ms"
    assert report.elapsed_ms == 1500


def test_a_refused_dial_back_says_why() -> None:
    machine = DoctorMachine(RDV, 3013)
    machine.start()
    machine.handle(Observed(1, Endpoint(LOCAL_IP, 1), Endpoint(PUBLIC_IP, 1), 0.1))
    machine.handle(DialedBack(None, 0.2, reason="the NAT doctor refused: too many (try again "
                              "in 8 s)"))
    machine.expire(1.0)
    report = machine.report(1.0, 0)
    assert report.filtering is None
    assert report.reason("filtering") == "the NAT doctor refused: too many (try again in 8 s)"


@pytest.mark.parametrize(("external", "local_ip", "cgnat", "words"), [
    ((PUBLIC_IP,), LOCAL_IP, False, None),
    (("100.64.7.7",), LOCAL_IP, True, "100.64.7.7 (carrier-grade NAT range), but the "
                                      "rendezvous sees 203.0.113.2"),
    (("192.0.2.99",), LOCAL_IP, True, "192.0.2.99, but the rendezvous sees 203.0.113.2"),
    ((), "100.64.3.4", True, "this machine's address 100.64.3.4 is in the carrier-grade"),
    ((), LOCAL_IP, None, "no port-mapping gateway answered"),
])
def test_carrier_grade_nat(external: tuple[str, ...], local_ip: str, cgnat: bool | None,
                           words: str | None) -> None:
    machine = DoctorMachine(RDV, 3013)
    machine.start()
    for probe, port in ((0, 1), (1, 1), (2, 2), (3, 2)):
        machine.handle(Observed(probe, Endpoint(local_ip, port), Endpoint(PUBLIC_IP, port), 0.1))
    machine.handle(GatewayDone(("NAT-PMP",) if external else (), external, "x", 0.2))
    machine.expire(1.0)
    report = machine.report(1.0, 0)
    assert report.cgnat is cgnat
    assert report.gateway_address == (external[0] if external else None)
    if words:
        assert words in (report.reason("cgnat") or "")
    if cgnat:
        assert "carrier-grade NAT" in report.summary()


def test_no_gateway_is_a_reason_not_a_failure() -> None:
    _m, report, _ = run(World(Nat("endpoint-independent"), gateway=GatewayDone(
        None, (), "no IPv4 default gateway in the routing table", 0.0)))
    assert report.port_mapping is None
    assert report.reason("port_mapping") == "no IPv4 default gateway in the routing table"


@pytest.mark.parametrize(("others", "aaaa", "name", "ipv6", "words"), [
    (("2001:db8::2",), (), None, True, None),
    ((SECOND,), ("2001:db8::3",), "rdv.example", True, None),
    ((SECOND,), (), None, False, "198.51.100.2 is an IPv4 address and its NAT doctor announces "
                                 "no IPv6 address"),
    ((), (), "rdv.example", False, "rdv.example has no IPv6 address (no AAAA record)"),
])
def test_ipv6_is_tried_when_the_rendezvous_has_an_address(
        others: tuple[str, ...], aaaa: tuple[str, ...], name: str | None, ipv6: bool,
        words: str | None) -> None:
    _m, report, actions = run(World(Nat("endpoint-independent"), others=others, aaaa=aaaa,
                                    ipv6=True), name=name)
    assert report.ipv6 is ipv6
    if ipv6:
        assert report.ipv6_address == "[2001:db8::5]:50000"
        assert any(isinstance(a, Check) and a.slot is None for a in actions)
    else:
        assert words is not None and words in (report.reason("ipv6") or "")


def test_an_ipv6_failure_is_the_reason_and_a_second_address_is_tried() -> None:
    _m, report, actions = run(World(Nat("none"), others=("2001:db8::2", "2001:db8::3")))
    tried = [a.target.host for a in actions if isinstance(a, Check) and a.slot is None]
    assert tried == ["2001:db8::2", "2001:db8::3"]
    assert report.ipv6 is False
    assert report.reason("ipv6") == "IPv6 to the rendezvous failed: network unreachable"


@given(st.floats(0, 10, allow_nan=False) | st.none())
def test_the_dial_wait_is_bounded(rtt: float | None) -> None:
    assert DIAL_WAIT_MIN <= dial_wait(rtt) <= DIAL_WAIT_MAX
    if rtt is not None and 0.05 <= rtt <= 0.9:
        assert dial_wait(rtt) > 3 * rtt


def test_a_loopback_rendezvous_says_the_report_means_nothing() -> None:
    machine = DoctorMachine(Endpoint("127.0.0.1", 3012), 3013, label="127.0.0.1:3012")
    machine.start()
    machine.expire(0.1)
    report = machine.report(0.1, 0)
    assert report.rendezvous_is_local
    assert "on this machine or your own network" in report.summary()
    assert not DoctorReport("198.51.100.2:3012").rendezvous_is_local
    assert DoctorReport("[::1]:3012").rendezvous_is_local
    assert DoctorReport("localhost:3012").rendezvous_is_local
