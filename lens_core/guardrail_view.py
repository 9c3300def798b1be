"""A record's ``ext.guardrails`` read defensively, for the exports: ``/metrics`` (aggregator/metrics.py) and the
OTLP spans (lens_core/otlp.py).

Ingest checks every field of ``ext.guardrails`` (the wire contract, docs/wire-format.md); the exports do not rely on
it alone: a record stored before the check existed, or an agent's own outbox (agent/otlp_sync.py exports before any
aggregator saw the record), is read here within the same bounds. A value outside a vocabulary becomes ``"other"``
(a violation type, severity, outcome), a stage outside :data:`STAGES` is left out, a number outside its range is
None, and every list is cut to its bound (:data:`MAX_CHECKS` checks per stage, :data:`MAX_VIOLATIONS` violations):
what comes out is bounded whatever the device sent, so labels and span attributes built from it are too.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# the vocabularies and bounds of the guardrail interface (docs/wire-format.md "Guardrails"): ingest
# (lens_core/record_schema.py), the exports and the agent (agent/guardrails/base.py) read them from here
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
OUTCOMES = ("passed", "blocked", "error", "passed_with_errors")
RISK_LEVELS = SEVERITIES
OUTPUT_MODES = ("final", "stream")
OTHER = "other"
MAX_CHECKS = 16  # per stage
MAX_VIOLATIONS = 32
MAX_STRAY_CHECKS = 16  # stray_checks: checks still running a call past its time limit beside the inference
MAX_MS = 86_400_000.0  # one day
MAX_TEXT_CHARS = 300  # a violation's description, a stage's or check's error
NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


@dataclass(frozen=True)
class CheckView:
    name: str  # NAME, or "other"
    kind: str  # NAME, or "other"
    ms: float | None
    server_ms: float | None
    network_ms: float | None
    risk_score: float | None
    error: str | None


@dataclass(frozen=True)
class StageView:
    stage: str  # one of STAGES
    start_ms: float | None  # from the guarded request's start
    ms: float | None
    risk_score: float | None
    error: str | None
    checks: tuple[CheckView, ...]
    mode: str | None = None  # output only: final | stream
    chunks: int | None = None
    chunk_ms_p50: float | None = None
    chunk_ms_max: float | None = None


@dataclass(frozen=True)
class ViolationView:
    type: str  # VIOLATION_TYPES (anything else: "other")
    severity: str  # SEVERITIES, or "other"
    blocked: bool
    stage: str  # STAGES, or "other"
    check: str | None
    description: str | None


@dataclass(frozen=True)
class GuardrailView:
    set: str  # NAME, or "other"
    outcome: str  # OUTCOMES, or "other"
    blocked_at: str | None  # STAGES
    total_ms: float | None
    inference_ms: float | None
    inference_start_ms: float | None
    overhead_ms: float | None
    remainder_ms: float | None
    impact_percent: float | None
    risk_score: float | None
    risk_level: str | None
    stages: tuple[StageView, ...]  # in STAGES order, only those that ran
    violations: tuple[ViolationView, ...]
    stray_checks: int = 0  # checks still running past their time limit beside the inference (0–16)

    def stage(self, name: str) -> StageView | None:
        return next((s for s in self.stages if s.stage == name), None)


def _number(value: Any, high: float) -> float | None:
    if type(value) in (int, float) and math.isfinite(value) and 0 <= value <= high:
        return float(value)
    return None


def _ms(value: Any) -> float | None:
    return _number(value, MAX_MS)


def _name(value: Any) -> str:
    return value if type(value) is str and NAME.fullmatch(value) else OTHER


def _word(value: Any, vocabulary: tuple[str, ...]) -> str:
    return value if type(value) is str and value in vocabulary else OTHER


def _text(value: Any) -> str | None:
    if type(value) is not str:
        return None
    cleaned = "".join(c for c in value[: MAX_TEXT_CHARS * 2] if c.isprintable())
    return cleaned[:MAX_TEXT_CHARS]


def _checks(value: Any) -> tuple[CheckView, ...]:
    if type(value) is not list:
        return ()
    out = []
    for entry in value[:MAX_CHECKS]:
        if type(entry) is not dict:
            continue
        out.append(
            CheckView(
                name=_name(entry.get("name")),
                kind=_name(entry.get("kind")),
                ms=_ms(entry.get("ms")),
                server_ms=_ms(entry.get("server_ms")),
                network_ms=_ms(entry.get("network_ms")),
                risk_score=_number(entry.get("risk_score"), 1.0),
                error=_text(entry.get("error")),
            )
        )
    return tuple(out)


def _stage(name: str, value: dict[str, Any]) -> StageView:
    chunks = value.get("chunks")
    mode = value.get("mode")
    return StageView(
        stage=name,
        start_ms=_ms(value.get("start_ms")),
        ms=_ms(value.get("ms")),
        risk_score=_number(value.get("risk_score"), 1.0),
        error=_text(value.get("error")),
        checks=_checks(value.get("checks")),
        mode=mode if name == "output" and mode in OUTPUT_MODES else None,
        chunks=chunks if name == "output" and type(chunks) is int and 0 <= chunks <= 1_000_000 else None,
        chunk_ms_p50=_ms(value.get("chunk_ms_p50")) if name == "output" else None,
        chunk_ms_max=_ms(value.get("chunk_ms_max")) if name == "output" else None,
    )


def _violations(value: Any) -> tuple[ViolationView, ...]:
    if type(value) is not list:
        return ()
    out = []
    for entry in value[:MAX_VIOLATIONS]:
        if type(entry) is not dict:
            continue
        check = entry.get("check")
        out.append(
            ViolationView(
                type=_word(entry.get("type"), VIOLATION_TYPES),
                severity=_word(entry.get("severity"), SEVERITIES),
                blocked=entry.get("blocked") is True,
                stage=_word(entry.get("stage"), STAGES),
                check=_name(check) if check is not None else None,
                description=_text(entry.get("description")),
            )
        )
    return tuple(out)


def guardrail_view(record: Mapping[str, Any]) -> GuardrailView | None:
    """The record's ``ext.guardrails`` within the interface's bounds, or None when it has none (or it is not a
    map)."""
    ext = record.get("ext")
    guard = ext.get("guardrails") if type(ext) is dict else None
    if type(guard) is not dict:
        return None
    stages_value = guard.get("stages")
    stages_map = stages_value if type(stages_value) is dict else {}
    stages = tuple(_stage(name, stages_map[name]) for name in STAGES if type(stages_map.get(name)) is dict)
    blocked_at = guard.get("blocked_at")
    level = guard.get("risk_level")
    return GuardrailView(
        set=_name(guard.get("set")),
        outcome=_word(guard.get("outcome"), OUTCOMES),
        blocked_at=blocked_at if blocked_at in STAGES else None,
        total_ms=_ms(guard.get("total_ms")),
        inference_ms=_ms(guard.get("inference_ms")),
        inference_start_ms=_ms(guard.get("inference_start_ms")),
        overhead_ms=_ms(guard.get("overhead_ms")),
        remainder_ms=_ms(guard.get("remainder_ms")),
        impact_percent=_number(guard.get("impact_percent"), 100.0),
        risk_score=_number(guard.get("risk_score"), 1.0),
        risk_level=level if level in RISK_LEVELS else None,
        stages=stages,
        violations=_violations(guard.get("violations")),
        stray_checks=_stray(guard.get("stray_checks")),
    )


def _stray(value: Any) -> int:
    return value if type(value) is int and 0 <= value <= MAX_STRAY_CHECKS else 0
