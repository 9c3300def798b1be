"""How far a percentile read from the /metrics histograms (Grafana's ``histogram_quantile``) is from the exact one.

    .venv/bin/python bench/histogram_error.py [--samples 2000] [--seed 1]

Latencies drawn from log-normal distributions (what request latencies look like: a body and a long right tail)
whose medians cover what edge devices measure — TTFT 20 ms to 3 s, TPOT 2 ms to 150 ms — with a narrow (σ = 0.25)
and a wide (σ = 0.6) spread. For each, p50, p95 and p99 from the buckets (interpolated as Prometheus does) against
the exact percentile of the same samples; relative error, median and worst over the medians. The buckets in use
(``aggregator.metrics``) and those of the first release are compared.
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aggregator.metrics import TPOT_BUCKETS, TTFT_BUCKETS, bucket_counts, bucket_quantile

FIRST_RELEASE = {
    "ttft": (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0),
    "tpot": (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0),
}
CURRENT = {"ttft": TTFT_BUCKETS, "tpot": TPOT_BUCKETS}
MEDIANS = {
    "ttft": [0.02, 0.035, 0.05, 0.08, 0.12, 0.18, 0.25, 0.35, 0.5, 0.7, 1.0, 1.4, 2.0, 3.0],
    "tpot": [0.002, 0.004, 0.006, 0.009, 0.013, 0.018, 0.025, 0.035, 0.05, 0.07, 0.1, 0.15],
}


def errors(values: np.ndarray, bounds: tuple[float, ...], q: float) -> float:
    exact = float(np.quantile(values, q))
    estimate = bucket_quantile(q, bounds, bucket_counts(values.tolist(), bounds))
    assert estimate is not None
    return abs(estimate - exact) / exact


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--samples", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    rng = np.random.default_rng(args.seed)
    print(f"{'metric':<6}{'σ':>6}{'q':>6}{'first release: median':>24}{'worst':>8}{'current: median':>18}{'worst':>8}")
    for metric, medians in MEDIANS.items():
        for sigma in (0.25, 0.6):
            samples = [rng.lognormal(np.log(m), sigma, args.samples) for m in medians]
            for q in (0.5, 0.95, 0.99):
                old = [errors(s, FIRST_RELEASE[metric], q) for s in samples]
                new = [errors(s, CURRENT[metric], q) for s in samples]
                print(
                    f"{metric:<6}{sigma:>6.2f}{q:>6.2f}{statistics.median(old):>24.1%}{max(old):>8.1%}"
                    f"{statistics.median(new):>18.1%}{max(new):>8.1%}"
                )


if __name__ == "__main__":
    main()
