"""The strict record schema: what the aggregator stores, so that every read path can serve what it stored.

:func:`lens_core.wire.validate_record` is the structural check both sides share (required fields, column types); the
agent uses it to screen out rows it cannot decode. :func:`check_record` adds everything a read path, an export, a
page or ``/metrics`` relies on, relative to the receiver's clock: exact types of every known field, finite
numbers, the time window, bounded durations, counts, strings, byte strings and the packed gaps' header, and
``ext`` (and any unknown top-level field) restricted to a bounded JSON-compatible subset. Decoding itself is
bounded in :mod:`lens_core.wire` (no CBOR tags, no msgpack extension types, nesting and lengths capped), so a record
that reaches this check is already a plain tree of ``dict``/``list``/``str``/``bytes``/``int``/``float``/``bool``/
``None``.

Every refusal names the record (index and id) and the field, the value's problem and what is allowed. The limits
are documented in docs/wire-format.md ("Record schema and limits").
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Callable
from operator import itemgetter
from typing import Any, NamedTuple

from . import guardrail_view
from .itlpack import _MAX_K, PACK_VERSION

RECORD_VERSION = 1
MIN_STARTED_US = 1_577_836_800_000_000  # 2020-01-01T00:00:00Z
MAX_FUTURE_US = 86_400_000_000  # started_us at most one day after the aggregator received it
MAX_DURATION_US = 86_400_000_000  # one day: any *_us duration
MAX_DURATION_MS = MAX_DURATION_US // 1000  # one day: any *_ms duration inside ext
MAX_COUNT = 2**31 - 1  # token counts, indices (a PostgreSQL integer; an Arrow uint32)
MAX_AMOUNT = 2**53  # bytes of memory and other amounts (exact in a JSON double)
MAX_INT64 = 2**63 - 1  # any other integer: a 64-bit signed integer
MAX_NAME_CHARS = 256  # identifiers and labels: device_id, run_id, kind, model_name, strategy, engine, …
MAX_MESSAGE_CHARS = 4096  # error_message, and any string inside ext
MAX_TEXT_CHARS = 262_144  # prompt_text, output_text (only sent with sync.include_text)
MAX_GAPS = 262_144  # inter-token gaps in itl_us
MAX_ITL_BYTES = 1_048_576  # packed gaps
MAX_RECORD_BYTES = 2 * 1_048_576  # one encoded record
MAX_EXT_DEPTH = 8  # nesting inside ext (ext itself is depth 1)
MAX_EXT_NODES = 4096  # values inside ext and unknown top-level fields, together
MAX_KEY_CHARS = 128  # a key inside ext
MAX_FIELDS = 128  # top-level fields of a record
MAX_DECODE_DEPTH = MAX_EXT_DEPTH + 4  # the decoders refuse deeper nesting before building it

_INT, _STR, _BYTES, _BOOL, _NONE, _DICT = int, str, bytes, bool, type(None), dict


class SchemaError(ValueError):
    """A record outside the schema: ``field`` names the offending field (dotted inside ext)."""

    def __init__(self, field: str, problem: str) -> None:
        self.field = field
        self.problem = problem
        super().__init__(f"field {field!r} {problem}")


# name → (kind, types allowed, low, high) for every field the agent writes. Kinds: range checks for "int"-like,
# length checks for "str"/"bytes", "json" for ext.
_DURATIONS = (
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "prefill_us",
    "decode_us",
    "engine_prefill_us",
    "engine_decode_us",
)
_COUNTS = ("input_tokens", "output_tokens", "engine_prefill_tokens", "engine_decode_tokens", "prompt_index")
_AMOUNTS = ("rss_before_bytes", "rss_peak_bytes")
_NAMES = (
    "device_id",
    "run_id",
    "kind",
    "model_name",
    "strategy",
    "engine",
    "error_type",
    "stop_reason",
    "rss_peak_source",
    "prompt_id",
)
_REQUIRED_NAMES = ("device_id", "run_id", "kind")
_MESSAGES = ("error_message",)
_TEXTS = ("prompt_text", "output_text")
_DIGESTS = ("model_sha256", "prompt_sha256")
_FLAGS = ("warmup", "first_after_load")

INT_RANGES: dict[str, tuple[int, int]] = {
    **{name: (0, MAX_DURATION_US) for name in _DURATIONS},
    **{name: (0, MAX_COUNT) for name in _COUNTS},
    **{name: (0, MAX_AMOUNT) for name in _AMOUNTS},
}
STR_LIMITS: dict[str, int] = {
    **{name: MAX_NAME_CHARS for name in _NAMES},
    **{name: MAX_MESSAGE_CHARS for name in _MESSAGES},
    **{name: MAX_TEXT_CHARS for name in _TEXTS},
}
KNOWN_FIELDS = frozenset({"v", "id", "started_us", "ok", "itl_us", "ext", *INT_RANGES, *STR_LIMITS, *_DIGESTS, *_FLAGS})
# The names the measurement record (``wire.from_wire``, the JSON export) gives the wire's fields where they differ
# from the wire's own, and the export's receive time: an unknown top-level field by one of these names would stand
# in for the real field in the JSON export, so the schema refuses it.
RECORD_NAMES = frozenset(
    {"version", "started_at", "received_at", "itl_ms", *(name[:-3] + "_ms" for name in _DURATIONS)}
)


def _allowed(name: str) -> str:
    """What the schema allows for a known field, in words."""
    if name in INT_RANGES:
        low, high = INT_RANGES[name]
        return f"an integer from {low} to {high} or null"
    if name in STR_LIMITS:
        required = name in _REQUIRED_NAMES
        return f"a string of at most {STR_LIMITS[name]} characters" + ("" if required else " or null")
    if name in _DIGESTS:
        return "32 bytes (a sha256 digest) or null"
    if name in _FLAGS:
        return "a boolean or null"
    return {
        "v": f"the integer {RECORD_VERSION}",
        "id": "16 bytes",
        "started_us": "an integer (Unix microseconds)",
        "ok": "a boolean",
        "itl_us": f"packed gaps: bytes (at most {MAX_ITL_BYTES}) or null",
        "ext": "a map with string keys",
    }[name]


def _describe(value: Any) -> str:
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return f"{value!r}"[:40]
    if isinstance(value, (str, bytes, list, dict)):
        return f"a {type(value).__name__} of length {len(value)}"
    return type(value).__name__


def _type_ok(name: str, kind: type) -> bool:
    if name in INT_RANGES:
        return kind is _INT or kind is _NONE
    if name in STR_LIMITS:
        return kind is _STR or (kind is _NONE and name not in _REQUIRED_NAMES)
    if name in _DIGESTS:
        return kind is _BYTES or kind is _NONE
    if name in _FLAGS:
        return kind is _BOOL or kind is _NONE
    if name == "itl_us":
        return kind is _BYTES or kind is _NONE
    if name == "ext":
        return kind is _DICT
    return {"v": _INT, "id": _BYTES, "started_us": _INT, "ok": _BOOL}[name] is kind


def _getter(names: list[str]) -> Callable[[dict[str, Any]], tuple[Any, ...]]:
    if len(names) == 1:
        name = names[0]
        return lambda record: (record[name],)
    return itemgetter(*names)


class _Plan:
    """The checks for one record shape (its keys and their value types), compiled once and reused: records of
    one agent share a handful of shapes, so the type checks cost one tuple hash per record. Compiling refuses a
    shape with a missing required field or a value of the wrong type."""

    __slots__ = ("all_ints", "digests", "int_groups", "itl", "json_fields", "str_groups")

    def __init__(self, keys: tuple[str, ...], types: tuple[type, ...]) -> None:
        ints: dict[tuple[int, int], list[str]] = {}
        strs: dict[int, list[str]] = {}
        self.digests: Callable[[dict[str, Any]], tuple[Any, ...]] | None = None
        self.itl = False
        self.json_fields: list[str] = []
        digests: list[str] = []
        for name in ("v", "id", "device_id", "run_id", "kind", "started_us", "ok"):
            if name not in keys:
                raise SchemaError(name, "is missing; it is required")
        for name, kind in zip(keys, types, strict=True):
            if name not in KNOWN_FIELDS:
                if name in RECORD_NAMES:
                    raise SchemaError(
                        name,
                        "is the name the measurement record gives a named field (in the JSON export); an extra "
                        "top-level field cannot take it",
                    )
                self.json_fields.append(name)
                continue
            if not _type_ok(name, kind):
                raise SchemaError(name, f"must be {_allowed(name)}, not {'null' if kind is _NONE else kind.__name__}")
            if kind is _NONE:
                continue
            if name in INT_RANGES:
                ints.setdefault(INT_RANGES[name], []).append(name)
            elif name in STR_LIMITS:
                strs.setdefault(STR_LIMITS[name], []).append(name)
            elif name in _DIGESTS:
                digests.append(name)
            elif name == "itl_us":
                self.itl = True
            elif name == "ext":
                self.json_fields.append(name)
        self.int_groups = [(_getter(names), names, low, high) for (low, high), names in ints.items()]
        every_int = [name for names in ints.values() for name in names]
        self.all_ints = _getter(every_int) if every_int else None
        self.str_groups = [(_getter(names), names, limit) for limit, names in strs.items()]
        if digests:
            self.digests = _getter(digests)


_PLANS: dict[tuple[tuple[str, ...], tuple[type, ...]], _Plan] = {}
_MAX_PLANS = 4096


def check_record(record: dict[str, Any], now_us: int) -> dict[str, Any]:
    """Refuse (:class:`SchemaError`) a record any read path could not serve. ``record`` is a map decoded by
    :func:`lens_core.wire.loads`; this covers :func:`lens_core.wire.validate_record`'s checks too (required fields and
    their types), so the aggregator's hot path runs only this (``wire.check_record``). ``now_us``: the receiver's
    clock (Unix microseconds), the upper end of the time window."""
    if len(record) > MAX_FIELDS:
        raise SchemaError("(record)", f"has {len(record)} fields; at most {MAX_FIELDS} are allowed")
    keys = tuple(record)
    shape = (keys, tuple(map(type, record.values())))
    plan = _PLANS.get(shape)
    if plan is None:
        for key in keys:
            if type(key) is not str:
                raise SchemaError(repr(key)[:40], "is not a string key; record field names are strings")
        plan = _Plan(*shape)
        if len(_PLANS) < _MAX_PLANS:
            _PLANS[shape] = plan
    if len(record["id"]) != 16:
        raise SchemaError("id", f"has {len(record['id'])} bytes; a record id has 16")
    if record["v"] != RECORD_VERSION:
        raise SchemaError("v", f"is {record['v']!r}; this aggregator reads record version {RECORD_VERSION}")
    started = record["started_us"]
    if not MIN_STARTED_US <= started <= now_us + MAX_FUTURE_US:
        raise SchemaError(
            "started_us",
            f"is {started} µs, outside the accepted window: from {MIN_STARTED_US} (2020-01-01) to one day after "
            f"the aggregator received it ({now_us + MAX_FUTURE_US}); check the device's clock (ext.clock)",
        )
    if plan.all_ints is not None:
        values = plan.all_ints(record)
        # every range starts at 0 and reaches at least MAX_COUNT: one min and one max settle the common case
        if min(values) < 0 or max(values) > MAX_COUNT:
            _check_int_groups(plan, record)
    for get, names, limit in plan.str_groups:
        values = get(record)
        if max(map(len, values)) > limit or (limit == MAX_NAME_CHARS and _NOT_IN_NAMES.search("".join(values))):
            for name, value in zip(names, values, strict=True):
                if len(value) > limit:
                    raise SchemaError(name, f"has {len(value)} characters; at most {limit} are allowed")
                if limit == MAX_NAME_CHARS:
                    check_name(name, value)
    if plan.digests is not None:
        for value in plan.digests(record):
            if len(value) != 32:
                name = next(n for n in _DIGESTS if record.get(n) is value)
                raise SchemaError(name, f"has {len(value)} bytes; a sha256 digest has 32")
    if plan.itl:
        itl = record["itl_us"]
        if (
            len(itl) < 5
            or itl[3] > 0x7F
            or itl[0] != PACK_VERSION
            or itl[1] > 4
            or itl[2] >= _MAX_K
            or itl[3] > 8 * (len(itl) - 5)
        ):  # the common case (< 128 gaps) in one line; anything else takes the careful path
            check_packed_gaps(itl)
    if plan.json_fields:
        budget = [MAX_EXT_NODES]
        for name in plan.json_fields:
            value = record[name]
            if value or type(value) is not dict:
                _check_json(value, name, 1, budget)
        ext = record.get("ext")
        if ext:
            _check_ext_figures(ext)
            if record["kind"] == FACTS_KIND:
                _check_facts(ext.get("device"))
    if record["kind"] == BLOCKED_KIND:
        _check_blocked(record)
    return record


BLOCKED_KIND = "blocked"


def _check_blocked(record: dict[str, Any]) -> None:
    """A request a guardrail blocked is what the pipeline writes: ok, no error, and its ext.guardrails says blocked
    (a record of kind blocked is kept out of every latency and error figure: it must be one)."""
    ext = record.get("ext")
    part = ext.get("guardrails") if type(ext) is dict else None
    if type(part) is not dict or part.get("outcome") != "blocked":
        raise SchemaError("ext.guardrails", 'must say outcome "blocked" in a record of kind blocked')
    if record["ok"] is not True:
        raise SchemaError("ok", "must be true in a record of kind blocked (a blocked request is not an error)")
    if record.get("error_type") is not None:
        raise SchemaError("error_type", "must be null in a record of kind blocked")


# -- what a number or a name inside ext may be: one table, read by ingest and by every export ---------------------
# Ingest refuses a value outside these bounds; the OTLP encoders (lens_core/otlp.py) read these figures only through
# ext_number / round_entry, so any record ingest accepts encodes (tests/test_otlp_isolation.py checks it).
ANY = (-math.inf, math.inf)  # any finite number
EXT_NUMBERS: dict[tuple[str, str], tuple[float, float]] = {
    ("energy", "j_per_output_token"): ANY,
    ("collab", "acceptance_rate"): ANY,
    ("model_load", "engine_load_ms"): (0, MAX_DURATION_MS),
    ("network", "rtt_ms"): (0, MAX_DURATION_MS),
    ("collab", "rtt_ms"): (0, MAX_DURATION_MS),
    ("collab", "network_time_ms"): (0, MAX_DURATION_MS),
    # ext.interference (docs/wire-format.md, "Interference"): what else used the device during the request
    ("interference", "other_cpu_cores"): (0, 1024),
    ("interference", "load1"): (0, 100_000),
    ("interference", "psi_cpu_some_pct"): (0, 100),
    ("interference", "psi_memory_some_pct"): (0, 100),
    ("interference", "psi_io_some_pct"): (0, 100),
    ("interference", "mem_available_pct"): (0, 100),
    ("interference", "swap_pages_per_s"): (0, 1e9),
    ("interference", "cpu_freq_ratio"): (0, 2),
    ("interference", "gpu_freq_ratio"): (0, 2),
    ("interference", "temp_max_c"): (-100, 250),
}
# ext.interference.reasons: the codes an agent may name (at most MAX_INTERFERENCE_REASONS, each once)
INTERFERENCE_REASONS = frozenset({"cpu", "cpu_pressure", "memory", "swap", "io", "thermal", "frequency"})
MAX_INTERFERENCE_REASONS = 8
MAX_INTERFERENCE_SUMMARY_CHARS = 200
# ext.collab.round_us: a list of [offset_us, draft_us, verify_us, drafted, accepted] per speculative round
ROUND_BOUNDS = ((0, MAX_DURATION_US), (0, MAX_DURATION_US), (0, MAX_DURATION_US), (0, MAX_COUNT), (0, MAX_COUNT))
# Strings inside ext that become names (span and metric attributes, resource attributes, labels)
EXT_NAMES = (
    ("network", "provider"),
    ("network", "model"),
    ("network", "server_address"),
    ("collab", "server_address"),
    ("offload", "decision"),
    ("energy", "source"),
)
# Names and labels hold no control characters: C0 (NUL, BEL, ESC, CR, LF, TAB, …), DEL and C1; and no invisible
# format characters that make a name read otherwise than it is: zero-width characters and joiners, bidirectional
# marks, embeddings, overrides and isolates, line and paragraph separators, word joiners, the byte-order mark.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f]")
_FORMAT = re.compile(
    "[\u00ad\u0600-\u0605\u061c\u06dd\u070f\u0890\u0891\u08e2\u180e\u200b-\u200f\u2028-\u202e\u2060-\u2064"
    "\u2066-\u206f\ufeff\ufff9-\ufffb\U000110bd\U000110cd\U00013430-\U0001343f\U0001bca0-\U0001bca3"
    "\U0001d173-\U0001d17a\U000e0001\U000e0020-\U000e007f]"
)  # every format character (Unicode category Cf: soft hyphen, Arabic letter mark, tags, …) and the separators
_NOT_IN_NAMES = re.compile(f"{_CONTROL.pattern}|{_FORMAT.pattern}")  # either: one pass over a record's names


def check_name(field: str, value: str) -> None:
    """Refuse a name or label holding a control character (it would reach a terminal, a log line or a label) or an
    invisible format character (a page or an operator's terminal would show a name other than the one stored)."""
    found = _CONTROL.search(value)
    if found is not None:
        raise SchemaError(
            field,
            f"contains the control character U+{ord(found.group()):04X} at position {found.start()}; names and "
            "labels may not hold control characters (U+0000–U+001F, U+007F–U+009F)",
        )
    found = _FORMAT.search(value)
    if found is not None:
        raise SchemaError(
            field,
            f"contains the invisible format character U+{ord(found.group()):04X} at position {found.start()}; names "
            "and labels may not hold format characters (Unicode category Cf: zero-width, bidirectional, soft "
            "hyphen, tags, U+FEFF, …) or the line and paragraph separators U+2028, U+2029",
        )


def in_bounds(value: Any, bounds: tuple[float, float]) -> bool:
    """A finite int or float (not a bool) within ``bounds`` (inclusive)."""
    kind = type(value)
    return (kind is int or (kind is float and math.isfinite(value))) and bounds[0] <= value <= bounds[1]


def ext_number(ext: Any, section: str, name: str) -> float | None:
    """``ext[section][name]`` as a float when it is a number within :data:`EXT_NUMBERS`' bounds, else None (absent,
    null, or a row stored before the bounds existed): how the exports read the figures ingest bounds, so that
    whatever ingest accepts encodes."""
    part = ext.get(section) if type(ext) is dict else None
    value = part.get(name) if type(part) is dict else None
    return float(value) if value is not None and in_bounds(value, EXT_NUMBERS[(section, name)]) else None


def round_entry(entry: Any) -> tuple[int, int, int, int, int] | None:
    """One speculative round of ``ext.collab.round_us`` when it is five integers within :data:`ROUND_BOUNDS`."""
    if type(entry) is not list or len(entry) != 5:
        return None
    for value, (low, high) in zip(entry, ROUND_BOUNDS, strict=True):
        if type(value) is not int or not low <= value <= high:
            return None
    a, b, c, d, e = entry
    return a, b, c, d, e


def contended(record: dict[str, Any]) -> bool:
    """Whether the record says its request was contended: ``ext.interference.contended`` is True and its ``reasons``
    a list of known codes. What ingest stores in ``measurements.contended`` (after :func:`check_record` refused any
    malformed ``ext.interference``) and what the schema-8 backfill reads from records stored before the check."""
    ext = record.get("ext")
    part = ext.get("interference") if type(ext) is dict else None
    return (
        type(part) is dict
        and part.get("contended") is True
        and _reasons_problem(part.get("reasons")) is None
        and bool(part.get("reasons"))
    )


def _reasons_problem(reasons: Any) -> str | None:
    """What is wrong with ``ext.interference.reasons`` (None: a list of at most 8 distinct known codes)."""
    if type(reasons) is not list:
        return f"is {_describe(reasons) if reasons is not None else 'missing'}"
    if len(reasons) > MAX_INTERFERENCE_REASONS:
        return f"has {len(reasons)} codes"
    for code in reasons:
        if type(code) is not str or code not in INTERFERENCE_REASONS:
            return f"holds {code!r}"[:80]
    if len(set(reasons)) != len(reasons):
        return "names a code twice"
    return None


def _check_interference(part: Any) -> None:
    """``ext.interference`` (already a map or null, its numbers checked through :data:`EXT_NUMBERS`): ``contended``
    a boolean and ``reasons`` a list of known codes, both required; ``summary`` a short line."""
    if part is None:
        return
    if type(part.get("contended")) is not bool:
        value = part.get("contended")
        raise SchemaError(
            "ext.interference.contended",
            f"is {_describe(value) if 'contended' in part else 'missing'}; allowed: true or false (required)",
        )
    problem = _reasons_problem(part.get("reasons"))
    if problem is not None:
        codes = ", ".join(sorted(INTERFERENCE_REASONS))
        raise SchemaError(
            "ext.interference.reasons",
            f"{problem}; allowed: a list (required) of at most {MAX_INTERFERENCE_REASONS} distinct codes from: {codes}",
        )
    if part["contended"] is not bool(part["reasons"]):
        # contended is "some reason fired": a mark without a reason (or reasons without the mark) is not the agent's
        raise SchemaError(
            "ext.interference.contended",
            f"is {str(part['contended']).lower()} with {len(part['reasons'])} reasons; allowed: true exactly when "
            "reasons names at least one code",
        )
    summary = part.get("summary")
    if summary is not None:
        if type(summary) is not str or len(summary) > MAX_INTERFERENCE_SUMMARY_CHARS:
            raise SchemaError(
                "ext.interference.summary",
                f"is {_describe(summary)}; allowed: a string of at most {MAX_INTERFERENCE_SUMMARY_CHARS} characters "
                "or null",
            )
        check_name("ext.interference.summary", summary)
        if any(unicodedata.category(c) in ("Cf", "Zl", "Zp") for c in summary):
            raise SchemaError(
                "ext.interference.summary",
                "holds a format or line-separator character (bidirectional overrides, zero-width, U+2028); allowed: "
                "printable text",
            )


# -- ext.guardrails (docs/wire-format.md, "Guardrails"): the guardrail stages timed beside the inference -------------
# the vocabularies and bounds are the guardrail interface's own (lens_core/guardrail_view.py), shared with the exports
GUARDRAIL_STAGES = guardrail_view.STAGES
GUARDRAIL_OUTCOMES = guardrail_view.OUTCOMES
GUARDRAIL_SEVERITIES = guardrail_view.SEVERITIES
GUARDRAIL_VIOLATION_TYPES = guardrail_view.VIOLATION_TYPES
GUARDRAIL_OUTPUT_MODES = guardrail_view.OUTPUT_MODES
MAX_GUARDRAIL_CHECKS = guardrail_view.MAX_CHECKS  # per stage
MAX_GUARDRAIL_VIOLATIONS = guardrail_view.MAX_VIOLATIONS
MAX_GUARDRAIL_TEXT_CHARS = guardrail_view.MAX_TEXT_CHARS  # a violation's description, a stage's or a check's error
MAX_GUARDRAIL_CHUNKS = 1_000_000
GUARDRAIL_NAME = guardrail_view.NAME
_MS = (0, MAX_DURATION_MS)
_UNIT = (0, 1)
# key → what it may be: ("ms"|"unit"|"percent", nullable) numbers; ("name", required); ("text",); ("vocab", values)
_GuardrailSpec = dict[str, tuple[Any, ...]]
_GUARDRAIL_TOP: _GuardrailSpec = {
    "set": ("name", True),
    "outcome": ("vocab", GUARDRAIL_OUTCOMES, True),
    "blocked_at": ("vocab", GUARDRAIL_STAGES, False),
    "total_ms": ("number", _MS),
    "inference_ms": ("number", _MS),
    "inference_start_ms": ("number", _MS),
    "overhead_ms": ("number", _MS),
    "remainder_ms": ("number", _MS),
    "impact_percent": ("number", (0, 100)),
    "risk_score": ("number", _UNIT),
    "risk_level": ("vocab", GUARDRAIL_SEVERITIES, False),
    "stages": ("stages",),
    "violations": ("violations",),
    "stray_checks": ("count", (0, guardrail_view.MAX_STRAY_CHECKS)),
}
_GUARDRAIL_STAGE: _GuardrailSpec = {
    "start_ms": ("number", _MS),
    "ms": ("number", _MS),
    "risk_score": ("number", _UNIT),
    "error": ("text",),
    "checks": ("checks",),
}
_GUARDRAIL_OUTPUT: _GuardrailSpec = {
    **_GUARDRAIL_STAGE,
    "mode": ("vocab", GUARDRAIL_OUTPUT_MODES, False),
    "chunks": ("count", (0, MAX_GUARDRAIL_CHUNKS)),
    "chunk_ms_p50": ("number", _MS),
    "chunk_ms_max": ("number", _MS),
}
_GUARDRAIL_CHECK: _GuardrailSpec = {
    "name": ("name", True),
    "kind": ("name", False),
    "ms": ("number", _MS),
    "server_ms": ("number", _MS),
    "network_ms": ("number", _MS),
    "risk_score": ("number", _UNIT),
    "error": ("text",),
}
_GUARDRAIL_VIOLATION: _GuardrailSpec = {
    "type": ("vocab", GUARDRAIL_VIOLATION_TYPES, True),
    "severity": ("vocab", GUARDRAIL_SEVERITIES, True),
    "blocked": ("flag",),
    "stage": ("vocab", GUARDRAIL_STAGES, False),
    "check": ("name", False),
    "description": ("text",),
}
_NOT_IN_TEXT = ("Cc", "Cf", "Cs", "Zl", "Zp")  # control, format, lone surrogates, line and paragraph separators


def _guardrail_text_problem(value: str) -> str | None:
    """What is wrong with a text field of ext.guardrails (None: at most 300 characters of printable Unicode)."""
    if len(value) > MAX_GUARDRAIL_TEXT_CHARS:
        return f"has {len(value)} characters"
    for i, c in enumerate(value):
        if unicodedata.category(c) in _NOT_IN_TEXT:
            return f"holds U+{ord(c):04X} ({unicodedata.category(c)}) at position {i}"
    return None


def _check_guardrail_map(part: Any, path: str, spec: _GuardrailSpec) -> None:
    if type(part) is not dict:
        raise SchemaError(path, f"is {_describe(part)}; allowed: a map")
    for key in part:
        if key not in spec:
            shown = key[:40] if type(key) is str else _describe(key)
            raise SchemaError(f"{path}.{shown}", f"is not a key of {path}; allowed: {', '.join(spec)}")
    for key, rule in spec.items():
        value = part.get(key)
        field = f"{path}.{key}"
        what = rule[0]
        if what == "name":
            if value is None and not rule[1]:
                continue
            if type(value) is not str or GUARDRAIL_NAME.fullmatch(value) is None:
                shown = "missing" if key not in part else "null" if value is None else _describe(value)
                raise SchemaError(
                    field,
                    f"is {shown}; allowed: a name of 1-64 characters [A-Za-z0-9._-]"
                    + (" (required)" if rule[1] else ""),
                )
        elif what == "vocab":
            if value is None and not rule[2]:
                continue
            if type(value) is not str or value not in rule[1]:
                shown = (
                    "missing"
                    if key not in part
                    else "null"
                    if value is None
                    else repr(value)[:40]
                    if type(value) is str
                    else _describe(value)
                )
                raise SchemaError(
                    field, f"is {shown}; allowed: one of {', '.join(rule[1])}" + ("" if rule[2] else " or null")
                )
        elif what == "number" or what == "count":
            if value is None:
                continue
            low, high = rule[1]
            ok = in_bounds(value, rule[1]) if what == "number" else type(value) is int and low <= value <= high
            if not ok:
                kind = "a number" if what == "number" else "an integer"
                raise SchemaError(field, f"is {_describe(value)}; allowed: {kind} from {low} to {high} or null")
        elif what == "text":
            if value is None:
                continue
            problem = _guardrail_text_problem(value) if type(value) is str else f"is {_describe(value)}"
            if problem is not None:
                raise SchemaError(
                    field,
                    f"{problem}; allowed: text of at most {MAX_GUARDRAIL_TEXT_CHARS} characters without control or "
                    "format characters, or null",
                )
        elif what == "flag":
            if value is not None and type(value) is not bool:
                raise SchemaError(field, f"is {_describe(value)}; allowed: true, false or null")
        elif what == "stages":
            if value is None:
                continue
            if type(value) is not dict:
                raise SchemaError(field, f"is {_describe(value)}; allowed: a map of stage → stage timings")
            for stage, entry in value.items():
                if stage not in GUARDRAIL_STAGES:
                    shown = stage[:40] if type(stage) is str else _describe(stage)
                    raise SchemaError(f"{field}.{shown}", f"is not a stage; allowed: {', '.join(GUARDRAIL_STAGES)}")
                _check_guardrail_map(
                    entry, f"{field}.{stage}", _GUARDRAIL_OUTPUT if stage == "output" else _GUARDRAIL_STAGE
                )
        elif what == "checks":
            if value is None:
                continue
            if type(value) is not list or len(value) > MAX_GUARDRAIL_CHECKS:
                raise SchemaError(
                    field, f"is {_describe(value)}; allowed: a list of at most {MAX_GUARDRAIL_CHECKS} checks"
                )
            for i, entry in enumerate(value):
                _check_guardrail_map(entry, f"{field}[{i}]", _GUARDRAIL_CHECK)
        elif what == "violations":
            if value is None:
                continue
            if type(value) is not list or len(value) > MAX_GUARDRAIL_VIOLATIONS:
                raise SchemaError(
                    field, f"is {_describe(value)}; allowed: a list of at most {MAX_GUARDRAIL_VIOLATIONS} violations"
                )
            for i, entry in enumerate(value):
                _check_guardrail_map(entry, f"{field}[{i}]", _GUARDRAIL_VIOLATION)


def check_guardrails(part: Any) -> None:
    """``ext.guardrails`` (null, or the map the guardrail pipeline writes: docs/wire-format.md "Guardrails"): every
    key known, names and vocabularies as the contract says, numbers finite and in range, texts short and printable,
    at most 16 checks a stage and 32 violations. Refuses (:class:`SchemaError`) naming the field."""
    if part is None:
        return
    _check_guardrail_map(part, "ext.guardrails", _GUARDRAIL_TOP)
    _check_guardrail_sums(part)


_SLACK_MS = 1.0  # rounding between the parts of a guarded request and its total


def _check_guardrail_sums(part: dict[str, Any]) -> None:
    """The parts of a guarded request fit in it, and its outcome and block agree: a record whose figures contradict
    each other would move its device's figures by what it claims, not by what ran."""
    total = part.get("total_ms")
    if total is not None:
        for name in ("overhead_ms", "inference_ms"):
            value = part.get(name)
            if value is not None and value > total + _SLACK_MS:
                raise SchemaError(f"ext.guardrails.{name}", f"is {value!r}, more than total_ms {total!r}")
        for stage, entry in (part.get("stages") or {}).items():
            ms = entry.get("ms") if type(entry) is dict else None
            if ms is not None and ms > total + _SLACK_MS:
                raise SchemaError(f"ext.guardrails.stages.{stage}.ms", f"is {ms!r}, more than total_ms {total!r}")
    if (part.get("outcome") == "blocked") != (part.get("blocked_at") is not None):
        raise SchemaError("ext.guardrails.blocked_at", 'must be a stage exactly when outcome is "blocked"')


class GuardrailColumns(NamedTuple):
    """What the store keeps of a record's ``ext.guardrails`` (store schema 10)."""

    guardrail_set: str | None
    guardrail_outcome: str | None
    guardrail_ms: float | None  # overhead_ms: the stages together
    guardrail_input_ms: float | None
    guardrail_threat_ms: float | None
    guardrail_output_ms: float | None
    guardrail_impact: float | None  # impact_percent


NO_GUARDRAILS = GuardrailColumns(None, None, None, None, None, None, None)


def guardrail_columns(record: dict[str, Any]) -> GuardrailColumns:
    """The measurement columns of a record's ``ext.guardrails`` when it is well formed (:func:`check_guardrails`),
    else all None: what ingest stores (after the check refused anything malformed) and what the schema-10 backfill
    reads from records stored before the check."""
    ext = record.get("ext")
    part = ext.get("guardrails") if type(ext) is dict else None
    if type(part) is not dict:
        return NO_GUARDRAILS
    try:
        check_guardrails(part)
    except SchemaError:
        return NO_GUARDRAILS
    stages = part.get("stages") or {}

    def stage_ms(name: str) -> float | None:
        value = (stages.get(name) or {}).get("ms")
        return None if value is None else float(value)

    def number(name: str) -> float | None:
        value = part.get(name)
        return None if value is None else float(value)

    return GuardrailColumns(
        part["set"],
        part["outcome"],
        number("overhead_ms"),
        stage_ms("input"),
        stage_ms("threat"),
        stage_ms("output"),
        number("impact_percent"),
    )


def _check_ext_figures(ext: dict[str, Any]) -> None:
    for (section, name), bounds in EXT_NUMBERS.items():
        part = ext.get(section)
        if part is None:
            continue
        if type(part) is not dict:
            raise SchemaError(f"ext.{section}", f"is {_describe(part)}; allowed: a map or null")
        value = part.get(name)
        if value is None:
            continue
        if type(value) not in (int, float):
            raise SchemaError(f"ext.{section}.{name}", f"is {_describe(value)}; allowed: a number or null")
        if not in_bounds(value, bounds):
            raise SchemaError(
                f"ext.{section}.{name}", f"is {_describe(value)}; allowed: a number from {bounds[0]} to {bounds[1]}"
            )
    for section, name in EXT_NAMES:
        part = ext.get(section)
        value = part.get(name) if type(part) is dict else None
        if type(value) is str:
            check_name(f"ext.{section}.{name}", value)
    if "interference" in ext:
        _check_interference(ext["interference"])
    if "guardrails" in ext:
        check_guardrails(ext["guardrails"])
    collab = ext.get("collab")
    rounds = collab.get("round_us") if type(collab) is dict else None
    if type(rounds) is list:
        for i, entry in enumerate(rounds):
            shaped = type(entry) is list and len(entry) == 5 and all(type(v) is int for v in entry)
            if shaped and round_entry(entry) is None:
                raise SchemaError(
                    f"ext.collab.round_us[{i}]",
                    f"is {entry!r}"[:120] + f"; allowed: [offset_us, draft_us, verify_us] from 0 to "
                    f"{MAX_DURATION_US}, [drafted, accepted] from 0 to {MAX_COUNT}",
                )


# -- device facts (ext.device of a device_facts record): physical ranges ------------------------------------------
FACTS_KIND = "device_facts"
MAX_RAM_GB = 65_536.0  # 64 TiB: beyond any device this lens runs on
MAX_CLOCK_MHZ = 100_000.0  # 100 GHz
MIN_TEMPERATURE_C = -273.15  # absolute zero
MAX_TEMPERATURE_C = 1_000.0
# name → (low, high, low excluded): a number or null
FACT_NUMBERS: dict[str, tuple[float, float, bool]] = {
    "ram_gb": (0.0, MAX_RAM_GB, True),
    "gpu_freq_mhz": (0.0, MAX_CLOCK_MHZ, False),
    "cpu_freq_mhz_max": (0.0, MAX_CLOCK_MHZ, False),
    "temperature_max_c": (MIN_TEMPERATURE_C, MAX_TEMPERATURE_C, False),
}
# name → bounds of every value of a map (name → number)
FACT_MAPS: dict[str, tuple[float, float]] = {
    "cpu_freq_mhz": (0.0, MAX_CLOCK_MHZ),
    "temperatures_c": (MIN_TEMPERATURE_C, MAX_TEMPERATURE_C),
}
FACT_NAMES = ("device_class", "model", "accelerator", "power_mode")
MAX_TAGS = 16  # ext.device.tags: the agent's [agent] tags
MAX_TAG_CHARS = 64
_TAG = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_TAG_CHARS}}}")


