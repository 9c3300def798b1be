"""Regressions found for the user: one change point per device × model × strategy series and metric.

For each series the aggregator takes its latest ``window`` successful requests in the order they were received and
asks, for TTFT, TPOT, tokens per second and energy per output token (where the device measures power): is there
a point before which the values are drawn from one distribution and after which from another, and is the change
large enough to matter?

The test is Pettitt's (1979) non-parametric change-point test: for every split ``k`` the Mann–Whitney statistic of
"before" against "after", ``U_k = 2·W_k − k(n + 1)`` with ``W_k`` the rank sum of the first ``k`` values (ties get
their mean rank), all computed in one pass — the values are ranked once and ``W_k`` is a cumulative sum. With
``K = max |U_k|`` over the splits, Pettitt's ``p ≈ 2·exp(−6K² / (n³ + n²))`` already accounts for having looked at
every split. Where there is a change, it is placed at the split that best fits two constant-median segments (least
absolute deviations; see :func:`_locate`). It is reported when

- ``p`` is below ``alpha`` — the test uses ranks only, so a few outliers (a thermal spike, a cold start) neither make
  nor hide a change, and it assumes nothing about the shape of latency distributions, which are skewed; and
- the medians on either side, each at least ``min_segment`` requests long, differ by at least ``min_change``
  (relative): a real but tiny shift is not a regression an operator should be paged for.

This is the single-change case of the E-divisive family that Apache Otava and MongoDB's signal processing use,
with a rank statistic instead of energy distances: simpler, exact enough for "did this series get slower, and since
when", and cheap enough to run over a whole fleet every few minutes. A regression is a change in the bad direction
(TTFT, TPOT or J/token up, tokens per second down); a change in the good direction is reported as an improvement.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

import numpy as np

from .reads import bound_series
from .store import NULL_NAME, Query, Store

# metric → (how to read it from a stored row, True when higher is worse)
METRICS = ("ttft_ms", "tpot_ms", "tokens_per_second", "j_per_token")
MAX_SERIES_PER_DEVICE = 32  # model × strategy series of one device searched per pass (the most recently seen)
HIGHER_IS_WORSE = {"ttft_ms": True, "tpot_ms": True, "tokens_per_second": False, "j_per_token": True}


@dataclass(frozen=True)
class Settings:
    window: int = 400  # latest successful requests of a series examined
    min_segment: int = 20  # requests on each side of a change, at least
    # false-alarm bound per series and metric: a fleet of 200 devices × 3 series × 4 metrics is ~2,400 tests per
    # search, so about 0.024 false alarms per search across the whole fleet at most
    alpha: float = 1e-5
    min_change: float = 0.15  # relative change of the median that counts
    # requests whose device said other work contended with them (ext.interference) are left out unless this is set
    # ([fleet] regression_include_contended, --include-contended, ?include_contended=1): a busy device's slowdown is
    # not the series' regression
    include_contended: bool = False


@dataclass(frozen=True)
class ChangePoint:
    index: int  # the first value after the change
    before_median: float
    after_median: float
    p_value: float  # Pettitt's approximation

    @property
    def change(self) -> float:
        """(after − before) ÷ before."""
        return (self.after_median - self.before_median) / self.before_median


def _ranks(values: np.ndarray) -> np.ndarray:
    """Ranks 1…n, ties sharing their mean rank."""
    order = np.argsort(values, kind="mergesort")
    ranks = np.empty(len(values), dtype=np.float64)
    sorted_values = values[order]
    # boundaries of runs of equal values
    starts = np.flatnonzero(np.r_[True, sorted_values[1:] != sorted_values[:-1]])
    ends = np.r_[starts[1:], len(values)]
    for start, end in zip(starts, ends, strict=True):
        ranks[order[start:end]] = (start + end + 1) / 2.0  # mean of ranks start+1 … end
    return ranks


def change_point(values: Sequence[float], settings: Settings = Settings()) -> ChangePoint | None:
    """The most likely single change in ``values`` (time order), or None when there is none worth reporting."""
    x = np.asarray(values, dtype=np.float64)
    n = len(x)
    m = settings.min_segment
    if n < 2 * m:
        return None
    ranks = _ranks(x)
    k = np.arange(1, n)  # values before the split
    u = 2.0 * np.cumsum(ranks)[:-1] - k * (n + 1.0)
    best = int(np.argmax(np.abs(u)))
    peak = float(abs(u[best]))
    p = min(1.0, 2.0 * math.exp(-6.0 * peak * peak / (float(n) ** 3 + float(n) ** 2)))
    if p >= settings.alpha:
        return None
    i = _locate(x, m)
    before, after = float(np.median(x[:i])), float(np.median(x[i:]))
    if before <= 0 or abs(after - before) / before < settings.min_change:
        return None
    return ChangePoint(index=i, before_median=before, after_median=after, p_value=min(1.0, p))


def _locate(x: np.ndarray, m: int) -> int:
    """Where the change is, once it is known there is one: the split (each side at least ``m`` long) that makes
    two constant-median segments fit best, by the sum of absolute deviations from each side's median. Pettitt's own
    argmax is biased when the change is far from the middle (values of the longer side near the other side's
    level pull it a few places away); this least-absolute-deviation fit is not, and is as robust to outliers."""
    best, best_cost = m, math.inf
    for i in range(m, len(x) - m + 1):
        before, after = x[:i], x[i:]
        cost = float(np.abs(before - np.median(before)).sum() + np.abs(after - np.median(after)).sum())
        if cost < best_cost:
            best, best_cost = i, cost
    return best


def _metric(row: dict[str, Any], metric: str) -> float | None:
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


def find_regressions(
    store: Store, settings: Settings = Settings(), excluded: dict[str, int] | None = None
) -> list[dict[str, Any]]:
    """Every series' change points (regressions and improvements), worst regressions first. Contended requests
    are left out unless ``settings.include_contended``; each finding says how many of its series' latest
    ``window`` successful requests were (``contended_excluded``), and ``excluded["contended"]`` (when given) adds up
    those of every series searched."""
    found = []
    # bounded by construction: a device that sent thousands of model names costs MAX_SERIES_PER_DEVICE searches
    entries, _ = bound_series(store.series(), MAX_SERIES_PER_DEVICE)
    for entry in entries:
        if entry["kind"] != "inference":
            continue
        query = Query(
            device=entry["device_id"], kind="inference", model=entry["model_name"], strategy=entry["strategy"]
        )
        rows = [
            dict(zip(_COLUMNS, values, strict=True))
            for values in store.latest_columns(query, _COLUMNS, settings.window)
            if values[1]
        ]
        left_out = 0
        if not settings.include_contended:
            kept = [r for r in rows if not r["contended"]]
            left_out = len(rows) - len(kept)
            rows = kept
        if excluded is not None:
            excluded["contended"] = excluded.get("contended", 0) + left_out
        for metric in METRICS:
            points = [(r, v) for r in rows if (v := _metric(r, metric)) is not None]
            cp = change_point([v for _, v in points], settings)
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
                }
            )
    found.sort(key=lambda f: (f["kind"] != "regression", -abs(f["change"])))
    return found


class Watch:
    """The fleet's current change points, recomputed at most every ``interval_s`` (on a read thread) and kept for
    the API, the fleet page and ``/metrics``."""

    def __init__(self, interval_s: float, settings: Settings = Settings()) -> None:
        self.interval_s = interval_s
        self.settings = settings
        self.found: list[dict[str, Any]] = []
        self.contended_excluded = 0  # contended requests left out of the last search (all series)
        self.computed_us: int | None = None
        self._computed_mono: float | None = None

    def search(self, store: Store, now_mono: float, now_us: int) -> list[dict[str, Any]]:
        """Searches every series now (blocking: on a read thread) and keeps what it found."""
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

    def answer(self) -> dict[str, Any]:
        computed = (
            datetime.fromtimestamp(self.computed_us / 1e6, tz=timezone.utc).isoformat().replace("+00:00", "Z")
            if self.computed_us is not None
            else None
        )
        return {
            "computed_at": computed,
            "interval_s": self.interval_s,
            "method": "Pettitt's rank test for one change point in each series' latest requests, "
            f"p < {self.settings.alpha:g}, median change ≥ {self.settings.min_change:.0%}, "
            f"≥ {self.settings.min_segment} requests each side, latest {self.settings.window} per series"
            + ("" if self.settings.include_contended else ", contended requests left out"),
            "include_contended": self.settings.include_contended,
            "contended_excluded": self.contended_excluded,
            "regressions": [f for f in self.found if f["kind"] == "regression"],
            "improvements": [f for f in self.found if f["kind"] == "improvement"],
        }

    def by_device(self) -> dict[str, list[str]]:
        """Each device's regressions, as the lines the fleet page shows."""
        out: dict[str, list[str]] = {}
        for f in self.found:
            if f["kind"] == "regression":
                out.setdefault(f["device_id"], []).append(f["summary"])
        return out


_LABELS = {"ttft_ms": "TTFT", "tpot_ms": "TPOT", "tokens_per_second": "tok/s", "j_per_token": "J/token"}
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
    return (
        f"{_LABELS[found['metric']]} {change} on {found['device_id']} since {when} "
        f"(model {found['model_name'] or 'unnamed'} unchanged, strategy {found['strategy'] or 'local'} unchanged, "
        f"{engine}; median {found['before_median']:.4g} → {found['after_median']:.4g}, "
        f"{found['requests_before']} requests before, {found['requests_after']} after{contended})"
    )
