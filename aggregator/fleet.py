"""The fleet view: ``GET /api/v1/fleet`` (one row per device) and ``GET /api/v1/stream`` (Server-Sent Events of
incoming measurements, which the built-in page at ``/`` uses for live updates)."""

from __future__ import annotations

import asyncio
import json
import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

from aiohttp import web

from .rows import decode_measurement, decode_wire
from .store import NULL_NAME, Query, Store


@dataclass(frozen=True)
class Health:
    """When a device counts as late and as silent (``[fleet] late_after``, ``silent_after``)."""

    late_after_s: float = 3600.0
    silent_after_s: float = 24 * 3600.0

    def late_after(self, expected_gap_s: float | None) -> float:
        """When a device is late: two of the gaps it said to expect between its batches, plus a minute (a batch
        missed, and slack for retries), when it said; otherwise ``late_after``."""
        return 2 * expected_gap_s + 60.0 if expected_gap_s else self.late_after_s

    def sync(self, age_s: float, expected_gap_s: float | None = None) -> str:
        late = self.late_after(expected_gap_s)
        return "ok" if age_s < late else "late" if age_s < max(late, self.silent_after_s) else "silent"


def fleet_rows(
    store: Store,
    now: float,
    recent: int = 50,
    *,
    health: Health | None = None,
    only: str | None = None,
) -> list[dict[str, Any]]:
    """Each device with its last-seen age, sync health, error rate and its figures per series (model × strategy),
    each series' from *its own* latest ``recent`` requests — whatever other devices or series sent in between.

    The top-level ``model``, ``strategy``, ``ttft_p95_ms`` and ``tokens_per_second`` are those of the series of the
    device's latest request; ``by_strategy`` holds that model's series by strategy (a speculative request's TTFT is
    not a local one's). Percentiles are exact (over the requests themselves, not histogram buckets). ``only``: the
    row of that one device (what a live update carries)."""
    health = health or Health()
    series: dict[str, list[dict[str, Any]]] = {}
    for entry in store.series(only):
        if entry["kind"] == "inference":
            series.setdefault(entry["device_id"], []).append(entry)
    rows = []
    for device in store.devices():
        if only is not None and device["device_id"] != only:
            continue
        device_id = device["device_id"]
        # (model_name, strategy, ok) of the device's latest requests, of any series: no record bodies
        window = store.latest_columns(
            Query(device=device_id, kind="inference"), ("model_name", "strategy", "ok"), recent
        )
        figures = [_series_figures(store, entry, recent) for entry in series.get(device_id, [])]
        current_model = _name(window[-1][0]) if window else None
        current_strategy = _name(window[-1][1]) if window else None
        mine = next((f for f in figures if (f["model_name"], f["strategy"]) == (current_model, current_strategy)), None)
        errors = sum(1 for r in window if not r[2])
        age = now - device["last_seen_us"] / 1e6
        rows.append(
            {
                "device_id": device_id,
                "last_seen_us": device["last_seen_us"],
                "last_seen_age_s": round(age, 1),
                "sync_health": health.sync(age, device.get("expected_gap_s")),
                "expected_gap_s": device.get("expected_gap_s"),
                "late_after_s": health.late_after(device.get("expected_gap_s")),
                "model": current_model,
                "strategy": (current_strategy or "local") if window else None,
                "ttft_p95_ms": mine["ttft_p95_ms"] if mine else None,
                "tokens_per_second": mine["tokens_per_second"] if mine else None,
                "by_strategy": {
                    (f["strategy"] or "local"): f for f in figures if f["model_name"] == current_model and f["requests"]
                },
                "series": figures,
                "requests": len(window),
                "errors": errors,
                "error_rate": errors / len(window) if window else None,
                "j_per_output_token": mine["j_per_output_token"] if mine else None,
                "backlog": device.get("backlog"),
                "dropped_total": device["dropped_total"],
                "quarantined_total": device.get("quarantined_total"),
                "records": device["records"],
            }
        )
    return rows


def _name(value: str | None) -> str | None:
    return None if value in (None, NULL_NAME) else value


def _series_figures(store: Store, entry: dict[str, Any], recent: int) -> dict[str, Any]:
    """One series' figures over its latest ``recent`` requests: exact TTFT/TPOT percentiles and tok/s of the
    successful ones, the error rate of all, J/token where the records carry energy."""
    query = Query(device=entry["device_id"], kind="inference", model=entry["model_name"], strategy=entry["strategy"])
    latest = store.latest(query, recent)
    ok = [r for r in latest if r["ok"]]
    ttfts = sorted(r["ttft_us"] / 1000 for r in ok if _finite(r.get("ttft_us")))
    tpots = sorted(r["tpot_us"] / 1000 for r in ok if _finite(r.get("tpot_us")))
    rates = [
        r["output_tokens"] / (r["e2e_us"] / 1e6)
        for r in ok
        if _finite(r.get("e2e_us")) and r["e2e_us"] > 0 and _finite(r.get("output_tokens")) and r["output_tokens"]
    ]
    joules = []
    for row in ok:
        record = decode_wire(row)  # the wire map: ext as sent, without converting every other field
        ext = record.get("ext") if record is not None else None
        energy = ext.get("energy") if isinstance(ext, dict) else None
        if isinstance(energy, dict) and _finite(energy.get("j_per_output_token")):
            joules.append(float(energy["j_per_output_token"]))
    errors = len(latest) - len(ok)
    return {
        "model_name": _name(entry["model_name"]),
        "strategy": _name(entry["strategy"]),
        "records": entry["records"],
        "last_seen_us": entry["last_seen_us"],
        "requests": len(latest),
        "errors": errors,
        "error_rate": errors / len(latest) if latest else None,
        "ttft_p50_ms": _quantile(ttfts, 50),
        "ttft_p95_ms": _quantile(ttfts, 95),
        "tpot_p50_ms": _quantile(tpots, 50),
        "tpot_p95_ms": _quantile(tpots, 95),
        "tokens_per_second": statistics.fmean(rates) if rates else None,
        "j_per_output_token": statistics.fmean(joules) if joules else None,
    }


def _finite(value: Any) -> bool:
    """A number the page can show (a stored row of an older version may hold anything)."""
    return type(value) in (int, float) and math.isfinite(value)


def _quantile(values: list[float], q: int) -> float | None:
    """The exact ``q``-th percentile of sorted ``values`` (inclusive method: linear between order statistics)."""
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def query_latest(store: Store, device: str, limit: int, *, gaps: bool = False) -> list[dict[str, Any]]:
    """The device's latest ``limit`` inference records, decoded (without their inter-token gaps unless ``gaps``),
    oldest first; rows that do not decode are skipped and counted (see :mod:`aggregator.rows`)."""
    rows = store.latest(Query(device=device, kind="inference"), limit)
    decoded = (decode_measurement(r, gaps=gaps) for r in rows)
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
