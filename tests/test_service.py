"""lens-agent run as a real subprocess: schedules, sync to a real aggregator, status, systemd notify, signals."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.facts import device_facts
from agent.gates import DeviceState, gate
from agent.outbox import Outbox
from agent.probes.sysfs import Root
from lens_core.errors import ConfigError

from .netproxy import free_port
from .processes import AggregatorProcess, device_token
from .test_bench_cli import run_cli

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]


class NotifySocket:
    """What systemd would be: a datagram socket the service reports to (NOTIFY_SOCKET)."""

    def __init__(self) -> None:
        self.dir = tempfile.TemporaryDirectory()
        self.path = os.path.join(self.dir.name, "notify")
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.2)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except TimeoutError:
                return self.messages

    def close(self) -> None:
        self.sock.close()
        self.dir.cleanup()


def wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def service_config(
    tmp_path: Path, model: Path, agg: AggregatorProcess, token: str, *, every: str = "1s", name: str = "quick"
) -> Path:
    token_file = tmp_path / "token"
    token_file.write_text(token)
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "dev-1"
data_dir = "{tmp_path / "data"}"
[model]
path = "{model}"
n_ctx = 256
n_threads = 1
[sync]
url = "http://127.0.0.1:{agg.port}"
allow_http = true
token_file = "{token_file}"
interval = "1s"
[service]
heartbeat_interval = "500ms"
[[workloads]]
name = "{name}"
every = "{every}"
jitter = "0"
requests = 2
max_tokens = 6
""")
    return config


