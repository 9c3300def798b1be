"""Guardrail series on /metrics (docs/metrics.md "Guardrails"): stage times, the overhead ratio, requests by outcome
and violations by type, severity and stage, from records carrying ext.guardrails (kind inference and blocked); every
label a device sends bounded — the set name to the first 16 seen fleet-wide, the rest to the vocabularies."""

from __future__ import annotations

import itertools
import shutil
import subprocess
import time
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.metrics import (
    GUARDRAIL_RESTORE_COLUMNS,
    GUARDRAIL_STAGE_BUCKETS,
    MAX_GUARDRAIL_SETS,
    OTHER,
    RESTORE_COLUMNS,
    FleetMetrics,
    stored_request,
)
from aggregator.store import NULL_NAME
from lens_core import wire
from tests.guardrail_export_records import guard, guardrails, hostile_guardrails
from tests.test_otlp import ingest
from tests.test_otlp_guardrails import guarded_records

DEVICE = "dev-1"
STAGE = "llm_latency_lens_guardrail_stage_seconds"
RATIO = "llm_latency_lens_guardrail_overhead_ratio"
REQUESTS = "llm_latency_lens_guardrail_requests_total"
VIOLATIONS = "llm_latency_lens_guardrail_violations_total"


def samples(text: str, name: str) -> list[tuple[dict[str, str], float]]:
    return [
        (dict(s.labels), s.value)
        for family in text_string_to_metric_families(text)
        for s in family.samples
        if s.name == name
    ]


def total(text: str, name: str, **labels: str) -> float:
    return sum(v for ls, v in samples(text, name) if all(ls.get(k) == want for k, want in labels.items()))


def wire_records(n: int, seed: int = 1, device: str = DEVICE) -> list[dict[str, Any]]:
    return [wire.to_wire(r) for r in synthetic_records(n, seed=seed, device_id=device) if r["ok"]]


async def test_guardrail_series_after_ingest(aiohttp_client: Any, store: Any) -> None:
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    client = await aiohttp_client(create_app(Settings(), store))
    records = guarded_records()
    await ingest(client, token, records)
    await ingest(client, token, records)  # a retry: each record counted once
    text = await (await client.get("/metrics")).text()
    guarded = [wire.to_wire(r) for r in records if "guardrails" in (r.get("ext") or {})]
    by_outcome: dict[str, int] = {}
    for r in guarded:
        outcome = r["ext"]["guardrails"]["outcome"]
        by_outcome[outcome] = by_outcome.get(outcome, 0) + 1
    assert by_outcome == {"passed": 2, "blocked": 3, "passed_with_errors": 1, "error": 1}
    for outcome, n in by_outcome.items():
        assert total(text, REQUESTS, outcome=outcome) == n, outcome
    model = guarded[0]["model_name"]
    assert total(text, REQUESTS, device=DEVICE, model=model, provider="local", strategy="local") == len(guarded)
    for stage in ("input", "threat", "output"):
        ran = [
            r["ext"]["guardrails"]["stages"][stage]["ms"] for r in guarded if stage in r["ext"]["guardrails"]["stages"]
        ]
        assert total(text, f"{STAGE}_count", stage=stage) == len(ran), stage
        assert total(text, f"{STAGE}_sum", stage=stage) == pytest.approx(sum(ran) / 1000), stage
    # the buckets are the 0.1 ms – 10 s ones
    les = {float(ls["le"]) for ls, _ in samples(text, f"{STAGE}_bucket")}
    assert les == {*GUARDRAIL_STAGE_BUCKETS, float("inf")}
    assert total(text, f"{RATIO}_count") == len(guarded)
    ratios = sum(r["ext"]["guardrails"]["impact_percent"] / 100 for r in guarded)
    assert total(text, f"{RATIO}_sum") == pytest.approx(ratios)
    # violations: the blocking ones (pii_leakage/high at their stage) and the hostile record's 32
    assert total(text, VIOLATIONS, type="pii_leakage", severity="high", stage="input") == 1
    assert total(text, VIOLATIONS, type="pii_leakage", severity="high", stage="threat") == 1
    assert total(text, VIOLATIONS) == 3 + 32
    sets = {ls["guardrail_set"] for ls, _ in samples(text, REQUESTS)}
    assert sets == {"pii", "strict", "x" * 64}
    # the fleet's request series count kind inference only: the three blocked requests are in the guardrail series
    assert total(text, "llm_latency_lens_requests_total", device=DEVICE) == len(records) - 3
    promtool = shutil.which("promtool")
    assert promtool, "promtool is missing: `make sysdeps` installs Debian's prometheus package"
    done = subprocess.run([promtool, "check", "metrics"], input=text.encode(), capture_output=True, timeout=60)
    assert done.returncode == 0, (done.stdout + done.stderr).decode()[:2000]


def test_the_set_label_holds_the_first_16_names_seen_fleet_wide() -> None:
    metrics = FleetMetrics()
    base = wire_records(4)[0]
    metrics.observe("dev-a", [guard(base, set_name=f"set-{i}") for i in range(MAX_GUARDRAIL_SETS)])
    metrics.observe("dev-b", [guard(base, set_name="set-3"), guard(base, set_name="late")])  # a 17th: other
    text = metrics.exposition().decode()
    sets = {ls["guardrail_set"] for ls, _ in samples(text, REQUESTS)}
    assert sets == {f"set-{i}" for i in range(MAX_GUARDRAIL_SETS)} | {OTHER}
    assert total(text, REQUESTS, device="dev-b", guardrail_set="set-3") == 1
    assert total(text, REQUESTS, device="dev-b", guardrail_set=OTHER) == 1
    assert total(text, REQUESTS) == MAX_GUARDRAIL_SETS + 2  # nothing lost


