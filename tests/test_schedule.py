"""The scheduler on a virtual clock: the wall clock stepped a day back and forward, jitter, one run at a time.

The clock is the scheduler's own seam (``Clock``): virtual time advances only when the test says so, every sleeper
due by then wakes in order, and the wall clock can be stepped without touching the monotonic one — what NTP's first
sync or ``date -s`` does to a running device.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
import logging
import random
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest

from agent.config import load_config
from agent.schedule import CRON_CHUNK_S, Scheduler, crontab_trigger
from lens_core.errors import ConfigError

UTC = timezone.utc
DAY = timedelta(days=1)


class VirtualClock:
    """Monotonic and wall time that move only in ``advance``; ``step_wall`` moves the wall clock alone."""

    def __init__(self, wall: datetime) -> None:
        self.mono = 1000.0
        self.offset = wall.timestamp() - self.mono
        self._sleepers: list[tuple[float, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    def wall(self) -> datetime:
        return datetime.fromtimestamp(self.mono + self.offset, UTC)

    def monotonic(self) -> float:
        return self.mono

    async def sleep(self, seconds: float) -> None:
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._sleepers, (self.mono + max(0.0, seconds), next(self._seq), future))
        await future

    def step_wall(self, delta: timedelta) -> None:
        self.offset += delta.total_seconds()

    async def advance(self, seconds: float) -> None:
        end = self.mono + seconds
        await settle()
        while self._sleepers and self._sleepers[0][0] <= end:
            due, _, future = heapq.heappop(self._sleepers)
            self.mono = max(self.mono, due)
            if not future.done():
                future.set_result(None)
            await settle()
        self.mono = end
        await settle()


async def settle() -> None:
    for _ in range(10):
        await asyncio.sleep(0)


class Recorder:
    """A job that notes the wall and monotonic time of each run; ``busy`` seconds of virtual time per run."""

    def __init__(self, clock: VirtualClock, busy: float = 0.0) -> None:
        self.clock, self.busy = clock, busy
        self.walls: list[datetime] = []
        self.monos: list[float] = []
        self.active = 0
        self.most_active = 0

    async def __call__(self) -> None:
        self.walls.append(self.clock.wall())
        self.monos.append(self.clock.monotonic())
        self.active += 1
        self.most_active = max(self.most_active, self.active)
        try:
            if self.busy:
                await self.clock.sleep(self.busy)
        finally:
            self.active -= 1


START = datetime(2026, 3, 10, 12, 0, 10, tzinfo=UTC)


async def test_interval_job_keeps_its_monotonic_schedule_through_wall_steps() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    job = Recorder(clock)
    scheduler.every("beat", 10, job)
    await clock.advance(35)
    clock.step_wall(-DAY)
    await clock.advance(30)
    clock.step_wall(+2 * DAY)
    await clock.advance(30)
    await scheduler.shutdown()
    assert [m - 1000 for m in job.monos] == [10, 20, 30, 40, 50, 60, 70, 80, 90]
    # the wall clock says what happened: a day back, then a day ahead of where it started
    assert job.walls[3] - job.walls[2] == timedelta(seconds=10) - DAY
    assert job.walls[6] - job.walls[5] == timedelta(seconds=10) + 2 * DAY


async def test_next_run_is_on_todays_wall_clock() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    scheduler.every("beat", 60, Recorder(clock))
    assert scheduler.next_run("beat") == START + timedelta(seconds=60)
    clock.step_wall(-DAY)
    assert scheduler.next_run("beat") == START - DAY + timedelta(seconds=60)  # still a minute away
    assert scheduler.next_run("nothing") is None
    await scheduler.shutdown()


async def test_cron_after_a_step_back_fires_at_the_next_match_from_the_new_wall_time() -> None:
    clock = VirtualClock(START)  # 12:00:10
    scheduler = Scheduler(clock=clock)
    job = Recorder(clock)
    scheduler.cron("hourly", "30 * * * *", job, tz=UTC)
    assert scheduler.next_run("hourly") == START.replace(minute=30, second=0)
    await clock.advance(60)  # 12:01:10
    clock.step_wall(-DAY)  # 12:01:10 yesterday: the next match is 12:30 yesterday, not today's (a day's stall)
    await clock.advance(CRON_CHUNK_S + 1)
    assert scheduler.next_run("hourly") == (START - DAY).replace(minute=30, second=0)
    await clock.advance(29 * 60)
    assert job.walls == [(START - DAY).replace(minute=30, second=0)]
    assert job.monos[0] - 1000 == pytest.approx(60 + 28 * 60 + 50, abs=0.001)  # no stall, no drift
    await clock.advance(3600)
    assert job.walls[1] == (START - DAY).replace(hour=13, minute=30, second=0)  # and hourly after that
    await scheduler.shutdown()


async def test_cron_after_a_step_forward_runs_once_not_once_per_missed_match(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    job = Recorder(clock)
    scheduler.cron("every-minute", "* * * * *", job, tz=UTC)
    await clock.advance(55)  # 12:01:05: one run at 12:01
    assert len(job.walls) == 1
    caplog.set_level(logging.WARNING, logger="agent.schedule")
    clock.step_wall(+DAY)  # 1440 matches skipped over
    await clock.advance(CRON_CHUNK_S + 1)
    assert len(job.walls) == 2  # once, at the end of the chunk in which the step happened
    assert job.walls[1] - job.walls[0] > DAY
    assert "stepped" in caplog.text
    await clock.advance(120)
    assert len(job.walls) == 4  # then every minute again, on the new wall time
    assert all(w.second == 0 for w in job.walls[2:])
    await scheduler.shutdown()


async def test_cron_jitter_is_bounded_and_never_runs_a_match_twice() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock, rng=random.Random(7))
    job = Recorder(clock)
    scheduler.cron("jittered", "* * * * *", job, jitter=40, tz=UTC)
    await clock.advance(60 * 30)
    await scheduler.shutdown()
    delays = [(w - w.replace(second=0, microsecond=0)).total_seconds() for w in job.walls]
    minutes = [w.replace(second=0, microsecond=0) for w in job.walls]
    assert len(set(minutes)) == len(minutes) >= 29  # one run per match
    assert all(0 <= d <= 40 for d in delays)
    assert max(delays) - min(delays) > 10  # jitter really varies


async def test_interval_jitter_is_bounded_and_does_not_drift() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock, rng=random.Random(3))
    job = Recorder(clock)
    scheduler.every("jittered", 10, job, jitter=4)
    await clock.advance(10 * 100 + 5)
    await scheduler.shutdown()
    offsets = [m - 1000 - 10 * (n + 1) for n, m in enumerate(job.monos)]
    assert len(job.monos) == 100
    assert all(0 <= off <= 4 for off in offsets)
    assert max(offsets) - min(offsets) > 2


async def test_a_jitter_longer_than_the_interval_is_not_taken_for_a_stall(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock, rng=random.Random(5))
    job = Recorder(clock)
    scheduler.every("wide", 2, job, jitter=5)
    caplog.set_level(logging.WARNING, logger="agent.schedule")
    await clock.advance(200)
    await scheduler.shutdown()
    # due times may come out of order (a run due at once after another is coalesced with it), but none is skipped
    # ahead for a stall that did not happen
    assert 60 <= len(job.monos) <= 100 and "missed" not in caplog.text


async def test_a_stalled_loop_does_not_make_up_missed_runs(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    job = Recorder(clock)
    scheduler.every("beat", 10, job)
    caplog.set_level(logging.WARNING, logger="agent.schedule")
    await clock.advance(10)
    clock.mono += 95  # the event loop was held up for 95 s: nobody woke in between
    await clock.advance(1)
    await clock.advance(20)
    await scheduler.shutdown()
    assert [m - 1000 for m in job.monos] == [10, 105, 110, 120]  # one late run, then back on the 10 s grid
    assert "8 run(s) missed" in caplog.text  # those due at 30 … 100


async def test_one_run_at_a_time_and_the_skip_is_logged(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    slow = Recorder(clock, busy=25)
    job = scheduler.every("slow", 10, slow)
    caplog.set_level(logging.INFO, logger="agent.schedule")  # counted, and logged at info (-v)
    await clock.advance(100)
    stop = asyncio.ensure_future(scheduler.shutdown())
    await clock.advance(30)  # the run started at 100 finishes
    await stop
    assert slow.most_active == 1
    assert [m - 1000 for m in slow.monos] == [10, 40, 70, 100]  # due at 20, 30 while busy: skipped
    assert job.skipped == 6 and "still going" in caplog.text


async def test_one_shot_runs_once_and_replacing_it_pushes_it_back() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    job = Recorder(clock)
    scheduler.later("retry", 5, job)
    await clock.advance(3)
    scheduler.later("retry", 5, job)  # replaced: due 5 s from now
    await clock.advance(4)
    assert job.monos == []
    clock.step_wall(-DAY)
    await clock.advance(2)
    assert [m - 1000 for m in job.monos] == [8]
    await clock.advance(60)
    assert len(job.monos) == 1 and scheduler.get("retry") is None
    await scheduler.shutdown()


async def test_run_now_and_first_in() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    cron, interval = Recorder(clock), Recorder(clock)
    scheduler.cron("nightly", "0 3 * * *", cron, tz=UTC, run_now=True, jitter=300)
    scheduler.every("quarter", 900, interval, first_in=0, jitter=30)
    await clock.advance(1)
    assert cron.monos == [1000.0] and interval.monos == [1000.0]  # at once, without jitter
    nightly = scheduler.next_run("nightly")
    assert nightly is not None and timedelta(0) <= nightly - datetime(2026, 3, 11, 3, tzinfo=UTC) <= timedelta(
        seconds=300
    )
    await scheduler.shutdown()


async def test_a_failing_job_is_logged_and_keeps_its_schedule(caplog: pytest.LogCaptureFixture) -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    calls = []

    async def broken() -> None:
        calls.append(clock.monotonic())
        raise RuntimeError("boom")

    scheduler.every("broken", 10, broken)
    await clock.advance(30)
    await scheduler.shutdown()
    assert len(calls) == 3 and "broken failed" in caplog.text


async def test_removing_a_job_does_not_cancel_its_run_and_shutdown_waits_for_it() -> None:
    clock = VirtualClock(START)
    scheduler = Scheduler(clock=clock)
    slow = Recorder(clock, busy=20)
    scheduler.every("slow", 10, slow)
    await clock.advance(11)
    assert scheduler.remove("slow") and scheduler.is_running("slow")
    scheduler.every("slow", 5, slow)  # a replacement does not start a second run while the first goes on
    await clock.advance(6)
    assert slow.active == 1 and len(slow.monos) == 1
    stop = asyncio.ensure_future(scheduler.shutdown())
    await settle()
    assert not stop.done()
    await clock.advance(20)
    await stop
    assert slow.active == 0 and len(slow.monos) == 1
    scheduler.later("late", 0, slow)  # after shutdown: never runs
    await clock.advance(5)
    assert len(slow.monos) == 1


async def test_the_real_clock_fires_on_time() -> None:
    scheduler = Scheduler()
    fired = asyncio.Event()
    start = asyncio.get_running_loop().time()

    async def job() -> None:
        fired.set()

    scheduler.every("real", 0.2, job)
    await asyncio.wait_for(fired.wait(), 5)
    elapsed = asyncio.get_running_loop().time() - start
    await scheduler.shutdown()
    assert 0.15 < elapsed < 3


@pytest.mark.parametrize(
    ("expr", "weekday"),
    [("0 3 * * 0", 6), ("0 3 * * 7", 6), ("0 3 * * 1", 0), ("0 3 * * sun", 6), ("0 3 * * 6", 5)],
)
def test_crontab_weekdays_count_from_sunday(expr: str, weekday: int) -> None:
    fire = crontab_trigger(expr, UTC).get_next_fire_time(None, START)
    assert fire.weekday() == weekday and fire.hour == 3  # Python: Monday = 0 … Sunday = 6


def test_crontab_weekday_lists_ranges_and_steps() -> None:
    def weekdays(field: str) -> set[int]:
        trigger = crontab_trigger(f"0 0 * * {field}", UTC)
        fires, at = set(), START
        for _ in range(14):
            at = trigger.get_next_fire_time(None, at + timedelta(seconds=1))
            fires.add(at.weekday())
        return fires

    assert weekdays("1-5") == {0, 1, 2, 3, 4}  # Monday to Friday
    assert weekdays("0,6") == {5, 6}
    assert weekdays("*/2") == {6, 1, 3, 5}  # Sunday, Tuesday, Thursday, Saturday
    assert weekdays("mon-wed") == {0, 1, 2}
    for bad in ("5-1", "funday", "*/0"):
        with pytest.raises(ValueError, match="day of week"):
            crontab_trigger(f"0 0 * * {bad}", UTC)


def test_the_config_reads_cron_as_the_scheduler_does(config_file: Any) -> None:
    config = load_config(config_file("[[workloads]]\ncron = '0 3 * * 7'\n"), environ={})  # Sunday, as under cron
    assert config.workloads[0]["cron"] == "0 3 * * 7"
    with pytest.raises(ConfigError, match=r"workloads\[0\]\.cron.*runs backwards"):
        load_config(config_file("[[workloads]]\ncron = '0 3 * * 5-1'\n"), environ={})


def test_a_workloads_period_is_its_longest_gap() -> None:
    """What the service reports as the silence to expect: ``every`` + jitter, or a cron schedule's longest gap over
    the next fifteen days — its nights, weekends and weeks included."""
    from datetime import datetime, timezone

    from agent.schedule import workload_period

    friday = datetime(2026, 11, 27, 10, 0, tzinfo=timezone.utc)
    assert workload_period({"every": 900.0, "jitter": 30.0}) == 930.0
    assert workload_period({"cron": "*/15 * * * *", "jitter": 0}, friday) == 900.0
    assert workload_period({"cron": "0 3 * * *", "jitter": 60.0}, friday) == 86460.0
    assert workload_period({"cron": "0 9-17 * * 1-5", "jitter": 0}, friday) == 64 * 3600.0  # Friday 17:00 → Monday 9:00
    assert workload_period({"cron": "0 3 * * 0", "jitter": 0}, friday) == 7 * 86400.0  # weekly, on Sundays
