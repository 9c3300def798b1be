"""Campaign ``campaign_level`` records as the aggregator decodes them, with results documents in the seed's shape
(as ``agent/bench/report.py`` writes them), for the campaign results, pages and benchmark tests."""

from __future__ import annotations

import copy
import random
import uuid
from pathlib import Path
from typing import Any

from lens_core.stats import latency_distribution, metric_distribution


def results_document(
    *,
    ttft: list[float],
    tpot: list[float],
    e2e: list[float],
    tokens_per_second: float,
    errors: int,
    j_per_token: list[float] | None = None,
    model: str = "smollm2",
    level: str = "concurrency 1",
) -> dict[str, Any]:
    measured = len(e2e) + errors
    results: dict[str, Any] = {
        "latency_metrics": {
            name: latency_distribution(values)
            for name, values in (
                ("time_to_first_token", ttft),
                ("time_per_output_token", tpot),
                ("end_to_end_latency", e2e),
            )
            if values
        },
        "throughput_metrics": {"tokens_per_second": tokens_per_second, "requests_per_second": 1.0},
        "error_metrics": {
            "total_errors": errors,
            "error_rate": errors / measured if measured else 0.0,
            "errors_by_type": {"timeout": errors} if errors else {},
        },
        "requests": {"measured": measured, "succeeded": len(e2e), "stop_reasons": {"length": len(e2e)}},
        "energy": {"j_per_output_token": metric_distribution(j_per_token)}
        if j_per_token
        else {"unavailable": "no power source on this device"},
    }
    return {
        "metadata": {
            "benchmark_id": str(uuid.uuid4()),
            "timestamp": "2026-12-07T03:00:00Z",
            "version": "1.0.0",
            "tool": "llm-latency-lens",
        },
        "configuration": {
            "model": {"name": model, "provider": "local"},
            "hardware": {"cpu_cores": 4},
            "test_parameters": {"concurrency_levels": [1], "warmup_requests": 1, "total_requests": measured or 1},
            "suite": {"level": level},
        },
        "results": results,
    }


def level_record(
    device: str,
    document: dict[str, Any],
    *,
    campaign_id: str,
    model: str = "smollm2",
    workload: str = "chat",
    level: str = "concurrency 1",
    started_us: int = 1_700_000_000_000_000,
) -> dict[str, Any]:
    """A decoded ``campaign_level`` record (the measurement's shape, as ``Store.campaign_levels`` hands it)."""
    return {
        "id": str(uuid.uuid4()),
        "device_id": device,
        "kind": "campaign_level",
        "ok": True,
        "output_tokens": 0,
        "started_us": started_us,
        "model_name": model,
        "ext": {
            "campaign": {
                "id": campaign_id,
                "level_run": str(uuid.uuid4()),
                "model": model,
                "workload": workload,
                "level": level,
                "levels_done": 1,
                "levels_total": 1,
            },
            "results": document,
        },
    }


REAL_DOCUMENT = Path(__file__).parent / "data" / "campaign_level_results.json"


def realistic(document: dict[str, Any], template: dict[str, Any]) -> dict[str, Any]:
    """``document``'s figures in ``template``'s shape: a real level's results document (``lens-agent bench
    --suite`` on a tiny model, tests/data/campaign_level_results.json) with its configuration, engine timings,
    model load and memory sections, about 6 KB as JSON."""
    out = copy.deepcopy(template)
    out["metadata"] = document["metadata"]
    for key in ("latency_metrics", "throughput_metrics", "error_metrics", "requests", "energy"):
        out["results"][key] = document["results"][key]
    return out


def fleet(
    devices: int,
    levels: int,
    *,
    seed: int = 7,
    campaign_id: str | None = None,
    samples: int = 20,
    template: dict[str, Any] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """``devices`` × ``levels`` records over three classes (orin, nano, laptop) and the classes map; each document
    in ``template``'s shape when given (:func:`realistic`)."""
    rng = random.Random(seed)
    campaign_id = campaign_id or str(uuid.uuid4())
    classes: dict[str, str] = {}
    records: list[dict[str, Any]] = []
    speed = {"orin": 1.0, "nano": 2.5, "laptop": 0.6}
    for d in range(devices):
        device = f"dev-{d:05d}"
        kind = ("orin", "nano", "laptop")[d % 3]
        classes[device] = kind
        for lv in range(levels):
            scale = speed[kind] * (1 + lv / 4)
            ttft = [rng.uniform(20, 80) * scale for _ in range(samples)]
            tpot = [rng.uniform(5, 15) * scale for _ in range(samples)]
            e2e = [t + 30 * p for t, p in zip(ttft, tpot, strict=True)]
            doc = results_document(
                ttft=ttft,
                tpot=tpot,
                e2e=e2e,
                tokens_per_second=rng.uniform(50, 150) / scale,
                errors=rng.choice((0, 0, 0, 1, 2)),
                j_per_token=[rng.uniform(0.05, 0.2) for _ in range(samples)] if kind != "laptop" else None,
                level=f"concurrency {2**lv}",
            )
            if template is not None:
                doc = realistic(doc, template)
            records.append(level_record(device, doc, campaign_id=campaign_id, level=f"concurrency {2**lv}"))
    return records, classes
