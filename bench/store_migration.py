"""The store's schema-6 migration (dedupe per device: SQLite rebuilds ``measurements`` with UNIQUE (device_id, id)):
how long an aggregator upgraded in place takes to open a store of ``--rows`` records.

    .venv/bin/python bench/store_migration.py [--rows 200000]

A schema-5 SQLite store is built with the schema's own migrations 1–5 and filled with realistic records (100
agent.synthetic records repeated under fresh ids, bodies included); then ``SQLiteStore`` opens it, which migrates it
forward (through schema 8's backfill of ``contended``, which decodes every inference record's body once). Prints the
rows, the file's size, and the migration's wall time and rate.
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.synthetic import synthetic_records
from aggregator.app import _row
from aggregator.store import INSERT_COLUMNS, MIGRATIONS, SQLiteStore
from lens_core import wire
from lens_core.sqlite_schema import migrate_forward


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=200_000)
    args = parser.parse_args()
    records = [wire.to_wire(r) for r in synthetic_records(100, seed=1, device_id="bench-1")]
    rows = [_row(r, "cbor", wire.dumps(r, "cbor")) for r in records]
    columns = [c for c in INSERT_COLUMNS if c != "contended"]  # schema 5's (schema 8 added contended)
    old = [tuple(v for c, v in zip(INSERT_COLUMNS, (*row, 0, "b"), strict=True) if c != "contended") for row in rows]
    insert = f"INSERT INTO measurements ({', '.join(columns)}) VALUES ({', '.join('?' for _ in columns)})"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "agg.db"
        conn = sqlite3.connect(path, isolation_level=None)
        migrate_forward(conn, {v: MIGRATIONS[v] for v in range(1, 6)}, RuntimeError)
        conn.execute("BEGIN")
        conn.executemany(insert, ((uuid.uuid4().bytes, *old[i % 100][1:-2], i, "b") for i in range(args.rows)))
        conn.execute("COMMIT")
        conn.close()
        size = os.path.getsize(path)
        t0 = time.perf_counter()
        store = SQLiteStore(path)
        took = time.perf_counter() - t0
        version = store.schema_version()
        store.close()
    print(
        f"{args.rows} records, {size / 1e6:.0f} MB: schema 5 → {version} in {took:.1f} s "
        f"({args.rows / took:,.0f} records per second)"
    )


if __name__ == "__main__":
    main()
