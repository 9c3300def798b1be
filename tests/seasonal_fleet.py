"""A seeded seasonal fleet: what a real fleet's latency series look like over weeks, with the truth planted in them.

``devices`` devices in three classes (Orin boards, Orin Nanos, laptops), each running one of two models (a small
one and one 2.2× slower), about ``rate_per_hour`` requests an hour at random moments (a Poisson process). Per
request, TTFT and TPOT are log-normal around the device's level (σ 0.25 and 0.08 of the log) times:

- a daily load pattern in the device's local time (time zones from UTC−8 to UTC+8): up to +10 % (Orin), +12 %
  (Nano) and +8 % (laptop) in the afternoon, half of it on TPOT;
- a weekday load, strongest on laptops: +22 % more on a weekday afternoon than a weekend one (Orin and Nano +4 %),
  so the Monday morning return of load is a jump the weekend did not have;
- thermal bursts: about one every two days per device, 2 hours long, TPOT ×1.6 and TTFT ×1.3 meanwhile;
- 1 % outliers ×5 (each metric on its own), 0.5 % failed requests;
- planted steps: a :class:`Step` multiplies a device's TTFT or TPOT by ``factor`` from ``at_us`` on.

:func:`seasonal_fleet` returns the requests as arrays (what the benchmark feeds the detector directly) and
:meth:`SeasonalFleet.records` as measurement records ``POST /api/v1/ingest`` accepts (the shape of
``agent.synthetic.synthetic_records``, without the inter-token gaps, which the search does not read).
:meth:`SeasonalFleet.batches` cuts a device's records into 15-minute syncs and can hold some back as a late
backlog. Everything is reproducible by ``seed``.
"""

from __future__ import annotations

import hashlib
import uuid
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

import numpy as np

from agent.measurement import RECORD_VERSION

EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)
START = datetime(2026, 11, 2, tzinfo=timezone.utc)  # a Monday, 00:00 UTC
HOUR_US = 3600 * 10**6
DAY_US = 24 * HOUR_US
CLASSES = {  # class → (TTFT ms, TPOT ms, daily load amplitude, extra weekday load)
    "orin": (180.0, 30.0, 0.10, 0.04),
    "nano": (400.0, 60.0, 0.12, 0.04),
    "laptop": (80.0, 12.0, 0.08, 0.22),
}
MODELS = (("Qwen2.5-1.5B-Instruct Q4_K_M", 1.0), ("Llama-3.1-8B-Instruct Q4_K_M", 2.2))
TIME_ZONES = (-8, -5, 0, 1, 2, 8)
BURST_US = 2 * HOUR_US
METRIC_NAMES = ("ttft_ms", "tpot_ms")


@dataclass(frozen=True)
class Step:
    device_id: str
    metric: str  # "ttft_ms" or "tpot_ms"
    factor: float
    at_us: int


@dataclass
class Series:
    device_id: str
    device_class: str
    model_name: str
    tz_hours: int
    started_us: np.ndarray  # int64, sorted
    ttft_ms: np.ndarray
    tpot_ms: np.ndarray
    output_tokens: np.ndarray
    ok: np.ndarray  # bool
    bursts: list[int] = field(default_factory=list)  # the bursts' starts (µs)

    def values(self, metric: str) -> tuple[np.ndarray, np.ndarray]:
        """(started_us, values) of the successful requests for ``metric`` (ttft_ms, tpot_ms, tokens_per_second)."""
        t = self.started_us[self.ok]
        if metric == "tokens_per_second":
            ttft, tpot, tokens = self.ttft_ms[self.ok], self.tpot_ms[self.ok], self.output_tokens[self.ok]
            e2e_ms = ttft + tpot * (tokens - 1)
            return t, tokens / (e2e_ms / 1000.0)
        return t, (self.ttft_ms if metric == "ttft_ms" else self.tpot_ms)[self.ok]


