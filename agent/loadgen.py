"""Load against an OpenAI-compatible endpoint: closed loop at a fixed concurrency, open loop at a fixed request rate.

**Closed loop** (``Level(mode="closed", concurrency=N)``): N workers, each sending its next request when its previous
one has finished; the server's speed sets the rate. **Open loop** (``Level(mode="open", rate=R)``): requests are sent
on a schedule fixed before the level starts — constant (request i at i / R seconds) or Poisson (exponential gaps of
mean 1 / R from ``random.Random(seed)``) — and the schedule never waits for an answer. A request that cannot leave on
time (every slot of ``max_concurrency`` busy, the client itself behind) is still timed from its *scheduled* send
time: TTFT and e2e include the wait, so a server that queues cannot hide it behind a client that slows down with it
(coordinated omission). ``send_lag_ms`` in each record says how late it actually left.

A level ends sending at ``duration_s`` or after ``requests`` requests, whichever comes first (``should_stop`` ends it
early); the answers still in flight are awaited — each bounded by the client's timeout — and counted. Everything
runs on one asyncio event loop: one task per request (open loop) or per worker (closed loop).

Every request becomes a :class:`~agent.measurement.Measurement` filled exactly as the cloud strategy fills one
(:func:`agent.strategies.cloud.cloud_record`), plus ``ext.load``: the mode, the concurrency (closed: the level's;
open: requests in flight when it was sent, itself included), the offered rate, the arrival process, the scheduled
time (UTC and from the level's start), the send lag and the level's label.

:func:`saturation` reads a sweep of levels and says at which one the endpoint stopped keeping up, and why.
docs/load.md describes the shapes and the figures.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import random
import resource
import statistics
import time
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from lens_core.suite import closed_label, open_label, rate_text

from .engines.cloud import CloudClient, CloudResult
from .measurement import Measurement
from .prompts import Prompt
from .strategies.base import fill_timings
from .strategies.cloud import cloud_record, server_timings_ext

MODES = ("closed", "open")
ARRIVALS = ("constant", "poisson")
# closed loop: the next level saturates the endpoint when its throughput grows less than this …
THROUGHPUT_GAIN = 0.10
# … while its TTFT p50 grows by more than this (either relative to the previous closed level)
TTFT_GROWTH = 0.10
# open loop: achieved below this share of the rate the schedule offered the requests it sent (the sent rate)
ACHIEVED_SHARE = 0.9
# open loop: e2e grows "clearly" — its least-squares slope is more than this many standard errors above 0, over the
# level it adds at least this share of the median e2e, and at least this many requests succeeded
SLOPE_SIGMAS = 3.0
SLOPE_GROWTH_SHARE = 0.5
SLOPE_MIN_POINTS = 8
# … and the wait grows by at least this many ms per second of schedule: 5 % of the time that passes, a server at
# least 5 % short of the rate (a slope of 1 ms/s — 16 ms over a level — is a busy machine, not a queue)
SLOPE_MIN_MS_PER_S = 50.0
# open loop: the last stretch before a send is waited by yielding to the loop, not by a timer (see _until)
SPIN_S = 0.002
# a level none of whose requests succeeded says nothing about saturation
FAILED_REASON = "every request failed"
# open loop without max_concurrency: connections kept free of the pool for everything else the process opens
_FD_MARGIN = 64
# open loop: a send scheduled later than this from the level's start is never made (the level ends sending there).
# A suite cannot ask for it ([suite] max_duration bounds every level); this keeps the library from overflowing a
# timer or an integer on an absurd rate (1e-300 req/s puts the second request at 1e300 s).
MAX_SCHEDULE_S = 366 * 86400.0


@dataclass(frozen=True)
class Level:
    """One level of a sweep. ``ValueError`` for a combination that means nothing (the suite's checks name the
    document's field; these guard the library)."""

    mode: str  # "closed" | "open"
    concurrency: int | None = None  # closed: in-flight requests kept
    rate: float | None = None  # open: offered requests per second
    arrival: str = "poisson"  # open: "constant" | "poisson"
    duration_s: float | None = None
    requests: int | None = None  # at least one of duration_s / requests; whichever ends first
    max_concurrency: int | None = None  # open: cap on in-flight (a request waits for a slot; its wait counts)
    seed: int = 0

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"Level.mode {self.mode!r}: expected one of {', '.join(MODES)}")
        if self.mode == "closed":
            if isinstance(self.concurrency, bool) or not isinstance(self.concurrency, int) or self.concurrency < 1:
                raise ValueError(f"Level.concurrency {self.concurrency!r}: a closed level needs an integer ≥ 1")
        else:
            if (
                isinstance(self.rate, bool)
                or not isinstance(self.rate, (int, float))
                or not math.isfinite(self.rate)
                or self.rate <= 0
            ):
                raise ValueError(f"Level.rate {self.rate!r}: an open level needs a finite rate > 0 (requests/s)")
            if self.arrival not in ARRIVALS:
                raise ValueError(f"Level.arrival {self.arrival!r}: expected one of {', '.join(ARRIVALS)}")
            if self.max_concurrency is not None and (
                isinstance(self.max_concurrency, bool)
                or not isinstance(self.max_concurrency, int)
                or self.max_concurrency < 1
            ):
                raise ValueError(f"Level.max_concurrency {self.max_concurrency!r}: expected None or an integer ≥ 1")
        if self.duration_s is None and self.requests is None:
            raise ValueError("Level: give duration_s, requests or both (the level ends at whichever comes first)")
        if self.duration_s is not None and not (math.isfinite(self.duration_s) and self.duration_s > 0):
            raise ValueError(f"Level.duration_s {self.duration_s!r}: expected a finite number of seconds > 0")
        if self.requests is not None and (
            isinstance(self.requests, bool) or not isinstance(self.requests, int) or self.requests < 1
        ):
            raise ValueError(f"Level.requests {self.requests!r}: expected an integer ≥ 1")

    @property
    def label(self) -> str:
        if self.mode == "closed":
            return closed_label(int(self.concurrency or 1))
        return open_label(float(self.rate or 0.0), self.arrival)


