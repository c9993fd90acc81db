"""A peer's NAT, as its doctor measured it, in the compact form that travels with a
rendezvous ``hello`` (field ``nat``) and comes back to the peer in its ``fire``
(field ``peer_nat``): a pure codec.

One JSON object, every key present (null where not measured), about 120 bytes:

    key           JSON type          meaning (see docs/doctor.md)
    mapping       string | null      "none" (no NAT), "endpoint-independent",
                                     "address-dependent", "address-and-port-dependent"
    filtering     string | null      an unsolicited inbound SYN: "open", "drop", "rst", "icmp"
    hairpin       bool | null        our own public address reached from inside
    port_mapping  [string] | null    protocols answering on the gateway, each at most once:
                                     "UPnP-IGD", "NAT-PMP", "PCP"; null: not measured
    cgnat         bool | null        a carrier-grade (or any second) NAT in front
    ipv6          bool               the rendezvous was reached over IPv6

Strict like the rest of the rendezvous codec: an unknown or missing key, a wrong
type or an unknown value is a :class:`NatSummaryError` naming it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Final, Protocol

from .errors import WireError

MAPPINGS: Final = frozenset({"none", "endpoint-independent", "address-dependent",
                             "address-and-port-dependent"})
FILTERINGS: Final = frozenset({"open", "drop", "rst", "icmp"})
PORT_MAPPINGS: Final = frozenset({"UPnP-IGD", "NAT-PMP", "PCP"})
KEYS: Final = ("mapping", "filtering", "hairpin", "port_mapping", "cgnat", "ipv6")


class NatSummaryError(WireError):
    """A ``nat`` object that is not valid (the message names the key)."""


class _ReportLike(Protocol):
    """What :meth:`NatSummary.from_report` reads (a ``nopf_web.doctor.DoctorReport``)."""

    @property
    def mapping(self) -> str | None: ...
    @property
    def filtering(self) -> str | None: ...
    @property
    def hairpin(self) -> bool | None: ...
    @property
    def port_mapping(self) -> tuple[str, ...] | None: ...
    @property
    def cgnat(self) -> bool | None: ...
    @property
    def ipv6(self) -> bool: ...


@dataclass(frozen=True)
class NatSummary:
    mapping: str | None = None
    filtering: str | None = None
    hairpin: bool | None = None
    port_mapping: tuple[str, ...] | None = None
    cgnat: bool | None = None
    ipv6: bool = False

    @classmethod
    def from_report(cls, report: _ReportLike) -> NatSummary:
        return cls(report.mapping, report.filtering, report.hairpin,
                   None if report.port_mapping is None else tuple(report.port_mapping),
                   report.cgnat, report.ipv6)

    @property
    def symmetric(self) -> bool:
        return self.mapping in ("address-dependent", "address-and-port-dependent")

    @property
    def kind(self) -> str:
        """One word for statistics and the lab's NAT names: "none", "symmetric", else
        the filtering of an endpoint-independent NAT ("drop", "rst", "icmp", "open"),
        or "unknown"."""
        if self.mapping == "none":
            return "none"
        if self.symmetric:
            return "symmetric"
        if self.mapping == "endpoint-independent" and self.filtering is not None:
            return self.filtering
        return "unknown"

    def to_wire(self) -> dict[str, Any]:
        return {"mapping": self.mapping, "filtering": self.filtering, "hairpin": self.hairpin,
                "port_mapping": None if self.port_mapping is None else list(self.port_mapping),
                "cgnat": self.cgnat, "ipv6": self.ipv6}

    @classmethod
    def from_wire(cls, obj: Any, where: str = "nat") -> NatSummary:
        if not isinstance(obj, dict):
            raise NatSummaryError(f"{where} must be an object")
        extra = set(obj) - set(KEYS)
        if extra:
            raise NatSummaryError(f"{where} has unknown key(s): {', '.join(sorted(extra))}")
        missing = [k for k in KEYS if k not in obj]
        if missing:
            raise NatSummaryError(f"{where} lacks key(s): {', '.join(missing)}")
        mapping = _choice(obj["mapping"], MAPPINGS, f"{where}.mapping")
        filtering = _choice(obj["filtering"], FILTERINGS, f"{where}.filtering")
        pm = obj["port_mapping"]
        port_mapping: tuple[str, ...] | None = None
        if pm is not None:
            if (not isinstance(pm, list) or len(pm) > len(PORT_MAPPINGS)
                    or len(set(map(str, pm))) != len(pm)):
                raise NatSummaryError(f"{where}.port_mapping must be a list of distinct "
                                      f"protocols or null")
            port_mapping = tuple(str(_choice(p, PORT_MAPPINGS, f"{where}.port_mapping[]"))
                                 for p in pm)
        ipv6 = obj["ipv6"]
        if type(ipv6) is not bool:
            raise NatSummaryError(f"{where}.ipv6 must be true or false")
        return cls(mapping, filtering, _flag(obj["hairpin"], f"{where}.hairpin"), port_mapping,
                   _flag(obj["cgnat"], f"{where}.cgnat"), ipv6)


def _choice(value: Any, choices: frozenset[str], what: str) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or value not in choices:
        raise NatSummaryError(f"{what} = {value!r:.40} is not one of "
                              f"{', '.join(sorted(choices))} or null")
    return value


def _flag(value: Any, what: str) -> bool | None:
    if value is not None and type(value) is not bool:
        raise NatSummaryError(f"{what} must be true, false or null")
    return value
