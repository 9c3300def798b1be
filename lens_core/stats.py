"""Latency distributions in the seed's ``latency_distribution`` shape, computed with numpy.

Percentiles use numpy's default linear interpolation between closest ranks; ``stddev`` is the sample standard
deviation (n − 1 in the denominator, as llmperf and pandas compute it), 0 for a single sample. An empty input gives
``None``: the caller says why the distribution is missing rather than reporting NaN or zero.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

PERCENTILES = {"p50": 50.0, "p90": 90.0, "p95": 95.0, "p99": 99.0, "p999": 99.9}


def latency_distribution(values_ms: Iterable[float]) -> dict[str, float | int] | None:
    """Summarise values in milliseconds: mean, median, p50 … p999, min, max, stddev and sample_count."""
    data = np.asarray([float(v) for v in values_ms if v is not None], dtype=np.float64)
    if data.size == 0:
        return None
    if not np.all(np.isfinite(data)):
        raise ValueError("latency values must be finite")
    result: dict[str, float | int] = {
        "mean_ms": float(np.mean(data)),
        "median_ms": float(np.median(data)),
    }
    quantiles = np.percentile(data, list(PERCENTILES.values()))
    for name, value in zip(PERCENTILES, quantiles, strict=False):
        result[f"{name}_ms"] = float(value)
    result["min_ms"] = float(np.min(data))
    result["max_ms"] = float(np.max(data))
    result["stddev_ms"] = float(np.std(data, ddof=1)) if data.size > 1 else 0.0
    result["sample_count"] = int(data.size)
    return result


def metric_distribution(values: Iterable[float]) -> dict[str, float] | None:
    """The seed's ``metric_distribution`` (mean, median, p95, p99, min, max) for non-latency figures."""
    data = np.asarray(list(values), dtype=np.float64)
    if data.size == 0:
        return None
    p95, p99 = np.percentile(data, [95.0, 99.0])
    return {
        "mean": float(np.mean(data)),
        "median": float(np.median(data)),
        "p95": float(p95),
        "p99": float(p99),
        "min": float(np.min(data)),
        "max": float(np.max(data)),
    }


def ranks(values: Iterable[float]) -> np.ndarray:
    """Ranks 1…n of ``values``, ties sharing their mean rank (``scipy.stats.rankdata``'s ``average``)."""
    x = np.asarray(list(values), dtype=np.float64)
    order = np.argsort(x, kind="mergesort")
    out = np.empty(len(x), dtype=np.float64)
    if x.size == 0:
        return out
    sorted_x = x[order]
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], len(x)]
    for start, end in zip(starts, ends, strict=True):
        out[order[start:end]] = (start + end + 1) / 2.0  # the mean of ranks start+1 … end
    return out


def mann_whitney_u(a: Iterable[float], b: Iterable[float]) -> tuple[float, float]:
    """Mann–Whitney U test of two independent samples, two-sided: ``(U of a, p)``.

    The normal approximation with the tie correction and the continuity correction — what
    ``scipy.stats.mannwhitneyu(a, b, method="asymptotic")`` computes (tests/test_stats.py checks it against SciPy).
    It uses ranks only: no assumption about the shape of latency distributions (skewed, with outliers), and a
    thermal spike or a cold start moves it by one rank, not by its size. ``p`` is 1 when either sample is empty or
    every value is equal."""
    x, y = list(a), list(b)
    n1, n2 = len(x), len(y)
    if n1 == 0 or n2 == 0:
        return 0.0, 1.0
    r = ranks([*x, *y])
    u1 = float(r[:n1].sum()) - n1 * (n1 + 1) / 2.0
    n = n1 + n2
    _, counts = np.unique(r, return_counts=True)
    tie_term = float((counts.astype(np.float64) ** 3 - counts).sum())
    variance = n1 * n2 / 12.0 * ((n + 1) - tie_term / (n * (n - 1)))
    if variance <= 0:
        return u1, 1.0
    u = max(u1, n1 * n2 - u1)
    z = (u - n1 * n2 / 2.0 - 0.5) / math.sqrt(variance)
    return u1, min(1.0, math.erfc(z / math.sqrt(2.0)))


@dataclass(frozen=True)
class Comparison:
    """A candidate's values against a baseline's: medians, the relative change, and how sure it is."""

    baseline_median: float
    candidate_median: float
    baseline_n: int
    candidate_n: int
    p_value: float  # Mann–Whitney, two-sided
    improvement: float  # relative, positive when the candidate is better (in the metric's own direction)

    @property
    def confidence(self) -> float:
        """1 − p: how unlikely a difference this large is when the two do not differ (0 … 1)."""
        return max(0.0, min(1.0, 1.0 - self.p_value))

    def significant(self, alpha: float, min_improvement: float = 0.0) -> bool:
        """Better by at least ``min_improvement`` (relative) with ``p < alpha``."""
        return self.p_value < alpha and self.improvement >= min_improvement

    def as_dict(self) -> dict[str, float | int]:
        return {
            "baseline_median": self.baseline_median,
            "candidate_median": self.candidate_median,
            "baseline_n": self.baseline_n,
            "candidate_n": self.candidate_n,
            "p_value": self.p_value,
            "improvement": self.improvement,
        }


def compare(baseline: Iterable[float], candidate: Iterable[float], *, higher_is_better: bool = False) -> Comparison:
    """Compare two samples of one metric (latency: lower is better; tokens per second: ``higher_is_better``).

    ``improvement`` is the relative change of the median in the metric's good direction: a TPOT from 20 ms to
    16 ms is +0.20, tokens per second from 50 to 40 is −0.20. Both samples must be non-empty with a positive
    baseline median."""
    base, cand = [float(v) for v in baseline], [float(v) for v in candidate]
    if not base or not cand:
        raise ValueError("both samples need at least one value")
    b_med, c_med = float(np.median(base)), float(np.median(cand))
    if b_med <= 0:
        raise ValueError("the baseline's median must be positive")
    change = (c_med - b_med) / b_med
    _, p = mann_whitney_u(base, cand)
    return Comparison(b_med, c_med, len(base), len(cand), p, change if higher_is_better else -change)
