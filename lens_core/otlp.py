"""Measurements as OpenTelemetry: GenAI spans and metrics, encoded as OTLP/HTTP protobuf, and the exporter's answers.

Both roles export the same way: the aggregator forwards every stored record (``aggregator/otlp_forward.py``), a
standalone agent its outbox (``agent/otlp_sync.py``). Both read records as their wire maps — what the outbox keeps
and the aggregator stores — and build the OTLP messages with ``opentelemetry-proto`` directly, not through the
OpenTelemetry SDK: a record is exported long after it was measured (a device's backlog, a backend's outage), with
the device's own timestamps, identifiers derived from the record id (a resend carries the same trace and span ids)
and an acknowledgement per request that decides when the cursor moves. The SDK stamps metrics with the time of
export, makes its own ids and drops what its queue cannot hold; the encoding cost of both is measured by
``bench/otlp_forward.py`` (docs/PERFORMANCE.md).

The mapping follows the GenAI semantic conventions of semantic-conventions v1.41.0 (status: Development); the names
live in one table, :data:`METRICS`, and docs/opentelemetry.md lists every span, attribute and metric.
"""

from __future__ import annotations

import bisect
import functools
import hashlib
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .guardrail_view import MAX_CHECKS as MAX_GUARDRAIL_CHECKS
from .guardrail_view import GuardrailView, guardrail_view
from .itlpack import PackError, unpack_gaps
from .record_schema import EXT_NUMBERS, INT_RANGES, SchemaError, check_gaps, contended, ext_number, round_entry

SEMCONV_VERSION = "1.41.0"
SCOPE_NAME = "llm-latency-lens"

# The conventions' advised bucket boundaries.
DURATION_BOUNDS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
TOKEN_BOUNDS = tuple(float(4**i) for i in range(14))  # 1, 4, 16, … 67108864
SERVER_TTFT_BOUNDS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0)
SERVER_TPOT_BOUNDS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5)


@dataclass(frozen=True)
class MetricSpec:
    name: str
    unit: str
    description: str
    bounds: tuple[float, ...]
    server: bool = False  # emitted only with otlp.server_metrics


# Every metric the lens emits: name → what it measures, its unit and its buckets.
METRICS: dict[str, MetricSpec] = {
    spec.name: spec
    for spec in (
        MetricSpec(
            "gen_ai.client.operation.duration", "s", "GenAI operation duration (the lens's e2e)", DURATION_BOUNDS
        ),
        MetricSpec(
            "gen_ai.client.operation.time_to_first_chunk",
            "s",
            "Time to the first output token (the lens's TTFT)",
            DURATION_BOUNDS,
        ),
        MetricSpec(
            "gen_ai.client.operation.time_per_output_chunk",
            "s",
            "Each gap between consecutive output tokens (the lens's inter-token latencies)",
            DURATION_BOUNDS,
        ),
        MetricSpec("gen_ai.client.token.usage", "{token}", "Input and output tokens per request", TOKEN_BOUNDS),
        MetricSpec(
            "gen_ai.server.time_to_first_token", "s", "Time to the first token (TTFT)", SERVER_TTFT_BOUNDS, server=True
        ),
        MetricSpec(
            "gen_ai.server.time_per_output_token",
            "s",
            "Time per output token after the first (TPOT), per request",
            SERVER_TPOT_BOUNDS,
            server=True,
        ),
        MetricSpec(
            "gen_ai.server.request.duration", "s", "Request duration (the lens's e2e)", DURATION_BOUNDS, server=True
        ),
    )
}


# -- reading a record defensively --------------------------------------------------------------------------------
def _num(value: Any) -> float | None:
    if type(value) in (int, float) and math.isfinite(value):
        return float(value)
    return None


def _int(value: Any) -> int | None:
    return value if type(value) is int else None


def _str(value: Any) -> str | None:
    return value if type(value) is str else None


def _dict(value: Any) -> dict[str, Any]:
    return value if type(value) is dict else {}


def operation_name(record: Mapping[str, Any]) -> str:
    """``chat`` when the cloud was asked on its chat route, else ``text_completion`` (a prompt completed)."""
    path = _str(_dict(_dict(record.get("ext")).get("network")).get("path")) or ""
    return "chat" if path.endswith("chat/completions") else "text_completion"


def provider_name(record: Mapping[str, Any]) -> str:
    """``gen_ai.provider.name``: ``llama.cpp`` on the device; the cloud's own name when the record carries one."""
    strategy = record.get("strategy") or "local"
    network = _dict(_dict(record.get("ext")).get("network"))
    if strategy == "cloud" or (strategy == "offload" and _offload_target(record) == "cloud"):
        return _str(network.get("provider")) or "openai_compatible"
    return "llama.cpp"


def _offload_target(record: Mapping[str, Any]) -> str | None:
    return _str(_dict(_dict(record.get("ext")).get("offload")).get("decision"))


def _server(record: Mapping[str, Any]) -> tuple[str | None, int | None]:
    ext = _dict(record.get("ext"))
    for section in ("network", "collab"):
        part = _dict(ext.get(section))
        if _str(part.get("server_address")):
            return part["server_address"], _int(part.get("server_port"))
    return None, None


def metric_attributes(record: Mapping[str, Any]) -> tuple[tuple[str, Any], ...]:
    """The attribute set of a record's data points (sorted: one stream per distinct set)."""
    model = _str(record.get("model_name")) or "unknown"
    attrs: dict[str, Any] = {
        "gen_ai.operation.name": operation_name(record),
        "gen_ai.provider.name": provider_name(record),
        "gen_ai.request.model": model,
        "gen_ai.response.model": _str(_dict(_dict(record.get("ext")).get("network")).get("model")) or model,
        "lens.strategy": _str(record.get("strategy")) or "local",
    }
    address, port = _server(record)
    if address is not None:
        attrs["server.address"] = address
        if port is not None:
            attrs["server.port"] = port
    if record.get("ok") is not True:
        attrs["error.type"] = _str(record.get("error_type")) or "_OTHER"
    return tuple(sorted(attrs.items()))


