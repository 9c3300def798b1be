"""The device's history on the server (the timeline API), its health state and facts, and the device page drawn by
uPlot in headless Chromium — all through real ingest into a real store."""

from __future__ import annotations

import hashlib
import json
import statistics
import time
import uuid
import zlib
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.health import Health, facts_from_record
from aggregator.store import SCHEMA_VERSION, SQLiteStore, SyncRow
from aggregator.timeline import WIDTHS, bucket_width

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000
STATIC = Path(__file__).resolve().parents[1] / "aggregator" / "static"


def retime(records: list[dict[str, Any]], end: datetime, every_s: float) -> list[dict[str, Any]]:
    """The records spread ``every_s`` apart, the last one at ``end`` (weeks of history from one generator)."""
    start = end - timedelta(seconds=every_s * (len(records) - 1))
    for i, record in enumerate(records):
        when = start + timedelta(seconds=i * every_s)
        record["started_at"] = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
    return records


def facts_record(device: str, when: datetime, **device_facts: Any) -> dict[str, Any]:
    """A ``device_facts`` record as the agent's service stores it (a Measurement of that kind, ext.device)."""
    record = synthetic_records(1, seed=zlib.crc32(device.encode()), device_id=device)[0]  # a stable seed
    record.update(
        {
            "kind": "device_facts",
            "ok": True,
            "started_at": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
            "output_tokens": 0,
            "ttft_ms": None,
            "tpot_ms": None,
            "e2e_ms": None,
            "itl_ms": [],
            "decode_ms": None,
            "prefill_ms": None,
            "id": str(uuid.uuid4()),
            "ext": {"device": device_facts, "facts_reason": "first report"},
        }
    )
    return record


def us(iso: str) -> int:
    return int(datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp() * 1e6)


async def send(client: Any, token: str, device: str, records: list[dict[str, Any]], **counters: int) -> None:
    body = make_batch(records, device=device, counters=counters or None)
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 200, await response.text()


END = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(minutes=5)


