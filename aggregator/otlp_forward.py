"""Forwarding every stored record to an OTLP/HTTP backend, store-and-forward: nothing lost, nothing sent twice.

The store is the queue. Each signal (traces, metrics) keeps a cursor — the ``seq`` of the last record the backend
acknowledged — in the store's ``meta`` table (``otlp.traces``, ``otlp.metrics``), with the metrics' cumulative
totals. A pass reads the records after the cursor, builds one export request per signal (``lens_core.otlp``), and
moves that signal's cursor only when the backend's answer is an OTLP response (a ``200`` page from a proxy is not);
a backend that is down, slow, refusing the token or throttling (``429``/``503`` with ``Retry-After``) is retried
with a growing delay, and nothing is skipped meanwhile. Spans carry ids derived from the record id, so the one batch
a crash between the backend's answer and the cursor's update can resend arrives with the same ids.

One record never holds up the others (docs/opentelemetry.md, "When a record or the backend fails"):

- A record the encoder cannot encode is left out of the request, counted (``unencodable``, persisted with the
  cursor) and logged with its id and device; the rest of its batch goes on. Ingest's bounds are the encoders'
  (``lens_core.record_schema``), so this is a last line of defence, not a path stored records should take.
- A request the backend refuses as malformed or too large (``400``/``413``) is halved, in order, until the records it
  refuses are alone. A record refused alone is a *suspect*; it is skipped (counted as rejected, logged with its id)
  only on evidence that the backend accepts other records: suspects refused before an acceptance are first sent
  again as one request (halved on a refusal) and skipped only if refused alone then; suspects refused after an
  acceptance of the same batch are skipped when the batch ends.
- When nothing of a batch is accepted (its suspects refused alone and nothing else, or more than
  ``2·⌈log2 n⌉ + 4`` requests in a row refused; n: the batch's records), evidence is looked for before holding:
  another device's records (the batch's own of devices with no suspect, then those waiting up to ``AHEAD_BATCHES``
  batches after it) sent ahead of the cursor, or, after a run past the budget, the last accepted request sent again
  (``_proof``; not for delta metrics). Accepted, the rest of the batch is halved down to its refused records with no
  limit on refusals in a row, a probe after each budget of them. Records sent ahead are kept with the cursor
  (``ahead``) and left out when it reaches them. Without evidence the backend is refusing everything: the signal is
  held and retried with backoff like a backend that is down, nothing is skipped, ``backend_failing`` shows it, and
  the suspects found so far are carried to the next pass. A run of N refused records of one device so holds no
  other device (their records go in the first pass) and is passed in at most ⌈N / batch_records⌉ + 1 passes, at
  about 2N requests.
- ``partial_success`` counts are clamped to the spans or points sent (never negative, never more than sent).

Several aggregator replicas on one PostgreSQL store share the cursors: a cursor moves by compare-and-swap, so a
replica that lost the race discards its pass (the backend saw the same ids twice, never a gap). PostgreSQL assigns
``seq`` before commit, so a record is only forwarded once it was received ``settle`` seconds ago: a transaction
still open with a lower ``seq`` is not skipped.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import json
import logging
import math
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from lens_core import otlp
from lens_core.otlp_config import SIGNALS as OTLP_SIGNALS
from lens_core.otlp_config import OtlpSettings, otlp_settings

from . import __version__
from .health import FACTS_KIND, facts_from_record
from .otlp_events import SIGNAL as EVENTS
from .otlp_events import RegressionEvents, cursor_text
from .rows import decode_wire
from .store import Query, Store

log = logging.getLogger("aggregator.otlp")

SIGNALS = OTLP_SIGNALS
__all__ = ["Forwarder", "OtlpSettings", "otlp_settings", "stored_status"]
EXPORTED_KINDS = otlp.SPAN_KINDS  # a blocked request (kind blocked) is a trace too


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
    unencodable: int = 0  # records the encoder could not encode, left out (persisted)
    pending: int = 0
    oldest_pending_us: int | None = None
    retry_at: float | None = None  # monotonic
    consecutive_failures: int = 0  # export attempts in a row that delivered nothing (this process)
    refusing_all: bool = False  # held because the backend refused every request (400/413), single records too


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
        # regression events, sent as log records (aggregator.otlp_events): their own cursor, always on
        self.event_status = SignalStatus()
        self.events = RegressionEvents(store, settings, self.event_status)
        self.metrics = otlp.MetricsAccumulator(settings.temporality, server_metrics=settings.server_metrics)
        self.facts: dict[str, dict[str, Any]] = {}
        self._raw: dict[str, str | None] = {}
        self._cursor: dict[str, dict[str, Any]] = {}
        self._unencodable: dict[str, set[int]] = {signal: set() for signal in settings.signals}  # seqs not yet passed
        # records the backend refused alone while nothing showed it works (seqs, in order, right after the cursor):
        # re-checked once it accepts something, never skipped before
        self._carried: dict[str, list[int]] = {signal: [] for signal in settings.signals}
        # records past the cursor the backend already accepted (another device's, sent ahead as evidence that it
        # works while one device's run is refused): left out when the cursor reaches them; kept with the cursor
        self._ahead: dict[str, set[int]] = {signal: set() for signal in settings.signals}
        # the last request of real records the backend accepted (at most PROOF_BYTES; not for delta metrics, where
        # a request sent twice counts twice): sent again, it shows the backend still accepts records
        self._proof: dict[str, bytes | None] = {signal: None for signal in settings.signals}
        self._logged: dict[str, tuple[float, int]] = {}  # rate-limited log lines: key → (last logged, suppressed)
        self._backlog_at = -math.inf  # when the backlog gauges were last read from the store (monotonic)
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
            _totals(status, cursor)
            status.last_success_us = cursor.get("updated_us")
            self._ahead[signal] = _ahead_of(cursor)
            if signal == "metrics":
                self.metrics.load(cursor.get("metrics"))
        raw, cursor = load_cursor(self.store, EVENTS)
        self.event_status.seq = cursor["seq"]
        _totals(self.event_status, cursor)
        self.event_status.last_success_us = cursor.get("updated_us")
        self.events.load(raw, cursor)
        self._refresh_backlog()

    def _refresh_backlog(self) -> None:
        """Records stored and not yet past each cursor, and the oldest one's receive time: the real backlog."""
        self._backlog_at = time.monotonic()
        for status in self.status.values():
            status.pending, status.oldest_pending_us, _ = self.store.backlog_after(status.seq)
        self.events.refresh()

    async def client(self) -> aiohttp.ClientSession:
        return await self._client()

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
                self._log_limited("pass", logging.ERROR, "OTLP forwarding pass failed: %s: %s", type(exc).__name__, exc)
                for status in [*self.status.values(), self.event_status]:
                    status.last_error = f"{type(exc).__name__}: {exc}"[:300]
                busy = False
            delay = self._next_delay() if not busy else 0.0
            if delay > 0:
                # a wake-up while a signal backs off does not cut its backoff short (forward_once skips a signal
                # that is not due); it refreshes the backlog gauges, at most once a second
                self._wake.clear()
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout=delay)

    def _log_limited(self, key: str, level: int, message: str, *args: Any) -> None:
        """A log line at most once a minute per ``key``; the lines left out meanwhile are counted in the next."""
        now = time.monotonic()
        last, suppressed = self._logged.get(key, (-math.inf, 0))
        if now - last < LOG_EVERY_S:
            self._logged[key] = (last, suppressed + 1)
            return
        if suppressed:
            message += f" ({suppressed} similar lines left out in the last {LOG_EVERY_S:.0f} s)"
        self._logged[key] = (now, 0)
        log.log(level, message, *args)

    def _next_delay(self) -> float:
        now = time.monotonic()
        statuses = [*self.status.values(), self.event_status]
        waits = [max(0.0, s.retry_at - now) for s in statuses if s.retry_at is not None]
        return min([self.settings.interval, *waits])

    # -- one pass ----------------------------------------------------------------------------------------
    async def forward_once(self) -> bool:
        """Export the next batch of each signal that is not backing off. True when a full batch went out (more may
        be waiting)."""
        self.passes += 1
        # the gauges follow the store — before a pass (records just stored), after it (the cursors moved), also when
        # the pass fails or nothing is due — at most once a second
        if time.monotonic() - self._backlog_at >= 1.0:
            await asyncio.to_thread(self._refresh_backlog)
        try:
            busy = await self._pass()
            if (self.event_status.retry_at or 0) <= time.monotonic():
                busy = await self.events.forward(self) or busy
            return busy
        finally:
            if time.monotonic() - self._backlog_at >= 1.0:
                await asyncio.to_thread(self._refresh_backlog)

    async def _pass(self) -> bool:
        now = time.monotonic()
        due = [s for s in self.settings.signals if (self.status[s].retry_at or 0) <= now]
        if not due:
            return False
        after = min(self.status[s].seq for s in due)
        # suspects carried from an earlier pass are read again, beside a full batch of records after them
        limit = self.settings.batch_records + max(len(self._carried[s]) for s in due)
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
        self._backlog_at = -math.inf  # the cursors moved: refresh now
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
        ahead = self._ahead[signal]
        records = [r for r in decoded if r.get("kind") in EXPORTED_KINDS and r["_seq"] not in ahead]
        top = int(rows[-1]["seq"])
        carried = set(self._carried[signal])
        fresh = [r for r in records if r["_seq"] not in carried]
        batch = _Batch(
            [int(r["seq"]) for r in rows],
            budget=2 * math.ceil(math.log2(max(len(fresh), 1))) + 4,
            carried=[r for r in records if r["_seq"] in carried],
        )
        if fresh:
            await self._send(signal, fresh, top, batch)
        if not batch.accepted and (batch.exhausted or (not batch.stopped and (batch.carried or batch.suspects))):
            # refused and nothing of the batch accepted: the backend's fault until it shows otherwise — which it
            # does by accepting another device's records waiting behind the batch, or (after a long run) a request
            # of records it accepted before
            if batch.exhausted:
                why = batch.why
            else:
                why = (
                    f"the backend refused {len(batch.carried) + len(batch.suspects)} record(s) alone and accepted none"
                )
            batch.stopped = False
            if await self._evidence(signal, records, top, batch):
                await self._isolate(signal, fresh, top, batch)
            elif not batch.stopped:
                self._hold(signal, batch, why)
        if batch.stopped:
            self._carry(signal, batch)
            return
        # everything in the batch is resolved: accepted, skipped, unencodable or not exported (facts, warm-ups)
        self._carried[signal] = []
        await self._advance(signal, top, batch, 0, self._skip(signal, batch), None)

    def _carry(self, signal: str, batch: _Batch) -> None:
        """Keep the suspects of a pass that stopped for the next one (at most a batch of them: beyond, the same
        records are probed again), and the metrics totals as the cursor has them."""
        seqs = [int(r["_seq"]) for r in batch.carried] + [int(r["_seq"]) for r, _, _ in batch.suspects]
        self._carried[signal] = seqs[: self.settings.batch_records]
        batch.carried, batch.suspects = [], []
        if signal == "metrics" and batch.committed:  # totals kept for a request whose records the cursor did not pass
            self._reload_metrics()
            self._ahead[signal] -= set(batch.ahead_new)  # their totals went with the reload: sent again later

    async def _evidence(self, signal: str, records: list[dict[str, Any]], top: int, batch: _Batch) -> bool:
        """Whether the backend shows it accepts records while refusing the batch's: it accepts another device's
        records waiting after the batch (sent now, ahead of the cursor), or, after a run longer than the budget, the
        last request of records it accepted (sent again). A failure stops the batch (``batch.stopped``)."""
        # the devices whose records it refused alone; another device's records are probed, the batch's own first
        refused_alone = [*batch.carried, *(r for r, _, _ in batch.suspects)]
        devices = {r.get("device_id") for r in refused_alone} or {r.get("device_id") for r in records}
        tried = {id(r) for r in refused_alone}
        room = min(AHEAD_BATCHES * self.settings.batch_records - len(self._ahead[signal]), self.settings.batch_records)
        others = [r for r in records if r.get("device_id") not in devices and id(r) not in tried][: max(room, 0)]
        if len(others) < room:
            others += await asyncio.to_thread(self._others_after, signal, top, devices, room - len(others))
        if others:
            body, items, pending, refused = await self._encode(signal, others)
            if refused:
                self._unencodable_found(signal, refused)
                out = {id(u.record) for u in refused}
                others = [r for r in others if id(r) not in out]
            if items:
                answer = await self._post(signal, body)
                if answer.outcome == "accepted":
                    if pending is not None:
                        self.metrics.commit(pending)
                        batch.committed = True
                    rejected = min(answer.rejected, items)
                    seqs = [int(r["_seq"]) for r in others]
                    self._ahead[signal].update(seqs)
                    batch.ahead_new.extend(seqs)
                    batch.extra_items += items - rejected
                    batch.extra_rejected += rejected
                    self._keep_proof(signal, body)
                    log.info(
                        "OTLP %s: the backend refuses records of %s and accepted %d record(s) of other devices sent "
                        "ahead of them (seq %d-%d); the refused ones are isolated",
                        signal,
                        ", ".join(sorted(str(d) for d in devices)[:3]) + (" …" if len(devices) > 3 else ""),
                        len(seqs),
                        seqs[0],
                        seqs[-1],
                    )
                    return True
                if answer.outcome != "refused":
                    self._failed(signal, answer)
                    batch.stopped = True
                return False  # it refuses other devices' records too: nothing shows it works
        if batch.exhausted:
            return await self._reprobe(signal, batch, records=True)
        return False

    async def _isolate(self, signal: str, fresh: list[dict[str, Any]], top: int, batch: _Batch) -> None:
        """The backend showed it works while refusing the batch (nothing of which it accepted): the records refused
        alone so far are sent again (skipped if refused alone again), then the rest is halved down to the records it
        refuses, with no limit on the refusals in a row but a probe after each ``budget`` of them."""
        batch.accepted, batch.exhausted, batch.refused_in_a_row = True, False, 0
        earlier = [*batch.carried, *(r for r, _, _ in batch.suspects)]
        batch.carried, batch.suspects = [], []
        done = {id(r) for r in earlier}
        if earlier:
            delivered, refused_now = await self._recheck(signal, earlier, batch)
            batch.extra_items += delivered
            batch.extra_rejected += refused_now
            if batch.stopped:
                return
        self._carried[signal] = []
        ahead = self._ahead[signal]
        rest = [r for r in fresh if id(r) not in done and r["_seq"] not in ahead]
        if rest:
            await self._send(signal, rest, top, batch)

    async def _reprobe(self, signal: str, batch: _Batch, *, records: bool) -> bool:
        """Send again the last request of records the backend accepted (``records``, when one is kept), or else,
        once the batch has evidence, an export with no records: accepted, the backend still works. Refused, it
        refuses everything: the batch is held. A failure stops it. Before any evidence only records count."""
        body = self._proof[signal] if records else None
        if body is None:
            if not batch.accepted:
                return False
            body = b""  # an OTLP export request with no resource spans or metrics
        answer = await self._post(signal, body)
        if answer.outcome == "accepted":
            return True
        if answer.outcome == "refused":
            self._proof[signal] = None
            what = "a request it accepted before" if body else "an export with no records"
            self._hold(signal, batch, f"{what} is refused now: {answer.message}")
        else:
            self._failed(signal, answer)
            batch.stopped = True
        return False

    def _keep_proof(self, signal: str, body: bytes) -> None:
        if len(body) <= PROOF_BYTES and not (signal == "metrics" and self.settings.temporality == "delta"):
            self._proof[signal] = body

    async def _post(self, signal: str, body: bytes) -> otlp.ExportAnswer:
        return await otlp.post_export(
            await self._client(), self.settings.url(signal), signal, body, self.settings.headers, self.settings.timeout
        )

    def _others_after(self, signal: str, top: int, devices: set[Any], want: int) -> list[dict[str, Any]]:
        """Up to ``want`` exported records after ``top`` of devices other than ``devices``, not yet sent ahead, in
        seq order, read at most ``AHEAD_BATCHES`` batches far (settled ones only)."""
        out: list[dict[str, Any]] = []
        if want <= 0:
            return out
        ahead = self._ahead[signal]
        cutoff = time.time_ns() // 1000 - self.settle_us
        after = top
        for _ in range(AHEAD_BATCHES):
            rows = self.store.query(Query(), limit=self.settings.batch_records, after_seq=after)
            for row in rows:
                if self.settle_us and row["received_us"] >= cutoff:
                    return out
                after = int(row["seq"])
                if row.get("device_id") in devices or after in ahead or row.get("kind") not in EXPORTED_KINDS:
                    continue
                record = decode_wire(row)
                if record is None or record.get("kind") not in EXPORTED_KINDS:
                    continue
                record["_seq"] = after
                out.append(record)
                if len(out) >= want:
                    return out
            if len(rows) < self.settings.batch_records:
                break
        return out

    def _reload_metrics(self) -> None:
        self.metrics = otlp.MetricsAccumulator(self.settings.temporality, server_metrics=self.settings.server_metrics)
        self.metrics.load(self._cursor["metrics"].get("metrics"))

    async def _encode(
        self, signal: str, records: list[dict[str, Any]]
    ) -> tuple[bytes, int, dict[str, Any] | None, list[otlp.Unencodable]]:
        devices = sorted({r["device_id"] for r in records if type(r.get("device_id")) is str})
        resources = await asyncio.to_thread(lambda: {d: self.resource(d) for d in devices})
        # encoding takes ~0.3 ms a record: on a thread, so that ingest is not held up behind a batch's encoding
        if signal == "traces":
            groups = [(resources[d], [r for r in records if r.get("device_id") == d]) for d in devices]
            body, items, refused = await asyncio.to_thread(otlp.encode_traces_isolated, groups, version=__version__)
            return body, items, None, refused
        body, items, pending = await asyncio.to_thread(
            self.metrics.encode, records, resources, now_ns=time.time_ns(), version=__version__
        )
        return body, items, pending, pending.pop("refused", [])

    def _unencodable_found(self, signal: str, refused: list[otlp.Unencodable]) -> None:
        seen = self._unencodable[signal]
        for item in refused:
            seq = item.record.get("_seq")
            if type(seq) is int and seq not in seen:
                seen.add(seq)
                self._log_limited(
                    f"unencodable.{signal}",
                    logging.ERROR,
                    "OTLP %s: %s; it is left out of the export and counted (lens_otlp_unencodable_records)",
                    signal,
                    item.describe(),
                )

    async def _send(self, signal: str, records: list[dict[str, Any]], top: int, batch: _Batch) -> None:
        """Export ``records`` (the last one's seq, or the batch's top, is ``top``); halve on a refusal."""
        body, items, pending, refused = await self._encode(signal, records)
        if refused:  # left out of this request and of every half of it
            self._unencodable_found(signal, refused)
            out = {id(u.record) for u in refused}
            records = [r for r in records if id(r) not in out]
        if items == 0:  # nothing to deliver (unencodable, or no spans): resolved, but no evidence of a backend
            if not (batch.suspects or batch.carried):  # never past a suspect still undecided
                await self._advance(signal, top, batch, 0, 0, pending)
            return
        answer = await otlp.post_export(
            await self._client(), self.settings.url(signal), signal, body, self.settings.headers, self.settings.timeout
        )
        if answer.outcome == "accepted":
            rejected = min(answer.rejected, items)  # partial_success: never more than was sent
            if rejected:
                log.warning("OTLP %s: the backend rejected %d of %d: %s", signal, rejected, items, answer.message)
            self._keep_proof(signal, body)
            batch.accepted = True
            batch.refused_in_a_row = 0
            if not (batch.carried or batch.suspects):
                await self._advance(signal, top, batch, items - rejected, rejected, pending)
                return
            # the backend works: the records it refused alone before this request are sent again, as one request
            # (halved on a refusal); those it refuses alone now are skipped
            if pending is not None:
                self.metrics.commit(pending)  # their totals build on this request's
                batch.committed = True
            suspects = [r for r, _, _ in batch.suspects]
            batch.suspects = []
            delivered, refused_now = await self._recheck(signal, [*batch.carried, *suspects], batch)
            batch.carried = []
            if batch.stopped:
                self._carry(signal, batch)
                return
            self._carried[signal] = []
            await self._advance(signal, top, batch, items - rejected + delivered, rejected + refused_now, None)
            return
        if answer.outcome != "refused":
            self._failed(signal, answer)
            batch.stopped = True
            return
        batch.refused_in_a_row += 1
        if batch.refused_in_a_row > batch.budget:
            if not batch.accepted:  # the batch ends here: _export looks for evidence that the backend works
                batch.why = f"{batch.refused_in_a_row} requests in a row refused: {answer.message}"
                batch.exhausted = batch.stopped = True
                return
            # it accepted records of this batch: check that it still does before going on halving
            # an export with no records each time (it catches a backend now answering 400 to everything), the
            # accepted request again the 1st, 2nd, 4th, 8th… time (a backend now refusing every record), so that
            # its spans reach the backend again only O(log n) times
            batch.probes += 1
            if not await self._reprobe(signal, batch, records=batch.probes & (batch.probes - 1) == 0):
                return
            batch.refused_in_a_row = 0
        if len(records) > 1:  # halve until the records the backend refuses are alone; the rest goes through
            half = len(records) // 2
            first, second = records[:half], records[half:]
            await self._send(signal, first, _seq_of(first[-1], top), batch)
            if not batch.stopped:
                await self._send(signal, second, top, batch)
            return
        batch.suspects.append((records[0], items, answer.message))

    async def _recheck(self, signal: str, records: list[dict[str, Any]], batch: _Batch) -> tuple[int, int]:
        """Send records the backend refused alone before it accepted another request: (items accepted, items
        refused alone now, skipped). A refused group is halved; a failure stops the batch (``batch.stopped``)."""
        body, items, pending, refused = await self._encode(signal, records)
        if refused:
            self._unencodable_found(signal, refused)
            out = {id(u.record) for u in refused}
            records = [r for r in records if id(r) not in out]
        if items == 0:
            return 0, 0
        answer = await otlp.post_export(
            await self._client(), self.settings.url(signal), signal, body, self.settings.headers, self.settings.timeout
        )
        if answer.outcome == "accepted":
            if pending is not None:
                self.metrics.commit(pending)
                batch.committed = True
            rejected = min(answer.rejected, items)
            return items - rejected, rejected
        if answer.outcome != "refused":
            self._failed(signal, answer)
            batch.stopped = True
            return 0, 0
        if len(records) > 1:
            half = len(records) // 2
            a1, r1 = await self._recheck(signal, records[:half], batch)
            if batch.stopped:
                return 0, 0
            a2, r2 = await self._recheck(signal, records[half:], batch)
            return a1 + a2, r1 + r2
        batch.suspects = [(records[0], items, answer.message)]
        return 0, self._skip(signal, batch)

    def _skip(self, signal: str, batch: _Batch) -> int:
        """Skip the batch's suspects (the backend accepted another request of the batch): log each; their items."""
        total = 0
        for record, items, message in batch.suspects:
            rid = record.get("id")
            log.error(
                "OTLP %s: the backend refused record %s (device %s) on its own while accepting others: %s; it is "
                "counted as rejected and skipped",
                signal,
                rid.hex() if type(rid) is bytes else rid,
                record.get("device_id"),
                message,
            )
            total += items
        batch.suspects.clear()
        return total

    def _hold(self, signal: str, batch: _Batch, message: str) -> None:
        """The backend refuses everything: hold the signal (nothing skipped) and retry with backoff."""
        batch.stopped = True
        self.status[signal].refusing_all = True
        self._failed(
            signal,
            otlp.ExportAnswer("retry", None, f"the backend refuses every request, single records too ({message})"),
            reason="refused_all",
        )

    def failed_events(self, answer: otlp.ExportAnswer, *, reason: str | None = None) -> None:
        """The regression events' export failed: retried with backoff, nothing skipped."""
        if reason == "refused_all":
            self.event_status.refusing_all = True
        self._failed(EVENTS, answer, reason=reason)

    async def advance_events(self, seq: int, rows: int, items: int, rejected: int) -> None:
        """The backend answered for the regression events up to ``seq``: move their cursor (compare-and-swap) and
        delete the events it passed."""
        status = self.event_status
        cursor = dict(self.events.cursor)
        if seq > cursor["seq"]:
            now_us = time.time_ns() // 1000
            cursor.update(
                seq=seq,
                forwarded=max(0, int(cursor.get("forwarded", 0))) + rows,
                items=max(0, int(cursor.get("items", 0))) + max(0, items),
                rejected=max(0, int(cursor.get("rejected", 0))) + max(0, rejected),
                updated_us=now_us,
            )
            raw = cursor_text(cursor)
            swapped = await asyncio.to_thread(self.store.swap_meta, cursor_key(EVENTS), self.events.raw, raw)
            if not swapped:
                log.warning("OTLP %s cursor moved by another aggregator; continuing from its position", EVENTS)
                raw_now, cursor = await asyncio.to_thread(load_cursor, self.store, EVENTS)
                raw = raw_now or raw
            self.events.raw, self.events.cursor = raw, cursor
            status.seq = cursor["seq"]
            _totals(status, cursor)
            status.last_success_us = now_us
            await asyncio.to_thread(self.store.forget_regression_events, status.seq)
        status.last_error = None
        status.retry_at = None
        status.consecutive_failures = 0
        status.refusing_all = False
        self._backlog_at = -math.inf

    def _failed(self, signal: str, answer: otlp.ExportAnswer, *, reason: str | None = None) -> None:
        status = self.status.get(signal, self.event_status)
        if reason is None:
            reason = "network" if answer.status is None else f"http_{answer.status}"
            if answer.status is not None and 200 <= answer.status < 300:
                reason = "not_otlp"
            status.refusing_all = False
        status.failures[reason] = status.failures.get(reason, 0) + 1
        status.last_error = answer.message[:300]
        status.consecutive_failures += 1
        n = status.consecutive_failures
        delay = self._rng.uniform(0, min(self.settings.backoff_max, 1.0 * 2 ** min(n, 20)))
        if answer.retry_after is not None:
            delay = max(delay, min(answer.retry_after, self.settings.backoff_max))
        status.retry_at = time.monotonic() + max(0.2, delay)
        self._log_limited(
            f"failed.{signal}",
            logging.WARNING,
            "OTLP %s export failed (%s, %d in a row): %s; nothing skipped, retrying in %.1f s",
            signal,
            reason,
            n,
            answer.message,
            delay,
        )

    async def _advance(
        self, signal: str, seq: int, batch: _Batch, items: int, rejected: int, pending: dict[str, Any] | None
    ) -> None:
        status = self.status[signal]
        cursor = dict(self._cursor[signal])
        if seq <= cursor["seq"]:
            return
        if pending is not None:
            self.metrics.commit(pending)
        items, rejected = items + batch.extra_items, rejected + batch.extra_rejected
        batch.extra_items = batch.extra_rejected = 0
        now_us = time.time_ns() // 1000
        seen = self._unencodable[signal]
        passed = {s for s in seen if s <= seq}
        seen -= passed
        cursor.update(
            seq=seq,
            forwarded=max(0, int(cursor.get("forwarded", 0))) + batch.rows_between(cursor["seq"], seq),
            items=max(0, int(cursor.get("items", 0))) + max(0, items),
            rejected=max(0, int(cursor.get("rejected", 0))) + max(0, rejected),
            unencodable=max(0, int(cursor.get("unencodable", 0))) + len(passed),
            updated_us=now_us,
        )
        if signal == "metrics":
            cursor["metrics"] = self.metrics.state()
        ahead = sorted(s for s in self._ahead[signal] if s > seq)
        cursor.pop("ahead", None)
        if ahead:  # sent ahead (their metrics totals are in the state beside them): not to be sent again
            cursor["ahead"] = ahead
        raw = json.dumps(cursor, separators=(",", ":"))
        swapped = await asyncio.to_thread(self.store.swap_meta, cursor_key(signal), self._raw[signal], raw)
        if not swapped:  # another replica moved it: take its cursor and go on from there
            log.warning("OTLP %s cursor moved by another aggregator; continuing from its position", signal)
            raw_now, cursor = await asyncio.to_thread(load_cursor, self.store, signal)
            raw = raw_now or raw
        self._raw[signal], self._cursor[signal] = raw, cursor
        self._ahead[signal] = _ahead_of(cursor)
        if not swapped and signal == "metrics":
            self._reload_metrics()
        status.seq = cursor["seq"]
        _totals(status, cursor)
        self._unencodable[signal] = {s for s in self._unencodable[signal] if s > status.seq}
        self._carried[signal] = [s for s in self._carried[signal] if s > status.seq]
        status.last_success_us = now_us
        status.last_error = None
        status.retry_at = None
        status.consecutive_failures = 0
        status.refusing_all = False

    def snapshot(self) -> dict[str, Any]:
        """What /metrics and ``otlp status`` show."""
        now_us = time.time_ns() // 1000
        return {
            "endpoint": self.settings.endpoint,
            "signals": {
                signal: status_dict(status, now_us, retrying=status.retry_at is not None)
                for signal, status in [*self.status.items(), (EVENTS, self.event_status)]
            },
            "dropped_events": self.events.dropped,
        }


