"""The NAT doctor's report: what was measured, as one frozen value.

:class:`DoctorReport` is what ``nopf doctor --json`` prints, what
``GET /api/doctor`` answers and what the Doctor page shows; it is meant to
travel later with a peer's rendezvous hello (so that the rendezvous and both
dashboards can predict the path) and to be kept in history. Its JSON
(:meth:`DoctorReport.to_json`, :meth:`DoctorReport.from_json`) is one flat
object, well under 1 KiB:

    key             JSON type            meaning
    version         1                    this format
    rendezvous      "host:port"          what was measured against
    public_address  "ip:port" | null     our address as the rendezvous saw it
    local_address   "ip:port" | null     the same connection's address on this machine
    mapping         string | null        "none" (no NAT), "endpoint-independent",
                                         "address-dependent", "address-and-port-dependent"
    mapping_by      ["port"(, "address")] what the destinations differed in: a
                                         rendezvous with one address cannot tell
                                         address-dependent from endpoint-independent
    port_preserved  bool | null          public port = local port on every probe
    port_step       int | null           constant difference between consecutive new
                                         mappings (a predictable allocator); null if
                                         ports are preserved, random or too few
    filtering       string | null        unsolicited inbound SYN: "open", "drop", "rst", "icmp"
    icmp            {type, code, from} | null  the ICMP error of "icmp", when known
    hairpin         bool | null          our own public address reached from inside
    port_mapping    [string] | null      port-mapping protocols answering on the gateway:
                                         "UPnP-IGD", "NAT-PMP", "PCP"; null: not measured
    gateway_address "ip" | null          the external address the gateway reported
    cgnat           bool | null          a carrier-grade (or any second) NAT in front
    ipv6            bool                 the rendezvous was reached over IPv6
    ipv6_address    "[ip]:port" | null   our IPv6 address as it saw it
    rtt_ms          number | null        TCP connect time to the rendezvous
    elapsed_ms      int                  how long the measurement took
    measured_at     number               when (Unix time, seconds)
    reasons         {key: "one line"}    why a value is null (or ipv6 false, or cgnat
                                         true); only those keys
    summary         string               (to_json(explain=True) only; derived, ignored
                                         by from_json) what it means, in plain words
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Final, Literal

from nopf_web.errors import NopfError
from nopf_web.wire.doctor import Icmp
from nopf_web.wire.rendezvous import Mapping as RendezvousMapping

NatMapping = Literal["none", "endpoint-independent", "address-dependent",
                     "address-and-port-dependent"]
NAT_MAPPINGS: Final = ("none", "endpoint-independent", "address-dependent",
                       "address-and-port-dependent")
Filtering = Literal["open", "drop", "rst", "icmp"]
FILTERINGS: Final = ("open", "drop", "rst", "icmp")
PORT_MAPPING_PROTOCOLS: Final = ("UPnP-IGD", "NAT-PMP", "PCP")
REPORT_VERSION: Final = 1
# What each kind means, for the facts (``nopf doctor``, the Doctor page).
_MAPPING_TEXT: Final[Mapping[NatMapping, str]] = {
    "none": "none: no NAT between this machine and the rendezvous",
    "endpoint-independent": "endpoint-independent: the same public port whatever the "
                            "destination",
    "address-dependent": "address-dependent (symmetric): a new public port for each "
                         "destination address",
    "address-and-port-dependent": "address-and-port-dependent (symmetric): a new public "
                                  "port for each destination",
}
_FILTERING_TEXT: Final[Mapping[Filtering, str]] = {
    "open": "open: unsolicited connections reach this machine",
    "drop": "drop: unsolicited connections are dropped silently",
    "rst": "rst: unsolicited connections are refused with a TCP reset",
    "icmp": "icmp: unsolicited connections are refused with an ICMP error",
}
MAX_REASON = 200  # characters of one reason

# Every key a report's JSON may have, in output order.
KEYS: Final = ("version", "rendezvous", "public_address", "local_address", "mapping",
               "mapping_by", "port_preserved", "port_step", "filtering", "icmp", "hairpin",
               "port_mapping", "gateway_address", "cgnat", "ipv6", "ipv6_address", "rtt_ms",
               "elapsed_ms", "measured_at", "reasons")
# Keys a reason may be given for.
REASON_KEYS: Final = frozenset({"public_address", "mapping", "port_preserved", "port_step",
                                "filtering", "hairpin", "port_mapping", "cgnat", "ipv6",
                                "rendezvous"})


class ReportError(NopfError, ValueError):
    """A report's JSON that is not valid (the message names the key)."""


