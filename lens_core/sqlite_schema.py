"""Schema versions of the project's SQLite files (the outbox, the aggregator's store): migrate forward on open."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping

import sqlite_utils

Migration = Callable[[sqlite_utils.Database], None]


def migrate_forward(
    conn: sqlite3.Connection, migrations: Mapping[int, Migration], newer: Callable[[int], Exception]
) -> sqlite_utils.Database:
    """Apply every migration above the file's ``schema_version`` (kept in ``meta``), each in its own transaction.

    A file from a newer release is never touched: ``newer(version)`` is raised instead.
    """
    db = sqlite_utils.Database(conn)
    db.table("meta").create({"key": str, "value": str}, pk="key", if_not_exists=True)
    row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
    version = int(row[0]) if row else 0
    latest = max(migrations)
    if version > latest:
        raise newer(version)
    for target in range(version + 1, latest + 1):
        conn.execute("BEGIN IMMEDIATE")
        migrations[target](db)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('schema_version', ?)", (str(target),))
        conn.execute("COMMIT")
    return db
