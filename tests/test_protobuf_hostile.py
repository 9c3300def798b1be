"""The protobuf exports under hostile records, sent as a device with a token would send them, through a real
aggregator: a campaign's results documents that ingest accepts never break the campaign export, what an export
leaves out is said, and the measurements export gives the JSON export's rows and values, read back by our own
documented reader (``iter_delimited`` + ``message_to_record``)."""

from __future__ import annotations

import json
import math
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agent.synthetic import synthetic_records
from aggregator import campaign_results as cr
from aggregator.app import Settings, _row, create_app
from aggregator.store import SQLiteStore
from lens_core import protobuf as P
from lens_core import wire
from lens_core.itlpack import _varint
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

from .test_aggregator import auth
from .test_campaigns_api import SUITE, batch, record

DEVICE = "dev-h"


def wire_record(seed: int = 0, **changes: Any) -> dict[str, Any]:
    """A device's record as it goes on the wire, with ``changes`` applied (top-level fields of the wire map)."""
    out = wire.to_wire(synthetic_records(1, seed=seed, device_id=DEVICE)[0], include_text=True)
    out["id"] = uuid.uuid4().bytes
    out["started_us"] = time.time_ns() // 1000 - 1000
    out.update(changes)
    return out


def post_body(records: list[dict[str, Any]]) -> bytes:
    blobs = [wire.dumps(r, "cbor") for r in records]
    return wire.encode_batch(blobs, device_id=DEVICE, batch_id=str(uuid.uuid4()), sent_us=1, codec="cbor")


