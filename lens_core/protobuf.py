"""Measurements and benchmark results as Protocol Buffers (package ``llm_latency_lens.v1``).

The messages are the specification's (§6.2) with its field numbers, extended from 16 up with what our records carry
beyond them: ``lens_core/proto/llm_latency_lens/v1/measurement.proto``, compiled by Debian's protoc into the
checked-in ``measurement_pb2`` (``make proto``). docs/wire-format.md ("Protocol Buffers") maps every field.

- :func:`record_to_message` / :func:`message_to_record`: a measurement record (the dict ``Measurement.to_dict``
  writes, every kind) ⇄ ``InferenceMeasurement``; :func:`wire_to_message` / :func:`message_to_wire` do the same from
  and to the wire map the outbox and the aggregator hold. Lossless at the wire's resolution (microseconds), with
  one documented exception: a number in a typed ``double`` field that the agent wrote as an integer reads back as a
  float (its value unchanged).
- :func:`results_message` / :func:`results_document`: a ``lens-agent bench`` results document and its requests ⇄
  ``BenchmarkResults``.
- :func:`delimited` / :func:`iter_delimited`: a stream of length-delimited messages (a varint length, then the
  message: what Java's ``writeDelimitedTo`` writes and ``parseDelimitedFrom`` reads).

Both directions hold a record to the bounds ingest holds it to (:func:`lens_core.record_schema.check_record`):
encoding refuses a record outside them with a :class:`ProtobufError` naming the field, rather than truncating
anything; decoding refuses a message that would make such a record. Import this module only where protobuf is
used: it loads the protobuf runtime (the ``protobuf`` extra).
"""

from __future__ import annotations

import math
import re
import time
import uuid
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, TypeVar

from google.protobuf.message import DecodeError, Message

from . import record_schema, wire
from .itlpack import PackError, pack_gaps, unpack_gaps
from .proto import PROTO_DIR as PROTO_DIR  # protoc's --proto_path: the .proto is PROTO_DIR / PROTO_FILE
from .proto import PROTO_FILE as PROTO_FILE
from .proto.llm_latency_lens.v1 import measurement_pb2 as pb

PACKAGE = "llm_latency_lens.v1"


def media_type(message: str) -> str:
    """The media type of a stream of length-delimited ``message`` messages of this package."""
    return f"application/x-protobuf; proto={PACKAGE}.{message}; delimited=true"


MEASUREMENTS_MEDIA_TYPE = media_type("InferenceMeasurement")
RESULTS_MEDIA_TYPE = media_type("BenchmarkResults")
MAX_MESSAGE_BYTES = 64 * 1024**2  # one message of a stream read back (a record is at most a few MiB)
MAX_VARINT_BYTES = 10
_EXACT_INT_IN_DOUBLE = 2**53


