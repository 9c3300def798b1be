"""Wire format v1: measurement records and batches, defined once and used by the agent and the aggregator.

A **record** on the wire is the measurement dict (``Measurement.to_dict``) mapped for size and exactness:
times in integer microseconds (``ttft_ms`` → ``ttft_us``; the gap list ``itl_ms`` → ``itl_us``, packed
by :mod:`lens_core.itlpack`), the start as Unix
microseconds (``started_us``), the record id as 16 bytes and sha256 digests as 32 bytes, and no prompt or output
text unless the configuration asks for it. It is encoded on its own (CBOR or msgpack map), so the aggregator can
store each record's bytes as received.

A **batch** is an 8-byte header — ``b"LENS"``, format version, codec, compression, dictionary id (0: none) — and
the payload: a map ``{device_id, batch_id, sent_us, counters, records: [record bytes, …]}`` in the same codec,
compressed with zstd unless compression is ``none``. See docs/wire-format.md.
"""

from __future__ import annotations

import functools
import hashlib
import json
import struct
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

import cbor2
import msgpack
import zstandard

from . import record_schema
from .itlpack import pack_gaps, unpack_gaps

WIRE_VERSION = 1
SUPPORTED_VERSIONS = (1,)
MAGIC = b"LENS"
HEADER = struct.Struct("!4sBBBB")
CODECS = {"cbor": 1, "msgpack": 2}
CODEC_NAMES = {v: k for k, v in CODECS.items()}
COMPRESSIONS = {"none": 0, "zstd": 1}
COMPRESSION_NAMES = {v: k for k, v in COMPRESSIONS.items()}
CONTENT_TYPE = "application/vnd.lens.batch"

# Fields every record must carry, and their wire types.
REQUIRED_FIELDS: dict[str, type] = {
    "v": int,
    "id": bytes,
    "device_id": str,
    "run_id": str,
    "kind": str,
    "started_us": int,
    "ok": bool,
}
# Optional fields the aggregator reads into columns, with their wire types (None is always allowed).
COLUMN_FIELDS: dict[str, type] = {
    "model_name": str,
    "strategy": str,
    "engine": str,
    "error_type": str,
    "input_tokens": int,
    "output_tokens": int,
    "ttft_us": int,
    "tpot_us": int,
    "e2e_us": int,
}
_REQUIRED = tuple(REQUIRED_FIELDS.items())
_COLUMNS = tuple(COLUMN_FIELDS.items())
_MISSING = object()
_MS_FIELDS = (
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "prefill_ms",
    "decode_ms",
    "engine_prefill_ms",
    "engine_decode_ms",
)
_HEX_FIELDS = ("model_sha256", "prompt_sha256")
_TEXT_FIELDS = ("prompt_text", "output_text")


class WireError(Exception):
    """A batch or record the format refuses. ``status`` is the HTTP status the aggregator answers with."""

    status = 400

    def __init__(self, message: str, *, record_index: int | None = None, record_id: str | None = None) -> None:
        self.message = message
        self.record_index = record_index
        self.record_id = record_id
        super().__init__(message)


class UnsupportedVersion(WireError):
    status = 415


class TooLarge(WireError):
    status = 413


def _us(ms: float | None) -> int | None:
    return None if ms is None else round(ms * 1000)


