"""The wall clock stepped under a running ``lens-agent run`` (libfaketime): workloads, sync and heartbeat go on.
Also: the kernel's clock state on every record (``agent.clock``), and the heartbeat's age measured on the monotonic
clock by ``lens-agent status``.

libfaketime (Debian package ``faketime``; ``make sysdeps`` installs it) shifts only the service's wall clock by the
offset written in a file, read again at every call (``FAKETIME_NO_CACHE``); the monotonic clock is left alone
(``DONT_FAKE_MONOTONIC``), as on a device whose clock NTP steps. The aggregator and the test keep the real time.
libfaketime 0.9.10 with ``DONT_FAKE_MONOTONIC`` breaks ``time.sleep`` on Python ≥ 3.11 (EINVAL; wolfcw/libfaketime
#426): the service must not call it on this path. Only the power probes sleep so (the idle baseline and the wait
for a sample past a request's end): idle_baseline is 0 here, and a machine with a power source would need a newer
libfaketime.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from agent.clock import STA_UNSYNC, TIME_ERROR, ClockMonitor, ClockState, boot_id, read_clock, stamp, synchronized
from agent.measurement import Measurement
from agent.status import heartbeat_age, service_view
from lens_core import wire

from .processes import AggregatorProcess, device_token, stepped_clock_env
from .test_service import service_config, wait_for

ROOT = Path(__file__).resolve().parents[1]
AGENT = [sys.executable, "-c", "from agent.cli import main; main()"]
DAY = 86400.0


def state(tmp_path: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((tmp_path / "data" / "service.json").read_text()))
    except (OSError, ValueError):
        return {}


def delivered(agg: AggregatorProcess) -> list[dict[str, Any]]:
    conn = sqlite3.connect(agg.db)
    try:
        return [wire.loads(body, codec) for body, codec in conn.execute("SELECT body, codec FROM measurements")]
    finally:
        conn.close()


def runs(agg: AggregatorProcess) -> int:
    return len({r["run_id"] for r in delivered(agg) if r["kind"] == "inference"})


def status(config: Path) -> dict[str, Any]:
    done = subprocess.run(
        [*AGENT, "status", "--config", str(config), "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60
    )
    return dict(json.loads(done.stdout))


def test_a_day_back_and_forward_stops_nothing(tmp_path: Path, tiny_model: Path, aggregator: AggregatorProcess) -> None:
    config = service_config(tmp_path, tiny_model, aggregator, device_token(aggregator.db), every="2s")
    config.write_text(config.read_text() + '[probes]\nidle_baseline = "0"\n')
    offset = tmp_path / "faketime"
    env = stepped_clock_env(offset)
    log = (tmp_path / "service.log").open("w+")
    proc = subprocess.Popen(
        [*AGENT, "run", "--config", str(config)], cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT, text=True
    )
    try:
        wait_for(lambda: proc.poll() is not None or runs(aggregator) >= 2, 90, "two runs at the aggregator")
        assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]

        offset.write_text("-1d\n")  # the wall clock steps back a day; the monotonic clock does not move
        wait_for(lambda: state(tmp_path).get("updated_unix", time.time()) < time.time() - DAY / 2, 10, "the step")
        stepped = state(tmp_path)
        before, beat = runs(aggregator), stepped["updated_monotonic"]
        wait_for(lambda: proc.poll() is not None or runs(aggregator) >= before + 3, 60, "runs after the step back")
        assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
        after = state(tmp_path)
        assert after["updated_monotonic"] > beat  # the heartbeat goes on
        assert after["updated_unix"] < time.time() - DAY / 2  # … and was written on the stepped clock
        next_run = datetime.fromisoformat(after["next_runs"]["quick"])
        assert abs(next_run.timestamp() - (time.time() - DAY)) < 30  # due in seconds on the service's own clock
        view = status(config)["service"]
        assert view["running"] and view["heartbeat_clock"] == "monotonic" and view["heartbeat_age_s"] < 10
        late = [r for r in delivered(aggregator) if r["kind"] == "inference"]
        yesterday = [r for r in late if r["started_us"] / 1e6 < time.time() - DAY / 2]
        assert yesterday, "records stamped on the stepped clock reached the aggregator"
        assert all(isinstance(r["ext"]["clock"]["synchronized"], bool) for r in late)

        offset.write_text("+0\n")  # and forward again by the same day: no burst of make-up runs
        wait_for(lambda: state(tmp_path).get("updated_unix", 0) > time.time() - 60, 10, "the step forward")
        start, counted = time.monotonic(), runs(aggregator)
        wait_for(lambda: proc.poll() is not None or runs(aggregator) >= counted + 2, 60, "runs after the step forward")
        assert proc.poll() is None, (tmp_path / "service.log").read_text()[-3000:]
        time.sleep(max(0.0, 6 - (time.monotonic() - start)))
        elapsed = time.monotonic() - start
        made = runs(aggregator) - counted
        assert made <= elapsed / 2 + 2, f"{made} runs in {elapsed:.1f} s at one run per 2 s"

        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        output = (tmp_path / "service.log").read_text()
        assert proc.returncode == 0, output[-3000:]
        assert "Traceback" not in output, output[-3000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
        log.close()


# -- the kernel's clock state ------------------------------------------------------------------------------------
def test_synchronized_unless_time_error_or_sta_unsync() -> None:
    assert synchronized(0, 0x2001)  # TIME_OK, STA_PLL | STA_NANO: what chrony or timesyncd leave
    assert synchronized(1, 0)  # TIME_INS: a leap second is announced, still synchronized
    assert not synchronized(TIME_ERROR, 0)
    assert not synchronized(0, STA_UNSYNC | 0x0001)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="adjtimex is Linux-only")
def test_the_real_kernel_answers_unprivileged_and_read_only() -> None:
    before = read_clock()
    assert before.synchronized in (True, False) and before.reason is None
    assert before.maxerror_us is not None and before.maxerror_us >= 0
    assert read_clock().synchronized == before.synchronized  # reading changed nothing


def refused(_: Any) -> int:
    """adjtimex as a seccomp filter answers it (systemd's ProtectClock=yes): EPERM."""
    ctypes.set_errno(errno.EPERM)
    return -1


def test_a_refused_adjtimex_falls_back_to_timesyncd_or_says_why(tmp_path: Path) -> None:
    flag = tmp_path / "synchronized"
    state = read_clock(refused, str(flag))
    assert state.synchronized is None and state.reason and "EPERM" in state.reason and str(flag) in state.reason
    assert state.as_ext() == {"synchronized": None, "source": "adjtimex", "reason": state.reason}
    flag.touch()  # systemd-timesyncd synchronized the clock since boot
    state = read_clock(refused, str(flag))
    assert state.synchronized is True and state.source == "systemd-timesyncd"


def test_the_clock_is_read_at_most_once_per_few_seconds() -> None:
    now = [100.0]
    reads: list[float] = []

    def read() -> ClockState:
        reads.append(now[0])
        return ClockState(len(reads) % 2 == 1, maxerror_us=len(reads))

    monitor = ClockMonitor(5.0, read, lambda: now[0])
    assert monitor.state().synchronized is True
    now[0] += 4.9
    assert monitor.state().maxerror_us == 1 and reads == [100.0]
    now[0] += 0.2
    assert monitor.state().synchronized is False and len(reads) == 2


def test_a_stamped_record_round_trips_through_the_wire_format() -> None:
    record = stamp(Measurement(run_id="r", device_id="d", model_name="m", model_sha256=None).to_dict())
    clock = record["ext"]["clock"]
    assert clock["source"] == "adjtimex" and clock["synchronized"] in (True, False, None)
    for codec in ("cbor", "msgpack"):
        back = wire.from_wire(wire.validate_record(wire.loads(wire.encode_record(record, codec), codec)))
        assert back["ext"]["clock"] == clock
    assert stamp({"ext": {"clock": {"synchronized": False}}})["ext"]["clock"] == {"synchronized": False}  # kept


# -- the heartbeat's age ---------------------------------------------------------------------------------------
def test_heartbeat_age_is_monotonic_within_a_boot_and_wall_otherwise() -> None:
    beat = {"updated_unix": 1_000.0, "updated_monotonic": 50.0, "boot_id": "boot-a"}
    # the wall clock stepped back a day since the beat: on the monotonic clock it is 2 s old
    assert heartbeat_age(beat, 1_000.0 - DAY, 52.0, "boot-a") == (2.0, "monotonic")
    assert heartbeat_age(beat, 1_003.0, 40.0, "boot-b") == (3.0, "wall")  # another boot: monotonic readings differ
    assert heartbeat_age(beat, 1_003.0, 40.0, "boot-a") == (3.0, "wall")  # from the future: not trusted
    assert heartbeat_age({"updated_unix": 1_000.0}, 1_004.0, 52.0, "boot-a") == (4.0, "wall")  # an older agent


def test_service_view_uses_this_machines_clocks() -> None:
    beat = {"pid": os.getpid(), "state": "idle", "updated_unix": 0.0, "updated_monotonic": time.monotonic() - 1}
    view = service_view({**beat, "boot_id": boot_id()}, time.time())
    assert view is not None and view["running"] and view["heartbeat_clock"] == "monotonic"
    assert 0.9 <= view["heartbeat_age_s"] < 30


def test_the_unit_lets_the_agent_read_the_clock_and_not_set_it() -> None:
    """The unit's SystemCallFilter= lines as systemd applies them (the first decides allow- or deny-list, each later
    one adds or removes), with systemd-analyze's own expansion of the @groups."""
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make sysdeps` installs systemd"

    def expand(name: str) -> set[str]:
        if not name.startswith("@"):
            return {name}
        out = subprocess.run([tool, "syscall-filter", name], capture_output=True, text=True, check=True).stdout
        calls: set[str] = set()
        for line in out.splitlines()[1:]:
            item = line.strip()
            if item and not item.startswith("#"):
                calls |= expand(item)
        return calls

    text = (ROOT / "systemd" / "lens-agent.service").read_text()
    allowed: set[str] = set()
    for n, spec in enumerate(re.findall(r"^SystemCallFilter=(.*)$", text, re.MULTILINE)):
        deny = spec.startswith("~")
        names = set().union(*(expand(item) for item in spec.lstrip("~").split()))
        assert n > 0 or not deny, "the unit's filter is an allow-list"
        allowed = allowed - names if deny else allowed | names
    assert "adjtimex" in allowed
    assert not {"clock_settime", "settimeofday", "clock_adjtime"} & allowed
    assert "ProtectClock=yes" not in text  # it would refuse adjtimex's read-only call too
    assert re.search(r"^CapabilityBoundingSet=$", text, re.MULTILINE)  # no CAP_SYS_TIME: adjtimex can only read
