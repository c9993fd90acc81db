"""The history store: WAL, one owner, batched writes, interrupted sessions, clear errors."""

from __future__ import annotations

import asyncio
import hashlib
import os
import sqlite3
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from nopf_web.db import DatabaseCorrupt, DatabaseError, DatabaseInUse, HistoryStore, NewSession
from nopf_web.db.store import share_hash
from nopf_web.resources import ResourceName, resource_dir


def _new(session_id: str, label: str = "", started: float | None = None,
         token: str | None = None) -> NewSession:
    return NewSession(id=session_id, role="server", local_port=2222, rendezvous="127.0.0.1:3012",
                      label=label, share_token=token or f"tok-{session_id}",
                      state="discovering", started_at=started or time.time())


@pytest.fixture
async def store(tmp_path: Path) -> AsyncIterator[HistoryStore]:
    s = await HistoryStore.open(tmp_path / "h.db", flush_interval=0.01)
    try:
        yield s
    finally:
        await s.close()


def test_resource_dirs_are_found_from_the_source_tree() -> None:
    names: tuple[ResourceName, ...] = ("templates", "static", "migrations")
    for name in names:
        assert resource_dir(name).is_dir()


async def test_open_creates_the_file_in_wal_mode_at_the_newest_schema(tmp_path: Path) -> None:
    path = tmp_path / "deep" / "dir" / "h.db"
    s = await HistoryStore.open(path)
    try:
        assert path.exists()
        assert s.schema_version >= 1
        rows = await s._fetch("PRAGMA journal_mode")
        assert rows[0][0] == "wal"
    finally:
        await s.close()


async def test_a_second_owner_is_refused_while_the_first_runs(tmp_path: Path) -> None:
    first = await HistoryStore.open(tmp_path / "h.db")
    try:
        with pytest.raises(DatabaseInUse, match="in use by another program"):
            await HistoryStore.open(tmp_path / "h.db")
    finally:
        await first.close()
    second = await HistoryStore.open(tmp_path / "h.db")  # free again once closed
    await second.close()


