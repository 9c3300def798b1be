"""Whether a scheduled workload should run now, or be skipped so the lens does not disturb what it monitors."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .probes.device import temperatures
from .probes.power import on_battery
from .probes.sysfs import Root


@dataclass(frozen=True)
class DeviceState:
    discharging: bool | None
    battery_percent: int | None
    throttled: list[str]
    load_per_core: float | None


def read_state(root: Root) -> DeviceState:
    discharging, percent = on_battery(root)
    _, throttled = temperatures(root)
    try:
        load = os.getloadavg()[0] / (os.cpu_count() or 1) if root.is_real else None
    except OSError:
        load = None
    if not root.is_real:
        text = root.try_read("/proc/loadavg")
        if text:
            load = float(text.split()[0]) / (os.cpu_count() or 1)
    return DeviceState(discharging, percent, throttled, load)


def gate(gates: Mapping[str, Any], state: DeviceState) -> str | None:
    """The reason to skip this run, or None to run it."""
    minimum = gates["min_battery_percent"]
    if (
        minimum is not None
        and state.discharging
        and state.battery_percent is not None
        and state.battery_percent < minimum
    ):
        return f"on battery at {state.battery_percent} % (< gates.min_battery_percent = {minimum})"
    if gates["skip_when_throttled"] and state.throttled:
        return "thermally throttled: " + "; ".join(state.throttled)
    limit = gates["max_load_per_core"]
    if limit is not None and state.load_per_core is not None and state.load_per_core > limit:
        return f"busy: 1-min load {state.load_per_core:.2f} per core (> gates.max_load_per_core = {limit:g})"
    return None
