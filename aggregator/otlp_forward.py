"""Forwarding every stored record to an OTLP/HTTP backend, store-and-forward: nothing lost, nothing sent twice.

The store is the queue. Each signal (traces, metrics) keeps a cursor — the ``seq`` of the last record the backend
acknowledged — in the store's ``meta`` table (``otlp.traces``, ``otlp.metrics``), with the metrics' cumulative
totals. A pass reads the records after the cursor, builds one export request per signal (``lens_core.otlp``), and
moves that signal's cursor only when the backend's answer is an OTLP response (a ``200`` page from a proxy is not);
a backend that is down, slow, refusing the token or throttling (``429``/``503`` with ``Retry-After``) is retried
with a growing delay, and nothing is skipped meanwhile. A request the backend refuses as malformed or too large
(``400``/``413``) is halved until the one record it refuses is found; that record alone is counted as rejected and
logged with its id. Spans carry ids derived from the record id, so the one batch a crash between the backend's
answer and the cursor's update can resend arrives with the same ids.

Several aggregator replicas on one PostgreSQL store share the cursors: a cursor moves by compare-and-swap, so a
replica that lost the race discards its pass (the backend saw the same ids twice, never a gap). PostgreSQL assigns
``seq`` before commit, so a record is only forwarded once it was received ``settle`` seconds ago: a transaction
still open with a lower ``seq`` is not skipped.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from lens_core import otlp
from lens_core.otlp import OtlpSettings, otlp_settings

from . import __version__
from .health import FACTS_KIND, facts_from_record
from .rows import decode_wire
from .store import Query, Store

log = logging.getLogger("aggregator.otlp")

SIGNALS = otlp.SIGNALS
__all__ = ["Forwarder", "OtlpSettings", "otlp_settings", "stored_status"]
EXPORTED_KINDS = frozenset({"inference", "model_load"})


def cursor_key(signal: str) -> str:
    return f"otlp.{signal}"


@dataclass
class SignalStatus:
    """A signal's forwarding, for /metrics and ``lens-aggregator otlp status``."""

    seq: int = 0
    forwarded: int = 0  # records past the cursor since the store began forwarding (persisted)
    items: int = 0  # spans or data points the backend accepted (persisted)
    rejected: int = 0  # spans/points the backend refused in an accepted answer, or single records refused (persisted)
    failures: dict[str, int] = field(default_factory=dict)  # by reason, this process
    last_error: str | None = None
    last_success_us: int | None = None
    pending: int = 0
    oldest_pending_us: int | None = None
    retry_at: float | None = None  # monotonic


def load_cursor(store: Store, signal: str) -> tuple[str | None, dict[str, Any]]:
    """The stored cursor (its text, for the compare-and-swap) and its value."""
    raw = store.get_meta(cursor_key(signal))
    if raw is None:
        return None, {"seq": 0}
    try:
        value = json.loads(raw)
        if type(value) is not dict or type(value.get("seq")) is not int:
            raise ValueError("not a cursor")
    except ValueError:
        raise RuntimeError(
            f"the store's meta row {cursor_key(signal)!r} is not an OTLP cursor ({raw[:80]!r}); delete it to start "
            "forwarding from the first stored record"
        ) from None
    return raw, value