def test_labels_outside_the_vocabularies_read_other() -> None:
    """Ingest refuses them; /metrics does not rely on it (a row stored before the check, a replay)."""
    metrics = FleetMetrics()
    record = guard(wire_records(2)[0], set_name="pii", blocked_at="input")
    g = record["ext"]["guardrails"]
    g["outcome"] = "exploded\x1b"
    g["stages"]["sideways"] = {"start_ms": 0, "ms": 1.0}
    g["violations"] = [
        {"type": "evil\x07type", "severity": "apocalyptic", "stage": "nowhere", "blocked": True},
        {"type": "jailbreak", "severity": "critical", "stage": "input", "blocked": True},
    ]
    metrics.observe(DEVICE, [record])
    text = metrics.exposition().decode()
    assert {ls["outcome"] for ls, _ in samples(text, REQUESTS)} == {OTHER}
    assert {ls["stage"] for ls, _ in samples(text, f"{STAGE}_count")} == {"input"}
    found = {(ls["type"], ls["severity"], ls["stage"]) for ls, _ in samples(text, VIOLATIONS)}
    assert found == {(OTHER, OTHER, OTHER), ("jailbreak", "critical", "input")}
    assert "\x1b" not in text and "\x07" not in text


def _exposition_size(names: list[str]) -> tuple[int, str]:
    metrics = FleetMetrics(max_series_per_device=10_000)  # the set bound alone, not the device's budget
    base = wire_records(2)[0]
    records = []
    for i, name in enumerate(names):
        record = guard(base, set_name=name, blocked_at=("input", None)[i % 2])
        record["ext"]["guardrails"]["violations"] = hostile_guardrails()["violations"]
        records.append(record)
    for start in range(0, len(records), 500):
        metrics.observe(DEVICE, records[start : start + 500])
    text = metrics.exposition().decode()
    return len(text), text


def test_ten_thousand_set_names_from_one_device_cannot_grow_metrics_past_the_bound() -> None:
    """The set names fill their 16 places and the rest folds into "other": /metrics after 10,000 distinct names is
    the size it is after 17 (the same series, larger counts), and every request is still counted."""
    bound, seventeen = _exposition_size([f"set-{i:05d}" for i in range(MAX_GUARDRAIL_SETS + 2)])  # "other": both shapes
    size, text = _exposition_size([f"set-{i:05d}" for i in range(10_000)])
    assert len(text.splitlines()) == len(seventeen.splitlines())  # the same series…
    assert size <= bound * 1.05, (size, bound)  # … with counts of more digits
    sets = {ls["guardrail_set"] for ls, _ in samples(text, REQUESTS)}
    assert len(sets) == MAX_GUARDRAIL_SETS + 1 and OTHER in sets
    assert total(text, REQUESTS) == 10_000
    assert total(text, VIOLATIONS) == 10_000 * 32


def test_the_per_device_budget_folds_guardrail_label_sets_too() -> None:
    """Each device × model × strategy × set is one label set in the device's budget (and each violation type ×
    severity × stage seen one more), like the request and failure series."""
    metrics = FleetMetrics(max_series_per_device=10)
    base = wire_records(2)[0]
    records = []
    for i in range(50):
        r = guard(base | {"model_name": f"model-{i}"}, set_name="pii", blocked_at="input")
        records.append(r)
    metrics.observe(DEVICE, records)
    text = metrics.exposition().decode()
    mine = [ls for ls, _ in samples(text, REQUESTS) if ls["device"] == DEVICE]
    assert 0 < len(mine) <= 10
    folded = [ls for ls, _ in samples(text, REQUESTS) if ls["device"] == OTHER]
    assert folded == [{"device": OTHER, "model": OTHER, "provider": OTHER, "strategy": OTHER,
                       "guardrail_set": OTHER, "outcome": "blocked"}]  # fmt: skip
    assert total(text, REQUESTS) == 50 and total(text, VIOLATIONS) == 50
    assert metrics.budget.tracked(DEVICE) == 10


def test_a_restart_observes_the_stored_guardrail_columns_again() -> None:
    """From store schema 10 the restore reads the guarded requests' columns: set, outcome, stage times, impact."""
    row = (1_000, "m", "local", 1, None, 30_000, 3_000, 400_000, 90, None, 0)
    assert len(row) == len(RESTORE_COLUMNS)
    guarded = (*row, "pii", "passed", 4.0, None, 2.5, 1.6)
    assert len(guarded) - len(row) == len(GUARDRAIL_RESTORE_COLUMNS)
    unguarded = (*row, None, None, None, None, None, None)
    metrics = FleetMetrics()
    metrics.restore(DEVICE, [stored_request(r, NULL_NAME) for r in (row, guarded, unguarded)])
    text = metrics.exposition().decode()
    assert total(text, "llm_latency_lens_requests_total") == 3
    assert total(text, REQUESTS, guardrail_set="pii", outcome="passed") == 1
    assert total(text, f"{STAGE}_count", stage="input") == 1 and total(text, f"{STAGE}_count", stage="output") == 1
    assert total(text, f"{STAGE}_count", stage="threat") == 0
    assert total(text, f"{RATIO}_sum") == pytest.approx(0.016)


def test_stage_buckets_span_a_tenth_of_a_millisecond_to_ten_seconds() -> None:
    assert GUARDRAIL_STAGE_BUCKETS[0] == 0.0001 and GUARDRAIL_STAGE_BUCKETS[-1] == 10.0
    ratios = [b / a for a, b in itertools.pairwise(GUARDRAIL_STAGE_BUCKETS)]
    assert max(ratios) <= 2.5  # 1-2-5 steps: histogram_quantile is off by at most one bucket's width
    assert guardrails()["stages"]["input"]["ms"] / 1000 > GUARDRAIL_STAGE_BUCKETS[0]
