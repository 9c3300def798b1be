"""Reads never trust the store: a stored row that does not decode (written by an older version, damaged on disk,
or by a bug) is skipped and counted — ``llm_latency_lens_read_undecodable_rows_total`` on ``/metrics`` — never a
500 for the whole answer."""

from __future__ import annotations

import json
import logging
import threading
from typing import Any

from lens_core import wire
from lens_core.itlpack import PackError

log = logging.getLogger("aggregator")

# What decoding a stored body can raise on a damaged row: the codec's refusal, the packed gaps', and the errors of
# from_wire's conversions on a value of the wrong shape.
DECODE_ERRORS = (wire.WireError, PackError, KeyError, TypeError, ValueError, OverflowError, AttributeError)


class SkipCounter:
    """A process-wide count of rows a read skipped (every app in the process shares the store's rows)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.total = 0

    def add(self, n: int = 1) -> None:
        with self._lock:
            self.total += n


UNDECODABLE = SkipCounter()


def skipped(row: dict[str, Any], exc: BaseException) -> None:
    UNDECODABLE.add()
    seq = row.get("seq")
    log.warning("read: skipped stored row seq=%s that does not decode (%s: %s)", seq, type(exc).__name__, exc)


def decode_wire(row: dict[str, Any]) -> dict[str, Any] | None:
    """The stored record as its wire map (bounded decode), or None (counted) when it does not decode."""
    try:
        record = wire.loads(bytes(row["body"]), row["codec"])
        if type(record) is not dict:
            raise TypeError(f"stored body is a {type(record).__name__}, not a map")
        return record
    except DECODE_ERRORS as exc:
        skipped(row, exc)
        return None


def decode_measurement(row: dict[str, Any], *, gaps: bool = True, check_json: bool = True) -> dict[str, Any] | None:
    """The stored record in the measurement's own shape (``wire.from_wire``), or None (counted). ``gaps=False``
    leaves out the inter-token gaps (``itl_ms``), which summaries and pages do not show: the costliest part to
    decode. ``check_json``: also make sure it serialises as strict JSON (no NaN)."""
    record = decode_wire(row)
    if record is None:
        return None
    if not gaps:
        record.pop("itl_us", None)
    try:
        measurement = wire.from_wire(record)
        if check_json:
            json.dumps(measurement, allow_nan=False)  # every reader serves it as JSON: a row that cannot be is skipped
        return measurement
    except DECODE_ERRORS as exc:
        skipped(row, exc)
        return None
