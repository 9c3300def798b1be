"""Benchmark campaigns end to end, as an operator and a fleet run them: a real ``lens-aggregator serve`` and three real
``lens-agent run`` services on the tiny model, each on its own sysfs fixture tree (a Jetson AGX Orin, a Jetson Nano,
an Intel laptop), on 127.0.0.1. A campaign reaches every targeted device, completes, and is compared per class; the
exports open in pyarrow and agree with the JSON; the completion callback arrives signed; a device that is offline
past the deadline ends ``timed_out`` while the others complete (the aggregator's wall clock is stepped past the
deadline with libfaketime, as in tests/test_clock_step.py); a cancel stops running devices at their next check."""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from aggregator.store import SQLiteStore

from .netproxy import free_port
from .processes import AggregatorProcess, stepped_clock_env
from .sysfs_trees import intel_laptop, nano_jp4, orin_jp6, set_zone_temp

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
SECRET = b"campaign-callback-secret-0123456789"
DEVICES = {"orin-001": orin_jp6, "nano-001": nano_jp4, "laptop-001": intel_laptop}
DEADLINE_S = 60  # the shortest deadline a campaign accepts


class Receiver:
    """A completion-callback receiver on 127.0.0.1 that checks the signature as an operator's CI would."""

    def __init__(self) -> None:
        self.port = free_port()
        self.calls: list[dict[str, Any]] = []
        self._ready = threading.Event()
        self._loop: Any = None
        self._thread = threading.Thread(target=self._serve, daemon=True)

    def _serve(self) -> None:
        import asyncio

        async def hook(request: web.Request) -> web.Response:
            body = await request.read()
            stamp = request.headers.get("X-Lens-Timestamp", "")
            expected = "sha256=" + hmac.new(SECRET, stamp.encode() + b"." + body, hashlib.sha256).hexdigest()
            signed = hmac.compare_digest(expected, request.headers.get("X-Lens-Signature", ""))
            self.calls.append({"signed": signed, "body": json.loads(body)})
            return web.Response(status=204)

        async def main() -> None:
            app = web.Application()
            app.router.add_post("/hook", hook)
            runner = web.AppRunner(app)
            await runner.setup()
            await web.TCPSite(runner, "127.0.0.1", self.port).start()
            self._ready.set()
            while not self._stop:
                await asyncio.sleep(0.05)
            await runner.cleanup()

        self._stop = False
        asyncio.run(main())

    def __enter__(self) -> Receiver:
        self._thread.start()
        self._ready.wait(10)
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self._thread.join(10)