class ProtobufError(ValueError):
    """A record or message outside the format's bounds: ``field`` names it (dotted inside ext)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field {field!r} {problem}")


# -- JSON-compatible values (ext, unknown fields, the results document) ------------------------------------------


def to_value(value: Any, path: str, depth: int = 0) -> pb.Value:
    """A JSON-compatible value as a ``Value``: integers stay integers, floats floats; None is a Value with no kind."""
    out = pb.Value()
    _fill_value(out, value, path, depth)
    return out


def _fill_value(out: pb.Value, value: Any, path: str, depth: int) -> None:
    if depth > record_schema.MAX_DECODE_DEPTH:
        raise ProtobufError(path, f"nests deeper than {record_schema.MAX_DECODE_DEPTH} levels")
    kind = type(value)
    if value is None:
        return
    if kind is bool:
        out.bool_value = value
    elif kind is int:
        if not -(2**63) <= value < 2**63:
            raise ProtobufError(path, f"is {value}; integers must fit in 64 bits (signed)")
        out.int_value = value
    elif kind is float:
        if not math.isfinite(value):
            raise ProtobufError(path, f"is {value!r}; numbers must be finite")
        out.double_value = value
    elif kind is str:
        out.string_value = value
    elif kind is list:
        out.list_value.SetInParent()
        for i, item in enumerate(value):
            _fill_value(out.list_value.values.add(), item, f"{path}[{i}]", depth + 1)
    elif kind is dict:
        out.map_value.SetInParent()
        _fill_map(out.map_value.fields, value, path, depth + 1)
    else:
        allowed = "maps, lists, strings, finite numbers, booleans, null"
        raise ProtobufError(path, f"is a {kind.__name__}; allowed: {allowed}")


def _fill_map(target: Any, value: Mapping[str, Any], path: str, depth: int) -> None:
    for key, item in value.items():
        if type(key) is not str:
            raise ProtobufError(path, f"has the key {key!r}"[:80] + "; keys must be strings")
        _fill_value(target[key], item, f"{path}.{key}", depth)


def from_value(value: pb.Value, path: str = "value", depth: int = 0) -> Any:
    if depth > record_schema.MAX_DECODE_DEPTH:
        raise ProtobufError(path, f"nests deeper than {record_schema.MAX_DECODE_DEPTH} levels")
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "list_value":
        return [from_value(item, f"{path}[{i}]", depth + 1) for i, item in enumerate(value.list_value.values)]
    if kind == "map_value":
        return from_map(value.map_value.fields, path, depth + 1)
    if kind == "double_value" and not math.isfinite(value.double_value):
        raise ProtobufError(path, f"is {value.double_value!r}; numbers must be finite")
    return getattr(value, kind)


def from_map(fields: Mapping[str, pb.Value], path: str, depth: int = 0) -> dict[str, Any]:
    return {key: from_value(item, f"{path}.{key}", depth) for key, item in fields.items()}


# -- typed sections of ext: the figures readers use, with everything else in `other` -----------------------------
# key in the record → (field of the message, kind). A value of another type (a string where a number belongs,
# null, an empty list) is kept in the message's `other` map instead, so that nothing is lost or changed.
_Spec = dict[str, tuple[str, str]]
ENERGY: _Spec = {
    "source": ("source", "str"),
    "rate_hz": ("rate_hz", "float"),
    "samples": ("samples", "int"),
    "joules_total": ("joules_total", "float"),
    "joules_net": ("joules_net", "float"),
    "prefill_joules": ("prefill_joules", "float"),
    "decode_joules": ("decode_joules", "float"),
    "j_per_prompt_token": ("j_per_prompt_token", "float"),
    "j_per_output_token": ("j_per_output_token", "float"),
}
COLLAB: _Spec = {
    "strategy": ("strategy", "str"),
    "protocol": ("protocol", "str"),
    "draft_tokens": ("draft_tokens", "int"),
    "rounds": ("rounds", "int"),
    "drafted": ("drafted", "int"),
    "accepted": ("accepted", "int"),
    "acceptance_rate": ("acceptance_rate", "float"),
    "edge_time_ms": ("edge_time_ms", "float"),
    "cloud_time_ms": ("cloud_time_ms", "float"),
    "verify_time_ms": ("verify_time_ms", "float"),
    "network_time_ms": ("network_time_ms", "float"),
    "rtt_ms": ("rtt_ms", "float"),
    "collaboration_overhead_ms": ("collaboration_overhead_ms", "float"),
    "total_duration_ms": ("total_duration_ms", "float"),
    "bytes_up": ("bytes_up", "int"),
    "bytes_down": ("bytes_down", "int"),
    "round_us": ("rounds_us", "rounds"),
}
DEVICE: _Spec = {
    "device_class": ("device_class", "str"),
    "model": ("model", "str"),
    "accelerator": ("accelerator", "str"),
    "power_mode": ("power_mode", "str"),
    "power_mode_id": ("power_mode_id", "int"),
    "ram_gb": ("ram_gb", "float"),
    "gpu_freq_mhz": ("gpu_freq_mhz", "float"),
    "cpu_freq_mhz_max": ("cpu_freq_mhz_max", "float"),
    "temperature_max_c": ("temperature_max_c", "float"),
    "cpu_freq_mhz": ("cpu_freq_mhz", "float_map"),
    "temperatures_c": ("temperatures_c", "float_map"),
    "tags": ("tags", "str_list"),
}


def _exact_float(value: Any) -> bool:
    kind = type(value)
    if kind is float:
        return math.isfinite(value)
    return kind is int and -_EXACT_INT_IN_DOUBLE <= value <= _EXACT_INT_IN_DOUBLE


def _fits(value: Any, kind: str) -> bool:
    if kind == "str":
        return type(value) is str
    if kind == "float":
        return _exact_float(value)
    if kind == "int":
        return type(value) is int and -(2**63) <= value < 2**63
    if kind == "float_map":
        return type(value) is dict and bool(value) and all(_exact_float(v) for v in value.values())
    if kind == "str_list":
        return type(value) is list and bool(value) and all(type(v) is str for v in value)
    if kind == "rounds":
        return type(value) is list and bool(value) and all(record_schema.round_entry(v) is not None for v in value)
    raise AssertionError(kind)


def _split_section(section: Mapping[str, Any], spec: _Spec, message: Any, path: str) -> None:
    for key, value in section.items():
        rule = spec.get(key)
        if rule is None or not _fits(value, rule[1]):
            _fill_value(message.other[key], value, f"{path}.{key}", 2)
            continue
        name, kind = rule
        if kind == "float_map":
            getattr(message, name).update({k: float(v) for k, v in value.items()})
        elif kind == "str_list":
            getattr(message, name).extend(value)
        elif kind == "rounds":
            for entry in value:
                getattr(message, name).add(
                    offset_us=entry[0], draft_us=entry[1], verify_us=entry[2], drafted=entry[3], accepted=entry[4]
                )
        else:
            setattr(message, name, float(value) if kind == "float" else value)


def _join_section(message: Any, spec: _Spec, path: str) -> dict[str, Any]:
    section: dict[str, Any] = {}
    for key, (name, kind) in spec.items():
        if kind == "float_map":
            values = getattr(message, name)
            if values:
                section[key] = dict(values)
        elif kind == "str_list":
            if getattr(message, name):
                section[key] = list(getattr(message, name))
        elif kind == "rounds":
            if getattr(message, name):
                section[key] = [
                    [r.offset_us, r.draft_us, r.verify_us, r.drafted, r.accepted] for r in getattr(message, name)
                ]
        elif message.HasField(name):
            section[key] = getattr(message, name)
    for key, item in message.other.items():
        if key in section:
            raise ProtobufError(f"{path}.other.{key}", "is given twice (in a typed field and in other)")
        section[key] = from_value(item, f"{path}.other.{key}", 2)
    return section


# -- a record ⇄ InferenceMeasurement ----------------------------------------------------------------------------
_DURATIONS = (
    ("ttft_us", "time_to_first_token"),
    ("tpot_us", "time_per_output_token"),
    ("e2e_us", "end_to_end_latency"),
    ("prefill_us", "prefill_time"),
    ("decode_us", "decode_time"),
)
_OPTIONAL_TOP = (
    "strategy",
    "error_type",
    "error_message",
    "stop_reason",
    "prompt_index",
    "prompt_id",
    "prompt_sha256",
    "warmup",
    "first_after_load",
    "prompt_text",
    "output_text",
)
_TEXTS = ("prompt_text", "output_text")  # left out of the record read back unless the message carries them
NAMED_FIELDS = frozenset(
    {
        "v",
        "id",
        "started_us",
        "device_id",
        "run_id",
        "kind",
        "ok",
        "model_name",
        "engine",
        "model_sha256",
        *_OPTIONAL_TOP,
        *(name for name, _ in _DURATIONS),
        "itl_us",
        "engine_prefill_us",
        "engine_prefill_tokens",
        "engine_decode_us",
        "engine_decode_tokens",
        "input_tokens",
        "output_tokens",
        "rss_before_bytes",
        "rss_peak_bytes",
        "rss_peak_source",
        "ext",
    }
)
# the names the measurement record gives the wire's fields: an extra field by one of them would collide with it
# (ingest refuses such a field, and so does every read)
RECORD_NAMES = record_schema.RECORD_NAMES
# Derived figures are written only when finite and at most these (a record of 1 µs with 2^31 tokens or 1e308 J
# is one ingest accepts; its quotient is no figure): readers can always compute them from their parts.
MAX_TOKENS_PER_SECOND = 1e7  # the campaign results' bound on tokens per second
MAX_POWER_WATTS = 1e6
# google.protobuf.Timestamp's valid range: 0001-01-01T00:00:00Z to 9999-12-31T23:59:59.999999999Z
MIN_TIMESTAMP_SECONDS = -62_135_596_800
MAX_TIMESTAMP_SECONDS = 253_402_300_799
_TYPED_EXT = {"energy": ENERGY, "collab": COLLAB, "device": DEVICE}


def _now_us() -> int:
    return time.time_ns() // 1000


def _checked(wire_record: Any, now_us: int | None) -> dict[str, Any]:
    """The wire record held to ingest's bounds (the time window relative to ``now_us``, by default now)."""
    if type(wire_record) is not dict:
        raise ProtobufError("(record)", f"is a {type(wire_record).__name__}; a record is a map")
    try:
        return record_schema.check_record(wire_record, _now_us() if now_us is None else now_us)
    except record_schema.SchemaError as exc:
        raise ProtobufError(exc.field, exc.problem) from None


