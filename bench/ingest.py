"""Aggregator ingest throughput, end to end, with the aggregator on one core.

    .venv/bin/python bench/ingest.py [--records 200000] [--batch 500] [--codec cbor] [--connections 4]
                                     [--baseline REV] [--rounds 3]

Starts ``lens-aggregator serve`` pinned to CPU 0 on a fresh SQLite database, and sends pre-built zstd batches
of realistic records (agent.synthetic) from this process pinned to CPU 1, over HTTP on 127.0.0.1. Prints
accepted records per second as the aggregator stored them (every batch committed before its answer).

``--baseline REV`` measures a second aggregator, the code at git revision REV (checked out in a temporary worktree),
on the same batches in the same run, alternating the two for ``--rounds`` rounds, and prints the ratio of their
records per CPU-second (median of the rounds): how much the current code costs against REV.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp
import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.measurement import new_record_id
from agent.synthetic import synthetic_records
from aggregator.pgstore import PostgresStore
from aggregator.store import SQLiteStore
from lens_core import wire

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def send(url: str, token: str, bodies: list[bytes], connections: int) -> tuple[int, float]:
    queue: asyncio.Queue[bytes] = asyncio.Queue()
    for body in bodies:
        queue.put_nowait(body)
    accepted = 0

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal accepted
        while not queue.empty():
            body = queue.get_nowait()
            async with session.post(url, data=body, headers={"Authorization": f"Bearer {token}"}) as response:
                payload = await response.json()
                if response.status != 200:
                    raise RuntimeError(f"HTTP {response.status}: {payload}")
                accepted += payload["accepted"]

    async with aiohttp.ClientSession() as session:
        start = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(connections)))
        return accepted, time.perf_counter() - start


def measure(source: Path, db: Any, bodies: list[bytes], connections: int, postgres: bool) -> tuple[int, float, float]:
    """(accepted, wall seconds, CPU seconds of the aggregator) for one aggregator whose code is at ``source``."""
    store: Any = SQLiteStore(db) if not postgres else PostgresStore(db)
    token = store.add_token("bench", "device", time.time_ns() // 1000)
    store.close()
    port = free_port()
    launch = f"import sys; sys.path.insert(0, {str(source)!r}); from aggregator.cli import main; main()"
    server = subprocess.Popen(
        ["taskset", "-c", "0", sys.executable, "-c", launch, "serve", "--db", str(db), "--port", str(port)],
        stderr=subprocess.DEVNULL,
        cwd=source,
    )
    try:
        for _ in range(100):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        server_cpu = psutil.Process(server.pid)
        cpu_before = sum(server_cpu.cpu_times()[:2])
        accepted, seconds = asyncio.run(send(f"http://127.0.0.1:{port}/api/v1/ingest", token, bodies, connections))
        cpu_seconds = sum(server_cpu.cpu_times()[:2]) - cpu_before
    finally:
        server.terminate()
        server.wait()
    return accepted, seconds, cpu_seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--codec", choices=["cbor", "msgpack"], default="cbor")
    parser.add_argument("--connections", type=int, default=4)
    parser.add_argument("--db", help="a postgresql:// URL (an empty database) instead of a fresh SQLite file")
    parser.add_argument("--baseline", help="also measure the aggregator at this git revision, in the same run")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds with --baseline (median)")
    args = parser.parse_args()
    if args.db and args.baseline:
        parser.error("--baseline compares on fresh SQLite databases; leave out --db")

    template = synthetic_records(2000, seed=1, device_id="bench")
    blobs = []
    start = datetime.now(timezone.utc) - timedelta(days=30)  # inside the accepted window of every version
    for i in range(args.records):
        record = dict(template[i % len(template)])
        record["id"] = new_record_id()  # unique, time-ordered, like a device's records
        record["started_at"] = (start + timedelta(milliseconds=10 * i)).isoformat().replace("+00:00", "Z")
        blobs.append(wire.encode_record(record, args.codec))
    bodies = [
        wire.encode_batch(blobs[i : i + args.batch], device_id="bench", batch_id=str(i), sent_us=0, codec=args.codec)
        for i in range(0, len(blobs), args.batch)
    ]
    mb = sum(len(b) for b in bodies) / 1e6
    print(
        f"{args.records} records in {len(bodies)} batches of {args.batch} ({args.codec}, zstd-3, {mb:.1f} MB) "
        f"over {args.connections} connections, {'PostgreSQL (same machine)' if args.db else 'SQLite'}"
    )
    os.sched_setaffinity(0, {1})
    with tempfile.TemporaryDirectory() as tmp:
        sources = {"current": ROOT}
        if args.baseline:
            worktree = Path(tmp) / "baseline"
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(worktree), args.baseline], check=True
            )
            sources = {"baseline": worktree, "current": ROOT}
        rates: dict[str, list[float]] = {name: [] for name in sources}
        try:
            for round_ in range(args.rounds if args.baseline else 1):
                for name, source in sources.items():
                    db: Any = args.db or Path(tmp) / f"{name}-{round_}.db"
                    accepted, seconds, cpu_seconds = measure(source, db, bodies, args.connections, bool(args.db))
                    assert accepted == args.records, f"{name}: {accepted} of {args.records} accepted"
                    rates[name].append(accepted / cpu_seconds)
                    print(
                        f"{name:>8} (round {round_ + 1}): {accepted / seconds:,.0f} records/s wall ({seconds:.2f} s), "
                        f"{accepted / cpu_seconds:,.0f} records per CPU-second of the aggregator ({cpu_seconds:.2f} s, "
                        f"{cpu_seconds / seconds:.0%} of its core busy)"
                    )
        finally:
            if args.baseline:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(worktree)], check=False)
    if args.baseline:
        current, baseline = statistics.median(rates["current"]), statistics.median(rates["baseline"])
        print(
            f"records per CPU-second, median of {args.rounds} rounds: current {current:,.0f}, baseline "
            f"{args.baseline} {baseline:,.0f}; ratio {current / baseline:.3f}"
        )


if __name__ == "__main__":
    main()