@dataclass
class LevelRun:
    level: Level
    measurements: list[Measurement]  # every request, in scheduled order
    wall_s: float  # first scheduled send → last answer
    offered_rate: float | None  # open: level.rate; closed: None
    # the rate the schedule offered the requests it sent: (n − 1) ÷ (last − first scheduled send); closed loop: the
    # sends themselves. Fewer than 2 sent: n ÷ max(wall_s, n ÷ offered).
    sent_rate: float
    # the rate answers came back at, times the share that succeeded: (answered − 1) ÷ (last − first answer) × ok ÷
    # answered; fewer than 2 answers (or all at once): ok ÷ max(wall_s, n ÷ offered). Closed loop: ok ÷ wall_s.
    achieved_rate: float
    throughput_tps: float  # output tokens of successful requests ÷ wall_s
    peak_in_flight: int
    errors_by_type: dict[str, int]
    latency_slope: float | None  # e2e ms growth per second of schedule (least squares): > 0 when a queue builds up
    saturated: bool
    saturation_reason: str | None
    # requests that were due but never sent: should_stop turned true while they waited for a max_concurrency slot
    not_sent: int = 0
    send_lag_ms: dict[str, float] = field(default_factory=dict)  # p50, p99 and max of every sent request's lag


def arrival_offsets(level: Level) -> Iterator[float]:
    """An open level's send times in seconds from its start, in order, without end (the caller stops at the
    level's count or duration). Constant: exactly i / rate. Poisson: cumulative exponential gaps of mean 1 / rate
    drawn from ``random.Random(level.seed)`` — the same seed gives the same schedule."""
    assert level.rate is not None
    rate = float(level.rate)
    if level.arrival == "constant":
        for i in itertools.count():
            yield i / rate
        return
    rng = random.Random(level.seed)
    offset = 0.0
    while True:
        yield offset
        offset += rng.expovariate(rate)


def schedule(level: Level, limit: int | None = None) -> list[float]:
    """The open level's whole schedule (seconds from its start): every offset before ``duration_s`` and at most
    ``requests`` (or ``limit``, whichever is smaller) of them. A level with neither bound needs ``limit``."""
    count = min(x for x in (level.requests, limit) if x is not None) if (level.requests or limit) else None
    if count is None and level.duration_s is None:
        raise ValueError("schedule: the level has no request count; give a limit")
    out: list[float] = []
    for offset in arrival_offsets(level):
        if (count is not None and len(out) >= count) or (level.duration_s is not None and offset >= level.duration_s):
            break
        if not offset <= MAX_SCHEDULE_S:  # also NaN and infinity
            break
        out.append(offset)
    return out


