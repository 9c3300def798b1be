"""What proving each acknowledgement costs an upload, as a ratio measured in one run.

    .venv/bin/python bench/sync_ack.py [--records 20000] [--batch-size 500]

A real aggregator (aiohttp on 127.0.0.1, SQLite store in a temporary directory) receives ``--records`` synthetic
records from a real outbox through ``Uploader.sync_now``: records/s end to end. Then the same batches' answers are
checked again on their own — ``wire.check_ack`` (protocol, batch id, counts, the sha256 digest of the record ids)
on each acknowledgement — and that time is put against the upload's: ack check ÷ upload wall time.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aiohttp import web

from agent.outbox import AsyncOutbox, Outbox
from agent.sync import SyncSettings, Uploader
from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
from lens_core import wire

DEVICE = "bench-dev"


async def run(records: int, batch_size: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "agg.db")
        token = store.add_token(DEVICE, "device", time.time_ns() // 1000)
        runner = web.AppRunner(create_app(Settings(), store))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        data = synthetic_records(records, seed=3, device_id=DEVICE)
        box = Outbox(Path(tmp) / "outbox.db", synchronous="NORMAL")
        box.append_many(data)
        outbox = AsyncOutbox(box)
        settings = SyncSettings(url=f"http://127.0.0.1:{port}", token=token, device_id=DEVICE, batch_size=batch_size)
        uploader = Uploader(outbox, settings)
        started = time.perf_counter()
        report = await uploader.sync_now()
        upload_s = time.perf_counter() - started
        await uploader.close()
        await outbox.close()
        await runner.cleanup()
        assert report.ok and report.accepted == records, report.as_dict()

        ids = [bytes.fromhex(r["id"].replace("-", "")) for r in data]
        batches = [ids[i : i + batch_size] for i in range(0, len(ids), batch_size)]
        acks = [wire.ingest_ack(f"batch-{n}", batch, len(batch), 0) for n, batch in enumerate(batches)]
        started = time.perf_counter()
        for n, (ack, batch) in enumerate(zip(acks, batches, strict=True)):
            wire.check_ack(ack, f"batch-{n}", batch)
        check_s = time.perf_counter() - started

    print(f"upload through the real aggregator: {records} records in {report.batches} batches, {upload_s:.2f} s")
    print(f"  {records / upload_s:,.0f} records/s end to end")
    print(f"acknowledgement checks: {check_s * 1e6 / len(batches):.1f} µs per {batch_size}-record batch")
    print(f"ratio  ack check ÷ upload wall time = {check_s / upload_s:.5f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    args = parser.parse_args()
    asyncio.run(run(args.records, args.batch_size))


if __name__ == "__main__":
    main()
