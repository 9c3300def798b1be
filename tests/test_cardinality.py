"""One device floods the aggregator with label values: /metrics, its build, the health endpoint and every read stay
bounded (docs/metrics.md#cardinality).

The overflow rule and the bounds are tested as pure functions first; then a real ``lens-aggregator serve`` takes a
flood of thousands of distinct model names, strategies, error types and engine settings from one device token, and
is scraped and read while it answers ``/api/v1/health``.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import shutil
import statistics
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from aggregator.metrics import (
    OTHER,
    ExpositionCache,
    FleetMetrics,
    SeriesBudget,
    clean_label,
    fold,
    fold_summary,
)
from aggregator.reads import BoundedStore, Deadline, bound_series, bounded
from aggregator.store import QueryTimeout, SQLiteStore

from .guardrail_export_records import guardrails
from .hostile_device import encode_raw, raw_batch, valid_wire
from .processes import AggregatorProcess, device_token

DEVICE = "dev-1"  # processes.device_token's device


# -- the overflow rule, as pure functions --------------------------------------------------------------------------
def test_fold_makes_every_device_sent_label_other_and_keeps_the_aggregators_own() -> None:
    assert fold(("dev-1", "m", "local", "s"), (True, True, True, True)) == (OTHER,) * 4
    assert fold(("slow-ttft", "dev-1", "m", "n_batch=8"), (False, True, True, True)) == ("slow-ttft", *(OTHER,) * 3)
    assert fold(("dev-1", "m", "s", "ttft_ms"), (True, True, True, False)) == (OTHER, OTHER, OTHER, "ttft_ms")


def test_clean_label_removes_c0_del_and_c1_and_cuts() -> None:
    assert clean_label("red\x1b[31m\x07bell\r\n\x7f\x85\x9fok", 128) == ("red[31mbellok", True, False)
    assert clean_label("plain", 128) == ("plain", False, False)
    assert clean_label("\x1b\x07", 128) == ("unknown", True, False)
    # invisible characters that make two labels look alike or reorder a dashboard's text
    assert clean_label("Smol\u200bLM2\ufeff\u202e\u2028\u2066x", 128) == ("SmolLM2x", True, False)
    assert clean_label("SmolLM2 — ünïcode 模型", 128) == ("SmolLM2 — ünïcode 模型", False, False)
    assert clean_label("é" * 20, 8) == ("é" * 7 + "…", False, True)  # printable non-ASCII stays


def test_budget_bounds_each_device_then_the_whole() -> None:
    budget = SeriesBudget(max_total=5, max_per_device=3, clock=lambda: 1000.0)
    assert [budget.admit("a", ("requests", "a", f"m{i}")) for i in range(4)] == [None, None, None, "per_device"]
    assert budget.admit("a", ("requests", "a", "m0")) is None  # tracked already
    assert [budget.admit("b", ("requests", "b", f"m{i}")) for i in range(3)] == [None, None, "global"]
    assert len(budget) == 5 and budget.tracked("a") == 3 and budget.tracked("b") == 2
    budget.release("a", ("requests", "a", "m0"))  # a gauge removed gives its place back
    assert budget.admit("b", ("requests", "b", "m2")) is None
    assert budget.device_status("a") is None  # nothing of it folded yet
    budget.folded("a", "per_device", 7)
    budget.folded("a", "global", 2)
    status = budget.device_status("a")
    assert status is not None
    assert status["folded_observations"] == 9 and status["folded_by_reason"] == {"per_device": 7, "global": 2}
    assert status["summary"] == fold_summary(9, "global", 3, 5)
    assert "per-device bound (3 label sets" in fold_summary(7, "per_device", 3, 5)


def test_budget_keeps_fold_counts_of_at_most_max_total_devices() -> None:
    budget = SeriesBudget(max_total=2, max_per_device=1)
    for n in range(10):
        budget.folded(f"d{n}", "global", 1)
    assert budget.device_status("d0") is not None and budget.device_status("d1") is not None
    assert budget.device_status("d5") is None
    other = budget.device_status(OTHER)
    assert other is not None and other["folded_observations"] == 8


def _inference(model: str, strategy: str = "local", ok: bool = True, error: str | None = None) -> dict[str, Any]:
    return {
        "kind": "inference",
        "ok": ok,
        "model_name": model,
        "strategy": strategy,
        "error_type": error,
        "ttft_us": 50_000,
        "tpot_us": 10_000,
        "e2e_us": 600_000,
        "output_tokens": 60,
    }


def _label_sets(text: str, name: str) -> list[dict[str, str]]:
    return [
        dict(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


def test_one_device_flood_is_folded_whole_and_counted() -> None:
    metrics = FleetMetrics(max_series=100, max_series_per_device=10)
    flood = [_inference(f"model-{i}", f"strategy-{i % 7}", ok=i % 2 == 0, error=f"err-{i}") for i in range(500)]
    metrics.observe("dev-a", flood)
    metrics.observe("dev-b", [_inference("steady")])  # another device still gets its own series
    text = metrics.exposition().decode()
    requests = _label_sets(text, "llm_latency_lens_requests_total")
    failed = _label_sets(text, "llm_latency_lens_requests_failed_total")
    mine = [s for s in requests + failed if s["device"] == "dev-a"]
    assert len(mine) == 10  # the per-device bound, across label shapes
    folded = [s for s in requests + failed if s["device"] == OTHER]
    assert folded and all(set(s.values()) == {OTHER} for s in folded)  # every device-sent label, not only device
    assert {"device": "dev-b", "model": "steady", "provider": "local", "strategy": "local"} in requests
    overflow = {s["reason"]: v for s, v in _samples(text, "llm_latency_lens_metric_series_overflow_total")}
    assert overflow["per_device"] > 0 and overflow["global"] == 0
    total = sum(v for s, v in _samples(text, "llm_latency_lens_requests_total"))
    assert total == 501  # nothing lost: folded observations are counted under "other"
    status = metrics.budget.device_status("dev-a")
    assert status is not None and status["folded_observations"] == overflow["per_device"]
    assert metrics.budget.device_status("dev-b") is None


def test_the_global_bound_folds_new_devices() -> None:
    metrics = FleetMetrics(max_series=3, max_series_per_device=2)
    for n in range(6):
        metrics.observe(f"dev-{n}", [_inference("m")])
    text = metrics.exposition().decode()
    devices = {s["device"] for s in _label_sets(text, "llm_latency_lens_requests_total")}
    assert devices == {"dev-0", "dev-1", "dev-2", OTHER}
    overflow = {s["reason"]: v for s, v in _samples(text, "llm_latency_lens_metric_series_overflow_total")}
    assert overflow == {"per_device": 0, "global": 3}


def test_trigger_and_regression_gauges_are_bounded_and_give_places_back() -> None:
    from types import SimpleNamespace

    metrics = FleetMetrics(max_series=50, max_series_per_device=5)
    trigger = SimpleNamespace(name="slow")
    holding = [SimpleNamespace(trigger=trigger, series=("dev-a", f"m{i}", f"n_batch={i}")) for i in range(20)]
    metrics.triggers(holding, [])
    text = metrics.exposition().decode()
    firing = _label_sets(text, "llm_latency_lens_trigger_firing")
    assert len([s for s in firing if s["device"] == "dev-a"]) == 5
    assert {"trigger": "slow", "device": OTHER, "model": OTHER, "settings": OTHER} in firing
    metrics.triggers([], [])  # nothing holds any more: the series go, their places with them
    assert _label_sets(metrics.exposition().decode(), "llm_latency_lens_trigger_firing") == []
    assert metrics.budget.tracked("dev-a") == 0
    found = [
        {"kind": "regression", "device_id": "dev-a", "model_name": f"m{i}", "strategy": "s", "metric": "ttft_ms",
         "change": 0.5}
        for i in range(9)
    ]  # fmt: skip
    metrics.regressions(found)
    ratios = _label_sets(metrics.exposition().decode(), "llm_latency_lens_regression_change_ratio")
    assert len(ratios) == 6 and {"device": OTHER, "model": OTHER, "strategy": OTHER, "metric": "ttft_ms"} in ratios


def _samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(sample.labels), sample.value)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name
    ]


async def test_concurrent_scrapes_share_one_build_and_a_recent_one_is_reused() -> None:
    """A build of 0.2 s is reused for 10 × 0.2 s, within max_age; a build is never reused past max_age."""
    builds = 0

    def build() -> bytes:
        nonlocal builds
        builds += 1
        time.sleep(0.2)
        return b"x %d\n" % builds

    now = [0.0]
    cache = ExpositionCache(build, max_age_s=5.0, clock=lambda: now[0])
    capped = ExpositionCache(build, max_age_s=1.0, clock=lambda: now[0])
    try:
        bodies = await asyncio.gather(*(cache.get() for _ in range(8)))
        assert builds == 1 and set(bodies) == {b"x 1\n"}
        # the build's 0.2 s as measured, with room for a busy machine
        assert cache.last_build_s is not None and 0.2 <= cache.last_build_s < 5.0
        now[0] = 1.9
        assert await cache.get() == b"x 1\n" and builds == 1
        now[0] = 10 * cache.last_build_s + 0.01
        assert await cache.get() == b"x 2\n" and builds == 2
        now[0] = 0.0
        assert await capped.get() == b"x 3\n"
        now[0] = 0.9
        assert await capped.get() == b"x 3\n"
        now[0] = 1.01  # within 10 × its build time, but past max_age
        assert await capped.get() == b"x 4\n" and builds == 4
    finally:
        cache.close()
        capped.close()


def test_bound_series_keeps_the_newest_per_device_and_counts_the_rest() -> None:
    rows = [{"device_id": "a", "kind": "inference", "model_name": f"m{i}", "last_seen_us": i} for i in range(10)] + [
        {"device_id": "b", "kind": "inference", "model_name": "x", "last_seen_us": 1}
    ]
    kept, left_out = bound_series(rows, 3)
    assert [r["model_name"] for r in kept if r["device_id"] == "a"] == ["m7", "m8", "m9"]
    assert left_out == {"a": 7} and any(r["device_id"] == "b" for r in kept)


def test_a_read_past_its_deadline_is_a_query_timeout(tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    try:
        clock = [0.0]
        bounded_store = BoundedStore(store, Deadline(1.0, clock=lambda: clock[0]), max_series=10)
        assert bounded_store.devices() == []
        clock[0] = 1.5
        with pytest.raises(QueryTimeout):
            bounded_store.devices()

        def slow(store: Any) -> None:
            time.sleep(0.05)
            store.devices()

        with pytest.raises(QueryTimeout):
            bounded(slow, 0.01, 10)(store)
    finally:
        store.close()


# -- a real aggregator under a flood -------------------------------------------------------------------------------
def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Client:
    """A keep-alive HTTP client of the aggregator on 127.0.0.1."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)

    def request(
        self, method: str, path: str, body: bytes | None = None, headers: dict[str, str] | None = None
    ) -> tuple[int, bytes, float]:
        started = time.perf_counter()
        self.conn.request(method, path, body=body, headers=headers or {})
        response = self.conn.getresponse()
        data = response.read()
        return response.status, data, time.perf_counter() - started

    def close(self) -> None:
        self.conn.close()


