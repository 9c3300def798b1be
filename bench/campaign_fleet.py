"""Campaigns as a fleet lives them: how long from ``start`` to a device running its job, and what one campaign device
costs the aggregator, measured in one run.

    .venv/bin/python bench/campaign_fleet.py [--intervals 1,5] [--devices 500]

**Start → running.** A real ``lens-aggregator serve`` and one real ``lens-agent run`` service (the tiny test model,
nothing scheduled to upload) at each ``sync.interval`` in ``--intervals``: the campaign is started when the device is
idle, and the time until its job reads ``running`` — then ``succeeded`` — in the status API is taken from the
operator's side (polled every 50 ms). An idle device learns of a job from its job-list poll, once per sync interval;
a busy one from its next acknowledgement.

**Cost per campaign device.** The same aggregator, ``--devices`` device tokens with facts; one campaign over all of
them, then each device does what a device does for a one-level job — poll its job list, GET the job, POST running,
POST succeeded — over HTTP, 16 devices at a time. The aggregator process's CPU time (user + system, from
/proc/<pid>/stat) over that phase ÷ devices, beside the same for one upload of a 20-record batch per device (the
work a device brings anyway): the ratio says what a campaign adds to a device's usual cost.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp

from agent.synthetic import synthetic_records
from aggregator.store import SQLiteStore
from lens_core import wire
from tests.netproxy import free_port
from tests.processes import AggregatorProcess
from tests.tinymodel import write_tiny_llama

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
SUITE = {
    "test_suite": {"name": "bench"},
    "models": [{"name": "m", "endpoint": "gguf:default"}],
    "workloads": [{"name": "w", "output_token_target": 4, "requests": 2, "warmup_requests": 0}],
}


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def api(url: str, token: str, method: str, path: str, body: Any = None) -> Any:
    request = urllib.request.Request(
        url + path,
        data=json.dumps(body).encode() if body is not None else None,
        method=method,
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )
    with urllib.request.urlopen(request, timeout=30) as answer:
        return json.loads(answer.read())


def start_to_running(tmp: Path, model: Path, interval: float) -> tuple[float, float]:
    db = tmp / f"agg-{interval:g}.db"
    server = AggregatorProcess(db, free_port())
    store = SQLiteStore(db)
    now = time.time_ns() // 1000
    device_token, operator = store.add_token("dev-1", "device", now), store.add_token("ops", "operator", now)
    store.close()
    home = tmp / f"dev-{interval:g}"
    home.mkdir()
    (home / "token").write_text(device_token)
    config = home / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "dev-1"
data_dir = "{home / "data"}"
[model]
path = "{model}"
n_ctx = 256
n_threads = 1
[probes]
idle_baseline = "0"
power_source = "none"
[gates]
skip_when_throttled = false
[sync]
url = "http://127.0.0.1:{server.port}"
allow_http = true
token_file = "{home / "token"}"
interval = "{interval:g}s"
[[workloads]]
name = "idle"
every = "6h"
requests = 1
max_tokens = 2
""")
    server.start()
    log = (home / "agent.log").open("wb")
    agent = subprocess.Popen([*AGENT, "run", "--config", str(config)], cwd=ROOT, stdout=log, stderr=log)
    url = f"http://127.0.0.1:{server.port}"
    try:
        for _ in range(600):  # the device is known (its facts arrived) and idle
            if api(url, operator, "GET", "/api/v1/fleet").get("devices"):
                break
            time.sleep(0.1)
        time.sleep(interval * 1.5)  # past its first poll: the next one is a whole interval away at most
        t0 = time.monotonic()
        campaign = api(
            url, operator, "POST", "/api/v1/benchmark/start", {"configuration": SUITE, "target": {"all": True}}
        )
        running = succeeded = None
        while time.monotonic() - t0 < 120 and succeeded is None:
            state = api(url, operator, "GET", f"/api/v1/benchmark/{campaign['benchmark_id']}/status")["devices"][
                "dev-1"
            ]
            if state["state"] in ("running", "succeeded") and running is None:
                running = time.monotonic() - t0
            if state["state"] == "succeeded":
                succeeded = time.monotonic() - t0
            time.sleep(0.05)
        return running or float("nan"), succeeded or float("nan")
    finally:
        agent.send_signal(signal.SIGTERM)
        agent.wait(60)
        server.stop()


