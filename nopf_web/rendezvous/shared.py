"""What the nodes of one rendezvous share (``nopf-server --redis``), without I/O.

Several ``nopf-server`` nodes behind one name keep their pairing state in Redis
(:mod:`nopf_web.rendezvous.redis_book`, the I/O edge); the decisions stay in each
node's :class:`~nopf_web.rendezvous.server_machine.ServerMachine`. This module
holds the vocabulary between the two:

- :class:`Waiting`: what a waiting peer (a sharer on its nameplate, or the first
  of two resume hellos) publishes, so that a peer on any node can be paired with
  it: its address, LAN, mapping check, punch timeout, RTT, SPAKE2 message, relay
  capability, and which node and connection hold it.
- the book's operations (:data:`BookOp`, asked by the machine with
  :class:`~nopf_web.rendezvous.server_machine.AskBook`) and their answers
  (:data:`BookResult`, fed back with ``BookAnswer``);
- :data:`NodeMessage`: what one node tells another (the sharer's fire, a relay
  grant, a refusal), through a list in Redis that the receiving node pops; a
  pub/sub message only wakes it (a lost wake-up costs the next poll, never a
  decision).

Encodings (JSON objects, UTF-8), stored in Redis and passed between nodes:

    Waiting      {"node":ID,"conn":N,"public":"ip:port","lan":["ip:port",...],
                  "probe":"ip:port"|null,"punch_timeout":S,"rtt":S,"rtt_known":bool,
                  "pake":"base64"|null,"relay":bool,"direct_only":bool,
                  "relay_at":"ip:port"|null,"load":N,"side":"share"|"join",
                  "nat":{...}|null,"candidates":[{"path":P,"peer":ADDR},...]|null,
                  "relay_other":"ip:port"|null}
                 (``relay_at``: the address of the holding node's relay as this
                  peer reached it; ``relay_other``: that node's relay address in
                  the other family (IPv6 for a peer that came over IPv4, and the
                  reverse), null when it knows none (a waiting peer's record is
                  listed again once its node learns it), so a pairing with a peer of
                  the other family on another node can still relay there (a
                  record without the key, an older node's, reads as null);
                  ``load``: that node's relay sessions then;
                  ``nat`` and ``candidates``: its hello's fields as the rendezvous
                  codec spells them (:mod:`nopf_web.wire.nat`, at most
                  MAX_CANDIDATES candidates), null when its hello had none, so a
                  pairing across nodes predicts and offers the direct rungs as on
                  one node; a record without the keys (an older node's) reads as
                  null. About 340 bytes without them (360 to 385 with an IPv6
                  ``relay_other``), 1,040 with a full NAT report and
                  MAX_CANDIDATES IPv6 candidates; ``public`` and
                  ``relay_at`` are "[v6]:port" for a peer that reached its node
                  over IPv6.)
    NodeMessage  {"kind":"fire","conn":N,"data":"base64","delay":S}
                 {"kind":"grant","tokens":["base64","base64"],"ips":[IP,IP],"ttl":S}
                 {"kind":"refuse","conn":N,"code":C,"message":"one line"}
"""

from __future__ import annotations

import base64
import json
from dataclasses import dataclass
from typing import Any, Literal

from nopf_web.wire.address import Endpoint, parse_ipv4_endpoint, parse_observed_endpoint
from nopf_web.wire.nat import NatSummary, NatSummaryError
from nopf_web.wire.rendezvous import (
    Candidate,
    MessageError,
    candidates_from_wire,
    candidates_to_wire,
)

from .book import PeerInfo

NodeId = str  # 16 hex digits, drawn at each start: a restarted node is a new node
Side = Literal["share", "join"]


class SharedFormatError(ValueError):
    """A record or message in the shared store that this node cannot read."""


