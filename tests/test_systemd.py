"""The systemd units: valid (systemd-analyze verify) and hardened (systemd-analyze security --offline)."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
UNITS = ROOT / "systemd"


def analyze(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    tool = shutil.which("systemd-analyze")
    assert tool, "systemd-analyze is missing: `make sysdeps` installs systemd"
    return subprocess.run([tool, *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.fixture
def unit_copies(tmp_path: Path) -> Path:
    """The units with ExecStart pointing at this checkout's installed commands (systemd is not PID 1 here, and
    verify wants the binary to exist)."""
    bindir = Path(sys.executable).parent
    for unit in UNITS.glob("*.service"):
        text = (
            unit.read_text()
            .replace("/opt/lens-agent/bin", str(bindir))
            .replace("/opt/lens-aggregator/bin", str(bindir))
        )
        (tmp_path / unit.name).write_text(text)
    return tmp_path


def test_units_verify(unit_copies: Path) -> None:
    done = analyze("verify", "lens-agent.service", "lens-aggregator.service", cwd=unit_copies)
    assert done.returncode == 0, done.stderr


def exposure(unit: str, cwd: Path) -> float:
    done = analyze("security", "--offline=true", unit, cwd=cwd)
    match = re.search(r"Overall exposure level for \S+: ([\d.]+)", done.stdout + done.stderr)
    assert match, done.stdout + done.stderr
    return float(match.group(1))


def test_aggregator_is_rated_ok(unit_copies: Path) -> None:
    assert exposure("lens-aggregator.service", unit_copies) <= 2.0


def test_agent_is_hardened_as_far_as_its_device_access_allows(unit_copies: Path) -> None:
    assert exposure("lens-agent.service", unit_copies) <= 2.0
    text = (UNITS / "lens-agent.service").read_text()
    # every relaxation is explained in the unit
    for relaxed in ("MemoryDenyWriteExecute=no", "ProcSubset=all"):
        line = text.index(relaxed)
        assert text[:line].rstrip().splitlines()[-1].startswith("# Relaxed:"), relaxed


def test_units_are_notify_with_watchdog_and_restart() -> None:
    for name in ("lens-agent.service", "lens-aggregator.service"):
        text = (UNITS / name).read_text()
        for setting in (
            "Type=notify",
            "Restart=on-failure",
            "WatchdogSec=",
            "StateDirectory=",
            "ConfigurationDirectory=",
            "NoNewPrivileges=yes",
            "ProtectSystem=strict",
            "ProtectHome=yes",
            "PrivateTmp=yes",
            "CapabilityBoundingSet=\n",
        ):
            assert setting in text, (name, setting)


def test_jetson_dropin_and_rapl_rule() -> None:
    dropin = (UNITS / "lens-agent-jetson.conf").read_text()
    assert "SupplementaryGroups=jtop video" in dropin and "PrivateDevices=no" in dropin
    rule = (UNITS / "lens-agent-rapl.conf").read_text()
    assert re.search(r"^z /sys/class/powercap/intel-rapl:\*/energy_uj 0440 root lens-agent -$", rule, re.MULTILINE)


def test_units_set_their_open_file_limit(unit_copies: Path) -> None:
    """Both units set LimitNOFILE (soft = hard); the aggregator's leaves its auto connection cap at 4096 with the
    reserve kept, and systemd reads the value as a limit (``systemd-analyze verify`` above refuses a bad one)."""
    from aggregator.connections import AUTO_MAX_CONNECTIONS, connection_cap

    limits = {}
    for name in ("lens-agent.service", "lens-aggregator.service"):
        text = (UNITS / name).read_text()
        found = re.findall(r"^LimitNOFILE=(\d+)$", text, re.MULTILINE)
        assert len(found) == 1, (name, found)
        limits[name] = int(found[0])
        line = text.index("LimitNOFILE=")
        assert text[:line].rstrip().splitlines()[-1].startswith("#"), f"{name}: LimitNOFILE is explained"
    assert limits["lens-agent.service"] >= 4096
    cap, _ = connection_cap(None, limits["lens-aggregator.service"])
    assert (
        cap == AUTO_MAX_CONNECTIONS
        and limits["lens-aggregator.service"] - cap >= limits["lens-aggregator.service"] // 8
    )
    # the aggregator's seccomp filter refuses setrlimit (~@resources): the unit's limit is the one it runs with
    text = (UNITS / "lens-aggregator.service").read_text()
    assert "~@privileged @resources" in text
