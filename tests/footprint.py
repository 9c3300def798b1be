"""What the agent loads and holds: the modules each command imports, the service's resident memory and CPU.

Shared by tests/test_footprint.py (the import-graph checks, loose bounds) and bench/footprint.py (the figures).
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROBE = ROOT / "tests" / "import_probe.py"

# modules every Python program of this environment may show that are neither the standard library nor a dependency
_INFRASTRUCTURE = ("_cython_", "cython_runtime", "_sysconfigdata", "__editable__", "_distutils_hack", "__main__")


def third_party(modules: list[str]) -> set[str]:
    """The top-level packages among ``modules`` that are neither the standard library nor interpreter plumbing."""
    tops = {name.split(".")[0] for name in modules}
    return {t for t in tops if t not in sys.stdlib_module_names and not t.startswith(_INFRASTRUCTURE)}


def command_modules(args: list[str], *, cwd: Path | None = None, timeout: float = 600) -> tuple[list[str], str]:
    """Run ``lens-agent ARGS…`` in a fresh interpreter; (every module it loaded, its output)."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "modules.json"
        proc = subprocess.run(
            [sys.executable, str(PROBE), str(out), *args],
            cwd=cwd or ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if not out.exists():
            raise AssertionError(f"lens-agent {' '.join(args)} wrote no module list: {proc.stdout}{proc.stderr}")
        return json.loads(out.read_text()), proc.stdout + proc.stderr


def baseline_modules() -> list[str]:
    """What ``import llama_cpp`` loads by itself: the engine's share of every engine command's modules."""
    code = "import json, sys, llama_cpp; print(json.dumps(sorted(sys.modules)))"
    return list(json.loads(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout))


BARE = """
import json, sys, time
import llama_cpp
from llama_cpp import Llama
model = Llama(model_path=sys.argv[1], n_ctx=int(sys.argv[2]), n_threads=int(sys.argv[3]), flash_attn=True,
              verbose=False)
model.create_completion(sys.argv[4], max_tokens=int(sys.argv[5]), temperature=0.0)
print("ready", flush=True)
sys.stdin.readline()
"""


def bare_process(model: Path, n_ctx: int, n_threads: int, prompt: str, max_tokens: int) -> subprocess.Popen[str]:
    """Bare llama-cpp-python, the baseline: the model loaded with the same settings and one completion made; it
    waits on stdin (its memory is read from /proc meanwhile) and ends when stdin closes."""
    proc = subprocess.Popen(
        [sys.executable, "-c", BARE, str(model), str(n_ctx), str(n_threads), prompt, str(max_tokens)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if line.strip() != "ready":
        proc.kill()
        raise AssertionError(f"the bare llama-cpp-python process failed: {line!r}")
    return proc


def proc_status(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile… of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        parts = value.split()
        if len(parts) == 2 and parts[1] == "kB":
            out[key] = int(parts[0]) * 1024
    return out


def cpu_seconds(pid: int) -> float:
    """CPU time of a process (all its threads) so far: the scheduler's nanoseconds (/proc/PID/task/*/schedstat),
    else user + system clock ticks (10 ms each: too coarse for an idle process)."""
    total = 0
    try:
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):  # a thread that ended meanwhile
                total += int((task / "schedstat").read_text().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def wakeups(pid: int) -> int:
    """Times the process's threads have been scheduled onto a CPU so far (schedstat's third field), 0 if unknown."""
    count = 0
    with contextlib.suppress(OSError, ValueError, IndexError):
        for task in Path(f"/proc/{pid}/task").iterdir():
            with contextlib.suppress(FileNotFoundError):
                count += int((task / "schedstat").read_text().split()[2])
    return count


def idle_cpu_percent(pid: int, seconds: float) -> float:
    """The share of one core a process used over ``seconds`` of wall time."""
    start_cpu, start = cpu_seconds(pid), time.monotonic()
    time.sleep(seconds)
    return 100.0 * (cpu_seconds(pid) - start_cpu) / (time.monotonic() - start)


def service_config(work: Path, model: Path, port: int, token: str, *, n_ctx: int, n_threads: int, every: str,
                   max_tokens: int, sync_interval: str) -> Path:  # fmt: skip
    """A service configuration: one local workload on ``model``, syncing to the aggregator on 127.0.0.1:``port``."""
    token_file = work / "token"
    token_file.write_text(token)
    config = work / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "dev-1"
data_dir = "{work / "data"}"
[model]
path = "{model}"
n_ctx = {n_ctx}
n_threads = {n_threads}
[sync]
url = "http://127.0.0.1:{port}"
allow_http = true
token_file = "{token_file}"
interval = "{sync_interval}"
[[workloads]]
name = "footprint"
every = "{every}"
jitter = "0"
requests = 2
max_tokens = {max_tokens}
""")
    return config


def start_service(config: Path, modules_out: Path) -> subprocess.Popen[str]:
    """``lens-agent run --config CONFIG`` through the import probe (its modules land in ``modules_out`` at exit)."""
    return subprocess.Popen(
        [sys.executable, str(PROBE), str(modules_out), "run", "--config", str(config)],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def wait_for_run_and_sync(
    proc: subprocess.Popen[str], data_dir: Path, aggregator_db: Path, timeout: float, records: int = 3
) -> None:
    """Until the service has finished a workload run and the aggregator holds ``records`` of its records."""
    state = data_dir / "service.json"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        runs = json.loads(state.read_text()).get("last_runs", {}) if state.exists() else {}
        if runs and _stored(aggregator_db) >= records:
            return
        if proc.poll() is not None:
            raise AssertionError(f"the service exited: {proc.communicate()[0]}")
        time.sleep(0.2)
    raise AssertionError(f"no workload run and sync within {timeout:.0f} s")


def _stored(db: Path) -> int:
    conn = sqlite3.connect(db)
    try:
        return int(conn.execute("SELECT COUNT(*) FROM measurements").fetchone()[0])
    finally:
        conn.close()