def _parse_time_us(text: str) -> int:
    when = datetime.fromisoformat(text.replace("Z", "+00:00"))
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    delta = when - datetime(1970, 1, 1, tzinfo=timezone.utc)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def _format_time_us(us: int) -> str:
    when = datetime.fromtimestamp(us // 1_000_000, tz=timezone.utc).replace(microsecond=us % 1_000_000)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def to_wire(record: Mapping[str, Any], *, include_text: bool = False) -> dict[str, Any]:
    """Measurement dict → wire map (lossless at microsecond resolution)."""
    wire: dict[str, Any] = {}
    for key, value in record.items():
        if key in _MS_FIELDS:
            wire[key[:-3] + "_us"] = _us(value)
        elif key == "itl_ms":
            wire["itl_us"] = None if value is None else pack_gaps([round(gap * 1000) for gap in value])
        elif key == "id":
            wire["id"] = uuid.UUID(value).bytes
        elif key == "version":
            wire["v"] = value
        elif key == "started_at":
            wire["started_us"] = _parse_time_us(value)
        elif key in _HEX_FIELDS:
            wire[key] = bytes.fromhex(value) if value else None
        elif key in _TEXT_FIELDS:
            if include_text and value is not None:
                wire[key] = value
        else:
            wire[key] = value
    return wire


def from_wire(wire: Mapping[str, Any]) -> dict[str, Any]:
    """Wire map → measurement dict (times back in milliseconds). The gaps are held to
    :func:`record_schema.check_gaps`; a field that is not the wire's own but takes a name the measurement gives a
    wire field (``ttft_ms``, ``started_at``, …: :data:`record_schema.RECORD_NAMES`) is refused rather than let
    stand in for it (a ``record_schema.SchemaError``, a ValueError)."""
    record: dict[str, Any] = {}
    for key, value in wire.items():
        if key.endswith("_us") and key[:-3] + "_ms" in _MS_FIELDS:
            record[key[:-3] + "_ms"] = None if value is None else value / 1000.0
        elif key == "itl_us":
            if value is None:
                record["itl_ms"] = None
                continue
            gaps = unpack_gaps(bytes(value))
            record_schema.check_gaps(gaps)
            record["itl_ms"] = [gap / 1000.0 for gap in gaps]
        elif key in record_schema.RECORD_NAMES:
            raise record_schema.SchemaError(key, "is a name the measurement gives a named field; not an extra field")
        elif key == "id":
            record["id"] = str(uuid.UUID(bytes=bytes(value)))
        elif key == "v":
            record["version"] = value
        elif key == "started_us":
            record["started_at"] = _format_time_us(value)
        elif key in _HEX_FIELDS:
            record[key] = bytes(value).hex() if value is not None else None
        else:
            record[key] = value
    return record


def dumps(obj: Any, codec: str) -> bytes:
    if codec == "cbor":
        return bytes(cbor2.dumps(obj))
    if codec == "msgpack":
        return bytes(msgpack.packb(obj, use_bin_type=True))
    raise ValueError(f"unknown codec {codec!r}; expected one of {', '.join(CODECS)}")


def _refuse_tag(decoder: Any, tag: Any) -> Any:
    raise cbor2.CBORDecodeError(f"CBOR tag {tag.tag} refused: the wire format uses none")


def _refuse_semantic_tag(number: int) -> Any:
    def refuse(decoder: Any) -> Any:
        raise cbor2.CBORDecodeError(f"CBOR tag {number} refused: the wire format uses none")

    return refuse


def _refuse_ext(code: int, data: bytes) -> Any:
    raise ValueError(f"msgpack extension type {code} refused: the wire format uses none")


# Every tag cbor2 would interpret itself (datetimes, bignums, shared references 28/29, sets, …) is refused, and so
# is every other tag (tag_hook): a record is plain maps, lists, strings, bytes, numbers, booleans and null.
_NO_SEMANTIC_TAGS: dict[int, Any] = {tag: _refuse_semantic_tag(tag) for tag in (*range(0, 1024), 55799)}


def record_decoder(codec: str) -> Callable[[bytes], Any]:
    """``loads(blob, codec)`` bound to one codec, for decoding a batch's records in a loop: the same bounds and
    refusals; the caller turns any exception into a WireError (see ``loads``)."""
    if codec not in _DECODERS:
        raise WireError(f"unknown codec {codec!r}")
    return _DECODERS[codec]


def loads(blob: bytes, codec: str) -> Any:
    """Decode one record, bounded: no CBOR tags or msgpack extension types, nesting at most
    ``record_schema.MAX_DECODE_DEPTH``, every declared length checked against the bytes present before anything
    is allocated. Raises WireError on malformed or refused input (never anything else)."""
    decode = _DECODERS.get(codec)
    if decode is None:
        raise WireError(f"unknown codec {codec!r}")
    try:
        return decode(blob)
    except Exception as exc:  # every decoder failure is the sender's fault: report it, never crash
        raise WireError(f"malformed {codec}: {type(exc).__name__}: {exc}") from None


_DECODERS: dict[str, Callable[[bytes], Any]] = {
    "cbor": functools.partial(
        cbor2.loads,
        semantic_decoders=_NO_SEMANTIC_TAGS,
        tag_hook=_refuse_tag,
        max_depth=record_schema.MAX_DECODE_DEPTH,
        allow_indefinite=False,
        strict_hashable_types=True,
    ),
    "msgpack": functools.partial(
        msgpack.unpackb,
        raw=False,
        strict_map_key=True,
        max_str_len=4 * record_schema.MAX_TEXT_CHARS,
        max_bin_len=record_schema.MAX_RECORD_BYTES,
        max_array_len=record_schema.MAX_EXT_NODES,
        max_map_len=record_schema.MAX_EXT_NODES,
        max_ext_len=0,
        ext_hook=_refuse_ext,
    ),
}


def encode_record(record: Mapping[str, Any], codec: str, *, include_text: bool = False) -> bytes:
    return dumps(to_wire(record, include_text=include_text), codec)


def _record_id_hex(wire: dict[str, Any]) -> str | None:
    raw = wire.get("id")
    return raw.hex() if isinstance(raw, bytes) and len(raw) == 16 else None


def validate_record(wire: Any, index: int = 0) -> dict[str, Any]:
    """Check a decoded record: required fields present with the right types, column fields typed.

    Types are compared exactly (``type(v) is int``), so a boolean is not an integer; this runs once per record
    on ingest, so the happy path is kept to a few dict lookups.
    """
    if type(wire) is not dict:
        raise WireError(f"record {index}: expected a map, got {type(wire).__name__}", record_index=index)
    for name, kind in _REQUIRED:
        value = wire.get(name, _MISSING)
        if type(value) is not kind:
            rid = _record_id_hex(wire)
            if value is _MISSING:
                raise WireError(f"record {index}: missing required field {name!r}", record_index=index, record_id=rid)
            raise WireError(
                f"record {index}: field {name!r} must be {_type_name(kind)}, got {type(value).__name__}",
                record_index=index,
                record_id=rid,
            )
    if len(wire["id"]) != 16:
        raise WireError(f"record {index}: field 'id' must be 16 bytes", record_index=index)
    for name, kind in _COLUMNS:
        value = wire.get(name)
        if value is not None and type(value) is not kind:
            raise WireError(
                f"record {index}: field {name!r} must be {_type_name(kind)} or null, got {type(value).__name__}",
                record_index=index,
                record_id=_record_id_hex(wire),
            )
    return wire


def check_record(wire: Any, index: int, now_us: int) -> dict[str, Any]:
    """The aggregator's check of a decoded record: :func:`validate_record` and the strict schema
    (:func:`lens_core.record_schema.check_record`, relative to ``now_us``, the receive time). A refusal is a WireError
    naming the record's index, its id (hex, when readable) and the field."""
    if type(wire) is not dict:
        validate_record(wire, index)  # raises, in its words
    try:
        return record_schema.check_record(wire, now_us)  # covers validate_record's checks (fast path: cached shape)
    except record_schema.SchemaError as exc:
        validate_record(wire, index)  # a structural problem is reported as the agent's own check words it
        raise WireError(f"record {index}: {exc}", record_index=index, record_id=_record_id_hex(wire)) from None


def _type_name(kind: type) -> str:
    names = {int: "an integer", str: "a string", bool: "a boolean", bytes: "bytes"}
    return names.get(kind, kind.__name__)


@dataclass
class Batch:
    version: int
    codec: str
    compression: str
    device_id: str
    batch_id: str
    sent_us: int
    counters: dict[str, int]
    records: list[bytes] = field(default_factory=list)


def encode_batch(
    records: Sequence[bytes],
    *,
    device_id: str,
    batch_id: str,
    sent_us: int,
    codec: str = "cbor",
    compression: str = "zstd",
    level: int = 3,
    counters: Mapping[str, int] | None = None,
) -> bytes:
    payload = dumps(
        {
            "device_id": device_id,
            "batch_id": batch_id,
            "sent_us": sent_us,
            "counters": dict(counters or {}),
            "records": list(records),
        },
        codec,
    )
    if compression == "zstd":
        payload = zstandard.ZstdCompressor(level=level).compress(payload)
    elif compression != "none":
        raise ValueError(f"unknown compression {compression!r}; expected zstd or none")
    return HEADER.pack(MAGIC, WIRE_VERSION, CODECS[codec], COMPRESSIONS[compression], 0) + payload


MAX_BATCH_RECORDS = 10_000  # default bound on records per batch (the agent sends sync.batch_size, 500)
_MAX_ENVELOPE_ITEMS = 4096  # values in the payload besides the records (counters and the like)


def _cbor_head(data: bytes, pos: int) -> tuple[int, int, int]:
    """(major type, argument, position after the head) of the CBOR data item at ``pos``; definite lengths only."""
    if pos >= len(data):
        raise WireError("malformed cbor: truncated batch payload")
    initial = data[pos]
    major, info = initial >> 5, initial & 31
    if info < 24:
        return major, info, pos + 1
    if info > 27:
        raise WireError("malformed cbor: indefinite lengths and reserved values are not used by the wire format")
    width = 1 << (info - 24)
    if pos + 1 + width > len(data):
        raise WireError("malformed cbor: truncated batch payload")
    return major, int.from_bytes(data[pos + 1 : pos + 1 + width], "big"), pos + 1 + width


def _cbor_skip(data: bytes, pos: int, budget: list[int], depth: int = 0) -> int:
    """The position after the data item at ``pos``, walking at most ``budget`` items (no tags)."""
    budget[0] -= 1
    if budget[0] < 0 or depth > 8:
        raise WireError("batch payload holds too many or too deeply nested values besides its records")
    major, arg, pos = _cbor_head(data, pos)
    if major in (2, 3):
        if arg > len(data) - pos:
            raise WireError("malformed cbor: a string longer than the payload")
        return pos + arg
    if major in (4, 5):
        for _ in range(arg * (2 if major == 5 else 1)):
            pos = _cbor_skip(data, pos, budget, depth + 1)
        return pos
    if major == 6:
        raise WireError("malformed cbor: CBOR tags are refused (the wire format uses none)")
    return pos


def _cbor_envelope(data: bytes, max_records: int, max_record_bytes: int) -> dict[str, Any]:
    """The batch payload map, decoded without trusting its declared lengths: the record count is checked against
    ``max_records`` and the bytes present before the list exists; the other values are decoded one by one."""
    major, entries, pos = _cbor_head(data, 0)
    if major != 5:
        raise WireError("batch payload must be a map")
    if entries > 64:
        raise WireError(f"batch payload has {entries} fields; at most 64 are allowed")
    budget = [_MAX_ENVELOPE_ITEMS]
    out: dict[str, Any] = {}
    for _ in range(entries):
        major, length, pos = _cbor_head(data, pos)
        if major != 3 or length > 64 or length > len(data) - pos:
            raise WireError("batch payload keys must be short strings")
        try:
            key = data[pos : pos + length].decode()
        except UnicodeDecodeError:
            raise WireError("batch payload keys must be UTF-8 strings") from None
        pos += length
        if key == "records":
            major, count, pos = _cbor_head(data, pos)
            if major != 4:
                raise WireError("batch field 'records' must be a list of encoded records (bytes)")
            if count > max_records:
                raise TooLarge(f"batch holds {count} records; at most {max_records} are allowed per batch")
            if count > len(data) - pos:
                raise WireError(f"malformed cbor: {count} records announced in {len(data) - pos} bytes")
            records = []
            for _ in range(count):
                initial = data[pos] if pos < len(data) else -1
                if initial == 0x59 and pos + 3 <= len(data):  # bytes of 256..65535: nearly every record
                    major, length, pos = 2, (data[pos + 1] << 8) | data[pos + 2], pos + 3
                else:
                    major, length, pos = _cbor_head(data, pos)
                if major != 2:
                    raise WireError("batch field 'records' must be a list of encoded records (bytes)")
                if length > max_record_bytes:
                    raise WireError(f"a record of {length} bytes exceeds the limit of {max_record_bytes}")
                if length > len(data) - pos:
                    raise WireError("malformed cbor: a record longer than the payload")
                records.append(data[pos : pos + length])
                pos += length
            out[key] = records
        else:
            end = _cbor_skip(data, pos, budget)
            out[key] = loads(data[pos:end], "cbor")
            pos = end
    if pos != len(data):
        raise WireError("malformed cbor: extra data after the batch payload")
    return out


def _load_envelope(data: bytes, codec: str, max_records: int) -> Any:
    max_record_bytes = record_schema.MAX_RECORD_BYTES
    if codec == "cbor":
        return _cbor_envelope(data, max_records, max_record_bytes)
    try:
        return msgpack.unpackb(
            data,
            raw=False,
            strict_map_key=True,
            max_str_len=max_record_bytes,
            max_bin_len=max_record_bytes,
            max_array_len=max_records,
            max_map_len=_MAX_ENVELOPE_ITEMS,
            max_ext_len=0,
            ext_hook=_refuse_ext,
        )
    except Exception as exc:
        if "exceeds max_array_len" in str(exc):
            raise TooLarge(f"batch holds more than {max_records} records per batch: {exc}") from None
        raise WireError(f"malformed msgpack: {type(exc).__name__}: {exc}") from None


def decode_batch(body: bytes, *, max_decompressed: int, max_records: int = MAX_BATCH_RECORDS) -> Batch:
    """Parse a batch; refuses a decompressed payload over ``max_decompressed`` without allocating it, and more than
    ``max_records`` records before building their list."""
    if len(body) < HEADER.size or body[:4] != MAGIC:
        raise WireError("not a lens batch (expected the 8-byte header starting with b'LENS')")
    _, version, codec_id, compression_id, dict_id = HEADER.unpack_from(body)
    if version not in SUPPORTED_VERSIONS:
        supported = ", ".join(str(v) for v in SUPPORTED_VERSIONS)
        raise UnsupportedVersion(f"wire format version {version} is not supported; supported: {supported}")
    codec = CODEC_NAMES.get(codec_id)
    compression = COMPRESSION_NAMES.get(compression_id)
    if codec is None:
        raise UnsupportedVersion(f"codec id {codec_id} is not supported; supported: cbor (1), msgpack (2)")
    if compression is None or dict_id != 0:
        raise UnsupportedVersion(f"compression id {compression_id}/dictionary {dict_id} is not supported")
    payload = memoryview(body)[HEADER.size :]
    if compression == "zstd":
        data = _bounded_decompress(bytes(payload), max_decompressed)
    else:
        if len(payload) > max_decompressed:
            raise TooLarge(f"payload of {len(payload)} bytes exceeds the limit of {max_decompressed}")
        data = bytes(payload)
    obj = _load_envelope(data, codec, max_records)
    if not isinstance(obj, dict):
        raise WireError("batch payload must be a map")
    records = obj.get("records")
    if not isinstance(records, list) or not all(isinstance(r, bytes) for r in records):
        raise WireError("batch field 'records' must be a list of encoded records (bytes)")
    device_id, batch_id, sent_us = obj.get("device_id"), obj.get("batch_id"), obj.get("sent_us")
    if not isinstance(device_id, str) or not device_id:
        raise WireError("batch field 'device_id' must be a non-empty string")
    if not isinstance(batch_id, str) or type(sent_us) is not int:
        raise WireError("batch fields 'batch_id' (string) and 'sent_us' (integer) are required")
    names = record_schema.MAX_NAME_CHARS
    if len(device_id) > names or len(batch_id) > names or "\x00" in device_id + batch_id:
        raise WireError(f"batch fields 'device_id' and 'batch_id' must be at most {names} characters, without NUL")
    if not 0 <= sent_us <= record_schema.MAX_INT64:
        raise WireError(f"batch field 'sent_us' is {sent_us}; allowed: an integer from 0 to 2^63 - 1")
    counters = obj.get("counters") or {}
    if not isinstance(counters, dict) or not all(
        type(k) is str and type(v) is int and 0 <= v <= record_schema.MAX_INT64 for k, v in counters.items()
    ):
        raise WireError("batch field 'counters' must map names to integers from 0 to 2^63 - 1")
    if len(counters) > 64 or any(len(k) > 64 for k in counters):
        raise WireError("batch field 'counters' holds at most 64 names of at most 64 characters")
    return Batch(version, codec, compression, device_id, batch_id, sent_us, counters, records)


# -- the ingest answer: acknowledgements and refusals -----------------------------------------------------------
#
# A record leaves the device's outbox only on the aggregator's own acknowledgement of *that* batch; a captive
# portal, proxy or load balancer answering in the aggregator's place must never make the agent delete anything.
# Both answers are JSON objects carrying ``protocol``; an acknowledgement echoes the batch id, the number of
# records and a digest of their ids, and ``accepted + duplicates`` equals what was sent. A refusal names its
# ``code`` and what it refers to (the limit, the record). See docs/store-and-forward.md.

INGEST_PROTOCOL = "lens-ingest/1"
MAX_ANSWER_BYTES = 64 * 1024  # an ingest answer is a few hundred bytes; anything longer is not the aggregator's
MAX_ANSWER_DEPTH = 16  # an acknowledgement nests 3 levels deep; 30,000 would overflow the parser's recursion


def json_depth_exceeds(body: bytes | bytearray, limit: int) -> bool:
    """Whether JSON text nests arrays/objects deeper than ``limit`` (brackets inside strings do not count). A
    linear scan before parsing: Python's parser recurses once per level and raises RecursionError, not ValueError,
    on an answer built to be deep."""
    depth = 0
    in_string = escaped = False
    for byte in bytes(body):
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:  # quote
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):  # [ {
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def parse_answer_json(body: bytes | bytearray) -> Any:
    """An answer's JSON body, or None when it is not JSON or nests deeper than :data:`MAX_ANSWER_DEPTH` (never
    raises: the body is whatever the upstream sent)."""
    if len(body) > MAX_ANSWER_BYTES or json_depth_exceeds(body, MAX_ANSWER_DEPTH):
        return None
    try:
        return json.loads(bytes(body))
    except (ValueError, RecursionError):
        return None


