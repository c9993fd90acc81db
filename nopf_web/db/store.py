"""The history store: one owner of the SQLite connection, writes batched.

Everything that happens to a session is queued in memory by plain method
calls (no await, so the engine's event callbacks never block) and written by
one flusher task in a single transaction every ``flush_interval``. Progress
updates of one session coalesce: a transfer costs one UPDATE per flush, not
one per packet. A session's end (an update that sets its ``outcome``) is
written at once, without waiting for the interval. Reads flush first, so a
page always sees what was recorded; the JSON API flushes before it answers,
so what an answer showed (a creation, an end) is committed.

Crashes: a committed transaction is in the WAL, which SQLite replays when the
file is next opened, so killing the process (SIGKILL included) loses nothing
committed (``synchronous = NORMAL`` defers only the fsync, which matters for a
power loss, not for a process that dies). Sessions still running when it died
are marked ``interrupted`` at the next start (:meth:`HistoryStore.mark_interrupted`).

The database runs in WAL mode with an exclusive lock held for the life of the
store, so a second nopf-web on the same file gets a clear error instead of
two owners overwriting each other's rows.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import sqlite3
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

import aiosqlite

from nopf_web.resources import resource_dir
from nopf_web.sessions.engine import Mode
from nopf_web.wire.address import LOCAL_HOST

from .errors import DatabaseCorrupt, DatabaseError, DatabaseInUse
from .migrations import Migration, check_schema, load_migrations, migrate

log = logging.getLogger("nopf.db")

Outcome = Literal["closed", "stopped", "failed", "interrupted"]
OUTCOMES: Final[tuple[Outcome, ...]] = ("closed", "stopped", "failed", "interrupted")

# Columns a session update may set; anything else is a programming error.
_UPDATABLE: Final = frozenset({
    "state", "outcome", "public_address", "peer_address", "bytes_in", "bytes_out",
    "connections", "error", "hint", "ended_at", "code", "path",
    "predicted_path", "prediction", "nat_pair", "setup_ms", "timeline",
})
_SESSION_COLUMNS: Final = (  # the fields of SessionRecord, in order, then updated_at
    "id, role, local_port, rendezvous, label, state, outcome, public_address, peer_address, "
    "bytes_in, bytes_out, connections, error, hint, started_at, ended_at, mode, code, path, "
    "predicted_path, prediction, nat_pair, setup_ms, timeline, local_host, more_local, updated_at"
)


def share_hash(token: str) -> str:
    """What the database keeps of a share token: its SHA-256, never the token."""
    return hashlib.sha256(token.encode()).hexdigest()


@dataclass(frozen=True)
class SessionRecord:
    """A session as the history records it: the one shape of a session, for pages and
    JSON too (the dashboard's ``SessionView`` adds what only a running session has)."""

    id: str
    role: str
    local_port: int
    rendezvous: str
    label: str
    state: str
    outcome: str | None
    public_address: str | None
    peer_address: str | None
    bytes_in: int
    bytes_out: int
    connections: int
    error: str | None
    hint: str | None
    started_at: float
    ended_at: float | None
    mode: str = "seed"
    code: str | None = None  # a coordinated session's pairing code, once it has ended
    path: str | None = None  # a coordinated tunnel's path: lan, ipv6, public, mapped, relay
    predicted_path: str | None = None  # coordinated: the path predicted at the fire
    prediction: str | None = None  # why, one sentence
    nat_pair: str | None = None  # "rst × symmetric" (sharer first)
    setup_ms: float | None = None  # pairing start -> path opened
    timeline: str | None = None  # JSON list of the pairing's marks
    local_host: str = LOCAL_HOST  # the service's (server) or the listener's (client) host
    # coordinated: the 2nd, 3rd... local side, HOST:PORT texts separated by spaces
    more_local: str = ""


@dataclass(frozen=True)
class SessionRow(SessionRecord):
    """A row of the sessions table."""

    updated_at: float = field(kw_only=True)  # when the row was last written


@dataclass(frozen=True)
class ConnectionRow:
    session_id: str
    peer_address: str | None
    started_at: float
    ended_at: float | None
    bytes_in: int
    bytes_out: int
    outcome: str | None
    error: str | None


@dataclass(frozen=True)
class EventRow:
    at: float
    kind: str
    message: str


@dataclass(frozen=True)
class AttemptRow:
    """A coordinated session as the statistics read it."""

    started_at: float
    outcome: str | None  # None: still running
    path: str | None  # the first path taken (None: none opened); later moves aside
    predicted_path: str | None
    nat_pair: str | None
    setup_ms: float | None


@dataclass(frozen=True)
class NewSession:
    id: str
    role: str
    local_port: int
    rendezvous: str
    label: str
    share_token: str
    state: str
    started_at: float
    mode: Mode = "seed"
    local_host: str = LOCAL_HOST
    more_local: tuple[str, ...] = ()  # HOST:PORT texts, the 2nd, 3rd... local side


_DELETE_BATCH: Final = 500  # ids per DELETE (SQLite's bound parameters are limited)


def _filtered(outcome: str | None, query: str | None) -> tuple[list[str], list[Any]]:
    """The WHERE terms and their parameters of a history filter: an outcome
    (``running``: not ended), a search of label, peer and code."""
    where: list[str] = []
    params: list[Any] = []
    if outcome == "running":
        where.append("outcome IS NULL")
    elif outcome:
        where.append("outcome = ?")
        params.append(outcome)
    if query:
        pattern = f"%{_escape_like(query)}%"
        where.append("(label LIKE ? ESCAPE '\\' OR peer_address LIKE ? ESCAPE '\\' "
                     "OR code LIKE ? ESCAPE '\\')")
        params += [pattern, pattern, pattern]
    return where, params


def _session(row: Sequence[Any]) -> SessionRow:
    return SessionRow(*row[:-1], updated_at=row[-1])


def _first_path(timeline: str | None) -> str | None:
    """The path of a kept timeline's ``path`` mark (the first path; the session's
    ``path`` column follows later moves)."""
    if not timeline:
        return None
    try:
        marks = json.loads(timeline)
    except ValueError:
        return None
    for mark in marks if isinstance(marks, list) else []:
        if isinstance(mark, dict) and mark.get("kind") == "path":
            path = mark.get("path")
            return path if isinstance(path, str) else None
    return None


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def _classify(exc: sqlite3.Error, where: Path) -> DatabaseError:
    text = str(exc)
    if "locked" in text or "busy" in text:
        return DatabaseInUse(
            f"the database {where} is in use by another program (another nopf-web?): stop it, "
            "or pass another --db"
        )
    if "unable to open" in text or "readonly" in text or "read-only" in text:
        return DatabaseError(f"cannot open the database {where} for writing ({text}): "
                             "check the path and its permissions, or pass another --db")
    return DatabaseCorrupt(
        f"{where} is not a usable nopf database ({text}): move the file away to start a fresh "
        "history (nothing was changed in it), or pass another --db"
    )


async def _configure(conn: aiosqlite.Connection, where: Path,
                     migrations: Sequence[Migration]) -> None:
    try:
        await conn.execute("PRAGMA busy_timeout = 500")
        # The first read of a non-database file fails here, before anything is written.
        checks = [str(r[0]) for r in await conn.execute_fetchall("PRAGMA quick_check")]
        if checks != ["ok"]:
            raise DatabaseCorrupt(
                f"the database {where} is damaged ({checks[0]}): move it away to start a fresh "
                "history, or pass another --db"
            )
        await check_schema(conn, migrations, where=str(where))
        await conn.execute("PRAGMA locking_mode = EXCLUSIVE")
        await conn.execute("PRAGMA journal_mode = WAL")
        await conn.execute("PRAGMA synchronous = NORMAL")  # WAL: durable enough, far fewer fsyncs
        await conn.execute("PRAGMA foreign_keys = ON")
        # A session deleted from the history is overwritten, not left in free pages
        # (Debian's SQLite does so by default; python.org's builds do not).
        await conn.execute("PRAGMA secure_delete = ON")
        await conn.execute("BEGIN EXCLUSIVE")  # take the lock now and keep it (exclusive mode)
        await conn.execute("COMMIT")
    except sqlite3.Error as exc:
        raise _classify(exc, where) from None


def _prepare_path(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DatabaseError(f"cannot create the directory {path.parent} for the database: "
                            f"{exc.strerror or exc}") from None
    if path.is_dir():
        raise DatabaseError(f"{path} is a directory; --db needs a file path")


class HistoryStore:
    """Sessions, connections, events and settings; see the module docstring."""

    def __init__(self, conn: aiosqlite.Connection, path: Path, schema_version: int,
                 flush_interval: float) -> None:
        self._conn = conn
        self.path = path
        self.schema_version = schema_version
        self.flush_interval = flush_interval
        self._ops: list[tuple[str, tuple[Any, ...]]] = []
        self._updates: dict[str, dict[str, Any]] = {}
        self._wakeup = asyncio.Event()
        self._urgent = asyncio.Event()  # a session ended: write now, not at the interval
        self._lock = asyncio.Lock()
        self._flusher: asyncio.Task[None] | None = None
        self.write_errors = 0
        self.last_write_error: str | None = None
        self.flushes = 0

    # -- life ------------------------------------------------------------------

    @classmethod
    async def open(cls, path: Path, *, migrations_dir: Path | None = None,
                   flush_interval: float = 0.5) -> HistoryStore:
        """Open (creating it and its directory if needed), check and migrate the database."""
        migrations = load_migrations(migrations_dir or resource_dir("migrations"))
        _prepare_path(path)
        try:
            conn = await aiosqlite.connect(path, isolation_level=None)
        except sqlite3.Error as exc:
            raise _classify(exc, path) from None
        try:
            await _configure(conn, path, migrations)
            try:
                version = await migrate(conn, migrations, where=str(path))
            except sqlite3.Error as exc:
                raise _classify(exc, path) from None
        except BaseException:
            await conn.close()
            raise
        return cls(conn, path, version, flush_interval)

    def start(self) -> None:
        """Start the flusher task; :meth:`close` stops and awaits it."""
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush_loop(), name="nopf-history-flush")

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._flusher
            self._flusher = None
        await self.flush()
        await self._conn.close()

    async def _flush_loop(self) -> None:
        while True:
            await self._wakeup.wait()
            if not self._urgent.is_set():
                # Let more writes join this batch, unless a session ends meanwhile.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(self.flush_interval):
                        await self._urgent.wait()
            self._wakeup.clear()
            self._urgent.clear()
            await self.flush()

    # -- queued writes -----------------------------------------------------------

    def _queue(self, sql: str, params: tuple[Any, ...]) -> None:
        self._ops.append((sql, params))
        self._wakeup.set()

    def add_session(self, new: NewSession) -> None:
        self._queue(
            "INSERT INTO sessions (id, role, local_port, rendezvous, label, share_hash, state, "
            "started_at, updated_at, mode, local_host, more_local) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (new.id, new.role, new.local_port, new.rendezvous, new.label,
             share_hash(new.share_token), new.state, new.started_at, new.started_at, new.mode,
             new.local_host, " ".join(new.more_local)),
        )

    def update_session(self, session_id: str, **fields: Any) -> None:
        """Queue column updates; later updates of a column replace earlier unflushed ones."""
        unknown = set(fields) - _UPDATABLE
        if unknown:
            raise ValueError(f"not updatable session columns: {sorted(unknown)}")
        self._updates.setdefault(session_id, {}).update(fields)
        self._wakeup.set()
        if fields.get("outcome") is not None:
            self._urgent.set()

    def add_event(self, session_id: str, at: float, kind: str, message: str) -> None:
        self._queue("INSERT INTO events (session_id, at, kind, message) VALUES (?, ?, ?, ?)",
                    (session_id, at, kind, message))

    def connection_started(self, session_id: str, at: float, peer: str | None) -> None:
        self._queue("INSERT INTO connections (session_id, peer_address, started_at) "
                    "VALUES (?, ?, ?)", (session_id, peer, at))

    def connection_ended(self, session_id: str, at: float, bytes_in: int, bytes_out: int,
                         outcome: str, error: str | None) -> None:
        self._queue(
            "UPDATE connections SET ended_at = ?, bytes_in = ?, bytes_out = ?, outcome = ?, "
            "error = ? WHERE session_id = ? AND ended_at IS NULL",
            (at, bytes_in, bytes_out, outcome, error, session_id),
        )

    async def flush(self) -> None:
        """Write everything queued in one transaction."""
        async with self._lock:
            ops, self._ops = self._ops, []
            updates, self._updates = self._updates, {}
            if not ops and not updates:
                return
            now = time.time()
            try:
                await self._conn.execute("BEGIN")
                for sql, params in ops:
                    await self._conn.execute(sql, params)
                for session_id, fields in updates.items():
                    fields["updated_at"] = now
                    assigns = ", ".join(f"{column} = ?" for column in fields)
                    await self._conn.execute(f"UPDATE sessions SET {assigns} WHERE id = ?",
                                             (*fields.values(), session_id))
                await self._conn.execute("COMMIT")
                self.flushes += 1
            except sqlite3.Error as exc:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
                # Shown on the settings page; the dashboard keeps running.
                self.write_errors += 1
                self.last_write_error = f"{exc} ({len(ops)} writes and {len(updates)} updates lost)"
                log.error("history write failed: %s", self.last_write_error)

    # -- start-up ------------------------------------------------------------------

    async def mark_interrupted(self) -> int:
        """Close the records of sessions that were running when the dashboard last stopped."""
        await self.flush()
        async with self._lock:
            try:
                return await self._mark_interrupted()
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
                raise

    async def _mark_interrupted(self) -> int:
        await self._conn.execute("BEGIN")
        await self._conn.execute(
            "UPDATE connections SET outcome = 'interrupted', "
            "ended_at = (SELECT s.updated_at FROM sessions s WHERE s.id = session_id), "
            "bytes_in = (SELECT s.bytes_in FROM sessions s WHERE s.id = session_id), "
            "bytes_out = (SELECT s.bytes_out FROM sessions s WHERE s.id = session_id) "
            "WHERE ended_at IS NULL"
        )
        cur = await self._conn.execute(
            "UPDATE sessions SET outcome = 'interrupted', ended_at = updated_at, "
            "error = coalesce(error, 'the dashboard stopped while this session was running') "
            "WHERE outcome IS NULL"
        )
        count = cur.rowcount
        await self._conn.execute("COMMIT")
        return int(count)

    # -- reads -----------------------------------------------------------------------

    async def _fetch(self, sql: str, params: Iterable[Any] = ()) -> list[sqlite3.Row]:
        await self.flush()
        async with self._lock:
            return list(await self._conn.execute_fetchall(sql, tuple(params)))

    async def get_session(self, session_id: str) -> SessionRow | None:
        rows = await self._fetch(f"SELECT {_SESSION_COLUMNS} FROM sessions WHERE id = ?",
                                 (session_id,))
        return _session(rows[0]) if rows else None

    async def session_id_for_share(self, token: str) -> str | None:
        rows = await self._fetch("SELECT id FROM sessions WHERE share_hash = ?",
                                 (share_hash(token),))
        return str(rows[0][0]) if rows else None

    async def list_sessions(self, *, outcome: str | None = None, query: str | None = None,
                            limit: int = 50, offset: int = 0, ended: bool = False
                            ) -> tuple[list[SessionRow], int]:
        """Sessions newest first, and how many match. ``outcome="running"``: not ended;
        ``ended``: only those that have (what :meth:`delete_ended` would take)."""
        where, params = _filtered(outcome, query)
        if ended:
            where.append("outcome IS NOT NULL")
        clause = f"WHERE {' AND '.join(where)}" if where else ""
        total = await self._fetch(f"SELECT count(*) FROM sessions {clause}", params)
        rows = await self._fetch(
            f"SELECT {_SESSION_COLUMNS} FROM sessions {clause} "
            "ORDER BY started_at DESC, id LIMIT ? OFFSET ?", [*params, limit, offset])
        return [_session(r) for r in rows], int(total[0][0])

    async def delete_ended(self, *, session_id: str | None = None, outcome: str | None = None,
                           query: str | None = None) -> list[str]:
        """Delete the ended sessions that match (one by id, or as :meth:`list_sessions`
        filters), with their connections and events; the ids deleted. A running
        session is never deleted: its rows are still being written."""
        where, params = _filtered(outcome, query)
        where.append("outcome IS NOT NULL")
        if session_id is not None:
            where.append("id = ?")
            params.append(session_id)
        await self.flush()
        async with self._lock:
            try:
                await self._conn.execute("BEGIN")
                rows = await self._conn.execute_fetchall(
                    f"SELECT id FROM sessions WHERE {' AND '.join(where)}", tuple(params))
                ids = [str(row[0]) for row in rows]
                for start in range(0, len(ids), _DELETE_BATCH):
                    batch = ids[start:start + _DELETE_BATCH]
                    # ON DELETE CASCADE takes the connections and events along.
                    await self._conn.execute(
                        f"DELETE FROM sessions WHERE id IN ({', '.join('?' * len(batch))})",
                        batch)
                await self._conn.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error):
                    await self._conn.execute("ROLLBACK")
                raise
        return ids

    async def connections_for(self, session_ids: Sequence[str]) -> dict[str, list[ConnectionRow]]:
        result: dict[str, list[ConnectionRow]] = {sid: [] for sid in session_ids}
        if not session_ids:
            return result
        marks = ", ".join("?" for _ in session_ids)
        rows = await self._fetch(
            "SELECT session_id, peer_address, started_at, ended_at, bytes_in, bytes_out, "
            f"outcome, error FROM connections WHERE session_id IN ({marks}) "
            "ORDER BY started_at", session_ids)
        for row in rows:
            result[str(row[0])].append(ConnectionRow(*row))
        return result

    async def events_for(self, session_id: str, limit: int = 500) -> list[EventRow]:
        rows = await self._fetch(
            "SELECT at, kind, message FROM (SELECT id, at, kind, message FROM events "
            "WHERE session_id = ? ORDER BY id DESC LIMIT ?) ORDER BY id", (session_id, limit))
        return [EventRow(float(r[0]), str(r[1]), str(r[2])) for r in rows]

    async def attempts(self, since: float | None = None,
                       until: float | None = None) -> list[AttemptRow]:
        """Coordinated sessions that got as far as a prediction, oldest first, started
        within [since, until)."""
        where = ["mode = 'coordinated'", "predicted_path IS NOT NULL"]
        params: list[Any] = []
        if since is not None:
            where.append("started_at >= ?")
            params.append(since)
        if until is not None:
            where.append("started_at < ?")
            params.append(until)
        rows = await self._fetch(
            "SELECT started_at, outcome, path, predicted_path, nat_pair, setup_ms, timeline "
            f"FROM sessions WHERE {' AND '.join(where)} ORDER BY started_at", params)
        return [AttemptRow(float(r[0]), r[1], _first_path(r[6]) or r[2], r[3], r[4],
                           None if r[5] is None else float(r[5])) for r in rows]

    async def get_setting(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM settings WHERE key = ?", (key,))
        return str(rows[0][0]) if rows else None

    async def set_setting(self, key: str, value: str | None) -> None:
        """Store a setting now (not batched: the user waits for it); None deletes it."""
        if value is None:
            self._queue("DELETE FROM settings WHERE key = ?", (key,))
        else:
            self._queue("INSERT INTO settings (key, value) VALUES (?, ?) "
                        "ON CONFLICT (key) DO UPDATE SET value = excluded.value", (key, value))
        await self.flush()