class Fleet:
    def __init__(self, tmp_path: Path, tiny_model: Path, *, stepped_clock: bool = False) -> None:
        """``stepped_clock``: the aggregator runs on a wall clock the test steps (``step_aggregator_clock``)."""
        self.tmp, self.model = tmp_path, tiny_model
        self.clock_offset = tmp_path / "aggregator-clock"
        (tmp_path / "secret").write_bytes(SECRET)
        config = tmp_path / "aggregator.toml"
        config.write_text(
            "[campaigns]\n"
            'check_interval = "1s"\n'
            f'callback_secret_file = "{tmp_path / "secret"}"\n'
            "allow_private_callbacks = true\n"
        )
        self.db = tmp_path / "agg.db"
        env = stepped_clock_env(self.clock_offset) if stepped_clock else None
        self.server = AggregatorProcess(self.db, free_port(), config, env=env)
        self.agents: dict[str, subprocess.Popen[bytes]] = {}
        store = SQLiteStore(self.db)
        try:
            now = time.time_ns() // 1000
            self.tokens = {device: store.add_token(device, "device", now) for device in DEVICES}
            self.operator = store.add_token("ci", "operator", now)
        finally:
            store.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.port}"

    def start_agent(self, device: str) -> None:
        home = self.tmp / device
        if not home.exists():
            DEVICES[device](home / "sys")
            if device.startswith("orin"):
                set_zone_temp(home / "sys", 1, 60.0)  # the fixture's GPU zone is past its trip point: cool it
            (home / "token").write_text(self.tokens[device] + "\n")
        config = home / "agent.toml"
        config.write_text(f"""
[agent]
device_id = "{device}"
data_dir = "{home / "data"}"
[model]
path = "{self.model}"
n_ctx = 256
n_threads = 1
[probes]
sysfs_root = "{home / "sys"}"
idle_baseline = "0"
power_source = "none"
[sync]
url = "{self.url}"
allow_http = true
token_file = "{home / "token"}"
interval = "1s"
[[workloads]]
name = "idle"
every = "6h"
requests = 1
max_tokens = 2
""")
        clean = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
        log = (home / "agent.log").open("ab")
        self.agents[device] = subprocess.Popen(
            [*AGENT, "run", "-v", "--config", str(config)], cwd=ROOT, env=clean, stdout=log, stderr=log
        )

    def step_aggregator_clock(self, seconds: int) -> None:
        """Moves the aggregator's wall clock ``seconds`` ahead of the real one (its monotonic clock, and so its
        periodic tasks, go on as before); the agents and the test keep the real time."""
        assert self.server.env is not None, "a Fleet(stepped_clock=True) only"
        written = self.clock_offset.with_suffix(".new")
        written.write_text(f"+{seconds}\n")
        written.replace(self.clock_offset)  # at once: libfaketime reads the file at every call, never half of it

    def stop_agent(self, device: str) -> None:
        proc = self.agents.pop(device)
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(60)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(10)
        log = (self.tmp / device / "agent.log").read_text()
        assert "Traceback" not in log, log[-3000:]

    def api(self, method: str, path: str, body: Any = None, token: str | None = None) -> tuple[int, Any]:
        request = urllib.request.Request(
            self.url + path,
            data=json.dumps(body).encode() if body is not None else None,
            method=method,
            headers={"Authorization": f"Bearer {token or self.operator}", "Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as answer:
                raw = answer.read()
                kind = answer.headers.get("Content-Type", "")
                return answer.status, (json.loads(raw) if "json" in kind else raw)
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read() or b"null")

    def logs(self) -> str:
        tails = [f"--- {d}\n" + (self.tmp / d / "agent.log").read_text()[-2000:] for d in DEVICES]
        return "\n".join(tails) + "\n--- aggregator\n" + self.server.stderr_text()[-3000:]


@contextlib.contextmanager
def running(fleet: Fleet) -> Iterator[Fleet]:
    fleet.server.start()
    try:
        for device in DEVICES:
            fleet.start_agent(device)
        yield fleet
    finally:
        for device in list(fleet.agents):
            fleet.stop_agent(device)
        fleet.server.stop()


@pytest.fixture
def fleet(tmp_path: Path, tiny_model: Path) -> Iterator[Fleet]:
    with running(Fleet(tmp_path, tiny_model)) as started:
        yield started


@pytest.fixture
def stepped_fleet(tmp_path: Path, tiny_model: Path) -> Iterator[Fleet]:
    """The fleet with its aggregator on a wall clock the test steps: a deadline passes without waiting for it."""
    with running(Fleet(tmp_path, tiny_model, stepped_clock=True)) as started:
        yield started


def wait_for(fleet: Fleet, what: str, check: Callable[[], Any], timeout: float) -> Any:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        value = check()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}\n{fleet.logs()}")


def suite(requests: int, levels: list[int], workloads: int = 1) -> dict[str, Any]:
    return {
        "test_suite": {"name": "fleet-nightly", "version": "1"},
        "models": [{"name": "device-model", "endpoint": "gguf:default"}],
        "workloads": [
            {
                "name": f"w{i}",
                "output_token_target": 4,
                "concurrency_levels": levels,
                "requests": requests,
                "warmup_requests": 0,
            }
            for i in range(workloads)
        ],
    }


def status(fleet: Fleet, campaign: str) -> dict[str, Any]:
    code, body = fleet.api("GET", f"/api/v1/benchmark/{campaign}/status")
    assert code == 200, body
    return body  # type: ignore[no-any-return]


def known_with_facts(fleet: Fleet) -> bool:
    store = SQLiteStore(fleet.db)
    try:
        from aggregator.store import Query

        return all(store.latest(Query(device=d, kind="device_facts"), 1) for d in DEVICES)
    finally:
        store.close()