REFUSAL_CODES = {
    "too_large": 413,  # carries "limit" (bytes)
    "record_invalid": 400,  # carries "record_index" and "record_id" (hex)
    "batch_invalid": 400,
    "unsupported_version": 415,
    "unauthorized": 401,
    "forbidden": 403,
    "wrong_device": 403,
}


def records_digest(ids: Sequence[bytes]) -> str:
    """sha256 over the records' 16-byte ids in batch order, hex: binds an acknowledgement to exactly these records."""
    digest = hashlib.sha256()
    for rid in ids:
        digest.update(rid)
    return digest.hexdigest()


def ingest_ack(batch_id: str, ids: Sequence[bytes], accepted: int, duplicates: int) -> dict[str, Any]:
    """The aggregator's acknowledgement of a stored batch."""
    return {
        "protocol": INGEST_PROTOCOL,
        "batch_id": batch_id,
        "received": len(ids),
        "accepted": accepted,
        "duplicates": duplicates,
        "records_sha256": records_digest(ids),
    }


def ingest_refusal(code: str, message: str, **fields: Any) -> dict[str, Any]:
    """The aggregator's structured refusal (``code`` from ``REFUSAL_CODES``)."""
    if code not in REFUSAL_CODES:
        raise ValueError(f"unknown refusal code {code!r}")
    return {"protocol": INGEST_PROTOCOL, "code": code, "error": message, **fields}


