"""OTLP forwarding is never held up by one record, and never skips records on the backend's word alone.

A real ``lens-aggregator serve`` forwards to a real loopback OTLP receiver (tests/otlp_receiver.py):

- a stored record the encoder cannot encode (written by an older release, before ingest bounded what the encoders
  read) is left out, counted and shown, and another device's records behind it arrive within a forwarding interval;
- a backend answering 400 to everything holds the forwarder (nothing skipped, the backlog and the alert shown), and
  when it heals every record arrives;
- ``partial_success`` with absurd counts is clamped to what was sent;
- ingest refuses what the encoders could not encode, and any record ingest accepts encodes (hypothesis).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession, web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.app import FORWARDER, Settings, _row, create_app
from aggregator.otlp_forward import Forwarder, stored_status
from aggregator.store import SQLiteStore
from lens_core import otlp, wire
from lens_core import record_schema as rs

from .hostile_device import auth, encode_raw, raw_batch, valid_wire
from .netproxy import free_port
from .otlp_receiver import Receiver
from .processes import AggregatorProcess
from .test_ingest_property import valid_record
from .test_otlp import settings as otlp_settings

NOW = time.time_ns() // 1000
OLD = "old-device"
GOOD = "good-device"


def unencodable_record(device: str = OLD) -> dict[str, Any]:
    """A model-load record whose ext holds an integer past 64 bits: OTLP's int attribute cannot carry it (ingest
    refuses it today; a store written by an older release can hold it)."""
    record = valid_wire(1, seed=5, device=device)[0]
    record["started_us"] = NOW - 60_000_000
    record.update(kind="model_load", model_name="poison.gguf")
    record["ext"] = {"model_load": {"engine_load_ms": 1e300, "tensor_bytes": 2**64 - 1}}
    return record


def store_directly(db: Path, records: list[dict[str, Any]], device: str) -> None:
    """Rows written by the store's own API, bypassing today's ingest checks (what an older release stored)."""
    store = SQLiteStore(db)
    rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records]
    store.ingest(device, str(uuid.uuid4()), 0, {}, rows, NOW)
    store.close()


def good_records(n: int, device: str = GOOD, seed: int = 8) -> list[dict[str, Any]]:
    records = valid_wire(n, seed=seed, device=device)
    for i, record in enumerate(records):
        record["started_us"] = NOW - 30_000_000 + i * 1000
    return records


async def post(client: ClientSession, token: str, records: list[dict[str, Any]], device: str) -> None:
    body = raw_batch([encode_raw(r, "cbor") for r in records], device=device, batch_id=str(uuid.uuid4()))
    async with client.post("/api/v1/ingest", data=body, headers=auth(token)) as answer:
        assert answer.status == 200, await answer.text()


async def metric(client: ClientSession, name: str, signal: str = "traces") -> float:
    text = await (await client.get("/metrics")).text()
    prefix = f'llm_latency_lens_{name}{{signal="{signal}"}} '
    lines = [line for line in text.splitlines() if line.startswith(prefix)]
    assert lines, f"{prefix!r} not in /metrics"
    return float(lines[0].split()[-1])


async def until(predicate: Any, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not await predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.05)


@asynccontextmanager
async def serving(tmp_path: Path, receiver: Receiver, *, interval: str, backoff_max: str = "1s") -> AsyncIterator[Any]:
    """The receiver on a loopback port, and ``lens-aggregator serve`` forwarding to it (SQLite store)."""
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    otlp_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", otlp_port).start()
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'[otlp]\nendpoint = "http://127.0.0.1:{otlp_port}"\ninterval = "{interval}"\n'
        f'backoff_max = "{backoff_max}"\nbatch_records = 64\n'
    )
    proc = AggregatorProcess(tmp_path / "agg.db", free_port(), config=config)
    proc.start()
    try:
        async with ClientSession(f"http://127.0.0.1:{proc.port}") as client:
            yield proc, client
    finally:
        proc.stop()
        await runner.cleanup()


def test_an_unencodable_record_does_not_hold_up_another_device(tmp_path: Path) -> None:
    asyncio.run(_unencodable(tmp_path))


async def _unencodable(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    poison = unencodable_record()
    with pytest.raises(ValueError, match="do not encode"):  # the encoder refuses it (the issue's traceback)
        otlp.encode_traces([({}, [poison])], version="0")
    beside = good_records(5, device=OLD, seed=9)  # stored in the same batch as the poison: they go on
    store_directly(db, [beside[0], beside[1], poison, *beside[2:]], OLD)
    store = SQLiteStore(db)
    token = store.add_token(GOOD, "device", NOW)
    store.close()
    receiver = Receiver()
    interval = 2.0
    async with serving(tmp_path, receiver, interval=f"{interval:g}s") as (proc, client):
        await until(lambda: _value(metric(client, "otlp_unencodable_records_total")), timeout=20)

        async def beside_arrived() -> bool:
            return {r["id"] for r in beside} <= {s.trace_id for _, s in receiver.spans()}

        await until(beside_arrived, timeout=20)
        records = good_records(10)
        sent = time.monotonic()
        await post(client, token, records, GOOD)
        want = {r["id"] for r in records}

        async def arrived() -> bool:
            return want <= {s.trace_id for _, s in receiver.spans()}

        await until(arrived, timeout=20)
        took = time.monotonic() - sent
        assert took < interval + 3.0, f"the good device's records took {took:.1f} s"  # loose: a busy machine
        assert await metric(client, "otlp_unencodable_records_total") == 1.0
        assert await metric(client, "otlp_unencodable_records_total", "metrics") == 0.0  # a model load: no points
        assert await metric(client, "otlp_backend_failing") == 0.0

        async def drained() -> bool:
            return await metric(client, "otlp_pending_records") == 0.0

        await until(drained)
        assert await metric(client, "otlp_lag_seconds") == 0.0
        assert bytes(poison["id"]).hex() in proc.stderr_text()  # logged with its id
        assert proc.stderr_text().count("Traceback") == 0
    status = stored_status(SQLiteStore(db))["traces"]
    assert status["unencodable_records"] == 1 and status["forwarded_records"] == 16 and status["rejected_items"] == 0


async def _value(awaitable: Any) -> bool:
    return bool(await awaitable)


def test_a_backend_refusing_everything_holds_and_then_gets_everything(tmp_path: Path) -> None:
    asyncio.run(_refusing(tmp_path))


async def _refusing(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    token = store.add_token(GOOD, "device", NOW)
    store.close()
    receiver = Receiver(mode="refuse")
    records = good_records(100)
    async with serving(tmp_path, receiver, interval="200ms") as (proc, client):
        await post(client, token, records, GOOD)

        async def held() -> bool:
            return (
                await metric(client, "otlp_backend_failing") == 1.0
                and sum(1 for signal, _ in receiver.answers if signal == "traces") >= 20
            )

        await until(held)
        # nothing skipped: the backlog is every record, the oldest waiting since the batch came in
        assert await metric(client, "otlp_rejected_items_total") == 0.0
        assert await metric(client, "otlp_forwarded_records_total") == 0.0
        assert await metric(client, "otlp_pending_records") == 100.0
        assert await metric(client, "otlp_pending_records", "metrics") == 100.0
        lag = await metric(client, "otlp_lag_seconds")
        await asyncio.sleep(1.2)
        assert await metric(client, "otlp_lag_seconds") >= lag + 1.0  # the lag grows while held
        text = await (await client.get("/metrics")).text()
        assert 'llm_latency_lens_otlp_export_failures_total{reason="refused_all",signal="traces"}' in text
        # a hold costs about 2·log2(n) requests, not the 2n of halving down to every single record
        holds = float(
            next(line for line in text.splitlines() if 'reason="refused_all",signal="traces"' in line).split()[-1]
        )
        refused = sum(1 for signal, code in receiver.answers if signal == "traces" and code == 400)
        budget = 2 * 6 + 4  # 64 records a batch: ⌈log2 64⌉ = 6; a hold comes with the request past the budget
        assert refused <= (holds + 1) * (budget + 1), (refused, holds)
        assert "refuses every request" in proc.stderr_text()
        receiver.mode = "ok"  # the backend heals: everything arrives, nothing was skipped

        async def healed() -> bool:
            return (
                await metric(client, "otlp_pending_records") == 0.0
                and await metric(client, "otlp_pending_records", "metrics") == 0.0
            )

        await until(healed, timeout=40)
        assert {s.trace_id for _, s in receiver.spans()} == {r["id"] for r in records}
        assert await metric(client, "otlp_rejected_items_total") == 0.0
        assert await metric(client, "otlp_backend_failing") == 0.0
        assert await metric(client, "otlp_forwarded_records_total") == 100.0


def test_the_backend_refusing_records_alone_while_accepting_others_skips_only_those(tmp_path: Path) -> None:
    """The rule's other side, and its edge: a refused record is skipped only once the backend accepted another."""
    asyncio.run(_suspects(tmp_path))


