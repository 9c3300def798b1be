"""A campaign's results from its ``campaign_level`` records: per device, per device class, and as exports.

Input: the decoded ``campaign_level`` records of one campaign (``Store.campaign_levels``; docs/campaigns.md §4): each
carries ``device_id``, ``ext.campaign = {id, level_run, model, workload, level, …}`` and ``ext.results``, the level's
results document (the seed's results schema, as ``lens-agent bench --suite`` writes it). Everything in a record was
sent by a device and is hostile until checked here:

- A record whose shape is wrong — not a map, no device id, names that are not short text, a results document that
  is not a map or does not serialise as strict JSON, a figure that is not a finite number in its range (NaN, ±inf,
  1e308, a negative latency, an error rate above 1, more errors than requests) — is skipped whole and counted
  (``skipped_documents``, with the first reasons in ``skip_reasons``). A figure that is merely absent (no TTFT when
  every request failed, no J/token without a power source) is ``None``, never a made-up value.
- Rows are bounded: at most ``max_levels_per_device`` model × workload × level rows per device and ``max_rows`` in
  all; a row past either bound is dropped and counted (``rows_dropped``), whichever bound it hit.
- Names lose their control and invisible characters (as Prometheus labels do) and are at most
  :data:`MAX_NAME_CHARS` characters; the device's class comes from the caller (the aggregator's own view of the
  device's facts), ``unknown`` when it has none.

A device's figure for a level is read from its document (``p50_ms``/``p95_ms`` of TTFT, TPOT and e2e, tokens per
second, the median J per output token, the error rate). A class row's figure is the median over the class's devices
of each device's figure (devices without the figure left out), with the min, median and max across those devices in
``spread``.

Exports (one row per device × model × workload × level, :data:`COLUMNS`): ``json``, ``csv`` (text cells that start
like a formula are escaped, as the query API's CSV export does), ``parquet`` and ``arrow`` (an Arrow IPC stream),
the last two through the optional ``pyarrow`` extra (:class:`aggregator.arrow.ArrowUnavailable` when it is missing:
the API answers 501 naming the extra); and ``protobuf``: length-delimited ``llm_latency_lens.v1.BenchmarkResults``
messages, one a row, each with its results document and the row's keys (``campaign_level``), through the optional
``protobuf`` extra (:class:`ProtobufUnavailable` when it is missing).
"""

from __future__ import annotations

import csv
import functools
import io
import json
import math
import re
import statistics
import sys
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from .metrics import clean_label

FORMATS = {
    "json": "application/json",
    "csv": "text/csv",
    "parquet": "application/vnd.apache.parquet",
    "arrow": "application/vnd.apache.arrow.stream",
    "protobuf": "application/x-protobuf; proto=llm_latency_lens.v1.BenchmarkResults; delimited=true",
}
MAX_NAME_CHARS = 200
MAX_DOCUMENT_BYTES = 1 << 20  # one results document, as JSON
MAX_ROWS = 200_000
MAX_LEVELS_PER_DEVICE = 1_000
MAX_SKIP_REASONS = 20
UNKNOWN_CLASS = "unknown"

# (column, where in the results document, the largest value allowed); all must be finite and ≥ 0
_MAX_MS = 1e9  # ~11.6 days: more than any campaign's deadline (7 days at most)
_LATENCY = (
    ("ttft_p50_ms", ("latency_metrics", "time_to_first_token", "p50_ms")),
    ("ttft_p95_ms", ("latency_metrics", "time_to_first_token", "p95_ms")),
    ("tpot_p50_ms", ("latency_metrics", "time_per_output_token", "p50_ms")),
    ("tpot_p95_ms", ("latency_metrics", "time_per_output_token", "p95_ms")),
    ("e2e_p50_ms", ("latency_metrics", "end_to_end_latency", "p50_ms")),
    ("e2e_p95_ms", ("latency_metrics", "end_to_end_latency", "p95_ms")),
)
_OTHER: tuple[tuple[str, tuple[str, ...], float], ...] = (
    ("tokens_per_second", ("throughput_metrics", "tokens_per_second"), 1e7),
    ("j_per_output_token", ("energy", "j_per_output_token", "median"), 1e6),
    ("error_rate", ("error_metrics", "error_rate"), 1.0),
)
_MAX_COUNT = 10**9
METRICS = tuple(name for name, _ in _LATENCY) + tuple(name for name, _, _ in _OTHER)
KEY_COLUMNS = ("device_id", "device_class", "model", "workload", "level")
COLUMNS = (*KEY_COLUMNS, "requests", "errors", *METRICS)


