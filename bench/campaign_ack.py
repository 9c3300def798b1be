"""What listing a device's benchmark jobs costs each ingest acknowledgement, as ratios measured in one run.

    .venv/bin/python bench/campaign_ack.py [--batches 300] [--records 20] [--campaigns 100] [--devices 500]

A real aggregator (aiohttp on 127.0.0.1, SQLite store in a temporary directory) receives small batches
(``--records`` synthetic records each, a device's usual sync) from three devices, interleaved, and the round trip of
each upload is timed: ``idle`` (no campaign in the store at all, first), then, after ``--campaigns`` campaigns over
``--devices`` known devices were started, ``quiet`` (a device with no job) and ``busy`` (a device with 8 queued jobs:
its ack carries them). The query itself (``Store.device_jobs``) is also timed on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from aiohttp import web

from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.campaigns import CampaignSettings
from aggregator.store import CampaignRow, SQLiteStore
from lens_core import wire

SUITE = {"test_suite": {"name": "bench"}, "models": [{"name": "m", "endpoint": "gguf:default"}], "workloads": []}


def batch(device: str, records: int, seed: int) -> bytes:
    data = synthetic_records(records, seed=seed, device_id=device)
    blobs = [wire.encode_record(r, "cbor") for r in data]
    return wire.encode_batch(blobs, device_id=device, batch_id=str(uuid.uuid4()), sent_us=1, codec="cbor")


def add_campaigns(store: SQLiteStore, campaigns: int, devices: list[str], busy: str) -> None:
    now = time.time_ns() // 1000
    per = max(1, len(devices) // campaigns)
    for n in range(campaigns):
        row = CampaignRow(
            str(uuid.uuid4()), f"c{n}", now + n, "bench", json.dumps(SUITE), "0" * 64, "{}", now + 86_400_000_000,
            None, "pending", None, None, 60.0,
        )  # fmt: skip
        targets = devices[n * per : (n + 1) * per] + ([busy] if n < 8 else [])
        store.add_campaign(row, targets, {})


async def run(batches: int, records: int, campaigns: int, n_devices: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "agg.db", synchronous="NORMAL")
        now = time.time_ns() // 1000
        names = ["idle-dev", "quiet-dev", "busy-dev"]
        tokens = {d: store.add_token(d, "device", now) for d in names}
        app = create_app(Settings(campaigns=CampaignSettings(check_interval_s=3600)), store)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/api/v1/ingest"
        bodies = {d: [batch(d, records, seed=i) for i in range(batches)] for d in names}
        times: dict[str, list[float]] = {d: [] for d in names}
        async with aiohttp.ClientSession() as session:

            async def post(device: str, i: int) -> dict[str, object]:
                started = time.perf_counter()
                async with session.post(
                    url, data=bodies[device][i], headers={"Authorization": f"Bearer {tokens[device]}"}
                ) as r:
                    answer = await r.json()
                    assert r.status == 200, answer
                times[device].append(time.perf_counter() - started)
                return dict(answer)

            for i in range(batches):  # no campaigns at all
                assert "jobs" not in await post("idle-dev", i)
            devices = [f"fleet-{n:05d}" for n in range(n_devices)]
            for device in devices:  # the fleet the campaigns target: known devices
                store.ingest(device, "b", 1, {}, [], now)
            await asyncio.get_running_loop().run_in_executor(None, add_campaigns, store, campaigns, devices, "busy-dev")
            for i in range(batches):
                assert "jobs" not in await post("quiet-dev", i)
                jobs = (await post("busy-dev", i))["jobs"]
                assert isinstance(jobs, list) and len(jobs) == 8
        await runner.cleanup()
        store = SQLiteStore(Path(tmp) / "agg.db")
        query: dict[str, float] = {}
        for device in ("quiet-dev", "busy-dev"):
            started = time.perf_counter()
            for _ in range(2000):
                store.device_jobs(device, 8)
            query[device] = (time.perf_counter() - started) / 2000
        store.close()

    med = {d: statistics.median(t) * 1e3 for d, t in times.items()}
    print(f"{batches} batches of {records} records per device; {campaigns} campaigns over {n_devices} devices")
    print(f"  upload round trip, median: idle {med['idle-dev']:.2f} ms, quiet {med['quiet-dev']:.2f} ms, ", end="")
    print(f"busy (8 jobs in the ack) {med['busy-dev']:.2f} ms")
    print(
        f"  device_jobs query alone: no job {query['quiet-dev'] * 1e6:.0f} µs, 8 jobs {query['busy-dev'] * 1e6:.0f} µs"
    )
    print(f"ratio  quiet ÷ idle = {med['quiet-dev'] / med['idle-dev']:.3f}")
    print(f"ratio  busy ÷ idle = {med['busy-dev'] / med['idle-dev']:.3f}")
    print(f"ratio  query (8 jobs) ÷ busy round trip = {query['busy-dev'] * 1e3 / med['busy-dev']:.4f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=300)
    parser.add_argument("--records", type=int, default=20)
    parser.add_argument("--campaigns", type=int, default=100)
    parser.add_argument("--devices", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(run(args.batches, args.records, args.campaigns, args.devices))


if __name__ == "__main__":
    main()
