"""The history database: numbered migrations and the batched history store."""

from .errors import DatabaseCorrupt, DatabaseError, DatabaseInUse, DatabaseTooNew, MigrationError
from .store import (
    MODES,
    OUTCOMES,
    ConnectionRow,
    EventRow,
    HistoryStore,
    Mode,
    NewSession,
    SessionRow,
)

__all__ = [
    "MODES",
    "OUTCOMES",
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
    "SessionRow",
]
