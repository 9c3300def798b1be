"""Power sources. Each is detected from what the device exposes and either works or says why not.

Detection order for ``probes.power_source = "auto"`` (the first that works is used):

1. ``jtop`` — jetson-stats, when its service is running (``/run/jtop.sock``);
2. ``jetson`` — the INA3221 monitors in sysfs: JetPack 5/6 hwmon (``in*_label``, ``in*_input`` mV,
   ``curr*_input`` mA) or JetPack 4 iio (``rail_name_N``, ``in_power{N}_input`` mW);
3. ``rapl`` — Intel/AMD RAPL energy counters under ``/sys/class/powercap`` (``energy_uj``, wrap-around at
   ``max_energy_range_uj``);
4. ``nvml`` — an NVIDIA dGPU through NVML (energy counter preferred over instantaneous power);
5. ``battery`` — a laptop battery's discharge rate (``power_now``, or ``voltage_now × current_now``).

A list in the config (``power_source = ["rapl", "nvml"]``) uses each of those and adds their totals.

Two kinds of rails: ``power`` rails are sampled in watts and integrated over time; ``energy`` rails are
cumulative joules (counters, unwrapped) and are differenced. Every rail belongs to ``source.total`` or not; the
total is what J/token is computed from.
"""

from __future__ import annotations

import abc
import contextlib
from dataclasses import dataclass
from typing import Any

from .sysfs import Root

AUTO_ORDER = ("jtop", "jetson", "rapl", "nvml", "battery")
ALL_SOURCES = AUTO_ORDER


class SourceUnavailable(Exception):
    """This source cannot be used here; the message says why (and, where there is one, the fix)."""


@dataclass(frozen=True)
class Unavailable:
    source: str
    reason: str


class PowerSource(abc.ABC):
    name: str = ""
    kind: str = "power"  # "power" (W, integrated) or "energy" (cumulative J, differenced)

    @property
    @abc.abstractmethod
    def rails(self) -> list[str]: ...

    @property
    @abc.abstractmethod
    def total_rails(self) -> list[str]:
        """Rails whose sum is the device (or domain) total used for J/token."""

    @abc.abstractmethod
    def sample(self) -> dict[str, float]:
        """One reading per rail: watts for power rails, cumulative joules for energy rails."""

    def describe(self) -> str:
        return f"{self.name}: {', '.join(self.rails)} (total: {' + '.join(self.total_rails)})"

    def close(self) -> None:
        return None


# -- Jetson INA3221 ---------------------------------------------------------------------------------------------
_JETSON_TOTALS = ("VDD_IN", "POM_5V_IN")


class JetsonIna3221(PowerSource):
    name = "jetson"

    def __init__(self, root: Root) -> None:
        self.root = root
        self._channels: list[tuple[str, str, str | None]] = []  # (rail, power-or-voltage path, current path)
        self.layout = ""
        for device in root.glob("/sys/bus/i2c/devices/*"):
            if not (root.try_read(f"{device}/name") or "").startswith("ina3221"):
                continue
            for hwmon in root.glob(f"{device}/hwmon/hwmon*"):  # JetPack 5/6
                self.layout = "hwmon (JetPack 5/6)"
                for label_path in root.glob(f"{hwmon}/in*_label"):
                    n = label_path.rsplit("/in", 1)[1].split("_", 1)[0]
                    label = root.try_read(label_path) or ""
                    if not label or label.upper() == "NC" or label.lower().startswith("sum"):
                        continue
                    if root.exists(f"{hwmon}/curr{n}_input"):
                        self._channels.append((label, f"{hwmon}/in{n}_input", f"{hwmon}/curr{n}_input"))
            for iio in root.glob(f"{device}/iio:device*"):  # JetPack 4
                self.layout = "iio (JetPack 4)"
                for name_path in root.glob(f"{iio}/rail_name_*"):
                    n = name_path.rsplit("_", 1)[1]
                    label = root.try_read(name_path) or ""
                    if label and label.upper() != "NC" and root.exists(f"{iio}/in_power{n}_input"):
                        self._channels.append((label, f"{iio}/in_power{n}_input", None))
        if not self._channels:
            raise SourceUnavailable("no INA3221 power monitor under /sys/bus/i2c/devices (not a Jetson, or no rails)")
        try:
            self.sample()
        except PermissionError as exc:
            raise SourceUnavailable(
                f"INA3221 rails are not readable ({exc.filename}): run as root or grant the service's group read "
                "access to them"
            ) from None
        except OSError as exc:
            raise SourceUnavailable(f"INA3221 rails could not be read: {exc}") from None

    @property
    def rails(self) -> list[str]:
        return [c[0] for c in self._channels]

    @property
    def total_rails(self) -> list[str]:
        for total in _JETSON_TOTALS:
            if total in self.rails:
                return [total]
        return self.rails  # no board-total rail: the sum of the monitored rails

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rail, first, current in self._channels:
            if current is None:
                out[rail] = self.root.read_int(first) / 1000.0  # mW
            else:
                out[rail] = self.root.read_int(first) * self.root.read_int(current) / 1e6  # mV × mA
        return out


