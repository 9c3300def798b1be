"""The protobuf definitions (llm_latency_lens.v1): the specification's field numbers, the generated code against
Debian's protoc, and record → InferenceMeasurement → record for every record kind, hostile values included."""

from __future__ import annotations

import copy
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.facts import device_facts, facts_record
from agent.measurement import Measurement
from agent.probes.sysfs import Root
from agent.synthetic import synthetic_records
from lens_core import protobuf as P
from lens_core import record_schema, wire
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb
from tests.guardrail_records import block, fail, guard
from tests.sysfs_trees import orin_jp6

ROOT = Path(__file__).resolve().parents[1]
PROTO_DIR = ROOT / "lens_core" / "proto"
GENERATED = ("measurement_pb2.py", "measurement_pb2.pyi")
PROTOC_VERSION = "libprotoc 3.21.12"  # Debian 12's protobuf-compiler: what generated the checked-in module

# The specification's §6.2, as written there: message → field → (number, type name). Never edited: the numbers are
# the format's contract with every reader built from the specification.
SEED_FIELDS: dict[str, dict[str, tuple[int, str]]] = {
    "InferenceMeasurement": {
        "measurement_id": (1, "string"),
        "timestamp": (2, ".google.protobuf.Timestamp"),
        "model_info": (3, ".llm_latency_lens.v1.ModelInfo"),
        "latency": (4, ".llm_latency_lens.v1.LatencyMetrics"),
        "tokens": (5, ".llm_latency_lens.v1.TokenMetrics"),
        "resources": (6, ".llm_latency_lens.v1.ResourceMetrics"),
    },
    "ModelInfo": {
        "name": (1, "string"),
        "provider": (2, "string"),
        "endpoint": (3, "string"),
        "version": (4, "string"),
        "quantization": (5, ".llm_latency_lens.v1.Quantization"),
    },
    "LatencyMetrics": {
        "time_to_first_token": (1, ".google.protobuf.Duration"),
        "time_per_output_token": (2, ".google.protobuf.Duration"),
        "end_to_end_latency": (3, ".google.protobuf.Duration"),
        "prefill_time": (4, ".google.protobuf.Duration"),
        "decode_time": (5, ".google.protobuf.Duration"),
    },
    "TokenMetrics": {"input_tokens": (1, "uint32"), "output_tokens": (2, "uint32"), "tokens_per_second": (3, "double")},
    "ResourceMetrics": {
        "gpu_utilization_percent": (1, "double"),
        "memory_utilization_percent": (2, "double"),
        "kv_cache_utilization_percent": (3, "double"),
        "power_consumption_watts": (4, "double"),
    },
    "BenchmarkResults": {
        "benchmark_id": (1, "string"),
        "timestamp": (2, ".google.protobuf.Timestamp"),
        "config": (3, ".llm_latency_lens.v1.BenchmarkConfiguration"),
        "measurements": (4, ".llm_latency_lens.v1.InferenceMeasurement"),
        "aggregated": (5, ".llm_latency_lens.v1.AggregatedMetrics"),
    },
    "AggregatedMetrics": {
        "ttft_distribution": (1, ".llm_latency_lens.v1.LatencyDistribution"),
        "tpot_distribution": (2, ".llm_latency_lens.v1.LatencyDistribution"),
        "e2e_distribution": (3, ".llm_latency_lens.v1.LatencyDistribution"),
        "throughput": (4, ".llm_latency_lens.v1.ThroughputMetrics"),
        "errors": (5, ".llm_latency_lens.v1.ErrorMetrics"),
    },
    "LatencyDistribution": {
        **{
            name: (n, "double")
            for n, name in enumerate(
                ("mean_ms", "median_ms", "p50_ms", "p90_ms", "p95_ms", "p99_ms", "p999_ms", "min_ms", "max_ms"), 1
            )
        },
        "stddev_ms": (10, "double"),
        "sample_count": (11, "uint64"),
    },
    "ThroughputMetrics": {
        "requests_per_second": (1, "double"),
        "tokens_per_second": (2, "double"),
        "tokens_per_second_per_gpu": (3, "double"),
    },
    "ErrorMetrics": {
        "total_errors": (1, "uint64"),
        "error_rate": (2, "double"),
        "errors_by_type": (3, ".llm_latency_lens.v1.ErrorMetrics.ErrorsByTypeEntry"),
    },
    "BenchmarkConfiguration": {
        "model": (1, ".llm_latency_lens.v1.ModelInfo"),
        "hardware": (2, ".llm_latency_lens.v1.HardwareConfig"),
        "test_params": (3, ".llm_latency_lens.v1.TestParameters"),
    },
    "HardwareConfig": {
        "gpu_type": (1, "string"),
        "gpu_count": (2, "uint32"),
        "cpu_cores": (3, "uint32"),
        "memory_gb": (4, "double"),
        "batch_size": (5, "uint32"),
    },
    "TestParameters": {
        "input_tokens": (1, ".llm_latency_lens.v1.TokenDistribution"),
        "output_tokens": (2, ".llm_latency_lens.v1.TokenDistribution"),
        "concurrency_levels": (3, "uint32"),
        "warmup_requests": (4, "uint32"),
        "total_requests": (5, "uint32"),
    },
    "TokenDistribution": {
        "mean": (1, "uint32"),
        "stddev": (2, "uint32"),
        "distribution": (3, ".llm_latency_lens.v1.DistributionType"),
    },
}
SEED_REPEATED = {("BenchmarkResults", "measurements"), ("TestParameters", "concurrency_levels")}
SEED_ENUMS = {
    "Quantization": {
        "QUANTIZATION_UNSPECIFIED": 0,
        "QUANTIZATION_NONE": 1,
        "QUANTIZATION_INT8": 2,
        "QUANTIZATION_INT4": 3,
        "QUANTIZATION_FP16": 4,
        "QUANTIZATION_BF16": 5,
    },
    "DistributionType": {
        "DISTRIBUTION_TYPE_UNSPECIFIED": 0,
        "DISTRIBUTION_TYPE_NORMAL": 1,
        "DISTRIBUTION_TYPE_UNIFORM": 2,
        "DISTRIBUTION_TYPE_FIXED": 3,
    },
}


