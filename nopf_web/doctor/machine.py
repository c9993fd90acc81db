"""The NAT doctor's plan and classification, as a sans-IO machine.

:class:`DoctorMachine` decides which probes to make and, from what they
measured, builds the :class:`~nopf_web.doctor.report.DoctorReport`. It owns no
socket and no clock: the driver (:mod:`nopf_web.doctor.probe`) carries out its
actions, feeds back what happened with ``now``, and asks for the report when
:attr:`DoctorMachine.done` (or at the deadline, after :meth:`DoctorMachine.expire`).

Local ports: slot 0 is the port P the driver also *listens* on (the dial-back and
the hairpin test arrive there); slot 1 is a second port P2.

Actions
    :class:`Discover`       the seed's discovery (10-byte reply) from a slot's port
                            to the rendezvous port.
    :class:`Check`          a doctor ``check`` from a slot's port (None: any port)
                            to a doctor address; ``dial_back``: ask to be dialed.
    :class:`Hairpin`        connect from another port to ``target`` (our own public
                            address) and see whether the listener on P gets it.
    :class:`DetectGateway`  which port-mapping protocols answer on the gateway.
    :class:`ResolveIPv6`    the rendezvous host name's IPv6 addresses.

The plan (all at once; two follow-ups):

    P  -> rendezvous:port   (Discover)     P  -> rendezvous:doctor (Check, dial back)
    P2 -> rendezvous:port   (Discover)     P2 -> rendezvous:doctor (Check)
    gateway detection, AAAA of a host name
    once P's public address is known: hairpin to it
    once the doctor named its other addresses: P -> other IPv4:doctor (Check),
        and IPv6: any port -> [other IPv6 or AAAA]:doctor (Check)

Classification: the same public address from P to two ports of one address is
at least port-independent (a change: address-and-port-dependent); to a second
address as well, endpoint-independent (a change only there: address-dependent).
Public = local on every probe: no NAT.
"""

from __future__ import annotations

import ipaddress
import itertools
from dataclasses import dataclass, field
from typing import Final

from nopf_web.wire.address import Endpoint
from nopf_web.wire.doctor import Icmp, Outcome

from .report import DoctorReport, Filtering, NatMapping

DIAL_WAIT_MIN: Final = 0.3  # s the responder waits for an answer to its dial-back, at least
DIAL_WAIT_MAX: Final = 3.0
DIAL_WAIT_MARGIN: Final = 0.25  # s on top of three round trips
MAX_IPV6_TRIES: Final = 2  # IPv6 addresses tried, one after the other
CGNAT: Final = ipaddress.IPv4Network("100.64.0.0/10")


def dial_wait(rtt: float | None) -> float:
    """How long the responder should wait for its dial-back (s), from our connect time
    to it: an answer (SYN-ACK, RST, ICMP) takes one round trip; three, and a margin,
    leave room for jitter without making a silent NAT cost much."""
    base = 3 * rtt if rtt is not None else 1.0
    return min(DIAL_WAIT_MAX, max(DIAL_WAIT_MIN, base + DIAL_WAIT_MARGIN))


# Actions -----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Discover:
    probe: int
    slot: int
    target: Endpoint


@dataclass(frozen=True, slots=True)
class Check:
    probe: int
    slot: int | None
    target: Endpoint
    dial_back: bool = False


@dataclass(frozen=True, slots=True)
class Hairpin:
    target: Endpoint


@dataclass(frozen=True, slots=True)
class DetectGateway:
    pass


@dataclass(frozen=True, slots=True)
class ResolveIPv6:
    host: str


Action = Discover | Check | Hairpin | DetectGateway | ResolveIPv6


# Events ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Observed:
    """A probe's answer: the public address seen, from ``local``."""

    probe: int
    local: Endpoint
    public: Endpoint
    now: float
    rtt: float | None = None  # s, the TCP connect time
    others: tuple[str, ...] = ()  # a Check's: the responder's other addresses


@dataclass(frozen=True, slots=True)
class Failed:
    """A probe got no answer. ``connect``: the connection itself failed."""

    probe: int
    reason: str
    now: float
    connect: bool = True


@dataclass(frozen=True, slots=True)
class DialedBack:
    """What the responder's dial-back met (``outcome`` None: none, ``reason`` says why)."""

    outcome: Outcome | None
    now: float
    icmp: Icmp | None = None
    reason: str | None = None


