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
from aggregator.store import NULL_NAME, SCHEMA_VERSION, Query

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
    # the latest request ran last too (the window is by the device's clock: the requests that ran last)
    last = records_with("dev-a", 1, 2, 5000.0, model_name="m", strategy="local", started_at="2026-11-02T00:00:00Z")
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


def ran_at(hour: int, records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """``records`` run one after another from ``hour`` on 2026-11-01 (each batch after the one before: the window
    is by the time requests ran)."""
    for i, r in enumerate(records):
        r["started_at"] = f"2026-11-01T{hour:02d}:{i // 60:02d}:{i % 60:02d}Z"
    return records


async def test_models_and_strategies_are_separate_series(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("orin", "device", NOW)
    await send(
        client, token, "orin", ran_at(1, records_with("orin", 20, 1, 100.0, model_name="qwen", strategy="local"))
    )
    speculative = records_with("orin", 20, 2, 1000.0, model_name="qwen", strategy="speculative")
    await send(client, token, "orin", ran_at(2, speculative))
    await send(
        client, token, "orin", ran_at(3, records_with("orin", 20, 3, 50.0, model_name="smollm2", strategy="local"))
    )
    failing = records_with("orin", 10, 4, 0.0, model_name="smollm2", strategy="local")
    for r in failing[:4]:
        r.update({"ok": False, "error_type": "timeout", "ttft_ms": None})
    await send(client, token, "orin", ran_at(4, failing))
    nameless = records_with("orin", 3, 5, 70.0, model_name=None, strategy=None)
    await send(client, token, "orin", ran_at(5, nameless))
    await send(
        client, token, "orin", ran_at(6, records_with("orin", 5, 6, 40.0, model_name="smollm2", strategy="local"))
    )
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
        assert store.schema_version() == SCHEMA_VERSION  # upgraded through every migration, empty bodies and all
        got = {(s["strategy"], s["records"], s["first_seen_us"], s["last_seen_us"]) for s in store.series("dev-1")}
        assert got == {("local", 4, 101, 107), (NULL_NAME, 3, 102, 106)}
        assert len(store.latest(Query(device="dev-1", kind="inference", strategy=NULL_NAME), 10)) == 3
    finally:
        store.close()


def test_histogram_percentiles_stay_near_the_exact_ones() -> None:
    """Edge-shaped latencies (log-normal, medians across what devices measure): p95 read from the /metrics buckets
    as Prometheus interpolates is within 10 % of the exact p95 — the first release's buckets were off by up to 75 %."""
    import numpy as np

    from aggregator.metrics import TPOT_BUCKETS, TTFT_BUCKETS, bucket_counts, bucket_quantile

    rng = np.random.default_rng(7)
    for bounds, medians in (
        (TTFT_BUCKETS, [0.03, 0.07, 0.15, 0.3, 0.6, 1.2, 2.5]),
        (TPOT_BUCKETS, [0.003, 0.008, 0.02, 0.045, 0.1, 0.2]),
    ):
        for median in medians:
            values = rng.lognormal(np.log(median), 0.3, 4000)
            exact = float(np.quantile(values, 0.95))
            estimate = bucket_quantile(0.95, bounds, bucket_counts(values.tolist(), bounds))
            assert estimate is not None and abs(estimate - exact) / exact < 0.10, (median, estimate, exact)
    assert bucket_quantile(0.5, (1.0, 2.0), [0, 0, 0]) is None
    assert bucket_quantile(0.5, (1.0, 2.0), [0, 2, 0]) == 1.5  # linear inside (1, 2]
    assert bucket_quantile(0.99, (1.0, 2.0), [1, 0, 9]) == 2.0  # in +Inf: the highest finite bound


def test_latest_request_gauges_of_a_stopped_series_are_dropped() -> None:
    from aggregator.metrics import FleetMetrics
    from lens_core import wire

    now = [1000.0]
    metrics = FleetMetrics(stale_after_s=3600, clock=lambda: now[0])
    records = [wire.to_wire(r) for r in records_with("dev-a", 3, 1, 50.0, model_name="m", strategy="local")]
    for r in records:
        r["ext"] = {"energy": {"j_per_output_token": 0.2}}
    metrics.observe("dev-a", records)
    metrics.device("dev-a", {"pending_records": 3}, 1.0)
    text = metrics.exposition().decode()
    assert 'llm_latency_lens_tokens_per_second{device="dev-a"' in text
    assert 'llm_latency_lens_joules_per_output_token{device="dev-a"' in text
    now[0] += 3599
    assert 'llm_latency_lens_tokens_per_second{device="dev-a"' in metrics.exposition().decode()
    now[0] += 2
    text = metrics.exposition().decode()
    assert 'llm_latency_lens_tokens_per_second{device="dev-a"' not in text
    assert 'llm_latency_lens_joules_per_output_token{device="dev-a"' not in text
    # counters, histograms and the device's own gauges stay: they are what the "not seen" alert reads
    assert 'llm_latency_lens_requests_total{device="dev-a"' in text
    assert 'llm_latency_lens_device_last_seen_timestamp_seconds{device="dev-a"}' in text
    metrics.observe("dev-a", records)  # it came back: its gauges with it
    assert 'llm_latency_lens_tokens_per_second{device="dev-a"' in metrics.exposition().decode()


async def test_late_and_silent_follow_the_configuration(aiohttp_client: Any, store: Any) -> None:
    from aggregator.app import Settings

    client = await aiohttp_client(create_app(Settings(late_after_s=0.0, silent_after_s=3600.0), store))
    token = store.add_token("dev-1", "device", NOW)
    await send(client, token, "dev-1", records_with("dev-1", 2, 1, 10.0))
    body = await (await client.get("/api/v1/fleet")).json()
    assert body["late_after_s"] == 0.0 and body["silent_after_s"] == 3600.0
    assert body["devices"][0]["sync_health"] == "late"
    page = await (await client.get("/")).text()
    assert '"late_after_s": 0.0' in page


async def test_silence_is_judged_against_each_devices_own_schedule(aiohttp_client: Any, store: Any) -> None:
    """A device that says it sends every minute is late after a few silent minutes; one that sends hourly is not;
    one that never said is judged by fleet.late_after. Each batch replaces what was said before: a batch without
    the counter (a manual `lens-agent sync` without a schedule) clears it, so the device is not late forever."""
    from aggregator.fleet import Health, fleet_rows

    client = await aiohttp_client(create_app(Settings(late_after_s=3600.0), store))
    for device, gap in (("minutely", 60), ("hourly", 3600), ("quiet", None)):
        token = store.add_token(device, "device", NOW)
        counters = {"expected_gap_s": gap} if gap else {}
        body = make_batch(records_with(device, 2, 1, 10.0), device=device, counters=counters)
        assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    rows = {r["device_id"]: r for r in fleet_rows(store, time.time() + 600, health=Health(late_after_s=3600.0))}
    assert rows["minutely"]["expected_gap_s"] == 60 and rows["minutely"]["late_after_s"] == 180.0
    assert rows["minutely"]["sync_health"] == "late"  # 10 minutes without a batch, where 1 was expected
    assert rows["hourly"]["sync_health"] == "ok" and rows["hourly"]["late_after_s"] == 7260.0
    assert rows["quiet"]["sync_health"] == "ok" and rows["quiet"]["expected_gap_s"] is None
    body = await (await client.get("/api/v1/fleet")).json()
    assert {d["device_id"]: d["expected_gap_s"] for d in body["devices"]} == {
        "hourly": 3600,
        "minutely": 60,
        "quiet": None,
    }
    token = store.add_token("minutely", "device", NOW)  # a manual `lens-agent sync`: no schedule in the counters
    body = make_batch(records_with("minutely", 1, 2, 10.0), device="minutely")
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    rows = {r["device_id"]: r for r in fleet_rows(store, time.time() + 600, health=Health(late_after_s=3600.0))}
    assert rows["minutely"]["expected_gap_s"] is None and rows["minutely"]["late_after_s"] == 3600.0
    assert rows["minutely"]["sync_health"] == "ok"  # judged by fleet.late_after again, not "late" for ever
    body = make_batch(records_with("minutely", 1, 3, 10.0), device="minutely", counters={"expected_gap_s": 120})
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    assert store.device("minutely")["expected_gap_s"] == 120  # the next declaration replaces it


def test_the_joules_gauge_is_the_mean_of_the_latest_50_by_the_time_they_ran() -> None:
    """``llm_latency_lens_joules_per_output_token`` is the fleet page's J/token: the mean over the series' latest 50
    successful requests that carry energy, by when they ran — a late batch of old requests changes nothing."""
    from prometheus_client.parser import text_string_to_metric_families

    from aggregator.metrics import FleetMetrics
    from lens_core import wire

    def gauge(metrics: FleetMetrics) -> float:
        text = metrics.exposition().decode()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == "llm_latency_lens_joules_per_output_token" and sample.labels["device"] == "dev-a":
                    return float(sample.value)
        raise AssertionError("no joules gauge")

    metrics = FleetMetrics()
    records = [wire.to_wire(r) for r in records_with("dev-a", 80, 1, 50.0, model_name="m", strategy="local")]
    for i, r in enumerate(records):
        r["ext"] = {"energy": {"j_per_output_token": 0.1 + 0.01 * i}}
    metrics.observe("dev-a", records[30:])  # the latest 50, in one batch
    expected = sum(0.1 + 0.01 * i for i in range(30, 80)) / 50
    assert gauge(metrics) == pytest.approx(expected)
    metrics.observe("dev-a", records[:30])  # older requests delivered late: not among the latest 50
    assert gauge(metrics) == pytest.approx(expected)
    # two newer requests, one failed and one without energy: the latest 50 requests hold 48 with energy (what the
    # fleet rows and a restart's rebuild read: the latest requests of any outcome)
    newer = [wire.to_wire(r) for r in records_with("dev-a", 2, 2, 50.0, model_name="m", strategy="local")]
    for n, r in enumerate(newer):
        r["started_us"] = records[-1]["started_us"] + 1_000_000 * (n + 1)
    newer[0].update(ok=False, error_type="timeout", ext={"energy": {"j_per_output_token": 50.0}})
    newer[1]["ext"] = {}
    metrics.observe("dev-a", newer)
    assert gauge(metrics) == pytest.approx(sum(0.1 + 0.01 * i for i in range(32, 80)) / 48)
