"""``ext.guardrails`` at the aggregator's ingest (issue 29): every field checked to the contract's bounds
(docs/wire-format.md "Guardrails"), a bad record refused naming the field, a good one stored with its guardrail
columns (store schema 10) — and schema 10's backfill of the records a schema-9 store holds, on SQLite and PostgreSQL.

Hypothesis builds ``ext.guardrails`` maps at the contract's edges (accepted) and breaks one field of each (refused,
that field named), through :func:`lens_core.record_schema.check_record` and through the real ingest endpoint."""

from __future__ import annotations

import asyncio
import math
import sqlite3
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.synthetic import synthetic_records
from aggregator.app import Settings, _row, create_app
from aggregator.store import GUARDRAIL_COLUMNS, SCHEMA_VERSION, Query, SQLiteStore
from lens_core import record_schema as rs

from .guardrail_records import block, fail, guard, guardrails
from .hostile_device import encode_raw, raw_batch, read_everything, valid_wire
from .processes import open_store
from .test_aggregator import auth

NOW = time.time_ns() // 1000

# -- generated ext.guardrails at the contract's edges ----------------------------------------------------------------
names = st.from_regex(r"[A-Za-z0-9._-]{1,64}", fullmatch=True)
printable = st.text(
    st.characters(blacklist_categories=("Cc", "Cf", "Cs", "Zl", "Zp")), max_size=rs.MAX_GUARDRAIL_TEXT_CHARS
)
texts = st.none() | printable | st.sampled_from(["", "x" * 300, "carte bancaire se terminant par 4242 — élevé"])
ms = st.none() | st.sampled_from([0, 0.0, rs.MAX_DURATION_MS]) | st.floats(0, rs.MAX_DURATION_MS)
unit = st.none() | st.sampled_from([0, 1, 0.3]) | st.floats(0, 1)


@st.composite
def check_entries(draw: Any) -> dict[str, Any]:
    return {"name": draw(names), "kind": draw(st.none() | names), "ms": draw(ms), "server_ms": draw(ms),
            "network_ms": draw(ms), "risk_score": draw(unit), "error": draw(texts)}  # fmt: skip


@st.composite
def stage_entries(draw: Any, stage: str) -> dict[str, Any]:
    entry = {"start_ms": draw(ms), "ms": draw(ms), "risk_score": draw(unit), "error": draw(texts),
             "checks": draw(st.lists(check_entries(), max_size=rs.MAX_GUARDRAIL_CHECKS))}  # fmt: skip
    if stage == "output":
        entry.update(mode=draw(st.sampled_from([None, "final", "stream"])), chunks=draw(st.integers(0, 1_000_000)),
                     chunk_ms_p50=draw(ms), chunk_ms_max=draw(ms))  # fmt: skip
    return entry


violation_entries = st.fixed_dictionaries(
    {"type": st.sampled_from(rs.GUARDRAIL_VIOLATION_TYPES), "severity": st.sampled_from(rs.GUARDRAIL_SEVERITIES)},
    optional={
        "blocked": st.booleans(),
        "stage": st.sampled_from(rs.GUARDRAIL_STAGES),
        "check": names,
        "description": texts,
    },
)


@st.composite
def guardrail_maps(draw: Any) -> dict[str, Any]:
    stages = draw(st.lists(st.sampled_from(rs.GUARDRAIL_STAGES), unique=True))
    outcome = draw(st.sampled_from(rs.GUARDRAIL_OUTCOMES))
    part = {
        "set": draw(names),
        "outcome": outcome,
        # a stage exactly when blocked (ingest refuses a block that contradicts its outcome)
        "blocked_at": draw(st.sampled_from(rs.GUARDRAIL_STAGES)) if outcome == "blocked" else None,
        "total_ms": draw(ms),
        "inference_ms": draw(ms),
        "inference_start_ms": draw(ms),
        "overhead_ms": draw(ms),
        "remainder_ms": draw(ms),
        "impact_percent": draw(st.none() | st.floats(0, 100)),
        "risk_score": draw(unit),
        "risk_level": draw(st.sampled_from(rs.GUARDRAIL_SEVERITIES)),
        "stages": {stage: draw(stage_entries(stage)) for stage in stages},
        "violations": draw(st.lists(violation_entries, max_size=rs.MAX_GUARDRAIL_VIOLATIONS)),
    }
    total = part["total_ms"]
    if total is not None:  # the parts fit in the whole (ingest refuses more)
        for key in ("overhead_ms", "inference_ms"):
            if part[key] is not None:
                part[key] = min(part[key], total)
        for entry in part["stages"].values():
            if entry.get("ms") is not None:
                entry["ms"] = min(entry["ms"], total)
    return part