@dataclass(frozen=True, slots=True)
class HairpinDone:
    reached: bool | None  # None: could not be tried
    detail: str
    now: float


@dataclass(frozen=True, slots=True)
class GatewayDone:
    """Port-mapping detection: the protocols answering (None: could not run) and the
    external addresses they reported."""

    answering: tuple[str, ...] | None
    external: tuple[str, ...]
    detail: str
    now: float


@dataclass(frozen=True, slots=True)
class Resolved:
    addresses: tuple[str, ...]
    now: float
    error: str | None = None


Event = Observed | Failed | DialedBack | HairpinDone | GatewayDone | Resolved


# The machine -------------------------------------------------------------------


@dataclass
class _Probe:
    id: int
    kind: str  # "discover" | "check"
    slot: int | None
    target: Endpoint
    dial_back: bool = False
    observed: Observed | None = None
    failure: str | None = None

    @property
    def ipv6(self) -> bool:
        return ":" in self.target.host


@dataclass
class _Parts:
    dial: DialedBack | None = None
    dial_pending: bool = False
    hairpin: HairpinDone | None = None
    hairpin_pending: bool = False
    gateway: GatewayDone | None = None
    gateway_pending: bool = False
    resolve_pending: bool = False
    v6_candidates: list[str] = field(default_factory=list)
    v6_tried: list[str] = field(default_factory=list)
    v6_failures: list[str] = field(default_factory=list)
    v6_sources_done: set[str] = field(default_factory=set)  # "dns", "doctor"
    expired: float | None = None  # when expire() ran


