"""The token protocol against its two servers, llama.cpp's ``llama-server`` and vLLM, on the same target model.

    .venv/bin/python bench/token_verify.py [--runs 6] [--max-tokens 48] [--draft-tokens 2,4,8]

Needs ``make llama-server`` and ``make vllm``. The target is a tiny random-weight llama with merges (head size 64,
which vLLM's CPU attention supports) written as GGUF for llama-server and converted to a Hugging Face checkpoint
for vLLM (tests/vllm_server.py); the draft is a noisy copy of it, run locally by llama.cpp. Both servers on
127.0.0.1, no added delay. Per server and draft length: streamed cloud-only tok/s, speculative tok/s and its ratio
to that server's streaming, α, τ, requests per committed token, bytes on the wire per committed token, and the share
of requests not lossless. llama-server verifies by generating k + 1 ids greedily; vLLM by one forward pass over the
draft (``prompt_logprobs``), whose answer grows with the context.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bench.runner import BenchOptions, run_bench
from agent.engines.cloud import CloudClient, CloudSettings, LoopRunner
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.prompts import builtin_prompts
from agent.strategies import SpeculativeStrategy, check_vocabulary
from bench.collab import FreshConnections, Spec, cloud_only
from tests.llama_server import LlamaServerProcess, ensure_llama_server
from tests.netproxy import free_port
from tests.tinymodel import MERGES, write_tiny_llama
from tests.vllm_server import VllmServerProcess, hf_checkpoint

SHAPE = {"n_embd": 128, "n_head": 2, "n_layer": 4, "n_ff": 512, "context_length": 1024}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", default="2,4,8")
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    root = Path(tmp.name)
    target, draft = root / "target.gguf", root / "draft.gguf"
    tensors = write_tiny_llama(target, seed=1, merges=MERGES, **SHAPE)
    write_tiny_llama(draft, seed=2, noise_of=tensors, noise_scale=0.02, merges=MERGES, **SHAPE)
    servers = {
        "llama-server": LlamaServerProcess(
            ensure_llama_server(), target, free_port(), ["--threads", "1", "--threads-batch", "1", "--ctx-size", "1024"]
        ),
        "vllm": VllmServerProcess(hf_checkpoint(target, root / "hf"), free_port(), max_model_len=1024),
    }
    options = BenchOptions(runs=args.runs, warmup=1, max_tokens=args.max_tokens, chat_template="off")
    prompts = builtin_prompts()
    print(f"{args.runs} requests × {args.max_tokens} tokens; target served on 127.0.0.1, draft local (llama.cpp)")
    print(
        f"{'server':<14}{'k':>3}{'stream tok/s':>14}{'spec tok/s':>12}{'× stream':>10}{'α':>7}{'τ':>6}"
        f"{'req/tok':>9}{'B/tok':>8}{'lossy':>7}"
    )
    try:
        for server in servers.values():
            server.start()
        with LlamaEngine.load(draft, EngineSettings(n_ctx=1024, n_threads=1), compute_sha256=False) as engine:
            for name, server in servers.items():
                runner = LoopRunner()
                client = CloudClient(CloudSettings(url=server.url + "/v1", timeout=120))
                try:
                    supported, why = runner.run(client.probe_token_api())
                    if not supported:
                        raise SystemExit(f"{name}: no token-id API: {why}")
                    check_vocabulary(engine, client, runner)
                    streaming = FreshConnections(client.settings)
                    try:
                        stream = cloud_only(streaming, runner, prompts, options)
                    finally:
                        runner.run(streaming.close())
                    for k in (int(x) for x in args.draft_tokens.split(",")):
                        rtt = runner.run(client.rtt_ms())
                        strategy = SpeculativeStrategy(engine, client, runner, k=k, protocol="tokens", rtt_ms=rtt)
                        run = run_bench(engine, prompts, options, run_id="b", device_id="b", strategy=strategy)
                        spec = Spec(run)
                        collab = [m.ext["collab"] for m in run.measured if m.ok]
                        per_token = sum(c["rounds"] for c in collab) / sum(
                            m.output_tokens for m in run.measured if m.ok
                        )
                        print(
                            f"{name:<14}{k:>3}{stream:>14.1f}{spec.rate:>12.1f}{spec.rate / stream:>10.2f}"
                            f"{spec.alpha:>7.2f}{spec.tau:>6.2f}{per_token:>9.2f}{spec.bytes:>8.0f}{spec.lossy:>7.2f}"
                        )
                finally:
                    runner.run(client.close())
                    runner.close()
    finally:
        for server in servers.values():
            server.close()
        tmp.cleanup()


if __name__ == "__main__":
    main()