@dataclass
class SeasonalFleet:
    series: dict[str, Series]
    steps: list[Step]
    seed: int

    def records(self, device_id: str, *, until_us: int | None = None) -> list[dict[str, Any]]:
        """The device's requests (those that started before ``until_us``) as measurement records."""
        s = self.series[device_id]
        rng = np.random.default_rng([self.seed, int(hashlib.sha256(device_id.encode()).hexdigest()[:8], 16)])
        run_id = str(uuid.UUID(int=int(rng.integers(0, 2**63)) << 64 | int(rng.integers(0, 2**63)), version=4))
        sha = hashlib.sha256(s.model_name.encode()).hexdigest()
        out = []
        for i in range(len(s.started_us)):
            started = int(s.started_us[i])
            if until_us is not None and started >= until_us:
                break
            ok = bool(s.ok[i])
            tokens = int(s.output_tokens[i])
            ttft, tpot = round(float(s.ttft_ms[i]), 3), round(float(s.tpot_ms[i]), 3)
            decode = round(tpot * (tokens - 1), 3)
            input_tokens = 40 + (i * 37) % 140
            out.append(
                {
                    "run_id": run_id,
                    "device_id": device_id,
                    "model_name": s.model_name,
                    "model_sha256": sha,
                    "strategy": "local",
                    "engine": "llama.cpp",
                    "id": _uuid7(rng, started // 1000),
                    "kind": "inference",
                    "version": RECORD_VERSION,
                    "started_at": _iso(started),
                    "prompt_index": i % 8,
                    "prompt_id": f"p{i % 8}",
                    "prompt_sha256": hashlib.sha256(f"prompt-{i % 8}".encode()).hexdigest(),
                    "warmup": False,
                    "first_after_load": False,
                    "ok": ok,
                    "error_type": None if ok else "decode_failed",
                    "error_message": None if ok else "llama_decode returned -3 after 12 tokens",
                    "stop_reason": "max_tokens" if ok else None,
                    "input_tokens": input_tokens,
                    "output_tokens": tokens if ok else 0,
                    "ttft_ms": ttft if ok else None,
                    "tpot_ms": tpot if ok else None,
                    "e2e_ms": round(ttft + decode, 3) if ok else None,
                    "prefill_ms": round(ttft * 0.9, 3) if ok else None,
                    "decode_ms": decode if ok else None,
                    "itl_ms": [],
                    "engine_prefill_ms": None,
                    "engine_prefill_tokens": None,
                    "engine_decode_ms": None,
                    "engine_decode_tokens": None,
                    "rss_before_bytes": 310_000_000,
                    "rss_peak_bytes": 322_000_000,
                    "rss_peak_source": "VmHWM",
                    "ext": {},
                }
            )
        return out

    def batches(
        self, device_id: str, *, sync_s: float = 900.0, late: tuple[int, int] | None = None
    ) -> list[list[dict[str, Any]]]:
        """The device's records in the order a device would send them: one batch per ``sync_s`` of event time;
        the requests that ran in ``late`` = (from_us, until_us) are held back and sent as one backlog after
        everything else (a device that was offline and caught up)."""
        batches: dict[int, list[dict[str, Any]]] = {}
        held: list[dict[str, Any]] = []
        step = int(sync_s * 1e6)
        for record in self.records(device_id):
            started = _us(record["started_at"])
            if late is not None and late[0] <= started < late[1]:
                held.append(record)
            else:
                batches.setdefault(started // step, []).append(record)
        return [batches[k] for k in sorted(batches)] + ([held] if held else [])


def seasonal_fleet(
    devices: int = 24,
    days: float = 14.0,
    *,
    seed: int = 0,
    rate_per_hour: float = 10.0,
    steps: tuple[Step, ...] = (),
    start: datetime = START,
    bursts_per_day: float = 0.5,
) -> SeasonalFleet:
    """The fleet (see the module text); device n is ``{class}-{n:03d}`` with class n mod 3 and model (n ÷ 3) mod 2."""
    start_us = int(start.timestamp() * 1e6)
    end_us = start_us + int(days * DAY_US)
    classes = tuple(CLASSES)
    out: dict[str, Series] = {}
    for n in range(devices):
        klass = classes[n % 3]
        model, model_factor = MODELS[(n // 3) % 2]
        device = f"{klass}-{n:03d}"
        rng = np.random.default_rng([seed, n])
        tz = TIME_ZONES[int(rng.integers(0, len(TIME_ZONES)))]
        ttft0, tpot0, daily, weekday = CLASSES[klass]
        count = int(rng.poisson(rate_per_hour * days * 24))
        t = np.sort(rng.integers(start_us, end_us, count)).astype(np.int64)
        local_hour = ((t // HOUR_US) + tz) % 24 + (t % HOUR_US) / HOUR_US
        local_day = (t + tz * HOUR_US) // DAY_US
        is_weekday = ((local_day + 3) % 7) < 5  # 1970-01-01 was a Thursday
        load = 0.5 * (1 - np.cos(2 * np.pi * (local_hour - 4) / 24))  # 0 at 04:00, 1 at 16:00 local
        season = load * (daily + weekday * is_weekday)
        ttft = ttft0 * model_factor * np.exp(season + rng.normal(0.0, 0.25, count))
        tpot = tpot0 * model_factor * np.exp(0.5 * season + rng.normal(0.0, 0.08, count))
        n_bursts = int(rng.poisson(bursts_per_day * days))
        burst_starts = sorted(int(b) for b in rng.integers(start_us, end_us, n_bursts))
        for b in burst_starts:
            inside = (t >= b) & (t < b + BURST_US)
            ttft[inside] *= 1.3
            tpot[inside] *= 1.6
        for values in (ttft, tpot):
            outliers = rng.random(count) < 0.01
            values[outliers] *= 5.0
        for s in steps:
            if s.device_id == device:
                later = t >= s.at_us
                (ttft if s.metric == "ttft_ms" else tpot)[later] *= s.factor
        out[device] = Series(
            device_id=device,
            device_class=klass,
            model_name=model,
            tz_hours=tz,
            started_us=t,
            ttft_ms=ttft,
            tpot_ms=tpot,
            output_tokens=rng.integers(64, 129, count),
            ok=rng.random(count) >= 0.005,
            bursts=burst_starts,
        )
    return SeasonalFleet(series=out, steps=list(steps), seed=seed)


def fill(store: Any, fleet: SeasonalFleet) -> None:
    """Store every device's records as ingest stores them, without HTTP (for benchmarks and direct searches)."""
    import time

    from aggregator.app import _row
    from lens_core import wire

    for device in fleet.series:
        rows = []
        for record in fleet.records(device):
            body = wire.encode_record(record, "cbor")
            rows.append(_row(wire.loads(body, "cbor"), "cbor", body))
        store.ingest(device, "b", 1, {}, rows, time.time_ns() // 1000)


def _uuid7(rng: np.random.Generator, unix_ms: int) -> str:
    value = (unix_ms & ((1 << 48) - 1)) << 80 | 0x7 << 76 | int(rng.integers(0, 1 << 12)) << 64 | 0b10 << 62
    value |= int(rng.integers(0, 1 << 62))
    return str(uuid.UUID(int=value))


def _iso(us: int) -> str:
    when = EPOCH + timedelta(microseconds=us)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def _us(text: str) -> int:
    return (datetime.fromisoformat(text.replace("Z", "+00:00")) - EPOCH) // timedelta(microseconds=1)
