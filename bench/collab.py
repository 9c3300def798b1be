"""Speculative decoding across a delayed link: speedups against cloud-only and edge-only, per round-trip time.

    .venv/bin/python bench/collab.py [--rtt 0,10,30,80] [--runs 6] [--max-tokens 48] [--draft-tokens 4]
                                      [--target T.gguf --draft D.gguf]

The "cloud" is a real llama-cpp-python server on 127.0.0.1 serving the target model; a latency proxy (this machine
has no netem) adds half the round trip to every chunk in each direction. Without --target/--draft it uses the tiny
generated pair (a random-weight target and a noisy copy of it). Every figure of a row comes from one session:
cloud-only streaming, speculative with both verification protocols, and the draft model alone.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bench.runner import BenchOptions, run_bench
from agent.engines.cloud import CloudClient, CloudSettings, LoopRunner
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.prompts import builtin_prompts
from agent.strategies import CloudStrategy, LocalStrategy, SpeculativeStrategy
from tests.netproxy import LinkProxy, free_port
from tests.tinymodel import write_tiny_llama


def serve(model: Path) -> tuple[subprocess.Popen[bytes], int]:
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "llama_cpp.server",
            "--model",
            str(model),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--n_ctx",
            "1024",
            "--n_threads",
            "1",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    for _ in range(300):
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/v1/models", timeout=1).read()
            return proc, port
        except OSError:
            time.sleep(0.2)
    proc.kill()
    raise SystemExit("the llama-cpp-python server did not start")


def tps(run: Any) -> float:
    ok = [m for m in run.measured if m.ok]
    return sum(m.output_tokens for m in ok) / run.measured_wall_s if run.measured_wall_s else 0.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rtt", default="0,10,30,80", help="round-trip times to add, ms")
    parser.add_argument("--runs", type=int, default=6)
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--draft-tokens", type=int, default=4)
    parser.add_argument("--target", type=Path)
    parser.add_argument("--draft", type=Path)
    args = parser.parse_args()
    tmp = tempfile.TemporaryDirectory()
    if args.target and args.draft:
        target, draft = args.target, args.draft
    else:
        target, draft = Path(tmp.name) / "target.gguf", Path(tmp.name) / "draft.gguf"
        tensors = write_tiny_llama(target, seed=1, n_embd=256, n_layer=4, n_ff=512, context_length=1024)
        write_tiny_llama(
            draft, seed=2, noise_of=tensors, noise_scale=0.02, n_embd=256, n_layer=4, n_ff=512, context_length=1024
        )
    server, port = serve(target)
    options = BenchOptions(
        runs=args.runs, warmup=1, max_tokens=args.max_tokens, include_text=False, chat_template="off"
    )
    prompts = builtin_prompts()
    print(
        f"target {target.name} served by llama-cpp-python on 127.0.0.1, draft {draft.name} local, "
        f"{args.runs} requests × {args.max_tokens} tokens, k = {args.draft_tokens}"
    )
    print(
        f"{'RTT ms':>7}{'cloud tok/s':>13}{'edge tok/s':>12}"
        f"{'spec-gen tok/s':>16}{'× cloud':>9}{'spec-lp tok/s':>15}{'× cloud':>9}{'α':>7}{'τ':>6}"
    )
    try:
        with LlamaEngine.load(draft, EngineSettings(n_ctx=1024, n_threads=1), compute_sha256=False) as engine:
            edge = tps(
                run_bench(engine, prompts, options, run_id="b", device_id="b", strategy=LocalStrategy(engine, options))
            )
            for rtt in (float(x) for x in args.rtt.split(",")):
                proxy = LinkProxy(port, rtt_ms=rtt).start_in_thread()
                runner = LoopRunner()
                client = CloudClient(CloudSettings(url=f"http://127.0.0.1:{proxy.port}/v1", timeout=120))
                try:
                    measured_rtt = runner.run(client.rtt_ms())
                    cloud = tps(
                        run_bench(
                            None,
                            prompts,
                            options,
                            run_id="b",
                            device_id="b",
                            strategy=CloudStrategy(client, runner, measured_rtt),
                            model_name="cloud",
                        )
                    )
                    rates = {}
                    alpha = tau = 0.0
                    for protocol in ("generate", "logprobs"):
                        strategy = SpeculativeStrategy(
                            engine, client, runner, k=args.draft_tokens, protocol=protocol, rtt_ms=measured_rtt
                        )
                        run = run_bench(engine, prompts, options, run_id="b", device_id="b", strategy=strategy)
                        rates[protocol] = tps(run)
                        collab = [m.ext["collab"] for m in run.measured if m.ok]
                        drafted = sum(c["drafted"] for c in collab)
                        accepted = sum(c["accepted"] for c in collab)
                        rounds = sum(c["rounds"] for c in collab)
                        alpha, tau = accepted / drafted, 1 + accepted / rounds
                finally:
                    runner.run(client.close())
                    runner.close()
                    proxy.stop_thread()
                print(
                    f"{rtt:>7.0f}{cloud:>13.1f}{edge:>12.1f}{rates['generate']:>16.1f}"
                    f"{rates['generate'] / cloud:>9.2f}{rates['logprobs']:>15.1f}{rates['logprobs'] / cloud:>9.2f}"
                    f"{alpha:>7.2f}{tau:>6.2f}"
                )
    finally:
        server.terminate()
        server.wait()
        tmp.cleanup()


if __name__ == "__main__":
    main()
