"""A record id is a duplicate only for the device that sent it, in both stores, and an old store migrates to it.

Before schema 6 the store's unique key was the record id alone: another device that learnt an id (a shared log, a
copied outbox) had its own record acknowledged as a duplicate and never stored. Real ``lens-aggregator serve``
processes on SQLite and PostgreSQL; the migrations run on a store built with the old schema's own migrations.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp

from aggregator.app import _row
from aggregator.store import INSERT_COLUMNS, MIGRATIONS, SCHEMA_VERSION, Query, SQLiteStore
from lens_core.sqlite_schema import migrate_forward

from .hostile_device import auth, encode_raw, raw_batch, valid_wire
from .netproxy import free_port
from .processes import AggregatorProcess, open_store

NOW = time.time_ns() // 1000


def records_of(device: str, ids: list[bytes], seed: int = 3) -> list[dict[str, Any]]:
    records = valid_wire(len(ids), seed=seed, device=device)
    for record, rid in zip(records, ids, strict=True):
        record["id"] = rid
    return records


async def send(port: int, token: str, device: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    body = raw_batch([encode_raw(r, "cbor") for r in records], device=device, batch_id=str(uuid.uuid4()))
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"http://127.0.0.1:{port}/api/v1/ingest", data=body, headers=auth(token)) as response,
    ):
        assert response.status == 200, await response.text()
        return dict(await response.json())


def test_another_device_sending_a_known_id_gets_its_record_stored(db: Any) -> None:
    store = open_store(db)
    tokens = {d: store.add_token(d, "device", NOW) for d in ("victim", "other")}
    store.close()
    ids = [uuid.uuid4().bytes for _ in range(5)]
    proc = AggregatorProcess(db, free_port())
    proc.start()
    try:
        first = asyncio.run(send(proc.port, tokens["victim"], "victim", records_of("victim", ids)))
        assert (first["accepted"], first["duplicates"]) == (5, 0)
        # the other device knows three of the ids: its records are its own, stored
        theirs = records_of("other", [*ids[:3], uuid.uuid4().bytes], seed=4)
        second = asyncio.run(send(proc.port, tokens["other"], "other", theirs))
        assert (second["accepted"], second["duplicates"]) == (4, 0)
        # a retry is still a duplicate, for each device
        again = asyncio.run(send(proc.port, tokens["other"], "other", theirs))
        assert (again["accepted"], again["duplicates"]) == (0, 4)
        retry = asyncio.run(send(proc.port, tokens["victim"], "victim", records_of("victim", ids)))
        assert (retry["accepted"], retry["duplicates"]) == (0, 5)
    finally:
        proc.stop()
    store = open_store(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 10
        assert store.record_count() == 9
        assert len(store.query(Query(device="other"), limit=100)) == 4
        assert len(store.query(Query(device="victim"), limit=100)) == 5
        devices = {d["device_id"]: d for d in store.devices()}
        assert devices["victim"]["duplicates"] == 5 and devices["other"]["duplicates"] == 4
    finally:
        store.close()


# the measurements columns a schema 5 store has (schema 8 added ``contended``)
OLD_COLUMNS = tuple(c for c in INSERT_COLUMNS if c != "contended" and not c.startswith("guardrail_"))


def _stored_rows(device: str, ids: list[bytes]) -> list[tuple[Any, ...]]:
    rows = []
    for record in records_of(device, ids):
        row = {
            **_row(record, "cbor", encode_raw(record, "cbor"))._asdict(),
            "received_us": NOW,
            "batch_id": "old-batch",
        }
        rows.append(tuple(row[c] for c in OLD_COLUMNS))
    return rows


def test_a_schema_5_sqlite_store_migrates_to_dedupe_per_device(tmp_path: Path) -> None:
    path = tmp_path / "agg.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate_forward(conn, {v: MIGRATIONS[v] for v in range(1, 6)}, RuntimeError)  # the schema 5 store, as it was
    ids = [uuid.uuid4().bytes for _ in range(20)]
    insert = f"INSERT INTO measurements ({', '.join(OLD_COLUMNS)}) VALUES ({', '.join('?' for _ in OLD_COLUMNS)})"
    conn.executemany(insert, _stored_rows("victim", ids))
    conn.execute("INSERT INTO meta (key, value) VALUES ('otlp.traces', '{\"seq\":7}')")
    # the old key: the same id from another device is ignored
    conn.executemany(insert.replace("INSERT", "INSERT OR IGNORE"), _stored_rows("other", ids[:2]))
    assert conn.execute("SELECT COUNT(*) FROM measurements").fetchone() == (20,)
    before = conn.execute("SELECT seq, id, device_id, body FROM measurements ORDER BY seq").fetchall()
    conn.close()

    store = SQLiteStore(path)
    try:
        assert (
            store.schema_version() == SCHEMA_VERSION == 10
        )  # on through campaigns (7), contended (8), regressions (9), guardrails (10)
        after = store._read("SELECT seq, id, device_id, body FROM measurements ORDER BY seq")
        assert [tuple(r) for r in after] == before  # same rows, same seq: the OTLP cursor stays valid
        assert store.get_meta("otlp.traces") == '{"seq":7}'
        indexes = {r[0] for r in store._read("SELECT name FROM sqlite_master WHERE type = 'index'")}
        assert {"measurements_device_time", "measurements_time", "measurements_device_kind"} <= indexes
        assert "measurements_series" in indexes
        rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records_of("other", ids[:2])]
        result = store.ingest("other", "b2", 0, {}, rows, NOW)
        assert (result.accepted, result.duplicates) == (2, 0)
        rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records_of("victim", ids[:2])]
        result = store.ingest("victim", "b3", 0, {}, rows, NOW)
        assert (result.accepted, result.duplicates) == (0, 2)
        assert store.record_count() == 22
    finally:
        store.close()


def test_a_schema_5_postgres_store_migrates_to_dedupe_per_device(pg_url: str) -> None:
    import psycopg

    from aggregator.pgstore import PostgresStore

    store = PostgresStore(pg_url)
    ids = [uuid.uuid4().bytes for _ in range(20)]
    rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records_of("victim", ids)]
    store.ingest("victim", "b1", 0, {}, rows, NOW)
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:  # back to schema 5: record_ids keyed by the id alone
        conn.execute("DROP TABLE record_ids")
        conn.execute("CREATE TABLE record_ids (id bytea PRIMARY KEY, started_us bigint NOT NULL)")
        conn.execute("INSERT INTO record_ids SELECT id, started_us FROM measurements")
        conn.execute("UPDATE meta SET value = '5' WHERE key = 'schema_version'")
        other = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records_of("other", ids[:2])]
        clash = conn.execute(
            "INSERT INTO record_ids (id, started_us) SELECT * FROM unnest(%s::bytea[], %s::bigint[]) "
            "ON CONFLICT DO NOTHING RETURNING id",
            ([r.id for r in other], [r.started_us for r in other]),
        ).fetchall()
        assert clash == []  # the old key took them for duplicates
    store = PostgresStore(pg_url)
    try:
        assert store.schema_version() == SCHEMA_VERSION
        assert store.record_count() == 20
        key = store._read(
            "SELECT a.attname FROM pg_index i JOIN pg_attribute a ON a.attrelid = i.indrelid "
            "AND a.attnum = ANY(i.indkey) WHERE i.indrelid = 'record_ids'::regclass AND i.indisprimary"
        )
        assert {r[0] for r in key} == {"device_id", "id"}
        assert store._read("SELECT COUNT(*) FROM record_ids")[0][0] == 20
        result = store.ingest("other", "b2", 0, {}, other, NOW)
        assert (result.accepted, result.duplicates) == (2, 0)
        again = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records_of("victim", ids[:3])]
        result = store.ingest("victim", "b3", 0, {}, again, NOW)
        assert (result.accepted, result.duplicates) == (0, 3)
        assert store.record_count() == 22
    finally:
        store.close()
