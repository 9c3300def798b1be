"""The fleet view: ``GET /api/v1/fleet`` (one row per device) and ``GET /api/v1/stream`` (Server-Sent Events of
incoming measurements, which the built-in page at ``/`` uses for live updates)."""

from __future__ import annotations

import asyncio
import collections
import json
import logging
import math
import statistics
import time
from collections.abc import Callable
from typing import Any

from aiohttp import HttpVersion11, web

from .health import Health, latest_facts
from .metrics import RECENT_REQUESTS
from .store import NULL_NAME, Query, Store

log = logging.getLogger("aggregator.stream")


# which statistic each figure of a fleet row is (``statistics`` in /api/v1/fleet; docs/fleet.md, "Which statistic")
FIGURE_STATISTICS = {
    "window": f"each series' latest {RECENT_REQUESTS} requests by the time they ran (started_us, the device's "
    "clock), whatever order they were received in; requests, errors, error_rate and contended_share are over the "
    f"device's latest {RECENT_REQUESTS}",
    "ttft_p50_ms": "median of the successful requests' time to first token",
    "ttft_p95_ms": "95th percentile of the successful requests' time to first token (exact, inclusive method)",
    "tpot_p50_ms": "median of the successful requests' time per output token",
    "tpot_p95_ms": "95th percentile of the successful requests' time per output token (exact, inclusive method)",
    "tokens_per_second": "median of the successful requests' output tokens ÷ end-to-end seconds, each request's own",
    "j_per_output_token": "mean of the successful requests' energy per output token, net of idle (J)",
    "error_rate": "failed requests ÷ requests",
    "contended_share": "requests that other work on the device contended with ÷ requests",
    "guardrail_overhead_p50_ms": "median of the guardrail stages' time together (ext.guardrails.overhead_ms) over the "
    "device's latest guarded requests that were served (blocked requests are kind blocked, never among them), of "
    "its costliest guardrail set (guardrail_costliest_set: the set with the highest such median)",
    "guardrail_impact_p50_percent": "median of each served guarded request's guardrail overhead ÷ its total time × "
    "100 (ext.guardrails.impact_percent), over the same requests",
    "blocked": "requests a guardrail blocked (kind blocked), per series: of its latest blocked ones, those that ran "
    "within the span of its latest inference requests; added up over the device's series",
    "guardrails": "per model × guardrail set × strategy over each series' latest requests: requests, blocked, "
    "guardrail errors, each stage's p50/p95 (ms) and the impact's p50/p95 (%) over the served ones",
}
MAX_GUARDRAIL_SETS = 8  # sets named on a device's row (a device sends them: bounded; the rest counted)


