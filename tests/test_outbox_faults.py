"""The outbox under faults, on real storage: a full filesystem (a 3 MiB tmpfs), another process holding the lock,
a bounded quarantine that counts everything leaving it, and damaged files whose losses are counted."""

from __future__ import annotations

import contextlib
import errno
import os
import random
import shutil
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from agent.outbox import (
    QUARANTINE_CODES,
    SCHEMA_VERSION,
    AsyncOutbox,
    Outbox,
    OutboxBusy,
    OutboxFull,
    _error_kind,
    _migrate_v1,
)
from agent.sqlite_salvage import detect_page_size, scan_database
from agent.status import evaluate
from agent.sync import SyncSettings, Uploader
from agent.synthetic import synthetic_records
from aggregator.app import Settings, create_app
from aggregator.store import SQLiteStore
from lens_core import wire
from lens_core.sqlite_schema import migrate_forward

from .test_bench_cli import run_cli

RESERVE = 512 * 1024
DEVICE = "dev-full"
NOW = 2_000_000_000_000_000


# -- helpers -------------------------------------------------------------------------------------------------------
@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A real 3 MiB tmpfs, unmounted afterwards."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)], capture_output=True)
    if done.returncode:
        pytest.fail(f"cannot mount a tmpfs at {mount} (these tests need root): {done.stderr.decode().strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=True)


def fill(directory: Path, name: str = "filler") -> Path:
    """Write a file until the filesystem has no byte left."""
    path = directory / name
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        chunk = bytes(4096)
        while True:
            try:
                os.write(fd, chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
                break
    finally:
        os.close(fd)
    assert shutil.disk_usage(directory).free == 0
    return path


def ids_of(records: list[dict[str, Any]]) -> list[bytes]:
    return [bytes.fromhex(r["id"].replace("-", "")) for r in records]


def record_id(row: Any) -> str:
    return str(wire.from_wire(wire.loads(row.body, row.codec))["id"])


def books(path: Path) -> dict[str, int]:
    """The outbox's maintained counts next to the real ones, read straight from the file."""
    conn = sqlite3.connect(path)
    try:
        meta = {k: int(v) for k, v in conn.execute("SELECT key, value FROM meta") if str(v).lstrip("-").isdigit()}
        return {
            "records": conn.execute("SELECT COUNT(*) FROM records").fetchone()[0],
            "records_expected": meta.get("records_expected", -1),
            "stored_bytes": meta.get("stored_bytes", -1),
            "records_bytes": conn.execute("SELECT COALESCE(SUM(size), 0) FROM records").fetchone()[0],
            "quarantine": conn.execute("SELECT COUNT(*) FROM quarantine").fetchone()[0],
            "quarantine_expected": meta.get("quarantine_expected", -1),
            "quarantine_bytes": meta.get("quarantine_bytes", -1),
            "quarantine_size": conn.execute("SELECT COALESCE(SUM(size), 0) FROM quarantine").fetchone()[0],
        }
    finally:
        conn.close()


def assert_books_balance(path: Path) -> None:
    b = books(path)
    assert b["records"] == b["records_expected"], b
    assert b["stored_bytes"] == b["records_bytes"], b
    assert b["quarantine"] == b["quarantine_expected"], b
    assert b["quarantine_bytes"] == b["quarantine_size"], b


# -- a full disk ---------------------------------------------------------------------------------------------------
def test_full_disk_drop_oldest_stores_by_dropping_and_acks_still_work(small_disk: Path) -> None:
    records = synthetic_records(8000, seed=11)
    box = Outbox(small_disk / "outbox.db", synchronous="NORMAL", reserve_bytes=RESERVE)
    try:
        assert box.reserve_path.stat().st_size == RESERVE
        for start in range(0, len(records), 50):
            results = box.append_many(records[start : start + 50])  # never raises: the policy makes room
            assert all(r.stored for r in results)
        stats = box.stats()
        # 8000 records (~7 MiB) cannot fit in 3 MiB: the oldest went, each one counted, as dropped for the disk
        assert stats.dropped_disk_full_total > 4000
        assert stats.dropped_total == stats.dropped_disk_full_total  # the 256 MiB bound never applied
        assert stats.records + stats.dropped_total == len(records)
        assert stats.disk_full_since_us is not None and "full" in (stats.disk_full_message or "")
        health = evaluate(stats, {"last_success_us": str(NOW)}, interval_s=60, now_us=NOW)
        assert [r for r in health.reasons if r.startswith("the disk holding the outbox is full")]
        pending = box.pending(len(records))
        assert len(pending) == stats.records
        assert record_id(pending[-1]) == records[-1]["id"]  # drop_oldest: the newest are kept
        assert_books_balance(box.path)

        filler = fill(small_disk)  # not one byte left, not even the reserve (released when the disk filled)
        assert not box.reserve_path.exists()
        assert box.ack([r.seq for r in pending[:500]]) == 500  # deleting works on a full filesystem
        acked = 500
        while rows := box.pending(500):
            acked += box.ack([r.seq for r in rows])
        assert acked == stats.records and box.stats().records == 0
        assert box.stats().acked_total == acked

        later = synthetic_records(100, seed=12)
        assert all(r.stored for r in box.append_many(later))  # and then appends succeed
        assert [record_id(r) for r in box.pending(200)] == [r["id"] for r in later]

        filler.unlink()  # room again: the reserve comes back and the disk-full state is cleared
        assert box.append(synthetic_records(1, seed=13)[0]).stored
        stats = box.stats()
        assert stats.disk_full_since_us is None and stats.disk_full_message is None
        health = evaluate(stats, {"last_success_us": str(NOW)}, interval_s=60, now_us=NOW)
        assert not [r for r in health.reasons if "disk" in r]
        assert box.reserve_path.stat().st_size == RESERVE
        assert_books_balance(box.path)
    finally:
        box.close()


def test_full_disk_drop_newest_drops_and_counts_the_new_records(small_disk: Path) -> None:
    records = synthetic_records(6000, seed=14)
    box = Outbox(small_disk / "outbox.db", synchronous="NORMAL", policy="drop_newest", reserve_bytes=RESERVE)
    try:
        results = []
        for start in range(0, len(records), 50):
            results += box.append_many(records[start : start + 50])
        refused = [n for n, r in enumerate(results) if not r.stored]
        assert refused and all(r.dropped == 1 for r in (results[n] for n in refused))
        stats = box.stats()
        assert stats.dropped_disk_full_total == stats.dropped_total == len(refused)
        assert stats.records + len(refused) == len(records)
        assert record_id(box.pending(1)[0]) == records[0]["id"]  # drop_newest: the oldest are kept
        assert box.ack([r.seq for r in box.pending(300)]) == 300
        assert_books_balance(box.path)
    finally:
        box.close()


def test_full_disk_with_nothing_to_free_raises_outbox_full(small_disk: Path) -> None:
    path = small_disk / "outbox.db"
    record = synthetic_records(1, seed=15)[0]
    box = Outbox(path, reserve_bytes=0)  # no reserve: nothing can be freed
    try:
        box.checkpoint()
        filler = fill(small_disk)
        with pytest.raises(OutboxFull) as info:
            box.append(record)
        message = str(info.value)
        assert message.startswith(f"outbox {path}: storing: the disk is full (0 bytes free") and "\n" not in message
        assert box.stats().records == 0  # reading still works
        filler.unlink()
        assert box.append(record).stored
    finally:
        box.close()


def test_cli_on_a_full_disk_says_so_in_one_line(
    small_disk: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = small_disk / "outbox.db"
    monkeypatch.setenv("LENS_OUTBOX_DISK_RESERVE", "64KiB")  # cannot be created on a full disk: none to release
    args = ("outbox", "drop", "--all", "--yes", "--data-dir", str(small_disk))
    box = Outbox(path, reserve_bytes=0)  # keeps the WAL and shared-memory files open, as a running service does
    try:
        box.append_many(synthetic_records(5, seed=16))
        box.quarantine(box.pending(1)[0].seq, "refused by the aggregator: test", code="refused")
        box.checkpoint()
        filler = fill(small_disk)
        code, out, err = run_cli(capsys, *args)
        assert code == 1 and out == ""
        assert err.startswith(f"lens-agent: error: outbox {path}: dropping quarantined records: the disk is full")
        assert err.count("\n") == 1 and "Traceback" not in err
    finally:
        box.close()
    # alone (opening may need a few bytes itself, for the WAL index): said the same way, and never taken for damage
    code, out, err = run_cli(capsys, *args)
    assert code == 1 and err.startswith(f"lens-agent: error: outbox {path}: ") and "the disk is full" in err
    assert err.count("\n") == 1 and not list(small_disk.glob("outbox.db.damaged-*"))
    filler.unlink()
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "dropped 1" in out


class Aggregator:
    """A real aggregator app on a real loopback port (the pattern of tests/test_sync.py)."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.runner: web.AppRunner | None = None
        self.port = 0

    async def start(self) -> None:
        self.runner = web.AppRunner(create_app(Settings(), SQLiteStore(self.db)))
        await self.runner.setup()
        await web.TCPSite(self.runner, "127.0.0.1", 0).start()
        self.port = self.runner.addresses[0][1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def token(self) -> str:
        return SQLiteStore(self.db).add_token(DEVICE, "device", time.time_ns() // 1000)

    def ids(self) -> list[bytes]:
        return SQLiteStore(self.db).record_ids()


async def test_sync_delivers_everything_from_an_outbox_on_a_full_disk(small_disk: Path, tmp_path: Path) -> None:
    agg = Aggregator(tmp_path / "agg.db")
    await agg.start()
    try:
        records = synthetic_records(5000, seed=17, device_id=DEVICE)
        box = Outbox(small_disk / "outbox.db", synchronous="NORMAL", reserve_bytes=RESERVE)
        for start in range(0, len(records), 50):
            box.append_many(records[start : start + 50])
        assert box.stats().disk_full_since_us is not None
        waiting = {row.id for row in box.pending(len(records))}
        assert 1000 < len(waiting) < len(records)
        fill(small_disk)
        outbox = AsyncOutbox(box)
        uploader = Uploader(outbox, SyncSettings(url=agg.url, token=agg.token(), device_id=DEVICE))
        try:
            report = await uploader.sync_now()
        finally:
            await uploader.close()
        assert report.ok, report.error
        assert report.accepted == len(waiting) and report.pending == 0
        assert set(agg.ids()) == waiting
        stats = await outbox.stats()
        assert stats.records == 0 and stats.acked_total == len(waiting)
        await outbox.close()
    finally:
        await agg.stop()


# -- another process holds the lock --------------------------------------------------------------------------------
_LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
if sys.argv[3] == "exclusive-mode":  # not even readers get in (WAL mode otherwise lets them)
    conn.execute("PRAGMA locking_mode=EXCLUSIVE")
conn.execute("BEGIN EXCLUSIVE")
conn.execute("INSERT OR REPLACE INTO meta(key, value) VALUES ('locker', 'here')")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


@contextlib.contextmanager
def held_lock(path: Path, seconds: float, mode: str = "write") -> Iterator[subprocess.Popen[str]]:
    """A second process holding a write transaction on ``path`` for ``seconds``."""
    locker = subprocess.Popen(
        [sys.executable, "-c", _LOCKER, str(path), str(seconds), mode], stdout=subprocess.PIPE, text=True
    )
    try:
        assert locker.stdout is not None and locker.stdout.readline().strip() == "locked"
        yield locker
    finally:
        locker.kill()
        locker.wait()


def test_a_lock_held_past_the_busy_timeout_raises_outbox_busy(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    records = synthetic_records(4, seed=31)
    with Outbox(path) as setup:
        setup.append_many(records[:3])
    box = Outbox(path, busy_timeout=1.0)
    try:
        seq = box.pending(1)[0].seq
        calls: dict[str, Callable[[], object]] = {
            "append": lambda: box.append(records[3]),
            "ack": lambda: box.ack([seq]),
            "quarantine": lambda: box.quarantine(seq, "test", code="refused"),
            "set_state": lambda: box.set_state({"last_error": "x"}),
            "retry": lambda: box.retry_quarantined(),
            "drop": lambda: box.drop_quarantined(),
            "ack_damage": box.ack_damage,
        }
        with held_lock(path, 60):
            assert [r.seq for r in box.pending(10)] == [seq, seq + 1, seq + 2]  # WAL: readers are not blocked
            for name, call in calls.items():
                started = time.monotonic()
                with pytest.raises(OutboxBusy) as info:
                    call()
                waited = time.monotonic() - started
                assert 0.9 <= waited < 4, (name, waited)
                message = str(info.value)
                assert message.startswith(f"outbox {path}: ") and "locked by another process" in message, name
                assert "outbox.busy_timeout (1 s)" in message and "\n" not in message
            assert box.stats().records == 3
        assert box.ack([seq]) == 1  # released: the same calls work
        assert box.append(records[3]).stored
    finally:
        box.close()


def test_a_lock_released_within_the_busy_timeout_is_waited_out(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    records = synthetic_records(2, seed=32)
    with Outbox(path) as setup:
        setup.append(records[0])
    with Outbox(path, busy_timeout=10.0) as box, held_lock(path, 0.6):
        started = time.monotonic()
        assert box.append(records[1]).stored
        assert 0.4 <= time.monotonic() - started < 5
        assert box.stats().records == 2


def test_opening_a_locked_outbox_waits_and_never_salvages(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as setup:
        setup.append_many(synthetic_records(3, seed=33))
    with held_lock(path, 60, "exclusive-mode"):
        started = time.monotonic()
        with pytest.raises(OutboxBusy, match="opening: locked by another process"):
            Outbox(path, busy_timeout=1.0)
        assert time.monotonic() - started >= 0.9
    assert not list(tmp_path.glob("outbox.db.damaged-*"))
    with Outbox(path) as box:
        assert box.stats().records == 3 and box.last_salvage() is None and box.stats().damage is None


def test_cli_on_a_locked_outbox_says_so_in_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "outbox.db"
    with Outbox(path) as box:
        box.append_many(synthetic_records(2, seed=34))
        box.quarantine(box.pending(1)[0].seq, "refused by the aggregator: test", code="refused")
    monkeypatch.setenv("LENS_OUTBOX_BUSY_TIMEOUT", "500ms")
    with held_lock(path, 60):
        code, out, err = run_cli(capsys, "outbox", "retry", "--all", "--data-dir", str(tmp_path))
    assert code == 1 and out == ""
    assert err.startswith(f"lens-agent: error: outbox {path}: moving quarantined records back to the queue: locked")
    assert "outbox.busy_timeout (0.5 s)" in err and err.count("\n") == 1


@pytest.mark.parametrize(
    ("error", "kind"),
    [
        (sqlite3.OperationalError("database is locked"), "busy"),
        (sqlite3.OperationalError("database table is locked"), "busy"),
        (sqlite3.OperationalError("database or disk is full"), "full"),
        (sqlite3.OperationalError("disk I/O error"), "ioerr"),
        (sqlite3.DatabaseError("file is not a database"), "corrupt"),
        (sqlite3.DatabaseError("database disk image is malformed"), "corrupt"),
        (sqlite3.OperationalError("unable to open database file"), "environment"),
        (sqlite3.OperationalError("attempt to write a readonly database"), "environment"),
        (sqlite3.OperationalError("no such table: records"), "other"),
    ],
)
def test_errors_are_told_apart_by_message_where_sqlite_gives_no_code(error: sqlite3.Error, kind: str) -> None:
    """Python 3.10 has no ``sqlite_errorcode``; an exception built here has none either."""
    assert getattr(error, "sqlite_errorcode", None) is None
    assert _error_kind(error) == kind


# -- the quarantine ------------------------------------------------------------------------------------------------
def test_quarantine_is_bounded_in_bytes_and_evictions_are_counted_by_code(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    codes = ["refused", "too_large", "other_device"]
    with Outbox(path, max_quarantine_bytes=8 * 1024) as box:
        box.append_many(synthetic_records(40, seed=41))
        rows = box.pending(40)
        for n, row in enumerate(rows[:30]):
            assert box.quarantine(row.seq, f"reason {n}", code=codes[n % 3])
        with pytest.raises(ValueError, match="quarantine code must be one of"):
            box.quarantine(rows[35].seq, "x", code="nonsense")
        stats = box.stats()
        assert stats.quarantined_total == 30 and stats.quarantined_by_code == {c: 10 for c in codes}
        assert 0 < stats.quarantine_records < 30 and stats.quarantine_bytes <= 8 * 1024
        kept = box.quarantined()
        evicted = 30 - len(kept)
        assert stats.quarantine_evicted_total == evicted
        # the oldest went first, and each is counted under its own code
        assert [r.queue_seq for r in kept] == [r.seq for r in rows[evicted:30]]
        assert [r.reason for r in kept] == [f"reason {n}" for n in range(evicted, 30)]
        expected = {c: sum(1 for n in range(evicted) if codes[n % 3] == c) for c in codes}
        assert dict(stats.quarantine_evicted) == {c: n for c, n in expected.items() if n}
        assert stats.records == 10
    assert_books_balance(path)


def test_retry_and_drop_move_rows_out_and_every_one_is_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    records = synthetic_records(6, seed=42, device_id="old-hostname")
    with Outbox(path) as box:
        box.append_many(records)
        rows = box.pending(6)
        for row in rows[:4]:
            box.quarantine(row.seq, "the record names another device", code="other_device")
        box.quarantine(rows[4].seq, "refused by the aggregator: bad", code="refused")
        q = box.quarantined()
        assert [r.code for r in q] == ["other_device"] * 4 + ["refused"]
        assert box.retry_quarantined([q[0].seq]) == 1  # as it was
        assert box.retry_quarantined(code="other_device", as_device="orin-017") == 3
        assert box.drop_quarantined(code="refused") == 1
        stats = box.stats()
        assert stats.records == 5 and stats.quarantine_records == 0
        assert dict(stats.quarantine_retried) == {"other_device": 4}
        assert dict(stats.quarantine_dropped) == {"refused": 1}
        assert stats.quarantined_total == 5 == stats.quarantine_retried_total + stats.quarantine_dropped_total
        devices = {}
        for row in box.pending(10):
            record = wire.from_wire(wire.loads(row.body, row.codec))
            devices[record["id"]] = record["device_id"]
        assert devices[records[0]["id"]] == "old-hostname"
        assert [devices[r["id"]] for r in records[1:4]] == ["orin-017"] * 3
        assert devices[records[5]["id"]] == "old-hostname"
        assert records[4]["id"] not in devices
    assert_books_balance(path)


def test_quarantine_codes_are_stable() -> None:
    assert set(QUARANTINE_CODES) >= {"undecodable", "refused", "too_large", "other_device", "salvaged"}


def test_a_version_1_outbox_is_migrated_and_its_silent_evictions_counted(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    conn = sqlite3.connect(path, isolation_level=None)
    migrate_forward(conn, {1: _migrate_v1}, lambda v: AssertionError(v))
    records = synthetic_records(5, seed=43)
    for record in records[:3]:
        body = wire.encode_record(record, "cbor")
        conn.execute(
            "INSERT INTO records(id, created_us, codec, size, body) VALUES (?, ?, 'cbor', ?, ?)",
            (ids_of([record])[0], NOW, len(body) + 96, body),
        )
    reasons = [
        "undecodable on the device: malformed cbor",
        "refused as too large by the aggregator: 413",
        "refused by the aggregator: bad field",
        "something nobody expected",
    ]
    for seq, reason in enumerate(reasons, start=100):
        body = wire.encode_record(records[3], "msgpack" if seq == 101 else "cbor")
        conn.execute(
            "INSERT INTO quarantine(seq, id, created_us, quarantined_us, reason, body) VALUES (?, ?, ?, ?, ?, ?)",
            (seq, ids_of([records[3]])[0], NOW, NOW, reason, body),
        )
    conn.execute("INSERT INTO meta(key, value) VALUES ('quarantined_total', '10'), ('dropped_total', '2')")
    conn.close()
    with Outbox(path) as box:
        stats = box.stats()
        assert stats.records == 3 and stats.dropped_total == 2 and stats.quarantined_total == 10
        assert [r.code for r in box.quarantined()] == ["undecodable", "too_large", "refused", "other"]
        assert [r.codec for r in box.quarantined()] == ["cbor", "msgpack", "cbor", "cbor"]
        assert [r.queue_seq for r in box.quarantined()] == [100, 101, 102, 103]
        # version 1 kept the newest rows and deleted 6 without a trace: now they are counted
        assert dict(stats.quarantine_evicted) == {"other": 6}
        assert sum(stats.quarantined_by_code.values()) == 10
        box.quarantine(box.pending(1)[0].seq, "again", code="refused")
        assert box.quarantined()[-1].seq == 104  # quarantine seqs are never reused
    assert sqlite3.connect(path).execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (
        str(SCHEMA_VERSION),
    )
    assert_books_balance(path)


# -- damage --------------------------------------------------------------------------------------------------------
ROWS = 3000


def damaged_outbox(directory: Path) -> tuple[Path, list[dict[str, Any]], int]:
    """A 3000-row outbox, closed (WAL checkpointed away); returns its path, records and the meta table's root."""
    path = directory / "outbox.db"
    records = synthetic_records(ROWS, seed=51)
    with Outbox(path, synchronous="NORMAL") as box:
        for start in range(0, ROWS, 500):
            box.append_many(records[start : start + 500])
    assert not Path(str(path) + "-wal").exists()
    conn = sqlite3.connect(path)
    meta_root = conn.execute("SELECT rootpage FROM sqlite_master WHERE name = 'meta'").fetchone()[0]
    conn.close()
    return path, records, meta_root


def overwrite_pages(path: Path, pages: dict[int, bytes]) -> None:
    with path.open("r+b") as handle:
        for number, content in pages.items():
            handle.seek((number - 1) * 4096)
            handle.write(content)


def recovered_of(box: Outbox, records: list[dict[str, Any]]) -> int:
    stats = box.stats()
    ids = [record_id(r) for r in box.pending(ROWS)]
    assert len(ids) == stats.records and set(ids) <= {r["id"] for r in records}
    return stats.records + stats.quarantined_by_code.get("salvaged", 0)


def test_header_page_zeroed_most_rows_recovered_and_status_unhealthy_until_acknowledged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path, records, _ = damaged_outbox(tmp_path)
    overwrite_pages(path, {1: bytes(4096)})
    assert detect_page_size(path.read_bytes()) == 4096
    with Outbox(path) as box:
        stats = box.stats()
        recovered = recovered_of(box, records)
        assert recovered >= 0.95 * ROWS
        assert recovered + stats.lost_total == ROWS
        assert stats.unreadable_pages_total >= 1  # page 1 is counted, no longer "0 pages unreadable"
        assert stats.damage and f"{recovered} of {ROWS} records recovered, {stats.lost_total} lost" in stats.damage
        assert "header was unreadable" in stats.damage
        health = evaluate(stats, {"last_success_us": str(NOW)}, interval_s=60, now_us=NOW)
        assert not health.healthy
        assert any("damaged" in r and "lens-agent outbox ack-damage" in r for r in health.reasons), health.reasons
    code, out, _ = run_cli(capsys, "outbox", "ack-damage", "--data-dir", str(tmp_path))
    assert code == 0 and out.startswith("acknowledged: ") and f"{recovered} of {ROWS}" in out
    code, out, _ = run_cli(capsys, "outbox", "ack-damage", "--data-dir", str(tmp_path))
    assert code == 0 and "no damage notice" in out
    with Outbox(path) as box:
        stats = box.stats()
        assert stats.damage is None and stats.lost_total == ROWS - recovered  # the count stays
        assert evaluate(stats, {"last_success_us": str(NOW)}, interval_s=60, now_us=NOW).healthy
    assert_books_balance(path)


def test_random_pages_overwritten_every_row_is_recovered_or_counted_lost(tmp_path: Path) -> None:
    path, records, meta_root = damaged_outbox(tmp_path)
    pages = path.stat().st_size // 4096
    rng = random.Random(7)
    victims = rng.sample([n for n in range(2, pages + 1) if n != meta_root], 15)
    overwrite_pages(path, {n: rng.randbytes(4096) for n in victims})
    with Outbox(path) as box:
        stats = box.stats()
        recovered = recovered_of(box, records)
        assert 0 < stats.lost_total < 200
        assert recovered + stats.lost_total == ROWS
        assert stats.loss_unknown_total == 0 and stats.unreadable_pages_total >= 1
        assert stats.damage is not None and f"{stats.lost_total} lost" in stats.damage
    assert_books_balance(path)


def test_when_the_counters_are_unreadable_the_loss_is_unknown_not_zero(tmp_path: Path) -> None:
    path, records, meta_root = damaged_outbox(tmp_path)
    overwrite_pages(path, {1: bytes(4096), meta_root: bytes(4096)})
    with Outbox(path) as box:
        stats = box.stats()
        assert recovered_of(box, records) >= 0.95 * ROWS
        assert stats.lost_total == 0 and stats.loss_unknown_total == 1
        assert stats.damage is not None and "how many were lost is unknown" in stats.damage
        assert not evaluate(stats, {"last_success_us": str(NOW)}, interval_s=60, now_us=NOW).healthy


def test_page_scan_reads_only_the_committed_wal(tmp_path: Path) -> None:
    """Frames after a torn (checksum-failing) frame are not trusted: rows in them are not resurrected."""
    path = tmp_path / "t.db"
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA wal_autocheckpoint=0")
    conn.execute("CREATE TABLE t(x TEXT)")
    conn.execute("INSERT INTO t VALUES ('committed')")
    size = Path(str(path) + "-wal").stat().st_size
    conn.execute("INSERT INTO t VALUES ('torn')")
    wal = Path(str(path) + "-wal")
    copy = tmp_path / "copy.db"
    shutil.copy(path, copy)
    data = bytearray(wal.read_bytes())
    data[size + 24 + 100] ^= 0xFF  # damage the first frame of the second transaction
    Path(str(copy) + "-wal").write_bytes(bytes(data))
    conn.close()
    values = {row[1][0] for row in scan_database(copy).rows if len(row[1]) == 1}
    assert values == {"committed"}