def _type_name(field: Any) -> str:
    from google.protobuf.descriptor import FieldDescriptor

    if field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM):
        return "." + (field.message_type or field.enum_type).full_name
    names = {FieldDescriptor.TYPE_STRING: "string", FieldDescriptor.TYPE_DOUBLE: "double"}
    names |= {FieldDescriptor.TYPE_UINT32: "uint32", FieldDescriptor.TYPE_UINT64: "uint64"}
    return names.get(field.type, str(field.type))


def test_the_specifications_field_numbers_and_types_are_unchanged() -> None:
    """Every field of §6.2's messages keeps its number, its type and its cardinality; the added fields number from
    16 up in those messages; the enums keep their values."""
    file = pb.DESCRIPTOR
    assert file.package == "llm_latency_lens.v1"
    assert file.name == P.PROTO_FILE
    for message, fields in SEED_FIELDS.items():
        descriptor = file.message_types_by_name[message]
        for name, (number, type_name) in fields.items():
            field = descriptor.fields_by_name[name]
            assert (field.number, _type_name(field)) == (number, type_name), f"{message}.{name}"
            repeated = (message, name) in SEED_REPEATED or name == "errors_by_type"
            assert field.is_repeated == repeated, f"{message}.{name}"
        for field in descriptor.fields:
            if field.name not in fields:
                assert field.number >= 16, f"{message}.{field.name} = {field.number}: added fields number from 16 up"
    for enum, values in SEED_ENUMS.items():
        descriptor = file.enum_types_by_name[enum]
        assert {v.name: v.number for v in descriptor.values} == values


