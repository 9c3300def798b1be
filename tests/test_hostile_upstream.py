"""Nothing stored on a device is lost to what the network answers.

A real aggregator process behind an upstream that answers the way captive portals, proxies, WAFs and load balancers
do (tests/hostile_upstream.py). For each kind of answer, ``lens-agent sync`` — run as a user runs it — keeps every
record, exits non-zero and says why; ``lens-agent status`` is unhealthy and says why; once the network heals, every
record reaches the aggregator exactly once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from agent.outbox import Outbox
from agent.synthetic import synthetic_records

from .hostile_upstream import MODES, HostileUpstream
from .netproxy import free_port
from .processes import DEVICE, ROOT, AggregatorProcess, device_token
from .test_bench_cli import run_cli
from .test_conservation import check_conservation, delivered, drain, driver, stored_ids

N = 60

# mode -> (the error kind sync reports, a phrase its message must carry)
EXPECTED = {
    "200-text": ("not_aggregator", "HTTP 200 text/plain"),
    "200-html": ("not_aggregator", "captive portal"),
    "200-json": ("not_aggregator", "not the aggregator's acknowledgement"),
    "200-accepted-string": ("not_aggregator", "not the aggregator's acknowledgement"),
    "ack-other-batch": ("not_aggregator", "for batch 'another-batch'"),
    "ack-short-count": ("not_aggregator", "do not add up"),
    "ack-wrong-digest": ("not_aggregator", "digest does not match"),
    "301": ("not_aggregator", "HTTP 301"),
    "302": ("not_aggregator", "HTTP 302"),
    "307": ("not_aggregator", "redirect"),
    "308": ("not_aggregator", "HTTP 308"),
    "400-html": ("not_aggregator", "HTTP 400 text/html"),
    "400-json": ("not_aggregator", "not the aggregator's refusal"),
    "413-html": ("not_aggregator", "HTTP 413 text/html"),
    "500-html": ("server", "HTTP 500"),
    "502-html": ("server", "HTTP 502"),
    "slow": ("network", "no complete answer"),
    "reset": ("network", "cannot reach"),
    "pass-lose-answer": ("not_aggregator", "captive portal"),
}


def test_every_hostile_mode_has_an_expectation() -> None:
    assert set(EXPECTED) | {"pass", "huge"} == set(MODES)


@pytest.fixture
def upstream(aggregator: AggregatorProcess) -> Iterator[HostileUpstream]:
    up = HostileUpstream(f"http://127.0.0.1:{aggregator.port}").start()
    yield up
    up.stop()


def agent_env(url: str, token: str, **extra: str) -> dict[str, str]:
    return {
        "LENS_SYNC_URL": url,
        "LENS_SYNC_ALLOW_HTTP": "true",
        "LENS_SYNC_TOKEN": token,
        "LENS_AGENT_DEVICE_ID": DEVICE,
        "LENS_SYNC_TIMEOUT": "2s",
        "LENS_SYNC_BATCH_SIZE": "25",
        **extra,
    }


def use_agent_env(monkeypatch: pytest.MonkeyPatch, url: str, token: str) -> None:
    for key, value in agent_env(url, token).items():
        monkeypatch.setenv(key, value)


def fill(data: Path, n: int = N, seed: int = 1) -> set[bytes]:
    records = synthetic_records(n, seed=seed, device_id=DEVICE)
    with Outbox(data / "outbox.db") as box:
        box.append_many(records)
    return {bytes.fromhex(r["id"].replace("-", "")) for r in records}


def outbox_counts(data: Path) -> tuple[int, int]:
    with Outbox(data / "outbox.db") as box:
        stats = box.stats()
    return stats.records, stats.quarantined_total


@pytest.mark.parametrize("mode", sorted(EXPECTED))
def test_hostile_answer_keeps_everything_then_delivers_exactly_once(
    mode: str,
    tmp_path: Path,
    aggregator: AggregatorProcess,
    upstream: HostileUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    obligations = fill(data)
    use_agent_env(monkeypatch, upstream.url, device_token(aggregator.db))
    kind, phrase = EXPECTED[mode]

    upstream.mode = mode
    code, out, err = run_cli(capsys, "sync", "--data-dir", str(data), "--json")
    report = json.loads(out)
    assert code == 1, (out, err)
    assert report["ok"] is False and report["error_kind"] == kind, report
    assert phrase in report["error"], report["error"]
    assert "sync failed" in err and "Traceback" not in err
    assert report["pending"] == N and report["quarantined"] == 0
    assert outbox_counts(data) == (N, 0), "a record left the outbox on an answer that was not an acknowledgement"
    ids, _ = delivered(aggregator.db)
    if mode == "pass-lose-answer":
        assert len(ids) == 25  # the aggregator stored the first batch; the device keeps it until acknowledged
    else:
        assert ids == [], "an upload reached the aggregator through a redirect or a fake answer"

    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    status = json.loads(out)
    assert code == 1 and not status["healthy"]
    assert any(phrase in reason for reason in status["reasons"]), status["reasons"]

    upstream.mode = "pass"  # the network heals
    code, out, err = run_cli(capsys, "sync", "--data-dir", str(data), "--json")
    report = json.loads(out)
    assert code == 0, (out, err)
    assert report["pending"] == 0 and report["uploaded"] == N
    assert report["accepted"] + report["duplicates"] == N
    check_conservation(aggregator.db, obligations)
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    assert code == 0, out


def test_a_huge_answer_costs_the_agent_64_kib(
    tmp_path: Path, aggregator: AggregatorProcess, upstream: HostileUpstream
) -> None:
    """A 1.5 GB error page: the agent reads 64 KiB, drops the connection, keeps every record."""
    data = tmp_path / "data"
    obligations = fill(data)
    env = {**os.environ, **agent_env(upstream.url, device_token(aggregator.db))}
    upstream.mode = "huge"
    script = (
        "import atexit, resource, sys\n"
        "atexit.register(lambda: sys.stderr.write('MAXRSS_KB %d\\n' % resource.getrusage(resource.RUSAGE_SELF)"
        ".ru_maxrss))\n"
        "from agent.cli import main\n"
        "main()\n"
    )

    def sync(*args: str) -> subprocess.CompletedProcess[str]:
        command = [sys.executable, "-c", script, "sync", "--data-dir", str(data), *args]
        return subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)

    proc = sync("--json")
    report = json.loads(proc.stdout)
    assert proc.returncode == 1 and report["error_kind"] == "not_aggregator", proc.stderr
    assert "over 64 KiB" in report["error"]
    huge_mb = peak_mb(proc.stderr)
    assert upstream.huge_bytes_sent < 512 * 1024**2, "the agent kept reading the 1.5 GB body"
    assert outbox_counts(data) == (N, 0)
    upstream.mode = "pass"
    proc = sync()
    assert proc.returncode == 0, proc.stderr
    check_conservation(aggregator.db, obligations)
    normal_mb = peak_mb(proc.stderr)  # the same command on an ordinary answer
    assert huge_mb < normal_mb + 64, (
        f"the agent peaked at {huge_mb:.0f} MB on the error page, {normal_mb:.0f} MB normally"
    )


def peak_mb(stderr: str) -> float:
    return int(stderr.split("MAXRSS_KB ")[1].split()[0]) / 1024


def test_sync_check_verifies_the_endpoint_without_uploading(
    tmp_path: Path,
    aggregator: AggregatorProcess,
    upstream: HostileUpstream,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    data = tmp_path / "data"
    fill(data)
    token = device_token(aggregator.db)
    use_agent_env(monkeypatch, f"http://127.0.0.1:{aggregator.port}", token)
    code, out, err = run_cli(capsys, "sync", "--data-dir", str(data), "--check", "--json")
    result = json.loads(out)
    assert code == 0 and result["ok"], (out, err)
    assert [c["check"] for c in result["checks"]] == ["reach", "aggregator", "token", "device"]
    assert outbox_counts(data) == (N, 0) and delivered(aggregator.db)[0] == []  # nothing uploaded

    monkeypatch.setenv("LENS_AGENT_DEVICE_ID", "orin-017")  # a token made for another device
    code, out, err = run_cli(capsys, "sync", "--data-dir", str(data), "--check")
    assert code == 1 and "the token belongs to 'dev-1' but agent.device_id is 'orin-017'" in out
    assert "set agent.device_id = 'dev-1'" in err

    monkeypatch.setenv("LENS_AGENT_DEVICE_ID", DEVICE)
    monkeypatch.setenv("LENS_SYNC_TOKEN", "lens_not_a_token")
    code, out, _ = run_cli(capsys, "sync", "--data-dir", str(data), "--check")
    assert code == 1 and "does not know this token" in out

    monkeypatch.setenv("LENS_SYNC_TOKEN", token)
    monkeypatch.setenv("LENS_SYNC_URL", upstream.url)
    upstream.hostile_reads = True
    for path_mode in ("200-html", "302"):
        upstream.mode = path_mode
        code, out, _ = run_cli(capsys, "sync", "--data-dir", str(data), "--check")
        assert code == 1 and "not a lens aggregator" in out, out

    monkeypatch.setenv("LENS_SYNC_URL", f"http://127.0.0.1:{free_port()}")
    code, out, _ = run_cli(capsys, "sync", "--data-dir", str(data), "--check")
    assert code == 1 and "cannot reach" in out


def test_sync_exits_non_zero_while_records_wait(
    tmp_path: Path, aggregator: AggregatorProcess, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only the records whose device id the token may upload are delivered; the others are quarantined, named,
    and sync says so rather than exiting 0 on a silent success."""
    data = tmp_path / "data"
    fill(data, 10)
    with Outbox(data / "outbox.db") as box:
        box.append_many(synthetic_records(5, seed=9, device_id="old-hostname"))
    use_agent_env(monkeypatch, f"http://127.0.0.1:{aggregator.port}", device_token(aggregator.db))
    code, out, err = run_cli(capsys, "sync", "--data-dir", str(data))
    assert code == 1, (out, err)
    assert "5 records quarantined instead of delivered" in err
    assert "10 accepted" in out and "5 quarantined" in out and "other_device" in out
    assert "--as-device dev-1" in out
    assert outbox_counts(data) == (0, 5)


