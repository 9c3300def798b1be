"""The device facts the agent sends the aggregator: the snapshot on fixture trees, when a new one is due, the record
on the wire, and the service that stores it (at start, and before a run only when the facts changed)."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path
from typing import Any

import pytest

from agent.facts import IDENTITY_KEYS, device_facts, facts_changed, facts_record
from agent.outbox import AsyncOutbox, Outbox, open_outbox
from agent.probes.sysfs import Root
from agent.service import AgentService, stored_form
from lens_core import record_schema, wire

from .sysfs_trees import intel_laptop, nano_jp4, orin_jp6, set_zone_temp, write
from .test_service import AGENT, ROOT

ORIN_FACTS: dict[str, Any] = {
    "device_class": "embedded device",
    "model": "NVIDIA Jetson Orin Nano Developer Kit",
    "accelerator": "NVIDIA integrated GPU (Jetson)",
    "ram_gb": 7.44,
    "power_mode": "7W",
    "power_mode_id": 1,
    "gpu_freq_mhz": 612.0,
    "cpu_freq_mhz": {"cpu0": 1510.4},
    "cpu_freq_mhz_max": 1510.4,
    "temperatures_c": {"cpu-thermal": 52.5, "gpu-thermal": 97.0},
    "temperature_max_c": 97.0,
    "thermal_throttling": ["gpu-thermal at 97.0 °C ≥ passive trip 95.5 °C"],
    "clock_synchronized": None,
}


def now_us() -> int:
    return time.time_ns() // 1000


# -- the snapshot ---------------------------------------------------------------------------------------------------
def test_facts_of_an_orin_on_jetpack6(tmp_path: Path) -> None:
    orin_jp6(tmp_path)
    assert device_facts(Root(tmp_path)) == ORIN_FACTS


def test_facts_follow_the_orins_zones_and_clock_sync(tmp_path: Path) -> None:
    orin_jp6(tmp_path)
    set_zone_temp(tmp_path, 1, 60.04)  # the GPU cooled below its passive trip (95.5 °C)
    set_zone_temp(tmp_path, 0, 96.0)  # the CPU passed its own (95 °C)
    write(tmp_path, "/run/systemd/timesync/synchronized", "")
    facts = device_facts(Root(tmp_path))
    assert facts["temperatures_c"] == {"cpu-thermal": 96.0, "gpu-thermal": 60.0}
    assert facts["temperature_max_c"] == 96.0
    assert facts["thermal_throttling"] == ["cpu-thermal at 96.0 °C ≥ passive trip 95.0 °C"]
    assert facts["clock_synchronized"] is True


def test_facts_of_a_nano_on_jetpack4(tmp_path: Path) -> None:
    nano_jp4(tmp_path)
    facts = device_facts(Root(tmp_path))
    assert facts["device_class"] == "embedded device"
    assert facts["model"] == "NVIDIA Jetson Nano Developer Kit"
    assert facts["accelerator"] == "NVIDIA integrated GPU (Jetson)"
    assert facts["ram_gb"] == 7.44
    # the tree has no nvpmodel status, no GPU devfreq, no thermal zones, no cpufreq: unknown, not zero
    assert facts["power_mode"] is None and facts["power_mode_id"] is None and facts["gpu_freq_mhz"] is None
    assert facts["temperatures_c"] == {} and facts["temperature_max_c"] is None and facts["thermal_throttling"] == []
    assert facts["cpu_freq_mhz"] == {} and facts["cpu_freq_mhz_max"] is None


def test_facts_of_an_intel_laptop(tmp_path: Path) -> None:
    intel_laptop(tmp_path)
    write(tmp_path, "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "2800000\n")
    write(tmp_path, "/sys/devices/system/cpu/cpu1/cpufreq/scaling_cur_freq", "4200000\n")
    facts = device_facts(Root(tmp_path))
    assert facts["device_class"] == "laptop"
    assert facts["model"] == "ThinkPad X1 Carbon Gen 9"  # the DMI product name
    assert facts["accelerator"] is None  # NVML reads the real driver only
    assert facts["power_mode"] is None and facts["gpu_freq_mhz"] is None
    assert facts["cpu_freq_mhz"] == {"cpu0": 2800.0, "cpu1": 4200.0} and facts["cpu_freq_mhz_max"] == 4200.0
    assert facts["temperatures_c"] == {"x86_pkg_temp": 61.0} and facts["thermal_throttling"] == []


# -- when a new record is due -----------------------------------------------------------------------------------------
def changed(**fields: Any) -> dict[str, Any]:
    return {**ORIN_FACTS, **fields}


def test_the_first_facts_are_due() -> None:
    assert facts_changed(None, ORIN_FACTS, age_s=0) == "first facts since the agent started"


def test_the_same_facts_are_not_due_again() -> None:
    assert facts_changed(ORIN_FACTS, dict(ORIN_FACTS), age_s=3599.9) is None


@pytest.mark.parametrize("key", IDENTITY_KEYS)
def test_a_changed_identity_is_due(key: str) -> None:
    reason = facts_changed(ORIN_FACTS, changed(**{key: "other"}), age_s=0)
    assert reason is not None and reason.startswith(f"{key} changed: ") and "'other'" in reason


def test_a_new_power_mode_names_both() -> None:
    reason = facts_changed(ORIN_FACTS, changed(power_mode="15W", power_mode_id=0), age_s=0)
    assert reason == "power_mode changed: '7W' → '15W'; power_mode_id changed: 1 → 0"


def test_throttling_that_starts_or_stops_is_due() -> None:
    cool = changed(temperatures_c={"cpu-thermal": 52.5, "gpu-thermal": 96.0}, thermal_throttling=[])
    assert facts_changed(ORIN_FACTS, cool, age_s=0) == "thermal throttling stopped"
    assert facts_changed(cool, ORIN_FACTS, age_s=0) == (
        "thermal throttling started: gpu-thermal at 97.0 °C ≥ passive trip 95.5 °C"
    )


def test_throttling_in_other_zones_is_due_and_the_same_zones_are_not() -> None:
    both = changed(
        temperatures_c={"cpu-thermal": 96.0, "gpu-thermal": 97.0},
        thermal_throttling=["cpu-thermal at 96.0 °C ≥ passive trip 95.0 °C", ORIN_FACTS["thermal_throttling"][0]],
    )
    assert facts_changed(ORIN_FACTS, both, age_s=0) == (
        "thermally throttled zones changed: gpu-thermal → cpu-thermal, gpu-thermal; cpu-thermal 52.5 → 96.0 °C"
    )
    warmer = changed(
        temperatures_c={"cpu-thermal": 52.5, "gpu-thermal": 98.0},
        thermal_throttling=["gpu-thermal at 98.0 °C ≥ passive trip 95.5 °C"],
    )
    assert facts_changed(ORIN_FACTS, warmer, age_s=0) is None  # still the GPU, 1 °C warmer


@pytest.mark.parametrize(("celsius", "due"), [(54.4, False), (54.5, True), (50.6, False), (50.5, True)])
def test_a_temperature_that_moved_2_degrees_is_due(celsius: float, due: bool) -> None:
    current = changed(temperatures_c={"cpu-thermal": celsius, "gpu-thermal": 97.0})
    reason = facts_changed(ORIN_FACTS, current, age_s=0)
    assert reason == (f"cpu-thermal 52.5 → {celsius:.1f} °C" if due else None)


def test_a_zone_that_appears_or_disappears_is_due() -> None:
    more = changed(temperatures_c={**ORIN_FACTS["temperatures_c"], "soc-thermal": 48.0})
    assert facts_changed(ORIN_FACTS, more, age_s=0) == "thermal zone soc-thermal appeared at 48.0 °C"
    assert facts_changed(more, ORIN_FACTS, age_s=0) == "thermal zone soc-thermal disappeared"


@pytest.mark.parametrize(
    ("fields", "reason"),
    [
        ({"cpu_freq_mhz_max": 1661.44}, "fastest CPU clock 1510.4 MHz → 1661.44 MHz"),  # +10 %
        ({"cpu_freq_mhz_max": 1359.36}, "fastest CPU clock 1510.4 MHz → 1359.36 MHz"),  # −10 %
        ({"cpu_freq_mhz_max": 1650.0}, None),  # +9.2 %
        ({"gpu_freq_mhz": 306.0}, "GPU clock 612 MHz → 306 MHz"),
        ({"gpu_freq_mhz": 650.0}, None),  # +6.2 %
        ({"gpu_freq_mhz": None}, "GPU clock 612 MHz → -"),
    ],
)
def test_a_clock_that_moved_10_percent_is_due(fields: dict[str, Any], reason: str | None) -> None:
    assert facts_changed(ORIN_FACTS, changed(**fields), age_s=0) == reason


def test_facts_an_hour_old_are_refreshed() -> None:
    assert facts_changed(ORIN_FACTS, ORIN_FACTS, age_s=3599) is None
    assert facts_changed(ORIN_FACTS, ORIN_FACTS, age_s=3600) == "refresh: the last facts are 60 min old"


# -- the record on the wire -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("codec", ["cbor", "msgpack"])
def test_the_facts_record_passes_the_wire_schema(tmp_path: Path, codec: str) -> None:
    orin_jp6(tmp_path)
    facts = device_facts(Root(tmp_path))
    record = facts_record(
        facts, "first facts since the agent started", device_id="orin-017", model_name="m", model_sha256=None
    )
    decoded = wire.loads(wire.encode_record(stored_form(record), codec), codec)
    checked = wire.check_record(decoded, 0, now_us())
    assert checked["kind"] == "device_facts" and checked["ok"] is True and checked["output_tokens"] == 0
    assert checked["ext"]["device"] == ORIN_FACTS
    assert checked["ext"]["facts_reason"] == "first facts since the agent started"
    assert "clock" in checked["ext"]  # stamped like every stored record


def test_a_long_reason_is_cut_to_the_wire_limit() -> None:
    reason = "; ".join(f"thermal zone zone{i} appeared at 40.0 °C" for i in range(200))
    record = facts_record(ORIN_FACTS, reason, device_id="d", model_name="m", model_sha256=None)
    assert len(record.ext["facts_reason"]) == record_schema.MAX_MESSAGE_CHARS
    wire.check_record(wire.loads(wire.encode_record(stored_form(record), "cbor"), "cbor"), 0, now_us())


# -- the service ----------------------------------------------------------------------------------------------------
def outbox_records(data_dir: Path) -> list[dict[str, Any]]:
    with Outbox(data_dir / "outbox.db") as box:
        return [wire.loads(r.body, r.codec) for r in box.pending(100)]


def agent_config(tmp_path: Path, model: Path) -> Path:
    config = tmp_path / "agent.toml"
    config.write_text(f"""