def utc_iso(wall_ns: int) -> str:
    """A wall-clock ``time_ns`` stamp as UTC ISO 8601 with microseconds and ``Z``."""
    moment = datetime(1970, 1, 1, tzinfo=timezone.utc) + timedelta(microseconds=wall_ns // 1000)
    return moment.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _pool_size(level: Level) -> int:
    """Connections the level may hold at once: its concurrency (closed), its cap (open with max_concurrency), else
    as many as the process may open (open without a cap: in flight grows with the queue)."""
    if level.mode == "closed":
        assert level.concurrency is not None
        return level.concurrency
    if level.max_concurrency is not None:
        return level.max_concurrency
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 0
    return max(100, soft - _FD_MARGIN)


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    if len(ordered) == 1:
        return ordered[0]
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


def least_squares(points: list[tuple[float, float]]) -> tuple[float, float] | None:
    """Slope of y over x and its standard error; ``None`` for fewer than 3 points or no spread in x."""
    n = len(points)
    if n < 3:
        return None
    mx = statistics.fmean(x for x, _ in points)
    my = statistics.fmean(y for _, y in points)
    sxx = sum((x - mx) ** 2 for x, _ in points)
    if sxx <= 0:
        return None
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    intercept = my - slope * mx
    residual = sum((y - intercept - slope * x) ** 2 for x, y in points)
    se = math.sqrt(residual / (n - 2) / sxx)
    return slope, se


async def _until(when_ns: int) -> None:
    """Return at ``when_ns`` (perf_counter). The event loop's timers wake up to ~1 ms late (epoll counts whole
    milliseconds), which would be send lag of every request at low rates: sleep to ``SPIN_S`` before, then yield
    to the loop's other work until the time has come."""
    delay = (when_ns - time.perf_counter_ns()) / 1e9
    if delay > SPIN_S:
        await asyncio.sleep(delay - SPIN_S)
    while time.perf_counter_ns() < when_ns:
        await asyncio.sleep(0)


async def _cancel(tasks: list[asyncio.Task[None]]) -> None:
    """Cancel what is still running (run_level itself was cancelled, or on_result raised) and let it finish."""
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class _Level:
    """The state of one running level (both modes)."""

    def __init__(
        self,
        client: CloudClient,
        level: Level,
        prompts: list[tuple[Prompt, Any]],
        max_tokens: int,
        new_record: Callable[[int], Measurement],
        on_result: Callable[[Measurement], None] | None,
        extra: dict[str, Any] | None,
        rtt_ms: float | None,
    ) -> None:
        self.client, self.level, self.prompts = client, level, prompts
        self.max_tokens, self.new_record, self.on_result = max_tokens, new_record, on_result
        self.extra, self.rtt_ms = extra, rtt_ms
        self.records: dict[int, Measurement] = {}
        self.in_flight = 0
        self.peak = 0
        self.sent_ns: list[int] = []
        self.scheduled_ns: list[int] = []
        self.done_ns: list[int] = []
        self.lags_ms: list[float] = []
        self.last_answer_ns = 0
        self.not_sent = 0
        self.start_ns = 0
        self.start_wall_ns = 0
        parts = urllib.parse.urlsplit(client.settings.url)
        self.address = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)

    def begin(self) -> None:
        self.start_wall_ns = time.time_ns()
        self.start_ns = time.perf_counter_ns()

    async def request(self, index: int, scheduled_ns: int) -> None:
        """Send request ``index`` (due at ``scheduled_ns`` on the perf_counter clock) and record it."""
        prompt_index = index % len(self.prompts)
        _, payload = self.prompts[prompt_index]
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        concurrency = self.level.concurrency if self.level.mode == "closed" else self.in_flight
        try:
            result = await self.client.complete(payload, max_tokens=self.max_tokens, stream=True, extra=self.extra)
        finally:
            self.in_flight -= 1
        done_ns = time.perf_counter_ns()
        if self.level.mode == "closed":
            scheduled_ns = result.start_ns  # closed loop: a request is due when it is sent
        self.last_answer_ns = max(self.last_answer_ns, done_ns)
        self.sent_ns.append(result.start_ns)
        self.scheduled_ns.append(scheduled_ns)
        self.done_ns.append(done_ns)
        record = self.new_record(prompt_index)
        self.fill(record, result, index, scheduled_ns, concurrency)
        self.records[index] = record
        if self.on_result is not None:
            self.on_result(record)

    def fill(self, record: Measurement, result: CloudResult, index: int, scheduled_ns: int, concurrency: Any) -> None:
        record.strategy = "cloud"
        record.engine = "openai-compatible"
        cloud_record(record, result, self.rtt_ms)
        open_loop = self.level.mode == "open"
        if open_loop and record.ok and result.chunk_ns:
            fill_timings(record, scheduled_ns, result.chunk_ns)  # coordinated omission: from the schedule
            if result.server_timings:  # the time outside the server's clock now includes the wait to be sent
                record.ext["server_timings"] = server_timings_ext(result.server_timings, record.ttft_ms, record.e2e_ms)
        if self.address:
            record.ext["network"]["server_address"] = self.address
            record.ext["network"]["server_port"] = self.port
        if self.client.settings.model:
            record.ext["network"]["model"] = self.client.settings.model
        lag_ms = (result.start_ns - scheduled_ns) / 1e6
        self.lags_ms.append(lag_ms)
        scheduled_wall = self.start_wall_ns + (scheduled_ns - self.start_ns)
        record.started_at = utc_iso(scheduled_wall)
        record.ext["load"] = {
            "mode": self.level.mode,
            "concurrency": concurrency,
            "offered_rate_rps": float(self.level.rate) if open_loop and self.level.rate is not None else None,
            "arrival": self.level.arrival if open_loop else None,
            "max_concurrency": self.level.max_concurrency if open_loop else None,
            "scheduled_at": record.started_at,
            "scheduled_offset_ms": (scheduled_ns - self.start_ns) / 1e6,
            "send_lag_ms": lag_ms,
            "index": index,
            "stale_retries": result.stale_retries,
            "level": self.level.label,
        }

    async def run_open(self, should_stop: Callable[[], bool] | None) -> None:
        level = self.level
        slots = asyncio.Semaphore(level.max_concurrency) if level.max_concurrency else None
        stopped = False

        async def due(index: int, scheduled_ns: int) -> None:
            nonlocal stopped
            if slots is None:
                await self.request(index, scheduled_ns)
                return
            async with slots:
                if stopped or (should_stop is not None and should_stop()):
                    stopped = True
                    self.not_sent += 1
                    return
                await self.request(index, scheduled_ns)

        tasks: list[asyncio.Task[None]] = []
        try:
            for index, offset in enumerate(arrival_offsets(level)):
                if level.requests is not None and index >= level.requests:
                    break
                if level.duration_s is not None and offset >= level.duration_s:
                    break
                if not offset <= MAX_SCHEDULE_S:  # also NaN and infinity: never a timer or integer overflow
                    break
                scheduled_ns = self.start_ns + round(offset * 1e9)
                await _until(scheduled_ns)
                if should_stop is not None and should_stop():
                    stopped = True
                    break
                tasks.append(asyncio.create_task(due(index, scheduled_ns)))
            if tasks:
                await asyncio.gather(*tasks)
        except BaseException:
            await _cancel(tasks)
            raise

    async def run_closed(self, should_stop: Callable[[], bool] | None) -> None:
        level = self.level
        assert level.concurrency is not None
        counter = itertools.count()
        deadline = (
            self.start_ns + round(min(level.duration_s, MAX_SCHEDULE_S) * 1e9) if level.duration_s is not None else None
        )  # 1e300 s would overflow round() as nanoseconds

        async def worker() -> None:
            while True:
                now = time.perf_counter_ns()
                if deadline is not None and now >= deadline:
                    return
                if should_stop is not None and should_stop():
                    return
                index = next(counter)
                if level.requests is not None and index >= level.requests:
                    return
                await self.request(index, time.perf_counter_ns())

        tasks = [asyncio.create_task(worker()) for _ in range(level.concurrency)]
        try:
            await asyncio.gather(*tasks)
        except BaseException:
            await _cancel(tasks)
            raise

    def result(self) -> LevelRun:
        level = self.level
        measurements = [self.records[i] for i in sorted(self.records)]
        end_ns = max(self.last_answer_ns, self.start_ns)
        wall_s = (end_ns - self.start_ns) / 1e9
        ok = [m for m in measurements if m.ok]
        errors: dict[str, int] = {}
        for m in measurements:
            if not m.ok:
                errors[m.error_type or "unknown"] = errors.get(m.error_type or "unknown", 0) + 1
        open_loop = level.mode == "open" and level.rate is not None
        # open loop: a level shorter than its schedule is not credited with more than the schedule offered
        floor_s = len(measurements) / float(level.rate) if open_loop and level.rate else 0.0
        window = max(wall_s, floor_s)
        sent_rate = _span_rate(self.scheduled_ns, len(self.scheduled_ns), window)
        achieved = len(ok) / window if window > 0 else 0.0
        if open_loop and len(self.done_ns) >= 2:
            answered = _span_rate(self.done_ns, 0, 0.0)
            if answered > 0:
                achieved = answered * len(ok) / len(self.done_ns)
        fit = least_squares(_e2e_over_schedule(measurements))
        lags = self.lags_ms
        run = LevelRun(
            level=level,
            measurements=measurements,
            wall_s=wall_s,
            offered_rate=float(level.rate) if level.mode == "open" and level.rate is not None else None,
            sent_rate=sent_rate,
            achieved_rate=achieved,
            throughput_tps=sum(m.output_tokens for m in ok) / wall_s if wall_s > 0 else 0.0,
            peak_in_flight=self.peak,
            errors_by_type=errors,
            latency_slope=fit[0] if fit else None,
            saturated=False,
            saturation_reason=None,
            not_sent=self.not_sent,
            send_lag_ms=(
                {"p50": _percentile(lags, 0.5), "p99": _percentile(lags, 0.99), "max": max(lags)} if lags else {}
            ),
        )
        if level.mode == "open":
            run.saturated, run.saturation_reason = _open_saturation(run)
        return run


