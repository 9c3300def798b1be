"""Nothing stored is lost, nothing arrives twice: real agent and aggregator processes, SIGKILL, outages, faults.

The oracle (after Vector's): every id the agent reported stored is an obligation. After kills, outages and
faults heal and the agent drains, every obligation is in the aggregator's store exactly once — or, only when
the bounded outbox had to drop, accounted for by the drop counter.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

from .netproxy import LinkProxy
from .processes import DEVICE, ROOT, AggregatorProcess, device_token


def driver(data: Path, url: str, token: str, *args: str) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tests.agent_driver",
            "--data-dir",
            str(data),
            "--url",
            url,
            "--token",
            token,
            "--device",
            DEVICE,
            *args,
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )


def stored_ids(output: str) -> set[bytes]:
    return {uuid.UUID(line.split()[1]).bytes for line in output.splitlines() if line.startswith("STORED ")}


def drain(data: Path, url: str, token: str) -> dict[str, Any]:
    proc = driver(data, url, token, "--drain")
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    line = next(line for line in out.splitlines() if line.startswith("STATS "))
    return dict(json.loads(line[6:]))


def delivered(db: Path) -> tuple[list[bytes], int]:
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA quick_check").fetchone() == ("ok",)
        ids = [bytes(r[0]) for r in conn.execute("SELECT id FROM measurements")]
        counted = conn.execute("SELECT COALESCE(SUM(records), 0) FROM devices").fetchone()[0]
        return ids, int(counted)
    finally:
        conn.close()


def check_conservation(db: Path, obligations: set[bytes], dropped: int = 0) -> None:
    ids, counted = delivered(db)
    assert len(ids) == len(set(ids)) == counted, "a record was counted twice"
    missing = obligations - set(ids)
    assert len(missing) == dropped, f"{len(missing)} stored records never arrived ({dropped} dropped by policy)"


def test_agent_killed_during_appends_and_uploads(tmp_path: Path, aggregator: AggregatorProcess) -> None:
    url = f"http://127.0.0.1:{aggregator.port}"
    token = device_token(aggregator.db)
    data = tmp_path / "data"
    rng = random.Random(7)
    obligations: set[bytes] = set()
    # at least five kills, and more (up to 15) until over 200 records were stored: a loaded machine stores fewer a round
    for round_ in range(15):
        if round_ >= 5 and len(obligations) > 200:
            break
        proc = driver(data, url, token, "--count", "3000", "--seed", str(round_))
        assert proc.stdout is not None
        first = proc.stdout.readline()  # killed at a random point after it started storing, however slow its start
        time.sleep(rng.uniform(0.3, 1.5))
        proc.send_signal(signal.SIGKILL)
        out, _ = proc.communicate(timeout=30)
        obligations |= stored_ids(first + out)
    assert len(obligations) > 200
    stats = drain(data, url, token)
    assert stats["records"] == 0 and stats["dropped_total"] == 0
    check_conservation(aggregator.db, obligations)


def test_aggregator_killed_mid_ingest(tmp_path: Path, aggregator: AggregatorProcess) -> None:
    url = f"http://127.0.0.1:{aggregator.port}"
    token = device_token(aggregator.db)
    data = tmp_path / "data"
    proc = driver(data, url, token, "--count", "1500", "--pause", "0.002", "--batch-size", "20")
    rng = random.Random(11)
    for _ in range(4):
        time.sleep(rng.uniform(0.4, 1.0))
        aggregator.kill()
        time.sleep(rng.uniform(0.1, 0.5))
        aggregator.start()
    out, _ = proc.communicate(timeout=120)
    obligations = stored_ids(out)
    assert len(obligations) == 1500
    stats = drain(data, url, token)
    assert stats["records"] == 0
    check_conservation(aggregator.db, obligations)


def test_outage_with_a_small_bound_counts_every_drop(tmp_path: Path, aggregator: AggregatorProcess) -> None:
    url = f"http://127.0.0.1:{aggregator.port}"
    token = device_token(aggregator.db)
    aggregator.kill()  # down for the whole production
    data = tmp_path / "data"
    bound = 256 * 1024
    proc = driver(data, url, token, "--count", "800", "--pause", "0", "--max-outbox-bytes", str(bound))
    out, _ = proc.communicate(timeout=120)
    obligations = stored_ids(out)
    size = sum(p.stat().st_size for p in data.glob("outbox.db*") if not p.name.endswith("-shm"))
    assert size <= bound * 1.05 + 64 * 1024  # the database and its WAL (truncated to a 64 KiB floor)
    aggregator.start()
    stats = drain(data, url, token)
    assert stats["dropped_total"] > 0
    check_conservation(aggregator.db, obligations, dropped=stats["dropped_total"])
    ids, _ = delivered(aggregator.db)
    conn = sqlite3.connect(aggregator.db)
    reported = conn.execute("SELECT dropped_total FROM devices").fetchone()[0]
    conn.close()
    assert reported == stats["dropped_total"]  # the aggregator knows what the device dropped
    assert ids


async def test_flaky_network_resets_stalls_and_delays(tmp_path: Path, aggregator: AggregatorProcess) -> None:
    proxy = LinkProxy(aggregator.port, seed=3)
    await proxy.start()
    url = f"http://127.0.0.1:{proxy.port}"
    token = device_token(aggregator.db)
    data = tmp_path / "data"
    proxy.faulty = True
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.agent_driver",
        "--data-dir",
        str(data),
        "--url",
        url,
        "--token",
        token,
        "--device",
        DEVICE,
        "--count",
        "1200",
        "--pause",
        "0.004",
        "--batch-size",
        "40",
        "--timeout",
        "2",
        cwd=ROOT,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 180)
    obligations = stored_ids(out.decode())
    assert len(obligations) == 1200
    assert {"reset", "reset-after", "stall", "delay"} <= set(proxy.seen), proxy.seen
    proxy.faulty = False  # healed
    stats = await asyncio.get_running_loop().run_in_executor(None, drain, data, url, token)
    await proxy.stop()
    assert stats["records"] == 0
    check_conservation(aggregator.db, obligations)
    assert os.path.exists(aggregator.db)