def _set_duration(message: Any, us: int | None) -> None:
    if us is not None:
        message.seconds, micros = divmod(us, 1_000_000)
        message.nanos = micros * 1000


def _set_time(message: Any, us: int) -> None:
    if not MIN_TIMESTAMP_SECONDS <= us // 1_000_000 <= MAX_TIMESTAMP_SECONDS:
        raise ProtobufError("timestamp", f"is {us} µs; a Timestamp is from year 1 to year 9999")
    _set_duration(message, us)


def _duration_us(message: Any, field: str) -> int:
    if message.nanos % 1000:
        raise ProtobufError(field, f"has {message.nanos} ns; records are in whole microseconds")
    if not -999_999_999 <= message.nanos <= 999_999_999:
        raise ProtobufError(field, f"has {message.nanos} ns; allowed: -999999999 to 999999999")
    return int(message.seconds) * 1_000_000 + int(message.nanos) // 1000


def _bounded_us(message: Any, field: str) -> int:
    """A ``Duration`` of a record (a latency, an engine counter's time) in µs, from 0 to one day as ingest allows."""
    us = _duration_us(message, field)
    if not 0 <= us <= record_schema.MAX_DURATION_US:
        raise ProtobufError(field, f"is {us} µs; allowed: 0 to {record_schema.MAX_DURATION_US} µs (one day)")
    return us


