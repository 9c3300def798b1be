"""The aggregator's ingest API on a real aiohttp server on 127.0.0.1, with a real SQLite store."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SCHEMA_VERSION, SQLiteStore
from lens_core import wire

from .test_wire import zstd_bomb

NOW = time.time_ns() // 1000


def make_batch(records: list[dict[str, Any]], device: str = "dev-1", codec: str = "cbor", **kw: Any) -> bytes:
    blobs = [wire.encode_record(r, codec) for r in records]
    return wire.encode_batch(blobs, device_id=device, batch_id="b", sent_us=1, codec=codec, **kw)


@pytest.fixture
def token(store: SQLiteStore) -> str:
    return store.add_token("dev-1", "device", NOW)


@pytest.fixture
async def client(aiohttp_client, store: SQLiteStore) -> Any:
    return await aiohttp_client(
        create_app(Settings(max_body_bytes=512 * 1024, max_decompressed_bytes=8 * 1024**2), store)
    )


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


async def test_ingest_then_retry_counts_duplicates(client: Any, store: SQLiteStore, token: str) -> None:
    records = synthetic_records(40, seed=1, device_id="dev-1")
    body = make_batch(records)
    first = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert first.status == 200
    ids = [bytes.fromhex(r["id"].replace("-", "")) for r in records]
    assert await first.json() == wire.ingest_ack("b", ids, 40, 0)
    assert wire.check_ack(await first.json(), "b", ids) == (40, 0)
    again = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert (await again.json())["duplicates"] == 40
    assert store.record_count() == 40
    devices = (await (await client.get("/api/v1/devices")).json())["devices"]
    assert devices[0]["device_id"] == "dev-1" and devices[0]["records"] == 40 and devices[0]["duplicates"] == 40
    # bytes stored as received, beside the aggregator's own receive time
    codec, blob, received_us = store.record_body(bytes.fromhex(records[0]["id"].replace("-", ""))) or ("", b"", 0)
    assert codec == "cbor" and blob == wire.encode_record(records[0], "cbor") and received_us > NOW - 10**15


async def test_msgpack_batches_and_dropped_counter(client: Any, token: str) -> None:
    records = synthetic_records(5, seed=2, device_id="dev-1")
    body = make_batch(records, codec="msgpack", counters={"dropped_total": 7})
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    retry = make_batch(records[:1], codec="msgpack", counters={"dropped_total": 7})
    assert (await client.post("/api/v1/ingest", data=retry, headers=auth(token))).status == 200
    devices = (await (await client.get("/api/v1/devices")).json())["devices"]
    assert devices[0]["dropped_total"] == 7  # a cumulative total: the retry does not double it


@pytest.mark.parametrize("header", [None, "Bearer nope", "Basic abc", "Bearer "])
async def test_missing_or_wrong_token_is_401(client: Any, store: SQLiteStore, header: str | None) -> None:
    headers = {"Authorization": header} if header else {}
    response = await client.post("/api/v1/ingest", data=make_batch(synthetic_records(1, seed=3)), headers=headers)
    assert response.status == 401 and "token" in (await response.json())["error"]
    assert store.record_count() == 0


async def test_token_of_another_device_is_403_and_nothing_is_stored(
    client: Any, store: SQLiteStore, token: str
) -> None:
    other = synthetic_records(3, seed=4, device_id="dev-2")
    response = await client.post("/api/v1/ingest", data=make_batch(other, device="dev-2"), headers=auth(token))
    assert response.status == 403
    mixed = synthetic_records(3, seed=5, device_id="dev-1") + other[:1]
    response = await client.post("/api/v1/ingest", data=make_batch(mixed), headers=auth(token))
    assert response.status == 403 and (await response.json())["record_index"] == 3
    assert store.record_count() == 0


async def test_revoked_and_rotated_tokens(client: Any, store: SQLiteStore, token: str) -> None:
    body = make_batch(synthetic_records(1, seed=6, device_id="dev-1"))
    new = store.rotate("dev-1", NOW, grace_us=10**12)  # the old token keeps working during the grace period
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(new))).status == 200
    store.rotate("dev-1", time.time_ns() // 1000, grace_us=0)  # now every earlier token has expired
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(new))).status == 401
    newest = store.list_tokens()[-1]
    assert newest.expires_us is None
    assert store.revoke("dev-1", NOW) >= 1
    assert store.authenticate(new, NOW) is None


async def test_body_over_the_limit_is_413(client: Any, store: SQLiteStore, token: str) -> None:
    body = make_batch(synthetic_records(2000, seed=7, device_id="dev-1"), compression="none")
    assert len(body) > 512 * 1024
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 413 and store.record_count() == 0


async def test_zstd_bomb_is_413(client: Any, store: SQLiteStore, token: str) -> None:
    body = wire.HEADER.pack(b"LENS", 1, 1, 1, 0) + zstd_bomb(64 * 1024**2)
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 413 and "decompressed" in (await response.json())["error"]
    assert (await client.get("/api/v1/health")).status == 200 and store.record_count() == 0


async def test_unsupported_version_is_415_listing_supported(client: Any, token: str) -> None:
    body = bytearray(make_batch(synthetic_records(1, seed=8, device_id="dev-1")))
    body[4] = 2
    response = await client.post("/api/v1/ingest", data=bytes(body), headers=auth(token))
    assert response.status == 415
    assert (await response.json())["supported_versions"] == [1]


async def test_record_missing_a_field_is_400_naming_it(client: Any, store: SQLiteStore, token: str) -> None:
    records = synthetic_records(3, seed=9, device_id="dev-1")
    blobs = [wire.encode_record(r, "msgpack") for r in records]
    broken = wire.to_wire(records[1])
    del broken["kind"]
    blobs[1] = msgpack.packb(broken, use_bin_type=True)
    body = wire.encode_batch(blobs, device_id="dev-1", batch_id="b", sent_us=1, codec="msgpack")
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    payload = await response.json()
    assert response.status == 400 and "'kind'" in payload["error"]
    assert payload["record_index"] == 1 and payload["record_id"] == records[1]["id"].replace("-", "")
    assert store.record_count() == 0  # nothing of that batch


@given(garbage=st.binary(max_size=2048), header=st.booleans())
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_hostile_payloads_are_4xx_and_store_nothing(
    client: Any, store: SQLiteStore, token: str, garbage: bytes, header: bool
) -> None:
    body = (wire.HEADER.pack(b"LENS", 1, 1, 1, 0) + garbage) if header else garbage
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert 400 <= response.status < 500
    assert store.record_count() == 0
    assert (await client.get("/api/v1/health")).status == 200


@given(
    records=st.lists(
        st.dictionaries(
            st.text(max_size=8),
            st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.text(max_size=8) | st.binary(max_size=20),
            max_size=8,
        ),
        max_size=5,
    )
)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
async def test_well_framed_batches_of_hostile_records_are_400(
    client: Any, store: SQLiteStore, token: str, records: list[dict[str, Any]]
) -> None:
    blobs = [msgpack.packb(r, use_bin_type=True) for r in records] or [b"\xc1"]
    body = wire.encode_batch(blobs, device_id="dev-1", batch_id="b", sent_us=1, codec="msgpack")
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 400
    assert store.record_count() == 0


async def test_health_is_open_and_tiny(client: Any) -> None:
    response = await client.get("/api/v1/health")
    assert response.status == 200 and len(await response.read()) < 100


async def test_read_endpoints_need_a_read_token_off_loopback(aiohttp_client, store: SQLiteStore, token: str) -> None:
    client = await aiohttp_client(create_app(Settings(host="0.0.0.0"), store))
    assert (await client.get("/api/v1/devices")).status == 401
    assert (await client.get("/api/v1/devices", headers=auth(token))).status == 403  # device tokens only write
    reader = store.add_token("grafana", "read", NOW)
    assert (await client.get("/api/v1/devices", headers=auth(reader))).status == 200
    response = await client.post("/api/v1/ingest", data=make_batch([]), headers=auth(reader))
    assert response.status == 403
    assert (await client.get("/api/v1/health")).status == 200


def test_store_schema_version_recorded_and_newer_refused(tmp_path: Path) -> None:
    import sqlite3

    path = tmp_path / "agg.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(SCHEMA_VERSION + 1),))
    conn.commit()
    conn.close()
    with pytest.raises(RuntimeError, match="newer than this aggregator"):
        SQLiteStore(path)
