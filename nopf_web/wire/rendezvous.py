"""Coordinated mode (rendezvous v2) messages, as a pure codec.

A v2 client connects to the rendezvous exactly like a seed client and, at once,
sends a ``hello`` frame. The rendezvous still writes the seed's 10-byte
discovery reply first (see :mod:`nopf_web.wire.discovery`), then reads the
hello; after that both directions carry only frames:

    offset  size  field    encoding
    0       4     length   payload size in bytes, u32 big-endian, 1..MAX_FRAME
    4       n     payload  one JSON object, UTF-8, with a string field "type"

Validation is strict: unknown types or fields, wrong JSON types (a bool is not
a number), out-of-range values, duplicate keys and oversize frames are all a
:class:`MessageError` naming the problem. Addresses are ``"IPv4:PORT"`` text;
those the rendezvous observed (``welcome.public``, ``fire.public``,
``fire.peer_public``, a relay stage's ``peer``) are ``"[IPv6]:PORT"`` for a peer
that reached it over IPv6 (no IPv4 punch is planned for such a peer).

Client -> rendezvous
    hello  {"type":"hello","version":2,"action":"share"|"join"|"reshare"|"rejoin",
            "nameplate":N|null,  (null only to share; "reshare"/"rejoin": the
                                  nameplate of a pairing whose punch failed, to
                                  coordinate it again, from the same public IP)
            "lan":["ip:port",...],  (<= MAX_CANDIDATES; our address as our OS sees it)
            "probe":"ip:port"|null,  (public address a plain discovery from the same
                                      port got just before: the NAT mapping check.
                                      A joiner sends null at first, to save its
                                      three round trips; see "probe_required")
            "punch_timeout":S,       (seconds this peer will punch; the plan uses the
                                      smaller of the two peers')
            "pake":"base64",         (optional, absent to share: our SPAKE2 message,
                                      PAKE_SIZE = 33 bytes, standard base64 = 44
                                      characters; forwarded opaquely to the peer)
            "relay":true,            (optional, absent unless true: this client can use a
                                      plan's "relay" stages. Without it the plans are
                                      punch-only, exactly as before relays existed)
            "nat":{...},             (optional, absent when unknown: this peer's NAT as its
                                      doctor measured it, the compact object of
                                      nopf_web.wire.nat, six keys, ~120 bytes; also allowed
                                      in a resume hello. The rendezvous predicts the path
                                      with it and hands it to the peer as "peer_nat")
            "owner":"base64",        (optional, "share" only: OWNER_SIZE = 16 random bytes
                                      the sharer drew, standard base64 = 24 characters.
                                      With "nameplate": null it registers a new code; with
                                      the code's nameplate it registers that code again
                                      (the sharer's rendezvous node went away: any node of
                                      a shared rendezvous takes it, if the owner matches)
            "candidates":[{"path":"ipv6"|"mapped","peer":ADDR},...]}
                                     (optional: this client races direct candidates and
                                      lists its own, <= MAX_CANDIDATES, possibly none:
                                      "ipv6" a global IPv6 address of ours and the port
                                      we punch from, ADDR "[v6]:port"; "mapped" the
                                      gateway's public IPv4 address and the port it
                                      forwards to us (NAT-PMP, PCP or UPnP-IGD), ADDR
                                      "ip:port". The rendezvous checks the syntax only
                                      and forwards them in the peer's fire. Also allowed
                                      in a resume hello)
    hello  {"type":"hello","version":2,"action":"resume",  (meet the peer of a tunnel
                                      again, after a path loss or to try direct: the two
                                      resume hellos with the same id and opposite sides
                                      pair like a code; the first waits RESUME_WAIT, pinged)
            "resume_id":"base64",    (RESUME_ID_SIZE = 16 bytes, standard base64 = 24
                                      characters, one spelling; derived from the tunnel's
                                      key by the peers, opaque to the rendezvous)
            "side":"share"|"join",   (which side of the tunnel this peer is)
            "direct_only":bool,      (true: punch stages only, no relay; a pair that
                                      cannot be punched is refused at once)
            "lan":[...],"probe":...,"punch_timeout":S}  (as above; no "nameplate",
                                      "pake" or "relay": a resume hello implies "relay"
                                      unless direct_only)
    relay  {"type":"relay","version":2,"token":"base64"}
           (instead of a hello, on a new connection to a relay stage's "peer": this
            side's token from its plan, RELAY_TOKEN_SIZE = 16 bytes, standard base64 =
            24 characters. The client then sends nothing until "relayed")
    pake   {"type":"pake","pake":"base64"}  (a sharer's SPAKE2 message, once, after the
                                             welcome: its code did not exist at its hello)
    pong   {"type":"pong","seq":N}   (answer to ping, at once)
    probe  {"type":"probe","version":2}
           (instead of a hello: "close right after the reply". The NAT mapping check
            connects twice from one port; the rendezvous closing first, at once,
            frees that 4-tuple for the second connection in a causal order, which
            no reordering of late packets can upset)

Rendezvous -> client
    welcome {"type":"welcome","nameplate":N,"expires_in":S,"public":"ip:port"}
            (to a sharer: its nameplate, open for S seconds)
    ping    {"type":"ping","seq":N}  (RTT measurement and liveness, while waiting)
    fire    {"type":"fire","public":"ip:port","peer_public":"ip:port",
             "plan":[{"path":"public"|"lan","peer":"ip:port","punch":"arm"|"connect",
                      "budget":S},...],  (then, only to a client that said "relay", at
                                          most one relay stage, always the last:
                                          {"path":"relay","peer":"<relay ip:port>",
                                          "punch":"connect","budget":S,"token":"base64"};
                                          "token" is present iff "path" is "relay".
                                          Decoded into Fire.plan (the punch stages) and
                                          Fire.relay)
             "rtt_ms":R, "note":"..."|null, "peer_pake":"base64",
             "mapping":{"you":M,"peer":M}, "peer_nat":{...}, "peer_candidates":[...]}
            (the joiner's is sent at once, the sharer's so that it arrives with the
             joiner's or a few ms later: start punching at once; the stages run in
             order, each for its budget. "peer_pake": the peer's SPAKE2 message, only
             when both peers sent one; absent otherwise. "mapping" (optional): how
             the rendezvous classified each side's NAT mapping, M one of "none" (no
             NAT), "stable" (endpoint-independent), "symmetric", "unknown"; "note"
             is its explanation for people, "mapping" the one programs decide on.
             "peer_nat" (optional): the peer's hello's "nat", as it sent it; absent when
             it sent none, and always to a client whose own hello had no "nat" (an
             older client would reject the field).
             "peer_candidates" (optional): the peer's "candidates" as it sent them,
             present iff both hellos had "candidates" (then possibly empty))
    error   {"type":"error","code":C,"message":"one line"}  (then the rendezvous closes)
            code "probe_required" (to a joiner whose hello had no probe, when the
            sharer's NAT is symmetric, so the plan depends on the joiner's mapping):
            the code stays open; the joiner probes from the same port and sends its
            hello again, with the probe
    relayed {"type":"relayed"}  (on a relay connection: both sides are here. From the
            next byte on, the connection carries the peer's bytes, copied unread both
            ways until either side closes)
"""

