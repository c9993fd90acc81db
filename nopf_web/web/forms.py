"""Validation of what users type (forms) and send (JSON): one error names one field.

Built on the one parsing layer (:mod:`nopf_web.inputs`, :mod:`nopf_web.wire.address`,
:func:`nopf_web.pairing.parse_code`); a :class:`FieldError` is its
:class:`~nopf_web.inputs.InputError`, worded for a form (``field: problem``)."""

from __future__ import annotations

import unicodedata
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Final, TypeVar

from nopf_web.db import Mode
from nopf_web.inputs import InputError, json_int, quote
from nopf_web.pairing import PairingCode, parse_code
from nopf_web.roles import PeerRole
from nopf_web.wire.address import (
    LOCAL_HOST,
    SEED_IPV4_ONLY,
    Endpoint,
    parse_host_endpoint,
    parse_ipv4_endpoint,
    parse_local_sides,
)
from nopf_web.wire.frames import MAX_SERVICES

MAX_LABEL: Final = 80
MAX_TEXT: Final = 300  # any single text field; longer is not an address or a label

T = TypeVar("T")


class FieldError(InputError):
    """``str()`` is ``field: message``; ``message`` alone goes next to a form's field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(field_name, message)
        self.args = (f"{field_name}: {message}",)


def _text(field_name: str, value: object, *, allow_none: bool = False) -> str | None:
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise FieldError(field_name, "must be a string")
    if len(value) > MAX_TEXT:
        raise FieldError(field_name, f"is too long (at most {MAX_TEXT} characters)")
    return value.strip()


def _parsed(field_name: str, parse: Callable[[str], T], text: str) -> T:
    """``parse(text)``, its :class:`InputError` worded for the form's field."""
    try:
        return parse(text)
    except InputError as exc:
        raise FieldError(field_name, str(exc)) from None


def parse_role(value: object) -> PeerRole:
    text = _text("role", value)
    if text == "server":
        return "server"
    if text == "client":
        return "client"
    raise FieldError("role", 'must be "server" or "client"')


def parse_mode(value: object) -> Mode:
    """``coordinated`` (pairing code; also for empty / absent) or ``seed``."""
    text = _text("mode", value, allow_none=True)
    if not text or text == "coordinated":
        return "coordinated"
    if text == "seed":
        return "seed"
    raise FieldError("mode", 'must be "coordinated" or "seed"')


def parse_pairing_code(value: object) -> PairingCode | None:
    """The sharer's code, like ``7-orbit-lantern``; None if empty or absent."""
    text = _text("code", value, allow_none=True)
    return _parsed("code", parse_code, text) if text else None


def check_pairing(role: PeerRole, mode: Mode, code: PairingCode | None) -> None:
    """A coordinated client needs the sharer's code; no other session takes one."""
    if mode == "coordinated" and role == "client" and code is None:
        raise FieldError("code", "is required to join a share (the sharer's pairing code, "
                         "like 7-orbit-lantern)")
    if code is not None and (mode, role) != ("coordinated", "client"):
        raise FieldError("code", "only a coordinated client session takes a code (a server "
                         "session gets its own from the rendezvous)")


def parse_local(value: object, role: PeerRole) -> tuple[Endpoint, ...]:
    """The local side, as ``--localport`` takes it: a port (an int from JSON, or a form
    field's digits) on 127.0.0.1, or ``HOST:PORT`` text: a server's service on another
    machine, an address a client listens on (``0.0.0.0:3010``). Several, in service
    order (a server's services, a client's listener for each): comma-separated text,
    or a JSON list of ports and texts."""
    items: list[object]
    if isinstance(value, str):
        if len(value) > MAX_TEXT * MAX_SERVICES:  # each entry is held to MAX_TEXT too
            raise FieldError("local_port", f"is too long ({len(value):,} characters)")
        text = value.strip()
        items = [part.strip() for part in text.split(",")] if "," in text else [text]
        if "" in items:
            raise FieldError("local_port", f"{quote(text)} has an empty entry (one port "
                             "or HOST:PORT per service, separated by commas)")
    elif isinstance(value, list):
        items = value
    else:
        items = [value]
    if not items:
        raise FieldError("local_port", "is an empty list (expected a port or HOST:PORT)")
    if any(isinstance(item, bool) or not isinstance(item, int | str) for item in items):
        raise FieldError("local_port", "must be a port (1-65535) or HOST:PORT, or a list of "
                         "them")
    try:
        texts = [str(json_int(item, "local port", 1, 65535)) if isinstance(item, int)
                 else str(item) for item in items]
        return parse_local_sides(texts, field="local port", listen=role == "client",
                                 most=MAX_SERVICES)
    except InputError as exc:
        raise FieldError("local_port", str(exc)) from None


def parse_rendezvous(value: object, *, seed: bool = False) -> Endpoint | None:
    """HOST:PORT (``[IPv6]:PORT`` too, but not for a ``seed`` session), or empty /
    absent for the dashboard's default."""
    text = _text("rendezvous", value, allow_none=True)
    no_ipv6 = SEED_IPV4_ONLY if seed else None
    return _parsed("rendezvous", lambda t: parse_host_endpoint(t, no_ipv6=no_ipv6),
                   text) if text else None


def parse_peer(value: object, field_name: str = "address") -> Endpoint:
    return _parsed(field_name, parse_ipv4_endpoint, _text(field_name, value) or "")


def parse_label(value: object) -> str:
    text = _text("label", value, allow_none=True) or ""
    if len(text) > MAX_LABEL:
        raise FieldError("label", f"is too long (at most {MAX_LABEL} characters)")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise FieldError("label", "must not contain control characters")
    return text


@dataclass(frozen=True)
class NewSession:
    """A session to create, as the dashboard's form and the JSON API both ask for it."""

    role: PeerRole
    local_port: int
    mode: Mode
    code: PairingCode | None
    rendezvous: Endpoint | None
    label: str
    local_host: str = LOCAL_HOST
    more_local: tuple[Endpoint, ...] = ()  # the 2nd, 3rd... service (coordinated only)


def parse_new_session(fields: Mapping[str, object], *,
                      ignore_stray_code: bool = False) -> NewSession:
    """Each field in turn, then whether the code fits the session (:func:`check_pairing`).

    ``ignore_stray_code``: a code that the session does not take is dropped rather than
    refused (the form keeps its code field, hidden, whatever the choice).
    """
    role = parse_role(fields.get("role"))
    first, *more = parse_local(fields.get("local_port"), role)
    mode = parse_mode(fields.get("mode"))
    if more and mode == "seed":
        raise FieldError("local_port", f"a seed session carries one connection: give one "
                         f"port, not {len(more) + 1} (a coordinated session carries several "
                         "services over one code)")
    takes_code = (mode, role) == ("coordinated", "client")
    code = parse_pairing_code(fields.get("code")) \
        if takes_code or not ignore_stray_code else None
    rendezvous = parse_rendezvous(fields.get("rendezvous"), seed=mode == "seed")
    label = parse_label(fields.get("label"))
    check_pairing(role, mode, code)
    return NewSession(role, first.port, mode, code, rendezvous, label, first.host,
                      tuple(more))
