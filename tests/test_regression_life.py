"""Regressions as lasting objects (issue 32): a regression the change-point search finds is kept in the store (schema
9) as an object that opens, is confirmed by later searches, is acknowledged by an operator and resolves when its
series recovers — through real ingest into a real aiohttp app on SQLite and PostgreSQL, across a restart, with the
API, the CLI, health, the device page and /metrics; a late backlog holding a step opens one at its event time; the
store bounds the objects per series and per device; an older store migrates to schema 9 with its data."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app, evaluate_triggers, parse_batch
from aggregator.config import load_aggregator_config
from aggregator.metrics import FleetMetrics
from aggregator.regressions import MAX_OPEN_PER_DEVICE
from aggregator.store import SCHEMA_VERSION, RegressionChanges

from .test_aggregator import auth, make_batch
from .test_device_page import retime
from .test_regressions import slower_from

NOW = time.time_ns() // 1000
DEVICE = "orin-007"
REPO = Path(__file__).resolve().parent.parent


def _us(started_at: str) -> float:
    return datetime.fromisoformat(started_at.replace("Z", "+00:00")).timestamp() * 1e6


def _records(step_at: int = 250, recover_at: int | None = None, count: int = 600) -> list[dict[str, Any]]:
    """``count`` records of one device, decoding 1.78× slower from ``step_at`` on, back to normal from
    ``recover_at`` on (when given)."""
    base = synthetic_records(count, seed=7, device_id=DEVICE)
    slow = copy.deepcopy(base)
    slower_from(slow, step_at, 1.78)
    if recover_at is None:
        return slow
    return slow[:recover_at] + base[recover_at:]


async def _upload(client: Any, token: str, records: list[dict[str, Any]]) -> None:
    response = await client.post("/api/v1/ingest", data=make_batch(records, device=DEVICE), headers=auth(token))
    assert response.status == 200, await response.text()


async def _listed(client: Any, state: str = "open") -> dict[str, Any]:
    response = await client.get(f"/api/v1/regressions?state={state}")
    assert response.status == 200, await response.text()
    body: dict[str, Any] = await response.json()
    return body


def _reopen(store: Any) -> Any:
    from aggregator.pgstore import PostgresStore
    from aggregator.store import SQLiteStore

    return SQLiteStore(store.path) if hasattr(store, "path") else PostgresStore(store.url)


def _db(store: Any) -> str:
    return str(store.path) if hasattr(store, "path") else str(store.url)


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", "from aggregator.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, env=env, timeout=120)


async def test_open_confirmed_acknowledged_resolved_and_kept_across_a_restart(aiohttp_client: Any, store: Any) -> None:
    records = _records(recover_at=460)
    token = store.add_token(DEVICE, "device", NOW)
    operator = store.add_token("alice", "operator", NOW)
    reader = store.add_token("grafana", "read", NOW)
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store))

    # opened: the step at request 250
    await _upload(client, token, records[:400])
    body = await _listed(client)
    assert body["state"] == "open" and body["improvements"] == []
    opened = {r["metric"]: r for r in body["regressions"]}
    assert set(opened) == {"tpot_ms", "tokens_per_second"}, body
    tpot = opened["tpot_ms"]
    assert tpot["state"] == "open" and type(tpot["id"]) is int and tpot["resolved_us"] is None
    assert abs(tpot["since_us"] - _us(records[250]["started_at"])) <= 3 * 7.5e6 + 1e6
    # (a search of the background loop may have confirmed it already: found first, confirmed since or then)
    assert tpot["first_found_us"] <= tpot["last_confirmed_us"] and tpot["change"] == pytest.approx(0.78, abs=0.12)
    assert tpot["confidence"] == pytest.approx(1 - tpot["p_value"]) and tpot["engine_after"] == ["llama.cpp"]
    assert tpot["summary"].startswith("TPOT +") and f"on {DEVICE} since" in tpot["summary"]

    # health warns of it, the fleet row counts it, /metrics has the gauge
    row = (await (await client.get("/api/v1/fleet")).json())["devices"][0]
    assert row["health"] == "warning" and row["regressions_open"] == 2
    assert any(r.startswith("regression: TPOT +") for r in row["health_reasons"])
    metrics = (await (await client.get("/metrics")).read()).decode()
    gauge = [line for line in metrics.splitlines() if line.startswith("llm_latency_lens_regressions_open{")]
    assert sorted(gauge) == [
        f'llm_latency_lens_regressions_open{{device="{DEVICE}",metric="tokens_per_second"}} 1.0',
        f'llm_latency_lens_regressions_open{{device="{DEVICE}",metric="tpot_ms"}} 1.0',
    ]

    # confirmed: more slow requests; the same objects, confirmed later, nothing new
    await _upload(client, token, records[400:460])
    body = await _listed(client)
    confirmed = {r["metric"]: r for r in body["regressions"]}
    assert {r["id"] for r in confirmed.values()} == {r["id"] for r in opened.values()}
    assert confirmed["tpot_ms"]["last_confirmed_us"] > tpot["last_confirmed_us"]
    assert confirmed["tpot_ms"]["first_found_us"] == tpot["first_found_us"]
    assert confirmed["tpot_ms"]["since_us"] == tpot["since_us"]

    # acknowledged through the API: a device or read token is refused, bad input is named, unknown ids are 404
    url = f"/api/v1/regressions/{tpot['id']}/acknowledge"
    assert (await client.post(url, json={"note": "x"}, headers=auth(token))).status == 403
    assert (await client.post(url, json={"note": "x"}, headers=auth(reader))).status == 403
    assert (await client.post(url, json={"note": "x"})).status == 401
    bad = await client.post(url, data=b"{not json", headers=auth(operator))
    assert bad.status == 400 and (await bad.json())["path"] == "$"
    bad = await client.post(url, json={"note": 5}, headers=auth(operator))
    assert bad.status == 400 and (await bad.json())["path"] == "$.note" and "string" in (await bad.json())["message"]
    bad = await client.post(url, json={"notes": "x"}, headers=auth(operator))
    assert bad.status == 400 and (await bad.json())["path"] == "$.notes"
    bad = await client.post(url, json={"note": "n" * 1001}, headers=auth(operator))
    assert bad.status == 400 and (await bad.json())["path"] == "$.note"
    # text that is not valid Unicode, or reads otherwise than it holds, or spans lines: named, never a 500
    for note, said in (("a\ud800b", "lone surrogate"), ("ok\u202egnp.exe", "U+202E"), ("a\rb\x07", "U+000D")):
        bad = await client.post(url, json={"note": note}, headers=auth(operator))
        assert bad.status == 400 and (await bad.json())["path"] == "$.note" and said in (await bad.json())["message"]
    missing = await client.post("/api/v1/regressions/999999/acknowledge", headers=auth(operator))
    assert missing.status == 404 and (await missing.json())["error"] == "no_such_regression"
    wrong = await client.post("/api/v1/regressions/abc/acknowledge", headers=auth(operator))
    assert wrong.status == 400 and (await wrong.json())["path"] == "id"
    acked = await client.post(url, json={"note": "new quantization, known"}, headers=auth(operator))
    assert acked.status == 200, await acked.text()
    acked_body = await acked.json()
    assert acked_body["state"] == "acknowledged" and acked_body["acknowledged_by"] == "alice"
    assert acked_body["note"] == "new quantization, known" and acked_body["acknowledged_us"] >= NOW

    # the CLI acknowledges the other one (an empty note), and lists them (read-only)
    tps_id = opened["tokens_per_second"]["id"]
    done = _cli("regressions", "ack", str(tps_id), "--by", "bob", "--db", _db(store))
    assert done.returncode == 0 and f"regression {tps_id}: acknowledged" in done.stdout, done.stderr
    assert _cli("regressions", "ack", "999999", "--db", _db(store)).returncode == 2
    surrogate = _cli("regressions", "ack", str(tps_id), "--note", "a\udced\udca0\udc80b", "--db", _db(store))
    assert surrogate.returncode == 2 and "--note:" in surrogate.stderr and "Traceback" not in surrogate.stderr
    listed = _cli("regressions", "--state", "acknowledged", "--json", "--db", _db(store))
    assert listed.returncode == 0, listed.stderr
    cli_items = json.loads(listed.stdout)["regressions"]
    assert {(i["id"], i["acknowledged_by"]) for i in cli_items} == {(tpot["id"], "alice"), (tps_id, "bob")}
    for args in (["regressions"], ["regressions", "ack"]):
        shown = _cli(*args, "--help")
        assert shown.returncode == 0 and "Example:" in shown.stdout, args
    text = _cli("regressions", "--state", "all", "--db", _db(store))
    assert text.returncode == 0 and "acknowledged by alice" in text.stdout and "new quantization" in text.stdout

    # acknowledged: still listed (state=acknowledged), said among the health reasons, not a warning any more
    body = await _listed(client)
    assert body["regressions"] == []
    assert {r["id"] for r in (await _listed(client, "acknowledged"))["regressions"]} == {tpot["id"], tps_id}
    row = (await (await client.get("/api/v1/fleet")).json())["devices"][0]
    assert row["health"] == "ok" and row["regressions_open"] == 0, row["health_reasons"]
    assert any(r.startswith("regression acknowledged: TPOT +") for r in row["health_reasons"])
    metrics = (await (await client.get("/metrics")).read()).decode()
    assert "llm_latency_lens_regressions_open{" not in metrics

    # the device page lists them with state, since, size and evidence
    page = await (await client.get(f"/device/{DEVICE}")).text()
    assert 'id="regression-history"' in page and '"regression_objects"' in page
    assert f'"id": {tpot["id"]}' in page or f'"id":{tpot["id"]}' in page
    assert '"state": "acknowledged"' in page or '"state":"acknowledged"' in page

    # a restart: the objects are the store's
    await client.close()
    store2 = _reopen(store)
    client = await aiohttp_client(create_app(Settings(regression_interval_s=3600.0), store2))
    kept = {r["id"]: r for r in (await _listed(client, "acknowledged"))["regressions"]}
    assert set(kept) == {tpot["id"], tps_id} and kept[tpot["id"]]["note"] == "new quantization, known"
    assert kept[tpot["id"]]["first_found_us"] == tpot["first_found_us"]
    row = (await (await client.get("/api/v1/fleet")).json())["devices"][0]
    assert any(r.startswith("regression acknowledged:") for r in row["health_reasons"])
    await client.close()

    # resolved: the series recovers (normal speed again), which resolves acknowledged objects too; the way back is
    # no improvement of its own, and later searches (the step still in their window) do not open it again
    store3 = _reopen(store)
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store3))
    await _upload(client, token, records[460:600])
    for _ in range(2):
        body = await _listed(client)
        assert body["regressions"] == [] and body["improvements"] == [], body
    resolved = {r["id"]: r for r in (await _listed(client, "resolved"))["regressions"]}
    assert set(resolved) == {tpot["id"], tps_id}
    assert all(r["state"] == "resolved" and r["resolved_us"] >= r["last_confirmed_us"] for r in resolved.values())
    assert resolved[tpot["id"]]["note"] == "new quantization, known"  # the acknowledgement stays on record
    late = await client.post(url, json={"note": "too late"}, headers=auth(operator))
    assert late.status == 409 and (await late.json())["state"] == "resolved"
    row = (await (await client.get("/api/v1/fleet")).json())["devices"][0]
    assert row["health"] == "ok" and not any("regression" in r for r in row["health_reasons"])
    everything = await _listed(client, "all")
    assert len(everything["regressions"]) == 2 and everything["next_before"] is None
    page = await client.get("/api/v1/regressions?state=all&limit=1")
    first = await page.json()
    assert len(first["regressions"]) == 1 and first["next_before"] == first["regressions"][0]["id"]
    rest = await (await client.get(f"/api/v1/regressions?state=all&limit=1&before={first['next_before']}")).json()
    assert len(rest["regressions"]) == 1 and rest["regressions"][0]["id"] < first["next_before"]
    wrong_queries = (("state=closed", "state"), ("limit=0", "limit"), ("limit=100000", "limit"), ("before=x", "before"))
    for query, name in wrong_queries:
        refused = await client.get(f"/api/v1/regressions?{query}")
        assert refused.status == 400 and (await refused.json())["parameter"] == name


async def test_a_late_backlog_holding_a_step_opens_a_regression_at_its_event_time(
    aiohttp_client: Any, store: Any
) -> None:
    """The device's newest requests arrive first (all slow: no change among them); then its backlog, which ran
    earlier and holds the step, is uploaded: the next search finds it, since the step's event time."""
    records = _records(count=500)
    token = store.add_token(DEVICE, "device", NOW)
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store))
    await _upload(client, token, records[400:500])
    assert (await _listed(client))["regressions"] == []
    await _upload(client, token, records[:400])  # ran before everything stored so far
    found = {r["metric"]: r for r in (await _listed(client))["regressions"]}
    assert set(found) == {"tpot_ms", "tokens_per_second"}
    since = _us(records[250]["started_at"])
    assert abs(found["tpot_ms"]["since_us"] - since) <= 3 * 7.5e6 + 1e6
    assert found["tpot_ms"]["since_us"] < _us(records[400]["started_at"])  # event time, not receive time


