"""The guardrail base types shared by every kind of check."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol

STAGES = ("input", "threat", "output")
SEVERITIES = ("low", "medium", "high", "critical")
VIOLATION_TYPES = (
    "prompt_injection",
    "pii_leakage",
    "secret_leakage",
    "toxic_content",
    "disallowed_topic",
    "jailbreak",
    "unsafe_content",
    "other",
)


@dataclass(frozen=True)
class Violation:
    type: str  # VIOLATION_TYPES
    severity: str  # SEVERITIES
    description: str  # ≤ 200 chars; never the matched secret itself


@dataclass
class CheckResult:
    violations: list[Violation] = field(default_factory=list)
    risk_score: float = 0.0  # [0, 1]
    server_ms: float | None = None  # time the guardrail's server says it spent (HTTP), when it says so
    network_ms: float | None = None  # the rest of the HTTP round trip, when server_ms is known
    details: dict[str, Any] | None = None  # small, JSON-safe (e.g. {"p_unsafe": 0.93})


class GuardrailError(Exception):
    """A check that cannot answer: its message names the check and what went wrong."""


class Guardrail(Protocol):
    name: str  # the check's name (unique within its set)
    kind: str  # rules | presidio | judge | http | plugin | empty
    stages: frozenset[str]  # the stages it runs in

    def validate_input(self, text: str) -> CheckResult: ...  # stage "input"

    def detect_threats(self, text: str) -> CheckResult: ...  # stage "threat"

    def filter_output(self, text: str) -> CheckResult: ...  # stage "output"

    def close(self) -> None: ...


@dataclass(frozen=True)
class CheckConfig:
    """One [[guardrails.checks]] entry, checked."""

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


def risk_level(risk: float) -> str:
    """The level of a risk score in [0, 1]: < 0.3 low, < 0.6 medium, < 0.85 high, else critical."""
    if risk < 0.3:
        return "low"
    if risk < 0.6:
        return "medium"
    if risk < 0.85:
        return "high"
    return "critical"
