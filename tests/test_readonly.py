"""Read-only means read-only: no command that reads creates a database, a directory or a file.

Each read-only command of both programs is pointed at a missing path, an empty database, another program's SQLite
file and a database of another schema version: it exits non-zero with one line naming the path, and the directory
tree is byte-for-byte what it was (no -wal/-shm files either). A good database is read without a trace, whether a
server has it open (WAL) or not, and the commands say which database they read. Beside: `token add` twice, `token
rotate`, `token add --out`, the hint of `sync --check` for an unknown token, and the declared gap of a manual sync.
"""

from __future__ import annotations

import hashlib
import json
import os
import sqlite3
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from agent.config import load_config
from agent.outbox import SCHEMA_VERSION as OUTBOX_VERSION
from agent.outbox import Outbox
from agent.schedule import expected_gap
from agent.synthetic import synthetic_records
from aggregator.cli import main as aggregator_main
from aggregator.store import SCHEMA_VERSION, SQLiteStore

from .netproxy import free_port
from .processes import DEVICE, AggregatorProcess
from .test_bench_cli import run_cli
from .test_first_run import AGENT, AGGREGATOR, assert_one_line, cli
from .test_hostile_upstream import use_agent_env

CAMPAIGN = str(uuid.uuid4())
SHIPPED = Path(__file__).resolve().parents[1] / "configs" / "aggregator.toml"
AGGREGATOR_READS = [
    ["triggers"],
    ["feedback"],
    ["token", "list"],
    ["otlp", "status"],
    ["campaign", "list"],
    ["campaign", "status", CAMPAIGN],
    ["campaign", "results", CAMPAIGN],
    ["campaign", "export", CAMPAIGN],
]


def snapshot(root: Path) -> dict[str, tuple[str, int, str]]:
    """Every entry under ``root``: its kind, mode and (files) content hash — what a read must leave as it was."""
    out: dict[str, tuple[str, int, str]] = {}
    for path in sorted(root.rglob("*")):
        info = path.lstat()
        if stat.S_ISDIR(info.st_mode):
            out[str(path.relative_to(root))] = ("dir", info.st_mode, "")
        else:
            digest = hashlib.sha256(path.read_bytes()).hexdigest() if stat.S_ISREG(info.st_mode) else ""
            out[str(path.relative_to(root))] = ("file", info.st_mode, digest)
    return out