def _field(record: Mapping[str, Any], name: str) -> int | None:
    """A top-level integer field within the range ingest enforces (``record_schema.INT_RANGES``), else None: a row
    stored before a bound existed is read as ingest would read it today."""
    value = record.get(name)
    if type(value) is not int:
        return None
    low, high = INT_RANGES[name]
    return value if low <= value <= high else None


def _seconds(us: Any) -> float | None:
    v = _int(us)
    return None if v is None else v / 1e6


def observations(
    record: Mapping[str, Any], *, server_metrics: bool
) -> list[tuple[str, tuple[tuple[str, Any], ...], list[float]]]:
    """(metric, attributes, values) of one inference record."""
    attrs = metric_attributes(record)
    out: list[tuple[str, tuple[tuple[str, Any], ...], list[float]]] = []
    e2e = _seconds(_field(record, "e2e_us"))
    if e2e is not None:
        out.append(("gen_ai.client.operation.duration", attrs, [e2e]))
    ok = record.get("ok") is True
    ttft = _seconds(_field(record, "ttft_us"))
    if ok and ttft is not None:
        out.append(("gen_ai.client.operation.time_to_first_chunk", attrs, [ttft]))
        gaps = gaps_s(record)
        if gaps:
            out.append(("gen_ai.client.operation.time_per_output_chunk", attrs, gaps))
    for token_type, field in (("input", "input_tokens"), ("output", "output_tokens")):
        n = _field(record, field)
        if n is not None and (n > 0 or ok):
            out.append(("gen_ai.client.token.usage", (*attrs, ("gen_ai.token.type", token_type)), [float(n)]))
    if server_metrics and ok:
        tpot = _seconds(_field(record, "tpot_us"))
        if ttft is not None:
            out.append(("gen_ai.server.time_to_first_token", attrs, [ttft]))
        if tpot is not None:
            out.append(("gen_ai.server.time_per_output_token", attrs, [tpot]))
        if e2e is not None:
            out.append(("gen_ai.server.request.duration", attrs, [e2e]))
    return out


def gaps_s(record: Mapping[str, Any]) -> list[float]:
    """The record's inter-token gaps in seconds (empty when it carries none, they do not unpack, or one is outside
    the bounds every read holds them to: 0 to one day, ``record_schema.check_gaps`` — the exports skip such a row,
    and no histogram takes its gaps)."""
    packed = record.get("itl_us")
    if type(packed) is not bytes or not packed:
        return []
    try:
        gaps = unpack_gaps(packed)
        check_gaps(gaps)
    except (PackError, SchemaError):
        return []
    return [gap / 1e6 for gap in gaps]


# -- traces ------------------------------------------------------------------------------------------------------
def trace_id(record_id: bytes) -> bytes:
    """The record's trace id: its own 16-byte id (a resend carries the same one)."""
    return record_id if len(record_id) == 16 and any(record_id) else hashlib.sha256(record_id).digest()[:16]


def span_id(record_id: bytes, n: int) -> bytes:
    """The ``n``-th span of a record: 8 bytes of sha256(record id ‖ n), never all zero."""
    digest = hashlib.sha256(record_id + n.to_bytes(4, "big")).digest()
    return digest[:8] if any(digest[:8]) else digest[8:16]


@dataclass
class SpanData:
    """One span before encoding (kept plain so the tests read what the mapping decided)."""

    name: str
    kind: str  # internal | client
    start_ns: int
    end_ns: int
    attributes: dict[str, Any]
    parent: int | None = None  # index of the parent in the record's span list
    error: str | None = None  # status message when the span failed
    events: tuple[tuple[str, int, dict[str, Any]], ...] = ()


# the record kinds exported as spans: a blocked request (docs/opentelemetry.md "Guardrails") still shows its trace
SPAN_KINDS = frozenset({"inference", "model_load", "blocked"})
MAX_ROUND_SPANS = 256  # speculative rounds drawn as spans per request (ext.collab.round_us carries at most this)