# A refusal of check_record names the wire's field; a message's refusals name its own field paths instead.
_PROTO_PATHS = {
    "v": "record_version",
    "id": "measurement_id",
    "started_us": "timestamp",
    "model_name": "model_info.name",
    "engine": "model_info.provider",
    "model_sha256": "model_info.sha256",
    **{name: f"latency.{field}" for name, field in _DURATIONS},
    "itl_us": "latency.inter_token_gaps",
    "engine_prefill_us": "engine_counters.prefill_time",
    "engine_prefill_tokens": "engine_counters.prefill_tokens",
    "engine_decode_us": "engine_counters.decode_time",
    "engine_decode_tokens": "engine_counters.decode_tokens",
    "input_tokens": "tokens.input_tokens",
    "output_tokens": "tokens.output_tokens",
    "rss_before_bytes": "resources.rss_before_bytes",
    "rss_peak_bytes": "resources.rss_peak_bytes",
    "rss_peak_source": "resources.rss_peak_source",
}
_SECTION_PATHS = {"energy": "resources.energy", "collab": "collaboration", "device": "device_facts"}
_KEY = re.compile(r"[^.\[]*")


def proto_path(field: str) -> str:
    """The ``InferenceMeasurement`` field path of a wire record's field (dotted inside ext, as check_record names
    it): ``e2e_us`` → ``latency.end_to_end_latency``, ``ext.energy.source`` → ``resources.energy.source``, an
    unknown top-level field ``x`` → ``extra_fields.x``."""
    if field in _PROTO_PATHS:
        return _PROTO_PATHS[field]
    head = _KEY.match(field).group(0)  # type: ignore[union-attr]  # the pattern matches every string
    if field.startswith("ext."):
        rest = field[4:]
        section = _KEY.match(rest).group(0)  # type: ignore[union-attr]
        base = _SECTION_PATHS.get(section)
        if base is None:
            return field  # the rest of ext is the message's ext map
        tail = rest[len(section) :]
        if not tail.startswith("."):
            return base + tail
        key = _KEY.match(tail[1:]).group(0)  # type: ignore[union-attr]
        rule = _TYPED_EXT[section].get(key)
        return f"{base}.{rule[0] if rule else 'other.' + key}{tail[1 + len(key) :]}"
    if head in NAMED_FIELDS or field.startswith("("):
        return field
    return f"extra_fields.{field}"


def record_to_message(record: Mapping[str, Any], *, now_us: int | None = None) -> pb.InferenceMeasurement:
    """A measurement record (``Measurement.to_dict()``, texts included when present) as an ``InferenceMeasurement``;
    :class:`ProtobufError` when it is outside ingest's bounds."""
    gaps_us: list[int] | None = None
    try:
        # the gaps go straight to microseconds (packing them for the wire map only to unpack them here would
        # cost ten times the rest); the wire map carries no itl_us, the gaps are checked below
        wire_record = wire.to_wire({k: v for k, v in record.items() if k != "itl_ms"}, include_text=True)
        if record.get("itl_ms") is not None:
            gaps_us = [round(gap * 1000) for gap in record["itl_ms"]]
    except (TypeError, ValueError, AttributeError, OverflowError, PackError) as exc:
        raise ProtobufError("(record)", f"does not map to the wire format: {type(exc).__name__}: {exc}") from None
    if gaps_us is not None:
        _check_gaps(gaps_us, "itl_ms")
    return _encoded(_checked(wire_record, now_us), gaps_us, None)


def _check_gaps(gaps: Any, field: str) -> None:
    """At most MAX_GAPS gaps, each an integer from 0 to one day (µs): what every read of the gaps allows
    (:func:`record_schema.check_gaps`), on the way in and on the way out."""
    try:
        record_schema.check_gaps(gaps, field)
    except record_schema.SchemaError as exc:
        raise ProtobufError(exc.field, exc.problem) from None


def wire_to_message(
    wire_record: Mapping[str, Any], *, now_us: int | None = None, received_us: int | None = None
) -> pb.InferenceMeasurement:
    """A wire record (the outbox's, or one the aggregator stored) as an ``InferenceMeasurement``, held to ingest's
    bounds first. ``received_us``: the aggregator's receive time (its exports)."""
    record = _checked(dict(wire_record), now_us)
    gaps_us = None
    if record.get("itl_us") is not None:
        try:
            gaps_us = unpack_gaps(bytes(record["itl_us"]))
        except PackError as exc:
            raise ProtobufError("itl_us", f"does not unpack: {exc}") from None
        _check_gaps(gaps_us, "itl_us")
    return _encoded(record, gaps_us, received_us)