def packed(median: int, n: int = 1) -> bytes:
    """Packed gaps (version 1, predictor 0, Rice k 0) of ``n`` gaps all equal to ``median``: a header ingest
    accepts whatever the median is."""
    return bytes([1, 0, 0]) + _varint(n) + _varint(median) + bytes([0] * ((n + 7) // 8))


@pytest.fixture
async def aggregator(aiohttp_client: Any, tmp_path: Path) -> tuple[Any, SQLiteStore, str, str]:
    store = SQLiteStore(tmp_path / "agg.db")
    client = await aiohttp_client(create_app(Settings(), store))
    now = time.time_ns() // 1000
    return client, store, store.add_token(DEVICE, "device", now), store.add_token("ops", "operator", now)


async def exports(
    client: Any, token: str, skipped: int = 0
) -> tuple[list[dict[str, Any]], list[pb.InferenceMeasurement]]:
    """Both exports' rows; each says it left out ``skipped`` rows (header and the JSON page's skipped_rows)."""
    page = await client.get("/api/v1/measurements?limit=1000", headers=auth(token))
    assert page.status == 200
    streamed = await client.get("/api/v1/measurements?limit=1000&format=protobuf", headers=auth(token))
    assert streamed.status == 200
    messages = list(P.iter_delimited(await streamed.read(), pb.InferenceMeasurement))
    body = await page.json()
    assert page.headers["X-Skipped-Rows"] == streamed.headers["X-Skipped-Rows"] == str(skipped)
    assert body["skipped_rows"] == skipped
    return body["measurements"], messages


def assert_same_rows(json_rows: list[dict[str, Any]], messages: list[pb.InferenceMeasurement]) -> None:
    """The two exports hold the same rows in the same order, and the documented reader gives the JSON values."""
    assert [m.measurement_id for m in messages] == [r["id"] for r in json_rows]
    for message, want in zip(messages, json_rows, strict=True):
        assert P.received_us(message) == wire._parse_time_us(want["received_at"])
        assert P.message_to_record(message) == want


# -- the measurements export -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "name", ["ttft_ms", "received_at", "itl_ms", "started_at", "version", "engine_decode_ms", "e2e_ms"]
)
async def test_ingest_refuses_an_extra_field_named_as_a_record_field(
    aggregator: tuple[Any, SQLiteStore, str, str], name: str
) -> None:
    """An extra top-level field by a name the measurement gives a wire field would stand in for that field in the
    JSON export (and collide with it in the protobuf one): ingest refuses it, naming it."""
    client, store, device, _ = aggregator
    refused = await client.post(
        "/api/v1/ingest", data=post_body([wire_record(**{name: "1999-01-01T00:00:00Z"})]), headers=auth(device)
    )
    assert refused.status == 400
    assert name in (await refused.json())["error"]
    assert store.record_count() == 0
    plain = await client.post("/api/v1/ingest", data=post_body([wire_record(zzz_extra=[1])]), headers=auth(device))
    assert plain.status == 200  # any other extra field is still carried


async def test_a_colliding_row_stored_before_the_bound_is_left_out_of_both_exports(
    aggregator: tuple[Any, SQLiteStore, str, str],
) -> None:
    """A row an older aggregator stored with ``ttft_ms: "evil"`` beside its ``ttft_us`` is skipped (and counted)
    by both exports, rather than served forged in JSON and refused by the protobuf reader."""
    client, store, _, reader = aggregator
    good = wire_record(seed=1)
    forged = wire_record(seed=2, ttft_ms="evil", started_at="1999-01-01T00:00:00Z", version=99)
    rows = [_row(r, "cbor", wire.dumps(r, "cbor")) for r in (good, forged)]
    store.ingest(DEVICE, str(uuid.uuid4()), 1, {}, rows, time.time_ns() // 1000)
    json_rows, messages = await exports(client, reader, skipped=1)
    assert [r["id"] for r in json_rows] == [str(uuid.UUID(bytes=good["id"]))]
    assert_same_rows(json_rows, messages)


async def test_gaps_and_derived_figures_give_the_same_rows_and_values_in_both_exports(
    aggregator: tuple[Any, SQLiteStore, str, str],
) -> None:
    """Packed gaps ingest accepts by their header but whose codes hold a gap past one day (or past 64 bits) are
    left out of both exports; null gaps are served by both; a derived figure that would be inf or absurd is
    left out of the message (its parts are there)."""
    client, _, device, reader = aggregator
    ok = wire_record(seed=3)
    no_gaps = wire_record(seed=4, itl_us=None)
    huge_power = wire_record(seed=5, e2e_us=1, ok=True, ext={"energy": {"joules_total": 1e308, "source": "rapl"}})
    huge_rate = wire_record(seed=6, e2e_us=1, ok=True, output_tokens=2**31 - 1)
    over_a_day = [wire_record(seed=7 + i, itl_us=packed(m)) for i, m in enumerate((2 * 86_400_000_000, 2**63 - 1))]
    past_64_bits = wire_record(seed=9, itl_us=packed(2**64))
    sent = [ok, no_gaps, huge_power, huge_rate, *over_a_day, past_64_bits]
    answer = await client.post("/api/v1/ingest", data=post_body(sent), headers=auth(device))
    assert answer.status == 200, await answer.text()
    json_rows, messages = await exports(client, reader, skipped=3)
    served = [ok, no_gaps, huge_power, huge_rate]
    assert [r["id"] for r in json_rows] == [str(uuid.UUID(bytes=r["id"])) for r in served]
    assert_same_rows(json_rows, messages)
    by_id = {m.measurement_id: m for m in messages}
    assert json_rows[1]["itl_ms"] is None and not by_id[json_rows[1]["id"]].latency.HasField("inter_token_gaps")
    power = by_id[json_rows[2]["id"]]
    assert not power.resources.HasField("power_consumption_watts")
    assert power.resources.energy.joules_total == 1e308
    rate = by_id[json_rows[3]["id"]]
    assert not rate.tokens.HasField("tokens_per_second") and rate.tokens.output_tokens == 2**31 - 1
    assert by_id[json_rows[0]["id"]].tokens.HasField("tokens_per_second")  # a plausible one is still derived
    for message in messages:
        json_format.MessageToJson(message)  # every Timestamp and Duration valid


def test_the_reader_and_the_writer_hold_gaps_to_the_same_bound() -> None:
    """``wire_to_message`` refuses the gaps ``message_to_record`` would refuse (``record_to_message`` already
    did): no message the writer emits is one the reader refuses for its gaps."""
    record = wire_record(itl_us=packed(2 * 86_400_000_000))
    with pytest.raises(P.ProtobufError) as refused:
        P.wire_to_message(record)
    assert refused.value.field == "itl_us" and "one day" in refused.value.problem
    edge = wire_record(itl_us=packed(86_400_000_000, 3))
    assert P.message_to_record(P.wire_to_message(edge))["itl_ms"] == [86_400_000.0] * 3


# -- the campaign export -----------------------------------------------------------------------------------------
HOSTILE_DOCUMENTS: dict[str, tuple[tuple[str, ...], Any]] = {
    "hex": (("configuration", "model", "sha256"), "zz" * 32),
    "hex-spaces": (("configuration", "model", "sha256"), "ab " * 21 + "a"),
    "quant": (("configuration", "model", "quantization"), ["int4"]),
    "quant-map": (("configuration", "model", "quantization"), {"int4": True}),
    "distribution": (("configuration", "test_parameters", "input_tokens", "distribution"), ["normal"]),
    "ts": (("metadata", "timestamp"), "yesterday"),
    "oldts": (("metadata", "timestamp"), "0001-01-01T00:00:00+14:00"),
    "late-ts": (("metadata", "timestamp"), "9999-12-31T23:59:59-23:59"),
    "errors": (("results", "error_metrics", "errors_by_type"), {"oom": -1, "odd": [1]}),
}


def level(campaign: str, name: str, path: tuple[str, ...] | None, value: Any) -> dict[str, Any]:
    results = {
        "latency_metrics": {"time_to_first_token": {"p50_ms": 10.0, "p95_ms": 20.0}},
        "throughput_metrics": {"tokens_per_second": 20.0},
        "error_metrics": {"total_errors": 0, "error_rate": 0.0},
    }
    document: dict[str, Any] = {
        "metadata": {"benchmark_id": str(uuid.uuid4()), "timestamp": "2026-12-07T10:00:00Z"},
        "configuration": {"model": {"name": "small", "sha256": "ab" * 32, "quantization": "int8"}},
        "results": results,
    }
    if path is not None:
        node = document
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    mark = {"id": campaign, "level_run": str(uuid.uuid4()), "model": "small", "workload": "chat", "level": name,
            "levels_done": 1, "levels_total": 3}  # fmt: skip
    return record(DEVICE, "campaign_level", {"campaign": mark, "results": document})


async def test_hostile_results_documents_never_break_the_campaign_export(
    aggregator: tuple[Any, SQLiteStore, str, str], tmp_path: Path
) -> None:
    """Every document ingest accepts is in the protobuf export, its value carried in ``document`` when a typed
    field cannot hold it; a document every export skips is counted in the same way in JSON (skipped_documents)
    and in the other formats (X-Skipped-Documents), and by the CLI."""
    client, _, device, operator = aggregator
    facts = record(DEVICE, "device_facts", {"device": {"device_class": "orin", "tags": ["lab"]}})
    assert (await client.post("/api/v1/ingest", data=batch(DEVICE, [facts]), headers=auth(device))).status == 200
    suite = {**SUITE, "workloads": [{"name": "chat", "concurrency_levels": list(range(1, 13)), "requests": 4}]}
    started = await client.post(
        "/api/v1/benchmark/start",
        json={"configuration": suite, "target": {"devices": [DEVICE]}},
        headers=auth(operator),
    )
    assert started.status == 201, await started.text()
    campaign = (await started.json())["benchmark_id"]
    cases = [("good", None, None), *((name, *case) for name, case in HOSTILE_DOCUMENTS.items())]
    cases.append(("rate-5", ("results", "error_metrics", "error_rate"), 5.0))  # every export skips this one
    labels = {name: f"concurrency {i + 1}" for i, (name, _, _) in enumerate(cases)}
    levels = [level(campaign, labels[name], path, value) for name, path, value in cases]
    sent = await client.post("/api/v1/ingest", data=batch(DEVICE, levels), headers=auth(device))
    assert sent.status == 200, await sent.text()
    documents = {r["ext"]["campaign"]["level"]: r["ext"]["results"] for r in levels}

    answers = {}
    for fmt in ("json", "csv", "protobuf"):
        answer = await client.get(f"/api/v1/benchmark/{campaign}/export?format={fmt}", headers=auth(operator))
        assert answer.status == 200, await answer.text()
        assert answer.headers["X-Skipped-Documents"] == "1" and answer.headers["X-Rows-Dropped"] == "0", fmt
        assert "error_rate" in answer.headers["X-Skip-Reason"]
        answers[fmt] = await answer.read()
    body = json.loads(answers["json"])
    assert body["skipped_documents"] == 1 and "error_rate" in body["skip_reasons"][0]
    messages = list(P.iter_delimited(answers["protobuf"], pb.BenchmarkResults))
    assert [m.campaign_level.level for m in messages] == [row["level"] for row in body["rows"]]
    assert len(messages) == len(HOSTILE_DOCUMENTS) + 1
    for message in messages:
        assert P.results_document(message) == documents[message.campaign_level.level]  # the value as it is
        json_format.MessageToJson(message)  # no invalid Timestamp
    got = {name: m for m in messages for name, label in labels.items() if m.campaign_level.level == label}
    assert got["good"].config.model.sha256 == bytes.fromhex("ab" * 32)
    assert got["good"].config.model.quantization == pb.QUANTIZATION_INT8 and got["good"].HasField("timestamp")
    for name in ("hex", "hex-spaces"):
        assert not got[name].config.model.HasField("sha256"), name
    for name in ("quant", "quant-map"):
        assert got[name].config.model.quantization == pb.QUANTIZATION_UNSPECIFIED
    assert got["distribution"].config.test_params.input_tokens.distribution == pb.DISTRIBUTION_TYPE_UNSPECIFIED
    for name in ("ts", "oldts", "late-ts"):
        assert not got[name].HasField("timestamp"), name
    assert dict(got["errors"].aggregated.errors.errors_by_type) == {}

    from click.testing import CliRunner

    from aggregator.cli import cli

    out = tmp_path / "campaign.pb"
    db = str(tmp_path / "agg.db")
    ran = CliRunner().invoke(
        cli, ["campaign", "export", campaign, "--format", "protobuf", "--output", str(out), "--db", db]
    )
    assert ran.exit_code == 0, ran.output
    assert out.read_bytes() == answers["protobuf"]
    assert "skipped 1 results document (not in the export)" in ran.stderr and "error_rate" in ran.stderr


def test_a_document_only_protobuf_cannot_carry_is_skipped_and_said() -> None:
    """A document the JSON export serves but no protobuf message can carry (a lone surrogate: JSON escapes it,
    UTF-8 cannot hold it) is left out of the protobuf export and counted in its notes and headers."""
    campaign = str(uuid.uuid4())
    good = level(campaign, "good", None, None)
    bad = level(campaign, "bad", ("configuration", "model", "name"), "x\ud800y")
    as_json = cr.export_answer([good, bad], {}, "json")
    assert as_json.notes["skipped_documents"] == 0 and len(json.loads(as_json.body)["rows"]) == 2
    as_protobuf = cr.export_answer([good, bad], {}, "protobuf")
    assert [m.campaign_level.level for m in P.iter_delimited(as_protobuf.body, pb.BenchmarkResults)] == ["good"]
    assert as_protobuf.notes["skipped_documents"] == 1
    assert "document.configuration.model.name" in as_protobuf.notes["skip_reasons"][0]
    headers = as_protobuf.headers()
    assert headers["X-Skipped-Documents"] == "1" and headers["X-Skip-Reason"].isascii()


# -- results_message against any JSON-shaped document of the schema's shape ---------------------------------------
TEXT = st.one_of(
    st.text(max_size=8),
    st.sampled_from(["ab" * 32, "zz" * 32, "AB" * 32, "int4", "q5_k", "normal", "fixed", "\ud800", "x\udfffy"]),
    st.sampled_from(["2026-12-07T10:00:00Z", "yesterday", "0001-01-01T00:00:00+14:00", "9999-12-31T23:59:59-23:59"]),
)
NUMBER = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 2**32, 2**53 + 1, 2**63, 2**64 - 1, 2**64]),
    st.floats(),
)
SCALAR = st.one_of(st.none(), st.booleans(), NUMBER, TEXT)
JSON = st.recursive(
    SCALAR,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=4), inner, max_size=3),
    max_leaves=8,
)
# the results schema's shape: every map may also be any JSON value, and have keys of its own
SHAPE: dict[str, Any] = {
    "metadata": {"benchmark_id": None, "run_id": None, "timestamp": None},
    "configuration": {
        "model": {"name": None, "provider": None, "version": None, "quantization": None, "sha256": None},
        "cloud": {"url": None},
        "hardware": {"gpu_type": None, "gpu_count": None, "cpu_cores": None, "memory_gb": None, "batch_size": None},
        "test_parameters": {
            "input_tokens": {"mean": None, "stddev": None, "distribution": None},
            "output_tokens": {"mean": None, "stddev": None, "distribution": None},
            "concurrency_levels": None,
            "warmup_requests": None,
            "total_requests": None,
        },
    },
    "results": {
        "latency_metrics": {
            name: {key: None for key in P._DISTRIBUTION_FIELDS}
            for name in ("time_to_first_token", "time_per_output_token", "end_to_end_latency", "prefill_time")
        },
        "throughput_metrics": {"requests_per_second": None, "tokens_per_second": None},
        "error_metrics": {"total_errors": None, "error_rate": None, "errors_by_type": {"oom": None, "other": None}},
    },
}