def start_service(config: Path, notify: NotifySocket | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if notify is not None:
        env["NOTIFY_SOCKET"] = notify.path
    return subprocess.Popen(
        [*AGENT, "run", "--config", str(config)],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def state(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "data" / "service.json"
    return dict(json.loads(path.read_text())) if path.exists() else {}


def aggregator_count(agg: AggregatorProcess) -> int:
    conn = sqlite3.connect(agg.db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0])
    finally:
        conn.close()


def test_service_measures_syncs_reports_and_stops_cleanly(
    tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess
) -> None:
    config = service_config(tmp_path, tiny_model, aggregator, device_token(aggregator.db))
    notify = NotifySocket()
    proc = start_service(config, notify)
    try:
        wait_for(
            lambda: len(state(tmp_path).get("last_runs", {})) == 1 and aggregator_count(aggregator) >= 3,
            60,
            "a workload run and a sync",
        )
        wait_for(lambda: state(tmp_path).get("stored_by_this_process", 0) >= 5, 30, "a second run")
        messages = notify.drain()
        assert any("READY=1" in m for m in messages)
        assert any("WATCHDOG=1" in m for m in messages)
        assert any(m.startswith("STATUS=") or "\nSTATUS=" in m for m in messages)

        code, out, _ = run_cli_status(config)
        doc = json.loads(out)
        assert code == 0 and doc["healthy"], doc["reasons"]
        svc = doc["service"]
        assert svc["running"] and svc["model"]["name"] == "tiny-llama" and svc["model"]["load_ms"] > 0
        run = svc["last_runs"]["quick"]
        assert run["requests"] == 2 and run["ttft_p50_ms"] > 0 and run["errors"] == 0
        assert "quick" in svc["next_runs"]

        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0, output
        assert any("STOPPING=1" in m for m in notify.drain())
        final = state(tmp_path)
        assert final["state"] == "stopped"
        # nothing stored is lost: what this process stored is either at the aggregator or still in the outbox
        with Outbox(tmp_path / "data" / "outbox.db") as box:
            pending = box.stats().records
        assert aggregator_count(aggregator) + pending == final["stored_by_this_process"]
        kinds = {row[0] for row in sqlite3.connect(aggregator.db).execute("SELECT DISTINCT kind FROM measurements")}
        assert {"model_load", "device_facts", "inference"} <= kinds
        # the device's facts, as this machine's sensors give them, on its fleet row
        with urllib.request.urlopen(f"http://127.0.0.1:{aggregator.port}/api/v1/fleet", timeout=30) as answer:
            (row,) = json.loads(answer.read())["devices"]
        here = device_facts(Root("/"))
        assert row["device_class"] == here["device_class"] and row["facts"]["reported_us"] > 0
        assert row["facts"]["model"] == here["model"] and row["facts"]["ram_gb"] == here["ram_gb"]
        # the service told the aggregator how long a silence to expect: max(its workload's 1 s, sync every 1 s)
        gaps = sqlite3.connect(aggregator.db).execute("SELECT expected_gap_s FROM devices").fetchall()
        assert gaps == [(1,)]
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


def run_cli_status(config: Path) -> tuple[int, str, str]:
    done = subprocess.run(
        [*AGENT, "status", "--config", str(config), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return done.returncode, done.stdout, done.stderr


def test_survives_sigkill_and_resumes(tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess) -> None:
    config = service_config(tmp_path, tiny_model, aggregator, device_token(aggregator.db))
    proc = start_service(config)
    try:
        wait_for(lambda: state(tmp_path).get("stored_by_this_process", 0) >= 3, 60, "a first run")
        first_pid = state(tmp_path)["pid"]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        # a stale heartbeat from a process that is gone: status says so
        time.sleep(2)
        code, out, _ = run_cli_status(config)
        doc = json.loads(out)
        assert code == 1 and any("heartbeat" in r for r in doc["reasons"]) and not doc["service"]["running"]
        before = aggregator_count(aggregator)
        proc = start_service(config)
        wait_for(
            lambda: state(tmp_path).get("pid") != first_pid and state(tmp_path).get("stored_by_this_process", 0) >= 3,
            60,
            "the restarted service to measure",
        )
        wait_for(lambda: aggregator_count(aggregator) > before, 30, "the restarted service to sync")
        proc.send_signal(signal.SIGTERM)
        proc.communicate(timeout=30)
        assert proc.returncode == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_sighup_reloads_the_workloads(tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess) -> None:
    token = device_token(aggregator.db)
    config = service_config(tmp_path, tiny_model, aggregator, token, every="1h")
    proc = start_service(config)
    try:
        wait_for(lambda: "quick" in state(tmp_path).get("next_runs", {}), 60, "the service to be ready")
        service_config(tmp_path, tiny_model, aggregator, token, every="1h", name="renamed")
        proc.send_signal(signal.SIGHUP)
        wait_for(lambda: set(state(tmp_path).get("next_runs", {})) == {"renamed"}, 30, "the reload")
        # a broken config on reload is refused and the service keeps running
        config.write_text(config.read_text().replace('every = "1h"', 'every = "soon"'))
        proc.send_signal(signal.SIGHUP)
        time.sleep(1.5)
        assert proc.poll() is None and set(state(tmp_path)["next_runs"]) == {"renamed"}
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=30)
        assert proc.returncode == 0 and "reload refused" in output
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize(
    ("toml", "message"),
    [
        ("[[workloads]]\nname = 'a'\n", "exactly one of every"),
        ("[[workloads]]\nevery = '5m'\ncron = '* * * * *'\n", "exactly one of every"),
        ("[[workloads]]\ncron = 'every tuesday'\n", "workloads[0].cron"),
        ("[[workloads]]\nevery = 'often'\n", "workloads[0].every"),
        ("[[workloads]]\nevery = '5m'\nrequest = 3\n", "workloads[0].request"),
        ("[[workloads]]\nname = 'x'\nevery = '1m'\n[[workloads]]\nname = 'x'\nevery = '2m'\n", "distinct names"),
        ("workloads = 3\n", "an array of tables"),
        ("[gates]\nmin_battery_percent = 120\n", "gates.min_battery_percent"),
        ("[service]\nheartbeat_interval = '0s'\n", "service.heartbeat_interval"),
        ("[collab]\nstrategy = 'telepathy'\n", "collab.strategy"),
    ],
)
def test_config_mistakes_are_named(config_file: Any, toml: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(config_file(toml), environ={})


def test_run_with_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str], config_file: Any) -> None:
    bad = config_file("[[workloads]]\nevery = 'often'\n")
    code, _, err = run_cli(capsys, "run", "--config", str(bad))
    assert code == 2 and "workloads[0].every" in err and str(bad) in err
    token_missing = config_file(f'[agent]\ndata_dir = "{tmp_path}"\n[sync]\nurl = "https://agg"\n', name="t.toml")
    code, _, err = run_cli(capsys, "run", "--config", str(token_missing))
    assert code == 2 and "sync.token_file" in err


def test_workload_gates() -> None:
    gates = {"min_battery_percent": 20, "skip_when_throttled": True, "max_load_per_core": 0.8}
    assert gate(gates, DeviceState(False, 10, [], 0.1)) is None  # on AC power
    assert "on battery at 10 %" in (gate(gates, DeviceState(True, 10, [], 0.1)) or "")
    assert "thermally throttled" in (gate(gates, DeviceState(None, None, ["gpu at 97 °C"], 0.1)) or "")
    assert "busy: 1-min load 1.50 per core" in (gate(gates, DeviceState(None, None, [], 1.5)) or "")
    assert gate({**gates, "skip_when_throttled": False}, DeviceState(None, None, ["gpu"], 0.1)) is None


def test_a_gated_run_is_recorded_as_skipped(tmp_path: Path, tiny_model: Path) -> None:
    from .sysfs_trees import orin_jp6

    orin_jp6(tmp_path / "orin")  # its GPU zone is past its passive trip point: throttled
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
data_dir = "{tmp_path / "data"}"
[model]
path = "{tiny_model}"
n_ctx = 256
[probes]
sysfs_root = "{tmp_path / "orin"}"
idle_baseline = "0"
[[workloads]]
name = "hot"
every = "1h"
""")
    done = subprocess.run(
        [*AGENT, "run", "--config", str(config), "--once"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "thermally throttled" in state(tmp_path)["last_runs"]["hot"]["skipped"]
    with Outbox(tmp_path / "data" / "outbox.db") as box:
        from lens_core import wire

        records = [wire.loads(r.body, r.codec) for r in box.pending(10)]
    assert [r["kind"] for r in records] == ["model_load", "device_facts", "skip"]
    # the facts, read before the gate, show the throttling the run was skipped for
    assert records[1]["ext"]["device"]["thermal_throttling"] == ["gpu-thermal at 97.0 °C ≥ passive trip 95.5 °C"]


def test_aggregator_speaks_the_notify_protocol(tmp_path: Path) -> None:
    notify = NotifySocket()
    port = free_port()
    env = {**os.environ, "NOTIFY_SOCKET": notify.path, "WATCHDOG_USEC": "400000"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from aggregator.cli import main; main()",
            "serve",
            "--db",
            str(tmp_path / "a.db"),
            "--port",
            str(port),
        ],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        wait_for(lambda: any("READY=1" in m for m in notify.drain()), 30, "READY=1")
        time.sleep(0.5)
        assert any("WATCHDOG=1" in m for m in notify.drain())
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
        assert proc.returncode == 0 and any("STOPPING=1" in m for m in notify.drain())
    finally:
        if proc.poll() is None:
            proc.kill()
        notify.close()


async def test_a_run_that_waited_for_its_turn_while_stopping_keeps_the_last_summary(
    tmp_path: Path, tiny_model: Path
) -> None:
    """A schedule that fires while another run measures waits for its turn; when the service starts stopping
    meanwhile (--once done, SIGTERM), that run measures nothing — and must not replace the run before it in status
    and in what --once reports (it did: "cron: FAILED: 0/0 requests ok")."""
    import asyncio

    from agent.outbox import AsyncOutbox, open_outbox
    from agent.service import AgentService

    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
data_dir = "{tmp_path / "data"}"
[model]
path = "{tiny_model}"
n_ctx = 256
n_threads = 1
[probes]
idle_baseline = "0"
power_source = "none"
[gates]
skip_when_throttled = false
[[workloads]]
name = "w"
every = "1h"
requests = 1
max_tokens = 2
""")
    service = AgentService(config)
    service.data_dir.mkdir(parents=True)
    service.outbox = AsyncOutbox(open_outbox(service.config))
    workload = service.config.workloads[0]
    try:
        await service._load_model()
        await service.run_workload(workload)
        first = service.runs["w"]
        assert first["requests"] == 1 and first["errors"] == 0
        async with service._measuring:  # another run is measuring
            waiting = asyncio.create_task(service.run_workload(workload))
            await asyncio.sleep(0.3)
            service.abort = True  # … and the service starts stopping
        await waiting
        assert service.runs["w"] is first
    finally:
        await service.outbox.close()
        if service.engine is not None:
            service.engine.close()


def test_sigterm_stops_promptly_while_the_aggregator_holds_a_sync(tmp_path: Path, tiny_model: Path) -> None:
    """An aggregator that accepts and never answers, with sync.timeout at 60 s: SIGTERM cancels the sync in flight
    (its records stay in the outbox), tries the final sync for service.final_sync_timeout and exits 0 — well inside
    the unit's TimeoutStopSec (90 s), where it waited out the whole sync before."""
    import socket

    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(16)  # accepts (the kernel's backlog) and never reads nor answers
    token = tmp_path / "token"
    token.write_text("t")
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "dev-1"
data_dir = "{tmp_path / "data"}"
[model]
path = "{tiny_model}"
n_ctx = 256
n_threads = 1
[sync]
url = "http://127.0.0.1:{silent.getsockname()[1]}"
allow_http = true
token_file = "{token}"
interval = "1s"
timeout = "60s"
[service]
final_sync_timeout = "2s"
[[workloads]]
name = "quick"
every = "1s"
jitter = "0"
requests = 1
max_tokens = 4
""")
    proc = start_service(config)
    try:
        wait_for(lambda: len(state(tmp_path).get("last_runs", {})) == 1, 60, "a workload run (and a sync started)")
        time.sleep(1.0)
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=60)
        took = time.monotonic() - started
        assert proc.returncode == 0, output
        assert took < 30, f"the stop took {took:.0f} s"
    finally:
        if proc.poll() is None:
            proc.kill()
        silent.close()
    with Outbox(tmp_path / "data" / "outbox.db") as box:
        assert box.stats().records >= 1  # nothing was acknowledged: every record is still there
