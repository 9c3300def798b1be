"""A device's health in one word, with the reasons an operator reads, and the device facts it reports.

The state is the worst of what the aggregator knows about the device:

==========  ==================================================================================================
critical    silent (no batch for ``fleet.silent_after``); ``fleet.error_rate_critical`` or more of its latest
            requests failed; its outbox dropped records within ``fleet.health_window`` (data is being lost)
warning     late (no batch for two of its own expected gaps plus a minute, or ``fleet.late_after``); an error
            rate of ``fleet.error_rate_warning`` or more; its backlog grew over the window's batches; records
            were quarantined within the window; a thermal zone is past its passive trip point (throttling); a
            regression is flagged on one of its series; a ``[[triggers]]`` condition holds on one of its series
            (``critical`` when the trigger says ``severity = "critical"``); new label sets of its measurements
            were folded into the ``"other"`` series on /metrics within the window (a per-device or the global
            bound reached)
ok          none of these
==========  ==================================================================================================

Device facts (class, model, power mode, clocks, temperatures, throttling) come from the device's latest
``device_facts`` record, which the agent sends when they change. Like every stored body they are untrusted: only
known keys of the expected types and bounded sizes are shown, anything else is left out.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from .rows import decode_wire
from .store import Query, Store, SyncRow

STATES = ("ok", "warning", "critical")
FACTS_KIND = "device_facts"

_MAX_FACT_CHARS = 256
_MAX_ZONES = 64
_MAX_THROTTLING = 16
_MAX_TAGS = 16  # ext.device.tags
_MAX_TAG_CHARS = 64


@dataclass(frozen=True)
class Health:
    """When a device counts as late and as silent (``[fleet] late_after``, ``silent_after``), and the rest of the
    thresholds of its health state."""

    late_after_s: float = 3600.0
    silent_after_s: float = 24 * 3600.0
    error_rate_warning: float = 0.1
    error_rate_critical: float = 0.25
    window_s: float = 24 * 3600.0  # backlog growth, drops and quarantine are judged over this long
    # the device's label sets folded on /metrics (``aggregator.metrics.SeriesBudget.device_status``), if known
    metric_folds: Callable[[str], dict[str, Any] | None] | None = field(default=None, compare=False)

    def late_after(self, expected_gap_s: float | None) -> float:
        """When a device is late: two of the gaps it said to expect between its batches, plus a minute (a batch
        missed, and slack for retries), when it said; otherwise ``late_after``."""
        return 2 * expected_gap_s + 60.0 if expected_gap_s else self.late_after_s

    def sync(self, age_s: float, expected_gap_s: float | None = None) -> str:
        late = self.late_after(expected_gap_s)
        return "ok" if age_s < late else "late" if age_s < max(late, self.silent_after_s) else "silent"

    def assess(
        self,
        row: dict[str, Any],
        syncs: Sequence[SyncRow],
        facts: dict[str, Any] | None,
        regressions: Sequence[str] = (),
        triggers: Sequence[dict[str, Any]] = (),
    ) -> tuple[str, list[str]]:
        """(state, reasons) for a fleet row (``sync_health``, ``error_rate``, ``requests``, ``errors``,
        ``last_seen_age_s``, ``expected_gap_s``), its batches within the window (oldest first), its facts, its
        flagged regressions and its series whose trigger condition holds (``TriggerWatch.by_device`` entries:
        ``trigger``, ``summary``, ``severity``). Reasons come worst first."""
        found: list[tuple[str, str]] = []
        sync, age = row["sync_health"], row["last_seen_age_s"]
        if sync == "silent":
            found.append(("critical", f"silent: no batch for {_span(age)}"))
        elif sync == "late":
            expected = row.get("expected_gap_s")
            said = f"it syncs every {_span(expected)}" if expected else f"late after {_span(self.late_after_s)}"
            found.append(("warning", f"late: no batch for {_span(age)} ({said})"))
        rate = row.get("error_rate")
        if rate is not None and rate >= self.error_rate_warning:
            level = "critical" if rate >= self.error_rate_critical else "warning"
            found.append((level, f"{rate:.0%} of its latest {row['requests']} requests failed"))
        if len(syncs) >= 2:
            first, last = syncs[0], syncs[-1]
            span = _span((last.received_us - first.received_us) / 1e6)
            dropped = _grown(first.dropped_total, last.dropped_total)
            if dropped:
                found.append(("critical", f"its outbox dropped {dropped} records in {span} (full: data lost)"))
            backlog = _backlog_growth(syncs)
            if backlog is not None:
                found.append(
                    ("warning", f"backlog growing: {backlog[0]} → {backlog[1]} records over {len(syncs)} batches")
                )
            quarantined = _grown(first.quarantined_total, last.quarantined_total)
            if quarantined:
                found.append(
                    ("warning", f"{quarantined} records quarantined in {span} (on the device: lens-agent outbox list)")
                )
        if facts and facts.get("thermal_throttling"):
            found.append(("warning", "thermally throttled: " + "; ".join(facts["thermal_throttling"])))
        for line in regressions:
            found.append(("warning", "regression: " + line.split(" (", 1)[0]))
        for held in triggers:
            level = "critical" if held.get("severity") == "critical" else "warning"
            found.append((level, f"trigger {held.get('summary') or held.get('trigger')}"))
        folds = self.folds(row.get("device_id"))
        if folds is not None:
            found.append(("warning", folds["summary"]))
        found.sort(key=lambda item: -STATES.index(item[0]))
        state = found[0][0] if found else "ok"
        return state, [reason for _, reason in found]

    def folds(self, device: Any, now_unix: float | None = None) -> dict[str, Any] | None:
        """What /metrics folded of the device's label sets, when it last did so within the window (else None)."""
        if self.metric_folds is None or type(device) is not str:
            return None
        status = self.metric_folds(device)
        now = time.time() if now_unix is None else now_unix
        if status is None or now - status["last_folded_unix"] > self.window_s:
            return None
        return status