async def _suspects(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    token = store.add_token(GOOD, "device", NOW)
    store.close()
    receiver = Receiver()
    records = good_records(40)
    refused = {records[0]["id"], records[1]["id"], records[39]["id"]}  # the first two, and the last
    receiver.refuse_trace_ids = set(refused)
    async with serving(tmp_path, receiver, interval="200ms") as (_proc, client):
        await post(client, token, records, GOOD)

        async def done() -> bool:
            return await metric(client, "otlp_forwarded_records_total") == 40.0

        await until(done)
        assert await metric(client, "otlp_pending_records") == 0.0
        assert {s.trace_id for _, s in receiver.spans()} == {r["id"] for r in records} - refused
        spans = sum(len(otlp.record_spans(r)) for r in records if r["id"] in refused)
        assert await metric(client, "otlp_rejected_items_total") == float(spans)
        assert await metric(client, "otlp_backend_failing") == 0.0
        # a batch made only of records the backend refuses: held, not skipped (nothing shows the backend works)
        alone = good_records(2, seed=12)
        for r in alone:
            r["started_us"] += 10_000_000
        receiver.refuse_trace_ids |= {r["id"] for r in alone}
        await post(client, token, alone, GOOD)

        async def held() -> bool:
            return await metric(client, "otlp_backend_failing") == 1.0

        await until(held)
        assert await metric(client, "otlp_pending_records") == 2.0
        assert await metric(client, "otlp_rejected_items_total") == float(spans)
        later = good_records(3, seed=13)
        for r in later:
            r["started_us"] += 20_000_000
        await post(client, token, later, GOOD)  # the backend accepts these: now the two are skipped

        async def resolved() -> bool:
            return await metric(client, "otlp_forwarded_records_total") == 45.0

        await until(resolved)
        assert {r["id"] for r in later} <= {s.trace_id for _, s in receiver.spans()}
        spans += sum(len(otlp.record_spans(r)) for r in alone)
        assert await metric(client, "otlp_rejected_items_total") == float(spans)


def test_many_records_refused_in_a_row_do_not_stall_forwarding(tmp_path: Path) -> None:
    """30 records in a row the backend refuses alone look like a backend refusing everything for a while: each pass
    probes further (the suspects carried, nothing skipped), until the backend accepts a later request; then they are
    sent again as one request, refused, halved and skipped — and everything else arrives."""
    asyncio.run(_many(tmp_path))


async def _many(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    store = SQLiteStore(db)
    token = store.add_token(GOOD, "device", NOW)
    store.close()
    receiver = Receiver()
    records = good_records(100)
    refused = {r["id"] for r in records[:30]}
    receiver.refuse_trace_ids = set(refused)
    async with serving(tmp_path, receiver, interval="200ms", backoff_max="500ms") as (_proc, client):
        await post(client, token, records, GOOD)

        async def done() -> bool:
            return await metric(client, "otlp_forwarded_records_total") == 100.0

        await until(done, timeout=60)
        assert {s.trace_id for _, s in receiver.spans()} == {r["id"] for r in records} - refused
        spans = sum(len(otlp.record_spans(r)) for r in records[:30])
        assert await metric(client, "otlp_rejected_items_total") == float(spans)
        assert await metric(client, "otlp_pending_records") == 0.0
        assert await metric(client, "otlp_backend_failing") == 0.0


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
async def test_metrics_stay_exact_while_a_device_s_records_are_refused_and_skipped(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, temporality: str
) -> None:
    """A backend refusing every request that carries one device: that device's 20 records (in a row, ahead of the
    others) are carried, sent again and skipped; the other device's histograms count each of its records once."""
    receiver = Receiver(refuse_devices={OLD})
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    store = SQLiteStore(tmp_path / "agg.db")
    tokens = {d: store.add_token(d, "device", NOW) for d in (OLD, GOOD)}
    app = create_app(Settings(otlp=otlp_settings(server.port, temporality=temporality, batch_records=32)), store)
    client = await aiohttp_client(app)
    bad, good = good_records(20, device=OLD, seed=14), good_records(40, seed=15)
    for device, records in ((OLD, bad), (GOOD, good[:20]), (GOOD, good[20:])):
        body = raw_batch([encode_raw(r, "cbor") for r in records], device=device, batch_id=str(uuid.uuid4()))
        assert (await client.post("/api/v1/ingest", data=body, headers=auth(tokens[device]))).status == 200
    deadline = time.monotonic() + 30
    while any(stored_status(store)[s]["pending_records"] for s in ("traces", "metrics")):
        assert time.monotonic() < deadline, stored_status(store)
        await asyncio.sleep(0.05)
    assert {s.trace_id for _, s in receiver.spans()} == {r["id"] for r in good}
    counts: dict[Any, int] = {}
    for resource, metric, point in receiver.points():
        assert resource["lens.device.id"] == GOOD
        if metric.name == "gen_ai.client.operation.duration":
            key = tuple(sorted((kv.key, str(kv.value)) for kv in point.attributes))
            counts[key] = point.count if temporality == "cumulative" else counts.get(key, 0) + point.count
    assert sum(counts.values()) == sum(1 for r in good if r["e2e_us"] is not None)
    status = stored_status(store)
    assert status["traces"]["rejected_items"] == sum(len(otlp.record_spans(r)) for r in bad)
    assert status["metrics"]["rejected_items"] > 0 and status["metrics"]["forwarded_records"] == 60


@pytest.mark.parametrize("rejected", [2**62, -(2**62)])
async def test_partial_success_counts_are_clamped_to_what_was_sent(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, rejected: int
) -> None:
    receiver = Receiver(partial_rejected=rejected)
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    store = SQLiteStore(tmp_path / "agg.db")
    token = store.add_token(GOOD, "device", NOW)
    client = await aiohttp_client(create_app(Settings(otlp=otlp_settings(server.port)), store))
    records = good_records(12)
    body = raw_batch([encode_raw(r, "cbor") for r in records], device=GOOD)
    assert (await client.post("/api/v1/ingest", data=body, headers=auth(token))).status == 200
    deadline = time.monotonic() + 20
    while stored_status(store)["metrics"]["pending_records"] or stored_status(store)["traces"]["pending_records"]:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.05)
    spans = len(receiver.spans())
    points = len(receiver.points())
    for signal, sent in (("traces", spans), ("metrics", points)):
        status = stored_status(store)[signal]
        assert 0 <= status["accepted_items"] <= sent and 0 <= status["rejected_items"] <= sent
        assert status["accepted_items"] + status["rejected_items"] == sent
        if rejected > 0:
            assert status["rejected_items"] == sent  # all of it, never 2^62
        else:
            assert status["rejected_items"] == 0  # a negative count is no count
    text = await (await client.get("/metrics")).text()
    assert "-" not in "".join(line.split()[-1] for line in text.splitlines() if "otlp_" in line and "{" in line)


def test_persisted_negative_totals_read_as_zero(tmp_path: Path) -> None:
    """A cursor a bug drove negative (the issue's −4.6e18) is not shown as such, and grows from 0."""
    store = SQLiteStore(tmp_path / "agg.db")
    store.swap_meta("otlp.traces", None, '{"seq":0,"forwarded":0,"items":-4611686018427387904,"rejected":5}')
    status = stored_status(store)["traces"]
    assert status["accepted_items"] == 0 and status["rejected_items"] == 5


# -- ingest's bounds are the encoders' ---------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("ext", "field"),
    [
        ({"model_load": {"engine_load_ms": 1e300}}, "ext.model_load.engine_load_ms"),
        ({"model_load": {"engine_load_ms": -1.0}}, "ext.model_load.engine_load_ms"),
        ({"network": {"rtt_ms": 1e300}}, "ext.network.rtt_ms"),
        ({"collab": {"round_us": [[0, 10, 10, 1, 1], [2**62, 1, 1, 1, 1]]}}, "ext.collab.round_us[1]"),
        ({"collab": {"network_time_ms": 1e20}}, "ext.collab.network_time_ms"),
        ({"network": {"model": "gpt\x1b[31m"}}, "ext.network.model"),
    ],
)
def test_ingest_refuses_what_the_encoders_would_not_read(ext: dict[str, Any], field: str) -> None:
    record = good_records(1)[0] | {"ext": ext}
    with pytest.raises(rs.SchemaError) as refused:
        rs.check_record(record, NOW)
    assert refused.value.field == field


