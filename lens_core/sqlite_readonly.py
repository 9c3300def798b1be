"""Open the project's SQLite files for reading only: nothing is created, migrated or left behind.

``sqlite3.connect(path)`` creates a missing file, and even a ``mode=ro`` open of a WAL database whose ``-wal`` file
is absent creates (and leaves) ``-wal`` and ``-shm`` beside it. So a read opens ``file:PATH?mode=ro`` and adds
``immutable=1`` when no ``-wal`` file exists. The assumption behind ``immutable=1``: without a ``-wal`` file no
writer has the database open (SQLite removes the file when the last writer closes cleanly), so nothing changes
under a short read. A writer that opens it meanwhile is not seen by that read (it reads the file as it was); with
a ``-wal`` file present (a writer is running, or crashed) the read takes part in WAL locking like any reader, which
needs the ``-shm`` file the writer keeps.
"""

from __future__ import annotations

import sqlite3
import urllib.parse
from dataclasses import dataclass
from pathlib import Path


class NotUsable(Exception):
    """The file cannot serve a read: ``problem`` says why, in words that follow the path."""

    def __init__(self, path: Path | str, problem: str) -> None:
        self.path = path
        self.problem = problem
        super().__init__(f"{path}: {problem}")


def readonly_uri(path: Path | str) -> str:
    """The URI that opens ``path`` read-only, immutable when no ``-wal`` file exists (see the module's note)."""
    path = Path(path).absolute()
    uri = f"file:{urllib.parse.quote(str(path))}?mode=ro"
    if not Path(f"{path}-wal").exists():
        uri += "&immutable=1"
    return uri


def connect_readonly(path: Path | str, *, timeout: float = 30.0) -> sqlite3.Connection:
    """A read-only connection to an existing file (``NotUsable`` when it does not exist or is not a file)."""
    path = Path(path)
    if not path.exists():
        raise NotUsable(path, "does not exist")
    if not path.is_file():
        raise NotUsable(path, "is a directory, not a database file" if path.is_dir() else "is not a regular file")
    try:
        conn = sqlite3.connect(
            readonly_uri(path), uri=True, isolation_level=None, check_same_thread=False, timeout=timeout
        )
        conn.execute("PRAGMA query_only=1")
    except sqlite3.Error as exc:
        raise NotUsable(path, f"cannot be opened for reading ({exc})") from None
    return conn


@dataclass(frozen=True)
class Layout:
    """What a database holds: its tables and the ``schema_version`` in ``meta`` (None: no such row)."""

    tables: frozenset[str]
    version: int | None


def layout(conn: sqlite3.Connection, path: Path) -> Layout:
    """The tables and schema version of an open database; ``NotUsable`` when it is not an SQLite database."""
    try:
        tables = frozenset(
            str(r[0]) for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'").fetchall()
        )
        version = None
        if "meta" in tables:
            row = conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
            version = int(row[0]) if row and str(row[0]).isdigit() else None
    except sqlite3.DatabaseError as exc:
        raise NotUsable(path, f"is not an SQLite database ({exc})") from None
    return Layout(tables, version)


def check_layout(
    found: Layout,
    path: Path,
    *,
    program: str,
    marker: str,
    latest: int,
    older_hint: str,
    newer_hint: str,
    empty_hint: str,
) -> None:
    """``NotUsable`` unless ``found`` is ``program``'s database (a ``meta`` schema version and the ``marker``
    table) at schema ``latest``: empty, another program's, older or newer each say what to do."""
    if not found.tables:
        raise NotUsable(path, f"holds no tables: not a {program} database yet ({empty_hint})")
    if found.version is None or marker not in found.tables:
        shown = ", ".join(sorted(found.tables)[:6]) + (", …" if len(found.tables) > 6 else "")
        raise NotUsable(path, f"is another program's SQLite database (tables {shown}), not a {program} database")
    if found.version < latest:
        raise NotUsable(
            path, f"holds {program} schema version {found.version}, older than this release's ({latest}); {older_hint}"
        )
    if found.version > latest:
        raise NotUsable(
            path, f"holds {program} schema version {found.version}, newer than this release's ({latest}); {newer_hint}"
        )
