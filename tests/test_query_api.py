"""The aggregator's read API: measurements by filter and time range, pages, CSV and NDJSON, summaries, bad input."""

from __future__ import annotations

import csv
import io
import json
import time
from pathlib import Path
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
from lens_core.stats import latency_distribution

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000


@pytest.fixture(params=["sqlite", "postgres"])
async def loaded(aiohttp_client, tmp_path: Path, request: pytest.FixtureRequest) -> tuple[Any, list[dict[str, Any]]]:
    """Two devices' records, in either storage backend: the read API answers the same from both."""
    if request.param == "sqlite":
        store: Any = SQLiteStore(tmp_path / "agg.db")
    else:
        from aggregator.pgstore import PostgresStore

        store = PostgresStore(request.getfixturevalue("pg_url"))
    client = await aiohttp_client(create_app(Settings(), store))
    everything = []
    for device in ("dev-a", "dev-b"):
        token = store.add_token(device, "device", NOW)
        records = synthetic_records(30, seed=hash(device) % 1000, device_id=device)
        assert (
            await client.post("/api/v1/ingest", data=make_batch(records, device=device), headers=auth(token))
        ).status == 200
        everything += records
    return client, everything


async def test_filter_by_device_and_page_through(loaded: tuple[Any, list[dict[str, Any]]]) -> None:
    client, records = loaded
    seen = []
    cursor = None
    while True:
        url = "/api/v1/measurements?device=dev-a&limit=7" + (f"&cursor={cursor}" if cursor else "")
        page = await (await client.get(url)).json()
        seen += page["measurements"]
        cursor = page["next_cursor"]
        if cursor is None:
            break
    expected = [r for r in records if r["device_id"] == "dev-a"]
    assert [m["id"] for m in seen] == [r["id"] for r in expected]
    # the stored record comes back in the measurement's own shape, with the aggregator's receive time
    first = seen[0]
    assert first["ttft_ms"] == expected[0]["ttft_ms"] and first["itl_ms"] == expected[0]["itl_ms"]
    assert first["received_at"].endswith("Z")


async def test_time_range(loaded: tuple[Any, list[dict[str, Any]]]) -> None:
    client, records = loaded
    times = sorted(r["started_at"] for r in records)
    since, until = times[10], times[40]
    page = await (await client.get(f"/api/v1/measurements?since={since}&until={until}&limit=1000")).json()
    got = sorted(m["started_at"] for m in page["measurements"])
    assert got == [t for t in times if since <= t < until]


async def test_csv_and_ndjson(loaded: tuple[Any, list[dict[str, Any]]]) -> None:
    client, _ = loaded
    response = await client.get("/api/v1/measurements?device=dev-b&format=csv&limit=1000")
    assert response.content_type == "text/csv"
    rows = list(csv.DictReader(io.StringIO(await response.text())))
    assert len(rows) == 30 and rows[0]["device_id"] == "dev-b" and "ttft_ms" in rows[0]
    # the same ids, booleans and times as the JSON answer
    page = await (await client.get("/api/v1/measurements?device=dev-b&limit=1000")).json()
    for row, measurement in zip(rows, page["measurements"], strict=True):
        assert row["id"] == measurement["id"] and row["ok"] == json.dumps(measurement["ok"])
        assert row["started_at"] == measurement["started_at"] and row["kind"] == measurement["kind"]
    text = await (await client.get("/api/v1/measurements?device=dev-b&format=ndjson&limit=5")).text()
    lines = [json.loads(line) for line in text.splitlines()]
    assert len(lines) == 5 and all(m["device_id"] == "dev-b" for m in lines)


async def test_summary_matches_the_statistics(loaded: tuple[Any, list[dict[str, Any]]]) -> None:
    client, records = loaded
    body = await (await client.get("/api/v1/summary?group_by=device")).json()
    group = body["groups"]["dev-a"]
    ok = [r for r in records if r["device_id"] == "dev-a" and r["ok"]]
    expected = latency_distribution(r["ttft_ms"] for r in ok)
    assert group["requests"] == 30
    assert group["latency_metrics"]["time_to_first_token"]["p95_ms"] == pytest.approx(expected["p95_ms"])
    assert sum(group["errors"].values()) == 30 - len(ok)
    fleet = await (await client.get("/api/v1/summary")).json()
    assert fleet["groups"]["all"]["requests"] == 60