def _encoded(record: dict[str, Any], gaps_us: list[int] | None, received_us: int | None) -> pb.InferenceMeasurement:
    try:
        return _to_message(record, gaps_us, received_us)
    except UnicodeEncodeError as exc:  # a lone surrogate: Python holds it, UTF-8 (and so protobuf) cannot
        where = (_surrogate_at(record) or "(record)").encode("utf-8", "backslashreplace").decode("ascii", "replace")
        raise ProtobufError(where, f"is not valid Unicode text ({exc.reason})") from None


def _surrogate_at(value: Any, path: str = "") -> str | None:
    """Where the first string (or map key) holding a lone surrogate is, dotted; None when there is none."""
    if type(value) is str:
        return path if any("\ud800" <= c <= "\udfff" for c in value) else None
    items = value.items() if type(value) is dict else enumerate(value) if type(value) is list else ()
    for key, item in items:
        where = f"{path}.{key}" if type(key) is str and path else str(key) if type(key) is str else f"{path}[{key}]"
        if type(key) is str and _surrogate_at(key, where) is not None:
            return where
        found = _surrogate_at(item, where)
        if found is not None:
            return found
    return None


def _to_message(record: dict[str, Any], gaps_us: list[int] | None, received_us: int | None) -> pb.InferenceMeasurement:
    out = pb.InferenceMeasurement()
    out.measurement_id = str(uuid.UUID(bytes=bytes(record["id"])))
    _set_time(out.timestamp, record["started_us"])
    out.record_version = record["v"]
    out.device_id = record["device_id"]
    out.run_id = record["run_id"]
    out.kind = record["kind"]
    out.ok = record["ok"]
    for name in _OPTIONAL_TOP:
        value = record.get(name)
        if value is not None:
            setattr(out, name, bytes(value) if name == "prompt_sha256" else value)
    model = {"name": record.get("model_name"), "provider": record.get("engine"), "sha256": record.get("model_sha256")}
    for name, value in model.items():
        if value is not None:
            setattr(out.model_info, name, bytes(value) if name == "sha256" else value)
    for name, field in _DURATIONS:
        if record.get(name) is not None:
            _set_duration(getattr(out.latency, field), record[name])
    if gaps_us is not None:
        gaps = out.latency.inter_token_gaps
        gaps.SetInParent()
        gaps.gaps_us.extend(gaps_us)
    counters = out.engine_counters
    if record.get("engine_prefill_us") is not None:
        _set_duration(counters.prefill_time, record["engine_prefill_us"])
    if record.get("engine_decode_us") is not None:
        _set_duration(counters.decode_time, record["engine_decode_us"])
    if record.get("engine_prefill_tokens") is not None:
        counters.prefill_tokens = record["engine_prefill_tokens"]
    if record.get("engine_decode_tokens") is not None:
        counters.decode_tokens = record["engine_decode_tokens"]
    for name in ("input_tokens", "output_tokens"):
        if record.get(name) is not None:
            setattr(out.tokens, name, record[name])
    e2e_us = record.get("e2e_us")
    output_tokens = record.get("output_tokens")
    if record["ok"] and e2e_us and output_tokens:
        rate = output_tokens / (e2e_us / 1e6)  # derived: read back from its parts
        if rate <= MAX_TOKENS_PER_SECOND:
            out.tokens.tokens_per_second = rate
    for name in ("rss_before_bytes", "rss_peak_bytes", "rss_peak_source"):
        if record.get(name) is not None:
            setattr(out.resources, name, record[name])
    ext = record.get("ext")
    if ext is not None:
        for key, value in ext.items():
            spec = _TYPED_EXT.get(key)
            if spec is None or type(value) is not dict:
                _fill_value(out.ext[key], value, f"ext.{key}", 1)
                continue
            target: Any = {
                "energy": out.resources.energy,
                "collab": out.collaboration,
                "device": out.device_facts,
            }[key]
            target.SetInParent()
            _split_section(value, spec, target, f"ext.{key}")
        energy = ext.get("energy")
        joules = energy.get("joules_total") if type(energy) is dict else None
        if _exact_float(joules) and e2e_us:
            watts = joules / (e2e_us / 1e6)  # derived; inf when 1e308 J meet 1 µs
            if 0 <= watts <= MAX_POWER_WATTS:
                out.resources.power_consumption_watts = watts
    for key, value in record.items():
        if key not in NAMED_FIELDS:
            _fill_value(out.extra_fields[key], value, key, 1)
    if received_us is not None:
        _set_time(out.received_at, received_us)
    return out


def _gaps_of(message: pb.InferenceMeasurement) -> list[int]:
    gaps = list(message.latency.inter_token_gaps.gaps_us)
    _check_gaps(gaps, "latency.inter_token_gaps")
    return gaps


def message_to_wire(message: pb.InferenceMeasurement, *, now_us: int | None = None) -> dict[str, Any]:
    """An ``InferenceMeasurement`` back to the wire record, held to ingest's bounds (relative to ``now_us``, by
    default now). Every named field is in the record (null where the message leaves it out), the texts only when
    the message carries them."""
    return _checked_message(_wire_of(message, pack=True), now_us)


