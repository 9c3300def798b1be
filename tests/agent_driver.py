"""A real agent process for the store-and-forward tests: produces records into the outbox while syncing.

    python -m tests.agent_driver --data-dir D --url U --token T [--count N] [--drain] [--max-outbox-bytes B]

Prints ``STORED <id>`` once an append is durable (the test's obligations), and on ``--drain`` a final
``STATS {json}`` line after everything pending was acknowledged. Built from the agent's own library: outbox,
uploader and the sync service (on the monotonic-clock scheduler).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys

from agent.measurement import new_record_id
from agent.outbox import AsyncOutbox, Outbox
from agent.sync import SyncService, SyncSettings, Uploader
from agent.synthetic import synthetic_records


async def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--url", required=True)
    parser.add_argument("--token", required=True)
    parser.add_argument("--device", default="dev-1")
    parser.add_argument("--count", type=int, default=0)
    parser.add_argument("--pause", type=float, default=0.003)
    parser.add_argument("--interval", type=float, default=0.2)
    parser.add_argument("--timeout", type=float, default=3.0)
    parser.add_argument("--batch-size", type=int, default=50)
    parser.add_argument("--max-outbox-bytes", type=int, default=64 * 1024**2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--drain", action="store_true")
    args = parser.parse_args()

    outbox = AsyncOutbox(Outbox(f"{args.data_dir}/outbox.db", max_bytes=args.max_outbox_bytes))
    settings = SyncSettings(
        url=args.url,
        token=args.token,
        device_id=args.device,
        batch_size=args.batch_size,
        timeout=args.timeout,
        interval=args.interval,
        backoff_initial=0.1,
        backoff_max=1.0,
    )
    uploader = Uploader(outbox, settings)
    if args.drain:
        for _ in range(600):
            report = await uploader.sync_now()
            if report.ok and report.pending == 0:
                break
            await asyncio.sleep(0.1)
        stats = await outbox.stats()
        print("STATS " + json.dumps(stats.__dict__), flush=True)
        await uploader.close()
        await outbox.close()
        return 0 if stats.records == 0 else 1

    service = SyncService(uploader)
    service.start()
    for record in synthetic_records(args.count, seed=args.seed, device_id=args.device):
        record["id"] = new_record_id()
        result = await outbox.append(record)
        if result.stored:
            sys.stdout.write(f"STORED {record['id']}\n")
            sys.stdout.flush()
        await asyncio.sleep(args.pause)
    await asyncio.sleep(args.interval * 3)
    await service.stop()
    await uploader.close()
    await outbox.close()
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
