"""The layering rules, checked on the source: machines stay pure, the web layer knows
engines only through their contract."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "nopf_web"
IO_MODULES = frozenset({"asyncio", "socket", "selectors", "threading", "time"})


def _imported(tree: ast.AST) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def test_machines_import_no_io() -> None:
    machines = sorted(PACKAGE.rglob("*machine*.py"))
    assert PACKAGE / "sessions" / "coordination_machine.py" in machines
    for path in machines:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        tops = {name.split(".")[0] for name in _imported(tree)}
        assert not tops & IO_MODULES, f"{path.relative_to(PACKAGE)} imports {tops & IO_MODULES}"


def _engine_classes() -> set[str]:
    """Every class the engine implementations define (SeedEngine, CoordinatedEngine...)."""
    names = set()
    for module in ("seed.py", "coordinated.py"):
        tree = ast.parse((PACKAGE / "sessions" / module).read_text(encoding="utf-8"))
        names |= {n.name for n in tree.body if isinstance(n, ast.ClassDef)}
    return names


def test_the_web_layer_never_checks_an_engines_class() -> None:
    engines = _engine_classes()
    assert {"SeedEngine", "CoordinatedEngine"} <= engines
    for path in sorted((PACKAGE / "web").rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        where = path.relative_to(PACKAGE)
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module in (
                    "nopf_web.sessions.seed", "nopf_web.sessions.coordinated"):
                taken = {alias.name for alias in node.names} & engines
                assert not taken or taken <= {"SeedSpec", "CoordinatedSpec"}, \
                    f"{where} imports engine class(es) {taken}"
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Name)
                    and node.func.id in ("isinstance", "issubclass") and len(node.args) == 2):
                named = {n.id for n in ast.walk(node.args[1]) if isinstance(n, ast.Name)}
                named |= {n.attr for n in ast.walk(node.args[1]) if isinstance(n, ast.Attribute)}
                assert not named & engines, \
                    f"{where}:{node.lineno} checks an engine's class: {named & engines}"
