"""Guardrail stages as OpenTelemetry spans (docs/opentelemetry.md "Guardrails"): records carrying ext.guardrails,
forwarded by a real aggregator and exported by a standalone agent, reach a loopback OTLP receiver that decodes them
with opentelemetry-proto; every stage span is checked for its name, parent, place in time and attributes."""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from pathlib import Path
from typing import Any

from opentelemetry.proto.trace.v1 import trace_pb2

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from lens_core import otlp, wire
from lens_core.guardrail_view import MAX_CHECKS, MAX_VIOLATIONS
from tests.guardrail_export_records import guard, hostile_guardrails
from tests.netproxy import free_port
from tests.otlp_receiver import Receiver, attrs
from tests.test_otlp import DEVICE, ingest, settings, wait_for
from tests.test_otlp_agent import export_once

ERROR = trace_pb2.Status.STATUS_CODE_ERROR
G = "llm_latency_lens.guardrail"


def guarded_records() -> list[dict[str, Any]]:
    """One of each guarded shape, beside an unguarded request: passed, blocked at input, at threat and at output,
    a stage error passed over (passed_with_errors), a stage error that failed the request, and a hostile one."""
    base = [r for r in synthetic_records(12, seed=29, device_id=DEVICE) if r["ok"]]
    plain = base[0]
    passed = guard(base[1], set_name="pii")
    at_input = guard(base[2], set_name="pii", blocked_at="input")
    at_threat = guard(base[3], set_name="strict", blocked_at="threat")
    at_output = guard(base[4], set_name="strict", blocked_at="output")
    passed_errors = guard(base[5], set_name="pii", error_at="threat")
    failed = guard(base[6], set_name="pii", blocked_at="input")  # reshaped below: on_error = "error" at input
    failed.update(kind="inference", ok=False, error_type="guardrail_error")
    failed["error_message"] = "guardrail stage input: check rules raised ValueError"
    g = failed["ext"]["guardrails"]
    g.update(outcome="error", blocked_at=None, violations=[], risk_score=0.0, risk_level="low")
    g["stages"]["input"]["error"] = "check rules raised ValueError: bad pattern"
    hostile = copy.deepcopy(base[7])
    hostile["ext"] = {"guardrails": hostile_guardrails()}
    hostile["e2e_ms"] = hostile["ext"]["guardrails"]["inference_ms"]
    return [plain, passed, at_input, at_threat, at_output, passed_errors, failed, hostile]


def traces(receiver: Receiver) -> dict[bytes, list[Any]]:
    out: dict[bytes, list[Any]] = {}
    for _, span in receiver.spans():
        out.setdefault(span.trace_id, []).append(span)
    return out


