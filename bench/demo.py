"""The demo behind ``make demo``: the whole path on this machine, in a few minutes, then everything stopped.

1. ``lens-agent bench`` on the bundled SmolLM2 (the measurement core: TTFT, TPOT, every gap, the lens's overhead);
2. an aggregator on 127.0.0.1 with its SQLite store, and a device token for this machine;
3. a llama-cpp-python server on 127.0.0.1 standing in for the cloud model;
4. ``lens-agent run`` with a short schedule: a local workload and a speculative one (SmolLM2 drafts, the "cloud"
   verifies with the ``generate`` protocol — SmolLM2 adds no BOS, so echoed logprobs would misalign), syncing
   every few seconds, until each workload has run twice;
5. ``lens-agent status``, what the aggregator holds per device, and where to look;
6. SIGTERM to everything.

Everything it writes goes to ``.demo/`` in the checkout (kept for a look afterwards, removed on the next run).
"""

from __future__ import annotations

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


def main() -> None:
    shutil.rmtree(WORK, ignore_errors=True)
    WORK.mkdir()
    sys.path.insert(0, str(ROOT))
    from agent.engines.modelfile import bundled_model_path

    model = bundled_model_path()
    if model is None:
        raise SystemExit("demo: the bundled SmolLM2 is missing (make venv installs it)")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        say("1. lens-agent bench: SmolLM2-135M on this machine")
        subprocess.run(
            [
                BIN / "lens-agent",
                "bench",
                "--runs",
                "8",
                "--warmup",
                "2",
                "--max-tokens",
                "64",
                "--output",
                str(WORK / "bench.json"),
                "--progress",
            ],
            check=True,
        )

        say("2. lens-aggregator on 127.0.0.1, with a token for this device")
        agg_port = free_port()
        db = WORK / "aggregator.db"
        token = subprocess.run(
            [BIN / "lens-aggregator", "token", "add", "demo-device", "--db", str(db)],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
        (WORK / "token").write_text(token)
        procs.append(
            subprocess.Popen(
                [BIN / "lens-aggregator", "serve", "--db", str(db), "--port", str(agg_port)], stderr=subprocess.DEVNULL
            )
        )
        wait_http(f"http://127.0.0.1:{agg_port}/api/v1/health", 30)
        print(f"aggregator: http://127.0.0.1:{agg_port}")

        say("3. a llama-cpp-python server on 127.0.0.1 as the cloud model")
        cloud_port = free_port()
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "llama_cpp.server",
                    "--model",
                    str(model),
                    "--host",
                    "127.0.0.1",
                    "--port",
                    str(cloud_port),
                    "--n_ctx",
                    "2048",
                    "--n_threads",
                    "1",
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
        wait_http(f"http://127.0.0.1:{cloud_port}/v1/models", 90)
        print(
            f"cloud: http://127.0.0.1:{cloud_port}/v1 (SmolLM2 again: the demo has no bigger model of the same vocab)"
        )

        say("4. lens-agent run: a local and a speculative workload on a short schedule, syncing as it goes")
        config = WORK / "agent.toml"
        config.write_text(f"""
[agent]
device_id = "demo-device"
data_dir = "{WORK / "agent"}"
[model]
n_threads = 1
[sync]
url = "http://127.0.0.1:{agg_port}"
allow_http = true
token_file = "{WORK / "token"}"
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
every = "15s"
jitter = "0"
requests = 3
max_tokens = 48
[[workloads]]
name = "chat-speculative"
strategy = "speculative"
every = "20s"
jitter = "0"
requests = 2
max_tokens = 32
""")
        agent = subprocess.Popen([BIN / "lens-agent", "run", "--config", str(config)])
        procs.append(agent)
        state_file = WORK / "agent" / "service.json"
        runs: dict[str, int] = {}
        deadline = time.monotonic() + 150
        seen: dict[str, str] = {}
        while time.monotonic() < deadline and (len(runs) < 2 or min(runs.values()) < 2):
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
                            f"{run.get('tokens_per_second') or 0:.0f} tok/s, {run.get('errors', 0)} errors",
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
                f"  {device['device_id']}: {device['records']} records, {device['duplicates']} duplicates, "
                f"{device['dropped_total']} dropped"
            )
        print(
            f"\nbenchmark JSON: {WORK / 'bench.json'}\nagent state:    {state_file}\n"
            f"the fleet view: {BIN / 'lens-aggregator'} serve --db {db} --port 8443, then open "
            "http://127.0.0.1:8443/ (the page), /metrics (Prometheus), /api/v1/fleet"
        )
    finally:
        say("6. stopping")
        for proc in reversed(procs):
            proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
        print("stopped: the aggregator, the cloud server and the agent", flush=True)


if __name__ == "__main__":
    main()
