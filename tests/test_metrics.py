"""GET /metrics: the fleet's figures in Prometheus format, valid for promtool, bounded in cardinality."""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.metrics import FleetMetrics
from aggregator.store import SQLiteStore

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000


@pytest.fixture
def store(tmp_path: Path) -> SQLiteStore:
    return SQLiteStore(tmp_path / "agg.db")


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def value(text: str, name: str, **labels: str) -> float:
    found = [v for (n, ls), v in samples(text).items() if n == name and all((k, v2) in ls for k, v2 in labels.items())]
    assert found, (name, labels)
    return sum(found)


async def test_metrics_after_ingest_and_retry(aiohttp_client, store: SQLiteStore) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    records = synthetic_records(20, seed=1, device_id="dev-1")
    body = make_batch(records, counters={"dropped_total": 3, "pending_records": 7})
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200  # a retry
    assert (await client.post("/api/v1/ingest", data=b"junk", headers=auth(token))).status == 400
    response = await client.get("/metrics")
    assert response.status == 200 and response.headers["Content-Type"].startswith("text/plain")
    text = await response.text()
    ok = [r for r in records if r["ok"]]
    model = records[0]["model_name"]
    # each record counted once, although the batch arrived twice
    assert value(text, "llm_latency_lens_requests_total", device="dev-1") == len(records)
    assert value(
        text,
        "llm_latency_lens_time_to_first_token_seconds_count",
        device="dev-1",
        model=model,
        provider="local",
        strategy="local",
    ) == len(ok)
    assert value(text, "llm_latency_lens_time_to_first_token_seconds_sum", device="dev-1") == pytest.approx(
        sum(r["ttft_ms"] for r in ok) / 1000, rel=1e-6
    )
    assert value(text, "llm_latency_lens_time_per_output_token_seconds_count", device="dev-1") == len(ok)
    assert value(text, "llm_latency_lens_request_duration_seconds_count", device="dev-1") == len(ok)
    assert value(text, "llm_latency_lens_ingest_records_total", result="duplicate") == 20
    assert value(text, "llm_latency_lens_ingest_records_total", result="accepted") == 20
    assert value(text, "llm_latency_lens_ingest_rejections_total", reason="malformed") == 1
    assert value(text, "llm_latency_lens_ingest_batches_total") == 2
    assert value(text, "llm_latency_lens_device_dropped_records", device="dev-1") == 3
    assert value(text, "llm_latency_lens_device_outbox_backlog_records", device="dev-1") == 7
    assert value(text, "llm_latency_lens_device_last_seen_timestamp_seconds", device="dev-1") > time.time() - 60
    devices = (await (await client.get("/api/v1/devices")).json())["devices"]
    assert devices[0]["backlog"] == 7


async def test_edge_figures(aiohttp_client, store: SQLiteStore) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    record = synthetic_records(1, seed=5, device_id="dev-1")[0]
    record["ok"], record["strategy"] = True, "speculative"
    record["ext"] = {"energy": {"j_per_output_token": 0.125}, "collab": {"acceptance_rate": 0.6}}
    assert (await client.post("/api/v1/ingest", data=make_batch([record]), headers=auth(token))).status == 200
    text = await (await client.get("/metrics")).text()
    assert value(text, "llm_latency_lens_joules_per_output_token", device="dev-1", provider="edge+cloud") == 0.125
    assert value(text, "llm_latency_lens_speculative_acceptance_rate", device="dev-1") == 0.6


def test_label_cardinality_is_bounded() -> None:
    metrics = FleetMetrics(max_series=3)
    for n in range(10):
        metrics.observe(f"dev-{n}", [{"kind": "inference", "ok": True, "ttft_us": 1000, "model_name": "m"}])
    text = metrics.exposition().decode()
    devices = {dict(ls).get("device") for (n, ls), _ in samples(text).items() if n == "llm_latency_lens_requests_total"}
    assert devices == {"dev-0", "dev-1", "dev-2", "other"}
    assert value(text, "llm_latency_lens_requests_total", device="other") == 7
    assert value(text, "llm_latency_lens_metric_series_overflow_total") == 7


async def test_metrics_need_a_read_token_off_loopback(aiohttp_client, store: SQLiteStore) -> None:
    client = await aiohttp_client(create_app(Settings(host="0.0.0.0"), store))
    assert (await client.get("/metrics")).status == 401
    reader = store.add_token("prometheus", "read", NOW)
    assert (await client.get("/metrics", headers=auth(reader))).status == 200


async def test_promtool_accepts_the_exposition(aiohttp_client, store: SQLiteStore, tmp_path: Path) -> None:
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    body = make_batch(synthetic_records(30, seed=2, device_id="dev-1"), counters={"pending_records": 1})
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    text = await (await client.get("/metrics")).read()
    done = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()


async def test_device_gauges_survive_an_aggregator_restart(aiohttp_client, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    token = store.add_token("dev-1", "device", NOW)
    first = await aiohttp_client(create_app(Settings(), store))
    body = make_batch(synthetic_records(2, seed=3, device_id="dev-1"), counters={"dropped_total": 9})
    assert (await first.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    again: Any = await aiohttp_client(create_app(Settings(), SQLiteStore(tmp_path / "agg.db")))
    text = await (await again.get("/metrics")).text()
    assert value(text, "llm_latency_lens_device_dropped_records", device="dev-1") == 9


async def test_a_partly_retried_batch_counts_only_its_new_records(aiohttp_client, store: SQLiteStore) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    records = synthetic_records(20, seed=4, device_id="dev-1")
    assert (await client.post("/api/v1/ingest", data=make_batch(records[:8]), headers=auth(token))).status == 200
    response = await client.post("/api/v1/ingest", data=make_batch(records), headers=auth(token))
    assert (await response.json())["duplicates"] == 8
    text = await (await client.get("/metrics")).text()
    assert value(text, "llm_latency_lens_requests_total", device="dev-1") == 20