# (a path inside ext.guardrails, a value outside the contract)
BREAKS: list[tuple[tuple[Any, ...], Any]] = [
    (("set",), "pii set"),
    (("set",), "x" * 65),
    (("set",), ""),
    (("set",), None),
    (("outcome",), "allowed"),
    (("blocked_at",), "inference"),
    (("total_ms",), -0.1),
    (("total_ms",), rs.MAX_DURATION_MS + 1),
    (("total_ms",), math.inf),
    (("overhead_ms",), "12"),
    (("overhead_ms",), True),
    (("impact_percent",), 100.5),
    (("risk_score",), 1.01),
    (("risk_level",), "severe"),
    (("surprise",), 1),
    (("stages",), [1]),
    (("stages", "inference"), {}),
    (("stages", "input", "ms"), -1),
    (("stages", "input", "error"), "x" * 301),
    (("stages", "input", "error"), "bad\x1b[31m"),
    (("stages", "input", "error"), "bad \u202egnp.exe"),
    (("stages", "input", "error"), "a\u2028b"),
    (("stages", "input", "mode"), "stream"),  # only the output stage has a mode
    (("stages", "output", "mode"), "chunked"),
    (("stages", "output", "chunks"), 1_000_001),
    (("stages", "output", "chunks"), 1.5),
    (("stages", "input", "checks"), [{"name": f"c{i}"} for i in range(17)]),
    (("stages", "input", "checks", 0, "name"), "no spaces"),
    (("stages", "input", "checks", 0, "kind"), "k" * 65),
    (("stages", "input", "checks", 0, "server_ms"), math.nan),
    (("stages", "input", "checks", 0, "other"), 1),
    (("violations",), [{"type": "other", "severity": "low"}] * 33),
    (("violations", 0, "type"), "spam"),
    (("violations", 0, "severity"), "severe"),
    (("violations", 0, "severity"), None),
    (("violations", 0, "blocked"), "yes"),
    (("violations", 0, "stage"), "decode"),
    (("violations", 0, "description"), "\ufeffhidden"),
    (("violations", 0, "description"), 42),
    (("violations", 0, "matched"), "4111111111111111"),
]


def field_of(path: tuple[Any, ...]) -> str:
    """The field a refusal names for a path inside ext.guardrails."""
    out = "ext.guardrails"
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else f".{part}"
    return out