def _wire_of(message: pb.InferenceMeasurement, *, pack: bool) -> dict[str, Any]:
    """The wire map of a message, unchecked; ``pack``: with the gaps packed (else ``itl_us`` is None)."""
    try:
        record_id = uuid.UUID(message.measurement_id).bytes
    except ValueError:
        raise ProtobufError("measurement_id", f"is {message.measurement_id[:60]!r}; allowed: a UUID") from None
    out: dict[str, Any] = {
        "v": message.record_version,
        "id": record_id,
        "device_id": message.device_id,
        "run_id": message.run_id,
        "kind": message.kind,
        "started_us": _duration_us(message.timestamp, "timestamp"),
        "ok": message.ok,
    }
    for name in _OPTIONAL_TOP:
        if message.HasField(name):
            out[name] = getattr(message, name)
        elif name not in _TEXTS:
            out[name] = None
    model = message.model_info
    out["model_name"] = model.name if model.HasField("name") else None
    out["engine"] = model.provider if model.HasField("provider") else None
    out["model_sha256"] = model.sha256 if model.HasField("sha256") else None
    latency = message.latency
    for name, field in _DURATIONS:
        out[name] = _bounded_us(getattr(latency, field), f"latency.{field}") if latency.HasField(field) else None
    out["itl_us"] = None
    if latency.HasField("inter_token_gaps") and pack:
        out["itl_us"] = pack_gaps(_gaps_of(message))
    counters = message.engine_counters
    out["engine_prefill_us"] = (
        _bounded_us(counters.prefill_time, "engine_counters.prefill_time")
        if counters.HasField("prefill_time")
        else None
    )
    out["engine_prefill_tokens"] = counters.prefill_tokens if counters.HasField("prefill_tokens") else None
    out["engine_decode_us"] = (
        _bounded_us(counters.decode_time, "engine_counters.decode_time") if counters.HasField("decode_time") else None
    )
    out["engine_decode_tokens"] = counters.decode_tokens if counters.HasField("decode_tokens") else None
    tokens = message.tokens
    out["input_tokens"] = tokens.input_tokens if tokens.HasField("input_tokens") else None
    out["output_tokens"] = tokens.output_tokens if tokens.HasField("output_tokens") else None
    resources = message.resources
    for name in ("rss_before_bytes", "rss_peak_bytes", "rss_peak_source"):
        out[name] = getattr(resources, name) if resources.HasField(name) else None
    ext = from_map(message.ext, "ext", 1)
    typed: dict[str, tuple[Any, str]] = {
        "energy": (resources, "energy"),
        "collab": (message, "collaboration"),
        "device": (message, "device_facts"),
    }
    for key, (parent, field) in typed.items():
        if parent.HasField(field):
            if key in ext:
                raise ProtobufError(f"ext.{key}", f"is given twice (in {field} and in ext)")
            ext[key] = _join_section(getattr(parent, field), _TYPED_EXT[key], _SECTION_PATHS[key])
    out["ext"] = ext
    for key, item in message.extra_fields.items():
        if key in out or key in NAMED_FIELDS or key in RECORD_NAMES:
            raise ProtobufError(
                f"extra_fields.{key}", "is a named field; extra_fields holds only fields this version does not name"
            )
        out[key] = from_value(item, f"extra_fields.{key}", 1)
    return out


def _checked_message(wire_record: dict[str, Any], now_us: int | None) -> dict[str, Any]:
    """:func:`_checked` for a message's wire map: a refusal names the message's field path, not the wire's."""
    try:
        return _checked(wire_record, now_us)
    except ProtobufError as exc:
        raise ProtobufError(proto_path(exc.field), exc.problem) from None


def message_to_record(message: pb.InferenceMeasurement, *, now_us: int | None = None) -> dict[str, Any]:
    """An ``InferenceMeasurement`` back to the measurement record (times in milliseconds), with ``received_at``
    when the message has it (the exports' messages do): the fields and values of the JSON export. Held to ingest's
    bounds as :func:`message_to_wire` is; a refusal names the message's field path (``latency.end_to_end_latency``,
    ``timestamp``, ``resources.energy.joules_total``, ``extra_fields.x``)."""
    gaps = _gaps_of(message) if message.latency.HasField("inter_token_gaps") else None
    received = received_us(message)
    checked = _checked_message(_wire_of(message, pack=False), now_us)
    del checked["itl_us"]  # the gaps go straight to milliseconds
    record = wire.from_wire(checked)
    record["itl_ms"] = None if gaps is None else [gap / 1000.0 for gap in gaps]
    if received is not None:
        record["received_at"] = wire._format_time_us(received)
    return record


