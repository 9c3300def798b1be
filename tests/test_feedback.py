"""Performance feedback (issue 17): ``GET /api/v1/feedback`` documents and their recommendations, from a fleet pushed
through the real ingest endpoint of the real app on 127.0.0.1, on SQLite and PostgreSQL.

The fleet: Jetson Orin Nanos (device_facts class "embedded device") running SmolLM2 with one thread, others with two
(planted TPOT distributions: log-normal noise, 2 % stalls 3–6× and the generator's own gap stalls), one with two
threads *and* flash attention, one with GPU layers that change nothing, one with too few requests, a laptop that is
much faster (another class: no evidence for a Jetson), and a device without facts whose own history shows two
threads faster. Every document validates against the seed's schema; each recommendation is where the data supports
it with the impact the test computes itself from the planted values and a p-value from an independent Mann–Whitney
(pairwise counting, not ranks); nowhere else. The device's next acknowledgement carries its recommendations, and a
real agent uploader receives them; :func:`lens_core.recommendations.parse_wire` refuses hostile lists item by item.
"""

from __future__ import annotations

import json
import math
import sqlite3
import time
import uuid
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import jsonschema
import numpy as np
import pytest

from agent.outbox import AsyncOutbox, Outbox
from agent.sync import SyncSettings, Uploader
from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.config import load_aggregator_config
from aggregator.feedback import Settings as FeedbackSettings
from aggregator.feedback import bootstrap_confidence, priority, recommendation_id, severity
from aggregator.store import RecordRow, SQLiteStore
from lens_core import wire
from lens_core.errors import ConfigError
from lens_core.recommendations import MAX_EVIDENCE_CHARS, MAX_ITEMS, Recommendation, parse_wire, to_wire
from lens_core.settings import settings_key

from .test_aggregator import auth, make_batch
from .test_device_page import facts_record

NOW = time.time_ns() // 1000
SCHEMA = json.loads((Path(__file__).parent / "data" / "performance_feedback.schema.json").read_text())
VALIDATOR = jsonschema.Draft7Validator(SCHEMA, format_checker=jsonschema.FormatChecker())
MODEL = "Smollm2 135M 8k Lc100K Mix1 Ep2"  # what the bundled SmolLM2's records carry: its GGUF general.name
BASE = {"n_threads": 1, "n_batch": 512, "n_ctx": 2048, "n_gpu_layers": 0, "flash_attn": False, "quantization": "Q4_1"}
ORIN = {
    "device_class": "embedded device",
    "model": "NVIDIA Jetson Orin Nano Developer Kit",
    "accelerator": "NVIDIA integrated GPU (Jetson)",
    "ram_gb": 7.44,
}
LAPTOP = {"device_class": "laptop", "model": "LENOVO 21HM", "ram_gb": 31.0}
PROMPT_TOKENS = [23, 41, 57, 88, 102, 130, 151, 176]  # a workload's prompt set: the same lengths on every device
FEEDBACK = FeedbackSettings()  # the defaults: window 200, alpha 0.01, 20 requests each side, 5 %, 3 devices
# The statistics of each rule, on a fleet where one or two devices carry a value: the rule that fleet evidence needs
# several independent devices (fleet.feedback_min_devices) has its own test below, on this same fleet.
STATS = FeedbackSettings(min_devices=1)


def plant(
    device: str,
    count: int,
    seed: int,
    settings: dict[str, Any],
    tpot_ms: float,
    *,
    sigma: float = 0.08,
    ttft_factor: float = 1.0,
) -> list[dict[str, Any]]:
    """``count`` requests of SmolLM2 under ``settings`` whose TPOT is log-normal around ``tpot_ms`` (``sigma``) with
    2 % stalls 3–6× slower; gaps, decode and e2e consistent with it; prompts from one fixed set."""
    records = synthetic_records(count, seed=seed, device_id=device)
    rng = np.random.default_rng(seed)
    for r in records:
        r["model_name"] = MODEL
        r["ext"] = {"settings": dict(settings)}
        r["input_tokens"] = PROMPT_TOKENS[r["prompt_index"]]
        if not r["ok"]:
            continue
        target = tpot_ms * float(rng.lognormal(0.0, sigma))
        if rng.random() < 0.02:
            target *= float(rng.uniform(3.0, 6.0))
        factor = target / (sum(r["itl_ms"]) / len(r["itl_ms"]))
        r["itl_ms"] = [round(g * factor, 3) for g in r["itl_ms"]]
        r["decode_ms"] = round(sum(r["itl_ms"]), 3)
        r["engine_decode_ms"] = round(r["decode_ms"] * 0.991, 3)
        r["tpot_ms"] = round(r["decode_ms"] / len(r["itl_ms"]), 3)
        prefill = r["input_tokens"] * tpot_ms * 0.2 * ttft_factor
        r["ttft_ms"] = round(prefill * float(rng.lognormal(0.0, 0.05)) + 0.6, 3)
        r["prefill_ms"] = round(prefill, 3)
        r["e2e_ms"] = round(r["ttft_ms"] + r["decode_ms"], 3)
    return records


def latest_ok(records: list[dict[str, Any]], n: int = FEEDBACK.window) -> list[dict[str, Any]]:
    return [r for r in records if r["ok"]][-n:]


def tpots(records: list[dict[str, Any]]) -> list[float]:
    return [r["tpot_ms"] for r in records]


def mann_whitney_pairs(a: list[float], b: list[float]) -> float:
    """Two-sided p of Mann–Whitney U by counting pairs (not ranks): U = #(a > b) + ½ #(a = b); normal approximation
    with the tie correction Σ(t³ − t) over the combined sample's tied groups and a continuity correction of ½."""
    x, y = np.asarray(a)[:, None], np.asarray(b)[None, :]
    u = float((x > y).sum() + 0.5 * (x == y).sum())
    n1, n2 = len(a), len(b)
    n = n1 + n2
    ties = sum(t**3 - t for t in Counter([*a, *b]).values())
    sigma = math.sqrt(n1 * n2 / 12.0 * ((n + 1) - ties / (n * (n - 1))))
    z = (abs(u - n1 * n2 / 2.0) - 0.5) / sigma
    return min(1.0, math.erfc(z / math.sqrt(2.0)))


