"""Contended requests on the aggregator (issue 26): ``ext.interference`` checked at ingest, ``measurements.contended``
(schema 8, backfilled on upgrade), the contended share of each device in ``/api/v1/fleet``, on the fleet page and on
``/metrics``, and the change-point search and feedback that leave contended requests out unless told — while the
recommendations sent to devices never learn from them.

Records go through the real ingest endpoint of the real app on 127.0.0.1 (and a real ``lens-aggregator serve``
process for the upgrade), on SQLite and PostgreSQL where the other fleet tests run on both."""

from __future__ import annotations

import asyncio
import json
import sqlite3
import uuid
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from agent.synthetic import synthetic_records
from aggregator.app import Settings, _row, create_app
from aggregator.config import load_aggregator_config
from aggregator.feedback import Settings as FeedbackSettings
from aggregator.store import SCHEMA_VERSION, Query, SQLiteStore
from lens_core import record_schema, wire
from lens_core.errors import ConfigError
from lens_core.recommendations import parse_wire

from .hostile_device import encode_raw, raw_batch, valid_wire
from .netproxy import free_port
from .processes import AggregatorProcess, open_store
from .test_aggregator import auth, make_batch
from .test_device_page import facts_record
from .test_feedback import BASE, NOW, WHEN, Fleet, check_documents, plant
from .test_fleet_page import chromium, console_errors, serving
from .test_regressions import slower_from

BUSY = {"contended": True, "reasons": ["cpu", "frequency"], "other_cpu_cores": 1.6, "load1": 3.2,
        "psi_cpu_some_pct": 41.0, "cpu_freq_ratio": 0.55, "summary": "other processes used 1.6 of 2 cores"}  # fmt: skip
QUIET = {"contended": False, "reasons": [], "other_cpu_cores": 0.05, "mem_available_pct": 71.5, "temp_max_c": 48.0}


def contend(records: list[dict[str, Any]], interference: dict[str, Any] = BUSY) -> list[dict[str, Any]]:
    """The records with ``ext.interference`` as the agent writes it (other ext sections kept)."""
    for r in records:
        r["ext"] = {**(r.get("ext") or {}), "interference": dict(interference)}
    return records


def gauge(text: str, name: str) -> dict[str, float]:
    """device → value of a per-device gauge in a /metrics exposition."""
    for family in text_string_to_metric_families(text):
        if family.name == name:
            return {s.labels["device"]: s.value for s in family.samples}
    return {}


async def test_contended_share_in_the_fleet_and_on_metrics(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(), store))
    fleet = Fleet()
    busy = synthetic_records(40, seed=61, device_id="busy-1")
    contend(busy[10:20])
    contend(busy[30:], QUIET)  # measured, not contended
    await fleet.send(client, store, "busy-1", busy)
    await fleet.send(client, store, "quiet-1", synthetic_records(20, seed=62, device_id="quiet-1"))
    # a device whose latest 50 requests hold 5 contended ones, after 60 that the window no longer reaches
    many = synthetic_records(110, seed=63, device_id="many-1")
    contend(many[:60])
    contend(many[-5:])
    await fleet.send(client, store, "many-1", many)
    await fleet.send(client, store, "facts-only", [facts_record("facts-only", WHEN, device_class="laptop")])

    stored = store.columns(Query(device="busy-1"), ("contended",))
    assert sorted(r[0] for r in stored) == [0] * 30 + [1] * 10
    assert sum(r[0] for r in store.columns(Query(device="many-1"), ("contended",))) == 65
    rows = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    assert (rows["busy-1"]["contended_share"], rows["busy-1"]["contended"]) == (0.25, 10)
    assert rows["quiet-1"]["contended_share"] == 0.0
    assert rows["many-1"]["contended_share"] == 0.1 and rows["many-1"]["requests"] == 50
    assert rows["facts-only"]["contended_share"] is None and rows["facts-only"]["requests"] == 0
    one = await (await client.get("/api/v1/fleet?device=busy-1")).json()
    assert one["devices"][0]["contended_share"] == 0.25

    shares = gauge(await (await client.get("/metrics")).text(), "llm_latency_lens_device_contended_share")
    assert shares == {"busy-1": 0.25, "quiet-1": 0.0, "many-1": 0.1}  # no requests, no series


