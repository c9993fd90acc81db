"""Error types of the wire layer."""

from __future__ import annotations


class WireError(ValueError):
    """Bytes that do not form a valid message of the format being decoded."""


class BadAddress(ValueError):
    """Text that is not a valid ``host:port`` (or ``IPv4:port``) address."""
