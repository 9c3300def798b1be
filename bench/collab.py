"""Speculative decoding across a delayed link: speedups against cloud-only and edge-only, per round-trip time.

    .venv/bin/python bench/collab.py [--rtt 0,10,30,80] [--runs 6] [--max-tokens 48] [--draft-tokens 4]
                                      [--target T.gguf --draft D.gguf]

The "cloud" is a real llama-cpp-python server on 127.0.0.1 serving the target model, and llama.cpp's own
``llama-server`` (tests/llama_server.py: built once, cached) serving the same file; a latency proxy per server (this
machine has no netem) adds half the round trip to every chunk in each direction. Without --target/--draft it uses
the tiny generated pair (a random-weight target and a noisy copy of it). Every figure of a row comes from one
session: cloud-only streaming against each server, speculative with the text protocols (``generate``, ``logprobs``)
against llama-cpp-python and with the token protocol (``tokens``) against llama-server, and the draft model alone.
Both servers run one thread with a 1024-token context. Besides tok/s (× cloud: against llama-cpp-python streaming;
× ls: against llama-server streaming), α (accepted / drafted) and τ (tokens committed per round; the text columns are
``logprobs``' run, ``generate`` drafts alike): bytes on the wire per committed token (mean of
``ext.collab.bytes_per_committed_token``) and the share of requests not reported lossless (``ext.collab.lossless``)
per protocol, with the reasons given below the row.
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

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.bench.runner import BenchOptions, run_bench
from agent.engines.cloud import CloudClient, CloudSettings, LoopRunner
from agent.engines.llama import EngineSettings, LlamaEngine
from agent.prompts import builtin_prompts
from agent.strategies import CloudStrategy, LocalStrategy, SpeculativeStrategy, check_vocabulary
from tests.llama_server import LlamaServerProcess, ensure_llama_server
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


class FreshConnections(CloudClient):
    """A cloud client that opens a new connection per request. For streaming against llama-server: it closes the
    connection after a streamed answer although it says ``Keep-Alive``, so every streamed request needs a new
    connection anyway, and through the proxy a pooled connection can be reused before its close arrives (reset)."""

    async def session(self) -> aiohttp.ClientSession:
        if self._session is None:
            self._session = aiohttp.ClientSession(
                timeout=aiohttp.ClientTimeout(
                    total=self.settings.timeout, sock_connect=min(10.0, self.settings.timeout)
                ),
                connector=aiohttp.TCPConnector(force_close=True),
            )
        return self._session


def tps(run: Any) -> float:
    ok = [m for m in run.measured if m.ok]
    return sum(m.output_tokens for m in ok) / run.measured_wall_s if run.measured_wall_s else 0.0


class Spec:
    """One speculative run's figures: tok/s, α, τ, mean bytes per committed token, share of lossy requests."""

    def __init__(self, run: Any) -> None:
        collab = [m.ext["collab"] for m in run.measured if m.ok]
        if not collab:
            raise SystemExit(f"no request succeeded: {[m.error_type for m in run.measured]}")
        drafted = sum(c["drafted"] for c in collab)
        accepted = sum(c["accepted"] for c in collab)
        rounds = sum(c["rounds"] for c in collab)
        self.rate = tps(run)
        self.alpha = accepted / drafted if drafted else 0.0
        self.tau = 1 + accepted / rounds if rounds else 0.0
        self.bytes = sum(c["bytes_per_committed_token"] for c in collab) / len(collab)
        self.lossy = sum(1 for c in collab if not c.get("lossless")) / len(collab)
        self.bases = sorted({str(c.get("lossless_basis")) for c in collab if not c.get("lossless")})


def cloud_only(client: CloudClient, runner: LoopRunner, prompts: Any, options: BenchOptions) -> float:
    rtt = runner.run(client.rtt_ms())
    strategy = CloudStrategy(client, runner, rtt)
    run = run_bench(None, prompts, options, run_id="b", device_id="b", strategy=strategy, model_name="cloud")
    if not any(m.ok for m in run.measured):
        raise SystemExit(f"{client.settings.url}: no request succeeded: {[m.error_message for m in run.measured]}")
    return tps(run)


