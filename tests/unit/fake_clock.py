"""A clock for code that takes one (``clock: Callable[[], float]``): it reads ``now``,
which the test sets."""

from __future__ import annotations


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now
