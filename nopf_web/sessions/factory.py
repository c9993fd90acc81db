"""The one place that picks an engine for a spec (the dashboard and the CLI use it)."""

from __future__ import annotations

from nopf_web.guard.base import Guard

from .coordinated import CoordinatedEngine, CoordinatedSpec
from .engine import Engine
from .seed import SeedEngine, SeedSpec

EngineSpec = SeedSpec | CoordinatedSpec


def make_engine(spec: EngineSpec, guard: Guard | None = None) -> Engine:
    """The engine for ``spec``; ``guard`` covers the punches of the modes that use one
    (seed mode; coordinated mode times its SYNs and needs none)."""
    if isinstance(spec, CoordinatedSpec):
        return CoordinatedEngine(spec)
    return SeedEngine(spec, guard)