def _finding(n: int = 0, metric: str = "tpot_ms", since_us: int = 1_000_000_000, **extra: Any) -> dict[str, Any]:
    return {
        "device_id": DEVICE,
        "model_name": f"model-{n}",
        "strategy": None,
        "metric": metric,
        "kind": "regression",
        "change": 0.5,
        "before_median": 10.0,
        "after_median": 15.0,
        "since_us": since_us,
        "since_received_us": since_us + 5,
        "requests_before": 100,
        "requests_after": 50,
        "p_value": 1e-9,
        "engine_before": ["llama.cpp"],
        "engine_after": ["llama.cpp"],
        "contended_excluded": 0,
        "summary": f"TPOT +50 % on {DEVICE}",
        **extra,
    }


def test_objects_are_bounded_per_series_and_per_device(store: Any) -> None:
    # two findings of one series key in one search, or in two: one object
    done = store.apply_regressions(RegressionChanges([], [_finding(), _finding(since_us=2_000_000_000)], []), NOW)
    assert len(done["opened"]) == 1 and len(done["confirmed"]) == 1
    done = store.apply_regressions(RegressionChanges([], [_finding()], []), NOW + 1)
    assert done["opened"] == [] and len(done["confirmed"]) == 1
    assert store.regression_counts() == {"open": 1}
    # the evidence (with or without the detection's fields) is kept as given; a NaN in it is not stored
    evidence = {"before_from_us": 1, "after_until_us": 3_000_000_000, "n": 150, "method": "Pettitt"}
    store.apply_regressions(RegressionChanges([], [_finding(1, evidence=evidence, confidence=0.99)], []), NOW)
    store.apply_regressions(RegressionChanges([], [_finding(2, evidence={"x": float("nan")})], []), NOW)
    kept = {r["model_name"]: r for r in store.regressions("open")}
    assert kept["model-1"]["evidence"] == evidence and kept["model-1"]["confidence"] == 0.99
    assert kept["model-0"]["evidence"] is None and kept["model-0"]["confidence"] == pytest.approx(1 - 1e-9)
    assert "not JSON" in kept["model-2"]["evidence"]["left_out"]
    # a device holds at most max_open open or acknowledged objects: findings past it are left out
    many = [_finding(n) for n in range(3, MAX_OPEN_PER_DEVICE + 10)]
    done = store.apply_regressions(RegressionChanges([], many, [], max_open=MAX_OPEN_PER_DEVICE), NOW)
    assert store.regression_counts() == {"open": MAX_OPEN_PER_DEVICE}
    assert done["left_out"] == list(range(MAX_OPEN_PER_DEVICE - 3, len(many)))  # which findings: the log names them
    # … and keeps its newest max_resolved resolved ones
    ids = [r["id"] for r in store.regressions("open", limit=1000)]
    store.apply_regressions(RegressionChanges([], [], ids[:30], max_resolved=10), NOW)
    assert store.regression_counts() == {"open": MAX_OPEN_PER_DEVICE - 30, "resolved": 10}
    assert len(store.regressions("all", limit=10_000)) == MAX_OPEN_PER_DEVICE - 30 + 10
    # a resolved object is not acknowledged; an unknown one says so
    resolved = store.regressions("resolved", limit=1)[0]["id"]
    assert store.acknowledge_regression(resolved, "alice", None, NOW) == "resolved"
    assert store.acknowledge_regression(10**9, "alice", None, NOW) is None
    assert store.regression(resolved)["state"] == "resolved"
    store.close()


