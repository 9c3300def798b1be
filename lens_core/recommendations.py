"""Recommendations as they travel from the aggregator to a device: in the ``recommendations`` field of the ingest
acknowledgement (docs/feedback.md).

The aggregator derives each one from stored measurements (``aggregator.feedback``) and sends a device only its own,
only for settings the agent can change itself (a key of :data:`lens_core.settings.CONFIG_KEYS`). The device takes
the field as hostile input — an answer may come from a proxy, a buggy or a compromised aggregator — and
:func:`parse_wire` keeps only well-formed items: at most :data:`MAX_ITEMS`, exact types, bounded strings, a target
the agent knows and a value of the type that setting takes, within the range the agent's own configuration allows
for it (:data:`lens_core.settings.BOUNDS`). A recommendation is advice, never a command: a reason to measure on the
device, in a child process, after the device's own checks of its capabilities (``agent.advice``); never a change
applied blind.
"""

from __future__ import annotations

import dataclasses
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from .settings import BOUNDS, CONFIG_KEYS, FIELDS

MAX_ITEMS = 8  # recommendations per answer: one per setting the agent can change, and then some
MAX_MODEL_CHARS = 256  # lens_core.record_schema.MAX_NAME_CHARS
MAX_EVIDENCE_CHARS = 400
MAX_IMPROVEMENT = 100.0  # relative: tokens per second ×101 is beyond any setting
MAX_PROBLEMS_VALUE_CHARS = 60  # how much of a refused value a problem line quotes

# "section.key" → the setting (lens_core.settings.FIELDS name) it holds
TARGETS: dict[str, str] = {f"{section}.{key}": name for name, (section, key) in CONFIG_KEYS.items()}
_METRIC_RE = re.compile(r"^[a-z][a-z0-9_]{0,39}$")
_TEXT_VALUE_RE = re.compile(r"^[A-Za-z0-9_.+-]{1,40}$")  # lens_core.settings: a text setting's value
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f]")

Value = int | bool | str


@dataclass(frozen=True)
class Recommendation:
    """One setting to try on a device, with the evidence for it (``aggregator.feedback`` makes them)."""

    recommendation_id: str  # a UUID, the same for the same advice (device, model, target, value)
    model_name: str
    target: str  # a configuration key "section.key" of lens_core.settings.CONFIG_KEYS, e.g. "model.n_threads"
    current_value: Value
    recommended_value: Value
    improvement: float  # relative, in the metric's good direction: 0.18 = 18 % better
    confidence: float  # 0 … 1 (docs/feedback.md: how it is computed)
    metric: str  # what was compared: "tpot_ms", "ttft_ms", "tokens_per_second"
    evidence: str  # a short rationale: devices, requests, medians, p-value

    @property
    def setting(self) -> str:
        """The lens_core.settings name of the target (``n_threads`` for ``model.n_threads``)."""
        return TARGETS[self.target]


def to_wire(items: Sequence[Recommendation]) -> list[dict[str, Any]]:
    """The acknowledgement's ``recommendations`` field: JSON objects, at most :data:`MAX_ITEMS`."""
    return [dataclasses.asdict(item) for item in items[:MAX_ITEMS]]


def _quote(value: object) -> str:
    """A refused value as a problem line shows it: bounded, whatever it is."""
    if isinstance(value, (dict, list)):
        return f"a {type(value).__name__} of {len(value)} items"
    if isinstance(value, str):
        value = value[:MAX_PROBLEMS_VALUE_CHARS]  # never the repr of a megabyte
    try:
        text = repr(value)
    except ValueError:  # an integer beyond Python's conversion limit
        return f"an {type(value).__name__} too large to show"
    return text if len(text) <= MAX_PROBLEMS_VALUE_CHARS else text[: MAX_PROBLEMS_VALUE_CHARS - 1] + "…"


def _text(item: dict[str, Any], name: str, limit: int) -> str:
    value = item.get(name)
    if type(value) is not str:
        raise ValueError(f"{name} is {_quote(value)}, not a string")
    if not value or len(value) > limit:
        raise ValueError(f"{name} has {len(value)} characters; 1 to {limit} are allowed")
    if _CONTROL_RE.search(value):
        raise ValueError(f"{name} contains control characters")
    return value