def test_the_checked_in_module_is_what_protoc_generates(tmp_path: Path) -> None:
    """`make proto`'s command run into a temporary directory gives the checked-in files byte for byte."""
    protoc = shutil.which("protoc")
    assert protoc, "protoc is missing: `make sysdeps` installs Debian's protobuf-compiler and libprotobuf-dev"
    version = subprocess.run([protoc, "--version"], capture_output=True, text=True, timeout=60).stdout.strip()
    assert version == PROTOC_VERSION, f"{version}: the checked-in module comes from {PROTOC_VERSION} (Debian 12)"
    done = subprocess.run(
        [protoc, f"--proto_path={PROTO_DIR}", f"--python_out={tmp_path}", f"--pyi_out={tmp_path}", P.PROTO_FILE],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    for name in GENERATED:
        fresh = (tmp_path / "llm_latency_lens" / "v1" / name).read_bytes()
        checked_in = (PROTO_DIR / "llm_latency_lens" / "v1" / name).read_bytes()
        assert fresh == checked_in, f"{name} differs from protoc's output: run `make proto` and commit the result"


# -- every record kind -----------------------------------------------------------------------------------------


def _measurement(**fields: Any) -> dict[str, Any]:
    base: dict[str, Any] = {"run_id": "run-1", "device_id": "orin-017", "model_name": "SmolLM2", "model_sha256": None}
    return Measurement(**{**base, **fields}).to_dict()


def _speculative() -> dict[str, Any]:
    record = _measurement(strategy="speculative", ttft_ms=41.2, tpot_ms=9.25, e2e_ms=300.5, itl_ms=[9.1, 9.4, 9.25])
    record["output_text"] = "a drafted answer"
    record["ext"] = {
        "collab": {
            "strategy": "speculative",
            "protocol": "tokens",
            "protocol_reason": None,
            "draft_tokens": 4,
            "adaptive": False,
            "rounds": 2,
            "drafted": 8,
            "accepted": 6,
            "acceptance_rate": 0.75,
            "mean_accepted_length": 4.0,
            "edge_time_ms": 80.5,
            "cloud_time_ms": 150.25,
            "verify_time_ms": 170.0,
            "network_time_ms": None,
            "rtt_ms": None,
            "network_time_source": "RTT unknown",
            "collaboration_overhead_ms": 1.5,
            "total_duration_ms": 300.5,
            "tokens_per_second": 13.3,
            "bytes_up": 1200,
            "bytes_down": 800,
            "bytes_per_committed_token": 250.0,
            "round_us": [[0, 40000, 85000, 4, 3], [125000, 40500, 85000, 4, 3]],
            "rounds_kept": 2,
            "server_address": "verifier.example",
        },
        "network": {"provider": "llama.cpp", "rtt_ms": 0.4, "server_address": "verifier.example", "server_port": 8080},
        "settings": {"n_threads": 4, "draft_tokens": 4},
        "clock": {"synchronized": True, "offset_us": -12, "maxerror_us": 16000},
    }
    return record


def _energy() -> dict[str, Any]:
    record = _measurement(ttft_ms=20.0, tpot_ms=5.5, e2e_ms=100.0, itl_ms=[5.5] * 4, output_tokens=5, input_tokens=9)
    record["ext"] = {
        "energy": {
            "source": "jetson",
            "rate_hz": 10.0,
            "samples": 12,
            "joules_total": 1.25,
            "joules_net": 0.5,
            "prefill_joules": 0.125,
            "decode_joules": 0.375,
            "j_per_prompt_token": 0.0138,
            "j_per_output_token": 0.09375,
            "rails": {"VDD_IN": {"avg_w": 12.5, "peak_w": 14.0}},
            "baseline_w": {"VDD_IN": 7.5},
            "unavailable": {"prefill": "too short"},
        },
        "interference": {"contended": True, "reasons": ["cpu"], "other_cpu_cores": 1.6, "summary": "busy"},
    }
    return record


def _facts(tmp_path: Path) -> dict[str, Any]:
    orin_jp6(tmp_path)
    facts = device_facts(Root(str(tmp_path)), tags=["lab", "rack-2"])
    return facts_record(facts, "start", device_id="orin-017", model_name="SmolLM2", model_sha256="ab" * 32).to_dict()


def _kinds(tmp_path: Path) -> dict[str, dict[str, Any]]:
    synthetic = synthetic_records(120, seed=3)
    failed = next(r for r in synthetic if not r["ok"])
    return {
        "inference": synthetic[0],
        "inference_failed": failed,
        "inference_guarded": guard(copy.deepcopy(synthetic[1])),
        "blocked": block(copy.deepcopy(synthetic[2])),
        "guardrail_error": fail(copy.deepcopy(synthetic[3])),
        "warmup": _measurement(kind="warmup", warmup=True, ttft_ms=30.0, e2e_ms=30.0, output_tokens=1, itl_ms=[]),
        "speculative": _speculative(),
        "energy": _energy(),
        "model_load": _measurement(
            kind="model_load", ext={"model_load": {"engine_load_ms": 812.5, "path": "/m.gguf", "n_threads": 4}}
        ),
        "device_facts": _facts(tmp_path),
        "skip": _measurement(kind="skip", ok=False, error_type="skipped", ext={"workload": "nightly"}),
        "tune": _measurement(kind="tune", ext={"tune": {"trial": 3, "settings": {"n_batch": 256}}}),
        "campaign_level": _measurement(kind="campaign_level", ext={"campaign": {"benchmark_id": "b-1", "level": 2}}),
        "unknown_top_level": {**_measurement(), "future_field": {"x": [1, 2.5, None, "y", True]}},
    }


def expected(record: dict[str, Any]) -> dict[str, Any]:
    """What a record reads back as: the wire's own round trip (microseconds), every named field present."""
    wire_record = wire.to_wire(record, include_text=True)
    for name in P.NAMED_FIELDS - {"prompt_text", "output_text"}:
        wire_record.setdefault(name, None)
    if wire_record["ext"] is None:
        wire_record["ext"] = {}
    return wire.from_wire(wire_record)


def test_every_record_kind_round_trips_exactly(tmp_path: Path) -> None:
    """record → InferenceMeasurement → bytes → message → record: the same values and the same JSON types (an
    integer stays an integer in ext), for every kind the agent writes."""
    kinds = _kinds(tmp_path)
    for name, record in kinds.items():
        message = P.record_to_message(record)
        parsed = pb.InferenceMeasurement.FromString(message.SerializeToString(deterministic=True))
        back = P.message_to_record(parsed)
        want = expected(record)
        assert back == want, name
        assert json.dumps(back, sort_keys=True) == json.dumps(want, sort_keys=True), name
    # the typed sections carry the figures, the rest stays in `other` / ext
    spec = P.record_to_message(kinds["speculative"])
    assert spec.collaboration.acceptance_rate == 0.75
    assert [r.accepted for r in spec.collaboration.rounds_us] == [3, 3]
    assert "protocol_reason" in spec.collaboration.other and "round_us" not in spec.collaboration.other
    assert spec.model_info.provider == "llama.cpp" and not spec.model_info.HasField("sha256")
    energy = P.record_to_message(kinds["energy"])
    assert energy.resources.energy.j_per_output_token == 0.09375
    assert energy.resources.power_consumption_watts == pytest.approx(12.5)  # 1.25 J over 100 ms
    assert energy.tokens.tokens_per_second == pytest.approx(50.0)
    facts = P.record_to_message(kinds["device_facts"])
    assert facts.device_facts.device_class and list(facts.device_facts.tags) == ["lab", "rack-2"]
    gaps = P.record_to_message(kinds["inference"]).latency.inter_token_gaps.gaps_us
    assert list(gaps) == [round(g * 1000) for g in kinds["inference"]["itl_ms"]]


def test_null_and_empty_stay_apart() -> None:
    """An unknown count (null) is not zero; no gaps (an empty list) are not unknown gaps (null)."""
    record = _measurement(input_tokens=None, output_tokens=0, itl_ms=[])
    back = P.message_to_record(P.record_to_message(record))
    assert back["input_tokens"] is None and back["output_tokens"] == 0 and back["itl_ms"] == []
    wire_record = {**wire.to_wire(record), "itl_us": None}
    assert P.message_to_wire(P.wire_to_message(wire_record))["itl_us"] is None


def test_an_integer_in_a_typed_double_field_reads_back_as_the_same_number() -> None:
    record = _energy()
    record["ext"]["energy"]["joules_total"] = 2  # an integer where the agent writes a float
    record["ext"]["energy"]["samples"] = 12.5  # a float where the field is an integer: kept in `other`, exactly
    message = P.record_to_message(record)
    assert message.resources.energy.joules_total == 2.0
    assert message.resources.energy.other["samples"].double_value == 12.5
    back = P.message_to_record(message)
    assert back["ext"]["energy"]["joules_total"] == 2 and back["ext"]["energy"]["samples"] == 12.5


def test_the_bounds_round_trip() -> None:
    """Every value at the edge of what ingest accepts comes back unchanged."""
    record = _measurement(
        device_id="d" * record_schema.MAX_NAME_CHARS,
        model_name="模型 ✓ " + "m" * 200,
        error_message="line one\nline two " + "x" * 4000,
        ttft_ms=record_schema.MAX_DURATION_US / 1000,
        e2e_ms=0.0,
        input_tokens=record_schema.MAX_COUNT,
        output_tokens=record_schema.MAX_COUNT,
        rss_peak_bytes=record_schema.MAX_AMOUNT,
        started_at="2020-01-01T00:00:00.000000Z",
        itl_ms=[0.0, 0.001, 86_400_000.0],
        ext={"big": 2**63 - 1, "small": -(2**63), "tiny": 5e-324, "nested": [[[["deep"]]]], "empty": {}, "": ""},
    )
    back = P.message_to_record(P.record_to_message(record))
    assert back == expected(record)
    assert type(back["ext"]["big"]) is int and back["ext"]["tiny"] == 5e-324


@pytest.mark.parametrize(
    ("change", "field"),
    [
        ({"ttft_ms": 86_400_000.001}, "ttft_us"),
        ({"input_tokens": -1}, "input_tokens"),
        ({"output_tokens": 2**31}, "output_tokens"),
        ({"device_id": "orin\x1b[31m"}, "device_id"),
        ({"model_name": "smol\u202elm"}, "model_name"),
        ({"device_id": "d" * 257}, "device_id"),
        ({"started_at": "2019-12-31T23:59:59Z"}, "started_us"),
        ({"ext": {"x": 2**63}}, "ext.x"),
        ({"ext": {"x": float("nan")}}, "ext.x"),
        ({"ext": {"a": {"b": {"c": {"d": {"e": {"f": {"g": {"h": 1}}}}}}}}}, "ext.a.b.c.d.e.f.g"),
        ({"ext": {"energy": {"j_per_output_token": float("inf")}}}, "ext.energy.j_per_output_token"),
        ({"ext": {"device": {"ram_gb": -4.0}}, "kind": "device_facts"}, "ext.device.ram_gb"),
        ({"ext": {"collab": {"round_us": [[0, 1, 2, 3, -1]]}}}, "ext.collab.round_us[0]"),
        ({"ext": {"interference": {"contended": True, "reasons": []}}}, "ext.interference.contended"),
        ({"error_message": "e" * 4097}, "error_message"),
        ({"error_message": "lone \udc80 surrogate"}, "error_message"),
        ({"ext": {"k": ["a", {"b": "x\ud800"}]}}, "ext.k[1].b"),
        ({"ext": {"\udc80": 1}}, "ext.\\udc80"),
    ],
)
def test_a_record_outside_ingests_bounds_is_refused_naming_the_field(change: dict[str, Any], field: str) -> None:
    """Encoding holds a record to the bounds ingest holds it to: a clear refusal, never a truncated message."""
    record = {**_measurement(ttft_ms=10.0, e2e_ms=20.0, itl_ms=[1.0]), **change}
    with pytest.raises(P.ProtobufError) as refused:
        P.record_to_message(record)
    assert refused.value.field == field
    assert repr(field) in str(refused.value)


def _message(**fields: Any) -> pb.InferenceMeasurement:
    message = P.record_to_message(_measurement(ttft_ms=10.0, e2e_ms=20.0, itl_ms=[1.0]))
    for name, value in fields.items():
        setattr(message, name, value)
    return message


def _nested(depth: int) -> pb.Value:
    value = pb.Value(string_value="leaf")
    for _ in range(depth):
        outer = pb.Value()
        outer.list_value.values.append(value)
        value = outer
    return value


def test_a_hostile_message_is_refused_naming_the_field() -> None:
    """A message from elsewhere is held to the same bounds before it becomes a record."""
    cases: list[tuple[pb.InferenceMeasurement, str]] = []
    cases.append((_message(measurement_id="not-a-uuid"), "measurement_id"))
    message = _message()
    message.timestamp.nanos += 1  # below a microsecond
    cases.append((message, "timestamp"))
    message = _message()
    message.latency.time_to_first_token.seconds = -5
    cases.append((message, "latency.time_to_first_token"))
    message = _message()
    message.latency.inter_token_gaps.gaps_us.append(2**40)
    cases.append((message, "latency.inter_token_gaps"))
    message = _message()
    message.extra_fields["device_id"].string_value = "someone-else"
    cases.append((message, "extra_fields.device_id"))
    message = _message()
    message.ext["energy"].string_value = "twice"
    message.resources.energy.source = "rapl"
    cases.append((message, "ext.energy"))
    message = _message()
    message.ext["deep"].CopyFrom(_nested(40))
    cases.append((message, "ext.deep" + "[0]" * (record_schema.MAX_DECODE_DEPTH)))
    message = _message()
    message.extra_fields["ttft_ms"].string_value = "collides with latency.time_to_first_token"
    cases.append((message, "extra_fields.ttft_ms"))
    message = _message(kind="x\x00y")
    cases.append((message, "kind"))
    message = _message()
    message.ext["nan"].double_value = float("nan")
    cases.append((message, "ext.nan"))
    message = _message(record_version=2)
    cases.append((message, "record_version"))
    for hostile, field in cases:
        parsed = pb.InferenceMeasurement.FromString(hostile.SerializeToString())
        with pytest.raises(P.ProtobufError) as refused:
            P.message_to_record(parsed)
        assert refused.value.field.startswith(field), (field, str(refused.value))


def _refusal(message: pb.InferenceMeasurement) -> P.ProtobufError:
    parsed = pb.InferenceMeasurement.FromString(message.SerializeToString())
    now_us = time.time_ns() // 1000
    with pytest.raises(P.ProtobufError) as refused:
        P.message_to_record(parsed, now_us=now_us)
    with pytest.raises(P.ProtobufError) as refused_wire:
        P.message_to_wire(parsed, now_us=now_us)
    assert str(refused_wire.value) == str(refused.value)  # both readers name the same path
    return refused.value


def test_a_message_is_refused_in_the_protos_own_field_paths() -> None:
    """Every refusal of a message names the path of the .proto's field — never a field of the CBOR wire map
    (``e2e_us``, ``started_us``, ``v``), which the message does not have."""
    message = _message()
    message.latency.end_to_end_latency.seconds, message.latency.end_to_end_latency.nanos = -5, 0
    refused = _refusal(message)
    assert refused.field == "latency.end_to_end_latency" and "-5000000 µs" in refused.problem
    message = _message()
    message.engine_counters.decode_time.seconds = 2 * 86_400
    assert _refusal(message).field == "engine_counters.decode_time"
    message = _message()
    message.timestamp.seconds = 102  # 1970: outside the window ingest accepts
    refused = _refusal(message)
    assert refused.field == "timestamp" and "2020-01-01" in refused.problem
    message = _message()
    message.tokens.output_tokens = 4_000_000_000
    assert _refusal(message).field == "tokens.output_tokens"
    message = _message()
    message.model_info.provider = "llama\x1b[31m.cpp"
    assert _refusal(message).field == "model_info.provider"
    message = _message()
    message.resources.energy.j_per_output_token = float("inf")
    assert _refusal(message).field == "resources.energy.j_per_output_token"
    message = _message(kind="device_facts")
    message.device_facts.ram_gb = -4.0
    assert _refusal(message).field == "device_facts.ram_gb"
    message = _message()
    message.collaboration.rounds_us.add(offset_us=0, draft_us=1, verify_us=2, drafted=3, accepted=2**31)
    assert _refusal(message).field == "collaboration.rounds_us[0]"
    message = _message()
    message.extra_fields["note"].string_value = "x" * (record_schema.MAX_MESSAGE_CHARS + 1)
    assert _refusal(message).field == "extra_fields.note"
    message = _message()
    message.received_at.seconds = 2**40  # past year 9999 (message_to_wire leaves the receive time out)
    with pytest.raises(P.ProtobufError) as refused_at:
        P.message_to_record(message)
    assert refused_at.value.field == "received_at"
    wire_names = {"v", "id", "started_us", "itl_us", *(n for n in record_schema.INT_RANGES if n.endswith("_us"))}
    for field in wire_names:
        assert P.proto_path(field) != field, field


def test_a_delimited_stream_reads_back_and_a_broken_one_is_refused() -> None:
    messages = [P.record_to_message(r) for r in synthetic_records(20, seed=5)]
    stream = P.delimited(messages)
    assert list(P.iter_delimited(stream, pb.InferenceMeasurement)) == messages
    assert list(P.iter_delimited(b"", pb.InferenceMeasurement)) == []
    with pytest.raises(P.ProtobufError, match="remain"):
        list(P.iter_delimited(stream[:-3], pb.InferenceMeasurement))
    with pytest.raises(P.ProtobufError, match="at most 100"):
        list(P.iter_delimited(stream, pb.InferenceMeasurement, max_message_bytes=100))
    with pytest.raises(P.ProtobufError, match="truncated or oversized length"):
        list(P.iter_delimited(b"\xff" * 11, pb.InferenceMeasurement))
    with pytest.raises(P.ProtobufError, match="does not parse"):
        list(P.iter_delimited(b"\x03\xff\xff\xff", pb.InferenceMeasurement))


def test_media_types_name_the_message() -> None:
    assert P.MEASUREMENTS_MEDIA_TYPE == (
        "application/x-protobuf; proto=llm_latency_lens.v1.InferenceMeasurement; delimited=true"
    )
    assert P.RESULTS_MEDIA_TYPE.endswith("proto=llm_latency_lens.v1.BenchmarkResults; delimited=true")


def test_a_results_document_with_odd_values_encodes_or_is_refused_naming_the_field() -> None:
    """What does not fit a typed field of BenchmarkResults is left to ``document`` (exact); what no message can hold
    (a NaN, a non-JSON value) is refused naming where it is."""
    document: dict[str, Any] = {
        "metadata": {"benchmark_id": "b-1", "run_id": "r-1", "timestamp": "2026-12-07T10:00:00.000001Z"},
        "configuration": {"model": {"name": "m", "quantization": "q5_k"}, "hardware": {"cpu_cores": -2}},
        "results": {
            "latency_metrics": {"time_to_first_token": {"mean_ms": 2, "sample_count": -1, "p99_ms": "slow"}},
            "error_metrics": {"total_errors": 1, "errors_by_type": {"oom": 1, "odd": -3}},
        },
    }
    message = P.results_message(document, [_measurement(ttft_ms=1.0, e2e_ms=2.0, itl_ms=[])])
    (parsed,) = P.iter_delimited(P.delimited([message]), pb.BenchmarkResults)
    assert P.results_document(parsed) == document
    ttft = parsed.aggregated.ttft_distribution
    assert ttft.mean_ms == 2.0 and ttft.sample_count == 0 and ttft.p99_ms == 0.0
    assert not parsed.config.hardware.HasField("cpu_cores") and parsed.config.model.quantization == 0
    assert dict(parsed.aggregated.errors.errors_by_type) == {"oom": 1}
    assert parsed.timestamp.nanos == 1000 and len(parsed.measurements) == 1
    document["results"]["throughput_metrics"] = {"tokens_per_second": float("nan")}
    with pytest.raises(P.ProtobufError) as refused:
        P.results_message(document)
    assert refused.value.field == "document.results.throughput_metrics.tokens_per_second"
    with pytest.raises(P.ProtobufError) as refused:
        P.results_message(document, [_measurement(input_tokens=-1)])
    assert refused.value.field == "measurements[0].input_tokens"


def test_the_specifications_figures_keep_null_apart_from_zero() -> None:
    """Every plain scalar of §6.2's messages is declared optional (its number unchanged, above), except
    measurement_id (always set) and the enums (0 is their "unspecified"): a figure the document leaves null reads
    back absent, a real 0.0 reads back present."""
    from google.protobuf.descriptor import FieldDescriptor

    for message, fields in SEED_FIELDS.items():
        descriptor = pb.DESCRIPTOR.message_types_by_name[message]
        for name in fields:
            field = descriptor.fields_by_name[name]
            plain = field.type not in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_ENUM)
            if plain and not field.is_repeated and (message, name) != ("InferenceMeasurement", "measurement_id"):
                assert field.has_presence, f"{message}.{name} is not optional"
    figures = {"p50_ms": None, "p95_ms": 0.0, "sample_count": 0}
    document = {
        "results": {
            "latency_metrics": {"time_to_first_token": figures},
            "throughput_metrics": {"tokens_per_second": None, "requests_per_second": 0.0},
            "error_metrics": {"total_errors": 0, "error_rate": None},
        },
        "configuration": {"test_parameters": {"input_tokens": {"mean": 0}, "warmup_requests": 0}},
    }
    (message,) = P.iter_delimited(P.delimited([P.results_message(document)]), pb.BenchmarkResults)
    ttft = message.aggregated.ttft_distribution
    assert not ttft.HasField("p50_ms") and ttft.HasField("p95_ms") and ttft.HasField("sample_count")
    throughput, errors = message.aggregated.throughput, message.aggregated.errors
    assert not throughput.HasField("tokens_per_second") and throughput.HasField("requests_per_second")
    assert errors.HasField("total_errors") and not errors.HasField("error_rate")
    params = message.config.test_params
    assert params.input_tokens.HasField("mean") and not params.input_tokens.HasField("stddev")
    assert params.HasField("warmup_requests") and not params.HasField("total_requests")


def test_proto_dir_is_where_the_shipped_proto_is_without_the_runtime() -> None:
    """The documented one-liner prints protoc's --proto_path, even where the protobuf runtime is not installed."""
    assert (P.PROTO_DIR / P.PROTO_FILE).is_file() and PROTO_DIR.resolve() == P.PROTO_DIR
    code = "import sys; sys.modules['google.protobuf'] = None\nimport lens_core.proto as p; print(p.PROTO_DIR)"
    shown = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert shown.returncode == 0, shown.stderr
    assert Path(shown.stdout.strip()) == P.PROTO_DIR
