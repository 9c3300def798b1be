"""The read API: measurements by time range, device, model and strategy (JSON, NDJSON, CSV, Arrow IPC, Parquet,
Protocol Buffers), and summaries.

``GET /api/v1/measurements?device=&model=&strategy=&kind=&since=&until=&limit=&cursor=&order=&format=``
``GET /api/v1/summary?device=&model=&strategy=&kind=&since=&until=&group_by=&format=json`` (JSON only)

A summary reads at most :data:`MAX_SUMMARY_ROWS` requests (the most recently received that match) and answers at most
``server.max_read_series`` groups (those with the most requests); ``truncated`` says what was left out and how to
narrow the query. Through a ``reads.BoundedStore`` the Python-side work honours ``server.max_query_seconds`` as the
SQL does (503 past it).

Times are ISO 8601 (``2026-11-27T10:00:00Z``) or Unix seconds; ``since`` is inclusive, ``until`` exclusive, both
on the device's start time. Pages follow the order of receipt (``order=oldest``, the default) or its reverse
(``order=newest``: the latest first); ``cursor`` is the ``next_cursor`` of the previous page. A bad parameter is
a 400 that names it.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
import uuid
from datetime import datetime, timezone
from typing import Any

from aiohttp import web

from lens_core import record_schema, wire
from lens_core.stats import latency_distribution

from . import rows as rows_mod
from .reads import deadline_of, truncation
from .store import Query, Store

FORMATS = ("json", "ndjson", "csv", "arrow", "parquet", "protobuf")
MAX_LIMIT = 10_000
MAX_ANSWER_BYTES = 32 * 1024**2  # a JSON page ends early (with next_cursor) rather than grow past this
MAX_FILTER_CHARS = 256  # device, model, strategy, kind: as long as the record schema allows
MAX_SUMMARY_ROWS = 250_000  # requests one summary reads (the most recently received that match)
DEFAULT_MAX_GROUPS = 100  # server.max_read_series
CSV_COLUMNS = (
    "id",
    "device_id",
    "run_id",
    "kind",
    "strategy",
    "model_name",
    "engine",
    "started_at",
    "received_at",
    "ok",
    "error_type",
    "input_tokens",
    "output_tokens",
    "ttft_ms",
    "tpot_ms",
    "e2e_ms",
)


class BadParameter(Exception):
    """A 400 naming the query parameter, its value and what is allowed."""

    status = 400

    def __init__(self, name: str, value: str, allowed: str) -> None:
        self.name, self.value, self.allowed = name, value, allowed
        super().__init__(f"query parameter {name}={value!r} is not allowed: expected {allowed}")


class FormatUnavailable(BadParameter):
    """A 501: a documented format whose optional runtime this aggregator lacks (the request is valid; the server
    cannot serve it), as the campaign export answers (``format_unavailable``)."""

    status = 501

    def __init__(self, fmt: str, extra: str, runtime: str, others: str) -> None:
        self.name, self.value, self.allowed = "format", fmt, others
        Exception.__init__(
            self,
            f"format={fmt} needs {runtime}, which this aggregator does not have: pip install "
            f"'llm-latency-lens[{extra}]' ({others} need nothing more)",
        )


def name_filter(name: str, value: str | None) -> str | None:
    """A name parameter (device, model, strategy, kind, compare, …) checked: at most :data:`MAX_FILTER_CHARS`
    characters, no NUL; empty or absent is None."""
    if value is not None and (len(value) > MAX_FILTER_CHARS or "\x00" in value):
        raise BadParameter(name, value[:40], f"at most {MAX_FILTER_CHARS} characters, without NUL")
    return value or None


MAX_TIME_US = 253_402_300_799_999_999  # 9999-12-31T23:59:59.999999Z
_TIME_ALLOWED = "an ISO 8601 time (2026-11-27T10:00:00Z) or Unix seconds, from 1970 to 9999"


def _time_us(name: str, value: str | None) -> int | None:
    if value is None or value == "":
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = None
    if seconds is not None:
        if not math.isfinite(seconds) or not 0 <= seconds * 1_000_000 <= MAX_TIME_US:
            raise BadParameter(name, value, _TIME_ALLOWED)
        return int(seconds * 1_000_000)
    try:
        when = datetime.fromisoformat(value.replace("Z", "+00:00"))
        if when.tzinfo is None:
            when = when.replace(tzinfo=timezone.utc)
        us = int(when.timestamp() * 1_000_000)
    except (ValueError, OverflowError):
        raise BadParameter(name, value, _TIME_ALLOWED) from None
    if not 0 <= us <= MAX_TIME_US:
        raise BadParameter(name, value, _TIME_ALLOWED)
    return us


def _int(name: str, value: str | None, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    if len(value) > 24:
        raise BadParameter(name, value[:40], f"an integer between {low} and {high}")
    try:
        number = int(value)
    except ValueError:
        raise BadParameter(name, value, f"an integer between {low} and {high}") from None
    if not low <= number <= high:
        raise BadParameter(name, value, f"an integer between {low} and {high}")
    return number


FILTERS = {"device", "model", "strategy", "kind", "since", "until"}
KNOWN = FILTERS | {"limit", "cursor", "format", "order"}  # GET /api/v1/measurements
SUMMARY_KNOWN = FILTERS | {"group_by", "format"}  # GET /api/v1/summary
SUMMARY_FORMATS = ("json",)  # a summary is one JSON document; the other formats are the measurements export's


def parse_query(params: Any, known: set[str] = KNOWN) -> Query:
    """The filters of a read, every parameter checked first: one the endpoint does not take is a 400 naming it
    (never silently ignored)."""
    unknown = sorted(set(params) - known)
    if unknown:
        raise BadParameter(unknown[0], params[unknown[0]], "one of the parameters " + ", ".join(sorted(known)))
    for name in ("device", "model", "strategy", "kind"):
        name_filter(name, params.get(name))
    query = Query(
        device=params.get("device") or None,
        model=params.get("model") or None,
        strategy=params.get("strategy") or None,
        kind=params.get("kind") or None,
        since_us=_time_us("since", params.get("since")),
        until_us=_time_us("until", params.get("until")),
    )
    if query.since_us is not None and query.until_us is not None and query.until_us <= query.since_us:
        raise BadParameter("until", params["until"], "a time after since")
    return query


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="microseconds").replace("+00:00", "Z")


def _ms(us: int | None) -> float | None:
    return None if us is None else us / 1000.0


def measurement_view(row: dict[str, Any], now_us: int | None = None) -> str | None:
    """The stored record, decoded back to the measurement's own shape, with the aggregator's receive time, as
    strict JSON; None (skipped and counted) when the stored row does not decode or serialise, or is outside the
    record schema (a row stored before one of its bounds existed): the protobuf export holds every row to the same
    schema, so both serve the same rows."""
    wire_record = rows_mod.decode_wire(row)
    if wire_record is None:
        return None
    try:
        record_schema.check_record(wire_record, time.time_ns() // 1000 if now_us is None else now_us)
        record = wire.from_wire(wire_record)
        record["received_at"] = _iso(row["received_us"])
        return json.dumps(record, allow_nan=False)
    except rows_mod.DECODE_ERRORS as exc:
        rows_mod.skipped(row, exc)
        return None


def _protobuf_page(rows: list[dict[str, Any]]) -> tuple[bytes, int | None, int]:
    """The rows as length-delimited ``llm_latency_lens.v1.InferenceMeasurement`` messages, within MAX_ANSWER_BYTES
    (at least one row), as the JSON page is; a row that does not decode or encode is skipped and counted. Returns
    (body, seq of the last row included or None, rows of the page skipped)."""
    from lens_core import protobuf

    parts: list[bytes] = []
    size = skipped = 0
    now_us = time.time_ns() // 1000
    for index, row in enumerate(rows):
        if parts and size > MAX_ANSWER_BYTES:
            return b"".join(parts), rows[index - 1]["seq"], skipped
        record = rows_mod.decode_wire(row)
        if record is None:
            skipped += 1
            continue
        try:
            message = protobuf.wire_to_message(record, now_us=now_us, received_us=row["received_us"])
        except rows_mod.DECODE_ERRORS as exc:  # a row stored before a bound existed: skipped, as every read does
            rows_mod.skipped(row, exc)
            skipped += 1
            continue
        part = protobuf.delimited([message])
        parts.append(part)
        size += len(part)
    return b"".join(parts), None, skipped


def _views(rows: list[dict[str, Any]]) -> tuple[list[str], int | None, int]:
    """The rows' JSON texts, within MAX_ANSWER_BYTES (at least one row): a page ends early, and says where the next
    one starts, rather than build an answer of any size. Returns (texts, seq of the last row included or None, rows
    of the page skipped: not decodable or outside the record schema, each logged and counted)."""
    texts: list[str] = []
    size = skipped = 0
    now_us = time.time_ns() // 1000
    for index, row in enumerate(rows):
        if texts and size > MAX_ANSWER_BYTES:
            return texts, rows[index - 1]["seq"], skipped
        text = measurement_view(row, now_us)
        if text is None:
            skipped += 1
        else:
            texts.append(text)
            size += len(text)
    return texts, None, skipped


FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n")


def csv_cell(value: Any) -> Any:
    """A CSV cell a spreadsheet will not run: text starting like a formula (=, +, -, @, tab, CR, LF) gets a leading
    apostrophe (OWASP's advice); numbers and empty cells are written as they are."""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    return value


def csv_row(row: dict[str, Any]) -> dict[str, Any] | None:
    """A row for the CSV export, escaped; None (skipped and counted) when its columns cannot be served."""
    try:
        flat = flat_row(row)
    except rows_mod.DECODE_ERRORS as exc:
        rows_mod.skipped(row, exc)
        return None
    return {key: csv_cell(value) for key, value in flat.items()}


def flat_row(row: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": str(uuid.UUID(bytes=bytes(row["id"]))),  # as in the JSON answer
        "device_id": row["device_id"],
        "run_id": row["run_id"],
        "kind": row["kind"],
        "strategy": row["strategy"],
        "model_name": row["model_name"],
        "engine": row["engine"],
        "started_at": _iso(row["started_us"]),
        "received_at": _iso(row["received_us"]),
        "ok": "true" if row["ok"] else "false",  # as JSON writes it (not Python's True/False)
        "error_type": row["error_type"],
        "input_tokens": row["input_tokens"],
        "output_tokens": row["output_tokens"],
        "ttft_ms": _ms(row["ttft_us"]),
        "tpot_ms": _ms(row["tpot_us"]),
        "e2e_ms": _ms(row["e2e_us"]),
    }


def measurements_response(store: Store, params: Any) -> web.Response:
    query = parse_query(params)
    limit = _int("limit", params.get("limit"), 100, 1, MAX_LIMIT)
    cursor = _int("cursor", params.get("cursor"), 0, 0, 2**62)
    fmt = params.get("format") or "json"
    if fmt not in FORMATS:
        raise BadParameter("format", fmt, "json, ndjson, csv, arrow, parquet or protobuf")
    order = params.get("order") or "oldest"
    if order not in ("oldest", "newest"):
        raise BadParameter("order", order, "oldest (the default: in the order received) or newest (newest first)")
    if order == "newest":  # the cursor is where the previous page ended: older rows come next
        rows = store.query_newest(query, limit=limit, before_seq=cursor or None)
    else:
        rows = store.query(query, limit=limit, after_seq=cursor)
    next_cursor = rows[-1]["seq"] if len(rows) == limit else None
    texts: list[str] = []
    skipped = 0  # rows of this page left out (X-Skipped-Rows; the JSON page's skipped_rows)
    if fmt in ("json", "ndjson"):
        texts, cut_at, skipped = _views(rows)
        if cut_at is not None:
            next_cursor = cut_at
    if fmt == "protobuf":
        try:
            from lens_core import protobuf
        except ImportError:
            raise FormatUnavailable(fmt, "protobuf", "the protobuf runtime", "json, ndjson, csv") from None
        body, cut_at, skipped = _protobuf_page(rows)
        if cut_at is not None:
            next_cursor = cut_at
        headers = {"Content-Type": protobuf.MEASUREMENTS_MEDIA_TYPE, "X-Skipped-Rows": str(skipped)}
        if next_cursor is not None:
            headers["X-Next-Cursor"] = str(next_cursor)
        return web.Response(body=body, headers=headers)
    headers = {"X-Next-Cursor": str(next_cursor)} if next_cursor is not None else {}
    if fmt in ("arrow", "parquet"):
        from . import arrow

        try:
            body = arrow.arrow_ipc(rows) if fmt == "arrow" else arrow.parquet(rows)
        except arrow.ArrowUnavailable:
            raise FormatUnavailable(fmt, "arrow", "pyarrow", "json, ndjson, csv") from None
        content_type = "application/vnd.apache.arrow.stream" if fmt == "arrow" else "application/vnd.apache.parquet"
        return web.Response(body=body, content_type=content_type, headers=headers)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS)
        writer.writeheader()
        for row in rows:
            flat = csv_row(row)
            if flat is None:
                skipped += 1
            else:
                writer.writerow(flat)
        headers["X-Skipped-Rows"] = str(skipped)
        return web.Response(text=out.getvalue(), content_type="text/csv", headers=headers)
    headers["X-Skipped-Rows"] = str(skipped)
    if fmt == "ndjson":
        return web.Response(text="".join(t + "\n" for t in texts), content_type="application/x-ndjson", headers=headers)
    page = (
        '{"measurements": ['
        + ", ".join(texts)
        + '], "next_cursor": '
        + json.dumps(next_cursor)
        + ', "skipped_rows": '
        + str(skipped)
        + "}"
    )
    return web.Response(text=page, content_type="application/json", headers=headers)


