"""What else uses the device while a request runs: other processes' CPU, pressure, memory, swap, clocks, heat.

A :class:`DeviceReader` reads the cheap counters once per call (a snapshot): all CPUs' busy time from
``/proc/stat`` minus this process's own (``time.process_time``, every thread, plus reaped children), the load
average, PSI ``total=`` stall counters (``/proc/pressure/{cpu,memory,io}``, µs; absent on kernels without PSI),
memory available against the limit that applies (the process's cgroup limit, v1 or v2, when set; else MemTotal),
swap-ins and swap-outs (``/proc/vmstat``), CPU and GPU clocks against their maximum (cpufreq, Jetson devfreq) and
thermal state (zones against their trip points, throttle counters). Paths are found once, when the reader is made.

An :class:`InterferenceMonitor` takes snapshots in a background thread at a modest rate (the clocks and heat can
change inside a request) and one just before and one just after each request (``begin``/``end``), so counters
are differenced over the request itself. The kernel counts CPU time in ticks (10 ms) and one fsync can stall a
few ms, so the counter figures (CPU, pressure, swap) of a request shorter than :data:`MIN_SPAN_S` are averaged over
that much time before its end instead. Nothing runs per token. :func:`verdict` turns a request's figures into
``ext.interference`` (``docs/interference.md``).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from .sysfs import Root

REASONS = ("cpu", "cpu_pressure", "memory", "swap", "io", "thermal", "frequency")
PSI_KINDS = ("cpu", "memory", "io")
MIN_SPAN_S = 0.5
MAX_SNAPSHOTS = 4096  # the background stream is bounded: oldest dropped (about 30 min at 2 Hz plus two per request)
SUMMARY_CHARS = 200
FRESH_NS = 50_000_000  # window(): a snapshot newer than this before a request's end serves as its end


@dataclass(frozen=True)
class Thresholds:
    """When a request counts as contended (``[interference]`` in the agent's config; docs/interference.md)."""

    other_cpu_cores: float = 0.3  # cores other processes used beyond the ones the run leaves free
    cpu_pressure_pct: float = 40.0  # PSI cpu some, % of the request's wall time
    memory_pressure_pct: float = 5.0  # PSI memory some
    mem_available_pct: float = 10.0  # available memory below this % of the limit that applies
    swap_pages_per_s: float = 1.0  # pages swapped in + out per second
    io_pressure_pct: float = 20.0  # PSI io some
    freq_ratio: float = 0.8  # CPU (or, with GPU layers, GPU) clock below this share of its maximum

    @classmethod
    def from_config(cls, values: Mapping[str, Any]) -> Thresholds:
        return cls(**{f.name: float(values[f.name]) for f in fields(cls) if f.name in values})

    def as_dict(self) -> dict[str, float]:
        return {f.name: float(getattr(self, f.name)) for f in fields(self)}


@dataclass
class Snapshot:
    """One reading; ``None`` where the device does not have the counter."""

    t_ns: int
    cpu_busy_s: float | None = None  # every CPU's non-idle time since boot (s)
    self_cpu_s: float = 0.0  # this process's CPU time, every thread, plus reaped children (s)
    load1: float | None = None
    psi_us: dict[str, int] = field(default_factory=dict)  # "cpu"/"memory"/"io" → some total= (µs)
    swap_pages: int | None = None  # pswpin + pswpout
    mem_available_pct: float | None = None
    cpu_freq_ratio: float | None = None
    gpu_freq_ratio: float | None = None
    temp_max_c: float | None = None
    hot_zones: tuple[str, ...] = ()  # zones at or above their trip point
    throttle_events: int | None = None  # summed throttle counters


def _median(values: list[float]) -> float:
    """statistics.median's value (the middle one, or the mean of the two middle ones), without loading statistics
    (and fractions and decimal with it) into every agent command: this module loads with the configuration."""
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2


def _self_cpu_s() -> float:
    times = os.times()
    return time.process_time() + times.children_user + times.children_system


_GPU_HINTS = ("gpu", "gv11b", "ga10b", "gp10b", "gm20b", "57000000", "17000000")


class DeviceReader:
    """Reads one :class:`Snapshot`; the files to read are found once, here."""

    def __init__(self, root: Root, clock: Callable[[], int] = time.perf_counter_ns) -> None:
        self.root = root
        self.clock = clock
        self.tick_s = 1.0 / os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 0.01
        stat = root.try_read("/proc/stat") or ""
        self.cpus = len(re.findall(r"^cpu\d+\s", stat, re.MULTILINE)) or os.cpu_count() or 1
        self.psi = [k for k in PSI_KINDS if root.try_read(f"/proc/pressure/{k}") is not None]
        self.cpufreq = self._cpufreq_paths()
        self.gpu = self._gpu_devfreq()
        self.zones = self._zones()
        self.throttle_files = [
            *root.glob("/sys/devices/system/cpu/cpu[0-9]*/thermal_throttle/*_throttle_count"),
            *root.glob("/sys/class/hwmon/hwmon*/oc*_event_cnt"),  # Jetson Orin over-current throttling
        ]
        self.cgroup = self._cgroup_memory()
        self.mem_limit_bytes, self.mem_limit_source = self._limit()

    # -- discovery -----------------------------------------------------------------------------------------------
    def _cpufreq_paths(self) -> list[tuple[str, int]]:
        """(scaling_cur_freq path, cpuinfo_max_freq in kHz) per cpufreq policy (else per CPU)."""
        dirs = self.root.glob("/sys/devices/system/cpu/cpufreq/policy*") or self.root.glob(
            "/sys/devices/system/cpu/cpu[0-9]*/cpufreq"
        )
        out = []
        for d in dirs:
            top = self.root.try_read(f"{d}/cpuinfo_max_freq")
            if top and top.isdigit() and int(top) > 0 and self.root.exists(f"{d}/scaling_cur_freq"):
                out.append((f"{d}/scaling_cur_freq", int(top)))
        return out

    def _gpu_devfreq(self) -> tuple[str, int] | None:
        """A Jetson's integrated GPU: (cur_freq path, its highest available frequency in Hz)."""
        for dev in self.root.glob("/sys/class/devfreq/*"):
            name = ((self.root.try_read(f"{dev}/device/of_node/name") or "") + " " + dev.rsplit("/", 1)[1]).lower()
            if not any(h in name for h in _GPU_HINTS):
                continue
            available = [
                int(v) for v in (self.root.try_read(f"{dev}/available_frequencies") or "").split() if v.isdigit()
            ]
            top = max(available) if available else None
            if top is None:
                raw = self.root.try_read(f"{dev}/max_freq")
                top = int(raw) if raw and raw.isdigit() else None
            if top:
                return f"{dev}/cur_freq", top
        return None

    def _zones(self) -> list[tuple[str, str, float | None]]:
        """(temp path, zone type, lowest passive trip °C — else the lowest hot/critical trip) per thermal zone."""
        out = []
        for zone in self.root.glob("/sys/class/thermal/thermal_zone*"):
            kind = self.root.try_read(f"{zone}/type") or zone.rsplit("/", 1)[1]
            trips: dict[str, list[float]] = {}
            for trip in self.root.glob(f"{zone}/trip_point_*_type"):
                value = self.root.try_read(trip.replace("_type", "_temp"))
                if value and value.lstrip("-").isdigit():
                    trips.setdefault(self.root.try_read(trip) or "", []).append(int(value) / 1000)
            lowest = trips.get("passive") or trips.get("hot") or trips.get("critical")
            out.append((f"{zone}/temp", kind, min(lowest) if lowest else None))
        return out

    def _cgroup_memory(self) -> tuple[str, str] | None:
        """("v1"|"v2", the cgroup's directory) of this process's memory cgroup, when one is mounted."""
        text = self.root.try_read("/proc/self/cgroup") or ""
        for line in text.splitlines():
            parts = line.split(":", 2)
            if len(parts) != 3:
                continue
            if "memory" in parts[1].split(","):
                d = "/sys/fs/cgroup/memory" + parts[2].rstrip("/")
                if self.root.exists(f"{d}/memory.limit_in_bytes"):
                    return "v1", d
            elif parts[0] == "0" and parts[1] == "":
                d = "/sys/fs/cgroup" + parts[2].rstrip("/")
                if self.root.exists(f"{d}/memory.current") or self.root.exists(f"{d}/memory.max"):
                    return "v2", d
        return None

    def _meminfo(self) -> dict[str, int]:
        out = {}
        for line in (self.root.try_read("/proc/meminfo") or "").splitlines():
            name, _, rest = line.partition(":")
            value = rest.split()
            if value and value[0].isdigit():
                out[name] = int(value[0]) * 1024
        return out

    def _limit(self) -> tuple[int | None, str]:
        """The memory limit that applies to this process (bytes) and where it comes from."""
        total = self._meminfo().get("MemTotal")
        limit = self._cgroup_limit()
        if limit is not None and (total is None or limit < total):
            assert self.cgroup is not None
            return limit, f"cgroup {self.cgroup[0]} {self.cgroup[1]}"
        return total, "MemTotal"

    def _cgroup_limit(self) -> int | None:
        if self.cgroup is None:
            return None
        version, d = self.cgroup
        if version == "v1":
            stat = self._kv(f"{d}/memory.stat")
            limit = stat.get("hierarchical_memory_limit")  # the tightest limit from this cgroup up
            if limit is None:
                own = self.root.try_read(f"{d}/memory.limit_in_bytes")
                limit = int(own) if own and own.isdigit() else None
            return limit
        limits = []
        while True:  # v2: the tightest memory.max from this cgroup up to the root
            text = self.root.try_read(f"{d}/memory.max")
            if text and text.isdigit():
                limits.append(int(text))
            if d.count("/") <= 3:
                break
            d = d.rsplit("/", 1)[0]
        return min(limits) if limits else None

    def _kv(self, rel: str) -> dict[str, int]:
        out = {}
        for line in (self.root.try_read(rel) or "").splitlines():
            parts = line.split()
            if len(parts) == 2 and parts[1].isdigit():
                out[parts[0]] = int(parts[1])
        return out

    # -- one reading ---------------------------------------------------------------------------------------------
    def read(self) -> Snapshot:
        snap = Snapshot(t_ns=self.clock(), self_cpu_s=_self_cpu_s())
        root = self.root
        first = (root.try_read("/proc/stat") or "").split("\n", 1)[0].split()
        if len(first) >= 9 and first[0] == "cpu":
            v = [int(x) for x in first[1:9] if x.isdigit()]
            if len(v) == 8:  # user nice system idle iowait irq softirq steal
                snap.cpu_busy_s = (v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) * self.tick_s
        load = (root.try_read("/proc/loadavg") or "").split()
        if load:
            with contextlib.suppress(ValueError):
                value = float(load[0])
                if math.isfinite(value) and value >= 0:  # "nan", "inf" or "-1" in a damaged or odd /proc: unknown
                    snap.load1 = value
        for kind in self.psi:
            match = re.search(r"^some .*total=(\d+)", root.try_read(f"/proc/pressure/{kind}") or "", re.MULTILINE)
            if match:
                snap.psi_us[kind] = int(match.group(1))
        vmstat = root.try_read("/proc/vmstat")
        if vmstat:
            found = re.findall(r"^pswp(?:in|out) (\d+)", vmstat, re.MULTILINE)
            if found:
                snap.swap_pages = sum(int(x) for x in found)
        snap.mem_available_pct = self._available_pct()
        ratios = []
        for path, top in self.cpufreq:
            cur = root.try_read(path)
            if cur and cur.isdigit():
                ratios.append(int(cur) / top)
        if ratios:  # idle cores clock down on their own: the fastest core says what the device allows
            snap.cpu_freq_ratio = max(ratios)
        if self.gpu is not None:
            cur = root.try_read(self.gpu[0])
            if cur and cur.isdigit():
                snap.gpu_freq_ratio = int(cur) / self.gpu[1]
        temps = []
        hot = []
        for path, kind, trip in self.zones:
            raw = root.try_read(path)
            if raw is None or not raw.lstrip("-").isdigit():
                continue
            celsius = int(raw) / 1000
            temps.append(celsius)
            if trip is not None and celsius >= trip:
                hot.append(f"{kind} at {celsius:.0f} °C")
        snap.temp_max_c = max(temps) if temps else None
        snap.hot_zones = tuple(hot)
        counts = [root.try_read(p) for p in self.throttle_files]
        numbers = [int(c) for c in counts if c and c.isdigit()]
        snap.throttle_events = sum(numbers) if numbers else None
        return snap

    def _available_pct(self) -> float | None:
        info = self._meminfo()
        available = info.get("MemAvailable")
        if self.mem_limit_source != "MemTotal" and self.cgroup is not None and self.mem_limit_bytes:
            version, d = self.cgroup
            if version == "v1":
                usage_raw = self.root.try_read(f"{d}/memory.usage_in_bytes")
                inactive = self._kv(f"{d}/memory.stat").get("total_inactive_file", 0)
            else:
                usage_raw = self.root.try_read(f"{d}/memory.current")
                inactive = self._kv(f"{d}/memory.stat").get("inactive_file", 0)
            if usage_raw and usage_raw.isdigit():
                free = self.mem_limit_bytes - int(usage_raw) + inactive
                if available is not None:
                    free = min(free, available)
                return max(0.0, min(100.0, 100.0 * free / self.mem_limit_bytes))
        total = info.get("MemTotal")
        if available is None or not total:
            return None
        return max(0.0, min(100.0, 100.0 * available / total))


def busy_cores(root: Root, seconds: float = 0.5) -> float | None:
    """CPU cores other processes keep busy, measured over ``seconds`` (None without ``/proc/stat``)."""
    reader = DeviceReader(root)
    a = reader.read()
    time.sleep(seconds)
    b = reader.read()
    return _other_cores(a, b)


def _other_cores(a: Snapshot, b: Snapshot) -> float | None:
    if a.cpu_busy_s is None or b.cpu_busy_s is None or b.t_ns <= a.t_ns:
        return None
    span = (b.t_ns - a.t_ns) / 1e9
    other = (b.cpu_busy_s - a.cpu_busy_s) - (b.self_cpu_s - a.self_cpu_s)
    return max(0.0, other / span)


@dataclass
class InterferenceMonitor:
    """Snapshots in a daemon thread at ``rate_hz``, plus one at each request's start and end.

    ``needed_cores``: the CPU cores the run itself uses (its decode threads; 1 for a cloud client): other
    processes' CPU use counts against the run only beyond the cores it leaves free. ``uses_gpu``: the run offloads
    layers to a GPU, so a GPU clock below its maximum counts.
    """

    root: Root
    thresholds: Thresholds = field(default_factory=Thresholds)
    rate_hz: float = 2.0
    needed_cores: float = 1.0
    uses_gpu: bool = False
    clock: Callable[[], int] = time.perf_counter_ns
    reader: DeviceReader | None = None
    snapshots: deque[Snapshot] = field(default_factory=lambda: deque(maxlen=MAX_SNAPSHOTS))
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __post_init__(self) -> None:
        if self.reader is None:
            self.reader = DeviceReader(self.root, self.clock)

    @property
    def cpus(self) -> int:
        assert self.reader is not None
        return self.reader.cpus

    def snapshot(self) -> Snapshot:
        assert self.reader is not None
        with self._lock:  # read and appended under one lock: the stream stays in time order
            snap = self.reader.read()
            self.snapshots.append(snap)
        return snap

    def _run(self) -> None:
        period = 1.0 / self.rate_hz
        while not self._stop.wait(period):
            self.snapshot()

    def start(self) -> InterferenceMonitor:
        if self._thread is None:
            self._stop.clear()
            self.snapshot()
            self._thread = threading.Thread(target=self._run, name="interference-sampler", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=5)
            self._thread = None

    def begin(self) -> Snapshot:
        """The snapshot a request starts from (taken just before it)."""
        return self.snapshot()

    def end(self, begun: Snapshot) -> dict[str, Any]:
        """``ext.interference`` of the request that started at ``begun`` and has just finished."""
        after = self.snapshot()
        return self._figures(begun.t_ns, after.t_ns)

    def window(self, start_ns: int, end_ns: int) -> dict[str, Any]:
        """``ext.interference`` of a request that ran from ``start_ns`` to ``end_ns`` (now or earlier), from the
        stream: for requests that overlap (a load generator), where begin/end cannot bracket each one. A fresh
        snapshot is taken when the newest is more than :data:`FRESH_NS` older than ``end_ns`` (at most 20 reads a
        second however many requests finish)."""
        if not self.snapshots or self.snapshots[-1].t_ns < end_ns - FRESH_NS:
            self.snapshot()
        return self._figures(start_ns, end_ns)

    def _figures(self, start_ns: int, end_ns: int) -> dict[str, Any]:
        with self._lock:
            snaps = list(self.snapshots)
        times = [s.t_ns for s in snaps]
        # the snapshots that bracket the window: the last at or before its start, the first at or after its end
        lo = max(0, bisect.bisect_right(times, start_ns) - 1)
        hi = min(len(snaps) - 1, bisect.bisect_left(times, end_ns))
        inside = snaps[lo : hi + 1]
        counters_from = bisect.bisect_right(times, min(start_ns, end_ns - int(MIN_SPAN_S * 1e9))) - 1
        return figures(inside, snaps[max(0, min(counters_from, lo))], snaps[hi], self.cpus)

    def verdict(self, figures_: dict[str, Any]) -> dict[str, Any]:
        return verdict(
            figures_, self.thresholds, cpus=self.cpus, needed_cores=self.needed_cores, uses_gpu=self.uses_gpu
        )

    def measure(self, begun: Snapshot) -> dict[str, Any]:
        """``end`` and ``verdict`` together: what a request's record carries."""
        return self.verdict(self.end(begun))


def figures(inside: list[Snapshot], a: Snapshot, b: Snapshot, cpus: int) -> dict[str, Any]:
    """The numbers of ``ext.interference`` for a window: counters differenced between ``a`` and ``b``, levels the
    worst seen over ``inside`` (the snapshots from the window's start to its end)."""
    out: dict[str, Any] = {}
    other = _other_cores(a, b)
    if other is not None:
        out["other_cpu_cores"] = round(min(other, 1024.0), 3)
    loads = [s.load1 for s in inside if s.load1 is not None]
    if loads:
        out["load1"] = round(min(max(loads), 100000.0), 2)
    span_us = (b.t_ns - a.t_ns) / 1e3
    if span_us > 0:
        for kind in PSI_KINDS:
            if kind in a.psi_us and kind in b.psi_us:
                pct = 100.0 * (b.psi_us[kind] - a.psi_us[kind]) / span_us
                out[f"psi_{kind}_some_pct"] = round(max(0.0, min(100.0, pct)), 2)
        if a.swap_pages is not None and b.swap_pages is not None:
            rate = (b.swap_pages - a.swap_pages) / (span_us / 1e6)
            out["swap_pages_per_s"] = round(max(0.0, min(1e9, rate)), 2)
    for key in ("mem_available_pct", "cpu_freq_ratio", "gpu_freq_ratio"):
        values = [getattr(s, key) for s in inside if getattr(s, key) is not None]
        if values:
            bound = 100.0 if key == "mem_available_pct" else 2.0
            out[key] = round(max(0.0, min(bound, min(values))), 3)
    temps = [s.temp_max_c for s in inside if s.temp_max_c is not None]
    if temps:
        out["temp_max_c"] = round(max(-100.0, min(250.0, max(temps))), 1)
    hot = sorted({z for s in inside for z in s.hot_zones})
    events = (
        b.throttle_events - a.throttle_events if a.throttle_events is not None and b.throttle_events is not None else 0
    )
    if hot or events > 0:
        out["throttled"] = (hot + ([f"{events} throttle events"] if events > 0 else []))[:4]
    out["cpus"] = cpus
    # a figure that is not a finite number is unknown, never written: the aggregator refuses NaN and infinities
    return {k: v for k, v in out.items() if not (isinstance(v, float) and not math.isfinite(v))}


def verdict(
    numbers: dict[str, Any], thresholds: Thresholds, *, cpus: int, needed_cores: float, uses_gpu: bool
) -> dict[str, Any]:
    """``ext.interference``: ``contended``, ``reasons`` and a ``summary`` beside the numbers."""
    t = thresholds
    reasons: list[str] = []
    spare = max(0.0, cpus - needed_cores)
    other = numbers.get("other_cpu_cores")
    if other is not None and other - spare >= t.other_cpu_cores:
        reasons.append("cpu")
    if numbers.get("psi_cpu_some_pct", 0.0) >= t.cpu_pressure_pct:
        reasons.append("cpu_pressure")
    available = numbers.get("mem_available_pct")
    if numbers.get("psi_memory_some_pct", 0.0) >= t.memory_pressure_pct or (
        available is not None and available < t.mem_available_pct
    ):
        reasons.append("memory")
    if numbers.get("swap_pages_per_s", 0.0) >= t.swap_pages_per_s:
        reasons.append("swap")
    if numbers.get("psi_io_some_pct", 0.0) >= t.io_pressure_pct:
        reasons.append("io")
    if numbers.get("throttled"):
        reasons.append("thermal")
    cpu_freq, gpu_freq = numbers.get("cpu_freq_ratio"), numbers.get("gpu_freq_ratio")
    if (cpu_freq is not None and cpu_freq < t.freq_ratio) or (
        uses_gpu and gpu_freq is not None and gpu_freq < t.freq_ratio
    ):
        reasons.append("frequency")
    out = {"contended": bool(reasons), "reasons": reasons, **numbers}
    if reasons:
        out["summary"] = summary_text(reasons, numbers, cpus=cpus, uses_gpu=uses_gpu, thresholds=t)
    return out


def _phrase(reason: str, n: dict[str, Any], cpus: int, uses_gpu: bool, t: Thresholds) -> str:
    if reason == "cpu":
        return f"other processes used {n.get('other_cpu_cores', 0):.1f} of {cpus} cores"
    if reason == "cpu_pressure":
        return f"tasks waited for a CPU {n.get('psi_cpu_some_pct', 0):.0f} % of the time"
    if reason == "memory":
        stalled = n.get("psi_memory_some_pct", 0.0)
        if stalled >= t.memory_pressure_pct:
            return f"memory stalls {stalled:.0f} % of the time"
        return f"{n.get('mem_available_pct', 0):.0f} % of memory available"
    if reason == "swap":
        return f"swapping {n.get('swap_pages_per_s', 0):.0f} pages/s"
    if reason == "io":
        return f"I/O stalls {n.get('psi_io_some_pct', 0):.0f} % of the time"
    if reason == "thermal":
        return "thermal throttling (" + ", ".join(n.get("throttled") or ["throttle counters rose"]) + ")"
    cpu, gpu = n.get("cpu_freq_ratio"), n.get("gpu_freq_ratio")
    parts = []
    if cpu is not None and cpu < t.freq_ratio:
        parts.append(f"CPU clock at {cpu:.0%} of its max")
    if uses_gpu and gpu is not None and gpu < t.freq_ratio:
        parts.append(f"GPU clock at {gpu:.0%} of its max")
    return ", ".join(parts) or "clocks below their max"


def summary_text(
    reasons: list[str], numbers: dict[str, Any], *, cpus: int, uses_gpu: bool, thresholds: Thresholds
) -> str:
    text = ", ".join(_phrase(r, numbers, cpus, uses_gpu, thresholds) for r in reasons)
    return text if len(text) <= SUMMARY_CHARS else text[: SUMMARY_CHARS - 1] + "…"


NUMBER_KEYS = (
    "other_cpu_cores",
    "load1",
    "psi_cpu_some_pct",
    "psi_memory_some_pct",
    "psi_io_some_pct",
    "mem_available_pct",
    "swap_pages_per_s",
    "cpu_freq_ratio",
    "gpu_freq_ratio",
    "temp_max_c",
)
_LOW_IS_WORSE = ("mem_available_pct", "cpu_freq_ratio", "gpu_freq_ratio")


_CPU_FIGURES = ("other_cpu_cores", "psi_cpu_some_pct")  # without either, CPU contention is unknown


def results_section(
    records: list[dict[str, Any]], thresholds: Thresholds, *, cpus: int, uses_gpu: bool
) -> dict[str, Any]:
    """``results.interference`` over the measured requests' ``ext.interference``."""
    measured = [r for r in records if isinstance(r, dict)]
    contended = [r for r in measured if r.get("contended")]
    counts: dict[str, int] = {}
    for r in contended:
        for reason in r.get("reasons", []):
            counts[reason] = counts.get(reason, 0) + 1
    peaks: dict[str, float] = {}
    for key in NUMBER_KEYS:
        values = [r[key] for r in measured if isinstance(r.get(key), int | float)]
        if values:
            peaks[key] = min(values) if key in _LOW_IS_WORSE else max(values)
    if contended:
        ordered = sorted(counts, key=lambda k: (-counts[k], REASONS.index(k)))
        typical: dict[str, Any] = {}
        for key in NUMBER_KEYS:
            values = [r[key] for r in contended if isinstance(r.get(key), int | float)]
            if values:
                typical[key] = _median(values)
        throttled = [z for r in contended for z in r.get("throttled", [])]
        if throttled:
            typical["throttled"] = list(dict.fromkeys(throttled))[:3]
        text = summary_text(ordered, typical, cpus=cpus, uses_gpu=uses_gpu, thresholds=thresholds)
        summary = f"contended: {text} ({len(contended)} of {len(measured)} requests)"
    elif not any(key in peaks for key in _CPU_FIGURES):
        # neither other processes' CPU nor CPU pressure could be read: "none seen" would claim a quiet device
        summary = "interference: not measured (no /proc/stat or /proc/pressure/cpu to read)"
    else:
        summary = "interference: none seen"
    return {
        "contended": bool(contended),
        "contended_requests": len(contended),
        "requests": len(measured),
        "reasons": {k: counts[k] for k in REASONS if k in counts},
        "summary": summary,
        "thresholds": thresholds.as_dict(),
        "peaks": peaks,
    }


def monitor_from_config(
    values: Mapping[str, Mapping[str, Any]], *, needed_cores: float, uses_gpu: bool
) -> InterferenceMonitor | None:
    """The monitor the config asks for (``[interference]``, read from ``probes.sysfs_root``), or None when off."""
    section = values["interference"]
    if not section["enabled"]:
        return None
    return InterferenceMonitor(
        Root(values["probes"]["sysfs_root"]),
        Thresholds.from_config(section),
        rate_hz=float(section["sample_rate_hz"]),
        needed_cores=float(needed_cores),
        uses_gpu=uses_gpu,
    )


@dataclass(frozen=True)
class ThreadChoice:
    """How the decode thread count was chosen (``configuration.n_threads_source``, ``busy_cores``)."""

    n_threads: int
    source: str  # "flag", "config", "drop-in" or "default"
    busy_cores: float | None = None
    line: str = ""


def thread_source(source: str) -> str:
    """A config source (``lens_core.config``: a flag name, a file, ``drop-in …``, an environment variable or
    ``default``) as ``n_threads_source``."""
    if source == "default":
        return "default"
    if source.startswith("--"):
        return "flag"
    if source.startswith("drop-in"):
        return "drop-in"
    return "config"


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity: taskset, a cpuset cgroup), else every online CPU."""
    try:
        return len(os.sched_getaffinity(0)) or 1
    except (AttributeError, OSError):  # not Linux
        return os.cpu_count() or 1


def choose_threads(
    n_threads: int,
    source: str,
    root: Root,
    *,
    physical_cores: int,
    seconds: float = 0.5,
    usable: int | None = None,
) -> ThreadChoice:
    """The decode threads to load with. A thread count someone chose (flag, file, environment, drop-in) is kept and
    its source named; the default (one per physical core, at most the CPUs this process may use) leaves out the
    cores other work keeps busy, measured over ``seconds`` now: ``max(1, cores - round(busy))``. More threads than
    the process may use is said: such a run contends with itself."""
    usable = usable_cpus() if usable is None else usable
    kind = thread_source(source)
    if kind != "default":
        line = f"threads {n_threads} (model.n_threads from {source})"
        if n_threads > usable:
            line += (
                f"; more than the {usable} CPU{'s' if usable != 1 else ''} this process may use (affinity or "
                "cpuset): the run's own threads wait for each other"
            )
        return ThreadChoice(n_threads, kind, None, line)
    cores = min(physical_cores, usable)
    of = f"{physical_cores} physical cores" + (f", {usable} usable here" if usable < physical_cores else "")
    busy = busy_cores(root, seconds)
    if busy is None:
        chosen = min(n_threads, cores)
        return ThreadChoice(
            chosen,
            kind,
            None,
            f"threads {chosen} of {of}: other work unknown (no /proc/stat); --n-threads N to choose",
        )
    taken = round(busy)
    if taken < 1:
        chosen = min(n_threads, cores)
        return ThreadChoice(
            chosen, kind, round(busy, 2), f"threads {chosen} of {of} ({busy:.1f} cores busy with other work)"
        )
    chosen = max(1, cores - taken)
    return ThreadChoice(
        chosen,
        kind,
        round(busy, 2),
        f"threads {chosen} of {of}: {busy:.1f} cores busy with other work; --n-threads N to choose",
    )