# -- RAPL -------------------------------------------------------------------------------------------------------
class Rapl(PowerSource):
    name = "rapl"
    kind = "energy"

    def __init__(self, root: Root) -> None:
        self.root = root
        self._domains: list[tuple[str, str, int]] = []  # (rail, energy path, max range µJ)
        zones = [z for z in root.glob("/sys/class/powercap/intel-rapl:*") if root.exists(f"{z}/energy_uj")]
        if not zones:
            raise SourceUnavailable("no RAPL domains under /sys/class/powercap (not Intel/AMD, or masked here)")
        for zone in zones:
            name = root.try_read(f"{zone}/name") or zone.rsplit("/", 1)[1]
            rail = f"{name}" if name not in [d[0] for d in self._domains] else f"{name}@{zone.rsplit(':', 1)[1]}"
            try:
                max_range = root.read_int(f"{zone}/max_energy_range_uj")
            except OSError:
                max_range = 0
            self._domains.append((rail, f"{zone}/energy_uj", max_range))
        self._last: dict[str, int] = {}
        self._offset: dict[str, int] = {}
        try:
            self.sample()
        except PermissionError as exc:
            raise SourceUnavailable(
                f"RAPL energy counters are readable by root only since CVE-2020-8694 ({exc.filename}): run as "
                "root, or install the package's tmpfiles rule (systemd/lens-agent-rapl.conf) that grants the "
                "lens-agent group read access"
            ) from None
        except OSError as exc:
            raise SourceUnavailable(f"RAPL energy counters could not be read: {exc}") from None

    @property
    def rails(self) -> list[str]:
        return [d[0] for d in self._domains]

    @property
    def total_rails(self) -> list[str]:
        if "psys" in self.rails:
            return ["psys"]  # the whole platform, where the firmware exposes it
        tops = [r for r in self.rails if r.startswith(("package", "dram"))]
        return tops or self.rails

    def sample(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for rail, path, max_range in self._domains:
            raw = self.root.read_int(path)
            last = self._last.get(rail)
            if last is not None and raw < last:
                # the counter wrapped at max_energy_range_uj (or, without one, at 2^32 µJ)
                self._offset[rail] = self._offset.get(rail, 0) + (max_range or 2**32)
            self._last[rail] = raw
            out[rail] = (raw + self._offset.get(rail, 0)) / 1e6
        return out


# -- battery ----------------------------------------------------------------------------------------------------
class Battery(PowerSource):
    name = "battery"

    def __init__(self, root: Root) -> None:
        self.root = root
        batteries = [
            p for p in root.glob("/sys/class/power_supply/*") if (root.try_read(f"{p}/type") or "") == "Battery"
        ]
        if not batteries:
            raise SourceUnavailable("no battery under /sys/class/power_supply")
        self.dir = batteries[0]
        self.rail = self.dir.rsplit("/", 1)[1]
        status = root.try_read(f"{self.dir}/status")
        if status != "Discharging":
            raise SourceUnavailable(
                f"battery {self.rail} is {status or 'in an unknown state'}, not discharging: on AC power its "
                "power_now measures charging, not what the device draws"
            )
        try:
            self.sample()
        except OSError as exc:
            raise SourceUnavailable(
                f"battery {self.rail} reports no power_now or voltage_now/current_now ({exc})"
            ) from None

    @property
    def rails(self) -> list[str]:
        return [self.rail]

    @property
    def total_rails(self) -> list[str]:
        return [self.rail]

    def sample(self) -> dict[str, float]:
        try:
            return {self.rail: abs(self.root.read_int(f"{self.dir}/power_now")) / 1e6}  # µW
        except FileNotFoundError:
            volts = self.root.read_int(f"{self.dir}/voltage_now") / 1e6
            amps = abs(self.root.read_int(f"{self.dir}/current_now")) / 1e6
            return {self.rail: volts * amps}


def on_battery(root: Root) -> tuple[bool | None, int | None]:
    """(discharging?, capacity %) of the first battery; (None, None) when there is none."""
    for p in root.glob("/sys/class/power_supply/*"):
        if (root.try_read(f"{p}/type") or "") == "Battery":
            capacity = root.try_read(f"{p}/capacity")
            return root.try_read(f"{p}/status") == "Discharging", int(
                capacity
            ) if capacity and capacity.isdigit() else None
    return None, None


# -- NVML (NVIDIA dGPU) -----------------------------------------------------------------------------------------
class Nvml(PowerSource):
    name = "nvml"

    def __init__(self, root: Root) -> None:
        if not root.is_real:
            raise SourceUnavailable("NVML reads the real driver, not a sysfs tree (probes.sysfs_root is set)")
        try:
            import pynvml
        except ImportError:
            raise SourceUnavailable(
                "nvidia-ml-py is not installed (pip install 'llm-latency-lens[nvidia]'); Jetsons have no NVML"
            ) from None
        try:
            pynvml.nvmlInit()
        except Exception as exc:  # NVMLError and its subclasses; the driver library may be missing entirely
            raise SourceUnavailable(f"NVML did not initialise (no NVIDIA driver or GPU): {exc}") from None
        self._nvml: Any = pynvml
        self._handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
        if not self._handles:
            raise SourceUnavailable("NVML found no GPU")
        self._energy = True
        try:
            for h in self._handles:
                pynvml.nvmlDeviceGetTotalEnergyConsumption(h)
        except Exception:  # older GPUs: no energy counter, fall back to instantaneous power
            self._energy = False
        self.kind = "energy" if self._energy else "power"

    @property
    def rails(self) -> list[str]:
        return [f"gpu{i}" for i in range(len(self._handles))]

    @property
    def total_rails(self) -> list[str]:
        return self.rails

    def sample(self) -> dict[str, float]:
        if self._energy:
            return {
                f"gpu{i}": self._nvml.nvmlDeviceGetTotalEnergyConsumption(h) / 1000.0
                for i, h in enumerate(self._handles)
            }
        return {f"gpu{i}": self._nvml.nvmlDeviceGetPowerUsage(h) / 1000.0 for i, h in enumerate(self._handles)}

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._nvml.nvmlShutdown()


# -- jetson-stats -----------------------------------------------------------------------------------------------
class Jtop(PowerSource):
    name = "jtop"

    def __init__(self, root: Root) -> None:
        if not root.is_real:
            raise SourceUnavailable("jtop reads the live jtop service, not a sysfs tree (probes.sysfs_root is set)")
        try:
            from jtop import jtop
        except ImportError:
            raise SourceUnavailable(
                "jetson-stats is not installed (pip install 'llm-latency-lens[jetson]'; AGPL-3.0, Jetson only)"
            ) from None
        if not root.exists("/run/jtop.sock"):
            raise SourceUnavailable("the jtop.service is not active (/run/jtop.sock missing): systemctl start jtop")
        try:
            self._jetson = jtop()
            self._jetson.start()
        except Exception as exc:  # JtopException: service down, or the user is not in the jtop group
            raise SourceUnavailable(f"jtop could not connect: {exc} (is the user in the jtop group?)") from None
        self._rails = list(self._read())
        if not self._rails:
            raise SourceUnavailable("jtop reports no power rails")

    def _read(self) -> dict[str, float]:
        power = self._jetson.power or {}
        out = {name: float(v.get("power", 0)) / 1000.0 for name, v in (power.get("rail") or {}).items()}
        total = power.get("tot") or {}
        if "power" in total:
            out["total"] = float(total["power"]) / 1000.0
        return out

    @property
    def rails(self) -> list[str]:
        return self._rails

    @property
    def total_rails(self) -> list[str]:
        return ["total"] if "total" in self._rails else self._rails

    def sample(self) -> dict[str, float]:
        return self._read()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self._jetson.close()


_CLASSES: dict[str, type[PowerSource]] = {
    "jtop": Jtop,
    "jetson": JetsonIna3221,
    "rapl": Rapl,
    "nvml": Nvml,
    "battery": Battery,
}


def open_source(name: str, root: Root) -> PowerSource:
    return _CLASSES[name](root)  # type: ignore[call-arg]


def detect_power(root: Root, wanted: str | list[str] = "auto") -> tuple[list[PowerSource], list[Unavailable]]:
    """The power sources to use, and every source that was tried and is unavailable, with its reason."""
    names = (
        list(AUTO_ORDER)
        if wanted == "auto"
        else ([] if wanted == "none" else [wanted] if isinstance(wanted, str) else list(wanted))
    )
    chosen: list[PowerSource] = []
    missing: list[Unavailable] = []
    for name in names:
        if wanted == "auto" and chosen:
            break
        try:
            chosen.append(open_source(name, root))
        except SourceUnavailable as exc:
            missing.append(Unavailable(name, str(exc)))
    return chosen, missing


def why_no_power(wanted: str | list[str], unavailable: list[Unavailable]) -> str:
    """Why no power figure: what was asked for (``probes.power_source``) and why each asked-for source is missing."""
    if wanted == "none":
        return "power sampling is off (power_source = none)"
    if wanted == "auto":
        tried = ", ".join(u.source for u in unavailable) or "nothing"
        return f"no power source found on this device (power_source = auto tried {tried}; lens-agent probe says why)"
    reasons = "; ".join(f"{u.source}: {u.reason}" for u in unavailable) or "none was tried"
    asked = wanted if isinstance(wanted, str) else ",".join(wanted)
    return f"power_source = {asked} was asked for and is unavailable ({reasons})"
