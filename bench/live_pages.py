"""Ingest latency while fleet pages stay open: live updates that carry the device's row against whole-fleet refetches.

    .venv/bin/python bench/live_pages.py [--devices 200] [--preload 100] [--pages 5] [--batches 200] [--history 2000]

A real ``lens-aggregator serve`` on 127.0.0.1 with ``devices`` devices of ``preload`` records each. Then ``pages``
open fleet pages follow ``/api/v1/stream`` while ``batches`` batches of 20 records arrive, one after another, from
the devices in turn; each batch's ingest round trip is timed. Two ways a page can follow, in the same run against the
same server: ``incremental`` (the page today: each event carries the device's new fleet row, the page replaces
that row) and ``refetch`` (what it did before: every event made every page GET /api/v1/fleet). Also the fleet
page's own load time (GET /, which inlines every device's row).

Then the same for ``pages`` open *device* pages (each following one of the first devices, which have ``history``
records over three weeks): ``tail`` (the page today: on each batch of its device it fetches its timeline from the
last bucket on) against ``newest1000`` (what it did before: GET the device's newest 1000 measurements), and the
device page's own load time and weight with that history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.synthetic import synthetic_records
from aggregator.store import SQLiteStore
from lens_core import wire
from tests.netproxy import free_port
from tests.processes import AggregatorProcess


def batch(device: str, n: int, seed: int, *, weeks: bool = False) -> bytes:
    records = synthetic_records(n, seed=seed, device_id=device)
    if weeks:  # spread over three weeks, ending now
        end = datetime.now(timezone.utc)
        for i, r in enumerate(records):
            when = end - timedelta(seconds=21 * 86400 * (n - 1 - i) / max(1, n - 1))
            r["started_at"] = when.isoformat(timespec="microseconds").replace("+00:00", "Z")
    else:  # now, so that they land in the device pages' last bucket
        for r in records:
            r["started_at"] = datetime.now(timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")
    blobs = [wire.encode_record(r, "cbor") for r in records]
    return wire.encode_batch(blobs, device_id=device, batch_id=f"b{seed}", sent_us=1, codec="cbor")


async def page(url: str, mode: str, fetches: list[float], stop: asyncio.Event) -> None:
    """One open fleet page: follows the stream; in ``refetch`` mode every event costs a GET /api/v1/fleet."""
    async with aiohttp.ClientSession() as session, session.get(url + "/api/v1/stream") as stream:
        while not stop.is_set():
            try:
                line = await asyncio.wait_for(stream.content.readline(), 0.5)
            except asyncio.TimeoutError:
                continue
            if line.startswith(b"data:") and mode == "refetch":
                start = time.perf_counter()
                async with session.get(url + "/api/v1/fleet") as response:
                    await response.read()
                fetches.append(time.perf_counter() - start)


async def device_page(url: str, device: str, mode: str, fetches: list[tuple[float, int]], stop: asyncio.Event) -> None:
    """One open device page: follows the stream; on each batch of its device, ``tail`` fetches the timeline from its
    last bucket on (what the page does), ``newest1000`` the device's newest 1000 measurements (what it did)."""
    async with aiohttp.ClientSession() as session:
        async with session.get(url + f"/api/v1/devices/{device}/timeline") as response:
            first = await response.json()
        since, width = first["t"][-1], first["width_s"]
        async with session.get(url + "/api/v1/stream") as stream:
            while not stop.is_set():
                try:
                    line = await asyncio.wait_for(stream.content.readline(), 0.5)
                except asyncio.TimeoutError:
                    continue
                if not line.startswith(b"data:") or json.loads(line[5:])["device_id"] != device:
                    continue
                start = time.perf_counter()
                path = (
                    f"/api/v1/devices/{device}/timeline?since={since}&width={width}"
                    if mode == "tail"
                    else f"/api/v1/measurements?kind=inference&order=newest&limit=1000&device={device}"
                )
                async with session.get(url + path) as response:
                    body = await response.read()
                fetches.append((time.perf_counter() - start, len(body)))


