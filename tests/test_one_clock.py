"""One clock for "the latest requests" (issue 32): the fleet figures, the fleet page and the feedback documents are
over the requests that ran last (the device's ``started_us``), not those received last. A retried batch of
five-day-old records (already stored: deduplicated) and a first delivery of other five-day-old records arriving
after the current ones change no current figure. Receive time still drives last-seen. Real ingest over HTTP, both
stores."""

from __future__ import annotations

import json
import statistics
import time
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from lens_core import wire

from .test_aggregator import auth
from .test_device_page import facts_record
from .test_feedback import ORIN

NOW = datetime.now(timezone.utc)
DEVICE = "dev-clock"
# what a row or a series shows about the latest requests (not counters of everything stored, not last-seen)
ROW_FIGURES = (
    "model",
    "strategy",
    "ttft_p95_ms",
    "tokens_per_second",
    "requests",
    "errors",
    "error_rate",
    "contended",
    "contended_share",
    "j_per_output_token",
)
SERIES_FIGURES = (
    "requests",
    "errors",
    "error_rate",
    "ttft_p50_ms",
    "ttft_p95_ms",
    "tpot_p50_ms",
    "tpot_p95_ms",
    "tokens_per_second",
    "j_per_output_token",
)


def requests_at(first: datetime, n: int, seed: int, tpot_ms: float) -> list[dict[str, Any]]:
    """``n`` successful requests 30 s apart from ``first``, TPOT ``tpot_ms`` (+ a little), 64 output tokens."""
    records = synthetic_records(n, seed=seed, device_id=DEVICE)
    for i, r in enumerate(records):
        tpot = tpot_ms + i * 0.01
        when = first + timedelta(seconds=30 * i)
        r.update(
            {
                "ok": True,
                "error_type": None,
                "error_message": None,
                "model_name": "qwen Q4",
                "strategy": "local",
                "started_at": when.isoformat(timespec="microseconds").replace("+00:00", "Z"),
                "ttft_ms": 100.0 + i * 0.1,
                "tpot_ms": tpot,
                "output_tokens": 64,
                "e2e_ms": 100.0 + i * 0.1 + 63 * tpot,
            }
        )
    return records


async def send(client: Any, token: str, records: list[dict[str, Any]], batch_id: str) -> dict[str, Any]:
    body = wire.encode_batch(
        [wire.encode_record(r, "cbor") for r in records], device_id=DEVICE, batch_id=batch_id, sent_us=1, codec="cbor"
    )
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 200, await response.text()
    answer: dict[str, Any] = await response.json()
    return answer


def figures(row: dict[str, Any]) -> dict[str, Any]:
    return {
        **{key: row[key] for key in ROW_FIGURES},
        "series": [{key: s[key] for key in SERIES_FIGURES} for s in row["series"]],
    }


def feedback_figures(doc: dict[str, Any]) -> dict[str, Any]:
    return {
        "window": {k: v for k, v in doc["observation_window"].items() if k != "end_time_note"},
        "state": doc["current_state"],
        "performance": doc["performance_metrics"],
    }


async def snapshot(client: Any) -> dict[str, Any]:
    api = (await (await client.get("/api/v1/fleet")).json())["devices"]
    one = (await (await client.get("/api/v1/fleet", params={"device": DEVICE})).json())["devices"]
    page = await (await client.get("/")).text()
    marker = "const initial = "
    data, _ = json.JSONDecoder().raw_decode(page, page.index(marker) + len(marker))
    feedback = (await (await client.get("/api/v1/feedback")).json())["documents"]
    (doc,) = [d for d in feedback if d["device_id"] == DEVICE]
    (row,) = [r for r in api if r["device_id"] == DEVICE]
    (page_row,) = [r for r in data["devices"] if r["device_id"] == DEVICE]
    return {
        "row": row,
        "api": figures(row),
        "one": figures(one[0]),
        "page": figures(page_row),
        "feedback": feedback_figures(doc),
    }


