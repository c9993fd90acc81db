"""The guard: keep NAT mappings alive by dropping our own RST / FIN+ACK while punching."""

from __future__ import annotations

from .base import Guard, NullGuard, Protection


def make_guard() -> Guard:
    """The best guard this machine supports (a NullGuard saying why when none)."""
    return NullGuard("the packet guard is not built yet")


__all__ = ["Guard", "NullGuard", "Protection", "make_guard"]
