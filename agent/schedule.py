"""Jobs on the monotonic clock: interval, cron and one-shot jobs for the agent's event loop.

Every wait is measured on the monotonic clock, so a step of the wall clock (NTP's first sync on a device that booted
with a wrong date, an operator's ``date -s``, a resumed VM) neither stops the jobs nor floods them:

* **interval** jobs fire every ``seconds`` of monotonic time, each run delayed by a random jitter in ``[0, jitter]``;
  the schedule itself does not drift with the jitter or with how long a run takes;
* **one-shot** jobs fire once, ``delay`` monotonic seconds from now (retries with backoff, "sync soon");
* **cron** jobs fire at wall-clock matches of a crontab expression. apscheduler's ``CronTrigger`` only computes the
  next match; the wait for it is taken in monotonic chunks of at most :data:`CRON_CHUNK_S` seconds, after each of
  which the match is recomputed from the wall clock. After a step back the job fires at the next match from the new
  wall time; after a step forward past one or more matches it fires once, not once per missed match.

A job runs at most once at a time: when it is due while its previous run still goes, that run is skipped (and
logged). A job's function runs in its own task, so removing or replacing a job never cancels a run in progress.

The clock is injectable (:class:`Clock`: wall time, monotonic time, sleep) so tests can step the wall clock.

    scheduler = Scheduler()
    scheduler.every("heartbeat", 10, beat)
    scheduler.cron("workload:nightly", "0 3 * * *", run, jitter=300)
    scheduler.later("sync-retry", 4.2, tick)
    scheduler.next_run("workload:nightly")   # an aware UTC datetime, for status
    await scheduler.shutdown()
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone, tzinfo
from typing import Any, Protocol

log = logging.getLogger("agent.schedule")

CRON_CHUNK_S = 30.0
"""The longest monotonic wait before a cron job looks at the wall clock again."""

STEP_LOG_S = 2.0
"""A disagreement between the wall and the monotonic clock over one wait larger than this is logged as a step."""

JobFunction = Callable[[], Awaitable[Any]]

_WEEKDAYS = ("sun", "mon", "tue", "wed", "thu", "fri", "sat")
_ONE_US = timedelta(microseconds=1)


class Clock(Protocol):
    """The three things the scheduler asks of time."""

    def wall(self) -> datetime:
        """The wall clock, as an aware datetime."""
        ...

    def monotonic(self) -> float:
        """Seconds on a clock that never steps (CLOCK_MONOTONIC)."""
        ...

    async def sleep(self, seconds: float) -> None:
        """Wait ``seconds`` of monotonic time."""
        ...


class SystemClock:
    """The real clocks: ``datetime.now(UTC)``, ``time.monotonic()`` and ``asyncio.sleep`` (asyncio's loop time is
    ``time.monotonic()``, so its sleeps ignore steps of the wall clock)."""

    def wall(self) -> datetime:
        return datetime.now(timezone.utc)

    def monotonic(self) -> float:
        return time.monotonic()

    async def sleep(self, seconds: float) -> None:
        await asyncio.sleep(seconds)


def crontab_trigger(expr: str, tz: tzinfo | str | None = None) -> Any:
    """apscheduler's ``CronTrigger`` for a crontab expression, with crontab's day-of-week numbers.

    apscheduler 3 numbers weekdays from Monday = 0, crontab from Sunday = 0 (and 7): the day-of-week field is
    rewritten as weekday names before apscheduler reads it, so ``0 3 * * 0`` runs on Sundays as it does under cron.
    Raises ``ValueError`` for an expression neither understands.
    """
    from apscheduler.triggers.cron import CronTrigger

    fields = expr.split()
    if len(fields) == 5:
        fields[4] = _crontab_weekdays(fields[4])
    return CronTrigger.from_crontab(" ".join(fields), timezone=tz)


def workload_period(workload: dict[str, Any], now: datetime | None = None) -> float:
    """How long a workload's runs are apart at most, in seconds: its ``every`` plus its ``jitter``, or for a
    ``cron`` schedule the longest gap between its firings over the next fifteen days (plus its jitter)."""
    jitter = float(workload.get("jitter") or 0.0)
    if not workload.get("cron"):
        return float(workload["every"]) + jitter
    trigger = crontab_trigger(str(workload["cron"]), timezone.utc)
    moment = now or datetime.now(timezone.utc)
    times: list[datetime] = []
    previous: datetime | None = None
    horizon = moment + timedelta(days=15)  # two weeks and a day: a weekly schedule shows a whole gap
    for _ in range(2000):
        fire = trigger.get_next_fire_time(previous, moment)
        if fire is None or fire > horizon:
            break
        times.append(fire)
        previous, moment = fire, fire + _ONE_US
    gaps = [(b - a).total_seconds() for a, b in itertools.pairwise(times)]
    return (max(gaps) if gaps else 24 * 3600.0) + jitter


def _crontab_weekdays(spec: str) -> str:
    if spec in ("*", "?"):
        return "*"
    days: set[int] = set()
    for item in spec.lower().split(","):
        base, slash, step_text = item.partition("/")
        step = int(step_text) if slash and step_text.isdigit() else 1
        if slash and (not step_text.isdigit() or step < 1):
            raise ValueError(f"day of week {spec!r}: step {step_text!r} is not a positive number")
        if base == "*":
            low, high = 0, 6
        elif "-" in base:
            first, _, last = base.partition("-")
            low, high = _weekday(first, spec), _weekday(last, spec)
        else:
            low = _weekday(base, spec)
            high = 7 if slash else low
        if high < low:
            raise ValueError(f"day of week {spec!r}: range {base!r} runs backwards")
        days.update(day % 7 for day in range(low, high + 1, step))
    return ",".join(_WEEKDAYS[day] for day in sorted(days))


def _weekday(token: str, spec: str) -> int:
    if token.isdigit() and int(token) <= 7:
        return int(token)
    if token[:3] in _WEEKDAYS:
        return _WEEKDAYS.index(token[:3])
    raise ValueError(f"day of week {spec!r}: {token!r} is not 0-7 or a weekday name")


@dataclass
class Job:
    """A scheduled job. ``runs`` counts the runs started, ``skipped`` the ones skipped because the last still ran."""

    id: str
    kind: str  # "interval", "cron" or "once"
    function: JobFunction = field(repr=False)
    runs: int = 0
    skipped: int = 0
    due_monotonic: float | None = None  # interval and one-shot jobs: when the next run is due
    due_wall: datetime | None = None  # cron jobs: the wall-clock time of the next run (match + jitter)
    task: asyncio.Task[None] | None = field(default=None, repr=False)


class Scheduler:
    """Interval, cron and one-shot jobs on an asyncio loop. Create it and add jobs inside a running loop."""

    def __init__(self, *, clock: Clock | None = None, rng: random.Random | None = None) -> None:
        self.clock: Clock = clock or SystemClock()
        self._rng = rng or random.Random()
        self._jobs: dict[str, Job] = {}
        self._running: dict[str, asyncio.Task[None]] = {}  # job id → its run in progress
        self._closed = False

    # -- adding and removing ----------------------------------------------------------------------------------
    def every(
        self, job_id: str, seconds: float, function: JobFunction, *, jitter: float = 0.0, first_in: float | None = None
    ) -> Job:
        """Run ``function`` every ``seconds`` (plus a jitter in [0, ``jitter``] per run), first after one interval
        (plus jitter), or after ``first_in`` seconds exactly when given (0: now). Replaces a job of that id."""
        if seconds <= 0:
            raise ValueError(f"{job_id}: an interval must be positive, not {seconds!r}")
        job = Job(job_id, "interval", function)
        seconds, jitter = float(seconds), max(0.0, jitter)
        now = self.clock.monotonic()
        if first_in is not None:
            base = job.due_monotonic = now + max(0.0, first_in)
        else:
            base = now + seconds
            job.due_monotonic = base + self._jitter(jitter)
        return self._add(job, lambda: self._interval(job, base, seconds, jitter))

    def cron(
        self,
        job_id: str,
        expr: str,
        function: JobFunction,
        *,
        jitter: float = 0.0,
        tz: tzinfo | str | None = None,
        run_now: bool = False,
    ) -> Job:
        """Run ``function`` at each wall-clock match of the crontab ``expr`` (in ``tz``, default the local zone),
        each run delayed by a jitter in [0, ``jitter``]; ``run_now`` also runs it once right away."""
        trigger = crontab_trigger(expr, tz)
        job = Job(job_id, "cron", function)
        state = _CronState(trigger, max(0.0, jitter), self._rng)
        job.due_wall = state.due(self.clock.wall())
        return self._add(job, lambda: self._cron(job, state, run_now))

    def later(self, job_id: str, delay: float, function: JobFunction) -> Job:
        """Run ``function`` once, ``delay`` seconds from now. Replaces a job of that id (a retry pushed back)."""
        job = Job(job_id, "once", function)
        job.due_monotonic = self.clock.monotonic() + max(0.0, delay)
        return self._add(job, lambda: self._once(job))

    def remove(self, job_id: str) -> bool:
        """Stop scheduling a job (a run in progress goes on). Whether there was one."""
        job = self._jobs.pop(job_id, None)
        if job is None:
            return False
        if job.task is not None:
            job.task.cancel()
        return True

    def get(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def is_running(self, job_id: str) -> bool:
        task = self._running.get(job_id)
        return task is not None and not task.done()

    # -- what is next -----------------------------------------------------------------------------------------
    def next_run(self, job_id: str) -> datetime | None:
        """When the job runs next, as an aware UTC datetime on today's wall clock (None: never, or no such job)."""
        job = self._jobs.get(job_id)
        if job is None:
            return None
        if job.due_wall is not None:
            return job.due_wall.astimezone(timezone.utc)
        if job.due_monotonic is None:
            return None
        remaining = job.due_monotonic - self.clock.monotonic()
        return (self.clock.wall() + timedelta(seconds=remaining)).astimezone(timezone.utc)

    def next_runs(self, prefix: str = "") -> dict[str, datetime]:
        """``next_run`` of every job whose id starts with ``prefix``."""
        out = {}
        for job_id in list(self._jobs):
            if job_id.startswith(prefix):
                at = self.next_run(job_id)
                if at is not None:
                    out[job_id] = at
        return out

    # -- stopping ---------------------------------------------------------------------------------------------
    async def shutdown(self, *, wait: bool = True, cancel: bool = False) -> None:
        """Stop every job; with ``wait``, also wait for the runs in progress to finish — or, with ``cancel``, cancel
        them and wait until they have unwound. Jobs added later never run."""
        self._closed = True
        loops = [job.task for job in self._jobs.values() if job.task is not None]
        self._jobs.clear()
        for task in loops:
            task.cancel()
        await asyncio.gather(*loops, return_exceptions=True)
        if wait or cancel:
            current = asyncio.current_task()
            runs = [t for t in self._running.values() if t is not current]
            if cancel:
                for task in runs:
                    task.cancel()
            await asyncio.gather(*runs, return_exceptions=True)

    # -- internals --------------------------------------------------------------------------------------------
    def _add(self, job: Job, body: Callable[[], Coroutine[Any, Any, None]]) -> Job:
        self.remove(job.id)
        if self._closed:
            log.debug("%s: not scheduled, the scheduler is shut down", job.id)
            return job
        self._jobs[job.id] = job
        job.task = asyncio.get_running_loop().create_task(self._guard(job, body), name=f"schedule:{job.id}")
        return job

    async def _guard(self, job: Job, body: Callable[[], Coroutine[Any, Any, None]]) -> None:
        try:
            await body()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s: the schedule itself failed; the job will not run again", job.id)
        finally:
            if self._jobs.get(job.id) is job:
                del self._jobs[job.id]

    def _fire(self, job: Job) -> None:
        if self.is_running(job.id):
            job.skipped += 1
            # counted (job.skipped); not a warning: a workload waiting for the one engine, or a sync already going,
            # is how a short schedule behaves (lens-agent -v shows it)
            log.info("%s: due while its previous run is still going; this run is skipped", job.id)
            return
        job.runs += 1
        self._running[job.id] = asyncio.get_running_loop().create_task(self._run(job), name=f"job:{job.id}")

    async def _run(self, job: Job) -> None:
        try:
            await job.function()
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("%s failed", job.id)
        finally:
            if self._running.get(job.id) is asyncio.current_task():
                del self._running[job.id]

    async def _sleep_until(self, due: float) -> None:
        while (remaining := due - self.clock.monotonic()) > 0:
            await self.clock.sleep(remaining)

    def _jitter(self, jitter: float) -> float:
        return self._rng.uniform(0.0, jitter) if jitter > 0 else 0.0

    async def _interval(self, job: Job, base: float, seconds: float, jitter: float) -> None:
        assert job.due_monotonic is not None
        while True:
            await self._sleep_until(job.due_monotonic)
            self._fire(job)
            base += seconds
            now = self.clock.monotonic()
            if base + jitter < now:  # the loop itself fell behind (a stalled event loop): missed runs are not made up
                missed = int((now - jitter - base) // seconds) + 1
                base += missed * seconds
                log.warning("%s: %d run(s) missed while the event loop was held up", job.id, missed)
            job.due_monotonic = base + self._jitter(jitter)

    async def _once(self, job: Job) -> None:
        assert job.due_monotonic is not None
        await self._sleep_until(job.due_monotonic)
        job.due_monotonic = None
        if self._jobs.get(job.id) is job:
            del self._jobs[job.id]
        self._fire(job)

    async def _cron(self, job: Job, cron: _CronState, run_now: bool) -> None:
        if run_now:
            self._fire(job)
        while job.due_wall is not None:
            now = self.clock.wall()
            if now < job.due_wall:
                # not yet due: recomputed from the wall clock, so a step back brings the next match forward
                job.due_wall = cron.due(now)
                if job.due_wall is None:
                    break
                mono = self.clock.monotonic()
                await self.clock.sleep(min(CRON_CHUNK_S, (job.due_wall - now).total_seconds()))
                step = (self.clock.wall() - now).total_seconds() - (self.clock.monotonic() - mono)
                if abs(step) > STEP_LOG_S:
                    log.warning("%s: the wall clock stepped by %+.0f s; next run recomputed", job.id, step)
                continue
            late = (now - job.due_wall).total_seconds()
            if late > CRON_CHUNK_S + STEP_LOG_S:
                log.warning(
                    "%s: running once for the run due at %s, %.0f s late (the wall clock stepped forward)",
                    job.id,
                    job.due_wall.isoformat(timespec="seconds"),
                    late,
                )
            self._fire(job)
            job.due_wall = cron.fired(self.clock.wall())
        log.warning("%s: the crontab expression never matches again", job.id)


class _CronState:
    """Which match of a cron job is next, and the jitter drawn for it."""

    def __init__(self, trigger: Any, jitter: float, rng: random.Random) -> None:
        self.trigger, self.jitter, self.rng = trigger, jitter, rng
        self.offset = self._draw()
        self.match: datetime | None = None
        self.last_match: datetime | None = None

    def _draw(self) -> float:
        return self.rng.uniform(0.0, self.jitter) if self.jitter > 0 else 0.0

    def due(self, now: datetime) -> datetime | None:
        """When the next run is due (match + jitter), seen from ``now``: the first match whose run is not past,
        never the last run's match again unless the wall clock went back behind it."""
        start = now - timedelta(seconds=self.offset)
        if self.last_match is not None and self.last_match <= now:
            start = max(start, self.last_match + _ONE_US)
        self.match = self.trigger.get_next_fire_time(None, start)
        return None if self.match is None else self.match + timedelta(seconds=self.offset)

    def fired(self, now: datetime) -> datetime | None:
        """The run for the current match started: the next one, with a new jitter."""
        self.last_match = self.match
        self.offset = self._draw()
        return self.due(now)


def expected_gap(config: Any) -> float | None:
    """The longest a device running this configuration's service should stay silent to its aggregator: its most
    frequent workload's period (the records that make a batch) or the sync interval, whichever is longer; None
    without workloads. Every batch declares it (``expected_gap_s``), a manual ``lens-agent sync`` too, so the
    aggregator's "late" follows the schedule the device has now."""
    periods = [workload_period(w) for w in config.workloads]
    if not periods:
        return None
    return max(min(periods), float(config.get("sync", "interval")))
