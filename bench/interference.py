"""Calibrate interference detection: the same small bench alone and beside real load, with the figures it measured.

    .venv/bin/python bench/interference.py [--model PATH] [--runs 8] [--max-tokens 16] [--threads 2]

Runs ``lens-agent bench`` (a separate process, as a user would) on one model, once per scenario:

* quiet: nothing started beside it (whatever else the machine is doing still runs: the figures say so);
* cpu: one busy loop per logical CPU;
* memory: the bench and a hog in a child cgroup limited to 1 GiB, the hog keeping about 5 % of it free;
* io: two writers that each write 256 KiB and fsync, again and again, in a temporary directory;
* bench: a second copy of the same bench running beside it.

For each it prints TPOT (p50), how many requests were contended and why, and the min, median and max of every figure
(``ext.interference``, docs/interference.md). Without ``--model`` a tiny llama with random weights is generated
(big enough that decode is compute-bound: a few ms per token).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.hogs import cpu_hog, io_hog, join_cgroup, memory_cgroup, memory_cgroup_root, memory_hog  # noqa: E402
from tests.tinymodel import write_tiny_llama  # noqa: E402

AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
FIGURES = ("other_cpu_cores", "load1", "psi_cpu_some_pct", "psi_memory_some_pct", "psi_io_some_pct")
MEMORY_LIMIT = 1 << 30


def bench_command(model: Path, args: argparse.Namespace) -> list[str]:
    return [
        *AGENT,
        "bench",
        "--model",
        str(model),
        "--runs",
        str(args.runs),
        "--max-tokens",
        str(args.max_tokens),
        "--ignore-eos",
        "--n-threads",
        str(args.threads),
        "--n-ctx",
        "512",
        "--power-source",
        "none",
        "--idle-baseline",
        "0",
        "--no-progress",
        "--json",
    ]


@contextlib.contextmanager
def second_bench(model: Path, args: argparse.Namespace) -> Iterator[None]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    more = argparse.Namespace(**{**vars(args), "runs": args.runs * 20})
    process = subprocess.Popen(
        bench_command(model, more), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env
    )
    try:
        time.sleep(2.0)  # past its start-up and model load
        yield
    finally:
        process.kill()
        process.wait()


def report(name: str, document: dict[str, Any], raw: list[dict[str, Any]]) -> None:
    res = document["results"]
    tpot = (res["latency_metrics"].get("time_per_output_token") or {}).get("p50_ms")
    inter = res["interference"]
    measured = [r for r in raw if not r.get("warmup")]
    figures = [r["ext"]["interference"] for r in measured if "interference" in r.get("ext", {})]
    print(
        f"{name:<7} TPOT p50 {tpot if tpot is None else round(tpot, 2)} ms, "
        f"{inter['contended_requests']}/{inter['requests']} contended {inter['reasons']}"
    )
    for key in (*FIGURES, "mem_available_pct", "swap_pages_per_s"):
        values = [f[key] for f in figures if isinstance(f.get(key), int | float)]
        if values:
            low, high = min(values), max(values)
            print(f"        {key:<22} min {low:8.2f}  median {statistics.median(values):8.2f}  max {high:8.2f}")
    print(f"        {inter['summary']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", type=Path)
    parser.add_argument("--runs", type=int, default=8)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--only", nargs="*", default=None, help="scenarios to run (quiet cpu memory io bench)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        model = args.model
        if model is None:
            model = directory / "calibration.gguf"
            write_tiny_llama(model, seed=3, n_embd=256, n_layer=4, n_head=8, n_ff=768, context_length=512)
        print(f"model {model}, {args.runs} requests × {args.max_tokens} tokens, {args.threads} threads")
        print(f"command: {' '.join(bench_command(model, args)[3:])} (+ --raw for per-request figures)")
        scenarios = args.only or ["quiet", "cpu", "memory", "io", "bench"]
        for name in scenarios:
            raw_path = directory / f"{name}.jsonl"
            cgroup = None
            with contextlib.ExitStack() as stack:
                if name == "cpu":
                    stack.enter_context(cpu_hog(os.cpu_count() or 1))
                elif name == "io":
                    stack.enter_context(io_hog(directory))
                elif name == "bench":
                    stack.enter_context(second_bench(model, args))
                elif name == "memory":
                    if memory_cgroup_root() is None:
                        print("memory  skipped: no writable memory cgroup here")
                        continue
                    cgroup, usage = stack.enter_context(memory_cgroup(MEMORY_LIMIT))
                    stack.enter_context(memory_hog(cgroup, usage, MEMORY_LIMIT, MEMORY_LIMIT // 20))
                document = run_bench_raw(model, args, raw_path, cgroup)
            raw = [json.loads(line) for line in raw_path.read_text().splitlines() if line.strip()]
            report(name, document, raw)


def run_bench_raw(model: Path, args: argparse.Namespace, raw_path: Path, cgroup: Path | None) -> dict[str, Any]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [*bench_command(model, args), "--raw", str(raw_path)],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
        preexec_fn=(lambda: join_cgroup(cgroup)) if cgroup is not None else None,
    )
    if done.returncode != 0:
        raise SystemExit(f"bench failed ({done.returncode}): {done.stderr[-2000:]}")
    document: dict[str, Any] = json.loads(done.stdout)[0]
    return document


if __name__ == "__main__":
    main()