def speculative(
    engine: LlamaEngine,
    client: CloudClient,
    runner: LoopRunner,
    prompts: Any,
    options: BenchOptions,
    k: int,
    protocol: str,
) -> Spec:
    rtt = runner.run(client.rtt_ms())
    strategy = SpeculativeStrategy(engine, client, runner, k=k, protocol=protocol, rtt_ms=rtt)
    return Spec(run_bench(engine, prompts, options, run_id="b", device_id="b", strategy=strategy))


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
    native = LlamaServerProcess(
        ensure_llama_server(),
        target,
        free_port(),
        ["--threads", "1", "--threads-batch", "1", "--ctx-size", "1024"],
    )
    options = BenchOptions(runs=args.runs, warmup=1, max_tokens=args.max_tokens, chat_template="off")
    prompts = builtin_prompts()
    print(
        f"target {target.name} served by llama-cpp-python (lcp) and llama-server (ls) on 127.0.0.1, draft "
        f"{draft.name} local, {args.runs} requests × {args.max_tokens} tokens, k = {args.draft_tokens}"
    )
    print(
        f"{'RTT ms':>7}{'cloud tok/s':>13}{'edge tok/s':>12}"
        f"{'spec-gen tok/s':>16}{'× cloud':>9}{'spec-lp tok/s':>15}{'× cloud':>9}{'α':>7}{'τ':>6}"
        f"{'ls-cloud tok/s':>16}{'spec-tok tok/s':>16}{'× ls':>7}{'× cloud':>9}{'α':>7}{'τ':>6}"
        f"{'B/tok gen':>11}{'lp':>7}{'tok':>6}{'lossy gen':>11}{'lp':>6}{'tok':>6}"
    )
    try:
        native.start()
        with LlamaEngine.load(draft, EngineSettings(n_ctx=1024, n_threads=1), compute_sha256=False) as engine:
            edge = tps(
                run_bench(engine, prompts, options, run_id="b", device_id="b", strategy=LocalStrategy(engine, options))
            )
            for rtt in (float(x) for x in args.rtt.split(",")):
                proxy = LinkProxy(port, rtt_ms=rtt).start_in_thread()
                native_proxy = LinkProxy(native.port, rtt_ms=rtt).start_in_thread()
                runner = LoopRunner()
                client = CloudClient(CloudSettings(url=f"http://127.0.0.1:{proxy.port}/v1", timeout=120))
                native_client = CloudClient(CloudSettings(url=f"http://127.0.0.1:{native_proxy.port}/v1", timeout=120))
                try:
                    cloud = cloud_only(client, runner, prompts, options)
                    spec = {
                        protocol: speculative(engine, client, runner, prompts, options, args.draft_tokens, protocol)
                        for protocol in ("generate", "logprobs")
                    }
                    check_vocabulary(engine, native_client, runner)  # raises if the vocabularies differ
                    streaming_client = FreshConnections(native_client.settings)
                    try:
                        native_cloud = cloud_only(streaming_client, runner, prompts, options)
                    finally:
                        runner.run(streaming_client.close())
                    spec["tokens"] = speculative(
                        engine, native_client, runner, prompts, options, args.draft_tokens, "tokens"
                    )
                finally:
                    runner.run(client.close())
                    runner.run(native_client.close())
                    runner.close()
                    proxy.stop_thread()
                    native_proxy.stop_thread()
                gen, lp, tok = spec["generate"], spec["logprobs"], spec["tokens"]
                print(
                    f"{rtt:>7.0f}{cloud:>13.1f}{edge:>12.1f}{gen.rate:>16.1f}"
                    f"{gen.rate / cloud:>9.2f}{lp.rate:>15.1f}{lp.rate / cloud:>9.2f}"
                    f"{lp.alpha:>7.2f}{lp.tau:>6.2f}"
                    f"{native_cloud:>16.1f}{tok.rate:>16.1f}{tok.rate / native_cloud:>7.2f}{tok.rate / cloud:>9.2f}"
                    f"{tok.alpha:>7.2f}{tok.tau:>6.2f}"
                    f"{gen.bytes:>11.0f}{lp.bytes:>7.0f}{tok.bytes:>6.0f}"
                    f"{gen.lossy:>11.2f}{lp.lossy:>6.2f}{tok.lossy:>6.2f}"
                )
                for protocol, figures in spec.items():
                    for basis in figures.bases:
                        print(f"  not lossless ({protocol}): {basis}")
    finally:
        native.close()
        server.terminate()
        server.wait()
        tmp.cleanup()


if __name__ == "__main__":
    main()
