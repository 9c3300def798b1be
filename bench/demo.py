"""The demo behind ``make demo``: the whole path on this machine, in a few minutes, then everything stopped.

1. ``lens-agent bench`` on the bundled SmolLM2 (the measurement core: TTFT, TPOT, every gap, the lens's overhead);
2. an aggregator on 127.0.0.1 with its SQLite store, and a device token for this machine;
3. a llama-cpp-python server on 127.0.0.1 standing in for the cloud model;
4. ``lens-agent run`` with a short schedule: a local workload and a speculative one (SmolLM2 drafts, the "cloud"
   verifies with the ``generate`` protocol — SmolLM2 adds no BOS, so echoed logprobs would misalign), syncing
   every few seconds, until each workload has run twice;
5. ``lens-agent status``, what the aggregator holds per device;
6. the aggregator stays up on 127.0.0.1 with its fleet page, /metrics and the query API, until Ctrl-C (the URL is
   printed); ``--no-keep`` stops everything at once instead (tests, CI).

Everything it writes goes to ``.demo/`` in the checkout (kept for a look afterwards, removed on the next run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
WORK = ROOT / ".demo"


def say(text: str) -> None:
    print(f"\n\033[1m== {text}\033[0m", flush=True)


def plural(n: int, noun: str) -> str:
    return f"{n} {noun}{'' if n == 1 else 's'}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(url: str, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(url, timeout=1).read()
            return
        except OSError:
            time.sleep(0.2)
    raise SystemExit(f"demo: {url} did not answer within {seconds:g} s")


def arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="bench/demo.py", description="The whole path on this machine (make demo).")
    parser.add_argument(
        "--no-keep",
        action="store_true",
        help="stop everything at the end instead of keeping the aggregator and its fleet page up until Ctrl-C",
    )
    parser.add_argument("--workload-runs", type=int, default=2, metavar="N", help="runs of each workload (default 2)")
    parser.add_argument(
        "--quick", action="store_true", help="fewer and shorter requests, workloads every few seconds (tests)"
    )
    parser.add_argument("--work", type=Path, default=WORK, metavar="DIR", help=f"where it writes (default {WORK})")
    return parser.parse_args(argv)


def stop(procs: list[subprocess.Popen[bytes]]) -> None:
    for proc in reversed(procs):
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
    for proc in procs:
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    procs.clear()


def main(argv: list[str] | None = None) -> int:
    args = arguments(argv)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        run_demo(args, procs)
    except KeyboardInterrupt:
        print("\ndemo: interrupted", flush=True)
    finally:
        signal.signal(signal.SIGINT, signal.SIG_IGN)  # a second Ctrl-C must not cut the clean-up short
        stop(procs)
        print("stopped: the aggregator, the cloud server and the agent", flush=True)
    return 0


def run_demo(args: argparse.Namespace, procs: list[subprocess.Popen[bytes]]) -> None:
    work = args.work
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    sys.path.insert(0, str(ROOT))
    from agent.engines.modelfile import bundled_model_path

    model = bundled_model_path()
    if model is None:
        raise SystemExit("demo: the bundled SmolLM2 is missing (make venv installs it)")
    say("1. lens-agent bench: SmolLM2-135M on this machine")
    subprocess.run(
        [
            BIN / "lens-agent",
            "bench",
            "--runs",
            "2" if args.quick else "8",
            "--warmup",
            "1" if args.quick else "2",
            "--max-tokens",
            "16" if args.quick else "64",
            "--output",
            str(work / "bench.json"),
            "--progress",
        ],
        check=True,
    )

    say("2. lens-aggregator on 127.0.0.1, with a token for this device")
    agg_port = free_port()
    db = work / "aggregator.db"
    token = subprocess.run(
        [BIN / "lens-aggregator", "token", "add", "demo-device", "--db", str(db)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    (work / "token").write_text(token)
    agg = subprocess.Popen(
        [BIN / "lens-aggregator", "serve", "--db", str(db), "--port", str(agg_port)],
        stderr=subprocess.DEVNULL,
        start_new_session=True,  # Ctrl-C reaches the demo only, which stops it cleanly
    )
    procs.append(agg)
    wait_http(f"http://127.0.0.1:{agg_port}/api/v1/health", 30)
    print(f"aggregator: http://127.0.0.1:{agg_port}")

    say("3. a llama-cpp-python server on 127.0.0.1 as the cloud model")
    cloud_port = free_port()
    cloud = subprocess.Popen(
        [sys.executable, "-m", "llama_cpp.server", "--model", str(model), "--host", "127.0.0.1",
         "--port", str(cloud_port), "--n_ctx", "2048", "--n_threads", "1"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )  # fmt: skip
    procs.append(cloud)
    wait_http(f"http://127.0.0.1:{cloud_port}/v1/models", 90)
    print(f"cloud: http://127.0.0.1:{cloud_port}/v1 (SmolLM2 again: the demo has no bigger model of the same vocab)")

    say("4. lens-agent run: a local and a speculative workload on a short schedule, syncing as it goes")
    config = work / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "demo-device"
data_dir = "{work / "agent"}"
[model]
n_threads = 1
[sync]
url = "http://127.0.0.1:{agg_port}"
allow_http = true
token_file = "{work / "token"}"
interval = "3s"
[cloud]
url = "http://127.0.0.1:{cloud_port}/v1"
[collab]
verify = "generate"
draft_tokens = 4
[probes]
idle_baseline = "0"
[service]
heartbeat_interval = "1s"
[[workloads]]
name = "chat-local"
every = "{"4s" if args.quick else "15s"}"
jitter = "0"
requests = 3
max_tokens = {16 if args.quick else 48}
[[workloads]]
name = "chat-speculative"
strategy = "speculative"
every = "{"5s" if args.quick else "20s"}"
jitter = "0"
requests = 2
max_tokens = {12 if args.quick else 32}
""")
    agent = subprocess.Popen([BIN / "lens-agent", "run", "--config", str(config)], start_new_session=True)
    procs.append(agent)
    state_file = work / "agent" / "service.json"
    runs: dict[str, int] = {}
    deadline = time.monotonic() + 150
    seen: dict[str, str] = {}
    while time.monotonic() < deadline and (len(runs) < 2 or min(runs.values()) < args.workload_runs):
        time.sleep(1)
        if state_file.exists():
            try:
                last = json.loads(state_file.read_text()).get("last_runs", {})
            except ValueError:
                continue
            for name, run in last.items():
                if seen.get(name) != run.get("at"):
                    seen[name] = run["at"]
                    runs[name] = runs.get(name, 0) + 1
                    print(
                        f"  {name}: run {runs[name]} done — TTFT p50 {run.get('ttft_p50_ms') or 0:.1f} ms, "
                        f"{run.get('tokens_per_second') or 0:.0f} tok/s, {plural(run.get('errors') or 0, 'error')}",
                        flush=True,
                    )
    time.sleep(4)  # one more sync interval
    agent.send_signal(signal.SIGTERM)
    agent.wait(90)
    procs.remove(agent)

    say("5. lens-agent status")
    subprocess.run([BIN / "lens-agent", "status", "--config", str(config)])
    say("what the aggregator holds")
    devices = json.load(urllib.request.urlopen(f"http://127.0.0.1:{agg_port}/api/v1/devices"))["devices"]
    for device in devices:
        print(
            f"  {device['device_id']}: {plural(device['records'], 'record')}, "
            f"{plural(device['duplicates'], 'duplicate')}, "
            f"{device['dropped_total']} dropped"
        )
    cloud.send_signal(signal.SIGTERM)  # not needed any more; the aggregator stays
    cloud.wait(30)
    procs.remove(cloud)
    fleet = f"http://127.0.0.1:{agg_port}/"
    print(f"\nbenchmark JSON: {work / 'bench.json'}\nagent state:    {state_file}")
    if args.no_keep:
        return
    say(f"the fleet page: {fleet}  (also {fleet}metrics and {fleet}api/v1/fleet); Ctrl-C stops the aggregator")
    agg.wait()  # until Ctrl-C (or the aggregator stops by itself)


if __name__ == "__main__":
    sys.exit(main())
