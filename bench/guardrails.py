"""What guardrails cost on this device, next to the inference they guard. Prints ratios measured in one run.

    .venv/bin/python bench/guardrails.py [--runs 10] [--max-tokens 64] [--threads N] [--no-gemma] [--json]

Every configuration guards the same requests on the bundled SmolLM2 (the model being measured), one after another
in one process: no guardrails (the baseline), an ``empty`` check at all three stages (the timing harness' own cost
per stage), the built-in ``rules`` at input and output, Presidio at input and output, and the GGUF judge at the
threat stage on SmolLM2 and on Gemma 3 270M (bench/guardrail_models.py installs it outside .venv; --no-gemma skips
it). For each, per stage: p50 ms and the stage's time as a share of the inference it guards (stage ms ÷ inference
ms of the same request, median over requests), and the share of the whole request spent in guardrails
(impact_percent, p50/p95).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bench.runner import BenchOptions, run_bench
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.engines.modelfile import bundled_model_path
from agent.guardrails.base import BuildContext, CheckConfig
from agent.guardrails.pipeline import GuardedStrategy, GuardrailSet, SetConfig
from agent.measurement import Measurement
from agent.prompts import builtin_prompts
from agent.strategies import LocalStrategy

STAGES = ("input", "threat", "output")


def check(kind: str, stages: tuple[str, ...], **options: Any) -> CheckConfig:
    return CheckConfig(
        name=kind,
        kind=kind,
        stages=frozenset(stages),
        action="report",  # measure every stage of every request: nothing blocks
        options=options,
        source="bench/guardrails.py",
        where=kind,
    )


def guard_set(name: str, *checks: CheckConfig) -> SetConfig:
    return SetConfig(
        name=name,
        block_at="critical",
        on_error="error",
        time_limit_s=60.0,
        output_mode="final",
        stream_chunk=64,
        checks=tuple(checks),
    )


def _p(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def summarize(name: str, records: list[Measurement]) -> dict[str, Any]:
    guarded = [m for m in records if m.ok and isinstance(m.ext.get("guardrails"), dict)]
    out: dict[str, Any] = {"set": name, "requests": len(records), "errors": sum(not m.ok for m in records)}
    inference = [m.ext["guardrails"]["inference_ms"] for m in guarded if m.ext["guardrails"].get("inference_ms")]
    if not guarded:
        e2e = [m.e2e_ms for m in records if m.ok and m.e2e_ms]
        out["inference_ms_p50"] = _p([float(v) for v in e2e], 0.5)
        return out
    out["inference_ms_p50"] = _p(inference, 0.5)
    for stage in STAGES:
        ms, share = [], []
        for m in guarded:
            g = m.ext["guardrails"]
            s = g["stages"].get(stage)
            if s is None or not g.get("inference_ms"):
                continue
            ms.append(s["ms"])
            share.append(s["ms"] / g["inference_ms"])
        if ms:
            out[stage] = {"ms_p50": _p(ms, 0.5), "ms_p95": _p(ms, 0.95), "share_of_inference_p50": _p(share, 0.5)}
    impact = [
        m.ext["guardrails"]["impact_percent"] for m in guarded if m.ext["guardrails"]["impact_percent"] is not None
    ]
    out["impact_percent_p50"] = _p(impact, 0.5)
    out["impact_percent_p95"] = _p(impact, 0.95)
    out["remainder_ms_p50"] = _p([m.ext["guardrails"]["remainder_ms"] for m in guarded], 0.5)
    return out


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def _cell(ms: float | None, share: float | None) -> str:
    return f"{_fmt(ms, '.3f')} ms ({_fmt(None if share is None else 100 * share, '.2f')} %)"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-gemma", action="store_true", help="skip the judge on Gemma 3 270M")
    ap.add_argument("--json", action="store_true", help="one JSON document instead of the table")
    args = ap.parse_args()

    smollm2 = bundled_model_path()
    configurations: list[tuple[str, SetConfig | None]] = [
        ("none", None),
        ("empty", guard_set("empty", check("empty", STAGES))),
        ("rules", guard_set("rules", check("rules", ("input", "output")))),
        ("presidio", guard_set("presidio", check("presidio", ("input", "output")))),
        ("judge-smollm2", guard_set("judge-smollm2", check("judge", ("threat",), model=str(smollm2)))),
    ]
    if not args.no_gemma:
        from bench.guardrail_models import gemma3_path

        gemma = gemma3_path()
        configurations.append(
            ("judge-gemma3-270m", guard_set("judge-gemma3-270m", check("judge", ("threat",), model=str(gemma))))
        )

    settings = EngineSettings(n_ctx=2048, n_threads=args.threads)
    options = BenchOptions(runs=args.runs, warmup=1, max_tokens=args.max_tokens, ignore_eos=True, include_text=False)
    results = []
    with LlamaEngine.load(smollm2, settings) as engine:
        for name, config in configurations:
            print(f"{name} …", file=sys.stderr, flush=True)
            strategy: Any = LocalStrategy(engine, options)
            gset = None
            if config is not None:
                gset = GuardrailSet.build(config, BuildContext(n_threads=args.threads))
                strategy = GuardedStrategy(strategy, gset)
            try:
                run = run_bench(
                    engine, builtin_prompts(), options, run_id=f"guard-{name}", device_id="bench", strategy=strategy
                )
            finally:
                if gset is not None:
                    gset.close()
            results.append(summarize(name, run.measured))
    if args.json:
        print(
            json.dumps(
                {"runs": args.runs, "max_tokens": args.max_tokens, "threads": args.threads, "results": results},
                indent=1,
            )
        )
        return 0
    print(f"SmolLM2 guarded, {args.runs} requests × {args.max_tokens} tokens, {args.threads} threads")
    print(
        f"{'set':<20} {'inference p50':>13} "
        + " ".join(f"{s + ' p50 (share)':>22}" for s in STAGES)
        + f" {'impact p50/p95':>15}"
    )
    for r in results:
        cells = []
        for stage in STAGES:
            s = r.get(stage)
            cells.append(f"{'—':>22}" if s is None else f"{_cell(s['ms_p50'], s['share_of_inference_p50']):>22}")
        impact = f"{_fmt(r.get('impact_percent_p50'), '.2f')}/{_fmt(r.get('impact_percent_p95'), '.2f')} %"
        print(f"{r['set']:<20} {_fmt(r['inference_ms_p50'], '.0f') + ' ms':>13} " + " ".join(cells) + f" {impact:>15}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
