"""The SQLite outbox: every measurement is stored here, durably, until the aggregator acknowledges it.

* One row per record: its wire bytes (CBOR or msgpack, :mod:`lens_core.wire`) as they will be uploaded, so a batch
  is built without re-encoding. Rows are deleted only after the aggregator acknowledged them; what is present is
  pending, oldest first — the read position survives any restart because it *is* the table.
* Bounded in bytes (``max_bytes``) on disk: each row counts its blob plus a fixed overhead, scaled by the
  measured ratio of the database's used pages to that count (page slack, index, b-tree), so the file itself
  stays within the bound. When an append would pass it, the policy drops the oldest pending records (default)
  or the new one; every drop is counted in
  ``dropped_total``, which the uploader sends as a cumulative total (a retried batch cannot double-count it).
* WAL journal; ``synchronous=FULL`` by default, so an append has reached the disk before it is reported stored.
* **A full disk.** SQLite reports SQLITE_FULL (and rolls the transaction back itself). Deleting rows needs room
  too — in WAL mode every changed page is first written to the WAL — so a full outbox could never drain. The
  outbox therefore keeps a *reserve*: a file ``outbox.db.reserve`` (``reserve_bytes``; by default 1/32 of the
  bound, between 64 KiB and 8 MiB: WAL for acknowledging thousands of rows) allocated beside the database, and
  counted within the bound.
  When SQLITE_FULL hits an acknowledgement, a quarantine or an append, the reserve is released, the WAL is
  checkpointed (it is kept to half the reserve by ``wal_autocheckpoint``, so the checkpoint itself fits), and:
  acknowledgements are retried, in smaller transactions if need be; under ``drop_oldest`` an append deletes the
  oldest pending records (counted in ``dropped_total`` and ``dropped_disk_full_total``) and stores the new ones
  into the freed pages; under ``drop_newest`` the new records are dropped and counted. What cannot be done
  raises :class:`OutboxFull`, never a bare ``sqlite3`` error. The reserve is re-created once twice its size is
  free again. ``disk_full_since_us`` / ``disk_full_message`` in ``meta`` record the episode; an append that
  succeeds with the reserve back in place clears them. While the disk is full, acknowledgements also give the
  freed pages back to the filesystem (VACUUM) when a quarter of the file is free.
* **Locks.** Another process holding a write transaction (a second ``lens-agent``, a ``sqlite3`` shell) makes
  every call wait up to ``busy_timeout`` and then raise :class:`OutboxBusy`. A lock is never mistaken for damage.
* **Quarantine.** A row that cannot be delivered is moved to the ``quarantine`` table with a stable reason code
  (:data:`QUARANTINE_CODES`) and a message, counted, never retried by itself. The table is bounded in bytes
  (``max_quarantine_bytes``); every row that leaves it is counted by code and by how it left: evicted by the
  bound, dropped by the operator, or retried (moved back into the queue) — ``lens-agent outbox``.
* **Damage.** A database file SQLite cannot read is renamed aside, a new one is created, and every row that can
  still be read from the damaged file is copied over (first through SQLite, then page by page,
  :mod:`agent.sqlite_salvage`). ``records_expected`` — the queue length, kept in ``meta`` in the same transaction
  as every change — says how many should have come back, so what did not is counted in ``lost_total`` (or said to
  be unknown when the counters themselves are unreadable). A damage notice stays in ``meta`` until the operator
  acknowledges it (``lens-agent outbox ack-damage``). A lock, a full disk, an I/O error or a permission problem
  never triggers a salvage (the file is likely fine; the error says what is wrong): damage is salvaged, so the agent
  never crash-loops on a damaged file.
* ``schema_version`` in the ``meta`` table; migrations run forward on open.

Errors::

    LensError (agent.errors)
    └── OutboxError           the outbox cannot do what was asked (names the file, says what to do)
        ├── OutboxFull        the disk holding it is full
        └── OutboxBusy        another process holds its write lock longer than busy_timeout

One :class:`Outbox` owns one connection and is used from one thread; :class:`AsyncOutbox` runs it on a single
worker thread so the event loop never blocks on SQLite.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from lens_core import wire
from lens_core.sqlite_schema import migrate_forward

from .errors import LensError, UsageError

log = logging.getLogger("agent.outbox")

SCHEMA_VERSION = 2
ROW_OVERHEAD = 96  # bytes a row costs beyond its blob: id, sequence, timestamps, b-tree cells, page slack
DEFAULT_BUSY_TIMEOUT = 10.0
DEFAULT_MAX_QUARANTINE_BYTES = 16 * 1024**2
QUARANTINE_CODES: dict[str, str] = {
    "undecodable": "the stored bytes do not decode as a wire record",
    "refused": "the aggregator refused the record (HTTP 400)",
    "too_large": "the aggregator refused the record as too large (HTTP 413)",
    "other_device": "the record names another device_id than this device's token (lens-agent outbox retry --as-device)",
    "salvaged": "read back from a damaged outbox file but does not decode",
    "unencodable": "the OTLP encoders cannot turn the record into spans (a standalone device's export)",
    "other": "quarantined for another reason, or before reason codes existed",
}
QUARANTINE_EXITS = ("evicted", "dropped", "retried")  # how a row leaves the quarantine
T = TypeVar("T")
_FULL_FREE_BYTES = 1024**2  # an I/O error with less than this free on the filesystem is a full disk
# meta keys that hold integers and survive a salvage (per-code quarantine counters are carried over too)
_COUNTERS = (
    "dropped_total",
    "dropped_disk_full_total",
    "quarantined_total",
    "salvaged_total",
    "unreadable_pages_total",
    "appended_total",
    "acked_total",
    "lost_total",
    "quarantine_lost_total",
    "loss_unknown_total",
    "resurrected_total",
    "quarantine_seq",
)
_RECOMPUTED = ("schema_version", "stored_bytes", "records_expected", "quarantine_expected", "quarantine_bytes")


class OutboxError(LensError):
    """The outbox cannot do what was asked; the message names the file and what to do."""


class OutboxFull(OutboxError):
    """The disk holding the outbox is full."""

    def __init__(self, path: Path, doing: str, detail: str = "") -> None:
        self.path = path
        self.doing = doing
        self.detail = detail
        free = _free_bytes(path.parent)
        where = f"{free} bytes free on its filesystem" if free is not None else "its filesystem is unavailable"
        super().__init__(
            f"outbox {path}: {doing}: the disk is full ({where}){'; ' + detail if detail else ''}; "
            "free space there, or lower sync.max_outbox_bytes"
        )


class OutboxBusy(OutboxError):
    """Another process held the outbox's write lock for longer than the busy timeout."""

    def __init__(self, path: Path, doing: str, timeout_s: float) -> None:
        self.path = path
        self.doing = doing
        self.timeout_s = timeout_s
        super().__init__(
            f"outbox {path}: {doing}: locked by another process for longer than outbox.busy_timeout "
            f"({timeout_s:g} s) — another lens-agent (run, sync, bench --store) or a sqlite3 shell holds a write "
            "transaction; let it finish or close it and try again, or raise outbox.busy_timeout"
        )


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
class QuarantinedRow:
    seq: int  # the quarantine's own sequence number (never reused), what `lens-agent outbox` commands take
    queue_seq: int | None  # the row's sequence number in the queue when it was quarantined
    id: bytes | None
    code: str
    reason: str
    codec: str
    created_us: int | None
    quarantined_us: int | None
    size: int
    body: bytes


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
    dropped_disk_full_total: int = 0  # of dropped_total: dropped because the disk was full
    appended_total: int = 0  # records stored (counted since schema version 2)
    acked_total: int = 0  # records deleted after the aggregator acknowledged them (since schema version 2)
    lost_total: int = 0  # pending records a salvage could not recover
    quarantine_lost_total: int = 0  # quarantined records a salvage could not recover
    loss_unknown_total: int = 0  # salvages that could not count their loss (the counters were unreadable)
    resurrected_total: int = 0  # rows a salvage found beyond what was expected (already delivered: resent once)
    quarantine_records: int = 0
    quarantine_bytes: int = 0
    max_quarantine_bytes: int = 0
    quarantined_by_code: Mapping[str, int] = field(default_factory=dict)  # rows ever quarantined, by code
    quarantine_evicted: Mapping[str, int] = field(default_factory=dict)  # left: evicted by the byte bound
    quarantine_dropped: Mapping[str, int] = field(default_factory=dict)  # left: dropped by the operator
    quarantine_retried: Mapping[str, int] = field(default_factory=dict)  # left: moved back into the queue
    disk_full_since_us: int | None = None
    disk_full_message: str | None = None
    damage: str | None = None  # the unacknowledged damage notice (lens-agent outbox ack-damage)

    @property
    def fill_ratio(self) -> float:
        return self.bytes / self.max_bytes if self.max_bytes else 0.0

    @property
    def quarantine_evicted_total(self) -> int:
        return sum(self.quarantine_evicted.values())

    @property
    def quarantine_dropped_total(self) -> int:
        return sum(self.quarantine_dropped.values())

    @property
    def quarantine_retried_total(self) -> int:
        return sum(self.quarantine_retried.values())