LOG_EVERY_S = 60.0
AHEAD_BATCHES = 20  # how far past a refused batch other devices' records are looked for, and held sent ahead
PROOF_BYTES = 1 << 20  # the largest accepted request kept to be sent again as a probe


@dataclass
class _Batch:
    """One signal's export of one batch: what the backend said so far (see the module's docstring)."""

    row_seqs: list[int]  # every stored row of the batch, in seq order (what ``forwarded`` counts)
    budget: int  # refused requests in a row, without an acceptance, before the backend counts as refusing all
    accepted: bool = False
    refused_in_a_row: int = 0
    suspects: list[tuple[dict[str, Any], int, str]] = field(default_factory=list)  # (record, items, reason)
    carried: list[dict[str, Any]] = field(default_factory=list)  # suspects of an earlier pass, first in the batch
    stopped: bool = False  # the backend failed or was held: the rest of the batch waits
    exhausted: bool = False  # more than ``budget`` refusals in a row and nothing accepted: evidence is looked for
    why: str = ""  # the refusal that exhausted the budget
    probes: int = 0  # probes sent while halving after evidence
    ahead_new: list[int] = field(default_factory=list)  # seqs sent ahead of the cursor in this batch
    extra_items: int = 0  # items accepted (or rejected) outside the requests that move the cursor, counted at the
    extra_rejected: int = 0  # next move
    committed: bool = False  # metrics totals kept in memory ahead of the cursor (rolled back if the pass stops)

    def rows_between(self, low: int, high: int) -> int:
        """Rows of the batch with ``low < seq <= high``."""
        return bisect.bisect_right(self.row_seqs, high) - bisect.bisect_right(self.row_seqs, low)


