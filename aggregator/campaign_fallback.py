"""A minimal stand-in for :mod:`aggregator.campaign_results` (class comparison rows and exports) and for
``lens_core.suite.check_document`` (the suite document's structural checks), used only while those modules are not
installed: the campaign API works, with fewer checks and JSON/CSV exports only. Once both are in, nothing imports
this module."""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from collections.abc import Iterable, Mapping
from typing import Any
from urllib.parse import urlsplit

METRICS = (
    ("ttft_p50_ms", ("latency_metrics", "time_to_first_token", "p50_ms")),
    ("ttft_p95_ms", ("latency_metrics", "time_to_first_token", "p95_ms")),
    ("tpot_p50_ms", ("latency_metrics", "time_per_output_token", "p50_ms")),
    ("tpot_p95_ms", ("latency_metrics", "time_per_output_token", "p95_ms")),
    ("e2e_p50_ms", ("latency_metrics", "end_to_end_latency", "p50_ms")),
    ("e2e_p95_ms", ("latency_metrics", "end_to_end_latency", "p95_ms")),
    ("tokens_per_second", ("throughput_metrics", "tokens_per_second")),
    ("j_per_output_token", ("energy", "j_per_output_token")),
    ("error_rate", ("error_metrics", "error_rate")),
)


def _figure(document: Any, path: tuple[str, ...]) -> float | None:
    value: Any = document.get("results") if type(document) is dict else None
    for key in path:
        value = value.get(key) if type(value) is dict else None
    if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
        return float(value)
    return None


def device_rows(levels: Iterable[Any], classes: Mapping[str, str]) -> list[dict[str, Any]]:
    """One row per device × model × workload × level (records whose ext is not a map are left out)."""
    rows = []
    for level in levels:
        if type(level) is not dict or type(level.get("ext")) is not dict:
            continue
        ext = level.get("ext", {})
        mark, document = ext.get("campaign", {}), ext.get("results")
        total = _figure(document, ("error_metrics", "total_errors"))
        row: dict[str, Any] = {
            "device_id": level.get("device_id"),
            "device_class": classes.get(str(level.get("device_id"))) or "unknown",
            "model": mark.get("model"),
            "workload": mark.get("workload"),
            "level": mark.get("level"),
            "requests": _figure(document, ("latency_metrics", "end_to_end_latency", "sample_count")),
            "errors": total,
        }
        for name, path in METRICS:
            row[name] = _figure(document, path)
        rows.append(row)
    return rows


def class_rows(levels: Iterable[Any], classes: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per device class, a row per model × workload × level: each figure the median over the class's devices,
    ``spread`` its min/median/max."""
    groups: dict[str, dict[tuple[str, str, str], list[dict[str, Any]]]] = {}
    for row in device_rows(levels, classes):
        group = groups.setdefault(str(row["device_class"]), {})
        key = (str(row["model"]), str(row["workload"]), json.dumps(row["level"], sort_keys=True))
        group.setdefault(key, []).append(row)
    out: dict[str, list[dict[str, Any]]] = {}
    for device_class, by_level in sorted(groups.items()):
        rows = []
        for _, members in sorted(by_level.items()):
            first = members[0]
            out_row: dict[str, Any] = {
                "model": first["model"],
                "workload": first["workload"],
                "level": first["level"],
                "devices": len({m["device_id"] for m in members}),
                "spread": {},
            }
            for name, _ in METRICS:
                values = [m[name] for m in members if m[name] is not None]
                out_row[name] = statistics.median(values) if values else None
                if values:
                    out_row["spread"][name] = {
                        "min": min(values),
                        "median": statistics.median(values),
                        "max": max(values),
                    }
            rows.append(out_row)
        out[device_class] = rows
    return out


KEY_COLUMNS = ("device_id", "device_class", "model", "workload", "level", "requests", "errors")
COLUMNS = (*KEY_COLUMNS, *(name for name, _ in METRICS))


def export(
    levels: Iterable[Any], classes: Mapping[str, str], fmt: str, *, benchmark_id: str | None = None
) -> tuple[bytes, str]:
    """JSON or CSV only (arrow and parquet need aggregator.campaign_results: LookupError): (body, content type)."""
    rows = device_rows(levels, classes)
    if fmt == "json":
        body = {"format_version": "1", "benchmark_id": benchmark_id, "columns": list(COLUMNS), "rows": rows}
        return json.dumps(body, allow_nan=False).encode(), "application/json"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow(row)
        return out.getvalue().encode(), "text/csv"
    raise LookupError(fmt)


class DocumentError(Exception):
    """A suite document refused by the fallback checks: the JSON path and what is allowed."""

    def __init__(self, path: str, message: str) -> None:
        self.path = path
        super().__init__(message)


MAX_CONCURRENCY = 64
MAX_ITEMS = 32


def check_document(document: object) -> None:
    """The structure of a suite document: types of test_suite, models and workloads, names, endpoints without
    credentials, concurrency within 1…64."""
    if type(document) is not dict:
        raise DocumentError("$", "an object with test_suite, models and workloads")
    for key in ("test_suite", "models", "workloads"):
        if key not in document:
            raise DocumentError(f"$.{key}", f"the required key {key!r}")
    if type(document["test_suite"]) is not dict:
        raise DocumentError("$.test_suite", "an object")
    for key in ("models", "workloads"):
        items = document[key]
        if type(items) is not list or not 1 <= len(items) <= MAX_ITEMS:
            raise DocumentError(f"$.{key}", f"a list of 1 to {MAX_ITEMS} objects")
        for i, item in enumerate(items):
            path = f"$.{key}[{i}]"
            if type(item) is not dict:
                raise DocumentError(path, "an object")
            if type(item.get("name")) is not str or not 1 <= len(item["name"]) <= 128:
                raise DocumentError(f"{path}.name", "a name of 1 to 128 characters")
    for i, model in enumerate(document["models"]):
        endpoint = model.get("endpoint")
        path = f"$.models[{i}].endpoint"
        if type(endpoint) is not str or len(endpoint) > 2048:
            raise DocumentError(path, "a URL string: http(s)://host[:port]/v1, file:///path.gguf or gguf:NAME")
        try:
            parts = urlsplit(endpoint)
        except ValueError:
            raise DocumentError(path, "a valid URL") from None
        if "@" in parts.netloc or parts.query or parts.fragment:
            raise DocumentError(path, "a URL without credentials (no user:password@, no ?api_key=/token=…)")
    for i, workload in enumerate(document["workloads"]):
        levels = [("concurrency", workload["concurrency"])] if "concurrency" in workload else []
        if "concurrency_levels" in workload:
            raw = workload["concurrency_levels"]
            if type(raw) is not list or not 1 <= len(raw) <= 16:
                raise DocumentError(f"$.workloads[{i}].concurrency_levels", "a list of 1 to 16 integers")
            levels += [(f"concurrency_levels[{j}]", v) for j, v in enumerate(raw)]
        for where, value in levels:
            if type(value) is not int or not 1 <= value <= MAX_CONCURRENCY:
                raise DocumentError(f"$.workloads[{i}].{where}", f"an integer from 1 to {MAX_CONCURRENCY}")
