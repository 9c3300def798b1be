"""What measuring tune candidates in a child process costs: the same blocks in this process and through the
measuring process (``agent.tune_worker``), interleaved, on SmolLM2.

    .venv/bin/python bench/tune_isolation.py [--model PATH] [--blocks 6] [--requests 4] [--max-tokens 32]

Each block is what a tune measures per candidate and round: load the model with the candidate's settings, one
warm-up and ``--requests`` requests for exactly ``--max-tokens`` tokens, close. Printed: the median wall time of a
block in-process and in the child (the child kept from block to block, as a tune keeps it), the first child block
(Python and llama.cpp start once per tune), the ratio child ÷ in-process, and the ratio of the per-request e2e medians
(the figures the tune compares must not change by being measured in a child).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.engines.llama import EngineSettings
from agent.engines.modelfile import resolve_model_path
from agent.prompts import load_prompts
from agent.tune_worker import WorkerPool, block_request, run_block

ROOT = Path(__file__).resolve().parents[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=None, help="GGUF model (default: the bundled SmolLM2)")
    parser.add_argument("--blocks", type=int, default=6, help="blocks of each kind (interleaved)")
    parser.add_argument("--requests", type=int, default=4)
    parser.add_argument("--max-tokens", type=int, default=32)
    args = parser.parse_args()
    model = resolve_model_path(args.model)
    prompts = load_prompts(ROOT / "configs" / "prompts" / "short-chat.jsonl")[:2]
    options = {
        "runs": args.requests,
        "warmup": 1,
        "max_tokens": args.max_tokens,
        "ignore_eos": True,
        "chat_template": "auto",
        "include_text": False,
    }
    request = block_request(
        model, EngineSettings(n_ctx=512, n_threads=2, n_batch=512), prompts, options, run_id="b", device_id="b"
    )
    pool = WorkerPool()
    inproc: list[float] = []
    child: list[float] = []
    e2e_in: list[float] = []
    e2e_child: list[float] = []
    t0 = time.perf_counter()
    first = pool.measure(request)  # starts the child: Python, llama_cpp, the model
    first_s = time.perf_counter() - t0
    assert first.load_error is None, first.load_error
    try:
        for _ in range(args.blocks):
            t0 = time.perf_counter()
            answer = run_block(request)
            inproc.append(time.perf_counter() - t0)
            e2e_in += [r["e2e_ms"] for r in answer["requests"] if r["ok"]]
            t0 = time.perf_counter()
            result = pool.measure(request)
            child.append(time.perf_counter() - t0)
            e2e_child += [r["e2e_ms"] for r in result.requests if r.get("ok")]
    finally:
        pool.close()
    med_in, med_child = statistics.median(inproc), statistics.median(child)
    print(f"model {model.name}, {args.blocks} blocks each, {args.requests} requests × {args.max_tokens} tokens")
    print(f"block in this process      median {med_in * 1000:8.1f} ms")
    print(
        f"block in the child         median {med_child * 1000:8.1f} ms   (child ÷ in-process {med_child / med_in:.3f})"
    )
    print(f"first child block          {first_s * 1000:8.1f} ms   (the child's start, once per tune)")
    e_in, e_child = statistics.median(e2e_in), statistics.median(e2e_child)
    print(
        f"request e2e median         {e_in:8.2f} ms here, {e_child:8.2f} ms in the child (ratio {e_child / e_in:.3f})"
    )


if __name__ == "__main__":
    main()