async def run_level(
    client: CloudClient,
    level: Level,
    prompts: list[tuple[Prompt, Any]],
    *,
    max_tokens: int,
    new_record: Callable[[int], Measurement],
    on_result: Callable[[Measurement], None] | None = None,
    should_stop: Callable[[], bool] | None = None,
    extra: dict[str, Any] | None = None,
    rtt_ms: float | None = None,
) -> LevelRun:
    """Run one level against ``client``'s endpoint; see the module's doc. ``prompts`` are used in turn (request i
    sends ``prompts[i % len(prompts)]``; ``new_record`` gets that index). ``on_result`` is called as each request
    finishes, after its record is filled; ``should_stop`` is asked before each send (a true answer ends sending;
    what is in flight is awaited). Never raises for what the endpoint does: errors are measurements."""
    if not prompts:
        raise ValueError("run_level: no prompts")
    await client.reserve_connections(_pool_size(level))
    state = _Level(client, level, prompts, max_tokens, new_record, on_result, extra, rtt_ms)
    retry_stale, client.retry_stale = client.retry_stale, True  # a worker sends the moment its answer ends
    try:
        state.begin()
        if level.mode == "open":
            await state.run_open(should_stop)
        else:
            await state.run_closed(should_stop)
    finally:
        client.retry_stale = retry_stale
    return state.result()


