"""The NAT doctor's probe protocol (client <-> doctor responder), as a pure codec.

The doctor responder listens on its own TCP port beside the rendezvous
(``nopf-server --doctor-port``, by default the rendezvous port + 1). It uses the
frame format of coordinated mode (:mod:`nopf_web.wire.rendezvous`), with its own
message types and version:

    offset  size  field    encoding
    0       4     length   payload size in bytes, u32 big-endian, 1..MAX_FRAME (4096)
    4       n     payload  one JSON object, UTF-8, with a string field "type"

Nothing is sent before the client's one message. Decoding is strict, as in
coordinated mode: unknown types or fields, wrong JSON types (a bool is not a
number), out-of-range values, duplicate keys and oversize frames are all a
:class:`DoctorMessageError` naming the problem. Addresses are ``"IPv4:PORT"``
or ``"[IPv6]:PORT"`` text; bare addresses (``others``, ``icmp.from``) have no
port and no brackets.

Client -> responder (exactly one message per connection)
    check  {"type":"check","version":1,"dial_back":B,"wait_ms":W}
           "what address do you see?" and, when B is true, "then dial me back":
           the responder connects to the address this connection came from
           (never anywhere else: the message carries no address), from another
           local port (and from another of its addresses when it has one),
           waits up to W ms (MIN_WAIT_MS..MAX_WAIT_MS) and reports what came back.

Responder -> client, in this order, then the responder closes
    seen       {"type":"seen","public":"ip:port","others":["ip",...]}
               at once: the source address of this connection as the responder
               saw it, and the responder's other addresses (<= MAX_OTHERS; IPv4 or
               IPv6) on which the same port answers: a second IPv4 address tells
               address-dependent mappings apart; an IPv6 one tests IPv6.
    dial_back  {"type":"dial_back","outcome":O,"from":"ip:port","ms":N,
                "icmp":{"type":T,"code":C,"from":"ip"}}   ("icmp" only when known)
               only if B: O is "open" (the connection was accepted: nothing
               filters), "rst" (a TCP reset came back), "icmp" (an ICMP error came
               back; its type, code and sender when the platform reports them) or
               "drop" (nothing within W ms). "from" is where the dial came from,
               "ms" how long the answer took.
    error      {"type":"error","code":C,"message":"one line","retry_in":S}
               instead of dial_back (after seen) or of everything (bad request):
               C is one of ERROR_CODES; "retry_in" (seconds, only with
               "rate_limited") says when a dial-back will be accepted again.
"""

from __future__ import annotations

import ipaddress
import json
import math
from dataclasses import dataclass
from typing import Any, Literal

from nopf_web.errors import NopfError
from nopf_web.inputs import is_ascii_digits

from .address import Endpoint
from .errors import WireError
from .json_payload import Fields, load_object, message_type, present, text
from .rendezvous import LENGTH, MAX_FRAME, FrameReader

__all__ = [
    "DEFAULT_PORT_OFFSET",
    "ERROR_CODES",
    "MAX_FRAME",
    "MAX_OTHERS",
    "MAX_WAIT_MS",
    "MIN_WAIT_MS",
    "OUTCOMES",
    "VERSION",
    "Check",
    "DialBack",
    "DoctorError",
    "DoctorMessageError",
    "FrameReader",
    "Icmp",
    "Outcome",
    "Seen",
    "decode_client_message",
    "decode_responder_message",
    "encode",
    "parse_endpoint",
]

VERSION = 1
DEFAULT_PORT_OFFSET = 1  # the responder's port is the rendezvous port + 1 unless configured
MIN_WAIT_MS = 100  # shortest dial-back wait a client may ask for
MAX_WAIT_MS = 3000  # longest: bounds what one probe can cost the responder
MAX_OTHERS = 4  # other addresses announced in a seen message
MAX_MS = 60_000  # largest "ms" accepted
MAX_RETRY = 3600.0  # s, largest retry_in

Outcome = Literal["open", "rst", "icmp", "drop"]
OUTCOMES: frozenset[str] = frozenset({"open", "rst", "icmp", "drop"})
ERROR_CODES = frozenset({
    "bad_request",  # not one valid check message
    "unsupported_version",  # check.version is not one we speak
    "rate_limited",  # too many dial-backs to this source lately (see retry_in)
    "busy",  # too many dial-backs under way, or too many connections
    "dial_failed",  # the responder could not dial at all (its own error, not the NAT's)
})


