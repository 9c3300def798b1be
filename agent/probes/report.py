"""``lens-agent probe``: what the device is, what can be measured on it, and why not the rest."""

from __future__ import annotations

import time
from typing import Any

from ..config import AgentConfig
from ..memory import system_memory
from .device import describe
from .power import detect_power, why_no_power
from .sampler import PowerSampler
from .sysfs import Root


def probe_document(config: AgentConfig, *, samples: int = 5) -> dict[str, Any]:
    probes = config.values["probes"]
    root = Root(probes["sysfs_root"])
    sources, unavailable = detect_power(root, probes["power_source"])
    live: list[dict[str, Any]] = []
    try:
        if sources and samples:
            sampler = PowerSampler(sources, rate_hz=probes["sample_rate_hz"])
            start = time.perf_counter_ns()
            for i in range(samples):
                t, values = sampler.read_once()
                live.append({"t_s": round((t - start) / 1e9, 3), "values": values})
                if i + 1 < samples:
                    time.sleep(1.0 / sampler.rate_hz)
    finally:
        for source in sources:
            source.close()
    return {
        "sysfs_root": str(root.root),
        "device": describe(root),
        "memory": system_memory() if root.is_real else None,
        "power": {
            "sources": [
                {"name": s.name, "kind": s.kind, "rails": s.rails, "total_rails": s.total_rails} for s in sources
            ],
            "asked": probes["power_source"],
            "unavailable": [{"source": u.source, "reason": u.reason} for u in unavailable],
            "why_none": None if sources else why_no_power(probes["power_source"], unavailable),
            "samples": live,
            "units": "W for power rails; cumulative J for energy rails",
        },
    }


def _clock(synced: bool | None, how: str) -> str:
    if synced is None:
        return how
    return f"{'synchronized' if synced else 'NOT synchronized: timestamps may be wrong'} ({how})"


def render_probe(doc: dict[str, Any]) -> str:
    dev = doc["device"]
    lines = [
        f"device      {dev['device_class']} ({dev['device_class_evidence']})",
        f"model       {dev['model'] or 'unknown'}",
        f"accelerator {dev['accelerator'] or 'none found'}"
        + (f", compute capability {dev['compute_capability']}" if dev["compute_capability"] else ""),
    ]
    jetson = dev.get("jetson")
    if jetson:
        mode = jetson.get("nvpmodel") or {}
        gpu = jetson.get("gpu_freq_hz")
        lines.append(
            f"jetson      L4T {jetson.get('l4t', '?')}, nvpmodel {mode.get('id', '?')} ({mode.get('name') or '?'}), "
            f"GPU {gpu / 1e6 if gpu else '?'} MHz at {jetson.get('gpu_load_percent', '?')} % load"
        )
    temps = ", ".join(f"{k} {v:.1f} °C" for k, v in dev["temperatures_c"].items()) or "no thermal zones"
    lines += [
        f"thermal     {temps}",
        f"throttling  {'; '.join(dev['thermal_throttling']) or 'none'}",
        f"clock       {_clock(dev['clock_synchronized'], dev['clock_check'])}",
    ]
    if dev.get("nvmap_used_bytes") is not None:
        lines.append(f"nvmap       {dev['nvmap_used_bytes'] / 1e6:.0f} MB shared CPU/GPU memory in use")
    mem = doc.get("memory")
    if mem:
        lines.append(
            f"memory      {mem['total_bytes'] / 1e9:.1f} GB, {mem['available_bytes'] / 1e9:.1f} GB available, "
            f"swap used {mem['swap_used_bytes'] / 1e6:.0f} MB"
        )
    power = doc["power"]
    for source in power["sources"]:
        lines.append(
            f"power       {source['name']} ({source['kind']}): {', '.join(source['rails'])} "
            f"— total: {' + '.join(source['total_rails'])}"
        )
    if not power["sources"]:
        lines.append(f"power       none: {power['why_none']}; energy per token cannot be measured")
    for item in power["unavailable"]:
        lines.append(f"  unavailable {item['source']}: {item['reason']}")
    for sample in power["samples"]:
        values = ", ".join(f"{k} {v:.3f}" for k, v in sample["values"].items())
        lines.append(f"  sample t={sample['t_s']:.2f}s  {values}")
    return "\n".join(lines)