def record_spans(record: Mapping[str, Any]) -> list[SpanData]:
    """The spans of one inference (or model load) record: the request, then its children.

    Times are the device's: ``started_us`` plus the record's own durations. A child whose duration is unknown is
    left out rather than guessed."""
    kind = record.get("kind")
    start_us = _int(record.get("started_us")) or 0
    start = start_us * 1000
    ext = _dict(record.get("ext"))
    if kind == "model_load":
        load = _dict(ext.get("model_load"))
        # read within the bounds ingest applies (at most one day): a value outside is left out, as a wrong type is
        ms = ext_number(ext, "model_load", "engine_load_ms") or 0.0
        attrs = {"gen_ai.request.model": _str(record.get("model_name")) or "unknown", "lens.record.kind": kind}
        for key, value in load.items():
            if key != "path" and type(value) in (int, float, str, bool):
                attrs[f"lens.model_load.{key}"] = value
        return [
            SpanData(f"model_load {attrs['gen_ai.request.model']}", "internal", start, start + int(ms * 1e6), attrs)
        ]
    strategy = _str(record.get("strategy")) or "local"
    model = _str(record.get("model_name")) or "unknown"
    op = operation_name(record)
    cloud = strategy == "cloud" or (strategy == "offload" and _offload_target(record) == "cloud")
    e2e_us = _field(record, "e2e_us")
    guard = guardrail_view(record)
    request_start = start
    if guard is not None and guard.inference_start_ms is not None:
        # guardrails ran before the inference: started_us is the guarded request's start, the inference's own
        # figures (TTFT, rounds, …) count from its own start, inference_start_ms later
        start += int(guard.inference_start_ms * 1e6)
    end = start + (e2e_us or 0) * 1000
    attrs = span_attributes(record)
    ok = record.get("ok") is True
    error = None if ok else (_str(record.get("error_message")) or _str(record.get("error_type")) or "failed")
    root_end = end
    if kind == "blocked":  # a guardrail blocked it: said on the span even when its ext.guardrails is unreadable
        attrs[f"{GUARDRAIL}.blocked"] = True
    if guard is not None:
        attrs.update(guardrail_request_attributes(guard))
        attrs[f"{GUARDRAIL}.blocked"] = kind == "blocked" or attrs[f"{GUARDRAIL}.blocked"]
        if guard.total_ms is not None:
            root_end = max(end, request_start + int(guard.total_ms * 1e6))
    root = SpanData(f"{op} {model}", "client" if cloud else "internal", request_start, root_end, attrs, error=error)
    spans = [root]
    if guard is not None:
        spans.extend(guardrail_spans(guard, request_start, metric_attributes(record)))
    ttft_us = _field(record, "ttft_us")
    offload = _dict(ext.get("offload"))
    if offload:
        decision = {
            f"lens.offload.{k}": v
            for k in ("decision", "reason", "predicted_local_ms", "predicted_cloud_ms")
            if type(v := offload.get(k)) in (int, float, str)
        }
        spans.append(SpanData("offload_decision", "internal", start, start, decision, parent=0))
    collab = _dict(ext.get("collab"))
    rounds = collab.get("round_us")
    if strategy == "speculative" and type(rounds) is list:
        rtt = ext_number(ext, "network", "rtt_ms") or ext_number(ext, "collab", "rtt_ms")
        for n, entry in enumerate(rounds[:MAX_ROUND_SPANS]):
            checked = round_entry(entry)  # the bounds ingest applies (lens_core.record_schema.ROUND_BOUNDS)
            if checked is None:
                continue
            offset, draft_us, verify_us, drafted, accepted = checked
            r0 = start + offset * 1000
            r1 = r0 + draft_us * 1000
            r2 = r1 + verify_us * 1000
            round_index = len(spans)
            spans.append(
                SpanData(
                    "speculative_round",
                    "internal",
                    r0,
                    r2,
                    {
                        "lens.speculative.round": n,
                        "lens.speculative.drafted": drafted,
                        "lens.speculative.accepted": accepted,
                    },
                    parent=0,
                )
            )
            spans.append(
                SpanData("draft", "internal", r0, r1, {"lens.speculative.drafted": drafted}, parent=round_index)
            )
            verify_index = len(spans)
            spans.append(
                SpanData("verify", "client", r1, r2, {"lens.speculative.accepted": accepted}, parent=round_index)
            )
            if rtt is not None:
                net = min(int(rtt * 1e6), verify_us * 1000)
                spans.append(
                    SpanData(
                        "network",
                        "internal",
                        r1,
                        r1 + net,
                        {"lens.network.source": "TCP connect RTT (an estimate, placed at the start of verify)"},
                        parent=verify_index,
                    )
                )
    elif ok and ttft_us is not None and e2e_us is not None:
        first = start + ttft_us * 1000
        prefill_attrs: dict[str, Any] = {}
        if (n_in := _field(record, "input_tokens")) is not None:
            prefill_attrs["gen_ai.usage.input_tokens"] = n_in
        if (us := _field(record, "engine_prefill_us")) is not None:
            prefill_attrs["lens.engine.prefill_s"] = us / 1e6
        spans.append(SpanData("prefill", "internal", start, first, prefill_attrs, parent=0))
        decode_attrs: dict[str, Any] = {}
        if (n_out := _field(record, "output_tokens")) is not None:
            decode_attrs["gen_ai.usage.output_tokens"] = n_out
        if (us := _field(record, "engine_decode_us")) is not None:
            decode_attrs["lens.engine.decode_s"] = us / 1e6
        spans.append(SpanData("decode", "internal", first, end, decode_attrs, parent=0))
    return spans


GUARDRAIL = "llm_latency_lens.guardrail"  # the prefix of the guardrail attributes (docs/opentelemetry.md)


def guardrail_request_attributes(guard: GuardrailView) -> dict[str, Any]:
    """The request span's guardrail attributes: the set, the outcome, whether and where it was blocked, the
    stages' overhead and share, the highest risk and the violations found."""
    attrs: dict[str, Any] = {
        f"{GUARDRAIL}.set": guard.set,
        f"{GUARDRAIL}.outcome": guard.outcome,
        f"{GUARDRAIL}.blocked": guard.blocked_at is not None or guard.outcome == "blocked",
        f"{GUARDRAIL}.violations.count": len(guard.violations),
    }
    if guard.blocked_at is not None:
        attrs[f"{GUARDRAIL}.blocked_at"] = guard.blocked_at
    for key, value in (
        ("overhead_ms", guard.overhead_ms),
        ("total_ms", guard.total_ms),
        ("remainder_ms", guard.remainder_ms),
        ("impact_percent", guard.impact_percent),
        ("risk_score", guard.risk_score),
    ):
        if value is not None:
            attrs[f"{GUARDRAIL}.{key}"] = value
    if guard.risk_level is not None:
        attrs[f"{GUARDRAIL}.risk_level"] = guard.risk_level
    if guard.violations:
        attrs[f"{GUARDRAIL}.violations.types"] = sorted({v.type for v in guard.violations})
    return attrs


