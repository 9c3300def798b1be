"""Power sources, the sampler's arithmetic and device facts, against fixture trees laid out like real devices."""

from __future__ import annotations

from pathlib import Path

import pytest

from agent.probes.device import classify, describe, mapped_file_rss
from agent.probes.power import Battery, JetsonIna3221, Rapl, detect_power
from agent.probes.sampler import PowerSampler, window_energy
from agent.probes.sysfs import Root

from .sysfs_trees import RAPL_MAX_UJ, intel_laptop, nano_jp4, orin_jp6, set_orin_power, set_rapl, write

S = 1_000_000_000  # one second in ns


def test_orin_jetpack6_rails_and_board_total(tmp_path: Path) -> None:
    orin_jp6(tmp_path)
    sources, unavailable = detect_power(Root(tmp_path))
    assert [s.name for s in sources] == ["jetson"]
    jetson = sources[0]
    assert isinstance(jetson, JetsonIna3221) and jetson.layout == "hwmon (JetPack 5/6)"
    assert jetson.rails == ["VDD_IN", "VDD_CPU_GPU_CV", "VDD_SOC"]  # NC and the sum channel skipped
    assert jetson.total_rails == ["VDD_IN"]
    assert jetson.sample() == {"VDD_IN": 6.0, "VDD_CPU_GPU_CV": 2.0, "VDD_SOC": 1.5}  # 5000 mV × mA
    assert unavailable[0].source == "jtop" and "sysfs tree" in unavailable[0].reason


def test_nano_jetpack4_iio_milliwatts(tmp_path: Path) -> None:
    nano_jp4(tmp_path)
    jetson = JetsonIna3221(Root(tmp_path))
    assert jetson.layout == "iio (JetPack 4)"
    assert jetson.total_rails == ["POM_5V_IN"]
    assert jetson.sample() == {"POM_5V_IN": 4.5, "POM_5V_GPU": 0.8, "POM_5V_CPU": 1.2}


def test_rapl_domains_counters_and_wrap_around(tmp_path: Path) -> None:
    intel_laptop(tmp_path)
    sources, _ = detect_power(Root(tmp_path))
    rapl = sources[0]
    assert isinstance(rapl, Rapl) and rapl.kind == "energy"
    assert rapl.rails == ["package-0", "core", "uncore", "dram"]
    assert rapl.total_rails == ["package-0", "dram"]
    set_rapl(tmp_path, "intel-rapl:0", RAPL_MAX_UJ - 2_000_000)
    before = rapl.sample()["package-0"]
    set_rapl(tmp_path, "intel-rapl:0", 3_000_000)  # wrapped: 2 J to the top, then 3 J
    after = rapl.sample()["package-0"]
    assert after - before == pytest.approx(5.0)


def test_rapl_prefers_psys(tmp_path: Path) -> None:
    intel_laptop(tmp_path, psys=True)
    assert Rapl(Root(tmp_path)).total_rails == ["psys"]


def test_rapl_permission_denied_says_how_to_fix_it(tmp_path: Path) -> None:
    intel_laptop(tmp_path)

    def reader(path: Path) -> str:
        if path.name == "energy_uj":
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text()

    sources, unavailable = detect_power(Root(tmp_path, reader=reader))
    rapl = next(u for u in unavailable if u.source == "rapl")
    assert "root only" in rapl.reason and "lens-agent-rapl.conf" in rapl.reason and "energy_uj" in rapl.reason
    assert [s.name for s in sources] == ["battery"]  # auto goes on to the next source
    assert sources[0].sample() == {"BAT0": 12.5}


def test_battery_on_ac_power_is_unavailable(tmp_path: Path) -> None:
    intel_laptop(tmp_path, battery_status="Charging")
    from agent.probes.power import SourceUnavailable

    with pytest.raises(SourceUnavailable, match="Charging, not discharging"):
        Battery(Root(tmp_path))


def test_battery_from_voltage_and_current(tmp_path: Path) -> None:
    intel_laptop(tmp_path)
    (tmp_path / "sys/class/power_supply/BAT0/power_now").unlink()
    write(tmp_path, "/sys/class/power_supply/BAT0/voltage_now", "12000000\n")
    write(tmp_path, "/sys/class/power_supply/BAT0/current_now", "-1500000\n")
    assert Battery(Root(tmp_path)).sample() == {"BAT0": pytest.approx(18.0)}


def test_no_sensors_every_source_says_why(tmp_path: Path) -> None:
    sources, unavailable = detect_power(Root(tmp_path))
    assert sources == []
    assert [u.source for u in unavailable] == ["jtop", "jetson", "rapl", "nvml", "battery"]
    assert all(u.reason for u in unavailable)
    assert detect_power(Root(tmp_path), "none") == ([], [])


def test_explicit_source_list(tmp_path: Path) -> None:
    intel_laptop(tmp_path)
    sources, unavailable = detect_power(Root(tmp_path), ["battery", "rapl"])
    assert [s.name for s in sources] == ["battery", "rapl"] and unavailable == []


