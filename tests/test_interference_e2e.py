"""A contended run, end to end: ``lens-agent bench`` beside busy loops on this machine, its records uploaded by
``lens-agent sync`` to a real ``lens-aggregator serve``, and the mark read back where an operator reads it — the
results document (schema-valid), the fleet API's contended share, /metrics, and feedback, which leaves the
contended requests out unless told otherwise."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any

import jsonschema

from .hogs import cpu_hog
from .processes import DEVICE, AggregatorProcess, device_token

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
AGGREGATOR = [sys.executable, "-c", "from aggregator.cli import main; main()"]
RUNS = 4


def run(command: list[str], *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([*command, *args], capture_output=True, text=True, env=env, timeout=300)


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as answer:
        body: bytes = answer.read()
        return body


def test_a_run_beside_busy_loops_is_marked_contended_on_the_device_and_in_the_fleet(
    tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess, results_schema: dict[str, Any]
) -> None:
    token = tmp_path / "token"
    token.write_text(device_token(aggregator.db))
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""
[agent]
device_id = "{DEVICE}"
data_dir = "{tmp_path / "data"}"
[model]
path = "{tiny_model}"
n_ctx = 256
n_threads = 2
[sync]
url = "http://127.0.0.1:{aggregator.port}"
allow_http = true
token_file = "{token}"
"""
    )
    results = tmp_path / "results.json"
    # three busy loops on two cores: whatever else the machine runs, other processes use more than the run leaves
    with cpu_hog(3):
        bench = run(
            AGENT, "bench", "--config", str(config), "--store", "--runs", str(RUNS), "--max-tokens", "16",
            "--ignore-eos", "--power-source", "none", "--idle-baseline", "0", "--no-progress",
            "--output", str(results),
        )  # fmt: skip
    assert bench.returncode == 0, bench.stderr[-2000:]
    line = next(line for line in bench.stdout.splitlines() if line.startswith(("contended: ", "interference: ")))
    assert line.startswith("contended: other processes used "), bench.stdout

    document = json.loads(results.read_text())
    jsonschema.validate(document, results_schema)
    section = document["results"]["interference"]
    assert section["contended"] is True and section["requests"] == RUNS
    # each request ran with three busy loops beside it on two cores: each one is contended, with the CPU as a reason
    assert section["contended_requests"] == RUNS and section["reasons"].get("cpu") == RUNS, section
    assert document["configuration"]["n_threads_source"] == "config"

    sync = run(AGENT, "sync", "--config", str(config))
    assert sync.returncode == 0, sync.stdout + sync.stderr

    base = f"http://127.0.0.1:{aggregator.port}"
    fleet = json.loads(get(base + "/api/v1/fleet"))
    [device] = [d for d in fleet["devices"] if d["device_id"] == DEVICE]
    share = 1.0
    assert device["contended_share"] == share, (device, section)
    metrics = get(base + "/metrics").decode()
    gauge = f'llm_latency_lens_device_contended_share{{device="{DEVICE}"}} '
    assert any(line.startswith(gauge) and abs(float(line.split()[-1]) - share) < 1e-9 for line in metrics.splitlines())

    left_out = run(AGGREGATOR, "feedback", "--db", str(aggregator.db), "--json")
    assert left_out.returncode == 0, left_out.stderr
    kept = run(AGGREGATOR, "feedback", "--db", str(aggregator.db), "--json", "--include-contended")
    assert kept.returncode == 0, kept.stderr
    # every request was contended: by default the device has no document, and the answer says why
    answer = json.loads(left_out.stdout)
    assert answer["documents"] == [] and answer["include_contended"] is False
    [left] = answer["all_contended"]
    assert left["device_id"] == DEVICE and left["contended_excluded"] == RUNS
    text = run(AGGREGATOR, "feedback", "--db", str(aggregator.db))
    assert text.returncode == 0, text.stderr
    assert f"no document: its {RUNS} successful requests were all contended and left out" in text.stdout
    [doc] = [d for d in json.loads(kept.stdout)["documents"] if d["device_id"] == DEVICE]
    assert doc["include_contended"] is True and doc["observation_window"]["sample_count"] == RUNS