def test_the_open_gauge_holds_to_the_per_device_series_budget() -> None:
    metrics = FleetMetrics(1000, max_series_per_device=3)
    metrics.regressions_open({("dev-a", f"metric_{n}"): 1 for n in range(8)} | {("dev-b", "tpot_ms"): 2})
    text = metrics.exposition().decode()
    lines = [line for line in text.splitlines() if line.startswith("llm_latency_lens_regressions_open{")]
    mine = [line for line in lines if 'device="dev-a"' in line]
    folded = [line for line in lines if 'device="other"' in line]  # past dev-a's budget of 3: folded, added up
    assert len(mine) == 3 and len(folded) == 5 and all(line.endswith(" 1.0") for line in folded), lines
    assert metrics.budget.tracked("dev-a") == 3 and metrics.budget.device_status("dev-a") is not None
    assert 'llm_latency_lens_regressions_open{device="dev-b",metric="tpot_ms"} 2.0' in lines
    metrics.regressions_open({("dev-c", "m"): 1, ("dev-d", "m"): 2} | {("dev-a", f"metric_{n}"): 1 for n in range(3)})
    text = metrics.exposition().decode()
    assert 'llm_latency_lens_regressions_open{device="dev-d",metric="m"} 2.0' in text
    metrics.regressions_open({})  # none open: the series go and give their places back
    text = metrics.exposition().decode()
    assert "llm_latency_lens_regressions_open{" not in text and metrics.budget.tracked("dev-a") == 0