# (ext.interference, the field the refusal names)
MALFORMED: list[tuple[Any, str]] = [
    ([True], "ext.interference"),
    ({"reasons": ["cpu"]}, "ext.interference.contended"),
    ({"contended": "yes", "reasons": ["cpu"]}, "ext.interference.contended"),
    ({"contended": 1, "reasons": ["cpu"]}, "ext.interference.contended"),
    ({"contended": True}, "ext.interference.reasons"),
    ({"contended": True, "reasons": "cpu"}, "ext.interference.reasons"),
    ({"contended": True, "reasons": ["cpu", "gpu"]}, "ext.interference.reasons"),
    ({"contended": True, "reasons": ["cpu", "cpu"]}, "ext.interference.reasons"),
    ({"contended": True, "reasons": [1]}, "ext.interference.reasons"),
    ({"contended": True, "reasons": ["cpu"] + ["io"] * 8}, "ext.interference.reasons"),
    ({**BUSY, "other_cpu_cores": 2000.0}, "ext.interference.other_cpu_cores"),
    ({**BUSY, "load1": -1}, "ext.interference.load1"),
    ({**BUSY, "psi_io_some_pct": 100.5}, "ext.interference.psi_io_some_pct"),
    ({**BUSY, "swap_pages_per_s": 2e9}, "ext.interference.swap_pages_per_s"),
    ({**BUSY, "cpu_freq_ratio": 2.5}, "ext.interference.cpu_freq_ratio"),
    ({**BUSY, "gpu_freq_ratio": "low"}, "ext.interference.gpu_freq_ratio"),
    ({**BUSY, "temp_max_c": 300.0}, "ext.interference.temp_max_c"),
    ({**BUSY, "summary": "x" * 201}, "ext.interference.summary"),
    ({**BUSY, "summary": "busy\x1b[31m"}, "ext.interference.summary"),
    ({**BUSY, "summary": "busy \u202egnp.exe"}, "ext.interference.summary"),  # a bidirectional override
    ({**BUSY, "summary": "busy\u2028line"}, "ext.interference.summary"),
    ({"contended": True, "reasons": []}, "ext.interference.contended"),  # a mark without a reason
    ({"contended": False, "reasons": ["cpu", "io"]}, "ext.interference.contended"),  # reasons without the mark
]


@pytest.mark.parametrize(("interference", "field"), MALFORMED, ids=[f"{m[1]}-{i}" for i, m in enumerate(MALFORMED)])
async def test_malformed_interference_is_refused_naming_the_field(
    aiohttp_client: Any, tmp_path: Path, interference: Any, field: str
) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    good = valid_wire(3, seed=64, device="dev-1")
    bad = {**good[1], "ext": {"interference": interference}}
    body = raw_batch([encode_raw(r, "cbor") for r in (good[0], bad, good[2])], device="dev-1")
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    answer = await response.json()
    assert response.status == 400 and answer["code"] == "record_invalid" and answer["record_index"] == 1
    assert f"field '{field}'" in answer["error"], answer["error"]
    assert store.record_count() == 0
    with pytest.raises(record_schema.SchemaError) as refused:  # the same check, called directly
        record_schema.check_record(bad, NOW)
    assert refused.value.field == field


async def test_what_the_agent_writes_is_accepted(aiohttp_client: Any, tmp_path: Path) -> None:
    """Every §1 figure at its bounds, unknown keys inside ext.interference (ignored), no interference at all."""
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    records = valid_wire(4, seed=65, device="dev-1")
    edges = {
        name: bounds[1] for (section, name), bounds in record_schema.EXT_NUMBERS.items() if section == "interference"
    }
    reasons = sorted(record_schema.INTERFERENCE_REASONS)
    records[0]["ext"] = {"interference": {"contended": True, "reasons": reasons, **edges, "future_field": [1, "x"]}}
    records[1]["ext"] = {"interference": {"contended": False, "reasons": [], "temp_max_c": -100, "summary": ""}}
    records[2]["ext"] = {"interference": None}
    body = raw_batch([encode_raw(r, "msgpack") for r in records], codec="msgpack", device="dev-1")
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    assert response.status == 200, await response.text()
    flags = [r[0] for r in store._read("SELECT contended FROM measurements ORDER BY seq")]
    assert flags == [1, 0, 0, 0]


