"""Fixture trees laid out like the real sysfs/procfs of the devices the agent runs on.

Each function writes the files under ``root`` (which stands for ``/``) and returns what a test asserts against.
Paths and formats follow the real boards: JetPack 5/6 INA3221 through hwmon (mV, mA), JetPack 4 through iio
(mW), Intel RAPL powercap (µJ counters), a battery's power_supply (µW).
"""

from __future__ import annotations

from pathlib import Path


def write(root: Path, rel: str, text: str) -> None:
    path = root / rel.lstrip("/")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


MEMINFO = "MemTotal:        7802172 kB\nMemFree:         3000000 kB\nMemAvailable:    5000000 kB\n"


def orin_jp6(root: Path) -> None:
    """Jetson Orin Nano, JetPack 6 (L4T 36.3): INA3221 at i2c 1-0040 through hwmon."""
    write(root, "/proc/device-tree/model", "NVIDIA Jetson Orin Nano Developer Kit\x00")
    write(
        root, "/etc/nv_tegra_release", "# R36 (release), REVISION: 3.0, GCID: 36106755, BOARD: generic, EABI: aarch64\n"
    )
    dev = "/sys/bus/i2c/devices/1-0040"
    write(root, f"{dev}/name", "ina3221\n")
    hw = f"{dev}/hwmon/hwmon3"
    write(root, f"{hw}/name", "ina3221\n")
    rails = {1: ("VDD_IN", 5000, 1200), 2: ("VDD_CPU_GPU_CV", 5000, 400), 3: ("VDD_SOC", 5000, 300)}
    for n, (label, mv, ma) in rails.items():
        write(root, f"{hw}/in{n}_label", label + "\n")
        write(root, f"{hw}/in{n}_input", f"{mv}\n")
        write(root, f"{hw}/curr{n}_input", f"{ma}\n")
    write(root, f"{hw}/in4_label", "NC\n")
    write(root, f"{hw}/in4_input", "0\n")
    write(root, f"{hw}/curr4_input", "0\n")
    write(root, f"{hw}/in7_label", "sum of shunt voltages\n")
    write(root, f"{hw}/in7_input", "15000\n")
    write(root, f"{hw}/curr7_input", "1900\n")
    write(root, "/var/lib/nvpmodel/status", "pmode:0001 fmode:quiet\n")
    write(
        root, "/etc/nvpmodel.conf", "< POWER_MODEL ID=0 NAME=15W >\nCPU_ONLINE CORE_0 1\n< POWER_MODEL ID=1 NAME=7W >\n"
    )
    gpu = "/sys/class/devfreq/17000000.gpu"
    write(root, f"{gpu}/cur_freq", "612000000\n")
    write(root, f"{gpu}/device/load", "450\n")
    write(root, f"{gpu}/device/of_node/name", "gpu\x00")
    write(root, "/sys/class/thermal/thermal_zone0/type", "cpu-thermal\n")
    write(root, "/sys/class/thermal/thermal_zone0/temp", "52500\n")
    write(root, "/sys/class/thermal/thermal_zone0/trip_point_0_type", "passive\n")
    write(root, "/sys/class/thermal/thermal_zone0/trip_point_0_temp", "95000\n")
    write(root, "/sys/class/thermal/thermal_zone1/type", "gpu-thermal\n")
    write(root, "/sys/class/thermal/thermal_zone1/temp", "97000\n")
    write(root, "/sys/class/thermal/thermal_zone1/trip_point_0_type", "passive\n")
    write(root, "/sys/class/thermal/thermal_zone1/trip_point_0_temp", "95500\n")
    write(root, "/sys/devices/system/cpu/cpu0/cpufreq/scaling_cur_freq", "1510400\n")
    write(root, "/proc/meminfo", MEMINFO + "NvMapMemUsed:     412340 kB\n")


def set_orin_power(root: Path, vdd_in_ma: int) -> None:
    """Change VDD_IN's current (the board draws 5 V × this)."""
    write(root, "/sys/bus/i2c/devices/1-0040/hwmon/hwmon3/curr1_input", f"{vdd_in_ma}\n")


def set_zone_temp(root: Path, zone: int, celsius: float) -> None:
    """Set ``thermal_zone{zone}``'s temperature (sysfs holds millidegrees Celsius)."""
    write(root, f"/sys/class/thermal/thermal_zone{zone}/temp", f"{round(celsius * 1000)}\n")


def nano_jp4(root: Path) -> None:
    """Jetson Nano, JetPack 4 (L4T 32.7): INA3221 at i2c 6-0040 through iio, powers in mW."""
    write(root, "/proc/device-tree/model", "NVIDIA Jetson Nano Developer Kit\x00")
    write(
        root, "/etc/nv_tegra_release", "# R32 (release), REVISION: 7.1, GCID: 29818004, BOARD: t210ref, EABI: aarch64\n"
    )
    dev = "/sys/bus/i2c/devices/6-0040"
    write(root, f"{dev}/name", "ina3221x\n")
    iio = f"{dev}/iio:device0"
    for n, (rail, mw) in enumerate((("POM_5V_IN", 4500), ("POM_5V_GPU", 800), ("POM_5V_CPU", 1200))):
        write(root, f"{iio}/rail_name_{n}", rail + "\n")
        write(root, f"{iio}/in_power{n}_input", f"{mw}\n")
    write(root, "/proc/meminfo", MEMINFO)


RAPL_MAX_UJ = 262143328850


def intel_laptop(root: Path, *, battery_status: str = "Discharging", psys: bool = False) -> None:
    """An Intel laptop: DMI chassis type 10 (Notebook), RAPL package/core/uncore/dram, a battery."""
    write(root, "/sys/class/dmi/id/chassis_type", "10\n")
    write(root, "/sys/class/dmi/id/product_name", "ThinkPad X1 Carbon Gen 9\n")
    zones = {
        "intel-rapl:0": "package-0",
        "intel-rapl:0:0": "core",
        "intel-rapl:0:1": "uncore",
        "intel-rapl:0:2": "dram",
    }
    if psys:
        zones["intel-rapl:1"] = "psys"
    for zone, name in zones.items():
        base = f"/sys/class/powercap/{zone}"
        write(root, f"{base}/name", name + "\n")
        write(root, f"{base}/energy_uj", "1000000\n")
        write(root, f"{base}/max_energy_range_uj", f"{RAPL_MAX_UJ}\n")
    bat = "/sys/class/power_supply/BAT0"
    write(root, f"{bat}/type", "Battery\n")
    write(root, f"{bat}/status", battery_status + "\n")
    write(root, f"{bat}/power_now", "12500000\n")
    write(root, f"{bat}/capacity", "80\n")
    write(root, "/sys/class/power_supply/AC/type", "Mains\n")
    write(root, "/sys/class/power_supply/AC/online", "0\n" if battery_status == "Discharging" else "1\n")
    write(root, "/sys/class/thermal/thermal_zone0/type", "x86_pkg_temp\n")
    write(root, "/sys/class/thermal/thermal_zone0/temp", "61000\n")
    write(root, "/proc/meminfo", MEMINFO)


def set_rapl(root: Path, zone: str, microjoules: int) -> None:
    write(root, f"/sys/class/powercap/{zone}/energy_uj", f"{microjoules}\n")