def test_schema_8_migrates_to_9_with_its_data(store: Any) -> None:
    """… and on to 10 (the guardrail columns, already there: recomputed)."""
    assert SCHEMA_VERSION == 10 and store.schema_version() == 10
    records = synthetic_records(30, seed=3, device_id=DEVICE)
    batch, rows, _ = parse_batch(make_batch(records, device=DEVICE), Settings(), DEVICE, NOW)
    store.ingest(DEVICE, batch.batch_id, batch.sent_us, batch.counters, rows, NOW)
    store.add_token(DEVICE, "device", NOW)
    # back to schema 8: no regressions table
    store._campaign_write(lambda run: run("DROP TABLE regressions", []))
    store._campaign_write(lambda run: run("UPDATE meta SET value = '8' WHERE key = 'schema_version'", []))
    store.close()
    db = _db(store)
    refused = _cli("regressions", "--db", db)  # read-only: never migrates, says how
    assert refused.returncode == 2 and "lens-aggregator migrate" in refused.stderr and "8" in refused.stderr
    assert "Traceback" not in refused.stderr
    migrated = _cli("migrate", "--db", db)
    assert migrated.returncode == 0 and "migrated from schema version 8 to 10" in migrated.stderr, migrated.stderr
    again = _reopen(store)
    try:
        assert again.schema_version() == 10 and again.record_count() == 30
        assert again.authenticate(again.add_token("x", "read", NOW), NOW) is not None
        assert again.apply_regressions(RegressionChanges([], [_finding()], []), NOW)["opened"]
        assert _cli("regressions", "--json", "--db", db).returncode == 0
    finally:
        again.close()


