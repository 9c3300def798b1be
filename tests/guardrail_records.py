"""Records with ``ext.guardrails`` as the agent's guardrail pipeline writes them (docs/wire-format.md "Guardrails"),
for the aggregator's tests: a guarded request that passed, one blocked at a stage (kind ``blocked``), one whose stage
failed (``guardrail_error``)."""

from __future__ import annotations

from typing import Any

STAGE_ORDER = ("input", "threat", "output")


def guardrails(
    set_name: str = "pii",
    *,
    input_ms: float | None = 0.4,
    threat_ms: float | None = 0.3,
    output_ms: float | None = 0.2,
    inference_ms: float | None = 800.0,
    outcome: str = "passed",
    blocked_at: str | None = None,
    error_stage: str | None = None,
    violations: list[dict[str, Any]] | None = None,
    risk_score: float = 0.0,
) -> dict[str, Any]:
    """A spec-valid ``ext.guardrails``: the stages given (None: the stage did not run), times that add up."""
    stages: dict[str, Any] = {}
    clock = 0.0
    start_inference = None
    for stage, ms in zip(STAGE_ORDER, (input_ms, threat_ms, output_ms), strict=True):
        if stage == "output" and inference_ms is not None:
            start_inference = clock
            clock += inference_ms
        if ms is None:
            continue
        error = f"check rules: raised ValueError at stage {stage}" if stage == error_stage else None
        entry: dict[str, Any] = {
            "start_ms": round(clock, 3),
            "ms": ms,
            "risk_score": risk_score,
            "error": error,
            "checks": [
                {"name": "rules", "kind": "rules", "ms": ms * 0.9, "server_ms": None, "network_ms": None,
                 "risk_score": risk_score, "error": error}
            ],
        }  # fmt: skip
        if stage == "output":
            entry.update({"mode": "stream", "chunks": 9, "chunk_ms_p50": ms / 12, "chunk_ms_max": ms / 4})
        stages[stage] = entry
        clock += ms
    overhead = sum(ms for ms in (input_ms, threat_ms, output_ms) if ms is not None)
    total = clock + 0.05
    return {
        "set": set_name,
        "outcome": outcome,
        "blocked_at": blocked_at,
        "total_ms": round(total, 3),
        "inference_ms": inference_ms,
        "inference_start_ms": start_inference if inference_ms is not None else None,
        "overhead_ms": round(overhead, 6),
        "remainder_ms": 0.05,
        "impact_percent": 100 * overhead / total,
        "risk_score": risk_score,
        "risk_level": "low" if risk_score < 0.3 else "critical",
        "stages": stages,
        "violations": violations or [],
    }


def guard(record: dict[str, Any], set_name: str = "pii", **kw: Any) -> dict[str, Any]:
    """``record`` (a synthetic record, as dict) guarded by ``set_name``: ``ext.guardrails`` added."""
    record["ext"] = {**(record.get("ext") or {}), "guardrails": guardrails(set_name, **kw)}
    return record


def block(record: dict[str, Any], set_name: str = "pii", stage: str = "input") -> dict[str, Any]:
    """``record`` as a request blocked at ``stage``: kind ``blocked``, ok, no error; the inference's times only when
    the block came at output (its output withheld)."""
    violation = {"type": "pii_leakage", "severity": "high", "blocked": True, "stage": stage, "check": "rules",
                 "description": "card number ending 4242"}  # fmt: skip
    ran = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
    times = {f"{s}_ms": (0.5 if s in ran else None) for s in STAGE_ORDER}
    guard(record, set_name, **times, inference_ms=800.0 if stage == "output" else None, outcome="blocked",
          blocked_at=stage, violations=[violation], risk_score=0.95)  # fmt: skip
    record.update(kind="blocked", ok=True, error_type=None, error_message=None)
    if stage != "output":
        for key in ("ttft_ms", "tpot_ms", "e2e_ms", "prefill_ms", "decode_ms", "engine_prefill_ms", "engine_decode_ms"):
            record[key] = None
        record.update(output_tokens=0, itl_ms=[], stop_reason=None)
    return record


def fail(record: dict[str, Any], set_name: str = "pii", stage: str = "threat") -> dict[str, Any]:
    """``record`` as a request whose ``stage`` failed (on_error = "error"): not served, ``guardrail_error``."""
    ran = STAGE_ORDER[: STAGE_ORDER.index(stage) + 1]
    times = {f"{s}_ms": (0.5 if s in ran else None) for s in STAGE_ORDER}
    guard(record, set_name, **times, inference_ms=None if stage != "output" else 800.0, outcome="error",
          error_stage=stage)  # fmt: skip
    record.update(ok=False, error_type="guardrail_error", error_message=f"guardrail stage {stage}: check rules failed")
    for key in ("ttft_ms", "tpot_ms", "e2e_ms", "prefill_ms", "decode_ms", "engine_prefill_ms", "engine_decode_ms"):
        record[key] = None
    record.update(output_tokens=0, itl_ms=[], stop_reason=None)
    return record
