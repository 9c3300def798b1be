"""OTLP forwarding past a long run of one device's records the backend refuses: how soon another device's records
arrive, and how soon the run is passed.

    .venv/bin/python bench/otlp_refused_run.py [--runs 100,1000,5000] [--batch 500] [--timeout 120]

For each run length N: a fresh SQLite store holds N records of ``dev-h`` (stored in one batch), then 5 of ``dev-a``;
an in-process ``Forwarder`` (traces and metrics, cumulative, ``backoff_max`` 300 s as by default, interval 1 s)
forwards them to ``tests/otlp_receiver.py`` answering ``400`` to any request that holds ``dev-h``'s spans or points
(the issue-29 trial). Printed per N: the forwarding passes and seconds until ``dev-a``'s 5 spans arrived, until the
cursors passed all N + 5 records, the requests sent and the holds (``refused_all``); ``--timeout`` bounds a run.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from aiohttp import web

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.app import _row
from aggregator.otlp_forward import Forwarder, stored_status
from aggregator.store import SQLiteStore
from lens_core.otlp_config import OtlpSettings
from tests.hostile_device import encode_raw, valid_wire
from tests.otlp_receiver import Receiver


def store_records(store: SQLiteStore, device: str, n: int, seed: int, now_us: int) -> list[dict[str, Any]]:
    records = valid_wire(n, seed=seed, device=device)
    for i, r in enumerate(records):
        r["started_us"] = now_us - 60_000_000 + i
    store.ingest(device, str(uuid.uuid4()), 0, {}, [_row(r, "cbor", encode_raw(r, "cbor")) for r in records], now_us)
    return records


async def one(n: int, batch: int, timeout: float) -> dict[str, Any]:
    receiver = Receiver(refuse_devices={"dev-h"})
    runner = web.AppRunner(receiver.app())
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "s.db")
        now_us = time.time_ns() // 1000
        store_records(store, "dev-h", n, 31, now_us)
        good = {r["id"] for r in store_records(store, "dev-a", 5, 32, now_us)}
        settings = OtlpSettings(
            endpoint=f"http://127.0.0.1:{port}",
            headers={},
            signals=("traces", "metrics"),
            interval=1.0,
            backoff_max=300.0,
            batch_records=batch,
            settle_s=0.0,
        )
        forwarder = Forwarder(store, settings)
        started = time.monotonic()
        await forwarder.start()
        out: dict[str, Any] = {"n": n, "good_s": None, "good_passes": None, "done_s": None, "done_passes": None}
        try:
            while time.monotonic() - started < timeout:
                if out["good_s"] is None and good <= {s.trace_id for _, s in receiver.spans()}:
                    out["good_s"], out["good_passes"] = time.monotonic() - started, forwarder.passes
                status = stored_status(store)
                if all(status[s]["cursor_seq"] >= n + 5 for s in ("traces", "metrics")):
                    out["done_s"], out["done_passes"] = time.monotonic() - started, forwarder.passes
                    break
                await asyncio.sleep(0.02)
        finally:
            await forwarder.stop()
            out["requests"] = len(receiver.answers)
            out["holds"] = sum(s.failures.get("refused_all", 0) for s in forwarder.status.values())
            store.close()
            await runner.cleanup()
    return out


def fmt(value: Any, unit: str = "") -> str:
    if value is None:
        return "not within the timeout"
    return f"{value:.1f}{unit}" if isinstance(value, float) else f"{value}{unit}"


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", default="100,1000,5000")
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--timeout", type=float, default=120.0)
    args = parser.parse_args()
    print("| refused run | dev-a's spans arrive | passes | run passed (both signals) | passes | requests | holds |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for n in (int(x) for x in args.runs.split(",")):
        r = await one(n, args.batch, args.timeout)
        print(
            f"| {n:,} | {fmt(r['good_s'], ' s')} | {fmt(r['good_passes'])} | {fmt(r['done_s'], ' s')} | "
            f"{fmt(r['done_passes'])} | {r['requests']:,} | {r['holds']} |",
            flush=True,
        )


if __name__ == "__main__":
    asyncio.run(main())