def guardrail_spans(guard: GuardrailView, request_start: int, genai: Iterable[tuple[str, Any]]) -> list[SpanData]:
    """``guardrail.input``, ``guardrail.threat``, ``guardrail.output``: one child of the request span (index 0) per
    stage that ran, at the request's start plus the stage's ``start_ms``, lasting its ``ms`` (a stage without both
    is left out rather than guessed). Each carries the request's GenAI attributes (``genai``, without
    ``error.type``), the stage's risk, whether it blocked, its violations, and its checks as arrays aligned by
    index (at most 16: the interface's bound); ERROR with the stage's error as message when it failed."""
    common = {k: v for k, v in genai if k != "error.type"}
    spans = []
    for stage in guard.stages:
        if stage.start_ms is None or stage.ms is None:
            continue
        found = [v for v in guard.violations if v.stage == stage.stage]
        attrs: dict[str, Any] = {
            **common,
            f"{GUARDRAIL}.set": guard.set,
            f"{GUARDRAIL}.stage": stage.stage,
            f"{GUARDRAIL}.outcome": guard.outcome,
            f"{GUARDRAIL}.blocked": guard.blocked_at == stage.stage,
            f"{GUARDRAIL}.violations.count": len(found),
        }
        if stage.risk_score is not None:
            attrs[f"{GUARDRAIL}.risk_score"] = stage.risk_score
        if found:
            attrs[f"{GUARDRAIL}.violations.types"] = sorted({v.type for v in found})
            attrs[f"{GUARDRAIL}.violations.severities"] = sorted({v.severity for v in found})
        checks = stage.checks[:MAX_GUARDRAIL_CHECKS]
        if checks:
            attrs[f"{GUARDRAIL}.check.names"] = [c.name for c in checks]
            attrs[f"{GUARDRAIL}.check.kinds"] = [c.kind for c in checks]
            attrs[f"{GUARDRAIL}.check.ms"] = [-1.0 if c.ms is None else c.ms for c in checks]
            attrs[f"{GUARDRAIL}.check.errors"] = [c.error is not None for c in checks]
            if any(c.server_ms is not None for c in checks):  # an HTTP guardrail's server said what it spent
                attrs[f"{GUARDRAIL}.check.server_ms"] = [-1.0 if c.server_ms is None else c.server_ms for c in checks]
                attrs[f"{GUARDRAIL}.check.network_ms"] = [
                    -1.0 if c.network_ms is None else c.network_ms for c in checks
                ]
        if stage.mode is not None:
            attrs[f"{GUARDRAIL}.output.mode"] = stage.mode
        for key, value in (
            ("output.chunks", stage.chunks),
            ("output.chunk_ms_p50", stage.chunk_ms_p50),
            ("output.chunk_ms_max", stage.chunk_ms_max),
        ):
            if value is not None:
                attrs[f"{GUARDRAIL}.{key}"] = value
        first = request_start + int(stage.start_ms * 1e6)
        error = stage.error
        if error is None and any(c.error is not None for c in checks):
            error = next(f"check {c.name}: {c.error}" for c in checks if c.error is not None)
        spans.append(
            SpanData(f"guardrail.{stage.stage}", "internal", first, first + int(stage.ms * 1e6), attrs, 0, error)
        )
    return spans


def span_attributes(record: Mapping[str, Any]) -> dict[str, Any]:
    """The request span's attributes: the GenAI ones, then the lens's own figures."""
    attrs: dict[str, Any] = dict(metric_attributes(record))
    ext = _dict(record.get("ext"))
    for key, field in (("gen_ai.usage.input_tokens", "input_tokens"), ("gen_ai.usage.output_tokens", "output_tokens")):
        if (n := _field(record, field)) is not None:
            attrs[key] = n
    stop = _str(record.get("stop_reason"))
    if stop:
        attrs["gen_ai.response.finish_reasons"] = [{"eos": "stop", "max_tokens": "length"}.get(stop, stop)]
    record_id = record.get("id")
    if type(record_id) is bytes:
        attrs["gen_ai.response.id"] = record_id.hex()
    for key, field in (
        ("lens.run.id", "run_id"),
        ("lens.engine", "engine"),
        ("lens.prompt.id", "prompt_id"),
        ("lens.stop_reason", "stop_reason"),
    ):
        if (s := _str(record.get(field))) is not None:
            attrs[key] = s
    for key, field in (("lens.ttft_s", "ttft_us"), ("lens.tpot_s", "tpot_us"), ("lens.e2e_s", "e2e_us")):
        if (v := _seconds(_field(record, field))) is not None:
            attrs[key] = v
    for key, field in (
        ("lens.memory.rss_peak_bytes", "rss_peak_bytes"),
        ("lens.memory.rss_before_bytes", "rss_before_bytes"),
    ):
        if (n := _field(record, field)) is not None:
            attrs[key] = n
    if record.get("first_after_load") is True:
        attrs["lens.first_after_load"] = True
    energy = _dict(ext.get("energy"))
    for key, field in (
        ("lens.energy.j_per_output_token", "j_per_output_token"),
        ("lens.energy.joules", "joules_total"),
        ("lens.energy.average_power_w", "average_power_w"),
    ):
        if (v := _num(energy.get(field))) is not None:
            attrs[key] = v
    if _str(energy.get("source")):
        attrs["lens.energy.source"] = energy["source"]
    collab = _dict(ext.get("collab"))
    for key, field in (
        ("lens.speculative.acceptance_rate", "acceptance_rate"),
        ("lens.speculative.draft_tokens", "draft_tokens"),
        ("lens.speculative.rounds", "rounds"),
        ("lens.speculative.mean_accepted_length", "mean_accepted_length"),
        ("lens.speculative.network_time_s", "network_time_ms"),
    ):
        value = collab.get(field)
        v = ext_number(ext, "collab", field) if ("collab", field) in EXT_NUMBERS else _num(value)
        if v is not None:
            attrs[key] = v / 1000 if field.endswith("_ms") else (value if type(value) is int else v)
    interference = ext.get("interference")
    if type(interference) is dict:  # the device measured what else ran beside the request (docs/wire-format.md)
        busy = contended({"ext": ext})  # as ingest and the store read it: a malformed mark is not one
        attrs["lens.interference.contended"] = busy
        if busy:
            attrs["lens.interference.reasons"] = list(interference["reasons"])
    offload = _dict(ext.get("offload"))
    if _str(offload.get("decision")):
        attrs["lens.offload.decision"] = offload["decision"]
    clock = _dict(ext.get("clock"))
    synced = clock.get("synchronized")
    attrs["lens.clock.synchronized"] = synced if type(synced) is bool else "unknown"
    if (v := _int(clock.get("maxerror_us"))) is not None:
        attrs["lens.clock.maxerror_us"] = v
    if record.get("ok") is not True and _str(record.get("error_type")):
        attrs["error.type"] = record["error_type"]
    return attrs


