"""The fleet view: ``GET /api/v1/fleet`` (one row per device) and ``GET /api/v1/stream`` (Server-Sent Events of
incoming measurements, which the built-in page at ``/`` uses for live updates)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from typing import Any

from aiohttp import web

from .rows import decode_measurement
from .store import Query, Store

LATE_S = 15 * 60
SILENT_S = 24 * 3600


def fleet_rows(store: Store, now: float, recent: int = 50) -> list[dict[str, Any]]:
    """Each device with its last-seen age, sync health and its latest figures (from its last ``recent`` requests)."""
    rows = []
    for device in store.devices():
        latest = query_latest(store, device["device_id"], recent)
        # figures of one strategy at a time: a speculative request's TTFT is not a local one's
        by_strategy: dict[str, dict[str, Any]] = {}
        for strategy in dict.fromkeys(str(r.get("strategy") or "local") for r in latest):
            mine = [r for r in latest if str(r.get("strategy") or "local") == strategy]
            by_strategy[strategy] = {"requests": len(mine), **_latency_figures(mine)}
        current = str(latest[-1].get("strategy") or "local") if latest else None
        joules = [
            energy["j_per_output_token"]
            for r in latest
            if isinstance(ext := r.get("ext"), dict)
            and isinstance(energy := ext.get("energy"), dict)
            and _finite(energy.get("j_per_output_token"))
        ]
        age = now - device["last_seen_us"] / 1e6
        rows.append(
            {
                "device_id": device["device_id"],
                "last_seen_us": device["last_seen_us"],
                "last_seen_age_s": round(age, 1),
                "sync_health": "ok" if age < LATE_S else "late" if age < SILENT_S else "silent",
                "model": latest[-1].get("model_name") if latest else None,
                "strategy": current,  # ttft_p95_ms and tokens_per_second are this strategy's (its latest request's)
                "ttft_p95_ms": by_strategy[current]["ttft_p95_ms"] if current else None,
                "tokens_per_second": by_strategy[current]["tokens_per_second"] if current else None,
                "by_strategy": by_strategy,
                "j_per_output_token": statistics.fmean(joules) if joules else None,
                "backlog": device.get("backlog"),
                "dropped_total": device["dropped_total"],
                "records": device["records"],
            }
        )
    return rows


def _latency_figures(records: list[dict[str, Any]]) -> dict[str, float | None]:
    ttfts: list[float] = sorted(r["ttft_ms"] for r in records if _finite(r.get("ttft_ms")))
    rates = [
        r["output_tokens"] / (r["e2e_ms"] / 1000)
        for r in records
        if _finite(r.get("e2e_ms")) and r["e2e_ms"] > 0 and _finite(r.get("output_tokens")) and r["output_tokens"]
    ]
    return {"ttft_p95_ms": _p95(ttfts), "tokens_per_second": statistics.fmean(rates) if rates else None}


def _finite(value: Any) -> bool:
    """A number the page can show (a stored row of an older version may hold anything)."""
    return type(value) in (int, float) and math.isfinite(value)


def _p95(values: list[float]) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[94]


def query_latest(store: Store, device: str, limit: int, *, gaps: bool = False) -> list[dict[str, Any]]:
    """The device's latest ``limit`` inference records, decoded (without their inter-token gaps unless ``gaps``),
    oldest first; rows that do not decode are skipped and counted (see :mod:`aggregator.rows`)."""
    last = store.max_seq(device, "inference")
    rows = store.query(Query(device=device, kind="inference"), limit=20 * limit, after_seq=max(0, last - 20 * limit))
    decoded = (decode_measurement(r, gaps=gaps) for r in rows[-limit:])
    return [record for record in decoded if record is not None]


class Broadcaster:
    """Fan-out of ingest events to every connected SSE client; a slow client loses events, never blocks ingest."""

    def __init__(self, queue_size: int = 256) -> None:
        self.queue_size = queue_size
        self.subscribers: set[asyncio.Queue[dict[str, Any] | None]] = set()

    def publish(self, event: dict[str, Any]) -> None:
        for queue in list(self.subscribers):
            if queue.full():
                continue
            queue.put_nowait(event)

    def close(self) -> None:
        """Ends every stream (on shutdown), so open browser tabs do not hold the server."""
        for queue in list(self.subscribers):
            while queue.full():
                queue.get_nowait()
            queue.put_nowait(None)

    async def stream(self, request: web.Request, heartbeat_s: float = 15.0) -> web.StreamResponse:
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)
        queue: asyncio.Queue[dict[str, Any] | None] = asyncio.Queue(self.queue_size)
        self.subscribers.add(queue)
        try:
            await response.write(b": connected\n\n")
            while True:
                try:
                    event = await asyncio.wait_for(queue.get(), heartbeat_s)
                except asyncio.TimeoutError:
                    await response.write(b": keep-alive\n\n")
                    continue
                if event is None:
                    break
                await response.write(f"event: batch\ndata: {json.dumps(event)}\n\n".encode())
        except (ConnectionResetError, asyncio.CancelledError):
            pass
        finally:
            self.subscribers.discard(queue)
        return response


def batch_event(device: str, records: list[dict[str, Any]]) -> dict[str, Any]:
    inference = [r for r in records if r.get("kind") == "inference" and r.get("ok")]
    ttfts = [r["ttft_us"] / 1000 for r in inference if r.get("ttft_us") is not None]
    return {
        "device_id": device,
        "records": len(records),
        "at": time.time(),
        "ttft_ms_latest": ttfts[-1] if ttfts else None,
        "model": inference[-1].get("model_name") if inference else None,
    }
