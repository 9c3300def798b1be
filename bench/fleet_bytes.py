"""What a fleet costs on the wire and on /metrics: the fleet page, ``/api/v1/fleet`` and ``/metrics`` plain and gzipped,
per device, and what one device adds to /metrics (series and bytes), before and after a restart.

    .venv/bin/python bench/fleet_bytes.py [--devices 120] [--requests 60]

A real ``lens-aggregator serve`` on 127.0.0.1 (SQLite, default configuration). Each device (its own token) sends
``requests`` inference requests of one model (a few failed, of two error types) in one batch; every fourth device
also runs a second model. Then each answer is fetched with ``Accept-Encoding: identity`` and with ``gzip``. /metrics
is scraped before any device sent (the aggregator's own families) and after, so the difference is what the devices
cost; the server is restarted on the same database and scraped again (its series rebuilt from the store) with the
time it took to start. Figures for docs/PERFORMANCE.md and docs/metrics.md.
"""

from __future__ import annotations

import argparse
import gzip
import http.client
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.synthetic import synthetic_records
from aggregator.store import SQLiteStore
from lens_core import wire
from tests.netproxy import free_port
from tests.processes import AggregatorProcess


def fetch(port: int, path: str, encoding: str) -> tuple[int, bytes, str | None]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    conn.request("GET", path, headers={"Accept-Encoding": encoding})
    response = conn.getresponse()
    body = response.read()
    conn.close()
    return response.status, body, response.getheader("Content-Encoding")


def post(port: int, token: str, body: bytes) -> None:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=600)
    headers = {"Authorization": f"Bearer {token}", "Content-Type": wire.CONTENT_TYPE}
    conn.request("POST", "/api/v1/ingest", body=body, headers=headers)
    response = conn.getresponse()
    response.read()
    conn.close()
    if response.status != 200:
        raise SystemExit(f"ingest answered {response.status}")


def sizes(port: int, path: str) -> tuple[int, int]:
    """(plain bytes, gzip bytes) of one answer; the gzip one checked to decompress to a body of the plain size
    (± what moves between two requests: ages, the aggregator's own counters)."""
    status, plain, encoding = fetch(port, path, "identity")
    assert status == 200 and encoding is None, (path, status, encoding)
    status, packed, encoding = fetch(port, path, "gzip")
    assert status == 200 and encoding == "gzip", (path, status, encoding)
    assert abs(len(gzip.decompress(packed)) - len(plain)) < 0.01 * len(plain) + 200, path
    return len(plain), len(packed)


def device_series(text: str, device: str) -> int:
    return len(re.findall(rf'^\S+\{{[^}}]*device="{device}"', text, re.M))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=120)
    parser.add_argument("--requests", type=int, default=60)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "agg.db"
        store = SQLiteStore(db)
        names = [f"orin-{n:03d}" for n in range(args.devices)]
        tokens = {name: store.add_token(name, "device", time.time_ns() // 1000) for name in names}
        store.close()
        port = free_port()
        server = AggregatorProcess(db, port)
        server.start()
        try:
            empty_plain, empty_gzip = sizes(port, "/metrics")
            for n, name in enumerate(names):
                records = synthetic_records(args.requests, seed=n, device_id=name)
                for i, record in enumerate(records):
                    if i % 20 == 7:
                        record.update({"ok": False, "error_type": ("timeout", "decode_failed")[i % 2]})
                    if n % 4 == 0 and i % 2:
                        record["model_name"] = "Qwen2.5 0.5B Q8_0"
                blobs = [wire.encode_record(r, "cbor") for r in records]
                batch = wire.encode_batch(blobs, device_id=name, batch_id="b", sent_us=1, codec="cbor")
                post(port, tokens[name], batch)
            figures = {path: sizes(port, path) for path in ("/", "/api/v1/fleet", "/metrics")}
            text = fetch(port, "/metrics", "identity")[1].decode()
        finally:
            server.stop()
        started = time.perf_counter()
        server = AggregatorProcess(db, port)
        server.start()
        start_s = time.perf_counter() - started
        try:
            restarted = fetch(port, "/metrics", "identity")[1].decode()
        finally:
            server.stop()
    n = args.devices
    print(f"{n} devices, {args.requests} requests each (every fourth device two models), one batch each")
    print(f"{'answer':<16}{'plain':>12}{'gzip':>12}{'plain/device':>15}{'gzip/device':>14}{'ratio':>8}")
    for path, (plain, packed) in figures.items():
        print(f"{path:<16}{plain:>12,}{packed:>12,}{plain / n:>15,.0f}{packed / n:>14,.0f}{plain / packed:>8.1f}")
    plain, packed = figures["/metrics"]
    print(
        f"/metrics without devices: {empty_plain:,} B ({empty_gzip:,} gzip); per device: "
        f"{(plain - empty_plain) / n:,.0f} B plain, {(packed - empty_gzip) / n:,.0f} B gzip"
    )
    one, two = device_series(text, names[1]), device_series(text, names[0])
    print(f"/metrics lines of one device: {one} (one model), {two} (two models)")
    print(
        f"after a restart (started in {start_s:.2f} s, series rebuilt from the store): {len(restarted):,} B, "
        f"{device_series(restarted, names[1])} lines of one device"
    )


if __name__ == "__main__":
    main()