def resource_attributes(
    device_id: str, facts: Mapping[str, Any] | None, *, version: str, extra: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """A device's resource: the service (the lens on that device), the device id and its latest facts."""
    attrs: dict[str, Any] = {
        "service.name": "lens-agent",
        "service.version": version,
        "service.instance.id": device_id,
        "host.name": device_id,
        "lens.device.id": device_id,
        "telemetry.sdk.name": SCOPE_NAME,
        "telemetry.sdk.language": "python",
    }
    for key, field in (
        ("lens.device.class", "device_class"),
        ("host.type", "model"),
        ("lens.device.accelerator", "accelerator"),
        ("lens.device.power_mode", "power_mode"),
    ):
        if facts and _str(facts.get(field)):
            attrs[key] = facts[field]
    if facts and (v := _num(facts.get("ram_gb"))) is not None:
        attrs["lens.device.ram_gb"] = v
    for key, value in (extra or {}).items():
        attrs[key] = value
    return attrs


# -- encoding ----------------------------------------------------------------------------------------------------
@functools.cache
def _common() -> Any:
    """opentelemetry-proto's common messages (imported once, on first use: the extra is optional)."""
    from opentelemetry.proto.common.v1 import common_pb2

    return common_pb2


def _any_value(value: Any) -> Any:
    common_pb2 = _common()
    if type(value) is bool:
        return common_pb2.AnyValue(bool_value=value)
    if type(value) is int:
        return common_pb2.AnyValue(int_value=value)
    if type(value) is float:
        return common_pb2.AnyValue(double_value=value)
    if type(value) is list:
        return common_pb2.AnyValue(array_value=common_pb2.ArrayValue(values=[_any_value(v) for v in value]))
    return common_pb2.AnyValue(string_value=str(value))


def key_values(attrs: Mapping[str, Any] | Iterable[tuple[str, Any]]) -> list[Any]:
    key_value = _common().KeyValue
    items = attrs.items() if isinstance(attrs, Mapping) else attrs
    return [key_value(key=k, value=_any_value(v)) for k, v in items]


# What encoding one record may raise: protobuf's ValueError/TypeError/OverflowError for a value its field cannot
# hold, or anything else the mapping raises on a map it did not expect. The record is left out, and the caller counts
# and shows it (aggregator: lens_otlp_unencodable_records): one record never holds up the others.
ENCODE_ERRORS = (Exception,)


@dataclass(frozen=True)
class Unencodable:
    """A record the encoder could not turn into OTLP (left out of the request; the caller counts and logs it)."""

    record: Mapping[str, Any]
    reason: str

    def describe(self) -> str:
        rid = self.record.get("id")
        shown = rid.hex() if type(rid) is bytes else repr(rid)
        return f"record {shown} of device {self.record.get('device_id')!r}: {self.reason}"


def encode_traces(
    groups: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], *, version: str
) -> tuple[bytes, int]:
    """An ``ExportTraceServiceRequest``: per (resource attributes, records) group, every record's spans.
    Returns the encoded request and its span count; a record that does not encode raises ValueError naming it
    (:func:`encode_traces_isolated` leaves such a record out instead)."""
    body, count, refused = encode_traces_isolated(groups, version=version)
    if refused:
        raise ValueError(f"{len(refused)} record(s) do not encode as OTLP spans; first: {refused[0].describe()}")
    return body, count