def _fact_range(low: float, high: float, low_excluded: bool = False) -> str:
    return f"a number {'above' if low_excluded else 'from'} {low:g} {'and at most' if low_excluded else 'to'} {high:g}"


def _check_facts(device: Any) -> None:
    """``ext.device`` of a ``device_facts`` record: numbers within physical ranges, names without control
    characters (docs/wire-format.md, "Device facts")."""
    if device is None:
        return
    if type(device) is not dict:
        raise SchemaError("ext.device", f"is {_describe(device)}; allowed: a map or null")
    for name, (low, high, low_excluded) in FACT_NUMBERS.items():
        value = device.get(name)
        if value is None:
            continue
        if not in_bounds(value, (low, high)) or (low_excluded and value == low):
            raise SchemaError(
                f"ext.device.{name}", f"is {_describe(value)}; allowed: {_fact_range(low, high, low_excluded)} or null"
            )
    for name, (low, high) in FACT_MAPS.items():
        values = device.get(name)
        if values is None:
            continue
        if type(values) is not dict:
            raise SchemaError(f"ext.device.{name}", f"is {_describe(values)}; allowed: a map of name → number")
        for key, value in values.items():
            check_name(f"ext.device.{name}", key)
            if value is not None and not in_bounds(value, (low, high)):
                raise SchemaError(
                    f"ext.device.{name}.{key}"[:200],
                    f"is {_describe(value)}; allowed: {_fact_range(low, high)} or null",
                )
    power_mode_id = device.get("power_mode_id")
    if power_mode_id is not None and not (type(power_mode_id) is int and 0 <= power_mode_id <= MAX_COUNT):
        raise SchemaError(
            "ext.device.power_mode_id", f"is {_describe(power_mode_id)}; allowed: an integer from 0 to {MAX_COUNT}"
        )
    for name in FACT_NAMES:
        value = device.get(name)
        if type(value) is str:
            check_name(f"ext.device.{name}", value)
    throttling = device.get("thermal_throttling")
    if type(throttling) is list:
        for i, line in enumerate(throttling):
            if type(line) is str:
                check_name(f"ext.device.thermal_throttling[{i}]", line)
    tags = device.get("tags")
    if tags is not None:
        allowed = f"allowed: a list of at most {MAX_TAGS} tags of 1-{MAX_TAG_CHARS} characters [A-Za-z0-9._-]"
        if type(tags) is not list or len(tags) > MAX_TAGS:
            raise SchemaError("ext.device.tags", f"is {_describe(tags)}; {allowed}")
        for i, tag in enumerate(tags):
            if type(tag) is not str or _TAG.fullmatch(tag) is None:
                raise SchemaError(f"ext.device.tags[{i}]", f"is {_describe(tag)}; {allowed}")


