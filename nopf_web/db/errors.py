"""Errors of the history database, each with a message that says what to do."""

from __future__ import annotations

from nopf_web.errors import NopfError


class DatabaseError(NopfError):
    """The history database cannot be used."""


class DatabaseCorrupt(DatabaseError):
    """The file is not an SQLite database, or its pages are damaged."""


class DatabaseTooNew(DatabaseError):
    """The schema was written by a newer nopf-web than this one."""


class DatabaseInUse(DatabaseError):
    """Another process (another nopf-web) holds the database."""


class MigrationError(DatabaseError):
    """A migration file is misnamed, or applying it failed (rolled back)."""