@pytest.mark.parametrize(
    ("query", "parameter"),
    [
        ("since=yesterday", "since"),
        ("limit=0", "limit"),
        ("limit=many", "limit"),
        ("format=xml", "format"),
        ("since=2026-11-27T10:00:00Z&until=2026-11-27T09:00:00Z", "until"),
        ("devcie=dev-a", "devcie"),
    ],
)
async def test_bad_parameters_are_400_naming_them(
    loaded: tuple[Any, list[dict[str, Any]]], query: str, parameter: str
) -> None:
    client, _ = loaded
    response = await client.get(f"/api/v1/measurements?{query}")
    body = await response.json()
    assert response.status == 400 and body["parameter"] == parameter and parameter in body["error"]
    assert (await client.get("/api/v1/summary?group_by=colour")).status == 400


@pytest.mark.parametrize(
    ("path", "query", "parameter", "allowed"),
    [
        ("summary", "format=protobuf", "format", "json (the summary is JSON only"),
        ("summary", "format=zzz", "format", "json (the summary is JSON only"),
        ("summary", "format=csv&group_by=device", "format", "json (the summary is JSON only"),
        ("summary", "limit=5", "limit", "group_by"),
        ("summary", "order=newest", "order", "group_by"),
        ("measurements", "group_by=device", "group_by", "cursor"),
    ],
)
async def test_a_parameter_an_endpoint_does_not_serve_is_400_not_ignored(
    loaded: tuple[Any, list[dict[str, Any]]], path: str, query: str, parameter: str, allowed: str
) -> None:
    """The summary is JSON only: any other format (protobuf too) is a 400 naming the allowed value, never a JSON
    200 that looks like the format was honoured; a parameter of the other endpoint is refused the same way."""
    client, _ = loaded
    response = await client.get(f"/api/v1/{path}?{query}")
    body = await response.json()
    assert response.status == 400 and body["parameter"] == parameter, body
    assert f"{parameter}=" in body["error"] and allowed in body["error"], body
    answer = await client.get("/api/v1/summary?format=json&group_by=device&kind=inference")
    assert answer.status == 200 and (await answer.json())["groups"]["dev-a"]["requests"] == 30


@pytest.mark.parametrize("fmt", ["arrow", "parquet"])
async def test_arrow_and_parquet_exports(loaded: tuple[Any, list[dict[str, Any]]], fmt: str) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    client, records = loaded
    response = await client.get(f"/api/v1/measurements?device=dev-a&format={fmt}&limit=1000")
    assert response.status == 200
    data = await response.read()
    table = pa.ipc.open_stream(data).read_all() if fmt == "arrow" else pq.read_table(pa.BufferReader(data))
    expected = [r for r in records if r["device_id"] == "dev-a"]
    assert table.num_rows == len(expected)
    # UTC times, the record's kind, and the id as the JSON answer writes it
    assert table.schema.field("timestamp").type == pa.timestamp("ms", tz="UTC")
    assert table.schema.field("received_at").type == pa.timestamp("us", tz="UTC")
    assert table.schema.field("input_tokens").type == pa.uint32()
    first = table.slice(0, 1).to_pylist()[0]
    assert first["measurement_id"] == expected[0]["id"] and first["kind"] == expected[0]["kind"]
    assert first["timestamp"].utcoffset() is not None and first["timestamp"].utcoffset().total_seconds() == 0
    assert first["ttft_ms"] == expected[0]["ttft_ms"] and first["error_occurred"] is (not expected[0]["ok"])


async def test_newest_first_pages_back_through_everything(loaded: tuple[Any, list[dict[str, Any]]]) -> None:
    """order=newest: the latest first, and its cursor pages back to the oldest — the device page's newest 1000."""
    client, records = loaded
    oldest = await (await client.get("/api/v1/measurements?limit=1000")).json()
    received = [m["id"] for m in oldest["measurements"]]
    seen: list[str] = []
    cursor = ""
    while True:
        page = await (await client.get(f"/api/v1/measurements?order=newest&limit=7{cursor}")).json()
        seen += [m["id"] for m in page["measurements"]]
        if page["next_cursor"] is None:
            break
        cursor = f"&cursor={page['next_cursor']}"
    assert seen == received[::-1] and len(seen) == len(records)
    response = await client.get("/api/v1/measurements?order=sideways")
    body = await response.json()
    assert response.status == 400 and body["parameter"] == "order" and "newest" in body["error"]