async def test_a_file_that_is_not_a_database_is_refused_untouched(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    path.write_bytes(os.urandom(8192))
    before = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(DatabaseCorrupt, match=r"not a usable nopf database.*move the file away"):
        await HistoryStore.open(path)
    assert hashlib.sha256(path.read_bytes()).hexdigest() == before


async def test_a_damaged_database_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s = await HistoryStore.open(path)
    for i in range(300):
        s.add_session(_new(f"{i:012x}", label="x" * 200))
    await s.close()
    data = bytearray(path.read_bytes())
    page = 4096
    data[2 * page: 3 * page] = os.urandom(page)  # scribble over a b-tree page
    path.write_bytes(bytes(data))
    with pytest.raises(DatabaseCorrupt):
        await HistoryStore.open(path)


async def test_a_directory_path_is_refused(tmp_path: Path) -> None:
    with pytest.raises(DatabaseError, match="is a directory"):
        await HistoryStore.open(tmp_path)


async def test_progress_updates_coalesce_into_one_write_per_flush(store: HistoryStore) -> None:
    store.add_session(_new("aaaaaaaaaaaa"))
    await store.flush()
    flushes = store.flushes
    for n in range(1, 5001):  # a busy transfer's worth of progress between two flushes
        store.update_session("aaaaaaaaaaaa", bytes_in=n, bytes_out=2 * n)
    assert store.flushes == flushes  # nothing written yet: queued in memory
    row = await store.get_session("aaaaaaaaaaaa")  # reads flush first
    assert row is not None
    assert (row.bytes_in, row.bytes_out) == (5000, 10000)
    assert store.flushes == flushes + 1


async def test_the_flusher_writes_in_the_background(store: HistoryStore) -> None:
    store.start()
    store.add_session(_new("bbbbbbbbbbbb", label="bg"))
    store.add_event("bbbbbbbbbbbb", time.time(), "log", "hello")
    for _ in range(200):
        if store.flushes:
            break
        await asyncio.sleep(0.01)
    assert store.flushes >= 1  # written without anyone calling flush()


async def test_an_end_is_written_at_once_not_at_the_next_interval(tmp_path: Path) -> None:
    s = await HistoryStore.open(tmp_path / "h.db", flush_interval=60.0)
    s.start()
    try:
        s.add_session(_new("eeeeeeeeeeee"))
        await asyncio.sleep(0.2)
        assert s.flushes == 0  # progress waits for the batch (a minute here)...
        s.update_session("eeeeeeeeeeee", state="closed", outcome="closed", ended_at=time.time())
        s.add_event("eeeeeeeeeeee", time.time(), "outcome", "session closed")
        for _ in range(100):
            if s.flushes:
                break
            await asyncio.sleep(0.01)
        assert s.flushes == 1  # ...an end does not: one transaction, with what came with it
        rows = await s._conn.execute_fetchall(
            "SELECT outcome, (SELECT count(*) FROM events) FROM sessions")
        assert [tuple(r) for r in rows] == [("closed", 1)]
    finally:
        await s.close()


async def test_unknown_columns_are_a_programming_error(store: HistoryStore) -> None:
    with pytest.raises(ValueError, match="not updatable"):
        store.update_session("x", role="client")


async def test_sessions_running_at_a_crash_are_marked_interrupted(tmp_path: Path) -> None:
    path = tmp_path / "h.db"
    s = await HistoryStore.open(path)
    s.add_session(_new("cccccccccccc", label="was running"))
    s.connection_started("cccccccccccc", time.time(), "203.0.113.9:4000")
    s.update_session("cccccccccccc", state="connected", bytes_in=10, bytes_out=20)
    s.add_session(_new("dddddddddddd", label="finished"))
    s.update_session("dddddddddddd", state="closed", outcome="closed", ended_at=time.time())
    await s.close()  # as if the process died right after its last flush

    s = await HistoryStore.open(path)
    try:
        assert await s.mark_interrupted() == 1
        row = await s.get_session("cccccccccccc")
        assert row is not None
        assert row.outcome == "interrupted"
        assert row.ended_at == row.updated_at
        assert row.error and "dashboard stopped" in row.error
        conns = (await s.connections_for(["cccccccccccc"]))["cccccccccccc"]
        assert [(c.outcome, c.bytes_in, c.bytes_out) for c in conns] == [("interrupted", 10, 20)]
        done = await s.get_session("dddddddddddd")
        assert done is not None and done.outcome == "closed"
        assert await s.mark_interrupted() == 0
    finally:
        await s.close()


async def test_list_filters_searches_and_pages(store: HistoryStore) -> None:
    now = time.time()
    for i in range(30):
        store.add_session(_new(f"{i:012x}", label=f"job {i}", started=now + i))
        if i % 3 == 0:
            store.update_session(f"{i:012x}", outcome="failed", error="boom")
        elif i % 3 == 1:
            store.update_session(f"{i:012x}", outcome="closed", peer_address=f"198.51.100.{i}:1")
    store.add_session(_new("ffffffffffff", label="100%_done", started=now + 100))
    rows, total = await store.list_sessions(limit=10)
    assert total == 31
    assert [r.id for r in rows][:2] == ["ffffffffffff", f"{29:012x}"]  # newest first
    rows, total = await store.list_sessions(outcome="failed", limit=100)
    assert total == 10 and all(r.outcome == "failed" for r in rows)
    rows, total = await store.list_sessions(outcome="running", limit=100)
    assert total == 11 and all(r.outcome is None for r in rows)
    rows, total = await store.list_sessions(query="198.51.100.4:", limit=100)
    assert [r.label for r in rows] == ["job 4"]
    rows, total = await store.list_sessions(query="%_", limit=100)  # LIKE wildcards are literal
    assert [r.label for r in rows] == ["100%_done"]
    page2, _ = await store.list_sessions(limit=10, offset=10)
    page1, _ = await store.list_sessions(limit=10, offset=0)
    assert not {r.id for r in page1} & {r.id for r in page2}


async def test_deleting_ended_sessions_takes_their_rows_and_leaves_running_ones(
        store: HistoryStore) -> None:
    ended = [f"e{i:05d}" for i in range(1_200)]  # more than one DELETE's batch
    for i, session_id in enumerate(ended):
        store.add_session(_new(session_id, label="odd" if i % 2 else "even", started=1000 + i))
        store.add_event(session_id, 1000 + i, "log", "hello")
        store.connection_started(session_id, 1000 + i, "192.0.2.1:4000")
        store.update_session(session_id, outcome="stopped", ended_at=1001 + i)
    store.add_session(_new("running", label="odd"))
    store.add_event("running", 1.0, "log", "still here")
    await store.flush()
    assert await store.delete_ended(session_id="running") == []
    assert await store.delete_ended(outcome="running") == []
    assert await store.delete_ended(session_id=ended[1]) == [ended[1]]
    _rows, count = await store.list_sessions(query="odd", ended=True, limit=0)
    assert count == 599
    deleted = await store.delete_ended(query="odd")
    assert sorted(deleted) == ended[3::2]
    assert sorted(await store.delete_ended()) == ended[0::2]
    rows, total = await store.list_sessions()
    assert total == 1 and rows[0].id == "running"
    assert [e.message for e in await store.events_for("running")] == ["still here"]
    for session_id in ended[:3]:
        assert await store.events_for(session_id) == []
    assert await store.connections_for(ended[:3]) == {sid: [] for sid in ended[:3]}
    # Nothing is left behind for another row to meet (ON DELETE CASCADE).
    async with store._lock:
        left = list(await store._conn.execute_fetchall(
            "SELECT (SELECT count(*) FROM events), (SELECT count(*) FROM connections)"))
    assert tuple(left[0]) == (1, 0)


async def test_what_is_deleted_is_gone_from_the_file(tmp_path: Path) -> None:
    s = await HistoryStore.open(tmp_path / "h.db")
    async with s._lock:
        assert list(await s._conn.execute_fetchall("PRAGMA secure_delete")) == [(1,)]
    for i in range(20):
        s.add_session(_new(f"s{i}", label=f"a label to forget {i}"))
        s.add_event(f"s{i}", 1.0, "log", f"peer 203.0.113.{i}:4000 to forget")
        s.update_session(f"s{i}", outcome="stopped", ended_at=2.0)
    await s.flush()
    assert len(await s.delete_ended()) == 20
    await s.close()
    assert b"to forget" not in _raw_files(tmp_path / "h.db")


async def test_share_tokens_are_stored_only_as_hashes(store: HistoryStore) -> None:
    store.add_session(_new("eeeeeeeeeeee", token="s3cret-share-token-value"))
    assert await store.session_id_for_share("s3cret-share-token-value") == "eeeeeeeeeeee"
    assert await store.session_id_for_share("another-token-entirely") is None
    await store.flush()
    raw = _raw_files(store.path)
    assert b"s3cret-share-token-value" not in raw
    assert share_hash("s3cret-share-token-value").encode() in raw


def _raw_files(path: Path) -> bytes:
    """The database file and its WAL, as bytes (the WAL may hold the newest pages)."""
    wal = Path(f"{path}-wal")
    return path.read_bytes() + (wal.read_bytes() if wal.exists() else b"")


async def test_settings_round_trip(store: HistoryStore) -> None:
    assert await store.get_setting("default_rendezvous") is None
    await store.set_setting("default_rendezvous", "198.51.100.2:3012")
    await store.set_setting("default_rendezvous", "198.51.100.3:3012")
    assert await store.get_setting("default_rendezvous") == "198.51.100.3:3012"
    await store.set_setting("default_rendezvous", None)
    assert await store.get_setting("default_rendezvous") is None


async def test_events_keep_their_order_and_limit(store: HistoryStore) -> None:
    store.add_session(_new("aaaaaaaaaaab"))
    for i in range(20):
        store.add_event("aaaaaaaaaaab", 1000.0 + i, "log", f"event {i}")
    events = await store.events_for("aaaaaaaaaaab", limit=5)
    assert [e.message for e in events] == [f"event {i}" for i in range(15, 20)]


async def test_a_schema_1_history_is_migrated_with_its_sessions_as_seed_mode(
        tmp_path: Path) -> None:
    only_first = tmp_path / "m1"
    only_first.mkdir()
    first = resource_dir("migrations") / "0001_initial.sql"
    (only_first / first.name).write_text(first.read_text(encoding="utf-8"), encoding="utf-8")
    old = await HistoryStore.open(tmp_path / "h.db", migrations_dir=only_first)
    assert old.schema_version == 1
    # What a schema-1 nopf-web wrote (no mode column yet).
    old._queue("INSERT INTO sessions (id, role, local_port, rendezvous, label, state, "
               "started_at, updated_at) VALUES ('old', 'server', 22, 'r:1', 'before', "
               "'closed', 1, 1)", ())
    await old.close()

    s = await HistoryStore.open(tmp_path / "h.db")
    try:
        assert s.schema_version == 5
        row = await s.get_session("old")
        assert row is not None and (row.mode, row.code, row.path, row.local_host,
                                    row.more_local) == (
            "seed", None, None, "127.0.0.1", "")  # one local side on 127.0.0.1 before 4 and 5
        s.add_session(NewSession(id="new", role="client", local_port=3010, rendezvous="r:1",
                                 label="", share_token="tok-new", state="discovering",
                                 started_at=time.time(), mode="coordinated",
                                 local_host="0.0.0.0", more_local=("[::1]:8080", "0.0.0.0:8081")))
        s.update_session("new", code="7-orbit-lantern", path="lan")
        row = await s.get_session("new")
        assert row is not None and (row.mode, row.code, row.path, row.local_host,
                                    row.more_local) == (
            "coordinated", "7-orbit-lantern", "lan", "0.0.0.0", "[::1]:8080 0.0.0.0:8081")
        rows, total = await s.list_sessions(query="orbit")
        assert total == 1 and rows[0].id == "new"  # history search finds a stored code
        with pytest.raises(sqlite3.IntegrityError, match="CHECK"):
            await s._conn.execute("UPDATE sessions SET mode = 'other' WHERE id = 'new'")
    finally:
        await s.close()