def test_a_campaign_reaches_the_fleet_and_is_compared_per_class(fleet: Fleet) -> None:
    import pyarrow.ipc
    import pyarrow.parquet

    wait_for(fleet, "every device's facts at the aggregator", lambda: known_with_facts(fleet), 120)
    # a device token can neither start nor read a campaign
    code, body = fleet.api("POST", "/api/v1/benchmark/start", {}, token=fleet.tokens["orin-001"])
    assert code == 403 and body["error"] == "operator_token_required"
    # a hostile configuration is refused with its JSON path before any device sees it
    bad = suite(2, [1])
    bad["workloads"][0]["concurrency"] = 10**6
    del bad["workloads"][0]["concurrency_levels"]
    code, body = fleet.api("POST", "/api/v1/benchmark/start", {"configuration": bad, "target": {"all": True}})
    assert code == 400 and body["path"] == "$.workloads[0].concurrency", body

    with Receiver() as receiver:
        code, started = fleet.api(
            "POST",
            "/api/v1/benchmark/start",
            {
                "configuration": suite(2, [1, 2], workloads=2),
                "target": {"classes": ["embedded device", "laptop"]},
                "deadline_seconds": 900,
                "callback_url": f"http://127.0.0.1:{receiver.port}/hook",
                "name": "nightly",
            },
        )
        assert code == 201, started
        campaign = started["benchmark_id"]
        assert sorted(started["devices"]) == sorted(DEVICES)
        done = wait_for(
            fleet, "the campaign to complete", lambda: status(fleet, campaign)["status"] == "completed", 300
        )
        assert done
        final = status(fleet, campaign)
        assert {d: s["state"] for d, s in final["devices"].items()} == dict.fromkeys(DEVICES, "succeeded")
        assert final["progress_percent"] == 100
        wait_for(fleet, "the completion callback", lambda: receiver.calls, 60)
    (call,) = receiver.calls
    assert call["signed"] and call["body"]["benchmark_id"] == campaign and call["body"]["status"] == "completed"

    code, results = fleet.api("GET", f"/api/v1/benchmark/{campaign}/results")
    assert code == 200, results
    devices = results["results"]["devices"]
    for device in DEVICES:
        documents = devices[device]["documents"]
        assert len(documents) == 4  # 2 workloads × 2 levels, each counted once
        assert all(doc["results"]["requests"]["measured"] == 2 for doc in documents)
    classes = results["results"]["classes"]
    assert len(classes) == 3  # the Orin, the Nano and the laptop each a class of their own (class · model)
    assert any("Orin" in name for name in classes) and any("Nano" in name for name in classes)
    assert any(name.startswith("laptop") for name in classes)

    # exports: the JSON rows, and the same rows in Arrow IPC, Parquet and CSV
    code, rows = fleet.api("GET", f"/api/v1/benchmark/{campaign}/export?format=json")
    assert code == 200
    rows = rows["rows"] if isinstance(rows, dict) else rows
    assert len(rows) == 12
    code, arrow = fleet.api("GET", f"/api/v1/benchmark/{campaign}/export?format=arrow")
    assert code == 200
    table = pyarrow.ipc.open_stream(io.BytesIO(arrow)).read_all()
    code, parquet = fleet.api("GET", f"/api/v1/benchmark/{campaign}/export?format=parquet")
    assert code == 200
    assert pyarrow.parquet.read_table(io.BytesIO(parquet)).equals(table)
    by_key = {(r["device_id"], r["workload"], r["level"]): r for r in rows}
    for r in table.to_pylist():
        assert r["ttft_p50_ms"] == pytest.approx(by_key[(r["device_id"], r["workload"], r["level"])]["ttft_p50_ms"])
    code, csv_bytes = fleet.api("GET", f"/api/v1/benchmark/{campaign}/export?format=csv")
    assert code == 200 and len(csv_bytes.decode().strip().splitlines()) == 13


