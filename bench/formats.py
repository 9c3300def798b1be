"""The specification's format table (§6.1), measured on our own records: bytes per record, raw and after zstd, and
encode and decode CPU per record for JSON, CBOR, msgpack, Protocol Buffers and Arrow IPC.

    .venv/bin/python bench/formats.py [--records 1000] [--seed 1] [--batch 500] [--repeat 3] [--raw FILE]

Every format starts from the same records — ``agent/synthetic.py``'s realistic local-inference records (what
``lens-agent bench`` stores: 63–127 inter-token gaps, the llama.cpp counters, memory) with the kernel's clock state
in ``ext.clock`` as the agent's outbox stamps it, or with ``--raw FILE`` the requests a real ``lens-agent bench --raw
FILE`` wrote (their prompt and output text left out, as the wire leaves them out by default) — and decodes back to
them:

- JSON: the measurement dict as ``--raw`` and the JSON export write it (compact separators; gaps as ms floats).
- CBOR / msgpack, wire v1: what the agent stores and sends (``lens_core.wire.encode_record``: integer µs, the gaps
  Rice-packed by ``lens_core.itlpack``); decoding includes unpacking the gaps (``from_wire``).
- CBOR, plain dict: the same dict as JSON, in CBOR (what the wire would cost without its mapping).
- protobuf: ``llm_latency_lens.v1.InferenceMeasurement`` (``lens_core.protobuf``: gaps as packed varints of µs);
  both directions include ingest's bounds check (``record_schema.check_record``: its cost is printed apart).
- Arrow IPC: the whole record as one row of a table (every field a column, gaps a list<int64> of µs, ext as JSON
  text), one IPC stream per batch; per record = the batch's cost ÷ its records. "one record alone" is one stream per
  record (what a device writing each measurement as it comes would pay: the schema with every message).

Bytes raw = one record encoded alone, averaged; zstd = a batch of ``--batch`` records (the agent's sync.batch_size),
the encoded records concatenated (Arrow: one stream) and compressed at level 3 as the wire batch is, ÷ records. CPU
is process time per record, the best of ``--repeat`` passes (encode: record dict → bytes; decode: bytes → record
dict).
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pyarrow as pa
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.clock import stamp
from agent.synthetic import synthetic_records
from lens_core import protobuf, record_schema, wire
from lens_core.itlpack import pack_gaps, unpack_gaps
from lens_core.proto.llm_latency_lens.v1 import measurement_pb2 as pb

Record = dict[str, Any]


def _cpu_per_record(fn: Callable[[], object], count: int, repeat: int) -> float:
    """Best process-time µs per record over ``repeat`` passes of ``fn`` (which handles ``count`` records)."""
    best = float("inf")
    for _ in range(repeat):
        start = time.process_time_ns()
        fn()
        best = min(best, (time.process_time_ns() - start) / 1000 / count)
    return best


# -- Arrow: the whole record as a row --------------------------------------------------------------------------
_STRINGS = ("device_id", "run_id", "kind", "model_name", "strategy", "engine", "error_type", "error_message",
            "stop_reason", "prompt_id", "rss_peak_source")  # fmt: skip
_INTS = ("v", "started_us", "ttft_us", "tpot_us", "e2e_us", "prefill_us", "decode_us", "engine_prefill_us",
         "engine_prefill_tokens", "engine_decode_us", "engine_decode_tokens", "input_tokens", "output_tokens",
         "prompt_index", "rss_before_bytes", "rss_peak_bytes")  # fmt: skip
ARROW_SCHEMA = pa.schema(
    [
        pa.field("id", pa.binary(16), nullable=False),
        *(pa.field(name, pa.utf8()) for name in _STRINGS),
        *(pa.field(name, pa.int64()) for name in _INTS),
        pa.field("ok", pa.bool_()),
        pa.field("warmup", pa.bool_()),
        pa.field("first_after_load", pa.bool_()),
        pa.field("model_sha256", pa.binary(32)),
        pa.field("prompt_sha256", pa.binary(32)),
        pa.field("itl_us", pa.list_(pa.int64())),
        pa.field("ext", pa.utf8()),  # Arrow has no dynamic map: the open ext as JSON text
    ]
)
_FLAT = [f.name for f in ARROW_SCHEMA]


def arrow_encode(records: list[Record]) -> bytes:
    columns: dict[str, list[Any]] = {name: [] for name in _FLAT}
    for record in records:
        w = wire.to_wire({k: v for k, v in record.items() if k != "itl_ms"})  # the gaps: a list, not packed
        for name in _FLAT:
            if name == "id":
                columns[name].append(w["id"])
            elif name == "itl_us":
                columns[name].append([round(g * 1000) for g in record["itl_ms"]])
            elif name == "ext":
                columns[name].append(json.dumps(w.get("ext") or {}, separators=(",", ":")))
            else:
                columns[name].append(w.get(name))
    table = pa.Table.from_pydict(columns, schema=ARROW_SCHEMA)
    sink = io.BytesIO()
    with pa.ipc.new_stream(sink, ARROW_SCHEMA) as writer:
        writer.write_table(table)
    return sink.getvalue()


def arrow_decode(data: bytes) -> list[Record]:
    rows = pa.ipc.open_stream(data).read_all().to_pylist()
    out = []
    for row in rows:
        gaps = row.pop("itl_us")
        row["ext"] = json.loads(row["ext"])
        record = wire.from_wire(row)
        record["itl_ms"] = None if gaps is None else [gap / 1000.0 for gap in gaps]
        out.append(record)
    return out


# -- the formats --------------------------------------------------------------------------------------------------
def json_codec() -> tuple[Callable[[Record], bytes], Callable[[bytes], Record]]:
    return (lambda r: json.dumps(r, separators=(",", ":")).encode()), json.loads


def wire_codec(codec: str) -> tuple[Callable[[Record], bytes], Callable[[bytes], Record]]:
    decode = wire.record_decoder(codec)
    return (lambda r: wire.encode_record(r, codec)), (lambda b: wire.from_wire(decode(b)))


def plain_cbor() -> tuple[Callable[[Record], bytes], Callable[[bytes], Record]]:
    return cbor2.dumps, cbor2.loads


def protobuf_codec(now_us: int) -> tuple[Callable[[Record], bytes], Callable[[bytes], Record]]:
    def encode(record: Record) -> bytes:
        return protobuf.record_to_message(record, now_us=now_us).SerializeToString()

    def decode(data: bytes) -> Record:
        return protobuf.message_to_record(pb.InferenceMeasurement.FromString(data), now_us=now_us)

    return encode, decode


def per_record_row(
    label: str, codec: tuple[Callable[[Record], bytes], Callable[[bytes], Record]], records: list[Record], args: Any
) -> tuple[str, float, float, float, float]:
    encode, decode = codec
    blobs = [encode(r) for r in records]
    for blob, record in zip(blobs[:50], records[:50], strict=True):  # every format reads back what it wrote
        back = decode(blob)
        assert back["id"] == record["id"] and back.get("output_tokens") == record.get("output_tokens"), label
    raw = sum(map(len, blobs)) / len(blobs)
    compressor = zstandard.ZstdCompressor(level=3)
    batches = [b"".join(blobs[i : i + args.batch]) for i in range(0, len(blobs), args.batch)]
    packed = sum(len(compressor.compress(b)) for b in batches) / len(blobs)
    enc = _cpu_per_record(lambda: [encode(r) for r in records], len(records), args.repeat)
    dec = _cpu_per_record(lambda: [decode(b) for b in blobs], len(records), args.repeat)
    return label, raw, packed, enc, dec


def arrow_rows(records: list[Record], args: Any) -> list[tuple[str, float, float, float, float]]:
    batches = [records[i : i + args.batch] for i in range(0, len(records), args.batch)]
    streams = [arrow_encode(b) for b in batches]
    assert [r["id"] for r in arrow_decode(streams[0])] == [r["id"] for r in batches[0]]
    compressor = zstandard.ZstdCompressor(level=3)
    raw = sum(map(len, streams)) / len(records)
    packed = sum(len(compressor.compress(s)) for s in streams) / len(records)
    enc = _cpu_per_record(lambda: [arrow_encode(b) for b in batches], len(records), args.repeat)
    dec = _cpu_per_record(lambda: [arrow_decode(s) for s in streams], len(records), args.repeat)
    sample = records[:100]
    alone = [arrow_encode([r]) for r in sample]
    alone_enc = _cpu_per_record(lambda: [arrow_encode([r]) for r in sample], len(sample), args.repeat)
    alone_dec = _cpu_per_record(lambda: [arrow_decode(s) for s in alone], len(sample), args.repeat)
    one_raw = sum(map(len, alone)) / len(alone)
    return [
        (f"Arrow IPC, batches of {args.batch}", raw, packed, enc, dec),
        ("Arrow IPC, one record alone", one_raw, float("nan"), alone_enc, alone_dec),
    ]


DESCRIPTION = (
    "The specification's format table (§6.1), measured on our own records: bytes per record (raw, and after zstd "
    "over a batch) and encode and decode CPU per record, for JSON, CBOR, msgpack, Protocol Buffers and Arrow IPC. "
    "Every format encodes the same records and decodes them back; figures and what each row includes: "
    "docs/PERFORMANCE.md (Formats compared on the same records)."
)
EPILOG = (
    "Records: agent/synthetic.py's realistic local-inference records (63-127 inter-token gaps, the llama.cpp "
    "counters, memory, ext.clock), or with --raw the requests of a real lens-agent bench --raw FILE (their texts "
    "left out, as the wire leaves them out). Raw bytes: one record encoded alone, averaged. CPU: process time per "
    "record, the best of --repeat passes."
)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer; allowed: 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} is not allowed: 1 or more")
    return value


def parser() -> argparse.ArgumentParser:
    out = argparse.ArgumentParser(
        prog="bench/formats.py",
        description=DESCRIPTION,
        epilog=EPILOG,
    )
    out.add_argument(
        "--records",
        type=_positive,
        default=1000,
        metavar="N",
        help="synthetic records to encode (default 1000; ignored with --raw)",
    )
    out.add_argument(
        "--seed", type=int, default=1, help="seed of the synthetic records: the same seed, the same records (default 1)"
    )
    out.add_argument(
        "--batch",
        type=_positive,
        default=500,
        metavar="N",
        help="records per batch compressed with zstd (level 3), as the agent's sync.batch_size batches them; "
        "Arrow IPC writes one stream a batch (default 500)",
    )
    out.add_argument(
        "--repeat",
        type=_positive,
        default=3,
        metavar="N",
        help="timed passes per figure; the best one is printed (default 3)",
    )
    out.add_argument(
        "--raw",
        type=Path,
        metavar="FILE",
        help="a JSON-lines file lens-agent bench --raw FILE wrote: measure its requests instead of synthetic ones",
    )
    return out


def _raw_records(args: argparse.Namespace, cli: argparse.ArgumentParser) -> list[dict[str, Any]]:
    """The requests of a ``lens-agent bench --raw`` file, texts left out; a clear refusal (exit 2) otherwise."""
    try:
        text = args.raw.read_text()
    except (OSError, UnicodeDecodeError) as exc:
        cli.error(f"--raw {args.raw}: cannot read it ({exc.__class__.__name__}: {exc})")
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError as exc:
            cli.error(f"--raw {args.raw}, line {number}: not JSON ({exc})")
        if type(record) is not dict or not {"id", "started_at", "itl_ms"} <= set(record):
            cli.error(
                f"--raw {args.raw}, line {number}: not a request of lens-agent bench --raw (id, started_at, itl_ms)"
            )
        records.append(stamp({k: v for k, v in record.items() if k not in ("prompt_text", "output_text")}))
    if not records:
        cli.error(f"--raw {args.raw}: holds no requests")
    return records


def main() -> None:
    cli = parser()
    args = cli.parse_args()
    if args.raw is not None:
        records = _raw_records(args, cli)
        print(f"{args.raw}: ", end="")
    else:
        records = [stamp(r) for r in synthetic_records(args.records, seed=args.seed)]
    now_us = time.time_ns() // 1000
    gaps = sum(len(r["itl_ms"] or ()) for r in records)
    print(f"{len(records)} records, {gaps / len(records):.0f} gaps per record, zstd-3 over batches of {args.batch}")
    rows = [
        per_record_row("JSON (the measurement dict)", json_codec(), records, args),
        per_record_row("CBOR, plain dict", plain_cbor(), records, args),
        per_record_row("CBOR, wire v1 (the default)", wire_codec("cbor"), records, args),
        per_record_row("msgpack, wire v1", wire_codec("msgpack"), records, args),
        per_record_row("protobuf (InferenceMeasurement)", protobuf_codec(now_us), records, args),
        *arrow_rows(records, args),
    ]
    json_raw, json_zstd = rows[0][1], rows[0][2]
    print(f"{'format':<36}{'raw B':>9}{'÷JSON':>7}{'zstd B':>9}{'÷JSON':>7}{'encode µs':>11}{'decode µs':>11}")
    for label, raw, packed, enc, dec in rows:
        print(
            f"{label:<36}{raw:>9.1f}{raw / json_raw:>7.3f}{packed:>9.1f}{packed / json_zstd:>7.3f}"
            f"{enc:>11.1f}{dec:>11.1f}"
        )
    wires = [wire.to_wire(r) for r in records]
    check = _cpu_per_record(lambda: [record_schema.check_record(w, now_us) for w in wires], len(wires), args.repeat)
    messages = [protobuf.record_to_message(r, now_us=now_us) for r in records]
    serialise = _cpu_per_record(lambda: [m.SerializeToString() for m in messages], len(messages), args.repeat)
    blobs = [m.SerializeToString() for m in messages]
    parse = _cpu_per_record(lambda: [pb.InferenceMeasurement.FromString(b) for b in blobs], len(blobs), args.repeat)
    print(
        f"protobuf's parts: ingest's bounds check {check:.1f} µs (in both directions above), "
        f"SerializeToString {serialise:.1f} µs, FromString {parse:.1f} µs per record"
    )
    gap_bytes = sum(len(protobuf.record_to_message(r, now_us=now_us).latency.inter_token_gaps.SerializeToString())
                    for r in records) / max(gaps, 1)  # fmt: skip
    packed_bytes = sum(len(wire.to_wire(r)["itl_us"] or b"") for r in records) / max(gaps, 1)
    gap_lists = [[round(g * 1000) for g in r["itl_ms"] or ()] for r in records]
    pack = _cpu_per_record(lambda: [pack_gaps(g) for g in gap_lists], len(records), args.repeat)
    packed_lists = [pack_gaps(g) for g in gap_lists]
    unpack = _cpu_per_record(lambda: [unpack_gaps(p) for p in packed_lists], len(records), args.repeat)
    print(
        f"gaps: protobuf varints {gap_bytes:.2f} B/gap, wire v1 Rice-packed {packed_bytes:.2f} B/gap "
        f"(packing {pack:.1f} µs, unpacking {unpack:.1f} µs per record: most of wire v1's CPU above)"
    )


if __name__ == "__main__":
    main()