class AnswerError(Exception):
    """An answer to an upload that is not the aggregator's acknowledgement of the batch sent: keep everything."""

    def __init__(self, message: str) -> None:
        self.message = message
        super().__init__(message)


def _count(payload: dict[str, Any], name: str) -> int:
    value = payload.get(name)
    if type(value) is not int or value < 0:
        raise AnswerError(f"acknowledgement field {name!r} is {value!r}, not a count")
    return value


def check_ack(payload: Any, batch_id: str, ids: Sequence[bytes]) -> tuple[int, int]:
    """``(accepted, duplicates)`` when ``payload`` acknowledges exactly this batch; otherwise ``AnswerError``."""
    if not isinstance(payload, dict):
        raise AnswerError(f"JSON {type(payload).__name__} instead of an acknowledgement object")
    protocol = payload.get("protocol")
    if protocol != INGEST_PROTOCOL:
        raise AnswerError(f"JSON without the acknowledgement protocol {INGEST_PROTOCOL!r} (got {protocol!r})")
    if payload.get("batch_id") != batch_id:
        raise AnswerError(f"acknowledgement for batch {payload.get('batch_id')!r}, not for {batch_id!r}")
    received = _count(payload, "received")
    accepted = _count(payload, "accepted")
    duplicates = _count(payload, "duplicates")
    if received != len(ids) or accepted + duplicates != len(ids):
        raise AnswerError(
            f"acknowledgement counts do not add up: received {received}, accepted {accepted} + duplicates "
            f"{duplicates}, sent {len(ids)}"
        )
    if payload.get("records_sha256") != records_digest(ids):
        raise AnswerError("acknowledgement digest does not match the records sent")
    return accepted, duplicates