class Forwarder:
    """The forwarding loop of one aggregator process."""

    def __init__(self, store: Store, settings: OtlpSettings) -> None:
        self.store = store
        self.settings = settings
        settle = settings.settle_s if settings.settle_s is not None else store_settle_s(store)
        self.settle_us = int(settle * 1e6)
        self.status = {signal: SignalStatus() for signal in settings.signals}
        self.metrics = otlp.MetricsAccumulator(settings.temporality, server_metrics=settings.server_metrics)
        self.facts: dict[str, dict[str, Any]] = {}
        self._raw: dict[str, str | None] = {}
        self._cursor: dict[str, dict[str, Any]] = {}
        self._failures = {signal: 0 for signal in settings.signals}
        self._session: aiohttp.ClientSession | None = None
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._rng = random.Random()
        self.passes = 0

    # -- lifecycle ---------------------------------------------------------------------------------------
    async def start(self) -> None:
        await asyncio.to_thread(self._load)
        self._task = asyncio.create_task(self._run(), name="otlp-forward")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        if self._session is not None:
            await self._session.close()
            self._session = None

    def wake(self) -> None:
        """New records were stored: look now rather than at the next interval."""
        self._wake.set()

    def _load(self) -> None:
        for signal in self.settings.signals:
            raw, cursor = load_cursor(self.store, signal)
            self._raw[signal], self._cursor[signal] = raw, cursor
            status = self.status[signal]
            status.seq = cursor["seq"]
            status.forwarded = int(cursor.get("forwarded", 0))
            status.items = int(cursor.get("items", 0))
            status.rejected = int(cursor.get("rejected", 0))
            status.last_success_us = cursor.get("updated_us")
            if signal == "metrics":
                self.metrics.load(cursor.get("metrics"))
        self._refresh_backlog()

    def _refresh_backlog(self) -> None:
        for status in self.status.values():
            status.pending, status.oldest_pending_us, _ = self.store.backlog_after(status.seq)

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            ssl_context: Any = False
            if self.settings.endpoint.startswith("https://"):
                import ssl

                ssl_context = ssl.create_default_context(
                    cafile=str(self.settings.ca_file) if self.settings.ca_file else None
                )
            self._session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl_context))
        return self._session

    async def _run(self) -> None:
        while True:
            try:
                busy = await self.forward_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a store error: keep the loop, report it
                log.exception("OTLP forwarding pass failed")
                for status in self.status.values():
                    status.last_error = f"{type(exc).__name__}: {exc}"[:300]
                busy = False
            delay = self._next_delay() if not busy else 0.0
            if delay > 0:
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)
                # a wake-up while a signal backs off does not cut its backoff short
                while (wait := self._backoff_left()) > 0:
                    await asyncio.sleep(wait)

    def _backoff_left(self) -> float:
        now = time.monotonic()
        waits = [s.retry_at - now for s in self.status.values() if s.retry_at is not None]
        return max(0.0, min(waits)) if waits and len(waits) == len(self.status) else 0.0

    def _next_delay(self) -> float:
        now = time.monotonic()
        waits = [max(0.0, s.retry_at - now) for s in self.status.values() if s.retry_at is not None]
        return min([self.settings.interval, *waits])

    # -- one pass ----------------------------------------------------------------------------------------
    async def forward_once(self) -> bool:
        """Export the next batch of each signal that is not backing off. True when a full batch went out (more may
        be waiting)."""
        self.passes += 1
        now = time.monotonic()
        due = [s for s in self.settings.signals if (self.status[s].retry_at or 0) <= now]
        if not due:
            return False
        after = min(self.status[s].seq for s in due)
        limit = self.settings.batch_records
        rows = await asyncio.to_thread(self.store.query, Query(), limit=limit, after_seq=after)
        cutoff = time.time_ns() // 1000 - self.settle_us
        settled = []
        for row in rows:
            if self.settle_us and row["received_us"] >= cutoff:
                break
            settled.append(row)
        full = len(settled) == limit
        decoded = await asyncio.to_thread(self._decode, settled) if settled else []  # once for both signals
        for signal in due:
            mine = [r for r in settled if r["seq"] > self.status[signal].seq]
            if mine:
                first = mine[0]["seq"]
                await self._export(signal, mine, [r for seq, r in decoded if seq >= first])
                if self.status[signal].retry_at is not None:
                    full = False
        await asyncio.to_thread(self._refresh_backlog)
        return full

    def _decode(self, rows: list[dict[str, Any]]) -> list[tuple[int, dict[str, Any]]]:
        out = []
        for row in rows:
            record = decode_wire(row)
            if record is None:
                continue
            if record.get("kind") == FACTS_KIND:
                facts = facts_from_record(record)
                if facts is not None and type(record.get("device_id")) is str:
                    self.facts[record["device_id"]] = facts
            record["_seq"] = int(row["seq"])  # where the cursor goes once this record is exported
            out.append((int(row["seq"]), record))
        return out

    def resource(self, device_id: str) -> dict[str, Any]:
        if device_id not in self.facts:
            latest = self.store.latest(Query(device=device_id, kind=FACTS_KIND), 1)
            facts = facts_from_record(decode_wire(latest[0])) if latest else None
            self.facts[device_id] = facts or {}
        return otlp.resource_attributes(
            device_id, self.facts[device_id], version=__version__, extra=self.settings.resource_attributes
        )

    async def _export(self, signal: str, rows: list[dict[str, Any]], decoded: list[dict[str, Any]]) -> None:
        """``rows`` (stored, in seq order) past this signal's cursor, and their decoded records."""
        records = [r for r in decoded if r.get("kind") in EXPORTED_KINDS]
        top = int(rows[-1]["seq"])
        if not records:  # facts, skips, warmups: nothing to export, the cursor moves over them
            await self._advance(signal, top, len(rows), 0, 0, None)
            return
        await self._send(signal, records, top, len(rows))

    async def _send(self, signal: str, records: list[dict[str, Any]], top: int, count: int) -> None:
        devices = sorted({r["device_id"] for r in records if type(r.get("device_id")) is str})
        resources = await asyncio.to_thread(lambda: {d: self.resource(d) for d in devices})
        pending = None
        # encoding takes ~0.3 ms a record: on a thread, so that ingest is not held up behind a batch's encoding
        if signal == "traces":
            groups = [(resources[d], [r for r in records if r.get("device_id") == d]) for d in devices]
            body, items = await asyncio.to_thread(otlp.encode_traces, groups, version=__version__)
        else:
            body, items, pending = await asyncio.to_thread(
                self.metrics.encode, records, resources, now_ns=time.time_ns(), version=__version__
            )
        if items == 0:
            await self._advance(signal, top, count, 0, 0, pending)
            return
        answer = await otlp.post_export(
            await self._client(), self.settings.url(signal), signal, body, self.settings.headers, self.settings.timeout
        )
        if answer.outcome == "accepted":
            if answer.rejected:
                log.warning(
                    "OTLP %s: the backend rejected %d of %d: %s", signal, answer.rejected, items, answer.message
                )
            await self._advance(signal, top, count, items - answer.rejected, answer.rejected, pending)
            return
        if answer.outcome == "refused" and len(records) > 1:
            # halve until the record the backend refuses is alone; the rest goes through
            half = len(records) // 2
            first, second = records[:half], records[half:]
            first_top = _seq_of(first[-1], top)
            await self._send(signal, first, first_top, 0)
            if self.status[signal].retry_at is None and self.status[signal].seq >= first_top:
                await self._send(signal, second, top, count)
            return
        if answer.outcome == "refused":
            record = records[0]
            rid = record.get("id")
            log.error(
                "OTLP %s: the backend refused record %s (device %s) on its own: %s; it is counted as rejected and "
                "skipped",
                signal,
                rid.hex() if type(rid) is bytes else rid,
                record.get("device_id"),
                answer.message,
            )
            await self._advance(signal, top, count, 0, items, None)  # its points are not in the totals either
            return
        self._failed(signal, answer)

    def _failed(self, signal: str, answer: otlp.ExportAnswer) -> None:
        status = self.status[signal]
        reason = "network" if answer.status is None else f"http_{answer.status}"
        if answer.status is not None and 200 <= answer.status < 300:
            reason = "not_otlp"
        status.failures[reason] = status.failures.get(reason, 0) + 1
        status.last_error = answer.message
        self._failures[signal] += 1
        n = self._failures[signal]
        delay = self._rng.uniform(0, min(self.settings.backoff_max, 1.0 * 2 ** min(n, 20)))
        if answer.retry_after is not None:
            delay = max(delay, min(answer.retry_after, self.settings.backoff_max))
        status.retry_at = time.monotonic() + max(0.2, delay)
        log.warning("OTLP %s export failed (%s): %s; retrying in %.1f s", signal, reason, answer.message, delay)

    async def _advance(
        self, signal: str, seq: int, count: int, items: int, rejected: int, pending: dict[str, Any] | None
    ) -> None:
        status = self.status[signal]
        cursor = dict(self._cursor[signal])
        if seq <= cursor["seq"]:
            return
        if pending is not None:
            self.metrics.commit(pending)
        now_us = time.time_ns() // 1000
        cursor.update(
            seq=seq,
            forwarded=int(cursor.get("forwarded", 0)) + count,
            items=int(cursor.get("items", 0)) + items,
            rejected=int(cursor.get("rejected", 0)) + rejected,
            updated_us=now_us,
        )
        if signal == "metrics":
            cursor["metrics"] = self.metrics.state()
        raw = json.dumps(cursor, separators=(",", ":"))
        swapped = await asyncio.to_thread(self.store.swap_meta, cursor_key(signal), self._raw[signal], raw)
        if not swapped:  # another replica moved it: take its cursor and go on from there
            log.warning("OTLP %s cursor moved by another aggregator; continuing from its position", signal)
            raw_now, cursor = await asyncio.to_thread(load_cursor, self.store, signal)
            raw = raw_now or raw
            if signal == "metrics":
                self.metrics = otlp.MetricsAccumulator(
                    self.settings.temporality, server_metrics=self.settings.server_metrics
                )
                self.metrics.load(cursor.get("metrics"))
        self._raw[signal], self._cursor[signal] = raw, cursor
        status.seq = cursor["seq"]
        status.forwarded = int(cursor.get("forwarded", 0))
        status.items = int(cursor.get("items", 0))
        status.rejected = int(cursor.get("rejected", 0))
        status.last_success_us = now_us
        status.last_error = None
        status.retry_at = None
        self._failures[signal] = 0

    def snapshot(self) -> dict[str, Any]:
        """What /metrics and ``otlp status`` show."""
        now_us = time.time_ns() // 1000
        return {
            "endpoint": self.settings.endpoint,
            "signals": {
                signal: status_dict(status, now_us, retrying=status.retry_at is not None)
                for signal, status in self.status.items()
            },
        }