from __future__ import annotations

import base64
import ipaddress
import json
import struct
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from nopf_web.errors import NopfError

from .address import Endpoint, parse_ipv4_endpoint, parse_ipv6_endpoint, parse_observed_endpoint
from .errors import BadAddress, WireError
from .json_payload import Fields, load_object, message_type, present
from .nat import NatSummary, NatSummaryError

VERSION = 2
LENGTH = struct.Struct("!I")  # payload length, u32 big-endian
MAX_FRAME = 4096  # bytes of payload; every message fits in well under 1 KiB
MAX_CANDIDATES = 8  # LAN addresses per peer
MAX_NAMEPLATE = 999_999
MAX_SECONDS = 3600.0  # largest budget, expiry or punch timeout accepted
MAX_SEQ = 2**31 - 1
PAKE_SIZE = 33  # bytes of a SPAKE2 message: side byte b"A"/b"B", 32-byte Ed25519 element
PAKE_TEXT = 44  # its base64 length
RESUME_ID_SIZE = 16  # bytes of a resume id (128 bits: no guessing, no nameplate needed)
RELAY_TOKEN_SIZE = 16  # bytes of a relay token (single use, one per side of a pairing)
OWNER_SIZE = 16  # bytes of a sharer's owner secret (hello.owner: re-registers its code)
RESUME_WAIT = 30.0  # s the first of two resume hellos waits (pinged) for the other's

