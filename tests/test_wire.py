"""Wire format v1: records, packed gaps, batches, and refusals."""

from __future__ import annotations

import contextlib
import json
import tracemalloc
import uuid

import cbor2
import msgpack
import pytest
import zstandard
from hypothesis import given, settings
from hypothesis import strategies as st

from agent.measurement import Measurement
from agent.synthetic import synthetic_records
from lens_core import wire
from lens_core.itlpack import PackError, pack_gaps, unpack_gaps


@given(st.lists(st.integers(min_value=0, max_value=10**9), max_size=300))
@settings(max_examples=300, deadline=None)
def test_gap_packing_round_trips(gaps: list[int]) -> None:
    assert unpack_gaps(pack_gaps(gaps)) == gaps


@given(st.binary(max_size=64))
@settings(max_examples=300, deadline=None)
def test_garbage_never_unpacks_into_anything_but_pack_error(data: bytes) -> None:
    with contextlib.suppress(PackError):
        unpack_gaps(data)


def test_gap_packing_is_compact_for_realistic_jitter() -> None:
    gaps = [3200 + (i * 37) % 200 - 100 for i in range(100)]  # ±100 µs around 3.2 ms
    assert len(pack_gaps(gaps)) < 1.25 * len(gaps)


@pytest.mark.parametrize("codec", ["cbor", "msgpack"])
def test_records_round_trip_through_the_wire(codec: str) -> None:
    for record in synthetic_records(50, seed=7):
        blob = wire.encode_record(record, codec)
        assert wire.from_wire(wire.validate_record(wire.loads(blob, codec))) == record


def test_measurement_round_trips_at_microsecond_resolution() -> None:
    m = Measurement(
        run_id="r",
        device_id="d",
        model_name="m",
        model_sha256="ab" * 32,
        ttft_ms=41.123456,
        itl_ms=[3.2004, 3.1996],
        e2e_ms=47.5,
        output_tokens=3,
        prompt_text="secret",
        output_text="x",
    )
    back = wire.from_wire(wire.loads(wire.encode_record(m.to_dict(), "cbor"), "cbor"))
    assert back["ttft_ms"] == 41.123 and back["itl_ms"] == [3.2, 3.2] and back["id"] == m.id
    assert back["started_at"] == m.started_at and back["model_sha256"] == "ab" * 32
    # privacy: text is not uploaded unless asked
    assert "prompt_text" not in back and "output_text" not in back
    kept = wire.from_wire(wire.loads(wire.encode_record(m.to_dict(), "cbor", include_text=True), "cbor"))
    assert kept["prompt_text"] == "secret"


def test_wire_record_types() -> None:
    w = wire.to_wire(synthetic_records(1, seed=1)[0])
    assert isinstance(w["id"], bytes) and len(w["id"]) == 16
    assert isinstance(w["started_us"], int) and isinstance(w["ttft_us"], int)
    assert isinstance(w["itl_us"], bytes) and len(w["model_sha256"]) == 32


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda w: w.pop("run_id"), "missing required field 'run_id'"),
        (lambda w: w.update(started_us="yesterday"), "field 'started_us' must be an integer"),
        (lambda w: w.update(ok=1), "field 'ok' must be a boolean"),
        (lambda w: w.update(id=b"short"), "field 'id' must be 16 bytes"),
        (lambda w: w.update(ttft_us=1.5), "field 'ttft_us' must be an integer or null"),
    ],
)
def test_validation_names_the_field(mutate, message: str) -> None:
    w = wire.to_wire(synthetic_records(1, seed=1)[0])
    mutate(w)
    with pytest.raises(wire.WireError, match=message) as info:
        wire.validate_record(w, index=3)
    assert info.value.record_index == 3


def _batch(records: list[bytes], codec: str = "cbor", compression: str = "zstd") -> bytes:
    return wire.encode_batch(
        records,
        device_id="dev",
        batch_id="b1",
        sent_us=1,
        codec=codec,
        compression=compression,
        counters={"dropped_total": 4},
    )


@pytest.mark.parametrize("codec", ["cbor", "msgpack"])
@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_batch_round_trip(codec: str, compression: str) -> None:
    blobs = [wire.encode_record(r, codec) for r in synthetic_records(20, seed=2)]
    batch = wire.decode_batch(_batch(blobs, codec, compression), max_decompressed=10**7)
    assert (batch.version, batch.codec, batch.compression) == (1, codec, compression)
    assert batch.records == blobs and batch.device_id == "dev" and batch.counters == {"dropped_total": 4}


def test_unsupported_version_lists_the_supported_ones() -> None:
    body = bytearray(_batch([]))
    body[4] = 9
    with pytest.raises(wire.UnsupportedVersion, match="version 9 is not supported; supported: 1"):
        wire.decode_batch(bytes(body), max_decompressed=10**6)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"hello", "not a lens batch"),
        (wire.HEADER.pack(b"LENS", 1, 1, 1, 0) + b"\x00garbage", "malformed zstd"),
        (wire.HEADER.pack(b"LENS", 1, 1, 0, 0) + b"\xff\xff", "malformed cbor"),
        (wire.HEADER.pack(b"LENS", 1, 2, 0, 0) + b"\xc1", "malformed msgpack"),
        (wire.HEADER.pack(b"LENS", 1, 1, 0, 0) + cbor2.dumps([1, 2]), "payload must be a map"),
        (wire.HEADER.pack(b"LENS", 1, 2, 0, 0) + msgpack.packb({"records": [1]}), "list of encoded records"),
    ],
)
def test_malformed_batches(body: bytes, message: str) -> None:
    with pytest.raises(wire.WireError, match=message) as info:
        wire.decode_batch(body, max_decompressed=10**6)
    assert info.value.status == 400