def test_the_fleet_page_shows_the_contended_share(tmp_path: Path) -> None:
    with serving(tmp_path, Settings()) as (url, tokens):
        busy = contend(synthetic_records(10, seed=66, device_id="orin-017"))  # 10 of its latest 50 requests

        async def send() -> None:
            async with aiohttp.ClientSession() as session:
                body = make_batch(busy, device="orin-017")
                headers = auth(tokens["orin-017"])
                async with session.post(url + "/api/v1/ingest", data=body, headers=headers) as answer:
                    assert answer.status == 200

        asyncio.run(send())
        dom = chromium("--dump-dom", url + "/?sort=contended_share&desc=1")
    assert console_errors(dom.stderr) == [], dom.stderr[-2000:]
    assert 'data-key="contended_share"' in dom.stdout and ">contended</th>" in dom.stdout
    rows = [line for line in dom.stdout.split("<tr ") if line.startswith('id="device-')]
    assert [row.split('"', 2)[1] for row in rows] == ["device-orin-017", "device-laptop-3"]  # sorted by the share
    assert '<td class="contended warning" title="10 of the latest 50 requests were contended' in rows[0]
    assert ">20 %</td>" in rows[0] and '<td class="contended" title="0 of the latest 40 requests' in rows[1]


async def test_a_contended_slowdown_is_no_regression_unless_asked(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(regression_interval_s=0.0), store))
    fleet = Fleet()
    busy = synthetic_records(400, seed=67, device_id="orin-busy")
    slower_from(busy, 250, 1.78)
    contend(busy[250:])  # the device said other work ran beside every slow request
    real = synthetic_records(400, seed=68, device_id="orin-real")
    slower_from(real, 250, 1.78)  # a slowdown nothing explains
    for device, records in (("orin-busy", busy), ("orin-real", real)):
        await fleet.send(client, store, device, records[:200])
        await fleet.send(client, store, device, records[200:])
    left_out = sum(1 for r in busy[250:] if r["ok"])

    body = await (await client.get("/api/v1/regressions")).json()
    assert {r["device_id"] for r in body["regressions"]} == {"orin-real"}
    assert body["include_contended"] is False and body["contended_excluded"] == left_out
    assert "contended requests left out" in body["method"]
    assert all(r["contended_excluded"] == 0 for r in body["regressions"])

    body = await (await client.get("/api/v1/regressions?include_contended=1")).json()
    flagged = {(r["device_id"], r["metric"]) for r in body["regressions"]}
    assert ("orin-busy", "tpot_ms") in flagged and ("orin-real", "tpot_ms") in flagged
    assert body["include_contended"] is True and body["contended_excluded"] == 0
    # the cached search (and the fleet page's lines) stay the configured one
    again = await (await client.get("/api/v1/regressions?include_contended=0")).json()
    assert {r["device_id"] for r in again["regressions"]} == {"orin-real"}
    rows = {d["device_id"]: d for d in (await (await client.get("/api/v1/fleet")).json())["devices"]}
    assert rows["orin-busy"]["regressions"] == [] and rows["orin-real"]["regressions"]
    assert rows["orin-busy"]["contended_share"] == 1.0 and rows["orin-real"]["contended_share"] == 0.0

    wrong = await client.get("/api/v1/regressions?include_contended=maybe")
    assert wrong.status == 400 and (await wrong.json())["parameter"] == "include_contended"


