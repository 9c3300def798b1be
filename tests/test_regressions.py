"""Regressions found for the user (issue 15): change points per device × model × strategy series.

The detector on crafted series (a planted step is found where it was planted; stable, skewed, spiky series raise
nothing), then a fleet through real ingest — 50 devices on each store, one with a planted 1.78× TPOT regression,
one failing often — where exactly the planted series is flagged, at the right request, in the API, on /metrics
and on the page."""

from __future__ import annotations

import re
import time
from datetime import datetime
from typing import Any

import numpy as np
import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.regressions import Settings as Detection
from aggregator.regressions import change_point

from .test_aggregator import auth, make_batch

NOW = time.time_ns() // 1000


def test_a_planted_step_is_found_where_it_was_planted() -> None:
    rng = np.random.default_rng(3)
    for step, at in ((1.78, 300), (1.25, 200), (0.6, 120)):
        values = rng.lognormal(np.log(40.0), 0.2, 400)
        values[at:] *= step
        cp = change_point(values.tolist())
        assert cp is not None, (step, at)
        assert abs(cp.index - at) <= 5 and cp.change == pytest.approx(step - 1, abs=0.08)


def test_stable_series_raise_nothing() -> None:
    """300 stable series, skewed (log-normal) and with stalls (1 % of values 2–6×): at most a few false alarms
    (the bound is 1e-5 per series and metric)."""
    rng = np.random.default_rng(11)
    alarms = 0
    for _ in range(300):
        values = rng.lognormal(np.log(25.0), 0.35, 400)
        stalls = rng.random(400) < 0.01
        values[stalls] *= rng.uniform(2, 6, stalls.sum())
        alarms += change_point(values.tolist()) is not None
    assert alarms <= 2
    # a real but small shift (5 %) is not reported; too short a series says nothing
    shifted = rng.lognormal(np.log(25.0), 0.05, 400)
    shifted[200:] *= 1.05
    assert change_point(shifted.tolist()) is None
    assert change_point(shifted.tolist(), Detection(min_change=0.01)) is not None
    assert change_point([1.0] * 39) is None and change_point([1.0] * 400) is None


def slower_from(records: list[dict[str, Any]], start: int, factor: float) -> None:
    """Decoding ``factor`` × slower from ``records[start]`` on (gaps, TPOT, decode and e2e; TTFT unchanged)."""
    for r in records[start:]:
        if not r["ok"]:
            continue
        r["itl_ms"] = [round(g * factor, 3) for g in r["itl_ms"]]
        r["decode_ms"] = round(sum(r["itl_ms"]), 3)
        r["engine_decode_ms"] = round(r["decode_ms"] * 0.991, 3)
        r["tpot_ms"] = round(r["decode_ms"] / len(r["itl_ms"]), 3)
        r["e2e_ms"] = round(r["ttft_ms"] + r["decode_ms"], 3)


async def test_a_fleet_with_one_planted_regression(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store))
    planted_at = 250
    expected_since = None
    # 50 devices on each store: the 200-device scale, with weeks of records, runs through a real aggregator process
    # in tests/test_fleet_weeks.py
    devices = 50
    for n in range(devices):
        device = f"orin-{n:03d}"
        token = store.add_token(device, "device", NOW)
        records = synthetic_records(400 if n == 17 else 60, seed=100 + n, device_id=device)
        if n == 17:
            slower_from(records, planted_at, 1.78)
            expected_since = records[planted_at]["started_at"]
        if n == 42:  # a failing device: a quarter of its requests time out (an error rate, not a latency change)
            for r in records[::4]:
                r.update({"ok": False, "error_type": "timeout", "ttft_ms": None, "tpot_ms": None, "e2e_ms": None})
                r.update({"itl_ms": [], "decode_ms": None, "output_tokens": 0, "prefill_ms": None})
                r.update({"engine_prefill_ms": None, "engine_decode_ms": None, "stop_reason": None})
        response = await client.post("/api/v1/ingest", data=make_batch(records, device=device), headers=auth(token))
        assert response.status == 200, await response.text()
    body = await (await client.get("/api/v1/regressions")).json()
    flagged = {(r["device_id"], r["metric"]): r for r in body["regressions"]}
    assert set(flagged) == {("orin-017", "tpot_ms"), ("orin-017", "tokens_per_second")}, list(flagged)
    tpot = flagged[("orin-017", "tpot_ms")]
    assert tpot["change"] == pytest.approx(0.78, abs=0.12)
    assert tpot["engine_before"] == tpot["engine_after"] == ["llama.cpp"]
    since = datetime.fromisoformat(expected_since.replace("Z", "+00:00")).timestamp() * 1e6
    assert abs(tpot["since_us"] - since) <= 3 * 7.5e6 + 1e6  # within three requests (7.5 s apart) of the plant
    assert re.match(r"TPOT \+(7\d|8\d) % on orin-017 since 2026-11-01 00:31 UTC \(model ", tpot["summary"])
    assert "model " in tpot["summary"] and "unchanged, strategy local unchanged, engine unchanged" in tpot["summary"]
    assert flagged[("orin-017", "tokens_per_second")]["change"] < -0.2
    assert body["computed_at"].endswith("Z") and "Mann–Whitney" in body["method"] and "event time" in body["method"]
    # on /metrics for alerting, on the fleet API and on the page
    metrics = (await (await client.get("/metrics")).read()).decode()
    lines = [line for line in metrics.splitlines() if line.startswith("llm_latency_lens_regression_change_ratio{")]
    assert len(lines) == 2 and all('device="orin-017"' in line for line in lines)
    assert any('metric="tpot_ms"' in line and 0.6 < float(line.rsplit(" ", 1)[1]) < 0.95 for line in lines)
    fleet = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    assert len(fleet) == devices and len(fleet["orin-017"]["regressions"]) == 2
    assert sum(len(d["regressions"]) for d in fleet.values()) == 2
    assert fleet["orin-042"]["error_rate"] == pytest.approx(0.26, abs=0.06) and not fleet["orin-042"]["regressions"]
    page = await (await client.get("/")).text()
    assert tpot["summary"] in page.replace("\\u2192", "→")
