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
from .store import NULL_NAME, Query, RegressionChanges, Store

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
    for values_row in reversed(store.latest_columns(query, _COLUMNS, 4 * want, by_event=True)):
        row = dict(zip(_COLUMNS, values_row, strict=True))
        if not row["ok"] or (row["contended"] and not settings.include_contended):
            continue
        value = _metric(row, metric)
        if value is not None:
            values.append(value)
            if len(values) == want:
                return float(np.median(values))
    return None


def recovered(obj: dict[str, Any], level: float | None, settings: Settings) -> bool:
    before = obj["before_median"]
    return level is not None and before > 0 and abs(level - before) / before < settings.min_change


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

        resolve = [obj["id"] for key, obj in held.items() if recovered(obj, level(key), self.settings)]
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
            "method": "Pettitt's rank test for one change point in each series' latest requests, "
            f"p < {self.settings.alpha:g}, median change ≥ {self.settings.min_change:.0%}, "
            f"≥ {self.settings.min_segment} requests each side, latest {self.settings.window} per series"
            + ("" if self.settings.include_contended else ", contended requests left out"),
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
