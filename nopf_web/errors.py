"""The root of nopf's error types: each becomes a one-line message at the edges."""

from __future__ import annotations


class NopfError(Exception):
    """An expected failure with a message meant for the user."""
