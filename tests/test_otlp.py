"""OpenTelemetry export: every stored record reaches an OTLP/HTTP backend once, as GenAI spans and metrics.

A real aggregator (in-process on 127.0.0.1, and ``lens-aggregator serve`` as a process) forwards to a loopback
receiver that decodes each request with opentelemetry-proto; every span, attribute and data point is checked
against the records sent. The backend goes down, answers like a captive portal, refuses one record, and the
aggregator restarts: every record arrives once.
"""

from __future__ import annotations

import asyncio
import copy
import json
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import ClientSession
from opentelemetry.proto.metrics.v1 import metrics_pb2
from opentelemetry.proto.trace.v1 import trace_pb2

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.config import load_aggregator_config
from aggregator.otlp_forward import OtlpSettings, stored_status
from lens_core import otlp, wire
from tests.netproxy import free_port
from tests.otlp_receiver import Receiver, attrs
from tests.processes import AggregatorProcess
from tests.test_aggregator import auth

DEVICE = "dev-1"


def settings(port: int, **kw: Any) -> OtlpSettings:
    base: dict[str, Any] = {
        "endpoint": f"http://127.0.0.1:{port}",
        "headers": {"Authorization": "Bearer otlp-secret"},
        "signals": ("traces", "metrics"),
        "interval": 0.05,
        "backoff_max": 0.3,
        "batch_records": 64,
        "settle_s": 0.0,
    }
    base.update(kw)
    return OtlpSettings(**base)


