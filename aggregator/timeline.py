"""A device's history, downsampled on the server: what the device page draws, bounded whatever the history.

``GET /api/v1/devices/{device}/timeline?since=&until=&points=&width=`` answers a grid of equal time buckets over
the range (the bucket width is the smallest of :data:`WIDTHS` that keeps the grid within ``points``, or ``width``
when given) and, per model × strategy series and bucket, the requests, the errors, exact TTFT and TPOT p50/p95 of
the bucket's successful requests, the median of their tokens per second (output tokens ÷ e2e), mean J/token and
average power (W); beside them the batches the device sent (records, backlog, drops, quarantine: the last reported
value per bucket), and its facts (hottest zone, power mode, throttling) per bucket. Columns are arrays over the
grid, ``null`` where a bucket has nothing — the shape uPlot draws directly.

Buckets start at multiples of their width since the Unix epoch, so a later request for ``since=<the last
bucket's start>`` with the same ``width`` returns the same buckets again, updated: the page's live update fetches
only that tail. Times are the device's own clock (``started_us``) for requests and facts, the aggregator's
(``received_us``) for batches. At most ``max_rows`` requests are read (the newest in the range); an answer that hit
it says so (``truncated``). At most ``max_series`` series are answered (those with the most requests in the range;
``series_truncated`` counts the rest and says how to narrow: ``model=``, a shorter range). Through a
``reads.BoundedStore`` the whole computation honours the read's deadline (``server.max_query_seconds``).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Mapping
from typing import Any

from .api import BadParameter, _int, _time_us, name_filter
from .health import FACTS_KIND, facts_from_record
from .reads import deadline_of, truncation
from .rows import decode_wire
from .store import NULL_NAME, Query, Store

# bucket widths in seconds: 1, 5, 15, 30 min; 1, 3, 6, 12 h; 1 day; 1 week
WIDTHS = (60, 300, 900, 1800, 3600, 3 * 3600, 6 * 3600, 12 * 3600, 86400, 7 * 86400)
DEFAULT_POINTS = 240
MAX_POINTS = 1000
DEFAULT_RANGE_S = 7 * 86400
MAX_ROWS = 200_000
MAX_FACT_RECORDS = 2000
DEFAULT_MAX_SERIES = 100  # server.max_read_series

_COLUMNS = (
    "started_us",
    "model_name",
    "strategy",
    "ok",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "output_tokens",
    "j_per_token",
    "power_w",
)


def bucket_width(span_s: float, points: int) -> int:
    """The smallest width of :data:`WIDTHS` that covers ``span_s`` in at most ``points`` buckets (the widest
    otherwise)."""
    for width in WIDTHS:
        if span_s / width <= points:
            return width
    return WIDTHS[-1]


def _quantile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(sorted(values), n=100, method="inclusive")[q - 1]


def _finite(value: Any) -> bool:
    return type(value) in (int, float) and math.isfinite(value)


def _round(value: float | None, digits: int = 3) -> float | None:
    return None if value is None else round(value, digits)


def newest_started_us(store: Store, device: str) -> int | None:
    """When the device's latest-starting request started (its own clock), or None before it sent any: by start
    time, not by arrival, so a late-arriving old record does not move the page's range back."""
    rows = store.columns(Query(device=device, kind="inference"), ("MAX(started_us)",))
    return int(rows[0][0]) if rows and type(rows[0][0]) is int else None