ERROR_CODES = frozenset({
    "bad_request",  # malformed or unexpected message
    "unsupported_version",  # hello.version is not one we speak
    "unknown_code",  # no such nameplate (never allocated, or the sharer left)
    "expired",  # the code's lifetime ended before a peer claimed it
    "used",  # codes are single-use: someone already claimed this one
    "too_many_guesses",  # too many failed claims from this source address
    "symmetric_nat",  # the pair cannot be punched: symmetric mapping named
    "busy",  # the rendezvous is out of nameplates or connections, or at a relay limit
    "timeout",  # a peer did not answer in time
    "probe_required",  # the joiner sent no NAT mapping check and the plan needs one
    "relay_refused",  # a relay connection's token is unknown, used, expired or not ours
})

HelloAction = Literal["share", "join", "reshare", "rejoin", "resume"]
ACTIONS: frozenset[str] = frozenset({"share", "join", "reshare", "rejoin", "resume"})
ResumeSide = Literal["share", "join"]  # the wire's names of the roles (server, client)
RESUME_SIDES: frozenset[str] = frozenset({"share", "join"})
# A punch stage's path: "public" and "lan" come in plans; "ipv6" and "mapped" are the
# peers' own candidates (the ladder makes stages of them). A relay stage is a RelayStage.
Path = Literal["public", "lan", "ipv6", "mapped"]
CandidatePath = Literal["ipv6", "mapped"]
CANDIDATE_PATHS: frozenset[str] = frozenset({"ipv6", "mapped"})
TacticName = Literal["arm", "connect"]
# How the rendezvous classified a peer's NAT mapping (see book.PeerInfo.mapping).
Mapping = Literal["none", "stable", "symmetric", "unknown"]
MAPPINGS: frozenset[str] = frozenset({"none", "stable", "symmetric", "unknown"})


class MessageError(WireError, NopfError):
    """Bytes that are not a valid coordinated-mode frame or message."""


@dataclass(frozen=True)
class Candidate:
    """A direct path a peer offers besides its public mapping and LAN address:
    ``ipv6`` (a global IPv6 address of the peer and its punch port) or ``mapped``
    (a port its gateway forwards to it; ``addr`` the gateway's public IPv4 address)."""

    path: CandidatePath
    addr: Endpoint


# Messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Hello:
    action: HelloAction
    nameplate: int | None
    lan: tuple[Endpoint, ...]
    probe: Endpoint | None
    punch_timeout: float
    version: int = VERSION
    pake: bytes | None = None  # our SPAKE2 message, for the peer (None: in-band SPAKE2)
    relay: bool = False  # code actions: we can use relay stages (resume: implied)
    resume_id: bytes | None = None  # "resume" only: which tunnel (RESUME_ID_SIZE bytes)
    side: ResumeSide | None = None  # "resume" only
    direct_only: bool = False  # "resume" only: punch stages only
    nat: NatSummary | None = None  # our doctor report, compact (None: absent)
    owner: bytes | None = None  # "share" only: the sharer's secret (OWNER_SIZE bytes)
    # None: the client knows nothing of candidates; else ours (possibly none), and the
    # peer's come back in the fire.
    candidates: tuple[Candidate, ...] | None = None

    @property
    def relay_capable(self) -> bool:
        """This peer can use relay stages, and wants them."""
        if self.action == "resume":
            return not self.direct_only
        return self.relay


@dataclass(frozen=True)
class PakeMessage:
    """A sharer's SPAKE2 message, sent once it has made its code (after the welcome)."""

    pake: bytes


@dataclass(frozen=True)
class Pong:
    seq: int


@dataclass(frozen=True)
class Probe:
    version: int = VERSION


@dataclass(frozen=True)
class Relay:
    """Join me with my peer: this side's relay token from its plan."""

    token: bytes
    version: int = VERSION


@dataclass(frozen=True)
class Welcome:
    nameplate: int
    expires_in: float
    public: Endpoint