def encode_traces_isolated(
    groups: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], *, version: str
) -> tuple[bytes, int, list[Unencodable]]:
    """:func:`encode_traces`, each record on its own: a record whose spans protobuf refuses (a value its field
    cannot hold) is left out and returned with the reason, and the others are encoded. Returns the encoded
    request, its span count and the records left out."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2
    from opentelemetry.proto.trace.v1 import trace_pb2

    kinds = {"internal": trace_pb2.Span.SPAN_KIND_INTERNAL, "client": trace_pb2.Span.SPAN_KIND_CLIENT}
    scope = common_pb2.InstrumentationScope(name=SCOPE_NAME, version=version)
    request = trace_service_pb2.ExportTraceServiceRequest()
    count = 0
    refused: list[Unencodable] = []
    for resource, records in groups:
        spans = []
        for record in records:
            record_id = record.get("id")
            if type(record_id) is not bytes:
                continue
            try:
                mine = []
                tid = trace_id(record_id)
                datas = record_spans(record)
                ids = [span_id(record_id, n) for n in range(len(datas))]
                for n, data in enumerate(datas):
                    span = trace_pb2.Span(
                        trace_id=tid,
                        span_id=ids[n],
                        parent_span_id=ids[data.parent] if data.parent is not None else b"",
                        name=data.name,
                        kind=kinds[data.kind],
                        start_time_unix_nano=data.start_ns,
                        end_time_unix_nano=max(data.start_ns, data.end_ns),
                        attributes=key_values(data.attributes),
                    )
                    if data.error is not None:
                        span.status.code = trace_pb2.Status.STATUS_CODE_ERROR
                        span.status.message = data.error[:1024]
                    mine.append(span)
            except ENCODE_ERRORS as exc:
                refused.append(Unencodable(record, f"{type(exc).__name__}: {exc}"[:300]))
                continue
            spans.extend(mine)
        if spans:
            count += len(spans)
            request.resource_spans.append(
                trace_pb2.ResourceSpans(
                    resource=resource_pb2.Resource(attributes=key_values(resource)),
                    scope_spans=[trace_pb2.ScopeSpans(scope=scope, spans=spans)],
                    schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}",
                )
            )
    return request.SerializeToString(), count, refused


SEVERITY = {"WARN": 13, "INFO": 9}  # SeverityNumber: SEVERITY_NUMBER_WARN, SEVERITY_NUMBER_INFO


def encode_logs(
    groups: Sequence[tuple[Mapping[str, Any], Sequence[Mapping[str, Any]]]], *, version: str
) -> tuple[bytes, int]:
    """An ``ExportLogsServiceRequest``: per (resource attributes, log records) group, each log record given as a map
    of ``time_ns``, ``severity`` (``WARN``/``INFO``), ``event_name``, ``body`` (text) and ``attributes``. Returns the
    encoded request and its log record count."""
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.common.v1 import common_pb2
    from opentelemetry.proto.logs.v1 import logs_pb2
    from opentelemetry.proto.resource.v1 import resource_pb2

    scope = common_pb2.InstrumentationScope(name=SCOPE_NAME, version=version)
    request = logs_service_pb2.ExportLogsServiceRequest()
    count = 0
    for resource, items in groups:
        logs = [
            logs_pb2.LogRecord(
                time_unix_nano=item["time_ns"],
                observed_time_unix_nano=item["time_ns"],  # the same event is the same log record when resent
                severity_number=SEVERITY[item["severity"]],  # type: ignore[arg-type]
                severity_text=item["severity"],
                event_name=item["event_name"],
                body=common_pb2.AnyValue(string_value=item["body"]),
                attributes=key_values(item["attributes"]),
            )
            for item in items
        ]
        if logs:
            count += len(logs)
            request.resource_logs.append(
                logs_pb2.ResourceLogs(
                    resource=resource_pb2.Resource(attributes=key_values(resource)),
                    scope_logs=[logs_pb2.ScopeLogs(scope=scope, log_records=logs)],
                    schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}",
                )
            )
    return request.SerializeToString(), count


@dataclass
class HistogramState:
    """One stream's histogram: counts per bucket (len(bounds) + 1), sum, count, min, max, and when it started."""

    start_ns: int
    counts: list[int]
    total: float = 0.0
    count: int = 0
    low: float = math.inf
    high: float = -math.inf

    def add(self, values: Sequence[float], bounds: Sequence[float]) -> None:
        if len(values) < 16:  # one value (a duration, a count): numpy's call overhead would dominate
            for v in values:
                self.counts[bisect.bisect_left(bounds, v)] += 1
                self.total += v
                self.low = min(self.low, v)
                self.high = max(self.high, v)
            self.count += len(values)
            return
        import numpy as np

        array = np.asarray(values, dtype=np.float64)
        # bucket i holds (bounds[i-1], bounds[i]]: the first bound not below the value (searchsorted "left")
        counts = np.bincount(np.searchsorted(bounds, array, side="left"), minlength=len(bounds) + 1)
        for i in np.flatnonzero(counts):
            self.counts[int(i)] += int(counts[i])
        self.total += float(array.sum())
        self.low = min(self.low, float(array.min()))
        self.high = max(self.high, float(array.max()))
        self.count += len(array)

    def to_json(self) -> list[Any]:
        return [self.start_ns, self.counts, self.total, self.count, self.low, self.high]

    @classmethod
    def from_json(cls, data: Sequence[Any]) -> HistogramState:
        return cls(
            int(data[0]), [int(c) for c in data[1]], float(data[2]), int(data[3]), float(data[4]), float(data[5])
        )


StreamKey = tuple[str, str, tuple[tuple[str, Any], ...]]  # (device, metric, attributes)