async def test_the_timeline_is_bounded_and_exact_per_bucket(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("orin-017", "device", NOW)
    records = retime(synthetic_records(1500, seed=5, device_id="orin-017"), END, 20 * 60)  # 3 weeks, every 20 min
    for r in records[::3]:
        if r["ok"]:  # 0.04 J/token; 12 W on average over the request
            r["ext"] = {"energy": {"j_per_output_token": 0.04, "joules_total": 12.0 * r["e2e_ms"] / 1000}}
    for start in range(0, len(records), 500):
        await send(client, token, "orin-017", records[start : start + 500], pending_records=7)

    answer = await (await client.get("/api/v1/devices/orin-017/timeline?points=100")).json()
    assert answer["width_s"] in WIDTHS and len(answer["t"]) <= 100
    assert answer["width_s"] == bucket_width(7 * 86400, 100) == 3 * 3600  # the last 7 days in 3-hour buckets
    step = answer["width_s"] * 1_000_000
    assert answer["since_us"] % step == 0 and all((t * 1e6) % step == 0 for t in answer["t"])
    (series,) = answer["series"]
    assert series["model_name"] == records[0]["model_name"] and series["strategy"] == "local"
    in_range = [r for r in records if us(r["started_at"]) >= answer["since_us"]]
    assert sum(n or 0 for n in series["n"]) == len(in_range) == answer["rows_read"]
    assert sum(e or 0 for e in answer["errors"]) == sum(1 for r in in_range if not r["ok"])
    # one bucket, recomputed from the records themselves: exact percentiles, not histogram estimates
    i = len(answer["t"]) // 2
    cell = [
        r
        for r in in_range
        if answer["since_us"] + i * step <= us(r["started_at"]) < answer["since_us"] + (i + 1) * step
    ]
    ttfts = sorted(r["ttft_ms"] for r in cell if r["ok"])
    assert series["n"][i] == len(cell) > 3
    assert series["ttft_p95"][i] == pytest.approx(statistics.quantiles(ttfts, n=100, method="inclusive")[94], abs=1e-3)
    assert series["ttft_p50"][i] == pytest.approx(statistics.median(ttfts), abs=1e-3)
    assert series["j_per_token"][i] == pytest.approx(0.04) and answer["syncs"]["backlog"][-1] == 7
    assert series["power_w"][i] == pytest.approx(12.0, abs=0.01)

    # the whole history in at most 240 buckets: the page weighs the same whatever the history
    since = us(records[0]["started_at"]) / 1e6
    whole = await (await client.get(f"/api/v1/devices/orin-017/timeline?since={since}")).json()
    assert len(whole["t"]) <= 240 and sum(n or 0 for n in whole["series"][0]["n"]) == len(records)

    # a live update fetches the tail only: the same buckets, recomputed, from the last filled one's start (the
    # newest bucket may be empty: a bucket boundary can pass between the last record and the query)
    k = max(j for j, n in enumerate(series["n"]) if n)
    tail = await (
        await client.get(f"/api/v1/devices/orin-017/timeline?since={answer['t'][k]}&width={answer['width_s']}")
    ).json()
    assert tail["t"] == answer["t"][k:] and tail["series"][0]["n"] == series["n"][k:]
    assert tail["series"][0]["ttft_p95"] == series["ttft_p95"][k:]


async def test_the_default_range_reaches_the_newest_batch_when_requests_stopped_earlier(
    aiohttp_client: Any, store: Any
) -> None:
    """Requests timed by the device's clock end a day ago; the batches since, timed by the aggregator's, still
    arrive (every run skipped, say): the default range ends after the newest batch, so its backlog is drawn."""
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("orin-018", "device", NOW)
    day_ago = datetime.now(timezone.utc).replace(microsecond=0) - timedelta(days=1)
    await send(client, token, "orin-018", retime(synthetic_records(30, seed=3, device_id="orin-018"), day_ago, 60))
    await send(client, token, "orin-018", [], pending_records=41)
    (latest,) = store.syncs("orin-018", limit=1)

    answer = await (await client.get("/api/v1/devices/orin-018/timeline")).json()
    assert answer["until_us"] > latest.received_us >= answer["since_us"]
    assert [b for b in answer["syncs"]["backlog"] if b is not None][-1] == 41
    assert sum(n or 0 for n in answer["series"][0]["n"]) == 30  # the requests of a day ago are still in the range


async def test_timeline_parameters_are_checked(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    await send(client, token, "dev-1", retime(synthetic_records(20, seed=1, device_id="dev-1"), END, 60))
    for query, name in (
        ("width=7", "width"),
        ("points=1", "points"),
        ("points=abc", "points"),
        ("since=yesterday", "since"),
        ("since=2026-12-01T00:00:00Z&until=2026-11-01T00:00:00Z", "since"),
        ("width=60&since=2020-01-01T00:00:00Z", "width"),  # six years in minutes: more buckets than allowed
        ("colour=red", "colour"),
    ):
        response = await client.get(f"/api/v1/devices/dev-1/timeline?{query}")
        body = await response.json()
        assert response.status == 400 and body["parameter"] == name, (query, body)
    # a device whose every run was skipped sent facts and batches, no requests: its range ends now, not in 1970
    hot = store.add_token("hot-1", "device", NOW)
    await send(client, hot, "hot-1", [facts_record("hot-1", END, temperatures_c={"cpu": 99.0})], pending_records=0)
    quiet = await (await client.get("/api/v1/devices/hot-1/timeline")).json()
    assert abs(quiet["until_us"] - time.time_ns() // 1000) < 60 * 10**6 and quiet["series"] == []
    assert 99.0 in quiet["facts"]["temperature_max_c"] and quiet["syncs"]["batches"][-1] == 1
    assert (await client.get("/device/hot-1")).status == 200
    missing = await client.get("/api/v1/devices/nobody/timeline")
    assert missing.status == 404 and "nobody" in (await missing.json())["error"]


def test_health_states_and_their_reasons() -> None:
    health = Health(late_after_s=3600, silent_after_s=86400)
    row = {"sync_health": "ok", "last_seen_age_s": 30.0, "expected_gap_s": 900, "error_rate": 0.0, "requests": 50}

    def syncs(*values: tuple[int, int, int]) -> list[SyncRow]:
        return [SyncRow("d", NOW + i * 10**9, f"b{i}", 100, 100, *v) for i, v in enumerate(values)]

    assert health.assess(row, syncs((0, 0, 0), (0, 0, 0), (0, 0, 0)), None) == ("ok", [])
    state, reasons = health.assess(row, syncs((100, 0, 0), (600, 0, 0), (1100, 0, 0), (1600, 0, 0)), None)
    assert state == "warning" and reasons == ["backlog growing: 100 → 1600 records over 4 batches"]
    assert health.assess(row, syncs((0, 0, 0), (90, 0, 0), (0, 0, 0)), None) == ("ok", [])  # drained again
    state, reasons = health.assess(row, syncs((4000, 10, 0), (4100, 360, 2)), None)
    assert state == "critical" and reasons[0].startswith("its outbox dropped 350 records")
    assert reasons[1].startswith("2 records quarantined")
    assert health.assess({**row, "error_rate": 0.06}, [], None) == ("ok", [])  # 3 of 50: chance, at 1 % failures
    assert health.assess({**row, "error_rate": 0.22}, [], None) == (
        "warning",
        ["22% of its latest 50 requests failed"],
    )
    assert health.assess({**row, "error_rate": 0.3}, [], None)[0] == "critical"
    throttled = {"thermal_throttling": ["CPU-therm at 97.0 °C ≥ passive trip 95.0 °C"]}
    assert health.assess(row, [], throttled) == (
        "warning",
        ["thermally throttled: " + throttled["thermal_throttling"][0]],
    )
    state, reasons = health.assess({**row, "sync_health": "silent", "last_seen_age_s": 2 * 86400}, [], None)
    assert state == "critical" and reasons == ["silent: no batch for 2 days"]
    state, reasons = health.assess(
        {**row, "sync_health": "late", "last_seen_age_s": 7200}, [], None, ["TPOT +80 % on d since x (model …)"]
    )
    assert state == "warning" and reasons == [
        "late: no batch for 2 h (it syncs every 15 min)",
        "regression: TPOT +80 % on d since x",
    ]


def test_facts_from_hostile_records_keep_only_what_checks_out() -> None:
    assert facts_from_record(None) is None and facts_from_record({"ext": {"device": "x"}}) is None
    facts = facts_from_record(
        {
            "started_us": 5,
            "ext": {
                "device": {
                    "device_class": ["not", "text"],
                    "model": "x" * 10_000,
                    "ram_gb": float("nan"),
                    "power_mode": "MAXN",
                    "power_mode_id": "0",
                    "temperatures_c": {
                        "cpu": 51.5,
                        "gpu": "hot",
                        "soc": float("inf"),
                        **{f"z{i}": 30 for i in range(100)},
                    },
                    "cpu_freq_mhz": {"cpu0": 1510.4, "cpu1": True},
                    "thermal_throttling": ["cpu at 99 °C", 7, None],
                    "clock_synchronized": "yes",
                }
            },
        }
    )
    assert facts is not None
    assert facts["device_class"] is None and len(facts["model"]) == 256 and facts["ram_gb"] is None
    assert facts["power_mode"] == "MAXN" and facts["power_mode_id"] is None
    assert (
        facts["temperatures_c"]["cpu"] == 51.5
        and "gpu" not in facts["temperatures_c"]
        and len(facts["temperatures_c"]) <= 64
    )
    assert facts["temperature_max_c"] == 51.5 and facts["cpu_freq_mhz_max"] == 1510.4
    assert facts["thermal_throttling"] == ["cpu at 99 °C"] and facts["clock_synchronized"] is None
    json.dumps(facts, allow_nan=False)


async def test_facts_and_health_reach_the_fleet_row(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    hot, full = store.add_token("orin-hot", "device", NOW), store.add_token("orin-full", "device", NOW)
    records = retime(synthetic_records(60, seed=2, device_id="orin-hot"), END, 60)
    facts = {
        "device_class": "embedded device",
        "model": "NVIDIA Jetson AGX Orin Developer Kit",
        "power_mode": "MAXN",
        "power_mode_id": 0,
        "temperatures_c": {"CPU-therm": 97.2, "GPU-therm": 88.0},
        "cpu_freq_mhz": {"cpu0": 2201.6, "cpu1": 1113.6},
        "thermal_throttling": ["CPU-therm at 97.2 °C ≥ passive trip 95.0 °C"],
        "clock_synchronized": True,
    }
    await send(client, hot, "orin-hot", [*records, facts_record("orin-hot", END, **facts)])
    # a device whose outbox fills: backlog grows batch after batch, then the outbox drops the oldest
    batches = [
        retime(synthetic_records(40, seed=10 + i, device_id="orin-full"), END - timedelta(hours=4 - i), 30)
        for i in range(4)
    ]
    for i, batch in enumerate(batches):
        await send(client, full, "orin-full", batch, pending_records=500 + 900 * i, dropped_total=0 if i < 3 else 120)
    rows = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    row = rows["orin-hot"]
    assert row["device_class"] == "embedded device" and row["power_mode"] == "MAXN"
    assert row["temperature_max_c"] == 97.2 and row["facts"]["cpu_freq_mhz_max"] == 2201.6
    assert row["health"] == "warning" and row["health_reasons"] == [
        "thermally throttled: " + facts["thermal_throttling"][0]
    ]
    assert row["records"] == 61 and row["series"][0]["records"] == 60  # the facts record is not a request
    full_row = rows["orin-full"]
    assert full_row["health"] == "critical" and full_row["device_class"] is None
    assert full_row["health_reasons"][0] == "its outbox dropped 120 records in 0 s (full: data lost)"
    assert "backlog growing: 500 → 3200 records over 4 batches" in full_row["health_reasons"]
    # the device page shows them, with the latest batches and the temperature over time
    page = await (await client.get("/device/orin-hot")).text()
    data = json.loads(page.split("const initial = ", 1)[1].split(";\n", 1)[0])
    assert data["device"]["facts"]["model"] == facts["model"] and data["recent_syncs"][0]["records"] == 61
    assert max(t for t in data["timeline"]["facts"]["temperature_max_c"] if t is not None) == 97.2
    assert any(data["timeline"]["facts"]["throttled"])


async def test_energy_is_searched_for_change_points(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store))
    token = store.add_token("orin-005", "device", NOW)
    records = retime(synthetic_records(300, seed=9, device_id="orin-005"), END, 600)
    # J/token 1.6× from request 130 on (a power mode change, 28 h before the newest request: a series of two days
    # reports a change once it has lasted a day), latency unchanged
    for i, r in enumerate(records):
        r["ext"] = {"energy": {"j_per_output_token": (0.05 if i < 130 else 0.08) * (1 + 0.02 * ((i * 7) % 5 - 2))}}
    await send(client, token, "orin-005", records)
    body = await (await client.get("/api/v1/regressions")).json()
    (found,) = [r for r in body["regressions"] if r["metric"] == "j_per_token"]
    assert found["change"] == pytest.approx(0.6, abs=0.1) and abs(found["requests_before"] - 130) <= 3
    assert found["summary"].startswith("J/token +6")
    assert abs(found["since_us"] - us(records[130]["started_at"])) <= 3 * 600 * 10**6  # within three requests


def test_schema_4_backfills_energy_and_starts_the_sync_history(tmp_path: Path) -> None:
    """An aggregator upgraded in place: J/token moves into a column for the records it already stored."""
    path = tmp_path / "agg.db"
    store = SQLiteStore(path)
    records = synthetic_records(30, seed=4, device_id="dev-1")
    for r in records[:10]:
        r["ext"] = {"energy": {"j_per_output_token": 0.07, "joules_total": 2.5}}
    from aggregator.app import _row
    from lens_core import wire

    rows = [_row(wire.to_wire(r), "cbor", wire.encode_record(r, "cbor")) for r in records]
    store.ingest("dev-1", "b", 0, {"pending_records": 3}, rows, NOW)
    store.close()
    import sqlite3

    conn = sqlite3.connect(path)  # back to schema 3: no column values, no sync history
    conn.executescript(
        "DROP TABLE syncs; ALTER TABLE measurements DROP COLUMN j_per_token; "
        "ALTER TABLE measurements DROP COLUMN power_w; ALTER TABLE measurements DROP COLUMN settings; "
        "UPDATE meta SET value = '3' WHERE key = 'schema_version';"
    )
    conn.close()
    upgraded = SQLiteStore(path)
    assert upgraded.schema_version() == SCHEMA_VERSION
    values = upgraded._read("SELECT j_per_token, power_w FROM measurements ORDER BY seq")
    expected = [0.07 if i < 10 and r["ok"] else None for i, r in enumerate(records)]
    assert [v[0] for v in values] == expected
    watts = [2.5 / (r["e2e_ms"] / 1000) if i < 10 and r["ok"] else None for i, r in enumerate(records)]
    assert [v[1] for v in values] == pytest.approx(watts, abs=1e-3)
    assert upgraded.syncs("dev-1") == []
    upgraded.close()


def test_postgres_schema_4_backfills_energy_and_power(pg_url: str) -> None:
    """The same upgrade in place on PostgreSQL, with records in it."""
    import psycopg

    from aggregator.app import _row
    from aggregator.pgstore import PostgresStore
    from lens_core import wire

    store = PostgresStore(pg_url)
    records = synthetic_records(12, seed=6, device_id="dev-1")
    for r in records[:6]:
        r["ext"] = {"energy": {"j_per_output_token": 0.05, "joules_total": 1.5}}
    rows = [_row(wire.to_wire(r), "cbor", wire.encode_record(r, "cbor")) for r in records]
    store.ingest("dev-1", "b", 0, {"pending_records": 4, "dropped_total": 2}, rows, NOW)
    assert store.syncs("dev-1") == [SyncRow("dev-1", NOW, "b", 12, 12, 4, 2, None)]  # quarantine not reported
    store.close()
    with psycopg.connect(pg_url, autocommit=True) as conn:
        conn.execute(
            "DROP TABLE syncs; ALTER TABLE measurements DROP COLUMN j_per_token; "
            "ALTER TABLE measurements DROP COLUMN power_w; UPDATE meta SET value = '3' WHERE key = 'schema_version'"
        )
    upgraded = PostgresStore(pg_url)
    try:
        assert upgraded.schema_version() == SCHEMA_VERSION
        values = upgraded._read("SELECT j_per_token, power_w FROM measurements ORDER BY seq")
        assert [v[0] for v in values] == [0.05 if i < 6 and r["ok"] else None for i, r in enumerate(records)]
        watts = [1.5 / (r["e2e_ms"] / 1000) if i < 6 and r["ok"] else None for i, r in enumerate(records)]
        assert [v[1] for v in values] == pytest.approx(watts, abs=1e-3)
        assert upgraded.syncs("dev-1") == [] and upgraded.device("dev-1") is not None
    finally:
        upgraded.close()


def test_the_vendored_charting_library_is_the_named_release() -> None:
    """uPlot as `make vendor-uplot` brings it from the npm registry (MIT; its licence beside it)."""
    makefile = (Path(__file__).resolve().parents[1] / "Makefile").read_text()
    version = makefile.split("UPLOT := ", 1)[1].split()[0]
    script = (STATIC / "uPlot.iife.min.js").read_text()
    assert script.startswith(f"/*! https://github.com/leeoniya/uPlot (v{version}) */")
    assert "MIT License" in (STATIC / "uPlot.LICENSE.txt").read_text()
    assert hashlib.sha256((STATIC / "uPlot.min.css").read_bytes()).hexdigest()  # present and readable


async def test_static_serves_only_the_vendored_assets(aiohttp_client: Any, tmp_path: Path) -> None:
    client = await aiohttp_client(create_app(Settings(), SQLiteStore(tmp_path / "agg.db")))
    script = await client.get("/static/uPlot.iife.min.js")
    assert script.status == 200 and script.headers["Content-Type"].startswith("text/javascript")
    assert script.headers["Cache-Control"] == "public, max-age=86400"
    for name in ("app.py", "..%2Fstore.py", "%2E%2E%2Fapp.py", ".hidden.js", "missing.js", "uPlot.LICENSE"):
        assert (await client.get(f"/static/{name}")).status == 404, name
