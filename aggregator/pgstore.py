"""The PostgreSQL store, for fleets that outgrow one machine: several aggregator replicas share one database.

Measurements are partitioned by month of their start time (``PARTITION BY RANGE (started_us)``, partitions created
on demand, a default partition for clocks far off). PostgreSQL's unique constraints on a partitioned table must
include the partition key, so dedupe goes through a table of its own: ``record_ids(device_id, id)``, the key per
device (schema 6; before, ``id`` alone: a device that knew another's record id had its own record taken for a
duplicate). A batch inserts its ids there with ``ON CONFLICT DO NOTHING RETURNING id`` and stores only the records
that came back — two replicas receiving the same record at once serialise on that unique index, and exactly one
stores it. Retention
drops whole partitions.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from lens_core.record_schema import MAX_FUTURE_US, MIN_STARTED_US
from lens_core.sqlite_readonly import NotUsable

from .store import (
    CAMPAIGN_INDEXES,
    CAMPAIGN_JOBS_TABLE,
    CAMPAIGNS_TABLE,
    DEVICE_COLUMNS,
    GUARDRAIL_BACKFILL,
    GUARDRAIL_COLUMN_TYPES,
    GUARDRAIL_COLUMNS,
    INSERT_COLUMNS,
    NULL_NAME,
    QUERY_COLUMNS,
    REGRESSION_EVENTS_TABLE,
    REGRESSION_INDEXES,
    REGRESSIONS_TABLE,
    SERIES_COLUMNS,
    SYNC_COLUMNS,
    TOKEN_KINDS,
    IngestResult,
    Query,
    QueryTimeout,
    RecordRow,
    Run,
    Store,
    SyncRow,
    TokenInfo,
    backfill_contended,
    backfill_energy,
    backfill_guardrails,
    backfill_settings,
    device_row,
    hash_token,
    is_token_id,
    new_token,
    series_counts,
    sync_row,
)

SCHEMA_VERSION = 10
T = TypeVar("T")

# Dedupe per device (see store._migrate_v6): record_ids keyed by (device_id, id), rebuilt from the stored records.
_MIGRATION_V6 = """
CREATE TABLE record_ids_v6 (
    device_id text NOT NULL, id bytea NOT NULL, started_us bigint NOT NULL,
    CONSTRAINT record_ids_device_id_key PRIMARY KEY (device_id, id)
);
INSERT INTO record_ids_v6 SELECT device_id, id, MIN(started_us) FROM measurements GROUP BY device_id, id;
DROP TABLE record_ids;
ALTER TABLE record_ids_v6 RENAME TO record_ids
"""

# Series (device × kind × model × strategy) kept at ingest, and indexes that read a device's or a series' latest
# records without scanning the others' (see store._migrate_v2). %s: NULL_NAME, for a missing model or strategy.
_MIGRATION_V2 = """
CREATE TABLE IF NOT EXISTS series (
    device_id text NOT NULL, kind text NOT NULL, model_name text NOT NULL, strategy text NOT NULL,
    first_seen_us bigint NOT NULL, last_seen_us bigint NOT NULL, records bigint NOT NULL,
    PRIMARY KEY (device_id, kind, model_name, strategy)
);
INSERT INTO series SELECT device_id, kind, COALESCE(model_name, %(null)s), COALESCE(strategy, %(null)s),
    MIN(received_us), MAX(received_us), COUNT(*) FROM measurements GROUP BY 1, 2, 3, 4 ON CONFLICT DO NOTHING;