class Malformed(ValueError):
    """Why one record cannot be used (it is skipped and counted)."""


class Row(NamedTuple):
    """One device × model × workload × level: its figures and its results document."""

    device_id: str
    device_class: str
    model: str
    workload: str
    level: str
    requests: int | None
    errors: int | None
    figures: dict[str, float | None]  # METRICS → value
    document: dict[str, Any]

    def flat(self) -> dict[str, Any]:
        return {
            "device_id": self.device_id,
            "device_class": self.device_class,
            "model": self.model,
            "workload": self.workload,
            "level": self.level,
            "requests": self.requests,
            "errors": self.errors,
            **self.figures,
        }


@dataclass
class CampaignResults:
    """Every usable row (sorted by device, model, workload, level) and what was left out."""

    rows: list[Row] = field(default_factory=list)
    skipped_documents: int = 0
    skip_reasons: list[str] = field(default_factory=list)
    rows_dropped: int = 0

    def skip(self, reason: str) -> None:
        self.skipped_documents += 1
        if len(self.skip_reasons) < MAX_SKIP_REASONS:
            self.skip_reasons.append(reason[:300])

    def notes(self) -> dict[str, Any]:
        """What an answer says about the records it left out."""
        out: dict[str, Any] = {"skipped_documents": self.skipped_documents}
        if self.skip_reasons:
            out["skip_reasons"] = list(self.skip_reasons)
        if self.rows_dropped:
            out["rows_dropped"] = self.rows_dropped
        return out


# -- reading one record ----------------------------------------------------------------------------------------------
def _name(value: Any, what: str) -> str:
    if type(value) is not str:
        raise Malformed(f"{what} is a {type(value).__name__}, not text")
    if not value or len(value) > MAX_NAME_CHARS:
        raise Malformed(f"{what} is {len(value):,} characters long (1 to {MAX_NAME_CHARS})")
    cleaned, _, _ = clean_label(value, MAX_NAME_CHARS)
    return cleaned


def _number(value: Any, where: str, top: float) -> float:
    if type(value) not in (int, float):  # bool is not a figure
        raise Malformed(f"{where} is a {type(value).__name__}, not a number")
    if type(value) is int and not 0 <= value <= top:  # before float(): 10**400 does not convert
        raise Malformed(f"{where} = {_shown(value)} is outside 0 … {top:g}")
    number = float(value)
    if not math.isfinite(number) or not 0.0 <= number <= top:
        raise Malformed(f"{where} = {_shown(value)} is outside 0 … {top:g}")
    return number


def _shown(value: Any) -> str:
    """A value for a message: at most 40 characters (an int of 5,000 digits has no repr)."""
    try:
        return repr(value)[:40]
    except ValueError:
        return f"an integer of more than {sys.get_int_max_str_digits():,} digits"


def _count(value: Any, where: str) -> int | None:
    if value is None:
        return None
    if type(value) is not int or not 0 <= value <= _MAX_COUNT:
        raise Malformed(f"{where} = {_shown(value)} is not a count from 0 to {_MAX_COUNT:,}")
    return int(value)