def timeline(
    store: Store,
    device: str,
    *,
    since_us: int | None = None,
    until_us: int | None = None,
    points: int = DEFAULT_POINTS,
    width_s: int | None = None,
    range_s: float = DEFAULT_RANGE_S,
    max_rows: int = MAX_ROWS,
    max_series: int = DEFAULT_MAX_SERIES,
    model: str | None = None,
) -> dict[str, Any]:
    """The device's downsampled history (see the module's description). Without ``until_us`` the range ends
    after the device's newest request or newest batch, whichever is later; without ``since_us`` it starts
    ``range_s`` before that, or at the device's oldest request when that is later.
    ``model``: that model's series only."""
    deadline = deadline_of(store)
    if until_us is None:
        # after the newest request or the newest batch, whichever is later: the batches are timed by the
        # aggregator's clock, and the latest one (its backlog) is what an operator opens the page for
        newest = newest_started_us(store, device)
        latest_sync = store.syncs(device, limit=1)
        ends = [t for t in (newest, latest_sync[-1].received_us if latest_sync else None) if t is not None]
        # a device without requests or batches yet: up to now
        until_us = (max(ends) + 1) if ends else time.time_ns() // 1000
    if since_us is None:  # the range, or the device's whole history when that is shorter
        since_us = until_us - int(range_s * 1e6)
        oldest = store.columns(Query(device=device, kind="inference", since_us=since_us), ("MIN(started_us)",))
        if oldest and type(oldest[0][0]) is int:
            since_us = max(since_us, oldest[0][0])
    if since_us >= until_us:
        raise BadParameter("since", str(since_us / 1e6), f"a time before until ({until_us / 1e6:.0f})")
    width = width_s or bucket_width((until_us - since_us) / 1e6, points)
    step = width * 1_000_000
    first = since_us // step * step
    count = max(1, -(-(until_us - first) // step))
    if count > MAX_POINTS:
        raise BadParameter(
            "width", str(width), f"a width that covers this range in at most {MAX_POINTS} buckets, not {count}"
        )
    grid = [first + i * step for i in range(count)]

    rows = store.latest_columns(
        Query(device=device, kind="inference", model=model, since_us=first, until_us=until_us),
        _COLUMNS,
        max_rows,
        by_event=True,
    )
    # the series with the most requests in the range, at most max_series of them
    check = deadline.every(20_000)
    sizes: dict[tuple[str | None, str | None], int] = {}
    for row in rows:
        check()
        key = (None if row[1] in (None, NULL_NAME) else row[1], None if row[2] in (None, NULL_NAME) else row[2])
        sizes[key] = sizes.get(key, 0) + 1
    kept = set(sorted(sizes, key=lambda k: (-sizes[k], str(k[0]), str(k[1])))[:max_series])
    # per series, per bucket: the rows' values
    buckets: dict[tuple[str | None, str | None], list[list[tuple[Any, ...]]]] = {}
    for row in rows:
        check()
        started = row[0]
        if type(started) is not int:
            continue
        index = (started - first) // step
        if not 0 <= index < count:
            continue
        key = (None if row[1] in (None, NULL_NAME) else row[1], None if row[2] in (None, NULL_NAME) else row[2])
        if key in kept:
            buckets.setdefault(key, [[] for _ in range(count)])[index].append(row)
    series = []
    for (name, strategy), cells in sorted(buckets.items(), key=lambda kv: (str(kv[0][0]), str(kv[0][1]))):
        deadline.check()
        series.append(_series_columns(name, strategy, cells))
    left_out = len(sizes) - len(kept)
    errors = [
        sum(s["errors"][i] for s in series if s["n"][i]) if any(s["n"][i] for s in series) else None
        for i in range(count)
    ]
    return {
        "device_id": device,
        "since_us": first,
        "until_us": until_us,
        "width_s": width,
        "t": [g / 1e6 for g in grid],
        "series": series,
        "errors": errors,
        "syncs": _sync_columns(store, device, first, step, count),
        "facts": _fact_columns(store, device, first, until_us, step, count),
        "rows_read": len(rows),
        "truncated": len(rows) >= max_rows,
        "series_truncated": truncation(
            left_out,
            f"series beyond the {max_series} with the most requests in the range (server.max_read_series), "
            f"{sum(sizes[k] for k in sizes if k not in kept):,} requests",
            "model=NAME (GET /api/v1/devices/{device}/timeline?model=…) or a shorter range",
        )
        if left_out
        else None,
    }


def _series_columns(model: str | None, strategy: str | None, cells: list[list[tuple[Any, ...]]]) -> dict[str, Any]:
    out: dict[str, list[Any]] = {
        key: []
        for key in (
            "n",
            "errors",
            "ttft_p50",
            "ttft_p95",
            "tpot_p50",
            "tpot_p95",
            "tokens_per_second",
            "j_per_token",
            "power_w",
        )
    }
    for cell in cells:
        if not cell:
            for column in out.values():
                column.append(None)
            continue
        ok = [r for r in cell if r[3]]
        ttfts = [r[4] / 1000 for r in ok if _finite(r[4])]
        tpots = [r[5] / 1000 for r in ok if _finite(r[5])]
        rates = [r[7] / (r[6] / 1e6) for r in ok if _finite(r[6]) and r[6] > 0 and _finite(r[7]) and r[7]]
        joules = [r[8] for r in ok if _finite(r[8])]
        watts = [r[9] for r in ok if _finite(r[9])]
        out["n"].append(len(cell))
        out["errors"].append(len(cell) - len(ok))
        out["ttft_p50"].append(_round(_quantile(ttfts, 50)))
        out["ttft_p95"].append(_round(_quantile(ttfts, 95)))
        out["tpot_p50"].append(_round(_quantile(tpots, 50)))
        out["tpot_p95"].append(_round(_quantile(tpots, 95)))
        out["tokens_per_second"].append(_round(statistics.median(rates)) if rates else None)
        out["j_per_token"].append(_round(statistics.fmean(joules), 6) if joules else None)
        out["power_w"].append(_round(statistics.fmean(watts)) if watts else None)
    return {"model_name": model, "strategy": strategy or "local", **out}


def _sync_columns(store: Store, device: str, first: int, step: int, count: int) -> dict[str, Any]:
    """Per bucket: batches and records received, and the last backlog, drop and quarantine totals reported."""
    out: dict[str, list[Any]] = {
        key: [None] * count for key in ("batches", "records", "backlog", "dropped_total", "quarantined_total")
    }
    for sync in store.syncs(device, since_us=first, limit=MAX_POINTS * 50):
        index = (sync.received_us - first) // step
        if not 0 <= index < count:
            continue
        out["batches"][index] = (out["batches"][index] or 0) + 1
        out["records"][index] = (out["records"][index] or 0) + sync.records
        for key in ("backlog", "dropped_total", "quarantined_total"):
            value = getattr(sync, key)
            if value is not None:
                out[key][index] = value
    return out


def _fact_columns(store: Store, device: str, first: int, until_us: int, step: int, count: int) -> dict[str, Any]:
    """Per bucket, from the device's facts records: the hottest zone (°C, the bucket's maximum), whether any zone
    was throttling, the power mode; and the latest facts as a whole."""
    out: dict[str, list[Any]] = {key: [None] * count for key in ("temperature_max_c", "throttled", "power_mode")}
    rows = store.latest(Query(device=device, kind=FACTS_KIND, since_us=first, until_us=until_us), MAX_FACT_RECORDS)
    latest = None
    for row in rows:
        facts = facts_from_record(decode_wire(row))
        if facts is None:
            continue
        latest = facts
        index = (row["started_us"] - first) // step
        if not 0 <= index < count:
            continue
        hottest = facts["temperature_max_c"]
        if hottest is not None:
            current = out["temperature_max_c"][index]
            out["temperature_max_c"][index] = hottest if current is None else max(current, hottest)
        out["throttled"][index] = bool(out["throttled"][index]) or bool(facts["thermal_throttling"])
        out["power_mode"][index] = facts["power_mode"]
    return {**out, "latest": latest}


def parse_params(params: Mapping[str, str]) -> dict[str, Any]:
    """The timeline's query parameters, checked: ``since``/``until`` (RFC 3339 or Unix seconds), ``points``
    (2–1000), ``width`` (seconds, one of :data:`WIDTHS`), ``model`` (that model's series only)."""
    known = {"since", "until", "points", "width", "model"}
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadParameter(unknown[0], params[unknown[0]], "one of " + ", ".join(sorted(known)))
    model = name_filter("model", params.get("model"))
    width = params.get("width")
    if width is not None and (not width.isdigit() or int(width) not in WIDTHS):
        raise BadParameter("width", width, "a bucket width in seconds, one of " + ", ".join(map(str, WIDTHS)))
    return {
        "since_us": _time_us("since", params.get("since")),
        "until_us": _time_us("until", params.get("until")),
        "points": _int("points", params.get("points"), DEFAULT_POINTS, 2, MAX_POINTS),
        "width_s": int(width) if width is not None else None,
        "model": model,
    }
