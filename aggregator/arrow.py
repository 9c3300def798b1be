"""Arrow IPC and Parquet exports, in the seed's Arrow schema (§6.3), through the optional ``pyarrow`` extra.

Differences from the seed: the latency fields are nullable (a failed request has no TTFT), and ``device_id``,
``strategy`` and ``received_at`` are added, since a fleet export without them cannot be grouped, and ``kind``
(``inference``, ``warmup``, …: a skipped or warm-up record is not an error). Ids are UUID text with dashes and times
are UTC (``timestamp[…, tz=UTC]``), as in the JSON and CSV exports.
"""

from __future__ import annotations

import io
import uuid
from collections.abc import Sequence
from typing import Any

from .rows import DECODE_ERRORS, decode_wire, skipped


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
            pa.field("timestamp", pa.timestamp("ms", tz="UTC"), nullable=False),
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
            pa.field("received_at", pa.timestamp("us", tz="UTC"), nullable=False),
            pa.field("kind", pa.utf8(), nullable=False),
        ]
    )


def table(rows: Sequence[dict[str, Any]]) -> Any:
    """Stored rows (``Store.query``) → a pyarrow Table in the export schema."""
    from .metrics import provider_of

    pa = _pyarrow()
    names = schema().names
    columns: dict[str, list[Any]] = {name: [] for name in names}
    for row in rows:
        record = decode_wire(row)
        if record is None:
            continue
        try:
            values = _values(row, record, provider_of(record))
        except DECODE_ERRORS as exc:
            skipped(row, exc)
            continue
        for name, value in zip(names, values, strict=True):
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=schema())


_DURATIONS = ("ttft_us", "tpot_us", "e2e_us", "prefill_us", "decode_us")


def _count(value: Any) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value < 2**32:
        raise TypeError(f"a token count must be an integer from 0 to 2^32 - 1, not {value!r}"[:120])
    return value


def _text(value: Any) -> str | None:
    if value is not None and type(value) is not str:
        raise TypeError(f"expected a string, not {type(value).__name__}")
    return value


def _values(row: dict[str, Any], record: dict[str, Any], provider: str) -> list[Any]:
    """One row of the export, in ``schema()`` order; TypeError for a stored record it cannot hold."""
    durations = []
    for key in _DURATIONS:
        value = record.get(key)
        if value is not None and type(value) is not int:
            raise TypeError(f"{key} must be an integer, not {type(value).__name__}")
        durations.append(None if value is None else value / 1000.0)
    e2e, n_out = record.get("e2e_us"), _count(record.get("output_tokens"))
    started = record["started_us"]
    if type(started) is not int or not 0 <= started < 2**62:
        raise TypeError(f"started_us must be a time in range, not {started!r}"[:120])
    return [
        str(uuid.UUID(bytes=bytes(row["id"]))),
        started // 1000,
        _text(record.get("model_name")) or "unknown",
        provider,
        _text(record.get("engine")) or "",
        *durations,
        _count(record.get("input_tokens")),
        n_out,
        n_out / (e2e / 1e6) if e2e and n_out else None,
        None,
        None,
        None,
        not record.get("ok"),
        _text(record.get("error_type")),
        _text(record["device_id"]),
        _text(record.get("strategy")),
        row["received_us"],
        _text(row["kind"]),
    ]


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
