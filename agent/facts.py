"""The device's facts as the aggregator's fleet page shows them, and when a new ``device_facts`` record is due.

:func:`device_facts` is a compact, JSON-able snapshot built from the sensors in :mod:`agent.probes.device` (class,
model, accelerator, RAM, nvpmodel power mode, clocks, temperatures, thermal throttling, clock sync);
:func:`facts_changed` is the pure policy that says whether it differs enough from the last one sent to send it
again; :func:`facts_record` is the record that carries it. ``lens-agent run`` reads the facts at start and before
every workload run (docs/power.md, "Device facts on the fleet page").
"""

from __future__ import annotations

import functools
import uuid
from typing import Any

from lens_core.record_schema import MAX_MESSAGE_CHARS

from .measurement import Measurement
from .probes.device import (
    accelerator_name,
    classify,
    clock_synchronized,
    cpu_freqs_mhz,
    jetson_info,
    nvml_gpus,
    product_model,
    ram_gb,
    temperatures,
)
from .probes.sysfs import Root

# A change of any of these is a new record at once.
IDENTITY_KEYS = (
    "device_class",
    "model",
    "accelerator",
    "power_mode",
    "power_mode_id",
    "clock_synchronized",
    "tags",
)
TEMPERATURE_STEP_C = 2.0  # a zone's temperature moved by at least this much
CLOCK_STEP_RATIO = 0.10  # the fastest CPU's or the GPU's clock moved by at least this fraction
REFRESH_AFTER_S = 3600.0  # a record at least this often, so the aggregator's view never goes stale


@functools.cache
def _nvml_gpus_once() -> tuple[dict[str, Any], ...]:
    """NVML's GPUs of the real system, read once per process: NVML's initialisation costs more than sysfs reads,
    and a dGPU does not change while the agent runs."""
    gpus, _ = nvml_gpus(Root("/"))
    return tuple(gpus)


def device_facts(root: Root, tags: list[str] | None = None) -> dict[str, Any]:
    """The device's facts now: the sensors of :mod:`agent.probes.device` read under ``root``, and the operator's
    ``[agent] tags`` when there are any. A few small sysfs files; NVML only on the real system, once per process.
    Raises OSError only where a sensor does."""
    jetson = jetson_info(root)
    gpus = list(_nvml_gpus_once()) if root.is_real and jetson is None else []
    power_mode = (jetson or {}).get("nvpmodel") or {}
    gpu_hz = (jetson or {}).get("gpu_freq_hz")
    cpu_mhz = cpu_freqs_mhz(root)
    temps, throttled = temperatures(root)
    temps_c = {zone: round(celsius, 1) for zone, celsius in temps.items()}
    facts = {
        "device_class": classify(root)[0],
        "model": product_model(root),
        "accelerator": accelerator_name(jetson, gpus),
        "ram_gb": ram_gb(root),
        "power_mode": power_mode.get("name"),
        "power_mode_id": power_mode.get("id"),
        "gpu_freq_mhz": gpu_hz / 1e6 if gpu_hz is not None else None,
        "cpu_freq_mhz": cpu_mhz,
        "cpu_freq_mhz_max": max(cpu_mhz.values()) if cpu_mhz else None,
        "temperatures_c": temps_c,
        "temperature_max_c": max(temps_c.values()) if temps_c else None,
        "thermal_throttling": throttled,
        "clock_synchronized": clock_synchronized(root)[0],
    }
    if tags:
        facts["tags"] = list(tags)
    return facts


def throttled_zones(facts: dict[str, Any]) -> list[str]:
    """The zones of ``facts["temperatures_c"]`` that ``facts["thermal_throttling"]`` names (each description starts
    with its zone's type, as :func:`agent.probes.device.temperatures` writes it)."""
    described = facts.get("thermal_throttling") or []
    return sorted(
        zone for zone in facts.get("temperatures_c") or {} if any(d.startswith(f"{zone} at ") for d in described)
    )


def facts_changed(previous: dict[str, Any] | None, current: dict[str, Any], *, age_s: float) -> str | None:
    """Why a new facts record is due (every reason that holds, joined by "; "), or None when ``previous`` (sent
    ``age_s`` seconds ago) still describes the device."""
    if previous is None:
        return "first facts since the agent started"
    reasons = [
        f"{key} changed: {previous.get(key)!r} → {current.get(key)!r}"
        for key in IDENTITY_KEYS
        if previous.get(key) != current.get(key)
    ]
    reasons += _throttling_change(previous, current)
    reasons += _temperature_changes(previous.get("temperatures_c") or {}, current.get("temperatures_c") or {})
    for key, what in (("cpu_freq_mhz_max", "fastest CPU clock"), ("gpu_freq_mhz", "GPU clock")):
        before, now = previous.get(key), current.get(key)
        if _clock_moved(before, now):
            reasons.append(f"{what} {_mhz(before)} → {_mhz(now)}")
    if age_s >= REFRESH_AFTER_S:
        reasons.append(f"refresh: the last facts are {age_s / 60:.0f} min old")
    return "; ".join(reasons) or None


def _throttling_change(previous: dict[str, Any], current: dict[str, Any]) -> list[str]:
    before, now = throttled_zones(previous), throttled_zones(current)
    was, is_ = bool(previous.get("thermal_throttling")), bool(current.get("thermal_throttling"))
    if not was and is_:
        return ["thermal throttling started: " + "; ".join(current["thermal_throttling"])]
    if was and not is_:
        return ["thermal throttling stopped"]
    if before != now:
        return [f"thermally throttled zones changed: {', '.join(before) or '-'} → {', '.join(now) or '-'}"]
    return []


def _temperature_changes(before: dict[str, float], now: dict[str, float]) -> list[str]:
    reasons = []
    for zone in sorted(before.keys() | now.keys()):
        if zone not in now:
            reasons.append(f"thermal zone {zone} disappeared")
        elif zone not in before:
            reasons.append(f"thermal zone {zone} appeared at {now[zone]:.1f} °C")
        elif round(abs(now[zone] - before[zone]), 1) >= TEMPERATURE_STEP_C:  # the values are rounded to 0.1
            reasons.append(f"{zone} {before[zone]:.1f} → {now[zone]:.1f} °C")
    return reasons


def _clock_moved(before: float | None, now: float | None) -> bool:
    if before is None or now is None:
        return before is not now
    if before <= 0:
        return now != before
    return abs(now - before) >= CLOCK_STEP_RATIO * before - 1e-9  # 10 % exactly counts, whatever the rounding


def _mhz(value: float | None) -> str:
    return "-" if value is None else f"{value:g} MHz"


def facts_record(
    facts: dict[str, Any], reason: str, *, device_id: str, model_name: str, model_sha256: str | None
) -> Measurement:
    """The ``device_facts`` record: the snapshot in ``ext["device"]``, why it was sent in ``ext["facts_reason"]``."""
    record = Measurement(
        run_id=str(uuid.uuid4()),
        device_id=device_id,
        model_name=model_name,
        model_sha256=model_sha256,
        kind="device_facts",
        ok=True,
        output_tokens=0,
    )
    record.ext["device"] = facts
    # many zones appearing at once make a long reason: keep it within the wire's limit for a string in ext
    record.ext["facts_reason"] = reason if len(reason) <= MAX_MESSAGE_CHARS else reason[: MAX_MESSAGE_CHARS - 1] + "…"
    return record
