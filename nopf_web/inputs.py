"""The one parsing layer for what comes from outside: numbers, durations, rates, text,
JSON bodies and query parameters (addresses: :mod:`nopf_web.wire.address`, built on
this; pairing codes: :mod:`nopf_web.pairing`).

Every surface goes through here: command-line flags, the peer line on stdin,
JSON fields, form fields, query strings, stored settings, and the text fields
of the rendezvous and doctor frames. The rules are the same everywhere:

- numbers are ASCII digits only (``str.isdigit`` alone also takes ``²`` and
  ``٣``, which ``int()`` then refuses or reads), no sign, no ``_``, no
  exponent, and short enough that converting them costs nothing;
- every value has a range, checked after conversion;
- text is one printable line (no control characters, no lone surrogates) of
  bounded length;
- a failure is one :class:`InputError` naming the field (``--port``,
  ``local_port``, ``limit``...), whose message is one line and quotes the
  offending text only through ``repr``, truncated.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from typing import Any, Final

from nopf_web.errors import NopfError

MAX_TEXT: Final = 300  # characters of any one text input (an address, a label, a flag)
MAX_DIGITS: Final = 20  # a whole number longer than this is out of every range we use
MAX_JSON_DEPTH: Final = 32  # nesting of a JSON body; ours are flat objects
_QUOTE: Final = 40  # characters of the offending text quoted in a message

_DECIMAL = re.compile(r"(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)", re.ASCII)
_RATE = re.compile(r"(?P<num>[0-9]{1,15}(?:\.[0-9]{1,9})?)\s*(?P<unit>[kKMG]i?)?(?:B(?:/s)?)?",
                   re.ASCII)
_RATE_UNITS: Final = {"": 1.0, "k": 1e3, "K": 1e3, "M": 1e6, "G": 1e9,
                      "ki": 1024.0, "Ki": 1024.0, "Mi": 1024.0**2, "Gi": 1024.0**3}
MAX_RATE: Final = 100e9  # bytes/s: far above any NIC a relay runs on


class InputError(NopfError, ValueError):
    """Input from outside that its field does not take.

    ``field`` names the input (a flag such as ``--port``, a JSON or form field
    such as ``local_port``, a query parameter, ``body``, ``peer address``);
    ``str(error)`` is one line for people, naming the field too (``field: `` is put
    in front of a ``message`` that does not).
    """

    def __init__(self, field: str, message: str) -> None:
        message = one_line(message)  # whatever was quoted in it
        super().__init__(message if field in message else f"{field}: {message}")
        self.field = field
        self.message = message


def quote(text: object, limit: int = _QUOTE) -> str:
    """``repr`` of ``text``, cut to ``limit`` characters: safe inside a one-line message
    (newlines, NULs and surrogates come out escaped)."""
    shown = repr(text)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


def one_line(message: str, limit: int = 2 * MAX_TEXT) -> str:
    """``message`` made safe to print as one line: unprintable characters escaped,
    cut to ``limit`` characters."""
    if not message.isprintable():
        message = "".join(c if c.isprintable() else repr(c)[1:-1] for c in message)
    return message if len(message) <= limit else message[: limit - 3] + "..."


def is_ascii_digits(text: str) -> bool:
    """``0-9`` only, at least one (``str.isdigit`` alone takes ``²``, ``٣``...)."""
    return text.isascii() and text.isdigit()


def is_one_line(text: str) -> bool:
    """Printable characters only (no controls, separators other than space, or
    lone surrogates): safe to log, to show and to store."""
    return text.isprintable()  # lone surrogates are category Cs: not printable


def text(value: object, field: str, *, max_len: int = MAX_TEXT, strip: bool = True) -> str:
    """One printable line of at most ``max_len`` characters (stripped)."""
    if not isinstance(value, str):
        raise InputError(field, f"{field} must be text, got {type(value).__name__}")
    if len(value) > max_len:
        raise InputError(field, f"{field} is too long (at most {max_len} characters)")
    if strip:
        value = value.strip()
    if not is_one_line(value):
        raise InputError(field, f"{field} {quote(value)} contains control or invalid "
                         "characters")
    return value


def parse_int(value: str, field: str, lo: int, hi: int, *, describe: str | None = None) -> int:
    """A whole number in ``lo..hi`` written in ASCII digits (surrounding blanks forgiven).

    ``describe`` replaces the default "is not a whole number" wording."""
    if not isinstance(value, str):
        raise InputError(field, f"{field} must be text, got {type(value).__name__}")
    digits = value.strip() if len(value) <= MAX_TEXT else value
    # An ASCII minus is a number too, just out of range (the message says so).
    unsigned = digits[1:] if digits[:1] == "-" else digits
    if not is_ascii_digits(unsigned) or len(unsigned) > MAX_DIGITS:
        raise InputError(field, f"{field} {quote(digits)} "
                         f"{describe or 'is not a whole number'}")
    number = int(digits)
    if not lo <= number <= hi:
        raise InputError(field, f"{field} must be between {lo:,} and {hi:,}, got {number:,}")
    return number


def parse_count(value: str, field: str, maximum: int) -> int:
    """A positive whole number up to ``maximum`` (``--max-connections``...)."""
    return parse_int(value, field, 1, maximum)


def parse_decimal(value: str, field: str) -> float:
    """A non-negative decimal number, ASCII: ``30``, ``0.5``, ``.25``. No sign,
    exponent, ``inf`` or ``nan``."""
    if not isinstance(value, str):
        raise InputError(field, f"{field} must be text, got {type(value).__name__}")
    number = value.strip() if len(value) <= MAX_TEXT else value
    if len(number) > 30 or _DECIMAL.fullmatch(number) is None:
        raise InputError(field, f"{field} {quote(number)} is not a number")
    return float(number)


def parse_seconds(value: str, field: str, maximum: float = 86400) -> float:
    """A positive duration in seconds, at most ``maximum``."""
    seconds = parse_decimal(value, field)
    if not 0 < seconds <= maximum:
        raise InputError(field, f"{field} must be between 0 and {maximum:g} seconds, "
                         f"got {seconds:g}")
    return seconds


def parse_rate(value: str, field: str = "--relay-rate") -> float:
    """Bytes per second: ``12.5M``, ``500K``, ``1Gi``, ``0`` (no limit). K, M, G are
    powers of 1000, Ki, Mi, Gi of 1024; a trailing ``B`` or ``B/s`` is forgiven."""
    match = _RATE.fullmatch(value.strip()) if isinstance(value, str) and \
        len(value) <= MAX_TEXT else None
    if match is None:
        raise InputError(field, f"{field} {quote(value)} is not a rate (bytes per second, "
                         "e.g. 500K, 12.5M, 1Gi or 0)")
    rate = float(match["num"]) * _RATE_UNITS[match["unit"] or ""]
    if not math.isfinite(rate) or rate > MAX_RATE:
        raise InputError(field, f"{field} {quote(value)} is over {MAX_RATE / 1e9:g} GB/s")
    return rate


def json_int(value: object, field: str, lo: int, hi: int) -> int:
    """A JSON integer in ``lo..hi`` (a bool is not a number; neither is 1.0)."""
    if type(value) is not int:
        raise InputError(field, f"{field} must be an integer between {lo:,} and {hi:,}")
    if not lo <= value <= hi:
        shown = f"{value:,}" if abs(value) < 10**30 else "a huge number"
        raise InputError(field, f"{field} {shown} is out of range ({lo:,}-{hi:,})")
    return value


def query_int(query: Mapping[str, str], name: str, default: int, lo: int, hi: int) -> int:
    """An optional whole-number query parameter (``?limit=50``)."""
    raw = query.get(name)
    if raw is None:
        return default
    return parse_int(raw, name, lo, hi)


def query_choice(query: Mapping[str, str], name: str, default: str,
                 choices: tuple[str, ...]) -> str:
    """An optional query parameter taking one of ``choices`` (exactly as written)."""
    raw = query.get(name, default)
    if raw not in choices:
        listed = ", ".join(c or "(empty)" for c in choices)
        raise InputError(name, f"{name} must be one of {listed}")
    return raw


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    obj: dict[str, Any] = {}
    for key, value in pairs:
        if key in obj:
            raise InputError("body", f"the body has the field {quote(key)} twice")
        obj[key] = value
    return obj


def _no_constant(name: str) -> Any:
    raise InputError("body", f"{name} is not valid JSON")


def _depth(value: object) -> int:
    """Nesting depth of decoded JSON, iteratively (no recursion to exhaust)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, dict):
            children: Any = item.values()
        elif isinstance(item, list):
            children = item
        else:
            continue
        deepest = max(deepest, depth)
        if depth > MAX_JSON_DEPTH:
            return depth
        stack.extend((child, depth + 1) for child in children)
    return deepest


def parse_json_object(body: bytes, field: str = "body") -> dict[str, Any]:
    """A JSON object from a request body: UTF-8 (RFC 8259), no duplicate keys, no
    NaN/Infinity, nested at most ``MAX_JSON_DEPTH`` deep, strings free of lone
    surrogates."""
    try:
        decoded = body.decode("utf-8")
    except UnicodeDecodeError:
        raise InputError(field, "the body is not valid JSON (not UTF-8)") from None
    try:
        obj = json.loads(decoded, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except RecursionError:
        raise InputError(field, "the body is not valid JSON (nested too deeply)") from None
    except InputError:
        raise
    except ValueError as exc:  # JSONDecodeError, or a number over the digit limit
        where = f" at {exc.pos}" if isinstance(exc, json.JSONDecodeError) else ""
        raise InputError(field, f"the body is not valid JSON{where}") from None
    if not isinstance(obj, dict):
        raise InputError(field, "the body must be a JSON object")
    if _depth(obj) > MAX_JSON_DEPTH:
        raise InputError(field, f"the body is nested more than {MAX_JSON_DEPTH} deep")
    return obj
