"""Real processes the tests start: ``lens-aggregator serve`` on 127.0.0.1, and a device token for it; the
environment that runs a process on a wall clock the test steps (libfaketime)."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO, Any

from aggregator.store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "dev-1"


class AggregatorProcess:
    """``lens-aggregator serve`` as a real process; ``db`` is a SQLite path or a postgresql:// URL."""

    def __init__(
        self,
        db: Path,
        port: int,
        config: Path | None = None,
        command: list[str] | None = None,
        cwd: Path = ROOT,
        env: dict[str, str] | None = None,
    ) -> None:
        """``command``: how to run ``lens-aggregator`` (default: this tree's, with the tests' Python); ``env``: its
        environment (default: the tests')."""
        self.db, self.port, self.config, self.cwd, self.env = db, port, config, cwd, env
        self.command = command or [sys.executable, "-c", "from aggregator.cli import main; main()"]
        self.proc: subprocess.Popen[bytes] | None = None
        # its log goes to a file: an unread pipe fills (64 KiB) and then blocks the server on its next log line
        self.log: IO[bytes] | None = None

    def stderr_text(self) -> str:
        """Everything the server has logged so far."""
        if self.log is None:
            return ""
        self.log.seek(0)
        return self.log.read().decode("utf-8", "replace")

    def start(self) -> None:
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - kept open while the server runs, read on failure
        self.proc = subprocess.Popen(
            [
                *self.command,
                "serve",
                *(["--config", str(self.config)] if self.config else []),
                "--db",
                str(self.db),
                "--port",
                str(self.port),
            ],
            cwd=self.cwd,
            env=self.env,
            stdout=subprocess.DEVNULL,
            stderr=self.log,
        )
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return
            if self.proc.poll() is not None:
                raise RuntimeError(f"aggregator exited: {self.stderr_text()}")
            time.sleep(0.05)
        raise RuntimeError("aggregator did not start")

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.kill()


def open_store(db: Any) -> Any:
    """The aggregator store at ``db``: a SQLite path, or a PostgreSQL URL (the ``db`` fixture gives either)."""
    if isinstance(db, Path):
        return SQLiteStore(db)
    from aggregator.pgstore import PostgresStore

    return PostgresStore(db)


def device_token(db: Path) -> str:
    store = SQLiteStore(db)
    try:
        return store.add_token(DEVICE, "device", time.time_ns() // 1000)
    finally:
        store.close()


def libfaketime() -> Path:
    """libfaketime's preload library (Debian package ``faketime``; ``make sysdeps`` installs it)."""
    try:
        listing = subprocess.run(["dpkg", "-L", "libfaketime"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        listing = ""
    for line in listing.splitlines():
        if line.endswith("/libfaketime.so.1"):
            return Path(line)
    raise AssertionError("libfaketime is missing: `make sysdeps` installs the faketime package")


def stepped_clock_env(offset_file: Path) -> dict[str, str]:
    """This process's environment with libfaketime preloaded: the child's wall clock is shifted by the offset written
    in ``offset_file`` (``+0``, ``-1d``, ``+120`` seconds …), read again at every call, so the test steps it while the
    child runs; its monotonic clock is left alone, as on a machine whose clock NTP steps. libfaketime 0.9.10 with
    ``DONT_FAKE_MONOTONIC`` breaks ``time.sleep`` on Python >= 3.11 (EINVAL; wolfcw/libfaketime #426): the child must
    not call it (asyncio's timers and thread waits are unaffected)."""
    if not offset_file.exists():
        offset_file.write_text("+0\n")
    return {
        **os.environ,
        "PYTHONUNBUFFERED": "1",
        "LD_PRELOAD": str(libfaketime()),
        "FAKETIME_TIMESTAMP_FILE": str(offset_file),
        "FAKETIME_NO_CACHE": "1",
        "DONT_FAKE_MONOTONIC": "1",
        "FAKETIME_DONT_FAKE_MONOTONIC": "1",
    }