def mixed_records(n: int = 40, seed: int = 3) -> list[dict[str, Any]]:
    """Local records (a few failed), and one each of speculative, cloud (chat) and offloaded shape, a model load
    and a device-facts record: what a device's outbox holds."""
    records = synthetic_records(n, seed=seed, device_id=DEVICE)
    for failed in records[3], records[n // 2]:  # a failed request, shaped as the engine reports one
        failed.update(ok=False, error_type="decode_failed", error_message="llama_decode returned -3 after 12 tokens")
        failed.update(output_tokens=0, ttft_ms=None, tpot_ms=None, e2e_ms=None, decode_ms=None, prefill_ms=None)
        failed.update(itl_ms=[], stop_reason=None, engine_decode_ms=None, engine_prefill_ms=None)
    base = next(r for r in records if r["ok"])
    spec = copy.deepcopy(base) | {"id": str(uuid.uuid4()), "strategy": "speculative", "engine": "llama.cpp draft"}
    spec["ext"] = {
        "collab": {
            "strategy": "speculative",
            "draft_tokens": 4,
            "rounds": 3,
            "acceptance_rate": 0.75,
            "mean_accepted_length": 4.0,
            "network_time_ms": 3.0,
            "round_us": [[0, 4000, 9000, 4, 4], [13500, 3800, 8700, 4, 3], [26100, 3900, 9100, 4, 2]],
            "server_address": "10.0.0.5",
            "server_port": 8080,
        },
        "network": {"rtt_ms": 1.0},
        "energy": {"j_per_output_token": 0.42, "joules_total": 30.1, "source": "INA3221 rail"},
        "clock": {"synchronized": True, "source": "adjtimex", "maxerror_us": 16000},
    }
    cloud = copy.deepcopy(base) | {"id": str(uuid.uuid4()), "strategy": "cloud", "engine": "openai-compatible"}
    cloud["ext"] = {
        "network": {
            "rtt_ms": 2.5,
            "path": "/v1/chat/completions",
            "server_address": "cloud.example",
            "server_port": 443,
            "model": "qwen-72b",
            "http_status": 200,
        }
    }
    offload = copy.deepcopy(base) | {"id": str(uuid.uuid4()), "strategy": "offload"}
    offload["ext"] = {"offload": {"decision": "local", "reason": "predicted faster", "predicted_local_ms": 900.0}}
    load = copy.deepcopy(base) | {
        "id": str(uuid.uuid4()),
        "kind": "model_load",
        "ext": {"model_load": {"engine_load_ms": 812.5, "n_threads": 2}},
    }
    facts = copy.deepcopy(base) | {
        "id": str(uuid.uuid4()),
        "kind": "device_facts",
        "ext": {"device": {"device_class": "jetson", "model": "NVIDIA Jetson Orin Nano", "ram_gb": 7.4}},
    }
    return [facts, load, *records, spec, cloud, offload]


async def ingest(client: Any, token: str, records: list[dict[str, Any]], batch: int = 25) -> None:
    for start in range(0, len(records), batch):
        blobs = [wire.encode_record(r, "cbor") for r in records[start : start + batch]]
        body = wire.encode_batch(blobs, device_id=DEVICE, batch_id=str(uuid.uuid4()), sent_us=1, codec="cbor")
        answer = await client.post("/api/v1/ingest", data=body, headers=auth(token))
        assert answer.status == 200, await answer.text()


async def wait_for(predicate: Any, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError("timed out")
        await asyncio.sleep(0.02)


def exported(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [wire.to_wire(r) for r in records if r["kind"] in ("inference", "model_load")]


def check_spans(receiver: Receiver, records: list[dict[str, Any]]) -> None:
    """Every exported record's spans, once each, against the record."""
    spans = receiver.spans()
    ids = [s.span_id for _, s in spans]
    assert len(ids) == len(set(ids)), "a span arrived twice"
    by_trace: dict[bytes, list[Any]] = {}
    for resource, span in spans:
        by_trace.setdefault(span.trace_id, []).append((resource, span))
    want = exported(records)
    assert set(by_trace) == {w["id"] for w in want}
    for w in want:
        got = by_trace[w["id"]]
        resource = got[0][0]
        assert resource["service.name"] == "lens-agent"
        assert resource["service.instance.id"] == DEVICE
        assert resource["lens.device.class"] == "jetson"
        assert resource["host.type"] == "NVIDIA Jetson Orin Nano"
        roots = [s for _, s in got if not s.parent_span_id]
        assert len(roots) == 1
        root = roots[0]
        a = attrs(root.attributes)
        start = w["started_us"] * 1000
        assert root.start_time_unix_nano == start
        if w["kind"] == "model_load":
            assert root.name == f"model_load {w['model_name']}"
            assert root.end_time_unix_nano == start + 812_500_000
            assert a["lens.model_load.n_threads"] == 2
            continue
        op = "chat" if w["strategy"] == "cloud" else "text_completion"
        assert root.name == f"{op} {w['model_name']}"
        assert a["gen_ai.operation.name"] == op
        assert a["gen_ai.request.model"] == w["model_name"]
        want_kind = trace_pb2.Span.SPAN_KIND_CLIENT if w["strategy"] == "cloud" else trace_pb2.Span.SPAN_KIND_INTERNAL
        assert root.kind == want_kind
        assert a["gen_ai.provider.name"] == ("openai_compatible" if w["strategy"] == "cloud" else "llama.cpp")
        assert a["gen_ai.usage.input_tokens"] == w["input_tokens"]
        assert a["gen_ai.response.id"] == w["id"].hex()
        assert a["lens.strategy"] == w["strategy"]
        children = {s.name: s for _, s in got if s.parent_span_id == root.span_id}
        if not w["ok"]:
            assert root.status.code == trace_pb2.Status.STATUS_CODE_ERROR
            assert root.status.message == w["error_message"]
            assert a["error.type"] == w["error_type"]
            assert root.end_time_unix_nano == start  # no e2e: no duration invented
            assert "prefill" not in children
            continue
        assert root.status.code == trace_pb2.Status.STATUS_CODE_UNSET
        assert root.end_time_unix_nano == start + w["e2e_us"] * 1000
        assert a["gen_ai.usage.output_tokens"] == w["output_tokens"]
        assert a["gen_ai.response.finish_reasons"] == [{"eos": "stop", "max_tokens": "length"}[w["stop_reason"]]]
        if w["strategy"] == "speculative":
            rounds = [s for _, s in got if s.name == "speculative_round"]
            assert [attrs(r.attributes)["lens.speculative.accepted"] for r in rounds] == [4, 3, 2]
            first = rounds[0]
            assert first.start_time_unix_nano == start
            assert first.end_time_unix_nano == start + 13_000_000
            kids = {s.name: s for _, s in got if s.parent_span_id == first.span_id}
            assert kids["draft"].end_time_unix_nano - kids["draft"].start_time_unix_nano == 4_000_000
            assert kids["verify"].kind == trace_pb2.Span.SPAN_KIND_CLIENT
            net = [s for _, s in got if s.parent_span_id == kids["verify"].span_id]
            assert [s.name for s in net] == ["network"]
            assert net[0].end_time_unix_nano - net[0].start_time_unix_nano == 1_000_000
            assert a["lens.speculative.acceptance_rate"] == 0.75
            assert a["lens.energy.j_per_output_token"] == 0.42
            assert a["lens.clock.synchronized"] is True
            assert a["server.address"] == "10.0.0.5" and a["server.port"] == 8080
            continue
        assert children["prefill"].start_time_unix_nano == start
        assert children["prefill"].end_time_unix_nano == start + w["ttft_us"] * 1000
        assert children["decode"].end_time_unix_nano == start + w["e2e_us"] * 1000
        assert a["lens.clock.synchronized"] == "unknown"
        if w["strategy"] == "cloud":
            assert a["server.address"] == "cloud.example" and a["server.port"] == 443
            assert a["gen_ai.response.model"] == "qwen-72b"
        if w["strategy"] == "offload":
            decision = children["offload_decision"]
            assert attrs(decision.attributes)["lens.offload.decision"] == "local"
            assert decision.start_time_unix_nano == decision.end_time_unix_nano == start


def metric_totals(receiver: Receiver, temporality: str) -> dict[tuple[str, tuple[tuple[str, Any], ...]], list[float]]:
    """(metric, attributes) → [count, sum, bucket counts…]: the last point of each stream (cumulative) or the sum of
    all of them (delta)."""
    out: dict[tuple[str, tuple[tuple[str, Any], ...]], list[float]] = {}
    last_end: dict[Any, int] = {}
    for resource, metric, point in receiver.points():
        assert resource["service.instance.id"] == DEVICE
        key = (metric.name, tuple(sorted(attrs(point.attributes).items())))
        spec = otlp.METRICS[metric.name]
        assert metric.unit == spec.unit
        assert tuple(point.explicit_bounds) == spec.bounds
        assert sum(point.bucket_counts) == point.count
        want = (
            metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
            if temporality == "cumulative"
            else metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
        )
        assert metric.histogram.aggregation_temporality == want
        assert point.start_time_unix_nano <= point.time_unix_nano
        values = [point.count, point.sum, *point.bucket_counts]
        if temporality == "cumulative":
            assert point.time_unix_nano >= last_end.get(key, 0)
            last_end[key] = point.time_unix_nano
            out[key] = values
        else:
            assert point.start_time_unix_nano >= last_end.get(key, 0), "delta windows overlap"
            last_end[key] = point.time_unix_nano
            out[key] = [a + b for a, b in zip(out.get(key, [0] * len(values)), values, strict=True)]
    return out


def expected_totals(records: list[dict[str, Any]]) -> dict[str, tuple[int, float]]:
    """metric → (count, sum) over every inference record, computed from the records themselves."""
    w = [wire.to_wire(r) for r in records if r["kind"] == "inference"]
    ok = [r for r in w if r["ok"]]
    gaps = [g / 1e6 for r in ok for g in _gaps(r)]
    return {
        "gen_ai.client.operation.duration": (
            sum(1 for r in w if r["e2e_us"] is not None),
            sum(r["e2e_us"] / 1e6 for r in w if r["e2e_us"] is not None),
        ),
        "gen_ai.client.operation.time_to_first_chunk": (len(ok), sum(r["ttft_us"] / 1e6 for r in ok)),
        "gen_ai.client.operation.time_per_output_chunk": (len(gaps), sum(gaps)),
        "gen_ai.client.token.usage": (
            len(w) + len(ok),
            float(sum(r["input_tokens"] for r in w) + sum(r["output_tokens"] for r in ok)),
        ),
    }


def _gaps(record: dict[str, Any]) -> list[int]:
    from lens_core.itlpack import unpack_gaps

    return unpack_gaps(record["itl_us"]) if record["itl_us"] else []


def check_metrics(receiver: Receiver, records: list[dict[str, Any]], temporality: str) -> None:
    totals = metric_totals(receiver, temporality)
    want = expected_totals(records)
    for name, (count, total) in want.items():
        got = [v for (metric, _), v in totals.items() if metric == name]
        assert sum(v[0] for v in got) == count, name
        assert sum(v[1] for v in got) == pytest.approx(total, rel=1e-9), name
    errors = {dict(a).get("error.type") for (m, a) in totals if m == "gen_ai.client.token.usage"}
    failed = {r["error_type"] for r in records if r["kind"] == "inference" and not r["ok"]}
    assert failed and failed <= errors  # a failed request's points carry its error.type
    chat = [a for (m, a) in totals if dict(a).get("gen_ai.operation.name") == "chat"]
    assert chat and all(dict(a)["server.address"] == "cloud.example" for a in chat)


@pytest.fixture
async def receiver(aiohttp_server: Any) -> tuple[Receiver, int]:
    r = Receiver()
    server = await aiohttp_server(r.app(), host="127.0.0.1")
    return r, server.port


@pytest.mark.parametrize("temporality", ["cumulative", "delta"])
async def test_every_record_arrives_once_as_spans_and_metrics(
    aiohttp_client: Any, store: Any, receiver: tuple[Receiver, int], temporality: str
) -> None:
    r, port = receiver
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    client = await aiohttp_client(create_app(Settings(otlp=settings(port, temporality=temporality)), store))
    records = mixed_records()
    await ingest(client, token, records[:20])
    await wait_for(lambda: len(r.spans()) > 0)
    await ingest(client, token, records[20:])
    n_traces = len(exported(records))
    await wait_for(lambda: len({s.trace_id for _, s in r.spans()}) == n_traces)
    await wait_for(lambda: stored_status(store)["metrics"]["pending_records"] == 0)
    check_spans(r, records)
    check_metrics(r, records, temporality)
    status = stored_status(store)
    assert status["traces"]["forwarded_records"] == len(records)
    assert status["traces"]["accepted_items"] == len(r.spans())
    metrics_text = await (await client.get("/metrics")).text()
    assert 'llm_latency_lens_otlp_pending_records{signal="traces"} 0.0' in metrics_text
    assert f'llm_latency_lens_otlp_forwarded_records_total{{signal="traces"}} {float(len(records))}' in metrics_text


async def test_backend_down_then_a_portal_then_up_loses_nothing(
    aiohttp_client: Any, store: Any, receiver: tuple[Receiver, int]
) -> None:
    r, port = receiver
    r.mode = "down"
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    # metrics_max_age_s=0: each scrape builds /metrics afresh (the forwarder's state moves between two scrapes)
    client = await aiohttp_client(create_app(Settings(otlp=settings(port), metrics_max_age_s=0.0), store))
    records = mixed_records(60, seed=5)
    await ingest(client, token, records)
    await wait_for(lambda: sum(1 for s, code in r.answers if code == 503) >= 4)
    status = stored_status(store)
    assert status["traces"]["pending_records"] == len(records)
    text = await (await client.get("/metrics")).text()
    assert 'llm_latency_lens_otlp_export_failures_total{reason="http_503",signal="traces"}' in text
    lag = [line for line in text.splitlines() if line.startswith('llm_latency_lens_otlp_lag_seconds{signal="traces"}')]
    assert float(lag[0].split()[-1]) > 0
    r.mode = "portal"  # a 200 that is not an OTLP answer moves nothing
    await wait_for(lambda: sum(1 for s, code in r.answers if code == 200) >= 8)
    status = stored_status(store)
    assert status["traces"]["pending_records"] == status["metrics"]["pending_records"] == len(records)
    assert 'reason="not_otlp"' in await (await client.get("/metrics")).text()
    r.mode = "ok"
    await wait_for(lambda: stored_status(store)["traces"]["pending_records"] == 0)
    await wait_for(lambda: stored_status(store)["metrics"]["pending_records"] == 0)
    check_spans(r, records)
    check_metrics(r, records, "cumulative")


async def test_a_record_the_backend_refuses_is_isolated_and_the_rest_arrives(
    aiohttp_client: Any, store: Any, receiver: tuple[Receiver, int]
) -> None:
    r, port = receiver
    records = mixed_records(50, seed=7)
    poisoned = wire.to_wire(records[30])
    r.refuse_trace_ids = {poisoned["id"]}
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    client = await aiohttp_client(create_app(Settings(otlp=settings(port)), store))
    await ingest(client, token, records)
    await wait_for(lambda: stored_status(store)["traces"]["pending_records"] == 0)
    got = {s.trace_id for _, s in r.spans()}
    assert got == {w["id"] for w in exported(records)} - {poisoned["id"]}
    status = stored_status(store)["traces"]
    assert status["rejected_items"] == len(otlp.record_spans(poisoned))
    text = await (await client.get("/metrics")).text()
    assert f'llm_latency_lens_otlp_rejected_items_total{{signal="traces"}} {float(status["rejected_items"])}' in text


def test_a_restarted_aggregator_resends_nothing(tmp_path: Path) -> None:
    """``lens-aggregator serve`` with the shipped config's [otlp] keys set: forward, stop, restart, more records."""
    asyncio.run(_restart(tmp_path))


async def _restart(tmp_path: Path) -> None:
    from aiohttp import web

    r = Receiver()
    runner = web.AppRunner(r.app())
    await runner.setup()
    otlp_port = free_port()
    await web.TCPSite(runner, "127.0.0.1", otlp_port).start()
    shipped = (Path(__file__).parent.parent / "configs" / "aggregator.toml").read_text()
    headers = tmp_path / "otlp-headers"
    headers.write_text("# the backend's token\nAuthorization=Bearer otlp-secret\n")
    config = tmp_path / "aggregator.toml"
    shipped = shipped.replace('# endpoint = "http://127.0.0.1:4318"', f'endpoint = "http://127.0.0.1:{otlp_port}"')
    shipped = shipped.replace('# headers_file = "/etc/lens-aggregator/otlp-headers"', f'headers_file = "{headers}"')
    assert '\ninterval = "5s"' in shipped
    config.write_text(shipped.replace('\ninterval = "5s"', '\ninterval = "100ms"'))
    assert load_aggregator_config(config, environ={}).get("otlp", "endpoint") == f"http://127.0.0.1:{otlp_port}"
    db = tmp_path / "agg.db"
    port = free_port()
    records = mixed_records(30, seed=11)
    proc = AggregatorProcess(db, port, config=config)
    from aggregator.store import SQLiteStore

    store = SQLiteStore(db)
    token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
    try:
        proc.start()
        async with ClientSession(f"http://127.0.0.1:{port}") as client:
            await ingest(client, token, records[:20])
            await wait_for(lambda: stored_status(store)["traces"]["pending_records"] == 0)
            await wait_for(lambda: stored_status(store)["metrics"]["pending_records"] == 0)
        proc.stop()
        before = len(r.spans())
        proc = AggregatorProcess(db, port, config=config)
        proc.start()
        async with ClientSession(f"http://127.0.0.1:{port}") as client:
            await asyncio.sleep(1.0)  # a restarted forwarder that resent would have done it by now
            assert len(r.spans()) == before
            await ingest(client, token, records[20:])
            await wait_for(lambda: stored_status(store)["traces"]["pending_records"] == 0)
            await wait_for(lambda: stored_status(store)["metrics"]["pending_records"] == 0)
            text = await (await client.get("/metrics")).text()
        assert "llm_latency_lens_otlp_lag_seconds" in text
        check_spans(r, records)
        check_metrics(r, records, "cumulative")  # the totals continued across the restart: nothing counted twice
        assert "otlp-secret" not in proc.stderr_text()
    finally:
        proc.stop()
        store.close()
        await runner.cleanup()


def test_otlp_status_cli(tmp_path: Path) -> None:
    import subprocess
    import sys

    from aggregator.store import SQLiteStore

    db = tmp_path / "agg.db"
    SQLiteStore(db).close()
    out = subprocess.run(
        [sys.executable, "-c", "from aggregator.cli import main; main()", "otlp", "status", "--db", str(db), "--json"],
        capture_output=True,
        text=True,
        check=True,
    )
    status = json.loads(out.stdout)
    assert status["traces"]["cursor_seq"] == 0 and status["metrics"]["pending_records"] == 0


@pytest.mark.parametrize(
    ("status", "content_type", "body", "outcome"),
    [
        (200, "application/x-protobuf", b"", "accepted"),
        (200, "text/html", b"<html>portal</html>", "retry"),
        (200, "application/x-protobuf", b"\xff\xff\xff", "retry"),
        (503, "text/plain", b"busy", "retry"),
        (429, "text/plain", b"slow down", "retry"),
        (401, "text/plain", b"bad token", "retry"),
        (400, "application/x-protobuf", b"\x12\x0bbad span id", "refused"),
        (413, "text/plain", b"too big", "refused"),
    ],
)
def test_answers(status: int, content_type: str, body: bytes, outcome: str) -> None:
    answer = otlp.read_answer("traces", status, content_type, body, "7")
    assert answer.outcome == outcome
    if status == 400:
        assert "bad span id" in answer.message
    if status in (429, 503):
        assert answer.retry_after == 7.0


def test_partial_success_counts_the_rejected() -> None:
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    response = trace_service_pb2.ExportTraceServiceResponse()
    response.partial_success.rejected_spans = 3
    response.partial_success.error_message = "spans too old"
    answer = otlp.read_answer("traces", 200, "application/x-protobuf", response.SerializeToString(), None)
    assert (answer.outcome, answer.rejected, answer.message) == ("accepted", 3, "spans too old")


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ('endpoint = "collector:4318"', "http:// or https://"),
        ('endpoint = "http://c:4318"\nprotocol = "grpc"', "http/protobuf"),
        ('endpoint = "http://c:4318"\nheaders = "Authorization Bearer x"', "name=value"),
        ('endpoint = "http://c:4318"\ntraces = false\nmetrics = false', "traces or metrics"),
        ('endpoint = "http://c:4318"\nheaders_file = "/nonexistent/otlp-headers"', "readable file"),
    ],
)
def test_bad_otlp_settings_name_the_key(tmp_path: Path, text: str, problem: str) -> None:
    import subprocess
    import sys

    config = tmp_path / "aggregator.toml"
    config.write_text(f"[otlp]\n{text}\n")
    out = subprocess.run(
        [sys.executable, "-c", "from aggregator.cli import main; main()", "serve", "--config", str(config),
         "--db", str(tmp_path / "a.db"), "--port", "0"],
        capture_output=True,
        text=True,
        timeout=30,
    )  # fmt: skip
    assert out.returncode != 0
    assert "otlp." in out.stderr and problem in out.stderr, out.stderr
    assert "Traceback" not in out.stderr


@pytest.mark.parametrize(
    "ext",
    [
        {"collab": {"round_us": "not a list", "acceptance_rate": "high", "server_address": 7}},
        {"collab": {"round_us": [[1, 2], [1, 2, 3, 4, "x"], None, [0, -5, 10, 4, 4]], "rounds": 1e308}},
        {"network": {"path": 5, "rtt_ms": float("nan"), "server_port": "443", "model": ["a"]}},
        {"offload": {"decision": {"nested": True}, "predicted_local_ms": [1]}},
        {"energy": {"j_per_output_token": float("inf"), "source": 3}, "clock": {"synchronized": "yes"}},
        {"model_load": {"engine_load_ms": "fast", "deep": {"x": 1}}},
    ],
)
def test_hostile_ext_maps_without_failing(ext: dict[str, Any]) -> None:
    """Stored records carry any JSON in ext: the mapping takes what has the expected type and leaves the rest."""
    record = wire.to_wire(mixed_records(5)[3]) | {"strategy": "speculative", "ext": ext}
    spans = otlp.record_spans(record)
    assert spans[0].name.startswith("text_completion ")
    for span in spans:
        for value in span.attributes.values():
            assert type(value) in (str, int, float, bool, list)
    body, n = otlp.encode_traces([({"service.name": "lens-agent"}, [record])], version="0")
    assert n == len(spans) and body
    load = record | {"kind": "model_load"}
    assert otlp.record_spans(load)[0].name.startswith("model_load")
    acc = otlp.MetricsAccumulator("delta", server_metrics=True)
    body, points, _ = acc.encode([record], {}, now_ns=time.time_ns(), version="0")
    assert points > 0


def test_gaps_outside_every_reads_bounds_feed_no_histogram() -> None:
    """Ingest checks the packed gaps' header only; a gap past one day (or negative after a bad pack) is held out of
    the OTLP histograms as the exports hold the row out (record_schema.check_gaps), while a record's good gaps go."""
    from lens_core.itlpack import pack_gaps

    good = {"itl_us": pack_gaps([1_000, 2_000, 3_000])}
    assert otlp.gaps_s(good) == [0.001, 0.002, 0.003]
    for bad in ([1_000, 2 * 86_400_000_000], [10**12]):  # two days; eleven days alone
        assert otlp.gaps_s({"itl_us": pack_gaps(bad)}) == []
    assert otlp.gaps_s({"itl_us": b"\x09garbage"}) == []  # an unknown packing version
