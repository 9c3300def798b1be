"""Schema versions of the project's SQLite files (the outbox, the aggregator's store): migrate forward on open."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Mapping
from typing import Any

Migration = Callable[[Any], None]

# the table sqlite-utils creates for {"key": str, "value": str}, pk="key" (files made by either path are the same)
META_TABLE = """CREATE TABLE IF NOT EXISTS "meta" (
   "key" TEXT PRIMARY KEY,
   "value" TEXT
)"""


def migrate_forward(
    conn: sqlite3.Connection,
    migrations: Mapping[int, Migration],
    newer: Callable[[int], Exception],
    *,
    plain: bool = False,
) -> Any:
    """Apply every migration above the file's ``schema_version`` (kept in ``meta``), each in its own transaction.

    A file from a newer release is never touched: ``newer(version)`` is raised instead. Each migration receives a
    ``sqlite_utils.Database`` over ``conn`` — or, with ``plain`` (the agent's outbox: a device does not load
    sqlite-utils), the connection itself; that is what is returned too.
    """
    if plain:
        db: Any = conn
    else:
        import sqlite_utils

        db = sqlite_utils.Database(conn)
    conn.execute(META_TABLE)
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
