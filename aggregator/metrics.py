"""Prometheus metrics of the fleet and of the aggregator itself, served at ``GET /metrics``.

Names follow the seed's example output (§3.3.2): ``llm_latency_lens_time_to_first_token_seconds`` and friends,
labelled by device, model, provider and strategy. Label cardinality is bounded: at most ``max_series`` distinct
(device, model, provider, strategy) sets are tracked; records beyond that are counted under ``device="other"``,
and ``llm_latency_lens_metric_series_overflow_total`` says how many were.

Histogram buckets follow the OpenTelemetry GenAI semantic conventions' advice for
``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``, with extra bounds where edge
devices' values fall (neighbours at most ~1.33× apart for TTFT 15 ms–5 s and TPOT 1.5 ms–0.5 s); the request duration
uses the conventions' ``gen_ai.client.operation.duration`` advice. A quantile read from buckets
(``histogram_quantile``) is interpolated inside one bucket: its error is bounded by that bucket's width and measured
by ``bench/histogram_error.py`` (docs/PERFORMANCE.md). The fleet page and the API compute exact percentiles from
the records themselves.

The "latest request" gauges (tokens per second, J per token, acceptance rate) of a series not updated for
``stale_after_s`` are removed at the next scrape, so a device that stopped does not show its last value for ever.
"""

from __future__ import annotations

import contextlib
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

PREFIX = "llm_latency_lens"
LABELS = ("device", "model", "provider", "strategy")
# OpenTelemetry's advice (gen_ai.server.time_to_first_token), with bounds added so that no two neighbours are more
# than ~1.33× apart from 15 ms to 5 s, where edge devices' TTFTs fall
TTFT_BUCKETS = (
    0.001, 0.005, 0.01, 0.015, 0.02, 0.025, 0.03, 0.04, 0.05, 0.06, 0.08, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3,
    0.4, 0.5, 0.6, 0.75, 1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.5, 10.0, 20.0, 60.0,
)  # fmt: skip
# OpenTelemetry's advice (gen_ai.server.time_per_output_token), with bounds added so that no two neighbours are more
# than ~1.33× apart from 1.5 ms to 0.5 s, where edge devices' TPOTs fall
TPOT_BUCKETS = (
    0.001, 0.0015, 0.002, 0.0025, 0.003, 0.004, 0.005, 0.006, 0.0075, 0.01, 0.0125, 0.015, 0.02, 0.025,
    0.03, 0.04, 0.05, 0.06, 0.075, 0.1, 0.125, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5,
)  # fmt: skip
# OpenTelemetry's advice for gen_ai.client.operation.duration
DURATION_BUCKETS = (0.01, 0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.28, 2.56, 5.12, 10.24, 20.48, 40.96, 81.92)
CONTENT_TYPE = CONTENT_TYPE_LATEST


def provider_of(record: dict[str, Any]) -> str:
    strategy = record.get("strategy") or "local"
    if strategy == "cloud":
        return "openai"
    if strategy == "speculative":
        return "edge+cloud"
    if strategy == "offload":
        return "edge|cloud"
    return "local"


def observe_many(histogram: Any, values: list[float]) -> None:
    """``histogram.observe(v)`` for every value, in one pass: one increment per bucket touched instead of one per
    value (ingest observes three histograms per record). Falls back to ``observe`` if prometheus_client's
    histogram internals ever change."""
    if not values:
        return
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if bounds is None or buckets is None or total is None:
        for value in values:
            histogram.observe(value)
        return
    counts = [0] * len(bounds)
    for value in values:
        counts[bisect_left(bounds, value)] += 1  # the first bucket whose upper bound is >= value, as observe()
    total.inc(sum(values))
    for index, count in enumerate(counts):
        if count:
            buckets[index].inc(count)


class _ReadSkips:
    """``llm_latency_lens_read_undecodable_rows_total``: stored rows reads skipped because they do not decode."""

    def collect(self) -> Iterable[Any]:
        from .rows import UNDECODABLE

        family = CounterMetricFamily(
            f"{PREFIX}_read_undecodable_rows", "Stored rows a read skipped because they do not decode"
        )
        family.add_metric([], UNDECODABLE.total)
        yield family