def check_guardrail_spans(receiver: Receiver, records: list[dict[str, Any]]) -> None:
    """Each record's trace against its ext.guardrails: a stage span per stage that ran, under the request span, at
    started + start_ms for its ms, not overlapping the others; the inference's spans after input and threat."""
    by_trace = traces(receiver)
    assert set(by_trace) == {wire.to_wire(r)["id"] for r in records}
    for record in records:
        w = wire.to_wire(record)
        spans = by_trace[w["id"]]
        assert len({s.span_id for s in spans}) == len(spans)
        roots = [s for s in spans if not s.parent_span_id]
        assert len(roots) == 1
        root = roots[0]
        a = attrs(root.attributes)
        start = w["started_us"] * 1000
        assert root.start_time_unix_nano == start
        assert a["gen_ai.request.model"] == w["model_name"]
        g = (w.get("ext") or {}).get("guardrails")
        stages = {s.name: s for s in spans if s.name.startswith("guardrail.")}
        if g is None:
            assert not stages and not any(k.startswith(G) for k in a)
            assert root.end_time_unix_nano == start + w["e2e_us"] * 1000
            continue
        assert a[f"{G}.set"] == g["set"] and a[f"{G}.outcome"] == g["outcome"]
        assert a[f"{G}.blocked"] is (g["blocked_at"] is not None)
        assert a.get(f"{G}.blocked_at") == g["blocked_at"]
        assert a[f"{G}.violations.count"] == len(g["violations"])
        assert root.end_time_unix_nano >= start + int(g["total_ms"] * 1e6)
        assert sorted(stages) == sorted(f"guardrail.{name}" for name in g["stages"])
        for name, stage in g["stages"].items():
            span = stages[f"guardrail.{name}"]
            s = attrs(span.attributes)
            assert span.parent_span_id == root.span_id
            assert span.kind == trace_pb2.Span.SPAN_KIND_INTERNAL
            assert span.start_time_unix_nano == start + int(stage["start_ms"] * 1e6)
            assert span.end_time_unix_nano - span.start_time_unix_nano == int(stage["ms"] * 1e6)
            assert root.start_time_unix_nano <= span.start_time_unix_nano
            assert span.end_time_unix_nano <= root.end_time_unix_nano
            # the GenAI attributes the request span carries
            for key in ("gen_ai.operation.name", "gen_ai.provider.name", "gen_ai.request.model"):
                assert s[key] == a[key], key
            assert s[f"{G}.set"] == g["set"] and s[f"{G}.stage"] == name and s[f"{G}.outcome"] == g["outcome"]
            assert s[f"{G}.risk_score"] == stage["risk_score"]
            assert s[f"{G}.blocked"] is (g["blocked_at"] == name)
            found = [v for v in g["violations"] if v["stage"] == name]
            assert s[f"{G}.violations.count"] == len(found)
            assert s.get(f"{G}.violations.types", []) == sorted({v["type"] for v in found})
            checks = stage["checks"]
            assert s[f"{G}.check.names"] == [c["name"] for c in checks]
            assert s[f"{G}.check.ms"] == [c["ms"] for c in checks]
            assert len(s[f"{G}.check.names"]) <= MAX_CHECKS
            if stage["error"] is not None:
                assert span.status.code == ERROR and span.status.message == stage["error"]
            else:
                assert span.status.code != ERROR
            if name == "output":
                assert s[f"{G}.output.mode"] == "stream" and s[f"{G}.output.chunks"] == 3
        ordered = sorted(stages.values(), key=lambda span: span.start_time_unix_nano)
        for earlier, later in itertools.pairwise(ordered):
            assert earlier.end_time_unix_nano <= later.start_time_unix_nano, "stages overlap"
        inference = [s for s in spans if s.name in ("prefill", "decode")]
        if g["inference_start_ms"] is None:  # blocked before the inference, or failed at input: none ran
            assert not inference
            continue
        first = start + int(g["inference_start_ms"] * 1e6)
        prefill = next(s for s in inference if s.name == "prefill")
        assert prefill.start_time_unix_nano == first
        assert prefill.end_time_unix_nano == first + w["ttft_us"] * 1000
        for span in inference:
            for name in ("guardrail.input", "guardrail.threat"):
                if name in stages:
                    assert span.start_time_unix_nano >= stages[name].end_time_unix_nano
            if "guardrail.output" in stages:
                assert span.end_time_unix_nano <= stages["guardrail.output"].start_time_unix_nano


async def test_the_aggregator_forwards_guardrail_stages_as_child_spans(
    aiohttp_client: Any, store: Any, aiohttp_server: Any
) -> None:
    receiver = Receiver()
    server = await aiohttp_server(receiver.app(), host="127.0.0.1")
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    client = await aiohttp_client(create_app(Settings(otlp=settings(server.port)), store))
    records = guarded_records()
    await ingest(client, token, records)
    await wait_for(lambda: len(traces(receiver)) == len(records))
    check_guardrail_spans(receiver, records)
    by_trace = traces(receiver)
    # a blocked request still has its request span, which says it was blocked and where
    blocked = wire.to_wire(records[2])
    root = next(s for s in by_trace[blocked["id"]] if not s.parent_span_id)
    assert blocked["kind"] == "blocked" and root.status.code != ERROR
    assert attrs(root.attributes)[f"{G}.blocked"] is True and attrs(root.attributes)[f"{G}.blocked_at"] == "input"
    # a guardrail error that failed the request: the request and the stage are both ERROR
    failed = wire.to_wire(records[6])
    root = next(s for s in by_trace[failed["id"]] if not s.parent_span_id)
    assert root.status.code == ERROR and attrs(root.attributes)["error.type"] == "guardrail_error"
    # the hostile record: 1 request span + 3 stages + prefill and decode, whatever its lists held
    hostile = wire.to_wire(records[7])
    spans = by_trace[hostile["id"]]
    assert len(spans) == 6
    root_attrs = attrs(next(s for s in spans if not s.parent_span_id).attributes)
    assert root_attrs[f"{G}.violations.count"] == MAX_VIOLATIONS
    for span in spans:
        a = attrs(span.attributes)
        if span.name.startswith("guardrail."):
            assert len(a[f"{G}.check.names"]) == MAX_CHECKS == len(a[f"{G}.check.server_ms"])
            assert all(len(name) <= 64 for name in a[f"{G}.check.names"])
            assert len(a[f"{G}.violations.types"]) <= 8
        assert span.ByteSize() < 8_000, span.name  # bounded: no description, no text, arrays of at most 16


