"""A new user's first run (issue 12): exit codes that tell the truth, one-line errors for every bad path, no
misspelling accepted silently. Each test runs the CLI as a user does (subprocess, or ``run_cli`` in-process), on real
files, real tiny models and real SQLite."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from agent.config import load_config
from lens_core.config import AGENT_SECTIONS, AGGREGATOR_SECTIONS, NON_CONFIG_ENV
from lens_core.errors import ConfigError

from .test_bench_cli import TINY, run_cli

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
AGGREGATOR = [sys.executable, "-c", "from aggregator.cli import main; main()"]
NO_DEFAULT = Path("/nonexistent/agent.toml")
LONG_PROMPT = " ".join(["tell me about the weather on the mountains today"] * 40)  # far past --n-ctx 64


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LENS_")}
    env.update(extra)
    return env


def cli(cmd: list[str], *args: str, cwd: Path | None = None, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*cmd, *args], cwd=cwd or ROOT, env=clean_env(**env), capture_output=True, text=True, timeout=120
    )


def assert_one_line(err: str) -> None:
    lines = [line for line in err.splitlines() if line.strip()]
    assert "Traceback" not in err and "Exception ignored" not in err, err
    assert len(lines) == 1, err


# -- item 5: exit codes and health ------------------------------------------------------------------------------
def test_bench_exits_1_when_no_request_succeeded(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path
) -> None:
    prompts = tmp_path / "long.txt"
    prompts.write_text(LONG_PROMPT + "\n")
    out = tmp_path / "r.json"
    code, _, err = run_cli(
        capsys, "bench", "--model", str(tiny_model), "--prompts", str(prompts), "--runs", "2", "--warmup", "0",
        "--max-tokens", "4", "--output", str(out), *TINY[2:], "--n-ctx", "64",
    )  # fmt: skip
    assert code == 1, err
    assert "no request succeeded (2 of 2 failed:" in err
    doc = json.loads(out.read_text())  # the results are written all the same
    assert doc["results"]["requests"]["succeeded"] == 0


def test_bench_max_error_rate(tmp_path: Path, capsys: pytest.CaptureFixture[str], tiny_model: Path) -> None:
    prompts = tmp_path / "half.txt"
    prompts.write_text(f"hello there\n{LONG_PROMPT}\n")
    args = ("bench", "--model", str(tiny_model), "--prompts", str(prompts), "--runs", "2", "--warmup", "0")
    small = ("--max-tokens", "4", *TINY[2:], "--n-ctx", "64")
    code, stdout, err = run_cli(capsys, *args, *small, "--max-error-rate", "0.25")
    assert code == 1, err
    assert "1 of 2 requests failed (50%, above --max-error-rate 0.25" in err
    assert "1/2 ok" in stdout and "×1" in stdout and "{" not in stdout.split("errors", 1)[1].splitlines()[0]
    code, _, err = run_cli(capsys, *args, *small, "--max-error-rate", "0.5")
    assert code == 0, err
    code, _, err = run_cli(capsys, *args, *small, "--max-error-rate", "2")
    assert code == 2 and "--max-error-rate" in err and "between 0 and 1" in err


def workload_config(tmp_path: Path, prompts: Path, tiny_model: Path) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(
        f"""[agent]
