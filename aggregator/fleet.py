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

from .health import FACTS_KIND, Health, facts_from_record
from .rows import decode_wire
from .store import NULL_NAME, Query, Store


def fleet_rows(
    store: Store,
    now: float,
    recent: int = 50,
    *,
    health: Health | None = None,
    only: str | None = None,
    regressions: dict[str, list[str]] | None = None,
    triggers: dict[str, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Each device with its last-seen age, sync health, error rate and its figures per series (model × strategy),
    each series' from *its own* latest ``recent`` requests — whatever other devices or series sent in between.

    The top-level ``model``, ``strategy``, ``ttft_p95_ms`` and ``tokens_per_second`` are those of the series of the
    device's latest request; ``by_strategy`` holds that model's series by strategy (a speculative request's TTFT is
    not a local one's). Percentiles are exact (over the requests themselves, not histogram buckets). ``only``: the
    row of that one device (what a live update carries).

    ``health`` is one state (ok, warning, critical) with its reasons (:mod:`aggregator.health`), from recency,
    errors, the device's batches over the health window (backlog, drops, quarantine), its latest facts
    (throttling) and its ``regressions`` (the fleet page's lines, by device). ``triggers``: each device's series
    whose trigger condition holds (``aggregator.triggers.TriggerWatch.by_device``), shown as they are."""
    health = health or Health()
    series: dict[str, list[dict[str, Any]]] = {}
    for entry in store.series(only):
        if entry["kind"] == "inference":
            series.setdefault(entry["device_id"], []).append(entry)
    rows = []
    if only is None:
        devices = store.devices()
    else:
        one = store.device(only)
        devices = [one] if one is not None else []
    for device in devices:
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
        latest_facts = store.latest(Query(device=device_id, kind=FACTS_KIND), 1)
        facts = facts_from_record(decode_wire(latest_facts[0])) if latest_facts else None
        syncs = store.syncs(device_id, since_us=int((now - health.window_s) * 1e6), limit=500)
        row = {
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
            "device_class": facts["device_class"] if facts else None,
            "power_mode": facts["power_mode"] if facts else None,
            "temperature_max_c": facts["temperature_max_c"] if facts else None,
            "thermal_throttling": facts["thermal_throttling"] if facts else [],
            "facts": facts,
        }
        flagged = (regressions or {}).get(device_id, [])
        row["regressions"] = flagged
        row["triggers"] = (triggers or {}).get(device_id, [])
        row["trigger_count"] = len(row["triggers"])
        row["health"], row["health_reasons"] = health.assess(row, syncs, facts, flagged)
        rows.append(row)
    return rows


def _name(value: str | None) -> str | None:
    return None if value in (None, NULL_NAME) else value


_FIGURE_COLUMNS = ("ok", "ttft_us", "tpot_us", "e2e_us", "output_tokens", "j_per_token")


def _series_figures(store: Store, entry: dict[str, Any], recent: int) -> dict[str, Any]:
    """One series' figures over its latest ``recent`` requests: exact TTFT/TPOT percentiles and tok/s of the
    successful ones, the error rate of all, J/token where the records carry energy."""
    query = Query(device=entry["device_id"], kind="inference", model=entry["model_name"], strategy=entry["strategy"])
    latest = [dict(zip(_FIGURE_COLUMNS, r, strict=True)) for r in store.latest_columns(query, _FIGURE_COLUMNS, recent)]
    ok = [r for r in latest if r["ok"]]
    ttfts = sorted(r["ttft_us"] / 1000 for r in ok if _finite(r.get("ttft_us")))
    tpots = sorted(r["tpot_us"] / 1000 for r in ok if _finite(r.get("tpot_us")))
    rates = [
        r["output_tokens"] / (r["e2e_us"] / 1e6)
        for r in ok
        if _finite(r.get("e2e_us")) and r["e2e_us"] > 0 and _finite(r.get("output_tokens")) and r["output_tokens"]
    ]
    joules = [r["j_per_token"] for r in ok if _finite(r.get("j_per_token"))]  # a column: no body decoded
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
