"""The agent's own cost next to the model it measures, against bare llama-cpp-python in the same run.

    .venv/bin/python bench/footprint.py [--model PATH] [--threads 2] [--n-ctx 2048] [--max-tokens 16] [--idle 10]
                                        [--json]

Figures (docs/PERFORMANCE.md, "The agent's footprint"):

* memory: resident memory of ``lens-agent bench`` (peak, VmHWM) and of the service between runs (VmRSS after a
  workload run and a sync to a real ``lens-aggregator`` on 127.0.0.1), each over a bare llama-cpp-python process that
  loads the same model with the same settings and makes one completion;
* CPU: the service's share of a core while it waits for its next run, and the power sampler's own at 10 and 50 Hz
  on the fixture trees of a Jetson Orin (JetPack 6) and an Intel laptop (RAPL, battery);
* start-up: ``lens-agent status`` from a cold start (a new interpreter) against ``python -c pass`` and
  ``python -c "import llama_cpp"``, and the packages each command loads.

Without ``--model``, the bundled SmolLM2-135M-Instruct Q4_1.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import resource
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from agent.engines.modelfile import bundled_model_path  # noqa: E402
from agent.probes.power import detect_power  # noqa: E402
from agent.probes.sampler import PowerSampler  # noqa: E402
from agent.probes.sysfs import Root  # noqa: E402
from tests.footprint import (  # noqa: E402
    PROBE,
    bare_process,
    baseline_modules,
    command_modules,
    idle_cpu_percent,
    proc_status,
    service_config,
    start_service,
    third_party,
    wait_for_run_and_sync,
    wakeups,
)
from tests.netproxy import free_port  # noqa: E402
from tests.processes import AggregatorProcess, device_token  # noqa: E402
from tests.sysfs_trees import intel_laptop, orin_jp6  # noqa: E402

MB = 2**20  # the figures are MiB (as /proc's kB are KiB); lens-agent bench's own table prints decimal MB
PROMPT = "Write one sentence about the sea."


def bench_memory(model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """``lens-agent bench`` (its own peak, from the results) against bare llama-cpp-python's resident memory."""
    out = work / "bench.json"
    cmd = [
        sys.executable,
        str(PROBE),
        str(work / "bench-modules.json"),
        "bench",
        "--model",
        str(model),
        "--runs",
        "3",
        "--warmup",
        "1",
        "--max-tokens",
        str(args.max_tokens),
        "--n-threads",
        str(args.threads),
        "--n-ctx",
        str(args.n_ctx),
        "--idle-baseline",
        "0",
        "--no-progress",
        "--output",
        str(out),
    ]
    # the whole process's peak, polled (the results' rss_peak_bytes is the highest during a request: lens-agent
    # bench resets the kernel's high-water mark before each one)
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=ROOT)
    polled = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError, KeyError):
            polled = max(polled, proc_status(proc.pid)["VmRSS"])
        time.sleep(0.002)
    if proc.returncode != 0:
        raise SystemExit(f"lens-agent bench failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    written = json.loads(out.read_text())
    doc = (written[0] if isinstance(written, list) else written)["results"]
    bare = bare_process(model, args.n_ctx, args.threads, PROMPT, args.max_tokens)
    try:
        bare_status = proc_status(bare.pid)
    finally:
        bare.communicate("\n", timeout=60)
    peak = doc["memory"]["rss_peak_bytes"]
    return {
        "bench_process_peak_mb": polled / MB,
        "over_bare_process_peak_mb": (polled - bare_status["VmHWM"]) / MB,
        "bench_peak_mb": peak / MB,
        "bench_after_load_mb": doc["model_load"]["rss_after_load_bytes"] / MB,
        "bench_before_load_mb": doc["model_load"]["rss_before_load_bytes"] / MB,
        "bare_rss_mb": bare_status["VmRSS"] / MB,
        "bare_peak_mb": bare_status["VmHWM"] / MB,
        "over_bare_peak_mb": (peak - bare_status["VmHWM"]) / MB,
        "ratio_peak": peak / bare_status["VmHWM"],
    }


def service_memory_cpu(model: Path, args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """The service after one run and one sync: its memory over the bare process and its CPU while it waits."""
    agg = AggregatorProcess(work / "agg.db", free_port())
    agg.start()
    proc = None
    try:
        config = service_config(
            work,
            model,
            agg.port,
            device_token(agg.db),
            n_ctx=args.n_ctx,
            n_threads=args.threads,
            every=f"{max(30, int(args.idle) + 20)}s",
            max_tokens=args.max_tokens,
            sync_interval="60s",  # the shipped default (configs/agent.toml): the run's own sync follows it at once
        )
        modules_file = work / "service-modules.json"
        proc = start_service(config, modules_file)
        wait_for_run_and_sync(proc, work / "data", agg.db, 300)
        time.sleep(1.0)  # the sync's answer handled
        service = proc_status(proc.pid)
        woke = wakeups(proc.pid)
        cpu = idle_cpu_percent(proc.pid, args.idle)
        woke = wakeups(proc.pid) - woke
        service_after = proc_status(proc.pid)
        bare = bare_process(model, args.n_ctx, args.threads, PROMPT, args.max_tokens)
        try:
            bare_status = proc_status(bare.pid)
            bare_cpu = idle_cpu_percent(bare.pid, min(args.idle, 5.0))
        finally:
            bare.communicate("\n", timeout=60)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        modules = json.loads(modules_file.read_text())
        return {
            "service_rss_mb": service["VmRSS"] / MB,
            "service_rss_after_idle_mb": service_after["VmRSS"] / MB,
            "bare_rss_mb": bare_status["VmRSS"] / MB,
            "over_bare_mb": (service["VmRSS"] - bare_status["VmRSS"]) / MB,
            "ratio": service["VmRSS"] / bare_status["VmRSS"],
            "idle_cpu_percent_of_a_core": cpu,
            "idle_wakeups_per_s": woke / args.idle,
            "bare_idle_cpu_percent": bare_cpu,
            "idle_seconds": args.idle,
            "packages": sorted(third_party(modules) - third_party(baseline_modules())),
        }
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        agg.stop()


def sampler_cpu(rate_hz: float, tree: str, seconds: float, work: Path) -> dict[str, Any]:
    root_dir = work / f"tree-{tree}"
    if not root_dir.exists():
        (orin_jp6 if tree == "orin" else intel_laptop)(root_dir)
    sources, _ = detect_power(Root(str(root_dir)))
    sampler = PowerSampler(sources, rate_hz=rate_hz)
    before = resource.getrusage(resource.RUSAGE_SELF)
    start = time.monotonic()
    sampler.start()
    time.sleep(seconds)  # this thread sleeps: the process's CPU is the sampler's
    sampler.stop()
    after = resource.getrusage(resource.RUSAGE_SELF)
    elapsed = time.monotonic() - start
    cpu = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    n = len(sampler.samples)
    return {
        "tree": tree,
        "rate_hz": rate_hz,
        "sources": [s.name for s in sources],
        "samples": n,
        "cpu_percent_of_a_core": 100.0 * cpu / elapsed,
        "us_per_sample": 1e6 * cpu / n if n else None,
    }


def cold_start(args_list: list[str], repeat: int = 5) -> float:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        subprocess.run(args_list, capture_output=True, cwd=ROOT)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1000


def startup(work: Path) -> dict[str, Any]:
    config = work / "agent.toml"  # the service's: its data directory holds an outbox and service state
    agent = [sys.executable, "-c", "from agent.cli import main; main()"]
    status = [*agent, "status", "--config", str(config), "--no-probe"]
    modules, _ = command_modules(["status", "--config", str(config), "--no-probe"])
    return {
        "python_pass_ms": cold_start([sys.executable, "-c", "pass"]),
        "import_llama_cpp_ms": cold_start([sys.executable, "-c", "import llama_cpp"]),
        "status_ms": cold_start(status),
        "status_modules": len(modules),
        "status_packages": sorted(third_party(modules)),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, help="GGUF model (default: the bundled SmolLM2)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--n-ctx", type=int, default=2048)
    parser.add_argument("--max-tokens", type=int, default=16)
    parser.add_argument("--idle", type=float, default=10.0, help="seconds the service's idle CPU is measured over")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args()
    model = args.model or bundled_model_path()
    if model is None:
        raise SystemExit("no --model and no bundled SmolLM2 (make demo installs it)")
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        print("bench memory …", file=sys.stderr)
        bench = bench_memory(model, args, work)
        print("service between runs …", file=sys.stderr)
        service = service_memory_cpu(model, args, work)
        print("power sampler …", file=sys.stderr)
        samplers = [sampler_cpu(hz, tree, 5.0, work) for tree in ("orin", "laptop") for hz in (10.0, 50.0)]
        print("status cold start …", file=sys.stderr)
        start = startup(work)
    doc = {"model": str(model), "bench": bench, "service": service, "sampler": samplers, "startup": start}
    if args.json:
        print(json.dumps(doc, indent=2))
        return
    print(f"model {model.name}, {args.threads} threads, n_ctx {args.n_ctx}, {args.max_tokens} tokens")
    b = bench
    print(
        f"bench peak RSS (MiB)  {b['bench_process_peak_mb']:7.1f} whole process, {b['bench_peak_mb']:7.1f} during "
        f"requests   bare llama-cpp-python {b['bare_peak_mb']:7.1f}   over: {b['over_bare_process_peak_mb']:+.1f} / "
        f"{b['over_bare_peak_mb']:+.1f} (×{b['ratio_peak']:.3f} during requests)"
    )
    s = service
    print(
        f"service between runs  {s['service_rss_mb']:7.1f} MiB   bare llama-cpp-python {s['bare_rss_mb']:7.1f} MiB   "
        f"over: {s['over_bare_mb']:+.1f} MiB (×{s['ratio']:.3f}); after {s['idle_seconds']:.0f} s idle "
        f"{s['service_rss_after_idle_mb']:.1f} MiB"
    )
    print(
        f"service idle CPU      {s['idle_cpu_percent_of_a_core']:.3f} % of a core, {s['idle_wakeups_per_s']:.1f} "
        f"wakeups/s over {s['idle_seconds']:.0f} s (bare process waiting: {s['bare_idle_cpu_percent']:.3f} %); "
        f"packages beyond llama-cpp-python's: {', '.join(s['packages'])}"
    )
    for r in samplers:
        print(
            f"power sampler {r['tree']:6s} {r['rate_hz']:4.0f} Hz  {r['cpu_percent_of_a_core']:.2f} % of a core, "
            f"{r['us_per_sample']:.0f} µs a sample ({', '.join(r['sources'])})"
        )
    st = start
    print(
        f"status cold start     {st['status_ms']:.0f} ms (python -c pass {st['python_pass_ms']:.0f} ms, "
        f"import llama_cpp {st['import_llama_cpp_ms']:.0f} ms); {st['status_modules']} modules, packages: "
        f"{', '.join(st['status_packages'])}"
    )


if __name__ == "__main__":
    main()