def broken(path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    base = guardrails(violations=[{"type": "pii_leakage", "severity": "medium", "blocked": False, "stage": "input",
                                   "check": "rules", "description": "e-mail address"}])  # fmt: skip
    part: Any = base
    for key in path[:-1]:
        part = part[key]
    part[path[-1]] = value
    return base


@pytest.mark.parametrize(("path", "value"), BREAKS, ids=[f"{field_of(p)}-{i}" for i, (p, _) in enumerate(BREAKS)])
async def test_a_malformed_guardrails_map_is_refused_naming_the_field(
    aiohttp_client: Any, tmp_path: Path, path: tuple[Any, ...], value: Any
) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    good = valid_wire(3, seed=291, device="dev-1")
    bad = {**good[1], "ext": {"guardrails": broken(path, value)}}
    with pytest.raises(rs.SchemaError) as refused:
        rs.check_record(bad, NOW)
    field = field_of(path)
    assert refused.value.field == field, (refused.value.field, str(refused.value))
    assert any(word in str(refused.value) for word in ("allowed", "not a stage", "must be finite"))
    body = raw_batch([encode_raw(r, "cbor") for r in (good[0], bad, good[2])], device="dev-1")
    response = await client.post("/api/v1/ingest", data=body, headers=auth(token))
    answer = await response.json()
    assert response.status == 400 and answer["code"] == "record_invalid" and answer["record_index"] == 1
    assert f"field '{field}'" in answer["error"], answer["error"]
    assert store.record_count() == 0


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(part=guardrail_maps())
def test_every_map_inside_the_contract_is_accepted_and_read(part: dict[str, Any]) -> None:
    record = {**valid_wire(1, seed=292)[0], "ext": {"guardrails": part}}
    rs.check_record(record, NOW)
    columns = rs.guardrail_columns(record)
    assert columns.guardrail_set == part["set"] and columns.guardrail_outcome == part["outcome"]
    assert columns.guardrail_ms == (None if part["overhead_ms"] is None else float(part["overhead_ms"]))
    input_ms = part["stages"].get("input", {}).get("ms")
    assert columns.guardrail_input_ms == (None if input_ms is None else float(input_ms))


@settings(max_examples=150, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(part=guardrail_maps(), data=st.data())
def test_one_field_outside_the_contract_is_refused_by_name(part: dict[str, Any], data: Any) -> None:
    """Any one leaf of a valid map replaced by a value of the wrong kind: refused, that leaf (or its list) named."""
    leaves: list[tuple[Any, ...]] = []

    def walk(value: Any, path: tuple[Any, ...]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(item, (*path, key))
        elif isinstance(value, list) and value:
            for i, item in enumerate(value):
                walk(item, (*path, i))
        else:
            leaves.append(path)

    walk(part, ())
    path = data.draw(st.sampled_from(leaves))
    target: Any = part
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = data.draw(st.sampled_from([{"x": 1}, -5, 1e12, "\x00", "ab cd" * 70]))
    record = {**valid_wire(1, seed=293)[0], "ext": {"guardrails": part}}
    try:
        rs.check_record(record, NOW)
    except rs.SchemaError as refused:
        assert refused.field == field_of(path), (refused.field, str(refused))
        assert rs.guardrail_columns(record) == rs.NO_GUARDRAILS
        return
    pytest.fail(f"{field_of(path)} = {target[path[-1]]!r} was accepted")


def test_accepted_guardrails_survive_the_real_ingest(tmp_path: Path) -> None:
    """Generated maps at the edges, one batch each, through the real endpoint into SQLite: accepted, the columns
    what the map says."""
    store = SQLiteStore(tmp_path / "agg.db")
    token = store.add_token("dev-1", "device", NOW)
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(Settings(), store)), loop=loop)
    loop.run_until_complete(client.start_server())
    sent: list[dict[str, Any]] = []
    try:

        @settings(max_examples=30, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
        @given(part=guardrail_maps())
        def send(part: dict[str, Any]) -> None:
            record = {**valid_wire(1, seed=294, device="dev-1")[0], "ext": {"guardrails": part}}
            record["id"] = uuid.uuid4().bytes
            body = raw_batch([encode_raw(record, "cbor")], device="dev-1", batch_id=str(uuid.uuid4()))
            response = loop.run_until_complete(client.post("/api/v1/ingest", data=body, headers=auth(token)))
            assert response.status == 200, loop.run_until_complete(response.text())
            sent.append(part)

        send()
        # every read path serves what was accepted: the fleet rows and pages read the guardrail columns at their edges
        answers = loop.run_until_complete(read_everything(client, "dev-1"))
    finally:
        loop.run_until_complete(client.close())
        loop.close()
    stored = store.columns(Query(device="dev-1"), ("guardrail_set", "guardrail_outcome", "guardrail_ms"))
    assert sorted((s, o) for s, o, _ in stored) == sorted((p["set"], p["outcome"]) for p in sent)
    [row] = answers["fleet"]
    served = [p for p in sent if p["overhead_ms"] is not None]
    assert 0 < len(served) < len(sent)
    # the headline's requests: those of the costliest set
    costliest = row["guardrail_costliest_set"]
    assert row["guardrail_requests"] == len([p for p in served if p["set"] == costliest])
    assert row["guardrail_sets"] == sorted({p["set"] for p in sent})[:8]
    store.close()


async def test_what_the_pipeline_writes_is_stored_in_columns(aiohttp_client: Any, tmp_path: Path) -> None:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    token = store.add_token("dev-1", "device", NOW)
    records = synthetic_records(4, seed=295, device_id="dev-1")
    guard(records[0], "pii", input_ms=1.5, threat_ms=None, output_ms=2.5)
    block(records[1], "pii", "input")
    fail(records[2], "strict", "threat")
    from .test_aggregator import make_batch

    response = await client.post("/api/v1/ingest", data=make_batch(records), headers=auth(token))
    assert response.status == 200, await response.text()
    rows = store._read(f"SELECT kind, ok, error_type, {', '.join(GUARDRAIL_COLUMNS)} FROM measurements ORDER BY seq")
    assert rows[0][:10] == ("inference", 1, None, "pii", "passed", 4.0, 1.5, None, 2.5, rows[0][9])
    assert 0 < rows[0][9] < 1  # 4 ms of about 804
    assert rows[1][:7] == ("blocked", 1, None, "pii", "blocked", 0.5, 0.5)
    assert rows[2][:5] == ("inference", 0, "guardrail_error", "strict", "error")
    assert rows[3][3:] == (None,) * 7  # no guardrails


# -- the upgrade from schema 9 ---------------------------------------------------------------------------------------


def back_to_schema_9(db: Any) -> None:
    """The store as schema 9 had it: no guardrail columns."""
    statements = [f"ALTER TABLE measurements DROP COLUMN {name}" for name in GUARDRAIL_COLUMNS]
    statements.append("UPDATE meta SET value = '9' WHERE key = 'schema_version'")
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


def test_a_schema_9_store_backfills_the_guardrail_columns(db: Any) -> None:
    store = open_store(db)
    records = valid_wire(12, seed=296, device="orin-1")
    for r in records[:4]:
        r["ext"] = {"guardrails": guardrails("pii", input_ms=2.0, threat_ms=1.0, output_ms=3.0)}
    r = records[4]
    r.update(kind="blocked", ttft_us=None, e2e_us=None, tpot_us=None)
    r["ext"] = {"guardrails": guardrails("pii", input_ms=0.5, threat_ms=None, output_ms=None, inference_ms=None,
                                         outcome="blocked", blocked_at="input")}  # fmt: skip
    for r in records[5:7]:  # stored before ingest checked it: left NULL
        r["ext"] = {"guardrails": {**guardrails("pii"), "outcome": "maybe"}}
    rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records]
    rows[5:7] = [row._replace(guardrail_set="stale", guardrail_ms=9.0) for row in rows[5:7]]  # recomputed
    store.ingest("orin-1", "b1", 1, {}, rows, NOW)
    store.close()
    back_to_schema_9(db)
    store = open_store(db)
    try:
        assert store.schema_version() == SCHEMA_VERSION == 10
        got = store.columns(Query(device="orin-1"), ("kind", "guardrail_set", "guardrail_outcome", "guardrail_ms",
                                                     "guardrail_input_ms", "guardrail_output_ms"))  # fmt: skip
        counted = sorted((tuple(map(str, g)) for g in got), key=str)
        assert counted.count(("inference", "pii", "passed", "6.0", "2.0", "3.0")) == 4
        assert ("blocked", "pii", "blocked", "0.5", "0.5", "None") in counted
        assert sum(1 for g in got if g[1] is None) == 7  # 5 without, 2 malformed
        # new records are stored with the columns after the upgrade
        more = valid_wire(13, seed=296, device="orin-1")[12:]
        more[0]["ext"] = {"guardrails": guardrails("strict", input_ms=7.0, threat_ms=None, output_ms=None)}
        store.ingest("orin-1", "b2", 1, {}, [_row(m, "cbor", encode_raw(m, "cbor")) for m in more], NOW)
        assert ("strict", 7.0) in store.columns(Query(device="orin-1"), ("guardrail_set", "guardrail_ms"))
    finally:
        store.close()