@dataclass(frozen=True)
class DoctorReport:
    rendezvous: str
    public_address: str | None = None
    local_address: str | None = None
    mapping: NatMapping | None = None
    mapping_by: tuple[str, ...] = ()
    port_preserved: bool | None = None
    port_step: int | None = None
    filtering: Filtering | None = None
    icmp: Icmp | None = None
    hairpin: bool | None = None
    port_mapping: tuple[str, ...] | None = None
    gateway_address: str | None = None
    cgnat: bool | None = None
    ipv6: bool = False
    ipv6_address: str | None = None
    rtt_ms: float | None = None
    elapsed_ms: int = 0
    measured_at: float = 0.0
    reasons: tuple[tuple[str, str], ...] = field(default=())

    # -- reading ----------------------------------------------------------------------

    def reason(self, key: str) -> str | None:
        return dict(self.reasons).get(key)

    @property
    def symmetric(self) -> bool:
        """A new public address per destination: punching fails with any other NAT."""
        return self.mapping in ("address-dependent", "address-and-port-dependent")

    @property
    def rendezvous_is_local(self) -> bool:
        """The rendezvous was on this machine or this LAN: the figures say nothing of the
        NAT between here and the internet."""
        host = self.rendezvous.rpartition(":")[0].strip("[]")
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return host.lower() == "localhost"
        return any(ip in net for net in _LOCAL_NETS if net.version == ip.version)

    def rendezvous_mapping(self) -> RendezvousMapping:
        """The rendezvous' coarser classification (``fire.mapping``) of the same thing."""
        if self.mapping is None:
            return "unknown"
        if self.mapping == "none":
            return "none"
        return "stable" if self.mapping == "endpoint-independent" else "symmetric"

    def summary(self) -> str:
        """What the report means for sharing, in one or two plain sentences."""
        parts: list[str] = []
        if self.rendezvous_is_local:
            parts.append(f"The rendezvous ({self.rendezvous}) is on this machine or your own "
                         "network, so this says nothing about your connection to the "
                         "internet; measure against a rendezvous on the internet (-a, or "
                         "Settings).")
        if self.mapping is None:
            why = self.reason("mapping")
            parts.append("nopf could not tell what kind of NAT you are behind"
                         + (f" ({why})." if why else "."))
        elif self.mapping == "none":
            text = "No NAT: this machine has a public address, so you can share with anyone."
            if self.filtering in ("drop", "rst", "icmp"):
                text += (" A firewall refuses unsolicited connections; hole punching gets "
                         "through it.")
            parts.append(text)
        elif self.mapping == "endpoint-independent":
            parts.append("Your NAT keeps one public port per connection: you can share with "
                         "anyone except peers behind symmetric NATs.")
        else:
            parts.append("Behind a symmetric NAT: direct connections only to peers without "
                         "NAT; otherwise nopf will relay.")
        if self.cgnat:
            parts.append("Your provider's carrier-grade NAT sits in front of your router, so "
                         "port forwarding on your router cannot help.")
        return " ".join(parts)

    def facts(self) -> list[tuple[str, str, str]]:
        """(key, label, text) for each measured part, for the CLI and the Doctor page."""
        r = self.reason
        rows: list[tuple[str, str, str]] = []
        public = self.public_address or self._unknown("public_address")
        if self.public_address and self.local_address and self.mapping != "none":
            public += f" (this machine: {self.local_address})"
        rows.append(("public_address", "Public address", public))
        rows.append(("mapping", "Mapping", self._mapping_text()))
        rows.append(("filtering", "Filtering", self._filtering_text()))
        if self.hairpin is None:
            hairpin = self._unknown("hairpin")
        elif self.hairpin:
            hairpin = "yes: your own public address is reachable from this machine"
        else:
            hairpin = ("no: your own public address is not reachable from inside (peers on "
                       "your network connect over the LAN instead)")
        rows.append(("hairpin", "Hairpin", hairpin))
        if self.port_mapping is None:
            pm = self._unknown("port_mapping")
        elif self.port_mapping:
            pm = f"{', '.join(self.port_mapping)} answer on your gateway"
            if self.gateway_address:
                pm += f" (its external address: {self.gateway_address})"
        else:
            pm = "none of UPnP-IGD, NAT-PMP and PCP answers on your gateway"
        rows.append(("port_mapping", "Port mapping", pm))
        if self.cgnat is None:
            cgnat = self._unknown("cgnat")
        elif self.cgnat:
            cgnat = f"yes: {r('cgnat') or 'a second NAT is in front of your router'}"
        else:
            cgnat = "no"
        rows.append(("cgnat", "Carrier-grade NAT", cgnat))
        ipv6 = (f"yes: reached the rendezvous as {self.ipv6_address}" if self.ipv6
                else f"no: {r('ipv6') or 'not measured'}")
        rows.append(("ipv6", "IPv6", ipv6))
        return rows

    def _unknown(self, key: str) -> str:
        return f"unknown ({self.reason(key) or 'not measured'})"

    def _mapping_text(self) -> str:
        if self.mapping is None:
            return self._unknown("mapping")
        text = _MAPPING_TEXT[self.mapping]
        if self.mapping == "none":
            return text
        if self.mapping == "endpoint-independent" and "address" not in self.mapping_by:
            text += " port (the rendezvous has one address: address-dependent not ruled out)"
        if self.port_preserved:
            text += "; ports preserved"
        elif self.port_step is not None:
            text += f"; ports not preserved, each new mapping {self.port_step:+d}"
        elif self.port_preserved is False:
            text += "; ports not preserved"
            if self.symmetric:
                text += ", new ones unpredictable"
        return text

    def _filtering_text(self) -> str:
        if self.filtering is None:
            return self._unknown("filtering")
        text = _FILTERING_TEXT[self.filtering]
        if self.filtering == "icmp" and self.icmp is not None:
            text += f" (type {self.icmp.type}, code {self.icmp.code}"
            text += f", from {self.icmp.source})" if self.icmp.source else ")"
        return text

    # -- JSON -------------------------------------------------------------------------

    def to_json(self, *, explain: bool = True) -> dict[str, Any]:
        """One flat JSON object (see the module doc); ``explain`` adds ``summary``."""
        icmp: dict[str, Any] | None = None
        if self.icmp is not None:
            icmp = {"type": self.icmp.type, "code": self.icmp.code, "from": self.icmp.source}
        out: dict[str, Any] = {
            "version": REPORT_VERSION, "rendezvous": self.rendezvous,
            "public_address": self.public_address, "local_address": self.local_address,
            "mapping": self.mapping, "mapping_by": list(self.mapping_by),
            "port_preserved": self.port_preserved, "port_step": self.port_step,
            "filtering": self.filtering, "icmp": icmp, "hairpin": self.hairpin,
            "port_mapping": None if self.port_mapping is None else list(self.port_mapping),
            "gateway_address": self.gateway_address, "cgnat": self.cgnat, "ipv6": self.ipv6,
            "ipv6_address": self.ipv6_address,
            "rtt_ms": None if self.rtt_ms is None else round(self.rtt_ms, 1),
            "elapsed_ms": self.elapsed_ms, "measured_at": round(self.measured_at, 3),
            "reasons": dict(self.reasons),
        }
        if explain:
            out["summary"] = self.summary()
        return out

    @classmethod
    def from_json(cls, obj: Mapping[str, Any]) -> DoctorReport:
        """The report back from :meth:`to_json`'s object; :class:`ReportError` names the
        first key that is wrong. ``summary`` is accepted and ignored (it is derived)."""
        if not isinstance(obj, Mapping):
            raise ReportError("a doctor report must be a JSON object")
        unknown = set(obj) - set(KEYS) - {"summary"}
        if unknown:
            raise ReportError(f"unknown key(s) in the doctor report: {', '.join(sorted(unknown))}")
        missing = [k for k in KEYS if k not in obj]
        if missing:
            raise ReportError(f"the doctor report lacks {missing[0]!r}")
        if obj["version"] != REPORT_VERSION or type(obj["version"]) is not int:
            raise ReportError(f"doctor report version {obj['version']!r:.20} is not "
                              f"{REPORT_VERSION}")
        mapping_by = _str_list(obj["mapping_by"], "mapping_by", frozenset({"port", "address"}))
        port_mapping = None if obj["port_mapping"] is None else _str_list(
            obj["port_mapping"], "port_mapping", frozenset(PORT_MAPPING_PROTOCOLS))
        reasons = obj["reasons"]
        if not isinstance(reasons, dict):
            raise ReportError("reasons must be an object")
        for key, text in reasons.items():
            if key not in REASON_KEYS:
                raise ReportError(f"reasons has an unknown key {key!r:.40}")
            _text(text, f"reasons.{key}", MAX_REASON)
        return cls(
            rendezvous=_text(obj["rendezvous"], "rendezvous", 270),
            public_address=_opt_text(obj["public_address"], "public_address"),
            local_address=_opt_text(obj["local_address"], "local_address"),
            mapping=_choice(obj["mapping"], "mapping", NAT_MAPPINGS),  # type: ignore[arg-type]
            mapping_by=mapping_by,
            port_preserved=_opt_bool(obj["port_preserved"], "port_preserved"),
            port_step=_opt_int(obj["port_step"], "port_step", -65535, 65535),
            filtering=_choice(obj["filtering"], "filtering", FILTERINGS),  # type: ignore[arg-type]
            icmp=_icmp(obj["icmp"]),
            hairpin=_opt_bool(obj["hairpin"], "hairpin"),
            port_mapping=port_mapping,
            gateway_address=_opt_text(obj["gateway_address"], "gateway_address"),
            cgnat=_opt_bool(obj["cgnat"], "cgnat"),
            ipv6=_bool(obj["ipv6"], "ipv6"),
            ipv6_address=_opt_text(obj["ipv6_address"], "ipv6_address"),
            rtt_ms=_opt_num(obj["rtt_ms"], "rtt_ms"),
            elapsed_ms=_int(obj["elapsed_ms"], "elapsed_ms", 0, 3_600_000),
            measured_at=_num(obj["measured_at"], "measured_at"),
            reasons=tuple(sorted(reasons.items())),
        )