def test_status_says_when_records_wait_and_sync_is_not_configured(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    fill(data, 3)
    monkeypatch.delenv("LENS_SYNC_URL", raising=False)
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json")
    status = json.loads(out)
    assert code == 1 and any("sync.url is not set" in r for r in status["reasons"]), status["reasons"]


def test_conservation_through_a_hostile_network(tmp_path: Path, aggregator: AggregatorProcess) -> None:
    """The conservation oracle with every kind of hostile answer mixed in at random, while the agent produces and
    syncs; then the network heals and the agent drains: every stored id arrives exactly once."""
    up = HostileUpstream(f"http://127.0.0.1:{aggregator.port}", seed=5).start()
    try:
        token = device_token(aggregator.db)
        data = tmp_path / "data"
        up.mode = "chaos"
        proc = driver(data, up.url, token, "--count", "900", "--pause", "0.004", "--batch-size", "30", "--timeout", "2")
        out, _ = proc.communicate(timeout=240)
        obligations = stored_ids(out)
        assert len(obligations) == 900
        stats = drain(data, up.url, token)  # still through the hostile network: retried until all acknowledged
        hostile_seen = {m for m in up.seen if m != "pass"}
        assert len(hostile_seen) >= 8, up.seen
        assert stats["records"] == 0 and stats["dropped_total"] == 0 and stats["quarantined_total"] == 0
        up.mode = "pass"
        stats = drain(data, up.url, token)
        assert stats["records"] == 0 and stats["dropped_total"] == 0 and stats["quarantined_total"] == 0
        check_conservation(aggregator.db, obligations)
    finally:
        up.stop()