def _span_rate(stamps_ns: list[int], count: int, window_s: float) -> float:
    """The rate of events at ``stamps_ns`` (perf_counter ns) over their own span: 1 ÷ the least-squares slope of
    the k-th event's time over k (three or more events), (n − 1) ÷ (last − first) for two. Gaps between events, not
    n events over a window that starts before the first and ends after the last, so a short level's rate is not
    inflated; and the fit over every event, not the first and the last alone, so one late straggler (a busy
    machine) moves it little. Fewer than two events, no span or no positive slope: ``count`` ÷ ``window_s`` (0
    when that is 0)."""
    stamps = sorted(stamps_ns)
    if len(stamps) >= 3:
        fit = least_squares([(float(k), (t - stamps[0]) / 1e9) for k, t in enumerate(stamps)])
        if fit is not None and fit[0] > 0:
            return 1.0 / fit[0]
    elif len(stamps) == 2 and stamps[1] > stamps[0]:
        return 1.0 / ((stamps[1] - stamps[0]) / 1e9)
    return count / window_s if window_s > 0 else 0.0


def _e2e_over_schedule(measurements: list[Measurement]) -> list[tuple[float, float]]:
    """(scheduled offset in s, e2e in ms) of every successful request."""
    return [
        (m.ext["load"]["scheduled_offset_ms"] / 1000.0, m.e2e_ms)
        for m in measurements
        if m.ok and m.e2e_ms is not None and "load" in m.ext
    ]


