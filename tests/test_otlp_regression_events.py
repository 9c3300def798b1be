"""Regression events to OTLP (issue 32): a regression object that opens, is acknowledged and resolves reaches an
OTLP/HTTP backend as log records ``llm_latency_lens.regression.<event>`` — through a real aggregator (SQLite and
PostgreSQL) forwarding to a loopback receiver that decodes each request with opentelemetry-proto. The backend goes
down and comes back, the aggregator restarts: every event arrives, once, in order. The store keeps a bounded number
of events and counts those it drops."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from aggregator import store as store_module
from aggregator.app import Settings, create_app
from aggregator.otlp_forward import stored_status
from aggregator.store import RegressionChanges
from tests.otlp_receiver import Receiver, attrs, value_of
from tests.test_aggregator import auth
from tests.test_otlp import settings, wait_for
from tests.test_regression_life import DEVICE, NOW, _cli, _db, _records, _reopen, _upload

EVENTS = "regression_events"


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, int]:
    r = Receiver()
    server = await aiohttp_server(r.app(), host="127.0.0.1")
    return r, server.port


def _events(r: Receiver) -> list[tuple[dict[str, Any], Any, dict[str, Any]]]:
    """(resource attributes, log record, its attributes) of every log record received, in arrival order."""
    return [(resource, record, attrs(record.attributes)) for resource, record in r.log_records()]


def _app(store: Any, port: int) -> Any:
    return create_app(Settings(otlp=settings(port), regression_interval_s=0.0, metrics_max_age_s=0.0), store)


async def test_opened_acknowledged_resolved_arrive_once_in_order_across_an_outage_and_restarts(
    aiohttp_client: Any, store: Any, receiver: tuple[Receiver, int]
) -> None:
    r, port = receiver
    records = _records(recover_at=460)
    token = store.add_token(DEVICE, "device", NOW)
    operator = store.add_token("alice", "operator", NOW)
    client = await aiohttp_client(_app(store, port))

    # opened: the step at request 250 opens TPOT and tok/s regressions → two WARN log records
    await _upload(client, token, records[:400])
    opened = {o["metric"]: o for o in (await (await client.get("/api/v1/regressions")).json())["regressions"]}
    assert set(opened) == {"tpot_ms", "tokens_per_second"}
    await wait_for(lambda: len(r.log_records()) == 2)
    for resource, record, a in _events(r):
        assert record.event_name == a["event.name"] == "llm_latency_lens.regression.opened"
        assert record.severity_text == "WARN" and record.severity_number == 13
        assert resource["service.instance.id"] == resource["host.name"] == DEVICE
        got = opened[a["lens.regression.metric"]]
        assert a["lens.regression.id"] == got["id"] and a["lens.regression.kind"] == "regression"
        assert a["lens.regression.change"] == pytest.approx(got["change"])
        assert a["lens.regression.before_median"] == pytest.approx(got["before_median"])
        assert a["lens.regression.after_median"] == pytest.approx(got["after_median"])
        assert a["lens.regression.confidence"] == pytest.approx(got["confidence"])
        assert a["lens.regression.since_us"] == got["since_us"] and a["lens.regression.state"] == "open"
        assert a["gen_ai.request.model"] == got["model_name"] and "lens.regression.acknowledged_by" not in a
        assert record.time_unix_nano == got["first_found_us"] * 1000
        assert value_of(record.body) == f"opened: {got['summary']}"

    # acknowledged through the API → an INFO record with who and the note
    tpot = opened["tpot_ms"]
    url = f"/api/v1/regressions/{tpot['id']}/acknowledge"
    acked = await client.post(url, json={"note": "new quantization, known"}, headers=auth(operator))
    assert acked.status == 200, await acked.text()
    await wait_for(lambda: len(r.log_records()) == 3)
    _, record, a = _events(r)[2]
    assert record.event_name == "llm_latency_lens.regression.acknowledged" and record.severity_text == "INFO"
    assert record.severity_number == 9 and a["lens.regression.id"] == tpot["id"]
    assert a["lens.regression.acknowledged_by"] == "alice" and a["lens.regression.note"] == "new quantization, known"
    assert a["lens.regression.state"] == "acknowledged"

    # the backend goes down: the next acknowledgement waits in the store, retried, nothing skipped
    r.mode = "down"
    tps = opened["tokens_per_second"]
    acked = await client.post(f"/api/v1/regressions/{tps['id']}/acknowledge", headers=auth(operator))
    assert acked.status == 200
    await wait_for(lambda: sum(1 for s, code in r.answers if s == "logs" and code == 503) >= 3)
    status = stored_status(store)[EVENTS]
    assert status["pending_records"] == 1 and status["forwarded_records"] == 3
    text = await (await client.get("/metrics")).text()
    assert f'llm_latency_lens_otlp_export_failures_total{{reason="http_503",signal="{EVENTS}"}}' in text
    assert f'llm_latency_lens_otlp_pending_records{{signal="{EVENTS}"}} 1.0' in text
    assert "llm_latency_lens_otlp_dropped_regression_events_total 0.0" in text

    # a restart while it is down, then it comes back: the event arrives once
    await client.close()
    store2 = _reopen(store)
    client = await aiohttp_client(_app(store2, port))
    await asyncio.sleep(0.3)
    r.mode = "ok"
    await wait_for(lambda: len(r.log_records()) == 4)
    _, record, a = _events(r)[3]
    assert record.event_name == "llm_latency_lens.regression.acknowledged" and a["lens.regression.id"] == tps["id"]
    assert a["lens.regression.acknowledged_by"] == "alice" and "lens.regression.note" not in a

    # resolved: the series recovers → two INFO records
    await _upload(client, token, records[460:600])
    assert (await (await client.get("/api/v1/regressions")).json())["regressions"] == []
    await wait_for(lambda: len(r.log_records()) == 6)
    resolved = (await (await client.get("/api/v1/regressions?state=resolved")).json())["regressions"]
    assert {o["id"] for o in resolved} == {tpot["id"], tps["id"]}
    for _, record, a in _events(r)[4:]:
        assert record.event_name == "llm_latency_lens.regression.resolved" and record.severity_text == "INFO"
        assert a["lens.regression.state"] == "resolved" and type(a["lens.regression.resolved_us"]) is int

    # in order: each object's events opened → acknowledged → resolved, and the seqs rise with arrival
    seqs = [a["lens.regression.event.seq"] for _, _, a in _events(r)]
    assert seqs == sorted(seqs) and len(set(seqs)) == 6
    for regression_id in (tpot["id"], tps["id"]):
        names = [
            rec.event_name.rsplit(".", 1)[1] for _, rec, a in _events(r) if a["lens.regression.id"] == regression_id
        ]
        assert names == ["opened", "acknowledged", "resolved"], names

    # another restart with the backend up: nothing is sent again
    await client.close()
    store3 = _reopen(store)
    client = await aiohttp_client(_app(store3, port))
    await asyncio.sleep(1.0)  # a restarted forwarder that resent would have done it by now
    assert len(r.log_records()) == 6
    status = stored_status(store3)[EVENTS]
    assert status["cursor_seq"] == max(seqs) and status["pending_records"] == 0 and status["accepted_items"] == 6
    assert status["forwarded_records"] == 6 and status["dropped_events"] == 0
    # the cursor passed them: the store keeps none of the events sent
    assert store3.regression_events_after(0, 100) == []
    shown = _cli("otlp", "status", "--json", "--db", _db(store))
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)[EVENTS]["cursor_seq"] == max(seqs)
    await client.close()
    for s in (store2, store3):
        s.close()


def _finding(metric: str = "tpot_ms") -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "model_name": "tiny",
        "strategy": None,
        "metric": metric,
        "kind": "regression",
        "change": 0.5,
        "before_median": 40.0,
        "after_median": 60.0,
        "since_us": NOW - 3_600_000_000,
        "p_value": 1e-9,
        "confidence": 1 - 1e-9,
        "requests_before": 100,
        "requests_after": 100,
        "summary": "TPOT +50 %",
    }


def test_events_are_bounded_and_the_dropped_counted(store: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a backend (no forwarding configured, or one down for long), the store keeps the newest events up to
    the bound and counts the ones it drops; the cursor's status says so."""
    monkeypatch.setattr(store_module, "MAX_REGRESSION_EVENTS", 3)
    done = store.apply_regressions(RegressionChanges(confirm=[], insert=[_finding()], resolve=[]), NOW)
    (regression_id,) = done["opened"]
    for n in range(4):
        assert store.acknowledge_regression(regression_id, "alice", f"note {n}", NOW + n) in ("open", "acknowledged")
    kept = store.regression_events_after(0, 100)
    assert [e["event"] for e in kept] == ["acknowledged"] * 3
    assert [e["attributes"]["note"] for e in kept] == ["note 1", "note 2", "note 3"]
    status = stored_status(store)[EVENTS]
    assert status["pending_records"] == 3 and status["dropped_events"] == 2 and status["cursor_seq"] == 0
    # the object itself is untouched by the bound
    assert store.regression(regression_id)["note"] == "note 3"


