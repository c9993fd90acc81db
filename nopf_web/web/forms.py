"""Validation of what users type (forms) and send (JSON): one error names one field.

Built on the one parsing layer (:mod:`nopf_web.inputs`, :mod:`nopf_web.wire.address`,
:func:`nopf_web.pairing.parse_code`); a :class:`FieldError` is its
:class:`~nopf_web.inputs.InputError`, worded for a form (``field: problem``)."""

from __future__ import annotations

import unicodedata
from typing import Final

from nopf_web.db import Mode
from nopf_web.inputs import InputError, json_int
from nopf_web.pairing import PairingCode, parse_code
from nopf_web.roles import PeerRole
from nopf_web.wire.address import (
    Endpoint,
    parse_host_endpoint,
    parse_ipv4_endpoint,
    parse_port,
)

MAX_LABEL: Final = 80
MAX_TEXT: Final = 300  # any single text field; longer is not an address or a label


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
    if not text:
        return None
    try:
        return parse_code(text)
    except InputError as exc:
        raise FieldError("code", str(exc)) from None


def check_pairing(role: PeerRole, mode: Mode, code: PairingCode | None) -> None:
    """A coordinated client needs the sharer's code; no other session takes one."""
    if mode == "coordinated" and role == "client" and code is None:
        raise FieldError("code", "is required to join a share (the sharer's pairing code, "
                         "like 7-orbit-lantern)")
    if code is not None and (mode, role) != ("coordinated", "client"):
        raise FieldError("code", "only a coordinated client session takes a code (a server "
                         "session gets its own from the rendezvous)")


def parse_local_port(value: object) -> int:
    """An int from JSON, or the digits of a form field."""
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise FieldError("local_port", "must be an integer between 1 and 65535")
    try:
        if isinstance(value, int):
            return json_int(value, "local port", 1, 65535)
        return parse_port(value, what="local port")
    except InputError as exc:
        raise FieldError("local_port", str(exc)) from None


def parse_rendezvous(value: object) -> Endpoint | None:
    """HOST:PORT, or empty / absent for the dashboard's default."""
    text = _text("rendezvous", value, allow_none=True)
    if not text:
        return None
    try:
        return parse_host_endpoint(text)
    except InputError as exc:
        raise FieldError("rendezvous", str(exc)) from None


def parse_peer(value: object, field_name: str = "address") -> Endpoint:
    text = _text(field_name, value) or ""
    try:
        return parse_ipv4_endpoint(text)
    except InputError as exc:
        raise FieldError(field_name, str(exc)) from None


def parse_label(value: object) -> str:
    text = _text("label", value, allow_none=True) or ""
    if len(text) > MAX_LABEL:
        raise FieldError("label", f"is too long (at most {MAX_LABEL} characters)")
    if any(unicodedata.category(ch).startswith("C") for ch in text):
        raise FieldError("label", "must not contain control characters")
    return text