async def phase(
    url: str, tokens: dict[str, str], mode: str, pages: int, batches: int, seed: int, watched: list[str] | None = None
) -> list[float]:
    stop = asyncio.Event()
    fetches: list[Any] = []
    if watched:
        followers = [asyncio.create_task(device_page(url, d, mode, fetches, stop)) for d in watched]
    else:
        followers = [asyncio.create_task(page(url, mode, fetches, stop)) for _ in range(pages)]
    await asyncio.sleep(0.5)  # the pages are connected
    devices = watched * 4 + sorted(tokens) if watched else sorted(tokens)  # the watched devices send often
    times = []
    async with aiohttp.ClientSession() as session:
        for n in range(batches):
            device = devices[n % len(devices)]
            body = batch(device, 20, seed + n)
            start = time.perf_counter()
            async with session.post(
                url + "/api/v1/ingest", data=body, headers={"Authorization": f"Bearer {tokens[device]}"}
            ) as response:
                await response.read()
                assert response.status == 200, response.status
            times.append(time.perf_counter() - start)
    await asyncio.sleep(1.0)
    stop.set()
    await asyncio.gather(*followers)
    fetched = ""
    if watched and fetches:
        fetched = (
            f", median {statistics.median(f[0] for f in fetches) * 1e3:.1f} ms and "
            f"{statistics.median(f[1] for f in fetches) / 1024:.1f} KiB each"
        )
    print(
        f"{mode:<12} ingest p50 {statistics.median(times) * 1e3:7.1f} ms  p99 "
        f"{statistics.quantiles(times, n=100)[98] * 1e3:7.1f} ms  fetches by the pages: {len(fetches)}{fetched}"
    )
    return times


async def main_async(args: argparse.Namespace) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        db = Path(tmp) / "agg.db"
        store = SQLiteStore(db)
        tokens = {
            f"orin-{n:03d}": store.add_token(f"orin-{n:03d}", "device", time.time_ns() // 1000)
            for n in range(args.devices)
        }
        store.close()
        server = AggregatorProcess(db, free_port())
        server.start()
        url = f"http://127.0.0.1:{server.port}"
        try:
            async with aiohttp.ClientSession() as session:
                for n, (device, token) in enumerate(sorted(tokens.items())):
                    body = batch(device, args.preload, 10_000 + n)
                    async with session.post(
                        url + "/api/v1/ingest", data=body, headers={"Authorization": f"Bearer {token}"}
                    ) as response:
                        assert response.status == 200
                loads = []
                for _ in range(5):
                    start = time.perf_counter()
                    async with session.get(url + "/") as response:
                        size = len(await response.read())
                    loads.append(time.perf_counter() - start)
            print(
                f"{args.devices} devices × {args.preload} records; fleet page load "
                f"{statistics.median(loads) * 1e3:.0f} ms (median of 5, {size / 1024:.0f} KiB); "
                f"{args.pages} pages open, {args.batches} batches of 20"
            )
            results = {}
            for mode in ("incremental", "refetch"):
                results[mode] = await phase(
                    url, tokens, mode, args.pages, args.batches, 20_000 if mode == "refetch" else 30_000
                )
            p99 = {mode: statistics.quantiles(t, n=100)[98] for mode, t in results.items()}
            print(f"ingest p99, refetch ÷ incremental: {p99['refetch'] / p99['incremental']:.2f}")
            watched = sorted(tokens)[: args.pages]
            async with aiohttp.ClientSession() as session:
                for n, device in enumerate(watched):
                    body = batch(device, args.history, 40_000 + n, weeks=True)
                    async with session.post(
                        url + "/api/v1/ingest", data=body, headers={"Authorization": f"Bearer {tokens[device]}"}
                    ) as response:
                        assert response.status == 200
                pages = {}
                for device in (watched[0], sorted(tokens)[-1]):  # three weeks of history, and one batch of records
                    loads = []
                    for _ in range(5):
                        start = time.perf_counter()
                        async with session.get(url + f"/device/{device}?range=30d") as response:
                            size = len(await response.read())
                        loads.append(time.perf_counter() - start)
                    pages[device] = (statistics.median(loads), size)
            (weeks, weeks_size), (short, short_size) = pages.values()
            print(
                f"device page with {args.history + args.preload} records over three weeks: load {weeks * 1e3:.0f} ms "
                f"(median of 5, {weeks_size / 1024:.0f} KiB, range 30 days); with {args.preload} records of one batch: "
                f"{short * 1e3:.0f} ms ({short_size / 1024:.0f} KiB); ratio "
                f"{weeks / short:.2f} in time, {weeks_size / short_size:.2f} in weight; {args.pages} device pages open"
            )
            for mode in ("tail", "newest1000"):
                results[mode] = await phase(
                    url, tokens, mode, args.pages, args.batches, 50_000 if mode == "tail" else 60_000, watched
                )
            p99 = {mode: statistics.quantiles(t, n=100)[98] for mode, t in results.items()}
            print(f"ingest p99, newest1000 ÷ tail: {p99['newest1000'] / p99['tail']:.2f}")
        finally:
            server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=200)
    parser.add_argument("--preload", type=int, default=100)
    parser.add_argument("--pages", type=int, default=5)
    parser.add_argument("--batches", type=int, default=200)
    parser.add_argument("--history", type=int, default=2000)
    asyncio.run(main_async(parser.parse_args()))


if __name__ == "__main__":
    main()
