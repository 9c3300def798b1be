"""What the machine is: CPU, cores, memory, OS, accelerator. Recorded with every result."""

from __future__ import annotations

import platform
from pathlib import Path
from typing import Any

import psutil


def cpu_model(proc_root: Path | str = "/proc") -> str:
    """The CPU's marketing name from ``cpuinfo`` (x86 ``model name``; Arm ``Model``/``Hardware``), else the arch."""
    try:
        text = (Path(proc_root) / "cpuinfo").read_text(errors="replace")
    except OSError:
        return platform.machine() or "unknown"
    found: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        if sep:
            found.setdefault(key.strip(), value.strip())
    for key in ("model name", "Model", "Hardware", "cpu model", "Processor"):
        if found.get(key):
            return found[key]
    return platform.machine() or "unknown"


def device_info(proc_root: Path | str = "/proc") -> dict[str, Any]:
    return {
        "cpu_model": cpu_model(proc_root),
        "cpu_cores_physical": psutil.cpu_count(logical=False),
        "cpu_cores_logical": psutil.cpu_count(logical=True),
        "memory_total_bytes": int(psutil.virtual_memory().total),
        "os": platform.platform(),
        "machine": platform.machine(),
        "python": platform.python_version(),
    }
