"""Regressions found for the user: one change point per device × model × strategy series and metric.

What is read. Each series is read by event time — when its requests ran (``started_us``), not when they arrived —
over the ``window_s`` (14 days) before its newest request, at most ``window`` (4,000) successful requests. A late
backlog lands where it ran, a resent old batch among its neighbours, and a step stays findable for as long as it is
inside the window (two weeks), not only while it is among the last 400 requests received (40 h at 10 an hour).

What is modelled. For TTFT, TPOT, tokens per second and energy per output token (where the device measures power)
the log of each value is ``level(t) + season(hour of day, weekday or weekend day) + noise``, with bursts and at most
one step in ``level``. In order:

1. Buckets: consecutive requests of one clock hour form a bucket, cut into equal chunks of at most
   ``bucket_requests`` (5) when the hour is busier — fewer for a series of fewer than 120 × ``bucket_requests``
   requests, so that it still has about 120 buckets. A bucket's value is the median of its log values: a single
   outlier (a stall, a cold start) moves nothing, and testing buckets rather than requests keeps the correlation of
   neighbouring requests (the same load, the same temperature) from passing for evidence.
2. Seasons, with 3 days of history or more (else nothing is removed, and ``evidence["seasonal"]`` says so): the
   profile is estimated on the buckets' differences from a slow level (the median of the 7 days around each
   bucket's day) — the median per hour of day (3 buckets each), then per weekday and weekend day (12 buckets each;
   the device's day boundary, UTC−12 h … UTC+12 h, is the one that separates them best), then per hour of a weekday
   and of a weekend day (3 buckets each). Where a step is significant (p < 0.01), the profile is estimated again
   with the step taken out of the buckets after it, until the step measured is the step taken out: a step is not
   absorbed by the hours and days it happens to cover. The step is first located with the coarse profile (without
   the 48 hour × day-kind cells, which a step moves most).
3. Bursts: a run of buckets more than 4 robust deviations (MAD) from the median of the 12 hours around it, lasting
   at most ``max_burst_s`` (3 h: a thermal burst, a stall), with about the same level on both sides (the 6 hours
   before and after it differ by less than half the run's excursion) and away from the series' usual level, is left
   out of the test and counted (``bursts_removed``). A run at either end of the window, or between two levels, is
   kept: it may be a step.
4. The test: the standardized Mann–Whitney statistic of the buckets before each split against those after,
   ``Z_k = (2·W_k − k(n + 1)) / √(k(n − k)(n + 1)/3)`` (``W_k`` the rank sum of the first ``k`` buckets, ranked once
   and cumulated), maximised over the splits that leave ``min_duration_s`` after and a day before (a quarter of a
   shorter series each). The p-value for having looked at every split is Miller and Siegmund's (1982)
   approximation for a maximally selected rank statistic, ``p ≈ φ(b)(b − 1/b)·log(t₁(1 − t₀)/(t₀(1 − t₁))) +
   4φ(b)/b`` with ``b = max |Z_k|`` and ``[t₀, t₁]`` the share of buckets the splits span. Unlike Pettitt's ``K``,
   which judges a split near the end of the window by how few values follow it, each split is judged by its own
   standard error: a recent step is found once it is long enough, and an old one keeps being found.
5. Where and how large: the split is placed by least absolute deviations from two constant medians (over the
   buckets near the best ``Z_k``, then over the requests of the two buckets at the boundary); the change is the
   ratio of the medians of the deseasonalised requests after and before (bursts left out), so a ×1.15 step is
   reported as about +15 %.

It is reported when ``p`` is below ``alpha`` (1e-5 per series and metric); the deseasonalised medians differ by
``min_change`` (relative) or more, within the 95 % interval of the difference (1.96 standard errors of a difference
of medians, from the buckets' spread: a step of exactly ``min_change`` is not missed half of the time for being
estimated a little below it); each side holds ``min_segment`` requests; ``min_duration_s`` (8 h) of event time
follow the change (a quarter of the span of a series shorter than a day, such as a benchmark run); and it
persists: each third of the after side moved from the before side by half of ``min_change`` and a third of the
change at least, the same way. A burst that has not ended is therefore no step until it has lasted
``min_duration_s``, and one that ended is none. bench/regressions.py measures the false-alarm rate on a seeded
seasonal fleet (tests/seasonal_fleet.py) and the recall by step size and age; docs/PERFORMANCE.md has the figures.

A regression is a change in the bad direction (TTFT, TPOT or J/token up, tokens per second down); a change in the
good direction is reported as an improvement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .reads import bound_series
from .store import NULL_NAME, Query, RegressionChanges, Store

# metric → (how to read it from a stored row, True when higher is worse)
METRICS = ("ttft_ms", "tpot_ms", "tokens_per_second", "j_per_token", "guardrail_ms")
MAX_SERIES_PER_DEVICE = 32  # model × strategy series of one device searched per pass (the most recently seen)
HIGHER_IS_WORSE = {
    "ttft_ms": True,
    "tpot_ms": True,
    "tokens_per_second": False,
    "j_per_token": True,
    "guardrail_ms": True,  # the guardrail overhead (ext.guardrails.overhead_ms) of the series' current guardrail set
}
HOUR_US = 3600 * 10**6
DAY_US = 24 * HOUR_US
SEASONS_FROM_US = 3 * DAY_US  # history needed before the daily and weekly pattern is estimated and removed


@dataclass(frozen=True)
class Settings:
    window: int = 4000  # successful requests of a series examined at most (those that ran last)
    window_s: float = 14 * 86400.0  # … within this long of event time before the series' newest request
    min_segment: int = 20  # requests on each side of a change, at least
    min_duration_s: float = 8 * 3600.0  # event time after a change, at least (a quarter of a shorter series' span)
    max_burst_s: float = 3 * 3600.0  # an excursion that returned within this long is a burst, not a step
    bucket_requests: int = 5  # a clock hour with more requests is split into chunks of at most this many
    # significance per series and metric (a fleet of 200 devices × 3 series × 4 metrics is ~2,400 tests per search).
    # On independent values the p-value is conservative (0.46 % of null series below 0.01, 0.0125 % below 0.001);
    # on the seeded seasonal fleet bench/regressions.py measures 2e-4 false findings per test (one episode of two
    # close thermal bursts in 10,080 tests), docs/PERFORMANCE.md
    alpha: float = 1e-5
    min_change: float = 0.15  # relative change of the deseasonalised median that counts
    # requests whose device said other work contended with them (ext.interference) are left out unless this is set
    # ([fleet] regression_include_contended, --include-contended, ?include_contended=1): a busy device's slowdown is
    # not the series' regression
    include_contended: bool = False


def method_text(settings: Settings) -> str:
    """How the search works, in one line (for the API's ``method``)."""
    return (
        "maximally selected Mann–Whitney statistic over hourly medians of deseasonalised log values, read by event "
        f"time (last {settings.window_s / 86400:g} days, at most {settings.window} requests per series), "
        f"p < {settings.alpha:g} (Miller–Siegmund), median change ≥ {settings.min_change:.0%}, lasting "
        f"≥ {settings.min_duration_s / 3600:g} h, bursts ≤ {settings.max_burst_s / 3600:g} h left out"
        + ("" if settings.include_contended else ", contended requests left out")
    )


@dataclass(frozen=True)
class ChangePoint:
    index: int  # the first value after the change
    before_median: float
    after_median: float
    p_value: float  # Miller and Siegmund's approximation for the maximally selected statistic
    buckets: int = 0  # values the test compared (hourly buckets; or the values themselves without times)
    seasonal: str = "none"  # what was removed before testing
    bursts_removed: int = 0  # buckets left out as short bursts
    statistic: float = 0.0  # max |Z_k|

    @property
    def change(self) -> float:
        """(after − before) ÷ before."""
        return (self.after_median - self.before_median) / self.before_median


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1…n, ties sharing their mean rank."""
    _, inverse, counts = np.unique(values, return_inverse=True, return_counts=True)
    starts = np.cumsum(counts) - counts  # values below each distinct value
    return (starts + (counts + 1) / 2.0)[inverse.ravel()]


def _group_medians(values: np.ndarray, groups: np.ndarray, size: int) -> tuple[np.ndarray, np.ndarray]:
    """(median, count) of the values of each group 0…size−1 (median 0 where a group is empty), in one sort."""
    counts = np.bincount(groups, minlength=size)
    ordered = values[np.lexsort((values, groups))]
    first = np.cumsum(counts) - counts
    last = np.maximum(counts - 1, 0)
    medians = np.where(
        counts > 0,
        (
            ordered[np.minimum(first + last // 2, len(values) - 1)]
            + ordered[np.minimum(first + counts // 2, len(values) - 1)]
        )
        / 2.0,
        0.0,
    )
    return medians, counts


def _scan_p(b: float, t0: float, t1: float) -> float:
    """Miller and Siegmund's (1982) approximation of P(max |Z_k| ≥ b) over splits spanning [t0, t1] of the values
    (a standardized Brownian bridge), the same as the R package maxstat's for maximally selected rank statistics."""
    if b <= 1.0:
        return 1.0
    phi = math.exp(-0.5 * b * b) / math.sqrt(2 * math.pi)
    span = math.log(t1 * (1 - t0) / (t0 * (1 - t1))) if 0 < t0 < t1 < 1 else 0.0
    return min(1.0, phi * (b - 1 / b) * span + 4 * phi / b)


def _bucket(times: np.ndarray, per_bucket: int) -> np.ndarray:
    """Each value's bucket number: consecutive values of one clock hour, busier hours cut into equal chunks of at
    most ``per_bucket`` values (``times`` sorted)."""
    hours = times // HOUR_US
    starts = np.flatnonzero(np.r_[True, hours[1:] != hours[:-1]])
    ends = np.r_[starts[1:], len(times)]
    ids = np.empty(len(times), dtype=np.int64)
    next_id = 0
    for start, end in zip(starts.tolist(), ends.tolist(), strict=True):
        count = end - start
        chunks = -(-count // per_bucket)
        ids[start:end] = next_id + (np.arange(count) * chunks) // count
        next_id += chunks
    return ids


def _seasons(times: np.ndarray, values: np.ndarray, detail: bool = True) -> tuple[np.ndarray, str]:
    """The seasonal part of each bucket value (bucket start ``times``) and what it models (see the module text);
    ``detail=False`` leaves out the hour of a weekday or weekend day (48 cells of a few values each, which a step
    inside the window moves most)."""
    n = len(values)
    span = float(times[-1] - times[0]) if n else 0.0
    if span < SEASONS_FROM_US:
        return np.zeros(n), "none (less than 3 days of history)"
    days = times // DAY_US
    level = np.empty(n)
    for day in np.unique(days).tolist():  # the slow level: the median of the 7 days around each day
        near = (days >= day - 3) & (days <= day + 3)
        level[days == day] = np.median(values[near])
    rest = values - level
    hours = (times // HOUR_US) % 24
    parts = []
    medians, counts = _group_medians(rest, hours, 24)
    by_hour = np.where(counts >= 3, medians, 0.0)  # each hour of day needs 3 buckets
    if np.any(by_hour):
        parts.append("hour of day")
    season = by_hour[hours]
    rest = rest - season
    # weekdays and weekend days (1970-01-01 was a Thursday), in the device's own day: the day boundary (UTC−12 h …
    # UTC+12 h, every 2 h) that separates the two best, by the absolute deviations left
    best: tuple[float, int, np.ndarray, np.ndarray] | None = None
    for offset in range(-12, 13, 2):
        kind = ((((times + offset * HOUR_US) // DAY_US) + 3) % 7 >= 5).astype(np.int64)
        medians, counts = _group_medians(rest, kind, 2)
        by_day = np.where(counts >= 12, medians, 0.0)  # weekdays, weekend days: 12 buckets each
        cost = float(np.abs(rest - by_day[kind]).sum())
        if best is None or cost < best[0] - 1e-9:
            best = (cost, offset, kind, by_day)
    assert best is not None
    _, offset, day_kind, by_day = best
    if np.all(by_day):
        parts.append(f"weekday/weekend (days from UTC{offset:+d} h)")
    season = season + by_day[day_kind]
    rest = rest - by_day[day_kind]
    if not detail:
        return season, ", ".join(parts) or "none (no pattern)"
    cells = hours + 24 * day_kind
    medians, counts = _group_medians(rest, cells, 48)
    both = np.where(counts >= 3, medians, 0.0)  # each hour of a weekday or of a weekend day: 3 buckets
    if np.any(both):
        parts.append("hour of weekday and of weekend day")
    season = season + both[cells]
    return season, ", ".join(parts) or "none (no pattern)"


def _bursts(times: np.ndarray, values: np.ndarray, max_burst_us: float) -> np.ndarray:
    """Which buckets belong to a short burst (see the module text): True to leave out."""
    n = len(values)
    out = np.zeros(n, dtype=bool)
    if n < 8:
        return out
    # the level around each bucket: the median of the buckets within ±6 h (as many on each side as the series'
    # typical spacing puts there)
    spacing = float(np.median(np.diff(times))) or 1.0
    reach = int(min(max(3, round(6 * HOUR_US / spacing)), n // 2))
    padded = np.r_[np.full(reach, np.nan), values, np.full(reach, np.nan)]
    level = np.nanmedian(np.lib.stride_tricks.sliding_window_view(padded, 2 * reach + 1), axis=1)
    deviation = values - level
    scale = 1.4826 * float(np.median(np.abs(deviation)))
    if scale <= 0:
        return out
    flagged = np.abs(deviation) > 4 * scale
    usual = float(np.median(values))
    i = 0
    for i in np.flatnonzero(flagged).tolist():
        if out[i] or (i > 0 and flagged[i - 1]):
            continue  # inside a run already judged
        j = i
        while j + 1 < n and flagged[j + 1] and np.sign(deviation[j + 1]) == np.sign(deviation[i]):
            j += 1
        inside = i > 0 and j < n - 1  # ordinary buckets on both sides
        if inside and times[j] - times[i] <= max_burst_us:
            # … at the same level on both sides: a series that came back, not the edge of a step
            before = float(np.median(values[max(0, i - reach) : i]))
            after = float(np.median(values[j + 1 : j + 1 + reach]))
            run = float(np.median(values[i : j + 1]))
            # … and away from the series' usual level, not back to it (a gap between two bursts is no burst)
            if abs(after - before) < 0.5 * abs(run - before) and abs(run - usual) > abs(before - usual):
                out[i : j + 1] = True
    return out


def _medians(values: np.ndarray, ids: np.ndarray, first: np.ndarray, ends: np.ndarray) -> np.ndarray:
    """The median of each bucket's values (``ids`` sorted, bucket b at ``first[b]:ends[b]``), in one sort."""
    ordered = values[np.lexsort((values, ids))]
    counts = ends - first
    medians: np.ndarray = (ordered[first + (counts - 1) // 2] + ordered[first + counts // 2]) / 2.0
    return medians


def _lad_split(x: np.ndarray, lo: int, hi: int) -> int:
    """The split in [lo, hi] that fits two constant medians best (sum of absolute deviations)."""
    best, best_cost = lo, math.inf
    for i in range(lo, hi + 1):
        before, after = x[:i], x[i:]
        cost = float(np.abs(before - np.median(before)).sum() + np.abs(after - np.median(after)).sum())
        if cost < best_cost:
            best, best_cost = i, cost
    return best


@dataclass
class _Pass:
    """One test over the buckets deseasonalised one way (see :func:`change_point`)."""

    p: float
    statistic: float
    resid: np.ndarray  # deseasonalised log value of each request
    kept: np.ndarray  # values of the buckets tested (bursts left out)
    keep: np.ndarray  # their bucket numbers
    burst: np.ndarray  # per bucket: left out as a burst
    split: int  # first kept bucket after the change
    index: int  # first request after the change


def _test(
    logs: np.ndarray,
    ids: np.ndarray,
    first: np.ndarray,
    ends: np.ndarray,
    btimes: np.ndarray,
    bvals: np.ndarray,
    season: np.ndarray,
    settings: Settings,
    timed: bool,
) -> _Pass | None:
    n, m = len(logs), settings.min_segment
    values = bvals - season
    resid = logs - season[ids]
    span = float(btimes[-1] - btimes[0])
    min_after_us = min(settings.min_duration_s * 1e6, span / 4) if timed else 0.0
    # a day or more, too short for the daily pattern to be estimated and removed: a change must last a whole day,
    # so that night following day is not a step (with a day before it: two days of history at least)
    whole_day = timed and DAY_US <= span < SEASONS_FROM_US
    burst = _bursts(btimes, values, settings.max_burst_s * 1e6) if timed else np.zeros(len(values), dtype=bool)
    keep = np.flatnonzero(~burst)
    kv, kt = values[keep], btimes[keep]
    kn = len(kv)
    if kn < 4:
        return None
    requests_before = first[keep]  # requests before each kept bucket, for the min_segment rule
    splits = np.arange(1, kn)
    ok = (requests_before[splits] >= m) & (n - requests_before[splits] >= m)
    if timed:  # the level before a change is known over a day at least (a quarter of a shorter series)
        min_before_us = min(max(settings.min_duration_s * 1e6, DAY_US), span / 4)
        ok &= (btimes[-1] - kt[splits] >= min_after_us) & (kt[splits] - btimes[0] >= min_before_us)
    ranks = _ranks(kv)
    if whole_day:
        # where the change most likely is, among the splits the usual rules allow: one younger than a day is not
        # reported yet (rather than placed a day back, where the day rule would allow it)
        wider = splits[ok]
        if len(wider) == 0:
            return None
        kw = wider.astype(np.float64)
        uw = 2.0 * np.cumsum(ranks)[wider - 1] - kw * (kn + 1.0)
        likeliest = int(wider[int(np.argmax(np.abs(uw) / np.sqrt(kw * (kn - kw) * (kn + 1.0) / 3.0)))])
        if btimes[-1] - kt[likeliest] < DAY_US:
            return None
        ok &= btimes[-1] - kt[splits] >= DAY_US
    candidates = splits[ok]
    if len(candidates) == 0:
        return None
    k = candidates.astype(np.float64)
    u = 2.0 * np.cumsum(ranks)[candidates - 1] - k * (kn + 1.0)
    z = np.abs(u) / np.sqrt(k * (kn - k) * (kn + 1.0) / 3.0)
    best = int(np.argmax(z))
    b = float(z[best])
    t0, t1 = float(candidates[0]) / kn, float(candidates[-1]) / kn
    if t0 == t1:
        t0, t1 = max(t0 - 0.5 / kn, 0.5 / kn), min(t1 + 0.5 / kn, 1 - 0.5 / kn)
    p = _scan_p(b, t0, t1)
    # where: least absolute deviations over the kept buckets near the best split, then over the requests of the
    # two buckets at the boundary
    reach = min(12, max(3, kn // 20))
    lo = int(candidates[max(0, best - reach)])
    hi = int(candidates[min(len(candidates) - 1, best + reach)])
    split = _lad_split(kv, lo, hi)
    mb, ma = float(np.median(kv[:split])), float(np.median(kv[split:]))
    start, end = int(first[keep[split - 1]]), int(ends[keep[split]])
    near = resid[start:end]
    cost_before = np.r_[0.0, np.cumsum(np.abs(near - mb))]
    cost_after = np.r_[np.cumsum(np.abs(near - ma)[::-1])[::-1], 0.0]
    index = min(max(start + int(np.argmin(cost_before + cost_after)), m), n - m)
    return _Pass(p, b, resid, kv, keep, burst, split, index)


def change_point(
    values: Sequence[float] | np.ndarray,
    settings: Settings = Settings(),
    times_us: Sequence[int] | np.ndarray | None = None,
) -> ChangePoint | None:
    """The most likely single change in ``values`` (positive, in time order), or None when there is none worth
    reporting. With ``times_us`` (when each ran, sorted) the values are bucketed by hour, deseasonalised, cleared of
    bursts and held to ``min_duration_s``; without, each value is tested on its own (no seasons, no durations)."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    m = settings.min_segment
    if n < 2 * m or not np.all(x > 0):
        return None
    logs = np.log(x)
    timed = times_us is not None
    if times_us is None:
        ids = np.arange(n)
        times = np.arange(n, dtype=np.int64)
    else:
        times = np.asarray(times_us, dtype=np.int64)
        # a short series keeps about 120 buckets: chunks of fewer requests (down to one) when it has fewer than
        # 120 × bucket_requests
        ids = _bucket(times, min(settings.bucket_requests, max(1, n // 120)))
    first = np.r_[0, np.flatnonzero(ids[1:] != ids[:-1]) + 1]  # each bucket's first value
    ends = np.r_[first[1:], n]
    btimes = times[first]
    bvals = _medians(logs, ids, first, ends) if timed else logs
    season, seasonal = (np.zeros(len(bvals)), "none (no times)")
    if timed:  # first the coarse profile, which a step absorbs least, to find where a step is
        season, seasonal = _seasons(btimes, bvals, detail=False)
    found = _test(logs, ids, first, ends, btimes, bvals, season, settings, timed)
    if found is not None and timed and found.p < 0.01 and np.any(season):
        # a step inside the window is partly absorbed by the profile (its hours and day kind have more values
        # after it): estimate the full profile with the step measured so far taken out of the buckets after it,
        # and test again, until the step measured is the step taken out
        estimated = _seasons(btimes, bvals)[1]
        shift = float(np.median(found.kept[found.split :]) - np.median(found.kept[: found.split]))
        tried: list[tuple[float, float]] = []  # (step taken out, step measured)
        for _ in range(4):
            split = found.keep[found.split]
            season, seasonal = _seasons(btimes, bvals - shift * (np.arange(len(bvals)) >= split))
            again = _test(logs, ids, first, ends, btimes, bvals, season, settings, timed)
            if again is None:
                break
            found = again
            moved = float(np.median(found.kept[found.split :]) - np.median(found.kept[: found.split]))
            if abs(moved - shift) < 0.005:
                break
            tried.append((shift, moved))
            shift = moved
            if len(tried) >= 2:  # the measured step is about linear in the one taken out: where they agree
                (s0, m0), (s1, m1) = tried[-2], tried[-1]
                slope = (m1 - m0) / (s1 - s0) if s1 != s0 else 0.0
                if 0.0 <= slope < 0.9:
                    shift = (m1 - slope * s1) / (1 - slope)
        seasonal = estimated + " (estimated again with the step taken out)"
    if found is None or found.p >= settings.alpha:
        return None
    index, resid, burst, kv, split = found.index, found.resid, found.burst, found.kept, found.split
    # how large: the deseasonalised requests on either side (bursts left out)
    kept_value = ~burst[ids]
    before_side, after_side = resid[:index][kept_value[:index]], resid[index:][kept_value[index:]]
    if len(before_side) < m or len(after_side) < m:
        return None
    if timed and times[-1] - times[index] < min(settings.min_duration_s * 1e6, float(times[-1] - times[0]) / 4):
        return None
    lb, la = float(np.median(before_side)), float(np.median(after_side))
    before, after = math.exp(lb), math.exp(la)
    # large enough: the change's 95 % interval reaches min_change (a step of exactly min_change is estimated
    # below it half of the time); the standard error of the difference of the two sides' medians, from the
    # buckets' spread around their side's median
    bb, ba = kv[:split], kv[split:]
    spread = 1.4826 * float(np.median(np.abs(np.r_[bb - np.median(bb), ba - np.median(ba)])))
    error = 1.2533 * spread * math.sqrt(1 / len(bb) + 1 / len(ba))
    up = math.log1p(settings.min_change)
    down = math.log1p(-settings.min_change) if settings.min_change < 1 else -math.inf
    if down + 1.96 * error < la - lb < up - 1.96 * error:
        return None
    # it persists: each third of the after side moved by half of min_change and a third of the change at least,
    # the same way (two bursts
    # with a gap between them at the end of the window move the median of the whole after side, not every third)
    floor = max(math.log1p(settings.min_change / 2), abs(la - lb) / 3) * (1 if la > lb else -1)
    for part in np.array_split(after_side, 3):
        moved = float(np.median(part)) - lb
        if (moved < floor) if la > lb else (moved > floor):
            return None
    return ChangePoint(
        index=index,
        before_median=before,
        after_median=after,
        p_value=found.p,
        buckets=len(kv),
        seasonal=seasonal,
        bursts_removed=int(burst.sum()),
        statistic=found.statistic,
    )


def _metric(row: dict[str, Any], metric: str) -> float | None:
    if metric == "guardrail_ms":
        return _number(row["guardrail_ms"])
    if metric == "j_per_token":  # energy per output token, where the device measures power
        return _number(row["j_per_token"])
    if metric in ("ttft_ms", "tpot_ms"):
        value = _number(row["ttft_us" if metric == "ttft_ms" else "tpot_us"])
        return value / 1000 if value is not None else None
    e2e, tokens = _number(row["e2e_us"]), _number(row["output_tokens"])
    if e2e is not None and tokens and e2e > 0:
        return tokens / (e2e / 1e6)
    return None


def _number(value: Any) -> float | None:
    """A finite number from a stored column, else None (a row of an older version may hold anything)."""
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def guardrail_rows(rows: list[dict[str, Any]]) -> tuple[str | None, list[dict[str, Any]]]:
    """(the series' current guardrail set, its rows of that set): the guardrail overhead is searched over the
    requests of the set the series' newest guarded request ran with, so that changing sets (another workload, a set
    renamed) is not a step, while an update of the set's checks (a judge model twice as slow) is."""
    current = next((r["guardrail_set"] for r in reversed(rows) if type(r["guardrail_set"]) is str), None)
    if current is None:
        return None, []
    return current, [r for r in rows if r["guardrail_set"] == current]


def read_series(store: Store, entry: dict[str, Any], settings: Settings) -> list[dict[str, Any]]:
    """A series' successful requests the search examines: those that ran within ``window_s`` before its newest
    request (event time), at most ``window`` of them, in the order they ran (contended ones included)."""
    query = Query(device=entry["device_id"], kind="inference", model=entry["model_name"], strategy=entry["strategy"])
    rows = [
        dict(zip(_COLUMNS, values, strict=True))
        for values in store.latest_columns(query, _COLUMNS, settings.window, by_event=True)
        if values[1]
    ]
    rows = [r for r in rows if type(r["started_us"]) is int]
    if rows:
        cutoff = rows[-1]["started_us"] - int(settings.window_s * 1e6)
        rows = [r for r in rows if r["started_us"] >= cutoff]
    return rows


def find_regressions(
    store: Store, settings: Settings = Settings(), excluded: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Every series' change points (regressions and improvements), worst regressions first. Contended requests
    are left out unless ``settings.include_contended``; each finding says how many of its series' examined
    successful requests were (``contended_excluded``), and ``excluded["contended"]`` (when given) adds up those of
    every series searched."""
    found = []
    # bounded by construction: a device that sent thousands of model names costs MAX_SERIES_PER_DEVICE searches
    entries, _ = bound_series(store.series(), MAX_SERIES_PER_DEVICE)
    for entry in entries:
        if entry["kind"] != "inference":
            continue
        rows = read_series(store, entry, settings)
        left_out = 0
        if not settings.include_contended:
            kept = [r for r in rows if not r["contended"]]
            left_out = len(rows) - len(kept)
            rows = kept
        if excluded is not None:
            excluded["contended"] = excluded.get("contended", 0) + left_out
        guardrail_set, guarded = guardrail_rows(rows)
        for metric in METRICS:
            of = guarded if metric == "guardrail_ms" else rows
            points = [(r, v) for r in of if (v := _metric(r, metric)) is not None and v > 0]
            if len(points) < 2 * settings.min_segment:
                continue
            cp = change_point([v for _, v in points], settings, [r["started_us"] for r, _ in points])
            if cp is None:
                continue
            worse = (cp.change > 0) == HIGHER_IS_WORSE[metric]
            first = points[cp.index][0]
            engines = (
                sorted({str(r["engine"]) for r, _ in points[: cp.index]}),
                sorted({str(r["engine"]) for r, _ in points[cp.index :]}),
            )
            found.append(
                {
                    "device_id": entry["device_id"],
                    "model_name": None if entry["model_name"] == NULL_NAME else entry["model_name"],
                    "strategy": None if entry["strategy"] == NULL_NAME else entry["strategy"],
                    "metric": metric,
                    "kind": "regression" if worse else "improvement",
                    "change": cp.change,
                    "before_median": cp.before_median,
                    "after_median": cp.after_median,
                    "since_us": first["started_us"],
                    "since_received_us": first["received_us"],
                    "requests_before": cp.index,
                    "requests_after": len(points) - cp.index,
                    "p_value": cp.p_value,
                    "engine_before": engines[0],
                    "engine_after": engines[1],
                    "contended_excluded": left_out,
                    "evidence": {
                        "before_from_us": points[0][0]["started_us"],
                        "after_until_us": points[-1][0]["started_us"],
                        "n": len(points),
                        "buckets": cp.buckets,
                        "method": method_text(settings),
                        "seasonal": cp.seasonal,
                        "bursts_removed": cp.bursts_removed,
                        "statistic": round(cp.statistic, 3),
                        **({"guardrail_set": guardrail_set} if metric == "guardrail_ms" else {}),
                    },
                    "confidence": 1.0 - cp.p_value,
                }
            )
    found.sort(key=lambda f: (f["kind"] != "regression", -abs(f["change"])))
    return found


# Regressions as lasting objects (docs/fleet.md "Regressions"). Each search's findings are matched against the
# stored objects: a finding of a series key (device × model × strategy × metric × kind) that has an open or
# acknowledged object confirms it; one without opens an object. An object resolves when its series has recovered —
# the median of the metric over the latest ``min_segment`` successful requests (by event time, contended ones left
# out as the search leaves them out) is back within ``min_change`` of the object's ``before_median`` — not because a
# search stopped seeing it. Improvements are objects too (kind "improvement"): they resolve the same way (the series
# went back), and neither raise a device's health nor count on /metrics.
MAX_OPEN_PER_DEVICE = 64  # open or acknowledged objects of one device: past it, new findings are not kept
MAX_RESOLVED_PER_DEVICE = 100  # resolved objects kept per device (the newest)
MAX_ACTIVE_READ = 20_000  # open or acknowledged objects read per search (the whole fleet's)
SINCE_SLACK_US = 3600 * 1_000_000  # without evidence windows, findings this close to an object's since are the same


@dataclass(frozen=True)
class Observation:
    """One search's outcome, read on a read thread, before the writer applies it."""

    found: list[dict[str, Any]]
    changes: RegressionChanges
    contended_excluded: int


def _key(item: dict[str, Any]) -> tuple[Any, ...]:
    return (item["device_id"], item["model_name"], item["strategy"], item["metric"], item["kind"])


def _window(item: dict[str, Any]) -> tuple[int, int]:
    """The event-time span an object's or a finding's evidence covers (its since ± slack when it says none)."""
    evidence = item.get("evidence")
    since = int(item["since_us"])
    if type(evidence) is dict:
        start, until = evidence.get("before_from_us"), evidence.get("after_until_us")
        if type(start) is int and type(until) is int and start <= since <= until:
            return start, until
    return since - SINCE_SLACK_US, since + SINCE_SLACK_US


def near(finding: dict[str, Any], obj: dict[str, Any]) -> bool:
    """Whether a finding is the same change as an object of its series key: either's since lies within the
    other's evidence window."""
    lo, hi = _window(obj)
    if lo <= int(finding["since_us"]) <= hi:
        return True
    lo, hi = _window(finding)
    return lo <= int(obj["since_us"]) <= hi


def for_triggers(found: list[dict[str, Any]], active: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """What a trigger's ``regression`` condition judges: the open regression objects (kept until their series
    recovers, whether or not the latest search still sees them) and the latest search's findings not yet kept —
    never a change an operator acknowledged (acknowledging is how a known regression stops alerting)."""
    acknowledged = [o for o in active if o["state"] == "acknowledged"]
    fresh = [f for f in found if not any(_key(o) == _key(f) and near(f, o) for o in acknowledged)]
    return [o for o in active if o["state"] == "open"] + fresh


def recent_level(store: Store, key: tuple[Any, ...], settings: Settings) -> float | None:
    """The series' recent level of the key's metric: the median over its latest ``min_segment`` successful requests
    by event time (contended ones left out unless ``include_contended``); None with fewer such requests."""
    device, model, strategy, metric, _ = key
    query = Query(
        device=device,
        kind="inference",
        model=NULL_NAME if model is None else model,
        strategy=NULL_NAME if strategy is None else strategy,
    )
    want = settings.min_segment
    values: list[float] = []
    current: str | None = None  # guardrail_ms: the set of the newest guarded request (as the search reads it)
    for values_row in reversed(store.latest_columns(query, _COLUMNS, 4 * want, by_event=True)):
        row = dict(zip(_COLUMNS, values_row, strict=True))
        if not row["ok"] or (row["contended"] and not settings.include_contended):
            continue
        if metric == "guardrail_ms" and type(row["guardrail_set"]) is str:
            current = current or row["guardrail_set"]
            if row["guardrail_set"] != current:
                continue
        value = _metric(row, metric)
        if value is not None:
            values.append(value)
            if len(values) == want:
                return float(np.median(values))
    return None


def recovered(obj: dict[str, Any], level: float | None, settings: Settings) -> bool:
    """Whether the series' recent ``level`` is back: nearer the level before the change than the level after it
    (in ratio: past the geometric midpoint). A ×1.15 step is a 15 % change; "within ``min_change`` of before" would
    call it recovered at its own after level, and the plain recent median swings with the time of day."""
    before, after = obj["before_median"], obj["after_median"]
    if level is None or level <= 0 or before <= 0 or after <= 0 or before == after:
        return False
    return abs(math.log(level / before)) < abs(math.log(level / after))


def _is_recovery(finding: dict[str, Any], old: dict[str, Any], settings: Settings) -> bool:
    """Whether ``finding`` is the series going back after the resolved object ``old``: same series and metric,
    the other kind, after it, and its level after within ``min_change`` of ``old``'s level before."""
    if _key(finding)[:4] != _key(old)[:4] or finding["kind"] == old["kind"] or old["before_median"] <= 0:
        return False
    back = abs(finding["after_median"] - old["before_median"]) / old["before_median"]
    return int(finding["since_us"]) > int(old["since_us"]) and back < settings.min_change


class Watch:
    """The fleet's change points, searched at most every ``interval_s`` (on a read thread), and the regression
    objects they open, confirm and resolve (kept in the store: they survive a restart). ``found`` is the latest
    search's findings as they are (the triggers and the feedback read them); ``active`` the open and acknowledged
    objects after the latest search (the fleet page, health, /metrics)."""

    def __init__(self, interval_s: float, settings: Settings = Settings()) -> None:
        self.interval_s = interval_s
        self.settings = settings
        self.found: list[dict[str, Any]] = []
        self.active: list[dict[str, Any]] = []
        self.contended_excluded = 0  # contended requests left out of the last search (all series)
        self.computed_us: int | None = None
        self.last_changes: dict[str, list[int]] = {}
        self._computed_mono: float | None = None

    # -- the lasting objects --------------------------------------------------------------------------------
    def observe(self, store: Store, now_us: int) -> Observation:
        """Search every series and decide what changes (read only: on a read thread)."""
        excluded: dict[str, int] = {}
        found = find_regressions(store, self.settings, excluded)
        for item in found:
            item["summary"] = describe(item)
        active = store.regressions("active", limit=MAX_ACTIVE_READ)
        held = {_key(obj): obj for obj in active}
        levels: dict[tuple[Any, ...], float | None] = {}

        def level(key: tuple[Any, ...]) -> float | None:
            if key not in levels:
                levels[key] = recent_level(store, key, self.settings)
            return levels[key]

        # an object the search still sees is not recovered, whatever the latest requests' median says (a ×1.15
        # step's recent median crosses the midpoint at night); one it no longer sees resolves once the recent level
        # is back nearer the level before
        seen = {obj["id"] for finding in found if (obj := held.get(_key(finding))) is not None and near(finding, obj)}
        resolve = [
            obj["id"]
            for key, obj in held.items()
            if obj["id"] not in seen and recovered(obj, level(key), self.settings)
        ]
        gone = set(resolve)
        confirm: list[tuple[int, dict[str, Any]]] = []
        insert: list[dict[str, Any]] = []
        resolved_by_device: dict[str, list[dict[str, Any]]] = {}
        for finding in found:
            key = _key(finding)
            obj = held.get(key)
            if obj is not None and obj["id"] not in gone:
                # the same change confirms it; another change of a series whose object stands is not a second
                # object (at most one open per series key): the object stands until its series recovers
                if near(finding, obj):
                    confirm.append((obj["id"], finding))
                continue
            if obj is not None and near(finding, obj):  # the change just resolved, still seen in the window
                continue
            if recovered(finding, level(key), self.settings):  # already back where it was: nothing lasting
                continue
            device = finding["device_id"]
            if device not in resolved_by_device:
                resolved_by_device[device] = store.regressions("resolved", device=device, limit=MAX_RESOLVED_PER_DEVICE)
            if any(_key(old) == key and near(finding, old) for old in resolved_by_device[device]):
                continue  # a change that resolved before, still in the window: not opened again
            ended = [o for o in held.values() if o["id"] in gone] + resolved_by_device[device]
            if any(_is_recovery(finding, old, self.settings) for old in ended):
                continue  # the way back of a resolved change (an improvement after a regression): not a new one
            insert.append(finding)
        changes = RegressionChanges(
            confirm, insert, resolve, max_open=MAX_OPEN_PER_DEVICE, max_resolved=MAX_RESOLVED_PER_DEVICE
        )
        return Observation(found, changes, excluded.get("contended", 0))

    def settle(self, store: Store, observation: Observation, now_us: int) -> dict[str, list[int]]:
        """Apply an observation (on the store's writer)."""
        return store.apply_regressions(observation.changes, now_us)

    def load(self, store: Store) -> list[dict[str, Any]]:
        """The open and acknowledged objects now (read only)."""
        return store.regressions("active", limit=MAX_ACTIVE_READ)

    def apply(
        self,
        observation: Observation,
        active: list[dict[str, Any]],
        done: dict[str, list[int]],
        now_mono: float,
        now_us: int,
    ) -> None:
        self.update(observation.found, now_mono, now_us, contended_excluded=observation.contended_excluded)
        self.active, self.last_changes = active, done

    def run_once(self, store: Store, now_mono: float, now_us: int) -> dict[str, list[int]]:
        """observe, settle, load and apply in one go (blocking: the CLI and tests on one thread)."""
        observation = self.observe(store, now_us)
        done = self.settle(store, observation, now_us)
        self.apply(observation, self.load(store), done, now_mono, now_us)
        return done

    # -- the latest search, as it is ------------------------------------------------------------------------
    def search(self, store: Store, now_mono: float, now_us: int) -> list[dict[str, Any]]:
        """Searches every series now (blocking: on a read thread) and keeps what it found, storing nothing (a
        search with other settings than the configured ones: ``?include_contended=``)."""
        excluded: dict[str, int] = {}
        found = find_regressions(store, self.settings, excluded)
        self.update(found, now_mono, now_us, contended_excluded=excluded.get("contended", 0))
        return found

    def stale(self, now_mono: float) -> bool:
        return self._computed_mono is None or now_mono - self._computed_mono >= self.interval_s

    def update(self, found: list[dict[str, Any]], now_mono: float, now_us: int, *, contended_excluded: int = 0) -> None:
        for item in found:
            item["summary"] = describe(item)
        self.found, self._computed_mono, self.computed_us = found, now_mono, now_us
        self.contended_excluded = contended_excluded

    def answer(self, items: list[dict[str, Any]] | None = None, state: str = "open") -> dict[str, Any]:
        """What ``GET /api/v1/regressions`` answers: ``items`` (stored objects of ``state``; None: the latest
        search's findings, unstored, each with ``state`` "found" and ``id`` null) split into ``regressions`` and
        ``improvements``, the worst change first."""
        computed = (
            datetime.fromtimestamp(self.computed_us / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")
            if self.computed_us is not None
            else None
        )
        if items is None:
            items = [{**f, "id": None, "state": "found"} for f in self.found]
        ordered = sorted(items, key=lambda f: -abs(f["change"]))
        return {
            "computed_at": computed,
            "interval_s": self.interval_s,
            "state": state,
            "method": method_text(self.settings),
            "include_contended": self.settings.include_contended,
            "contended_excluded": self.contended_excluded,
            "regressions": [f for f in ordered if f["kind"] == "regression"],
            "improvements": [f for f in ordered if f["kind"] == "improvement"],
        }

    def by_device(self) -> dict[str, list[str]]:
        """Each device's open regressions, as the lines the fleet page shows (and health warns of)."""
        return self._lines("open")

    def acknowledged_by_device(self) -> dict[str, list[str]]:
        """Each device's acknowledged regressions' lines (health says them without raising the state)."""
        return self._lines("acknowledged")

    def _lines(self, state: str) -> dict[str, list[str]]:
        out: dict[str, list[str]] = {}
        for obj in sorted(self.active, key=lambda o: -abs(o["change"])):
            if obj["kind"] == "regression" and obj["state"] == state:
                out.setdefault(obj["device_id"], []).append(obj["summary"])
        return out

    def open_counts(self) -> dict[tuple[str, str], int]:
        """(device, metric) → how many open regressions (the /metrics gauge)."""
        out: dict[tuple[str, str], int] = {}
        for obj in self.active:
            if obj["kind"] == "regression" and obj["state"] == "open":
                key = (obj["device_id"], obj["metric"])
                out[key] = out.get(key, 0) + 1
        return out


_LABELS = {
    "ttft_ms": "TTFT",
    "tpot_ms": "TPOT",
    "tokens_per_second": "tok/s",
    "j_per_token": "J/token",
    "guardrail_ms": "guardrail overhead",
}
_COLUMNS = (
    "started_us",
    "ok",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "output_tokens",
    "engine",
    "received_us",
    "j_per_token",
    "contended",
    "guardrail_set",
    "guardrail_ms",
)


def describe(found: dict[str, Any]) -> str:
    """One line an operator reads: "TPOT +78 % on orin-nano-017 since 2026-11-27 09:44 UTC (model qwen unchanged,
    strategy local unchanged, engine unchanged; …)". The model and strategy are the series'; the engine (the
    records' ``engine``) is compared on both sides of the change."""
    when = datetime.fromtimestamp(found["since_us"] / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    before, after = found["engine_before"], found["engine_after"]
    engine = "engine unchanged" if before == after else f"engine {', '.join(before)} → {', '.join(after)}"
    change = f"{found['change'] * 100:+.0f} %"
    left_out = found.get("contended_excluded") or 0
    contended = f", {left_out} contended left out" if left_out else ""
    evidence = found.get("evidence")
    guarded = evidence.get("guardrail_set") if type(evidence) is dict else None
    if type(guarded) is str:
        engine = f"guardrail set {guarded[:64]} unchanged, {engine}"
    return (
        f"{_LABELS[found['metric']]} {change} on {found['device_id']} since {when} "
        f"(model {found['model_name'] or 'unnamed'} unchanged, strategy {found['strategy'] or 'local'} unchanged, "
        f"{engine}; median {found['before_median']:.4g} → {found['after_median']:.4g}, "
        f"{found['requests_before']} requests before, {found['requests_after']} after{contended})"
    )