class MetricsAccumulator:
    """The GenAI histograms of the records exported, per device × metric × attribute set.

    ``delta``: each export carries what the records since the previous export added, over [previous export, now].
    ``cumulative``: each export carries every touched stream's totals since the stream's first record was exported;
    the totals are kept (``state()``/``load()``) with the cursor, so a restart continues them rather than resetting.
    Points are stamped with the export's time, not the records' (backends refuse samples out of order; a device's
    day-old backlog would be refused) — the device's timestamps are on the spans."""

    def __init__(self, temporality: str, *, server_metrics: bool) -> None:
        self.temporality = temporality
        self.server_metrics = server_metrics
        self.totals: dict[StreamKey, HistogramState] = {}
        self.last_export_ns: int | None = None

    def load(self, state: Mapping[str, Any] | None) -> None:
        if not state:
            return
        self.last_export_ns = state.get("last_export_ns")
        for entry in state.get("streams", []):
            device, metric, attrs, hist = entry
            key = (device, metric, tuple((k, v) for k, v in attrs))
            self.totals[key] = HistogramState.from_json(hist)

    def state(self) -> dict[str, Any]:
        streams = (
            [[d, m, [list(a) for a in attrs], h.to_json()] for (d, m, attrs), h in self.totals.items()]
            if self.temporality == "cumulative"
            else []
        )
        return {"last_export_ns": self.last_export_ns, "streams": streams}

    def encode(
        self,
        records: Iterable[Mapping[str, Any]],
        resources: Mapping[str, Mapping[str, Any]],
        *,
        now_ns: int,
        version: str,
    ) -> tuple[bytes, int, dict[str, Any]]:
        """The ``ExportMetricsServiceRequest`` for ``records`` (inference records only), its data point count, and
        the state to keep once the backend accepted it (this object is unchanged until :meth:`commit`). A record
        whose observations are not finite numbers, or whose attributes protobuf refuses, is left out and listed in
        the state's ``"refused"`` (:class:`Unencodable`)."""
        from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
        from opentelemetry.proto.common.v1 import common_pb2
        from opentelemetry.proto.metrics.v1 import metrics_pb2
        from opentelemetry.proto.resource.v1 import resource_pb2

        start_default = self.last_export_ns if self.last_export_ns is not None else now_ns
        batch: dict[StreamKey, HistogramState] = {}
        refused: list[Unencodable] = []
        checked: set[tuple[tuple[str, Any], ...]] = set()
        for record in records:
            if record.get("kind") != "inference":
                continue
            device = _str(record.get("device_id")) or "unknown"
            try:
                found = observations(record, server_metrics=self.server_metrics)
                for _, attrs, values in found:
                    if not all(math.isfinite(v) for v in values):
                        raise ValueError("an observation is not a finite number")
                    if attrs not in checked:  # what protobuf would refuse in the request, refused for this record
                        key_values(attrs)
                        checked.add(attrs)
            except ENCODE_ERRORS as exc:
                refused.append(Unencodable(record, f"{type(exc).__name__}: {exc}"[:300]))
                continue
            for metric, attrs, values in found:
                key = (device, metric, attrs)
                if key not in batch:
                    base = self.totals.get(key) if self.temporality == "cumulative" else None
                    batch[key] = (
                        HistogramState.from_json(base.to_json())
                        if base
                        else HistogramState(
                            start_default if self.temporality == "delta" else now_ns,
                            [0] * (len(METRICS[metric].bounds) + 1),
                        )
                    )
                batch[key].add(values, METRICS[metric].bounds)
        temporality = (
            metrics_pb2.AGGREGATION_TEMPORALITY_CUMULATIVE
            if self.temporality == "cumulative"
            else metrics_pb2.AGGREGATION_TEMPORALITY_DELTA
        )
        by_device: dict[str, dict[str, list[tuple[tuple[tuple[str, Any], ...], HistogramState]]]] = {}
        for (device, metric, attrs), hist in batch.items():
            by_device.setdefault(device, {}).setdefault(metric, []).append((attrs, hist))
        scope = common_pb2.InstrumentationScope(name=SCOPE_NAME, version=version)
        request = metrics_service_pb2.ExportMetricsServiceRequest()
        points = 0
        for device in sorted(by_device):
            metrics = []
            for metric, streams in sorted(by_device[device].items()):
                spec = METRICS[metric]
                data_points = []
                for attrs, hist in streams:
                    point = metrics_pb2.HistogramDataPoint(
                        attributes=key_values(attrs),
                        start_time_unix_nano=hist.start_ns,
                        time_unix_nano=now_ns,
                        count=hist.count,
                        sum=hist.total,
                        bucket_counts=hist.counts,
                        explicit_bounds=spec.bounds,
                    )
                    if hist.count:
                        point.min, point.max = hist.low, hist.high
                    data_points.append(point)
                points += len(data_points)
                metrics.append(
                    metrics_pb2.Metric(
                        name=spec.name,
                        unit=spec.unit,
                        description=spec.description,
                        histogram=metrics_pb2.Histogram(data_points=data_points, aggregation_temporality=temporality),
                    )
                )
            resource = resources.get(device) or {"service.name": "lens-agent", "lens.device.id": device}
            request.resource_metrics.append(
                metrics_pb2.ResourceMetrics(
                    resource=resource_pb2.Resource(attributes=key_values(resource)),
                    scope_metrics=[metrics_pb2.ScopeMetrics(scope=scope, metrics=metrics)],
                    schema_url=f"https://opentelemetry.io/schemas/{SEMCONV_VERSION}",
                )
            )
        pending = {"batch": batch, "now_ns": now_ns, "refused": refused}
        return request.SerializeToString(), points, pending

    def commit(self, pending: Mapping[str, Any]) -> None:
        """The backend accepted the request :meth:`encode` returned ``pending`` for: keep its totals."""
        if self.temporality == "cumulative":
            self.totals.update(pending["batch"])
        self.last_export_ns = pending["now_ns"]


# -- the backend's answer ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExportAnswer:
    """What an export request's answer means. ``outcome``: ``accepted`` (``rejected`` items the backend refused,
    ``message`` its reason), ``retry`` (nothing delivered: try again later, after ``retry_after`` when the backend
    said), ``refused`` (the backend will not take this request as it is: split it, or skip a single record)."""

    outcome: str
    status: int | None
    message: str
    rejected: int = 0
    retry_after: float | None = None


