from __future__ import annotations

import math

import pytest

from lens_core.stats import latency_distribution, metric_distribution


def test_hand_checked_values() -> None:
    # Linear interpolation between closest ranks over [1, 2, 3, 4]: rank = q/100 × (n − 1).
    dist = latency_distribution([4.0, 1.0, 3.0, 2.0])
    assert dist is not None
    assert dist["mean_ms"] == 2.5
    assert dist["median_ms"] == 2.5
    assert dist["p50_ms"] == 2.5
    assert dist["p90_ms"] == pytest.approx(3.7)
    assert dist["p95_ms"] == pytest.approx(3.85)
    assert dist["p99_ms"] == pytest.approx(3.97)
    assert dist["p999_ms"] == pytest.approx(3.997)
    assert dist["min_ms"] == 1.0 and dist["max_ms"] == 4.0
    assert dist["stddev_ms"] == pytest.approx(math.sqrt(5 / 3))  # sample stddev, n − 1
    assert dist["sample_count"] == 4


def test_single_value_and_empty() -> None:
    dist = latency_distribution([7.5])
    assert dist is not None and dist["stddev_ms"] == 0.0 and dist["p99_ms"] == 7.5
    assert latency_distribution([]) is None
    assert latency_distribution([None]) is None  # type: ignore[list-item]


def test_non_finite_values_are_refused() -> None:
    with pytest.raises(ValueError):
        latency_distribution([1.0, float("nan")])


def test_metric_distribution() -> None:
    dist = metric_distribution([10, 20, 30])
    assert dist == {
        "mean": 20.0,
        "median": 20.0,
        "p95": pytest.approx(29.0),
        "p99": pytest.approx(29.8),
        "min": 10.0,
        "max": 30.0,
    }
    assert metric_distribution([]) is None
