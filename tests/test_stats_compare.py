"""lens_core.stats.mann_whitney_u and compare: the test every recommendation and tune decision rests on.

The expected values are worked out by hand in the comments (the normal approximation with tie and continuity
correction), cross-checked against U counted pair by pair, and against SciPy's own
``scipy.stats.mannwhitneyu(method="asymptotic")`` on samples shaped like latencies (skewed, tied, outliers).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from lens_core.stats import compare, mann_whitney_u


def pairs_u(a: list[float], b: list[float]) -> float:
    """U of ``a`` counted pair by pair: #(a > b) + ½ #(a = b)."""
    return sum(1.0 if x > y else 0.5 if x == y else 0.0 for x in a for y in b)


def test_no_ties_by_hand() -> None:
    # ranks of [1, 2, 3 | 4, 5, 6] are 1…6: R1 = 6, U1 = R1 − n1(n1 + 1)/2 = 6 − 6 = 0.
    # var = n1·n2/12 · (n + 1) = 9/12 · 7 = 5.25 (no ties); U = max(U1, n1·n2 − U1) = 9;
    # z = (9 − 9/2 − 0.5)/√5.25 = 4/2.2913 = 1.74574; p = erfc(z/√2) = 0.0808556
    u, p = mann_whitney_u([1, 2, 3], [4, 5, 6])
    assert u == 0.0 == pairs_u([1, 2, 3], [4, 5, 6])
    assert p == pytest.approx(0.0808555983700523, rel=1e-12)


def test_ties_by_hand() -> None:
    # [1, 2, 2, 3 | 2, 3, 3, 4] sorted: 1, 2, 2, 2, 3, 3, 3, 4 → ranks 1, 3, 3, 3, 6, 6, 6, 8 (ties share the mean).
    # a's ranks 1 + 3 + 3 + 6 = 13, U1 = 13 − 10 = 3 (pairs: one 3 > 2, four ties → 1 + 4/2 = 3).
    # Tie groups of sizes 1, 3, 3, 1: Σ(t³ − t) = 24 + 24 = 48; var = 16/12 · (9 − 48/(8·7)) = 10.857143.
    # U = max(3, 13) = 13; z = (13 − 8 − 0.5)/√10.857143 = 1.365698; p = erfc(z/√2) = 0.172034
    a, b = [1, 2, 2, 3], [2, 3, 3, 4]
    u, p = mann_whitney_u(a, b)
    assert u == 3.0 == pairs_u(a, b)
    assert p == pytest.approx(0.17203370892182296, rel=1e-12)


def test_empty_and_all_equal() -> None:
    assert mann_whitney_u([], [1.0, 2.0]) == (0.0, 1.0)
    assert mann_whitney_u([1.0], []) == (0.0, 1.0)
    # every value equal: one tie group of 5, Σ(t³ − t) = 120 = n(n − 1)(n + 1)/… → var = 6/12 · (6 − 120/20) = 0
    u, p = mann_whitney_u([5.0, 5.0], [5.0, 5.0, 5.0])
    assert u == 3.0 and p == 1.0
    # the same sample on both sides: U = n1·n2/2 exactly, z ≤ 0, p capped at 1
    values = list(np.random.default_rng(1).lognormal(3.0, 0.3, 50))
    assert mann_whitney_u(values, values) == (1250.0, 1.0)


def test_symmetric_and_consistent_with_pair_counting() -> None:
    rng = np.random.default_rng(7)
    a = np.round(rng.lognormal(3.0, 0.2, 60), 1).tolist()  # rounded: plenty of ties
    b = np.round(rng.lognormal(3.1, 0.2, 45), 1).tolist()
    u_ab, p_ab = mann_whitney_u(a, b)
    u_ba, p_ba = mann_whitney_u(b, a)
    assert u_ab == pytest.approx(pairs_u(a, b)) and u_ab + u_ba == pytest.approx(60 * 45)
    assert p_ab == pytest.approx(p_ba, rel=1e-12) and 0.0 < p_ab < 0.05


def test_compare_direction_of_improvement() -> None:
    # latency: 20 ms → 16 ms is 20 % better; tokens per second: 50 → 40 is 20 % worse
    slower, faster = [19.0, 20.0, 20.0, 21.0, 20.5], [15.0, 16.0, 16.0, 17.0, 16.5]
    c = compare(slower, faster)
    assert (c.baseline_median, c.candidate_median, c.baseline_n, c.candidate_n) == (20.0, 16.0, 5, 5)
    assert c.improvement == pytest.approx(0.20)
    assert compare(faster, slower).improvement == pytest.approx(-0.25)  # 16 → 20 ms: a quarter worse
    rates = compare([50.0, 49.0, 51.0], [40.0, 41.0, 39.0], higher_is_better=True)
    assert rates.improvement == pytest.approx(-0.20)
    assert compare([40.0, 41.0, 39.0], [50.0, 49.0, 51.0], higher_is_better=True).improvement == pytest.approx(0.25)
    # separated samples of 5: U = 0; two tie groups of 2 (20.0 and 16.0): Σ(t³ − t) = 12,
    # var = 25/12 · (11 − 12/90) = 22.6389, z = (25 − 12.5 − 0.5)/√22.6389 = 2.52205, p = erfc(z/√2) = 0.0116673
    assert c.p_value == pytest.approx(math.erfc(12.0 / math.sqrt(25 / 12 * (11 - 12 / 90)) / math.sqrt(2)), rel=1e-12)
    assert c.p_value == pytest.approx(0.0116673, rel=1e-5)
    assert c.confidence == pytest.approx(1 - c.p_value)
    assert c.significant(0.05, 0.1) and not c.significant(0.01) and not c.significant(0.05, 0.25)
    assert c.as_dict()["improvement"] == c.improvement


def test_compare_refuses_what_it_cannot_judge() -> None:
    with pytest.raises(ValueError, match="at least one value"):
        compare([], [1.0])
    with pytest.raises(ValueError, match="at least one value"):
        compare([1.0], [])
    with pytest.raises(ValueError, match="median must be positive"):
        compare([0.0, 0.0, 1.0], [1.0])
    same = compare([3.0, 3.0, 3.0], [3.0, 3.0])
    assert same.p_value == 1.0 and same.improvement == 0.0 and same.confidence == 0.0


@pytest.mark.parametrize("seed", range(8))
def test_matches_scipy_on_latency_shaped_samples(seed: int) -> None:
    from scipy.stats import mannwhitneyu

    rng = np.random.default_rng(seed)
    n1, n2 = int(rng.integers(3, 60)), int(rng.integers(3, 60))
    # log-normal latencies rounded to 0.1 ms (ties, as a real clock's resolution makes them), a few stalls
    a = np.round(rng.lognormal(3.0, 0.3, n1), 1)
    b = np.round(rng.lognormal(3.0 + rng.uniform(-0.3, 0.3), 0.3, n2), 1)
    a[: max(1, n1 // 20)] *= 5
    u, p = mann_whitney_u(a.tolist(), b.tolist())
    reference = mannwhitneyu(a, b, alternative="two-sided", method="asymptotic", use_continuity=True)
    assert u == pytest.approx(float(reference.statistic), rel=1e-12)
    assert p == pytest.approx(float(reference.pvalue), rel=1e-9, abs=1e-15)