_NUMBER = (int, float)


def _summary_row_ok(row: tuple[Any, ...]) -> bool:
    """(key, ok, ttft_us, tpot_us, e2e_us, output_tokens, error_type) of the types the summary computes with."""
    for value in row[2:6]:
        if value is not None and (type(value) not in _NUMBER or not math.isfinite(value)):
            return False
    return row[6] is None or isinstance(row[6], str)


def summary_response(store: Store, params: Any, max_groups: int | None = None) -> web.Response:
    query = parse_query(params, SUMMARY_KNOWN)
    fmt = params.get("format") or "json"
    if fmt not in SUMMARY_FORMATS:
        raise BadParameter(
            "format", fmt[:40], "json (the summary is JSON only; /api/v1/measurements?format= exports the records)"
        )
    group_by = params.get("group_by") or ""
    columns = {"": None, "device": "device_id", "model": "model_name", "strategy": "strategy"}
    if group_by not in columns:
        raise BadParameter("group_by", group_by, "device, model or strategy")
    if max_groups is None:
        max_groups = getattr(store, "max_series", DEFAULT_MAX_GROUPS)
    deadline = deadline_of(store)
    key = columns[group_by]
    inference = Query(**{**query.__dict__, "kind": query.kind or "inference"})
    rows = store.latest_columns(
        inference,
        [key or "'all'", "ok", "ttft_us", "tpot_us", "e2e_us", "output_tokens", "error_type"],
        MAX_SUMMARY_ROWS,
        by_event=True,
    )
    check = deadline.every(20_000)
    groups: dict[str, list[tuple[Any, ...]]] = {}
    for row in rows:
        check()
        if not _summary_row_ok(row):
            rows_mod.skipped({"seq": None}, TypeError(f"summary columns of unexpected types: {row[1:]!r}"[:200]))
            continue
        groups.setdefault(str(row[0]), []).append(row)
    shown = sorted(sorted(groups, key=lambda name: (-len(groups[name]), name))[:max_groups])
    out = {}
    for name in shown:
        deadline.check()
        members = groups[name]
        ok = [m for m in members if m[1]]
        errors: dict[str, int] = {}
        for m in members:
            if not m[1]:
                errors[m[6] or "unknown"] = errors.get(m[6] or "unknown", 0) + 1
        out[name] = {
            "requests": len(members),
            "errors": dict(sorted(errors.items(), key=lambda kv: -kv[1])[:max_groups]),
            "latency_metrics": {
                metric: dist
                for metric, values in (
                    ("time_to_first_token", [m[2] / 1000 for m in ok if m[2] is not None]),
                    ("time_per_output_token", [m[3] / 1000 for m in ok if m[3] is not None]),
                    ("end_to_end_latency", [m[4] / 1000 for m in ok if m[4] is not None]),
                )
                if (dist := latency_distribution(values)) is not None
            },
            "output_tokens": sum(m[5] or 0 for m in ok),
        }
        if len(errors) > max_groups:
            out[name]["errors_truncated"] = truncation(
                len(errors) - max_groups, "error types (server.max_read_series)", "/api/v1/measurements?…"
            )
    answer: dict[str, Any] = {
        "group_by": group_by or None,
        "since": params.get("since"),
        "until": params.get("until"),
        "groups": out,
    }
    truncated: dict[str, Any] = {}
    if len(groups) > len(shown):
        left = [name for name in groups if name not in out]
        truncated["groups"] = truncation(
            len(left),
            f"groups beyond the {max_groups} with the most requests (server.max_read_series), "
            f"{sum(len(groups[name]) for name in left):,} requests",
            "device=, model=, strategy=, since= or until=",
        )
    if len(rows) >= MAX_SUMMARY_ROWS:
        truncated["rows"] = {
            "limit": MAX_SUMMARY_ROWS,
            "message": f"truncated: only the {MAX_SUMMARY_ROWS:,} matching requests that ran last were "
            "read; narrow the query with since=, until=, device= or model=",
        }
    if truncated:
        answer["truncated"] = truncated
    return web.json_response(answer)