def received_us(message: pb.InferenceMeasurement) -> int | None:
    """The aggregator's receive time of an exported message (Unix microseconds), None when it has none;
    :class:`ProtobufError` when it is not a time of years 1 to 9999 in whole microseconds."""
    if not message.HasField("received_at"):
        return None
    us = _duration_us(message.received_at, "received_at")
    if not MIN_TIMESTAMP_SECONDS <= us // 1_000_000 <= MAX_TIMESTAMP_SECONDS:
        raise ProtobufError("received_at", f"is {us} µs; a Timestamp is from year 1 to year 9999")
    return us


# -- a bench results document ⇄ BenchmarkResults ------------------------------------------------------------------
QUANTIZATION = {
    "none": pb.QUANTIZATION_NONE,
    "int8": pb.QUANTIZATION_INT8,
    "int4": pb.QUANTIZATION_INT4,
    "fp16": pb.QUANTIZATION_FP16,
    "bf16": pb.QUANTIZATION_BF16,
}
DISTRIBUTION = {
    "normal": pb.DISTRIBUTION_TYPE_NORMAL,
    "uniform": pb.DISTRIBUTION_TYPE_UNIFORM,
    "fixed": pb.DISTRIBUTION_TYPE_FIXED,
}
_LATENCY = (
    ("time_to_first_token", "ttft_distribution"),
    ("time_per_output_token", "tpot_distribution"),
    ("end_to_end_latency", "e2e_distribution"),
    ("prefill_time", "prefill_distribution"),
    ("decode_time", "decode_distribution"),
)
_DISTRIBUTION_FIELDS = tuple(f.name for f in pb.LatencyDistribution.DESCRIPTOR.fields)
_HEX64 = re.compile("[0-9a-fA-F]{64}")


def _section(document: Mapping[str, Any], *path: str) -> dict[str, Any]:
    part: Any = document
    for key in path:
        part = part.get(key) if type(part) is dict else None
    return part if type(part) is dict else {}


def _set_if(message: Any, field: str, value: Any, kind: type) -> None:
    """Set ``field`` when ``value`` fits it (a string; a finite number for a double; an unsigned integer)."""
    if kind is float:
        fits = _exact_float(value)
    elif kind is int:
        fits = type(value) is int and 0 <= value < 2**64
    else:
        fits = type(value) is kind
    if fits:
        setattr(message, field, kind(value))


E = TypeVar("E")


def _enum(table: Mapping[str, E], value: Any) -> E | None:
    """The enum value a name stands for; None for anything else (another name, a list, a number)."""
    return table.get(value) if type(value) is str else None


def _timestamp_us(value: Any) -> int | None:
    """An ISO 8601 time as Unix µs when a ``Timestamp`` can hold it (years 1 to 9999), else None."""
    if type(value) is not str:
        return None
    try:
        us = wire._parse_time_us(value)
    except (ValueError, OverflowError):
        return None
    return us if MIN_TIMESTAMP_SECONDS <= us // 1_000_000 <= MAX_TIMESTAMP_SECONDS else None


def results_message(
    document: Mapping[str, Any], measurements: Iterable[Mapping[str, Any]] = (), *, now_us: int | None = None
) -> pb.BenchmarkResults:
    """A ``lens-agent bench`` results document (and the run's requests, as measurement records) as a
    ``BenchmarkResults``: the specification's figures in their fields, the whole document in ``document``.

    The typed fields are a view of the document: a value one cannot hold (text that is not a time or not 64 hex
    digits, a list where a name belongs, a count past 64 bits, a time outside a Timestamp's years 1 to 9999) leaves
    it unset, and ``document`` carries the value as it is. :class:`ProtobufError` (naming where) only for what no
    message can carry: a document that is not JSON-compatible (NaN, a non-string key, an integer past 64 bits,
    nesting past 12 levels, a lone surrogate) or a measurement outside ingest's bounds."""
    try:
        return _results_message(document, measurements, now_us)
    except UnicodeEncodeError as exc:  # a lone surrogate: Python holds it, UTF-8 (and so protobuf) cannot
        where = (_surrogate_at(document, "document") or "document").encode("utf-8", "backslashreplace")
        raise ProtobufError(where.decode("ascii", "replace"), f"is not valid Unicode text ({exc.reason})") from None