def test_sampler_integrates_a_changing_tree(tmp_path: Path) -> None:
    """Samples at 0, 1, 2, 3 s while VDD_IN goes 6, 6, 10, 10 W: hand-computed trapezoids."""
    orin_jp6(tmp_path)
    sampler = PowerSampler(detect_power(Root(tmp_path), "jetson")[0], rate_hz=1.0)
    clock = iter([0, S, 2 * S, 3 * S])
    sampler.clock = lambda: next(clock)
    for ma in (1200, 1200, 2000, 2000):
        set_orin_power(tmp_path, ma)
        sampler.read_once()
    assert window_energy(sampler.samples, ["VDD_IN"], "power", 0, 3 * S).joules == pytest.approx(24.0)
    # edges interpolated: 0.5 × 6 + 1 × 8 + 0.5 × 10
    assert window_energy(sampler.samples, ["VDD_IN"], "power", S // 2, 5 * S // 2).joules == pytest.approx(16.0)
    short = window_energy(sampler.samples, ["VDD_IN"], "power", S // 2, 3 * S // 2, rate_hz=1.0)
    assert short.joules is None and short.reason == "1 power sample(s) in this 1000 ms window at 1 Hz; need 2"

    report = sampler.window_report(0, S, 3 * S, baseline_w={"VDD_IN": 2.0}, input_tokens=10, output_tokens=5)
    assert report["joules_total"] == pytest.approx(24.0)
    assert report["joules_net"] == pytest.approx(18.0)  # 24 − 2 W × 3 s
    assert report["j_per_prompt_token"] == pytest.approx((6 - 2) / 10)  # [0, 1 s]: 6 J − 2 J idle, 10 tokens
    assert report["j_per_output_token"] == pytest.approx((8 + 10 - 4) / 4)  # [1, 3 s]: 18 J − 4 J idle, 4 gaps
    report = sampler.window_report(0, 2 * S, 3 * S, baseline_w={"VDD_IN": 2.0}, input_tokens=10, output_tokens=5)
    assert report["j_per_prompt_token"] == pytest.approx((6 + 8 - 4) / 10)  # [0, 2 s]: 14 J − 4 J idle
    assert report["j_per_output_token"] == pytest.approx((10 - 2) / 4)  # [2, 3 s]: 10 J − 2 J idle, 4 gaps
    assert report["rails"]["VDD_IN"]["peak_w"] == 10.0


def test_sampler_differences_energy_counters(tmp_path: Path) -> None:
    intel_laptop(tmp_path)
    sampler = PowerSampler(detect_power(Root(tmp_path), "rapl")[0], rate_hz=1.0)
    clock = iter([0, S, 2 * S, 3 * S])
    sampler.clock = lambda: next(clock)
    for joules in (0, 5, 12, 20):
        set_rapl(tmp_path, "intel-rapl:0", 1_000_000 + joules * 1_000_000)
        sampler.read_once()
    window = window_energy(sampler.samples, ["package-0"], "energy", S // 2, 5 * S // 2)
    assert window.joules == pytest.approx(16.0 - 2.5)  # counter 2.5 J at 0.5 s, 16 J at 2.5 s


def test_sampler_thread_samples_at_its_rate(tmp_path: Path) -> None:
    import time

    orin_jp6(tmp_path)
    sampler = PowerSampler(detect_power(Root(tmp_path), "jetson")[0], rate_hz=50.0)
    sampler.start()
    time.sleep(0.4)
    sampler.stop()
    times = [t for t, _ in sampler.samples]
    assert 8 <= len(times) <= 30  # ~20, loosely
    assert times == sorted(times) and all(v["VDD_IN"] == 6.0 for _, v in sampler.samples)


def test_permission_denied_on_jetson_rails(tmp_path: Path) -> None:
    orin_jp6(tmp_path)

    def reader(path: Path) -> str:
        if path.name.startswith("curr"):
            raise PermissionError(13, "Permission denied", str(path))
        return path.read_text()

    _, unavailable = detect_power(Root(tmp_path, reader=reader), "jetson")
    assert "not readable" in unavailable[0].reason and "curr" in unavailable[0].reason


def test_device_facts_of_an_orin(tmp_path: Path) -> None:
    orin_jp6(tmp_path)
    facts = describe(Root(tmp_path))
    assert facts["device_class"] == "embedded device"
    assert "Orin Nano" in facts["device_class_evidence"]
    jetson = facts["jetson"]
    assert jetson["l4t"] == "36.3.0" and jetson["nvpmodel"] == {"id": 1, "name": "7W"}
    assert jetson["gpu_load_percent"] == 45.0 and jetson["gpu_freq_hz"] == 612_000_000
    assert facts["compute_capability"] == 8.7
    assert facts["temperatures_c"] == {"cpu-thermal": 52.5, "gpu-thermal": 97.0}
    assert facts["thermal_throttling"] == ["gpu-thermal at 97.0 °C ≥ passive trip 95.5 °C"]
    assert facts["nvmap_used_bytes"] == 412340 * 1024
    assert facts["cpu_freq_mhz"] == {"cpu0": 1510.4}
    assert facts["clock_synchronized"] is None  # the tree does not say
    write(tmp_path, "/run/systemd/timesync/synchronized", "")
    assert describe(Root(tmp_path))["clock_synchronized"] is True


@pytest.mark.parametrize(
    ("chassis", "expected"), [("10", "laptop"), ("3", "desktop"), ("23", "edge server"), ("30", "tablet")]
)
def test_device_class_from_dmi(tmp_path: Path, chassis: str, expected: str) -> None:
    write(tmp_path, "/sys/class/dmi/id/chassis_type", chassis + "\n")
    assert classify(Root(tmp_path))[0] == expected


def test_device_class_from_a_battery_alone(tmp_path: Path) -> None:
    write(tmp_path, "/sys/class/power_supply/BAT1/type", "Battery\n")
    assert classify(Root(tmp_path)) == ("laptop", "a battery in /sys/class/power_supply")
    assert classify(Root(tmp_path / "empty"))[0] == "desktop"


def test_mapped_file_rss(tmp_path: Path) -> None:
    import mmap

    data = tmp_path / "model.bin"
    data.write_bytes(b"x" * (1 << 20))
    with data.open("rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as mapped:
        assert mapped[: 1 << 20].count(b"x") == 1 << 20  # touch every page
        rss = mapped_file_rss(data)
        assert rss is not None and rss >= 1 << 20
    assert mapped_file_rss(tmp_path / "not-mapped") is None
