"""Real processes the tests start: ``lens-aggregator serve`` on 127.0.0.1, and a device token for it."""

from __future__ import annotations

import contextlib
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import IO

from aggregator.store import SQLiteStore

ROOT = Path(__file__).resolve().parents[1]
DEVICE = "dev-1"


class AggregatorProcess:
    """``lens-aggregator serve`` as a real process; ``db`` is a SQLite path or a postgresql:// URL."""

    def __init__(
        self, db: Path, port: int, config: Path | None = None, command: list[str] | None = None, cwd: Path = ROOT
    ) -> None:
        """``command``: how to run ``lens-aggregator`` (default: this tree's, with the tests' Python)."""
        self.db, self.port, self.config, self.cwd = db, port, config, cwd
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


def device_token(db: Path) -> str:
    store = SQLiteStore(db)
    try:
        return store.add_token(DEVICE, "device", time.time_ns() // 1000)
    finally:
        store.close()
