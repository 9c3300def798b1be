"""A tune run on SmolLM2, before and after: what ``lens-agent tune`` finds from a naive configuration, what it costs,
and whether llama.cpp's own counters agree that the result is faster.

    .venv/bin/python bench/tune.py [--model PATH] [--rounds 3] [--requests 4] [--max-tokens 32]

1. **The tune.** ``lens-agent tune run`` (the real command, as a user runs it) on a configuration that runs
   SmolLM2 with one thread and flash attention off, trying threads 1 and 2, flash attention on and off and batch
   sizes 8 and 512, objective e2e. Printed: the winner, its confirmation stage (medians, Mann–Whitney p) and the
   tune's wall time.
2. **Before and after, measured apart.** The original and the winning settings loaded in turn (ABAB… in one run,
   8 blocks each), each block 4 requests of the same prompts for the same number of tokens; printed are the medians
   of the lens's e2e and of llama.cpp's own decode time per token (``llama_perf_context``), and their ratios
   after ÷ before. A tune that "found" a faster setting the engine's own clock does not confirm would show here.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bench.runner import BenchOptions, run_bench
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.engines.modelfile import resolve_model_path
from agent.prompts import load_prompts

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: the bundled SmolLM2)")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    parser.add_argument("--blocks", type=int, default=8, help="before/after blocks of each settings")
    args = parser.parse_args()
    model = resolve_model_path(args.model)
    prompts_file = ROOT / "configs" / "prompts" / "short-chat.jsonl"
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "agent.toml"
        config.write_text(
            f"""[agent]
data_dir = "{tmp}/data"
device_id = "bench-tune"
[model]
path = "{model}"
n_threads = 1
flash_attn = false
n_ctx = 1024
[probes]
power_source = "none"
idle_baseline = "0"
[tune]
n_threads = [1, 2]
flash_attn = [true, false]
n_batch = [8, 512]
prompts = "{prompts_file}"
rounds = {args.rounds}
requests = {args.requests}
max_tokens = {args.max_tokens}
"""
        )
        env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
        t0 = time.perf_counter()
        done = subprocess.run(
            [
                sys.executable,
                "-c",
                "from agent.cli import main; main()",
                "tune",
                "run",
                "--config",
                str(config),
                "--json",
            ],
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
        wall = time.perf_counter() - t0
    answer = json.loads(done.stdout)
    print(f"tune: {wall:.1f} s wall, {sum(len(s['candidates']) for s in answer['stages'])} candidate measurements")
    if answer.get("interference"):  # what else used the machine while the candidates were measured
        print(f"  {answer['interference']['summary']}")
    if answer.get("no_decision"):
        print(f"  no decision: {answer['no_decision']} (tune.allow_contended = true to decide anyway)")
    for stage in answer["stages"]:
        print(f"  {stage['stage']}: winner {stage['winner'] or '(none: the baseline stays)'}")
    confirm = answer["confirm"]
    if not answer["significant"] or confirm is None:
        print("no significant winner: nothing to compare")
        return
    print(
        f"  confirmation: e2e median {confirm['baseline_median']:.1f} → {confirm['candidate_median']:.1f} ms, "
        f"p = {confirm['p_value']:.2g} ({confirm['baseline_n']} + {confirm['candidate_n']} requests)"
    )
    before = EngineSettings(**answer["original"])
    after = EngineSettings(**answer["best"])
    print(f"  changes: {answer['changes']}")
    prompts = load_prompts(prompts_file)
    e2e: dict[str, list[float]] = {"before": [], "after": []}
    decode: dict[str, list[float]] = {"before": [], "after": []}
    for _ in range(args.blocks):
        for name, settings in (("before", before), ("after", after)):
            engine = LlamaEngine.load(model, settings, compute_sha256=False)
            try:
                run = run_bench(
                    engine,
                    prompts,
                    BenchOptions(runs=4, warmup=1, max_tokens=args.max_tokens, ignore_eos=True),
                    run_id="bench",
                    device_id="bench",
                )
            finally:
                engine.close()
            for m in run.measured:
                if m.ok and m.e2e_ms and m.engine_decode_tokens:
                    e2e[name].append(m.e2e_ms)
                    decode[name].append(m.engine_decode_ms / m.engine_decode_tokens)
    e2e_b, e2e_a = statistics.median(e2e["before"]), statistics.median(e2e["after"])
    dec_b, dec_a = statistics.median(decode["before"]), statistics.median(decode["after"])
    print(f"before/after, measured apart ({args.blocks} interleaved blocks of 4 requests each):")
    print(f"  lens e2e median:                 {e2e_b:8.1f} → {e2e_a:8.1f} ms   after ÷ before {e2e_a / e2e_b:.3f}")
    print(f"  llama.cpp decode ms/token:       {dec_b:8.3f} → {dec_a:8.3f}      after ÷ before {dec_a / dec_b:.3f}")


if __name__ == "__main__":
    main()