@dataclass(frozen=True)
class Ping:
    seq: int


@dataclass(frozen=True)
class Stage:
    """A punch stage of a plan."""

    path: Path
    peer: Endpoint
    punch: TacticName
    budget: float


@dataclass(frozen=True)
class RelayStage:
    """A plan's relay stage (the last one): connect to ``relay`` and present ``token``
    in a :class:`Relay` message; the relay joins us with the peer. On the wire, a plan
    entry with path "relay" and punch "connect"."""

    relay: Endpoint  # the rendezvous' own address, as this client reached it
    budget: float
    token: bytes  # this side's, single use (RELAY_TOKEN_SIZE bytes)


@dataclass(frozen=True)
class Fire:
    public: Endpoint
    peer_public: Endpoint
    plan: tuple[Stage, ...]
    rtt_ms: float
    note: str | None = None
    peer_pake: bytes | None = None  # the peer's SPAKE2 message, as it sent it
    mapping: tuple[Mapping, Mapping] | None = None  # (ours, the peer's), as classified
    relay: RelayStage | None = None  # after the punch stages ("plan" may then be empty)
    peer_nat: NatSummary | None = None  # the peer's hello's "nat" (None: it sent none)
    # The peer's candidates (None: one of the two hellos had no "candidates").
    peer_candidates: tuple[Candidate, ...] | None = None

    @property
    def hopeless(self) -> bool:
        """A symmetric NAT faces another NAT: punching again cannot help."""
        if self.mapping is None:
            return False
        ours, theirs = self.mapping
        return "symmetric" in self.mapping and "none" not in (ours, theirs)


@dataclass(frozen=True)
class Relayed:
    """Both sides are on the relay: from the next byte on, the peer's bytes."""


@dataclass(frozen=True)
class ErrorReply:
    code: str
    message: str


ClientMessage = Hello | Pong | Probe | PakeMessage | Relay
ServerMessage = Welcome | Ping | Fire | ErrorReply | Relayed
Message = ClientMessage | ServerMessage


# Encoding ---------------------------------------------------------------------


def candidates_to_wire(cands: tuple[Candidate, ...]) -> list[dict[str, str]]:
    """Candidates as a hello's ``candidates`` field spells them (for other stores:
    the shared book's waiting records)."""
    return [{"path": c.path, "peer": str(c.addr)} for c in cands]


