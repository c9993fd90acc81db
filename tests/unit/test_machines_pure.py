"""Every protocol machine (``nopf_web/**/*machine*.py``) stays sans-IO: no
sockets, event loop, threads or clock of its own."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

import nopf_web

FORBIDDEN = frozenset({"asyncio", "socket", "selectors", "threading", "time"})
PACKAGE = Path(nopf_web.__file__).parent
MACHINES = sorted(PACKAGE.rglob("*machine*.py"))


def imported_modules(path: Path) -> set[str]:
    """Top-level names of every module ``path`` imports, anywhere in the file."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), filename=str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            names.add(node.module.split(".")[0])
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) \
                and node.func.id == "__import__" and node.args \
                and isinstance(node.args[0], ast.Constant) and isinstance(node.args[0].value, str):
            names.add(node.args[0].value.split(".")[0])
    return names


def test_the_known_machines_are_found() -> None:
    found = {p.relative_to(PACKAGE).as_posix() for p in MACHINES}
    assert {"punch/machine.py", "tunnel/record_machine.py", "tunnel/mux_machine.py",
            "tunnel/resume_machine.py"} <= found


@pytest.mark.parametrize("path", MACHINES, ids=lambda p: p.relative_to(PACKAGE).as_posix())
def test_machine_imports_no_io(path: Path) -> None:
    assert not imported_modules(path) & FORBIDDEN


def test_the_check_sees_every_import_form(tmp_path: Path) -> None:
    sample = tmp_path / "sample_machine.py"
    sample.write_text("import os, socket\nfrom time import monotonic\n"
                      "def f():\n    import asyncio.events\n    __import__('threading')\n")
    assert imported_modules(sample) & FORBIDDEN == {"socket", "time", "asyncio", "threading"}
