"""Outbox append throughput as ratios against raw sqlite3 with the same pragmas and blobs, in one run.

    .venv/bin/python bench/outbox_append.py [--records 5000] [--durable 300]

* batched: ``Outbox.append_encoded`` of all records in one transaction vs ``executemany`` in one transaction;
* durable one by one: one ``Outbox.append_encoded`` per record (each committed, ``synchronous=FULL``) vs one
  commit per row with raw sqlite3.

Both sides write the same wire blobs (encoded once, beforehand) into tables of the same shape (WAL). The outbox
also keeps its byte counter and bound in the same transaction. Ratio = outbox records/s ÷ raw records/s (target
≥ 0.5 each). Encoding a record (``wire.encode_record``) is timed on its own.
"""

from __future__ import annotations

import argparse
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.outbox import ROW_OVERHEAD, Outbox
from agent.synthetic import synthetic_records
from lens_core import wire


def raw_db(path: Path, synchronous: str) -> sqlite3.Connection:
    conn = sqlite3.connect(str(path), isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute(f"PRAGMA synchronous={synchronous}")
    conn.execute(
        "CREATE TABLE records (seq INTEGER PRIMARY KEY, id BLOB NOT NULL, created_us INTEGER NOT NULL, "
        "codec TEXT NOT NULL, size INTEGER NOT NULL, body BLOB NOT NULL)"
    )
    conn.execute("CREATE UNIQUE INDEX idx_records_id ON records(id)")
    return conn


def rows_for(items: list[tuple[bytes, bytes]]) -> list[tuple[bytes, int, str, int, bytes]]:
    now = time.time_ns() // 1000
    return [(rid, now, "cbor", len(body) + ROW_OVERHEAD, body) for rid, body in items]


INSERT = "INSERT OR IGNORE INTO records(id, created_us, codec, size, body) VALUES (?, ?, ?, ?, ?)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=5000)
    parser.add_argument("--durable", type=int, default=300)
    args = parser.parse_args()
    records = synthetic_records(args.records, seed=1)
    t0 = time.perf_counter()
    items = [(uuid.UUID(r["id"]).bytes, wire.encode_record(r, "cbor")) for r in records]
    encode_us = (time.perf_counter() - t0) / len(records) * 1e6

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        # batched, one transaction
        conn = raw_db(root / "raw-batch.db", "FULL")
        t0 = time.perf_counter()
        conn.execute("BEGIN IMMEDIATE")
        conn.executemany(INSERT, rows_for(items))
        conn.execute("COMMIT")
        raw_batch = len(items) / (time.perf_counter() - t0)
        conn.close()
        box = Outbox(root / "box-batch.db", synchronous="FULL")
        t0 = time.perf_counter()
        box.append_encoded(items)
        box_batch = len(items) / (time.perf_counter() - t0)
        box.close()

        # durable, one commit per record
        few = items[: args.durable]
        conn = raw_db(root / "raw-one.db", "FULL")
        t0 = time.perf_counter()
        for row in rows_for(few):
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(INSERT, row)
            conn.execute("COMMIT")
        raw_one = len(few) / (time.perf_counter() - t0)
        conn.close()
        box = Outbox(root / "box-one.db", synchronous="FULL")
        t0 = time.perf_counter()
        for item in few:
            box.append_encoded([item])
        box_one = len(few) / (time.perf_counter() - t0)
        box.close()

    print(f"{'case':<40}{'raw sqlite3/s':>15}{'outbox/s':>12}{'ratio':>8}")
    print(f"{'batched, one transaction':<40}{raw_batch:>15,.0f}{box_batch:>12,.0f}{box_batch / raw_batch:>8.2f}")
    print(f"{'durable, one commit per record (FULL)':<40}{raw_one:>15,.0f}{box_one:>12,.0f}{box_one / raw_one:>8.2f}")
    print(f"encoding a record (to_wire + packed gaps + cbor): {encode_us:.0f} µs")


if __name__ == "__main__":
    main()