def test_an_offline_device_times_out_and_a_cancel_stops_the_running_ones(stepped_fleet: Fleet) -> None:
    fleet = stepped_fleet
    wait_for(fleet, "every device's facts at the aggregator", lambda: known_with_facts(fleet), 120)
    fleet.stop_agent("laptop-001")  # offline from now on
    code, started = fleet.api(
        "POST",
        "/api/v1/benchmark/start",
        {"configuration": suite(1, [1]), "target": {"all": True}, "deadline_seconds": DEADLINE_S},
    )
    assert code == 201, started
    short, short_started = started["benchmark_id"], time.monotonic()
    wait_for(
        fleet,
        "the two online devices to finish",
        lambda: all(status(fleet, short)["devices"][d]["state"] == "succeeded" for d in ("orin-001", "nano-001")),
        120,
    )
    # a long campaign on the two online devices (a level of ~10 s: 400 requests of 4 tokens took ~1 s, less than
    # the cancel takes to reach a device), cancelled once both run it
    code, started = fleet.api(
        "POST",
        "/api/v1/benchmark/start",
        {"configuration": suite(4000, [1]), "target": {"devices": ["orin-001", "nano-001"]}},
    )
    assert code == 201, started
    long_run = started["benchmark_id"]
    wait_for(
        fleet,
        "both devices to run the long campaign",
        lambda: all(s["state"] == "running" for s in status(fleet, long_run)["devices"].values()),
        120,
    )
    code, body = fleet.api("POST", f"/api/v1/benchmark/{long_run}/cancel")
    assert code == 200 and body["status"] == "cancelled"
    wait_for(
        fleet,
        "both devices to stop and confirm",
        lambda: all(s["state"] == "cancelled" for s in status(fleet, long_run)["devices"].values()),
        120,
    )
    levels = fleet.api("GET", f"/api/v1/benchmark/{long_run}/results")[1]["results"]["devices"]
    assert all(not d["documents"] for d in levels.values())  # an interrupted level is never a result
    # before its deadline the offline device's job is still open (deadline checks, one a second, have run)
    time.sleep(max(0.0, short_started + 3 - time.monotonic()))
    before = status(fleet, short)
    assert before["status"] != "completed" and before["devices"]["laptop-001"]["state"] == "queued", before
    # the aggregator's wall clock passes the deadline (no waiting a minute for it): the offline device's job ends
    # timed_out at its next deadline check; the campaign completes with the others
    fleet.step_aggregator_clock(DEADLINE_S + 30)
    wait_for(fleet, "the deadline", lambda: status(fleet, short)["status"] == "completed", 120)
    final = status(fleet, short)["devices"]
    assert final["laptop-001"]["state"] == "timed_out" and "deadline" in final["laptop-001"]["reason"]
    assert final["orin-001"]["state"] == final["nano-001"]["state"] == "succeeded"


def test_an_agent_killed_mid_job_resumes_and_no_level_counts_twice(fleet: Fleet) -> None:
    wait_for(fleet, "every device's facts at the aggregator", lambda: known_with_facts(fleet), 120)
    for device in ("nano-001", "laptop-001"):
        fleet.stop_agent(device)
    code, started = fleet.api(
        "POST",
        "/api/v1/benchmark/start",
        {"configuration": suite(30, [1, 2, 3]), "target": {"devices": ["orin-001"]}},
    )
    assert code == 201, started
    campaign = started["benchmark_id"]
    wait_for(
        fleet,
        "the first level to be done",
        lambda: status(fleet, campaign)["devices"]["orin-001"]["levels_done"] >= 1,
        180,
    )
    proc = fleet.agents.pop("orin-001")
    proc.send_signal(signal.SIGKILL)  # mid-job: no goodbye, no final sync
    proc.wait(10)
    fleet.start_agent("orin-001")
    wait_for(
        fleet, "the job to finish after the restart", lambda: status(fleet, campaign)["status"] == "completed", 300
    )
    assert status(fleet, campaign)["devices"]["orin-001"]["state"] == "succeeded"
    documents = fleet.api("GET", f"/api/v1/benchmark/{campaign}/results")[1]["results"]["devices"]["orin-001"]
    levels = [doc["configuration"]["suite"]["level"] for doc in documents["documents"]]
    assert sorted(levels) == ["concurrency 1", "concurrency 2", "concurrency 3"]  # each level once
    assert all(doc["results"]["requests"]["measured"] == 30 for doc in documents["documents"])
