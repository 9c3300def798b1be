"""``make demo`` (bench/demo.py) from the user's side: the whole path, then the aggregator and its fleet page stay up
on 127.0.0.1 until Ctrl-C, and nothing but the demo's own lines reaches the terminal (no traceback, no
CancelledError, no scheduler noise). One run, on the bundled SmolLM2, each workload once."""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOISE = ("Traceback", "CancelledError", "maximum number of running instances", "Exception ignored", "previous run")

pytestmark = pytest.mark.smollm2


def test_demo_keeps_the_fleet_page_up_until_ctrl_c(tmp_path: Path, smollm2: Path) -> None:
    proc = subprocess.Popen(
        [sys.executable, "bench/demo.py", "--quick", "--workload-runs", "1", "--work", str(tmp_path / "demo")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        # Ctrl-C must reach it even when this suite runs with SIGINT ignored (a background job of a non-interactive
        # shell inherits SIG_IGN, and Python then installs no KeyboardInterrupt handler)
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    err: list[str] = []
    reader = threading.Thread(target=lambda: err.extend(proc.stderr or []), daemon=True)
    reader.start()
    out: list[str] = []
    url = None
    deadline = time.monotonic() + 400
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if match := re.search(r"the fleet page: (http://127\.0\.0\.1:\d+/)", line):
                url = match.group(1)
                break
            assert time.monotonic() < deadline, "".join(out)
        assert url is not None, "".join(out) + "".join(err)
        time.sleep(1)
        assert proc.poll() is None, "the demo ended instead of keeping the aggregator up"
        page = urllib.request.urlopen(url, timeout=10).read().decode()
        assert (
            "<html" in page.lower() and "demo-device" in urllib.request.urlopen(url + "api/v1/devices").read().decode()
        )
        metrics = urllib.request.urlopen(url + "metrics", timeout=10).read().decode()
        assert re.search(r'^llm_latency_lens_requests_total\{device="demo-device".*\} [1-9]', metrics, re.M)
        proc.send_signal(signal.SIGINT)  # Ctrl-C
        rest, _ = proc.communicate(timeout=60)
        out.append(rest)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(10)
    text = "".join(out) + "".join(err)
    assert proc.returncode == 0, text
    assert "stopped: the aggregator, the cloud server and the agent" in text
    for noise in NOISE:
        assert noise not in text, f"{noise!r} in the demo's output:\n{text}"
    with pytest.raises(OSError):
        urllib.request.urlopen(url + "api/v1/health", timeout=2)
