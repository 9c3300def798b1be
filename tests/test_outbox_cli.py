"""lens-agent outbox list / export / retry / drop / ack-damage, through the real command line on real outboxes."""

from __future__ import annotations

import json
import os
import stat
import threading
from pathlib import Path
from typing import Any

import pytest

from agent.outbox import QUARANTINE_CODES, Outbox
from agent.outbox_cli import CODES_HELP
from agent.synthetic import synthetic_records
from lens_core import wire

from .test_bench_cli import run_cli


@pytest.fixture
def data(tmp_path: Path) -> dict[str, Any]:
    """An outbox with 2 pending and 4 quarantined records: 2 of another device, 1 refused, 1 undecodable."""
    directory = tmp_path / "data"
    records = synthetic_records(6, seed=61, device_id="old-host")
    with Outbox(directory / "outbox.db") as box:
        box.append_many(records[:5])
        box.append_encoded([(bytes(range(16)), b"\xff\x00 not cbor")])
        rows = box.pending(10)
        box.quarantine(rows[0].seq, "the aggregator's token is for orin-017, the record names old-host", "other_device")
        box.quarantine(rows[1].seq, "the aggregator's token is for orin-017, the record names old-host", "other_device")
        box.quarantine(rows[2].seq, "refused by the aggregator: ttft_us must be >= 0", "refused")
        box.quarantine(rows[5].seq, "undecodable on the device: malformed cbor", "undecodable")
        seqs = [r.seq for r in box.quarantined()]
    return {"dir": directory, "records": records, "seqs": seqs}


def cli(capsys: pytest.CaptureFixture[str], data: dict[str, Any], *args: str) -> tuple[int, str, str]:
    return run_cli(capsys, "outbox", *args, "--data-dir", str(data["dir"]))


def test_list_shows_pending_quarantined_rows_and_counters(capsys: pytest.CaptureFixture[str], data: Any) -> None:
    code, out, _ = cli(capsys, data, "list", "--json")
    doc = json.loads(out)
    assert code == 0 and doc["pending"]["records"] == 2
    rows = doc["quarantine"]["rows"]
    assert [r["seq"] for r in rows] == data["seqs"] == [1, 2, 3, 4]
    assert [r["code"] for r in rows] == ["other_device", "other_device", "refused", "undecodable"]
    assert [r["device_id"] for r in rows] == ["old-host", "old-host", "old-host", None]
    assert rows[0]["id"] == data["records"][0]["id"].replace("-", "")
    assert doc["quarantine"]["quarantined"] == {"other_device": 2, "refused": 1, "undecodable": 1}
    code, out, _ = cli(capsys, data, "list")
    assert code == 0 and "quarantine  4 records" in out and "other_device  old-host" in out
    assert "quarantined so far  other_device 2, refused 1, undecodable 1" in out


def test_export_writes_every_record_decoded_or_raw(
    capsys: pytest.CaptureFixture[str], data: Any, tmp_path: Path
) -> None:
    target = tmp_path / "quarantined.ndjson"
    code, _, err = cli(capsys, data, "export", str(target))
    assert code == 0 and "exported 4 quarantined records" in err
    lines = [json.loads(line) for line in target.read_text().splitlines()]
    assert [line["code"] for line in lines] == ["other_device", "other_device", "refused", "undecodable"]
    assert [line["record"]["id"] for line in lines[:3]] == [r["id"] for r in data["records"][:3]]
    assert lines[0]["record"]["ttft_ms"] == data["records"][0]["ttft_ms"]  # decoded back to the measurement
    assert "record" not in lines[3] and lines[3]["body_hex"] == (b"\xff\x00 not cbor").hex()
    assert lines[3]["error"].startswith("malformed cbor")
    code, out, _ = cli(capsys, data, "export", "--pending", "-")
    pending = [json.loads(line) for line in out.splitlines()]
    assert code == 0 and [p["record"]["id"] for p in pending] == [r["id"] for r in data["records"][3:5]]
    code, _, err = cli(capsys, data, "export", str(tmp_path / "no" / "such" / "dir.ndjson"))
    assert code == 2 and "cannot be written" in err and err.count("\n") == 1


def test_export_into_a_fifo_or_through_a_link_keeps_them(
    capsys: pytest.CaptureFixture[str], data: Any, tmp_path: Path
) -> None:
    """A named pipe (as /dev/stdout or a device would be) is written into, never replaced by a regular file; a link
    to a file replaces the file it names and stays a link."""
    fifo = tmp_path / "pipe"
    os.mkfifo(fifo)
    received: list[str] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_text()))
    reader.start()
    code, _, err = cli(capsys, data, "export", str(fifo))
    reader.join(timeout=30)
    assert code == 0 and "exported 4 quarantined records" in err
    assert stat.S_ISFIFO(fifo.lstat().st_mode) and len(received[0].splitlines()) == 4
    target, link = tmp_path / "real.ndjson", tmp_path / "link.ndjson"
    target.write_text("old\n")
    link.symlink_to(target)
    code, _, err = cli(capsys, data, "export", str(link))
    assert code == 0 and link.is_symlink() and len(target.read_text().splitlines()) == 4


