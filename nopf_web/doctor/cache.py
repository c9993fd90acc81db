"""One NAT doctor measurement shared by everyone who asks, kept for a minute.

:class:`DoctorCache` is what the dashboard asks (the Doctor page and
``GET /api/doctor``): a report younger than ``ttl`` for the same rendezvous is
answered at once; otherwise one measurement runs, in a task of the cache's own
TaskGroup, and every request that arrives meanwhile waits for that same one (a
request that goes away does not stop it). Failures are shared the same way but
not kept.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Final

from nopf_web.errors import NopfError
from nopf_web.wire.address import Endpoint

from .probe import run_doctor
from .report import DoctorReport

__all__ = ["CACHE_TTL", "DoctorCache", "Measurement"]

log = logging.getLogger("nopf.doctor")

CACHE_TTL: Final = 60.0  # s a report is answered again without measuring
# A report this young still travels with a pairing's hello (a NAT's kind rarely changes
# within the hour; the rendezvous' own mapping check overrides it anyway).
HELLO_MAX_AGE: Final = 3600.0

Target = tuple[Endpoint, int | None]  # the rendezvous, its doctor port (None: port + 1)
Measure = Callable[[Endpoint, int | None], Awaitable[DoctorReport]]


async def _measure(rendezvous: Endpoint, doctor_port: int | None) -> DoctorReport:
    return await run_doctor(rendezvous, doctor_port=doctor_port)


@dataclass(frozen=True)
class Measurement:
    """A report, or the one line saying why there is none; ``at`` on the cache's clock."""

    target: Target
    at: float
    report: DoctorReport | None = None
    error: str | None = None


class DoctorCache:
    """Use in ``async with``; :meth:`get` from any task of the same loop."""

    def __init__(self, measure: Measure = _measure, *, ttl: float = CACHE_TTL,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._measure = measure
        self.ttl = ttl
        self._clock = clock
        self._last: Measurement | None = None
        self._running: dict[Target, asyncio.Task[Measurement]] = {}
        self._tg: asyncio.TaskGroup | None = None
        self.measurements = 0  # started, for tests and the page

    async def __aenter__(self) -> DoctorCache:
        self._tg = asyncio.TaskGroup()
        await self._tg.__aenter__()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> None:
        for task in self._running.values():
            task.cancel()
        if self._tg is not None:
            tg, self._tg = self._tg, None
            await tg.__aexit__(None, None, None)

    def age(self, measurement: Measurement) -> float:
        """Seconds since ``measurement`` was made."""
        return max(0.0, self._clock() - measurement.at)

    def cached(self, target: Target) -> Measurement | None:
        """The last report for ``target`` if still fresh."""
        last = self._last
        if last is None or last.target != target or last.report is None:
            return None
        return last if self.age(last) < self.ttl else None

    def last_report(self, max_age: float = HELLO_MAX_AGE) -> DoctorReport | None:
        """The last report measured against a rendezvous on the internet, if younger than
        ``max_age``: what a coordinated session's hello carries (never waits)."""
        last = self._last
        if last is None or last.report is None or last.report.rendezvous_is_local:
            return None
        return last.report if self.age(last) < max_age else None

    def warm(self, rendezvous: Endpoint, doctor_port: int | None = None) -> None:
        """Start a measurement in the background if none is under way (the next
        session's hello will carry it); returns at once."""
        target = (rendezvous, doctor_port)
        if self._tg is None or target in self._running:
            return
        self.measurements += 1
        self._running[target] = self._tg.create_task(self._run(target),
                                                      name=f"doctor-warm-{rendezvous}")

    async def get(self, rendezvous: Endpoint, doctor_port: int | None = None, *,
                  refresh: bool = False) -> tuple[Measurement, bool]:
        """(the measurement, whether it came from the cache). ``refresh``: measure again,
        unless a measurement for the same target is under way (it is fresh: shared)."""
        target = (rendezvous, doctor_port)
        if not refresh:
            fresh = self.cached(target)
            if fresh is not None:
                return fresh, True
        task = self._running.get(target)
        if task is None:
            if self._tg is None:
                raise RuntimeError("use DoctorCache in `async with`")
            self.measurements += 1
            task = self._tg.create_task(self._run(target),
                                        name=f"doctor-measure-{rendezvous}")
            self._running[target] = task
        # shield: a request that goes away must not cancel the others' measurement
        return await asyncio.shield(task), False

    async def _run(self, target: Target) -> Measurement:
        try:
            report = await self._measure(*target)
        except NopfError as exc:
            result = Measurement(target, self._clock(), error=str(exc))
        except Exception as exc:  # a bug must not end the dashboard's TaskGroup
            log.exception("the NAT doctor failed")
            result = Measurement(target, self._clock(),
                                 error=f"the NAT doctor failed: {type(exc).__name__}: {exc}")
        else:
            result = Measurement(target, self._clock(), report=report)
            self._last = result
        finally:
            self._running.pop(target, None)
        return result