def run_aggregator(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        aggregator_main(list(args))
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def current_db(path: Path, *, version: int | None = None) -> Path:
    """An aggregator database at this release's schema (or with ``version`` written into it), closed cleanly."""
    SQLiteStore(path).close()
    if version is not None:
        conn = sqlite3.connect(path)
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        conn.commit()
        conn.close()
    assert not Path(f"{path}-wal").exists() and not Path(f"{path}-shm").exists()
    return path


def foreign_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("CREATE TABLE people (name TEXT)")
    conn.execute("INSERT INTO people VALUES ('ada')")
    conn.commit()
    conn.close()
    return path


def tableless_db(path: Path) -> Path:
    conn = sqlite3.connect(path)
    conn.execute("PRAGMA user_version = 3")  # a real SQLite file (a header page), holding no table
    conn.commit()
    conn.close()
    return path


# what each unusable database is, how to make it, and what the one line must say about it
def touched(path: Path) -> Path:
    path.touch()
    return path


def not_sqlite(path: Path) -> Path:
    path.write_text("hello\n" * 500)
    return path


AGGREGATOR_CASES: dict[str, tuple[Any, str]] = {
    "missing-dir": (lambda d: d / "typo" / "x.db", "does not exist"),
    "missing-file": (lambda d: d / "x.db", "does not exist"),
    "empty-file": (lambda d: touched(d / "x.db"), "holds no tables"),
    "no-tables": (lambda d: tableless_db(d / "x.db"), "holds no tables"),
    "foreign": (lambda d: foreign_db(d / "x.db"), "is another program's SQLite database (tables people)"),
    "not-sqlite": (lambda d: not_sqlite(d / "x.db"), "is not an SQLite database"),
    "older": (
        lambda d: current_db(d / "x.db", version=SCHEMA_VERSION - 1),
        f"older than this release's ({SCHEMA_VERSION}); run lens-aggregator migrate --db",
    ),
    "newer": (lambda d: current_db(d / "x.db", version=99), "newer than this release's"),
}


@pytest.mark.parametrize("case", list(AGGREGATOR_CASES))
def test_aggregator_reads_refuse_an_unusable_database_and_change_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    make, problem = AGGREGATOR_CASES[case]
    root = tmp_path / "root"
    root.mkdir()
    db = make(root)
    before = snapshot(root)
    for command in AGGREGATOR_READS:
        code, out, err = run_aggregator(capsys, *command, "--db", str(db))
        assert code == 2, (command, err)
        assert_one_line(err)
        assert f"storage.db {db} (--db): " in err and problem in err, (command, err)
        assert out == ""
        assert snapshot(root) == before, command  # no file, no directory, no -wal/-shm


def test_aggregator_reads_refuse_in_a_real_process_and_a_cron_job_fires(tmp_path: Path) -> None:
    """`lens-aggregator triggers || notify`: a typo in the path is an exit 2 there, never "no requests", exit 0."""
    before = snapshot(tmp_path)
    result = cli(AGGREGATOR, "triggers", "--db", str(tmp_path / "typo" / "x.db"), cwd=tmp_path)
    assert result.returncode == 2 and result.stdout == ""
    assert_one_line(result.stderr)
    assert f"storage.db {tmp_path / 'typo' / 'x.db'} (--db): does not exist" in result.stderr
    assert snapshot(tmp_path) == before


def test_a_bare_read_names_the_default_database_and_creates_nothing(tmp_path: Path) -> None:
    default = Path("/var/lib/lens-aggregator")
    if default.exists() or Path("/etc/lens-aggregator/aggregator.toml").exists():
        pytest.skip("this machine has an installed aggregator: its default database is not missing")
    for command in (["token", "list"], ["feedback"], ["triggers"], ["otlp", "status"]):
        result = cli(AGGREGATOR, *command, cwd=tmp_path)
        assert result.returncode == 2, (command, result.stderr)
        assert_one_line(result.stderr)
        assert "storage.db /var/lib/lens-aggregator/aggregator.db (default): does not exist" in result.stderr
        assert not default.exists()
    assert list(tmp_path.iterdir()) == []


def test_reads_of_a_good_database_leave_no_trace_and_say_which_one(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    root = tmp_path / "root"
    root.mkdir()
    db = root / "aggregator.db"
    code, token, _ = run_aggregator(capsys, "token", "add", "orin-017", "--db", str(db))
    assert code == 0 and token.startswith("lens_")
    before = snapshot(root)
    assert sorted(before) == ["aggregator.db"]  # the writer closed cleanly: no -wal file, so reads are immutable
    for command in AGGREGATOR_READS[:5]:
        code, out, err = run_aggregator(capsys, *command, "--db", str(db))
        assert code == 0, (command, err)
        assert f"reading {db} (from --db)" in err
        assert snapshot(root) == before, command
    code, out, _ = run_aggregator(capsys, "token", "list", "--db", str(db), "--json")
    assert [t["subject"] for t in json.loads(out)] == ["orin-017"]
    code, out, err = run_aggregator(capsys, "triggers", "--config", str(SHIPPED), "--db", str(db))
    # the shipped triggers evaluated on a read-only store; no request yet: insufficient data (exit 3), not "all clear"
    assert code == 3 and "requests-failing" in out and "insufficient data: " in err, err
    assert snapshot(root) == before

    # the same database as serve without --db: from the configuration file, or the environment
    config = tmp_path / "aggregator.toml"
    config.write_text(f'[storage]\ndb = "{db}"\n')
    code, out, err = run_aggregator(capsys, "token", "list", "--config", str(config))
    assert code == 0 and "orin-017" in out and f"reading {db} (from config {config})" in err
    monkeypatch.setenv("LENS_STORAGE_DB", str(db))
    code, out, err = run_aggregator(capsys, "token", "list")
    assert code == 0 and "orin-017" in out and f"reading {db} (from environment variable LENS_STORAGE_DB)" in err
    assert snapshot(root) == before


def test_reads_while_serve_runs_see_its_writes(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """With the server up the database is in WAL mode with its -wal and -shm files: a read takes part in the WAL
    (no immutable open), so it sees what the server's store committed; after the server stops nothing is left."""
    config = tmp_path / "aggregator.toml"
    db = tmp_path / "agg.db"
    config.write_text(f'[storage]\ndb = "{db}"\n')
    server = AggregatorProcess(db, free_port(), config=config)
    server.start()
    try:
        assert Path(f"{db}-wal").exists()  # serve holds it open in WAL mode
        code, _, _ = run_aggregator(capsys, "token", "add", "orin-017", "--config", str(config))
        assert code == 0
        code, out, err = run_aggregator(capsys, "token", "list", "--config", str(config), "--json")
        assert code == 0 and [t["subject"] for t in json.loads(out)] == ["orin-017"]
        assert f"reading {db} (from config {config})" in err
    finally:
        server.stop()
    before = snapshot(tmp_path)
    assert not Path(f"{db}-wal").exists()
    code, out, _ = run_aggregator(capsys, "token", "list", "--config", str(config))
    assert code == 0 and "orin-017" in out
    assert snapshot(tmp_path) == before


def test_migrate_brings_an_older_database_forward(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = current_db(tmp_path / "agg.db", version=SCHEMA_VERSION - 1)
    code, _, err = run_aggregator(capsys, "token", "list", "--db", str(db))
    assert code == 2 and "lens-aggregator migrate --db" in err
    code, _, err = run_aggregator(capsys, "migrate", "--db", str(db))
    assert code == 0 and f"migrated from schema version {SCHEMA_VERSION - 1} to {SCHEMA_VERSION}" in err
    code, _, err = run_aggregator(capsys, "migrate", "--db", str(db))
    assert code == 0 and "nothing to migrate" in err
    code, _, _ = run_aggregator(capsys, "token", "list", "--db", str(db))
    assert code == 0
    code, _, err = run_aggregator(capsys, "migrate", "--db", str(tmp_path / "none.db"))
    assert code == 2 and "does not exist" in err and not (tmp_path / "none.db").exists()


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["token", "add", "orin-1"], ["migrate"]])
def test_writers_never_take_over_another_programs_database(
    command: list[str], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = foreign_db(tmp_path / "x.db")
    before = snapshot(tmp_path)
    code, out, err = run_aggregator(capsys, *command, "--db", str(db))
    assert code == 2 and out == "" and "is another program's SQLite database (tables people)" in err
    assert snapshot(tmp_path) == before


# -- tokens ---------------------------------------------------------------------------------------------------------
def test_token_add_twice_is_refused_rotate_replaces_also_adds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    db = str(tmp_path / "agg.db")
    code, first, _ = run_aggregator(capsys, "token", "add", "orin-017", "--db", db)
    assert code == 0 and first.startswith("lens_")
    code, out, err = run_aggregator(capsys, "token", "add", "orin-017", "--db", db)
    assert code == 2 and out == ""
    assert_one_line(err)
    assert 'device "orin-017" already has a live token' in err
    assert "lens-aggregator token rotate orin-017" in err and "--also" in err

    def live() -> list[dict[str, Any]]:
        _, listing, _ = run_aggregator(capsys, "token", "list", "--db", db, "--json")
        return [t for t in json.loads(listing) if t["subject"] == "orin-017" and t["state"] == "active"]

    assert len(live()) == 1
    code, second, _ = run_aggregator(capsys, "token", "add", "orin-017", "--db", db, "--also")
    assert code == 0 and second.startswith("lens_") and len(live()) == 2
    code, _, _ = run_aggregator(capsys, "token", "revoke", "orin-017", "--db", db)
    assert code == 0 and live() == []
    code, _, _ = run_aggregator(capsys, "token", "add", "orin-017", "--db", db)  # none live: add works again
    assert code == 0
    code, rotated, _ = run_aggregator(capsys, "token", "rotate", "orin-017", "--db", db, "--grace", "1h")
    assert code == 0 and rotated.startswith("lens_")
    _, listing, _ = run_aggregator(capsys, "token", "list", "--db", db, "--json")
    states = sorted(t["state"].split(" ")[0] for t in json.loads(listing) if t["subject"] == "orin-017")
    assert states == ["active", "active", "revoked", "revoked"]  # the old one works for its grace, then expires
    code, _, err = run_aggregator(capsys, "token", "add", "--read", "grafana", "--db", db)
    code2, _, _ = run_aggregator(capsys, "token", "add", "--read", "grafana", "--db", db)
    assert code == 0 and code2 == 0  # read tokens are not a device's: several may be live


def test_token_add_out_writes_a_private_file_or_nothing(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "agg.db")
    out = tmp_path / "orin-017.token"
    code, stdout, err = run_aggregator(capsys, "token", "add", "orin-017", "--db", db, "--out", str(out))
    assert code == 0 and stdout == "" and f"token written to {out} (mode 0600)" in err
    token = out.read_text().strip()
    assert token.startswith("lens_") and stat.S_IMODE(out.stat().st_mode) == 0o600
    assert f"copy {out} to the device as /etc/lens-agent/token" in err

    # the file exists: refused without --force, and the file stays the token it was
    code, _, err = run_aggregator(capsys, "token", "rotate", "orin-017", "--db", db, "--out", str(out))
    assert code == 2 and "exists; give --force" in err and out.read_text().strip() == token
    code, _, err = run_aggregator(capsys, "token", "rotate", "orin-017", "--db", db, "--out", str(out), "--force")
    assert code == 0 and out.read_text().strip() not in ("", token)
    assert stat.S_IMODE(out.stat().st_mode) == 0o600

    # a failure leaves no token file: an add refused, a directory that does not exist, a database that cannot be
    before = snapshot(tmp_path)
    failing = [
        ["token", "add", "orin-017", "--db", db, "--out", str(tmp_path / "again.token")],
        ["token", "add", "orin-018", "--db", db, "--out", str(tmp_path / "nodir" / "orin-018.token")],
        ["token", "add", "orin-019", "--db", str(tmp_path / "nodir" / "a.db"), "--out", str(tmp_path / "x.token")],
        # what --force must not replace: a FIFO (a device node alike), a symbolic link, a directory named with "/"
        ["token", "add", "orin-020", "--db", db, "--out", str(tmp_path / "fifo"), "--force"],
        ["token", "add", "orin-021", "--db", db, "--out", str(tmp_path / "link.token"), "--force"],
        ["token", "add", "orin-022", "--db", db, "--out", str(tmp_path / "newdir") + "/"],
    ]
    os.mkfifo(tmp_path / "fifo")
    (tmp_path / "link.token").symlink_to(tmp_path / "elsewhere.token")
    before = snapshot(tmp_path)
    for args in failing:
        code, stdout, err = run_aggregator(capsys, *args)
        assert code == 2 and stdout == "", err
        assert_one_line(err)
    assert snapshot(tmp_path) == before
    assert stat.S_ISFIFO((tmp_path / "fifo").lstat().st_mode) and (tmp_path / "link.token").is_symlink()
    _, listing, _ = run_aggregator(capsys, "token", "list", "--db", db, "--json")
    assert {t["subject"] for t in json.loads(listing)} == {"orin-017"}  # no token stored for a failed add


def test_token_add_creates_a_database_only_in_an_existing_directory(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_aggregator(capsys, "token", "add", "orin-1", "--db", str(tmp_path / "nodir" / "a.db"))
    assert code == 2 and "its directory" in err and "does not exist" in err
    assert not (tmp_path / "nodir").exists()
    code, out, _ = run_aggregator(capsys, "token", "add", "orin-1", "--db", str(tmp_path / "a.db"))
    assert code == 0 and out.startswith("lens_") and (tmp_path / "a.db").is_file()


# -- the agent --------------------------------------------------------------------------------------------------
def outbox_at(data: Path, *, version: int | None = None) -> Path:
    data.mkdir(parents=True, exist_ok=True)
    with Outbox(data / "outbox.db") as box:
        box.append_many(synthetic_records(3, seed=5))
    if version is not None:
        conn = sqlite3.connect(data / "outbox.db")
        conn.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", (str(version),))
        conn.commit()
        conn.close()
    return data


def in_data_dir(make: Any) -> Any:
    """A case maker for the agent: the data directory, with ``make(data / "outbox.db")`` inside it."""

    def made(data: Path) -> Path:
        data.mkdir()
        make(data / "outbox.db")
        return data

    return made


AGENT_CASES: dict[str, tuple[Any, str]] = {
    "empty-file": (in_data_dir(Path.touch), "holds no tables"),
    "no-tables": (in_data_dir(tableless_db), "holds no tables"),
    "foreign": (in_data_dir(foreign_db), "is another program's SQLite database"),
    "older": (lambda d: outbox_at(d, version=OUTBOX_VERSION - 1), "older than this release's"),
    "newer": (lambda d: outbox_at(d, version=99), "newer than this release's"),
}


@pytest.mark.parametrize("case", list(AGENT_CASES))
def test_agent_reads_refuse_an_unusable_outbox_and_change_nothing(
    case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LENS_SYNC_URL", raising=False)
    make, problem = AGENT_CASES[case]
    data = make(tmp_path / "data")
    before = snapshot(tmp_path)
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe", "--json")
    doc = json.loads(out)
    assert code == 1 and doc["healthy"] is False
    assert any(f"outbox {data / 'outbox.db'}: " in r and problem in r for r in doc["reasons"]), doc["reasons"]
    assert doc["outbox"] is None and problem in doc["outbox_unreadable"]
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 1 and f"outbox      not read: outbox {data / 'outbox.db'}: " in out
    assert snapshot(tmp_path) == before
    for command in (["outbox", "list"], ["outbox", "export", "-"], ["outbox", "export", str(tmp_path / "q.ndjson")]):
        code, out, err = run_cli(capsys, *command, "--data-dir", str(data))
        assert code == 2 and out == "", (command, err)
        assert_one_line(err)
        assert f"outbox {data / 'outbox.db'}: " in err and problem in err
        assert snapshot(tmp_path) == before, command


def test_agent_reads_of_a_missing_data_directory_create_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "new"
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 1 and "UNHEALTHY" in out and f"the data directory {data} (--data-dir) does not exist" in out
    for command in (["tune", "status"], ["tune", "rollback"], ["outbox", "list"], ["outbox", "export", "-"]):
        code, out, err = run_cli(capsys, *command, "--data-dir", str(data))
        assert code == 2 and out == "", (command, err)
        assert_one_line(err)
        assert str(data) in err
    assert not data.exists()
    # and afterwards status still says no agent has run (the bug: tune status made it "health OK")
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 1 and "no agent has run with it" in out
    assert list(tmp_path.iterdir()) == []


def test_agent_reads_of_an_empty_data_directory_change_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    data = tmp_path / "data"
    data.mkdir()
    before = snapshot(tmp_path)
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 1 and "holds neither an outbox nor service state" in out and "health OK" not in out
    code, out, _ = run_cli(capsys, "tune", "status", "--data-dir", str(data))
    assert code == 0 and "no change applied yet" in out  # it can answer: the configuration's settings
    code, _, err = run_cli(capsys, "tune", "rollback", "--data-dir", str(data))
    assert code == 2 and "nothing to roll back" in err
    code, _, err = run_cli(capsys, "outbox", "list", "--data-dir", str(data))
    assert code == 2 and "no outbox at" in err
    assert snapshot(tmp_path) == before


def test_a_bare_tune_status_does_not_create_the_system_data_directory(tmp_path: Path) -> None:
    default = Path("/var/lib/lens-agent")
    if default.exists() or Path("/etc/lens-agent/agent.toml").exists():
        pytest.skip("this machine has an installed agent: its data directory is not missing")
    for command in (["tune", "status"], ["tune", "rollback"]):
        result = cli(AGENT, *command, cwd=tmp_path)
        assert result.returncode == 2, result.stderr
        assert_one_line(result.stderr)
        assert "agent.data_dir /var/lib/lens-agent (default): does not exist" in result.stderr
        assert not default.exists()
    result = cli(AGENT, "status", "--no-probe", cwd=tmp_path)
    assert result.returncode == 1 and "no agent has run with it" in result.stdout and not default.exists()


def test_status_of_a_good_outbox_leaves_no_trace(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = outbox_at(tmp_path / "data")
    before = snapshot(tmp_path)
    assert sorted(before) == ["data", "data/outbox.db", "data/outbox.db.reserve"]
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe", "--json")
    assert json.loads(out)["outbox"]["records"] == 3 and code == 1  # pending, sync not configured
    code, out, _ = run_cli(capsys, "outbox", "list", "--data-dir", str(data), "--json")
    assert code == 0
    assert snapshot(tmp_path) == before


# -- sync --------------------------------------------------------------------------------------------------------
def test_sync_check_names_the_likely_cause_of_an_unknown_token(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token was added to one database, the aggregator serves another: the check says where to look."""
    served = tmp_path / "served.db"
    server = AggregatorProcess(served, free_port())
    server.start()
    try:
        code, token, _ = run_aggregator(capsys, "token", "add", DEVICE, "--db", str(tmp_path / "other.db"))
        assert code == 0
        use_agent_env(monkeypatch, f"http://127.0.0.1:{server.port}", token.strip())
        code, out, err = run_cli(capsys, "sync", "--data-dir", str(tmp_path / "data"), "--check")
    finally:
        server.stop()
    assert code == 1 and "FAIL  token" in out
    assert "serves another database than the one the token was added to" in out
    assert f"lens-aggregator token list --db DB with the --db serve uses must list {DEVICE}" in out
    assert "does not know this token" in err
    assert not (tmp_path / "data").exists()  # a check uploads nothing and creates no outbox


def test_a_manual_sync_declares_the_schedules_gap_or_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    db = tmp_path / "agg.db"
    server = AggregatorProcess(db, free_port())
    server.start()
    try:
        code, token, _ = run_aggregator(capsys, "token", "add", DEVICE, "--db", str(db))
        assert code == 0
        use_agent_env(monkeypatch, f"http://127.0.0.1:{server.port}", token.strip())
        data = tmp_path / "data"

        def sync_with(config_text: str, seed: int) -> Any:
            outbox_fill(data, seed)
            config = tmp_path / f"agent-{seed}.toml"
            config.write_text(config_text)
            code, out, err = run_cli(capsys, "sync", "--config", str(config), "--data-dir", str(data))
            assert code == 0, (out, err)
            conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)
            try:
                return conn.execute("SELECT expected_gap_s FROM devices WHERE device_id = ?", (DEVICE,)).fetchone()[0]
            finally:
                conn.close()

        scheduled = '[sync]\ninterval = "60s"\n[[workloads]]\nname = "w"\nevery = "5m"\njitter = "0s"\n'
        assert sync_with(scheduled, 1) == 300  # the service's schedule: every 5 minutes
        # the default workload (every 15 minutes, with its jitter): the shorter gap declared before is replaced
        default = expected_gap(load_config(None, environ={}, default_path=tmp_path / "none.toml"))
        assert default is not None and sync_with('[sync]\ninterval = "60s"\n', 2) == round(default) > 900
        assert sync_with('workloads = []\n[sync]\ninterval = "60s"\n', 3) is None  # no schedule: cleared
    finally:
        server.stop()


def outbox_fill(data: Path, seed: int) -> None:
    data.mkdir(exist_ok=True)
    with Outbox(data / "outbox.db") as box:
        box.append_many(synthetic_records(3, seed=seed, device_id=DEVICE))


def test_helpers_see_a_change(tmp_path: Path) -> None:
    """The snapshot the tests compare notices new -wal/-shm files and a new directory."""
    db = foreign_db(tmp_path / "x.db")
    before = snapshot(tmp_path)
    conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True)  # a read-only open that is not immutable ...
    conn.execute("SELECT * FROM people").fetchall()
    assert snapshot(tmp_path) != before  # ... leaves -wal and -shm beside a WAL database
    conn.close()
    (tmp_path / "d").mkdir()
    assert "d" in snapshot(tmp_path)


def test_postgresql_reads_create_no_table_and_say_what_is_missing(
    pg_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import psycopg

    from aggregator.pgstore import PostgresStore

    def tables() -> list[str]:
        with psycopg.connect(pg_url) as conn:
            rows = conn.execute("SELECT tablename FROM pg_tables WHERE schemaname = current_schema()").fetchall()
        return sorted(r[0] for r in rows)

    shown = "…@" + pg_url.split("@")[-1]
    for command in AGGREGATOR_READS:
        code, out, err = run_aggregator(capsys, *command, "--db", pg_url)
        assert code == 2 and out == "", (command, err)
        assert_one_line(err)
        assert f"storage.db {shown} (--db): has no lens-aggregator tables" in err
        assert "lens:lens" not in err  # no credentials in the line
    assert tables() == []  # nothing was created
    PostgresStore(pg_url).close()  # what serve does on start
    code, out, err = run_aggregator(capsys, "token", "list", "--db", pg_url, "--json")
    assert code == 0 and json.loads(out) == [] and f"reading {shown} (from --db)" in err
    for command in [*AGGREGATOR_READS[:5], ["triggers", "--config", str(SHIPPED)]]:
        code, out, err = run_aggregator(capsys, *command, "--db", pg_url)
        # every read runs in read-only transactions (the triggers: no request yet, insufficient data: exit 3)
        assert code == (3 if command[1:] == ["--config", str(SHIPPED)] else 0), (command, err)
    created = tables()
    with psycopg.connect(pg_url) as conn:
        conn.execute("UPDATE meta SET value = %s WHERE key = 'schema_version'", (str(SCHEMA_VERSION - 1),))
    code, _, err = run_aggregator(capsys, "feedback", "--db", pg_url)
    assert code == 2 and "older than this release's" in err and "lens-aggregator migrate --db URL" in err
    code, _, err = run_aggregator(capsys, "migrate", "--db", pg_url)
    assert code == 0 and f"migrated from schema version {SCHEMA_VERSION - 1} to {SCHEMA_VERSION}" in err
    assert tables() == created