def test_an_event_is_written_with_its_change_or_not_at_all(store: Any) -> None:
    """A resolve of an object already resolved, or an acknowledgement of a resolved one, writes no event."""
    done = store.apply_regressions(RegressionChanges(confirm=[], insert=[_finding()], resolve=[]), NOW)
    (regression_id,) = done["opened"]
    store.apply_regressions(RegressionChanges(confirm=[], insert=[], resolve=[regression_id]), NOW + 1)
    store.apply_regressions(RegressionChanges(confirm=[], insert=[], resolve=[regression_id]), NOW + 2)
    assert store.acknowledge_regression(regression_id, "alice", None, NOW + 3) == "resolved"
    events = store.regression_events_after(0, 100)
    assert [(e["event"], e["at_us"]) for e in events] == [("opened", NOW), ("resolved", NOW + 1)]
    assert events[1]["attributes"]["state"] == "resolved" and events[0]["attributes"]["state"] == "open"
    assert events[0]["seq"] < events[1]["seq"]


async def test_a_backend_refusing_every_event_holds_them_and_skips_nothing(
    aiohttp_client: Any, store: Any, receiver: tuple[Receiver, int]
) -> None:
    r, port = receiver
    r.refuse_devices = {DEVICE}  # 400 to any request carrying the device: the backend's fault, not one event's
    done = store.apply_regressions(
        RegressionChanges(confirm=[], insert=[_finding(), _finding("ttft_ms")], resolve=[]), NOW
    )
    assert len(done["opened"]) == 2
    client = await aiohttp_client(_app(store, port))
    await wait_for(lambda: sum(1 for s, code in r.answers if s == "logs" and code == 400) >= 6)
    status = stored_status(store)[EVENTS]
    assert status["pending_records"] >= 2 and status["forwarded_records"] == 0 and r.log_records() == []
    text = await (await client.get("/metrics")).text()
    assert f'llm_latency_lens_otlp_export_failures_total{{reason="refused_all",signal="{EVENTS}"}}' in text
    assert f'llm_latency_lens_otlp_backend_failing{{signal="{EVENTS}"}} 1.0' in text
    r.refuse_devices = set()
    await wait_for(lambda: stored_status(store)[EVENTS]["pending_records"] == 0)
    got = [(a["lens.regression.id"], rec.event_name) for _, rec, a in _events(r)]
    assert [g for g in got if g[1].endswith(".opened")] == [
        (i, "llm_latency_lens.regression.opened") for i in done["opened"]
    ]
    assert len(got) == len(set(got)) == stored_status(store)[EVENTS]["accepted_items"]
    assert stored_status(store)[EVENTS]["rejected_items"] == 0