kinds = st.sampled_from(["inference", "inference", "model_load"])
numbers = st.one_of(
    st.none(),
    st.integers(-(2**63), 2**63 - 1),
    st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, 1.5, rs.MAX_DURATION_MS, 1e300, -1e308]),
)
round_values = st.one_of(st.integers(0, rs.MAX_DURATION_US), st.integers(-(2**63), 2**63 - 1))
rounds = st.lists(st.lists(round_values, min_size=5, max_size=5), max_size=4)
encoder_ext = st.fixed_dictionaries(
    {},
    optional={
        "model_load": st.dictionaries(st.sampled_from(["engine_load_ms", "n_layers", "path"]), numbers, max_size=3),
        "network": st.fixed_dictionaries(
            {}, optional={"rtt_ms": numbers, "server_address": st.text(max_size=20), "server_port": numbers}
        ),
        "collab": st.fixed_dictionaries(
            {},
            optional={
                "round_us": rounds,
                "rtt_ms": numbers,
                "network_time_ms": numbers,
                "acceptance_rate": numbers,
                "rounds": numbers,
            },
        ),
        "energy": st.fixed_dictionaries({}, optional={"j_per_output_token": numbers, "joules_total": numbers}),
        "offload": st.fixed_dictionaries({}, optional={"decision": st.text(max_size=8), "predicted_local_ms": numbers}),
        "clock": st.fixed_dictionaries({}, optional={"maxerror_us": numbers}),
        "interference": st.fixed_dictionaries(
            {
                "contended": st.one_of(st.booleans(), st.none(), st.just(1)),
                "reasons": st.one_of(
                    st.lists(st.sampled_from([*sorted(rs.INTERFERENCE_REASONS), "gpu"]), max_size=9), st.none()
                ),
            },
            optional={
                "other_cpu_cores": numbers,
                "cpu_freq_ratio": numbers,
                "temp_max_c": numbers,
                "summary": st.text(max_size=210),
            },
        ),
    },
)