def candidates_from_wire(raw: Any, where: str = "candidates") -> tuple[Candidate, ...]:
    """The inverse of :func:`candidates_to_wire`, as strict as a hello's field;
    :class:`MessageError` names ``where``."""
    if not isinstance(raw, list) or len(raw) > MAX_CANDIDATES:
        raise MessageError(f"{where} must be a list of at most {MAX_CANDIDATES} candidates")
    out = []
    for item in raw:
        if not isinstance(item, dict):
            raise MessageError(f"{where} entries must be objects")
        c = _Fields(item, f"{where}[]", {"path", "peer"})
        path = present(c.text("path", choices=CANDIDATE_PATHS))
        text = present(c.text("peer"))
        out.append(Candidate(path, _ipv6_endpoint(text, f"{where}[].peer") if path == "ipv6"
                             else _endpoint(text, f"{where}[].peer")))
    return tuple(out)


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _to_json(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Hello):
        if msg.action == "resume":
            resume = {"type": "hello", "version": msg.version, "action": msg.action,
                      "resume_id": None if msg.resume_id is None else _b64(msg.resume_id),
                      "side": msg.side, "direct_only": msg.direct_only,
                      "lan": [str(e) for e in msg.lan],
                      "probe": str(msg.probe) if msg.probe else None,
                      "punch_timeout": msg.punch_timeout}
            if msg.nat is not None:  # absent, not null: what a client without it sends
                resume["nat"] = msg.nat.to_wire()
            if msg.candidates is not None:
                resume["candidates"] = candidates_to_wire(msg.candidates)
            return resume
        hello = {"type": "hello", "version": msg.version, "action": msg.action,
                 "nameplate": msg.nameplate, "lan": [str(e) for e in msg.lan],
                 "probe": str(msg.probe) if msg.probe else None,
                 "punch_timeout": msg.punch_timeout}
        if msg.pake is not None:  # absent, not null: what a client without it sends
            hello["pake"] = _b64(msg.pake)
        if msg.relay:  # absent unless true: a hello without it is what it always was
            hello["relay"] = True
        if msg.nat is not None:  # absent, not null: what a client without it sends
            hello["nat"] = msg.nat.to_wire()
        if msg.owner is not None:  # absent unless set, as pake
            hello["owner"] = _b64(msg.owner)
        if msg.candidates is not None:  # absent: a hello without it is what it always was
            hello["candidates"] = candidates_to_wire(msg.candidates)
        if msg.resume_id is not None or msg.side is not None or msg.direct_only:
            # Caught by the decoding check below, with the message naming the field.
            hello.update(resume_id=msg.resume_id and _b64(msg.resume_id), side=msg.side,
                         direct_only=msg.direct_only)
        return hello
    if isinstance(msg, PakeMessage):
        return {"type": "pake", "pake": _b64(msg.pake)}
    if isinstance(msg, Pong):
        return {"type": "pong", "seq": msg.seq}
    if isinstance(msg, Probe):
        return {"type": "probe", "version": msg.version}
    if isinstance(msg, Relay):
        return {"type": "relay", "version": msg.version, "token": _b64(msg.token)}
    if isinstance(msg, Relayed):
        return {"type": "relayed"}
    if isinstance(msg, Ping):
        return {"type": "ping", "seq": msg.seq}
    if isinstance(msg, Welcome):
        return {"type": "welcome", "nameplate": msg.nameplate, "expires_in": msg.expires_in,
                "public": str(msg.public)}
    if isinstance(msg, Fire):
        plan = [_stage(s) for s in msg.plan]
        if msg.relay is not None:  # last: a client that cannot relay punches before it
            plan.append({"path": "relay", "peer": str(msg.relay.relay), "punch": "connect",
                         "budget": msg.relay.budget, "token": _b64(msg.relay.token)})
        fire = {"type": "fire", "public": str(msg.public), "peer_public": str(msg.peer_public),
                "plan": plan, "rtt_ms": msg.rtt_ms, "note": msg.note}
        if msg.peer_pake is not None:  # absent, not null: a client without it rejects the field
            fire["peer_pake"] = _b64(msg.peer_pake)
        if msg.mapping is not None:
            fire["mapping"] = {"you": msg.mapping[0], "peer": msg.mapping[1]}
        if msg.peer_nat is not None:  # absent unless the peer sent its "nat"
            fire["peer_nat"] = msg.peer_nat.to_wire()
        if msg.peer_candidates is not None:
            fire["peer_candidates"] = candidates_to_wire(msg.peer_candidates)
        return fire
    return {"type": "error", "code": msg.code, "message": msg.message}


def _stage(s: Stage) -> dict[str, Any]:
    return {"path": s.path, "peer": str(s.peer), "punch": s.punch, "budget": s.budget}


