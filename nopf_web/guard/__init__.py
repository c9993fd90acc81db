"""The guard: keep NAT mappings alive by dropping our own RST / FIN+ACK while punching.

``make_guard()`` gives the pydivert guard when this process can run it (root
or Administrator, a working eBPFDivert / WinDivert backend), else a
:class:`NullGuard` whose ``reason`` says why. ``guard_status(guard)`` is the
``GET /api/guard`` body.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from .base import Guard, GuardStatus, NullGuard, Protection


def make_guard() -> Guard:
    """The best guard this machine supports (a NullGuard saying why when none)."""
    from . import divert  # pydivert is only imported here, on demand

    reason = divert.unavailable_reason()
    if reason is not None:
        return NullGuard(reason)
    from .service import DivertGuard

    return DivertGuard()


def guard_status(guard: Guard) -> dict[str, Any]:
    """``{"active": bool, "reason": str | None, "dropped": int}`` for ``GET /api/guard``."""
    return dataclasses.asdict(GuardStatus.of(guard))


__all__ = ["Guard", "GuardStatus", "NullGuard", "Protection", "guard_status", "make_guard"]
