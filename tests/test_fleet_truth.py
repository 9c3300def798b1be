"""Fleet figures that are true whatever the other devices send (issue 15): every "latest N" is per device and per
series (model × strategy) and really the latest; percentiles are exact; an unknown device is a 404; an empty fleet
says how to add a device; exports agree on ids, booleans, times and kinds. Real ingest over HTTP, both stores."""

from __future__ import annotations

import statistics
import time
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import NULL_NAME, Query

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000


def records_with(device: str, n: int, seed: int, ttft_ms: float, **fields: Any) -> list[dict[str, Any]]:
    """``n`` successful inference records of ``device`` whose TTFT is ``ttft_ms`` (+ a little), e2e 1 s."""
    records = synthetic_records(n, seed=seed, device_id=device)
    for i, r in enumerate(records):
        r.update({"ok": True, "error_type": None, "kind": "inference", "ttft_ms": ttft_ms + i * 0.01, **fields})
    return records


async def send(client: Any, token: str, device: str, records: list[dict[str, Any]]) -> None:
    body = make_batch(records, device=device)
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 200, await response.text()


async def fleet(client: Any) -> dict[str, dict[str, Any]]:
    return {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}


async def test_latest_figures_are_each_devices_own(aiohttp_client: Any, store: Any) -> None:
    """dev-a 50 records, dev-b 1000, dev-a 1 more: dev-a's figures are over its own latest 50, not its last upload."""
    client = await aiohttp_client(create_app(Settings(), store))
    a, b = store.add_token("dev-a", "device", NOW), store.add_token("dev-b", "device", NOW)
    first = records_with("dev-a", 50, 1, 100.0, model_name="m", strategy="local")
    await send(client, a, "dev-a", first)
    for chunk in range(4):
        await send(client, b, "dev-b", records_with("dev-b", 250, 10 + chunk, 900.0, model_name="m", strategy="local"))
    last = records_with("dev-a", 1, 2, 5000.0, model_name="m", strategy="local")
    await send(client, a, "dev-a", last)
    row = (await fleet(client))["dev-a"]
    window = sorted(r["ttft_ms"] for r in (first + last)[-50:])
    exact = statistics.quantiles(window, n=100, method="inclusive")[94]
    assert row["requests"] == 50 and row["ttft_p95_ms"] == pytest.approx(exact, abs=1e-3)
    assert 100 < row["ttft_p95_ms"] < 5000  # neither the lone 5 s record nor dev-b's 900 ms
    (series,) = row["series"]
    assert (
        series["requests"] == 50
        and series["records"] == 51
        and series["ttft_p50_ms"] == pytest.approx(statistics.median(window), abs=1e-3)
    )
    # the store's own reads: the latest N of one device, whatever was received in between
    latest = store.latest(Query(device="dev-a", kind="inference"), 50)
    assert [bytes(r["id"]).hex() for r in latest][-1] == last[0]["id"].replace("-", "")
    assert len(latest) == 50 and all(r["device_id"] == "dev-a" for r in latest)


async def test_models_and_strategies_are_separate_series(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("orin", "device", NOW)
    await send(client, token, "orin", records_with("orin", 20, 1, 100.0, model_name="qwen", strategy="local"))
    await send(client, token, "orin", records_with("orin", 20, 2, 1000.0, model_name="qwen", strategy="speculative"))
    await send(client, token, "orin", records_with("orin", 20, 3, 50.0, model_name="smollm2", strategy="local"))
    failing = records_with("orin", 10, 4, 0.0, model_name="smollm2", strategy="local")
    for r in failing[:4]:
        r.update({"ok": False, "error_type": "timeout", "ttft_ms": None})
    await send(client, token, "orin", failing)
    nameless = records_with("orin", 3, 5, 70.0, model_name=None, strategy=None)
    await send(client, token, "orin", nameless)
    await send(client, token, "orin", records_with("orin", 5, 6, 40.0, model_name="smollm2", strategy="local"))
    row = (await fleet(client))["orin"]
    series = {(s["model_name"], s["strategy"]): s for s in row["series"]}
    assert set(series) == {("qwen", "local"), ("qwen", "speculative"), ("smollm2", "local"), (None, None)}
    assert series[("qwen", "speculative")]["ttft_p95_ms"] > 1000 > series[("qwen", "local")]["ttft_p95_ms"] > 100
    smol = series[("smollm2", "local")]
    assert smol["requests"] == 35 and smol["errors"] == 4 and smol["error_rate"] == pytest.approx(4 / 35)
    assert series[(None, None)]["requests"] == 3 and series[(None, None)]["ttft_p50_ms"] == pytest.approx(70.01)
    # the device's current series is that of its latest request; by_strategy is that model's
    assert row["model"] == "smollm2" and row["strategy"] == "local"
    assert row["ttft_p95_ms"] == smol["ttft_p95_ms"] and set(row["by_strategy"]) == {"local"}
    assert row["errors"] == 4 and row["error_rate"] == pytest.approx(4 / 50)
    assert any(s["model_name"] == NULL_NAME for s in store.series("orin"))  # stored as the NULL marker


async def test_unknown_device_page_is_a_404_and_an_empty_fleet_says_how_to_start(
    aiohttp_client: Any, store: Any
) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    page = await (await client.get("/")).text()
    assert '<div class="hint" id="empty" hidden>' in page and "lens-aggregator token add DEVICE_ID" in page
    assert '<meta name="viewport" content="width=device-width, initial-scale=1">' in page
    missing = await client.get("/device/no-such-device")
    text = await missing.text()
    assert missing.status == 404 and "No such device" in text and '"no-such-device"' in text
    hostile = await client.get("/device/%3C%2Fscript%3E%3Cscript%3Ealert(1)%3C%2Fscript%3E")
    assert hostile.status == 404 and "</script><script>alert(1)" not in await hostile.text()
    token = store.add_token("dev-1", "device", NOW)
    await send(client, token, "dev-1", records_with("dev-1", 3, 1, 10.0))
    assert (await client.get("/device/dev-1")).status == 200


def test_a_version_1_database_gets_its_series_on_upgrade(tmp_path: Any) -> None:
    """A database written before series existed (schema 1, records in it): opening it backfills the series."""
    import sqlite3

    from aggregator.store import MIGRATIONS, SQLiteStore
    from lens_core.sqlite_schema import migrate_forward

    path = tmp_path / "v1.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate_forward(conn, {1: MIGRATIONS[1]}, RuntimeError)
    rows = [
        (bytes([i]) * 16, "dev-1", "r", "inference", i, 1, "local" if i % 2 else None, "m", 100 + i)
        for i in range(1, 8)
    ]
    conn.executemany(
        "INSERT INTO measurements (id, device_id, run_id, kind, started_us, ok, strategy, model_name, received_us, "
        "batch_id, codec, body) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, 'b', 'cbor', x'')",
        rows,
    )
    conn.close()
    store = SQLiteStore(path)
    try:
        assert store.schema_version() == 2
        got = {(s["strategy"], s["records"], s["first_seen_us"], s["last_seen_us"]) for s in store.series("dev-1")}
        assert got == {("local", 4, 101, 107), (NULL_NAME, 3, 102, 106)}
        assert len(store.latest(Query(device="dev-1", kind="inference", strategy=NULL_NAME), 10)) == 3
    finally:
        store.close()