def matched_on_prompt_length(
    a: list[dict[str, Any]], b: list[dict[str, Any]], metric: str
) -> tuple[list[float], list[float]]:
    """For each prompt length both ran, the latest min(count in a, count in b) requests of each side."""
    sides = []
    for own, other in ((a, b), (b, a)):
        kept = []
        for length in {r["input_tokens"] for r in own} & {r["input_tokens"] for r in other}:
            k = min(sum(r["input_tokens"] == length for r in own), sum(r["input_tokens"] == length for r in other))
            kept += [r for r in own if r["input_tokens"] == length][-k:]
        sides.append([r[metric] for r in sorted(kept, key=lambda r: r["started_at"])])
    return sides[0], sides[1]


class Fleet:
    """What the fixture sent, per device: its records in the order they were sent."""

    def __init__(self) -> None:
        self.sent: dict[str, list[dict[str, Any]]] = {}
        self.tokens: dict[str, str] = {}

    async def send(self, client: Any, store: Any, device: str, records: list[dict[str, Any]]) -> dict[str, Any]:
        if device not in self.tokens:
            self.tokens[device] = store.add_token(device, "device", NOW)
        body = make_batch(records, device=device)
        response = await client.post("/api/v1/ingest", data=body, headers=auth(self.tokens[device]))
        assert response.status == 200, await response.text()
        self.sent.setdefault(device, []).extend(r for r in records if r["kind"] == "inference")
        ack: dict[str, Any] = await response.json()
        return ack


WHEN = datetime(2026, 10, 31, tzinfo=timezone.utc)


async def build_fleet(client: Any, store: Any) -> Fleet:
    fleet = Fleet()
    two = {**BASE, "n_threads": 2}
    plan: list[tuple[str, dict[str, Any] | None, list[list[dict[str, Any]]]]] = [
        ("orin-slow-1", ORIN, [plant("orin-slow-1", 260, 1, BASE, 18.0)]),
        ("orin-slow-2", ORIN, [plant("orin-slow-2", 230, 2, BASE, 18.4)]),
        ("orin-fast-1", ORIN, [plant("orin-fast-1", 500, 3, two, 12.0)]),  # beyond the window: 200 count
        ("orin-fast-2", ORIN, [plant("orin-fast-2", 120, 4, two, 12.6)]),
        ("orin-both", ORIN, [plant("orin-both", 150, 5, {**two, "flash_attn": True}, 8.0)]),  # two settings changed
        ("orin-gpu", ORIN, [plant("orin-gpu", 200, 6, {**BASE, "n_gpu_layers": 8}, 18.0)]),  # no difference
        ("orin-few", ORIN, [plant("orin-few", 12, 7, BASE, 18.0)]),  # too few requests
        ("laptop-1", LAPTOP, [plant("laptop-1", 200, 8, {**BASE, "n_threads": 4}, 4.0)]),  # another class
        # evidence that is not enough: 12 requests, however fast; 30 noisy ones; a real but small gain (3 %)
        ("orin-ctx-few", ORIN, [plant("orin-ctx-few", 12, 13, {**BASE, "n_ctx": 4096}, 9.0)]),
        ("orin-ctx-noisy", ORIN, [plant("orin-ctx-noisy", 30, 17, {**BASE, "n_ctx": 1024}, 15.5, sigma=0.5)]),
        ("orin-gpu4", ORIN, [plant("orin-gpu4", 300, 15, {**BASE, "n_gpu_layers": 4}, 17.4, sigma=0.02)]),
        # another quantization: faster, recommended, but not a change the agent makes itself (another model file)
        ("orin-q4-0", ORIN, [plant("orin-q4-0", 200, 16, {**BASE, "quantization": "Q4_0"}, 15.0)]),
    ]
    hist = plant("orin-hist", 370, 9, BASE, 19.0)  # no facts: its own history only
    earlier = plant("orin-hist", 370, 10, two, 14.0)
    plan.append(("orin-hist", None, [earlier[:150], hist[150:]]))  # two threads first, then one
    for device, facts, batches in plan:
        if facts is not None:
            await fleet.send(client, store, device, [facts_record(device, WHEN, **facts)])
        for records in batches:
            for start in range(0, len(records), 250):
                await fleet.send(client, store, device, records[start : start + 250])
    return fleet


def check_documents(body: dict[str, Any]) -> dict[str, dict[str, Any]]:
    for doc in body["documents"]:
        errors = sorted(VALIDATOR.iter_errors(doc), key=lambda e: list(e.path))
        assert not errors, [f"{list(e.path)}: {e.message}" for e in errors]
    return {d["device_id"]: d for d in body["documents"]}


