"""What kind of device this is, and the state that moves its results: clocks, power mode, temperatures, time."""

from __future__ import annotations

import os
import platform
import re
from pathlib import Path
from typing import Any

from ..clock import read_clock
from .sysfs import Root

DEVICE_CLASSES = ("smartphone", "tablet", "laptop", "desktop", "embedded device", "edge server")

# SMBIOS chassis types (DMTF DSP0134, 7.4.1)
_CHASSIS = {
    **dict.fromkeys((8, 9, 10, 14, 31, 32), "laptop"),
    30: "tablet",
    11: "smartphone",
    **dict.fromkeys((3, 4, 5, 6, 7, 13, 15, 16, 24, 35, 36), "desktop"),
    **dict.fromkeys((17, 23, 25, 28, 29), "edge server"),
    **dict.fromkeys((33, 34), "embedded device"),
}
# CUDA compute capability of Jetson GPUs, by the model string's family
_JETSON_CC = (("orin", 8.7), ("xavier", 7.2), ("tx2", 6.2), ("nano", 5.3), ("tx1", 5.3))


def device_tree_model(root: Root) -> str | None:
    return root.try_read("/proc/device-tree/model") or root.try_read("/sys/firmware/devicetree/base/model")


def has_battery(root: Root) -> bool:
    return any((root.try_read(f"{p}/type") or "") == "Battery" for p in root.glob("/sys/class/power_supply/*"))


def classify(root: Root) -> tuple[str, str]:
    """(device class, the evidence): device tree → DMI chassis type → battery → desktop."""
    model = device_tree_model(root)
    if model:
        lowered = model.lower()
        if "phone" in lowered:
            return "smartphone", f"device-tree model {model!r}"
        if "tablet" in lowered:
            return "tablet", f"device-tree model {model!r}"
        return "embedded device", f"device-tree model {model!r}"
    chassis = root.try_read("/sys/class/dmi/id/chassis_type")
    if chassis and chassis.isdigit() and int(chassis) in _CHASSIS:
        return _CHASSIS[int(chassis)], f"DMI chassis type {chassis}"
    if has_battery(root):
        return "laptop", "a battery in /sys/class/power_supply"
    return "desktop", "no device tree, no DMI chassis type that says otherwise, no battery"


def jetson_info(root: Root) -> dict[str, Any] | None:
    """L4T release, power mode, GPU clock and load; None when this is not a Jetson."""
    release = root.try_read("/etc/nv_tegra_release")
    model = device_tree_model(root) or ""
    if release is None and "jetson" not in model.lower():
        return None
    info: dict[str, Any] = {"model": model or None}
    if release:
        match = re.search(r"R(\d+)[^,]*,\s*REVISION:\s*([\d.]+)", release)
        info["l4t"] = f"{match.group(1)}.{match.group(2)}" if match else release.splitlines()[0]
    info["nvpmodel"] = nvpmodel_mode(root)
    for dev in root.glob("/sys/class/devfreq/*"):
        name = (root.try_read(f"{dev}/device/of_node/name") or "") + " " + dev.rsplit("/", 1)[1]
        if "gpu" in name.lower() or "gv11b" in name or "ga10b" in name or "gp10b" in name or "57000000" in name:
            freq = root.try_read(f"{dev}/cur_freq")
            load = root.try_read(f"{dev}/device/load")
            info["gpu_freq_hz"] = int(freq) if freq and freq.isdigit() else None
            info["gpu_load_percent"] = int(load) / 10 if load and load.isdigit() else None  # per-mille
            break
    lowered = model.lower()
    info["compute_capability"] = next((cc for key, cc in _JETSON_CC if key in lowered), None)
    return info


def gpu_load_percent(root: Root) -> float | None:
    """The integrated GPU's load (Jetson devfreq ``load``, per-mille), for the sampler."""
    for dev in root.glob("/sys/class/devfreq/*"):
        load = root.try_read(f"{dev}/device/load")
        if load is not None and load.isdigit():
            return int(load) / 10
    return None


def nvpmodel_mode(root: Root) -> dict[str, Any] | None:
    status = root.try_read("/var/lib/nvpmodel/status")  # e.g. "pmode:0001 fmode:quiet"
    if status is None:
        return None
    match = re.search(r"pmode:(\d+)", status)
    mode_id = int(match.group(1)) if match else None
    name = None
    conf = root.try_read("/etc/nvpmodel.conf")
    if conf and mode_id is not None:
        found = re.search(rf"<\s*POWER_MODEL\s+ID={mode_id}\s+NAME=([^\s>]+)", conf)
        name = found.group(1) if found else None
    return {"id": mode_id, "name": name}


def cpu_freqs_mhz(root: Root) -> dict[str, float]:
    out: dict[str, float] = {}
    for cpu in root.glob("/sys/devices/system/cpu/cpu[0-9]*"):
        freq = root.try_read(f"{cpu}/cpufreq/scaling_cur_freq")
        if freq and freq.isdigit():
            out[cpu.rsplit("/", 1)[1]] = int(freq) / 1000
    return out


def temperatures(root: Root) -> tuple[dict[str, float], list[str]]:
    """°C per thermal zone, and the zones at or above their lowest passive trip point (thermal throttling)."""
    temps: dict[str, float] = {}
    throttled: list[str] = []
    for zone in root.glob("/sys/class/thermal/thermal_zone*"):
        kind = root.try_read(f"{zone}/type") or zone.rsplit("/", 1)[1]
        raw = root.try_read(f"{zone}/temp")
        if raw is None or not raw.lstrip("-").isdigit():
            continue
        celsius = int(raw) / 1000
        temps[kind] = celsius
        trips = []
        for trip in root.glob(f"{zone}/trip_point_*_type"):
            if root.try_read(trip) == "passive":
                value = root.try_read(trip.replace("_type", "_temp"))
                if value and value.lstrip("-").isdigit():
                    trips.append(int(value) / 1000)
        if trips and celsius >= min(trips):
            throttled.append(f"{kind} at {celsius:.1f} °C ≥ passive trip {min(trips):.1f} °C")
    return temps, throttled