async def test_a_standalone_agent_exports_the_same_guardrail_spans(tmp_path: Path) -> None:
    receiver = Receiver()
    records = guarded_records()
    report, outbox = await export_once(tmp_path, free_port(), receiver, records)
    await outbox.close()
    assert report.uploaded == len(records), report
    check_guardrail_spans(receiver, records)


def test_a_hostile_guardrails_map_is_read_within_its_bounds() -> None:
    """A map the ingest check would refuse (a stored row of an older release, or an agent's own outbox): the spans
    take what has the expected type and vocabulary, and stay bounded."""
    record = wire.to_wire(synthetic_records(1, seed=3, device_id=DEVICE)[0])
    ext = hostile_guardrails()
    ext["set"] = "bad set name with spaces \x1b"
    ext["outcome"] = "exploded"
    ext["inference_start_ms"] = float("nan")
    ext["stages"]["bogus"] = ext["stages"]["input"]
    ext["stages"]["input"]["checks"] = ext["stages"]["input"]["checks"] * 8  # 128 checks
    ext["stages"]["threat"]["ms"] = "slow"
    ext["stages"]["output"]["error"] = "x\u202e" * 1000
    ext["violations"] = [
        {"type": f"t{i}", "severity": "dire", "stage": "nowhere", "blocked": "yes"} for i in range(500)
    ]
    record["ext"] = {"guardrails": ext}
    spans = otlp.record_spans(record)
    names = [s.name for s in spans]
    assert names.count("guardrail.input") == 1 and "guardrail.threat" not in names  # no ms: not guessed
    assert not any("bogus" in name for name in names)
    root = spans[0].attributes
    assert root[f"{G}.set"] == "other" and root[f"{G}.outcome"] == "other"
    assert root[f"{G}.violations.count"] == MAX_VIOLATIONS and root[f"{G}.violations.types"] == ["other"]
    assert spans[0].start_ns == record["started_us"] * 1000  # the inference was not shifted by a NaN
    for span in spans:
        for key, value in span.attributes.items():
            assert type(value) in (str, int, float, bool, list), key
            if type(value) is list:
                assert len(value) <= MAX_CHECKS, key
        if span.error is not None:
            assert len(span.error) <= 300 and "\u202e" not in span.error
    body, n = otlp.encode_traces([({"service.name": "lens-agent"}, [record])], version="0")
    assert n == len(spans) and len(body) < 20_000
    # a blocked record whose ext.guardrails is not a map still says on its request span that it was blocked
    blocked = record | {"kind": "blocked", "ext": {"guardrails": "blocked!"}}
    spans = otlp.record_spans(blocked)
    assert spans[0].name.startswith("text_completion ") and spans[0].attributes[f"{G}.blocked"] is True
    assert not any(s.name.startswith("guardrail.") for s in spans)


def test_a_guardrail_record_id_gives_the_same_spans_again() -> None:
    """A resend carries the same trace and span ids (the record id), so a backend can drop the duplicate."""
    record = wire.to_wire(guard(synthetic_records(1, seed=5, device_id=DEVICE)[0], blocked_at="output"))
    record["id"] = uuid.uuid4().bytes
    first, _ = otlp.encode_traces([({"service.name": "lens-agent"}, [record])], version="0")
    again, _ = otlp.encode_traces([({"service.name": "lens-agent"}, [copy.deepcopy(record)])], version="0")
    assert first == again