async def test_recommendations_where_the_fleet_supports_them(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(
        create_app(Settings(feedback_interval_s=0.0, regression_interval_s=0.0, feedback_settings=STATS), store)
    )
    fleet = await build_fleet(client, store)
    response = await client.get("/api/v1/feedback")
    assert response.status == 200
    body = await response.json()
    assert body["computed_at"].endswith("Z") and "Mann–Whitney" in body["method"]
    docs = check_documents(body)
    assert set(docs) == set(fleet.sent)  # one document per device × model (one model here)

    # orin-slow-1: two threads, from orin-fast-1's latest 200 and orin-fast-2's requests
    slow = docs["orin-slow-1"]
    window = latest_ok(fleet.sent["orin-slow-1"])
    assert slow["observation_window"]["sample_count"] == len(window) == 200
    state = slow["current_state"]
    assert state["model_config"] == {
        "model_name": MODEL,
        "strategy": "local",
        "batch_size": 512,
        "quantization": "Q4_1",
        "engine_settings": BASE,
        "settings_key": "flash_attn=off,n_batch=512,n_ctx=2048,n_gpu_layers=0,n_threads=1,quantization=Q4_1",
    }
    assert state["deployment_config"] == {
        "node_selector": {k: ORIN[k] for k in ("device_class", "model", "accelerator")},
        "gpu_allocation": "none (CPU only)",
    }
    latency = slow["performance_metrics"]["latency_analysis"]
    assert latency["tpot_p50_ms"] == pytest.approx(float(np.percentile(tpots(window), 50)), rel=1e-9)
    assert latency["tpot_p95_ms"] == pytest.approx(float(np.percentile(tpots(window), 95)), rel=1e-9)
    assert latency["ttft_p99_ms"] == pytest.approx(float(np.percentile([r["ttft_ms"] for r in window], 99)), rel=1e-9)
    assert latency["e2e_p95_ms"] == pytest.approx(float(np.percentile([r["e2e_ms"] for r in window], 95)), rel=1e-9)
    rates = [r["output_tokens"] / (r["e2e_ms"] / 1000) for r in window]
    throughput = slow["performance_metrics"]["throughput_analysis"]
    assert throughput["tokens_per_second"] == pytest.approx(float(np.median(rates)), rel=1e-6)
    assert throughput["requests_per_second"] == pytest.approx(1000 / float(np.mean([r["e2e_ms"] for r in window])))
    memory = slow["performance_metrics"]["resource_analysis"]
    rss = float(np.mean([r["rss_peak_bytes"] for r in window]))
    assert memory["avg_memory_utilization"] == pytest.approx(rss / (7.44 * 1024**3), rel=1e-9)
    assert "bottleneck_indicator" not in memory  # 4 % of RAM shows no bottleneck
    assert "sla_compliance" not in slow["performance_metrics"]

    rec, quant = slow["recommendations"]  # by priority: two threads (31 %), then Q4_0 (15 %)
    baseline = tpots(window)
    candidate = tpots(latest_ok(fleet.sent["orin-fast-1"])) + tpots(latest_ok(fleet.sent["orin-fast-2"]))
    expected = (np.median(baseline) - np.median(candidate)) / np.median(baseline)
    assert 0.25 < expected < 0.40  # what was planted: 12–12.6 ms against 18 ms
    assert rec["action"] == {
        "type": "config_change",
        "target": "model.n_threads",
        "current_value": 1,
        "recommended_value": 2,
        "rollback_strategy": rec["action"]["rollback_strategy"],
    }
    assert "rolls it back" in rec["action"]["rollback_strategy"] and "5 %" in rec["action"]["rollback_strategy"]
    assert rec["category"] == "resource_allocation"
    impact = rec["expected_impact"]
    assert impact["latency_improvement_percent"] == pytest.approx(expected * 100, rel=1e-9)
    assert impact["throughput_improvement_percent"] == pytest.approx(
        (np.median(baseline) / np.median(candidate) - 1) * 100, rel=1e-9
    )
    assert 0.9 <= impact["confidence_score"] <= 1.0  # a 30 % change over hundreds of requests: sure
    assert rec["priority"] == priority(expected, impact["confidence_score"]) and 5 <= rec["priority"] <= 7
    evidence = rec["evidence"]
    assert evidence["source"] == "fleet" and evidence["metric"] == "tpot_ms"
    assert evidence["p_value"] == pytest.approx(mann_whitney_pairs(baseline, candidate), rel=1e-6)
    assert evidence["p_value"] < 1e-30
    assert [d["device_id"] for d in evidence["candidate"]["devices"]] == ["orin-fast-1", "orin-fast-2"]
    assert evidence["candidate"]["requests"] == len(candidate) == 200 + len(latest_ok(fleet.sent["orin-fast-2"]))
    assert rec["recommendation_id"] == recommendation_id("orin-slow-1", MODEL, "model.n_threads", 2)
    for words in ("2 other devices of this class", "orin-fast-1 200 requests", "n_threads=2", "n_threads=1", "p = "):
        assert words in rec["rationale"], words
    assert f"{np.median(candidate):.4g} ms over {len(candidate)} requests" in rec["rationale"]
    assert f"{np.median(baseline):.4g} ms over this device's latest 200 requests" in rec["rationale"]
    # another quantization is evidence too, but not a change the agent makes: its target is no configuration key
    assert quant["action"]["target"] == "quantization" and quant["action"]["recommended_value"] == "Q4_0"
    assert quant["category"] == "quantization" and quant["priority"] < rec["priority"]
    q4_0 = tpots(latest_ok(fleet.sent["orin-q4-0"]))
    assert quant["expected_impact"]["latency_improvement_percent"] == pytest.approx(
        (np.median(baseline) - np.median(q4_0)) / np.median(baseline) * 100, rel=1e-9
    )
    # what was considered and why it is no recommendation: each rule once; the laptop and orin-both are not there
    outcomes = {(c["setting"], c["value"], c["source"]): c["outcome"] for c in slow["evidence_considered"]}
    assert outcomes == {
        ("n_threads", 2, "fleet"): "recommended",
        ("quantization", "Q4_0", "fleet"): "recommended",
        ("n_gpu_layers", 8, "fleet"): outcomes[("n_gpu_layers", 8, "fleet")],
        ("n_gpu_layers", 4, "fleet"): outcomes[("n_gpu_layers", 4, "fleet")],
        ("n_ctx", 4096, "fleet"): "too few requests (200 here, 12 with n_ctx=4096; at least 20 each)",
        ("n_ctx", 1024, "fleet"): outcomes[("n_ctx", 1024, "fleet")],
    }
    assert outcomes[("n_gpu_layers", 8, "fleet")].startswith("not significant")  # no difference planted
    assert outcomes[("n_gpu_layers", 4, "fleet")].startswith("better by 2.")  # 3 % planted: real, but small
    assert outcomes[("n_ctx", 1024, "fleet")].startswith("not significant (p = 0.1")  # 30 noisy requests
    noisy = {c["setting"]: c for c in slow["evidence_considered"] if c["value"] == 1024}["n_ctx"]
    assert noisy["improvement"] > FEEDBACK.min_improvement  # better by more than the minimum, but not sure

    # orin-slow-2 gets the same advice from the same devices, under its own id
    rec2 = docs["orin-slow-2"]["recommendations"][0]
    assert rec2["action"]["recommended_value"] == 2 and rec2["recommendation_id"] != rec["recommendation_id"]

    # orin-fast-1: flash attention, from orin-both (the only device differing from it in that one setting)
    [flash] = docs["orin-fast-1"]["recommendations"]
    assert flash["action"]["target"] == "model.flash_attn" and flash["action"]["recommended_value"] is True
    assert flash["category"] == "configuration"
    fast_window, both = tpots(latest_ok(fleet.sent["orin-fast-1"])), tpots(latest_ok(fleet.sent["orin-both"]))
    assert flash["expected_impact"]["latency_improvement_percent"] == pytest.approx(
        (np.median(fast_window) - np.median(both)) / np.median(fast_window) * 100, rel=1e-9
    )
    assert flash["evidence"]["p_value"] == pytest.approx(mann_whitney_pairs(fast_window, both), rel=1e-6)
    assert "1 other device of this class" in flash["rationale"]

    # no evidence, no recommendation: two settings at once, slower alternatives, nothing different, too few
    # requests, another class
    for device in ("orin-both", "orin-gpu", "orin-gpu4", "orin-few", "orin-q4-0", "laptop-1", "orin-fast-2"):
        recs = docs[device]["recommendations"]
        assert recs == [] or (device == "orin-fast-2" and [r["action"]["target"] for r in recs] == ["model.flash_attn"])
    assert "at least 20 are needed" in docs["orin-few"]["note"]
    assert docs["laptop-1"]["evidence_considered"] == []  # alone in its class
    assert all("laptop-1" not in c["devices"] for d in docs.values() for c in d["evidence_considered"])
    assert all("orin-both" not in c["devices"] for c in docs["orin-slow-1"]["evidence_considered"])

    # orin-hist has no facts: its own history (two threads earlier) is its evidence, and it is no one else's
    [own] = docs["orin-hist"]["recommendations"]
    assert own["evidence"]["source"] == "history" and own["action"]["recommended_value"] == 2
    hist = fleet.sent["orin-hist"]
    before, now = tpots(latest_ok(hist[:150])), tpots(latest_ok(hist[150:]))
    assert own["expected_impact"]["latency_improvement_percent"] == pytest.approx(
        (np.median(now) - np.median(before)) / np.median(now) * 100, rel=1e-9
    )
    assert own["evidence"]["p_value"] == pytest.approx(mann_whitney_pairs(now, before), rel=1e-6)
    assert "own history" in own["rationale"]
    assert "deployment_config" in docs["orin-hist"]["current_state"]
    assert "node_selector" not in docs["orin-hist"]["current_state"]["deployment_config"]
    assert "resource_analysis" not in docs["orin-hist"]["performance_metrics"]  # no RAM figure: no utilisation
    assert all("orin-hist" not in c["devices"] for c in docs["orin-slow-1"]["evidence_considered"])
    # its switch to one thread is a regression, and the anomaly says what changed with it
    changed = {a["affected_metric"]: a for a in docs["orin-hist"]["anomalies"]}
    assert set(changed) == {"tpot_ms", "tokens_per_second"}
    assert all(a["settings_change"] == "n_threads 2 → 1" for a in changed.values())
    assert changed["tpot_ms"]["description"].endswith("; the engine settings changed with it: n_threads 2 → 1")
    assert all(
        "anomalies" in d and "settings_change" not in str(d["anomalies"]) for k, d in docs.items() if k != "orin-hist"
    )

    # filters
    one = await (await client.get("/api/v1/feedback", params={"device": "orin-slow-1"})).json()
    assert [d["device_id"] for d in one["documents"]] == ["orin-slow-1"]
    none = await (await client.get("/api/v1/feedback", params={"model": "other"})).json()
    assert none["documents"] == []
    bad = await client.get("/api/v1/feedback", params={"device": "x" * 300})
    assert bad.status == 400 and (await bad.json())["parameter"] == "device"

    # the device's next acknowledgement carries its own recommendations, from the cache
    more = plant("orin-slow-1", 5, 11, BASE, 18.0)
    ack = await fleet.send(client, store, "orin-slow-1", more)
    ids = [bytes.fromhex(r["id"].replace("-", "")) for r in more]
    assert wire.check_ack(ack, "b", ids) == (5, 0)  # the agent's own check accepts the extra field
    found, problems = parse_wire(ack["recommendations"])
    assert problems == [] and [r.recommendation_id for r in found] == [rec["recommendation_id"]]  # not Q4_0
    assert found[0].target == "model.n_threads" and found[0].recommended_value == 2
    assert found[0].improvement == pytest.approx(expected) and found[0].metric == "tpot_ms"
    assert "fleet: 2 devices of this class" in found[0].evidence
    # a device without recommendations gets the plain acknowledgement
    quiet = await fleet.send(client, store, "orin-gpu", plant("orin-gpu", 3, 12, {**BASE, "n_gpu_layers": 8}, 18.0))
    assert "recommendations" not in quiet


async def test_fleet_evidence_needs_several_independent_devices_most_of_them_better(
    aiohttp_client: Any, tmp_path: Path
) -> None:
    """With the default fleet.feedback_min_devices (3): the fixture's two-thread evidence (two devices) and its Q4_0
    evidence (one device) recommend nothing; a third device makes the two-thread evidence a recommendation that names
    the stored records behind it; and a value that most of its devices measured worse is not recommended, however
    fast a few others say it is."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, regression_interval_s=0.0), store))
    fleet = await build_fleet(client, store)
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    slow = docs["orin-slow-1"]
    assert slow["recommendations"] == []
    outcomes = {(c["setting"], c["value"]): c for c in slow["evidence_considered"]}
    threads, quant = outcomes[("n_threads", 2)], outcomes[("quantization", "Q4_0")]
    assert threads["outcome"] == (
        "evidence from 2 devices; a fleet recommendation needs at least 3 independent devices "
        "(fleet.feedback_min_devices)"
    )
    assert threads["p_value"] < 1e-30  # however significant the two devices' evidence is
    assert quant["outcome"].startswith("evidence from 1 device;")
    assert docs["orin-hist"]["recommendations"] != []  # a device's own history is its own evidence

    await fleet.send(client, store, "orin-fast-3", [facts_record("orin-fast-3", WHEN, **ORIN)])
    await fleet.send(client, store, "orin-fast-3", plant("orin-fast-3", 120, 31, {**BASE, "n_threads": 2}, 12.3))
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    [rec] = docs["orin-slow-1"]["recommendations"]
    assert rec["action"]["recommended_value"] == 2 and "3 other devices of this class" in rec["rationale"]
    devices = rec["evidence"]["candidate"]["devices"]
    assert [d["device_id"] for d in devices] == ["orin-fast-1", "orin-fast-2", "orin-fast-3"]
    conn = sqlite3.connect(tmp_path / "agg.db")
    try:
        for d in devices:  # every figure traceable to stored rows of that device
            trace = d["records"]
            rows = conn.execute(
                "SELECT device_id, count(*) FROM measurements WHERE seq BETWEEN ? AND ? AND device_id = ?",
                (trace["first_seq"], trace["last_seq"], d["device_id"]),
            ).fetchone()
            assert rows[1] >= trace["requests"] >= d["requests"] > 0
            assert trace["from"] <= trace["until"]
        base = rec["evidence"]["baseline"]["records"]
        mine = conn.execute(
            "SELECT count(*) FROM measurements WHERE device_id = 'orin-slow-1' AND seq BETWEEN ? AND ?",
            (base["first_seq"], base["last_seq"]),
        ).fetchone()[0]
        assert mine >= base["requests"] == 200
    finally:
        conn.close()

    # flash attention: two devices very fast with many requests, four a little slower with a few each — the pooled
    # median is carried by the two; most devices say otherwise
    flash = {**BASE, "flash_attn": True}
    for n, (count, tpot) in enumerate([(200, 9.0), (200, 9.2), (8, 19.0), (8, 19.2), (8, 19.4), (8, 19.1)]):
        device = f"orin-flash-{n}"
        await fleet.send(client, store, device, [facts_record(device, WHEN, **ORIN)])
        await fleet.send(client, store, device, plant(device, count, 40 + n, flash, tpot, sigma=0.02))
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    outcome = {(c["setting"], c["value"]): c for c in docs["orin-slow-1"]["evidence_considered"]}[("flash_attn", True)]
    assert outcome["improvement"] > 0.05 and outcome["p_value"] < 0.01  # the pooled test alone would recommend it
    assert outcome["outcome"] == (
        "only 2 of 6 devices are better than this device on their own (at least 3 and more than half must be)"
    )
    assert [r["action"]["target"] for r in docs["orin-slow-1"]["recommendations"]] == ["model.n_threads"]

    # two compromised tokens claim four threads are twice as fast; the one honest device that ran them measured them
    # twice as slow, with a couple of requests: it counts against the value, never toward the quorum of three
    four = {**BASE, "n_threads": 4}
    for device, count, tpot in (("evil-1", 200, 9.0), ("evil-2", 200, 9.1), ("honest-4", 2, 36.0)):
        await fleet.send(client, store, device, [facts_record(device, WHEN, **ORIN)])
        await fleet.send(client, store, device, plant(device, count, 60 + count, four, tpot, sigma=0.02))
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    outcome = {(c["setting"], c["value"]): c for c in docs["orin-slow-1"]["evidence_considered"]}[("n_threads", 4)]
    assert outcome["p_value"] < 0.01 and outcome["improvement"] > 0.3  # the pooled figures alone would recommend it
    assert outcome["outcome"].startswith("only 2 of 3 devices are better than this device on their own")
    assert [r["action"]["recommended_value"] for r in docs["orin-slow-1"]["recommendations"]] == [2]


async def test_an_agent_receives_its_recommendations_with_the_sync_answer(aiohttp_client: Any, tmp_path: Path) -> None:
    """The real uploader of lens-agent against the real app: the acknowledgement it accepts carries the device's
    recommendations, its listener gets them, and parse_wire keeps them."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, feedback_settings=STATS), store))
    fleet = Fleet()
    two = {**BASE, "n_threads": 2}
    for device, settings, tpot, seed in (("orin-a", BASE, 18.0, 21), ("orin-b", two, 12.0, 22)):
        await fleet.send(client, store, device, [facts_record(device, WHEN, **ORIN)])
        await fleet.send(client, store, device, plant(device, 120, seed, settings, tpot))
    assert (await client.get("/api/v1/feedback")).status == 200  # computed now (interval 0), then cached
    box = Outbox(tmp_path / "outbox.db")
    box.append_many(plant("orin-a", 10, 23, BASE, 18.0))
    outbox = AsyncOutbox(box)
    settings = SyncSettings(url=str(client.make_url("")).rstrip("/"), token=fleet.tokens["orin-a"], device_id="orin-a")
    uploader = Uploader(outbox, settings)
    answers: list[dict[str, Any]] = []
    uploader.on_ack = answers.append
    report = await uploader.sync_now()
    await uploader.close()
    await outbox.close()
    assert report.ok and report.accepted == 10
    [answer] = answers
    found, problems = parse_wire(answer["recommendations"])
    assert problems == [] and len(found) == 1
    assert (found[0].target, found[0].current_value, found[0].recommended_value) == ("model.n_threads", 1, 2)


async def test_hostile_stored_rows_do_not_break_the_answer(aiohttp_client: Any, tmp_path: Path) -> None:
    """Rows no agent would send, stored as they are: garbage in the settings column, text where numbers belong,
    bodies that do not decode, facts of the wrong types. The answer stays a valid document per device × model, and
    the real evidence still makes its recommendation."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, feedback_settings=STATS), store))
    fleet = Fleet()

    def row(device: str, settings: Any, **columns: Any) -> RecordRow:
        values: dict[str, Any] = {
            "id": uuid.uuid4().bytes,
            "device_id": device,
            "run_id": "run",
            "kind": "inference",
            "started_us": int(WHEN.timestamp() * 1e6)
            - 10**9,  # ran before the real evidence (the latest by event time)
            "ok": True,
            "strategy": "local",
            "model_name": MODEL,
            "engine": "llama.cpp",
            "error_type": None,
            "input_tokens": 10,
            "output_tokens": 20,
            "ttft_us": 1000,
            "tpot_us": 50,
            "e2e_us": 5000,
            "j_per_token": None,
            "power_w": None,
            "settings": settings,
            "contended": 0,
            "codec": "cbor",
            "body": b"\xff\x00not cbor",
        }
        values.update(columns)
        return RecordRow(**values)

    hostile = [
        row("orin-a", "n_threads=abc,zzz=1,,=="),
        row("orin-a", "n_threads=2," + "x" * 400),
        row("orin-a", "n_threads=2", ttft_us="fast", tpot_us=-5, e2e_us=float("inf"), output_tokens="many"),
        row("orin-a", None, started_us="yesterday"),
        row("orin-a", settings_key(BASE), started_us=10**18, tpot_us=2**62),  # year 33658, a 146-year token
        row("weird-\u2603", "n_threads=1", model_name="m\u0000odel", tpot_us=10**18),
        row("orin-c", None, kind="device_facts", body=b"\x00"),
    ]
    store.ingest("orin-a", "hostile", 1, {}, hostile, NOW)
    two = {**BASE, "n_threads": 2}
    for device, settings, tpot, seed in (("orin-a", BASE, 18.0, 31), ("orin-b", two, 12.0, 32)):
        await fleet.send(client, store, device, [facts_record(device, WHEN, **ORIN)])
        await fleet.send(client, store, device, plant(device, 80, seed, settings, tpot))
    bad_facts = facts_record("orin-c", WHEN, device_class=["embedded device"], model=7, ram_gb="lots")
    token = store.add_token("orin-c", "device", NOW)
    refused = await client.post("/api/v1/ingest", data=make_batch([bad_facts], device="orin-c"), headers=auth(token))
    assert refused.status == 400 and "ext.device" in (await refused.json())["error"]  # ingest refuses them today …
    from aggregator.app import _row

    blob = wire.encode_record(bad_facts, "cbor")  # … an older release stored them: the reads must still hold
    store.ingest("orin-c", "old", 1, {}, [_row(wire.loads(blob, "cbor"), "cbor", blob)], NOW)
    await fleet.send(client, store, "orin-c", plant("orin-c", 40, 33, two, 11.0))
    response = await client.get("/api/v1/feedback")
    assert response.status == 200
    docs = check_documents(await response.json())
    assert {"orin-a", "orin-b", "orin-c", "weird-\u2603"} <= set(docs)
    [rec] = docs["orin-a"]["recommendations"]
    assert [d["device_id"] for d in rec["evidence"]["candidate"]["devices"]] == ["orin-b"]  # not orin-c: no class
    assert docs["orin-c"]["current_state"]["deployment_config"] == {"gpu_allocation": "none (CPU only)"}
    assert docs["weird-\u2603"]["recommendations"] == []
    assert docs["weird-\u2603"]["performance_metrics"]["latency_analysis"]["tpot_p50_ms"] == 10**15


async def test_batch_size_is_judged_on_ttft_over_the_same_prompts(aiohttp_client: Any, tmp_path: Path) -> None:
    """n_batch moves prefill: its evidence is TTFT, compared over the prompt lengths both sides ran. A device whose
    earlier requests ran other prompts has no evidence, however much faster their first tokens came."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, feedback_settings=STATS), store))
    fleet = Fleet()
    small = {**BASE, "n_batch": 256}
    earlier = plant("orin-batch", 350, 61, small, 18.0, ttft_factor=0.7)[:150]
    now = plant("orin-batch", 350, 62, BASE, 18.0)[150:]
    await fleet.send(client, store, "orin-batch", earlier)
    await fleet.send(client, store, "orin-batch", now)
    other = plant("orin-prompts", 350, 63, small, 18.0, ttft_factor=0.7)[:150]
    for r in other:
        r["input_tokens"] += 500  # another prompt set: longer prompts, whatever their TTFT
    await fleet.send(client, store, "orin-prompts", other)
    await fleet.send(client, store, "orin-prompts", plant("orin-prompts", 350, 64, BASE, 18.0)[150:])
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    [rec] = docs["orin-batch"]["recommendations"]
    assert rec["action"]["target"] == "model.n_batch" and rec["action"]["recommended_value"] == 256
    assert rec["category"] == "batching" and rec["evidence"]["metric"] == "ttft_ms"
    assert docs["orin-batch"]["current_state"]["model_config"]["batch_size"] == 512
    base, cand = matched_on_prompt_length(latest_ok(now), latest_ok(earlier), "ttft_ms")
    assert len(base) == len(cand) >= 140  # the same prompt set: nearly every earlier request has its match
    expected = (np.median(base) - np.median(cand)) / np.median(base)
    assert rec["expected_impact"]["latency_improvement_percent"] == pytest.approx(expected * 100, rel=1e-9)
    assert "throughput_improvement_percent" not in rec["expected_impact"]  # TTFT is no rate of the request
    assert rec["evidence"]["p_value"] == pytest.approx(mann_whitney_pairs(base, cand), rel=1e-6)
    assert "matched on prompt length" in rec["rationale"]
    assert docs["orin-prompts"]["recommendations"] == []
    [considered] = docs["orin-prompts"]["evidence_considered"]
    assert considered["outcome"].startswith("too few requests matched on prompt length (0 here, 0 with n_batch=256")


def test_confidence_grows_with_samples_and_margin() -> None:
    """The bootstrap confidence: sure for a large effect, less sure for one near the minimum improvement, and more
    sure of the same effect with more requests; the same inputs give the same figure."""
    rng = np.random.default_rng(5)

    def sample(median: float, n: int) -> list[float]:
        return (median * rng.lognormal(0.0, 0.08, n)).tolist()

    big = bootstrap_confidence(sample(18.0, 200), [sample(12.0, 200)], 0.05, seed=1)
    assert big == 1.0
    baseline, few, many = sample(18.0, 400), sample(18.0 * 0.94, 40), sample(18.0 * 0.94, 400)
    small_n = bootstrap_confidence(baseline, [few], 0.05, seed=1)
    large_n = bootstrap_confidence(baseline, [many], 0.05, seed=1)
    assert 0.5 < large_n < 1.0 and small_n < large_n
    assert bootstrap_confidence(baseline, [few], 0.05, seed=1) == small_n
    # strata keep their weights: a second device adds its own resamples, it does not replace the first's
    both = bootstrap_confidence(baseline, [many, sample(18.0 * 0.94, 400)], 0.05, seed=1)
    assert both >= large_n - 0.05


async def test_own_history_outweighs_the_fleet(aiohttp_client: Any, tmp_path: Path) -> None:
    """The fleet says two threads are faster; this device measured two threads slower itself (its earlier
    requests): no recommendation, and the document says why."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, feedback_settings=STATS), store))
    fleet = Fleet()
    two = {**BASE, "n_threads": 2}
    for device in ("orin-x", "orin-y"):
        await fleet.send(client, store, device, [facts_record(device, WHEN, **ORIN)])
    await fleet.send(client, store, "orin-x", plant("orin-x", 200, 71, two, 22.0)[:100])
    await fleet.send(client, store, "orin-x", plant("orin-x", 200, 72, BASE, 18.0)[100:])
    await fleet.send(client, store, "orin-y", plant("orin-y", 100, 73, two, 12.0))
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    assert docs["orin-x"]["recommendations"] == []
    outcomes = {c["source"]: c for c in docs["orin-x"]["evidence_considered"]}
    assert outcomes["history"]["outcome"].startswith("worse by ")
    assert outcomes["fleet"]["outcome"].startswith("contradicted: this device's own history")
    assert outcomes["fleet"]["improvement"] > 0.25 and outcomes["fleet"]["p_value"] < 1e-10


def test_the_feedback_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``lens-aggregator feedback`` computes the documents from the store and prints them (or the API's JSON)."""
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    from aggregator.app import parse_batch

    two = {**BASE, "n_threads": 2}
    sent = {}
    fleet = (
        ("orin-a", BASE, 18.0, 81),
        ("orin-b", two, 12.0, 82),
        ("orin-c", two, 12.3, 83),
        ("orin-d", two, 12.1, 84),
    )
    for device, settings, tpot, seed in fleet:  # three independent devices: fleet.feedback_min_devices
        sent[device] = plant(device, 60, seed, settings, tpot)
        records = [facts_record(device, WHEN, **ORIN), *sent[device]]
        _, rows, _ = parse_batch(make_batch(records, device=device), Settings(), device, NOW)
        store.ingest(device, "b", 1, {}, rows, NOW)
    store.close()
    from aggregator.cli import main

    def run(*args: str) -> tuple[int, str, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        out = capsys.readouterr()
        return int(exited.value.code or 0), out.out, out.err

    code, out, _ = run("feedback", "--db", str(db), "--device", "orin-a")
    lines = out.splitlines()
    assert code == 0 and lines[0].startswith("orin-a · Smollm2 135M 8k Lc100K Mix1 Ep2 (local) · flash_attn=off,")
    window = latest_ok(sent["orin-a"])
    assert lines[1].startswith(f"  window: {len(window)} requests, {window[0]['started_at']} → ")
    assert f"TPOT p50 {np.percentile(tpots(window), 50):.4g} ms" in lines[1]
    assert (
        lines[2].startswith("  recommend (priority ")
        and "model.n_threads 1 → 2: TPOT 3" in lines[2]
        and "% faster (" in lines[2]
    )
    code, out, _ = run("feedback", "--db", str(db), "--json")
    answer = json.loads(out)
    assert code == 0 and [d["device_id"] for d in answer["documents"]] == ["orin-a", "orin-b", "orin-c", "orin-d"]
    assert all(not list(VALIDATOR.iter_errors(d)) for d in answer["documents"])
    code, out, _ = run("feedback", "--db", str(db), "--model", "nothing")
    assert code == 0 and out == "no device × model with a successful request matches\n"
    code, out, _ = run("feedback", "--help")
    assert code == 0 and "Example:" in out
    code, _, err = run("feedback", "--db", str(tmp_path))
    assert code == 2 and "is a directory" in err


async def test_off_loopback_the_documents_need_a_read_token(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(host="0.0.0.0", feedback_interval_s=0.0), store))
    assert (await client.get("/api/v1/feedback")).status == 401
    device = store.add_token("orin-a", "device", NOW)
    assert (await client.get("/api/v1/feedback", headers=auth(device))).status == 403  # device tokens only write
    reader = store.add_token("grafana", "read", NOW)
    answer = await client.get("/api/v1/feedback", headers=auth(reader))
    assert answer.status == 200 and (await answer.json())["documents"] == []


def test_config_keys_are_checked(tmp_path: Path) -> None:
    config = load_aggregator_config(None, environ={}, default_path=tmp_path / "none.toml")
    assert config.get("fleet", "feedback_interval") == 300.0 and config.get("fleet", "feedback_window") == 200
    path = tmp_path / "aggregator.toml"
    for text, words in (
        ("[fleet]\nfeedback_window = 10\n", "fleet.feedback_window = 10 is not allowed: expected an integer ≥ "),
        ("[fleet]\nfeedback_min_samples = 500\n", "fleet.feedback_min_samples = 500 is not allowed: expected an int"),
        ("[fleet]\nfeedback_alpha = 0.9\n", "fleet.feedback_alpha = 0.9 is not allowed"),
        ('[fleet]\nfeedback_interval = "soon"\n', "fleet.feedback_interval"),
        ("[fleet]\nfeedback_history = 100\n", "fleet.feedback_history = 100 is not allowed: expected an integer ≥ "),
    ):
        path.write_text(text)
        with pytest.raises(ConfigError) as caught:
            load_aggregator_config(path, environ={})
        assert str(path) in str(caught.value) and words in str(caught.value), str(caught.value)
    settings = Settings.from_config(
        load_aggregator_config(None, environ={"LENS_FLEET_FEEDBACK_ALPHA": "0.001"}, default_path=path.parent / "x")
    )
    assert settings.feedback_settings.alpha == 0.001 and settings.feedback_interval_s == 300.0


def test_severity_and_priority_rules() -> None:
    assert [severity(10.0, after, "tpot_ms") for after in (12.0, 13.0, 19.9, 20.0)] == [
        "low",
        "medium",
        "high",
        "critical",
    ]
    assert [severity(100.0, after, "tokens_per_second") for after in (90.0, 70.0, 51.0, 50.0)] == [
        "low",
        "medium",
        "high",
        "critical",
    ]
    assert priority(0.05, 0.5) == 1 and priority(0.25, 1.0) == 5 and priority(0.9, 1.0) == 10


async def test_a_regression_is_an_anomaly_with_its_deviation(aiohttp_client: Any, tmp_path: Path) -> None:
    """A planted TPOT step (1.6×) on one device: the document's anomaly is the regression search's, with the
    severity of its factor and the deviation in standard deviations of the requests before it."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(
        create_app(Settings(feedback_interval_s=0.0, regression_interval_s=0.0, feedback_settings=STATS), store)
    )
    fleet = Fleet()
    first = plant("orin-r", 300, 41, BASE, 18.0)
    later = plant("orin-r", 300, 42, BASE, 18.0 * 1.6)
    records = first[:200] + later[200:]
    await fleet.send(client, store, "orin-r", records)
    regressions = (await (await client.get("/api/v1/regressions")).json())["regressions"]
    tpot = next(r for r in regressions if r["metric"] == "tpot_ms")
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    anomaly = next(a for a in docs["orin-r"]["anomalies"] if a["affected_metric"] == "tpot_ms")
    assert anomaly["anomaly_type"] == "latency_spike" and anomaly["severity"] == "high"
    assert anomaly["description"] == tpot["summary"]
    ok = [r for r in records if r["ok"]]
    index = next(i for i, r in enumerate(ok) if r["started_at"] == _iso(tpot["since_us"]))
    before = tpots(ok[:index][-tpot["requests_before"] :])
    expected = (tpot["after_median"] - tpot["before_median"]) / float(np.std(before, ddof=1))
    assert anomaly["deviation_magnitude"] == pytest.approx(expected, rel=1e-9) and anomaly["deviation_magnitude"] > 1
    drop = next(a for a in docs["orin-r"]["anomalies"] if a["affected_metric"] == "tokens_per_second")
    assert drop["anomaly_type"] == "throughput_drop"


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


# -- the wire: what a device accepts ------------------------------------------------------------------------------


def good(**changes: Any) -> dict[str, Any]:
    item: dict[str, Any] = {
        "recommendation_id": str(uuid.uuid5(uuid.NAMESPACE_URL, "x")),
        "model_name": MODEL,
        "target": "model.n_threads",
        "current_value": 1,
        "recommended_value": 2,
        "improvement": 0.31,
        "confidence": 0.97,
        "metric": "tpot_ms",
        "evidence": "fleet: 2 devices of this class, 320 requests at n_threads=2",
    }
    item.update(changes)
    return item


def test_parse_wire_round_trip_and_absent() -> None:
    rec = Recommendation(**good())
    assert parse_wire(to_wire([rec])) == ([rec], [])
    assert parse_wire(json.loads(json.dumps(to_wire([rec])))) == ([rec], [])
    assert parse_wire(None) == ([], []) and parse_wire([]) == ([], [])
    assert len(to_wire([rec] * 20)) == MAX_ITEMS


@pytest.mark.parametrize(
    ("changes", "words"),
    [
        ({"recommendation_id": "not-a-uuid"}, "is not a UUID"),
        ({"recommendation_id": str(uuid.uuid4()).upper()}, "canonical"),
        ({"recommendation_id": 7}, "not a string"),
        ({"model_name": "x" * 300}, "300 characters"),
        ({"model_name": ""}, "0 characters"),
        ({"model_name": "a\nb"}, "control characters"),
        ({"target": "model.path"}, "not a setting the agent changes"),
        ({"target": "quantization"}, "not a setting the agent changes"),
        ({"target": ["model.n_threads"]}, "not a setting"),
        ({"current_value": True}, "n_threads takes int values"),
        ({"recommended_value": "2"}, "n_threads takes int values"),
        ({"recommended_value": 2.0}, "n_threads takes int values"),
        ({"recommended_value": 10**9}, "out of range"),
        ({"target": "model.flash_attn", "current_value": False, "recommended_value": 1}, "takes bool values"),
        ({"recommended_value": 1}, "the current value"),
        ({"improvement": "0.3"}, "not a number"),
        ({"improvement": True}, "not a number"),
        ({"improvement": float("nan")}, "out of range"),
        ({"improvement": 0}, "out of range"),
        ({"improvement": -0.2}, "out of range"),
        ({"improvement": 1e9}, "out of range"),
        ({"confidence": 1.5}, "out of range"),
        ({"metric": "TPOT; rm -rf"}, "not a metric name"),
        ({"evidence": "y" * (MAX_EVIDENCE_CHARS + 1)}, f"{MAX_EVIDENCE_CHARS + 1} characters"),
        ({"evidence": None}, "not a string"),
    ],
)
def test_parse_wire_refuses_each_bad_item(changes: dict[str, Any], words: str) -> None:
    """Each bad item is refused with a line naming the field; its neighbours are kept."""
    other = good(recommendation_id=str(uuid.uuid4()), target="model.n_batch", current_value=512, recommended_value=256)
    found, problems = parse_wire([good(**changes), other])
    assert [r.target for r in found] == ["model.n_batch"]
    assert len(problems) == 1 and problems[0].startswith("recommendation 0 refused: ") and words in problems[0]
    assert len(problems[0]) < 300  # a huge value is quoted, not repeated


def test_parse_wire_refuses_hostile_lists() -> None:
    huge = "z" * 10**6
    found, problems = parse_wire([good(recommendation_id=str(uuid.uuid4())) for _ in range(1000)])
    assert len(found) == MAX_ITEMS and len(problems) == 1 and f"{MAX_ITEMS}…999 refused" in problems[0]
    for value in ({"a": 1}, "recommendations", 5, True, huge, 10**5000):
        found, problems = parse_wire(value)
        assert found == [] and len(problems) == 1 and len(problems[0]) < 200 and "not a list" in problems[0]
    mixed: list[Any] = [None, 3, "x", [good()], {"evidence": huge}, good(current_value=10**5000), good(), good()]
    found, problems = parse_wire(mixed)
    assert len(found) == 1 and len(problems) == 7 and all(len(p) < 300 for p in problems)
    assert "current_value = an int too large to show is out of range" in problems[5]
    assert "repeats" in problems[-1]
    nested: Any = []
    for _ in range(10_000):
        nested = [nested]
    assert parse_wire(nested)[0] == []


def test_store_rows_of_an_older_schema_are_not_in_the_way(tmp_path: Path) -> None:
    """The settings column of rows stored before schema 5 was backfilled: NULL stays "no settings" (a document
    without engine settings and without recommendations, never an error)."""
    store = SQLiteStore(tmp_path / "agg.db")
    records = plant("orin-old", 40, 51, BASE, 18.0)
    for r in records:
        r["ext"] = {}
    from aggregator.app import parse_batch

    _, rows, _ = parse_batch(make_batch(records, device="orin-old"), Settings(), "orin-old", NOW)
    store.ingest("orin-old", "b", 1, {}, rows, NOW)
    from aggregator.feedback import compute

    documents, advice, _ = compute(store, FEEDBACK, [], NOW)
    [doc] = documents
    assert not list(VALIDATOR.iter_errors(doc)) and advice == {}
    assert doc["recommendations"] == [] and doc["current_state"]["model_config"]["engine_settings"] == {}
    assert "no engine settings" in doc["note"]
    with sqlite3.connect(tmp_path / "agg.db") as conn:
        assert conn.execute("SELECT count(*) FROM measurements WHERE settings IS NULL").fetchone()[0] == 40


def test_a_device_with_thousands_of_model_names_costs_a_bounded_computation(tmp_path: Path) -> None:
    """The feedback computation and the regression search read at most MAX_SERIES_PER_DEVICE series of one device
    (its most recently seen): a flood of model names from one token costs no more than 32 series."""
    from aggregator import regressions
    from aggregator.app import parse_batch
    from aggregator.feedback import MAX_SERIES_PER_DEVICE, compute

    store = SQLiteStore(tmp_path / "agg.db")
    reads: list[str] = []
    latest_columns = store.latest_columns

    def counting(query: Any, columns: Any, limit: int, **options: Any) -> Any:
        if query.kind == "inference":  # the series' requests (not the device's facts)
            reads.append(query.model)
        return latest_columns(query, columns, limit, **options)

    records = plant("flood", 300, 51, BASE, 18.0)
    for n, record in enumerate(records):
        record["model_name"] = f"model-{n}"
    _, rows, _ = parse_batch(make_batch(records, device="flood"), Settings(), "flood", NOW)
    store.ingest("flood", "b", 1, {}, rows, NOW)
    store.latest_columns = counting  # type: ignore[method-assign]
    docs, _, _ = compute(store, FEEDBACK, [], NOW)
    assert len(reads) == MAX_SERIES_PER_DEVICE >= len(docs) > 0  # a series of failed requests has no document
    reads.clear()
    regressions.find_regressions(store)
    assert len(reads) == regressions.MAX_SERIES_PER_DEVICE
    store.close()