def _totals(status: SignalStatus, cursor: dict[str, Any]) -> None:
    """The persisted totals (a total a bug once drove negative reads as 0)."""
    status.forwarded = max(0, int(cursor.get("forwarded", 0)))
    status.items = max(0, int(cursor.get("items", 0)))
    status.rejected = max(0, int(cursor.get("rejected", 0)))
    status.unencodable = max(0, int(cursor.get("unencodable", 0)))


def _ahead_of(cursor: dict[str, Any]) -> set[int]:
    """The seqs a cursor holds as sent ahead of it (anything else in the field is ignored)."""
    value = cursor.get("ahead")
    if type(value) is not list:
        return set()
    return {s for s in value if type(s) is int and s > cursor["seq"]}


def _seq_of(record: dict[str, Any], default: int) -> int:
    seq = record.get("_seq")
    return seq if type(seq) is int else default


def status_dict(status: SignalStatus, now_us: int, *, retrying: bool) -> dict[str, Any]:
    return {
        "cursor_seq": status.seq,
        "forwarded_records": status.forwarded,
        "accepted_items": status.items,
        "rejected_items": status.rejected,
        "unencodable_records": status.unencodable,
        "pending_records": status.pending,
        "lag_seconds": (now_us - status.oldest_pending_us) / 1e6 if status.oldest_pending_us is not None else 0.0,
        "last_success_us": status.last_success_us,
        "failures": dict(status.failures),
        "last_error": status.last_error,
        "retrying": retrying,
        "backend_failing": status.consecutive_failures > 0,
        "backend_refusing_all": status.refusing_all,
        "consecutive_failures": status.consecutive_failures,
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
        status = SignalStatus(seq=cursor["seq"], last_success_us=cursor.get("updated_us"))
        _totals(status, cursor)
        status.pending, status.oldest_pending_us, _ = store.backlog_after(status.seq)
        out[signal] = status_dict(status, now_us, retrying=False)
        for live in ("failures", "last_error", "retrying", "backend_failing", "backend_refusing_all"):
            out[signal].pop(live)
        out[signal].pop("consecutive_failures")
    # the regression events' cursor (aggregator.otlp_events): events, not records, behind it
    _, cursor = load_cursor(store, EVENTS)
    status = SignalStatus(seq=cursor["seq"], last_success_us=cursor.get("updated_us"))
    _totals(status, cursor)
    status.pending, status.oldest_pending_us, dropped = store.regression_events_backlog(status.seq)
    events = status_dict(status, now_us, retrying=False)
    for live in ("failures", "last_error", "retrying", "backend_failing", "backend_refusing_all"):
        events.pop(live)
    events.pop("consecutive_failures")
    events["dropped_events"] = dropped
    out[EVENTS] = events
    return out
