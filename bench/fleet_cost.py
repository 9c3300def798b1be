"""What the fleet view costs the aggregator: ``/api/v1/fleet``'s rows and the regression search, on a big store.

    .venv/bin/python bench/fleet_cost.py [--devices 200] [--records 500] [--repeat 3]

A SQLite store filled with ``devices`` × ``records`` synthetic records (stored as ingest stores them), then
``fleet_rows`` (what every fleet page load and /api/v1/fleet read: each series' latest 50 requests, exact
percentiles, J/token from the records' energy) and ``find_regressions`` (each series' last 14 days of requests by
event time, at most 4,000, four metrics; every ``fleet.regression_interval``; bench/regressions.py measures it on a
seasonal fleet) timed ``repeat`` times.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.synthetic import synthetic_records
from aggregator.app import _row
from aggregator.fleet import fleet_rows
from aggregator.regressions import find_regressions
from aggregator.store import SQLiteStore
from lens_core import wire


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--records", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "agg.db", synchronous="OFF")
        for n in range(args.devices):
            device = f"orin-{n:03d}"
            rows = []
            for record in synthetic_records(args.records, seed=n, device_id=device):
                body = wire.encode_record(record, "cbor")
                rows.append(_row(wire.loads(body, "cbor"), "cbor", body))
            store.ingest(device, "b", 1, {}, rows, time.time_ns() // 1000)
        print(f"{store.record_count()} records, {args.devices} devices")
        for name, run in (
            ("fleet_rows", lambda: fleet_rows(store, time.time())),
            ("find_regressions", lambda: find_regressions(store)),
        ):
            times = []
            for _ in range(args.repeat):
                start = time.perf_counter()
                run()
                times.append(time.perf_counter() - start)
            print(f"{name:<18}" + " ".join(f"{t:.3f}" for t in times) + " s")
        store.close()


if __name__ == "__main__":
    main()
