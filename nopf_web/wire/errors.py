"""Error types of the wire layer."""

from __future__ import annotations

from nopf_web.inputs import InputError


class WireError(ValueError):
    """Bytes that do not form a valid message of the format being decoded."""


class BadAddress(InputError):
    """Text that is not a valid ``host:port`` (or ``IPv4:port``) address; ``field``
    names the input it came from."""

    def __init__(self, message: str, field: str = "address") -> None:
        super().__init__(field, message)
