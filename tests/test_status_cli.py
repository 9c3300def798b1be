"""lens-agent status / sync and lens-aggregator token from the command line, and the pure health rules."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest

from agent.outbox import AsyncOutbox, Outbox, OutboxStats
from agent.status import evaluate
from agent.sync import Uploader
from agent.synthetic import synthetic_records
from aggregator.cli import main as aggregator_main
from lens_core import wire

from .test_bench_cli import run_cli
from .test_sync import DEVICE, Aggregator, _insert_raw, settings_for, token_for
from .test_sync import aggregator as aggregator  # a real aggregator on 127.0.0.1 (a fixture)

NOW = 2_000_000_000_000_000


def stats(records: int = 0, bytes_: int = 0, max_bytes: int = 1000, oldest: int | None = None) -> OutboxStats:
    return OutboxStats(records, bytes_, max_bytes, oldest, 0, 0, 0)


def test_healthy_when_empty_or_recently_synced() -> None:
    assert evaluate(stats(), {}, interval_s=60, now_us=NOW).healthy
    recent = {"last_success_us": str(NOW - 100 * 10**6)}
    assert evaluate(stats(5, 100, oldest=NOW - 10**9), recent, interval_s=60, now_us=NOW).healthy


def test_unhealthy_when_pending_and_no_sync_for_three_intervals() -> None:
    old = {"last_success_us": str(NOW - 181 * 10**6)}
    health = evaluate(stats(5, 100), old, interval_s=60, now_us=NOW)
    assert not health.healthy and "no successful sync for 181 s" in health.reasons[0]
    never = evaluate(stats(5, 100, oldest=NOW - 200 * 10**6), {}, interval_s=60, now_us=NOW)
    assert not never.healthy and "oldest pending record" in never.reasons[0]
    assert evaluate(stats(5, 100, oldest=NOW - 100 * 10**6), {}, interval_s=60, now_us=NOW).healthy


def test_unhealthy_above_ninety_percent() -> None:
    health = evaluate(stats(5, 901, 1000, oldest=NOW), {"last_success_us": str(NOW)}, interval_s=60, now_us=NOW)
    assert not health.healthy and "90%" in health.reasons[0]


def test_status_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str], config_file: Any) -> None:
    data = tmp_path / "data"
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    doc = json.loads(out)
    assert code == 1 and doc["outbox"] is None and doc["healthy"] is False
    assert f"the data directory {data} (--data-dir) does not exist" in doc["reasons"][0]
    data.mkdir()
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    doc = json.loads(out)
    assert code == 1 and doc["outbox"] is None and doc["healthy"] is False
    assert f"the data directory {data} (--data-dir) holds neither an outbox nor service state" in doc["reasons"][0]
    with Outbox(data / "outbox.db") as box:
        box.append_many(synthetic_records(4, seed=1))
        box._conn.execute("UPDATE records SET created_us = ?", (time.time_ns() // 1000 - 10**9,))
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    doc = json.loads(out)
    assert code == 1 and doc["healthy"] is False and doc["outbox"]["records"] == 4
    assert "no successful sync" in doc["reasons"][0]
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 1 and "UNHEALTHY" in out and "records   4" in out
    bad = config_file('[sync]\ninterval = "often"\n')
    code, _, err = run_cli(capsys, "status", "--config", str(bad))
    assert code == 2 and "sync.interval" in err


def test_sync_cli_reports_unreachable_aggregator(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    data = tmp_path / "data"
    with Outbox(data / "outbox.db") as box:
        box.append_many(synthetic_records(3, seed=2, device_id="orin-017"))
    monkeypatch.setenv("LENS_AGENT_DEVICE_ID", "orin-017")
    monkeypatch.setenv("LENS_SYNC_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("LENS_SYNC_ALLOW_HTTP", "true")
    monkeypatch.setenv("LENS_SYNC_TOKEN", "lens_x")
    monkeypatch.setenv("LENS_SYNC_TIMEOUT", "2s")
    code, out, err = run_cli(capsys, "sync", "--data-dir", str(data), "--json")
    report = json.loads(out)
    assert code == 1 and report["pending"] == 3 and report["error_kind"] == "network"
    assert "cannot reach" in err
    monkeypatch.delenv("LENS_SYNC_TOKEN")
    code, _, err = run_cli(capsys, "sync", "--data-dir", str(data))
    assert code == 2 and "sync.token_file" in err


def run_aggregator(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as info:
        aggregator_main(list(args))
    captured = capsys.readouterr()
    return int(info.value.code or 0), captured.out, captured.err


def test_token_commands(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    db = str(tmp_path / "agg.db")
    code, out, _ = run_aggregator(capsys, "token", "add", "orin-1", "--db", db)
    first = out.strip()
    assert code == 0 and first.startswith("lens_") and len(first) > 40
    code, out, _ = run_aggregator(capsys, "token", "rotate", "orin-1", "--db", db, "--grace", "1h")
    assert code == 0 and out.strip() != first
    code, out, _ = run_aggregator(capsys, "token", "add", "--read", "grafana", "--db", db)
    code, out, _ = run_aggregator(capsys, "token", "list", "--db", db, "--json")
    rows = json.loads(out)
    assert [r["subject"] for r in rows] == ["grafana", "orin-1", "orin-1"]
    assert rows[1]["state"].startswith("active until") and rows[2]["state"] == "active"
    assert first not in out  # tokens are shown once, never listed
    code, _, err = run_aggregator(capsys, "token", "revoke", "orin-1", "--db", db)
    assert code == 0 and "revoked 2" in err
    code, _, err = run_aggregator(capsys, "token", "revoke", "nobody", "--db", db)
    assert code == 2 and "no active token" in err
    code, _, err = run_aggregator(capsys, "token", "rotate", "orin-1", "--db", db, "--grace", "soon")
    assert code == 2 and "auth.rotate_grace" in err


def test_every_aggregator_command_has_help(capsys: pytest.CaptureFixture[str]) -> None:
    for args in (["serve"], ["token", "add"], ["token", "list"], ["token", "revoke"], ["token", "rotate"]):
        code, out, _ = run_aggregator(capsys, *args, "--help")
        assert code == 0 and "Example:" in out, args


def test_serve_applies_every_server_limit_of_its_config(tmp_path: Path) -> None:
    """A limit set in aggregator.toml is the limit the running server enforces (here: records per batch)."""
    import urllib.error
    import urllib.request

    from lens_core import wire

    from .netproxy import free_port
    from .processes import AggregatorProcess, device_token

    config = tmp_path / "aggregator.toml"
    config.write_text("[server]\nmax_batch_records = 5\n")
    agg = AggregatorProcess(tmp_path / "agg.db", free_port(), config)
    agg.start()
    try:
        token = device_token(tmp_path / "agg.db")
        records = [wire.encode_record(r, "cbor") for r in synthetic_records(6, seed=3, device_id="dev-1")]
        body = wire.encode_batch(records, device_id="dev-1", batch_id="b", sent_us=time.time_ns() // 1000)
        request = urllib.request.Request(
            f"http://127.0.0.1:{agg.port}/api/v1/ingest",
            data=body,
            headers={"Authorization": f"Bearer {token}", "Content-Type": wire.CONTENT_TYPE},
        )
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=10)
        answer = json.loads(refused.value.read())
        assert refused.value.code == 413 and answer["code"] == "too_large" and "5" in answer["error"], answer
    finally:
        agg.stop()


def test_a_stale_sync_is_judged_on_the_monotonic_clock_across_wall_clock_steps() -> None:
    """The last success recorded at monotonic 1000 s in boot "b": the wall clock's readings do not decide."""
    pending = stats(5, 100, oldest=NOW - 10**6)
    synced = {"last_success_monotonic": "1000.0", "last_success_boot_id": "b"}
    # the wall clock stepped back a day after the sync: by the wall the success lies in the future, yet 10 min passed
    back = {**synced, "last_success_us": str(NOW + 86_400 * 10**6)}
    health = evaluate(pending, back, interval_s=60, now_us=NOW, monotonic_now=1600.0, current_boot="b")
    assert not health.healthy and "no successful sync for 600 s" in health.reasons[0]
    # stepped forward a day: by the wall a day passed, yet it was 10 s ago
    forward = {**synced, "last_success_us": str(NOW - 86_400 * 10**6)}
    assert evaluate(pending, forward, interval_s=60, now_us=NOW, monotonic_now=1010.0, current_boot="b").healthy
    # after a reboot the monotonic reading means nothing: the wall clock is all there is
    health = evaluate(pending, forward, interval_s=60, now_us=NOW, monotonic_now=1010.0, current_boot="other")
    assert not health.healthy and "no successful sync for 86400 s" in health.reasons[0]