@dataclass(frozen=True, slots=True)
class Waiting:
    """A waiting peer, as every node can read it."""

    node: NodeId
    conn: int
    info: PeerInfo
    rtt_known: bool
    pake: bytes | None
    relay: bool  # can use relay stages
    direct_only: bool
    relay_at: Endpoint | None
    load: int
    side: Side = "share"
    nat: NatSummary | None = None  # its hello's NAT report (None: it sent none)
    candidates: tuple[Candidate, ...] | None = None  # its hello's (None: field absent)
    # Its node's relay address in the other family than ``relay_at``'s (None: unknown).
    relay_other: Endpoint | None = None

    def to_json(self) -> str:
        i = self.info
        return json.dumps({
            "node": self.node, "conn": self.conn, "public": str(i.public),
            "lan": [str(e) for e in i.lan], "probe": None if i.probe is None else str(i.probe),
            "punch_timeout": i.punch_timeout, "rtt": i.rtt, "rtt_known": self.rtt_known,
            "pake": None if self.pake is None else _b64(self.pake), "relay": self.relay,
            "direct_only": self.direct_only,
            "relay_at": None if self.relay_at is None else str(self.relay_at),
            "load": self.load, "side": self.side,
            "nat": None if self.nat is None else self.nat.to_wire(),
            "candidates": None if self.candidates is None
            else candidates_to_wire(self.candidates),
            "relay_other": None if self.relay_other is None else str(self.relay_other)},
            separators=(",", ":"))

    @classmethod
    def from_json(cls, text: str | bytes) -> Waiting:
        try:
            o = json.loads(text)
            side = o["side"]
            if side not in ("share", "join"):
                raise ValueError(side)
            probe, relay_at, pake = o["probe"], o["relay_at"], o["pake"]
            nat, cands, other = o.get("nat"), o.get("candidates"), o.get("relay_other")
            return cls(
                str(o["node"]), int(o["conn"]),
                PeerInfo(parse_observed_endpoint(o["public"]),
                         tuple(parse_ipv4_endpoint(e) for e in o["lan"]),
                         None if probe is None else parse_ipv4_endpoint(probe),
                         float(o["punch_timeout"]), float(o["rtt"])),
                bool(o["rtt_known"]), None if pake is None else base64.b64decode(pake),
                bool(o["relay"]), bool(o["direct_only"]),
                None if relay_at is None else parse_observed_endpoint(relay_at),
                int(o["load"]), side,
                None if nat is None else NatSummary.from_wire(nat, "waiting.nat"),
                None if cands is None else candidates_from_wire(cands, "waiting.candidates"),
                None if other is None else parse_observed_endpoint(other))
        except (KeyError, TypeError, ValueError, NatSummaryError, MessageError) as exc:
            raise SharedFormatError(f"unreadable waiting record: {exc}") from None

    @property
    def relay_ok(self) -> bool:
        """This peer's node can relay for it (a plan may end there)."""
        return self.relay and not self.direct_only and self.relay_at is not None


# -- the book's operations and answers -------------------------------------------------


@dataclass(frozen=True, slots=True)
class Allocate:
    """A new nameplate for a sharer (``owner``: sha256 hex of its secret, or '')."""

    waiting: Waiting
    owner: str
    lifetime: float


@dataclass(frozen=True, slots=True)
class Reclaim:
    """A sharer registers its code again (through any node): same owner secret."""

    nameplate: int
    waiting: Waiting
    owner: str


@dataclass(frozen=True, slots=True)
class Claim:
    """A joiner claims a nameplate. ``probe_first``: refuse with probe_required (code
    kept) if the sharer is symmetric and no relay can save the pair."""

    nameplate: int
    source: str
    probe_first: bool
    joiner_relays: bool


@dataclass(frozen=True, slots=True)
class Meet:
    """A resume hello: pair with the other side's waiting one, or wait (listed)."""

    resume_id: bytes
    waiting: Waiting


@dataclass(frozen=True, slots=True)
class Update:
    """A waiting sharer's record changed (its SPAKE2 message, its RTT)."""

    nameplate: int
    waiting: Waiting


