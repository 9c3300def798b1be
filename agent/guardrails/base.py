"""What every guardrail shares: the stages, vocabularies, result types, the protocol a check follows, and the
``empty`` kind (a check that does nothing: the timing harness's own cost).

A kind is a module exposing ``OPTIONS`` (its own keys, each a :class:`lens_core.config.KeySpec`; a key whose default
raises :class:`lens_core.config.Invalid` is required), ``DEFAULT_STAGES`` and ``build(check, context)`` returning a
:class:`Guardrail`. ``build`` may load models and raises :class:`GuardrailError` when it cannot.
"""

from __future__ import annotations

import math
import unicodedata
from dataclasses import dataclass, field
from typing import Any, Protocol

from lens_core.config import KeySpec

# the vocabularies, shared with ingest and the exports
from lens_core.guardrail_view import RISK_LEVELS as RISK_LEVELS
from lens_core.guardrail_view import SEVERITIES as SEVERITIES
from lens_core.guardrail_view import STAGES as STAGES
from lens_core.guardrail_view import VIOLATION_TYPES as VIOLATION_TYPES

ACTIONS = ("block", "report")
NAME_PATTERN = r"[A-Za-z0-9._-]{1,64}"
MAX_DESCRIPTION = 200


def risk_level(risk_score: float) -> str:
    """The level of a risk score in [0, 1]: < 0.3 low, < 0.6 medium, < 0.85 high, else critical."""
    if risk_score < 0.3:
        return "low"
    if risk_score < 0.6:
        return "medium"
    if risk_score < 0.85:
        return "high"
    return "critical"


def severity_rank(severity: str) -> int:
    """``low`` 0 … ``critical`` 3."""
    return SEVERITIES.index(severity)


def clean_text(value: str, limit: int) -> str:
    """``value`` without control or format (Cf) characters, cut to ``limit`` characters (an ellipsis says so). Only
    the head of a long value is read: the cost is bounded by ``limit``, not by the value."""
    head = str.__getitem__(value, slice(0, 4 * limit + 1))  # str's own slicing, whatever a subclass defines
    kept = "".join(
        (" " if ch in "\t\n\r" else "") if unicodedata.category(ch) in ("Cc", "Cf", "Cs") else ch for ch in head
    )
    if len(kept) <= limit and str.__len__(value) == str.__len__(head):
        return kept
    return kept[: limit - 1] + "…"


def finite_unit(value: object) -> bool:
    """A real number (not a bool), finite, in [0, 1]."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and 0 <= value <= 1


@dataclass(frozen=True)
class Violation:
    type: str  # VIOLATION_TYPES
    severity: str  # SEVERITIES
    description: str  # ≤ 200 chars; never the matched secret itself ("card number ending 4242" at most)


@dataclass
class CheckResult:
    violations: list[Violation] = field(default_factory=list)
    risk_score: float = 0.0  # [0, 1]
    server_ms: float | None = None  # time the guardrail's server says it spent (HTTP), when it says so
    network_ms: float | None = None  # the rest of the HTTP round trip, when server_ms is known
    details: dict[str, Any] | None = None  # small, JSON-safe (e.g. {"p_unsafe": 0.93})


class GuardrailError(Exception):
    """A check that cannot answer (or cannot be built): its message names the check and what went wrong."""


class Guardrail(Protocol):
    name: str  # the check's name (unique within its set)
    kind: str  # rules | presidio | judge | http | plugin | empty
    stages: frozenset[str]  # the stages it runs in

    def validate_input(self, text: str) -> CheckResult: ...  # stage "input"

    def detect_threats(self, text: str) -> CheckResult: ...  # stage "threat"

    def filter_output(self, text: str) -> CheckResult: ...  # stage "output"

    def close(self) -> None: ...


STAGE_METHODS = {"input": "validate_input", "threat": "detect_threats", "output": "filter_output"}


@dataclass(frozen=True)
class CheckConfig:
    """One ``[[guardrails.checks]]`` entry, checked."""

    name: str
    kind: str
    stages: frozenset[str]
    action: str  # "block" | "report"
    options: dict[str, Any]  # the kind's own keys, parsed by its OPTIONS
    source: str  # the config file (for messages)
    where: str  # e.g. "guardrails[0].checks[1]"


@dataclass(frozen=True)
class BuildContext:
    n_threads: int  # threads a local model (the judge) may use by default: the engine's


# -- the `empty` kind: does nothing, at once; what is left is the harness's own cost --------------------------------
OPTIONS: dict[str, KeySpec] = {}
DEFAULT_STAGES: frozenset[str] = frozenset(STAGES)


@dataclass
class EmptyCheck:
    name: str
    stages: frozenset[str]
    kind: str = "empty"

    def validate_input(self, text: str) -> CheckResult:
        return CheckResult()

    def detect_threats(self, text: str) -> CheckResult:
        return CheckResult()

    def filter_output(self, text: str) -> CheckResult:
        return CheckResult()

    def close(self) -> None:
        return None


def build(check: CheckConfig, context: BuildContext) -> Guardrail:
    return EmptyCheck(name=check.name, stages=check.stages)