async def test_configured_to_include_contended_requests(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(
        create_app(Settings(regression_interval_s=0.0, regression_include_contended=True), store)
    )
    busy = synthetic_records(400, seed=67, device_id="orin-busy")
    slower_from(busy, 250, 1.78)
    contend(busy[250:])
    await Fleet().send(client, store, "orin-busy", busy)
    body = await (await client.get("/api/v1/regressions")).json()
    assert ("orin-busy", "tpot_ms") in {(r["device_id"], r["metric"]) for r in body["regressions"]}
    body = await (await client.get("/api/v1/regressions?include_contended=0")).json()
    assert body["regressions"] == [] and body["contended_excluded"] == sum(1 for r in busy[250:] if r["ok"])


def own_history(device: str) -> tuple[list[list[dict[str, Any]]], int]:
    """A device without facts (its own history is its only evidence): 60 requests with two threads at 15 ms TPOT,
    then one thread — 40 requests at 10 ms, then 80 at 30 ms while other work contended with it. Without the
    contended ones, one thread is faster here; with them, two threads look 50 % faster. The batches, and how many
    successful requests are contended."""
    two = {**BASE, "n_threads": 2}
    earlier = plant(device, 180, 71, two, 15.0)[:60]
    fast = plant(device, 180, 72, BASE, 10.0)[60:100]
    slow = contend(plant(device, 180, 73, BASE, 30.0)[100:])
    return [earlier, fast, slow], sum(1 for r in slow if r["ok"])


async def test_feedback_leaves_contended_requests_out_unless_asked(aiohttp_client: Any, store: Any) -> None:
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, regression_interval_s=0.0), store))
    fleet = Fleet()
    batches, left_out = own_history("orin-h")
    for records in batches:
        await fleet.send(client, store, "orin-h", records)

    answer = await (await client.get("/api/v1/feedback")).json()
    doc = check_documents(answer)["orin-h"]
    assert answer["include_contended"] is False and "contended requests left out" in answer["method"]
    assert doc["recommendations"] == [] and doc["contended_excluded"] == left_out
    assert doc["observation_window"]["sample_count"] == sum(1 for r in batches[1] if r["ok"])
    [history] = [c for c in doc["evidence_considered"] if c["source"] == "history"]
    assert history["outcome"].startswith("worse by ")
    assert doc["anomalies"] == []  # the slow contended requests are no regression either

    asked = await (await client.get("/api/v1/feedback?include_contended=1&device=orin-h")).json()
    doc = check_documents(asked)["orin-h"]
    assert asked["include_contended"] is True and doc["contended_excluded"] == 0
    [rec] = doc["recommendations"]
    assert (rec["action"]["target"], rec["action"]["current_value"], rec["action"]["recommended_value"]) == (
        "model.n_threads",
        1,
        2,
    )
    assert rec["evidence"]["source"] == "history" and rec["evidence"]["baseline"]["contended_excluded"] == 0
    assert any(a["affected_metric"] == "tpot_ms" for a in doc["anomalies"])
    # the cache the acknowledgements read is the configured computation's: nothing for this device
    ack = await fleet.send(client, store, "orin-h", plant("orin-h", 5, 74, BASE, 10.0))
    assert "recommendations" not in ack
    wrong = await client.get("/api/v1/feedback?include_contended=2")
    assert wrong.status == 400 and (await wrong.json())["parameter"] == "include_contended"


async def test_acknowledgements_never_learn_from_contended_requests(aiohttp_client: Any, tmp_path: Path) -> None:
    """Configured to use contended requests, the documents recommend two threads; the device's acknowledgement,
    computed without them, carries nothing. Without the contended requests the same advice does reach it."""
    store = SQLiteStore(tmp_path / "agg.db")
    included = FeedbackSettings(include_contended=True)
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0, feedback_settings=included), store))
    fleet = Fleet()
    batches, _ = own_history("orin-h")
    for records in batches:
        await fleet.send(client, store, "orin-h", records)
    docs = check_documents(await (await client.get("/api/v1/feedback")).json())
    assert [r["action"]["recommended_value"] for r in docs["orin-h"]["recommendations"]] == [2]
    ack = await fleet.send(client, store, "orin-h", contend(plant("orin-h", 5, 75, BASE, 30.0)))
    assert "recommendations" not in ack

    # the control: the same slow requests, not marked, are evidence, and the advice reaches the device
    other = SQLiteStore(tmp_path / "other.db")
    client = await aiohttp_client(create_app(Settings(feedback_interval_s=0.0), other))
    fleet = Fleet()
    for records in batches:
        for r in records:
            r["ext"].pop("interference", None)
        await fleet.send(client, other, "orin-h", records)
    assert (await client.get("/api/v1/feedback")).status == 200
    ack = await fleet.send(client, other, "orin-h", plant("orin-h", 5, 76, BASE, 30.0))
    found, problems = parse_wire(ack["recommendations"])
    assert problems == [] and [(r.target, r.recommended_value) for r in found] == [("model.n_threads", 2)]