[agent]
device_id = "orin-017"
data_dir = "{tmp_path / "data"}"
[model]
path = "{model}"
n_ctx = 256
n_threads = 1
[probes]
sysfs_root = "{tmp_path / "orin"}"
idle_baseline = "0"
[[workloads]]
name = "quick"
every = "1h"
requests = 1
max_tokens = 4
""")
    return config


def test_the_service_stores_the_facts_once_at_start(tmp_path: Path, tiny_model: Path) -> None:
    orin_jp6(tmp_path / "orin")
    set_zone_temp(tmp_path / "orin", 1, 60.0)  # not throttled: the run measures
    done = subprocess.run(
        [*AGENT, "run", "--config", str(agent_config(tmp_path, tiny_model)), "--once"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    records = outbox_records(tmp_path / "data")
    assert [r["kind"] for r in records] == ["model_load", "device_facts", "inference"]
    facts = records[1]
    assert wire.check_record(facts, 1, now_us()) is facts
    assert facts["device_id"] == "orin-017" and facts["model_name"] == records[0]["model_name"]
    assert facts["ext"]["device"] == {
        **ORIN_FACTS,
        "temperatures_c": {"cpu-thermal": 52.5, "gpu-thermal": 60.0},
        "temperature_max_c": 60.0,
        "thermal_throttling": [],
    }
    assert facts["ext"]["facts_reason"] == "first facts since the agent started"


async def test_a_run_stores_the_facts_only_when_they_changed(tmp_path: Path, tiny_model: Path) -> None:
    """Runs skipped for throttling (the Orin's GPU is past its trip point): the facts come before the gate."""
    orin_jp6(tmp_path / "orin")
    service = AgentService(agent_config(tmp_path, tiny_model))
    service.data_dir.mkdir(parents=True)
    service.outbox = AsyncOutbox(open_outbox(service.config))
    workload = service.config.workloads[0]
    try:
        await service.run_workload(workload)  # the first facts, then the skip
        await service.run_workload(workload)  # nothing changed: the skip alone
        set_zone_temp(tmp_path / "orin", 1, 102.0)  # 5 °C warmer
        await service.run_workload(workload)
    finally:
        await service.outbox.close()
    records = outbox_records(tmp_path / "data")
    assert [r["kind"] for r in records] == ["device_facts", "skip", "skip", "device_facts", "skip"]
    first, second = records[0], records[3]
    assert first["ext"]["device"] == ORIN_FACTS and first["model_name"] == "unknown"  # no model loaded yet
    assert second["ext"]["facts_reason"] == "gpu-thermal 97.0 → 102.0 °C"
    assert second["ext"]["device"]["thermal_throttling"] == ["gpu-thermal at 102.0 °C ≥ passive trip 95.5 °C"]
    assert "thermally throttled: gpu-thermal at 97.0" in records[1]["error_message"]
    for i, record in enumerate(records):
        wire.check_record(record, i, now_us())