def _now_us() -> int:
    return time.time_ns() // 1000


def _free_bytes(directory: Path) -> int | None:
    try:
        return shutil.disk_usage(directory).free
    except OSError:
        return None


def default_reserve_bytes(max_bytes: int) -> int:
    """The disk reserve for an outbox bounded at ``max_bytes``: 1/32 of it, between 64 KiB and 8 MiB (at most a
    quarter of the bound)."""
    return min(max_bytes // 4, max(64 * 1024, min(8 * 1024**2, max_bytes // 32)))


# SQLite's primary result codes: BUSY, LOCKED; IOERR; CORRUPT, NOTADB; FULL; PERM, NOMEM, READONLY, INTERRUPT, CANTOPEN
_KINDS = {5: "busy", 6: "busy", 10: "ioerr", 11: "corrupt", 26: "corrupt", 13: "full"}
_KINDS.update(dict.fromkeys((3, 7, 8, 9, 14), "environment"))


def _error_kind(exc: sqlite3.Error) -> str:
    """busy, full, ioerr, corrupt, environment (permissions, memory) or other — by SQLite's result code (3.11+) or
    its message (3.10)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if isinstance(code, int):
        return _KINDS.get(code & 0xFF, "other")
    text = str(exc).lower()
    for kind, needles in (
        ("busy", ("database is locked", "table is locked", "schema is locked")),
        ("full", ("database or disk is full",)),
        ("ioerr", ("disk i/o error",)),
        ("corrupt", ("malformed", "file is not a database")),
        ("environment", ("unable to open", "readonly database", "permission denied", "out of memory", "interrupted")),
    ):
        if any(needle in text for needle in needles):
            return kind
    return "other"


def _codec_of(body: bytes) -> str:
    """CBOR or msgpack, from a record's first byte (a CBOR map is 0xa0–0xbf, a msgpack map 0x80–0x8f/0xde/0xdf)."""
    return "msgpack" if body[:1] and (0x80 <= body[0] <= 0x8F or body[0] in (0xDE, 0xDF)) else "cbor"


def _migrate_v1(conn: sqlite3.Connection) -> None:
    # plain SQL (the same tables sqlite-utils created in earlier releases): the device does not load sqlite-utils
    conn.execute(
        """CREATE TABLE IF NOT EXISTS "records" (
   "seq" INTEGER PRIMARY KEY,
   "id" BLOB NOT NULL,
   "created_us" INTEGER NOT NULL,
   "codec" TEXT NOT NULL,
   "size" INTEGER NOT NULL,
   "body" BLOB NOT NULL
)"""
    )
    conn.execute('CREATE UNIQUE INDEX IF NOT EXISTS "idx_records_id"\n    ON "records" ("id")')
    conn.execute(
        """CREATE TABLE IF NOT EXISTS "quarantine" (
   "seq" INTEGER PRIMARY KEY,
   "id" BLOB,
   "created_us" INTEGER,
   "quarantined_us" INTEGER,
   "reason" TEXT,
   "body" BLOB
)"""
    )


def _migrate_v2(conn: sqlite3.Connection) -> None:
    """Quarantine reason codes, codecs and sizes; the counters that make every row accountable.

    Rows quarantined before get a code from their message. Version 1 kept only the newest 1000 quarantined rows
    and deleted the rest silently: those are counted as evicted (code ``other``), so the books balance from here.
    """
    columns = {row[1] for row in conn.execute('PRAGMA table_info("quarantine")')}
    for name, declaration in (
        ("code", "TEXT NOT NULL DEFAULT 'other'"),
        ("codec", "TEXT"),
        ("size", "INTEGER NOT NULL DEFAULT 0"),
        ("queue_seq", "INTEGER"),
    ):
        if name not in columns:
            conn.execute(f"ALTER TABLE quarantine ADD COLUMN {name} {declaration}")
    conn.execute(
        f"""UPDATE quarantine SET
            queue_seq = seq,
            size = COALESCE(length(body), 0) + COALESCE(length(CAST(reason AS BLOB)), 0) + {ROW_OVERHEAD},
            code = CASE
                WHEN reason LIKE 'undecodable%' THEN 'undecodable'
                WHEN reason LIKE 'refused as too large%' THEN 'too_large'
                WHEN reason LIKE 'refused%' THEN 'refused'
                ELSE 'other' END,
            codec = CASE
                WHEN substr(hex(body), 1, 1) = '8' OR substr(hex(body), 1, 2) IN ('DE', 'DF') THEN 'msgpack'
                ELSE 'cbor' END"""
    )

    def get(key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return int(row[0]) if row else 0

    def put(key: str, value: int) -> None:
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, str(value)))

    kept, kept_bytes, last_seq = conn.execute(
        "SELECT COUNT(*), COALESCE(SUM(size), 0), COALESCE(MAX(seq), 0) FROM quarantine"
    ).fetchone()
    for code, count in conn.execute("SELECT code, COUNT(*) FROM quarantine GROUP BY code").fetchall():
        put(f"quarantined.{code}", get(f"quarantined.{code}") + count)
    evicted_before = max(0, get("quarantined_total") - kept)
    if evicted_before:
        put("quarantined.other", get("quarantined.other") + evicted_before)
        put("quarantine_evicted.other", get("quarantine_evicted.other") + evicted_before)
    put("quarantined_total", max(get("quarantined_total"), kept))
    put("quarantine_expected", kept)
    put("quarantine_bytes", kept_bytes)
    put("quarantine_seq", max(get("quarantine_seq"), last_seq))
    put("records_expected", conn.execute("SELECT COUNT(*) FROM records").fetchone()[0])


MIGRATIONS: dict[int, Callable[[sqlite3.Connection], None]] = {1: _migrate_v1, 2: _migrate_v2}


class _Damaged(Exception):
    """The file opened but SQLite's own check found it damaged."""