def test_the_device_page_shows_the_regression_objects_in_a_browser(tmp_path: Path) -> None:
    """The device page, rendered by headless Chromium: the objects' table with state, since, size and evidence."""
    from aggregator.regressions import Settings as Detection
    from aggregator.regressions import Watch
    from aggregator.store import SQLiteStore

    from .test_fleet_page import SCREENSHOTS, chromium, console_errors, serving

    store = SQLiteStore(tmp_path / "agg.db")
    records = _records()[:400]
    batch, rows, _ = parse_batch(make_batch(records, device=DEVICE), Settings(), DEVICE, NOW)
    store.ingest(DEVICE, batch.batch_id, batch.sent_us, batch.counters, rows, NOW)
    done = Watch(0.0, Detection()).run_once(store, time.monotonic(), NOW)
    assert len(done["opened"]) == 2
    tpot = next(r for r in store.regressions("open") if r["metric"] == "tpot_ms")
    assert store.acknowledge_regression(tpot["id"], "alice", "driver rollback planned", NOW) == "open"
    store.close()
    with serving(tmp_path, Settings(regression_interval_s=3600.0)) as (url, _):
        dom = chromium("--dump-dom", f"{url}/device/{DEVICE}")
        SCREENSHOTS.mkdir(parents=True, exist_ok=True)
        chromium(
            "--window-size=1400,900", f"--screenshot={SCREENSHOTS / 'device-regressions.png'}", f"{url}/device/{DEVICE}"
        )
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    html = dom.stdout
    table = html[html.index('id="regression-objects"') :]
    table = table[: table.index("</table>")]
    assert table.count("<tr") == 3  # the header and the two objects
    assert "acknowledged by alice: driver rollback planned" in table and ">open<" in table
    assert "tpot_ms" in table and "tokens_per_second" in table and "requests before" in table
    assert "confidence 1.000" in table or "confidence 0.99" in table
    assert "regression acknowledged: TPOT +" in html  # among the health reasons, the state not raised by it


