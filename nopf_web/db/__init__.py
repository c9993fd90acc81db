"""The history database: numbered migrations and the batched history store."""

from .errors import DatabaseCorrupt, DatabaseError, DatabaseInUse, DatabaseTooNew, MigrationError
from .store import OUTCOMES, ConnectionRow, EventRow, HistoryStore, NewSession, SessionRow

__all__ = [
    "OUTCOMES",
    "ConnectionRow",
    "DatabaseCorrupt",
    "DatabaseError",
    "DatabaseInUse",
    "DatabaseTooNew",
    "EventRow",
    "HistoryStore",
    "MigrationError",
    "NewSession",
    "SessionRow",
]