# Loopback, RFC 1918, link-local and unique-local: a rendezvous there is not on the internet.
# (Not ipaddress' is_private, which also covers the documentation ranges the lab uses.)
_LOCAL_NETS: Final = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "10.0.0.0/8", "172.16.0.0/12", "192.168.0.0/16", "169.254.0.0/16",
    "::1/128", "fc00::/7", "fe80::/10"))


def _text(value: Any, key: str, limit: int = 64) -> str:
    if not isinstance(value, str) or len(value) > limit or not value.isprintable():
        raise ReportError(f"{key} must be one line of text of at most {limit} characters")
    return value


def _opt_text(value: Any, key: str) -> str | None:
    return None if value is None else _text(value, key)


def _choice(value: Any, key: str, choices: tuple[str, ...]) -> str | None:
    if value is None:
        return None
    if value not in choices or not isinstance(value, str):
        raise ReportError(f"{key} = {value!r:.40} is not one of {', '.join(choices)} or null")
    return value


def _bool(value: Any, key: str) -> bool:
    if not isinstance(value, bool):
        raise ReportError(f"{key} must be true or false")
    return value


def _opt_bool(value: Any, key: str) -> bool | None:
    return None if value is None else _bool(value, key)


def _int(value: Any, key: str, lo: int, hi: int) -> int:
    if type(value) is not int or not lo <= value <= hi:
        raise ReportError(f"{key} must be a whole number from {lo} to {hi}")
    return value


def _opt_int(value: Any, key: str, lo: int, hi: int) -> int | None:
    return None if value is None else _int(value, key, lo, hi)


def _num(value: Any, key: str) -> float:
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        raise ReportError(f"{key} must be a number, 0 or more")
    return float(value)


def _opt_num(value: Any, key: str) -> float | None:
    return None if value is None else _num(value, key)


def _str_list(value: Any, key: str, choices: frozenset[str]) -> tuple[str, ...]:
    if not isinstance(value, list) or len(value) > len(choices) or len(set(value)) != len(value) \
            or not all(isinstance(v, str) and v in choices for v in value):
        raise ReportError(f"{key} must be a list of distinct values from "
                          f"{', '.join(sorted(choices))}")
    return tuple(value)


def _icmp(value: Any) -> Icmp | None:
    if value is None:
        return None
    if not isinstance(value, dict) or set(value) != {"type", "code", "from"}:
        raise ReportError("icmp must be {type, code, from} or null")
    source = value["from"]
    return Icmp(_int(value["type"], "icmp.type", 0, 255), _int(value["code"], "icmp.code", 0, 255),
                None if source is None else _text(source, "icmp.from"))