CREATE INDEX IF NOT EXISTS measurements_device_kind_seq ON measurements (device_id, kind, seq);
CREATE INDEX IF NOT EXISTS measurements_series_seq ON measurements (device_id, kind, model_name, strategy, seq);
"""

_MIGRATION_V1 = """
CREATE TABLE IF NOT EXISTS record_ids (id bytea PRIMARY KEY, started_us bigint NOT NULL);
CREATE SEQUENCE IF NOT EXISTS measurement_seq;
CREATE TABLE IF NOT EXISTS measurements (
    seq bigint NOT NULL DEFAULT nextval('measurement_seq'),
    id bytea NOT NULL,
    device_id text NOT NULL,
    run_id text NOT NULL,
    kind text NOT NULL,
    started_us bigint NOT NULL,
    received_us bigint NOT NULL,
    ok boolean NOT NULL,
    strategy text, model_name text, engine text, error_type text,
    input_tokens integer, output_tokens integer,
    ttft_us bigint, tpot_us bigint, e2e_us bigint,
    batch_id text NOT NULL,
    codec text NOT NULL,
    body bytea NOT NULL
) PARTITION BY RANGE (started_us);
CREATE TABLE IF NOT EXISTS measurements_default PARTITION OF measurements DEFAULT;
CREATE INDEX IF NOT EXISTS measurements_device_time ON measurements (device_id, started_us);
CREATE INDEX IF NOT EXISTS measurements_time ON measurements (started_us);
CREATE INDEX IF NOT EXISTS measurements_seq ON measurements (seq);
CREATE TABLE IF NOT EXISTS devices (
    device_id text PRIMARY KEY, first_seen_us bigint, last_seen_us bigint, records bigint, duplicates bigint,
    dropped_total bigint, quarantined_total bigint, last_batch_id text, last_sent_us bigint, backlog bigint
);
CREATE TABLE IF NOT EXISTS tokens (
    token_hash text PRIMARY KEY, subject text NOT NULL, kind text NOT NULL, created_us bigint NOT NULL,
    revoked_us bigint, expires_us bigint
);
"""

# Energy per output token and average power as columns (backfilled from the bodies in Python: see
# store.backfill_energy) and one row per batch in ``syncs`` (see store._migrate_v4).
_MIGRATION_V4 = """
ALTER TABLE measurements ADD COLUMN IF NOT EXISTS j_per_token double precision;
ALTER TABLE measurements ADD COLUMN IF NOT EXISTS power_w double precision;
CREATE TABLE IF NOT EXISTS syncs (
    device_id text NOT NULL, received_us bigint NOT NULL, batch_id text NOT NULL,
    records integer NOT NULL, accepted integer NOT NULL,
    backlog bigint, dropped_total bigint, quarantined_total bigint
);
CREATE INDEX IF NOT EXISTS syncs_device_time ON syncs (device_id, received_us);
"""

_COPY = f"COPY measurements ({', '.join(INSERT_COLUMNS)}) FROM STDIN"
_INSERT_SYNC = f"INSERT INTO syncs ({', '.join(SYNC_COLUMNS)}) VALUES ({', '.join('%s' for _ in SYNC_COLUMNS)})"


def _month_bounds(us: int) -> tuple[int, int, str]:
    when = datetime.fromtimestamp(us / 1e6, tz=timezone.utc)
    start = datetime(when.year, when.month, 1, tzinfo=timezone.utc)
    end = datetime(when.year + (when.month == 12), when.month % 12 + 1, 1, tzinfo=timezone.utc)
    return int(start.timestamp() * 1e6), int(end.timestamp() * 1e6), f"measurements_{when.year:04d}{when.month:02d}"


class PostgresStore(Store):
    """One connection per aggregator process, used from the store thread."""

    def __init__(self, url: str, *, max_query_seconds: float = 10.0, readonly: bool = False) -> None:
        """``readonly``: every transaction is read-only and nothing is migrated; the store must hold this
        release's schema (:class:`NotUsable` otherwise)."""
        import psycopg

        self.url = url
        self.readonly = readonly
        self.max_query_seconds = max_query_seconds
        self._psycopg = psycopg
        self._lock = threading.Lock()
        only = " -c default_transaction_read_only=on" if readonly else ""
        self._conn = psycopg.connect(url, autocommit=False, options=only.strip() or None)
        # reads have a connection of their own (they never queue behind ingest), bounded in time by the server
        self._read_lock = threading.Lock()
        self._read_timeout_ms = max(1, int(max_query_seconds * 1000))
        self._read_conn = psycopg.connect(
            url, autocommit=True, options=f"-c statement_timeout={self._read_timeout_ms}{only}"
        )
        self._partitions: set[str] = set()
        if readonly:
            self._check_readonly()
        else:
            self._migrate()

    def _check_readonly(self) -> None:
        """The schema a read needs, without creating or migrating anything: one line (NotUsable) when absent."""
        safe = "…@" + self.url.split("@")[-1]
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT to_regclass('meta') IS NOT NULL, to_regclass('tokens') IS NOT NULL")
            has_meta, has_tokens = cur.fetchone() or (False, False)
            version = None
            if has_meta:
                cur.execute("SELECT value FROM meta WHERE key = 'schema_version'")
                row = cur.fetchone()
                version = int(row[0]) if row and str(row[0]).isdigit() else None
        where = safe
        if not has_meta and not has_tokens:
            raise NotUsable(where, f"has no lens-aggregator tables (lens-aggregator serve --db {safe} creates them)")
        if version is None or not has_tokens:
            raise NotUsable(where, "has a meta or tokens table that is not lens-aggregator's (no schema_version)")
        if version < SCHEMA_VERSION:
            raise NotUsable(
                where,
                f"holds lens-aggregator schema version {version}, older than this release's ({SCHEMA_VERSION}); "
                "run lens-aggregator migrate --db URL (a starting lens-aggregator serve migrates it too)",
            )
        if version > SCHEMA_VERSION:
            raise NotUsable(
                where,
                f"holds lens-aggregator schema version {version}, newer than this release's ({SCHEMA_VERSION}); "
                "upgrade lens-aggregator",
            )

    def _migrate(self) -> None:
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(7461326)")  # one replica migrates at a time
            cur.execute("CREATE TABLE IF NOT EXISTS meta (key text PRIMARY KEY, value text)")
            cur.execute("SELECT value FROM meta WHERE key = 'schema_version'")
            row = cur.fetchone()
            version = int(row[0]) if row else 0
            self.opened_version = version
            if version > SCHEMA_VERSION:
                raise RuntimeError(
                    f"{self.url}: database schema version {version} is newer than this aggregator's "
                    f"({SCHEMA_VERSION}); upgrade lens-aggregator"
                )
            if version < 1:
                cur.execute(_MIGRATION_V1)
            if version < 2:
                for statement in _MIGRATION_V2.split(";"):
                    if statement.strip():
                        cur.execute(statement, {"null": NULL_NAME} if "%(null)s" in statement else None)
            if version < 3:
                cur.execute("ALTER TABLE devices ADD COLUMN IF NOT EXISTS expected_gap_s bigint")
            if version < 4:
                for statement in _MIGRATION_V4.split(";"):
                    if statement.strip():
                        cur.execute(statement)
                cur.execute("SELECT seq, codec, body FROM measurements WHERE kind = 'inference' AND ok")
                cur.executemany(
                    "UPDATE measurements SET j_per_token = %s, power_w = %s WHERE seq = %s",
                    backfill_energy(cur.fetchall()),
                )
            if version < 5:
                cur.execute("ALTER TABLE measurements ADD COLUMN IF NOT EXISTS settings text")
                cur.execute("SELECT seq, codec, body FROM measurements WHERE kind = 'inference'")
                rows = backfill_settings(cur.fetchall())
                cur.executemany("UPDATE measurements SET settings = %s WHERE seq = %s", rows)
            cur.execute(
                "SELECT 1 FROM information_schema.columns WHERE table_schema = current_schema() "
                "AND table_name = 'record_ids' AND column_name = 'device_id'"
            )
            if version < 6 and cur.fetchone() is None:  # (a store whose version was set back may have it already)
                for statement in _MIGRATION_V6.split(";"):
                    if statement.strip():
                        cur.execute(statement)
            if version < 7:  # benchmark campaigns (see store._migrate_v7)
                for statement in (CAMPAIGNS_TABLE, CAMPAIGN_JOBS_TABLE, *CAMPAIGN_INDEXES):
                    cur.execute(statement)
            if version < 8:  # contended requests (see store._migrate_v8), backfilled from the stored records
                cur.execute("ALTER TABLE measurements ADD COLUMN IF NOT EXISTS contended smallint NOT NULL DEFAULT 0")
                cur.execute("UPDATE measurements SET contended = 0 WHERE contended <> 0")
                cur.execute("SELECT seq, codec, body FROM measurements WHERE kind = 'inference'")
                marked = backfill_contended(cur.fetchall())
                cur.executemany("UPDATE measurements SET contended = 1 WHERE seq = %s", marked)
            if version < 9:  # regressions as lasting objects (see store._migrate_v9)
                cur.execute(REGRESSIONS_TABLE.format(id="bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"))
                for statement in REGRESSION_INDEXES:
                    cur.execute(statement)
                cur.execute(REGRESSION_EVENTS_TABLE.format(id="bigint GENERATED BY DEFAULT AS IDENTITY PRIMARY KEY"))
            if version < 10:  # guardrail measurements (see store._migrate_v10), backfilled from the stored records
                for name, kind in GUARDRAIL_COLUMN_TYPES:
                    pg_kind = "text" if kind == "TEXT" else "double precision"
                    cur.execute(f"ALTER TABLE measurements ADD COLUMN IF NOT EXISTS {name} {pg_kind}")
                cur.execute(
                    f"UPDATE measurements SET {', '.join(f'{name} = NULL' for name in GUARDRAIL_COLUMNS)} "
                    "WHERE guardrail_set IS NOT NULL OR guardrail_ms IS NOT NULL"
                )
                cur.execute("SELECT seq, codec, body FROM measurements")
                cur.executemany(GUARDRAIL_BACKFILL.replace("?", "%s"), backfill_guardrails(cur.fetchall()))
            if version < SCHEMA_VERSION:
                cur.execute(
                    "INSERT INTO meta (key, value) VALUES ('schema_version', %s) "
                    "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                    (str(SCHEMA_VERSION),),
                )

    def schema_version(self) -> int:
        with self._lock, self._conn.transaction():
            row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0]) if row else 0

    def _ensure_partitions(self, started: Sequence[int], received_us: int) -> None:
        """Monthly partitions for these start times, only inside the accepted window (2020-01-01 … one day after
        receipt, as the record schema enforces): a start outside it goes to the default partition, never to a new
        table."""
        low, high = MIN_STARTED_US, received_us + MAX_FUTURE_US
        wanted = {_month_bounds(us) for us in started if low <= us <= high}
        missing = [b for b in wanted if b[2] not in self._partitions]
        if not missing:
            return
        with self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(7461327)")  # replicas create partitions one at a time
            for start, end, name in missing:
                cur.execute("SELECT 1 FROM pg_class WHERE relname = %s", (name,))
                if cur.fetchone() is None:
                    # rows of this month already in the default partition would block the new one: move them
                    cur.execute("CREATE TEMP TABLE IF NOT EXISTS moving (LIKE measurements) ON COMMIT DROP")
                    cur.execute(
                        "WITH moved AS (DELETE FROM measurements_default WHERE started_us >= %s AND started_us < %s "
                        "RETURNING *) INSERT INTO moving SELECT * FROM moved",
                        (start, end),
                    )
                    cur.execute(f"CREATE TABLE {name} PARTITION OF measurements FOR VALUES FROM ({start}) TO ({end})")
                    cur.execute("INSERT INTO measurements SELECT * FROM moving")
                    cur.execute("DELETE FROM moving")
                self._partitions.add(name)

    # -- ingest ------------------------------------------------------------------------------------------
    def ingest(
        self,
        device_id: str,
        batch_id: str,
        sent_us: int,
        counters: dict[str, int],
        rows: Sequence[RecordRow],
        received_us: int,
    ) -> IngestResult:
        with self._lock:
            self._ensure_partitions([r.started_us for r in rows], received_us)
            with self._conn.transaction():
                cur = self._conn.cursor()
                fresh: set[bytes] = set()
                if rows:
                    cur.execute(
                        "INSERT INTO record_ids (device_id, id, started_us) "
                        "SELECT %s::text, * FROM unnest(%s::bytea[], %s::bigint[]) ON CONFLICT DO NOTHING RETURNING id",
                        (device_id, [r.id for r in rows], [r.started_us for r in rows]),
                    )
                    fresh = {bytes(row[0]) for row in cur.fetchall()}
                new: list[int] = []
                taken: set[bytes] = set()
                for i, r in enumerate(rows):
                    if r.id in fresh and r.id not in taken:
                        new.append(i)
                        taken.add(r.id)
                if new:
                    with cur.copy(_COPY) as copy:  # COPY routes rows to their partitions, faster than INSERTs
                        for i in new:
                            copy.write_row((*rows[i], received_us, batch_id))
                accepted = len(new)
                duplicates = len(rows) - accepted
                counts = series_counts(rows, new)
                if counts:
                    cur.executemany(
                        "INSERT INTO series (device_id, kind, model_name, strategy, first_seen_us, last_seen_us, "
                        "records) VALUES (%s, %s, %s, %s, %s, %s, %s) "
                        "ON CONFLICT (device_id, kind, model_name, strategy) DO UPDATE SET "
                        "last_seen_us = GREATEST(series.last_seen_us, excluded.last_seen_us), "
                        "records = series.records + excluded.records",
                        [(*key, received_us, received_us, n) for key, n in counts.items()],
                    )
                cur.execute(
                    """INSERT INTO devices (device_id, first_seen_us, last_seen_us, records, duplicates,
                           dropped_total, quarantined_total, last_batch_id, last_sent_us, backlog, expected_gap_s)
                       VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)
                       ON CONFLICT (device_id) DO UPDATE SET
                           last_seen_us = GREATEST(devices.last_seen_us, excluded.last_seen_us),
                           records = devices.records + excluded.records,
                           duplicates = devices.duplicates + excluded.duplicates,
                           dropped_total = GREATEST(devices.dropped_total, excluded.dropped_total),
                           quarantined_total = GREATEST(devices.quarantined_total, excluded.quarantined_total),
                           last_batch_id = excluded.last_batch_id,
                           last_sent_us = excluded.last_sent_us,
                           backlog = excluded.backlog,
                           expected_gap_s = excluded.expected_gap_s""",
                    device_row(device_id, batch_id, sent_us, counters, accepted, duplicates, received_us),
                )
                cur.execute(_INSERT_SYNC, sync_row(device_id, batch_id, counters, len(rows), accepted, received_us))
        return IngestResult(accepted=accepted, duplicates=duplicates, new=tuple(new))

    # -- reads -------------------------------------------------------------------------------------------
    def _rows(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        with self._lock, self._conn.transaction():
            return list(self._conn.execute(sql, params).fetchall())

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[tuple[Any, ...]]:
        """A read on the read connection: never behind the writer; cancelled by the server after
        ``max_query_seconds`` (QueryTimeout)."""
        with self._read_lock:
            timeout_ms = max(1, int(self.max_query_seconds * 1000))
            if timeout_ms != self._read_timeout_ms:
                self._read_conn.execute(f"SET statement_timeout = {timeout_ms}")
                self._read_timeout_ms = timeout_ms
            try:
                return list(self._read_conn.execute(sql, params).fetchall())
            except self._psycopg.errors.QueryCanceled:
                raise QueryTimeout(self.max_query_seconds) from None

    def devices(self) -> list[dict[str, Any]]:
        rows = self._read(f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices ORDER BY device_id")
        return [dict(zip(DEVICE_COLUMNS, row, strict=True)) for row in rows]

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device_id = %s", (device_id,))
        return dict(zip(DEVICE_COLUMNS, rows[0], strict=True)) if rows else None

    def record_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM measurements")[0][0])

    def record_ids(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._read("SELECT id FROM measurements")]

    def record_body(self, record_id: bytes) -> tuple[str, bytes, int] | None:
        rows = self._read("SELECT codec, body, received_us FROM measurements WHERE id = %s", (record_id,))
        return None if not rows else (str(rows[0][0]), bytes(rows[0][1]), int(rows[0][2]))

    def query(self, query: Query, *, limit: int, after_seq: int = 0) -> list[dict[str, Any]]:
        where, params = query.where()
        sql = (
            f"SELECT {', '.join(QUERY_COLUMNS)} FROM measurements WHERE {where.replace('?', '%s')} AND seq > %s "
            "ORDER BY seq LIMIT %s"
        )
        rows = self._read(sql, [*params, after_seq, limit])
        return [dict(zip(QUERY_COLUMNS, row, strict=True)) for row in rows]

    def query_newest(self, query: Query, *, limit: int, before_seq: int | None = None) -> list[dict[str, Any]]:
        where, params = query.where()
        where = where.replace("?", "%s")
        if before_seq is not None:
            where, params = f"{where} AND seq < %s", [*params, before_seq]
        sql = f"SELECT {', '.join(QUERY_COLUMNS)} FROM measurements WHERE {where} ORDER BY seq DESC LIMIT %s"
        rows = self._read(sql, [*params, limit])
        return [dict(zip(QUERY_COLUMNS, row, strict=True)) for row in rows]

    def latest_columns(
        self, query: Query, columns: Sequence[str], limit: int, *, by_event: bool = False
    ) -> list[tuple[Any, ...]]:
        where, params = query.where()
        order = "started_us DESC, seq DESC" if by_event else "seq DESC"
        sql = (
            f"SELECT {', '.join(columns)} FROM measurements WHERE {where.replace('?', '%s')} ORDER BY {order} LIMIT %s"
        )
        return self._read(sql, [*params, limit])[::-1]

    def series(self, device: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE device_id = %s", [device]) if device is not None else ("", [])
        rows = self._read(f"SELECT {', '.join(SERIES_COLUMNS)} FROM series {where} ORDER BY 1, 2, 3, 4", params)
        return [dict(zip(SERIES_COLUMNS, row, strict=True)) for row in rows]

    def columns(self, query: Query, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        where, params = query.where()
        return self._read(f"SELECT {', '.join(columns)} FROM measurements WHERE {where.replace('?', '%s')}", params)

    def syncs(self, device: str, *, since_us: int | None = None, limit: int = 1000) -> list[SyncRow]:
        params: list[Any] = [device]
        where = "device_id = %s"
        if since_us is not None:
            where, params = f"{where} AND received_us >= %s", [device, since_us]
        rows = self._read(
            f"SELECT {', '.join(SYNC_COLUMNS)} FROM syncs WHERE {where} ORDER BY received_us DESC LIMIT %s",
            [*params, limit],
        )
        return [SyncRow(*row) for row in reversed(rows)]

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = %s", (key,))
        return None if not rows else str(rows[0][0])

    def swap_meta(self, key: str, old: str | None, new: str) -> bool:
        with self._lock, self._conn.transaction():
            if old is None:
                cur = self._conn.execute(
                    "INSERT INTO meta (key, value) VALUES (%s, %s) ON CONFLICT (key) DO NOTHING", (key, new)
                )
            else:
                cur = self._conn.execute("UPDATE meta SET value = %s WHERE key = %s AND value = %s", (new, key, old))
            return int(cur.rowcount) == 1

    def backlog_after(self, seq: int, before_us: int | None = None) -> tuple[int, int | None, int]:
        where, params = "seq > %s", [seq]
        if before_us is not None:
            where, params = f"{where} AND received_us < %s", [seq, before_us]
        n, oldest, top = self._read(
            f"SELECT COUNT(*), MIN(received_us), MAX(seq) FROM measurements WHERE {where}", params
        )[0]
        return int(n), oldest, int(top) if top is not None else seq

    def drop_before(self, cutoff_us: int) -> int:
        """Drops every monthly partition that ends at or before ``cutoff_us`` (and those records' ids)."""
        dropped = 0
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute(
                "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
                "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_class p ON p.oid = i.inhparent "
                "WHERE p.relname = 'measurements'"
            )
            for name, bound in cur.fetchall():
                if not name.startswith("measurements_") or "TO (" not in bound:
                    continue
                end = int(bound.rsplit("TO (", 1)[1].split(")")[0].strip("'"))
                if end <= cutoff_us:
                    cur.execute(f"DROP TABLE {name}")
                    self._partitions.discard(name)
                    dropped += 1
            cur.execute("DELETE FROM measurements_default WHERE started_us < %s", (cutoff_us,))
            cur.execute("DELETE FROM record_ids WHERE started_us < %s", (cutoff_us,))
            cur.execute("DELETE FROM syncs WHERE received_us < %s", (cutoff_us,))
        return dropped

    # -- tokens ------------------------------------------------------------------------------------------
    def authenticate(self, token: str, now_us: int) -> TokenInfo | None:
        rows = self._rows(
            "SELECT token_hash, subject, kind, created_us, revoked_us, expires_us FROM tokens WHERE token_hash = %s",
            (hash_token(token),),
        )
        if not rows:
            return None
        r = rows[0]
        info = TokenInfo(r[0][:12], r[1], r[2], r[3], r[4], r[5])
        if info.revoked_us is not None or (info.expires_us is not None and info.expires_us <= now_us):
            return None
        return info

    def add_token(self, subject: str, kind: str, now_us: int) -> str:
        if kind not in TOKEN_KINDS:
            raise ValueError(f"token kind must be device, read or operator, not {kind!r}")
        token = new_token()
        with self._lock, self._conn.transaction():
            self._conn.execute(
                "INSERT INTO tokens (token_hash, subject, kind, created_us) VALUES (%s, %s, %s, %s)",
                (hash_token(token), subject, kind, now_us),
            )
        return token

    def list_tokens(self) -> list[TokenInfo]:
        rows = self._rows(
            "SELECT token_hash, subject, kind, created_us, revoked_us, expires_us FROM tokens "
            "ORDER BY subject, created_us"
        )
        return [TokenInfo(r[0][:12], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def revoke(self, selector: str, now_us: int) -> int:
        """Every live token of a subject (exactly), or one token by its 12-hex-digit id (exactly)."""
        token_id = selector if is_token_id(selector) else None
        with self._lock, self._conn.transaction():
            cur = self._conn.execute(
                "UPDATE tokens SET revoked_us = %s WHERE revoked_us IS NULL AND (subject = %s OR "
                "(%s::text IS NOT NULL AND substr(token_hash, 1, 12) = %s))",
                (now_us, selector, token_id, token_id),
            )
            return int(cur.rowcount)

    def rotate(self, device_id: str, now_us: int, grace_us: int) -> str:
        token = new_token()
        with self._lock, self._conn.transaction():
            self._conn.execute(
                "UPDATE tokens SET expires_us = %s WHERE subject = %s AND kind = 'device' AND revoked_us IS NULL "
                "AND (expires_us IS NULL OR expires_us > %s)",
                (now_us + grace_us, device_id, now_us + grace_us),
            )
            self._conn.execute(
                "INSERT INTO tokens (token_hash, subject, kind, created_us) VALUES (%s, %s, 'device', %s)",
                (hash_token(token), device_id, now_us),
            )
        return token

    # -- campaigns ---------------------------------------------------------------------------------------
    def _campaign_write(self, fn: Callable[[Run], T]) -> T:
        with self._lock, self._conn.transaction():
            cur = self._conn.cursor()
            cur.execute("SELECT pg_advisory_xact_lock(7461328)")  # replicas change campaigns one at a time

            def run(sql: str, params: Sequence[Any]) -> list[Any]:
                cur.execute(sql.replace("?", "%s"), params)
                return list(cur.fetchall()) if cur.description is not None else []

            return fn(run)

    def _campaign_read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._read(sql.replace("?", "%s"), params)

    def close(self) -> None:
        with self._lock, self._read_lock:
            self._read_conn.close()
            self._conn.close()