def _check_int_groups(plan: _Plan, record: dict[str, Any]) -> None:
    for get, names, low, high in plan.int_groups:
        values = get(record)
        if min(values) < low or max(values) > high:
            for name, value in zip(names, values, strict=True):
                if not low <= value <= high:
                    raise SchemaError(name, f"is {value}; allowed: an integer from {low} to {high} or null")


def check_packed_gaps(data: bytes) -> None:
    """The packed gaps' header and size (the codes themselves are decoded on read; a row whose codes fail is
    skipped and counted there, see ``lens_read_undecodable_rows``)."""
    if len(data) > MAX_ITL_BYTES:
        raise SchemaError("itl_us", f"has {len(data)} bytes; at most {MAX_ITL_BYTES} are allowed")
    if len(data) < 5 or data[0] != PACK_VERSION or data[1] > 4 or data[2] >= _MAX_K:
        raise SchemaError("itl_us", "is not packed gaps (version 1, predictor 0..4, Rice parameter below 42)")
    count = shift = 0
    pos = 3
    while True:
        if pos >= len(data) or shift > 35:
            raise SchemaError("itl_us", "has a truncated or oversized gap count")
        byte = data[pos]
        pos += 1
        count |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    if count > MAX_GAPS:
        raise SchemaError("itl_us", f"announces {count} gaps; at most {MAX_GAPS} are allowed")
    if count > 8 * (len(data) - pos):
        raise SchemaError("itl_us", f"announces {count} gaps in {len(data)} bytes")