class OtlpCollector:
    """The OTLP forwarder's progress per signal (docs/opentelemetry.md): what lags, what failed, what was refused."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import GaugeMetricFamily

        signals = self.snapshot()["signals"]
        families: dict[str, Any] = {
            "forwarded": CounterMetricFamily(
                f"{PREFIX}_otlp_forwarded_records", "Stored records the OTLP cursor moved past", labels=["signal"]
            ),
            "accepted": CounterMetricFamily(
                f"{PREFIX}_otlp_accepted_items", "Spans or data points the OTLP backend accepted", labels=["signal"]
            ),
            "rejected": CounterMetricFamily(
                f"{PREFIX}_otlp_rejected_items",
                "Spans or data points the OTLP backend refused (partial success, or a record refused alone)",
                labels=["signal"],
            ),
            "failures": CounterMetricFamily(
                f"{PREFIX}_otlp_export_failures",
                "OTLP export requests that delivered nothing (retried), by reason",
                labels=["signal", "reason"],
            ),
            "unencodable": CounterMetricFamily(
                f"{PREFIX}_otlp_unencodable_records",
                "Stored records the OTLP encoder could not encode, left out of the export (logged with their ids)",
                labels=["signal"],
            ),
            "failing": GaugeMetricFamily(
                f"{PREFIX}_otlp_backend_failing",
                "1 while the OTLP backend fails (down, not OTLP, or refusing every request): held, nothing skipped",
                labels=["signal"],
            ),
            "pending": GaugeMetricFamily(
                f"{PREFIX}_otlp_pending_records", "Stored records not yet exported", labels=["signal"]
            ),
            "lag": GaugeMetricFamily(
                f"{PREFIX}_otlp_lag_seconds",
                "Age of the oldest stored record not yet exported (0: none waiting)",
                labels=["signal"],
            ),
            "success": GaugeMetricFamily(
                f"{PREFIX}_otlp_last_success_timestamp_seconds",
                "When the backend last accepted an export (Unix seconds)",
                labels=["signal"],
            ),
        }
        for signal, status in signals.items():
            families["forwarded"].add_metric([signal], status["forwarded_records"])
            families["accepted"].add_metric([signal], status["accepted_items"])
            families["rejected"].add_metric([signal], status["rejected_items"])
            for reason, n in sorted(status["failures"].items()):
                families["failures"].add_metric([signal, reason], n)
            families["unencodable"].add_metric([signal], status["unencodable_records"])
            families["failing"].add_metric([signal], 1 if status["backend_failing"] else 0)
            families["pending"].add_metric([signal], status["pending_records"])
            families["lag"].add_metric([signal], status["lag_seconds"])
            if status["last_success_us"] is not None:
                families["success"].add_metric([signal], status["last_success_us"] / 1e6)
        yield from families.values()


class FleetMetrics:
    def __init__(
        self,
        max_series: int = 10_000,
        *,
        max_label_chars: int = 128,
        stale_after_s: float = 24 * 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.registry = CollectorRegistry()
        self.stale_after_s = stale_after_s
        self.clock = clock
        self._gauge_updates: dict[tuple[Any, tuple[str, ...]], float] = {}  # (gauge, labels) → when last set
        self.max_series = max_series
        self.max_label_chars = max_label_chars
        self._series: set[tuple[str, ...]] = set()
        self._lock = threading.Lock()
        r = self.registry
        self.ttft = Histogram(
            f"{PREFIX}_time_to_first_token_seconds",
            "Time to first token in seconds",
            LABELS,
            buckets=TTFT_BUCKETS,
            registry=r,
        )
        self.tpot = Histogram(
            f"{PREFIX}_time_per_output_token_seconds",
            "Time per output token after the first, seconds",
            LABELS,
            buckets=TPOT_BUCKETS,
            registry=r,
        )
        self.duration = Histogram(
            f"{PREFIX}_request_duration_seconds",
            "Request start to last token, seconds",
            LABELS,
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.tokens_per_second = Gauge(
            f"{PREFIX}_tokens_per_second",
            "Output tokens per second of the latest request",
            (*LABELS, "token_type"),
            registry=r,
        )
        self.requests = Counter(f"{PREFIX}_requests", "Measured requests", LABELS, registry=r)
        self.failed = Counter(
            f"{PREFIX}_requests_failed", "Measured requests that failed", (*LABELS, "error_type"), registry=r
        )
        self.joules = Gauge(
            f"{PREFIX}_joules_per_output_token",
            "Energy per output token of the latest request, net of idle (J)",
            LABELS,
            registry=r,
        )
        self.acceptance = Gauge(
            f"{PREFIX}_speculative_acceptance_rate",
            "Accepted ÷ drafted tokens of the latest speculative request",
            LABELS,
            registry=r,
        )
        self.dropped = Gauge(
            f"{PREFIX}_device_dropped_records",
            "Records the device's outbox dropped by policy (its cumulative total)",
            ("device",),
            registry=r,
        )
        self.quarantined = Gauge(
            f"{PREFIX}_device_quarantined_records",
            "Records the device quarantined (cumulative)",
            ("device",),
            registry=r,
        )
        self.backlog = Gauge(
            f"{PREFIX}_device_outbox_backlog_records",
            "Records pending in the device's outbox when it last sent a batch",
            ("device",),
            registry=r,
        )
        self.last_seen = Gauge(
            f"{PREFIX}_device_last_seen_timestamp_seconds",
            "When the aggregator last received a batch from the device (Unix time)",
            ("device",),
            registry=r,
        )
        self.regression = Gauge(
            f"{PREFIX}_regression_change_ratio",
            "A detected regression's relative change of the median, (after - before) / before; present only while "
            "the series is flagged",
            ("device", "model", "strategy", "metric"),
            registry=r,
        )
        self._regressions: set[tuple[str, str, str, str]] = set()
        # [[triggers]] (docs/triggers.md): present only while a trigger's condition holds on a series
        self.trigger_firing = Gauge(
            f"{PREFIX}_trigger_firing",
            "1 while the trigger's condition holds on the device × model × engine settings series (firing or "
            "cooling down); absent otherwise",
            ("trigger", "device", "model", "settings"),
            registry=r,
        )
        self._trigger_series: set[tuple[str, str, str, str]] = set()
        self.trigger_fires = Counter(
            f"{PREFIX}_trigger_fires", "Times a trigger fired (this aggregator's evaluations)", ("trigger",), registry=r
        )
        self.trigger_failures = Counter(
            f"{PREFIX}_trigger_evaluation_failures",
            "Trigger evaluations that did not complete, by reason (busy, timeout, error)",
            ("reason",),
            registry=r,
        )
        self.batches = Counter(f"{PREFIX}_ingest_batches", "Batches stored", registry=r)
        self.records = Counter(f"{PREFIX}_ingest_records", "Records received, by result", ("result",), registry=r)
        self.rejections = Counter(f"{PREFIX}_ingest_rejections", "Batches refused, by reason", ("reason",), registry=r)
        self.ingest_seconds = Histogram(
            f"{PREFIX}_ingest_duration_seconds",
            "Time to validate and store a batch",
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
            registry=r,
        )
        self.overflow = Counter(
            f"{PREFIX}_metric_series_overflow",
            'Records counted under device="other" because the label bound was reached',
            registry=r,
        )
        self.truncated = Counter(
            f"{PREFIX}_metric_labels_truncated",
            "Label values cut to the label length bound (server.max_label_chars)",
            registry=r,
        )
        r.register(_ReadSkips())

    def _cut(self, value: str) -> str:
        """A label value within ``max_label_chars`` (cut, and counted, when longer)."""
        if len(value) <= self.max_label_chars:
            return value
        self.truncated.inc()
        return value[: self.max_label_chars - 1] + "…"

    def _labels(self, labels: tuple[str, str, str, str]) -> tuple[str, str, str, str]:
        """The labels to use: these (each cut to ``max_label_chars``), or device="other" once ``max_series`` sets
        are tracked."""
        labels = (self._cut(labels[0]), self._cut(labels[1]), self._cut(labels[2]), self._cut(labels[3]))
        with self._lock:
            if labels not in self._series:
                if len(self._series) >= self.max_series:
                    return ("other", labels[1], labels[2], labels[3])
                self._series.add(labels)
        return labels

    def observe(self, device: str, records: Iterable[dict[str, Any]]) -> None:
        """Update the fleet metrics from newly accepted records (wire maps), one label lookup per series."""
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for record in records:
            if record.get("kind") == "inference":
                key = (
                    str(record.get("model_name") or "unknown"),
                    provider_of(record),
                    str(record.get("strategy") or "local"),
                )
                groups.setdefault(key, []).append(record)
        for (model, provider, strategy), group in groups.items():
            labels = self._labels((device, model, provider, strategy))
            if labels[0] == "other" and device != "other":
                self.overflow.inc(len(group))
            self.requests.labels(*labels).inc(len(group))
            ok = [record for record in group if record.get("ok")]
            if len(ok) < len(group):
                for record in group:
                    if not record.get("ok"):
                        self.failed.labels(*labels, self._cut(str(record.get("error_type") or "unknown"))).inc()
            if not ok:
                continue
            observe_many(self.ttft.labels(*labels), [v / 1e6 for r in ok if (v := r.get("ttft_us")) is not None])
            observe_many(self.tpot.labels(*labels), [v / 1e6 for r in ok if (v := r.get("tpot_us")) is not None])
            observe_many(self.duration.labels(*labels), [v / 1e6 for r in ok if (v := r.get("e2e_us"))])
            last_ok = ok[-1]
            # gauges: the latest successful request of the batch
            if e2e := last_ok.get("e2e_us"):
                self._set(
                    self.tokens_per_second, (*labels, "output"), (last_ok.get("output_tokens") or 0) / (e2e / 1e6)
                )
            ext: dict[str, Any] = last_ok["ext"] if isinstance(last_ok.get("ext"), dict) else {}
            energy, collab = ext.get("energy"), ext.get("collab")
            if isinstance(energy, dict) and isinstance(energy.get("j_per_output_token"), (int, float)):
                self._set(self.joules, labels, energy["j_per_output_token"])
            if isinstance(collab, dict) and isinstance(collab.get("acceptance_rate"), (int, float)):
                self._set(self.acceptance, labels, collab["acceptance_rate"])

    def _set(self, gauge: Gauge, labels: tuple[str, ...], value: float) -> None:
        """A latest-request gauge, with when it was set (see :meth:`drop_stale`)."""
        gauge.labels(*labels).set(value)
        with self._lock:
            self._gauge_updates[(gauge, labels)] = self.clock()

    def drop_stale(self) -> int:
        """Removes the latest-request gauges not set for ``stale_after_s``; returns how many series went."""
        cutoff = self.clock() - self.stale_after_s
        with self._lock:
            stale = [key for key, when in self._gauge_updates.items() if when < cutoff]
            for key in stale:
                del self._gauge_updates[key]
        for gauge, labels in stale:
            with contextlib.suppress(KeyError):  # removed already
                gauge.remove(*labels)
        return len(stale)

    def device(self, device: str, counters: dict[str, int], seen_unix: float) -> None:
        device = self._cut(device)
        self.last_seen.labels(device).set(seen_unix)
        if "dropped_total" in counters:
            self.dropped.labels(device).set(counters["dropped_total"])
        if "quarantined_total" in counters:
            self.quarantined.labels(device).set(counters["quarantined_total"])
        if "pending_records" in counters:
            self.backlog.labels(device).set(counters["pending_records"])

    def regressions(self, found: Iterable[dict[str, Any]]) -> None:
        """The current regressions as ``llm_latency_lens_regression_change_ratio``; series no longer flagged go."""
        current: dict[tuple[str, str, str, str], float] = {}
        for f in found:
            if f["kind"] == "regression":
                key = (
                    self._cut(f["device_id"]),
                    self._cut(str(f["model_name"] or "unknown")),
                    self._cut(str(f["strategy"] or "local")),
                    f["metric"],
                )
                current[key] = f["change"]
        with self._lock:
            gone = self._regressions - set(current)
            self._regressions = set(current)
        for key in gone:
            with contextlib.suppress(KeyError):
                self.regression.remove(*key)
        for key, change in current.items():
            self.regression.labels(*key).set(change)

    def configure_triggers(self, names: Iterable[str]) -> None:
        """Every configured trigger's fire counter, from 0 (so that rate() and increase() see the first fire)."""
        for name in names:
            self.trigger_fires.labels(self._cut(name))
        for reason in ("busy", "timeout", "error"):
            self.trigger_failures.labels(reason)

    def triggers(self, holding: Iterable[Any], fires: Iterable[Any]) -> None:
        """After an evaluation: ``llm_latency_lens_trigger_firing`` for the series whose condition holds
        (``aggregator.triggers.SeriesState``), series that no longer hold go; each new fire counted."""
        current = {
            (
                self._cut(s.trigger.name),
                self._cut(s.series[0]),
                self._cut(s.series[1] or "unknown"),
                self._cut(s.series[2] or "unknown"),
            )
            for s in holding
        }
        with self._lock:
            gone = self._trigger_series - current
            self._trigger_series = current
        for key in gone:
            with contextlib.suppress(KeyError):
                self.trigger_firing.remove(*key)
        for key in current:
            self.trigger_firing.labels(*key).set(1)
        for fire in fires:
            self.trigger_fires.labels(self._cut(fire.trigger.name)).inc()

    def trigger_failure(self, reason: str) -> None:
        self.trigger_failures.labels(reason).inc()

    def exposition(self) -> bytes:
        self.drop_stale()
        return bytes(generate_latest(self.registry))


def bucket_quantile(q: float, bounds: Sequence[float], counts: Sequence[int]) -> float | None:
    """What Prometheus's ``histogram_quantile(q, …)`` reads from these buckets: ``counts[i]`` observations in
    (``bounds[i-1]``, ``bounds[i]``] (the first from 0, one more count for +Inf), linear inside the bucket that holds
    the rank q × total; the highest finite bound when that rank falls in +Inf. None without observations."""
    total = sum(counts)
    if total == 0:
        return None
    rank = q * total
    seen = 0
    for i, count in enumerate(counts):
        if seen + count >= rank and count:
            if i >= len(bounds):
                return bounds[-1]
            lower = bounds[i - 1] if i else 0.0
            return lower + (bounds[i] - lower) * (rank - seen) / count
        seen += count
    return bounds[-1]


def bucket_counts(values: Iterable[float], bounds: Sequence[float]) -> list[int]:
    """Observations per bucket (``le`` upper bounds, then +Inf), as a histogram with these bounds counts them."""
    counts = [0] * (len(bounds) + 1)
    for value in values:
        counts[bisect_left(bounds, value)] += 1
    return counts