PROTOBUF = "application/x-protobuf"


def read_answer(signal: str, status: int, content_type: str, body: bytes, retry_after: str | None) -> ExportAnswer:
    """Judge an OTLP/HTTP answer. A ``200`` counts only when it is an OTLP response: ``application/x-protobuf`` that
    decodes as the signal's ``Export…ServiceResponse`` (a captive portal's or proxy's ``200`` page is not)."""
    from google.protobuf.message import DecodeError  # type: ignore[import-untyped,unused-ignore]
    from opentelemetry.proto.collector.logs.v1 import logs_service_pb2
    from opentelemetry.proto.collector.metrics.v1 import metrics_service_pb2
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2

    delay = _retry_after(retry_after)
    if 200 <= status < 300:
        if content_type != PROTOBUF:
            return ExportAnswer(
                "retry",
                status,
                f"HTTP {status} with Content-Type {content_type or 'none'!r} is not an OTLP answer "
                f"(expected {PROTOBUF}): nothing counted as delivered",
            )
        response: Any = {
            "traces": trace_service_pb2.ExportTraceServiceResponse,
            "logs": logs_service_pb2.ExportLogsServiceResponse,
        }.get(signal, metrics_service_pb2.ExportMetricsServiceResponse)()
        try:
            response.ParseFromString(body)
        except DecodeError:
            return ExportAnswer("retry", status, f"HTTP {status}: the body is not an OTLP {signal} response")
        partial = response.partial_success
        rejected = int(
            partial.rejected_spans
            if signal == "traces"
            else partial.rejected_log_records
            if signal == "logs"
            else partial.rejected_data_points
        )
        # never negative (an int64 on the wire); the caller clamps it to what it sent
        return ExportAnswer("accepted", status, partial.error_message[:300], rejected=max(0, rejected))
    snippet = _status_message(body, content_type)
    if status in (429, 502, 503, 504) or status >= 500:
        return ExportAnswer("retry", status, f"HTTP {status} from the backend{snippet}", retry_after=delay)
    if status in (400, 413):
        return ExportAnswer("refused", status, f"HTTP {status}: the backend refused the request{snippet}")
    # 401, 403, 404, 415, …: a setting to fix (token, path, protocol); nothing is skipped meanwhile
    return ExportAnswer("retry", status, f"HTTP {status} from the backend (check otlp.endpoint and headers){snippet}")


def _retry_after(value: str | None) -> float | None:
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if math.isfinite(seconds) and 0 <= seconds <= 3600 else None


def _status_message(body: bytes, content_type: str) -> str:
    """The backend's reason: a ``google.rpc.Status`` message (field 2) when it sent one, else a text body's start."""
    if content_type == PROTOBUF:
        message = _protobuf_string_field(body[:4096], 2)
        return f": {message[:200]!r}" if message else ""
    text = body[:200].decode("utf-8", "replace").strip()
    return f": {text!r}" if text else ""


def _protobuf_string_field(data: bytes, number: int) -> str | None:
    """A top-level length-delimited field of a protobuf message, decoded as UTF-8 (None when absent or malformed)."""
    pos = 0

    def varint() -> int:
        nonlocal pos
        shift = result = 0
        while pos < len(data) and shift < 64:
            byte = data[pos]
            pos += 1
            result |= (byte & 0x7F) << shift
            if not byte & 0x80:
                return result
            shift += 7
        raise ValueError("truncated varint")

    try:
        while pos < len(data):
            tag = varint()
            wire_type = tag & 7
            if wire_type == 0:
                varint()
            elif wire_type == 2:
                length = varint()
                chunk = data[pos : pos + length]
                pos += length
                if tag >> 3 == number:
                    return chunk.decode("utf-8", "replace")
            elif wire_type in (1, 5):
                pos += 8 if wire_type == 1 else 4
            else:
                return None
    except ValueError:
        return None
    return None


MAX_EXPORT_ANSWER_BYTES = 1 << 20  # an Export…ServiceResponse is a few bytes; its error message at most a page


async def post_export(
    session: Any, url: str, signal: str, body: bytes, headers: Mapping[str, str], timeout: float
) -> ExportAnswer:
    """POST one export request; a network failure or a timeout is ``retry`` (nothing was delivered)."""
    import asyncio

    import aiohttp

    try:
        async with session.post(
            url,
            data=body,
            headers={**headers, "Content-Type": PROTOBUF},
            allow_redirects=False,
            timeout=aiohttp.ClientTimeout(total=timeout),
        ) as response:
            # the whole answer up to MAX_EXPORT_ANSWER_BYTES, however many reads it takes (an answer in several TCP
            # segments or chunks is still the backend's answer); a larger one is read no further
            content = bytearray()
            while len(content) <= MAX_EXPORT_ANSWER_BYTES:
                chunk = await response.content.read(MAX_EXPORT_ANSWER_BYTES + 1 - len(content))
                if not chunk:
                    break
                content += chunk
            if len(content) > MAX_EXPORT_ANSWER_BYTES:
                response.close()
                return ExportAnswer(
                    "retry", response.status, f"the answer is larger than {MAX_EXPORT_ANSWER_BYTES} bytes: not OTLP's"
                )
            return read_answer(
                signal, response.status, response.content_type, bytes(content), response.headers.get("Retry-After")
            )
    except asyncio.TimeoutError:
        return ExportAnswer("retry", None, f"no answer from {url} within {timeout:g} s")
    except (aiohttp.ClientError, OSError) as exc:
        return ExportAnswer("retry", None, f"{url}: {type(exc).__name__}: {exc}"[:300])