def _at(section: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    """The value at ``path``, None when any step is absent or null; Malformed when a step is not a map."""
    value: Any = section
    for i, key in enumerate(path):
        if value is None:
            return None
        if type(value) is not dict:
            raise Malformed(f"results.{'.'.join(path[:i])} is a {type(value).__name__}, not a map")
        value = value.get(key)
    return value


def _figures(results: dict[str, Any]) -> tuple[int | None, int | None, dict[str, float | None]]:
    figures: dict[str, float | None] = {}
    for name, path in _LATENCY:
        value = _at(results, path)
        figures[name] = None if value is None else _number(value, "results." + ".".join(path), _MAX_MS)
    for name, other, top in _OTHER:
        value = _at(results, other)
        if value is None and name == "j_per_output_token":
            value = _at(results, (*other[:-1], "mean"))
        figures[name] = None if value is None else _number(value, "results." + ".".join(other), top)
    requests = _count(_at(results, ("requests", "measured")), "results.requests.measured")
    errors = _count(_at(results, ("error_metrics", "total_errors")), "results.error_metrics.total_errors")
    if requests is not None and errors is not None:
        if errors > requests:
            raise Malformed(f"results.error_metrics.total_errors {errors} is more than the {requests} requests")
        if figures["error_rate"] is None and requests:
            figures["error_rate"] = errors / requests
    return requests, errors, figures


def read_record(record: Any, classes: Mapping[str, str]) -> Row:
    """One ``campaign_level`` record as a row; :class:`Malformed` saying why it cannot be used."""
    if type(record) is not dict:
        raise Malformed(f"the record is a {type(record).__name__}, not a map")
    device = _name(record.get("device_id"), "device_id")
    ext = record.get("ext")
    if type(ext) is not dict:
        raise Malformed(f"device {device!r:.60}: ext is not a map")
    campaign, document = ext.get("campaign"), ext.get("results")
    if type(campaign) is not dict:
        raise Malformed(f"device {device!r:.60}: ext.campaign is not a map")
    if type(document) is not dict or type(document.get("results")) is not dict:
        raise Malformed(f"device {device!r:.60}: ext.results is not a results document (no results map)")
    model = _name(campaign.get("model"), "ext.campaign.model")
    workload = _name(campaign.get("workload"), "ext.campaign.workload")
    level = _name(campaign.get("level"), "ext.campaign.level")
    try:
        size = len(json.dumps(document, allow_nan=False, separators=(",", ":")))
    except (TypeError, ValueError, RecursionError) as exc:
        raise Malformed(f"device {device!r:.60}: ext.results does not serialise as JSON ({exc})"[:300]) from None
    if size > MAX_DOCUMENT_BYTES:
        raise Malformed(
            f"device {device!r:.60}: ext.results is {size:,} bytes as JSON (at most {MAX_DOCUMENT_BYTES:,})"
        )
    try:
        requests, errors, figures = _figures(document["results"])
    except Malformed as exc:
        raise Malformed(f"device {device!r:.60}, {model} / {workload} / {level}: {exc}") from None
    device_class = _caller_class(classes.get(record["device_id"]))
    return Row(device, device_class, model, workload, level, requests, errors, figures, document)


def _caller_class(value: Any) -> str:
    """The caller's view of a device's class, cleaned and cut (never a reason to skip its record)."""
    if type(value) is not str or not value:
        return UNKNOWN_CLASS
    cleaned, _, _ = clean_label(value[: MAX_NAME_CHARS * 4], MAX_NAME_CHARS)
    return cleaned


def _newer(record: Any, than: Any) -> bool:
    """Whether ``record`` was measured after ``than`` (both by ``started_us`` or both by ``started_at``); False
    when it cannot tell (the store hands the newest record of each key first)."""
    for key, kind in (("started_us", int), ("started_at", str)):
        a, b = record.get(key), than.get(key)
        if type(a) is kind and type(b) is kind:
            return bool(a > b)
    return False


_DIGITS = re.compile(r"(\d+)")


@functools.lru_cache(maxsize=4096)
def natural_key(text: str) -> tuple[Any, ...]:
    """``concurrency 2`` before ``concurrency 16``: digit runs compare as numbers."""
    return tuple((0, int(part), "") if part.isdigit() else (1, 0, part) for part in _DIGITS.split(text) if part)


def _row_key(row: Row) -> tuple[Any, ...]:
    return (row.device_id, natural_key(row.model), natural_key(row.workload), natural_key(row.level))


def collect(
    levels: Iterable[Any],
    classes: Mapping[str, str],
    *,
    max_rows: int = MAX_ROWS,
    max_levels_per_device: int = MAX_LEVELS_PER_DEVICE,
) -> CampaignResults:
    """The usable rows of ``levels``, one per device × model × workload × level (the newest when one comes twice),
    bounded; the rest skipped or dropped and counted."""
    out = CampaignResults()
    chosen: dict[tuple[str, str, str, str], tuple[Row, Any]] = {}
    per_device: dict[str, int] = {}
    for record in levels:
        try:
            row = read_record(record, classes)
        except Malformed as exc:
            out.skip(str(exc))
            continue
        key = (row.device_id, row.model, row.workload, row.level)
        held = chosen.get(key)
        if held is not None:
            if _newer(record, held[1]):
                chosen[key] = (row, record)
            continue
        if per_device.get(row.device_id, 0) >= max_levels_per_device or len(chosen) >= max_rows:
            out.rows_dropped += 1
            continue
        per_device[row.device_id] = per_device.get(row.device_id, 0) + 1
        chosen[key] = (row, record)
    out.rows = sorted((row for row, _ in chosen.values()), key=_row_key)
    return out


# -- per device, per class -------------------------------------------------------------------------------------------
def devices_of(collected: CampaignResults) -> dict[str, dict[str, Any]]:
    """``{device_id: {"device_class", "documents": [results documents, by model, workload, level]}}``."""
    devices: dict[str, dict[str, Any]] = {}
    for row in collected.rows:
        entry = devices.setdefault(row.device_id, {"device_class": row.device_class, "documents": []})
        entry["documents"].append(row.document)
    return devices


def _spread(values: list[float]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}


def classes_of(collected: CampaignResults) -> dict[str, list[dict[str, Any]]]:
    """``{device_class: [one row per model × workload × level]}``: each figure the median over the class's devices
    that have it (None when none has), ``spread`` the min/median/max across them, ``devices`` how many devices
    reported the level."""
    groups: dict[str, dict[tuple[str, str, str], list[Row]]] = {}
    for row in collected.rows:
        groups.setdefault(row.device_class, {}).setdefault((row.model, row.workload, row.level), []).append(row)
    out: dict[str, list[dict[str, Any]]] = {}
    for device_class in sorted(groups):
        table = []
        for (model, workload, level), rows in sorted(
            groups[device_class].items(), key=lambda kv: tuple(natural_key(part) for part in kv[0])
        ):
            entry: dict[str, Any] = {"model": model, "workload": workload, "level": level, "devices": len(rows)}
            spread: dict[str, dict[str, float]] = {}
            for metric in METRICS:
                values = [v for v in (r.figures[metric] for r in rows) if v is not None]
                entry[metric] = statistics.median(values) if values else None
                if values:
                    spread[metric] = _spread(values)
            entry["spread"] = spread
            table.append(entry)
        out[device_class] = table
    return out


def device_results(levels: Iterable[Any], classes: Mapping[str, str]) -> dict[str, dict[str, Any]]:
    """Per device: its class and its results documents (see :func:`devices_of`)."""
    return devices_of(collect(levels, classes))


def class_rows(levels: Iterable[Any], classes: Mapping[str, str]) -> dict[str, list[dict[str, Any]]]:
    """Per device class: the comparison table (see :func:`classes_of`)."""
    return classes_of(collect(levels, classes))


def results(
    levels: Iterable[Any], classes: Mapping[str, str], states: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """The ``results`` member of ``GET /api/v1/benchmark/{id}/results``: ``devices``, ``classes`` and what was
    left out (``skipped_documents``, ``skip_reasons``, ``rows_dropped``). ``states``: each targeted device's job
    state (``{device_id: state}``, from the campaign's jobs): every one of them is listed, with its state, also
    before it has sent a document; without it, only devices with documents are, without a state."""
    collected = collect(levels, classes)
    devices = devices_of(collected)
    if states is not None:
        for device_id, state in states.items():
            entry = devices.setdefault(
                device_id, {"device_class": _caller_class(classes.get(device_id)), "documents": []}
            )
            entry["state"] = state
        for entry in devices.values():
            entry.setdefault("state", None)
        devices = {device_id: devices[device_id] for device_id in sorted(devices)}
    return {"devices": devices, "classes": classes_of(collected), **collected.notes()}


# -- exports ---------------------------------------------------------------------------------------------------------
FORMULA_PREFIXES = ("=", "+", "-", "@", "\t", "\r", "\n")


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, str) and value.startswith(FORMULA_PREFIXES):
        return "'" + value
    if isinstance(value, float):
        return repr(value)  # round-trips exactly
    return value


def arrow_schema() -> Any:
    from .arrow import _pyarrow

    pa = _pyarrow()
    text = [pa.field(name, pa.utf8(), nullable=False) for name in KEY_COLUMNS]
    counts = [pa.field(name, pa.int64()) for name in ("requests", "errors")]
    return pa.schema(text + counts + [pa.field(name, pa.float64()) for name in METRICS])


def arrow_table(collected: CampaignResults) -> Any:
    from .arrow import _pyarrow

    pa = _pyarrow()
    schema = arrow_schema()
    columns: dict[str, list[Any]] = {name: [] for name in COLUMNS}
    for row in collected.rows:
        for name, value in row.flat().items():
            columns[name].append(value)
    return pa.Table.from_pydict(columns, schema=schema)


class Export(NamedTuple):
    """An export's bytes, its content type and what it left out (:meth:`CampaignResults.notes`: the JSON export's
    ``skipped_documents``, ``skip_reasons`` and ``rows_dropped``, counted after the format's own encoding)."""

    body: bytes
    content_type: str
    notes: dict[str, Any]

    def headers(self) -> dict[str, str]:
        """The notes as response headers, for every format: ``X-Skipped-Documents`` and ``X-Rows-Dropped`` (always
        present, 0 when nothing was left out) and ``X-Skip-Reason`` (the first reason, ASCII, when any)."""
        out = {
            "X-Skipped-Documents": str(self.notes["skipped_documents"]),
            "X-Rows-Dropped": str(self.notes.get("rows_dropped", 0)),
        }
        reasons = self.notes.get("skip_reasons")
        if reasons:
            out["X-Skip-Reason"] = reasons[0].encode("unicode_escape").decode("ascii")[:300]
        return out


def export(
    levels: Iterable[Any],
    classes: Mapping[str, str],
    fmt: str,
    *,
    benchmark_id: str | None = None,
    max_rows: int = MAX_ROWS,
) -> tuple[bytes, str]:
    """(the export's bytes, its content type). ``fmt``: one of :data:`FORMATS` (else ValueError naming them);
    ``parquet`` and ``arrow`` raise :class:`aggregator.arrow.ArrowUnavailable` without pyarrow (answer 501)."""
    answer = export_answer(levels, classes, fmt, benchmark_id=benchmark_id, max_rows=max_rows)
    return answer.body, answer.content_type


def export_answer(
    levels: Iterable[Any],
    classes: Mapping[str, str],
    fmt: str,
    *,
    benchmark_id: str | None = None,
    max_rows: int = MAX_ROWS,
) -> Export:
    """:func:`export` with what it left out (:class:`Export`)."""
    if fmt not in FORMATS:
        raise ValueError(f"format {fmt!r:.40} is not one of {', '.join(FORMATS)}")
    collected = collect(levels, classes, max_rows=max_rows)
    body = export_collected(collected, fmt, benchmark_id=benchmark_id)
    return Export(body, FORMATS[fmt], collected.notes())


class ProtobufUnavailable(LookupError):
    pass


def protobuf_export(collected: CampaignResults, benchmark_id: str | None) -> bytes:
    """One ``BenchmarkResults`` a row: the level's results document and the row's keys. A value a typed field
    cannot hold is left to ``document``, as it is (``lens_core.protobuf.results_message``); a document no message
    can carry (nesting past protobuf's bound, …) is skipped and counted in ``collected`` (``skipped_documents``,
    ``skip_reasons``), as the other exports' malformed records are: the answer's ``X-Skipped-Documents`` says so."""
    try:
        from lens_core import protobuf
    except ImportError:
        raise ProtobufUnavailable(
            "format=protobuf needs the protobuf runtime: pip install 'llm-latency-lens[protobuf]'"
        ) from None
    messages = []
    for row in collected.rows:
        try:
            message = protobuf.results_message(row.document)
            if benchmark_id is not None:
                message.benchmark_id = benchmark_id
            level = message.campaign_level
            level.device_id, level.device_class, level.model = row.device_id, row.device_class, row.model
            level.workload, level.level = row.workload, row.level
            if row.requests is not None:
                level.requests = row.requests
            if row.errors is not None:
                level.errors = row.errors
        except protobuf.ProtobufError as exc:
            collected.skip(f"{row.device_id[:64]} / {row.model[:64]} / {row.level[:64]}: {exc}"[:300])
            continue
        except (ValueError, TypeError, OverflowError, RecursionError) as exc:  # a codec bug: the row, not the answer
            collected.skip(f"{row.device_id[:64]} / {row.model[:64]} / {row.level[:64]}: does not encode "
                           f"({type(exc).__name__}: {exc})"[:300])  # fmt: skip
            continue
        messages.append(message)
    return protobuf.delimited(messages)


def export_collected(collected: CampaignResults, fmt: str, *, benchmark_id: str | None = None) -> bytes:
    if fmt == "protobuf":
        return protobuf_export(collected, benchmark_id)
    if fmt == "json":
        body: dict[str, Any] = {"format_version": "1"}
        if benchmark_id is not None:
            body["benchmark_id"] = benchmark_id
        body["columns"] = list(COLUMNS)
        body["rows"] = [row.flat() for row in collected.rows]
        body.update(collected.notes())
        return json.dumps(body, allow_nan=False, separators=(",", ":")).encode()
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\r\n")
        writer.writerow(COLUMNS)
        for row in collected.rows:
            writer.writerow([_csv_cell(value) for value in row.flat().values()])
        return out.getvalue().encode()
    from .arrow import _pyarrow

    pa = _pyarrow()
    table = arrow_table(collected)
    sink = io.BytesIO()
    if fmt == "arrow":
        with pa.ipc.new_stream(sink, table.schema) as writer:
            writer.write_table(table)
    elif fmt == "parquet":
        pa.parquet.write_table(table, sink)
    else:
        raise ValueError(f"format {fmt!r:.40} is not one of {', '.join(FORMATS)}")
    return sink.getvalue()