@dataclass(frozen=True)
class Refusal:
    code: str
    message: str
    limit: int | None = None
    record_index: int | None = None


def parse_refusal(status: int, payload: Any, ids: Sequence[bytes]) -> Refusal | None:
    """The aggregator's structured refusal of this batch, or None when the answer is not one (a proxy's, a WAF's).

    A refusal counts only when its code matches the HTTP status, a size refusal names the limit, and a record
    refusal names a record of this batch by index *and* id.
    """
    if not isinstance(payload, dict) or payload.get("protocol") != INGEST_PROTOCOL:
        return None
    code = payload.get("code")
    if not isinstance(code, str) or REFUSAL_CODES.get(code) != status:
        return None
    message = str(payload.get("error") or code)[:500]
    if code == "too_large":
        limit = payload.get("limit")
        return Refusal(code, message, limit=limit) if type(limit) is int and limit > 0 else None
    if code == "record_invalid":
        index, rid = payload.get("record_index"), payload.get("record_id")
        if type(index) is not int or not 0 <= index < len(ids):
            return None
        if rid is None:  # the aggregator could not read the record's id: bisect rather than trust the index alone
            return Refusal("batch_invalid", message)
        return Refusal(code, message, record_index=index) if rid == ids[index].hex() else None
    return Refusal(code, message)