def _grown(before: int | None, after: int | None) -> int:
    """How much a device's running total grew (0 when either is unknown, or it went down: a reinstalled outbox)."""
    if before is None or after is None or after <= before:
        return 0
    return after - before


def _backlog_growth(syncs: Sequence[SyncRow]) -> tuple[int, int] | None:
    """(from, to) when the backlog the device reported grew across its batches: at least three batches, the
    latest backlog above both the first and the lowest since it, by at least a batch's worth of records — a
    device whose uploads keep pace with what it measures holds its backlog near zero."""
    backlogs = [s.backlog for s in syncs if s.backlog is not None]
    if len(backlogs) < 3:
        return None
    first, last, lowest = backlogs[0], backlogs[-1], min(backlogs[1:])
    batch = max((s.records for s in syncs), default=0)
    if last > first and last > lowest and last - min(first, lowest) >= max(batch, 1):
        return first, last
    return None


def _span(seconds: float | None) -> str:
    if seconds is None:
        return "–"
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * 86400:
        return f"{seconds / 3600:.1f} h".replace(".0 h", " h")
    return f"{seconds / 86400:.1f} days".replace(".0 days", " days")


def _text(value: Any) -> str | None:
    return value[:_MAX_FACT_CHARS] if type(value) is str else None


def _number(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def _numbers(value: Any) -> dict[str, float]:
    if type(value) is not dict:
        return {}
    out = {}
    for key, number in list(value.items())[:_MAX_ZONES]:
        n = _number(number)
        if type(key) is str and n is not None:
            out[key[:_MAX_FACT_CHARS]] = n
    return out


def facts_from_record(record: dict[str, Any] | None) -> dict[str, Any] | None:
    """The facts a ``device_facts`` record (its wire map) carries in ``ext.device``, each checked: strings cut to
    256 characters, numbers finite, at most 64 zones or clocks, at most 16 throttling lines. None when the record
    carries none."""
    ext = record.get("ext") if record else None
    device = ext.get("device") if type(ext) is dict else None
    if type(device) is not dict or record is None:
        return None
    temperatures = _numbers(device.get("temperatures_c"))
    clocks = _numbers(device.get("cpu_freq_mhz"))
    throttling = device.get("thermal_throttling")
    tags = device.get("tags")
    power_mode_id = device.get("power_mode_id")
    started = record.get("started_us")
    return {
        "reported_us": started if type(started) is int else None,
        "device_class": _text(device.get("device_class")),
        "model": _text(device.get("model")),
        "accelerator": _text(device.get("accelerator")),
        "ram_gb": _number(device.get("ram_gb")),
        "power_mode": _text(device.get("power_mode")),
        "power_mode_id": power_mode_id if type(power_mode_id) is int else None,
        "gpu_freq_mhz": _number(device.get("gpu_freq_mhz")),
        "cpu_freq_mhz_max": max(clocks.values()) if clocks else _number(device.get("cpu_freq_mhz_max")),
        "temperatures_c": temperatures,
        "temperature_max_c": max(temperatures.values()) if temperatures else _number(device.get("temperature_max_c")),
        "thermal_throttling": [t[:_MAX_FACT_CHARS] for t in throttling[:_MAX_THROTTLING] if type(t) is str]
        if type(throttling) is list
        else [],
        "clock_synchronized": device.get("clock_synchronized")
        if type(device.get("clock_synchronized")) is bool
        else None,
        # the agent's [agent] tags (ingest checked them: at most 16 of [A-Za-z0-9._-]{1,64}); bounded here again
        "tags": [t[:_MAX_TAG_CHARS] for t in tags[:_MAX_TAGS] if type(t) is str] if type(tags) is list else [],
    }


_FACT_COLUMNS = ("seq", "codec", "body")


def latest_facts(store: Store, device_id: str) -> dict[str, Any] | None:
    """The device's facts taken last (by the device's clock: an old facts record delivered late is not "the
    latest"), or None."""
    latest = store.latest_columns(Query(device=device_id, kind=FACTS_KIND), _FACT_COLUMNS, 1, by_event=True)
    return facts_from_record(decode_wire(dict(zip(_FACT_COLUMNS, latest[0], strict=True)))) if latest else None
