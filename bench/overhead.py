"""How much does the lens distort what it measures? Prints ratios measured in one run on the bundled SmolLM2.

    .venv/bin/python bench/overhead.py [--runs 20] [--max-tokens 128] [--threads N]

For each path, the overhead ratio is llama.cpp's own decode time per token (t_eval_ms / n_eval) divided by the
wall-clock TPOT that path observes, pooled over requests (1.0 = no distortion):

* lens loop: ``lens-agent bench``'s low-level llama_decode loop;
* create_completion(stream=True): llama-cpp-python's high-level streaming API, stamped per token through a
  stopping_criteria callback (what ``agent.api.measured_completion`` sees).

It also compares engine settings by llama.cpp's own decode rate, which is what moves with them.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.api import measured_completion
from agent.bench.report import overhead_ratio
from agent.bench.runner import BenchOptions, run_bench
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.engines.modelfile import bundled_model_path
from agent.probes.power import detect_power
from agent.probes.sampler import PowerSampler
from agent.probes.sysfs import Root
from agent.prompts import builtin_prompts
from tests.sysfs_trees import orin_jp6


def lens_loop(
    engine: LlamaEngine, runs: int, max_tokens: int, sampler: PowerSampler | None = None
) -> tuple[float, float]:
    options = BenchOptions(runs=runs, warmup=2, max_tokens=max_tokens, ignore_eos=True, include_text=False)
    if sampler is not None:
        sampler.start()
    try:
        run = run_bench(engine, builtin_prompts(), options, run_id="overhead", device_id="bench", sampler=sampler)
    finally:
        if sampler is not None:
            sampler.stop()
    ok = [m for m in run.measured if m.ok]
    ratio = overhead_ratio(ok)
    assert ratio is not None
    engine_ms = sum(m.engine_decode_ms or 0 for m in ok) / sum(m.engine_decode_tokens or 0 for m in ok)
    return ratio, 1000.0 / engine_ms


def streaming_api(engine: LlamaEngine, runs: int, max_tokens: int) -> float:
    import llama_cpp

    llm = engine.llm
    eos_bias = {llm.token_eos(): -100.0}
    ratios_num = ratios_den = lens_ms = lens_gaps = 0.0
    prompts = builtin_prompts()
    for i in range(runs + 2):
        prompt = engine.chat_prompt(prompts[i % len(prompts)].text) or ""
        llm.reset()
        ctx = llm._ctx.ctx
        llama_cpp.llama_perf_context_reset(ctx)
        _, m = measured_completion(
            llm, prompt, max_tokens=max_tokens, temperature=0.0, stream=True, logit_bias=eos_bias
        )
        perf = llama_cpp.llama_perf_context(ctx)
        if i < 2 or not m.ok or m.decode_ms is None:
            continue
        ratios_num += perf.t_eval_ms
        ratios_den += perf.n_eval
        lens_ms += m.decode_ms
        lens_gaps += m.output_tokens - 1
    return (ratios_num / ratios_den) / (lens_ms / lens_gaps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    model = bundled_model_path()
    if model is None:
        sys.exit("the bundled SmolLM2 is not installed (make venv installs it)")
    threads = args.threads or psutil.cpu_count(logical=False) or 1
    default = EngineSettings(n_ctx=2048, n_threads=threads, flash_attn=True)
    print(f"model {model.name}, {args.runs} measured requests × {args.max_tokens} tokens, {threads} threads")
    print(f"{'path':<48}{'overhead ratio':>16}{'llama.cpp tok/s':>17}")
    with LlamaEngine.load(model, default, compute_sha256=False) as engine:
        ratios = [lens_loop(engine, args.runs, args.max_tokens) for _ in range(3)]
        ratio = statistics.median(r for r, _ in ratios)
        rate = statistics.median(t for _, t in ratios)
        print(f"{'lens loop (bench), median of 3':<48}{ratio:>16.4f}{rate:>17.1f}")
        stream = streaming_api(engine, args.runs, args.max_tokens)
        print(f"{'create_completion(stream=True)':<48}{stream:>16.4f}{'':>17}")
        with tempfile.TemporaryDirectory() as tree:
            orin_jp6(Path(tree))  # a Jetson's INA3221 rails, read from files like the real sysfs
            root = Root(tree)
            for rate in (10.0, 100.0):
                results = []
                for _ in range(3):
                    sources, _ = detect_power(root, "jetson")
                    sampler = PowerSampler(
                        sources, rate_hz=rate, extras=lambda: {"_mem_percent": psutil.virtual_memory().percent}
                    )
                    results.append(lens_loop(engine, args.runs, args.max_tokens, sampler))
                ratio = statistics.median(r for r, _ in results)
                rate_tok = statistics.median(t for _, t in results)
                label = f"lens loop + power sampler at {rate:g} Hz, median of 3"
                print(f"{label:<48}{ratio:>16.4f}{rate_tok:>17.1f}")
    for label, settings in (
        ("n_ctx 1024, flash_attn off", EngineSettings(n_ctx=1024, n_threads=threads, flash_attn=False)),
        ("n_ctx 256, flash_attn on", EngineSettings(n_ctx=256, n_threads=threads, flash_attn=True)),
    ):
        with LlamaEngine.load(model, settings, compute_sha256=False) as engine:
            r, t = lens_loop(engine, args.runs, min(args.max_tokens, 128))
            print(f"{'lens loop, ' + label:<48}{r:>16.4f}{t:>17.1f}")


if __name__ == "__main__":
    main()
