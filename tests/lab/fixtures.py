"""pytest integration for the namespace lab.

Enable it with ``pytest_plugins = ["tests.lab.fixtures"]`` in ``tests/conftest.py``
(``tests/lab/conftest.py`` also imports the fixture for the lab's own tests).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any, Protocol

import pytest

from tests.lab.topology import Lab, cleanup_stale, lab_unavailable_reason
from tests.prerequisites import require

__all__ = ["LabFactory", "lab_factory", "require_lab"]


def require_lab(*, need_iptables: bool = True) -> None:
    """Skip the test if labs cannot be built here - or fail it under ``CI=true``."""
    require(lab_unavailable_reason(need_iptables=need_iptables), "lab unavailable")


class LabFactory(Protocol):
    def __call__(self, left: str = "drop", right: str = "drop", **kw: Any) -> Lab: ...


@pytest.fixture
def lab_factory() -> Iterator[LabFactory]:
    """Yield ``make(left="drop", right="drop", **kw) -> Lab`` (built and up).

    Every lab made is torn down when the test ends. Keyword arguments are
    those of :class:`tests.lab.Lab` (``delay_ms``, ``jitter_ms``, ``loss``, ``prefix``).
    """
    require_lab()
    cleanup_stale()  # leftovers of killed runs; never touches labs of live processes
    labs: list[Lab] = []

    def make(left: str = "drop", right: str = "drop", **kw: Any) -> Lab:
        lab = Lab(left, right, **kw)
        labs.append(lab)
        return lab.up()

    try:
        yield make
    finally:
        for lab in reversed(labs):
            lab.down()
