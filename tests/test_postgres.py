"""PostgreSQL for fleets: several aggregator replicas on one database, retried batches, partitions, retention."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import aiohttp
import psycopg
import pytest

from agent.measurement import new_record_id
from agent.synthetic import synthetic_records
from aggregator.pgstore import PostgresStore
from aggregator.store import Query

from .netproxy import free_port
from .processes import AggregatorProcess
from .test_aggregator import make_batch

NOW = time.time_ns() // 1000


async def test_two_replicas_ingest_concurrently_without_duplicates_or_loss(pg_url: str) -> None:
    store = PostgresStore(pg_url)
    tokens = {f"dev-{n}": store.add_token(f"dev-{n}", "device", NOW) for n in range(3)}
    store.close()
    replicas = [AggregatorProcess(pg_url, free_port()) for _ in range(2)]  # type: ignore[arg-type]
    for replica in replicas:
        replica.start()
    try:
        batches = []
        for device in tokens:
            records = synthetic_records(300, seed=int(device[-1]), device_id=device)
            for record in records:
                record["id"] = new_record_id()
            for start in range(0, 300, 25):
                batches.append((device, make_batch(records[start : start + 25], device=device)))

        async def send(session: aiohttp.ClientSession, port: int, device: str, body: bytes) -> dict[str, Any]:
            async with session.post(
                f"http://127.0.0.1:{port}/api/v1/ingest",
                data=body,
                headers={"Authorization": f"Bearer {tokens[device]}"},
            ) as response:
                assert response.status == 200, await response.text()
                return dict(await response.json())

        async with aiohttp.ClientSession() as session:
            # every batch goes to both replicas at once: a retry that lands on the other replica
            results = await asyncio.gather(
                *(send(session, replica.port, device, body) for device, body in batches for replica in replicas)
            )
        accepted = sum(r["accepted"] for r in results)
        duplicates = sum(r["duplicates"] for r in results)
        assert accepted == 900 and duplicates == 900
        check = PostgresStore(pg_url)
        try:
            assert check.record_count() == 900 and len(set(check.record_ids())) == 900
            devices = {d["device_id"]: d for d in check.devices()}
            assert all(devices[d]["records"] == 300 and devices[d]["duplicates"] == 300 for d in tokens)
        finally:
            check.close()
    finally:
        for replica in replicas:
            replica.stop()


def test_partitions_are_monthly_and_retention_drops_them(pg_url: str) -> None:
    from aggregator.app import _row
    from lens_core import wire

    store = PostgresStore(pg_url)
    try:
        records = synthetic_records(20, seed=9, device_id="d")
        for i, record in enumerate(records):
            month = 9 + i % 3  # September, October, November 2026
            record["started_at"] = f"2026-{month:02d}-15T12:00:00.000000Z"
        rows = [wire.validate_record(wire.to_wire(r)) for r in records]
        store.ingest("d", "b", 0, {}, [_row(w, "cbor", wire.dumps(w, "cbor")) for w in rows], NOW)
        with psycopg.connect(pg_url) as conn:
            parts = {
                r[0]
                for r in conn.execute(
                    "SELECT c.relname FROM pg_inherits i JOIN pg_class c ON c.oid = i.inhrelid "
                    "JOIN pg_class p ON p.oid = i.inhparent WHERE p.relname = 'measurements'"
                )
            }
        assert {"measurements_202609", "measurements_202610", "measurements_202611", "measurements_default"} <= parts
        # dedupe stays global across partitions: the same records again are all duplicates
        again = store.ingest("d", "b2", 0, {}, [_row(w, "cbor", wire.dumps(w, "cbor")) for w in rows], NOW)
        assert again.accepted == 0 and again.duplicates == 20
        cutoff = int(time.mktime((2026, 10, 1, 0, 0, 0, 0, 0, 0)) - time.timezone) * 1_000_000
        assert store.drop_before(cutoff) == 1  # September's partition
        left = store.query(Query(), limit=100)
        assert len(left) == len([r for r in records if not r["started_at"].startswith("2026-09")])
    finally:
        store.close()


def test_aggregator_cli_with_a_postgres_url(pg_url: str, capsys: pytest.CaptureFixture[str]) -> None:
    from .test_status_cli import run_aggregator

    code, out, _ = run_aggregator(capsys, "token", "add", "orin-9", "--db", pg_url)
    assert code == 0 and out.startswith("lens_")
    code, _, err = run_aggregator(capsys, "token", "list", "--db", pg_url.replace("lens:lens", "lens:wrong"))
    assert code == 2 and "cannot connect" in err and "wrong" not in err  # the password is not echoed