def check_gaps(gaps: list[int], field: str = "itl_us") -> None:
    """Unpacked inter-token gaps (µs): at most MAX_GAPS, each from 0 to one day. Ingest checks only the packed
    header (decoding every code would cost more than the rest of the record); every read that unpacks the gaps
    holds them to this, so all of them serve or skip the same rows."""
    if len(gaps) > MAX_GAPS:
        raise SchemaError(field, f"has {len(gaps)} gaps; at most {MAX_GAPS} are allowed")
    if gaps and (min(gaps) < 0 or max(gaps) > MAX_DURATION_US):
        bad = next(g for g in gaps if not 0 <= g <= MAX_DURATION_US)
        raise SchemaError(field, f"holds a gap of {bad} µs; allowed: 0 to {MAX_DURATION_US} (one day)")


def _check_json(value: Any, path: str, depth: int, budget: list[int]) -> None:
    """A bounded JSON-compatible value: maps with string keys, lists, strings, finite numbers, booleans, null."""
    budget[0] -= 1
    if budget[0] < 0:
        raise SchemaError(path, f"makes ext and the extra fields hold more than {MAX_EXT_NODES} values")
    kind = type(value)
    if kind is str:
        if len(value) > MAX_MESSAGE_CHARS:
            raise SchemaError(path, f"has {len(value)} characters; at most {MAX_MESSAGE_CHARS} are allowed")
    elif kind is int:
        if not -MAX_INT64 - 1 <= value <= MAX_INT64:
            raise SchemaError(path, f"is {_describe(value)}; integers must fit in 64 bits (signed)")
    elif kind is float:
        if not math.isfinite(value):
            raise SchemaError(path, f"is {value!r}; numbers must be finite")
    elif kind is dict or kind is list:
        if depth >= MAX_EXT_DEPTH:
            raise SchemaError(path, f"nests deeper than {MAX_EXT_DEPTH} levels")
        if kind is dict:
            for key, item in value.items():
                if type(key) is not str:
                    raise SchemaError(path, f"has the key {_describe(key)}; keys must be strings")
                if len(key) > MAX_KEY_CHARS:
                    raise SchemaError(path, f"has a key of {len(key)} characters; at most {MAX_KEY_CHARS}")
                _check_json(item, f"{path}.{key}", depth + 1, budget)
        else:
            for i, item in enumerate(value):
                _check_json(item, f"{path}[{i}]", depth + 1, budget)
    elif kind is not bool and value is not None:
        raise SchemaError(path, f"is {_describe(value)}; allowed: maps, lists, strings, finite numbers, booleans, null")
