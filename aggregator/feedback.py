"""Performance-feedback documents: one per device × model, with recommendations derived from stored measurements.

Each document follows the seed's performance-feedback schema (``schemas/performance_feedback.schema.json``):
the device's current state (the engine settings of its latest successful request of the model), the figures of its
observation window (its latest ``window`` successful requests under those settings), its current regressions as
anomalies, and recommendations — a setting to change, with the evidence for it. Nothing in a document is a figure
that was not computed from stored rows; where there is no evidence there is no recommendation.

Evidence for a setting comes from requests that differ from the window in that one setting only, so that a
difference is attributable to it:

- **fleet**: other devices of the same class (device_facts ``device_class`` and ``model``) running the same model
  and strategy whose settings differ in exactly that setting; each contributes an equal share of its latest
  requests under those settings (:func:`device_share`), so one device with thousands of requests does not drown
  the others;
- **history**: the same device's own earlier requests of the model and strategy under such settings.

The comparison is :func:`lens_core.stats.compare` (Mann–Whitney U, two-sided) of the window against the evidence,
on the metric the setting moves (:data:`METRIC_OF`). A recommendation needs ``p < alpha``, at least
``min_samples`` requests on each side and an improvement of the median of at least ``min_improvement``. Its
confidence is a stratified bootstrap of that improvement (:func:`bootstrap_confidence`), its priority the
improvement × the confidence (:func:`priority`). docs/feedback.md describes every figure and rule.

Computed in the background (``fleet.feedback_interval``) on a read thread, cached in :class:`FeedbackCache`;
``GET /api/v1/feedback`` serves the cache and the ingest acknowledgement carries a device's own recommendations
from it (:mod:`lens_core.recommendations`), never computing anything on the ingest path.
"""

from __future__ import annotations

import hashlib
import math
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

import numpy as np

from lens_core.recommendations import MAX_EVIDENCE_CHARS, MAX_ITEMS, Recommendation, to_wire
from lens_core.settings import CONFIG_KEYS, FIELDS, MAX_KEY_CHARS, format_value, parse_key, settings_key
from lens_core.stats import Comparison, compare

from .api import MAX_TIME_US
from .health import latest_facts
from .reads import bound_series
from .rows import decode_wire
from .store import NULL_NAME, Query, Store


@dataclass(frozen=True)
class Settings:
    """``[fleet] feedback_*`` (aggregator/config.py)."""

    window: int = 200  # latest successful requests of a device × model × current settings a document describes
    history: int = 2000  # latest requests of each device × model × strategy read for evidence (any settings)
    alpha: float = 0.01  # significance level of each comparison
    min_samples: int = 20  # requests on each side of a comparison, at least
    min_improvement: float = 0.05  # relative improvement of the median, at least
    min_devices: int = 3  # independent devices behind a fleet recommendation, at least (never one for another)
    # requests whose device said other work contended with them (ext.interference) are no evidence unless this is
    # set (fleet.feedback_include_contended, --include-contended, ?include_contended=1); the recommendations sent to
    # devices never use them, whatever this says (see compute)
    include_contended: bool = False

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """The ``[fleet] feedback_*`` keys of the aggregator's configuration."""
        return cls(
            window=config.get("fleet", "feedback_window"),
            history=config.get("fleet", "feedback_history"),
            alpha=config.get("fleet", "feedback_alpha"),
            min_samples=config.get("fleet", "feedback_min_samples"),
            min_improvement=config.get("fleet", "feedback_min_improvement"),
            min_devices=config.get("fleet", "feedback_min_devices"),
            include_contended=config.get("fleet", "feedback_include_contended"),
        )


# The metric each setting is judged on (lower is better for all three): decode speed for what changes the work per
# token, prefill for the batch size, whole-request latency for the offload threshold (it moves requests to the cloud).
METRIC_OF: dict[str, str] = {
    "n_threads": "tpot_ms",
    "n_gpu_layers": "tpot_ms",
    "flash_attn": "tpot_ms",
    "n_ctx": "tpot_ms",
    "quantization": "tpot_ms",
    "power_mode": "tpot_ms",
    "draft_tokens": "tpot_ms",
    "n_batch": "ttft_ms",
    "offload_prompt_tokens_above": "e2e_ms",
}
# TTFT and e2e grow with the prompt: both sides are matched on prompt length for them (_prompt_matched)
PROMPT_MATCHED = frozenset({"ttft_ms", "e2e_ms"})
CATEGORY_OF: dict[str, str] = {
    "n_threads": "resource_allocation",
    "n_gpu_layers": "resource_allocation",
    "power_mode": "resource_allocation",
    "n_batch": "batching",
    "quantization": "quantization",
}
BOOTSTRAP_RESAMPLES = 1000
POOL_WINDOWS = 5  # the fleet evidence for one value is at most this many windows of requests (device_share)
CHANGE_SHARE = 0.9  # an anomaly names a settings change when this share of each side ran one set of settings
MEMORY_BOTTLENECK = 0.9  # mean peak RSS ÷ RAM at or above this: bottleneck_indicator "memory"
MAX_CONSIDERED = 64  # comparisons listed per document (evidence_considered)
MAX_NAMED_DEVICES = 5  # devices named in a rationale
MAX_SERIES_PER_DEVICE = 32  # model × strategy series of one device read per computation (the most recently seen)
NAMESPACE = uuid.uuid5(uuid.NAMESPACE_URL, "https://github.com/llm-latency-lens/feedback")
ROLLBACK = (
    "lens-agent measures the recommended value against the current one on this device (lens-agent tune), applies it "
    "only when it holds up there, verifies it over its next scheduled runs (tune.verify_runs) and rolls it back "
    "when it is more than 5 % worse (tune.rollback_threshold); docs/tuning.md"
)
_LABEL = {"tpot_ms": "TPOT", "ttft_ms": "TTFT", "e2e_ms": "e2e", "tokens_per_second": "tok/s"}
_COLUMNS = (
    "seq",
    "started_us",
    "ok",
    "settings",
    "input_tokens",
    "output_tokens",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "contended",
)
_MAX_MEMORY_BYTES = 2**53


