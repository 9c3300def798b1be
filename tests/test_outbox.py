"""The outbox: durability, the byte bound, quarantine, salvage of damaged files, migrations."""

from __future__ import annotations

import sqlite3
from pathlib import Path

import pytest

from agent.outbox import SCHEMA_VERSION, Outbox, OutboxError
from agent.synthetic import synthetic_records
from lens_core import wire


def test_append_pending_ack_and_restart(tmp_path: Path) -> None:
    path = tmp_path / "outbox.db"
    records = synthetic_records(30, seed=1)
    with Outbox(path) as box:
        results = [box.append(r) for r in records[:10]]
        box.append_many(records[10:])
        assert all(r.stored and r.dropped == 0 for r in results)
        first = box.pending(12)
        assert [wire.from_wire(wire.loads(p.body, p.codec))["id"] for p in first] == [r["id"] for r in records[:12]]
        assert box.ack([p.seq for p in first]) == 12
    # the read position is the table: after a restart the next rows are the unacknowledged ones
    with Outbox(path) as box:
        stats = box.stats()
        assert stats.records == 18
        nxt = box.pending(100)
        assert wire.from_wire(wire.loads(nxt[0].body, nxt[0].codec))["id"] == records[12]["id"]
        assert stats.bytes == sum(len(p.body) for p in nxt) + 18 * 96


def test_the_same_record_is_stored_once(tmp_path: Path) -> None:
    record = synthetic_records(1, seed=2)[0]
    with Outbox(tmp_path / "o.db") as box:
        box.append(record)
        box.append(record)
        assert box.stats().records == 1


@pytest.mark.parametrize("bound_mib", [1, 4])
def test_bound_is_honoured_on_disk_and_drops_are_counted(tmp_path: Path, bound_mib: int) -> None:
    bound = bound_mib * 1024**2
    records = synthetic_records(2500 * bound_mib, seed=3)
    with Outbox(tmp_path / "o.db", max_bytes=bound, synchronous="NORMAL") as box:
        for start in range(0, len(records), 100):
            box.append_many(records[start : start + 100])
        box.checkpoint()
        stats = box.stats()
        assert stats.dropped_total > 0
        assert stats.records + stats.dropped_total == len(records)
        assert box.file_bytes() <= bound * 1.05
        assert box.file_bytes() >= bound * 0.8  # the bound is used, not wasted
        # drop_oldest: what is left is the newest
        newest = box.pending(stats.records)[-1]
        assert wire.from_wire(wire.loads(newest.body, newest.codec))["id"] == records[-1]["id"]


def test_drop_newest_policy(tmp_path: Path) -> None:
    records = synthetic_records(400, seed=4)
    with Outbox(tmp_path / "o.db", max_bytes=64 * 1024, policy="drop_newest") as box:
        results = box.append_many(records)
        kept = [r for r in results if r.stored]
        assert 0 < len(kept) < len(records)
        assert box.stats().dropped_total == len(records) - len(kept)
        first = box.pending(1)[0]
        assert wire.from_wire(wire.loads(first.body, first.codec))["id"] == records[0]["id"]


def test_quarantine_moves_and_counts(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db") as box:
        box.append_many(synthetic_records(3, seed=5))
        seq = box.pending(1)[0].seq
        assert box.quarantine(seq, "test")
        assert not box.quarantine(seq, "again")
        stats = box.stats()
        assert stats.records == 2 and stats.quarantined_total == 1
    conn = sqlite3.connect(tmp_path / "o.db")
    assert conn.execute("SELECT reason FROM quarantine").fetchall() == [("test",)]


def test_truncated_database_is_salvaged(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    records = synthetic_records(2000, seed=6)
    with Outbox(path) as box:
        box.append_many(records)
        box.checkpoint()
    size = path.stat().st_size
    with path.open("r+b") as handle:
        handle.truncate(int(size * 0.6))
    with Outbox(path) as box:  # starts anyway
        stats = box.stats()
        # most rows in the surviving 60 % of the file are read back, though SQLite itself cannot reach them
        assert len(records) * 0.5 < stats.records < len(records)
        assert stats.salvaged_total == stats.records
        note = box.last_salvage() or ""
        assert "records recovered" in note and "0 pages unreadable" not in note
        rows = box.pending(10_000)
        recovered = {wire.from_wire(wire.loads(r.body, r.codec))["id"] for r in rows}
        assert recovered <= {r["id"] for r in records}
        box.append(synthetic_records(1, seed=99)[0])  # and goes on
        assert box.stats().records == stats.records + 1
    assert list(tmp_path.glob("o.db.damaged-*")), "the damaged file is kept for inspection"


def test_garbage_file_is_replaced_and_kept_aside(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    path.write_bytes(b"this is not a database" * 100)
    with Outbox(path) as box:
        assert box.stats().records == 0
        box.append(synthetic_records(1, seed=1)[0])
    assert list(tmp_path.glob("o.db.damaged-*"))


def test_schema_version_is_recorded_and_a_newer_one_refused(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    Outbox(path).close()
    conn = sqlite3.connect(path)
    assert conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone() == (str(SCHEMA_VERSION),)
    conn.execute("UPDATE meta SET value = '99' WHERE key = 'schema_version'")
    conn.commit()
    conn.close()
    with pytest.raises(OutboxError, match="newer than this agent"):
        Outbox(path)


def test_state_survives_restart(tmp_path: Path) -> None:
    path = tmp_path / "o.db"
    with Outbox(path) as box:
        box.set_state({"last_success_us": 123, "last_error": "x"})
        box.set_state({"last_error": None})
    with Outbox(path) as box:
        assert box.get_state("last_success_us") == "123"
        assert box.get_state("last_error") is None


def test_housekeeping_vacuums_a_mostly_empty_file(tmp_path: Path) -> None:
    with Outbox(tmp_path / "o.db", synchronous="NORMAL") as box:
        box.append_many(synthetic_records(3000, seed=8))
        box.checkpoint()
        big = box.file_bytes()
        assert box.housekeeping() is False  # nothing free yet
        box.ack([r.seq for r in box.pending(2900)])
        assert box.housekeeping() is True
        assert box.file_bytes() < big / 4
        assert box.stats().records == 100