def payload_size(body: bytes) -> int | None:
    """The decompressed payload size a batch announces (its frame header, or its length uncompressed), or None
    when it does not say; only a hint for scheduling work — ``decode_batch`` enforces the limits."""
    if len(body) < HEADER.size or body[:4] != MAGIC:
        return None
    compression = body[6]
    if compression == COMPRESSIONS["none"]:
        return len(body) - HEADER.size
    try:
        size = zstandard.get_frame_parameters(body[HEADER.size : HEADER.size + 18]).content_size
    except zstandard.ZstdError:
        return None
    return None if size == zstandard.CONTENTSIZE_UNKNOWN else int(size)


def _bounded_decompress(data: bytes, limit: int) -> bytes:
    try:
        declared = zstandard.get_frame_parameters(data).content_size
    except zstandard.ZstdError as exc:
        raise WireError(f"malformed zstd: {exc}") from None
    if declared != zstandard.CONTENTSIZE_UNKNOWN and declared > limit:  # refused from the frame header alone
        raise TooLarge(f"decompressed payload of {declared} bytes (frame header) exceeds the limit of {limit} bytes")
    try:
        reader = zstandard.ZstdDecompressor().stream_reader(data, read_across_frames=True)
        out = reader.read(limit + 1)
        while len(out) <= limit:
            more = reader.read(limit + 1 - len(out))
            if not more:
                break
            out += more
    except zstandard.ZstdError as exc:
        raise WireError(f"malformed zstd: {exc}") from None
    if len(out) > limit:
        raise TooLarge(f"decompressed payload exceeds the limit of {limit} bytes")
    return out
