"""Whether the system clock is synchronized, from the kernel's NTP state: ``adjtimex`` with ``modes = 0``.

A record's ``started_at`` is only as good as the wall clock that stamped it. Jetsons have no RTC battery and can
boot years off until NTP (or PTP) steps the clock, so every record the agent stores carries what the kernel said
about the clock at the time, as ``ext["clock"]``::

    {"synchronized": true, "source": "adjtimex", "maxerror_us": 16000}
    {"synchronized": null, "source": "adjtimex", "reason": "adjtimex is Linux-only (this is darwin)"}

``adjtimex`` with ``modes = 0`` only reads: no privilege is needed, but a seccomp filter can refuse it
(systemd's ``ProtectClock=yes`` does, for reading too; the shipped unit allows it and keeps the clock unsettable by
withholding CAP_SYS_TIME). The clock counts as synchronized unless the call returns ``TIME_ERROR`` or the status has
``STA_UNSYNC`` set — what ``timedatectl``'s "System clock synchronized" shows. ``maxerror_us`` is the kernel's bound
on the clock's error, which NTP daemons keep updating while they are in control. When adjtimex is refused,
systemd-timesyncd's flag file (``/run/systemd/timesync/synchronized``, present once it synchronized) still says yes;
otherwise ``synchronized`` is None and ``reason`` says why.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno as errnos
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

TIME_ERROR = 5
STA_UNSYNC = 0x0040
CACHE_SECONDS = 5.0
TIMESYNCD_FLAG = "/run/systemd/timesync/synchronized"


class Timex(ctypes.Structure):
    """``struct timex`` of <sys/timex.h> (Linux): ``long`` fields follow the platform's width."""

    _fields_ = [
        ("modes", ctypes.c_uint),
        ("offset", ctypes.c_long),
        ("freq", ctypes.c_long),
        ("maxerror", ctypes.c_long),
        ("esterror", ctypes.c_long),
        ("status", ctypes.c_int),
        ("constant", ctypes.c_long),
        ("precision", ctypes.c_long),
        ("tolerance", ctypes.c_long),
        ("time_sec", ctypes.c_long),
        ("time_usec", ctypes.c_long),
        ("tick", ctypes.c_long),
        ("ppsfreq", ctypes.c_long),
        ("jitter", ctypes.c_long),
        ("shift", ctypes.c_int),
        ("stabil", ctypes.c_long),
        ("jitcnt", ctypes.c_long),
        ("calcnt", ctypes.c_long),
        ("errcnt", ctypes.c_long),
        ("stbcnt", ctypes.c_long),
        ("tai", ctypes.c_int),
        ("_reserved", ctypes.c_int * 11),
    ]


@dataclass(frozen=True)
class ClockState:
    """What the kernel says about the wall clock. ``synchronized`` is None when it cannot be read (``reason``)."""

    synchronized: bool | None
    source: str = "adjtimex"
    maxerror_us: int | None = None
    reason: str | None = None

    def as_ext(self) -> dict[str, Any]:
        out: dict[str, Any] = {"synchronized": self.synchronized, "source": self.source}
        if self.maxerror_us is not None:
            out["maxerror_us"] = self.maxerror_us
        if self.reason is not None:
            out["reason"] = self.reason
        return out


def synchronized(state: int, status: int) -> bool:
    """The kernel's verdict: not synchronized when adjtimex returned TIME_ERROR or STA_UNSYNC is set."""
    return state != TIME_ERROR and not status & STA_UNSYNC


def _libc_adjtimex() -> Callable[[Any], int] | str:
    if not sys.platform.startswith("linux"):
        return f"adjtimex is Linux-only (this is {sys.platform})"
    name = ctypes.util.find_library("c") or "libc.so.6"
    try:
        libc = ctypes.CDLL(name, use_errno=True)
        function = libc.adjtimex
    except (OSError, AttributeError) as exc:
        return f"no adjtimex in {name} ({exc})"
    function.argtypes = [ctypes.POINTER(Timex)]
    function.restype = ctypes.c_int
    return function


def read_clock(adjtimex: Callable[[Any], int] | None = None, timesyncd_flag: str = TIMESYNCD_FLAG) -> ClockState:
    """Read the kernel's clock state now (``adjtimex`` injectable: a callable taking a ``Timex`` pointer)."""
    function = adjtimex if adjtimex is not None else _libc_adjtimex()
    if isinstance(function, str):
        return _fallback(function, timesyncd_flag)
    timex = Timex()  # modes = 0: read only
    state = function(ctypes.byref(timex))
    if state < 0:
        code = ctypes.get_errno()
        if code == errnos.EPERM:
            why = "adjtimex refused (EPERM): a seccomp filter blocks it (systemd's ProtectClock=yes does)"
        else:
            why = f"adjtimex failed ({errnos.errorcode.get(code, code)})"
        return _fallback(why, timesyncd_flag)
    return ClockState(synchronized(state, timex.status), maxerror_us=int(timex.maxerror))


def _fallback(why: str, timesyncd_flag: str) -> ClockState:
    if os.path.exists(timesyncd_flag):
        return ClockState(True, source="systemd-timesyncd", reason=why)
    return ClockState(None, reason=f"{why}; no {timesyncd_flag} either")


class ClockMonitor:
    """``read_clock`` at most once per ``max_age`` seconds (monotonic); safe to share between threads."""

    def __init__(
        self,
        max_age: float = CACHE_SECONDS,
        read: Callable[[], ClockState] = read_clock,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.max_age = max_age
        self._read = read
        self._monotonic = monotonic
        self._lock = threading.Lock()
        self._state: ClockState | None = None
        self._read_at = 0.0

    def state(self) -> ClockState:
        with self._lock:
            now = self._monotonic()
            if self._state is None or now - self._read_at >= self.max_age:
                self._state, self._read_at = self._read(), now
            return self._state


_monitor = ClockMonitor()


def clock_ext() -> dict[str, Any]:
    """``ext["clock"]`` for a record stored now (cached for a few seconds)."""
    return _monitor.state().as_ext()


def stamp(record: dict[str, Any]) -> dict[str, Any]:
    """Add ``ext["clock"]`` to a record dict that has none yet; returns the record."""
    ext = record.setdefault("ext", {})
    if "clock" not in ext:
        ext["clock"] = clock_ext()
    return record


def boot_id(path: str = "/proc/sys/kernel/random/boot_id") -> str | None:
    """This boot's id (Linux): two CLOCK_MONOTONIC readings compare only within one boot."""
    try:
        with open(path) as handle:
            return handle.read().strip() or None
    except OSError:
        return None
