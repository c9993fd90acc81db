"""The history database: numbered migrations and the batched history store."""

from nopf_web.sessions.engine import MODES, Mode

from .errors import DatabaseCorrupt, DatabaseError, DatabaseInUse, DatabaseTooNew, MigrationError
from .store import (
    OUTCOMES,
    AttemptRow,
    ConnectionRow,
    EventRow,
    HistoryStore,
    NewSession,
    SessionRecord,
    SessionRow,
)

__all__ = [
    "MODES",
    "OUTCOMES",
    "AttemptRow",
    "ConnectionRow",
    "DatabaseCorrupt",
    "DatabaseError",
    "DatabaseInUse",
    "DatabaseTooNew",
    "EventRow",
    "HistoryStore",
    "MigrationError",
    "Mode",
    "NewSession",
    "SessionRecord",
    "SessionRow",
]
