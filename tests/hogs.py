"""Real load beside a benchmark: busy loops, a memory hog inside a memory-limited cgroup, an fsync writer.

Each hog is a separate process (never a child of the measuring process, which counts its own children's CPU as
its own) started with :func:`subprocess.Popen` and stopped by its pid. The memory hog runs in a child cgroup
(v1 ``memory.limit_in_bytes`` or v2 ``memory.max``) that the benchmark is started into as well, so "available
memory against the limit that applies" falls without touching the host's memory.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

CPU_HOG = "while True:\n    pass\n"

IO_HOG = """
import os, sys
path = sys.argv[1]
block = os.urandom(1 << 20)
with open(path, "wb", buffering=0) as f:
    while True:
        f.write(block)
        os.fsync(f.fileno())
        if f.tell() > (64 << 20):
            f.seek(0)
            f.truncate()
"""

# keeps the cgroup's free memory (limit - usage) near FREE bytes: allocates 8 MiB chunks (touched) when there is
# more, frees them when there is less, every 5 ms
MEMORY_HOG = """
import sys, time
usage_file, limit, free = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
chunk = 8 << 20
held = []
ready = False
while True:
    with open(usage_file) as f:
        usage = int(f.read())
    room = limit - usage
    if room > free + chunk:
        held.append(bytearray(b"x" * chunk))
    elif room < free // 2 and held:
        held.pop()
    elif not ready:
        ready = True
        print("ready", flush=True)
    time.sleep(0.005)
"""


def _start(code: str, *args: str, cgroup: Path | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-c", code, *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        preexec_fn=(lambda: join_cgroup(cgroup)) if cgroup is not None else None,
    )


def _stop(processes: list[subprocess.Popen[str]]) -> None:
    for p in processes:
        p.kill()
    for p in processes:
        p.wait(timeout=10)


@contextlib.contextmanager
def cpu_hog(processes: int) -> Iterator[list[int]]:
    """``processes`` busy loops; yields their pids."""
    started = [_start(CPU_HOG) for _ in range(processes)]
    try:
        time.sleep(0.3)
        yield [p.pid for p in started]
    finally:
        _stop(started)


@contextlib.contextmanager
def io_hog(directory: Path, writers: int = 2) -> Iterator[list[int]]:
    """``writers`` processes that each write 256 KiB and fsync, again and again, in ``directory``."""
    files = [directory / f"io-hog-{n}.bin" for n in range(writers)]
    started = [_start(IO_HOG, str(path)) for path in files]
    try:
        _wait_for_io_stalls()
        yield [p.pid for p in started]
    finally:
        _stop(started)
        for path in files:
            with contextlib.suppress(OSError):
                path.unlink()


def _io_stall_us() -> int | None:
    """The kernel's total of time some task stalled on I/O (PSI), in µs; None without PSI."""
    try:
        first = Path("/proc/pressure/io").read_text().splitlines()[0]
    except (OSError, IndexError):
        return None
    return int(first.rsplit("total=", 1)[1])


def _wait_for_io_stalls(timeout: float = 15.0) -> None:
    """Until the writers make the disk stall (≥ 10 % of a 0.5 s window in PSI's io "some"), at most ``timeout``:
    page cache absorbs the first writes, and a fast disk takes a moment to fall behind (a run started at once
    could be over before any stall). Without PSI, half a second."""
    deadline = time.monotonic() + timeout
    before = _io_stall_us()
    if before is None:
        time.sleep(0.5)
        return
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _io_stall_us()
        if now is not None and now - before >= 50_000:
            return
        before = now if now is not None else before


def memory_cgroup_root() -> tuple[str, Path] | None:
    """("v1"|"v2", the directory child cgroups are made in) when this process may make a memory-limited cgroup."""
    v1 = Path("/sys/fs/cgroup/memory")
    if (v1 / "memory.limit_in_bytes").exists() and os.access(v1, os.W_OK):
        return "v1", v1
    v2 = Path("/sys/fs/cgroup")
    if (v2 / "cgroup.controllers").exists() and "memory" in (v2 / "cgroup.subtree_control").read_text():
        return ("v2", v2) if os.access(v2, os.W_OK) else None
    return None


def join_cgroup(cgroup: Path) -> None:
    (cgroup / "cgroup.procs").write_text(str(os.getpid()))


@contextlib.contextmanager
def memory_cgroup(limit_bytes: int) -> Iterator[tuple[Path, Path]]:
    """A child cgroup limited to ``limit_bytes``: yields (its directory, its usage file). Removed afterwards."""
    found = memory_cgroup_root()
    if found is None:
        raise OSError("no writable memory cgroup here (cgroup v1 memory controller or v2 with memory enabled)")
    version, parent = found
    cgroup = parent / f"lens-test-{uuid.uuid4().hex[:8]}"
    cgroup.mkdir()
    try:
        if version == "v1":
            (cgroup / "memory.limit_in_bytes").write_text(str(limit_bytes))
            usage = cgroup / "memory.usage_in_bytes"
        else:
            (cgroup / "memory.max").write_text(str(limit_bytes))
            usage = cgroup / "memory.current"
        yield cgroup, usage
    finally:
        for _ in range(50):  # the processes inside must be gone before the directory can be removed
            try:
                cgroup.rmdir()
                break
            except OSError:
                time.sleep(0.1)


@contextlib.contextmanager
def memory_hog(cgroup: Path, usage: Path, limit_bytes: int, free_bytes: int) -> Iterator[list[int]]:
    """A process in ``cgroup`` that keeps only about ``free_bytes`` of ``limit_bytes`` free."""
    started = [_start(MEMORY_HOG, str(usage), str(limit_bytes), str(free_bytes), cgroup=cgroup)]
    try:
        assert started[0].stdout is not None
        line = started[0].stdout.readline()  # "ready": the cgroup is full up to free_bytes
        if line.strip() != "ready":
            raise OSError(f"the memory hog did not start (it said {line!r})")
        yield [p.pid for p in started]
    finally:
        _stop(started)