def _number(item: dict[str, Any], name: str, low: float, high: float, *, low_open: bool = False) -> float:
    value = item.get(name)
    if type(value) not in (int, float) or not isinstance(value, (int, float)):  # bool is not a number here
        raise ValueError(f"{name} is {_quote(value)}, not a number")
    number = float(value)
    if not math.isfinite(number) or number > high or number < low or (low_open and number == low):
        bounds = f"{'above' if low_open else 'at least'} {low:g} and at most {high:g}"
        raise ValueError(f"{name} = {_quote(value)} is out of range: expected {bounds}")
    return number


def _setting_value(name: str, field: str, value: object) -> Value:
    """A value of the type the setting ``name`` takes (lens_core.settings.FIELDS), within its bounds."""
    kind = FIELDS[name]
    if type(value) is not kind:
        raise ValueError(f"{field} is {_quote(value)}: {name} takes {kind.__name__} values")
    if kind is int:
        assert isinstance(value, int)
        low, high = BOUNDS[name]  # the agent's own configuration bounds: nothing it would refuse passes here
        if not low <= value <= high:
            raise ValueError(f"{field} = {_quote(value)} is out of range for {name} ({low} … {high})")
    if kind is str:
        assert isinstance(value, str)
        if not _TEXT_VALUE_RE.match(value):
            raise ValueError(f"{field} is {_quote(value)}: 1-40 letters, digits or _.+- expected")
    assert isinstance(value, (int, bool, str))
    return value


def _parse_item(item: object) -> Recommendation:
    if type(item) is not dict:
        raise ValueError(f"is {_quote(item)}, not an object")
    raw_id = _text(item, "recommendation_id", 36)
    try:
        parsed = uuid.UUID(raw_id)
    except ValueError:
        raise ValueError(f"recommendation_id {_quote(raw_id)} is not a UUID") from None
    if str(parsed) != raw_id:
        raise ValueError(f"recommendation_id {_quote(raw_id)} is not a UUID in its canonical lower-case form")
    model_name = _text(item, "model_name", MAX_MODEL_CHARS)
    target = item.get("target")
    if type(target) is not str or target not in TARGETS:
        raise ValueError(f"target {_quote(target)} is not a setting the agent changes ({', '.join(TARGETS)})")
    name = TARGETS[target]
    current = _setting_value(name, "current_value", item.get("current_value"))
    recommended = _setting_value(name, "recommended_value", item.get("recommended_value"))
    if current == recommended:
        raise ValueError(f"recommends {target} = {_quote(recommended)}, the current value")
    metric = item.get("metric")
    if type(metric) is not str or not _METRIC_RE.match(metric):
        raise ValueError(f"metric {_quote(metric)} is not a metric name (lower-case letters, digits, _)")
    return Recommendation(
        recommendation_id=raw_id,
        model_name=model_name,
        target=target,
        current_value=current,
        recommended_value=recommended,
        improvement=_number(item, "improvement", 0.0, MAX_IMPROVEMENT, low_open=True),
        confidence=_number(item, "confidence", 0.0, 1.0),
        metric=metric,
        evidence=_text(item, "evidence", MAX_EVIDENCE_CHARS),
    )


def parse_wire(value: object) -> tuple[list[Recommendation], list[str]]:
    """The well-formed recommendations of an acknowledgement's ``recommendations`` field, and a problem line for
    each item refused (the first :data:`MAX_ITEMS` items are looked at; one line says how many more were refused).
    Never raises: the field is whatever the answer held."""
    if value is None:
        return [], []
    if type(value) is not list:
        return [], [f"recommendations is {_quote(value)}, not a list: ignored"]
    found: list[Recommendation] = []
    problems: list[str] = []
    seen: set[str] = set()
    for index, item in enumerate(value[:MAX_ITEMS]):
        try:
            rec = _parse_item(item)
        except (ValueError, TypeError, AttributeError, OverflowError, RecursionError) as exc:
            problems.append(f"recommendation {index} refused: {exc}")
            continue
        if rec.recommendation_id in seen:
            problems.append(f"recommendation {index} refused: recommendation_id {rec.recommendation_id} repeats")
            continue
        seen.add(rec.recommendation_id)
        found.append(rec)
    if len(value) > MAX_ITEMS:
        problems.append(
            f"recommendations {MAX_ITEMS}…{len(value) - 1} refused: at most {MAX_ITEMS} are read from one answer"
        )
    return found, problems