def test_the_feedback_command_says_what_it_left_out(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from aggregator.app import parse_batch
    from aggregator.cli import main

    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    batches, left_out = own_history("orin-h")
    for i, records in enumerate(batches):
        _, rows, _ = parse_batch(make_batch(records, device="orin-h"), Settings(), "orin-h", NOW)
        store.ingest("orin-h", f"b{i}", 1, {}, rows, NOW)
    store.close()

    def run(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        return int(exited.value.code or 0), capsys.readouterr().out

    code, out = run("feedback", "--db", str(db))
    assert code == 0 and "  no recommendation: " in out
    assert (
        f"  contended: {left_out} requests left out (other work on the device during them; --include-contended" in out
    )
    code, out = run("feedback", "--db", str(db), "--include-contended")
    assert code == 0 and "recommend (priority " in out and "model.n_threads 1 → 2" in out and "contended:" not in out
    code, out = run("feedback", "--db", str(db), "--include-contended", "--json")
    assert json.loads(out)["include_contended"] is True
    code, out = run("feedback", "--help")
    assert code == 0 and "--include-contended" in out
    code, out = run("triggers", "--help")
    assert code == 0 and "--include-contended" in out


def test_the_triggers_command_includes_contended_requests_when_told(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A regression trigger over a slowdown whose requests were all contended: it holds only with
    ``--include-contended`` (exit 1), not by default (exit 0)."""
    from datetime import datetime, timezone

    from aggregator.app import parse_batch
    from aggregator.cli import main

    db, config = tmp_path / "agg.db", tmp_path / "aggregator.toml"
    config.write_text(
        '[[triggers]]\nname = "slower-decoding"\ncondition = "regression"\nmetric = "tpot_ms"\nwindow = "1h"\n'
    )
    store = SQLiteStore(db)
    busy = synthetic_records(400, seed=69, device_id="orin-busy")
    slower_from(busy, 250, 1.78)
    contend(busy[250:])
    for i, r in enumerate(busy):  # the last 400 seconds: inside the trigger's window
        when = datetime.fromtimestamp(NOW / 1e6 - 400 + i, tz=timezone.utc)
        r["started_at"] = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
    _, rows, _ = parse_batch(make_batch(busy, device="orin-busy"), Settings(), "orin-busy", NOW)
    store.ingest("orin-busy", "b", 1, {}, rows, NOW)
    store.close()

    def run(*args: str) -> tuple[int, str]:
        with pytest.raises(SystemExit) as exited:
            main(list(args))
        return int(exited.value.code or 0), capsys.readouterr().out

    code, out = run("triggers", "--config", str(config), "--db", str(db))
    assert code == 0 and "slower-decoding" in out and "firing" not in out, out
    code, out = run("triggers", "--config", str(config), "--db", str(db), "--include-contended")
    assert code == 1 and "firing" in out, out


def test_the_config_keys_are_checked(tmp_path: Path) -> None:
    path = tmp_path / "aggregator.toml"
    path.write_text("[fleet]\nfeedback_include_contended = true\nregression_include_contended = true\n")
    config = load_aggregator_config(path)
    settings = Settings.from_config(config)
    assert settings.regression_include_contended and settings.feedback_settings.include_contended
    assert not Settings.from_config(
        load_aggregator_config(None, default_path=tmp_path / "none.toml")
    ).feedback_settings.include_contended
    path.write_text('[fleet]\nregression_include_contended = "sometimes"\n')
    with pytest.raises(ConfigError) as refused:
        load_aggregator_config(path)
    assert "fleet.regression_include_contended" in str(refused.value) and str(path) in str(refused.value)


# -- the upgrade from schema 7 ---------------------------------------------------------------------------------------


def back_to_schema_7(db: Any) -> None:
    """The store as schema 7 had it: no contended column."""
    statements = (
        "ALTER TABLE measurements DROP COLUMN contended",
        "UPDATE meta SET value = '7' WHERE key = 'schema_version'",
    )
    if isinstance(db, Path):
        conn = sqlite3.connect(db, isolation_level=None)
        for statement in statements:
            conn.execute(statement)
        conn.close()
        return
    import psycopg

    with psycopg.connect(db, autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def test_a_schema_7_store_backfills_contended_from_the_stored_records(db: Any) -> None:
    store = open_store(db)
    token = store.add_token("orin-1", "device", NOW)
    records = valid_wire(30, seed=77, device="orin-1")
    for r in records[:12]:
        r["ext"] = {"interference": dict(BUSY)}
    for r in records[12:15]:  # stored before ingest checked it: taken as not contended
        r["ext"] = {"interference": {"contended": True, "reasons": ["overheating"]}}
    for r in records[15:18]:
        r["ext"] = {"interference": {"contended": "yes"}}
    rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records]
    rows[12:18] = [row._replace(contended=1) for row in rows[12:18]]  # whatever the column said, it is recomputed
    store.ingest("orin-1", "b1", 1, {}, rows, NOW)
    store.close()
    back_to_schema_7(db)

    proc = AggregatorProcess(db, free_port())
    proc.start()
    try:

        async def read() -> tuple[dict[str, Any], str]:
            async with aiohttp.ClientSession(f"http://127.0.0.1:{proc.port}") as session:
                async with session.get("/api/v1/fleet") as answer:
                    fleet = await answer.json()
                async with session.get("/metrics") as answer:
                    return fleet, await answer.text()

        fleet, metrics = asyncio.run(read())
        [row] = fleet["devices"]
        assert (row["contended"], row["contended_share"]) == (12, 12 / 30)
        # the gauge survives the restart: read from the store when the server starts
        assert gauge(metrics, "llm_latency_lens_device_contended_share") == {"orin-1": 12 / 30}
        more = contend(valid_wire(2, seed=78, device="orin-1"))
        body = raw_batch([encode_raw(r, "cbor") for r in more], device="orin-1", batch_id=str(uuid.uuid4()))

        async def send() -> None:
            async with aiohttp.ClientSession() as session:
                url = f"http://127.0.0.1:{proc.port}/api/v1/ingest"
                async with session.post(url, data=body, headers=auth(token)) as answer:
                    assert answer.status == 200, await answer.text()

        asyncio.run(send())
    finally:
        proc.stop()
    assert "Traceback" not in proc.stderr_text()
    store = open_store(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 10
        flags = [r[0] for r in store.columns(Query(device="orin-1"), ("contended",))]
        assert sorted(flags) == [0] * 18 + [1] * 14
        assert [r[0] for r in store.latest_columns(Query(device="orin-1"), ("contended",), 2)] == [1, 1]
    finally:
        store.close()


def test_a_store_set_back_to_schema_7_with_the_column_recomputes_it(db: Any) -> None:
    """A store whose version was set back while it kept the column (a downgrade and upgrade again): the column is
    recomputed from the records, whatever it held."""
    store = open_store(db)
    records = valid_wire(6, seed=81, device="orin-1")
    for r in records[:2]:
        r["ext"] = {"interference": dict(BUSY)}
    rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records]
    rows = [row._replace(contended=1 - row.contended) for row in rows]  # every value wrong
    store.ingest("orin-1", "b1", 1, {}, rows, NOW)
    store.close()
    statement = "UPDATE meta SET value = '7' WHERE key = 'schema_version'"
    if isinstance(db, Path):
        conn = sqlite3.connect(db, isolation_level=None)
        conn.execute(statement)
        conn.close()
    else:
        import psycopg

        with psycopg.connect(db, autocommit=True) as conn:
            conn.execute(statement)
    store = open_store(db)
    try:
        assert store.schema_version() == 10
        assert [r[0] for r in store.latest_columns(Query(device="orin-1"), ("contended",), 10)] == [1, 1, 0, 0, 0, 0]
    finally:
        store.close()


def test_record_schema_contended_reads_only_a_well_formed_mark() -> None:
    record = wire.to_wire(synthetic_records(1, seed=79)[0])
    assert record_schema.contended(record) is False
    assert record_schema.contended({**record, "ext": {"interference": dict(BUSY)}}) is True
    assert record_schema.contended({**record, "ext": {"interference": QUIET}}) is False
    for bad in ({"contended": True}, {"contended": True, "reasons": ["gpu"]}, {"contended": 1, "reasons": []}, [1]):
        assert record_schema.contended({**record, "ext": {"interference": bad}}) is False


def test_spans_carry_the_contended_mark_as_ingest_reads_it() -> None:
    from lens_core import otlp

    record = wire.to_wire(synthetic_records(1, seed=80)[0])
    assert "lens.interference.contended" not in otlp.span_attributes(record)  # not measured: not said
    busy = otlp.span_attributes({**record, "ext": {"interference": dict(BUSY)}})
    assert busy["lens.interference.contended"] is True and busy["lens.interference.reasons"] == ["cpu", "frequency"]
    quiet = otlp.span_attributes({**record, "ext": {"interference": QUIET}})
    assert quiet["lens.interference.contended"] is False and "lens.interference.reasons" not in quiet
    stored_before_the_check = {"contended": True, "reasons": ["overheating"]}
    odd = otlp.span_attributes({**record, "ext": {"interference": stored_before_the_check}})
    assert odd["lens.interference.contended"] is False and "lens.interference.reasons" not in odd