@pytest.fixture
def serve(tmp_path: Path) -> Iterator[Any]:
    """``serve(config_text)``: a real ``lens-aggregator serve`` with that [server]/[fleet] config; (port, token of
    dev-1, token of dev-b)."""
    started: list[AggregatorProcess] = []

    def start(config: str) -> tuple[int, str, str]:
        db = tmp_path / "agg.db"
        token = device_token(db)
        store = SQLiteStore(db)
        other = store.add_token("dev-b", "device", time.time_ns() // 1000)
        store.close()
        path = tmp_path / "aggregator.toml"
        path.write_text(config)
        port = _free_port()
        process = AggregatorProcess(db, port, path)
        started.append(process)
        process.start()
        return port, token, other

    yield start
    for process in started:
        process.stop()


def _flood(port: int, token: str, *, records: int, batch: int = 500) -> None:
    """``records`` records from dev-1, each with its own model name, strategy, error type and engine settings."""
    client = Client(port)
    try:
        for start in range(0, records, batch):
            wire_records = valid_wire(min(batch, records - start), seed=1000 + start, device=DEVICE)
            for offset, record in enumerate(wire_records):
                i = start + offset
                record["model_name"] = f"flood-model-{i}"
                record["strategy"] = f"strategy-{i % 997}"
                record["ext"] = {**(record.get("ext") or {}), "settings": {"n_batch": 1 + i}}
                if i % 3 == 0:
                    record["ok"], record["error_type"] = False, f"error-{i}"
                else:  # and a guardrail set of its own (docs/metrics.md "Guardrails")
                    record["ext"]["guardrails"] = guardrails(
                        f"flood-set-{i}", inference_ms=(record["e2e_us"] or 0) / 1000
                    )
            body = raw_batch([encode_raw(r, "cbor") for r in wire_records], device=DEVICE, batch_id=f"flood-{start}")
            status, answer, _ = client.request("POST", "/api/v1/ingest", body, {"Authorization": f"Bearer {token}"})
            assert status == 200, answer[:300]
    finally:
        client.close()


def _steady(port: int, token: str, model: str, expect: int = 200) -> bytes:
    """A few ordinary records from dev-b (one series), the first named ``model``."""
    records = valid_wire(5, seed=7, device="dev-b")
    records[0]["model_name"] = model
    body = raw_batch([encode_raw(r, "cbor") for r in records], device="dev-b", batch_id=f"steady-{expect}")
    client = Client(port)
    try:
        status, answer, _ = client.request("POST", "/api/v1/ingest", body, {"Authorization": f"Bearer {token}"})
        assert status == expect, answer[:300]
        return bytes(answer)
    finally:
        client.close()


LOW_BOUNDS = """
[server]
max_metric_series = 300
max_metric_series_per_device = 40
max_read_series = 20
max_query_seconds = "3s"
metrics_max_age = "0s"

[fleet]
trigger_interval = "1s"

[[triggers]]
name = "any-failure"
condition = "error_rate_above"
threshold = 0.0
window = "168h"
min_samples = 1
"""

CONTROL_MODEL = "evil\x1b[31m\x07model\r"


def test_a_flood_from_one_device_stays_bounded_everywhere(serve: Any) -> None:
    port, token, other = serve(LOW_BOUNDS)
    # a name with control characters is refused at ingest (the record, naming the field); the labels strip them as
    # well, for what older releases stored (clean_label, above)
    assert b"model_name" in _steady(port, other, CONTROL_MODEL, expect=400)
    _steady(port, other, "steady-model")
    _flood(port, token, records=3000)
    client = Client(port)
    try:
        time.sleep(2.5)  # a trigger evaluation over the flood (every second)
        status, body, _ = client.request("GET", "/metrics")
        assert status == 200
        text = body.decode()
        # bounded: 40 label sets of dev-1 at most, whatever it sent, across requests, errors and trigger series
        assert len(body) < 1_500_000, len(body)
        mine = [
            labels
            for name in (
                "llm_latency_lens_requests_total",
                "llm_latency_lens_requests_failed_total",
                "llm_latency_lens_trigger_firing",
                "llm_latency_lens_guardrail_overhead_ratio_count",
            )
            for labels in _label_sets(text, name)
            if labels.get("device") == DEVICE
        ]
        assert 0 < len(mine) <= 40
        label_sets = _samples(text, "llm_latency_lens_metric_label_sets")[0][1]
        assert label_sets <= 300
        folded = [s for s in _label_sets(text, "llm_latency_lens_requests_total") if s["device"] == OTHER]
        assert folded == [{"device": OTHER, "model": OTHER, "provider": OTHER, "strategy": OTHER}]
        failed_other = [s for s in _label_sets(text, "llm_latency_lens_requests_failed_total") if s["device"] == OTHER]
        assert failed_other == [{"device": OTHER, "model": OTHER, "provider": OTHER, "strategy": OTHER,
                                 "error_type": OTHER}]  # fmt: skip
        overflow = {s["reason"]: v for s, v in _samples(text, "llm_latency_lens_metric_series_overflow_total")}
        assert overflow["per_device"] > 2900
        assert sum(v for _, v in _samples(text, "llm_latency_lens_requests_total")) == 3005  # none lost
        # 2,000 distinct guardrail set names: the first 16 seen fleet-wide, the rest "other"; none lost either
        guarded = _label_sets(text, "llm_latency_lens_guardrail_requests_total")
        assert 0 < len({s["guardrail_set"] for s in guarded}) <= 17
        assert sum(v for _, v in _samples(text, "llm_latency_lens_guardrail_requests_total")) == 2000
        # control characters never reach a label, and promtool accepts the whole exposition
        assert "\x1b" not in text and "\x07" not in text and "\r" not in text
        assert 'model="steady-model"' in text
        promtool = shutil.which("promtool")
        assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
        done = subprocess.run([promtool, "check", "metrics"], input=body, capture_output=True, timeout=60)
        assert done.returncode == 0, (done.stdout + done.stderr).decode()[:2000]

        # the device's health says what was folded, in /api/v1/devices and in its fleet row
        status, body, _ = client.request("GET", "/api/v1/devices")
        devices = {d["device_id"]: d for d in json.loads(body)["devices"]}
        shown = devices[DEVICE]["metric_series"]
        assert shown["summary"].endswith(
            "per-device bound (40 label sets, server.max_metric_series_per_device) reached"
        )
        assert shown["folded_observations"] >= overflow["per_device"]  # the trigger series fold again each second
        assert devices["dev-b"]["metric_series"] is None
        status, body, _ = client.request("GET", "/api/v1/fleet")
        fleet = json.loads(body)
        row = next(d for d in fleet["devices"] if d["device_id"] == DEVICE)
        bound = "per-device bound (40 label sets, server.max_metric_series_per_device) reached"
        assert row["health"] in ("warning", "critical") and any(r.endswith(bound) for r in row["health_reasons"])
        assert len(row["series"]) <= 20 and fleet["truncated"]["by_device"][DEVICE] > 2900
        assert len(body) < 1_000_000

        # every read after the flood: bounded in size, and within max_query_seconds or a clean 503
        answered: list[str] = []

        def read(path: str, bound: int) -> bytes:
            status, body, seconds = client.request("GET", path)
            if status == 200:
                answered.append(path)
            assert status in (200, 503), (path, status, body[:300])
            if status == 503:
                assert "longer than 3 s" in json.loads(body)["error"], body[:300]
            else:
                assert len(body) < bound, (path, len(body))
            assert seconds < 3 * 2 + 2, (path, seconds)  # the deadline plus one query's slack
            return body if status == 200 else b""

        page = read(f"/device/{DEVICE}", 2_500_000).decode()
        if page:
            assert "truncated: " in page and "narrow the query with" in page
            assert "per-device bound (40 label sets" in page
        compare = read(f"/device/{DEVICE}?compare=dev-b", 3_000_000)
        if compare:
            assert b'"compare": {' in compare
        timeline = read(f"/api/v1/devices/{DEVICE}/timeline", 2_000_000)
        if timeline:
            answer = json.loads(timeline)
            assert len(answer["series"]) <= 20 and answer["series_truncated"]["more"] > 2900
        summary = read("/api/v1/summary?group_by=model", 300_000)
        if summary:
            answer = json.loads(summary)
            assert (
                len(answer["groups"]) == 20 and answer["truncated"]["groups"]["more"] == 3002 - 20
            )  # 3,000 + dev-b's two
            assert "narrow the query with" in answer["truncated"]["groups"]["message"]
        triggers = read("/api/v1/triggers", 300_000)
        if triggers:
            answer = json.loads(triggers)
            assert len(answer["holding"]) <= 20 and len(answer["triggers"][0]["series"]) <= 20
            # 500 series of dev-1 judged (triggers.MAX_SERIES_PER_DEVICE), a third of them failing
            assert answer["truncated"]["holding"]["more"] > 100 and answer["rows"]["series_skipped"] == 2500
        narrowed = read("/api/v1/triggers?device=dev-b", 300_000)
        if narrowed:
            assert all(s["device_id"] == "dev-b" for s in json.loads(narrowed)["holding"])
        assert len(answered) >= 4, answered  # 3,000 rows are read well within 3 s: most reads answer in full
        assert client.request("GET", "/api/v1/health")[0] == 200
    finally:
        client.close()


def test_a_tiny_query_bound_gives_503_not_an_unbounded_wait(serve: Any) -> None:
    """With max_query_seconds far below what the flood's reads need, the reads answer 503 at once, naming it."""
    port, token, _ = serve(LOW_BOUNDS.replace('max_query_seconds = "3s"', 'max_query_seconds = "1ms"'))
    _flood(port, token, records=3000)
    client = Client(port)
    statuses = []
    try:
        for path in (
            f"/device/{DEVICE}",
            f"/device/{DEVICE}?compare=dev-b",
            "/api/v1/summary?group_by=model",
            f"/api/v1/devices/{DEVICE}/timeline",
            "/api/v1/fleet",
        ):
            status, body, seconds = client.request("GET", path)
            statuses.append(status)
            assert status in (200, 503), (path, status)
            assert seconds < 2.0, (path, seconds)
            if status == 503:
                assert "longer than 0.001 s" in json.loads(body)["error"], body[:300]
        assert statuses.count(503) >= 3, statuses  # 3,000 series to read and sort: not within 1 ms
        assert client.request("GET", "/api/v1/health")[0] == 200
    finally:
        client.close()


class _Scraper:
    """Scrapes /metrics again and again from a thread, keeping when each scrape was in flight."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.spans: list[tuple[float, float]] = []
        self.sizes: list[int] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        client = Client(self.port)
        try:
            while not self._stop.is_set():
                started = time.perf_counter()
                status, body, _ = client.request("GET", "/metrics")
                assert status == 200
                self.spans.append((started, time.perf_counter()))
                self.sizes.append(len(body))
        finally:
            client.close()

    def __enter__(self) -> _Scraper:
        self._thread.start()
        return self

    def __exit__(self, *exc: Any) -> None:
        self._stop.set()
        self._thread.join()


def test_default_bounds_hold_and_health_stays_fast_during_scrapes(serve: Any) -> None:
    """The default bounds (only the cache is off, so that every scrape builds): a 3,000-model flood from one device
    keeps /metrics within the documented size, and /api/v1/health answers in well under 100 ms (median) while
    scrapes are being built."""
    port, token, _ = serve('[server]\nmetrics_max_age = "0s"\n')
    _flood(port, token, records=3000)
    health = Client(port)
    times: list[tuple[float, float]] = []
    try:
        with _Scraper(port) as scraper:
            deadline = time.monotonic() + 6
            while time.monotonic() < deadline:
                started = time.perf_counter()
                status, _, seconds = health.request("GET", "/api/v1/health")
                assert status == 200
                times.append((started, seconds))
                time.sleep(0.01)
        during = [s for started, s in times if any(a <= started <= b for a, b in scraper.spans)]
        assert len(scraper.spans) >= 3 and len(during) >= 10, (len(scraper.spans), len(during))
        assert statistics.median(during) < 0.1, sorted(during)
        assert max(during) < 1.0, sorted(during)
        assert max(scraper.sizes) < 4_000_000, max(scraper.sizes)  # docs/metrics.md: 200 label sets ≈ 3 MB
    finally:
        health.close()


def test_the_fold_alert_fires_on_the_aggregators_own_overflow_counter(tmp_path: Path) -> None:
    """promtool's rule test, fed with the overflow counter of a real flood (growing by what one flood folds every
    minute): LensMetricSeriesFolded fires for the per-device bound and not for the global one."""
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    metrics = FleetMetrics(max_series=1000, max_series_per_device=5)
    metrics.observe("dev-a", [_inference(f"m{i}") for i in range(50)])
    series = [
        {
            "series": 'llm_latency_lens_metric_series_overflow_total{reason="' + labels["reason"] + '"}',
            "values": f"0+{value:g}x20",
        }
        for labels, value in _samples(metrics.exposition().decode(), "llm_latency_lens_metric_series_overflow_total")
    ]
    assert {s["values"] for s in series} == {"0+45x20", "0+0x20"}
    rules = Path(__file__).resolve().parents[1] / "packaging" / "prometheus" / "lens-alerts.yml"
    alert = {
        "exp_labels": {"severity": "warning", "reason": "per_device"},
        "exp_annotations": {
            "summary": 'lens-aggregator folds label sets into "other" (the per_device bound is reached)',
            "description": (
                'Observations are counted under the "other" series on /metrics because the per_device bound on '
                "label sets is reached (server.max_metric_series_per_device, server.max_metric_series). "
                "GET /api/v1/devices names the device (metric_series) and its health says so."
            ),
        },
    }
    test = {
        "rule_files": [str(rules)],
        "evaluation_interval": "1m",
        "tests": [
            {
                "interval": "1m",
                "input_series": series,
                "alert_rule_test": [{"eval_time": "10m", "alertname": "LensMetricSeriesFolded", "exp_alerts": [alert]}],
            }
        ],
    }
    path = tmp_path / "test.yml"
    path.write_text(json.dumps(test))  # JSON is YAML
    done = subprocess.run([promtool, "test", "rules", str(path)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_trigger_evaluation_judges_at_most_its_bound_of_series_per_device() -> None:
    """A device with more series than MAX_SERIES_PER_DEVICE in a window: the ones with the latest requests are
    judged, the rest counted; another device is judged whole."""
    from aggregator import triggers as trig

    now_us = 10_000_000_000
    rule = trig.Trigger(name="fails", condition="error_rate_above", threshold=0.0, window_s=3600.0, cooldown_s=60.0,
                        min_samples=1)  # fmt: skip
    limit = trig.MAX_SERIES_PER_DEVICE
    flood = [
        trig.Sample("dev-a", f"m{i}", None, now_us - 1_000_000 * (limit + 50) + 1_000_000 * i, ok=False)
        for i in range(limit + 50)
    ]
    steady = [trig.Sample("dev-b", "m", None, now_us - 5_000_000, ok=False)]
    counts = trig.RowCount()
    judged = trig.evaluate([rule], flood + steady, now_us, counts=counts)
    mine = {ev.series[1] for ev in judged if ev.series[0] == "dev-a"}
    assert len(mine) == limit and "m49" not in mine and f"m{limit + 49}" in mine  # the newest kept
    assert counts.series_skipped == 50
    assert any(ev.series[0] == "dev-b" and ev.outcome.holds for ev in judged)
