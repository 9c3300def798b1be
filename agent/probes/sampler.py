"""The power sampler and the energy arithmetic over its samples.

A background thread reads every source at ``rate_hz`` and stamps each reading with ``time.perf_counter_ns`` —
the clock the token timestamps use — so a request's prefill window (start → first token) and decode window
(first token → last token) can be cut out of the sample stream afterwards. Power rails (W) are integrated with
the trapezoid rule; energy rails (cumulative J) are differenced. Both are interpolated to the window's edges.
A window holding fewer than two samples has no energy figure: the reason is given instead.

The thread sleeps between readings (releasing the GIL) and each reading is a few small file reads, so it does
not slow llama.cpp's decode loop, which runs with the GIL released: see docs/PERFORMANCE.md.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Any

from .power import PowerSource

Sample = tuple[int, dict[str, float]]  # (perf_counter_ns, {rail: W or cumulative J})


@dataclass
class Window:
    """Energy of one rail set over [start_ns, end_ns]."""

    joules: float | None
    samples: int
    reason: str | None = None


def _value_at(samples: list[Sample], times: list[int], rail: str, t: int) -> float | None:
    """The rail's value at ``t``, interpolated linearly between the neighbouring samples (clamped at the ends)."""
    i = bisect.bisect_left(times, t)
    if i < len(times) and times[i] == t:
        return samples[i][1].get(rail)
    if i == 0:
        return samples[0][1].get(rail) if samples else None
    if i == len(times):
        return samples[-1][1].get(rail)
    (t0, a), (t1, b) = samples[i - 1], samples[i]
    va, vb = a.get(rail), b.get(rail)
    if va is None or vb is None:
        return None
    return va + (vb - va) * (t - t0) / (t1 - t0)


def window_energy(
    samples: list[Sample], rails: list[str], kind: str, start_ns: int, end_ns: int, *, rate_hz: float | None = None
) -> Window:
    """Joules drawn by ``rails`` (summed) over [start_ns, end_ns]."""
    times = [t for t, _ in samples]
    lo, hi = bisect.bisect_left(times, start_ns), bisect.bisect_right(times, end_ns)
    inside = hi - lo
    if end_ns <= start_ns:
        return Window(None, inside, "empty window")
    if inside < 2:
        duration_ms = (end_ns - start_ns) / 1e6
        rate = f" at {rate_hz:g} Hz" if rate_hz else ""
        return Window(None, inside, f"{inside} power sample(s) in this {duration_ms:.0f} ms window{rate}; need 2")
    total = 0.0
    for rail in rails:
        if kind == "energy":
            a, b = _value_at(samples, times, rail, start_ns), _value_at(samples, times, rail, end_ns)
            if a is None or b is None:
                return Window(None, inside, f"rail {rail} missing from samples")
            total += b - a
        else:
            points: list[tuple[int, float]] = []
            for t in (start_ns, *times[lo:hi], end_ns):
                v = _value_at(samples, times, rail, t)
                if v is None:
                    return Window(None, inside, f"rail {rail} missing from samples")
                points.append((t, v))
            total += sum((t1 - t0) / 1e9 * (v0 + v1) / 2 for (t0, v0), (t1, v1) in pairwise(points))
    return Window(total, inside)


def window_power_stats(
    samples: list[Sample], rail: str, kind: str, start_ns: int, end_ns: int
) -> tuple[float, float] | None:
    """(average W, peak W) of a rail over the window, or None with fewer than two samples inside."""
    inside = [(t, v[rail]) for t, v in samples if start_ns <= t <= end_ns and rail in v]
    if len(inside) < 2:
        return None
    if kind == "energy":
        watts = [(v1 - v0) / ((t1 - t0) / 1e9) for (t0, v0), (t1, v1) in pairwise(inside) if t1 > t0]
        if not watts:
            return None
        span = (inside[-1][0] - inside[0][0]) / 1e9
        return (inside[-1][1] - inside[0][1]) / span, max(watts)
    values = [v for _, v in inside]
    energy = window_energy(samples, [rail], kind, inside[0][0], inside[-1][0])
    span = (inside[-1][0] - inside[0][0]) / 1e9
    avg = energy.joules / span if energy.joules is not None and span > 0 else sum(values) / len(values)
    return avg, max(values)