class DoctorMessageError(WireError, NopfError):
    """Bytes that are not a valid doctor-protocol frame or message."""


# Addresses --------------------------------------------------------------------


def _address(text: str, what: str) -> str:
    if "%" in text or not text.isascii():  # no zone ids, ASCII only
        raise DoctorMessageError(f"{what}: {text!r:.60} is not an IP address")
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        raise DoctorMessageError(f"{what}: {text!r:.60} is not an IP address") from None
    if ip.is_unspecified or ip.is_multicast:
        raise DoctorMessageError(f"{what}: {ip} cannot be a host address")
    if str(ip) != text:  # one spelling per address
        raise DoctorMessageError(f"{what}: {text!r:.60} is not written canonically ({ip})")
    return text


def parse_endpoint(text: str, what: str = "address") -> Endpoint:
    """``ip:port`` or ``[ipv6]:port`` (canonical spelling), port 1-65535."""
    if text.startswith("["):
        host, sep, port = text[1:].partition("]:")
        if not sep or ":" not in host:
            raise DoctorMessageError(f"{what}: {text!r:.60} is not [IPv6]:PORT")
    else:
        host, sep, port = text.rpartition(":")
        if not sep or ":" in host:
            raise DoctorMessageError(f"{what}: {text!r:.60} is not IP:PORT")
    _address(host, what)
    if not is_ascii_digits(port) or len(port) > 5 or not 1 <= int(port) <= 65535 \
            or str(int(port)) != port:
        raise DoctorMessageError(f"{what}: port {port!r:.10} is not 1-65535")
    return Endpoint(host, int(port))


# Messages ---------------------------------------------------------------------


@dataclass(frozen=True)
class Check:
    dial_back: bool
    wait_ms: int = 500
    version: int = VERSION


@dataclass(frozen=True)
class Seen:
    public: Endpoint
    others: tuple[str, ...] = ()


@dataclass(frozen=True)
class Icmp:
    """The ICMP error that answered a dial-back, as the responder's kernel reported it."""

    type: int
    code: int
    source: str | None = None  # the router or NAT that sent it


@dataclass(frozen=True)
class DialBack:
    outcome: Outcome
    source: Endpoint  # where the responder dialed from ("from")
    ms: int
    icmp: Icmp | None = None


@dataclass(frozen=True)
class DoctorError:
    code: str
    message: str
    retry_in: float | None = None


ClientMessage = Check
ResponderMessage = Seen | DialBack | DoctorError
Message = ClientMessage | ResponderMessage


def _to_json(msg: Message) -> dict[str, Any]:
    if isinstance(msg, Check):
        return {"type": "check", "version": msg.version, "dial_back": msg.dial_back,
                "wait_ms": msg.wait_ms}
    if isinstance(msg, Seen):
        return {"type": "seen", "public": str(msg.public),
                "others": list(msg.others)}
    if isinstance(msg, DialBack):
        out: dict[str, Any] = {"type": "dial_back", "outcome": msg.outcome,
                               "from": str(msg.source), "ms": msg.ms}
        if msg.icmp is not None:
            icmp: dict[str, Any] = {"type": msg.icmp.type, "code": msg.icmp.code}
            if msg.icmp.source is not None:
                icmp["from"] = msg.icmp.source
            out["icmp"] = icmp
        return out
    err: dict[str, Any] = {"type": "error", "code": msg.code, "message": msg.message}
    if msg.retry_in is not None:
        err["retry_in"] = msg.retry_in
    return err


def encode(msg: Message) -> bytes:
    """One frame. Validates by decoding, so we never send what the other side rejects."""
    payload = json.dumps(_to_json(msg), separators=(",", ":")).encode()
    if len(payload) > MAX_FRAME:
        raise DoctorMessageError(f"{type(msg).__name__} message is {len(payload)} bytes, "
                                 f"over the {MAX_FRAME}-byte limit")
    _decode(payload, CLIENT_TYPES | RESPONDER_TYPES)
    return LENGTH.pack(len(payload)) + payload


