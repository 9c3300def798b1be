"""Arrow IPC and Parquet exports, in the seed's Arrow schema (§6.3), through the optional ``pyarrow`` extra.

Differences from the seed: the latency fields are nullable (a failed request has no TTFT), and ``device_id``,
``strategy`` and ``received_at`` are added, since a fleet export without them cannot be grouped.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

from agent import wire


class ArrowUnavailable(Exception):
    pass


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.parquet
    except ImportError:
        raise ArrowUnavailable(
            "Arrow and Parquet exports need pyarrow: pip install 'llm-latency-lens[arrow]'"
        ) from None
    return pyarrow


def schema() -> Any:
    pa = _pyarrow()
    return pa.schema(
        [
            pa.field("measurement_id", pa.utf8(), nullable=False),
            pa.field("timestamp", pa.timestamp("ms"), nullable=False),
            pa.field("model_name", pa.utf8(), nullable=False),
            pa.field("provider", pa.utf8(), nullable=False),
            pa.field("endpoint", pa.utf8(), nullable=False),
            pa.field("ttft_ms", pa.float64()),
            pa.field("tpot_ms", pa.float64()),
            pa.field("e2e_latency_ms", pa.float64()),
            pa.field("prefill_ms", pa.float64()),
            pa.field("decode_ms", pa.float64()),
            pa.field("input_tokens", pa.uint32()),
            pa.field("output_tokens", pa.uint32()),
            pa.field("tokens_per_second", pa.float64()),
            pa.field("gpu_utilization_percent", pa.float64()),
            pa.field("memory_utilization_percent", pa.float64()),
            pa.field("kv_cache_utilization_percent", pa.float64()),
            pa.field("error_occurred", pa.bool_(), nullable=False),
            pa.field("error_type", pa.utf8()),
            pa.field("device_id", pa.utf8(), nullable=False),
            pa.field("strategy", pa.utf8()),
            pa.field("received_at", pa.timestamp("us"), nullable=False),
        ]
    )


def table(rows: Sequence[dict[str, Any]]) -> Any:
    """Stored rows (``Store.query``) → a pyarrow Table in the export schema."""
    from .metrics import provider_of

    pa = _pyarrow()
    columns: dict[str, list[Any]] = {name: [] for name in schema().names}
    for row in rows:
        record = wire.loads(bytes(row["body"]), row["codec"])
        e2e = record.get("e2e_us")
        n_out = record.get("output_tokens")
        columns["measurement_id"].append(bytes(row["id"]).hex())
        columns["timestamp"].append(record["started_us"] // 1000)
        columns["model_name"].append(record.get("model_name") or "unknown")
        columns["provider"].append(provider_of(record))
        columns["endpoint"].append(record.get("engine") or "")
        for name, key in (
            ("ttft_ms", "ttft_us"),
            ("tpot_ms", "tpot_us"),
            ("e2e_latency_ms", "e2e_us"),
            ("prefill_ms", "prefill_us"),
            ("decode_ms", "decode_us"),
        ):
            value = record.get(key)
            columns[name].append(None if value is None else value / 1000.0)
        columns["input_tokens"].append(record.get("input_tokens"))
        columns["output_tokens"].append(n_out)
        columns["tokens_per_second"].append(n_out / (e2e / 1e6) if e2e and n_out else None)
        columns["gpu_utilization_percent"].append(None)
        columns["memory_utilization_percent"].append(None)
        columns["kv_cache_utilization_percent"].append(None)
        columns["error_occurred"].append(not record.get("ok"))
        columns["error_type"].append(record.get("error_type"))
        columns["device_id"].append(record["device_id"])
        columns["strategy"].append(record.get("strategy"))
        columns["received_at"].append(row["received_us"])
    return pa.Table.from_pydict(columns, schema=schema())


def arrow_ipc(rows: Sequence[dict[str, Any]]) -> bytes:
    pa = _pyarrow()
    sink = io.BytesIO()
    data = table(rows)
    with pa.ipc.new_stream(sink, data.schema) as writer:
        writer.write_table(data)
    return sink.getvalue()


def parquet(rows: Sequence[dict[str, Any]]) -> bytes:
    pa = _pyarrow()
    sink = io.BytesIO()
    pa.parquet.write_table(table(rows), sink)
    return sink.getvalue()