@dataclass
class _Recovered:
    """What could be read from a damaged outbox file."""

    records: dict[int, tuple[Any, ...]] = field(default_factory=dict)  # seq → (seq, id, created_us, body, codec)
    quarantine: dict[int, QuarantinedRow] = field(default_factory=dict)
    meta: dict[str, str] = field(default_factory=dict)
    unreadable_pages: int = 0
    how: str = ""  # how the page scan went, for the notice


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
        busy_timeout: float = DEFAULT_BUSY_TIMEOUT,
        max_quarantine_bytes: int = DEFAULT_MAX_QUARANTINE_BYTES,
        reserve_bytes: int | None = None,
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
        self.busy_timeout = busy_timeout
        self.max_quarantine_bytes = max_quarantine_bytes
        self.reserve_bytes = default_reserve_bytes(max_bytes) if reserve_bytes is None else reserve_bytes
        self.reserve_path = self.path.with_name(self.path.name + ".reserve")
        self._now_us = now_us
        self._lock = threading.Lock()
        self._disk_factor = 1.4  # disk bytes per counted byte; measured once the outbox holds enough to tell
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._conn = self._open_or_salvage()
        self._ensure_reserve()

    # -- errors --------------------------------------------------------------------------------------------------
    def _translate(self, exc: sqlite3.Error, doing: str) -> OutboxError:
        kind = _error_kind(exc)
        if kind == "busy":
            return OutboxBusy(self.path, doing, self.busy_timeout)
        if kind == "full" or (kind == "ioerr" and (_free_bytes(self.path.parent) or 0) < _FULL_FREE_BYTES):
            return OutboxFull(self.path, doing, f"SQLite: {exc}")
        if kind == "corrupt":
            return OutboxError(
                f"outbox {self.path}: {doing}: the file is damaged ({exc}); restart lens-agent, which salvages it"
            )
        return OutboxError(f"outbox {self.path}: {doing}: {exc}")

    @contextlib.contextmanager
    def _reading(self, doing: str) -> Iterator[sqlite3.Connection]:
        with self._lock:
            try:
                yield self._conn
            except sqlite3.Error as exc:
                raise self._translate(exc, doing) from None

    def _transaction(self, body: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """``body`` in one write transaction; sqlite3 errors become :class:`OutboxError` (the caller holds the lock)."""
        conn = self._conn
        try:
            conn.execute("BEGIN IMMEDIATE")
            result = body(conn)
            conn.execute("COMMIT")
            return result
        except BaseException as exc:
            if conn.in_transaction:  # SQLite rolls back by itself on a full disk: a second ROLLBACK would fail
                try:
                    conn.execute("ROLLBACK")
                except sqlite3.Error as rollback:
                    log.error("outbox %s: rollback failed: %s", self.path, rollback)
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc, doing) from None
            raise

    def _write(self, body: Callable[[sqlite3.Connection], T], doing: str) -> T:
        """One write transaction; on a full disk the reserve is released and it is tried once more."""
        try:
            return self._transaction(body, doing)
        except OutboxFull as exc:
            full = exc
            self._make_room(full)

            def marked(conn: sqlite3.Connection) -> T:
                self._mark_disk_full(conn, full)
                return body(conn)

            return self._transaction(marked, doing)

    # -- the disk reserve ----------------------------------------------------------------------------------------
    def _ensure_reserve(self) -> bool:
        """The reserve is in place (or switched off); it is re-created only when twice its size is free."""
        if not self.reserve_bytes:
            return True
        try:
            if self.reserve_path.stat().st_size >= self.reserve_bytes:
                return True
        except OSError:
            pass
        free = _free_bytes(self.path.parent)
        if free is None or free < 2 * self.reserve_bytes:
            return False
        temporary = self.reserve_path.with_name(f"{self.reserve_path.name}.{os.getpid()}.tmp")
        try:
            with temporary.open("wb") as handle:
                try:
                    os.posix_fallocate(handle.fileno(), 0, self.reserve_bytes)
                except (AttributeError, OSError):  # no fallocate here: write the bytes
                    chunk = bytes(64 * 1024)
                    for _ in range(0, self.reserve_bytes, len(chunk)):
                        handle.write(chunk)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(temporary, self.reserve_path)
        except OSError as exc:
            log.warning("outbox %s: cannot create the disk reserve %s: %s", self.path, self.reserve_path, exc)
            with contextlib.suppress(OSError):
                temporary.unlink()
            return False
        return True

    def _release_reserve(self) -> bool:
        try:
            self.reserve_path.unlink()
        except FileNotFoundError:
            return False
        except OSError as exc:
            log.error("outbox %s: cannot release the disk reserve: %s", self.path, exc)
            return False
        log.warning("outbox %s: disk full: released the %d-byte reserve", self.path, self.reserve_bytes)
        return True

    def _checkpoint_quietly(self) -> None:
        """A passive checkpoint, so the next transaction writes the WAL from its start again."""
        try:
            self._conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("outbox %s: checkpoint failed: %s", self.path, exc)

    def _make_room(self, full: OutboxFull) -> None:
        log.error("%s", full)
        self._release_reserve()
        self._checkpoint_quietly()

    def _mark_disk_full(self, conn: sqlite3.Connection, full: OutboxFull) -> None:
        if conn.execute("SELECT 1 FROM meta WHERE key = 'disk_full_since_us'").fetchone() is None:
            self._set_int(conn, "disk_full_since_us", self._now_us())
        message = f"{full.doing}: {full.detail}" if full.detail else full.doing
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('disk_full_message', ?)", (message,))

    def _give_space_back(self) -> None:
        """While the disk is full: return the pages acknowledgements freed to the filesystem, then the reserve."""
        conn = self._conn
        try:
            if conn.execute("SELECT 1 FROM meta WHERE key = 'disk_full_since_us'").fetchone() is None:
                return
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            if free * 4 > pages:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchall()
        except sqlite3.Error as exc:
            log.warning("outbox %s: cannot give freed pages back to the full disk yet: %s", self.path, exc)
        self._ensure_reserve()

    # -- opening, migrating, salvaging -------------------------------------------------------------------------
    def _connect(self, path: Path) -> sqlite3.Connection:
        conn = sqlite3.connect(str(path), isolation_level=None, check_same_thread=False, timeout=self.busy_timeout)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            # The WAL is truncated back to this size after each checkpoint, so it cannot outgrow the bound for long.
            conn.execute(f"PRAGMA journal_size_limit={max(64 * 1024, min(self.max_bytes // 16, 4 * 1024**2))}")
            if self.reserve_bytes:  # a checkpoint after the reserve was released must fit in it
                page_size = conn.execute("PRAGMA page_size").fetchone()[0]
                conn.execute(f"PRAGMA wal_autocheckpoint={max(16, self.reserve_bytes // 2 // page_size)}")
        except BaseException:
            conn.close()
            raise
        return conn

    def _prepare(self, conn: sqlite3.Connection) -> None:
        migrate_forward(
            conn,
            MIGRATIONS,
            lambda version: OutboxError(
                f"{self.path}: outbox schema version {version} is newer than this agent's ({SCHEMA_VERSION}); "
                "upgrade lens-agent"
            ),
            plain=True,
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
                raise _Damaged(f"quick_check: {check[0] if check else 'no answer'}")
            self._prepare(conn)
            return conn
        except (sqlite3.Error, _Damaged) as exc:
            if conn is not None:
                conn.close()
            # a lock, a full disk, an I/O error, a permission: the file may be fine, the moment is not
            if isinstance(exc, sqlite3.Error) and _error_kind(exc) in ("busy", "full", "ioerr", "environment"):
                raise self._translate(exc, "opening") from None
            log.error("outbox %s is damaged (%s): salvaging what can be read", self.path, exc)
            return self._salvage(str(exc))
        except BaseException:
            if conn is not None:
                conn.close()
            raise

    def _salvage(self, reason: str) -> sqlite3.Connection:
        try:
            return self._salvage_once(reason)
        except OutboxFull:
            if not self._release_reserve():
                raise
            return self._salvage_once(reason)

    def _salvage_once(self, reason: str) -> sqlite3.Connection:
        stamp = time.strftime("%Y%m%dT%H%M%S")
        damaged = self.path.with_name(f"{self.path.name}.damaged-{stamp}")
        for n in range(2, 1000):  # never rename over an earlier damaged file
            if not damaged.exists():
                break
            damaged = self.path.with_name(f"{self.path.name}.damaged-{stamp}-{n}")
        moved = []
        for suffix in ("", "-wal", "-shm"):
            source = Path(str(self.path) + suffix)
            if source.exists():
                source.rename(Path(str(damaged) + suffix))
                moved.append(suffix)
        conn: sqlite3.Connection | None = None
        try:
            found = self._read_damaged(damaged)
            conn = self._connect(self.path)
            self._prepare(conn)
            self._conn = conn
            with self._lock:
                note = self._transaction(
                    lambda c: self._store_salvaged(c, found, reason, stamp, damaged), "storing salvaged records"
                )
        except BaseException as exc:
            # Put the damaged file back, so the next start tries again: a failed salvage loses nothing.
            if conn is not None:
                conn.close()
            for suffix in ("", "-wal", "-shm"):
                with contextlib.suppress(OSError):
                    Path(str(self.path) + suffix).unlink()
            for suffix in moved:
                Path(str(damaged) + suffix).rename(Path(str(self.path) + suffix))
            if isinstance(exc, sqlite3.Error):
                raise self._translate(exc, "salvaging the damaged file") from None
            raise
        log.error("outbox salvage: %s", note)
        return conn

    @staticmethod
    def _read_damaged(damaged: Path) -> _Recovered:
        """Every row that can still be read: SQLite is asked first, chunk by chunk; whatever it cannot reach is
        read page by page from the file (:mod:`agent.sqlite_salvage`)."""
        found = _Recovered()
        with contextlib.suppress(sqlite3.Error):
            old = sqlite3.connect(f"file:{damaged}?mode=ro", uri=True)
            try:
                with contextlib.suppress(sqlite3.Error):
                    for key, value in old.execute("SELECT key, value FROM meta"):
                        found.meta[str(key)] = str(value)
                with contextlib.suppress(sqlite3.Error):
                    for row in old.execute("SELECT seq, id, created_us, body, codec FROM records"):
                        found.records[row[0]] = row
                with contextlib.suppress(sqlite3.Error):
                    for q in old.execute(
                        "SELECT seq, queue_seq, id, code, reason, codec, created_us, quarantined_us, body "
                        "FROM quarantine"
                    ):
                        found.quarantine[q[0]] = _quarantined_row(q[0], q[1], q[2], q[3], q[4], q[5], q[6], q[7], q[8])
                with contextlib.suppress(sqlite3.Error):  # a version 1 file
                    if not found.quarantine:
                        for q in old.execute(
                            "SELECT seq, id, reason, created_us, quarantined_us, body FROM quarantine"
                        ):
                            found.quarantine[q[0]] = _quarantined_row(q[0], q[0], q[1], None, q[2], None, *q[3:])
            finally:
                old.close()
        from .sqlite_salvage import scan_database  # only for a damaged file

        try:
            scan = scan_database(damaged)
        except (OSError, ValueError) as exc:
            found.how = f"the file could not be read page by page ({exc})"
            return found
        found.unreadable_pages = scan.pages_unreadable
        if not scan.header_ok:
            source = {"wal": "read from the WAL header", "detected": "found by parsing the pages"}
            found.how = f"its header was unreadable (page size {scan.page_size} {source.get(scan.page_size_from, '')})"
        meta_from_scan: dict[str, str] = {}
        for rowid, values in scan.rows:
            shape = len(values)
            if (  # records: (seq NULL-aliased, id blob16, created int, codec text, size int, body blob)
                shape == 6
                and isinstance(values[1], bytes)
                and len(values[1]) == 16
                and isinstance(values[2], int)
                and values[3] in wire.CODECS
                and isinstance(values[5], bytes)
            ):
                found.records.setdefault(rowid, (rowid, values[1], values[2], values[5], values[3]))
            elif (  # quarantine: (seq, id, created, quarantined, reason, body[, code, codec, size, queue_seq])
                shape in (6, 10)
                and (values[1] is None or isinstance(values[1], bytes))
                and isinstance(values[3], int)
                and isinstance(values[4], str)
                and isinstance(values[5], bytes)
            ):
                code, codec, queue_seq = (values[6], values[7], values[9]) if shape == 10 else (None, None, rowid)
                found.quarantine.setdefault(
                    rowid,
                    _quarantined_row(
                        rowid, queue_seq, values[1], code, values[4], codec, values[2], values[3], values[5]
                    ),
                )
            elif shape == 2 and isinstance(values[0], str) and isinstance(values[1], str):
                meta_from_scan.setdefault(values[0], values[1])
        for key, value in meta_from_scan.items():
            found.meta.setdefault(key, value)
        return found

    def _store_salvaged(
        self, conn: sqlite3.Connection, found: _Recovered, reason: str, stamp: str, damaged: Path
    ) -> str:
        """Copy what was recovered into the new file and count what was not; returns the damage notice."""
        queued = quarantined_now = duplicates = 0
        total = 0
        for seq, rid, created, body, codec in (found.records[k] for k in sorted(found.records)):
            body = bytes(body)
            problem = _undecodable(body, codec)
            if problem is None:
                size = len(body) + ROW_OVERHEAD
                cursor = conn.execute(
                    "INSERT OR IGNORE INTO records(seq, id, created_us, codec, size, body) VALUES (?, ?, ?, ?, ?, ?)",
                    (seq, bytes(rid), created, codec, size, body),
                )
                if cursor.rowcount:
                    queued += 1
                    total += size
                else:
                    duplicates += 1
            else:
                found.quarantine[-seq] = _quarantined_row(
                    -seq, seq, bytes(rid), "salvaged", f"read back from a damaged outbox file: {problem}", codec,
                    created, self._now_us(), body,
                )  # fmt: skip
                quarantined_now += 1
        for key, value in found.meta.items():
            if key not in _RECOMPUTED and not key.startswith("damage"):
                conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (key, value))
        carried_q = 0
        q_bytes = 0
        next_q = max([_int_or_none(found.meta.get("quarantine_seq")) or 0, *found.quarantine])
        for qkey in sorted(found.quarantine, key=lambda k: (k < 0, abs(k))):
            row = found.quarantine[qkey]
            seq = row.seq if row.seq > 0 else (next_q := next_q + 1)
            conn.execute(
                "INSERT OR IGNORE INTO quarantine(seq, queue_seq, id, created_us, quarantined_us, code, reason, codec, "
                "size, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (seq, row.queue_seq, row.id, row.created_us, row.quarantined_us, row.code, row.reason, row.codec,
                 row.size, row.body),
            )  # fmt: skip
            q_bytes += row.size
            carried_q += row.seq > 0
        self._set_int(conn, "quarantine_seq", next_q)
        self._set_int(conn, "stored_bytes", total)
        self._set_int(conn, "records_expected", queued)
        self._set_int(conn, "quarantine_expected", carried_q + quarantined_now)
        self._set_int(conn, "quarantine_bytes", q_bytes)
        self._add_int(conn, "quarantined_total", quarantined_now)
        self._add_int(conn, "quarantined.salvaged", quarantined_now)
        self._add_int(conn, "salvaged_total", queued)
        self._add_int(conn, "unreadable_pages_total", found.unreadable_pages)

        recovered = queued + quarantined_now
        expected = _int_or_none(found.meta.get("records_expected"))
        q_expected = _int_or_none(found.meta.get("quarantine_expected"))
        parts = [f"{stamp}: {self.path.name} was damaged ({reason}) and salvaged"]
        if expected is None:
            self._add_int(conn, "loss_unknown_total", 1)
            parts.append(
                f"{recovered} records recovered; how many were lost is unknown (the outbox's counters were unreadable)"
            )
        else:
            lost = max(0, expected - recovered)
            extra = max(0, recovered - expected)
            self._add_int(conn, "lost_total", lost)
            self._add_int(conn, "resurrected_total", extra)
            parts.append(f"{recovered} of {expected} records recovered, {lost} lost")
            if extra:
                parts.append(
                    f"{extra} more than expected (already delivered ones come back; the aggregator ignores them)"
                )
        if quarantined_now:
            parts.append(f"{quarantined_now} of them do not decode and were quarantined (code salvaged)")
        if duplicates:
            parts.append(f"{duplicates} duplicate rows skipped")
        if q_expected is not None and q_expected > carried_q:
            self._add_int(conn, "quarantine_lost_total", q_expected - carried_q)
            parts.append(f"{q_expected - carried_q} of {q_expected} quarantined records lost")
        if found.how:
            parts.append(found.how)
        parts.append(f"{found.unreadable_pages} pages unreadable; damaged file kept as {damaged.name}")
        note = "; ".join(parts)
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('last_salvage', ?)", (note,))
        conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('damage_notice', ?)", (note,))
        return note

    # -- counters in meta -----------------------------------------------------------------------------------
    @staticmethod
    def _get_int(conn: sqlite3.Connection, key: str) -> int:
        row = conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return (_int_or_none(str(row[0])) or 0) if row else 0

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
        """Store records already encoded in this outbox's codec: ``[(16-byte id, wire bytes)]``, one transaction.

        On a full disk the policy makes room (see the module's docstring); raises :class:`OutboxFull` when it
        cannot, :class:`OutboxBusy` when another process holds the lock.
        """
        if not encoded:
            return []
        with self._lock:
            room = self._ensure_reserve()
            try:
                results = self._transaction(lambda conn: self._append_rows(conn, encoded, room=room), "storing")
            except OutboxFull as exc:
                full = exc
                self._make_room(full)
                try:
                    results = self._transaction(
                        lambda conn: self._append_rows(conn, encoded, room=False, full=full), "storing"
                    )
                except OutboxFull:
                    self._checkpoint_quietly()
                    if self.policy == "drop_newest":
                        return self._drop_new_on_full_disk(encoded, full)
                    return self._append_dropping_oldest(encoded, full)
            if not room:  # the disk is (nearly) full: keep the WAL short, so a checkpoint never needs new space
                self._checkpoint_quietly()
            return results

    def _append_rows(
        self,
        conn: sqlite3.Connection,
        encoded: list[tuple[bytes, bytes]],
        *,
        room: bool,
        full: OutboxFull | None = None,
    ) -> list[AppendResult]:
        """Insert under the policy. While the disk is full (and the reserve not back) the file must not grow: the
        bound becomes what is stored plus the free pages inside the file, and drops made for it are counted as
        dropped because the disk was full. With the reserve back, the disk-full state is cleared."""
        if full is not None:
            self._mark_disk_full(conn, full)
        disk_full = conn.execute("SELECT 1 FROM meta WHERE key = 'disk_full_since_us'").fetchone() is not None
        stored = self._get_int(conn, "stored_bytes")
        limit = self._counted_limit(conn, stored)
        disk_bound = disk_full and not room
        if disk_bound:
            limit = min(limit, stored + self._room_in_file(conn, stored))
        elif disk_full:
            conn.execute("DELETE FROM meta WHERE key IN ('disk_full_since_us', 'disk_full_message')")
            log.warning("outbox %s: the disk has room again", self.path)
        now = self._now_us()
        rows = [(rid, now, self.codec, len(body) + ROW_OVERHEAD, body) for rid, body in encoded]
        incoming = sum(row[3] for row in rows)
        if stored + incoming <= limit:
            results, stored, inserted, dropped_old, dropped_new = self._insert_all(conn, rows, stored, incoming)
        else:
            results, stored, inserted, dropped_old, dropped_new = self._insert_bounded(conn, rows, stored, limit)
        self._set_int(conn, "stored_bytes", stored)
        self._add_int(conn, "appended_total", inserted)
        self._add_int(conn, "records_expected", inserted - dropped_old)
        self._add_int(conn, "dropped_total", dropped_old + dropped_new)
        if disk_bound:
            self._add_int(conn, "dropped_disk_full_total", dropped_old + dropped_new)
        return results

    def _room_in_file(self, conn: sqlite3.Connection, stored: int) -> int:
        """Counted bytes the free pages inside the file can take (less a margin for index and b-tree pages)."""
        page_size = int(conn.execute("PRAGMA page_size").fetchone()[0])
        free = int(conn.execute("PRAGMA freelist_count").fetchone()[0])
        self._measure_disk_factor(conn, stored)
        return max(0, int((free - 8) * page_size / self._disk_factor))

    _INSERT = "INSERT OR IGNORE INTO records(id, created_us, codec, size, body) VALUES (?, ?, ?, ?, ?)"

    def _insert_all(
        self, conn: sqlite3.Connection, rows: list[tuple[bytes, int, str, int, bytes]], stored: int, incoming: int
    ) -> tuple[list[AppendResult], int, int, int, int]:
        """Everything fits: one executemany."""
        before = conn.total_changes
        conn.executemany(self._INSERT, rows)
        inserted = conn.total_changes - before
        if inserted == len(rows):
            stored += incoming
        else:  # some ids were already stored (a record appended twice): recount rather than guess
            stored = int(conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0])
        return [AppendResult(stored=True, seq=None, dropped=0) for _ in rows], stored, inserted, 0, 0

    def _insert_bounded(
        self, conn: sqlite3.Connection, rows: list[tuple[bytes, int, str, int, bytes]], stored: int, limit: int
    ) -> tuple[list[AppendResult], int, int, int, int]:
        """Row by row, applying the policy where the bound is reached; every drop is counted."""
        results: list[AppendResult] = []
        inserted = dropped_old = dropped_new = 0
        for row in rows:
            size = row[3]
            dropped = 0
            if size > limit or (self.policy == "drop_newest" and stored + size > limit):
                dropped_new += 1
                results.append(AppendResult(stored=False, seq=None, dropped=1))
                continue
            while stored + size > limit:
                count, freed = self._delete_oldest(conn, stored + size - limit)
                stored -= freed
                dropped += count
            cursor = conn.execute(self._INSERT, row)
            if cursor.rowcount:
                stored += size
                inserted += 1
            dropped_old += dropped
            results.append(AppendResult(stored=True, seq=cursor.lastrowid, dropped=dropped))
        return results, stored, inserted, dropped_old, dropped_new

    @staticmethod
    def _delete_oldest(conn: sqlite3.Connection, need: int) -> tuple[int, int]:
        """Delete the oldest pending rows until ``need`` counted bytes are freed (or none are left)."""
        victims = conn.execute("SELECT seq, size FROM records ORDER BY seq LIMIT 64").fetchall()
        freed = 0
        chosen = []
        for seq, vsize in victims:
            chosen.append(seq)
            freed += vsize
            if freed >= need:
                break
        if chosen:
            conn.execute(f"DELETE FROM records WHERE seq IN ({','.join('?' * len(chosen))})", chosen)
        return len(chosen), freed

    def _drop_new_on_full_disk(self, encoded: list[tuple[bytes, bytes]], full: OutboxFull) -> list[AppendResult]:
        count = len(encoded)

        def count_drop(conn: sqlite3.Connection) -> None:
            self._mark_disk_full(conn, full)
            self._add_int(conn, "dropped_total", count)
            self._add_int(conn, "dropped_disk_full_total", count)

        try:
            self._transaction(count_drop, "counting records dropped on a full disk")
        except OutboxFull:
            raise OutboxFull(self.path, "storing", f"{count} records not stored, and not counted as dropped") from None
        log.error("outbox %s: disk full: %d new records dropped (policy drop_newest)", self.path, count)
        return [AppendResult(stored=False, seq=None, dropped=1) for _ in encoded]

    def _append_dropping_oldest(self, encoded: list[tuple[bytes, bytes]], full: OutboxFull) -> list[AppendResult]:
        """Drop the oldest pending records until the new ones fit in the pages they free; every drop is counted."""
        need = max(64 * 1024, 2 * sum(len(body) + ROW_OVERHEAD for _, body in encoded))
        dropped = 0

        def drop(conn: sqlite3.Connection) -> int:
            self._mark_disk_full(conn, full)
            count = freed = 0
            while freed < need:
                more, more_bytes = self._delete_oldest(conn, need - freed)
                if not more:
                    break
                count += more
                freed += more_bytes
            self._set_int(conn, "stored_bytes", max(0, self._get_int(conn, "stored_bytes") - freed))
            self._add_int(conn, "records_expected", -count)
            self._add_int(conn, "dropped_total", count)
            self._add_int(conn, "dropped_disk_full_total", count)
            return count

        while True:
            try:
                count = self._transaction(drop, "dropping the oldest records to make room on a full disk")
            except OutboxFull:
                raise OutboxFull(
                    self.path, "storing", f"{len(encoded)} records not stored; no room even to drop older ones"
                ) from None
            dropped += count
            self._checkpoint_quietly()
            try:
                results = self._transaction(
                    lambda conn: self._append_rows(conn, encoded, room=False, full=full), "storing after dropping"
                )
            except OutboxFull:
                if count:
                    need *= 2
                    continue
                raise OutboxFull(
                    self.path,
                    "storing",
                    f"{len(encoded)} records not stored; no pending records left to drop"
                    + (f" ({dropped} dropped trying)" if dropped else ""),
                ) from None
            log.error(
                "outbox %s: disk full: dropped the %d oldest records to store %d", self.path, dropped, len(encoded)
            )
            first = results[0]
            return [AppendResult(first.stored, first.seq, first.dropped + dropped), *results[1:]]

    def _counted_limit(self, conn: sqlite3.Connection, stored: int) -> int:
        """The bound in counted bytes: ``max_bytes`` less the reserve, ÷ the measured disk bytes per counted byte."""
        if stored >= self.max_bytes // (4 * self._disk_factor):
            self._measure_disk_factor(conn, stored)
        return int(max(0, self.max_bytes - self.reserve_bytes) / self._disk_factor)

    def _measure_disk_factor(self, conn: sqlite3.Connection, stored: int) -> None:
        if stored >= 256 * 1024:  # enough rows to tell
            page_size = conn.execute("PRAGMA page_size").fetchone()[0]
            used = conn.execute("PRAGMA page_count").fetchone()[0] - conn.execute("PRAGMA freelist_count").fetchone()[0]
            self._disk_factor = max(1.0, used * page_size / stored)

    def pending(self, limit: int) -> list[PendingRow]:
        """The oldest pending rows, at most ``limit``, all of one codec (a batch carries one codec)."""
        with self._reading("reading pending records") as conn:
            rows = conn.execute(
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
        """Delete rows the aggregator acknowledged; works on a full disk (the reserve, then smaller transactions)."""
        seqs = list(seqs)
        if not seqs:
            return 0
        doing = "deleting acknowledged records"
        with self._lock:
            try:
                removed = self._transaction(lambda conn: self._delete_acked(conn, seqs), doing)
            except OutboxFull as full:
                self._make_room(full)
                removed = self._ack_in_steps(seqs, full)
            self._give_space_back()
        return removed

    def _delete_acked(self, conn: sqlite3.Connection, seqs: list[int], full: OutboxFull | None = None) -> int:
        if full is not None:
            self._mark_disk_full(conn, full)
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
        self._add_int(conn, "records_expected", -removed)
        self._add_int(conn, "acked_total", removed)
        return removed

    def _ack_in_steps(self, seqs: list[int], full: OutboxFull) -> int:
        """Acknowledge in transactions small enough for the room there is, checkpointing between them."""
        removed = done = 0
        step = 256
        while done < len(seqs):
            part = seqs[done : done + step]
            try:
                removed += self._transaction(
                    functools.partial(self._delete_acked, seqs=part, full=full), "deleting acknowledged records"
                )
            except OutboxFull:
                if step == 1:
                    raise OutboxFull(
                        self.path,
                        "deleting acknowledged records",
                        f"{done} of {len(seqs)} deleted; the rest stay pending and are sent again (the aggregator "
                        "ignores duplicates)",
                    ) from None
                step = max(1, step // 4)
                continue
            done += len(part)
            self._checkpoint_quietly()
        return removed

    def quarantine(self, seq: int, reason: str, code: str = "refused") -> bool:
        """Move one row out of the queue, keep it for inspection and count it; False if there is no such row.

        ``code`` is one of :data:`QUARANTINE_CODES`; ``reason`` says what happened in words.
        """
        if code not in QUARANTINE_CODES:
            raise ValueError(f"quarantine code must be one of {', '.join(QUARANTINE_CODES)}, not {code!r}")

        def move(conn: sqlite3.Connection) -> bool:
            row = conn.execute("SELECT id, created_us, codec, size, body FROM records WHERE seq = ?", (seq,)).fetchone()
            if row is None:
                return False
            qseq = self._get_int(conn, "quarantine_seq") + 1
            size = len(row[4]) + len(reason.encode()) + ROW_OVERHEAD
            conn.execute(
                "INSERT INTO quarantine(seq, queue_seq, id, created_us, quarantined_us, code, reason, codec, size, "
                "body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (qseq, seq, row[0], row[1], self._now_us(), code, reason, row[2], size, row[4]),
            )
            conn.execute("DELETE FROM records WHERE seq = ?", (seq,))
            self._set_int(conn, "quarantine_seq", qseq)
            self._set_int(conn, "stored_bytes", max(0, self._get_int(conn, "stored_bytes") - row[3]))
            self._add_int(conn, "records_expected", -1)
            self._add_int(conn, "quarantine_expected", 1)
            self._add_int(conn, "quarantine_bytes", size)
            self._add_int(conn, "quarantined_total", 1)
            self._add_int(conn, f"quarantined.{code}", 1)
            self._evict(conn)
            return True

        with self._lock:
            moved = self._write(move, f"quarantining record seq {seq}")
        if moved:
            log.warning("outbox: record seq %d quarantined (%s): %s", seq, code, reason)
        return moved

    def _evict(self, conn: sqlite3.Connection) -> None:
        """Keep the quarantine within its byte bound: the oldest rows go first, each counted by code."""
        total = self._get_int(conn, "quarantine_bytes")
        while total > self.max_quarantine_bytes:
            victims = conn.execute("SELECT seq, code, size FROM quarantine ORDER BY seq LIMIT 64").fetchall()
            if not victims:
                total = 0
                break
            for qseq, code, size in victims:
                if total <= self.max_quarantine_bytes:
                    break
                conn.execute("DELETE FROM quarantine WHERE seq = ?", (qseq,))
                self._add_int(conn, f"quarantine_evicted.{code}", 1)
                self._add_int(conn, "quarantine_expected", -1)
                total -= size
                log.warning("outbox: quarantined record %d (%s) evicted: the quarantine is over its bound", qseq, code)
        self._set_int(conn, "quarantine_bytes", max(0, total))

    # -- the quarantine, for the operator -----------------------------------------------------------------------
    def quarantined(self, seqs: Iterable[int] | None = None, *, code: str | None = None) -> list[QuarantinedRow]:
        """Quarantined rows, oldest first: all, or those with the given ``seqs`` and/or ``code``.

        Raises :class:`~agent.errors.UsageError` for an unknown code or a seq that is not quarantined.
        """
        with self._reading("reading the quarantine") as conn:
            return self._select_quarantined(conn, seqs, code)

    def _select_quarantined(
        self, conn: sqlite3.Connection, seqs: Iterable[int] | None, code: str | None
    ) -> list[QuarantinedRow]:
        if code is not None and code not in QUARANTINE_CODES:
            raise UsageError(f"unknown quarantine code {code!r}: expected one of {', '.join(QUARANTINE_CODES)}")
        query = "SELECT seq, queue_seq, id, code, reason, codec, created_us, quarantined_us, body, size FROM quarantine"
        rows = [
            _quarantined_row(r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], size=r[9])
            for r in conn.execute(
                query + (" WHERE code = ?" if code else "") + " ORDER BY seq", (code,) if code else ()
            )
        ]
        if seqs is None:
            return rows
        wanted = list(dict.fromkeys(seqs))
        by_seq = {row.seq: row for row in rows}
        missing = [s for s in wanted if s not in by_seq]
        if missing:
            which = ", ".join(str(s) for s in missing)
            filtered = f" with code {code}" if code else ""
            raise UsageError(
                f"outbox {self.path}: no quarantined record{filtered} with seq {which} "
                "(lens-agent outbox list shows them)"
            )
        return [by_seq[s] for s in wanted]

    def retry_quarantined(
        self, seqs: Iterable[int] | None = None, *, code: str | None = None, as_device: str | None = None
    ) -> int:
        """Move quarantined rows back into the queue (counted as retried); returns how many.

        ``as_device`` rewrites the ``device_id`` inside each record (decoded, changed, re-encoded in its codec):
        the way out for records stored under an old device id, which the device's token may not upload.
        """
        if as_device is not None and not as_device.strip():
            raise UsageError("--as-device: expected a device id, not an empty string")

        def move(conn: sqlite3.Connection) -> int:
            rows = self._select_quarantined(conn, seqs, code)
            for row in rows:
                body = row.body if as_device is None else _with_device_id(row, as_device)
                rid = row.id
                if rid is None or len(rid) != 16:
                    raise UsageError(f"quarantined record seq {row.seq} has no record id: export it or drop it")
                size = len(body) + ROW_OVERHEAD
                cursor = conn.execute(self._INSERT, (rid, row.created_us or self._now_us(), row.codec, size, body))
                if cursor.rowcount:
                    self._add_int(conn, "stored_bytes", size)
                    self._add_int(conn, "records_expected", 1)
                conn.execute("DELETE FROM quarantine WHERE seq = ?", (row.seq,))
                self._add_int(conn, f"quarantine_retried.{row.code}", 1)
                self._add_int(conn, "quarantine_expected", -1)
                self._set_int(conn, "quarantine_bytes", max(0, self._get_int(conn, "quarantine_bytes") - row.size))
            return len(rows)

        with self._lock:
            return self._write(move, "moving quarantined records back to the queue")

    def drop_quarantined(self, seqs: Iterable[int] | None = None, *, code: str | None = None) -> int:
        """Delete quarantined rows for good (counted as dropped by the operator); returns how many."""

        def drop(conn: sqlite3.Connection) -> int:
            rows = self._select_quarantined(conn, seqs, code)
            for row in rows:
                conn.execute("DELETE FROM quarantine WHERE seq = ?", (row.seq,))
                self._add_int(conn, f"quarantine_dropped.{row.code}", 1)
                self._add_int(conn, "quarantine_expected", -1)
                self._set_int(conn, "quarantine_bytes", max(0, self._get_int(conn, "quarantine_bytes") - row.size))
            return len(rows)

        with self._lock:
            return self._write(drop, "dropping quarantined records")

    def export_rows(self, which: str) -> Iterator[dict[str, Any]]:
        """Every pending or quarantined row as a dict: seq, codec, (code, reason,) and the decoded measurement
        (``record``), or the ``error`` and the raw ``body_hex`` when it does not decode. Read in chunks."""
        if which not in ("pending", "quarantined"):
            raise ValueError(f"which must be pending or quarantined, not {which!r}")
        after = 0
        while True:
            with self._reading(f"reading {which} records") as conn:
                if which == "pending":
                    chunk = [
                        _quarantined_row(r[0], r[0], r[1], "", "", r[2], r[3], None, r[4])
                        for r in conn.execute(
                            "SELECT seq, id, codec, created_us, body FROM records WHERE seq > ? ORDER BY seq LIMIT 500",
                            (after,),
                        )
                    ]
                else:
                    chunk = [
                        _quarantined_row(*r)
                        for r in conn.execute(
                            "SELECT seq, queue_seq, id, code, reason, codec, created_us, quarantined_us, body "
                            "FROM quarantine WHERE seq > ? ORDER BY seq LIMIT 500",
                            (after,),
                        )
                    ]
            if not chunk:
                return
            for row in chunk:
                yield _export_row(row, which)
            after = chunk[-1].seq

    def ack_damage(self) -> str | None:
        """Acknowledge the damage notice (the operator has looked); returns it, or None when there was none."""

        def clear(conn: sqlite3.Connection) -> str | None:
            row = conn.execute("SELECT value FROM meta WHERE key = 'damage_notice'").fetchone()
            if row is None:
                return None
            conn.execute("DELETE FROM meta WHERE key = 'damage_notice'")
            self._set_int(conn, "damage_acked_us", self._now_us())
            return str(row[0])

        with self._lock:
            return self._write(clear, "acknowledging the damage notice")

    # -- state for status and sync ----------------------------------------------------------------------------
    def stats(self) -> OutboxStats:
        with self._reading("reading its counters") as conn:
            records, oldest = conn.execute("SELECT COUNT(*), MIN(created_us) FROM records").fetchone()
            q_records = conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0]
            meta = {str(k): str(v) for k, v in conn.execute("SELECT key, value FROM meta WHERE key NOT LIKE 'state.%'")}

        def num(key: str) -> int:
            return _int_or_none(meta.get(key)) or 0

        def by_code(prefix: str) -> dict[str, int]:
            return {k[len(prefix) :]: int(v) for k, v in sorted(meta.items()) if k.startswith(prefix) and v.isdigit()}

        return OutboxStats(
            records=records,
            bytes=num("stored_bytes"),
            max_bytes=self.max_bytes,
            oldest_created_us=oldest,
            dropped_total=num("dropped_total"),
            quarantined_total=num("quarantined_total"),
            salvaged_total=num("salvaged_total"),
            unreadable_pages_total=num("unreadable_pages_total"),
            dropped_disk_full_total=num("dropped_disk_full_total"),
            appended_total=num("appended_total"),
            acked_total=num("acked_total"),
            lost_total=num("lost_total"),
            quarantine_lost_total=num("quarantine_lost_total"),
            loss_unknown_total=num("loss_unknown_total"),
            resurrected_total=num("resurrected_total"),
            quarantine_records=q_records,
            quarantine_bytes=num("quarantine_bytes"),
            max_quarantine_bytes=self.max_quarantine_bytes,
            quarantined_by_code=by_code("quarantined."),
            quarantine_evicted=by_code("quarantine_evicted."),
            quarantine_dropped=by_code("quarantine_dropped."),
            quarantine_retried=by_code("quarantine_retried."),
            disk_full_since_us=_int_or_none(meta.get("disk_full_since_us")),
            disk_full_message=meta.get("disk_full_message"),
            damage=meta.get("damage_notice"),
        )

    def get_state(self, key: str) -> str | None:
        with self._reading("reading its state") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = ?", (f"state.{key}",)).fetchone()
        return None if row is None else str(row[0])

    def set_state(self, values: Mapping[str, str | int | float | None]) -> None:
        def store(conn: sqlite3.Connection) -> None:
            for key, value in values.items():
                if value is None:
                    conn.execute("DELETE FROM meta WHERE key = ?", (f"state.{key}",))
                else:
                    conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES (?, ?)", (f"state.{key}", str(value)))

        with self._lock:
            self._write(store, "saving its state")

    def last_salvage(self) -> str | None:
        with self._reading("reading its state") as conn:
            row = conn.execute("SELECT value FROM meta WHERE key = 'last_salvage'").fetchone()
        return None if row is None else str(row[0])

    def file_bytes(self) -> int:
        """Bytes the database takes on disk now (main file and WAL; not the reserve beside it)."""
        total = 0
        for suffix in ("", "-wal"):
            path = Path(str(self.path) + suffix)
            if path.exists():
                total += path.stat().st_size
        return total

    def checkpoint(self) -> None:
        with self._reading("checkpointing") as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def housekeeping(self) -> bool:
        """Checkpoint the WAL; VACUUM when over a quarter of the file (and 1 MiB) is free pages. True if vacuumed.

        Also re-creates the disk reserve when there is room for it again."""
        with self._reading("housekeeping") as conn:
            conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            pages = conn.execute("PRAGMA page_count").fetchone()[0]
            free = conn.execute("PRAGMA freelist_count").fetchone()[0]
            size = conn.execute("PRAGMA page_size").fetchone()[0]
            vacuumed = False
            if free * 4 > pages and free * size > 1024**2:
                conn.execute("VACUUM")
                conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
                vacuumed = True
            self._ensure_reserve()
            return vacuumed

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def __enter__(self) -> Outbox:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _int_or_none(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _quarantined_row(
    seq: int,
    queue_seq: int | None,
    rid: bytes | None,
    code: str | None,
    reason: str | None,
    codec: str | None,
    created_us: int | None,
    quarantined_us: int | None,
    body: bytes | None,
    size: int | None = None,
) -> QuarantinedRow:
    body = bytes(body or b"")
    reason = reason or ""
    return QuarantinedRow(
        seq=seq,
        queue_seq=queue_seq,
        id=bytes(rid) if rid is not None else None,
        code=code if code in QUARANTINE_CODES else "other",
        reason=reason,
        codec=codec if codec in wire.CODECS else _codec_of(body),
        created_us=created_us,
        quarantined_us=quarantined_us,
        size=size if size is not None else len(body) + len(reason.encode()) + ROW_OVERHEAD,
        body=body,
    )


def _undecodable(body: bytes, codec: str) -> str | None:
    """Why ``body`` is not a valid wire record, or None when it is."""
    try:
        wire.validate_record(wire.loads(body, codec))
    except wire.WireError as exc:
        return exc.message
    return None


def _with_device_id(row: QuarantinedRow, device_id: str) -> bytes:
    try:
        record = wire.loads(row.body, row.codec)
        if not isinstance(record, dict):
            raise wire.WireError(f"a {type(record).__name__}, not a map")
    except wire.WireError as exc:
        raise UsageError(
            f"quarantined record seq {row.seq} does not decode ({exc.message}), so its device_id cannot be "
            "rewritten: leave it out (export or drop it)"
        ) from None
    record["device_id"] = device_id
    return wire.dumps(record, row.codec)


def decoded_device_id(row: QuarantinedRow | PendingRow) -> str | None:
    """The ``device_id`` a stored record names, or None when it does not decode."""
    try:
        record = wire.loads(row.body, row.codec)
    except wire.WireError:
        return None
    device = record.get("device_id") if isinstance(record, dict) else None
    return device if isinstance(device, str) else None


def _export_row(row: QuarantinedRow, which: str) -> dict[str, Any]:
    out: dict[str, Any] = {"seq": row.seq, "state": which, "codec": row.codec}
    if which == "quarantined":
        out.update(queue_seq=row.queue_seq, code=row.code, reason=row.reason, quarantined_us=row.quarantined_us)
    out["id"] = row.id.hex() if row.id is not None else None
    out["created_us"] = row.created_us
    try:
        decoded = wire.loads(row.body, row.codec)
        if not isinstance(decoded, dict):
            raise wire.WireError(f"a {type(decoded).__name__}, not a map")
        out["record"] = wire.from_wire(decoded)
    except (wire.WireError, ValueError, TypeError, KeyError) as exc:
        out["error"] = exc.message if isinstance(exc, wire.WireError) else f"{type(exc).__name__}: {exc}"
        out["body_hex"] = row.body.hex()
    return out


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

    async def quarantine(self, seq: int, reason: str, code: str = "refused") -> bool:
        return await self._run(self.outbox.quarantine, seq, reason, code)

    async def stats(self) -> OutboxStats:
        return await self._run(self.outbox.stats)

    async def get_state(self, key: str) -> str | None:
        return await self._run(self.outbox.get_state, key)

    async def set_state(self, values: Mapping[str, str | int | float | None]) -> None:
        await self._run(self.outbox.set_state, values)

    async def close(self) -> None:
        await self._run(self.outbox.close)
        self._executor.shutdown(wait=True)


def outbox_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / "outbox.db"


def check_outbox_readable(path: Path) -> None:
    """A read of the outbox at ``path`` would find this agent's outbox at its schema version: checked read-only
    (nothing is created or migrated), :class:`NotUsable` with the reason otherwise — empty, another program's
    database, another schema version, or a file SQLite does not read as a database at all (damaged: a command that
    writes — lens-agent run, sync, outbox retry — salvages it; a read changes nothing)."""
    from lens_core.sqlite_readonly import NotUsable, check_layout, connect_readonly, layout

    conn = connect_readonly(path)
    try:
        try:
            found = layout(conn, path)
        except NotUsable as exc:  # damaged: only a command that writes salvages it (keeps what can be read)
            raise NotUsable(
                path, f"{exc.problem}: damaged? lens-agent run or sync salvages it, keeping what can be read"
            ) from None
        check_layout(
            found,
            path,
            program="lens-agent outbox",
            marker="records",
            latest=SCHEMA_VERSION,
            older_hint="lens-agent run or lens-agent sync migrates it (the service does when it starts)",
            newer_hint="upgrade lens-agent",
            empty_hint="lens-agent run, sync or bench --store creates one; move this file aside",
        )
    finally:
        conn.close()


def open_outbox(config: Any) -> Outbox:
    """The outbox in the configured data directory, with the configured bound, policy, codec and limits."""
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
            busy_timeout=box["busy_timeout"],
            max_quarantine_bytes=box["max_quarantine_bytes"],
            reserve_bytes=box["disk_reserve"],
        )
    except OSError as exc:
        raise UsageError(f"outbox {path}: cannot be opened ({exc.strerror}); check agent.data_dir") from None