def test_retry_moves_rows_back_and_as_device_rewrites_them(capsys: pytest.CaptureFixture[str], data: Any) -> None:
    code, out, _ = cli(capsys, data, "retry", "--code", "other_device", "--as-device", "orin-017")
    assert code == 0 and "moved 2 quarantined records back to the queue as device orin-017" in out
    code, out, _ = cli(capsys, data, "retry", str(data["seqs"][2]))
    assert code == 0 and "moved 1" in out
    with Outbox(data["dir"] / "outbox.db") as box:
        devices = {}
        for row in box.pending(10):
            record = wire.from_wire(wire.loads(row.body, row.codec))
            devices[record["id"]] = record["device_id"]
        records = data["records"]
        assert [devices[r["id"]] for r in records[:3]] == ["orin-017", "orin-017", "old-host"]
        stats = box.stats()
        assert stats.records == 5 and dict(stats.quarantine_retried) == {"other_device": 2, "refused": 1}
        assert [r.code for r in box.quarantined()] == ["undecodable"]


def test_drop_needs_yes_and_is_counted(capsys: pytest.CaptureFixture[str], data: Any) -> None:
    code, out, err = cli(capsys, data, "drop", "--code", "undecodable")
    assert code == 2 and out == "" and err.count("\n") == 1 and "add --yes" in err
    code, out, _ = cli(capsys, data, "drop", "--code", "undecodable", "--yes")
    assert code == 0 and "dropped 1" in out
    code, out, _ = cli(capsys, data, "drop", "--all", "--yes")
    assert code == 0 and "dropped 3" in out
    with Outbox(data["dir"] / "outbox.db") as box:
        stats = box.stats()
        assert stats.quarantine_records == 0 and stats.records == 2
        assert dict(stats.quarantine_dropped) == {"undecodable": 1, "other_device": 2, "refused": 1}


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("retry", "99"), "no quarantined record with seq 99"),
        (("drop", "1", "98", "--yes"), "no quarantined record with seq 98"),
        (("retry", "3", "--code", "undecodable"), "no quarantined record with code undecodable with seq 3"),
        (("retry", "--code", "weird"), "unknown quarantine code 'weird': expected one of undecodable, refused"),
        (("retry",), "say which quarantined records: SEQ ..., --code CODE, or --all"),
        (("drop", "--all", "1", "--yes"), "give --all, or SEQ and/or --code, not both"),
        (("retry", "4", "--as-device", "orin-017"), "seq 4 does not decode (malformed cbor"),
        (("retry", "x"), "'x' is not a valid integer"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture[str], data: Any, args: tuple[str, ...], message: str
) -> None:
    code, out, err = cli(capsys, data, *args)
    assert code == 2 and out == "" and message in err and err.count("\n") == 1, err
    with Outbox(data["dir"] / "outbox.db") as box:  # nothing was changed by a refused command
        assert box.stats().quarantine_records == 4 and box.stats().records == 2


def test_no_outbox_is_a_usage_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    code, _, err = run_cli(capsys, "outbox", "list", "--data-dir", str(tmp_path / "nothing"))
    assert code == 2 and "no outbox at" in err and "agent.data_dir" in err
    assert not (tmp_path / "nothing").exists()  # looking does not create one


def test_damage_is_shown_by_status_until_acknowledged(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    directory = tmp_path / "data"
    path = directory / "outbox.db"
    with Outbox(path) as box:
        box.append_many(synthetic_records(200, seed=62))
    with path.open("r+b") as handle:
        handle.write(bytes(4096))  # the header page is gone
    monkeypatch.setenv("LENS_SYNC_URL", "http://127.0.0.1:9")
    damaged = path.read_bytes()
    before = sorted(p.name for p in directory.iterdir())
    # a read changes nothing: status and outbox list name the damage and what salvages it
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(directory), "--json", "--no-probe")
    doc = json.loads(out)
    assert code == 1 and any("is not an SQLite database" in r and "salvages it" in r for r in doc["reasons"]), doc
    code, out, err = run_cli(capsys, "outbox", "list", "--data-dir", str(directory))
    assert code == 2 and "is not an SQLite database" in err and err.count("\n") == 1, err
    assert path.read_bytes() == damaged and sorted(p.name for p in directory.iterdir()) == before
    Outbox(path).close()  # what lens-agent run or sync does when it opens the outbox: the salvage
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(directory), "--json", "--no-probe")
    doc = json.loads(out)
    assert code == 1 and doc["outbox"]["records"] == 200 and doc["outbox"]["lost_total"] == 0
    damage = [r for r in doc["reasons"] if "damaged" in r]
    assert len(damage) == 1 and "200 of 200 records recovered, 0 lost" in damage[0]
    assert "lens-agent outbox ack-damage" in damage[0]
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(directory), "--no-probe")
    assert code == 1 and "the outbox was damaged" in out and "quarantine 0 kept" in out
    code, out, _ = run_cli(capsys, "outbox", "ack-damage", "--data-dir", str(directory))
    assert code == 0 and out.startswith("acknowledged: ")
    code, out, _ = run_cli(capsys, "status", "--data-dir", str(directory), "--json", "--no-probe")
    doc = json.loads(out)
    assert not [r for r in doc["reasons"] if "damaged" in r] and doc["outbox"]["damage"] is None


def test_every_outbox_command_has_help_with_an_example(capsys: pytest.CaptureFixture[str]) -> None:
    for args in ([], ["list"], ["export"], ["retry"], ["drop"], ["ack-damage"]):
        code, out, _ = run_cli(capsys, "outbox", *args, "--help")
        assert code == 0 and "Example:" in out, args
    assert all(code in CODES_HELP for code in QUARANTINE_CODES)
