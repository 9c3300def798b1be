"""Prometheus metrics of the fleet and of the aggregator itself, served at ``GET /metrics``.

Names follow the seed's example output (§3.3.2): ``llm_latency_lens_time_to_first_token_seconds`` and friends,
labelled by device, model, provider and strategy. Label cardinality is bounded by construction (:class:`SeriesBudget`):
every label set that carries a value a device sent (model, strategy, error type, engine settings, …) takes a place
in one budget, at most ``max_series_per_device`` per device and ``max_series`` in all. A label set past either bound
is *folded*: every device-sent label becomes ``"other"`` (:func:`fold`), so the overflow of the whole fleet lands in
one series per metric; ``llm_latency_lens_metric_series_overflow_total{reason}`` counts the folded observations and
the device's health says it (:meth:`SeriesBudget.device_status`). Label values lose their control characters (C0,
DEL, C1) and are cut to ``max_label_chars``.

The exposition is built off the event loop and shared by the scrapes of one ``max_age_s`` (:class:`ExpositionCache`).

Histogram buckets follow the OpenTelemetry GenAI semantic conventions' advice for
``gen_ai.server.time_to_first_token`` and ``gen_ai.server.time_per_output_token``, with extra bounds where edge
devices' values fall (neighbours at most ~1.33× apart for TTFT 15 ms–5 s and TPOT 1.5 ms–0.5 s); the request duration
uses the conventions' ``gen_ai.client.operation.duration`` advice. A quantile read from buckets
(``histogram_quantile``) is interpolated inside one bucket: its error is bounded by that bucket's width and measured
by ``bench/histogram_error.py`` (docs/PERFORMANCE.md). The fleet page and the API compute exact percentiles from
the records themselves.

Tokens per second is the median over the series' latest :data:`RECENT_REQUESTS` successful requests by the time they
ran (:class:`LatestByTime`: a late or resent batch of old requests does not move it), the fleet page's figure; J per
token and the acceptance rate are the latest request's. These gauges of a series not updated for ``stale_after_s``
are removed at the next scrape, so a device that stopped does not show its last value for ever. After a restart,
each device's latest stored requests are observed again (:func:`recent_requests`, :meth:`FleetMetrics.restore`).
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import re
import statistics
import threading
import time
import uuid
from bisect import bisect_left, insort
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from lens_core.guardrail_view import OUTCOMES, SEVERITIES, STAGES, VIOLATION_TYPES, guardrail_view
from lens_core.record_schema import contended

from .store import NULL_NAME, Query, Store
from .store import SCHEMA_VERSION as STORE_SCHEMA

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
# guardrail stages (docs/metrics.md "Guardrails"): 0.1 ms (a rules check) to 10 s (a local judge model), 1-2-5 steps
GUARDRAIL_STAGE_BUCKETS = (
    0.0001, 0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip
# the stages' share of the guarded request (ext.guardrails.impact_percent / 100): 0.1 % to all of it
GUARDRAIL_RATIO_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.3, 0.5, 0.75, 1.0)
# guardrail set names shown on /metrics: the first ones seen fleet-wide, the rest "other"
MAX_GUARDRAIL_SETS = 16
CONTENT_TYPE = CONTENT_TYPE_LATEST
# a device's latest inference requests that its contended share (and the fleet page's figures) are taken over
RECENT_REQUESTS = 50
# what a restart reads back of each device's latest RECENT_REQUESTS requests (by the time they ran): enough to observe
# them again (FleetMetrics.restore), no record bodies
RESTORE_COLUMNS = (
    "started_us",
    "model_name",
    "strategy",
    "ok",
    "error_type",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "output_tokens",
    "j_per_token",
    "contended",
)
# … and, from store schema 10 on, the guarded requests' columns (docs/metrics.md "Guardrails")
GUARDRAIL_RESTORE_COLUMNS = (
    "guardrail_set",
    "guardrail_outcome",
    "guardrail_input_ms",
    "guardrail_threat_ms",
    "guardrail_output_ms",
    "guardrail_impact",
)
GUARDRAIL_SCHEMA = 10  # the store schema that holds them


def stored_request(row: Sequence[Any], null_name: str) -> dict[str, Any]:
    """A stored row of :data:`RESTORE_COLUMNS` (then, from store schema 10, :data:`GUARDRAIL_RESTORE_COLUMNS`) as the
    record keys :meth:`FleetMetrics.observe` reads (``null_name``: the store's marker of a missing model or strategy;
    a value of the wrong type is left out)."""
    values = dict(zip(RESTORE_COLUMNS, row[: len(RESTORE_COLUMNS)], strict=True))
    out: dict[str, Any] = {"kind": "inference", "ok": bool(values["ok"]), "contended": bool(values["contended"])}
    for name in ("model_name", "strategy", "error_type"):
        value = values[name]
        out[name] = value if type(value) is str and value != null_name else None
    for name in ("started_us", "output_tokens"):
        out[name] = values[name] if type(values[name]) is int else None
    for name in ("ttft_us", "tpot_us", "e2e_us"):
        value = _finite(values[name], math.nan)
        out[name] = None if math.isnan(value) else value
    joules = values["j_per_token"]
    if type(joules) in (int, float) and math.isfinite(joules):
        out["ext"] = {"energy": {"j_per_output_token": joules}}
    guard = stored_guardrails(row[len(RESTORE_COLUMNS) :])
    if guard is not None:
        out.setdefault("ext", {})["guardrails"] = guard
    return out


def stored_guardrails(row: Sequence[Any]) -> dict[str, Any] | None:
    """The stored guardrail columns (:data:`GUARDRAIL_RESTORE_COLUMNS`, when the row carries them) as the part of
    ``ext.guardrails`` the guardrail series read (set, outcome, each stage's time, the impact); None when the
    request was not guarded. Violations are in the record bodies, not in columns: they are not observed again."""
    if len(row) != len(GUARDRAIL_RESTORE_COLUMNS):
        return None
    values = dict(zip(GUARDRAIL_RESTORE_COLUMNS, row, strict=True))
    if type(values["guardrail_set"]) is not str:
        return None
    stages = {
        stage: {"ms": ms}
        for stage in ("input", "threat", "output")
        if type(ms := values[f"guardrail_{stage}_ms"]) in (int, float)
    }
    return {
        "set": values["guardrail_set"],
        "outcome": values["guardrail_outcome"],
        "impact_percent": values["guardrail_impact"],
        "stages": stages,
    }


OTHER = "other"
GUARDED_KINDS = ("inference", "blocked")  # a blocked request (kind blocked) is counted in the guardrail series only
FOLD_REASONS = ("per_device", "global")
# C0 controls, DEL and C1 controls: a terminal or a log viewer acts on them; a label never needs one
# control characters, and the invisible ones that make two labels look alike or reorder text on a dashboard: zero-width
# spaces and joiners, bidirectional marks, embeddings, overrides and isolates, line and paragraph separators, the BOM
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u200b-\u200f\u2028-\u202e\u2060-\u2064\u2066-\u2069\ufeff]")


def clean_label(value: str, max_chars: int) -> tuple[str, bool, bool]:
    """(the value without control characters and cut to ``max_chars``, whether characters were removed, whether it
    was cut). A value left empty reads ``unknown``."""
    cleaned = _CONTROL.sub("", value)
    removed = len(cleaned) != len(value)
    if not cleaned:
        cleaned = "unknown"
    if len(cleaned) <= max_chars:
        return cleaned, removed, False
    return cleaned[: max_chars - 1] + "…", removed, True


def fold(labels: Sequence[str], sent: Sequence[bool]) -> tuple[str, ...]:
    """The overflow rule: every label a device sent (``sent``) becomes ``"other"``; the aggregator's own labels
    (a trigger's name, a metric's name, a token type) stay."""
    return tuple(OTHER if by_device else value for value, by_device in zip(labels, sent, strict=True))


@dataclass
class DeviceFolds:
    """What the budget refused one device: observations folded, by reason, and when last."""

    observations: int = 0
    by_reason: dict[str, int] = field(default_factory=dict)
    last_reason: str = ""
    last_unix: float = 0.0


class SeriesBudget:
    """Label sets keyed by what devices send, bounded per device (``max_per_device``) and overall (``max_total``).

    :meth:`admit` answers None for a set already tracked or newly admitted, else the bound it would pass
    (``per_device`` first, then ``global``); a refused set is not remembered (the caller folds it), so the budget's
    memory is bounded by its own bounds. :meth:`release` frees a set whose series went (a gauge removed). What was
    refused is kept per device (at most ``max_total`` devices; beyond that under ``"other"``) for the health page.
    Thread-safe."""

    def __init__(self, max_total: int, max_per_device: int, clock: Callable[[], float] = time.time) -> None:
        self.max_total = max_total
        self.max_per_device = max_per_device
        self.clock = clock
        self._sets: set[tuple[str, ...]] = set()
        self._per_device: dict[str, int] = {}
        self._folds: dict[str, DeviceFolds] = {}
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return len(self._sets)

    def admit(self, device: str, key: tuple[str, ...]) -> str | None:
        with self._lock:
            if key in self._sets:
                return None
            if self._per_device.get(device, 0) >= self.max_per_device:
                return "per_device"
            if len(self._sets) >= self.max_total:
                return "global"
            self._sets.add(key)
            self._per_device[device] = self._per_device.get(device, 0) + 1
            return None

    def release(self, device: str, key: tuple[str, ...]) -> None:
        with self._lock:
            if key in self._sets:
                self._sets.discard(key)
                left = self._per_device.get(device, 1) - 1
                if left > 0:
                    self._per_device[device] = left
                else:
                    self._per_device.pop(device, None)

    def folded(self, device: str, reason: str, observations: int) -> None:
        """Counts ``observations`` of ``device`` folded because of ``reason``."""
        with self._lock:
            entry = self._folds.get(device)
            if entry is None:
                if len(self._folds) >= self.max_total:
                    device = OTHER
                entry = self._folds.setdefault(device, DeviceFolds())
            entry.observations += observations
            entry.by_reason[reason] = entry.by_reason.get(reason, 0) + observations
            entry.last_reason, entry.last_unix = reason, self.clock()

    def tracked(self, device: str) -> int:
        with self._lock:
            return self._per_device.get(device, 0)

    def device_status(self, device: str) -> dict[str, Any] | None:
        """The device's label sets and what was folded (None when nothing of it was): what its health shows."""
        with self._lock:
            entry = self._folds.get(device)
            if entry is None:
                return None
            return {
                "series": self._per_device.get(device, 0),
                "max_series_per_device": self.max_per_device,
                "max_series": self.max_total,
                "folded_observations": entry.observations,
                "folded_by_reason": dict(entry.by_reason),
                "last_reason": entry.last_reason,
                "last_folded_unix": entry.last_unix,
                "summary": fold_summary(entry.observations, entry.last_reason, self.max_per_device, self.max_total),
            }


def fold_summary(observations: int, reason: str, max_per_device: int, max_total: int) -> str:
    """The health line: "1,234 observations folded into the "other" series on /metrics: per-device bound (200 label
    sets) reached"."""
    bound = (
        f"per-device bound ({max_per_device} label sets, server.max_metric_series_per_device) reached"
        if reason == "per_device"
        else f"global bound ({max_total} label sets, server.max_metric_series) reached"
    )
    return f'{observations:,} observations folded into the "other" series on /metrics: {bound}'


class FirstNames:
    """The first ``limit`` distinct names seen (fleet-wide, by any device); any other name reads ``"other"``. Its
    memory is bounded by ``limit`` whatever the devices send. Thread-safe."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self._names: set[str] = set()
        self._lock = threading.Lock()

    def shown(self, name: str) -> str:
        if name == OTHER:
            return OTHER
        with self._lock:
            if name in self._names:
                return name
            if len(self._names) < self.limit:
                self._names.add(name)
                return name
            return OTHER

    def __len__(self) -> int:
        return len(self._names)


class LatestByTime:
    """The ``size`` values whose requests ran last (by ``started_us``, the device's clock; ties in the order added),
    whatever order they arrive in: a late or resent batch of old requests does not push out the current ones. At
    most ``size`` values are held."""

    __slots__ = ("_added", "_items", "size")

    def __init__(self, size: int) -> None:
        self.size = size
        self._items: list[tuple[int, int, float]] = []  # (started_us, arrival, value), oldest first
        self._added = 0

    def add(self, started_us: Any, value: float) -> None:
        """``started_us`` not an int (a record of a test or an old release): taken as running with the newest."""
        self._added += 1
        if type(started_us) is not int:
            started_us = self._items[-1][0] if self._items else 0
        item = (started_us, self._added, value)
        if len(self._items) >= self.size and item < self._items[0]:
            return
        insort(self._items, item)
        if len(self._items) > self.size:
            del self._items[0]

    def values(self) -> list[float]:
        return [value for _, _, value in self._items]

    def __len__(self) -> int:
        return len(self._items)


def recent_requests(store: Store) -> dict[str, list[dict[str, Any]]]:
    """Each device's latest :data:`RECENT_REQUESTS` inference requests by the time they ran (oldest first, as
    ``metrics.stored_request`` maps): what ``/metrics`` observes again after a restart (``FleetMetrics.restore``), so
    a device that has not sent since still has its latency series. One bounded read per device, no bodies."""
    out = {}
    columns: tuple[str, ...] = RESTORE_COLUMNS
    if STORE_SCHEMA >= GUARDRAIL_SCHEMA:
        columns = (*RESTORE_COLUMNS, *GUARDRAIL_RESTORE_COLUMNS)
    for device in store.devices():
        query = Query(device=device["device_id"], kind="inference")
        rows = store.latest_columns(query, columns, RECENT_REQUESTS, by_event=True)
        if rows:
            out[device["device_id"]] = [stored_request(row, NULL_NAME) for row in rows]
    return out


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

        snapshot = self.snapshot()
        signals = snapshot["signals"]
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
        if "dropped_events" in snapshot:  # docs/opentelemetry.md "Regression events"
            dropped = CounterMetricFamily(
                f"{PREFIX}_otlp_dropped_regression_events",
                "Regression events deleted unsent: more than the store keeps waited for the OTLP backend",
            )
            dropped.add_metric([], snapshot["dropped_events"])
            yield dropped


CAMPAIGN_STATES = ("pending", "running", "completed", "failed", "cancelled")
CAMPAIGN_TERMINAL = frozenset({"completed", "failed", "cancelled"})
JOB_STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped")


def _campaign_label(value: Any) -> str | None:
    """A campaign id as a label: the canonical UUID text, or None (the aggregator makes the ids: never a device)."""
    if type(value) is not str or len(value) > 64:
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def _finite(value: Any, default: float) -> float:
    if type(value) in (int, float) and math.isfinite(value) and abs(value) < 1e15:
        return float(value)
    return default


class FleetMetrics:
    def __init__(
        self,
        max_series: int = 10_000,
        *,
        max_series_per_device: int = 200,
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
        self.budget = SeriesBudget(max_series, max_series_per_device)
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
            f"Median output tokens per second (output tokens / request duration) of the series' latest "
            f"{RECENT_REQUESTS} successful requests, by the time they ran",
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
        self.contended_share = Gauge(
            f"{PREFIX}_device_contended_share",
            f"Share of the device's latest {RECENT_REQUESTS} inference requests that other work on the device "
            "contended with (ext.interference.contended; 0 to 1)",
            ("device",),
            registry=r,
        )
        self._contended: dict[str, LatestByTime] = {}  # device → its latest requests' flags (1.0: contended)
        # tokens_per_second's labels → its latest rates; joules_per_output_token's → its latest J/token
        self._rates: dict[tuple[str, ...], LatestByTime] = {}
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
        self._regressions: dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None] = {}  # labels → budget place
        self.regressions_open_gauge = Gauge(
            f"{PREFIX}_regressions_open",
            "Open (not acknowledged, not resolved) regressions of the device's series in this metric (docs/fleet.md "
            "Regressions); absent when none",
            ("device", "metric"),
            registry=r,
        )
        self._regressions_open: dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None] = {}
        # [[triggers]] (docs/triggers.md): present only while a trigger's condition holds on a series
        self.trigger_firing = Gauge(
            f"{PREFIX}_trigger_firing",
            "1 while the trigger's condition holds on the device × model × engine settings series (firing or "
            "cooling down); absent otherwise",
            ("trigger", "device", "model", "settings"),
            registry=r,
        )
        self._trigger_series: dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None] = {}
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
            'Observations folded into the overflow series (every device-sent label "other") because a label-set '
            "bound was reached: per_device (server.max_metric_series_per_device) or global (server.max_metric_series)",
            ("reason",),
            registry=r,
        )
        for reason in FOLD_REASONS:
            self.overflow.labels(reason)
        self.truncated = Counter(
            f"{PREFIX}_metric_labels_truncated",
            "Label values cut to the label length bound (server.max_label_chars)",
            registry=r,
        )
        self.cleaned = Counter(
            f"{PREFIX}_metric_labels_cleaned",
            "Label values whose control characters (C0, DEL, C1) were removed",
            registry=r,
        )
        self.label_sets = Gauge(
            f"{PREFIX}_metric_label_sets",
            "Label sets with device-sent values tracked on /metrics (bounded by server.max_metric_series)",
            registry=r,
        )
        self.label_sets.set_function(lambda: len(self.budget))
        r.register(_ReadSkips())
        # benchmark campaigns (docs/campaigns.md): set by :meth:`campaigns` from the store's campaign statuses
        self.campaign_states = Gauge(
            f"{PREFIX}_campaigns",
            "Benchmark campaigns by state (pending, running, completed, failed, cancelled)",
            ("state",),
            registry=r,
        )
        for state in CAMPAIGN_STATES:
            self.campaign_states.labels(state)
        self.campaign_progress = Gauge(
            f"{PREFIX}_campaign_progress_percent",
            "A pending or running campaign's progress (0-100); absent once it ends",
            ("campaign",),
            registry=r,
        )
        self.campaign_jobs = Gauge(
            f"{PREFIX}_campaign_jobs",
            "A pending or running campaign's device jobs by state; absent once it ends",
            ("campaign", "state"),
            registry=r,
        )
        self._campaign_series: set[str] = set()  # campaign ids with progress and job series now
        # guardrails (docs/metrics.md "Guardrails"): records carrying ext.guardrails, of kind inference or blocked
        self.guardrail_sets = FirstNames(MAX_GUARDRAIL_SETS)
        self.guardrail_stage = Histogram(
            f"{PREFIX}_guardrail_stage_seconds",
            "Time of one guardrail stage (input, threat, output) of a guarded request, seconds",
            (*LABELS, "guardrail_set", "stage"),
            buckets=GUARDRAIL_STAGE_BUCKETS,
            registry=r,
        )
        self.guardrail_overhead = Histogram(
            f"{PREFIX}_guardrail_overhead_ratio",
            "The guardrail stages' share of the guarded request (overhead / total, 0 to 1)",
            (*LABELS, "guardrail_set"),
            buckets=GUARDRAIL_RATIO_BUCKETS,
            registry=r,
        )
        self.guardrail_requests = Counter(
            f"{PREFIX}_guardrail_requests",
            "Guarded requests by outcome (passed, blocked, error, passed_with_errors)",
            (*LABELS, "guardrail_set", "outcome"),
            registry=r,
        )
        self.guardrail_violations = Counter(
            f"{PREFIX}_guardrail_violations",
            "Guardrail violations found, by type, severity and stage",
            (*LABELS, "guardrail_set", "type", "severity", "stage"),
            registry=r,
        )

    def _cut(self, value: str) -> str:
        """A label value without control characters and within ``max_label_chars`` (each change counted)."""
        cleaned, removed, cut = clean_label(value, self.max_label_chars)
        if removed:
            self.cleaned.inc()
        if cut:
            self.truncated.inc()
        return cleaned

    def _admit(
        self, device: str, shape: str, labels: tuple[str, ...], sent: tuple[bool, ...], observations: int
    ) -> tuple[tuple[str, ...], tuple[str, ...] | None]:
        """(the labels to use, the budget key they hold or None): ``labels`` (already cut) when their set is tracked
        or fits both bounds, else folded (:func:`fold`) and the ``observations`` counted against ``device``."""
        key = (shape, *labels)
        reason = self.budget.admit(device, key)
        if reason is None:
            return labels, key
        self.overflow.labels(reason).inc(observations)
        self.budget.folded(device, reason, observations)
        return fold(labels, sent), None

    def contended_requests(self, device: str, flags: Iterable[tuple[Any, bool]], shown: str | None = None) -> None:
        """Adds the device's requests' contended flags (``(started_us, flag)``) to its latest
        :data:`RECENT_REQUESTS` by the time they ran and sets ``llm_latency_lens_device_contended_share`` from them
        (the device label set of the other device gauges). ``shown``: the device's label already cut (else cut
        here)."""
        with self._lock:
            recent = self._contended.get(device)
            if recent is None:
                recent = self._contended[device] = LatestByTime(RECENT_REQUESTS)
            for started, flag in flags:
                recent.add(started, 1.0 if flag else 0.0)
            share = sum(recent.values()) / len(recent) if len(recent) else None
        if share is not None:
            self.contended_share.labels(shown if shown is not None else self._cut(device)).set(share)

    def observe(
        self,
        device: str,
        records: Iterable[dict[str, Any]],
        contended_of: Callable[[dict[str, Any]], bool] = contended,
    ) -> None:
        """Update the fleet metrics from newly accepted records (wire maps), one label lookup per series.
        ``contended_of``: whether a record's request was contended (from its ``ext``, or a stored column)."""
        groups: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        flags: list[tuple[Any, bool]] = []
        guarded: list[dict[str, Any]] = []
        for record in records:
            carried = record.get("ext")
            if record.get("kind") in GUARDED_KINDS and isinstance(carried, dict) and "guardrails" in carried:
                guarded.append(record)
            if record.get("kind") == "inference":
                flags.append((record.get("started_us"), contended_of(record)))
                key = (
                    str(record.get("model_name") or "unknown"),
                    provider_of(record),
                    str(record.get("strategy") or "local"),
                )
                groups.setdefault(key, []).append(record)
        shown = self._cut(device)
        if flags:
            self.contended_requests(device, flags, shown)
        if guarded:
            self._guardrails(device, shown, guarded)
        for (model, provider, strategy), group in groups.items():
            cut = (shown, self._cut(model), provider, self._cut(strategy))
            labels, held = self._admit(device, "requests", cut, (True, True, True, True), len(group))
            self.requests.labels(*labels).inc(len(group))
            ok = [record for record in group if record.get("ok")]
            if len(ok) < len(group):
                by_error: dict[str, int] = {}
                for record in group:
                    if not record.get("ok"):
                        error = str(record.get("error_type") or "unknown")
                        by_error[error] = by_error.get(error, 0) + 1
                for error, n in by_error.items():
                    if held is None:  # the request's set is folded already: so is its error type
                        failed = (*labels, OTHER)
                    else:
                        failed, _ = self._admit(device, "failed", (*cut, self._cut(error)), (True,) * 5, n)
                    self.failed.labels(*failed).inc(n)
            # the series' latest requests of any outcome, as the fleet rows read them: a failure pushes an old
            # success out of the window and has no value itself
            self._rate(labels, group)
            self._joules(labels, group)
            if not ok:
                continue
            observe_many(self.ttft.labels(*labels), [v / 1e6 for r in ok if (v := r.get("ttft_us")) is not None])
            observe_many(self.tpot.labels(*labels), [v / 1e6 for r in ok if (v := r.get("tpot_us")) is not None])
            observe_many(self.duration.labels(*labels), [v / 1e6 for r in ok if (v := r.get("e2e_us"))])
            last_ok = ok[-1]
            # the acceptance rate: the latest successful request of the batch
            ext: dict[str, Any] = last_ok["ext"] if isinstance(last_ok.get("ext"), dict) else {}
            collab = ext.get("collab")
            if isinstance(collab, dict) and isinstance(collab.get("acceptance_rate"), (int, float)):
                self._set(self.acceptance, labels, collab["acceptance_rate"])

    def _guardrails(self, device: str, shown: str, records: list[dict[str, Any]]) -> None:
        """The guardrail series of the records carrying ``ext.guardrails`` (kind inference or blocked). One label set
        per device × model × strategy × guardrail set takes one place in the budget, and one more per violation type
        × severity × stage seen in it (as a failure's error type does); a set name past the first
        :data:`MAX_GUARDRAIL_SETS` seen fleet-wide reads ``"other"``; outcome, stage, type and severity come from
        the interface's vocabularies (anything else: ``"other"``, lens_core/guardrail_view.py)."""
        groups: dict[tuple[str, ...], list[Any]] = {}
        for record in records:
            view = guardrail_view(record)
            if view is None:
                continue
            key = (
                self._cut(str(record.get("model_name") or "unknown")),
                provider_of(record),
                self._cut(str(record.get("strategy") or "local")),
                self.guardrail_sets.shown(view.set),
            )
            groups.setdefault(key, []).append(view)
        for (model, provider, strategy, guard_set), views in groups.items():
            cut = (shown, model, provider, strategy, guard_set)
            labels, held = self._admit(device, "guardrail", cut, (True,) * 5, len(views))
            outcomes: dict[str, int] = {}
            stage_seconds: dict[str, list[float]] = {}
            ratios: list[float] = []
            violations: dict[tuple[str, str, str], int] = {}
            for view in views:
                outcome = view.outcome if view.outcome in OUTCOMES else OTHER
                outcomes[outcome] = outcomes.get(outcome, 0) + 1
                for stage in view.stages:
                    if stage.ms is not None and stage.stage in STAGES:
                        stage_seconds.setdefault(stage.stage, []).append(stage.ms / 1000)
                if view.impact_percent is not None:
                    ratios.append(view.impact_percent / 100)
                for v in view.violations:
                    combo = (
                        v.type if v.type in VIOLATION_TYPES else OTHER,
                        v.severity if v.severity in SEVERITIES else OTHER,
                        v.stage if v.stage in STAGES else OTHER,
                    )
                    violations[combo] = violations.get(combo, 0) + 1
            for outcome, n in outcomes.items():
                self.guardrail_requests.labels(*labels, outcome).inc(n)
            for stage_name, seconds in stage_seconds.items():
                observe_many(self.guardrail_stage.labels(*labels, stage_name), seconds)
            observe_many(self.guardrail_overhead.labels(*labels), ratios)
            for combo, n in violations.items():
                if held is None:  # the guarded set is folded already: so are its violations
                    counted = labels
                else:
                    counted, _ = self._admit(device, "violations", (*cut, *combo), (True,) * 5 + (False,) * 3, n)
                    counted = counted[:5]
                self.guardrail_violations.labels(*counted, *combo).inc(n)

    def _rate(self, labels: tuple[str, ...], group: list[dict[str, Any]]) -> None:
        """``tokens_per_second``: the median output tokens ÷ e2e seconds of the successful ones among the series'
        latest :data:`RECENT_REQUESTS` requests by the time they ran (the fleet page's figure; docs/fleet.md, "Which
        statistic")."""

        def rate(record: dict[str, Any]) -> float | None:
            tokens, seconds = record.get("output_tokens"), _finite(record.get("e2e_us"), 0.0) / 1e6
            return tokens / seconds if seconds > 0 and type(tokens) is int and tokens > 0 else None

        self._latest(self.tokens_per_second, (*labels, "output"), group, rate, statistics.median, always=True)

    def _joules(self, labels: tuple[str, ...], group: list[dict[str, Any]]) -> None:
        """``joules_per_output_token``: the mean net J per output token of the successful ones that carry one among
        the series' latest :data:`RECENT_REQUESTS` requests by the time they ran (the fleet page's figure;
        docs/fleet.md, "Which statistic")."""

        def joules(record: dict[str, Any]) -> float | None:
            ext = record.get("ext")
            energy = ext.get("energy") if isinstance(ext, dict) else None
            value: Any = energy.get("j_per_output_token") if isinstance(energy, dict) else None
            return float(value) if type(value) in (int, float) and math.isfinite(value) else None

        self._latest(self.joules, labels, group, joules, statistics.fmean)

    def _latest(
        self,
        gauge: Gauge,
        key: tuple[str, ...],
        group: list[dict[str, Any]],
        value_of: Callable[[dict[str, Any]], float | None],
        summary: Callable[[list[float]], float],
        *,
        always: bool = False,
    ) -> None:
        """``gauge`` at ``key``: ``summary`` of the values of the successful requests among the series' latest
        :data:`RECENT_REQUESTS` requests by the time they ran (a failure, or a request without a value, takes its
        place in the window and has none). Unless ``always``, a series that never had a value holds no window (a
        device without a power source: no J/token window)."""
        with self._lock:
            latest = self._rates.get(key)
            if latest is None and always:
                latest = self._rates[key] = LatestByTime(RECENT_REQUESTS)
            for record in group:
                value = value_of(record) if record.get("ok") else None
                if latest is None and value is None:
                    continue
                if latest is None:
                    latest = self._rates[key] = LatestByTime(RECENT_REQUESTS)
                latest.add(record.get("started_us"), math.nan if value is None else value)
            values = [v for v in latest.values() if math.isfinite(v)] if latest is not None else []
        if values:
            self._set(gauge, key, summary(values))

    def restore(self, device: str, requests: Sequence[dict[str, Any]]) -> None:
        """After a restart: the device's latest stored requests (oldest first; the columns of
        :data:`RESTORE_COLUMNS` as a record's keys, ``contended`` among them) observed again, so that its latency
        histograms, request counters, tokens-per-second median and contended share are back before it sends."""
        self.observe(device, requests, lambda request: bool(request.get("contended")))

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
            if gauge is self.tokens_per_second or gauge is self.joules:
                with self._lock:
                    self._rates.pop(labels, None)
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

    def _replace_gauges(
        self,
        gauge: Gauge,
        shape: str,
        sent: tuple[bool, ...],
        wanted: dict[tuple[str, ...], tuple[str, float]],
        held: dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None],
        *,
        add_folded: bool = False,
    ) -> dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None]:
        """Sets ``gauge`` to ``wanted`` (labels, already cut → (device, value)), each set through the budget (folded
        past a bound); series no longer wanted go and give their place back. Returns what is held now."""
        current: dict[tuple[str, ...], tuple[str, tuple[str, ...]] | None] = {}
        values: dict[tuple[str, ...], float] = {}
        for labels, (device, number) in wanted.items():
            shown, key = self._admit(device, shape, labels, sent, 1)
            current[shown] = (device, key) if key is not None else current.get(shown)
            # a folded label set stands for several: counts add up (add_folded), other values are one of them
            values[shown] = values.get(shown, 0.0) + number if add_folded and key is None else number
        for labels, place in held.items():
            if labels not in current:
                with contextlib.suppress(KeyError):
                    gauge.remove(*labels)
                if place is not None:
                    self.budget.release(*place)
        for labels, number in values.items():
            gauge.labels(*labels).set(number)
        return current

    def regressions(self, found: Iterable[dict[str, Any]]) -> None:
        """The current regressions as ``llm_latency_lens_regression_change_ratio``; series no longer flagged go."""
        wanted: dict[tuple[str, ...], tuple[str, float]] = {}
        for f in found:
            if f["kind"] == "regression":
                labels = (
                    self._cut(f["device_id"]),
                    self._cut(str(f["model_name"] or "unknown")),
                    self._cut(str(f["strategy"] or "local")),
                    f["metric"],
                )
                wanted[labels] = (f["device_id"], f["change"])
        with self._lock:
            held = dict(self._regressions)
        held = self._replace_gauges(self.regression, "regression", (True, True, True, False), wanted, held)
        with self._lock:
            self._regressions = held

    def regressions_open(self, counts: dict[tuple[str, str], int]) -> None:
        """``llm_latency_lens_regressions_open``: (device, metric) → open regressions; at most one label set per
        device and metric (4 per device), each through the per-device budget; pairs no longer open go."""
        wanted: dict[tuple[str, ...], tuple[str, float]] = {
            (self._cut(device), metric): (device, float(n)) for (device, metric), n in counts.items() if n
        }
        with self._lock:
            held = dict(self._regressions_open)
        held = self._replace_gauges(
            self.regressions_open_gauge, "regressions_open", (True, False), wanted, held, add_folded=True
        )
        with self._lock:
            self._regressions_open = held

    def configure_triggers(self, names: Iterable[str]) -> None:
        """Every configured trigger's fire counter, from 0 (so that rate() and increase() see the first fire)."""
        for name in names:
            self.trigger_fires.labels(self._cut(name))
        for reason in ("busy", "timeout", "error"):
            self.trigger_failures.labels(reason)

    def triggers(self, holding: Iterable[Any], fires: Iterable[Any]) -> None:
        """After an evaluation: ``llm_latency_lens_trigger_firing`` for the series whose condition holds
        (``aggregator.triggers.SeriesState``), series that no longer hold go; each new fire counted."""
        wanted: dict[tuple[str, ...], tuple[str, float]] = {}
        for s in holding:
            labels = (
                self._cut(s.trigger.name),
                self._cut(s.series[0]),
                self._cut(s.series[1] or "unknown"),
                self._cut(s.series[2] or "unknown"),
            )
            wanted[labels] = (s.series[0], 1.0)
        with self._lock:
            held = dict(self._trigger_series)
        held = self._replace_gauges(self.trigger_firing, "trigger", (False, True, True, True), wanted, held)
        with self._lock:
            self._trigger_series = held
        for fire in fires:
            self.trigger_fires.labels(self._cut(fire.trigger.name)).inc()

    def trigger_failure(self, reason: str) -> None:
        self.trigger_failures.labels(reason).inc()

    def campaigns(
        self,
        statuses: Iterable[Mapping[str, Any]],
        totals: Mapping[str, int] | None = None,
        *,
        max_active: int = 100,
    ) -> None:
        """``llm_latency_lens_campaigns{state}``, and for each pending or running campaign (at most ``max_active``,
        the ``campaigns.max_active`` bound; the first ones given) ``…_campaign_progress_percent{campaign}`` and
        ``…_campaign_jobs{campaign,state}`` for every job state. ``statuses``: campaign status dicts
        (``benchmark_id``, ``status``, ``progress_percent``, ``counts``), as ``GET /api/v1/benchmark`` lists them;
        ``totals``: the number of campaigns in each state, when ``statuses`` is not all of them (else counted from
        ``statuses``). A campaign no longer pending or running loses its series; so does one no longer listed."""
        counted = {state: 0 for state in CAMPAIGN_STATES}
        active: dict[str, tuple[float, dict[str, float]]] = {}
        for status in statuses:
            state = status.get("status")
            if state not in counted:
                continue
            counted[state] += 1
            if state in CAMPAIGN_TERMINAL or len(active) >= max_active:
                continue
            campaign = _campaign_label(status.get("benchmark_id"))
            if campaign is None:
                continue
            counts = status.get("counts")
            if not isinstance(counts, Mapping):
                counts = {}
            jobs = {job: _finite(counts.get(job), 0.0) for job in JOB_STATES}
            active[campaign] = (min(100.0, max(0.0, _finite(status.get("progress_percent"), 0.0))), jobs)
        for state in CAMPAIGN_STATES:
            shown = counted[state] if totals is None else _finite(totals.get(state), 0.0)
            self.campaign_states.labels(state).set(shown)
        with self._lock:
            gone = self._campaign_series - set(active)
            self._campaign_series = set(active)
        for campaign in gone:
            with contextlib.suppress(KeyError):
                self.campaign_progress.remove(campaign)
            for job in JOB_STATES:
                with contextlib.suppress(KeyError):
                    self.campaign_jobs.remove(campaign, job)
        for campaign, (progress, jobs) in active.items():
            self.campaign_progress.labels(campaign).set(progress)
            for job, n in jobs.items():
                self.campaign_jobs.labels(campaign, job).set(n)

    def exposition(self) -> bytes:
        """The text exposition (blocking: tens of milliseconds for a few thousand label sets; serve it through
        :class:`ExpositionCache`, which builds it on a thread of its own)."""
        self.drop_stale()
        return bytes(generate_latest(self.registry))