def _results_message(
    document: Mapping[str, Any], measurements: Iterable[Mapping[str, Any]], now_us: int | None
) -> pb.BenchmarkResults:
    out = pb.BenchmarkResults()
    metadata = _section(document, "metadata")
    _set_if(out, "benchmark_id", metadata.get("benchmark_id"), str)
    _set_if(out, "run_id", metadata.get("run_id"), str)
    started_us = _timestamp_us(metadata.get("timestamp"))
    if started_us is not None:
        _set_time(out.timestamp, started_us)
    model = _section(document, "configuration", "model")
    for name in ("name", "provider", "version"):
        _set_if(out.config.model, name, model.get(name), str)
    _set_if(out.config.model, "endpoint", _section(document, "configuration", "cloud").get("url"), str)
    quantization = _enum(QUANTIZATION, model.get("quantization"))
    if quantization is not None:
        out.config.model.quantization = quantization
    if type(model.get("sha256")) is str and _HEX64.fullmatch(model["sha256"]):
        out.config.model.sha256 = bytes.fromhex(model["sha256"])
    hardware = _section(document, "configuration", "hardware")
    for name in ("gpu_count", "cpu_cores", "batch_size"):
        value = hardware.get(name)
        if type(value) is int and 0 <= value < 2**32:
            setattr(out.config.hardware, name, value)
    _set_if(out.config.hardware, "gpu_type", hardware.get("gpu_type"), str)
    _set_if(out.config.hardware, "memory_gb", hardware.get("memory_gb"), float)
    params = _section(document, "configuration", "test_parameters")
    for name in ("input_tokens", "output_tokens"):
        stats = _section(params, name)
        target = getattr(out.config.test_params, name)
        for field in ("mean", "stddev"):
            value = stats.get(field)
            if type(value) is int and 0 <= value < 2**32:
                setattr(target, field, value)
        distribution = _enum(DISTRIBUTION, stats.get("distribution"))
        if distribution is not None:
            target.distribution = distribution
    levels = params.get("concurrency_levels")
    if type(levels) is list and all(type(v) is int and 0 <= v < 2**32 for v in levels):
        out.config.test_params.concurrency_levels.extend(levels)
    for name, field in (("warmup_requests", "warmup_requests"), ("total_requests", "total_requests")):
        value = params.get(name)
        if type(value) is int and 0 <= value < 2**32:
            setattr(out.config.test_params, field, value)
    latency = _section(document, "results", "latency_metrics")
    for name, field in _LATENCY:
        dist = _section(latency, name)
        if dist:
            target = getattr(out.aggregated, field)
            target.SetInParent()
            for key in _DISTRIBUTION_FIELDS:
                _set_if(target, key, dist.get(key), int if key == "sample_count" else float)
    throughput = _section(document, "results", "throughput_metrics")
    for name in ("requests_per_second", "tokens_per_second", "tokens_per_second_per_gpu"):
        _set_if(out.aggregated.throughput, name, throughput.get(name), float)
    errors = _section(document, "results", "error_metrics")
    _set_if(out.aggregated.errors, "total_errors", errors.get("total_errors"), int)
    _set_if(out.aggregated.errors, "error_rate", errors.get("error_rate"), float)
    for kind, count in _section(errors, "errors_by_type").items():
        if type(kind) is str and type(count) is int and 0 <= count < 2**64:
            out.aggregated.errors.errors_by_type[kind] = count
    for i, record in enumerate(measurements):
        try:
            out.measurements.append(record_to_message(record, now_us=now_us))
        except ProtobufError as exc:
            raise ProtobufError(f"measurements[{i}].{exc.field}", exc.problem) from None
    out.document.SetInParent()
    _fill_map(out.document.fields, document, "document", 1)
    return out


def results_document(message: pb.BenchmarkResults) -> dict[str, Any]:
    """The results document a ``BenchmarkResults`` carries (what ``--output`` writes as JSON)."""
    return from_map(message.document.fields, "document", 1)


# -- length-delimited streams -------------------------------------------------------------------------------------
def _varint(value: int) -> bytes:
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def delimited(messages: Iterable[Message]) -> bytes:
    """Messages as one length-delimited stream (each: its size as a varint, then its bytes, serialised
    deterministically: map entries in key order)."""
    parts: list[bytes] = []
    for message in messages:
        body = message.SerializeToString(deterministic=True)
        parts.append(_varint(len(body)))
        parts.append(body)
    return b"".join(parts)


M = TypeVar("M", bound=Message)


def iter_delimited(data: bytes, message_class: type[M], *, max_message_bytes: int = MAX_MESSAGE_BYTES) -> Iterator[M]:
    """The messages of a length-delimited stream, each checked against ``max_message_bytes`` before it is parsed;
    :class:`ProtobufError` on a truncated or malformed stream (naming the message's index and offset)."""
    pos = index = 0
    view = memoryview(data)
    while pos < len(data):
        size = shift = 0
        start = pos
        while True:
            if pos >= len(data) or pos - start >= MAX_VARINT_BYTES:
                raise ProtobufError(f"message {index}", f"at byte {start} has a truncated or oversized length")
            byte = data[pos]
            pos += 1
            size |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        if size > max_message_bytes:
            raise ProtobufError(
                f"message {index}", f"at byte {start} announces {size} bytes; at most {max_message_bytes}"
            )
        if pos + size > len(data):
            raise ProtobufError(f"message {index}", f"at byte {start} announces {size} bytes; {len(data) - pos} remain")
        message = message_class()
        try:
            message.ParseFromString(bytes(view[pos : pos + size]))
        except (DecodeError, RecursionError) as exc:
            raise ProtobufError(f"message {index}", f"at byte {start} does not parse: {exc}") from None
        yield message
        pos += size
        index += 1
