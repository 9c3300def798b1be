"""Records carrying ``ext.guardrails`` as the guardrail interface writes them (the wire contract, docs/wire-format.md),
made by hand for the export tests: a passed request, one blocked at a stage, one whose stage errored, and a hostile
one at every bound (32 violations, 16 checks per stage, names at 64 characters). ``guard`` takes an agent record
(``*_ms`` figures, as agent/synthetic.py makes them) or its wire map (``*_us``)."""

from __future__ import annotations

import copy
from typing import Any

STAGE_ORDER = ("input", "threat", "output")


def _check(name: str, kind: str, ms: float, **extra: Any) -> dict[str, Any]:
    base = {"name": name, "kind": kind, "ms": ms, "server_ms": None, "network_ms": None, "risk_score": 0.0}
    return base | {"error": None} | extra


def guardrails(
    set_name: str = "pii",
    *,
    input_ms: float = 4.0,
    threat_ms: float = 6.0,
    inference_ms: float | None = 500.0,
    output_ms: float | None = 3.0,
    blocked_at: str | None = None,
    error_at: str | None = None,
    violations: list[dict[str, Any]] | None = None,
) -> dict[str, Any]:
    """``ext.guardrails`` of a request whose stages ran back to back around an inference of ``inference_ms``
    (1 ms of bookkeeping between each). ``blocked_at``: the stage that blocked (the stages after it, and the
    inference before the output stage, did not run); ``error_at``: a stage whose check raised (on_error = pass)."""
    stages: dict[str, Any] = {}
    at = 0.0
    inference_start = None
    ran_inference = None
    for stage, ms in (("input", input_ms), ("threat", threat_ms), ("output", output_ms)):
        if stage == "output":
            if blocked_at in ("input", "threat") or inference_ms is None:
                break
            inference_start, ran_inference = at, inference_ms
            at += inference_ms + 1.0
            if ms is None:
                break
        error = f"check rules raised ValueError at {stage}" if stage == error_at else None
        stages[stage] = {
            "start_ms": at,
            "ms": ms,
            "risk_score": 0.9 if stage == blocked_at else 0.0,
            "error": error,
            "checks": [_check("rules", "rules", ms * 0.9, error=error)],
        }
        if stage == "output":
            stages[stage] |= {"mode": "stream", "chunks": 3, "chunk_ms_p50": 0.5, "chunk_ms_max": 1.5}
        at += ms + 1.0
        if stage == blocked_at:
            break
    total = at - 1.0
    overhead = sum(s["ms"] for s in stages.values())
    if violations is None:
        violations = []
        if blocked_at is not None:
            violations = [
                {
                    "type": "pii_leakage",
                    "severity": "high",
                    "blocked": True,
                    "stage": blocked_at,
                    "check": "rules",
                    "description": "card number ending 4242",
                }
            ]
    outcome = "blocked" if blocked_at else ("passed_with_errors" if error_at else "passed")
    return {
        "set": set_name,
        "outcome": outcome,
        "blocked_at": blocked_at,
        "total_ms": total,
        "inference_ms": ran_inference,
        "inference_start_ms": inference_start,
        "overhead_ms": overhead,
        "remainder_ms": max(0.0, total - overhead - (ran_inference or 0.0)),
        "impact_percent": overhead / total * 100 if total else None,
        "risk_score": 0.9 if blocked_at else 0.0,
        "risk_level": "critical" if blocked_at else "low",
        "stages": stages,
        "violations": violations,
    }


def guard(record: dict[str, Any], **kw: Any) -> dict[str, Any]:
    """A copy of a wire record (``started_us``, ``e2e_us``, …) guarded: ``ext.guardrails`` added, and for a block
    before the inference kind ``blocked`` with the inference's figures gone (a block at output keeps them)."""
    out = copy.deepcopy(record)
    if "inference_ms" not in kw and type(record.get("e2e_us")) is int:
        kw["inference_ms"] = record["e2e_us"] / 1000  # the inference's wall time: its own e2e
    elif "inference_ms" not in kw and type(record.get("e2e_ms")) is float:
        kw["inference_ms"] = record["e2e_ms"]
    ext = guardrails(**kw)
    out["ext"] = {**(out.get("ext") or {}), "guardrails": ext}
    if ext["outcome"] == "blocked":
        out.update(kind="blocked", ok=True, error_type=None, error_message=None, output_text=None)
        if ext["blocked_at"] in ("input", "threat"):
            for name in INFERENCE_FIGURES:
                if name in out:
                    out[name] = None
            out["output_tokens"] = 0
            if "itl_ms" in out:
                out["itl_ms"] = []
    return out


INFERENCE_FIGURES = (
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "prefill_us",
    "decode_us",
    "itl_us",
    "stop_reason",
    "engine_prefill_us",
    "engine_prefill_tokens",
    "engine_decode_us",
    "engine_decode_tokens",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
    "prefill_ms",
    "decode_ms",
    "engine_prefill_ms",
    "engine_decode_ms",
)  # fmt: skip (the wire map's names, then the agent's record's)


def hostile_guardrails(set_name: str = "x" * 64) -> dict[str, Any]:
    """Every list at its bound and every name at its longest: 16 checks per stage, 32 violations."""
    ext = guardrails(set_name, blocked_at=None)
    for stage in ext["stages"].values():
        stage["checks"] = [_check(f"check-{i:02d}-" + "c" * 55, "k" * 64, 0.1, server_ms=0.05) for i in range(16)]
    kinds = ("prompt_injection", "pii_leakage", "secret_leakage", "toxic_content")
    ext["violations"] = [
        {
            "type": kinds[i % 4],
            "severity": ("low", "medium")[i % 2],
            "blocked": False,
            "stage": STAGE_ORDER[i % 3],
            "check": "rules",
            "description": "d" * 300,
        }
        for i in range(32)
    ]
    return ext