# Decoding ---------------------------------------------------------------------


class UnsupportedVersion(DoctorMessageError):
    def __init__(self, version: int) -> None:
        super().__init__(f"doctor protocol version {version} is not supported (this side "
                         f"speaks {VERSION})")
        self.version = version


_FIELDS: dict[str, frozenset[str]] = {
    "check": frozenset({"version", "dial_back", "wait_ms"}),
    "seen": frozenset({"public", "others"}),
    "dial_back": frozenset({"outcome", "from", "ms", "icmp"}),
    "error": frozenset({"code", "message", "retry_in"}),
}
CLIENT_TYPES = frozenset({"check"})
RESPONDER_TYPES = frozenset({"seen", "dial_back", "error"})


def _endpoint(f: Fields, name: str) -> Endpoint:
    return parse_endpoint(present(f.text(name)), f"{f.kind}.{name}")


def _decode(payload: bytes, allowed: frozenset[str]) -> Message:
    obj = load_object(payload, DoctorMessageError)
    kind = message_type(obj, allowed, DoctorMessageError)
    f = Fields(obj, kind, _FIELDS[kind], DoctorMessageError)
    if kind == "check":
        f.require({"version", "dial_back", "wait_ms"})
        version = present(f.int("version", 0, 2**31 - 1))
        if version != VERSION:  # before the rest: a newer client gets a clear answer
            raise UnsupportedVersion(version)
        dial_back = present(f.flag("dial_back"))
        return Check(dial_back, present(f.int("wait_ms", MIN_WAIT_MS, MAX_WAIT_MS)), version)
    if kind == "seen":
        f.require({"public", "others"})
        others = obj["others"]
        if not isinstance(others, list) or len(others) > MAX_OTHERS:
            raise DoctorMessageError(f"seen.others must be a list of at most {MAX_OTHERS} "
                                     "addresses")
        return Seen(_endpoint(f, "public"),
                    tuple(_address(text(o, "seen.others[]", DoctorMessageError),
                                   "seen.others[]") for o in others))
    if kind == "dial_back":
        f.require({"outcome", "from", "ms"})
        outcome: Outcome = present(f.text("outcome", choices=OUTCOMES))
        icmp = None
        if "icmp" in obj:
            raw = obj["icmp"]
            if not isinstance(raw, dict):
                raise DoctorMessageError("dial_back.icmp must be an object")
            if outcome != "icmp":
                raise DoctorMessageError(f"dial_back.icmp comes only with outcome icmp, "
                                         f"not {outcome}")
            extra = set(raw) - {"type", "code", "from"}
            if extra or not {"type", "code"} <= set(raw):
                raise DoctorMessageError("dial_back.icmp must be {type, code, from?}")
            i = Fields(raw, "dial_back.icmp", {"type", "code", "from"}, DoctorMessageError)
            source = i.text("from", optional=True)
            icmp = Icmp(present(i.int("type", 0, 255)), present(i.int("code", 0, 255)),
                        None if source is None else _address(source, "dial_back.icmp.from"))
        return DialBack(outcome, _endpoint(f, "from"), present(f.int("ms", 0, MAX_MS)), icmp)
    f.require({"code", "message"})
    retry = obj.get("retry_in")
    code = present(f.text("code", choices=ERROR_CODES))
    if retry is not None:
        if type(retry) not in (int, float) or not math.isfinite(retry) \
                or not 0 <= retry <= MAX_RETRY:
            raise DoctorMessageError(f"error.retry_in must be 0-{MAX_RETRY:g} seconds")
        if code != "rate_limited":
            raise DoctorMessageError("error.retry_in comes only with code rate_limited")
    return DoctorError(code, present(f.text("message")), None if retry is None else float(retry))


def decode_client_message(payload: bytes) -> ClientMessage:
    """Decode one frame payload sent by a doctor client to the responder."""
    msg = _decode(payload, CLIENT_TYPES)
    assert isinstance(msg, Check)
    return msg


def decode_responder_message(payload: bytes) -> ResponderMessage:
    """Decode one frame payload sent by the responder to a doctor client."""
    msg = _decode(payload, RESPONDER_TYPES)
    assert isinstance(msg, Seen | DialBack | DoctorError)
    return msg
