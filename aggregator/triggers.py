"""Triggers: conditions on each device × model × engine settings series, with an evaluation window and a cooldown.

An operator declares them in the aggregator's TOML as ``[[triggers]]`` (none declared: none evaluated)::

    [[triggers]]
    name = "slow-first-token"
    condition = "p95_latency_above"
    metric = "ttft"
    threshold = 800          # ms
    window = "15m"
    cooldown = "1h"
    min_samples = 10

Every ``fleet.trigger_interval`` the aggregator reads the ``kind = 'inference'`` records that started within the
widest window (its own clock; per device at most :data:`MAX_WINDOW_ROWS`, those that ran last), keeps each trigger's
scope (``device_class`` from each device's latest facts, ``model``, ``strategy``), groups them by device, model and
the ``settings`` column, and judges each trigger over each series' requests (:func:`judge`, a pure function).

Sound at low request rates (an edge device runs ~10 requests an hour): a window holding fewer than ``min_samples``
requests that count is widened, doubling, up to ``max_window`` (the outcome says so); only then is the series
"insufficient data", not judged. The percentile conditions hold when the lower 95 % confidence bound of the
percentile (an order statistic, :func:`lower_bound_rank`) is above the threshold, so one outlier among ten requests
does not fire them. ``error_budget_burn`` and ``sla_budget_burn`` are multiwindow burn rates (SRE workbook): a
long and a short window both burning the budget (1 − objective) faster than a factor.

A trigger *fires* on a series when its condition holds and it did not fire on that
series within ``cooldown``; while the condition holds inside the cooldown the series is "cooling down until …".

The last fire of each trigger × series and the latest :data:`HISTORY` fires are kept in the store's ``meta`` table
(:data:`META_KEY`, compact JSON, written by compare-and-swap): a restart, or a second replica on the same
PostgreSQL database, does not fire again inside a cooldown. docs/triggers.md says what each condition means.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any, NamedTuple

from lens_core.config import Invalid, duration_or_zero, int_range, parse_duration
from lens_core.errors import ConfigError
from lens_core.record_schema import MAX_FUTURE_US
from lens_core.settings import MAX_KEY_CHARS, parse_key, settings_key

from .health import latest_facts
from .reads import truncation
from .rows import decode_wire
from .store import Query, Store

log = logging.getLogger("aggregator")

META_KEY = "triggers.fired"
HISTORY = 500  # fires kept (newest first), in the store and on GET /api/v1/triggers
MAX_TRIGGERS = 100
# Read per device, so that one device sending floods of requests cannot push the others' out of the evaluation:
MAX_WINDOW_ROWS = 20_000  # records of ONE device one evaluation reads (columns only): those of the window that ran last
MAX_BODY_ROWS = 2_000  # records of one device whose bodies memory_above decodes (rss_peak_bytes is not a column)
MAX_NAMED_DEVICES = 20  # devices whose read was cut named in the answer (the rest counted)
FUTURE_SLACK_US = MAX_FUTURE_US  # a request starts at most this long after its batch is received (ingest's bound)
MAX_SERIES_PER_DEVICE = 500  # series of one device judged per evaluation: those with the latest requests
MAX_KEPT_FIRES = 50_000  # trigger × series last fires kept for their cooldowns (the newest)
MAX_WINDOW_S = 7 * 86_400.0
MAX_COOLDOWN_S = 30 * 86_400.0
SETTLE_ATTEMPTS = 5  # compare-and-swap retries when another replica wrote the fires in between

LATENCY_METRICS = ("ttft", "tpot", "e2e")
# aggregator.regressions.METRICS (not imported: the configuration check stays free of numpy)
REGRESSION_METRICS = ("ttft_ms", "tpot_ms", "tokens_per_second", "j_per_token", "guardrail_ms")
_LATENCY_COLUMN = {"ttft": "ttft_ms", "tpot": "tpot_ms", "e2e": "e2e_ms"}
_METRIC_LABEL = {
    "ttft": "TTFT",
    "tpot": "TPOT",
    "e2e": "e2e",
    "ttft_ms": "TTFT",
    "tpot_ms": "TPOT",
    "tokens_per_second": "tok/s",
    "j_per_token": "J/token",
    "guardrail_ms": "guardrail overhead",
}
MIB = 1024**2


@dataclass(frozen=True)
class Condition:
    """What a condition reads and how its threshold is bounded."""

    summary: str  # how the value is computed, in words
    unit: str
    metrics: tuple[str, ...] = ()  # allowed values of ``metric`` (none: the key is not taken)
    threshold: tuple[float, float, bool] | None = (0.0, math.inf, False)  # (low, high, low included); None: optional
    integer: bool = False


CONDITIONS: dict[str, Condition] = {
    "p95_latency_above": Condition("95th percentile of the successful requests' metric", "ms", LATENCY_METRICS),
    "p99_latency_above": Condition("99th percentile of the successful requests' metric", "ms", LATENCY_METRICS),
    "mean_latency_above": Condition("mean of the successful requests' metric", "ms", LATENCY_METRICS),
    "tokens_per_second_below": Condition("median of the successful requests' output_tokens ÷ e2e", "tok/s"),
    "error_rate_above": Condition("failed ÷ all requests", "", threshold=(0.0, 1.0, True)),
    "consecutive_failures": Condition("failed requests in a row, latest first", "failures", integer=True),
    "memory_above": Condition("highest peak RSS (rss_peak_bytes) of the requests", "MiB"),
    "energy_per_token_above": Condition("mean energy per output token of the successful requests", "J/token"),
    "sla_violations": Condition("successful requests whose metric is above threshold", "requests", LATENCY_METRICS),
    "regression": Condition(
        "the device × model has a current regression of this metric (change of the median)",
        "",
        REGRESSION_METRICS,
        threshold=None,
    ),
    "error_budget_burn": Condition(
        "failed ÷ all requests over each long and short window, ÷ the error budget (1 − objective)",
        "×",
        threshold=None,
    ),
    "sla_budget_burn": Condition(
        "requests that failed or whose metric is above threshold ÷ all requests, per window, ÷ the budget",
        "×",
        LATENCY_METRICS,
    ),
    "guardrail_overhead_ms": Condition(
        "95th percentile of the served guarded requests' guardrail overhead (ext.guardrails.overhead_ms)", "ms"
    ),
    "guardrail_impact_percent": Condition(
        "95th percentile of the served guarded requests' guardrail overhead ÷ their total time × 100",
        "%",
        threshold=(0.0, 100.0, False),
    ),
}
GUARDRAIL_CONDITIONS = ("guardrail_overhead_ms", "guardrail_impact_percent")
_GUARDRAIL_FIELD = {"guardrail_overhead_ms": "guardrail_ms", "guardrail_impact_percent": "guardrail_impact"}
BURN_CONDITIONS = ("error_budget_burn", "sla_budget_burn")
PERCENTILES = {
    "p95_latency_above": 95,
    "p99_latency_above": 99,
    "guardrail_overhead_ms": 95,
    "guardrail_impact_percent": 95,
}
CONFIDENCE = 0.95  # the percentile conditions fire when the lower 95 % confidence bound is above the threshold
# SRE workbook (chapter "Alerting on SLOs", multiwindow multi-burn-rate): (long, short, burn-rate factor)
DEFAULT_BURN_WINDOWS = ((3600.0, 300.0, 14.4), (6 * 3600.0, 1800.0, 6.0))
MAX_BURN_WINDOWS = 6
WIDEN_FACTOR = 4  # max_window's default: window × 4 (at most MAX_WINDOW_S)
SEVERITIES = ("warning", "critical")
SCOPE_KEYS = ("device_class", "model", "strategy", "guardrail_set")
MAX_SCOPE_VALUES = 32
_THRESHOLD_MEANING = {
    "p95_latency_above": "milliseconds",
    "p99_latency_above": "milliseconds",
    "mean_latency_above": "milliseconds",
    "tokens_per_second_below": "output tokens per second",
    "error_rate_above": "a fraction of the requests, e.g. 0.2 for 20 %",
    "consecutive_failures": "how many failed requests in a row",
    "memory_above": "MiB of peak RSS",
    "energy_per_token_above": "joules per output token",
    "sla_violations": "milliseconds (the SLA on the metric)",
    "regression": "the smallest relative change that counts, e.g. 0.25 (default 0: any reported regression)",
    "error_budget_burn": "no threshold: the objective and windows say when it holds",
    "sla_budget_burn": "milliseconds (the SLA on the metric: a request above it, or failed, spends the budget)",
    "guardrail_overhead_ms": "milliseconds of guardrail overhead (the guardrail stages together)",
    "guardrail_impact_percent": "a percentage of the guarded request's total time, e.g. 10 for 10 %",
}
_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,63}")


@dataclass(frozen=True)
class Trigger:
    name: str
    condition: str
    threshold: float
    window_s: float
    cooldown_s: float
    min_samples: int
    metric: str | None = None
    max_violations: int | None = None
    max_window_s: float = 0.0  # widened up to this when the window holds fewer than min_samples (0: window_s)
    severity: str = "warning"
    device_classes: tuple[str, ...] | None = None  # scope (None: every device class, model, strategy)
    models: tuple[str, ...] | None = None
    strategies: tuple[str, ...] | None = None
    guardrail_sets: tuple[str, ...] | None = None  # scope: requests guarded by one of these sets (ext.guardrails.set)
    objective: float | None = None  # burn conditions: the share of good requests the objective promises
    windows: tuple[tuple[float, float, float], ...] = ()  # burn conditions: (long, short, burn-rate factor)

    @property
    def widest_s(self) -> float:
        """The longest time this trigger reads back: its widest window."""
        if self.windows:
            return max(long for long, _, _ in self.windows)
        return max(self.window_s, self.max_window_s)

    def scope(self) -> dict[str, list[str]]:
        out = {}
        for key, values in (
            ("device_class", self.device_classes),
            ("model", self.models),
            ("strategy", self.strategies),
            ("guardrail_set", self.guardrail_sets),
        ):
            if values is not None:
                out[key] = list(values)
        return out

    def describe(self) -> str:
        """One line: "p95 TTFT above 800 ms over 15 min (at least 10 requests), cooldown 1 h"."""
        cooldown = span(self.cooldown_s) if self.cooldown_s else "none"
        scope = "".join(f", {key} {' | '.join(values)}" for key, values in self.scope().items())
        if self.windows:
            pairs = "; ".join(
                f"{span(long)} and {span(short)} above {factor:g}×" for long, short, factor in self.windows
            )
            return f"{self.rule()}: {pairs} (at least {self.min_samples} requests a window){scope}, cooldown {cooldown}"
        widen = f", widened up to {span(self.max_window_s)}" if self.max_window_s > self.window_s else ""
        bound = " (its lower 95 % confidence bound)" if self.condition in PERCENTILES else ""
        return (
            f"{self.rule()}{bound} over {span(self.window_s)} (at least {self.min_samples} requests{widen}){scope}, "
            + (f"cooldown {cooldown}")
        )

    def rule(self) -> str:
        metric = _METRIC_LABEL.get(self.metric or "", self.metric or "")
        c = self.condition
        if c == "guardrail_overhead_ms":
            return f"p95 guardrail overhead above {self.threshold:g} ms"
        if c == "guardrail_impact_percent":
            return f"p95 guardrail impact above {self.threshold:g} % of the request"
        if c in PERCENTILES:
            return f"{c.split('_')[0]} {metric} above {self.threshold:g} ms"
        if c == "error_budget_burn":
            return f"error budget of a {(self.objective or 0) * 100:g} % objective burning"
        if c == "sla_budget_burn":
            share = f"{(self.objective or 0) * 100:g} %"
            return f"budget of {share} of requests with {metric} within {self.threshold:g} ms burning"
        if c == "mean_latency_above":
            return f"mean {metric} above {self.threshold:g} ms"
        if c == "tokens_per_second_below":
            return f"median tok/s below {self.threshold:g}"
        if c == "error_rate_above":
            return f"error rate above {self.threshold * 100:g} %"
        if c == "consecutive_failures":
            return f"{int(self.threshold)} failed requests in a row"
        if c == "memory_above":
            return f"peak RSS above {self.threshold:g} MiB"
        if c == "energy_per_token_above":
            return f"mean energy above {self.threshold:g} J/token"
        if c == "sla_violations":
            return f"more than {self.max_violations} requests failed or with {metric} above {self.threshold:g} ms"
        return f"a {metric} regression" + (f" of at least {self.threshold * 100:g} %" if self.threshold else "")


def span(seconds: float) -> str:
    """``15 min``, ``2 h``, ``1 d``, ``30 s``."""
    for unit, size in (("d", 86_400), ("h", 3600), ("min", 60)):
        if seconds >= size and seconds % size == 0:
            return f"{int(seconds // size)} {unit}"
    return f"{seconds:g} s"


# -- configuration ---------------------------------------------------------------------------------------------------
_KEYS = (
    "name",
    "condition",
    "metric",
    "threshold",
    "window",
    "max_window",
    "cooldown",
    "min_samples",
    "max_violations",
    "severity",
    "device_class",
    "model",
    "strategy",
    "guardrail_set",
    "objective",
    "windows",
)
DEFAULT_WINDOW_S = 900.0
DEFAULT_COOLDOWN_S = 3600.0
DEFAULT_MIN_SAMPLES = 10
DEFAULT_BURN_MIN_SAMPLES = 5  # requests each burn-rate window needs (a short one shorter: the latest this many)


def _threshold(condition: str, value: object) -> float:
    spec = CONDITIONS[condition]
    meaning = _THRESHOLD_MEANING[condition]
    if spec.integer:
        return float(int_range(1, 100_000)(value))
    low, high, low_included = spec.threshold or (0.0, 10.0, True)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise Invalid(f"a number: {meaning}")
    if not (value >= low if low_included else value > low) or not value <= high:
        shown = f"from {low:g}" if low_included else f"greater than {low:g}"
        bound = "" if math.isinf(high) else f" up to {high:g}"
        raise Invalid(f"a number {shown}{bound}: {meaning}")
    if condition == "error_rate_above" and value >= 1:
        raise Invalid(f"a number from 0 to below 1: {meaning}; an error rate cannot be above 1")
    return float(value)


def _bounded_duration(maximum: float, zero_allowed: bool) -> Callable[[object], float]:
    def parse(value: object) -> float:
        seconds = duration_or_zero(value) if zero_allowed else parse_duration(value)
        if seconds > maximum:
            raise Invalid(f"a duration such as 15m or 2h, at most {span(maximum)}")
        return seconds

    return parse


def check_triggers(source: str, raw: object) -> list[Trigger]:
    """The ``[[triggers]]`` tables of the aggregator's file, checked; a bad one is a ConfigError naming
    ``triggers[N].key``, its value and what is allowed. No ``[[triggers]]``: none."""
    if raw is None:
        return []
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ConfigError(source, "triggers", raw, "an array of tables: [[triggers]] (docs/triggers.md)")
    if len(raw) > MAX_TRIGGERS:
        raise ConfigError(source, "triggers", f"{len(raw)} tables", f"at most {MAX_TRIGGERS} [[triggers]] tables")
    out: list[Trigger] = []
    names: dict[str, int] = {}
    for n, item in enumerate(raw):
        trigger = _check_one(source, n, item)
        if trigger.name in names:
            raise ConfigError(
                source,
                f"triggers[{n}].name",
                trigger.name,
                f"a name no other trigger has (triggers[{names[trigger.name]}] is called so too)",
            )
        names[trigger.name] = n
        out.append(trigger)
    return out


def _check_one(source: str, n: int, item: dict[str, Any]) -> Trigger:
    where = f"triggers[{n}]"

    def fail(key: str, value: object, allowed: str) -> ConfigError:
        return ConfigError(source, f"{where}.{key}", value, allowed)

    def missing(key: str, allowed: str) -> ConfigError:
        return ConfigError(source, where, item, f"{where}.{key} to be set: {allowed}")

    for key, value in item.items():
        if key not in _KEYS:
            raise fail(key, value, "a key of [[triggers]]: " + ", ".join(_KEYS))
    if "name" not in item:
        raise missing("name", 'a unique name, e.g. "slow-first-token"')
    name = item["name"]
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise fail("name", name, "1 to 64 letters, digits and . _ : - (starting with a letter or digit)")
    if "condition" not in item:
        raise missing("condition", "one of " + ", ".join(CONDITIONS))
    condition = item["condition"]
    if not isinstance(condition, str) or condition not in CONDITIONS:
        raise fail("condition", condition, "one of " + ", ".join(CONDITIONS))
    spec = CONDITIONS[condition]

    metric = item.get("metric")
    if spec.metrics:
        if metric is None:
            raise missing("metric", f"for {condition}, one of " + ", ".join(spec.metrics))
        if metric not in spec.metrics:
            raise fail("metric", metric, f"for {condition}, one of " + ", ".join(spec.metrics))
    elif "metric" in item:
        raise fail("metric", metric, f"no metric for {condition} (it reads {spec.summary}); remove the key")

    if condition == "error_budget_burn" and "threshold" in item:
        raise fail("threshold", item["threshold"], f"no threshold for {condition}: {_THRESHOLD_MEANING[condition]}")
    if "threshold" in item:
        try:
            threshold = _threshold(condition, item["threshold"])
        except Invalid as exc:
            raise fail("threshold", item["threshold"], str(exc)) from None
    elif spec.threshold is None:
        threshold = 0.0
    else:
        raise missing("threshold", _THRESHOLD_MEANING[condition])

    def duration(key: str, default: float, maximum: float, zero_allowed: bool) -> float:
        if key not in item:
            return default
        try:
            return _bounded_duration(maximum, zero_allowed)(item[key])
        except Invalid as exc:
            allowed = f"{exc}" + (" (or 0: fire at every evaluation while the condition holds)" if zero_allowed else "")
            raise fail(key, item[key], allowed) from None

    burn = condition in BURN_CONDITIONS
    for key in ("window", "max_window") if burn else ("objective", "windows"):
        if key in item:
            allowed = (
                "windows = [[long, short, factor], …] instead"
                if burn
                else f"{key} only with " + " or ".join(BURN_CONDITIONS)
            )
            raise fail(key, item[key], f"no {key} for {condition}: {allowed}")
    cooldown = duration("cooldown", DEFAULT_COOLDOWN_S, MAX_COOLDOWN_S, True)
    objective: float | None = None
    windows: tuple[tuple[float, float, float], ...] = ()
    if burn:
        if "objective" not in item:
            raise missing("objective", "the share of requests the objective promises good, e.g. 0.99")
        objective = item["objective"]
        if type(objective) not in (int, float) or not 0 < objective < 1:
            raise fail("objective", objective, "a number between 0 and 1 (exclusive), e.g. 0.99 for 99 %")
        objective = float(objective)
        windows = _burn_windows(item["windows"], fail) if "windows" in item else DEFAULT_BURN_WINDOWS
        window = max(long for long, _, _ in windows)
        max_window = window
    else:
        window = duration("window", DEFAULT_WINDOW_S, MAX_WINDOW_S, False)
        widest = window if condition == "regression" else min(window * WIDEN_FACTOR, MAX_WINDOW_S)
        max_window = duration("max_window", widest, MAX_WINDOW_S, False)
        if max_window < window:
            raise fail("max_window", item["max_window"], f"a duration at least window ({span(window)})")

    if condition == "consecutive_failures":
        default_min = int(threshold)
    else:
        default_min = DEFAULT_BURN_MIN_SAMPLES if burn else DEFAULT_MIN_SAMPLES
    try:
        min_samples = int_range(1, MAX_WINDOW_ROWS)(item.get("min_samples", default_min))
    except Invalid as exc:
        raise fail("min_samples", item["min_samples"], f"{exc}: requests in the window needed to judge") from None

    max_violations: int | None = None
    if condition == "sla_violations":
        if "max_violations" not in item:
            raise missing("max_violations", "how many requests above threshold the window allows, e.g. 5")
        try:
            max_violations = int_range(0, MAX_WINDOW_ROWS)(item["max_violations"])
        except Invalid as exc:
            raise fail("max_violations", item["max_violations"], f"{exc}: requests above threshold allowed") from None
    elif "max_violations" in item:
        raise fail("max_violations", item["max_violations"], "max_violations only with condition sla_violations")
    if condition == "consecutive_failures" and min_samples < threshold:
        raise fail("min_samples", min_samples, f"at least threshold ({int(threshold)}): N failures need N requests")
    severity = item.get("severity", "warning")
    if severity not in SEVERITIES:
        raise fail("severity", severity, "warning or critical (the device's health while the condition holds)")
    scopes = {key: _scope(item[key], fail, key) if key in item else None for key in SCOPE_KEYS}
    return Trigger(
        name=name,
        condition=condition,
        threshold=threshold,
        window_s=window,
        cooldown_s=cooldown,
        min_samples=min_samples,
        metric=metric,
        max_violations=max_violations,
        max_window_s=max_window,
        severity=severity,
        device_classes=scopes["device_class"],
        models=scopes["model"],
        strategies=scopes["strategy"],
        guardrail_sets=scopes["guardrail_set"],
        objective=objective,
        windows=windows,
    )


Fail = Callable[[str, object, str], ConfigError]


def _burn_windows(raw: object, fail: Fail) -> tuple[tuple[float, float, float], ...]:
    allowed = (
        f'1 to {MAX_BURN_WINDOWS} [long, short, factor] triples, e.g. [["1h", "5m", 14.4], ["6h", "30m", 6]]: '
        f"durations up to {span(MAX_WINDOW_S)}, short below long, a burn-rate factor > 0"
    )
    if type(raw) is not list or not 1 <= len(raw) <= MAX_BURN_WINDOWS:
        raise fail("windows", raw, allowed)
    out = []
    for triple in raw:
        if type(triple) is not list or len(triple) != 3:
            raise fail("windows", raw, allowed)
        try:
            long, short = (_bounded_duration(MAX_WINDOW_S, False)(v) for v in triple[:2])
        except Invalid:
            raise fail("windows", raw, allowed) from None
        factor = triple[2]
        if type(factor) not in (int, float) or not math.isfinite(factor) or factor <= 0 or short >= long:
            raise fail("windows", raw, allowed)
        out.append((long, short, float(factor)))
    return tuple(out)


def _scope(raw: object, fail: Fail, key: str) -> tuple[str, ...]:
    values = [raw] if type(raw) is str else raw
    what = {
        "device_class": "device class (the device facts' device_class)",
        "model": "model name",
        "strategy": "",
        "guardrail_set": "guardrail set (ext.guardrails.set)",
    }
    example = {
        "device_class": '"jetson-orin"',
        "model": '"Smollm2 135M 8k Lc100K Mix1 Ep2"',
        "strategy": '"local"',
        "guardrail_set": '"pii"',
    }
    allowed = (
        f"a {what[key] or 'strategy (local, cloud, speculative, offload)'} or a list of 1 to {MAX_SCOPE_VALUES}, "
        f"each 1 to {MAX_KEY_CHARS} characters, e.g. {example[key]}"
    )
    if type(values) is not list or not 1 <= len(values) <= MAX_SCOPE_VALUES:
        raise fail(key, raw, allowed)
    if not all(type(v) is str and 1 <= len(v) <= MAX_KEY_CHARS for v in values):
        raise fail(key, raw, allowed)
    return tuple(values)


# -- the window's requests -------------------------------------------------------------------------------------------
class Sample(NamedTuple):
    """One request of a window, as the conditions read it (None: not measured or not readable)."""

    device_id: str
    model_name: str | None
    settings: str | None
    started_us: int
    ok: bool
    ttft_ms: float | None = None
    tpot_ms: float | None = None
    e2e_ms: float | None = None
    tokens_per_second: float | None = None
    j_per_token: float | None = None
    rss_peak_mib: float | None = None
    strategy: str | None = None  # the record's strategy column (None: local)
    guardrail_set: str | None = None  # the guardrail set that guarded it (None: none)
    guardrail_ms: float | None = None  # its guardrail overhead (ms)
    guardrail_impact: float | None = None  # its guardrail overhead ÷ its total × 100


Series = tuple[str, str | None, str | None]  # device, model, settings
COLUMNS = (
    "device_id",
    "model_name",
    "settings",
    "started_us",
    "ok",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "output_tokens",
    "j_per_token",
    "strategy",
    "guardrail_set",
    "guardrail_ms",
    "guardrail_impact",
)
BODY_COLUMNS = (
    "device_id",
    "model_name",
    "settings",
    "started_us",
    "ok",
    "seq",
    "codec",
    "body",
    "strategy",
    "guardrail_set",
)


def _number(value: Any) -> float | None:
    """A finite number from a stored column, else None (a row of an older version may hold anything)."""
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def canonical_settings(value: Any) -> tuple[str | None, bool]:
    """(the settings key, readable): a stored ``settings`` value that is not a canonical key (written by anything
    but this version's ingest) is read as unknown settings."""
    if value is None:
        return None, True
    if type(value) is not str or len(value) > MAX_KEY_CHARS or not _is_key(value):
        return None, False
    return value, True


@functools.lru_cache(maxsize=4096)
def _is_key(value: str) -> bool:
    """A fleet runs a handful of settings: each distinct value is parsed once."""
    return settings_key(parse_key(value)) == value


@dataclass
class RowCount:
    read: int = 0
    skipped: int = 0  # rows without a readable device, start time or result
    unreadable_settings: int = 0  # settings values that are not a key: counted under unknown settings
    undecodable: int = 0  # bodies memory_above could not decode
    series_skipped: int = 0  # series past MAX_SERIES_PER_DEVICE of their device, not judged


def _head(row: Sequence[Any], counts: RowCount) -> tuple[str, str | None, str | None, int, bool] | None:
    device, model, raw_settings, started, ok = row[:5]
    if type(device) is not str or not device or type(started) is not int:
        counts.skipped += 1
        return None
    if ok in (True, 1):
        success = True
    elif ok in (False, 0):
        success = False
    else:
        counts.skipped += 1
        return None
    settings, readable = canonical_settings(raw_settings)
    if not readable:
        counts.unreadable_settings += 1
    return device, model if type(model) is str else None, settings, started, success


def samples_from_columns(rows: Iterable[Sequence[Any]], counts: RowCount) -> list[Sample]:
    """Samples from stored rows of :data:`COLUMNS` (hostile values skipped or read as unknown, and counted)."""
    out = []
    for row in rows:
        counts.read += 1
        head = _head(row, counts)
        if head is None:
            continue
        ttft, tpot, e2e, tokens, joules = (_number(v) for v in row[5:10])
        rate = tokens / (e2e / 1e6) if head[4] and e2e and e2e > 0 and tokens and tokens > 0 else None
        out.append(
            Sample(
                *head,
                ttft_ms=ttft / 1000 if ttft is not None else None,
                tpot_ms=tpot / 1000 if tpot is not None else None,
                e2e_ms=e2e / 1000 if e2e is not None else None,
                tokens_per_second=rate,
                j_per_token=joules,
                strategy=_strategy(row[10] if len(row) > 10 else None),
                guardrail_set=_strategy(row[11] if len(row) > 11 else None),
                guardrail_ms=_number(row[12]) if len(row) > 12 else None,
                guardrail_impact=_number(row[13]) if len(row) > 13 else None,
            )
        )
    return out


def samples_from_bodies(rows: Iterable[Sequence[Any]], counts: RowCount) -> list[Sample]:
    """Samples with the peak RSS from stored rows of :data:`BODY_COLUMNS`: a body that does not decode is skipped
    (and counted here and in ``llm_latency_lens_read_undecodable_rows_total``)."""
    out = []
    for row in rows:
        head = _head(row, counts)
        if head is None:
            continue
        record = decode_wire({"seq": row[5], "codec": row[6], "body": row[7]})
        if record is None:
            counts.undecodable += 1
            continue
        peak = record.get("rss_peak_bytes")
        mib = peak / MIB if type(peak) is int and peak >= 0 else None
        out.append(
            Sample(
                *head,
                rss_peak_mib=mib,
                strategy=_strategy(row[8] if len(row) > 8 else None),
                guardrail_set=_strategy(row[9] if len(row) > 9 else None),
            )
        )
    return out


def _strategy(value: Any) -> str | None:
    return value[:MAX_KEY_CHARS] if type(value) is str and value else None


# -- judging one series ----------------------------------------------------------------------------------------------
class Outcome(NamedTuple):
    holds: bool | None  # None: fewer than min_samples requests that count
    value: float | None
    samples: int
    bound: float | None = None  # percentile conditions: the lower confidence bound compared with the threshold
    window_s: float | None = None  # the window judged (wider than the trigger's when it was widened)
    note: str | None = None  # how it was judged: a widened window, the burn-rate windows, why not judged


def quantile(values: Sequence[float], q: int) -> float:
    """The exact ``q``-th percentile (inclusive method, linear between order statistics), as the fleet page's."""
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    return statistics.quantiles(ordered, n=100, method="inclusive")[q - 1]


@functools.lru_cache(maxsize=8192)
def lower_bound_rank(n: int, q: float, confidence: float = CONFIDENCE) -> int:
    """The 1-based rank k of the order statistic x(k) of ``n`` values that is a lower ``confidence`` bound of the
    ``q``-quantile: the largest k with P(Binomial(n, q) ≥ k) ≥ confidence (x(k) ≤ the quantile unless fewer than
    k of the n values fall below it). 0 when even x(1) is not (n too small). Exact up to 1,000 values, the
    normal approximation (with continuity correction) beyond."""
    if n > 1000:
        z = statistics.NormalDist().inv_cdf(confidence)
        return max(0, min(n, math.floor(n * q - z * math.sqrt(n * q * (1 - q)) + 0.5)))
    log_q, log_p = math.log(q), math.log1p(-q)
    below = 0.0  # P(X ≤ k − 1)
    best = 0
    for k in range(1, n + 1):
        j = k - 1
        below += math.exp(
            math.lgamma(n + 1) - math.lgamma(j + 1) - math.lgamma(n - j + 1) + j * log_q + (n - j) * log_p
        )
        if 1.0 - below >= confidence - 1e-12:
            best = k
        else:
            break
    return best


def percentile_bound(values: Sequence[float], q: int) -> float | None:
    """The lower :data:`CONFIDENCE` bound of the ``q``-th percentile of the distribution ``values`` were drawn
    from (an order statistic, distribution-free); None when too few values give one."""
    k = lower_bound_rank(len(values), q / 100)
    return sorted(values)[k - 1] if k else None


def _widths(trigger: Trigger) -> list[float]:
    """The windows tried in turn: the trigger's, doubled until ``max_window`` (the last one exactly that)."""
    out = [trigger.window_s]
    while out[-1] < trigger.max_window_s:
        out.append(min(out[-1] * 2, trigger.max_window_s))
    return out


def _counted(trigger: Trigger) -> str:
    """What counts for ``min_samples``, in words."""
    c = trigger.condition
    metric = _METRIC_LABEL.get(trigger.metric or "", "")
    if c in ("p95_latency_above", "p99_latency_above", "mean_latency_above"):
        return f"successful requests with {metric}"
    if c == "tokens_per_second_below":
        return "successful requests with output tokens"
    if c == "energy_per_token_above":
        return "successful requests with energy"
    if c == "memory_above":
        return "requests with a peak RSS"
    if c in GUARDRAIL_CONDITIONS:
        return "successful guarded requests"
    return "requests"


def judge(
    trigger: Trigger, samples: Sequence[Sample], regression: float | None = None, now_us: int | None = None
) -> Outcome:
    """Whether ``trigger``'s condition holds over one series' requests (``samples``, in start order), the value it
    compared with the threshold and how many requests counted. ``regression``: the series' current regression
    change of ``trigger.metric`` (condition ``regression`` only).

    ``now_us``: the evaluation's time; ``samples`` then reach back over the trigger's widest window and the
    condition is judged over ``[now − window, now]``, widened (doubling, up to ``max_window``) while fewer than
    ``min_samples`` requests count. Without it, over all of ``samples``."""
    if trigger.condition in BURN_CONDITIONS:
        return _burn(trigger, samples, now_us)
    if now_us is None:
        return _judge_window(trigger, samples, regression)
    first: Outcome | None = None
    out = Outcome(None, None, 0)
    widths = _widths(trigger)
    for width in widths:
        since = now_us - int(width * 1e6)
        out = _judge_window(trigger, [s for s in samples if s.started_us >= since], regression)._replace(window_s=width)
        if first is None:
            first = out
        if out.holds is not None:
            break
    assert first is not None
    base = span(trigger.window_s)
    if out.holds is not None and out.window_s != trigger.window_s:
        return out._replace(note=f"judged over the last {span(out.window_s or 0)}: {base} held {first.samples}")
    if out.holds is None:
        counted = _counted(trigger)
        if len(widths) > 1:
            last = span(widths[-1])
            why = f"{out.samples} {counted} in the last {last}, widened from {base}; {trigger.min_samples} needed"
        else:
            why = f"{out.samples} {counted} in the last {base}; {trigger.min_samples} needed"
        return out._replace(note=why)
    return out


def _judge_window(trigger: Trigger, samples: Sequence[Sample], regression: float | None) -> Outcome:
    c, t = trigger.condition, trigger.threshold
    if c in ("p95_latency_above", "p99_latency_above", "mean_latency_above", "sla_violations"):
        column = _LATENCY_COLUMN[trigger.metric or "ttft"]
        values = [v for s in samples if s.ok and (v := getattr(s, column)) is not None]
        if c == "sla_violations":  # a failed request counts, as one that missed the SLA
            failed = sum(1 for s in samples if not s.ok)
            counted = len(values) + failed
            if counted < trigger.min_samples:
                return Outcome(None, None, counted)
            over = sum(1 for v in values if v > t) + failed
            return Outcome(over > (trigger.max_violations or 0), float(over), counted)
        if len(values) < trigger.min_samples:
            return Outcome(None, None, len(values))
        if c == "mean_latency_above":
            value = statistics.fmean(values)
            return Outcome(value > t, value, len(values))
        q = PERCENTILES[c]
        value = quantile(values, q)
        bound = percentile_bound(values, q)
        return Outcome(bound is not None and bound > t, value, len(values), bound)
    if c in GUARDRAIL_CONDITIONS:  # the served guarded requests (a blocked one is kind blocked: never read here)
        field = _GUARDRAIL_FIELD[c]
        values = [v for s in samples if s.ok and (v := getattr(s, field)) is not None]
        if len(values) < trigger.min_samples:
            return Outcome(None, None, len(values))
        value = quantile(values, 95)
        bound = percentile_bound(values, 95)
        return Outcome(bound is not None and bound > t, value, len(values), bound)
    if c == "tokens_per_second_below":
        rates = [s.tokens_per_second for s in samples if s.ok and s.tokens_per_second is not None]
        if len(rates) < trigger.min_samples:
            return Outcome(None, None, len(rates))
        value = statistics.median(rates)
        return Outcome(value < t, value, len(rates))
    if c == "energy_per_token_above":
        joules = [s.j_per_token for s in samples if s.ok and s.j_per_token is not None]
        if len(joules) < trigger.min_samples:
            return Outcome(None, None, len(joules))
        value = statistics.fmean(joules)
        return Outcome(value > t, value, len(joules))
    if c == "memory_above":
        peaks = [s.rss_peak_mib for s in samples if s.rss_peak_mib is not None]
        if len(peaks) < trigger.min_samples:
            return Outcome(None, None, len(peaks))
        value = max(peaks)
        return Outcome(value > t, value, len(peaks))
    n = len(samples)
    if n < trigger.min_samples:
        return Outcome(None, None, n)
    if c == "error_rate_above":
        value = sum(1 for s in samples if not s.ok) / n
        return Outcome(value > t, value, n)
    if c == "consecutive_failures":
        run = 0
        for s in reversed(samples):
            if s.ok:
                break
            run += 1
        return Outcome(run >= t, float(run), n)
    if c == "regression":
        if regression is None:
            return Outcome(False, None, n)
        return Outcome(abs(regression) >= t, regression, n)
    raise ValueError(f"unknown condition {c!r}")  # pragma: no cover - check_triggers admits none


def _bad(trigger: Trigger, sample: Sample) -> bool | None:
    """Whether a request spends the budget (None: it does not count: a successful one without the metric)."""
    if not sample.ok:
        return True
    if trigger.condition == "error_budget_burn":
        return False
    value = getattr(sample, _LATENCY_COLUMN[trigger.metric or "e2e"])
    return None if value is None else value > trigger.threshold


def _burn(trigger: Trigger, samples: Sequence[Sample], now_us: int | None) -> Outcome:
    """Multiwindow burn rates (SRE workbook): for each (long, short, factor), the share of bad requests over the
    long window and over the short one, each ÷ the budget (1 − objective); the pair holds when both are above
    factor. A long window with fewer than ``min_samples`` requests is not judged; a short one with fewer is the
    latest ``min_samples`` requests of its long window (at low request rates minutes hold none). Holds when any pair
    does; the value is the burn rate of the pair closest to (or furthest past) its factor."""
    budget = 1.0 - (trigger.objective or 0.0)
    counted = [(s.started_us, bad) for s in samples if (bad := _bad(trigger, s)) is not None]
    now = now_us if now_us is not None else (counted[-1][0] if counted else 0)
    holds: bool | None = None
    best: tuple[float, float, int, float] | None = None  # (burn ÷ factor, burn, requests, long window)
    parts = []
    for long_s, short_s, factor in trigger.windows:
        long = [bad for started, bad in counted if started >= now - int(long_s * 1e6)]
        if len(long) < trigger.min_samples:
            parts.append(f"{span(long_s)}: {len(long)} requests, {trigger.min_samples} needed")
            continue
        short = [bad for started, bad in counted if started >= now - int(short_s * 1e6)]
        short_said = span(short_s)
        if len(short) < trigger.min_samples:
            short, short_said = long[-trigger.min_samples :], f"latest {trigger.min_samples}"
        long_rate, short_rate = sum(long) / len(long) / budget, sum(short) / len(short) / budget
        pair = long_rate > factor and short_rate > factor
        holds = bool(holds) or pair
        burn = min(long_rate, short_rate)
        if best is None or burn / factor > best[0]:
            best = (burn / factor, burn, len(long), long_s)
        parts.append(
            f"{span(long_s)}: {sum(long)} of {len(long)} bad ({long_rate:.3g}×), {short_said}: "
            f"{sum(short)} of {len(short)} ({short_rate:.3g}×), above {factor:g}×: {'yes' if pair else 'no'}"
        )
    note = "; ".join(parts)
    if best is None:
        return Outcome(None, None, len(counted), window_s=trigger.widest_s, note=note)
    return Outcome(holds, best[1], best[2], window_s=best[3], note=note)


class Evaluation(NamedTuple):
    trigger: str
    series: Series
    outcome: Outcome


def current_regressions(found: Iterable[dict[str, Any]]) -> dict[tuple[str, str | None, str], float]:
    """(device, model, metric) → the worst current regression's change, from the regression Watch's ``found``
    (which keys by device × model × strategy: every strategy of a device × model counts)."""
    out: dict[tuple[str, str | None, str], float] = {}
    for f in found:
        if f.get("kind") != "regression":
            continue
        key = (f["device_id"], f["model_name"], f["metric"])
        if key not in out or abs(f["change"]) > abs(out[key]):
            out[key] = f["change"]
    return out


def in_scope(trigger: Trigger, sample: Sample, device_classes: Mapping[str, str | None]) -> bool:
    """Whether a request is one ``trigger`` judges: its model, strategy (none: ``local``) and its device's class
    (from the device's latest facts; a device without facts has no class and is outside a class scope)."""
    if trigger.models is not None and sample.model_name not in trigger.models:
        return False
    if trigger.strategies is not None and (sample.strategy or "local") not in trigger.strategies:
        return False
    if trigger.guardrail_sets is not None and sample.guardrail_set not in trigger.guardrail_sets:
        return False
    return trigger.device_classes is None or device_classes.get(sample.device_id) in trigger.device_classes


def evaluate(
    triggers: Sequence[Trigger],
    samples: Sequence[Sample],
    now_us: int,
    *,
    body_samples: Sequence[Sample] = (),
    regressions: Iterable[dict[str, Any]] = (),
    counts: RowCount | None = None,
    device_classes: Mapping[str, str | None] | None = None,
) -> list[Evaluation]:
    """Every trigger over every series of its scope with a request in its widest window (``[now − widest, now]``:
    ``max_window``, or the longest burn-rate window). ``body_samples``: the samples memory_above reads (with the
    peak RSS); ``regressions``: the regression Watch's ``found``; ``device_classes``: each device's class (from its
    latest facts), for triggers scoped by ``device_class``. A regression counts for the settings the device × model
    ran its latest request of the window under. At most :data:`MAX_SERIES_PER_DEVICE` series of a device are judged
    (those with the latest requests); the others are counted in ``counts.series_skipped`` (once per window)."""
    found = current_regressions(regressions)
    classes = device_classes or {}
    windows: dict[tuple[Any, ...], _Window] = {}  # triggers with the same source, window and scope share a grouping
    out = []
    for trigger in triggers:
        memory = trigger.condition == "memory_above"
        scope = (trigger.device_classes, trigger.models, trigger.strategies, trigger.guardrail_sets)
        key = (memory, trigger.widest_s, scope)
        if key not in windows:
            source = body_samples if memory else samples
            if scope != (None, None, None, None):
                source = [s for s in source if in_scope(trigger, s, classes)]
            windows[key] = _group(source, now_us - int(trigger.widest_s * 1e6), now_us)
            if counts is not None:
                counts.series_skipped += windows[key][2]
        groups, latest, _ = windows[key]
        for series, group in groups.items():
            change = None
            if trigger.condition == "regression" and latest[(series[0], series[1])] == series[2]:
                change = found.get((series[0], series[1], trigger.metric or ""))
            out.append(Evaluation(trigger.name, series, judge(trigger, group, change, now_us)))
    return out


# each series' requests in start order (series in order), each device × model's latest settings, series skipped
_Window = tuple[dict[Series, list[Sample]], dict[tuple[str, str | None], str | None], int]


def _group(source: Sequence[Sample], since_us: int, until_us: int) -> _Window:
    groups: dict[Series, list[Sample]] = {}
    for s in source:
        if since_us <= s.started_us <= until_us:
            groups.setdefault((s.device_id, s.model_name, s.settings), []).append(s)
    groups, skipped = bound_per_device(groups, MAX_SERIES_PER_DEVICE)
    ordered: dict[Series, list[Sample]] = {}
    latest: dict[tuple[str, str | None], tuple[int, str | None]] = {}
    for series in sorted(groups, key=_series_order):
        group = sorted(groups[series], key=lambda s: s.started_us)
        ordered[series] = group
        pair = (series[0], series[1])
        if pair not in latest or group[-1].started_us >= latest[pair][0]:
            latest[pair] = (group[-1].started_us, series[2])
    return ordered, {pair: settings for pair, (_, settings) in latest.items()}, skipped


def bound_per_device(groups: dict[Series, list[Sample]], limit: int) -> tuple[dict[Series, list[Sample]], int]:
    """(at most ``limit`` series per device — those whose latest request started last —, how many were left out)."""
    by_device: dict[str, list[Series]] = {}
    for series in groups:
        by_device.setdefault(series[0], []).append(series)
    skipped = 0
    for members in by_device.values():
        if len(members) > limit:
            members.sort(key=lambda s: max(x.started_us for x in groups[s]), reverse=True)
            for series in members[limit:]:
                del groups[series]
            skipped += len(members) - limit
    return groups, skipped


def _series_order(series: Series) -> tuple[str, str, str]:
    return (series[0], series[1] or "", series[2] or "")


# -- states, fires and what is kept ----------------------------------------------------------------------------------
FireKey = tuple[str, str, str | None, str | None]  # trigger, device, model, settings


def fire_key(trigger: str, series: Series) -> FireKey:
    return (trigger, series[0], series[1], series[2])


@dataclass(frozen=True)
class SeriesState:
    trigger: Trigger
    series: Series
    outcome: Outcome
    state: str  # firing | cooling_down | ok | insufficient_data
    last_fired_us: int | None
    cooldown_until_us: int | None
    evaluated_us: int

    def answer(self) -> dict[str, Any]:
        return {
            "trigger": self.trigger.name,
            "device_id": self.series[0],
            "model_name": self.series[1],
            "settings": self.series[2],
            "state": self.state,
            "holds": self.outcome.holds,
            "value": self.outcome.value,
            "threshold": self.trigger.max_violations
            if self.trigger.condition == "sla_violations"
            else self.trigger.threshold,
            "bound": self.outcome.bound,
            "samples": self.outcome.samples,
            "min_samples": self.trigger.min_samples,
            "window_s": self.trigger.window_s,
            "judged_window_s": self.outcome.window_s,
            "note": self.outcome.note,
            "severity": self.trigger.severity,
            "last_fired_at": iso(self.last_fired_us),
            "last_fired_us": self.last_fired_us,
            "cooldown_until": iso(self.cooldown_until_us),
            "cooldown_until_us": self.cooldown_until_us,
            "summary": summary(self.trigger, self.series, self.outcome, self.state, self.cooldown_until_us),
        }


def iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def _clock_time(us: int) -> str:
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def shown_value(trigger: Trigger, value: float | None) -> str:
    """The value as the threshold is written: "950 ms", "18.2 tok/s", "31 %", "1,536 MiB"."""
    if value is None:
        return "–"
    c = trigger.condition
    if c == "error_rate_above":
        return f"{value * 100:.0f} %"
    if c == "regression":
        return f"{value * 100:+.0f} %"
    if c in BURN_CONDITIONS:
        return f"burn rate {value:.3g}×"
    if c in ("consecutive_failures", "sla_violations"):
        return f"{int(value)}"
    number = f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return f"{number} {CONDITIONS[c].unit}"


def summary(trigger: Trigger, series: Series, outcome: Outcome, state: str, cooldown_until_us: int | None) -> str:
    """The line an operator reads: "slow-first-token: 950 ms (condition: p95 TTFT above 800 ms) on orin-017, model …,
    settings …; 42 requests in 15 min — cooling down until 2026-12-02 19:03 UTC". ``state``: a series' state, or
    ``fired`` (a fire in the history)."""
    device, model, settings = series
    where = f"on {device}, model {model or 'unnamed'}, settings {settings or 'unknown'}"
    if outcome.holds is None:
        what = f"insufficient data ({outcome.note or f'{outcome.samples} of {trigger.min_samples} requests'})"
        line = f"{trigger.name}: {what} {where}"
    else:
        value = shown_value(trigger, outcome.value)
        if outcome.bound is not None:
            value += f", lower 95 % bound {shown_value(trigger, outcome.bound)}"
        what = f"{value} (condition: {trigger.rule()})"
        judged = span(outcome.window_s or trigger.window_s)
        line = f"{trigger.name}: {what} {where}; {outcome.samples} requests in {judged}"
        if outcome.note:
            line += f" ({outcome.note})"
    if state == "cooling_down" and cooldown_until_us is not None:
        return f"{line} — cooling down until {_clock_time(cooldown_until_us)}"
    tail = {"firing": "firing", "fired": "fired", "ok": "ok"}.get(state)
    return f"{line} — {tail}" if tail else line


def decide(
    triggers: Mapping[str, Trigger], evaluations: Sequence[Evaluation], last_fired: Mapping[FireKey, int], now_us: int
) -> tuple[list[SeriesState], list[SeriesState]]:
    """(every series' state, the ones that fire now): a series whose condition holds fires unless its trigger
    fired on it less than ``cooldown`` ago; then it is cooling down until that fire + cooldown."""
    states, fires = [], []
    for ev in evaluations:
        trigger = triggers[ev.trigger]
        last = last_fired.get(fire_key(ev.trigger, ev.series))
        cooldown_us = int(trigger.cooldown_s * 1e6)
        if ev.outcome.holds is None:
            state = "insufficient_data"
        elif not ev.outcome.holds:
            state = "ok"
        elif last is None or now_us - last >= cooldown_us:
            state, last = "firing", now_us
        else:
            state = "cooling_down"
        until = last + cooldown_us if last is not None and now_us < last + cooldown_us else None
        item = SeriesState(trigger, ev.series, ev.outcome, state, last, until, now_us)
        states.append(item)
        if state == "firing":
            fires.append(item)
    return states, fires


def fire_record(item: SeriesState) -> dict[str, Any]:
    """A fire as kept in the store and shown in the history."""
    return {
        "trigger": item.trigger.name,
        "condition": item.trigger.condition,
        "metric": item.trigger.metric,
        "device_id": item.series[0],
        "model_name": item.series[1],
        "settings": item.series[2],
        "value": item.outcome.value,
        "threshold": item.trigger.threshold,
        "max_violations": item.trigger.max_violations,
        "samples": item.outcome.samples,
        "window_s": item.trigger.window_s,
        "judged_window_s": item.outcome.window_s,
        "severity": item.trigger.severity,
        "fired_us": item.evaluated_us,
        "fired_at": iso(item.evaluated_us),
        "summary": summary(item.trigger, item.series, item.outcome, "fired", None),
    }


@dataclass
class Kept:
    """What the store keeps under :data:`META_KEY`: each trigger × series' last fire and the latest fires."""

    last: dict[FireKey, int] = field(default_factory=dict)
    recent: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def parse(cls, raw: str | None) -> tuple[Kept, bool]:
        """(what was kept, readable). A value this version cannot read is kept as nothing (logged): the next fire
        replaces it."""
        if raw is None:
            return cls(), True
        try:
            doc = json.loads(raw)
            if type(doc) is not dict or doc.get("v") != 1:
                raise ValueError("not a version-1 map")
            last: dict[FireKey, int] = {}
            for entry in doc["last"]:
                trigger, device, model, settings, fired = entry
                if not all(type(x) is str for x in (trigger, device)) or type(fired) is not int:
                    raise ValueError(f"an entry of 'last' is {entry!r:.80}")
                if not (model is None or type(model) is str) or not (settings is None or type(settings) is str):
                    raise ValueError(f"an entry of 'last' is {entry!r:.80}")
                last[(trigger, device, model, settings)] = fired
            recent = [r for r in doc["recent"] if type(r) is dict and type(r.get("fired_us")) is int]
            return cls(last, recent[:HISTORY]), True
        except (ValueError, KeyError, TypeError) as exc:
            log.warning("triggers: the kept fires (%s) cannot be read (%s); starting from none", META_KEY, exc)
            return cls(), False

    def dump(self) -> str:
        last = [[*key, fired] for key, fired in sorted(self.last.items(), key=lambda kv: (kv[0][0], kv[1]))]
        return json.dumps({"v": 1, "last": last, "recent": self.recent[:HISTORY]}, separators=(",", ":"))

    def merged(self, other: Mapping[FireKey, int]) -> dict[FireKey, int]:
        out = dict(self.last)
        for key, fired in other.items():
            if fired > out.get(key, -1):
                out[key] = fired
        return out


def device_class(store: Store, device: str) -> str | None:
    """The device class of the device's facts taken last (None: it sent none, or one without a class)."""
    facts = latest_facts(store, device)
    return facts["device_class"] if facts else None


class Observation(NamedTuple):
    now_us: int
    evaluations: list[Evaluation]
    rows: RowCount
    truncated: bool
    truncated_devices: tuple[str, ...] = ()  # devices whose window held more than the per-device bounds


class Settled(NamedTuple):
    observation: Observation
    states: list[SeriesState]
    fires: list[SeriesState]
    last: dict[FireKey, int]
    recent: list[dict[str, Any]]


class TriggerWatch:
    """The triggers' state: each trigger × series' current state, its last fire and the latest fires.

    One evaluation is three steps, so that the store's reads run on a read thread, the fires are recorded by the
    writer and the state changes on the event loop: :meth:`observe` (reads the window, judges every series),
    :meth:`settle` (merges the fires the store keeps, decides, records the new fires by compare-and-swap) and
    :meth:`apply`. :meth:`evaluate` runs all three (the CLI, tests). ``clock``: Unix seconds (tests move it)."""

    def __init__(
        self,
        triggers: Sequence[Trigger],
        *,
        interval_s: float = 60.0,
        clock: Callable[[], float] = time.time,
        max_listed: int = 100,
    ) -> None:
        self.triggers = list(triggers)
        self.by_name = {t.name: t for t in self.triggers}
        self.interval_s = interval_s
        self.clock = clock
        self.max_listed = max_listed  # holding series kept per device for the fleet rows (server.max_read_series)
        self.states: list[SeriesState] = []
        self.last_fired: dict[FireKey, int] = {}
        self.recent: list[dict[str, Any]] = []
        self.evaluated_us: int | None = None
        self.rows = RowCount()
        self.truncated = False
        self.truncated_devices: tuple[str, ...] = ()
        self.failures = 0
        self.unreadable_kept = 0
        self._holding: dict[str, list[dict[str, Any]]] = {}

    @property
    def needs_regressions(self) -> bool:
        return any(t.condition == "regression" for t in self.triggers)

    def load(self, store: Store) -> None:
        """The kept fires (at start: the history and cooldowns show before the first evaluation)."""
        kept, readable = Kept.parse(store.get_meta(META_KEY))
        self.unreadable_kept += not readable
        self.last_fired, self.recent = kept.merged(self.last_fired), kept.recent

    def observe(self, store: Store, regressions: Iterable[dict[str, Any]] = ()) -> Observation:
        """Reads the longest window's records (blocking: on a read thread) and judges every trigger × series."""
        now_us = int(self.clock() * 1e6)
        if not self.triggers:
            return Observation(now_us, [], RowCount(), False)
        longest = max(t.widest_s for t in self.triggers)
        since_us = now_us - int(longest * 1e6)
        counts = RowCount()
        memory = [t for t in self.triggers if t.condition == "memory_above"]
        memory_since_us = now_us - int(max(t.widest_s for t in memory) * 1e6) if memory else None
        samples: list[Sample] = []
        bodies: list[Sample] = []
        cut: list[str] = []
        # one bounded read per device: a device that floods the window with requests has its own read cut to its
        # latest ones, and every other device is still read whole (one read of the whole window, bounded in total,
        # let a flood push every other device out: all clear while they failed)
        for known in store.devices():
            device_id = known["device_id"]
            # a device's requests started before it sent them (a clock a day ahead at most: ingest's bound)
            if (known.get("last_seen_us") or 0) < since_us - FUTURE_SLACK_US:
                continue
            query = Query(device=device_id, kind="inference", since_us=since_us, until_us=now_us + 1)
            rows = store.latest_columns(query, COLUMNS, MAX_WINDOW_ROWS, by_event=True)
            truncated = len(rows) >= MAX_WINDOW_ROWS
            samples.extend(samples_from_columns(rows, counts))
            if memory_since_us is not None:
                body_query = Query(device=device_id, kind="inference", since_us=memory_since_us, until_us=now_us + 1)
                body_rows = store.latest_columns(body_query, BODY_COLUMNS, MAX_BODY_ROWS, by_event=True)
                truncated = truncated or len(body_rows) >= MAX_BODY_ROWS
                bodies.extend(samples_from_bodies(body_rows, counts))
            if truncated:
                cut.append(device_id)
        classes: dict[str, str | None] = {}
        if any(t.device_classes is not None for t in self.triggers):
            for device in sorted({s.device_id for s in samples} | {s.device_id for s in bodies}):
                classes[device] = device_class(store, device)
        evaluations = evaluate(
            self.triggers,
            samples,
            now_us,
            body_samples=bodies,
            regressions=regressions,
            counts=counts,
            device_classes=classes,
        )
        return Observation(now_us, evaluations, counts, bool(cut), tuple(cut))

    def settle(self, store: Store, observation: Observation, *, record: bool = True) -> Settled:
        """Decides which series fire, against the fires the store keeps (another replica's too), and records the
        new ones by compare-and-swap (blocking: on the writer). ``record=False``: decides without recording
        (``lens-aggregator triggers``). Raises RuntimeError when the kept fires kept changing under it."""
        now_us = observation.now_us
        for _ in range(SETTLE_ATTEMPTS):
            raw = store.get_meta(META_KEY)
            kept, readable = Kept.parse(raw)
            self.unreadable_kept += not readable
            last = kept.merged(self.last_fired)
            states, fires = decide(self.by_name, observation.evaluations, last, now_us)
            recent = kept.recent if readable and raw is not None else self.recent
            if not fires or not record:
                return Settled(observation, states, fires, last, recent)
            for item in fires:
                last[fire_key(item.trigger.name, item.series)] = now_us
            recent = ([fire_record(item) for item in fires] + recent)[:HISTORY]
            # what no longer suppresses a fire goes: fires of triggers no longer configured, cooldowns that ended
            pruned = {
                key: fired
                for key, fired in last.items()
                if key[0] in self.by_name and fired + int(self.by_name[key[0]].cooldown_s * 1e6) > now_us
            }
            if len(pruned) > MAX_KEPT_FIRES:  # the newest fires: a flood of series must not grow the kept map
                pruned = dict(sorted(pruned.items(), key=lambda kv: kv[1], reverse=True)[:MAX_KEPT_FIRES])
            if store.swap_meta(META_KEY, raw, Kept(pruned, recent).dump()):
                return Settled(observation, states, fires, last, recent)
        raise RuntimeError(f"the kept fires ({META_KEY}) changed {SETTLE_ATTEMPTS} times during one evaluation")

    def apply(self, settled: Settled) -> None:
        """The new state (on the event loop; readers on other threads see the old or the new, never a mix)."""
        holding: dict[str, list[dict[str, Any]]] = {}
        for item in settled.states:
            if item.outcome.holds:
                listed = holding.setdefault(item.series[0], [])
                if len(listed) < self.max_listed:  # a fleet row stays bounded (GET /api/v1/triggers has them all)
                    listed.append(item.answer())
        self.states = settled.states
        self.last_fired = settled.last
        self.recent = settled.recent
        self.rows = settled.observation.rows
        self.truncated = settled.observation.truncated
        self.truncated_devices = settled.observation.truncated_devices
        self.evaluated_us = settled.observation.now_us
        self._holding = holding

    def evaluate(self, store: Store, regressions: Iterable[dict[str, Any]] = (), *, record: bool = True) -> Settled:
        settled = self.settle(store, self.observe(store, regressions), record=record)
        self.apply(settled)
        return settled

    def holding(self) -> list[SeriesState]:
        """The series whose condition holds now (firing or cooling down)."""
        return [s for s in self.states if s.outcome.holds]

    def by_device(self) -> dict[str, list[dict[str, Any]]]:
        """Each device's series whose condition holds, as ``GET /api/v1/triggers`` shows them: the fleet rows."""
        return self._holding

    def status(self, *, trigger: str | None = None, device: str | None = None) -> str:
        """``firing`` when a condition holds (firing or cooling down); else ``insufficient_data`` when a series could
        not be judged, or a trigger has no series at all in its window (nothing seen: not "all clear"); else
        ``ok`` (nothing evaluated yet: ``insufficient_data``). ``trigger``, ``device``: only those series."""
        if self.evaluated_us is None and self.triggers:
            return "insufficient_data"
        states = [
            s
            for s in self.states
            if (trigger is None or s.trigger.name == trigger) and (device is None or s.series[0] == device)
        ]
        if any(s.outcome.holds for s in states):
            return "firing"
        if any(s.state == "insufficient_data" for s in states):
            return "insufficient_data"
        # a trigger with no series at all (of this device, when one is asked for) saw nothing: not "all clear" — a
        # device that stopped sending, or a typo in ?device=, is not a healthy one
        # (of one device, a trigger scoped by class, model or strategy may simply not apply to it: only an unscoped
        # one is held to having seen the device)
        seen = {s.trigger.name for s in states}
        wanted = [
            t for t in self.triggers if (trigger is None or t.name == trigger) and (device is None or not t.scope())
        ]
        if any(t.name not in seen for t in wanted):
            return "insufficient_data"
        return "ok"

    def answer(
        self,
        *,
        max_series: int | None = None,
        device: str | None = None,
        trigger: str | None = None,
        deadline: Any = None,
    ) -> dict[str, Any]:
        """``GET /api/v1/triggers``: every trigger with its series' states (worst first), the series whose condition
        holds and the latest fires. ``max_series``: at most that many series per trigger and in ``holding``
        (``truncated`` counts the rest); ``device``, ``trigger``: only those series; ``deadline``: a
        ``reads.Deadline`` checked as the answer is built (it may run on a read thread: ``states`` is replaced
        whole by :meth:`apply`, never changed in place)."""
        states = self.states
        rank = {"firing": 0, "cooling_down": 1, "ok": 2, "insufficient_data": 3}
        check = deadline.every(5_000) if deadline is not None else (lambda: None)
        chosen = []
        for item in states:
            check()
            if (device is None or item.series[0] == device) and (trigger is None or item.trigger.name == trigger):
                chosen.append(item)
        # worst states first, critical before warning; then each device's first series before any device's second
        # (one device holding hundreds of series cannot fill the bounded lists and push another device's out)
        chosen.sort(key=lambda s: (rank[s.state], s.trigger.severity != "critical", s.series[0]))
        seen: dict[tuple[int, bool, str], int] = {}
        turns: dict[int, int] = {}
        for item in chosen:
            group = (rank[item.state], item.trigger.severity != "critical", item.series[0])
            seen[group] = seen.get(group, 0) + 1
            turns[id(item)] = seen[group]
        chosen.sort(key=lambda s: (rank[s.state], s.trigger.severity != "critical", turns[id(s)], s.series[0]))
        counts: dict[str, dict[str, int]] = {}
        for item in chosen:
            per = counts.setdefault(item.trigger.name, {})
            per[item.state] = per.get(item.state, 0) + 1
        status = self.status(trigger=trigger, device=device)
        limit = max_series if max_series is not None else len(chosen) + 1
        by_trigger: dict[str, list[dict[str, Any]]] = {t.name: [] for t in self.triggers}
        left_out: dict[str, int] = {}
        holding: list[dict[str, Any]] = []
        holding_left = 0
        for item in chosen:
            check()
            listed = by_trigger[item.trigger.name]
            if len(listed) < limit:
                listed.append(item.answer())
            else:
                left_out[item.trigger.name] = left_out.get(item.trigger.name, 0) + 1
            if item.outcome.holds:
                if len(holding) < limit:
                    holding.append(item.answer())
                else:
                    holding_left += 1
        truncated: dict[str, Any] = {}
        narrow = "?trigger=NAME and/or ?device=ID"
        for name, more in left_out.items():
            truncated.setdefault("series", {})[name] = truncation(
                more, f"series of {name} beyond {limit} (server.max_read_series), worst states first", narrow
            )
        if holding_left:
            truncated["holding"] = truncation(
                holding_left, f"series whose condition holds beyond {limit} (server.max_read_series)", narrow
            )
        answer = {
            "evaluated_at": iso(self.evaluated_us),
            "interval_s": self.interval_s,
            "status": status,
            "triggers": [
                {
                    "name": t.name,
                    "condition": t.condition,
                    "metric": t.metric,
                    "threshold": t.threshold,
                    "max_violations": t.max_violations,
                    "window_s": t.window_s,
                    "cooldown_s": t.cooldown_s,
                    "min_samples": t.min_samples,
                    "max_window_s": t.max_window_s,
                    "severity": t.severity,
                    "scope": t.scope(),
                    "objective": t.objective,
                    "windows": [list(w) for w in t.windows],
                    "description": t.describe(),
                    "series": by_trigger[t.name],
                    "counts": counts.get(t.name, {}),
                }
                for t in self.triggers
                if trigger is None or t.name == trigger
            ],
            "holding": holding,
            "fires": [
                f
                for f in self.recent
                if (device is None or f.get("device_id") == device) and (trigger is None or f.get("trigger") == trigger)
            ],
            "rows": {
                "read": self.rows.read,
                "limit": MAX_WINDOW_ROWS,
                "body_limit": MAX_BODY_ROWS,
                "per": "device",
                "truncated": self.truncated,
                "truncated_devices": list(self.truncated_devices[:MAX_NAMED_DEVICES]),
                "truncated_devices_more": max(0, len(self.truncated_devices) - MAX_NAMED_DEVICES),
                "skipped": self.rows.skipped,
                "unreadable_settings": self.rows.unreadable_settings,
                "undecodable_bodies": self.rows.undecodable,
                "series_skipped": self.rows.series_skipped,
                "series_per_device_limit": MAX_SERIES_PER_DEVICE,
            },
            "failures": self.failures,
        }
        if truncated:
            answer["truncated"] = truncated
        return answer
