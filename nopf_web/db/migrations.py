"""Apply the numbered SQL files of ``migrations/`` in order, tracked by ``PRAGMA user_version``.

File names are ``NNNN_name.sql`` numbered from 0001 without gaps; the schema
version is the number of the last one applied. Each file runs in its own
transaction together with the version bump, so a failing file leaves the
database exactly as it was. Files must not contain BEGIN/COMMIT themselves.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import aiosqlite

from .errors import DatabaseTooNew, MigrationError

_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    path: Path

    def sql(self) -> str:
        return self.path.read_text(encoding="utf-8")


def load_migrations(directory: Path) -> list[Migration]:
    """The migrations in ``directory``, checked: well named and numbered 1..N."""
    found: list[Migration] = []
    for path in sorted(directory.glob("*.sql")):
        match = _NAME.match(path.name)
        if match is None:
            raise MigrationError(f"migration file {path.name!r} is not named NNNN_name.sql")
        found.append(Migration(int(match.group(1)), match.group(2), path))
    for expected, migration in enumerate(found, start=1):
        if migration.version != expected:
            raise MigrationError(
                f"migrations in {directory} must be numbered 0001, 0002, ... without gaps; "
                f"{migration.path.name} should be number {expected:04d}"
            )
    return found


async def schema_version(conn: aiosqlite.Connection) -> int:
    rows = list(await conn.execute_fetchall("PRAGMA user_version"))
    return int(rows[0][0])


async def _has_foreign_tables(conn: aiosqlite.Connection) -> bool:
    rows = list(await conn.execute_fetchall(
        "SELECT count(*) FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    ))
    return int(rows[0][0]) > 0


async def check_schema(
    conn: aiosqlite.Connection, migrations: Sequence[Migration], *, where: str
) -> int:
    """Refuse a newer schema or another program's database; return the current version.

    Runs before anything is written, so a refused file is left byte for byte as it was.
    """
    current = await schema_version(conn)
    latest = migrations[-1].version if migrations else 0
    if current > latest:
        raise DatabaseTooNew(
            f"the database {where} has schema version {current}, but this nopf-web knows only "
            f"up to {latest}: it was written by a newer nopf-web; upgrade, or pass another --db"
        )
    if current == 0 and await _has_foreign_tables(conn):
        # Version 0 with tables: some other program's database. Never write into it.
        raise MigrationError(
            f"{where} is an SQLite database of another program (it has tables but no nopf "
            "schema version): pass another --db"
        )
    return current


async def migrate(
    conn: aiosqlite.Connection, migrations: Sequence[Migration], *, where: str
) -> int:
    """Bring the schema to the newest version; return it. ``where`` names the file in errors."""
    current = await check_schema(conn, migrations, where=where)
    for migration in migrations[current:]:
        script = (f"BEGIN;\n{migration.sql()}\n;\n"
                  f"PRAGMA user_version = {migration.version};\nCOMMIT;")
        try:
            await conn.executescript(script)
        except sqlite3.Error as exc:
            if conn.in_transaction:
                await conn.execute("ROLLBACK")
            raise MigrationError(
                f"migration {migration.path.name} failed on {where}: {exc}; the database was "
                "left unchanged"
            ) from None
    return max([current, *(m.version for m in migrations)])