async def test_an_acknowledged_regression_stops_alerting_through_the_shipped_trigger(
    aiohttp_client: Any, store: Any
) -> None:
    """The shipped ``slower-decoding`` trigger (a TPOT regression) holds while the regression is open; once an
    operator acknowledges it, the trigger no longer holds — in the server and in ``lens-aggregator triggers`` —
    and health no longer warns of it: acknowledging is how a known regression stops alerting."""
    shipped = load_aggregator_config(REPO / "configs" / "aggregator.toml", environ={}).tables["triggers"]
    triggers = [t for t in shipped if t.name == "slower-decoding"]
    token = store.add_token(DEVICE, "device", NOW)
    operator = store.add_token("alice", "operator", NOW)
    app = create_app(Settings(regression_interval_s=0.0), store, triggers=triggers)
    client = await aiohttp_client(app)
    # the requests of the last 7 hours: within the trigger's 24 h window
    await _upload(client, token, retime(_records()[:400], datetime.now(timezone.utc) - timedelta(minutes=10), 60))

    def holds(answer: dict[str, Any]) -> set[str]:
        return {s["device_id"] for s in answer["holding"] if s["trigger"] == "slower-decoding"}

    assert holds((await evaluate_triggers(app)).answer()) == {DEVICE}
    tpot = next(r for r in (await _listed(client))["regressions"] if r["metric"] == "tpot_ms")
    acked = await client.post(f"/api/v1/regressions/{tpot['id']}/acknowledge", headers=auth(operator), json={})
    assert acked.status == 200, await acked.text()
    assert holds((await evaluate_triggers(app)).answer()) == set()
    row = (await (await client.get("/api/v1/fleet")).json())["devices"][0]
    assert row["regressions_open"] == 1 and len(row["regressions_acknowledged"]) == 1  # tok/s: still open
    config = REPO / "configs" / "aggregator.toml"
    done = _cli("triggers", "--config", str(config), "--db", _db(store), "--json")
    answer = json.loads(done.stdout)
    assert DEVICE not in holds(answer), answer["holding"]
