"""Fleet statistics split by strategy (issue 12): a device that runs local and speculative workloads shows each
strategy's TTFT p95 and tok/s apart on /api/v1/fleet and the fleet page, never one figure mixing both; warm-ups
(kind ``warmup``) are uploaded but counted nowhere. Real aggregator process, real ``lens-agent sync``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

from agent.outbox import Outbox
from agent.synthetic import synthetic_records

from .processes import DEVICE, AggregatorProcess, device_token

ROOT = Path(__file__).resolve().parents[1]


def test_fleet_figures_per_strategy_and_no_warmups(tmp_path: Path, aggregator: AggregatorProcess) -> None:
    records = synthetic_records(30, seed=3, device_id=DEVICE)
    for n, record in enumerate(records):
        record["ok"], record["error_type"] = True, None
        if n % 3 == 0:  # every third request speculative, ten times slower to its first token
            record["strategy"] = "speculative"
            record["ttft_ms"] = 1000.0 + n
        else:
            record["strategy"] = "local"
            record["ttft_ms"] = 100.0 + n
    for record in records[:2]:
        record["kind"], record["warmup"] = "warmup", True  # as bench --store and the service store warm-ups
    with Outbox(tmp_path / "data" / "outbox.db") as box:
        box.append_many(records)
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    env.update(
        {
            "LENS_AGENT_DATA_DIR": str(tmp_path / "data"),
            "LENS_AGENT_DEVICE_ID": DEVICE,
            "LENS_SYNC_URL": f"http://127.0.0.1:{aggregator.port}",
            "LENS_SYNC_ALLOW_HTTP": "true",
            "LENS_SYNC_TOKEN": device_token(aggregator.db),
        }
    )
    done = subprocess.run(
        [sys.executable, "-c", "from agent.cli import main; main()", "sync", "--config", os.devnull],
        env=env, capture_output=True, text=True, timeout=60, cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    base = f"http://127.0.0.1:{aggregator.port}"
    fleet = json.load(urllib.request.urlopen(base + "/api/v1/fleet", timeout=10))["devices"]
    (device,) = fleet
    split = device["by_strategy"]
    assert set(split) == {"local", "speculative"}
    measured = records[2:]
    assert split["local"]["requests"] + split["speculative"]["requests"] == len(measured)
    assert 100 < split["local"]["ttft_p95_ms"] < 200 and split["speculative"]["ttft_p95_ms"] > 1000
    assert device["strategy"] == measured[-1]["strategy"]
    assert device["ttft_p95_ms"] == split[device["strategy"]]["ttft_p95_ms"]
    page = urllib.request.urlopen(base + "/", timeout=10).read().decode()
    assert "by_strategy" in page  # the page renders one figure per strategy
    metrics = urllib.request.urlopen(base + "/metrics", timeout=10).read().decode()
    counted = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("llm_latency_lens_requests_total{")
    )
    assert counted == len(measured)  # warm-ups are not counted
    summary = json.load(urllib.request.urlopen(base + "/api/v1/summary?group_by=strategy", timeout=10))["groups"]
    assert {name: group["requests"] for name, group in summary.items()} == {
        "local": sum(1 for r in measured if r["strategy"] == "local"),
        "speculative": sum(1 for r in measured if r["strategy"] == "speculative"),
    }
