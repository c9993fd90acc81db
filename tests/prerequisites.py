"""A test's prerequisite that this machine may lack (the namespace lab, Debian's
redis-server, chromium and playwright): on a developer's machine the test skips, saying
what is missing; under ``CI=true``, where ./dev.sh installs everything, it fails."""

from __future__ import annotations

import os

import pytest


def require(missing: str | None, what: str) -> None:
    """Nothing when ``missing`` is None; else skip the test with that reason, or under
    ``CI=true`` fail it with one line: "``what`` under CI: ``missing``"."""
    __tracebackhide__ = True  # the skip is reported where the caller asked for it
    if missing is None:
        return
    if os.environ.get("CI") == "true":
        pytest.fail(f"{what} under CI: {missing}", pytrace=False)
    pytest.skip(missing)
