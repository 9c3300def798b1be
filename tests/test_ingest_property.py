"""The property issue 11 asks for: any batch the aggregator accepts, every read endpoint, export, page and /metrics
then serves with 200 and valid output; any batch it refuses gets the structured refusal and changes nothing.

Hypothesis generates batches — valid records with values at the schema's edges, and hostile ones (wrong types,
non-finite numbers, integers past 64 bits, CBOR tags, deep nesting, NUL characters, garbage bytes) — and sends each
through the real ingest path (aiohttp on 127.0.0.1) into real SQLite and PostgreSQL stores, then reads everything.
"""

from __future__ import annotations

import asyncio
import math
import time
import uuid
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import cbor2
import pytest
from aiohttp.test_utils import TestClient, TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
from lens_core import record_schema as rs
from lens_core import wire

from .hostile_device import DEVICE, auth, encode_raw, raw_batch, read_everything, valid_wire

NOW = time.time_ns() // 1000
TEMPLATE = valid_wire(1, seed=31)[0]

# -- values at the schema's edges (accepted) ------------------------------------------------------------------
durations = st.one_of(st.none(), st.sampled_from([0, 1, rs.MAX_DURATION_US]), st.integers(0, rs.MAX_DURATION_US))
counts = st.one_of(st.none(), st.sampled_from([0, rs.MAX_COUNT]), st.integers(0, rs.MAX_COUNT))
names = st.text(max_size=rs.MAX_NAME_CHARS).filter(lambda s: "\x00" not in s) | st.sampled_from(
    ["=HYPERLINK(1)", "+cmd|x", "@SUM(1)", "-1", "</script><script>alert(1)</script>", "a" * rs.MAX_NAME_CHARS]
)
started = st.integers(rs.MIN_STARTED_US, NOW + rs.MAX_FUTURE_US - 60_000_000)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=40),
)
json_value = st.recursive(
    json_leaf,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner, max_size=4),
    max_leaves=20,
)
ext = st.dictionaries(st.text(max_size=12), json_value, max_size=5) | st.builds(
    lambda j, a: {"energy": {"j_per_output_token": j}, "collab": {"acceptance_rate": a}},
    st.one_of(st.none(), st.floats(0, 10)),
    st.one_of(st.none(), st.floats(0, 1)),
)


@st.composite
def valid_record(draw: st.DrawFn) -> dict[str, Any]:
    record = dict(TEMPLATE)
    record["id"] = uuid.UUID(int=draw(st.integers(0, 2**128 - 1))).bytes
    record["started_us"] = draw(started)
    for name in ("ttft_us", "tpot_us", "e2e_us", "prefill_us", "decode_us"):
        record[name] = draw(durations)
    for name in ("input_tokens", "output_tokens"):
        record[name] = draw(counts)
    for name in ("model_name", "strategy", "engine", "run_id", "kind"):
        record[name] = draw(names)
    record["kind"] = draw(st.sampled_from(["inference", "inference", "warmup", record["kind"]]))
    record["ok"] = draw(st.booleans())
    record["error_type"] = None if record["ok"] else draw(st.none() | names)
    record["ext"] = draw(ext)
    if draw(st.booleans()):
        record[draw(st.text(min_size=1, max_size=10))] = draw(json_value)  # a newer agent's extra field
    return record


# -- hostile values (refused) -----------------------------------------------------------------------------------
hostile_value = st.one_of(
    st.integers(2**63, 2**70),
    st.integers(-(2**70), -1),
    st.sampled_from([math.nan, math.inf, -math.inf, 1e300]),
    st.text(min_size=rs.MAX_NAME_CHARS + 1, max_size=rs.MAX_NAME_CHARS + 5),
    st.just("nul\x00inside"),
    st.binary(max_size=40),
    st.just(datetime(2026, 1, 1, tzinfo=timezone.utc)),
    st.builds(lambda n: cbor2.CBORTag(n, 1), st.integers(0, 2**16)),
    st.just({1: 2}),
    st.just([[[[[[[[[[1]]]]]]]]]]),
    st.lists(st.integers(), max_size=3),
)


@st.composite
def hostile_record(draw: st.DrawFn) -> dict[str, Any]:
    record = draw(valid_record())
    field = draw(st.sampled_from([*sorted(rs.KNOWN_FIELDS - {"id", "device_id"}), "ext", "extra"]))
    value = draw(hostile_value)
    if field == "ext":
        record["ext"] = {"x": value} if draw(st.booleans()) else value
    else:
        record[field] = value
    return record


