"""The SQLite outbox: every measurement is stored here, durably, until the aggregator acknowledges it.

* One row per record: its wire bytes (CBOR or msgpack, :mod:`agent.wire`) as they will be uploaded, so a batch
  is built without re-encoding. Rows are deleted only after the aggregator acknowledged them; what is present is
  pending, oldest first — the read position survives any restart because it *is* the table.
* Bounded in bytes (``max_bytes``) on disk: each row counts its blob plus a fixed overhead, scaled by the
  measured ratio of the database's used pages to that count (page slack, index, b-tree), so the file itself
  stays within the bound. When an append would pass it, the policy drops the oldest pending records (default)
  or the new one; every drop is counted in
  ``dropped_total``, which the uploader sends as a cumulative total (a retried batch cannot double-count it).
* WAL journal; ``synchronous=FULL`` by default, so an append has reached the disk before it is reported stored.
* A row whose blob does not decode is moved to the ``quarantine`` table and counted, never retried forever. A
  database file SQLite cannot read is renamed aside, a new one is created, and every row that can still be read
  from the damaged file is copied over; the unreadable rest is counted as quarantined. The agent never crash-loops
  on its own storage.
* ``schema_version`` in the ``meta`` table; migrations run forward on open.

One :class:`Outbox` owns one connection and is used from one thread; :class:`AsyncOutbox` runs it on a single
worker thread so the event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import sqlite_utils

from . import wire
from .sqlite_salvage import scan_leaf_rows
from .sqlite_schema import migrate_forward

log = logging.getLogger("agent.outbox")

SCHEMA_VERSION = 1
ROW_OVERHEAD = 96  # bytes a row costs beyond its blob: id, sequence, timestamps, b-tree cells, page slack
QUARANTINE_KEEP = 1000  # quarantined rows kept for inspection (the count is kept forever)
T = TypeVar("T")
_COUNTERS = ("dropped_total", "quarantined_total", "salvaged_total", "unreadable_pages_total")


class OutboxError(Exception):
    pass


@dataclass(frozen=True)
class AppendResult:
    stored: bool
    seq: int | None
    dropped: int  # records dropped to make room (or 1: this one, under drop_newest)


@dataclass(frozen=True)
class PendingRow:
    seq: int
    id: bytes
    codec: str
    body: bytes
    created_us: int


@dataclass(frozen=True)
class OutboxStats:
    records: int
    bytes: int
    max_bytes: int
    oldest_created_us: int | None
    dropped_total: int
    quarantined_total: int
    salvaged_total: int
    unreadable_pages_total: int = 0

    @property
    def fill_ratio(self) -> float:
        return self.bytes / self.max_bytes if self.max_bytes else 0.0


def _now_us() -> int:
    return time.time_ns() // 1000


def _migrate_v1(db: sqlite_utils.Database) -> None:
    db.table("records").create(
        {"seq": int, "id": bytes, "created_us": int, "codec": str, "size": int, "body": bytes},
        pk="seq",
        not_null={"id", "created_us", "codec", "size", "body"},
        if_not_exists=True,
    )
    db.table("records").create_index(["id"], unique=True, if_not_exists=True)
    db.table("quarantine").create(
        {"seq": int, "id": bytes, "created_us": int, "quarantined_us": int, "reason": str, "body": bytes},
        pk="seq",
        if_not_exists=True,
    )


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {1: _migrate_v1}


class Outbox:
    def __init__(
        self,
        path: Path | str,
        *,
        max_bytes: int = 256 * 1024**2,
        policy: str = "drop_oldest",
        synchronous: str = "FULL",
        codec: str = "cbor",
        include_text: bool = False,
        now_us: Callable[[], int] = _now_us,
    ) -> None:
        if policy not in ("drop_oldest", "drop_newest"):
            raise ValueError(f"policy must be drop_oldest or drop_newest, not {policy!r}")
        if synchronous not in ("FULL", "NORMAL"):
            raise ValueError(f"synchronous must be FULL or NORMAL, not {synchronous!r}")
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.policy = policy
        self.synchronous = synchronous
        self.codec = codec
        self.include_text = include_text
        self._now_us = now_us
        self._lock = threading.Lock()
        self._disk_factor = 1.4  # disk bytes per counted byte; measured once the outbox holds enough to tell
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open_or_salvage()

    # -- opening, migrating, salvaging -------------------------------------------------------------------------
    def _connect(self, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        # The WAL is truncated back to this size after each checkpoint, so it cannot outgrow the bound for long.
        conn.execute(f"PRAGMA journal_size_limit={max(64 * 1024, min(self.max_bytes // 16, 4 * 1024**2))}")
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        migrate_forward(
            conn,
            MIGRATIONS,
            lambda version: OutboxError(
                f"{self.path}: outbox schema version {version} is newer than this agent's ({SCHEMA_VERSION}); "
                "upgrade lens-agent"
            ),
        )
        if conn.execute("SELECT value FROM meta WHERE key = 'stored_bytes'").fetchone() is None:
            total = conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0]
            conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('stored_bytes', ?)", (str(total),))

    def _open_or_salvage(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = None
        try:
            conn = self._connect(self.path)
            check = conn.execute("PRAGMA quick_check").fetchone()
            if check is None or check[0] != "ok":
                raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'}")
            self._prepare(conn)
            return conn
        except sqlite3.DatabaseError as exc:
            log.error("outbox %s is damaged (%s): salvaging what can be read", self.path, exc)
            if conn is not None:
                conn.close()
            return self._salvage(str(exc))

    def _salvage(self, reason: str) -> sqlite3.Connection:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        damaged = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(Path(str(damaged) + suffix))
        conn = self._connect(self.path)
        self._prepare(conn)
        copied, unreadable_pages, counters = self._copy_readable(damaged)
        conn.execute("BEGIN IMMEDIATE")
        total = 0
        for row in copied:
            size = len(row[3]) + ROW_OVERHEAD
            conn.execute(
                "INSERT OR IGNORE INTO records(seq, id, created_us, codec, size, body) VALUES (?, ?, ?, ?, ?, ?)",
                (row[0], row[1], row[2], row[4], size, row[3]),
            )
            total += size
        self._set_int(conn, "stored_bytes", total)
        for key in _COUNTERS:
            self._set_int(conn, key, counters.get(key, 0))
        self._add_int(conn, "salvaged_total", len(copied))
        self._add_int(conn, "unreadable_pages_total", unreadable_pages)
        conn.execute(
            "INSERT OR REPLACE INTO meta(key, value) VALUES ('last_salvage', ?)",
            (
                f"{stamp}: {reason}; {len(copied)} records recovered, {unreadable_pages} pages unreadable; "
                f"damaged file kept as {damaged.name}",
            ),
        )
        conn.execute("COMMIT")
        log.error("outbox salvage: %d records recovered, %d pages unreadable", len(copied), unreadable_pages)
        return conn

    @staticmethod
    def _copy_readable(damaged: Path) -> tuple[list[tuple[Any, ...]], int, dict[str, int]]:
        """Every record row that can still be read, the count of unreadable pages, and the counters.

        SQLite is asked first, chunk by chunk; whatever it cannot reach is read page by page from the file
        (:mod:`agent.sqlite_salvage`).
        """
        found: dict[int, tuple[Any, ...]] = {}
        counters: dict[str, int] = {}
        with contextlib.suppress(sqlite3.DatabaseError):
            old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
            try:
                with contextlib.suppress(sqlite3.DatabaseError):
                    for key, value in old.execute("SELECT key, value FROM meta"):
                        if key in _COUNTERS:
                            counters[key] = int(value)
                with contextlib.suppress(sqlite3.DatabaseError):
                    for row in old.execute("SELECT seq, id, created_us, body, codec FROM records"):
                        found[row[0]] = row
            finally:
                old.close()
        unreadable = 0
        try:
            leaf_rows, unreadable = scan_leaf_rows(damaged)
        except (OSError, ValueError):
            leaf_rows = []
        for rowid, values in leaf_rows:
            # records: (seq NULL-aliased, id blob16, created int, codec text, size int, body blob)
            if (
                len(values) == 6
                and isinstance(values[1], bytes)
                and len(values[1]) == 16
                and isinstance(values[2], int)
                and values[3] in wire.CODECS
                and isinstance(values[5], bytes)
            ):
                found.setdefault(rowid, (rowid, values[1], values[2], values[5], values[3]))
            elif len(values) == 2 and values[0] in _COUNTERS and isinstance(values[1], str) and values[1].isdigit():
                counters.setdefault(values[0], int(values[1]))
        return [found[k] for k in sorted(found)], unreadable, counters

    # -- counters in meta -----------------------------------------------------------------------------------
    @staticmethod
    def _get_int(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    @staticmethod
    def _set_int(conn: sqlite3.Connection, key: str, value: int) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

    def _add_int(self, conn: sqlite3.Connection, key: str, delta: int) -> None:
        if delta:
            self._set_int(conn, key, self._get_int(conn, key) + delta)

    # -- writing ----------------------------------------------------------------------------------------------
    def append(self, record: Mapping[str, Any]) -> AppendResult:
        """Store one measurement record (``Measurement.to_dict()`` shape); durable when this returns."""
        return self.append_many([record])[0]

    def append_many(self, records: Iterable[Mapping[str, Any]]) -> list[AppendResult]:
        """Store several records in one transaction (one fsync)."""
        return self.append_encoded(
            [
                (
                    bytes.fromhex(str(r["id"]).replace("-", "")),
                    wire.encode_record(r, self.codec, include_text=self.include_text),
                )
                for r in records
            ]
        )

    def append_encoded(self, encoded: list[tuple[bytes, bytes]]) -> list[AppendResult]:
        """Store records already encoded in this outbox's codec: ``[(16-byte id, wire bytes)]``, one transaction."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                stored = self._get_int(conn, "stored_bytes")
                limit = self._counted_limit(conn, stored)
                now = self._now_us()
                rows = [(rid, now, self.codec, len(body) + ROW_OVERHEAD, body) for rid, body in encoded]
                incoming = sum(row[3] for row in rows)
                if stored + incoming <= limit:
                    results, stored = self._insert_all(conn, rows, stored, incoming)
                else:
                    results, stored = self._insert_bounded(conn, rows, stored, limit)
                self._set_int(conn, "stored_bytes", stored)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return results

    _INSERT = "INSERT OR IGNORE INTO records(id, created_us, codec, size, body) VALUES (?, ?, ?, ?, ?)"

    def _insert_all(
        self, conn: sqlite3.Connection, rows: list[tuple[bytes, int, str, int, bytes]], stored: int, incoming: int
    ) -> tuple[list[AppendResult], int]:
        """Everything fits: one executemany."""
        before = conn.total_changes
        conn.executemany(self._INSERT, rows)
        if conn.total_changes - before == len(rows):
            stored += incoming
        else:  # some ids were already stored (a record appended twice): recount rather than guess
            stored = int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0])
        return [AppendResult(stored=True, seq=None, dropped=0) for _ in rows], stored

    def _insert_bounded(
        self, conn: sqlite3.Connection, rows: list[tuple[bytes, int, str, int, bytes]], stored: int, limit: int
    ) -> tuple[list[AppendResult], int]:
        """Row by row, applying the policy where the bound is reached; every drop is counted."""
        results: list[AppendResult] = []
        for row in rows:
            size = row[3]
            dropped = 0
            if size > limit or (self.policy == "drop_newest" and stored + size > limit):
                self._add_int(conn, "dropped_total", 1)
                results.append(AppendResult(stored=False, seq=None, dropped=1))
                continue
            while stored + size > limit:
                victims = conn.execute("SELECT seq, size FROM records ORDER BY seq LIMIT 64").fetchall()
                need = stored + size - limit
                freed = 0
                chosen = []
                for seq, vsize in victims:
                    chosen.append(seq)
                    freed += vsize
                    if freed >= need:
                        break
                conn.execute(f"DELETE FROM records WHERE seq IN ({','.join('?' * len(chosen))})", chosen)
                stored -= freed
                dropped += len(chosen)
            cursor = conn.execute(self._INSERT, row)
            if cursor.rowcount:
                stored += size
            self._add_int(conn, "dropped_total", dropped)
            results.append(AppendResult(stored=True, seq=cursor.lastrowid, dropped=dropped))
        return results, stored

    def _counted_limit(self, conn: sqlite3.Connection, stored: int) -> int:
        """The bound in counted bytes: ``max_bytes`` ÷ the measured disk bytes per counted byte."""
        if stored >= self.max_bytes // (4 * self._disk_factor) and stored >= 256 * 1024:
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            used = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
            self._disk_factor = max(1.0, used * page_size / stored)
        return int(self.max_bytes / self._disk_factor)

    def pending(self, limit: int) -> list[PendingRow]:
        """The oldest pending rows, at most ``limit``, all of one codec (a batch carries one codec)."""
        with self._lock:
            rows = self._conn.execute(
                "SELECT seq, id, codec, body, created_us FROM records ORDER BY seq LIMIT ?", (limit,)
            ).fetchall()
        if not rows:
            return []
        codec = rows[0][2]
        out: list[PendingRow] = []
        for seq, rid, row_codec, body, created in rows:
            if row_codec != codec:
                break
            out.append(PendingRow(seq=seq, id=bytes(rid), codec=row_codec, body=bytes(body), created_us=created))
        return out

    def ack(self, seqs: Iterable[int]) -> int:
        """Delete rows the aggregator acknowledged."""
        seqs = list(seqs)
        if not seqs:
            return 0
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                removed = 0
                freed = 0
                for start in range(0, len(seqs), 500):
                    chunk = seqs[start : start + 500]
                    marks = ",".join("?" * len(chunk))
                    freed += conn.execute(
                        f"SELECT COALESCE(SUM(size), 0) FROM records WHERE seq IN ({marks})", chunk
                    ).fetchone()[0]
                    removed += conn.execute(f"DELETE FROM records WHERE seq IN ({marks})", chunk).rowcount
                self._set_int(conn, "stored_bytes", max(0, self._get_int(conn, "stored_bytes") - freed))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return removed

    def quarantine(self, seq: int, reason: str) -> bool:
        """Move one row out of the queue, keep it for inspection and count it."""
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                row = conn.execute("SELECT id, created_us, size, body FROM records WHERE seq = ?", (seq,)).fetchone()
                if row is None:
                    conn.execute("COMMIT")
                    return False
                conn.execute(
                    "INSERT OR REPLACE INTO quarantine(seq, id, created_us, quarantined_us, reason, body) "
                    "VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, row[0], row[1], self._now_us(), reason, row[3]),
                )
                conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
                conn.execute(
                    "DELETE FROM quarantine WHERE seq NOT IN (SELECT seq FROM quarantine ORDER BY seq DESC LIMIT ?)",
                    (QUARANTINE_KEEP,),
                )
                self._set_int(conn, "stored_bytes", max(0, self._get_int(conn, "stored_bytes") - row[2]))
                self._add_int(conn, "quarantined_total", 1)
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        log.warning("outbox: record seq %d quarantined: %s", seq, reason)
        return True

    # -- state for status and sync ----------------------------------------------------------------------------
    def stats(self) -> OutboxStats:
        with self._lock:
            conn = self._conn
            records, oldest = conn.execute("SELECT COUNT(*), MIN(created_us) FROM records").fetchone()
            return OutboxStats(
                records=records,
                bytes=self._get_int(conn, "stored_bytes"),
                max_bytes=self.max_bytes,
                oldest_created_us=oldest,
                dropped_total=self._get_int(conn, "dropped_total"),
                quarantined_total=self._get_int(conn, "quarantined_total"),
                salvaged_total=self._get_int(conn, "salvaged_total"),
                unreadable_pages_total=self._get_int(conn, "unreadable_pages_total"),
            )

    def get_state(self, key: str) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = ?", (f"state.{key}",)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, values: Mapping[str, str | int | float | None]) -> None:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            for key, value in values.items():
                if value is None:
                    conn.execute("DELETE FROM meta WHERE key = ?", (f"state.{key}",))
                else:
                    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"state.{key}", str(value)))
            conn.execute("COMMIT")

    def last_salvage(self) -> str | None:
        with self._lock:
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'last_salvage'").fetchone()
        return None if row is None else str(row[0])

    def file_bytes(self) -> int:
        """Bytes the database takes on disk now (main file and WAL)."""
        total = 0
        for suffix in ("", "-wal"):
            path = Path(str(self.path) + suffix)
            if path.exists():
                total += path.stat().st_size
        return total

    def checkpoint(self) -> None:
        with self._lock:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def housekeeping(self) -> bool:
        """Checkpoint the WAL; VACUUM when over a quarter of the file (and 1 MiB) is free pages. True if vacuumed."""
        with self._lock:
            conn = self._conn
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            if free * 4 > pages and free * size > 1024**2:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                return True
            return False

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class AsyncOutbox:
    """The outbox on one worker thread: the single SQLite writer, off the event loop."""

    def __init__(self, outbox: Outbox) -> None:
        self.outbox = outbox
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="outbox")

    async def _run(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def append(self, record: Mapping[str, Any]) -> AppendResult:
        return await self._run(self.outbox.append, record)

    async def pending(self, limit: int) -> list[PendingRow]:
        return await self._run(self.outbox.pending, limit)

    async def ack(self, seqs: list[int]) -> int:
        return await self._run(self.outbox.ack, seqs)

    async def quarantine(self, seq: int, reason: str) -> bool:
        return await self._run(self.outbox.quarantine, seq, reason)

    async def stats(self) -> OutboxStats:
        return await self._run(self.outbox.stats)

    async def set_state(self, values: Mapping[str, str | int | float | None]) -> None:
        await self._run(self.outbox.set_state, values)

    async def close(self) -> None:
        await self._run(self.outbox.close)
        self._executor.shutdown(wait=True)


def outbox_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / "outbox.db"


def open_outbox(config: Any) -> Outbox:
    """The outbox in the configured data directory, with the configured bound, policy and codec."""
    sync, box = config.values["sync"], config.values["outbox"]
    path = outbox_path(config.get("agent", "data_dir"))
    try:
        return Outbox(
            path,
            max_bytes=sync["max_outbox_bytes"],
            policy=box["policy"],
            synchronous=box["synchronous"],
            codec=sync["codec"],
            include_text=sync["include_text"],
        )
    except OSError as exc:
        from .errors import UsageError

        raise UsageError(f"outbox {path}: cannot be opened ({exc.strerror}); check agent.data_dir") from None