def _slope_is_clear(run: LevelRun) -> tuple[bool, str]:
    fit = least_squares(_e2e_over_schedule(run.measurements))
    ok = [m.e2e_ms for m in run.measurements if m.ok and m.e2e_ms is not None]
    if fit is None or len(ok) < SLOPE_MIN_POINTS:
        return False, ""
    slope, se = fit
    offsets = [m.ext["load"]["scheduled_offset_ms"] / 1000.0 for m in run.measurements if "load" in m.ext]
    span = max(offsets) - min(offsets) if offsets else 0.0
    growth = slope * span
    median = statistics.median(ok)
    clear = slope > SLOPE_SIGMAS * se and growth >= SLOPE_GROWTH_SHARE * median and slope >= SLOPE_MIN_MS_PER_S
    return clear, (
        f"e2e grows {slope:.1f} ms per second of schedule (± {se:.1f}): {growth:.0f} ms over the level, "
        f"against a median e2e of {median:.0f} ms — a queue builds up"
    )


def _all_failed(run: LevelRun) -> bool:
    return bool(run.measurements) and not any(m.ok for m in run.measurements)


def _open_saturation(run: LevelRun) -> tuple[bool, str | None]:
    assert run.offered_rate is not None
    if _all_failed(run):
        return False, FAILED_REASON
    if run.achieved_rate < ACHIEVED_SHARE * run.sent_rate:
        return True, (
            f"achieved {run.achieved_rate:.3g} req/s < {ACHIEVED_SHARE:g} × sent {run.sent_rate:.3g} req/s "
            f"(offered {rate_text(run.offered_rate)})"
        )
    clear, why = _slope_is_clear(run)
    if clear:
        return True, why
    return False, None


def _p50_ttft(run: LevelRun) -> float | None:
    values = [m.ttft_ms for m in run.measurements if m.ok and m.ttft_ms is not None]
    return statistics.median(values) if values else None


def _closed_saturation(run: LevelRun, previous: LevelRun) -> tuple[bool, str | None]:
    if _all_failed(run):
        return False, FAILED_REASON
    before, after = _p50_ttft(previous), _p50_ttft(run)
    if before is None or after is None or previous.throughput_tps <= 0:
        return False, None
    gain = run.throughput_tps / previous.throughput_tps - 1.0
    if gain < THROUGHPUT_GAIN and after > before * (1.0 + TTFT_GROWTH):
        return True, (
            f"throughput {previous.throughput_tps:.1f} → {run.throughput_tps:.1f} tok/s ({gain:+.0%}, less than "
            f"+{THROUGHPUT_GAIN:.0%}) from {previous.level.label} while TTFT p50 grew {before:.0f} → {after:.0f} ms"
        )
    return False, None


def saturation(runs: list[LevelRun]) -> tuple[int | None, str]:
    """The index of the first level at which the endpoint saturates, and why; ``(None, "not saturated up to
    <last level>")`` otherwise. Closed loop: the throughput grows less than 10 % from the previous closed level
    while TTFT p50 grows by more than 10 %. Open loop: achieved < 0.9 × the sent rate (what the schedule offered the
    requests it sent), or e2e grows clearly with time (the least-squares slope over the schedule is > 3 standard
    errors above zero and ≥ 50 ms/s, and adds ≥ half the median e2e over the level). A level none of whose requests
    succeeded neither saturates nor counts as keeping up: the answer says so (``not determined: every request failed
    at …``).
    Each run's ``saturated`` and ``saturation_reason`` are set on the way."""
    first: tuple[int, str] | None = None
    failed: list[str] = []
    previous_closed: LevelRun | None = None
    for index, run in enumerate(runs):
        if run.level.mode == "open":
            run.saturated, run.saturation_reason = _open_saturation(run)
        else:
            if _all_failed(run):
                run.saturated, run.saturation_reason = False, FAILED_REASON
            elif previous_closed is not None:
                run.saturated, run.saturation_reason = _closed_saturation(run, previous_closed)
            else:
                run.saturated, run.saturation_reason = False, None
            if not _all_failed(run):
                previous_closed = run
        if _all_failed(run):
            failed.append(run.level.label)
        if run.saturated and first is None:
            first = (index, f"{run.level.label}: {run.saturation_reason}")
    if first is not None:
        return first
    if failed:
        if len(failed) == len(runs):
            return None, f"not determined: every request failed at every level ({', '.join(failed)})"
        kept = [run.level.label for run in runs if not _all_failed(run)]
        return None, f"not saturated up to {kept[-1]}; not determined at {', '.join(failed)}: every request failed"
    last = runs[-1].level.label if runs else "(no level)"
    return None, f"not saturated up to {last}"