@st.composite
def batches(draw: st.DrawFn) -> tuple[str, list[bytes]]:
    codec = draw(st.sampled_from(["cbor", "msgpack"]))
    records = draw(st.lists(valid_record() | hostile_record(), min_size=1, max_size=4))
    blobs = []
    for record in records:
        try:
            blobs.append(encode_raw(record, codec))
        except (OverflowError, TypeError, ValueError):  # msgpack cannot carry it: send it as CBOR bytes anyway
            blobs.append(bytes(cbor2.dumps(record)))
    if draw(st.integers(0, 9)) == 0:
        blobs.insert(draw(st.integers(0, len(blobs))), draw(st.binary(max_size=60)))  # garbage
    return codec, blobs


def _run_property(store: Any, examples: int) -> None:
    token = store.add_token(DEVICE, "device", NOW)
    loop = asyncio.new_event_loop()
    client = TestClient(TestServer(create_app(Settings(), store)), loop=loop)
    loop.run_until_complete(client.start_server())
    stored: set[str] = set()
    outcomes = {"accepted": 0, "refused": 0}

    async def one(codec: str, blobs: list[bytes]) -> None:
        before = store.record_count()
        response = await client.post("/api/v1/ingest", data=raw_batch(blobs, codec), headers=auth(token))
        answer = await response.json()
        assert response.status in (200, 400), (response.status, answer)
        assert answer["protocol"] == wire.INGEST_PROTOCOL
        if response.status == 400:
            outcomes["refused"] += 1
            assert answer["code"] in ("record_invalid", "batch_invalid"), answer
            if answer["code"] == "record_invalid":
                assert 0 <= answer["record_index"] < len(blobs) and "record" in answer["error"]
            assert store.record_count() == before
            return
        outcomes["accepted"] += 1
        for blob in blobs:
            stored.add(str(uuid.UUID(bytes=wire.loads(blob, codec)["id"])))
        seen = await read_everything(client)
        assert {m["id"] for m in seen["measurements"]} == stored
        assert len(seen["csv"]) == len(stored) == seen["arrow"].num_rows == seen["parquet"].num_rows
        assert {m["id"] for m in seen["protobuf"]} == stored  # every record ingest accepts encodes, and reads back

    @settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )
    @given(batches())
    def check(batch: tuple[str, list[bytes]]) -> None:
        loop.run_until_complete(one(*batch))

    try:
        check()
    finally:
        loop.run_until_complete(client.close())
        loop.close()
        store.close()
    print(outcomes)
    assert outcomes["accepted"] >= 3 and outcomes["refused"] >= 3, outcomes


def test_accepted_batches_are_served_by_every_read_sqlite(tmp_path: Path) -> None:
    _run_property(SQLiteStore(tmp_path / "agg.db"), examples=100)


def test_accepted_batches_are_served_by_every_read_postgres(pg_url: str) -> None:
    from aggregator.pgstore import PostgresStore

    _run_property(PostgresStore(pg_url), examples=60)


@pytest.mark.parametrize("codec", ["cbor", "msgpack"])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(record=valid_record() | hostile_record())
def test_the_schema_agrees_with_itself_on_every_shape(codec: str, record: dict[str, Any]) -> None:
    """The shape cache never changes an answer: the same record checked cold (no cached plan) and warm agrees."""
    try:
        blob = encode_raw(record, codec)
    except (OverflowError, TypeError, ValueError):
        return
    outcomes = []
    for cold in (True, False):
        if cold:
            rs._PLANS.clear()
        try:
            wire.check_record(wire.loads(blob, codec), 0, NOW)
            outcomes.append("ok")
        except wire.WireError as exc:
            outcomes.append(exc.message)
    assert outcomes[0] == outcomes[1]


@settings(max_examples=40, deadline=None, derandomize=True)
@given(values=st.lists(st.floats(0, 100) | st.sampled_from([0.001, 0.0025, 0.05, 60.0]), max_size=50))
def test_bulk_histogram_observation_equals_one_at_a_time(values: list[float]) -> None:
    from prometheus_client import CollectorRegistry, Histogram, generate_latest

    from aggregator.metrics import TTFT_BUCKETS, observe_many

    one, bulk = CollectorRegistry(), CollectorRegistry()
    single = Histogram("h", "h", buckets=TTFT_BUCKETS, registry=one)
    for value in values:
        single.observe(value)
    observe_many(Histogram("h", "h", buckets=TTFT_BUCKETS, registry=bulk), values)
    strip = [line for line in generate_latest(one).decode().splitlines() if "_created" not in line]
    assert strip == [line for line in generate_latest(bulk).decode().splitlines() if "_created" not in line]