def clock_synchronized(root: Root) -> tuple[bool | None, str]:
    """Whether the system clock is synchronized (Jetsons have no RTC battery and can boot years off)."""
    if root.exists("/run/systemd/timesync/synchronized"):
        return True, "systemd-timesyncd"
    if not root.is_real:
        return None, "unknown (no /run/systemd/timesync/synchronized in the tree)"
    state = read_clock()
    if state.synchronized is None:
        return None, f"unknown ({state.reason})"
    if not state.synchronized:
        return False, "adjtimex: not synchronized by NTP/PTP (TIME_ERROR or STA_UNSYNC)"
    return True, "adjtimex"


def nvmap_used_bytes(root: Root) -> int | None:
    """Jetson shared CPU/GPU memory held through NvMap (the L4T kernel's /proc/meminfo line)."""
    meminfo = root.try_read("/proc/meminfo") or ""
    match = re.search(r"^NvMapMemUsed:\s+(\d+)\s+kB", meminfo, re.MULTILINE)
    return int(match.group(1)) * 1024 if match else None


def mapped_file_rss(path: Path | str, smaps: Path | str = "/proc/self/smaps") -> int | None:
    """Resident bytes of this process's mappings of ``path`` (the model file llama.cpp mmaps)."""
    target = os.path.realpath(path)
    total = 0
    found = False
    current = False
    try:
        with open(smaps, encoding="utf-8", errors="replace") as handle:
            for line in handle:
                first = line.split(None, 5)
                if len(first) >= 5 and "-" in first[0] and not first[0].endswith(":"):
                    current = len(first) == 6 and first[5].strip() == target
                    found = found or current
                elif current and line.startswith("Rss:"):
                    total += int(line.split()[1]) * 1024
    except OSError:
        return None
    return total if found else None


def nvml_gpus(root: Root) -> tuple[list[dict[str, Any]], str | None]:
    """NVIDIA dGPUs through NVML: name, memory used/total, compute capability; or why there are none."""
    if not root.is_real:
        return [], "NVML reads the real driver, not a sysfs tree"
    try:
        import pynvml
    except ImportError:
        return [], "nvidia-ml-py is not installed (pip install 'llm-latency-lens[nvidia]')"
    try:
        pynvml.nvmlInit()
    except Exception as exc:  # NVMLError: no driver, no GPU
        return [], f"NVML did not initialise: {exc}"
    gpus = []
    try:
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            major, minor = pynvml.nvmlDeviceGetCudaComputeCapability(handle)
            name = pynvml.nvmlDeviceGetName(handle)
            gpus.append(
                {
                    "name": name.decode() if isinstance(name, bytes) else str(name),
                    "memory_used_bytes": int(memory.used),
                    "memory_total_bytes": int(memory.total),
                    "compute_capability": float(f"{major}.{minor}"),
                }
            )
    finally:
        pynvml.nvmlShutdown()
    return gpus, None


def product_model(root: Root) -> str | None:
    """The board's device-tree model, else the DMI product name."""
    return device_tree_model(root) or root.try_read("/sys/class/dmi/id/product_name")


def accelerator_name(jetson: dict[str, Any] | None, gpus: list[dict[str, Any]]) -> str | None:
    """The accelerator to name: a Jetson's integrated GPU, else the first NVML GPU."""
    return "NVIDIA integrated GPU (Jetson)" if jetson else (gpus[0]["name"] if gpus else None)


def ram_gb(root: Root) -> float | None:
    """Total RAM in GiB (psutil on the real system, ``/proc/meminfo`` in a tree)."""
    if root.is_real:
        import psutil

        return round(psutil.virtual_memory().total / 1024**3, 2)
    return _meminfo_total_gb(root)


def describe(root: Root) -> dict[str, Any]:
    """Everything ``lens-agent probe`` and every result record about the device."""
    device_class, evidence = classify(root)
    jetson = jetson_info(root)
    temps, throttled = temperatures(root)
    synced, how = clock_synchronized(root)
    gpus, no_gpu = nvml_gpus(root)
    compute = jetson.get("compute_capability") if jetson else (gpus[0]["compute_capability"] if gpus else None)
    return {
        "device_class": device_class,
        "device_class_evidence": evidence,
        "model": product_model(root),
        "accelerator": accelerator_name(jetson, gpus),
        "compute_capability": compute,
        "ram_gb": ram_gb(root),
        "jetson": jetson,
        "cpu_freq_mhz": cpu_freqs_mhz(root),
        "temperatures_c": temps,
        "thermal_throttling": throttled,
        "clock_synchronized": synced,
        "clock_check": how,
        "nvmap_used_bytes": nvmap_used_bytes(root),
        "gpus": gpus,
        "gpus_unavailable": None if gpus or jetson else no_gpu,
        "kernel": platform.release() if root.is_real else None,
    }


def _meminfo_total_gb(root: Root) -> float | None:
    match = re.search(r"^MemTotal:\s+(\d+)\s+kB", root.try_read("/proc/meminfo") or "", re.MULTILINE)
    return round(int(match.group(1)) / 1024**2, 2) if match else None