class ExpositionCache:
    """``/metrics`` built off the event loop and shared: scrapes that arrive during a build wait for it, and a build
    is reused by later scrapes for at most ``max_age_s`` and at most ``reuse_factor`` times as long as it took to
    build, counted from when the build ended. A cheap exposition is therefore (nearly) always fresh, and however often
    it is scraped, building takes at most 1 / (1 + ``reuse_factor``) of one core while a build is shorter than
    ``max_age_s / reuse_factor``; a longer one starts at most once per ``max_age_s`` after the last one ended.
    ``max_age_s`` 0: every scrape builds (still shared while one is running)."""

    def __init__(
        self,
        build: Callable[[], bytes],
        max_age_s: float,
        clock: Callable[[], float] = time.monotonic,
        reuse_factor: float = 10.0,
    ) -> None:
        self.build = build
        self.max_age_s = max_age_s
        self.clock = clock
        self.reuse_factor = reuse_factor
        self.builds = 0
        self.last_build_s: float | None = None
        self._body: bytes | None = None
        self._built_at = 0.0
        self._building: asyncio.Future[bytes] | None = None
        self._executor: ThreadPoolExecutor | None = None

    def _run(self) -> bytes:
        started = time.perf_counter()
        body = self.build()
        self.last_build_s = time.perf_counter() - started
        return body

    async def get(self) -> bytes:
        if self._body is not None:
            reuse = min(self.max_age_s, self.reuse_factor * (self.last_build_s or 0.0))
            if self.clock() - self._built_at < reuse:
                return self._body
        if self._building is None:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="metrics-exposition")
            future = asyncio.get_running_loop().run_in_executor(self._executor, self._run)
            self._building = future

            def done(f: asyncio.Future[bytes]) -> None:
                self._building = None
                if not f.cancelled() and f.exception() is None:
                    self._body, self._built_at = f.result(), self.clock()  # reused from when it ended
                    self.builds += 1

            future.add_done_callback(done)
        return await asyncio.shield(self._building)

    def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None


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