@dataclass(frozen=True, slots=True)
class UpdateResume:
    """A waiting resume hello's record changed (its RTT, its node's relay addresses)."""

    resume_id: bytes
    waiting: Waiting


@dataclass(frozen=True, slots=True)
class Release:
    """A waiting sharer's code closes here (``why``: left or expired), if still its."""

    nameplate: int
    node: NodeId
    conn: int
    why: Literal["left", "expired"]


@dataclass(frozen=True, slots=True)
class Unlist:
    """A waiting resume hello ends without a partner (if still listed as this one)."""

    resume_id: bytes
    node: NodeId
    conn: int


@dataclass(frozen=True, slots=True)
class Republish:
    """After the store came back: this node's waiting peers, listed again where free."""

    # (nameplate, record, seconds left, owner hash)
    nameplates: tuple[tuple[int, Waiting, float, str], ...]
    resumes: tuple[tuple[bytes, Waiting, float], ...]


BookOp = (Allocate | Reclaim | Claim | Meet | Update | UpdateResume | Release | Unlist
          | Republish)


@dataclass(frozen=True, slots=True)
class Allocated:
    nameplate: int
    expires_in: float
    replaced: tuple[NodeId, int] | None = None  # Reclaim: the connection it replaced


@dataclass(frozen=True, slots=True)
class Claimed:
    waiting: Waiting  # the sharer, or (Meet) the other side's resume hello


@dataclass(frozen=True, slots=True)
class Listed:
    """Meet: no partner yet, we wait (``replaced``: an older hello of our side)."""

    replaced: tuple[NodeId, int] | None = None


@dataclass(frozen=True, slots=True)
class Refused:
    code: str
    message: str


BookResult = Allocated | Claimed | Listed | Refused


# -- node to node ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class FireAt:
    """Send ``data`` (the fire) to the waiting connection ``conn`` after ``delay`` s."""

    conn: int
    data: bytes
    delay: float


@dataclass(frozen=True, slots=True)
class Grant:
    """A relay session this node serves: the sharer's and the joiner's tokens, each
    bound to an IP, valid ``ttl`` s from receipt."""

    tokens: tuple[bytes, bytes]
    ips: tuple[str, str]
    ttl: float


@dataclass(frozen=True, slots=True)
class RefuseConn:
    """End the waiting connection ``conn`` with an error (it was replaced elsewhere)."""

    conn: int
    code: str
    message: str


NodeMessage = FireAt | Grant | RefuseConn


def encode_message(msg: NodeMessage) -> str:
    obj: dict[str, Any]
    if isinstance(msg, FireAt):
        obj = {"kind": "fire", "conn": msg.conn, "data": _b64(msg.data), "delay": msg.delay}
    elif isinstance(msg, Grant):
        obj = {"kind": "grant", "tokens": [_b64(t) for t in msg.tokens], "ips": list(msg.ips),
               "ttl": msg.ttl}
    else:
        obj = {"kind": "refuse", "conn": msg.conn, "code": msg.code, "message": msg.message}
    return json.dumps(obj, separators=(",", ":"))


def decode_message(text: str | bytes) -> NodeMessage:
    try:
        o = json.loads(text)
        kind = o["kind"]
        if kind == "fire":
            return FireAt(int(o["conn"]), base64.b64decode(o["data"]), float(o["delay"]))
        if kind == "grant":
            a, b = (base64.b64decode(t) for t in o["tokens"])
            ip_a, ip_b = (str(ip) for ip in o["ips"])
            return Grant((a, b), (ip_a, ip_b), float(o["ttl"]))
        if kind == "refuse":
            return RefuseConn(int(o["conn"]), str(o["code"]), str(o["message"])[:300])
        raise ValueError(f"unknown kind {kind!r}")
    except (KeyError, TypeError, ValueError) as exc:
        raise SharedFormatError(f"unreadable node message: {exc}") from None


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")
