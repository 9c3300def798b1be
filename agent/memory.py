"""Process memory figures from procfs, with the root injectable for tests.

Peak RSS per request costs nothing inside the decode loop: before the request the kernel's high-water mark is
reset (``echo 5 > /proc/self/clear_refs``, Linux ≥ 4.0) and afterwards ``VmHWM`` is read from
``/proc/self/status``. Where the reset is refused, the peak is reported as the RSS after the request and the
source says so.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil


@dataclass(frozen=True)
class RssReading:
    rss_bytes: int | None
    hwm_bytes: int | None


class ProcessMemory:
    def __init__(self, proc_root: Path | str = "/proc", pid: str = "self") -> None:
        self._dir = Path(proc_root) / pid
        self.peak_resettable = False

    def read(self) -> RssReading:
        """Current RSS and the high-water mark from ``status`` (kB → bytes); ``None`` where a field is missing."""
        values: dict[str, int] = {}
        try:
            text = (self._dir / "status").read_text()
        except OSError:
            rss = psutil.Process().memory_info().rss if str(self._dir).startswith("/proc/") else None
            return RssReading(rss_bytes=rss, hwm_bytes=None)
        for line in text.splitlines():
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                parts = rest.split()
                if parts and parts[0].isdigit():
                    values[key] = int(parts[0]) * 1024
        return RssReading(rss_bytes=values.get("VmRSS"), hwm_bytes=values.get("VmHWM"))

    def reset_peak(self) -> bool:
        """Reset the kernel's peak-RSS mark; returns whether it worked (remembered in ``peak_resettable``)."""
        try:
            with (self._dir / "clear_refs").open("w") as handle:
                handle.write("5")
            self.peak_resettable = True
        except OSError:
            self.peak_resettable = False
        return self.peak_resettable


def system_memory() -> dict[str, int]:
    vm = psutil.virtual_memory()
    swap = psutil.swap_memory()
    return {
        "total_bytes": int(vm.total),
        "available_bytes": int(vm.available),
        "used_bytes": int(vm.total - vm.available),
        "swap_used_bytes": int(swap.used),
    }


# glibc's mallopt parameter: how many malloc arenas threads may spread over (8 per core by default, each keeping
# what it freed); the service's few threads allocate little, so two arenas hold them all
_M_ARENA_MAX = -8


@functools.lru_cache(maxsize=1)
def _glibc() -> Any:
    """The process's own C library symbols (``dlopen(NULL)``) when they include glibc's malloc controls."""
    import ctypes

    try:
        libc = ctypes.CDLL(None)
    except OSError:
        return None
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None


def limit_malloc_arenas(arenas: int = 2) -> bool:
    """Cap glibc's malloc arenas (call before threads start); False where the C library is not glibc, or where the
    environment sets ``MALLOC_ARENA_MAX`` (the operator's choice stands)."""
    import os

    if os.environ.get("MALLOC_ARENA_MAX"):
        return False
    libc = _glibc()
    return bool(libc is not None and libc.mallopt(_M_ARENA_MAX, arenas) == 1)


def release_free_memory() -> bool:
    """Collect Python's garbage and give the C heap's free pages back to the kernel (glibc's ``malloc_trim``): a run's
    temporaries freed, the service holds only what it keeps between runs (docs/PERFORMANCE.md, the agent's
    footprint). False where the C library is not glibc."""
    import gc

    gc.collect()
    libc = _glibc()
    return bool(libc is not None and libc.malloc_trim(0) == 1)