def fleet_rows(
    store: Store,
    now: float,
    recent: int = RECENT_REQUESTS,
    *,
    health: Health | None = None,
    only: str | None = None,
    regressions: dict[str, list[str]] | None = None,
    triggers: dict[str, list[dict[str, Any]]] | None = None,
) -> list[dict[str, Any]]:
    """Each device with its last-seen age, sync health, error rate and its figures per series (model × strategy),
    each series' from *its own* latest ``recent`` requests — whatever other devices or series sent in between.

    ``contended_share``: the share of those latest ``recent`` requests whose device said other work contended with
    them (``ext.interference``; ``contended`` counts them), None without requests.

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
    blocked: dict[str, list[dict[str, Any]]] = {}
    for entry in store.series(only):
        if entry["kind"] == "inference":
            series.setdefault(entry["device_id"], []).append(entry)
        elif entry["kind"] == BLOCKED_KIND:
            blocked.setdefault(entry["device_id"], []).append(entry)
    rows = []
    if only is None:
        devices = store.devices()
    else:
        one = store.device(only)
        devices = [one] if one is not None else []
    for device in devices:
        device_id = device["device_id"]
        # (model_name, strategy, ok, contended) of the device's latest requests, of any series: no record bodies
        window = store.latest_columns(
            Query(device=device_id, kind="inference"),
            (
                "model_name",
                "strategy",
                "ok",
                "contended",
                "started_us",
                "guardrail_set",
                "guardrail_ms",
                "guardrail_impact",
            ),
            recent,
            by_event=True,
        )
        blocked_series = blocked.get(device_id, [])
        figures = [_series_figures(store, entry, recent, blocked_series) for entry in series.get(device_id, [])]
        # a series whose every request was blocked has no inference series: its guardrail lines stand alone
        seen = {(f["model_name"], f["strategy"]) for f in figures}
        for entry in blocked_series:
            if (_name(entry["model_name"]), _name(entry["strategy"])) not in seen:
                figures.append(_blocked_only_figures(store, entry, recent))
        current_model = _name(window[-1][0]) if window else None
        current_strategy = _name(window[-1][1]) if window else None
        mine = next((f for f in figures if (f["model_name"], f["strategy"]) == (current_model, current_strategy)), None)
        errors = sum(1 for r in window if not r[2])
        contended = sum(1 for r in window if r[3])
        guarded = [r for r in window if r[5] is not None]
        served = [r for r in guarded if r[2]]
        sets = sorted({r[5] for r in guarded})
        # the headline is the costliest set's (by its median overhead): a cheap set run often must not hide an
        # expensive one behind a median over both
        per_set: dict[str, tuple[list[float], list[float]]] = {}
        for r in served:
            set_overheads, set_impacts = per_set.setdefault(r[5], ([], []))
            if _finite(r[6]):
                set_overheads.append(r[6])
            if _finite(r[7]):
                set_impacts.append(r[7])
        costliest = max(
            (s for s in per_set if per_set[s][0]),
            key=lambda s: (_quantile(sorted(per_set[s][0]), 50) or 0.0, s),
            default=None,
        )
        overheads = sorted(per_set[costliest][0]) if costliest is not None else []
        impacts = sorted(per_set[costliest][1]) if costliest is not None else []
        blocked_count = sum(g["blocked"] for f in figures for g in f["guardrails"])
        age = now - device["last_seen_us"] / 1e6
        facts = latest_facts(store, device_id)
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
            "contended": contended,
            "contended_share": contended / len(window) if window else None,
            "guardrail_sets": sets[:MAX_GUARDRAIL_SETS],
            "guardrail_sets_more": max(0, len(sets) - MAX_GUARDRAIL_SETS),
            "guardrail_costliest_set": costliest,
            "guardrail_requests": len(overheads),
            "guardrail_overhead_p50_ms": _quantile(overheads, 50),
            "guardrail_impact_p50_percent": _quantile(impacts, 50),
            "blocked": blocked_count,
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
        row["health"], row["health_reasons"] = health.assess(row, syncs, facts, flagged, row["triggers"])
        rows.append(row)
    return rows


def _name(value: str | None) -> str | None:
    return None if value in (None, NULL_NAME) else value


_FIGURE_COLUMNS = (
    "ok",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "output_tokens",
    "j_per_token",
    "started_us",
    "error_type",
    "guardrail_set",
    "guardrail_input_ms",
    "guardrail_threat_ms",
    "guardrail_output_ms",
    "guardrail_ms",
    "guardrail_impact",
)
BLOCKED_KIND = "blocked"  # a request a guardrail blocked: not an error, not a success (docs/wire-format.md)
GUARDRAIL_ERROR = "guardrail_error"  # the error_type of a request whose guardrail stage failed
MAX_GUARDRAIL_LINES = 16  # guardrail sets of one series on a row (a device sends them: bounded)


def _blocked_by_set(store: Store, entry: dict[str, Any], recent: int, since_us: int | None) -> dict[str, int]:
    """The series' blocked requests (kind ``blocked``) per guardrail set: of its latest ``recent`` by event time,
    those that ran at or after ``since_us`` (the start of the series' inference window; None: all of them)."""
    query = Query(device=entry["device_id"], kind=BLOCKED_KIND, model=entry["model_name"], strategy=entry["strategy"])
    counts: dict[str, int] = {}
    for started, name in store.latest_columns(query, ("started_us", "guardrail_set"), recent, by_event=True):
        if since_us is None or started >= since_us:
            key = name if type(name) is str else "–"
            counts[key] = counts.get(key, 0) + 1
    return counts


def _guardrail_lines(latest: list[dict[str, Any]], blocked: dict[str, int]) -> list[dict[str, Any]]:
    """One line per guardrail set among a series' latest requests (and its blocked ones): requests, blocked,
    guardrail errors, each stage's exact p50/p95 and the impact's over the requests served (ok). Blocked requests are
    counted apart and never enter a figure."""
    by_set: dict[str, list[dict[str, Any]]] = {}
    for r in latest:
        if type(r["guardrail_set"]) is str:
            by_set.setdefault(r["guardrail_set"], []).append(r)
    lines = []
    for name in sorted(set(by_set) | set(blocked))[:MAX_GUARDRAIL_LINES]:
        rows = by_set.get(name, [])
        served = [r for r in rows if r["ok"]]
        line: dict[str, Any] = {
            "guardrail_set": name,
            "requests": len(rows),
            "blocked": blocked.get(name, 0),
            "errors": sum(1 for r in rows if r["error_type"] == GUARDRAIL_ERROR),
        }
        for key, column in (
            ("input", "guardrail_input_ms"),
            ("threat", "guardrail_threat_ms"),
            ("output", "guardrail_output_ms"),
            ("overhead", "guardrail_ms"),
        ):
            values = sorted(r[column] for r in served if _finite(r[column]))
            line[f"{key}_p50_ms"] = _quantile(values, 50)
            line[f"{key}_p95_ms"] = _quantile(values, 95)
        impacts = sorted(r["guardrail_impact"] for r in served if _finite(r["guardrail_impact"]))
        line["impact_p50_percent"] = _quantile(impacts, 50)
        line["impact_p95_percent"] = _quantile(impacts, 95)
        lines.append(line)
    return lines


def _blocked_only_figures(store: Store, entry: dict[str, Any], recent: int) -> dict[str, Any]:
    """A model × strategy whose every request was blocked: no figures, its guardrail lines only."""
    blocked = _blocked_by_set(store, entry, recent, None)
    return {
        "model_name": _name(entry["model_name"]),
        "strategy": _name(entry["strategy"]),
        "records": 0,
        "last_seen_us": entry["last_seen_us"],
        "requests": 0,
        "errors": 0,
        "error_rate": None,
        "ttft_p50_ms": None,
        "ttft_p95_ms": None,
        "tpot_p50_ms": None,
        "tpot_p95_ms": None,
        "tokens_per_second": None,
        "j_per_output_token": None,
        "guardrails": _guardrail_lines([], blocked),
    }


def _series_figures(
    store: Store, entry: dict[str, Any], recent: int, blocked_series: list[dict[str, Any]] | None = None
) -> dict[str, Any]:
    """One series' figures over its latest ``recent`` requests (those that ran last, by the device's clock):
    exact TTFT/TPOT percentiles and the median tok/s (output tokens ÷ e2e seconds, per request) of the successful
    ones, the error rate of all, the mean J/token where the records carry energy (docs/fleet.md, "Which
    statistic")."""
    query = Query(device=entry["device_id"], kind="inference", model=entry["model_name"], strategy=entry["strategy"])
    read = store.latest_columns(query, _FIGURE_COLUMNS, recent, by_event=True)
    latest = [dict(zip(_FIGURE_COLUMNS, r, strict=True)) for r in read]
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
    blocked: dict[str, int] = {}
    key = (entry["model_name"], entry["strategy"])
    if any((b["model_name"], b["strategy"]) == key for b in blocked_series or ()):
        blocked = _blocked_by_set(store, entry, recent, latest[0]["started_us"] if latest else None)
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
        "tokens_per_second": statistics.median(rates) if rates else None,
        "j_per_output_token": statistics.fmean(joules) if joules else None,
        "guardrails": _guardrail_lines(latest, blocked),
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


# A subscriber with more than this many bytes of events not yet taken (beyond what the kernel holds for it) is
# dropped: its connection is closed, and the page's EventSource reconnects and refetches the fleet. (At least four
# events of server.max_event_bytes fit.)
SUBSCRIBER_BUFFER_BYTES = 1024**2
RETRY_MS = 5000  # how long a dropped browser waits before it reconnects (the stream's ``retry:`` field)
# A device whose row was over max_event_bytes gets refetch notices without its row being computed again (a row that
# large costs seconds of a read thread) for this long; then it is measured again. At most this many are remembered.
OVERSIZED_RECHECK_S = 300.0
MAX_OVERSIZED = 10_000
# A series' figures take at least this many bytes in a row (their keys alone take more): a device with more series
# than max_event_bytes / this gets the refetch notice without its row being computed.
MIN_SERIES_BYTES = 200


def event_frame(event: dict[str, Any], name: str = "batch") -> bytes:
    """One Server-Sent Event, serialized once for every subscriber."""
    return b"event: " + name.encode() + b"\ndata: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


def refetch_frame(
    event: dict[str, Any], max_bytes: int, *, row_bytes: int | None = None, series: int | None = None
) -> bytes:
    """The refetch notice: the batch's event with ``"type": "refetch"``, the bound, and what exceeded it — the row's
    size (``row_bytes``) or, when the row was not computed, its number of ``series``."""
    notice = {**event, "type": "refetch", "max_event_bytes": max_bytes}
    if row_bytes is not None:
        notice["row_bytes"] = row_bytes
    if series is not None:
        notice["series"] = series
    return event_frame(notice)


def live_frame(
    store: Store, event: dict[str, Any], max_bytes: int, row: Callable[[], dict[str, Any] | None]
) -> tuple[bytes, bool, int | None]:
    """The live update of a batch (on a read thread: a large row is serialized off the event loop): the event with
    the device's new fleet row (``"type": "row"``, the row under ``device``), or — when that frame would exceed
    ``max_bytes`` — a small notice (``"type": "refetch"``) on which a page fetches the row itself
    (``/api/v1/fleet?device=ID``). A device with too many series for the bound gets the notice without its row being
    computed. Without a row (a device unknown by now): ``"type": "batch"``. Returns the frame, whether it is a
    notice, and the size of the row's frame when it was computed and found too large."""
    series = sum(1 for entry in store.series(event["device_id"]) if entry["kind"] == "inference")
    if series * MIN_SERIES_BYTES > max_bytes:
        return refetch_frame(event, max_bytes, series=series), True, None
    computed = row()
    if computed is None:
        return event_frame({**event, "type": "batch"}), False, None
    frame = event_frame({**event, "type": "row", "device": computed})
    if len(frame) <= max_bytes:
        return frame, False, None
    return refetch_frame(event, max_bytes, row_bytes=len(frame)), True, len(frame)


_KEEP_ALIVE = b": keep-alive\n\n"


class Subscriber:
    """One open stream, written to directly on its transport (an event is serialized and framed once for all; no
    task per subscriber wakes up for it): whatever the client has not taken stays in the transport's buffer, bounded
    by ``limit`` bytes."""

    __slots__ = ("chunked", "done", "limit", "transport")

    def __init__(self, transport: asyncio.Transport, chunked: bool, limit: int) -> None:
        self.transport, self.chunked, self.limit = transport, chunked, limit
        self.done = asyncio.Event()

    def send(self, frame: bytes, chunk: bytes) -> bool:
        """Writes one event (``chunk``: the same in HTTP/1.1 chunked framing); False when the client is too far
        behind or gone."""
        transport = self.transport
        if transport.is_closing() or transport.get_write_buffer_size() + len(frame) > self.limit:
            return False
        transport.write(chunk if self.chunked else frame)
        return True


def _chunk(frame: bytes) -> bytes:
    return b"%x\r\n%b\r\n" % (len(frame), frame)


class Broadcaster:
    """Fan-out of ingest events to every connected SSE client. Each event is serialized and framed once, whatever
    the number of clients, and written to each without a task switch; at most ``max_subscribers`` streams are open
    (beyond: 503 with Retry-After); a subscriber with more than ``max(SUBSCRIBER_BUFFER_BYTES, 4 × max_event_bytes)``
    not taken is dropped (its connection closed), never buffered without bound, and never blocks ingest. Counted:
    ``refused``, ``dropped``, ``events``, ``refetch_notices``."""

    def __init__(self, max_subscribers: int = 100, max_event_bytes: int = 64 * 1024) -> None:
        self.max_subscribers = max_subscribers
        self.max_event_bytes = max_event_bytes
        self.buffer_limit = max(SUBSCRIBER_BUFFER_BYTES, 4 * max_event_bytes)
        self.subscribers: set[Subscriber] = set()
        self.refused = 0
        self.dropped = 0
        self.events = 0
        self.refetch_notices = 0
        # devices whose live row is being computed, each with the newest event that arrived meanwhile (or None)
        self.rows_in_flight: dict[str, dict[str, Any] | None] = {}
        self._oversized: collections.OrderedDict[str, tuple[int, float]] = collections.OrderedDict()

    def oversized(self, device: str, now: float) -> int | None:
        """The frame size of ``device``'s row when it was over ``max_event_bytes`` less than
        ``OVERSIZED_RECHECK_S`` ago (no need to compute it again), else None."""
        seen = self._oversized.get(device)
        if seen is None or now - seen[1] >= OVERSIZED_RECHECK_S:
            return None
        return seen[0]

    def measured(self, device: str, row_bytes: int | None, now: float) -> None:
        """Remembers (or forgets) that ``device``'s row was too large for the stream."""
        if row_bytes is None:
            self._oversized.pop(device, None)
            return
        self._oversized[device] = (row_bytes, now)
        self._oversized.move_to_end(device)
        while len(self._oversized) > MAX_OVERSIZED:
            self._oversized.popitem(last=False)

    def publish(self, event: dict[str, Any]) -> None:
        """Sends ``event`` (as it is) to every subscriber."""
        self.publish_frame(event_frame(event))

    def publish_frame(self, frame: bytes, *, refetch: bool = False) -> None:
        """Writes one serialized event to every subscriber; drops those too far behind."""
        self.events += 1
        self.refetch_notices += refetch
        chunk = _chunk(frame)
        for subscriber in list(self.subscribers):
            if not subscriber.send(frame, chunk):
                self.drop(subscriber)

    def drop(self, subscriber: Subscriber) -> None:
        """Ends a subscriber that fell behind: its connection is closed at once (a client that does not read would
        otherwise hold its unsent events)."""
        if subscriber not in self.subscribers:
            return
        self.subscribers.discard(subscriber)
        if subscriber.transport.is_closing():  # gone by itself: nothing to count
            subscriber.done.set()
            return
        behind = subscriber.transport.get_write_buffer_size()
        self.dropped += 1
        log.warning("stream: dropped a subscriber %d bytes behind (it reconnects and refetches)", behind)
        subscriber.transport.abort()
        subscriber.done.set()

    def snapshot(self) -> dict[str, int]:
        return {
            "subscribers": len(self.subscribers),
            "max_subscribers": self.max_subscribers,
            "refused": self.refused,
            "dropped": self.dropped,
            "events": self.events,
            "refetch_notices": self.refetch_notices,
        }

    def close(self) -> None:
        """Ends every stream (on shutdown), so open browser tabs do not hold the server."""
        for subscriber in list(self.subscribers):
            subscriber.done.set()

    async def stream(self, request: web.Request, heartbeat_s: float = 15.0) -> web.StreamResponse:
        if len(self.subscribers) >= self.max_subscribers:
            self.refused += 1
            return web.json_response(
                {
                    "error": f"{len(self.subscribers)} live streams are open, the most this aggregator serves "
                    "(server.max_subscribers); retry later, or reload the page without live updates",
                    "max_subscribers": self.max_subscribers,
                },
                status=503,
                headers={"Retry-After": "30"},
            )
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        chunked = request.version >= HttpVersion11
        if chunked:  # said explicitly: events are then framed once, here, for every subscriber
            response.enable_chunked_encoding()
        await response.prepare(request)
        transport = request.transport
        if transport is None:
            return response
        try:  # the headers and the first bytes through aiohttp; everything after directly to the transport
            await response.write(f": connected\nretry: {RETRY_MS}\n\n".encode())
        except ConnectionError:
            return response
        subscriber = Subscriber(transport, chunked, self.buffer_limit)
        self.subscribers.add(subscriber)
        quiet_since = time.monotonic()
        try:
            while not subscriber.done.is_set():
                try:  # a client that went away is noticed within a second (aiohttp does not cancel this handler)
                    await asyncio.wait_for(subscriber.done.wait(), 1.0)
                except asyncio.TimeoutError:
                    if transport.is_closing():
                        break
                    if time.monotonic() - quiet_since >= heartbeat_s:
                        quiet_since = time.monotonic()
                        if not subscriber.send(_KEEP_ALIVE, _chunk(_KEEP_ALIVE)):
                            self.drop(subscriber)
        except asyncio.CancelledError:
            pass
        finally:
            self.subscribers.discard(subscriber)
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