@dataclass
class PowerSampler:
    """Samples every source at ``rate_hz`` in a daemon thread; ``samples`` is the merged stream."""

    sources: list[PowerSource]
    rate_hz: float = 10.0
    clock: Callable[[], int] = time.perf_counter_ns
    extras: Callable[[], dict[str, float | None]] | None = None  # utilisation figures, keys starting with "_"
    samples: list[Sample] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    @property
    def kind_of(self) -> dict[str, str]:
        return {self._rail_name(s, r): s.kind for s in self.sources for r in s.rails}

    @property
    def total_rails(self) -> dict[str, list[str]]:
        """Total rails grouped by kind (a source's rails are all of one kind)."""
        out: dict[str, list[str]] = {}
        for s in self.sources:
            out.setdefault(s.kind, []).extend(self._rail_name(s, r) for r in s.total_rails)
        return out

    def _rail_name(self, source: PowerSource, rail: str) -> str:
        return rail if len(self.sources) == 1 else f"{source.name}.{rail}"

    def read_once(self) -> Sample:
        reading: dict[str, float] = {}
        for source in self.sources:
            try:
                for rail, value in source.sample().items():
                    reading[self._rail_name(source, rail)] = value
            except OSError as exc:
                if len(self.errors) < 20:
                    self.errors.append(f"{source.name}: {exc}")
        if self.extras is not None:
            try:
                reading.update({k: v for k, v in self.extras().items() if v is not None})
            except OSError as exc:
                if len(self.errors) < 20:
                    self.errors.append(f"utilisation: {exc}")
        sample = (self.clock(), reading)
        self.samples.append(sample)
        return sample

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        next_at = time.monotonic()
        while not self._stop.is_set():
            self.read_once()
            next_at += period
            delay = next_at - time.monotonic()
            if delay < 0:
                next_at = time.monotonic()
                delay = 0
            self._stop.wait(delay)

    def start(self) -> None:
        if self._thread is None and (self.sources or self.extras is not None):
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="power-sampler", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def wait_past(self, t_ns: int) -> None:
        """Wait (at most two periods) for a sample taken after ``t_ns``, so a window's end is interpolated."""
        deadline = time.monotonic() + 2.0 / self.rate_hz
        while self._thread is not None and time.monotonic() < deadline:
            if self.samples and self.samples[-1][0] >= t_ns:
                return
            time.sleep(0.001)

    def values(self, key: str, start_ns: int, end_ns: int) -> list[float]:
        """Every sampled value of ``key`` between two instants (utilisation figures, rails)."""
        return [v[key] for t, v in self.samples if start_ns <= t <= end_ns and key in v]

    def baseline(self, seconds: float) -> dict[str, float]:
        """Idle draw per total rail (W), measured over ``seconds`` before the run (the thread must be running)."""
        start = self.clock()
        time.sleep(seconds)
        end = self.clock()
        out: dict[str, float] = {}
        for kind, rails in self.total_rails.items():
            for rail in rails:
                window = window_energy(self.samples, [rail], kind, start, end, rate_hz=self.rate_hz)
                if window.joules is not None:
                    out[rail] = window.joules / ((end - start) / 1e9)
        return out

    def window_report(
        self,
        start_ns: int,
        first_token_ns: int | None,
        end_ns: int | None,
        *,
        baseline_w: dict[str, float],
        input_tokens: int | None,
        output_tokens: int,
    ) -> dict[str, Any]:
        """The energy figures of one request, for ``Measurement.ext["energy"]``."""
        report: dict[str, Any] = {"source": "+".join(s.name for s in self.sources), "rate_hz": self.rate_hz}
        if end_ns is None or first_token_ns is None:
            report["unavailable"] = "the request produced no token"
            return report
        report["samples"] = sum(1 for t, _ in self.samples if start_ns <= t <= end_ns)
        unavailable: dict[str, str] = {}

        def total(a: int, b: int) -> tuple[float | None, float | None, str | None]:
            gross = 0.0
            idle = 0.0
            for kind, rails in self.total_rails.items():
                w = window_energy(self.samples, rails, kind, a, b, rate_hz=self.rate_hz)
                if w.joules is None:
                    return None, None, w.reason
                gross += w.joules
                idle += sum(baseline_w.get(r, 0.0) for r in rails) * (b - a) / 1e9
            return gross, gross - idle, None

        gross, net, reason = total(start_ns, end_ns)
        report["joules_total"] = gross
        report["joules_net"] = net
        if reason:
            unavailable["joules_total"] = reason
        _, prefill_net, reason = total(start_ns, first_token_ns)
        report["prefill_joules"] = prefill_net
        if reason:
            unavailable["prefill"] = reason
        elif input_tokens:
            report["j_per_prompt_token"] = (prefill_net or 0.0) / input_tokens
        _, decode_net, reason = total(first_token_ns, end_ns)
        report["decode_joules"] = decode_net
        if reason:
            unavailable["decode"] = reason
        elif output_tokens > 1:
            report["j_per_output_token"] = (decode_net or 0.0) / (output_tokens - 1)
        rails: dict[str, Any] = {}
        for rail, kind in self.kind_of.items():
            stats = window_power_stats(self.samples, rail, kind, start_ns, end_ns)
            if stats is not None:
                rails[rail] = {"avg_w": stats[0], "peak_w": stats[1]}
        report["rails"] = rails
        report["baseline_w"] = baseline_w
        if unavailable:
            report["unavailable"] = unavailable
        return report