clean_names = st.text(st.characters(blacklist_categories=("Cc", "Cs")), max_size=rs.MAX_NAME_CHARS)


@st.composite
def exported_record(draw: st.DrawFn) -> dict[str, Any]:
    record = draw(valid_record())
    for name in ("run_id", "model_name", "engine", "error_type"):  # mostly names ingest accepts: the encoders' cases
        if draw(st.integers(0, 4)):
            record[name] = draw(clean_names)
    record["kind"] = draw(kinds)
    record["strategy"] = draw(st.sampled_from(["local", "speculative", "cloud", "offload", record["strategy"]]))
    record["ext"] = draw(encoder_ext | st.just(record["ext"]))
    return record


@settings(max_examples=300, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.too_slow])
@given(record=exported_record())
def test_any_record_ingest_accepts_encodes_as_spans_and_metrics(record: dict[str, Any]) -> None:
    blob = encode_raw(record, "cbor")
    try:
        accepted = wire.check_record(wire.loads(blob, "cbor"), 0, NOW)
    except wire.WireError:
        return  # refused at ingest: never stored, never exported
    accepted["_seq"] = 1
    resource = otlp.resource_attributes(accepted["device_id"], {}, version="0")
    body, spans, refused = otlp.encode_traces_isolated([(resource, [accepted])], version="0")
    assert not refused, refused[0].describe()
    assert spans >= 1 and body
    for temporality in ("cumulative", "delta"):
        acc = otlp.MetricsAccumulator(temporality, server_metrics=True)
        _, _, pending = acc.encode([accepted], {accepted["device_id"]: resource}, now_ns=time.time_ns(), version="0")
        assert not pending["refused"], pending["refused"][0].describe()