def encode(msg: Message) -> bytes:
    """One frame: length prefix and JSON. Validates by decoding, so we never send
    what a peer would reject."""
    payload = json.dumps(_to_json(msg), separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise MessageError(f"{type(msg).__name__} message is {len(payload)} bytes, "
                           f"over the {MAX_FRAME}-byte limit")
    _decode_any(payload)
    return LENGTH.pack(len(payload)) + payload


# Decoding ---------------------------------------------------------------------


class _Fields(Fields):
    """Typed access to one message's fields; a failure is a :class:`MessageError`."""

    def __init__(self, obj: dict[str, Any], kind: str, allowed: set[str]) -> None:
        super().__init__(obj, kind, allowed, MessageError)

    def pake(self, name: str, *, optional: bool = False) -> bytes | None:
        return self.b64(name, PAKE_SIZE, f"a {PAKE_SIZE}-byte SPAKE2 message",
                        optional=optional)

    def endpoint(self, name: str, *, optional: bool = False,
                 observed: bool = False) -> Endpoint | None:
        """``observed``: an address the rendezvous saw, which may be IPv6."""
        value = self.text(name, optional=optional)
        if value is None:
            return None
        return _endpoint(value, f"{self.kind}.{name}",
                         parse_observed_endpoint if observed else parse_ipv4_endpoint)


def _endpoint(text: str, what: str,
              parse: Callable[[str], Endpoint] = parse_ipv4_endpoint) -> Endpoint:
    """``text`` as ``parse`` reads it; its error a :class:`MessageError` naming ``what``."""
    try:
        return parse(text)
    except BadAddress as exc:
        raise MessageError(f"{what}: {exc}") from None


def _hello(f: _Fields) -> Hello:
    version = present(f.int("version", 0, MAX_SEQ))
    if version != VERSION:  # checked before the rest so a newer client gets a clear answer
        raise UnsupportedVersion(version)
    action = present(f.text("action", choices=ACTIONS))
    if action == "resume":
        return _resume(f)
    for name in ("resume_id", "side", "direct_only"):
        if name in f.obj:
            raise MessageError(f"hello.{name} belongs to a resume hello, not to {action}")
    relay = f.flag("relay", optional=True)
    if relay is False:
        raise MessageError("hello.relay must be true or absent")
    nameplate = f.int("nameplate", 1, MAX_NAMEPLATE, optional=True)
    owner = f.b64("owner", OWNER_SIZE, f"a {OWNER_SIZE}-byte owner secret", optional=True)
    if owner is not None and action != "share":
        raise MessageError(f"hello.owner belongs to a share hello, not to {action}")
    if action != "share" and nameplate is None:
        raise MessageError(f"hello.nameplate is required to {action}")
    if action == "share" and nameplate is not None and owner is None:
        raise MessageError("hello.nameplate must be null to share (the rendezvous allocates "
                           "it), unless hello.owner registers that code again")
    pake = f.pake("pake", optional=True)
    if action == "share" and pake is not None:
        raise MessageError("hello.pake must be absent to share (the code does not exist yet: "
                           "send it in a pake message after the welcome)")
    return Hello(action, nameplate, _lan(f), f.endpoint("probe", optional=True),
                 f.num("punch_timeout", 0.1, MAX_SECONDS), pake=pake, relay=bool(relay),
                 nat=_nat(f, "nat"), owner=owner,
                 candidates=_candidates(f, "candidates"))


def _resume(f: _Fields) -> Hello:
    for name in ("nameplate", "pake", "relay", "owner"):
        if name in f.obj:
            raise MessageError(f"hello.{name} must be absent to resume")
    resume_id = present(f.b64("resume_id", RESUME_ID_SIZE, f"a {RESUME_ID_SIZE}-byte resume id"))
    side = present(f.text("side", choices=RESUME_SIDES))
    return Hello("resume", None, _lan(f), f.endpoint("probe", optional=True),
                 f.num("punch_timeout", 0.1, MAX_SECONDS), resume_id=resume_id, side=side,
                 direct_only=present(f.flag("direct_only")), nat=_nat(f, "nat"),
                 candidates=_candidates(f, "candidates"))


def _nat(f: _Fields, name: str) -> NatSummary | None:
    """An optional compact NAT report (absent: None; null is not a spelling of it)."""
    if name not in f.obj:
        return None
    try:
        return NatSummary.from_wire(f.obj[name], f"{f.kind}.{name}")
    except NatSummaryError as exc:
        raise MessageError(str(exc)) from None


def _candidates(f: _Fields, name: str) -> tuple[Candidate, ...] | None:
    raw = f.obj.get(name)
    if raw is None:
        if name in f.obj:
            raise MessageError(f"{f.kind}.{name} must be a list or absent, not null")
        return None
    return candidates_from_wire(raw, f"{f.kind}.{name}")


CGNAT = ipaddress.IPv4Network("100.64.0.0/10")  # RFC 6598 shared address space


def mapped_unusable(external: str, seen: str | None) -> str | None:
    """Why a port mapped on a gateway whose external address is ``external`` cannot be
    reached by peers, given ``seen``, its owner's public IP as the rendezvous saw it
    (None: unknown); None when it can. The one rule for every mapped candidate: the
    owner offers it only under it, and each peer uses one only under it."""
    if seen is None:
        return ("no mapping check ran, so the public address the rendezvous sees is "
                "unknown")
    if external == seen:
        return None
    try:
        cgnat = " (carrier-grade NAT range)" if ipaddress.ip_address(external) in CGNAT else ""
    except ValueError:
        cgnat = ""
    return (f"the gateway's public address is not {seen}, the one the rendezvous sees: it "
            f"is {external}{cgnat} (another NAT in front of the gateway)")


GLOBAL_UNICAST = ipaddress.IPv6Network("2000::/3")  # RFC 4291 §2.4: global unicast space


def is_global_unicast(ip: ipaddress.IPv6Address) -> bool:
    """In 2000::/3: never link-local, unique-local, loopback or multicast. (Python's
    ``is_global`` would also refuse the documentation prefix the lab uses.)"""
    return ip in GLOBAL_UNICAST


def _ipv6_endpoint(text: str, what: str) -> Endpoint:
    """``[v6]:port``: a global unicast IPv6 address (what a peer can be reached at)."""
    endpoint = _endpoint(text, what, parse_ipv6_endpoint)
    if not is_global_unicast(ipaddress.IPv6Address(endpoint.host)):
        raise MessageError(f"{what}: {endpoint.host} is not a global unicast IPv6 address "
                           "(2000::/3)")
    return endpoint


def _lan(f: _Fields) -> tuple[Endpoint, ...]:
    lan = f.obj.get("lan", [])
    if not isinstance(lan, list) or len(lan) > MAX_CANDIDATES:
        raise MessageError(f"hello.lan must be a list of at most {MAX_CANDIDATES} addresses")
    cands = []
    for item in lan:
        if not isinstance(item, str) or len(item) > 21:
            raise MessageError(f"hello.lan entries must be 'ip:port' strings, got {item!r:.40}")
        cands.append(_endpoint(item, "hello.lan"))
    return tuple(cands)


def _fire(f: _Fields) -> Fire:
    plan = f.obj.get("plan")
    # Empty only beside "peer_candidates": a pair with no IPv4 path and no relay, whose
    # one way is its own IPv6 candidates (older clients never get such a plan).
    least = 0 if "peer_candidates" in f.obj else 1
    if not isinstance(plan, list) or not least <= len(plan) <= MAX_CANDIDATES:
        raise MessageError(f"fire.plan must be a list of {least}-{MAX_CANDIDATES} stages")
    stages = []
    relay = None
    for raw in plan:
        if not isinstance(raw, dict):
            raise MessageError("fire.plan entries must be objects")
        if relay is not None:
            raise MessageError("fire.plan: the relay stage must be the last one")
        s = _Fields(raw, "fire.plan[]", {"path", "peer", "punch", "budget", "token"})
        path = present(s.text("path", choices=frozenset({"public", "lan", "relay"})))
        peer = present(s.endpoint("peer", observed=path == "relay"))
        punch = present(s.text("punch", choices=frozenset({"arm", "connect"})))
        budget = s.num("budget", 0.1, MAX_SECONDS)
        if path == "relay":
            if punch != "connect":
                raise MessageError("fire.plan[].punch must be connect on a relay stage")
            relay = RelayStage(peer, budget, present(s.b64(
                "token", RELAY_TOKEN_SIZE, f"a {RELAY_TOKEN_SIZE}-byte relay token")))
        elif "token" in raw:
            raise MessageError(f"fire.plan[].token belongs to relay stages, not {path}")
        else:
            stages.append(Stage(path, peer, punch, budget))
    mapping: tuple[Mapping, Mapping] | None = None
    raw_mapping = f.obj.get("mapping")
    if raw_mapping is not None:
        if not isinstance(raw_mapping, dict):
            raise MessageError("fire.mapping must be an object")
        m = _Fields(raw_mapping, "fire.mapping", {"you", "peer"})
        mapping = (present(m.text("you", choices=MAPPINGS)),
                   present(m.text("peer", choices=MAPPINGS)))
    return Fire(present(f.endpoint("public", observed=True)),
                present(f.endpoint("peer_public", observed=True)), tuple(stages),
                f.num("rtt_ms", 0, MAX_SECONDS * 1000), f.text("note", optional=True),
                f.pake("peer_pake", optional=True), mapping, relay, _nat(f, "peer_nat"),
                _candidates(f, "peer_candidates"))


_FIELDS: dict[str, set[str]] = {
    "hello": {"version", "action", "nameplate", "lan", "probe", "punch_timeout", "pake",
              "relay", "resume_id", "side", "direct_only", "nat", "owner",
              "candidates"},
    "pake": {"pake"},
    "pong": {"seq"},
    "probe": {"version"},
    "relay": {"version", "token"},
    "ping": {"seq"},
    "welcome": {"nameplate", "expires_in", "public"},
    "fire": {"public", "peer_public", "plan", "rtt_ms", "note", "peer_pake", "mapping",
             "peer_nat", "peer_candidates"},
    "relayed": set(),
    "error": {"code", "message"},
}
CLIENT_TYPES = frozenset({"hello", "pong", "probe", "pake", "relay"})
SERVER_TYPES = frozenset({"welcome", "ping", "fire", "error", "relayed"})


class UnsupportedVersion(MessageError):
    def __init__(self, version: int) -> None:
        super().__init__(f"protocol version {version} is not supported (this side speaks "
                         f"{VERSION})")
        self.version = version


def _decode_any(payload: bytes, allowed: frozenset[str] = CLIENT_TYPES | SERVER_TYPES) -> Message:
    obj = load_object(payload, MessageError)
    kind = message_type(obj, allowed, MessageError)
    f = _Fields(obj, kind, _FIELDS[kind])
    if kind == "hello":
        return _hello(f)
    if kind == "pong":
        return Pong(present(f.int("seq", 0, MAX_SEQ)))
    if kind == "pake":
        return PakeMessage(present(f.pake("pake")))
    if kind == "probe":
        version = present(f.int("version", 0, MAX_SEQ))
        if version != VERSION:
            raise UnsupportedVersion(version)
        return Probe(version)
    if kind == "relay":
        version = present(f.int("version", 0, MAX_SEQ))
        if version != VERSION:
            raise UnsupportedVersion(version)
        return Relay(present(f.b64("token", RELAY_TOKEN_SIZE,
                                f"a {RELAY_TOKEN_SIZE}-byte relay token")), version)
    if kind == "relayed":
        return Relayed()
    if kind == "ping":
        return Ping(present(f.int("seq", 0, MAX_SEQ)))
    if kind == "welcome":
        return Welcome(present(f.int("nameplate", 1, MAX_NAMEPLATE)),
                       f.num("expires_in", 0, MAX_SECONDS),
                       present(f.endpoint("public", observed=True)))
    if kind == "fire":
        return _fire(f)
    return ErrorReply(present(f.text("code", choices=ERROR_CODES)), present(f.text("message")))


def decode_client_message(payload: bytes) -> ClientMessage:
    """Decode one frame payload sent by a peer to the rendezvous."""
    msg = _decode_any(payload, CLIENT_TYPES)
    assert isinstance(msg, Hello | Pong | Probe | PakeMessage | Relay)
    return msg


def decode_server_message(payload: bytes) -> ServerMessage:
    """Decode one frame payload sent by the rendezvous to a peer."""
    msg = _decode_any(payload, SERVER_TYPES)
    assert isinstance(msg, Welcome | Ping | Fire | ErrorReply | Relayed)
    return msg


class FrameReader:
    """Sans-IO frame splitter: feed bytes as they arrive, get complete payloads.

    Rejects an announced length of 0 or over ``MAX_FRAME`` as soon as the
    4-byte header is in, so a garbage or hostile sender costs at most 4 bytes
    of buffering before the error.
    """

    def __init__(self, max_frame: int = MAX_FRAME) -> None:
        self._buf = bytearray()
        self._max = max_frame

    @property
    def buffered(self) -> int:
        return len(self._buf)

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        frames = []
        while len(self._buf) >= LENGTH.size:
            (size,) = LENGTH.unpack_from(self._buf)
            if not 1 <= size <= self._max:
                raise MessageError(f"frame length {size} is out of range (1-{self._max}): "
                                   "not a nopf coordinated-mode peer")
            if len(self._buf) < LENGTH.size + size:
                break
            frames.append(bytes(self._buf[LENGTH.size:LENGTH.size + size]))
            del self._buf[:LENGTH.size + size]
        return frames
