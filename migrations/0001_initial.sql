-- nopf-web history: one row per session, its connections and its event log.
-- Times are Unix seconds (REAL). Applied once, tracked by PRAGMA user_version.

CREATE TABLE sessions (
    id             TEXT PRIMARY KEY,
    role           TEXT    NOT NULL CHECK (role IN ('server', 'client')),
    local_port     INTEGER NOT NULL CHECK (local_port BETWEEN 1 AND 65535),
    rendezvous     TEXT    NOT NULL,
    label          TEXT    NOT NULL DEFAULT '',
    share_hash     TEXT    UNIQUE,          -- sha256 of the share token, never the token
    state          TEXT    NOT NULL,        -- last engine state seen
    outcome        TEXT,                    -- NULL while running: closed|stopped|failed|interrupted
    public_address TEXT,
    peer_address   TEXT,
    bytes_in       INTEGER NOT NULL DEFAULT 0,
    bytes_out      INTEGER NOT NULL DEFAULT 0,
    connections    INTEGER NOT NULL DEFAULT 0,
    error          TEXT,
    hint           TEXT,                    -- what the user can try, for failures
    started_at     REAL    NOT NULL,
    ended_at       REAL,
    updated_at     REAL    NOT NULL         -- last write: the end time of an interrupted run
);
CREATE INDEX sessions_by_start ON sessions (started_at DESC);
CREATE INDEX sessions_by_outcome ON sessions (outcome, started_at DESC);

CREATE TABLE connections (
    id           INTEGER PRIMARY KEY,
    session_id   TEXT    NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    peer_address TEXT,
    started_at   REAL    NOT NULL,
    ended_at     REAL,
    bytes_in     INTEGER NOT NULL DEFAULT 0,
    bytes_out    INTEGER NOT NULL DEFAULT 0,
    outcome      TEXT,
    error        TEXT
);
CREATE INDEX connections_by_session ON connections (session_id, started_at);

CREATE TABLE events (
    id         INTEGER PRIMARY KEY,
    session_id TEXT NOT NULL REFERENCES sessions (id) ON DELETE CASCADE,
    at         REAL NOT NULL,
    kind       TEXT NOT NULL,
    message    TEXT NOT NULL
);
CREATE INDEX events_by_session ON events (session_id, at);

CREATE TABLE settings (
    key   TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