def _number(value: Any) -> float | None:
    """A finite, non-negative number from a stored column, else None (a row may hold anything)."""
    if type(value) not in (int, float) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def _iso(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


@dataclass
class Row:
    """One successful request, as read from the columns (no body)."""

    seq: int
    started_us: int
    input_tokens: int | None
    output_tokens: int | None
    ttft_ms: float | None
    tpot_ms: float | None
    e2e_ms: float | None

    @property
    def tokens_per_second(self) -> float | None:
        if self.output_tokens and self.e2e_ms:
            return self.output_tokens / (self.e2e_ms / 1000.0)
        return None

    def metric(self, name: str) -> float | None:
        value: float | None = getattr(self, name)
        return value


@dataclass
class Group:
    """The latest ``window`` successful requests of a device × model × strategy under one settings key."""

    device_id: str
    model_name: str
    strategy: str | None
    key: str | None
    settings: dict[str, Any]
    rows: list[Row] = field(default_factory=list)  # oldest first
    contended_excluded: int = 0  # successful requests under these settings left out as contended (of those read)

    def values(self, metric: str) -> list[float]:
        return [v for r in self.rows if (v := r.metric(metric)) is not None]


@dataclass
class Series:
    """A device × model × strategy: its settings groups, its latest successful request, and how many of its latest
    requests (of any outcome or settings) reach back to the oldest request of the current settings' window."""

    device_id: str
    model_name: str
    strategy: str | None
    groups: dict[str | None, Group]
    current: str | None  # the settings key of the latest successful request
    latest_seq: int
    window_span: int  # rows, in the order they ran, from the oldest request of the current window to the newest
    rows: list[tuple[Any, ...]]  # the columns read, oldest first, without those left out as contended (anomalies)
    contended_excluded: int = 0  # successful requests read and left out as contended (any settings)
    latest_started_us: int = 0  # when the latest successful request ran (the device's clock)
    read_rows: int = 0  # how many of the series' latest requests were read (of any outcome)


def _canonical(raw: Any) -> str | None:
    """The settings column as a canonical key (a damaged or foreign value: its known parts, or None)."""
    if type(raw) is not str or len(raw) > MAX_KEY_CHARS:
        return None
    return settings_key(parse_key(raw))


def _int(value: Any) -> int | None:
    return value if type(value) is int and 0 <= value < 2**63 else None


def read_series(
    store: Store, entry: dict[str, Any], settings: Settings, all_contended: list[dict[str, Any]] | None = None
) -> Series | None:
    """The series' latest ``history`` requests grouped by settings (None when it has no successful request).
    Successful requests marked contended are left out (counted per settings) unless ``settings.include_contended``;
    a series whose every successful request was left out is None, and is named in ``all_contended``."""
    strategy = None if entry["strategy"] == NULL_NAME else entry["strategy"]
    query = Query(device=entry["device_id"], kind="inference", model=entry["model_name"], strategy=entry["strategy"])
    rows = store.latest_columns(query, _COLUMNS, settings.history, by_event=True)
    groups: dict[str | None, Group] = {}
    current: str | None = None
    latest_seq: int | None = None
    latest_started = 0
    oldest_index = len(rows)
    keys: dict[Any, str | None] = {}  # a series holds a few distinct settings keys: each parsed once
    left_out: Counter[str | None] = Counter()
    for index in range(len(rows) - 1, -1, -1):  # newest first
        seq, started, ok, raw, n_in, n_out, ttft, tpot, e2e, busy = rows[index]
        if not ok or type(seq) is not int or type(started) is not int or not 0 <= started <= MAX_TIME_US:
            continue
        key = keys[raw] if raw in keys else keys.setdefault(raw, _canonical(raw))
        if busy and not settings.include_contended:
            left_out[key] += 1
            continue
        if latest_seq is None:
            current, latest_seq, latest_started = key, seq, started
        group = groups.get(key)
        if group is None:
            group = groups[key] = Group(entry["device_id"], entry["model_name"], strategy, key, parse_key(key))
        if len(group.rows) >= settings.window:
            continue
        ttft_v, tpot_v, e2e_v = _number(ttft), _number(tpot), _number(e2e)
        group.rows.append(
            Row(
                seq,
                started,
                _int(n_in),
                _int(n_out),
                ttft_v / 1000 if ttft_v is not None else None,
                tpot_v / 1000 if tpot_v is not None else None,
                e2e_v / 1000 if e2e_v is not None else None,
            )
        )
        if key == current:
            oldest_index = index
    if latest_seq is None:
        if left_out and all_contended is not None:
            all_contended.append(
                {
                    "device_id": entry["device_id"],
                    "model_name": entry["model_name"],
                    "strategy": strategy,
                    "contended_excluded": sum(left_out.values()),
                }
            )
        return None
    for key, group in groups.items():
        group.rows.reverse()
        group.contended_excluded = left_out[key]
    kept = rows if settings.include_contended else [row for row in rows if not row[9]]
    return Series(
        entry["device_id"],
        entry["model_name"],
        strategy,
        groups,
        current,
        latest_seq,
        len(rows) - oldest_index,
        kept,
        sum(left_out.values()),
        latest_started,
        len(rows),
    )


def _class_of(facts: dict[str, Any] | None) -> tuple[str, str] | None:
    """(device_class, model) of a device's latest facts; None without both (such a device is no evidence)."""
    if not facts or not facts.get("device_class") or not facts.get("model"):
        return None
    return facts["device_class"], facts["model"]


# -- the evidence ---------------------------------------------------------------------------------------------------


def _values(rows: Iterable[Row], metric: str) -> list[float]:
    return [v for r in rows if (v := r.metric(metric)) is not None]


def _latest_per_length(rows: Sequence[tuple[int, Row]], quota: dict[int, int]) -> list[tuple[int, Row]]:
    """The latest ``quota[length]`` rows of each prompt length (rows tagged with their stratum)."""
    taken: Counter[int] = Counter()
    kept = []
    for tag, row in sorted(rows, key=lambda item: (item[1].started_us, item[1].seq), reverse=True):
        length = row.input_tokens
        if length is not None and taken[length] < quota.get(length, 0):
            taken[length] += 1
            kept.append((tag, row))
    return kept


def _prompt_matched(
    baseline: Sequence[Row], strata: Sequence[Sequence[Row]], metric: str
) -> tuple[list[float], list[list[float]]]:
    """The metric's values on both sides. TTFT and e2e grow with the prompt: for them both sides are matched on
    prompt length (input_tokens) — for each length both ran, the same number of requests from each side (the
    latest ones), so that the two sides' prompt lengths are the same and only the setting differs."""
    if metric not in PROMPT_MATCHED:
        return _values(baseline, metric), [_values(s, metric) for s in strata]
    base = [(0, r) for r in baseline if r.input_tokens is not None and r.metric(metric) is not None]
    cand = [
        (i, r) for i, s in enumerate(strata) for r in s if r.input_tokens is not None and r.metric(metric) is not None
    ]
    ours, theirs = Counter(r.input_tokens for _, r in base), Counter(r.input_tokens for _, r in cand)
    quota = {length: min(ours[length], theirs[length]) for length in ours.keys() & theirs.keys() if length is not None}
    kept_base = sorted(_latest_per_length(base, quota), key=lambda item: item[1].seq)
    kept_cand = sorted(_latest_per_length(cand, quota), key=lambda item: item[1].seq)
    return (
        _values((r for _, r in kept_base), metric),
        [_values((r for tag, r in kept_cand if tag == i), metric) for i in range(len(strata))],
    )


def bootstrap_confidence(
    baseline: Sequence[float], strata: Sequence[Sequence[float]], min_improvement: float, seed: int
) -> float:
    """The share of :data:`BOOTSTRAP_RESAMPLES` resamples in which the candidate's median is still better than the
    baseline's by at least ``min_improvement`` (lower is better). The baseline is resampled as a whole, the candidate
    within each stratum (each evidence device keeps its weight). Grows with sample size, falls with variance and with
    how close the measured improvement is to the minimum."""
    rng = np.random.default_rng(seed)
    base = np.asarray(baseline, dtype=np.float64)
    resampled = base[rng.integers(0, base.size, (BOOTSTRAP_RESAMPLES, base.size))]
    b_med = np.median(resampled, axis=1, overwrite_input=True)  # the resamples are scratch: partitioned in place
    parts = []
    for stratum in strata:
        values = np.asarray(stratum, dtype=np.float64)
        if values.size:
            parts.append(values[rng.integers(0, values.size, (BOOTSTRAP_RESAMPLES, values.size))])
    c_med = np.median(np.hstack(parts), axis=1, overwrite_input=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        improvement = (b_med - c_med) / b_med
    return float(np.mean(np.nan_to_num(improvement, nan=-np.inf) >= min_improvement))


def priority(improvement: float, confidence: float) -> int:
    """1 … 10: 20 × improvement × confidence, rounded (a sure 50 % improvement or more is 10, a sure 5 % is 1)."""
    return max(1, min(10, round(20.0 * improvement * confidence)))


def recommendation_id(device_id: str, model_name: str, target: str, value: Any) -> str:
    """The same advice keeps its id across computations and replicas: uuid5 of device, model, target and value."""
    return str(uuid.uuid5(NAMESPACE, "\x00".join((device_id, model_name, target, format_value(value)))))


@dataclass
class Evidence:
    source: str  # "fleet" | "history"
    setting: str
    value: Any
    groups: list[Group]


@dataclass
class Outcome:
    evidence: Evidence
    metric: str
    comparison: Comparison | None
    strata: list[tuple[str, list[float]]]  # (device, values) of the candidate side
    baseline: list[float]
    reason: str | None  # why no recommendation comes of it; None: it is one
    confidence: float | None = None
    records: dict[str, dict[str, Any]] = field(default_factory=dict)  # device → the stored rows it was drawn from

    @property
    def score(self) -> float:
        """improvement × confidence: what ranks recommendations (0 for a comparison that is not one)."""
        if self.comparison is None or self.confidence is None:
            return 0.0
        return self.comparison.improvement * self.confidence

    def considered(self) -> dict[str, Any]:
        """What the document lists for every comparison made, recommended or not."""
        c = self.comparison
        out: dict[str, Any] = {
            "setting": self.evidence.setting,
            "value": self.evidence.value,
            "source": self.evidence.source,
            "metric": self.metric,
            "devices": sorted({g.device_id for g in self.evidence.groups}),
            "baseline_requests": c.baseline_n if c else len(self.baseline),
            "candidate_requests": c.candidate_n if c else sum(len(v) for _, v in self.strata),
        }
        if c is not None:
            out.update(
                baseline_median=c.baseline_median,
                candidate_median=c.candidate_median,
                p_value=c.p_value,
                improvement=c.improvement,
            )
        out["outcome"] = self.reason or "recommended"
        return out


def device_share(devices: int, settings: Settings) -> int:
    """The latest requests each evidence device contributes: an equal share of at most :data:`POOL_WINDOWS`
    windows, and never more than one window — however many requests one device has, it weighs no more than the
    others, and however many devices there are, the pool stays bounded."""
    return max(1, min(settings.window, math.ceil(POOL_WINDOWS * settings.window / max(1, devices))))


def judge(window: Group, evidence: Evidence, settings: Settings, seed: int) -> Outcome:
    """Compare the window with the evidence for one setting's value (:func:`lens_core.stats.compare`)."""
    metric = METRIC_OF[evidence.setting]
    share = device_share(len(evidence.groups), settings)
    drawn = [g.rows[-share:] for g in evidence.groups]
    baseline, strata_values = _prompt_matched(window.rows, drawn, metric)
    strata = [(g.device_id, v) for g, v in zip(evidence.groups, strata_values, strict=True) if v]
    pooled = [x for _, v in strata for x in v]
    records = {
        g.device_id: trace(rows) for g, rows, v in zip(evidence.groups, drawn, strata_values, strict=True) if v and rows
    }
    outcome = _judge(window, evidence, settings, seed, metric, baseline, strata, pooled)
    outcome.records = records
    return outcome


def trace(rows: Sequence[Row]) -> dict[str, Any]:
    """Where a device's evidence is stored: its rows' sequence numbers and the time they ran (read them back with
    ``GET /api/v1/measurements?device=…&since=…&until=…``)."""
    seqs = [r.seq for r in rows]
    starts = [r.started_us for r in rows]
    return {
        "requests": len(rows),
        "first_seq": min(seqs),
        "last_seq": max(seqs),
        "from": _iso(min(starts)),
        "until": _iso(max(starts)),
    }


def _judge(
    window: Group,
    evidence: Evidence,
    settings: Settings,
    seed: int,
    metric: str,
    baseline: list[float],
    strata: list[tuple[str, list[float]]],
    pooled: list[float],
) -> Outcome:
    if len(baseline) < settings.min_samples or len(pooled) < settings.min_samples:
        shared = " matched on prompt length" if metric in PROMPT_MATCHED else ""
        reason = (
            f"too few requests{shared} ({len(baseline)} here, {len(pooled)} with {evidence.setting}="
            f"{format_value(evidence.value)}; at least {settings.min_samples} each)"
        )
        return Outcome(evidence, metric, None, strata, baseline, reason)
    if float(np.median(baseline)) <= 0:
        return Outcome(evidence, metric, None, strata, baseline, "the window's median is 0")
    comparison = compare(baseline, pooled)
    if comparison.p_value >= settings.alpha:
        reason = f"not significant (p = {comparison.p_value:.2g}, alpha {settings.alpha:g})"
        return Outcome(evidence, metric, comparison, strata, baseline, reason)
    if comparison.improvement < 0:
        return Outcome(evidence, metric, comparison, strata, baseline, f"worse by {-comparison.improvement:.1%}")
    if comparison.improvement < settings.min_improvement:
        reason = f"better by {comparison.improvement:.1%}, below the minimum of {settings.min_improvement:.0%}"
        return Outcome(evidence, metric, comparison, strata, baseline, reason)
    if evidence.source == "fleet":
        # one device is never evidence for another: a compromised token must not be able to advise a fleet
        devices = sorted({d for d, _ in strata} - {window.device_id})
        if len(devices) < settings.min_devices:
            reason = (
                f"evidence from {len(devices)} device{'s' if len(devices) != 1 else ''}; a fleet recommendation needs "
                f"at least {settings.min_devices} independent devices (fleet.feedback_min_devices)"
            )
            return Outcome(evidence, metric, comparison, strata, baseline, reason)
        # the pooled test could be carried by a few devices' extreme values: at least min_devices of them, and most
        # of them, must be better on their own by the minimum improvement — a device that measured the value worse
        # counts against it, never toward the quorum
        here = comparison.baseline_median
        better = sum(1 for _, v in strata if float(np.median(v)) <= here * (1.0 - settings.min_improvement))
        if better < settings.min_devices or 2 * better <= len(strata):
            reason = (
                f"only {better} of {len(strata)} devices are better than this device on their own (at least "
                f"{settings.min_devices} and more than half must be)"
            )
            return Outcome(evidence, metric, comparison, strata, baseline, reason)
    confidence = bootstrap_confidence(baseline, [v for _, v in strata], settings.min_improvement, seed)
    return Outcome(evidence, metric, comparison, strata, baseline, None, confidence)


def _fmt(value: float) -> str:
    return f"{value:.4g}"


def rationale(outcome: Outcome, window: Group, class_key: tuple[str, str] | None) -> str:
    """The evidence in words: who, how many requests, the medians on both sides, the test and its p-value."""
    c = outcome.comparison
    assert c is not None
    e = outcome.evidence
    label = _LABEL[outcome.metric]
    change = f"{e.setting}={format_value(e.value)}"
    here = f"{e.setting}={format_value(window.settings[e.setting])}"
    same = f"running {window.model_name} ({window.strategy or 'local'}) with {change} and otherwise the same settings"
    if e.source == "fleet":
        named = ", ".join(f"{d} {len(v)} requests, median {_fmt(float(np.median(v)))} ms" for d, v in outcome.strata)
        devices = sorted({d for d, _ in outcome.strata})
        if len(outcome.strata) > MAX_NAMED_DEVICES:
            shown = outcome.strata[:MAX_NAMED_DEVICES]
            named = ", ".join(f"{d} {len(v)} requests, median {_fmt(float(np.median(v)))} ms" for d, v in shown)
            named += f", and {len(outcome.strata) - MAX_NAMED_DEVICES} more"
        who = (
            f"Fleet evidence: {len(devices)} other device{'s' if len(devices) != 1 else ''} of this class "
            f"({class_key[0]}, {class_key[1]}) {same} ({named}; at most {len(window.rows)} latest requests each)"
            if class_key
            else f"Fleet evidence: {len(devices)} other devices {same}"
        )
    else:
        who = f"This device's own history: its earlier requests {same}"
    matched = (
        ", matched on prompt length (as many requests of each length on both sides)"
        if outcome.metric in PROMPT_MATCHED
        else ""
    )
    return (
        f"{who}. {label} median {_fmt(c.candidate_median)} ms over {c.candidate_n} requests with {change} (candidate) "
        f"against {_fmt(c.baseline_median)} ms over this device's latest {c.baseline_n} requests with {here} "
        f"(baseline){matched}: {c.improvement:.1%} lower. Mann–Whitney U, two-sided: p = {c.p_value:.2g}; "
        f"confidence {outcome.confidence:.2f} (share of {BOOTSTRAP_RESAMPLES} bootstrap resamples still at least "
        f"the minimum improvement better)."
    )


def short_evidence(outcome: Outcome) -> str:
    """The device's copy of the rationale, bounded (:data:`lens_core.recommendations.MAX_EVIDENCE_CHARS`)."""
    c = outcome.comparison
    assert c is not None
    e = outcome.evidence
    devices = sorted({d for d, _ in outcome.strata})
    who = f"{len(devices)} device{'s' if len(devices) != 1 else ''} of this class" if e.source == "fleet" else "own"
    text = (
        f"{e.source}: {who}, {c.candidate_n} requests at {e.setting}={format_value(e.value)}: "
        f"{_LABEL[outcome.metric]} median {_fmt(c.candidate_median)} ms vs {_fmt(c.baseline_median)} ms here "
        f"({c.baseline_n} requests), p={c.p_value:.2g}"
    )
    return text[:MAX_EVIDENCE_CHARS]


def _seed(text: str) -> int:
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big")


def _candidates(window: Group, own: Iterable[Group], fleet: Iterable[Group]) -> dict[tuple[str, Any, str], list[Group]]:
    """(setting, value, source) → the groups whose settings differ from the window's in exactly that setting."""
    names = set(window.settings)
    out: dict[tuple[str, Any, str], list[Group]] = {}
    for source, groups in (("history", own), ("fleet", fleet)):
        for g in groups:
            if g is window or set(g.settings) != names:
                continue
            diff = [n for n in FIELDS if n in names and g.settings[n] != window.settings[n]]
            if len(diff) == 1:
                out.setdefault((diff[0], g.settings[diff[0]], source), []).append(g)
    return out


def recommendations_for(
    window: Group,
    own: Sequence[Group],
    fleet: Sequence[Group],
    class_key: tuple[str, str] | None,
    settings: Settings,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], list[Recommendation]]:
    """The document's recommendations, the comparisons considered, and the device's wire copies."""
    outcomes: list[Outcome] = []
    for (name, value, source), groups in sorted(
        _candidates(window, own, fleet).items(), key=lambda kv: (kv[0][0], str(kv[0][1]), kv[0][2])
    ):
        target = _target(name)
        seed = _seed(f"{window.device_id}\x00{window.model_name}\x00{target}\x00{format_value(value)}\x00{source}")
        outcomes.append(judge(window, Evidence(source, name, value, groups), settings, seed))
    # this device's own history outweighs the fleet: a value it measured significantly worse here is not advised
    worse_here = {
        (o.evidence.setting, o.evidence.value)
        for o in outcomes
        if o.evidence.source == "history"
        and o.comparison is not None
        and o.comparison.p_value < settings.alpha
        and o.comparison.improvement < 0
    }
    best: dict[str, Outcome] = {}
    for o in outcomes:
        if o.reason is None and (o.evidence.setting, o.evidence.value) in worse_here:
            o.reason = "contradicted: this device's own history measured this value significantly worse"
        if o.reason is not None:
            continue
        held = best.get(o.evidence.setting)
        if held is None or o.score > held.score:
            if held is not None:
                held.reason = f"a better-supported value of {held.evidence.setting} was recommended"
            best[o.evidence.setting] = o
        else:
            o.reason = f"a better-supported value of {o.evidence.setting} was recommended"
    documents: list[dict[str, Any]] = []
    wire: list[Recommendation] = []
    for o in best.values():
        assert o.comparison is not None and o.confidence is not None
        c, e = o.comparison, o.evidence
        target = _target(e.setting)
        rid = recommendation_id(window.device_id, window.model_name, target, e.value)
        impact: dict[str, float] = {
            "latency_improvement_percent": c.improvement * 100.0,
            "confidence_score": o.confidence,
        }
        if c.candidate_median > 0 and o.metric in ("tpot_ms", "e2e_ms"):
            # the same medians as a rate: decode tokens per second (1000 ÷ TPOT) or requests one after another
            impact["throughput_improvement_percent"] = (c.baseline_median / c.candidate_median - 1.0) * 100.0
        documents.append(
            {
                "recommendation_id": rid,
                "priority": priority(c.improvement, o.confidence),
                "category": CATEGORY_OF.get(e.setting, "configuration"),
                "action": {
                    "type": "config_change",
                    "target": target,
                    "current_value": window.settings[e.setting],
                    "recommended_value": e.value,
                    "rollback_strategy": ROLLBACK,
                },
                "expected_impact": impact,
                "rationale": rationale(o, window, class_key),
                "setting": e.setting,
                "evidence": {
                    "source": e.source,
                    "metric": o.metric,
                    "test": "Mann-Whitney U, two-sided, normal approximation with tie and continuity correction",
                    "p_value": c.p_value,
                    "improvement": c.improvement,
                    "baseline": {
                        "device_id": window.device_id,
                        "requests": c.baseline_n,
                        "median": c.baseline_median,
                        "records": trace(window.rows),
                        "contended_excluded": window.contended_excluded,
                    },
                    "candidate": {
                        "requests": c.candidate_n,
                        "median": c.candidate_median,
                        "devices": [
                            {
                                "device_id": d,
                                "requests": len(v),
                                "median": float(np.median(v)),
                                "records": o.records.get(d),
                                "contended_excluded": sum(g.contended_excluded for g in e.groups if g.device_id == d),
                            }
                            for d, v in o.strata
                        ],
                        "contended_excluded": sum(g.contended_excluded for g in e.groups),
                    },
                },
            }
        )
        if e.setting in CONFIG_KEYS:
            wire.append(
                Recommendation(
                    recommendation_id=rid,
                    model_name=window.model_name,
                    target=target,
                    current_value=window.settings[e.setting],
                    recommended_value=e.value,
                    improvement=c.improvement,
                    confidence=o.confidence,
                    metric=o.metric,
                    evidence=short_evidence(o),
                )
            )
    documents.sort(key=lambda d: (-d["priority"], -d["expected_impact"]["latency_improvement_percent"]))
    order = {d["recommendation_id"]: i for i, d in enumerate(documents)}
    wire.sort(key=lambda r: order[r.recommendation_id])
    return documents, [o.considered() for o in outcomes][:MAX_CONSIDERED], wire


def _target(setting: str) -> str:
    """The agent's configuration key for a setting ("model.n_threads"), or the setting's own name when the agent
    does not change it itself (quantization: another model file; power_mode: nvpmodel)."""
    if setting in CONFIG_KEYS:
        section, key = CONFIG_KEYS[setting]
        return f"{section}.{key}"
    return setting


# -- the document ---------------------------------------------------------------------------------------------------


def _percentiles(values: list[float], points: Sequence[float]) -> list[float]:
    return [float(v) for v in np.percentile(np.asarray(values, dtype=np.float64), list(points))]


def performance_metrics(window: Group, memory: list[int], facts: dict[str, Any] | None) -> dict[str, Any]:
    """latency_analysis, throughput_analysis and resource_analysis from the window's requests (exact percentiles,
    numpy's default linear interpolation); a figure without data is left out."""
    latency: dict[str, float] = {}
    ttft, tpot, e2e = window.values("ttft_ms"), window.values("tpot_ms"), window.values("e2e_ms")
    if ttft:
        latency["ttft_p50_ms"], latency["ttft_p95_ms"], latency["ttft_p99_ms"] = _percentiles(ttft, (50, 95, 99))
    if tpot:
        latency["tpot_p50_ms"], latency["tpot_p95_ms"] = _percentiles(tpot, (50, 95))
    if e2e:
        latency["e2e_p95_ms"] = _percentiles(e2e, (95,))[0]
    throughput: dict[str, Any] = {}
    rates = window.values("tokens_per_second")
    if rates:
        throughput["tokens_per_second"] = float(np.median(rates))
    if e2e and float(np.mean(e2e)) > 0:
        throughput["requests_per_second"] = 1000.0 / float(np.mean(e2e))
        throughput["requests_per_second_basis"] = (
            "1 ÷ mean e2e: requests served one after another (the agent runs one at a time), not the rate asked for"
        )
    out: dict[str, Any] = {"latency_analysis": latency, "throughput_analysis": throughput}
    ram_gb = facts.get("ram_gb") if facts else None
    if memory and ram_gb and ram_gb > 0:
        utilization = float(np.mean(memory)) / (ram_gb * 1024**3)
        resources: dict[str, Any] = {
            "avg_memory_utilization": utilization,
            "memory_basis": f"mean peak RSS of {len(memory)} requests ÷ the device's RAM ({ram_gb:g} GiB)",
        }
        if utilization >= MEMORY_BOTTLENECK:
            resources["bottleneck_indicator"] = "memory"
        out["resource_analysis"] = resources
    return out


def window_memory(store: Store, series: Series, window: Group) -> list[int]:
    """The peak RSS (rss_peak_bytes, from the bodies) of the window's requests that report it."""
    query = Query(
        device=series.device_id,
        kind="inference",
        model=series.model_name,
        strategy=series.strategy if series.strategy is not None else NULL_NAME,
    )
    wanted = {r.seq for r in window.rows}
    if not wanted:
        return []
    out = []
    # the window is the requests that ran last; read the bodies stored from its first-received one on (a batch of
    # old requests received since is read past, within the series' latest requests)
    for row in store.query(query, limit=max(1, series.read_rows, series.window_span), after_seq=min(wanted) - 1):
        if row.get("seq") not in wanted:
            continue
        record = decode_wire(row)
        value = record.get("rss_peak_bytes") if record else None
        if type(value) is int and 0 < value <= _MAX_MEMORY_BYTES:
            out.append(value)
    return out


_ANOMALY_METRICS = {"ttft_ms": "latency_spike", "tpot_ms": "latency_spike", "tokens_per_second": "throughput_drop"}
_ROW_METRIC = {"ttft_ms": 6, "tpot_ms": 7}  # index in _COLUMNS


def severity(before: float, after: float, metric: str) -> str:
    """From how many times worse it got (after ÷ before for latency, before ÷ after for tokens per second):
    below 1.25 low, below 1.5 medium, below 2 high, 2 or more critical."""
    factor = after / before if metric != "tokens_per_second" else (before / after if after > 0 else math.inf)
    return "low" if factor < 1.25 else "medium" if factor < 1.5 else "high" if factor < 2.0 else "critical"


def _row_value(row: tuple[Any, ...], metric: str) -> float | None:
    if not row[2]:
        return None
    if metric == "tokens_per_second":
        e2e, n_out = _number(row[8]), _int(row[5])
        return n_out / (e2e / 1e6) if n_out and e2e else None
    value = _number(row[_ROW_METRIC[metric]])
    return value / 1000 if value is not None else None


def _settings_change(before: Sequence[tuple[Any, ...]], after: Sequence[tuple[Any, ...]]) -> str | None:
    """ "n_threads 2 → 1" when nearly every request before a change (:data:`CHANGE_SHARE`) ran one set of settings and
    nearly every one after it another: the change point may sit a request or two off the switch."""

    def dominant(rows: Sequence[tuple[Any, ...]]) -> str | None:
        counts = Counter(_canonical(row[3]) for row in rows)
        key, count = counts.most_common(1)[0] if counts else (None, 0)
        return key if key is not None and count >= CHANGE_SHARE * len(rows) else None

    a_key, b_key = dominant(before), dominant(after)
    if a_key is None or b_key is None or a_key == b_key:
        return None
    a, b = parse_key(a_key), parse_key(b_key)
    names = [n for n in FIELDS if (n in a or n in b) and a.get(n) != b.get(n)]
    return ", ".join(
        f"{n} {format_value(a[n]) if n in a else 'unset'} → {format_value(b[n]) if n in b else 'unset'}" for n in names
    )


def anomalies(found: Sequence[dict[str, Any]], series: Sequence[Series]) -> list[dict[str, Any]]:
    """The device × model's current regressions (aggregator.regressions) as the schema's anomalies. The deviation
    is the change of the median in sample standard deviations of the requests before the change: the
    ``requests_before`` successful requests of the series preceding its first request after the change."""
    out = []
    by_strategy = {s.strategy: s for s in series}
    for f in found:
        kind = _ANOMALY_METRICS.get(f.get("metric", ""))
        if f.get("kind") != "regression" or kind is None:
            continue
        before, after = f["before_median"], f["after_median"]
        item: dict[str, Any] = {
            "anomaly_type": kind,
            "severity": severity(before, after, f["metric"]),
            "description": f.get("summary") or f"{f['metric']} {f['change']:+.0%}",
            "affected_metric": f["metric"],
            "change": f["change"],
            "strategy": f.get("strategy") or "local",
        }
        since = f.get("since_us")
        if type(since) is int and 0 <= since <= MAX_TIME_US:  # the first request after the change
            item["detected_at"] = _iso(since)
        s = by_strategy.get(f.get("strategy"))
        if s is not None:
            points = [(row, v) for row in s.rows if (v := _row_value(row, f["metric"])) is not None]
            at = max((i for i, (row, _) in enumerate(points) if row[1] == f["since_us"]), default=None)
            segment = points[:at][-f["requests_before"] :] if at is not None else []
            if len(segment) == f["requests_before"] and len(segment) >= 2:
                sd = float(np.std([v for _, v in segment], ddof=1))
                if sd > 0:
                    item["deviation_magnitude"] = (after - before) / sd
                changed = _settings_change([row for row, _ in segment], [row for row, _ in points[at:]])
                if changed:
                    item["settings_change"] = changed
                    item["description"] += f"; the engine settings changed with it: {changed}"
        out.append(item)
    return out


def document(
    store: Store,
    series: Sequence[Series],
    chosen: Series,
    facts: dict[str, Any] | None,
    index: dict[tuple[str, str | None, tuple[str, str]], list[Group]],
    found: Sequence[dict[str, Any]],
    settings: Settings,
    now_us: int,
) -> tuple[dict[str, Any], list[Recommendation]]:
    """One device × model's feedback document (``chosen``: the series of its latest successful request)."""
    window = chosen.groups[chosen.current]
    class_key = _class_of(facts)
    starts = [r.started_us for r in window.rows]
    model_config: dict[str, Any] = {"model_name": chosen.model_name, "strategy": chosen.strategy or "local"}
    if type(window.settings.get("n_batch")) is int:
        model_config["batch_size"] = window.settings["n_batch"]
    if type(window.settings.get("quantization")) is str:
        model_config["quantization"] = window.settings["quantization"]
    model_config["engine_settings"] = dict(window.settings)
    model_config["settings_key"] = chosen.current
    deployment: dict[str, Any] = {}
    if facts:
        selector = {k: facts[k] for k in ("device_class", "model", "accelerator") if facts.get(k)}
        if selector:
            deployment["node_selector"] = selector
    layers = window.settings.get("n_gpu_layers")
    if type(layers) is int:
        deployment["gpu_allocation"] = (
            "none (CPU only)" if layers == 0 else "all layers" if layers < 0 else f"{layers} layers"
        )
    considered: list[dict[str, Any]] = []
    recommendations: list[dict[str, Any]] = []
    wire: list[Recommendation] = []
    if not window.settings:
        note = "the requests carry no engine settings (ext.settings): nothing to compare"
    elif len(window.rows) < settings.min_samples:
        note = f"{len(window.rows)} requests under the current settings; at least {settings.min_samples} are needed"
    else:
        own = list(chosen.groups.values())
        fleet = [
            g
            for g in (index.get((chosen.model_name, chosen.strategy, class_key), []) if class_key else [])
            if g.device_id != chosen.device_id
        ]
        recommendations, considered, wire = recommendations_for(window, own, fleet, class_key, settings)
        note = (
            f"{len(recommendations)} recommendation(s) from {len(considered)} comparison(s)"
            if considered
            else "no device of this class and no earlier request of this device differs in exactly one setting"
            if class_key
            else "no earlier request of this device differs in exactly one setting; without device facts (class, "
            "model) the fleet is no evidence"
        )
    doc: dict[str, Any] = {
        "timestamp": _iso(now_us),
        "device_id": chosen.device_id,
        "model_name": chosen.model_name,
        "observation_window": {
            "start_time": _iso(min(starts)),
            "end_time": _iso(max(starts)),
            "sample_count": len(window.rows),
        },
        "current_state": {"model_config": model_config, "deployment_config": deployment},
        "performance_metrics": performance_metrics(window, window_memory(store, chosen, window), facts),
        "anomalies": anomalies(
            [f for f in found if f.get("device_id") == chosen.device_id and f.get("model_name") == chosen.model_name],
            series,
        ),
        "recommendations": recommendations,
        "evidence_considered": considered,
        "note": note,
        "include_contended": settings.include_contended,
        # this device × model's successful requests read and left out as contended (its window and its history)
        "contended_excluded": sum(s.contended_excluded for s in series),
    }
    return doc, wire


def compute(
    store: Store, settings: Settings, found: Sequence[dict[str, Any]], now_us: int
) -> tuple[list[dict[str, Any]], dict[str, list[Recommendation]], list[dict[str, Any]]]:
    """Every device × model's document (by device, model), each device's recommendations for its agent, and the
    series left without a document because every successful request was contended. Blocking: run it on a read
    thread.

    The recommendations for the agents never learn from contended requests: with ``settings.include_contended``
    the documents use them, and the devices' recommendations come from a second computation without them (a
    device that marks or unmarks its requests changes only what its own requests count for)."""
    documents, wire, all_contended = _compute(store, settings, found, now_us)
    if settings.include_contended:
        _, wire, _ = _compute(store, replace(settings, include_contended=False), found, now_us)
    return documents, wire, all_contended


def _compute(
    store: Store, settings: Settings, found: Sequence[dict[str, Any]], now_us: int
) -> tuple[list[dict[str, Any]], dict[str, list[Recommendation]], list[dict[str, Any]]]:
    all_contended: list[dict[str, Any]] = []
    series_of: dict[tuple[str, str], list[Series]] = {}
    # bounded by construction: a device that sent thousands of model names costs MAX_SERIES_PER_DEVICE reads
    entries, _ = bound_series(store.series(), MAX_SERIES_PER_DEVICE)
    for entry in entries:
        if entry["kind"] != "inference" or entry["model_name"] == NULL_NAME:
            continue
        s = read_series(store, entry, settings, all_contended)
        if s is not None:
            series_of.setdefault((s.device_id, s.model_name), []).append(s)
    facts = {device: latest_facts(store, device) for device in sorted({d for d, _ in series_of})}
    index: dict[tuple[str, str | None, tuple[str, str]], list[Group]] = {}
    for (device, model), all_series in series_of.items():
        class_key = _class_of(facts[device])
        if class_key is None:
            continue
        for s in all_series:
            index.setdefault((model, s.strategy, class_key), []).extend(s.groups.values())
    documents: list[dict[str, Any]] = []
    wire: dict[str, list[Recommendation]] = {}
    for (device, _model), all_series in sorted(series_of.items()):
        chosen = max(all_series, key=lambda s: (s.latest_started_us, s.latest_seq))
        doc, recs = document(store, all_series, chosen, facts[device], index, found, settings, now_us)
        documents.append(doc)
        if recs:
            wire.setdefault(device, []).extend(recs)
    for recs in wire.values():
        recs.sort(key=lambda r: -r.improvement * r.confidence)
        del recs[MAX_ITEMS:]
    return documents, wire, all_contended


class FeedbackCache:
    """The documents, recomputed at most every ``interval_s`` (on a read thread) and kept for the API and the
    ingest acknowledgements."""

    def __init__(self, interval_s: float, settings: Settings = Settings()) -> None:
        self.interval_s = interval_s
        self.settings = settings
        self.documents: list[dict[str, Any]] = []
        self.all_contended: list[dict[str, Any]] = []
        self.computed_us: int | None = None
        self._wire: dict[str, list[dict[str, Any]]] = {}
        self._computed_mono: float | None = None

    def stale(self, now_mono: float) -> bool:
        return self._computed_mono is None or now_mono - self._computed_mono >= self.interval_s

    def update(
        self,
        documents: list[dict[str, Any]],
        wire: dict[str, list[Recommendation]],
        now_mono: float,
        now_us: int,
        all_contended: list[dict[str, Any]] | None = None,
    ) -> None:
        self.documents = documents
        self.all_contended = all_contended or []
        self._wire = {device: to_wire(recs) for device, recs in wire.items() if recs}
        self._computed_mono, self.computed_us = now_mono, now_us

    def for_device(self, device_id: str) -> list[dict[str, Any]]:
        """What the device's next acknowledgement carries (from the cache; [] before the first computation)."""
        return self._wire.get(device_id, [])

    def answer(self, device: str | None = None, model: str | None = None) -> dict[str, Any]:
        s = self.settings
        return {
            "computed_at": _iso(self.computed_us) if self.computed_us is not None else None,
            "interval_s": self.interval_s,
            "method": (
                f"per device × model: its latest {s.window} successful requests under its current settings; a "
                f"setting is recommended when devices of the same class (or the device's own history) with only "
                f"that setting changed are better by ≥ {s.min_improvement:.0%} of the median, Mann–Whitney "
                f"p < {s.alpha:g}, ≥ {s.min_samples} requests each side"
                + ("" if s.include_contended else "; contended requests left out")
                + " (docs/feedback.md)"
            ),
            "include_contended": s.include_contended,
            "documents": [
                d
                for d in self.documents
                if (device is None or d["device_id"] == device) and (model is None or d["model_name"] == model)
            ],
            # device × model series with no document: every successful request was contended and left out
            "all_contended": [
                d
                for d in self.all_contended
                if (device is None or d["device_id"] == device) and (model is None or d["model_name"] == model)
            ],
        }


def _faster_slower(improvement_percent: float) -> str:
    """A latency change as an operator reads it: "31.3 % faster" (latency down) or "4.0 % slower", never a sign."""
    if round(improvement_percent, 1) == 0:
        return "no change"
    return f"{abs(improvement_percent):.1f} % {'faster' if improvement_percent > 0 else 'slower'}"


def describe(doc: dict[str, Any]) -> list[str]:
    """A document in lines an operator reads (``lens-aggregator feedback``)."""
    state = doc["current_state"]["model_config"]
    window = doc["observation_window"]
    lines = [
        f"{doc['device_id']} · {doc['model_name']} ({state['strategy']}) · "
        f"{state.get('settings_key') or 'no engine settings'}"
    ]
    latency = doc["performance_metrics"]["latency_analysis"]
    figures = [
        f"{label} {latency[key]:.4g} ms"
        for key, label in (("ttft_p95_ms", "TTFT p95"), ("tpot_p50_ms", "TPOT p50"), ("tpot_p95_ms", "p95"))
        if key in latency
    ]
    rate = doc["performance_metrics"]["throughput_analysis"].get("tokens_per_second")
    if rate is not None:
        figures.append(f"{rate:.4g} tok/s")
    lines.append(
        f"  window: {window['sample_count']} requests, {window['start_time']} → {window['end_time']}"
        + (f"; {', '.join(figures)}" if figures else "")
    )
    for anomaly in doc["anomalies"]:
        lines.append(f"  anomaly ({anomaly['severity']}): {anomaly['description']}")
    for rec in doc["recommendations"]:
        action, evidence = rec["action"], rec["evidence"]
        lines.append(
            f"  recommend (priority {rec['priority']}): {action['target']} {format_value(action['current_value'])} → "
            f"{format_value(action['recommended_value'])}: {_LABEL[evidence['metric']]} "
            f"{_faster_slower(rec['expected_impact']['latency_improvement_percent'])} ({evidence['source']}, "
            f"{evidence['candidate']['requests']} requests against {evidence['baseline']['requests']}, "
            f"p = {evidence['p_value']:.2g}, confidence {rec['expected_impact']['confidence_score']:.2f})"
        )
    if not doc["recommendations"]:
        lines.append(f"  no recommendation: {doc['note']}")
    left_out = doc.get("contended_excluded") or 0
    if left_out:
        lines.append(
            f"  contended: {left_out} request{'s' if left_out != 1 else ''} left out (other work on the device "
            "during them; --include-contended uses them)"
        )
    return lines