def zstd_bomb(size: int) -> bytes:
    """``size`` zero bytes compressed (a few KiB), written in a stream so it is never held in memory."""
    compressor = zstandard.ZstdCompressor(level=3)
    chunker = compressor.chunker(size=size)
    out = bytearray()
    zero = bytes(1 << 20)
    for _ in range(size // len(zero)):
        for chunk in chunker.compress(zero):
            out += chunk
    for chunk in chunker.finish():
        out += chunk
    return bytes(out)


def test_zstd_bomb_is_refused_without_allocating_it() -> None:
    body = wire.HEADER.pack(b"LENS", 1, 1, 1, 0) + zstd_bomb(256 * 1024**2)
    assert len(body) < 64 * 1024
    tracemalloc.start()
    try:
        with pytest.raises(wire.TooLarge) as info:
            wire.decode_batch(body, max_decompressed=4 * 1024**2)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert info.value.status == 413
    assert peak < 32 * 1024**2  # far below the 256 MiB it would decompress to


def test_wire_size_against_compact_json() -> None:
    """The benchmark's figure, as a regression guard: 1000 realistic records, cbor + zstd-3 vs compact JSON."""
    records = synthetic_records(1000, seed=1)
    as_json = sum(len(json.dumps(r, separators=(",", ":"))) for r in records)
    body = _batch([wire.encode_record(r, "cbor") for r in records])
    ratio = len(body) / as_json
    assert ratio < 0.15, f"wire bytes / compact JSON = {ratio:.3f}"


def test_record_ids_survive_as_uuids() -> None:
    record = synthetic_records(1, seed=3)[0]
    w = wire.to_wire(record)
    assert uuid.UUID(bytes=w["id"]) == uuid.UUID(record["id"])


IDS = [bytes([n]) * 16 for n in range(1, 6)]


def test_an_acknowledgement_binds_to_its_batch_and_records() -> None:
    ack = wire.ingest_ack("batch-1", IDS, 3, 2)
    assert wire.check_ack(json.loads(json.dumps(ack)), "batch-1", IDS) == (3, 2)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"protocol": "lens-ingest/0"}, "protocol"),
        ({"batch_id": "batch-2"}, "for batch 'batch-2'"),
        ({"accepted": 2}, "do not add up"),
        ({"received": 4, "accepted": 2}, "do not add up"),
        ({"accepted": "lots"}, "not a count"),
        ({"accepted": True}, "not a count"),
        ({"duplicates": -1, "accepted": 6}, "not a count"),
        ({"records_sha256": wire.records_digest(IDS[::-1])}, "digest"),
    ],
)
def test_anything_but_this_batch_s_acknowledgement_is_refused(change: dict[str, object], message: str) -> None:
    with pytest.raises(wire.AnswerError, match=message):
        wire.check_ack({**wire.ingest_ack("batch-1", IDS, 3, 2), **change}, "batch-1", IDS)


@pytest.mark.parametrize("payload", [None, [], "OK", {"status": "ok"}, {"accepted": 5}])
def test_json_that_is_not_an_acknowledgement_is_refused(payload: object) -> None:
    with pytest.raises(wire.AnswerError):
        wire.check_ack(payload, "batch-1", IDS)


def test_refusals_count_only_in_the_aggregator_s_own_shape() -> None:
    too_large = wire.ingest_refusal("too_large", "over", limit=1024)
    assert wire.parse_refusal(413, too_large, IDS) == wire.Refusal("too_large", "over", limit=1024)
    assert wire.parse_refusal(400, too_large, IDS) is None  # the code must match the status
    assert wire.parse_refusal(413, {**too_large, "limit": None}, IDS) is None  # a size refusal names its limit
    assert wire.parse_refusal(413, {"error": "too large"}, IDS) is None  # a proxy's JSON
    bad = wire.ingest_refusal("record_invalid", "bad", record_index=2, record_id=IDS[2].hex())
    assert wire.parse_refusal(400, bad, IDS) == wire.Refusal("record_invalid", "bad", record_index=2)
    assert wire.parse_refusal(400, {**bad, "record_id": IDS[1].hex()}, IDS) is None  # names another record
    assert wire.parse_refusal(400, {**bad, "record_index": 5}, IDS) is None  # not in this batch
    unread = {**bad, "record_id": None}  # the aggregator could not read the id: the batch is bisected instead
    assert wire.parse_refusal(400, unread, IDS) == wire.Refusal("batch_invalid", "bad")
    assert wire.parse_refusal(401, wire.ingest_refusal("unauthorized", "no"), IDS) == wire.Refusal("unauthorized", "no")
    with pytest.raises(ValueError):
        wire.ingest_refusal("teapot", "no")
