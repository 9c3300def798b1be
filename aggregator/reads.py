"""Bounds on one read: a deadline over all of its work, SQL and Python alike, and a bound on the series it answers.

A read thread runs a page, a summary or a timeline against a :class:`BoundedStore`: every store call first checks
the read's :class:`Deadline` (``server.max_query_seconds``, counted from when the read started on its thread, not per
query), and the Python loops between them call :func:`deadline_of` ``(store).check()``; past the deadline both raise
``QueryTimeout``, which the app answers with the same 503 as an SQL query interrupted by the store. The store's
``series`` answers at most ``max_series`` series per device and kind (the most recently seen), and remembers how
many it left out, so a device that sent thousands of model names gets a bounded fleet row and page that says what
it left out (:func:`truncation`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, TypeVar, cast

from .store import QueryTimeout, Store

T = TypeVar("T")


class Deadline:
    """``seconds`` from now (monotonic); :meth:`check` raises ``QueryTimeout`` once past it."""

    def __init__(self, seconds: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.seconds = seconds
        self.clock = clock
        self.at = clock() + seconds

    def check(self) -> None:
        if self.clock() > self.at:
            raise QueryTimeout(self.seconds)

    def every(self, n: int) -> Callable[[], None]:
        """A check that looks at the clock once per ``n`` calls (for a loop over many rows)."""
        count = 0

        def check() -> None:
            nonlocal count
            count += 1
            if count >= n:
                count = 0
                self.check()

        return check


class _NoDeadline(Deadline):
    def __init__(self) -> None:
        super().__init__(float("inf"))

    def check(self) -> None:
        return None


NO_DEADLINE = _NoDeadline()


class BoundedStore:
    """``store`` for one read: each call checks the deadline before and after it; ``series`` is bounded."""

    def __init__(self, store: Store, deadline: Deadline, max_series: int) -> None:
        self._store = store
        self.deadline = deadline
        self.max_series = max_series
        self.series_left_out: dict[str, int] = {}  # device → series not answered

    def series(self, device: str | None = None) -> list[dict[str, Any]]:
        self.deadline.check()
        rows = self._store.series(device)
        self.deadline.check()
        kept, left_out = bound_series(rows, self.max_series)
        for name, n in left_out.items():
            self.series_left_out[name] = self.series_left_out.get(name, 0) + n
        return kept

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._store, name)
        if not callable(attr):
            return attr
        deadline = self.deadline

        def call(*args: Any, **kwargs: Any) -> Any:
            deadline.check()
            result = attr(*args, **kwargs)
            deadline.check()
            return result

        return call


def bound_series(rows: list[dict[str, Any]], limit: int) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """(at most ``limit`` series per device and kind — the most recently seen — in their order, and how many were
    left out per device)."""
    by_key: dict[tuple[str, str], list[int]] = {}
    for index, row in enumerate(rows):
        by_key.setdefault((row["device_id"], row["kind"]), []).append(index)
    keep: set[int] = set()
    left_out: dict[str, int] = {}
    for (device, _kind), indexes in by_key.items():
        if len(indexes) <= limit:
            keep.update(indexes)
            continue
        newest = sorted(indexes, key=lambda i: rows[i]["last_seen_us"] or 0, reverse=True)[:limit]
        keep.update(newest)
        left_out[device] = left_out.get(device, 0) + len(indexes) - limit
    return [row for index, row in enumerate(rows) if index in keep], left_out


def deadline_of(store: Any) -> Deadline:
    """The read's deadline when ``store`` is a :class:`BoundedStore`, else none."""
    deadline = getattr(store, "deadline", None)
    return deadline if isinstance(deadline, Deadline) else NO_DEADLINE


def bounded(fn: Callable[..., T], seconds: float, max_series: int) -> Callable[..., T]:
    """``fn(store, *args)`` run with a :class:`BoundedStore` whose deadline starts when it runs (on the read
    thread, after any wait in the queue)."""

    def run(store: Store, *args: Any) -> T:
        return fn(cast(Store, BoundedStore(store, Deadline(seconds), max_series)), *args)

    return run


def truncation(more: int, what: str, narrow: str) -> dict[str, Any]:
    """The marker of an answer cut to its bound: ``{"more": N, "message": "truncated: N more WHAT, narrow …"}``."""
    return {"more": more, "message": f"truncated: {more:,} more {what}; narrow the query with {narrow}"}


def series_truncation(store: Any, device: str | None = None) -> dict[str, Any] | None:
    """The marker for the series a :class:`BoundedStore` left out (of ``device``, or of every device), or None."""
    left_out: dict[str, int] = getattr(store, "series_left_out", {})
    more = left_out.get(device, 0) if device is not None else sum(left_out.values())
    if not more:
        return None
    limit = getattr(store, "max_series", 0)
    marker = truncation(
        more,
        f"series (model × strategy) beyond the {limit} most recently seen per device (server.max_read_series)",
        "/api/v1/measurements?device=…&model=… or /api/v1/summary?device=…&group_by=model",
    )
    if device is None:
        marker["by_device"] = dict(sorted(left_out.items()))
    return marker