data_dir = "{tmp_path / "data"}"
device_id = "first-run"
[model]
path = "{tiny_model}"
n_ctx = 64
n_threads = 1
[probes]
idle_baseline = "0"
power_source = "none"
[service]
final_sync_timeout = "0"
[[workloads]]
name = "good"
every = "1h"
jitter = "0"
requests = 2
max_tokens = 4
[[workloads]]
name = "bad"
every = "1h"
jitter = "0"
requests = 2
max_tokens = 4
prompts = "{prompts}"
"""
    )
    return config


def test_run_once_prints_a_line_per_workload_and_fails_when_one_failed(tmp_path: Path, tiny_model: Path) -> None:
    prompts = tmp_path / "long.txt"
    prompts.write_text(LONG_PROMPT + "\n")
    config = workload_config(tmp_path, prompts, tiny_model)
    result = cli(AGENT, "run", "--config", str(config), "--once")
    assert result.returncode == 1, result.stderr
    lines = result.stdout.splitlines()
    assert len(lines) == 2, result.stdout
    assert lines[0].startswith("good: ok: 2/2 requests ok, TTFT p50 ")
    # (on a busy machine the line also says how many were contended: "…ok, 2 of 2 contended (cpu ×2); errors…")
    bad = re.sub(r", \d+ of \d+ contended \([^)]*\)", "", lines[1])
    assert bad == "bad: FAILED: 0/2 requests ok; errors: context_overflow ×2", lines[1]
    assert "Traceback" not in result.stderr
    status = cli(AGENT, "status", "--config", str(config), "--no-probe")
    assert status.returncode == 1
    assert "every request of the last run of workload 'bad' failed (2 of 2)" in status.stdout

    prompts.write_text("hello\n")
    result = cli(AGENT, "run", "--config", str(config), "--once")
    assert result.returncode == 0, result.stderr
    assert [line.split(":")[1].strip() for line in result.stdout.splitlines()] == ["ok", "ok"]


def test_status_of_a_missing_data_dir_is_not_ok(tmp_path: Path) -> None:
    result = cli(AGENT, "status", "--data-dir", "/no/such/dir", "--no-probe", "--config", str(tmp_path / "none"))
    assert result.returncode == 2  # a --config that does not exist is a usage error first
    empty = tmp_path / "agent.toml"
    empty.write_text("")
    result = cli(AGENT, "status", "--data-dir", "/no/such/dir", "--no-probe", "--config", str(empty))
    assert result.returncode == 1
    assert "UNHEALTHY" in result.stdout and "OK" not in result.stdout
    assert "the data directory /no/such/dir (--data-dir) does not exist" in result.stdout


# -- item 6: OS and storage errors: one line naming the path, exit 2 --------------------------------------------
def test_data_dir_that_is_a_file_or_read_only(tmp_path: Path, tiny_model: Path) -> None:
    afile = tmp_path / "afile"
    afile.write_text("x")
    config = tmp_path / "agent.toml"
    config.write_text(f'[model]\npath = "{tiny_model}"\n[probes]\npower_source = "none"\n')
    for args in (["run", "--once"], ["bench", "--store", "--runs", "1", "--no-progress"]):
        result = cli(AGENT, *args, "--config", str(config), "--data-dir", str(afile))
        assert result.returncode == 2, result.stderr
        assert_one_line(result.stderr)
        assert f"agent.data_dir {afile} (--data-dir): is a file, not a directory" in result.stderr
    # /sys refuses new directories even to root: a real read-only place, whoever runs the tests
    result = cli(AGENT, "run", "--once", "--config", str(config), "--data-dir", "/sys/lens-agent-test")
    assert result.returncode == 2, result.stderr
    assert_one_line(result.stderr)
    assert "agent.data_dir /sys/lens-agent-test (--data-dir): cannot be written" in result.stderr
    result = cli(AGENT, "status", "--no-probe", "--config", str(config), "--data-dir", str(afile))
    assert result.returncode == 2 and "is a file, not a directory" in result.stderr


def test_aggregator_databases_that_cannot_be_used(tmp_path: Path) -> None:
    notadb = tmp_path / "notadb.db"
    notadb.write_text("this is not SQLite\n" * 100)
    adir = tmp_path / "adir"
    adir.mkdir()
    cases = [
        (["serve", "--port", "0", "--db", str(notadb)], f"storage.db {notadb} (--db): is not an SQLite database"),
        (["token", "list", "--db", str(notadb)], f"storage.db {notadb} (--db): is not an SQLite database"),
        (["token", "add", "orin-1", "--db", str(notadb)], "is not an SQLite database"),
        (["serve", "--port", "0", "--db", str(adir)], f"storage.db {adir} (--db): is a directory"),
        (["serve", "--port", "0", "--db", "/sys/lens-test/a.db"], "storage.db /sys/lens-test/a.db (--db): cannot"),
        (["token", "list", "--db", "/sys/lens-test/a.db"], "storage.db /sys/lens-test/a.db (--db): does not exist"),
    ]
    for args, message in cases:
        result = cli(AGGREGATOR, *args)
        assert result.returncode == 2, (args, result.stderr)
        assert_one_line(result.stderr)
        assert message in result.stderr, result.stderr
    assert notadb.read_text().startswith("this is not SQLite")  # left as it was


def test_truncated_gguf_is_one_line(tmp_path: Path, tiny_model: Path) -> None:
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(tiny_model.read_bytes()[: tiny_model.stat().st_size // 3])
    result = cli(AGENT, "bench", "--model", str(truncated), "--runs", "1", "--no-progress", "--power-source", "none")
    assert result.returncode == 2, result.stderr
    errors = [line for line in result.stderr.splitlines() if "error" in line]
    assert "Traceback" not in result.stderr and "Exception ignored" not in result.stderr, result.stderr
    assert len(errors) == 1 and f"could not load model {truncated}" in errors[0]
    assert "truncated or corrupt" in errors[0]


# -- item 7: nothing accepted silently -------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("LENS_MODLE_N_CTX", "environment variable LENS_MODLE_N_CTX is not a setting"),
        ("LENS_MODEL_NCTX", "environment variable LENS_MODEL_NCTX is not a setting: expected a key of [model]"),
    ],
)
def test_misspelled_environment_variables_are_errors(tmp_path: Path, name: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_config(None, environ={name: "512"}, default_path=NO_DEFAULT)
    result = cli(AGENT, "status", "--no-probe", "--data-dir", str(tmp_path), **{name: "512"})
    assert result.returncode == 2 and message in result.stderr and "unset it or correct its name" in result.stderr


def test_documented_environment_variables_stay_allowed(tmp_path: Path) -> None:
    environ = {name: "x" for name in NON_CONFIG_ENV}
    environ.update({"LENS_SERVER_PORT": "9000", "LENS_STORAGE_DB": "a.db", "LENS_MODEL_N_CTX": "512"})
    assert load_config(None, environ=environ, default_path=NO_DEFAULT).get("model", "n_ctx") == 512
    assert {"LENS_SYNC_TOKEN", "LENS_TEST_POSTGRES_URL", "LENS_CLOUD_API_KEY"} <= set(NON_CONFIG_ENV)
    from agent.config import SCHEMA as AGENT_SCHEMA
    from aggregator.config import SCHEMA as AGGREGATOR_SCHEMA
    from aggregator.config import load_aggregator_config

    assert set(AGGREGATOR_SECTIONS) == set(AGGREGATOR_SCHEMA)
    assert set(AGENT_SECTIONS) == set(AGENT_SCHEMA)
    # one environment for both programs: the aggregator takes the agent's variables, refuses its own misspellings
    assert load_aggregator_config(None, environ={"LENS_SYNC_URL": "http://x", **environ}, default_path=NO_DEFAULT)
    with pytest.raises(ConfigError, match="LENS_STORAGE_DBB"):
        load_aggregator_config(None, environ={"LENS_STORAGE_DBB": "a.db"}, default_path=NO_DEFAULT)


def test_token_commands_validate_their_arguments(tmp_path: Path) -> None:
    db = tmp_path / "agg.db"
    for args, message in (
        (["token", "add", ""], 'device id "" is not allowed'),
        (["token", "add", "has space"], 'device id "has space" is not allowed'),
        (["token", "add", "--read", "x/y"], 'read-token name "x/y" is not allowed'),
        (["token", "rotate", "nosuch"], "does not exist (lens-aggregator serve creates the database)"),
        (["token", "add", "orin-1", "--url", "aggregator:8443"], "expected http://HOST:PORT or https://HOST:PORT"),
    ):
        result = cli(AGGREGATOR, *args, "--db", str(db))
        assert result.returncode == 2, (args, result.stderr)
        assert_one_line(result.stderr)
        assert message in result.stderr
        assert result.stdout == ""  # no token printed
    assert list(tmp_path.iterdir()) == []  # none stored: not even a database was created

    added = cli(AGGREGATOR, "token", "add", "orin-1", "--db", str(db), "--url", "http://127.0.0.1:8443")
    assert added.returncode == 0 and added.stdout.startswith("lens_") and len(added.stdout.split()) == 1
    for line in (
        f"lens-aggregator serve --db {db}",
        'device_id = "orin-1"',
        'url = "http://127.0.0.1:8443"',
        'token_file = "/etc/lens-agent/token"',
        "allow_http = true",
    ):
        assert line in added.stderr
    nosuch = cli(AGGREGATOR, "token", "rotate", "nosuch", "--db", str(db))
    assert nosuch.returncode == 2 and 'device "nosuch" has no active token to rotate' in nosuch.stderr
    rotated = cli(AGGREGATOR, "token", "rotate", "orin-1", "--db", str(db))
    assert rotated.returncode == 0 and rotated.stdout.startswith("lens_")
    revoked = cli(AGGREGATOR, "token", "revoke", "orin-1", "--db", str(db))
    assert revoked.returncode == 0 and "revoked 2 tokens" in revoked.stderr
    after = cli(AGGREGATOR, "token", "rotate", "orin-1", "--db", str(db))
    assert after.returncode == 2 and "no active token" in after.stderr


def test_probe_root_llmperf_dir_and_power_source_messages(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _, err = run_cli(capsys, "probe", "--sysfs-root", "/nonexistent", "--samples", "0")
    assert code == 2 and "probes.sysfs_root /nonexistent (--sysfs-root): does not exist" in err
    code, _, err = run_cli(capsys, "bench", "--llmperf-dir", str(tmp_path), "--runs", "1")
    assert code == 2 and "--llmperf-dir is used only with --format llmperf" in err
    assert not any(tmp_path.iterdir())
    code, out, _ = run_cli(capsys, "probe", "--power-source", "none", "--samples", "0", "--json")
    assert code == 0 and json.loads(out)["power"]["why_none"] == "power sampling is off (power_source = none)"
    code, out, _ = run_cli(capsys, "probe", "--power-source", "rapl", "--samples", "0")
    assert code == 0 and "power_source = rapl was asked for and is unavailable (rapl: no RAPL domains" in out


# -- item 8: rough edges -----------------------------------------------------------------------------------------
def test_rough_edges(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from agent.bench.report import _fmt, errors_line
    from agent.bench.session import progress_label
    from agent.cli import _count
    from agent.status import human_size

    assert _fmt(-0.00001, 4) == "0.0000" and _fmt(-0.5, 1) == "-0.5"  # no negative zero
    assert [_count(n, "batch", "batches") for n in (0, 1, 2)] == ["0 batches", "1 batch", "2 batches"]
    assert _count(1, "duplicate") == "1 duplicate" and _count(1, "request") == "1 request"
    assert errors_line({}) == "none" and errors_line({"timeout": 1, "http_500": 2}) == "http_500 ×2, timeout ×1"
    assert [human_size(n) for n in (0, 978, 12800, 268435456, 3 * 1024**3)] == [
        "0 B",
        "978 B",
        "12.5 KiB",
        "256 MiB",
        "3 GiB",
    ]
    assert progress_label("SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct.Q4_1"
    long = progress_label("Meta-Llama-3.1-8B-Instruct-abliterated.Q4_K_M.gguf")
    assert len(long) == 30 and long.startswith("Meta-Llama-3.1") and long.endswith("Q4_K_M") and "…" in long

    config = tmp_path / "agent.toml"
    config.write_text("[bench]\nruns = true\n")
    code, _, err = run_cli(capsys, "bench", "--config", str(config))
    assert code == 2 and "bench.runs = true is not allowed" in err and "True" not in err
    config.write_text('[sync]\ncodec = "json"\n')
    code, _, err = run_cli(capsys, "bench", "--config", str(config))
    assert code == 2 and 'sync.codec = "json" is not allowed' in err

    data = tmp_path / "data"
    data.mkdir()
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 1 and "holds neither an outbox nor service state" in out  # an empty directory is not "fine"
    from agent.outbox import Outbox

    with Outbox(data / "outbox.db"):
        pass
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert "of 256 MiB)" in out and "268435456" not in out

    # -v after the command works like -v before it (and shows the info-level lines)
    for args in (["-v", "probe"], ["probe", "-v"]):
        result = cli(AGENT, *args, "--samples", "0", "--power-source", "none", "--sysfs-root", str(tmp_path))
        assert result.returncode == 0, result.stderr


def test_every_key_is_in_the_example_config() -> None:
    """README: "Every key is in configs/agent.toml" (set, or commented out with its meaning)."""
    from agent.config import SCHEMA

    text = (ROOT / "configs" / "agent.toml").read_text()
    missing = [
        f"{section}.{key}"
        for section, keys in SCHEMA.items()
        for key in keys
        if not re.search(rf"^#?\s*{key}\s*=", text, re.M)
    ]
    assert missing == []
