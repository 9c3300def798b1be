"""How well the regression search finds steps, and how often it cries wolf, on a seeded seasonal fleet.

    PYTHONPATH=$PWD .venv/bin/python bench/regressions.py [--devices 120] [--seeds 2] [--store-devices 25]

The fleet is tests/seasonal_fleet.py: devices in three classes with daily and weekday load (laptops strongly),
2-hour thermal bursts, 1 % outliers, 0.5 % failures, ~10 requests an hour per series. Two searches are compared on
the same requests: "before", the search main had until issue 32 (kept below as ``old_change_point``: Pettitt's test
on the latest 400 successful requests, p < 1e-5, median change ≥ 15 %), and "after", ``change_point`` of
aggregator/regressions.py as ``find_regressions`` calls it (the series' last 14 days of event time, at most 4,000
requests, with the times). Figures:

- false alarms with no step planted: each device's TTFT, TPOT and tok/s searched every 12 h over the third week of
  a 21-day fleet (14 searches × 3 metrics per device per seed), per test and per device-week (distinct changes
  found, by day, during the week);
- recall by step size (×1.15, ×1.5, ×2; TTFT up on odd devices, TPOT up on even ones, planted at a random hour of
  day 14 or 15) and age (searched 12 h, 24 h, 36 h and 96 h after the step): the planted metric found as a
  regression within 6 h of the step, and the median reported change;
- detection delay: searched every 2 h after the step (up to 48 h), the first search that finds it;
- cost: the search per series (measured above) and ``find_regressions`` on a SQLite store of ``--store-devices``
  devices × 28 days filled as ingest stores records, extrapolated to 1,000 devices × 4 weeks (said so).
"""

from __future__ import annotations

import argparse
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.regressions import Settings, change_point, find_regressions
from aggregator.store import SQLiteStore
from tests.seasonal_fleet import DAY_US, HOUR_US, START, SeasonalFleet, Step, fill, seasonal_fleet

START_US = int(START.timestamp() * 1e6)
METRICS = ("ttft_ms", "tpot_ms", "tokens_per_second")
HIGHER_IS_WORSE = {"ttft_ms": True, "tpot_ms": True, "tokens_per_second": False}


def poisson_upper(k: int, level: float = 0.95) -> float:
    """The one-sided upper confidence bound of a Poisson mean after observing ``k`` events (3.0 for none)."""
    lo, hi = 0.0, k + 10.0 * math.sqrt(k + 1) + 10.0
    for _ in range(100):
        mu = (lo + hi) / 2
        cdf = sum(math.exp(-mu + i * math.log(mu) - math.lgamma(i + 1)) for i in range(k + 1))
        lo, hi = (mu, hi) if cdf > 1 - level else (lo, mu)
    return hi


def old_change_point(values: np.ndarray) -> tuple[int, float, float] | None:
    """main's search before issue 32 (aggregator/regressions.py at 836f3f3): Pettitt's statistic over the raw
    values, p < 1e-5, the split placed by least absolute deviations, a median change ≥ 15 % with 20 values each side.
    (index, change, p) or None."""
    x = np.asarray(values, dtype=np.float64)
    n, m = len(x), 20
    if n < 2 * m:
        return None
    ranks = np.argsort(np.argsort(x, kind="mergesort"), kind="mergesort") + 1.0  # no ties in these values
    k = np.arange(1, n)
    u = 2.0 * np.cumsum(ranks)[:-1] - k * (n + 1.0)
    peak = float(np.max(np.abs(u)))
    p = min(1.0, 2.0 * math.exp(-6.0 * peak * peak / (float(n) ** 3 + float(n) ** 2)))
    if p >= 1e-5:
        return None
    best, best_cost = m, math.inf
    for i in range(m, n - m + 1):
        cost = float(np.abs(x[:i] - np.median(x[:i])).sum() + np.abs(x[i:] - np.median(x[i:])).sum())
        if cost < best_cost:
            best, best_cost = i, cost
    before, after = float(np.median(x[:best])), float(np.median(x[best:]))
    if abs(after - before) / before < 0.15:
        return None
    return best, (after - before) / before, p


SETTINGS = Settings()  # the "after" search's settings (--alpha, --min-duration-h)


class Search:
    """One of the two searches over a series' requests up to ``end_us`` (event time = receive order here)."""

    def __init__(self, name: str) -> None:
        self.name, self.tests, self.seconds = name, 0, 0.0
        self.settings = SETTINGS

    def run(self, times: np.ndarray, values: np.ndarray, end_us: int) -> tuple[int, float] | None:
        """(since_us, change) of the change found in the requests before ``end_us``, or None."""
        clock = time.perf_counter()
        self.tests += 1
        try:
            if self.name == "before":
                upto = np.searchsorted(times, end_us)
                lo = max(0, upto - 400)
                old = old_change_point(values[lo:upto])
                return None if old is None else (int(times[lo + old[0]]), old[1])
            sel = slice(
                np.searchsorted(times, end_us - int(self.settings.window_s * 1e6)), np.searchsorted(times, end_us)
            )
            t, v = times[sel][-self.settings.window :], values[sel][-self.settings.window :]
            cp = change_point(v, self.settings, t)
            return None if cp is None else (int(t[cp.index]), cp.change)
        finally:
            self.seconds += time.perf_counter() - clock