def _seq_of(record: dict[str, Any], default: int) -> int:
    seq = record.get("_seq")
    return seq if type(seq) is int else default


def status_dict(status: SignalStatus, now_us: int, *, retrying: bool) -> dict[str, Any]:
    return {
        "cursor_seq": status.seq,
        "forwarded_records": status.forwarded,
        "accepted_items": status.items,
        "rejected_items": status.rejected,
        "pending_records": status.pending,
        "lag_seconds": (now_us - status.oldest_pending_us) / 1e6 if status.oldest_pending_us is not None else 0.0,
        "last_success_us": status.last_success_us,
        "failures": dict(status.failures),
        "last_error": status.last_error,
        "retrying": retrying,
    }


def store_settle_s(store: Store) -> float:
    """How long after being received a record is forwarded: 0 on SQLite (one writer: seq is in commit order); 30 s
    on PostgreSQL, where a transaction still open can hold a lower seq than one already committed."""
    return 0.0 if type(store).__name__ == "SQLiteStore" else 30.0


def stored_status(store: Store, signals: tuple[str, ...] = SIGNALS) -> dict[str, Any]:
    """The cursors as the store keeps them (``lens-aggregator otlp status``, with or without a running server)."""
    now_us = time.time_ns() // 1000
    out: dict[str, Any] = {}
    for signal in signals:
        _, cursor = load_cursor(store, signal)
        status = SignalStatus(
            seq=cursor["seq"],
            forwarded=int(cursor.get("forwarded", 0)),
            items=int(cursor.get("items", 0)),
            rejected=int(cursor.get("rejected", 0)),
            last_success_us=cursor.get("updated_us"),
        )
        status.pending, status.oldest_pending_us, _ = store.backlog_after(status.seq)
        out[signal] = status_dict(status, now_us, retrying=False)
        out[signal].pop("failures")
        out[signal].pop("last_error")
        out[signal].pop("retrying")
    return out
