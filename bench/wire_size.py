"""Wire bytes per record against the same records as compact JSON, for 1000 seeded realistic records.

    .venv/bin/python bench/wire_size.py [--records 1000] [--seed 1]

Compares the wire format (per-record maps in integer microseconds with Rice-packed gaps, zstd batch) with
plain CBOR + zstd-3 of the same records and with compact JSON (``separators=(',', ':')``), and reports the
entropy floor of the gaps themselves (what no lossless encoding at microsecond resolution can beat).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections import Counter
from pathlib import Path

import cbor2
import zstandard

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.synthetic import synthetic_records
from lens_core import wire


def gap_entropy_bytes(records: list[dict]) -> float:
    """Order-0 entropy of the gap residuals from each list's median, in bytes, summed over records."""
    total_bits = 0.0
    for record in records:
        gaps = [round(g * 1000) for g in record["itl_ms"]]
        if not gaps:
            continue
        median = sorted(gaps)[len(gaps) // 2]
        counts = Counter(max(-4096, min(4096, g - median)) // 16 for g in gaps)  # 16 µs bins: a lower bound
        n = len(gaps)
        total_bits += -sum(c * math.log2(c / n) for c in counts.values()) + n * 4  # + the 4 bits inside a bin
    return total_bits / 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    records = synthetic_records(args.records, seed=args.seed)
    as_json = sum(len(json.dumps(r, separators=(",", ":"))) for r in records)
    plain = len(zstandard.ZstdCompressor(level=3).compress(cbor2.dumps(records)))
    gaps = sum(len(r["itl_ms"]) for r in records)
    print(f"{args.records} records, {gaps} gaps ({gaps / args.records:.0f} per record), compact JSON {as_json:,} B")
    print(f"{'encoding':<44}{'bytes':>10}{'B/record':>10}{'÷ JSON':>8}")
    print(f"{'plain CBOR + zstd-3':<44}{plain:>10,}{plain / args.records:>10.1f}{plain / as_json:>8.3f}")
    for codec in ("cbor", "msgpack"):
        blobs = [wire.encode_record(r, codec) for r in records]
        for level in (3, 9, 19):
            body = wire.encode_batch(blobs, device_id="d", batch_id="b", sent_us=0, codec=codec, level=level)
            label = f"wire v1, {codec}, zstd-{level}"
            print(f"{label:<44}{len(body):>10,}{len(body) / args.records:>10.1f}{len(body) / as_json:>8.3f}")
    packed = sum(len(wire.to_wire(r)["itl_us"]) for r in records)
    floor = gap_entropy_bytes(records)
    print(
        f"gaps alone: packed {packed / gaps:.2f} B/gap; entropy of their jitter ≈ {floor / gaps:.2f} B/gap "
        f"(JSON spends {sum(len(json.dumps(r['itl_ms'], separators=(',', ':'))) for r in records) / gaps:.2f})"
    )


if __name__ == "__main__":
    main()