def test_the_issue_record_is_refused_at_ingest_and_encodes_if_stored_anyway() -> None:
    record = good_records(1)[0] | {"kind": "model_load", "ext": {"model_load": {"engine_load_ms": 1e300}}}
    with pytest.raises(rs.SchemaError, match="engine_load_ms"):
        rs.check_record(dict(record), NOW)
    _, spans, refused = otlp.encode_traces_isolated([({}, [record])], version="0")  # stored by an old release
    assert spans == 1 and not refused


def test_an_answer_in_several_pieces_is_read_whole() -> None:
    """A backend's partial_success answer that arrives in two chunks (a real network: more than one segment) is the
    backend's answer, not "not OTLP"; one past a megabyte is not an OTLP answer and is retried."""
    asyncio.run(_pieces())


async def _pieces() -> None:
    import aiohttp
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    answer = trace_service_pb2.ExportTraceServiceResponse()
    answer.partial_success.rejected_spans = 2
    answer.partial_success.error_message = "x" * 3000  # a long reason: more than one chunk
    body = answer.SerializeToString()

    async def split(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-protobuf"})
        await response.prepare(request)
        await response.write(body[:10])
        await asyncio.sleep(0.05)
        await response.write(body[10:])
        await response.write_eof()
        return response

    async def huge(request: web.Request) -> web.StreamResponse:
        await request.read()
        response = web.StreamResponse(status=200, headers={"Content-Type": "application/x-protobuf"})
        await response.prepare(request)
        for _ in range(20):
            await response.write(b"\x00" * 65536)
        await response.write_eof()
        return response

    app = web.Application()
    app.router.add_post("/split/v1/traces", split)
    app.router.add_post("/huge/v1/traces", huge)
    runner = web.AppRunner(app)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    try:
        async with aiohttp.ClientSession() as session:
            got = await otlp.post_export(session, f"http://127.0.0.1:{port}/split/v1/traces", "traces", b"", {}, 10)
            assert got.outcome == "accepted" and got.rejected == 2, got
            got = await otlp.post_export(session, f"http://127.0.0.1:{port}/huge/v1/traces", "traces", b"", {}, 10)
            assert got.outcome == "retry" and "larger than" in got.message, got
    finally:
        await runner.cleanup()


@pytest.mark.parametrize("n", [100, 1000])
async def test_a_long_run_one_device_s_records_the_backend_refuses_does_not_stall_the_others(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path, caplog: pytest.LogCaptureFixture, n: int
) -> None:
    """The trial of issue 29: a backend answering 400 to any request holding one device's spans; that device sends
    1000 records in one batch (two batches of the forwarder, each refused whole), then another device sends 5.
    The other device's records arrive in the first pass (sent ahead, the evidence that the backend works), the 1000
    are isolated, counted as rejected and logged, and the cursor passes them — without a hold. With 100, the other
    device's records are in the same batch, behind a run longer than the halving's budget."""
    caplog.set_level(logging.INFO, logger="aggregator.otlp")
    receiver = Receiver(refuse_devices={OLD})
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    store = SQLiteStore(tmp_path / "agg.db")
    # the defaults' batch (500) and a backoff long enough that a single hold would show
    settings = otlp_settings(server.port, batch_records=500, backoff_max=30.0, interval=0.2)
    bad, good = good_records(n, device=OLD, seed=21), good_records(5, seed=22)
    for i, r in enumerate(good):
        r["started_us"] = NOW - 10_000_000 + i * 1000
    store_directly_in(store, bad, OLD)
    store_directly_in(store, good, GOOD)
    app = create_app(Settings(otlp=settings), store)
    started = time.monotonic()
    client = await aiohttp_client(app)
    forwarder = app[FORWARDER]
    want = {r["id"] for r in good}
    while not want <= {s.trace_id for _, s in receiver.spans()}:
        assert time.monotonic() - started < 60, stored_status(store)
        await asyncio.sleep(0.02)
    passes_to_good = forwarder.passes
    assert passes_to_good <= 2, passes_to_good  # the first pass sends them ahead of the refused run
    while any(stored_status(store)[s]["pending_records"] for s in ("traces", "metrics")):
        assert time.monotonic() - started < 120, stored_status(store)
        await asyncio.sleep(0.05)
    assert forwarder.passes <= 6, forwarder.passes  # 2 batches of 500 and the 5 (sent ahead, passed), per signal
    for signal in ("traces", "metrics"):
        assert forwarder.status[signal].failures.get("refused_all", 0) == 0, forwarder.status[signal].failures
    assert {s.trace_id for _, s in receiver.spans()} == want
    # the accepted request is sent again as a probe O(log n) times a batch, not after every budget of refusals
    good_spans = sum(len(otlp.record_spans(r)) for r in good)
    assert len(receiver.spans()) <= good_spans * 8 * 3, (len(receiver.spans()), good_spans)
    assert all(resource["lens.device.id"] == GOOD for resource, _, _ in receiver.points())
    counts = {
        tuple(sorted((kv.key, str(kv.value)) for kv in point.attributes)): point.count
        for _, metric, point in receiver.points()
        if metric.name == "gen_ai.client.operation.duration"
    }
    assert sum(counts.values()) == sum(1 for r in good if r["e2e_us"] is not None)  # each counted once
    status = stored_status(store)
    assert status["traces"]["rejected_items"] == sum(len(otlp.record_spans(r)) for r in bad)
    assert status["traces"]["forwarded_records"] == n + 5 and status["metrics"]["forwarded_records"] == n + 5
    assert status["metrics"]["rejected_items"] > 0
    skipped = [m for m in caplog.messages if "on its own while accepting others" in m and "traces" in m]
    assert len(skipped) == n and all(OLD in m for m in skipped)
    assert bytes(bad[-1]["id"]).hex() in "\n".join(skipped)
    # about 2n requests for n records refused alone (halving), not one hold per few records
    refused = sum(1 for signal, code in receiver.answers if signal == "traces" and code == 400)
    assert refused <= 2 * n + 100, refused
    assert await (await client.get("/metrics")).text()


async def test_a_run_is_held_when_the_backend_refuses_the_records_sent_ahead_too(
    aiohttp_client: Any, aiohttp_server: Any, tmp_path: Path
) -> None:
    """The evidence must be records accepted: when another device's records are refused as well (a backend
    refusing everything with a body), nothing is skipped and the signal is held; healed, everything arrives."""
    receiver = Receiver(refuse_devices={OLD, GOOD})
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    store = SQLiteStore(tmp_path / "agg.db")
    bad, good = good_records(200, device=OLD, seed=23), good_records(5, seed=24)
    store_directly_in(store, bad, OLD)
    store_directly_in(store, good, GOOD)
    app = create_app(Settings(otlp=otlp_settings(server.port, batch_records=64)), store)
    await aiohttp_client(app)
    forwarder = app[FORWARDER]
    deadline = time.monotonic() + 30
    while forwarder.status["traces"].failures.get("refused_all", 0) < 3:
        assert time.monotonic() < deadline, forwarder.status["traces"]
        await asyncio.sleep(0.02)
    status = stored_status(store)["traces"]
    assert status["rejected_items"] == 0 and status["forwarded_records"] == 0 and status["pending_records"] == 205
    assert receiver.spans() == []
    receiver.refuse_devices = set()
    while any(stored_status(store)[s]["pending_records"] for s in ("traces", "metrics")):
        assert time.monotonic() < deadline + 30, stored_status(store)
        await asyncio.sleep(0.05)
    assert {s.trace_id for _, s in receiver.spans()} == {r["id"] for r in [*bad, *good]}
    assert stored_status(store)["traces"]["rejected_items"] == 0


def store_directly_in(store: SQLiteStore, records: list[dict[str, Any]], device: str) -> None:
    """Rows stored as ingest stores a batch (the records are valid; no token needed)."""
    rows = [_row(r, "cbor", encode_raw(r, "cbor")) for r in records]
    store.ingest(device, str(uuid.uuid4()), 0, {}, rows, NOW)


async def test_records_sent_ahead_are_kept_with_the_cursor_across_a_restart(
    aiohttp_server: Any, tmp_path: Path
) -> None:
    """Another device's records sent ahead of a refused run are kept with the cursor: a restarted forwarder does not
    send them (or count their points) again. It keeps no accepted request to send again, so the rest of the run waits
    (held, nothing skipped) for the next record the backend accepts, then passes."""
    receiver = Receiver(refuse_devices={OLD})
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    store = SQLiteStore(tmp_path / "agg.db")
    bad, good = good_records(200, device=OLD, seed=25), good_records(5, seed=26)
    store_directly_in(store, bad, OLD)
    store_directly_in(store, good, GOOD)
    settings = otlp_settings(server.port, batch_records=100)
    first = Forwarder(store, settings)
    await asyncio.to_thread(first._load)
    await first.forward_once()  # the first 100 refused: the 5 sent ahead, the 100 isolated and passed
    await first.stop()
    cursor = json.loads(store.get_meta("otlp.traces") or "{}")
    assert cursor["seq"] == 100 and cursor["ahead"] == list(range(201, 206)), cursor
    assert json.loads(store.get_meta("otlp.metrics") or "{}")["ahead"] == list(range(201, 206))
    spans_before, points_before = len(receiver.spans()), len(receiver.points())
    assert {s.trace_id for _, s in receiver.spans()} == {r["id"] for r in good}

    second = Forwarder(store, settings)  # a restart
    await asyncio.to_thread(second._load)
    await second.forward_once()
    assert second.status["traces"].refusing_all and stored_status(store)["traces"]["cursor_seq"] == 100
    late = good_records(1, seed=27)
    store_directly_in(store, late, GOOD)
    deadline = time.monotonic() + 30
    while any(stored_status(store)[s]["pending_records"] for s in ("traces", "metrics")):
        assert time.monotonic() < deadline, stored_status(store)
        for status in second.status.values():
            status.retry_at = None  # not the backoff under test
        await second.forward_once()
    await second.stop()
    # the 5 were not sent again (the late record was: it is the probe sent again after each budget of refusals)
    assert sum(1 for _, span in receiver.spans() if span.trace_id in {r["id"] for r in good}) == spans_before
    assert late[0]["id"] in {s.trace_id for _, s in receiver.spans()}
    assert len(receiver.points()) > points_before
    counts = {
        tuple(sorted((kv.key, str(kv.value)) for kv in point.attributes)): point.count
        for _, metric, point in receiver.points()
        if metric.name == "gen_ai.client.operation.duration"
    }
    assert sum(counts.values()) == sum(1 for r in [*good, *late] if r["e2e_us"] is not None)  # cumulative, once each
    status = stored_status(store)
    assert status["traces"]["rejected_items"] == sum(len(otlp.record_spans(r)) for r in bad)
    assert status["traces"]["forwarded_records"] == 206
    assert "ahead" not in json.loads(store.get_meta("otlp.traces") or "{}")
