"""Latency distributions in the seed's ``latency_distribution`` shape, computed with numpy.

Percentiles use numpy's default linear interpolation between closest ranks; ``stddev`` is the sample standard
deviation (n − 1 in the denominator, as llmperf and pandas compute it), 0 for a single sample. An empty input gives
``None``: the caller says why the distribution is missing rather than reporting NaN or zero.
"""

from __future__ import annotations

from collections.abc import Iterable

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