class DoctorMachine:
    """One measurement: :meth:`start`, then :meth:`handle` every event until :attr:`done`;
    then :meth:`report`.

    ``rendezvous`` is the rendezvous' IPv4 address and port (resolved), ``doctor_port``
    the responder's port; ``name`` the host name the user gave (None for an address:
    then no AAAA lookup); ``now`` starts the clock of ``elapsed_ms``.
    """

    def __init__(self, rendezvous: Endpoint, doctor_port: int, *, name: str | None = None,
                 label: str | None = None, now: float = 0.0, gateway: bool = True) -> None:
        self.rendezvous = rendezvous
        self.doctor = Endpoint(rendezvous.host, doctor_port)
        self.name = name
        self.label = label or (f"{name}:{rendezvous.port}" if name else
                               str(rendezvous))
        self.started = now
        self.gateway = gateway
        self._probes: dict[int, _Probe] = {}
        self._parts = _Parts()
        self._started = False

    # -- plan -------------------------------------------------------------------------

    def start(self) -> list[Action]:
        if self._started:
            raise RuntimeError("the doctor machine has already started")
        self._started = True
        rdv, doc = self.rendezvous, self.doctor
        out: list[Action] = [
            self._discover(0, rdv), self._check(0, doc, dial_back=True),
            self._discover(1, rdv), self._check(1, doc),
        ]
        if self.name is not None:
            self._parts.resolve_pending = True
            out.append(ResolveIPv6(self.name))
        else:
            self._parts.v6_sources_done.add("dns")
        return out

    def _discover(self, slot: int, target: Endpoint) -> Discover:
        probe = _Probe(len(self._probes), "discover", slot, target)
        self._probes[probe.id] = probe
        return Discover(probe.id, slot, target)

    def _check(self, slot: int | None, target: Endpoint, *, dial_back: bool = False) -> Check:
        probe = _Probe(len(self._probes), "check", slot, target, dial_back)
        self._probes[probe.id] = probe
        if dial_back:
            self._parts.dial_pending = True
        return Check(probe.id, slot, target, dial_back)

    # -- events -----------------------------------------------------------------------

    def handle(self, event: Event) -> list[Action]:
        if self._parts.expired is not None:
            return []  # too late: the report is being made
        if isinstance(event, Observed):
            return self._observed(event)
        if isinstance(event, Failed):
            return self._failed(event)
        if isinstance(event, DialedBack):
            self._parts.dial, self._parts.dial_pending = event, False
            return []
        if isinstance(event, HairpinDone):
            self._parts.hairpin, self._parts.hairpin_pending = event, False
            return []
        if isinstance(event, GatewayDone):
            self._parts.gateway, self._parts.gateway_pending = event, False
            return []
        return self._resolved(event)

    def _observed(self, ev: Observed) -> list[Action]:
        probe = self._probes.get(ev.probe)
        if probe is None or probe.observed is not None or probe.failure is not None:
            return []
        probe.observed = ev
        out: list[Action] = []
        parts = self._parts
        if self.gateway and parts.gateway is None and not parts.gateway_pending:
            # Only once the rendezvous answered: no point (and no traffic to the
            # gateway) when it cannot be reached.
            parts.gateway_pending = True
            out.append(DetectGateway())
        if probe.slot == 0 and parts.hairpin is None and not parts.hairpin_pending \
                and not probe.ipv6:
            parts.hairpin_pending = True
            out.append(Hairpin(ev.public))
        if probe.kind == "check" and not probe.ipv6 and "doctor" not in parts.v6_sources_done:
            parts.v6_sources_done.add("doctor")
            v4 = [a for a in ev.others if ":" not in a]
            if v4:  # from P, whose mapping to the main address is being measured too
                out.append(self._check(0, Endpoint(v4[0], self.doctor.port)))
            parts.v6_candidates += [a for a in ev.others if ":" in a]
        return out + self._next_ipv6()

    def _failed(self, ev: Failed) -> list[Action]:
        probe = self._probes.get(ev.probe)
        if probe is None or probe.observed is not None or probe.failure is not None:
            return []
        probe.failure = ev.reason
        if probe.dial_back and self._parts.dial_pending:
            self._parts.dial_pending = False  # the answer would have come on this connection
        if probe.ipv6:
            self._parts.v6_failures.append(ev.reason)
        elif probe.kind == "check" and probe.target == self.doctor:
            # No doctor on the main address: it cannot name others either (once both
            # slots' checks failed; one of them answering is enough).
            others = [p for p in self._probes.values() if p.kind == "check"
                      and p.target == self.doctor and p is not probe]
            if all(p.failure is not None for p in others):
                self._parts.v6_sources_done.add("doctor")
        return self._next_ipv6()

    def _resolved(self, ev: Resolved) -> list[Action]:
        parts = self._parts
        parts.resolve_pending = False
        parts.v6_sources_done.add("dns")
        parts.v6_candidates += [a for a in ev.addresses if a not in parts.v6_candidates]
        if ev.error:
            parts.v6_failures.append(ev.error)
        return self._next_ipv6()

    def _next_ipv6(self) -> list[Action]:
        parts = self._parts
        if self._ipv6_probe_state() != "idle":
            return []
        for address in parts.v6_candidates:
            if address not in parts.v6_tried and len(parts.v6_tried) < MAX_IPV6_TRIES:
                parts.v6_tried.append(address)
                return [self._check(None, Endpoint(address, self.doctor.port))]
        return []

    def _ipv6_probe_state(self) -> str:
        """"ok" (reached), "pending" (a check under way), else "idle"."""
        for p in self._probes.values():
            if p.ipv6:
                if p.observed is not None:
                    return "ok"
                if p.failure is None:
                    return "pending"
        return "idle"

    # -- progress ---------------------------------------------------------------------

    @property
    def done(self) -> bool:
        parts = self._parts
        if parts.expired is not None:
            return True
        if not self._started:
            return False
        if self.unreachable is not None:
            return True
        if any(p.observed is None and p.failure is None for p in self._probes.values()):
            return False
        return not (parts.dial_pending or parts.hairpin_pending or parts.gateway_pending
                    or parts.resolve_pending)

    @property
    def unreachable(self) -> str | None:
        """Why the rendezvous could not be reached, once every IPv4 probe to it failed
        (None while one may still answer, or once one did)."""
        main = [p for p in self._probes.values() if not p.ipv6 and
                p.target.host == self.rendezvous.host]
        if not main or any(p.failure is None for p in main):
            return None
        first = next(p for p in main if p.kind == "discover")
        return first.failure

    def expire(self, now: float) -> None:
        """The time is up: what is still pending is reported as not measured."""
        if self._parts.expired is None:
            self._parts.expired = now

    # -- the report -------------------------------------------------------------------

    def report(self, now: float, measured_at: float) -> DoctorReport:
        reasons: dict[str, str] = {}
        waited = self._waited(now)
        v4 = [p for p in self._probes.values() if not p.ipv6]
        seen = [p for p in v4 if p.observed is not None]
        # The public address: P's discovery, else any of P's answers.
        first = next((p for p in sorted(seen, key=lambda p: (p.slot != 0, p.id))), None)
        public = first.observed.public if first and first.observed else None
        local = first.observed.local if first and first.observed else None
        if public is None:
            reasons["public_address"] = self.unreachable or waited
        rtt = next((p.observed.rtt for p in seen if p.kind == "discover" and p.observed
                    and p.observed.rtt is not None), None)

        mapping, by, why = self._mapping(seen, waited)
        if why:
            reasons["mapping"] = why
        preserved, step = self._ports(seen, mapping)
        if mapping is not None and mapping != "none" and preserved is None:
            reasons["port_preserved"] = "not measured"

        filtering, icmp = self._filtering(reasons, waited)
        hairpin = self._hairpin(reasons, public, waited)
        port_mapping, gateway_address = self._gateway(reasons, waited)
        cgnat = self._cgnat(reasons, mapping, public, local, gateway_address)
        ipv6, ipv6_address = self._ipv6(reasons, waited)
        return DoctorReport(
            rendezvous=self.label,
            public_address=str(public) if public else None,
            local_address=str(local) if local else None,
            mapping=mapping, mapping_by=by, port_preserved=preserved, port_step=step,
            filtering=filtering, icmp=icmp, hairpin=hairpin, port_mapping=port_mapping,
            gateway_address=gateway_address, cgnat=cgnat, ipv6=ipv6,
            ipv6_address=ipv6_address,
            rtt_ms=None if rtt is None else rtt * 1000,
            elapsed_ms=max(0, round((now - self.started) * 1000)), measured_at=measured_at,
            reasons=tuple(sorted((k, v[:200]) for k, v in reasons.items())))

    def _waited(self, now: float) -> str:
        ms = round(((self._parts.expired or now) - self.started) * 1000)
        return f"no answer within {ms} ms"

    def _doctor_missing(self) -> str | None:
        """Why the responder could not be asked (None if it answered)."""
        checks = [p for p in self._probes.values() if p.kind == "check"
                  and p.target == self.doctor]
        if any(p.observed is not None for p in checks):
            return None
        failures = [p.failure for p in checks if p.failure]
        if failures:
            return (f"no NAT doctor at {self.doctor} ({failures[0]}): an "
                    "older nopf-server, or another --doctor-port?")
        return None

    def _mapping(self, seen: list[_Probe], waited: str
                 ) -> tuple[NatMapping | None, tuple[str, ...], str | None]:
        if not seen:
            return None, (), self.unreachable or waited
        obs = [p.observed for p in seen if p.observed is not None]
        rdv_ip = self.rendezvous.host
        if all(o.public == o.local for o in obs):
            by: tuple[str, ...] = ("port",) if len(obs) > 1 else ()
            if any(p.target.host != rdv_ip for p in seen):
                by += ("address",)
            return "none", by, None
        port_pairs: list[bool] = []  # per slot: did the two ports of rdv_ip see one address?
        for slot in (0, 1):
            mine = [p.observed.public for p in seen if p.slot == slot
                    and p.target.host == rdv_ip and p.observed]
            if len(mine) >= 2:
                port_pairs.append(len(set(mine)) == 1)
        if not port_pairs:
            missing = self._doctor_missing()
            return None, (), missing or f"needs two answers from one local port: {waited}"
        same = next((p.observed.public for p in seen if p.slot == 0 and p.observed
                     and p.target == self.doctor), None)
        other = next((p.observed.public for p in seen if p.slot == 0 and p.observed
                      and p.target.host != rdv_ip), None)
        if not all(port_pairs):
            return ("address-and-port-dependent",
                    ("port", "address") if other is not None else ("port",), None)
        if same is None or other is None:
            return "endpoint-independent", ("port",), None
        if same != other:
            return "address-dependent", ("port", "address"), None
        return "endpoint-independent", ("port", "address"), None

    def _ports(self, seen: list[_Probe], mapping: NatMapping | None
               ) -> tuple[bool | None, int | None]:
        obs = [p.observed for p in sorted(seen, key=lambda p: p.id) if p.observed]
        if mapping is None or not obs:
            return None, None
        preserved = all(o.public.port == o.local.port for o in obs)
        if preserved:
            return True, None
        # Distinct mappings in the order they were made (probe ids are in send order).
        distinct: list[Endpoint] = []
        for o in obs:
            if o.public not in distinct:
                distinct.append(o.public)
        deltas = [(b.port - a.port) for a, b in itertools.pairwise(distinct)]
        if len(deltas) >= 2 and len(set(deltas)) == 1 and deltas[0] != 0:
            return False, deltas[0]
        return False, None

    def _filtering(self, reasons: dict[str, str], waited: str
                   ) -> tuple[Filtering | None, Icmp | None]:
        dial = self._parts.dial
        if dial is not None and dial.outcome is not None:
            return dial.outcome, dial.icmp
        if dial is not None:
            reasons["filtering"] = dial.reason or "the rendezvous did not dial back"
        else:
            asker = next((p for p in self._probes.values() if p.dial_back), None)
            if asker is not None and asker.failure is not None:
                reasons["filtering"] = self._doctor_missing() or asker.failure
            else:
                reasons["filtering"] = f"the dial-back: {waited}"
        return None, None

    def _hairpin(self, reasons: dict[str, str], public: Endpoint | None,
                 waited: str) -> bool | None:
        result = self._parts.hairpin
        if result is not None and result.reached is not None:
            if not result.reached:
                reasons["hairpin"] = result.detail
            return result.reached
        if result is not None:
            reasons["hairpin"] = result.detail
        elif public is None:
            reasons["hairpin"] = "needs our public address"
        else:
            reasons["hairpin"] = waited
        return None

    def _gateway(self, reasons: dict[str, str], waited: str
                 ) -> tuple[tuple[str, ...] | None, str | None]:
        result = self._parts.gateway
        if not self.gateway:
            reasons["port_mapping"] = "not asked"
            return None, None
        if result is None:
            reasons["port_mapping"] = waited
            return None, None
        if result.answering is None:
            reasons["port_mapping"] = result.detail
            return None, None
        return result.answering, (result.external[0] if result.external else None)

    def _cgnat(self, reasons: dict[str, str], mapping: NatMapping | None,
               public: Endpoint | None, local: Endpoint | None,
               gateway_address: str | None) -> bool | None:
        if mapping == "none":
            return False
        if public is None:
            reasons["cgnat"] = "needs our public address"
            return None
        public_ip = ipaddress.ip_address(public.host)
        if gateway_address is not None:
            gw = ipaddress.ip_address(gateway_address)
            if gw in CGNAT or gw != public_ip:
                reasons["cgnat"] = (f"your gateway's external address is {gw}"
                                    + (" (carrier-grade NAT range)" if gw in CGNAT else "")
                                    + f", but the rendezvous sees {public_ip}")
                return True
            return False
        if local is not None and ipaddress.ip_address(local.host) in CGNAT \
                and local.host != public.host:
            reasons["cgnat"] = (f"this machine's address {local.host} is in the carrier-grade "
                                "NAT range 100.64.0.0/10")
            return True
        if public_ip in CGNAT:
            reasons["cgnat"] = (f"the rendezvous sees {public_ip}, in the carrier-grade NAT "
                                "range 100.64.0.0/10")
            return True
        reasons["cgnat"] = "no port-mapping gateway answered with its external address"
        return None

    def _ipv6(self, reasons: dict[str, str], waited: str) -> tuple[bool, str | None]:
        for p in self._probes.values():
            if p.ipv6 and p.observed is not None:
                return True, str(p.observed.public)
        parts = self._parts
        if parts.v6_failures and parts.v6_tried:
            reasons["ipv6"] = f"IPv6 to the rendezvous failed: {parts.v6_failures[0]}"
        elif parts.v6_tried:
            reasons["ipv6"] = f"IPv6 to the rendezvous: {waited}"
        elif parts.resolve_pending:
            reasons["ipv6"] = f"looking up {self.name}'s IPv6 address: {waited}"
        elif "doctor" not in parts.v6_sources_done:
            reasons["ipv6"] = f"the NAT doctor did not answer: {waited}"
        else:
            how = []
            if self.name is None:
                how.append(f"{self.rendezvous.host} is an IPv4 address")
            else:
                how.append(f"{self.name} has no IPv6 address"
                           + (f" ({parts.v6_failures[0]})" if parts.v6_failures else ""))
            missing = self._doctor_missing()
            how.append("the NAT doctor did not answer" if missing else
                       "its NAT doctor announces no IPv6 address")
            reasons["ipv6"] = "the rendezvous has no IPv6 address: " + " and ".join(how)
        return False, None