def false_alarms(devices: int, seeds: int) -> None:
    print(f"\nFalse alarms, no step planted: {devices} devices × {seeds} seeds, searched every 12 h in days 14–21")
    for search in (Search("before"), Search("after")):
        alarms, episodes = 0, set()
        for seed in range(seeds):
            fleet = seasonal_fleet(devices, 21.0, seed=100 + seed)
            for s in fleet.series.values():
                for metric in METRICS:
                    t, v = s.values(metric)
                    for half_days in range(28, 42):
                        found = search.run(t, v, START_US + half_days * DAY_US // 2 + DAY_US // 2)
                        if found is not None:
                            alarms += 1
                            episodes.add((seed, s.device_id, metric, found[0] // DAY_US))
        weeks = devices * seeds  # one week searched per device and seed
        print(
            f"  {search.name:<6} {alarms} alarms in {search.tests} tests = {alarms / search.tests:.2g} per test "
            f"(95 % upper bound {poisson_upper(alarms) / search.tests:.2g}); {len(episodes)} distinct changes in "
            f"{weeks} device-weeks = {len(episodes) / weeks:.3g} per device-week; "
            f"{1e3 * search.seconds / search.tests:.2f} ms per test"
        )


def planted(devices: int, factor: float, seed: int) -> SeasonalFleet:
    rng = np.random.default_rng(seed)
    steps = tuple(
        Step(
            f"{('orin', 'nano', 'laptop')[n % 3]}-{n:03d}",
            "ttft_ms" if n % 2 else "tpot_ms",
            factor,
            START_US + 14 * DAY_US + int(rng.integers(0, 2 * DAY_US)),
        )
        for n in range(devices)
    )
    return seasonal_fleet(devices, 20.0, seed=seed, steps=steps)


def recall(devices: int, seeds: int) -> None:
    print(f"\nRecall: {devices} devices × {seeds} seeds, one step each (TTFT or TPOT up), found within 6 h of it")
    ages = (12, 24, 36, 96)
    print(f"  {'search':<6} {'step':<6}" + "".join(f" {'+' + str(a) + ' h':>18}" for a in ages) + "   delay p50/p90")
    for search in (Search("before"), Search("after")):
        for factor in (1.15, 1.5, 2.0):
            found_by_age: dict[int, list[float]] = {a: [] for a in ages}
            delays: list[float] = []
            total = 0
            for seed in range(seeds):
                fleet = planted(devices, factor, 200 + seed)
                for step in fleet.steps:
                    total += 1
                    t, v = fleet.series[step.device_id].values(step.metric)

                    def hit(
                        end_us: int, t: Any = t, v: Any = v, step: Step = step, search: Search = search
                    ) -> float | None:
                        out = search.run(t, v, end_us)
                        if out is None or abs(out[0] - step.at_us) > 6 * HOUR_US or out[1] <= 0:
                            return None
                        return out[1]

                    for age in ages:
                        change = hit(step.at_us + age * HOUR_US)
                        if change is not None:
                            found_by_age[age].append(change)
                    for hours in range(2, 49, 2):
                        if hit(step.at_us + hours * HOUR_US) is not None:
                            delays.append(hours)
                            break
            cells = []
            for age in ages:
                changes = found_by_age[age]
                size = f" {np.median(changes) * 100:+.0f} %" if changes else ""
                cells.append(f"{len(changes) / total:>8.0%}{size:>10}")
            delay = (
                f"{np.percentile(delays, 50):.0f} h / {np.percentile(delays, 90):.0f} h ({len(delays)}/{total})"
                if delays
                else f"none within 48 h (0/{total})"
            )
            print(f"  {search.name:<6} ×{factor:<5}" + "".join(f" {c:>18}" for c in cells) + f"   {delay}")


def calibration(series: int) -> None:
    """How often the test's p-value falls below a level on independent values with no change (no times: no seasons
    or durations; min_change 0, 5 values a side): the Miller–Siegmund approximation's calibration."""
    rng = np.random.default_rng(1)
    settings = Settings(alpha=1e-2, min_change=0.0, min_segment=5)
    p = np.ones(series)
    for n in range(series):
        cp = change_point(rng.lognormal(0.0, 0.3, 672), settings)
        p[n] = cp.p_value if cp is not None else 1.0
    print(f"\nCalibration on {series} independent series of 672 values without a change:")
    for level in (1e-2, 1e-3):
        print(f"  p < {level:g}: {np.mean(p < level):.3%} of series")


def store_cost(devices: int) -> None:
    fleet = seasonal_fleet(devices, 28.0, seed=7)
    with tempfile.TemporaryDirectory() as tmp:
        store = SQLiteStore(Path(tmp) / "agg.db", synchronous="OFF")
        fill(store, fleet)
        records = store.record_count()
        clock = time.perf_counter()
        found = find_regressions(store)
        seconds = time.perf_counter() - clock
        store.close()
    print(
        f"\nCost: find_regressions on a SQLite store of {devices} devices × 28 days ({records} records): "
        f"{seconds:.2f} s, {len(found)} changes found; {1e3 * seconds / devices:.0f} ms per series (read + 3 "
        f"metrics) → about {seconds / devices * 1000:.0f} s for 1,000 devices × 4 weeks (extrapolated per series, "
        "one read thread)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--devices", type=int, default=120)
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--store-devices", type=int, default=25)
    parser.add_argument("--calibration", type=int, default=0, help="also this many null series (8000: ~20 s)")
    parser.add_argument("--alpha", type=float, default=Settings.alpha, help="the search's [fleet] regression_alpha")
    parser.add_argument(
        "--min-duration-h", type=float, default=Settings.min_duration_s / 3600, help="[fleet] regression_min_duration"
    )
    args = parser.parse_args()
    global SETTINGS
    SETTINGS = Settings(alpha=args.alpha, min_duration_s=args.min_duration_h * 3600)
    print(f"after: alpha {SETTINGS.alpha:g}, min duration {SETTINGS.min_duration_s / 3600:g} h")
    if args.calibration:
        calibration(args.calibration)
    false_alarms(args.devices, args.seeds)
    recall(args.devices, args.seeds)
    store_cost(args.store_devices)


if __name__ == "__main__":
    main()