async def test_records_quarantined_by_a_sync_are_a_warning_with_what_to_do(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], aggregator: Aggregator
) -> None:
    """A sync that the aggregator answers by refusing one record leaves it in the quarantine: the agent is healthy
    (it measures and uploads the rest), but status says so with the count and the commands that look and resend."""
    data = tmp_path / "data"
    data.mkdir()
    records = synthetic_records(5, seed=7, device_id=DEVICE)
    box = Outbox(data / "outbox.db", codec="msgpack")
    box.append_many(records[:4])
    # stored under another device id (the host name, before agent.device_id was set): the token never uploads it
    bad = wire.to_wire({**records[4], "device_id": "old-host"})
    _insert_raw(box, bad["id"], msgpack.packb(bad, use_bin_type=True))
    outbox = AsyncOutbox(box)
    uploader = Uploader(outbox, settings_for(aggregator, token_for(aggregator)))
    report = await uploader.sync_now()
    await uploader.close()
    await outbox.close()
    assert report.ok and report.accepted == 4 and report.quarantined == 1
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    doc = json.loads(out)
    assert code == 0 and doc["healthy"] is True and doc["reasons"] == []
    [warning] = doc["warnings"]
    assert warning.startswith("1 record in quarantine, not uploaded (quarantined so far: other_device 1)")
    assert "`lens-agent outbox list`" in warning and "`lens-agent outbox retry --all`" in warning
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--no-probe")
    assert code == 0 and out.startswith("health      OK with 1 warning\n  WARNING: 1 record in quarantine")
    # once the operator has dealt with it, the warning is gone
    code, _, err = run_cli(capsys, "outbox", "drop", "--all", "--yes", "--data-dir", str(data))
    assert code == 0, err
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(data), "--json", "--no-probe")
    assert code == 0 and json.loads(out)["warnings"] == []