async def per_device_cost(tmp: Path, devices: int) -> tuple[float, float]:
    db = tmp / "cost.db"
    server = AggregatorProcess(db, free_port())
    store = SQLiteStore(db)
    now = time.time_ns() // 1000
    tokens = {f"dev-{i:04d}": store.add_token(f"dev-{i:04d}", "device", now) for i in range(devices)}
    operator = store.add_token("ops", "operator", now)
    store.close()
    server.start()
    url = f"http://127.0.0.1:{server.port}"
    assert server.proc is not None
    pid = server.proc.pid
    limit = asyncio.Semaphore(16)
    try:
        async with aiohttp.ClientSession() as session:

            async def upload(device: str, token: str, seed: int) -> None:
                records = synthetic_records(20, seed=seed, device_id=device)
                body = wire.encode_batch(
                    [wire.encode_record(r, "cbor") for r in records],
                    device_id=device,
                    batch_id=f"b{seed}",
                    sent_us=now,
                    codec="cbor",
                )
                async with (
                    limit,
                    session.post(
                        url + "/api/v1/ingest", data=body, headers={"Authorization": f"Bearer {token}"}
                    ) as answer,
                ):
                    assert answer.status == 200, await answer.text()

            # every device known (a first batch), then one more batch each, timed: the usual cost
            await asyncio.gather(*(upload(d, t, 1) for d, t in tokens.items()))
            before = cpu_seconds(pid)
            await asyncio.gather(*(upload(d, t, 2) for d, t in tokens.items()))
            upload_cpu = (cpu_seconds(pid) - before) / devices

            started = api(
                url, operator, "POST", "/api/v1/benchmark/start", {"configuration": SUITE, "target": {"all": True}}
            )
            campaign = started["benchmark_id"]

            async def job(device: str, token: str) -> None:
                headers = {"Authorization": f"Bearer {token}"}
                base = f"{url}/api/v1/devices/{device}/jobs"
                async with limit:
                    async with session.get(base, headers=headers) as answer:
                        assert answer.status == 200
                    async with session.get(f"{base}/{campaign}", headers=headers) as answer:
                        assert answer.status == 200
                    for state, done in (("running", 0), ("succeeded", 1)):
                        body = {
                            "state": state,
                            "progress_percent": 100.0 * done,
                            "levels_done": done,
                            "levels_total": 1,
                        }
                        async with session.post(f"{base}/{campaign}", json=body, headers=headers) as answer:
                            assert answer.status == 200, await answer.text()

            before = cpu_seconds(pid)
            await asyncio.gather(*(job(d, t) for d, t in tokens.items()))
            job_cpu = (cpu_seconds(pid) - before) / devices
            status = api(url, operator, "GET", f"/api/v1/benchmark/{campaign}/status")
            assert status["status"] == "completed", status["counts"]
        return job_cpu, upload_cpu
    finally:
        server.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--intervals", default="1,5", help="sync intervals in seconds, comma-separated")
    parser.add_argument("--devices", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        model = tmp / "tiny.gguf"
        write_tiny_llama(model, seed=1)
        print("start → running / succeeded, one idle device (tiny model, one level of 2 requests)")
        print(f"{'sync interval':>14}{'→ running':>12}{'→ succeeded':>13}{'running ÷ interval':>20}")
        for interval in (float(x) for x in args.intervals.split(",")):
            running, succeeded = start_to_running(tmp, model, interval)
            print(f"{interval:>13g}s{running:>11.2f}s{succeeded:>12.2f}s{running / interval:>20.2f}")
        job_cpu, upload_cpu = asyncio.run(per_device_cost(tmp, args.devices))
        print(f"\naggregator CPU per device, {args.devices} devices")
        print(f"  one-level campaign job (list, GET, 2 POSTs): {job_cpu * 1e3:.2f} ms")
        print(f"  one 20-record upload:                        {upload_cpu * 1e3:.2f} ms")
        print(f"  job ÷ upload:                                {job_cpu / upload_cpu:.2f}")


if __name__ == "__main__":
    main()