async def test_old_requests_arriving_late_change_no_current_figure(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, regression_interval_s=0.0), store))
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    five_days_ago = NOW - timedelta(days=5)
    old = requests_at(five_days_ago, 120, 1, 40.0)
    current = requests_at(NOW - timedelta(hours=3), 240, 2, 54.0)  # more than the feedback window (200)
    await send(client, token, [facts_record(DEVICE, five_days_ago, **ORIN, power_mode="15W")], "old-facts")
    await send(client, token, old, "old")
    await send(client, token, [facts_record(DEVICE, NOW - timedelta(hours=3), **ORIN, power_mode="MAXN")], "facts")
    await send(client, token, current, "current")
    before = await snapshot(client)
    assert before["row"]["power_mode"] == "MAXN"

    # the figures are those of the current requests' latest 50 (the fleet window), whatever arrived when
    latest = current[-50:]
    tpots = sorted(r["tpot_ms"] for r in latest)
    (series,) = before["api"]["series"]
    assert series["requests"] == 50 and series["tpot_p50_ms"] == pytest.approx(statistics.median(tpots), abs=1e-3)
    rates = [r["output_tokens"] / (r["e2e_ms"] / 1000) for r in latest]
    assert before["api"]["tokens_per_second"] == pytest.approx(statistics.median(rates), rel=1e-3)
    assert before["api"] == before["one"] == before["page"]
    answer = await (await client.get("/api/v1/fleet")).json()  # the answer says which statistic each figure is
    assert answer["statistics"]["tokens_per_second"].startswith("median")
    assert answer["statistics"]["ttft_p95_ms"].startswith("95th percentile")
    assert before["feedback"]["performance"]["latency_analysis"]["tpot_p50_ms"] > 50  # the current 54 ms, not 40

    # a retried batch: every record stored already (deduplicated), received now
    again = await send(client, token, old, "old-again")
    assert again["duplicates"] == 120
    retried = await snapshot(client)
    assert retried["api"] == before["api"] and retried["page"] == before["page"] and retried["one"] == before["one"]
    assert retried["feedback"] == before["feedback"]

    # other five-day-old requests, delivered for the first time after the current ones (a device back from a week
    # offline empties its outbox oldest first, or a second outbox): stored, counted, never "the latest"
    late = requests_at(five_days_ago + timedelta(hours=2), 120, 3, 30.0)
    late_facts = facts_record(DEVICE, five_days_ago + timedelta(hours=2), **ORIN, power_mode="7W")
    answer = await send(client, token, [late_facts, *late], "late")
    assert answer["accepted"] == 121
    after = await snapshot(client)
    assert after["row"]["records"] == before["row"]["records"] + 121
    assert after["row"]["power_mode"] == "MAXN"  # the facts taken last, not those received last
    assert after["row"]["last_seen_us"] >= before["row"]["last_seen_us"]  # receive time: last-seen still moves
    assert after["api"] == before["api"] and after["page"] == before["page"] and after["one"] == before["one"]
    assert after["feedback"] == before["feedback"]


async def test_the_latest_by_event_time_whichever_way_the_store_reads_them(
    aiohttp_client: Any, store: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """SQLite walks the device's latest rows by time and sorts the matching rows when few are among them: both
    give the requests that ran last."""
    from aggregator import store as store_module
    from aggregator.store import Query

    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    current = requests_at(NOW - timedelta(hours=3), 80, 2, 54.0)
    late = requests_at(NOW - timedelta(days=5), 80, 1, 40.0)
    await send(client, token, current[:40], "a")
    await send(client, token, late, "late")
    await send(client, token, current[40:], "b")
    expected = sorted(r["tpot_ms"] * 1000 for r in current[-50:])
    query = Query(device=DEVICE, kind="inference", model="qwen Q4", strategy="local")
    answers = []
    for factor in (8, 0):  # walked by time; sorted
        monkeypatch.setattr(store_module, "EVENT_WALK_FACTOR", factor)
        rows = store.latest_columns(query, ("started_us", "tpot_us"), 50, by_event=True)
        assert [r[0] for r in rows] == sorted(r[0] for r in rows)  # oldest first
        assert sorted(r[1] for r in rows) == pytest.approx(expected)
        answers.append(rows)
        every = store.latest_columns(query, ("started_us",), 500, by_event=True)  # fewer than asked: all of them
        assert len(every) == 160 and [r[0] for r in every] == sorted(r[0] for r in every)
    assert answers[0] == answers[1]
    assert store.latest_columns(Query(device=DEVICE, kind="device_facts"), ("seq",), 1, by_event=True) == []
