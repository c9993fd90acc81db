"""The migrations runner: numbering, ordering, atomicity, refusing foreign or newer databases."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import aiosqlite
import pytest

from nopf_web.db import DatabaseTooNew, HistoryStore, MigrationError
from nopf_web.db.migrations import load_migrations, migrate
from nopf_web.resources import resource_dir


def _write(directory: Path, files: dict[str, str]) -> Path:
    directory.mkdir(exist_ok=True)
    for name, sql in files.items():
        (directory / name).write_text(sql, encoding="utf-8")
    return directory


def _version(path: Path) -> int:
    with sqlite3.connect(path) as conn:
        return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _tables(path: Path) -> set[str]:
    with sqlite3.connect(path) as conn:
        return {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")}


def test_shipped_migrations_are_numbered_from_one() -> None:
    found = load_migrations(resource_dir("migrations"))
    assert [m.version for m in found] == list(range(1, len(found) + 1))
    assert found[0].path.name == "0001_initial.sql"


@pytest.mark.parametrize("files, expected", [
    ({"0001_a.sql": "", "0003_c.sql": ""}, "without gaps"),
    ({"0002_b.sql": ""}, "without gaps"),
    ({"0001_a.sql": "", "1_b.sql": ""}, "NNNN_name.sql"),
    ({"0001_Bad-Name.sql": ""}, "NNNN_name.sql"),
])
def test_badly_numbered_or_named_migrations_are_refused(
        tmp_path: Path, files: dict[str, str], expected: str) -> None:
    with pytest.raises(MigrationError, match=expected):
        load_migrations(_write(tmp_path / "m", files))


async def test_migrations_apply_in_order_and_only_once(tmp_path: Path) -> None:
    mdir = _write(tmp_path / "m", {"0001_one.sql": "CREATE TABLE one (x INTEGER);"})
    db = tmp_path / "h.db"
    async with aiosqlite.connect(db, isolation_level=None) as conn:
        assert await migrate(conn, load_migrations(mdir), where="test") == 1
    _write(mdir, {"0002_two.sql": "CREATE TABLE two (y INTEGER); INSERT INTO one VALUES (7);"})
    async with aiosqlite.connect(db, isolation_level=None) as conn:
        assert await migrate(conn, load_migrations(mdir), where="test") == 2
        assert await migrate(conn, load_migrations(mdir), where="test") == 2  # nothing to do
        rows = list(await conn.execute_fetchall("SELECT x FROM one"))
    assert [r[0] for r in rows] == [7]  # 0002 ran exactly once
    assert _version(db) == 2


async def test_a_failing_migration_changes_nothing(tmp_path: Path) -> None:
    mdir = _write(tmp_path / "m", {
        "0001_one.sql": "CREATE TABLE one (x INTEGER);",
        "0002_broken.sql": "CREATE TABLE half (y INTEGER); INSERT INTO nowhere VALUES (1);",
    })
    db = tmp_path / "h.db"
    async with aiosqlite.connect(db, isolation_level=None) as conn:
        with pytest.raises(MigrationError, match=r"0002_broken\.sql failed.*left unchanged"):
            await migrate(conn, load_migrations(mdir), where="test")
    assert _version(db) == 1
    assert "half" not in _tables(db)
    assert "one" in _tables(db)


async def test_a_newer_schema_is_refused_and_left_alone(tmp_path: Path) -> None:
    db = tmp_path / "h.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE sessions (id TEXT)")
        conn.execute("PRAGMA user_version = 99")
    before = db.read_bytes()
    with pytest.raises(DatabaseTooNew, match=r"schema version 99.*newer nopf-web"):
        await HistoryStore.open(db)
    assert _version(db) == 99
    assert db.read_bytes() == before


async def test_another_programs_database_is_refused(tmp_path: Path) -> None:
    db = tmp_path / "other.db"
    with sqlite3.connect(db) as conn:
        conn.execute("CREATE TABLE customers (name TEXT)")
        conn.execute("INSERT INTO customers VALUES ('ada')")
    with pytest.raises(MigrationError, match="another program"):
        await HistoryStore.open(db)
    assert _tables(db) == {"customers"}
    assert _version(db) == 0
