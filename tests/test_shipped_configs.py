"""Every agent configuration the project ships runs: ``lens-agent run`` started the way systemd starts it.

The configs are found, not listed: each ``configs/*.toml`` that is an agent config, and each ``/etc`` file that
``packaging/build-deb.sh`` installs, so a new config file is tested without touching this file. Paths are redirected
the way an operator would (``LENS_*`` environment variables, as the unit already does for ``data_dir``), and the
paths the .deb installs (prompt sets) point at their sources in this repository. One more config holds every trigger
kind: interval and cron, each with and without jitter.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from agent.config import SCHEMA
from agent.outbox import Outbox
from lens_core import wire

from .processes import DEVICE, AggregatorProcess, device_token
from .test_service import NotifySocket, wait_for

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
UNIT = ROOT / "systemd" / "lens-agent.service"
BUILD_DEB = ROOT / "packaging" / "build-deb.sh"

TRIGGER_KINDS = """
# Every trigger kind the scheduler knows, each with and without jitter.
[service]
heartbeat_interval = "1s"
[probes]
idle_baseline = "0"
[[workloads]]
name = "interval"
every = "2s"
jitter = "0"
requests = 1
max_tokens = 4
[[workloads]]
name = "interval-jitter"
every = "3s"
jitter = "1s"
requests = 1
max_tokens = 4
[[workloads]]
name = "cron"
cron = "* * * * *"
jitter = "0"
requests = 1
max_tokens = 4
[[workloads]]
name = "cron-jitter"
cron = "*/5 * * * *"
jitter = "2s"
requests = 1
max_tokens = 4
"""


def deb_installs() -> dict[str, Path]:
    """What build-deb.sh installs from this repository: installed path → source file."""
    script = BUILD_DEB.read_text()
    out = {dst: ROOT / src for src, dst in re.findall(r'install -D -m \d+ "\$root/([^"]+)" "\$stage(/[^"]+)"', script)}
    loops = re.findall(
        r'for (\w+) in "\$root"/([^\s*]+)/\*; do\s+install -D -m \d+ "\$\1" "\$stage(/[^"$]+)/\$\(basename', script
    )
    for _, src_dir, dst_dir in loops:
        for source in sorted((ROOT / src_dir).iterdir()):
            out[f"{dst_dir}/{source.name}"] = source
    return out


def is_agent_config(path: Path) -> bool:
    """A TOML file whose tables are all agent sections (the aggregator's config has [server], [storage] …)."""
    doc = tomllib.loads(path.read_text())
    return bool(doc) and all(key in SCHEMA or key == "workloads" for key in doc)


def shipped_agent_configs() -> dict[Path, list[str]]:
    """Each distinct agent config file the project ships → the names it ships under."""
    found: dict[Path, list[str]] = {}
    for path in sorted((ROOT / "configs").glob("*.toml")):
        if is_agent_config(path):
            found.setdefault(path, []).append(f"configs/{path.name}")
    for installed, source in sorted(deb_installs().items()):
        if installed.startswith("/etc/") and installed.endswith(".toml") and is_agent_config(source):
            found.setdefault(source, []).append(f"deb:{installed}")
    return found


CASES = [pytest.param(source, id="+".join(names)) for source, names in shipped_agent_configs().items()]
CASES.append(pytest.param(None, id="trigger-kinds"))


def test_the_shipped_configs_are_found() -> None:
    found = {name for names in shipped_agent_configs().values() for name in names}
    assert {"configs/agent.toml", "configs/demo.toml", "deb:/etc/lens-agent/agent.toml"} <= found
    assert not any("aggregator" in name for name in found)
    installs = deb_installs()
    assert "/usr/share/lens-agent/prompts/short-chat.jsonl" in installs  # the prompt loop is understood too
    assert unit_command(Path("x"))[-1] == "x"  # the unit's --config was recognized and replaced


def unit_command(config: Path) -> list[str]:
    """The unit's ExecStart with this checkout's agent and ``config`` instead of /etc/lens-agent/agent.toml."""
    line = next(ln for ln in UNIT.read_text().splitlines() if ln.startswith("ExecStart="))
    argv = shlex.split(line.removeprefix("ExecStart="))
    assert argv[0].endswith("/lens-agent") and "--config" in argv, line
    argv[argv.index("--config") + 1] = str(config)
    return [*AGENT, *argv[1:]]


def unit_environment() -> dict[str, str]:
    env: dict[str, str] = {}
    for line in UNIT.read_text().splitlines():
        if line.startswith("Environment="):
            key, _, value = line.removeprefix("Environment=").partition("=")
            env[key] = value
    return env


def materialize(source: Path | None, tmp_path: Path) -> tuple[Path, list[str]]:
    """The config as a device would read it, its packaged paths pointing at their sources; its workload names."""
    text = TRIGGER_KINDS if source is None else source.read_text()
    for installed, src in deb_installs().items():
        text = text.replace(f'"{installed}"', json.dumps(str(src)))
    leftover = re.findall(r'^[^#\n]*"(/(?:usr/share|etc)/lens-[^"]+)"', text, re.MULTILINE)
    assert not leftover, f"paths the test cannot redirect: {leftover}"
    config = tmp_path / "agent.toml"
    config.write_text(text)
    names = [w.get("name") for w in tomllib.loads(text).get("workloads", [])]
    assert names and all(names), "every shipped workload has a name"
    return config, [str(n) for n in names]


def service_env(tmp_path: Path, agg: AggregatorProcess) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    env.update(unit_environment())
    env.update(
        {
            "PYTHONUNBUFFERED": "1",
            "LENS_AGENT_DATA_DIR": str(tmp_path / "data"),
            "LENS_AGENT_DEVICE_ID": DEVICE,
            "LENS_SYNC_URL": f"http://127.0.0.1:{agg.port}",
            "LENS_SYNC_ALLOW_HTTP": "true",
            "LENS_SYNC_TOKEN": device_token(agg.db),
        }
    )
    return env


def records(tmp_path: Path, agg: AggregatorProcess) -> list[dict[str, Any]]:
    """Every record this device stored: those the aggregator holds and those still in the outbox."""
    out = []
    conn = sqlite3.connect(agg.db)
    try:
        for body, codec in conn.execute("SELECT body, codec FROM measurements"):
            out.append(wire.loads(body, codec))
    finally:
        conn.close()
    outbox = tmp_path / "data" / "outbox.db"
    if outbox.exists():
        with Outbox(outbox) as box:
            out += [wire.loads(r.body, r.codec) for r in box.pending(10_000)]
    return out


def state(tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "data" / "service.json"
    try:
        return dict(json.loads(path.read_text()))
    except (OSError, ValueError):
        return {}


@pytest.mark.parametrize("source", CASES)
def test_once_runs_every_workload_and_exits_0(
    source: Path | None, tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess
) -> None:
    config, names = materialize(source, tmp_path)
    # the tiny model's tokenizer splits the long-context prompts into more tokens than SmolLM2's: give it room, or
    # that workload fails (context_overflow) and --once exits 1, as it must for a failed workload
    env = {**service_env(tmp_path, aggregator), "LENS_MODEL_PATH": str(tiny_model), "LENS_MODEL_N_CTX": "16384"}
    done = subprocess.run(
        [*unit_command(config), "--once"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert len(done.stdout.splitlines()) == len(names) and " FAILED" not in done.stdout, done.stdout
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
    final = state(tmp_path)
    assert final["state"] == "stopped"
    assert set(final["last_runs"]) == set(names), done.stderr[-3000:]
    for name, run in final["last_runs"].items():
        assert "error" not in run, f"{name}: {run}"
    stored = records(tmp_path, aggregator)
    assert len(stored) == final["stored_by_this_process"]
    by_workload = {r["ext"].get("workload") for r in stored if r["kind"] in ("inference", "skip")}
    assert by_workload == set(names)
    assert all(isinstance(r["ext"]["clock"]["synchronized"], (bool, type(None))) for r in stored)


@pytest.mark.parametrize("source", CASES)
def test_service_stays_up_beats_and_stops_on_sigterm(
    source: Path | None, tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess
) -> None:
    config, names = materialize(source, tmp_path)
    notify = NotifySocket()
    env = {
        **service_env(tmp_path, aggregator),
        "LENS_MODEL_PATH": str(tiny_model),
        "NOTIFY_SOCKET": notify.path,
        "WATCHDOG_USEC": "4000000",  # the unit says 60 s; a shorter watchdog makes the service beat every 2 s
    }
    proc = subprocess.Popen(
        unit_command(config), cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True
    )
    try:
        wait_for(lambda: proc.poll() is not None or any("READY=1" in m for m in notify.drain()), 120, "READY=1")
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        first = state(tmp_path)
        assert first["pid"] == proc.pid and set(first["next_runs"]) == set(names)
        wait_for(
            lambda: proc.poll() is not None or state(tmp_path).get("updated_unix", 0) > first["updated_unix"],
            15,
            "a heartbeat after READY",
        )
        time.sleep(3)
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        assert any("WATCHDOG=1" in m for m in notify.drain())
        beat = state(tmp_path)
        assert beat["pid"] == proc.pid and set(beat["next_runs"]) == set(names)
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err[-3000:]
        assert "Traceback" not in err, err[-3000:]
        assert state(tmp_path)["state"] == "stopped"
        assert any("STOPPING=1" in m for m in notify.drain())
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
        notify.close()