def shaped(shape: dict[str, Any] | None) -> st.SearchStrategy[Any]:
    if shape is None:
        return st.one_of(SCALAR, st.lists(SCALAR, max_size=3), JSON)
    mapping = st.fixed_dictionaries({}, optional={key: shaped(child) for key, child in shape.items()})
    extra = st.dictionaries(st.text(max_size=4), JSON, max_size=2)
    return st.one_of(st.builds(lambda known, more: {**more, **known}, mapping, extra), JSON)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(document=shaped(SHAPE))
def test_results_message_maps_any_json_shaped_document_or_refuses_it_by_name(document: Any) -> None:
    """results → BenchmarkResults never raises anything but the codec's own ProtobufError, and only for what no
    message can carry (a value that is not JSON-compatible); otherwise the document travels exactly and every
    Timestamp is valid."""
    if type(document) is not dict:
        document = {"results": document}
    try:
        message = P.results_message(document)
    except P.ProtobufError as exc:
        assert exc.field.startswith("document"), exc
        assert _not_carried(document, 0), (exc, document)
        return
    (parsed,) = P.iter_delimited(P.delimited([message]), pb.BenchmarkResults)
    assert P.results_document(parsed) == document
    json_format.MessageToJson(parsed)


def _not_carried(value: Any, depth: int = 1) -> bool:
    """Whether the value holds something no Value can: NaN or ±inf, an integer past 64 bits, a lone surrogate,
    or nesting past the decoders' bound."""
    if depth > 12:
        return True
    if type(value) is float:
        return not math.isfinite(value)
    if type(value) is int:
        return not -(2**63) <= value < 2**63
    if type(value) is str:
        return any("\ud800" <= c <= "\udfff" for c in value)
    if type(value) is list:
        return any(_not_carried(v, depth + 1) for v in value)
    if type(value) is dict:
        return any(_not_carried(k, depth) or _not_carried(v, depth + 1) for k, v in value.items())
    return False
