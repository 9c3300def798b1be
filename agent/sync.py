"""Uploading the outbox to the aggregator: batches, acknowledgements, refusals, backoff, and the periodic job.

Delivery is at-least-once: a batch's rows are deleted only on the aggregator's own acknowledgement of *that*
batch — JSON carrying the ingest protocol, the batch id, the record count and a digest of the record ids, with
``accepted + duplicates`` equal to what was sent (``wire.check_ack``) — and the aggregator dedupes by record id, so a
retry after a crash, a timeout or a lost answer never double-counts. Devices live behind captive portals, proxies,
WAFs and load balancers, so every other answer keeps everything:

* any other ``200`` (HTML, text, JSON that is not this batch's acknowledgement), any ``3xx`` (redirects are never
  followed), a body over 64 KiB, a bare ``4xx``/``5xx`` — a failed attempt: nothing deleted, backoff, and the reason
  in ``status`` (``not_aggregator``, ``server``, ``network``);
* the aggregator's structured refusals (``wire.parse_refusal``) are acted on: ``too_large`` naming its limit — the
  batch is split in halves, and a single record still refused is quarantined (kept on the device, counted);
  ``record_invalid`` naming a record of this batch by index and id — that record is quarantined and the rest
  resent; ``batch_invalid`` — bisected until the bad record is found; ``unauthorized``/``forbidden``/
  ``wrong_device``/``unsupported_version`` — nothing is dropped, backoff, and ``status`` is unhealthy;
* rows that can never be uploaded as they are (undecodable, or stored under another ``device_id``) are quarantined
  before sending, with a reason code; ``lens-agent outbox`` lists, exports, retries or drops them.

See docs/store-and-forward.md for the table of answers and what the agent does with each.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import random
import ssl
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lens_core import wire

from .clock import boot_id
from .config import AgentConfig
from .errors import ConfigError
from .outbox import AsyncOutbox, OutboxError, PendingRow
from .schedule import Clock, Scheduler
from .transport import HttpAnswer, HttpClient, TransportTLSError

log = logging.getLogger("agent.sync")

INGEST_PATH = "/api/v1/ingest"
HEALTH_PATH = "/api/v1/health"


@dataclass(frozen=True)
class SyncSettings:
    url: str
    token: str
    device_id: str
    ca_file: Path | None = None
    batch_size: int = 500
    max_batch_bytes: int = 4 * 1024**2
    compression: str = "zstd"
    zstd_level: int = 3
    timeout: float = 30.0
    interval: float = 60.0
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    sync_on_network_available: bool = True
    # the longest the aggregator should wait between this device's batches (the service sets it from its workloads'
    # schedules and the sync interval); sent with every batch so the fleet view judges silence against it
    expected_gap_s: float | None = None

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)

    def http_client(self, timeout: float | None = None) -> HttpClient:
        """The HTTP client to the aggregator: ``timeout`` (default ``sync.timeout``) bounds each whole request."""
        total = self.timeout if timeout is None else timeout
        return HttpClient(timeout=total, connect_timeout=min(10.0, total), ssl_context=self.ssl_context())


def sync_settings(config: AgentConfig, environ: dict[str, str] | None = None) -> SyncSettings:
    """Build the uploader's settings; a missing URL or token, or plain HTTP not allowed, is a ConfigError."""
    environ = dict(os.environ) if environ is None else environ
    s = config.values["sync"]
    url = s["url"]
    if not url:
        raise ConfigError(
            config.source("sync", "url"), "sync.url", url, "the aggregator's base URL, e.g. https://host:8443"
        )
    url = str(url).rstrip("/")
    if url.startswith("http://"):
        if not s["allow_http"]:
            raise ConfigError(
                config.source("sync", "url"),
                "sync.url",
                url,
                "an https:// URL (set sync.allow_http = true to allow plain HTTP)",
            )
    elif not url.startswith("https://"):
        raise ConfigError(config.source("sync", "url"), "sync.url", url, "an https:// (or http://) URL")
    token = environ.get("LENS_SYNC_TOKEN", "").strip()
    if not token:
        token_file = s["token_file"]
        if token_file is None:
            raise ConfigError(
                config.source("sync", "token_file"),
                "sync.token_file",
                None,
                "a file holding the device token (or the LENS_SYNC_TOKEN environment variable)",
            )
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(
                config.source("sync", "token_file"),
                "sync.token_file",
                str(token_file),
                f"a readable file holding the device token ({exc.strerror})",
            ) from None
        if not token:
            raise ConfigError(
                config.source("sync", "token_file"), "sync.token_file", str(token_file), "a non-empty token"
            )
    if s["ca_file"] is not None and not Path(s["ca_file"]).is_file():
        raise ConfigError(config.source("sync", "ca_file"), "sync.ca_file", str(s["ca_file"]), "an existing PEM file")
    return SyncSettings(
        url=url,
        token=token,
        device_id=config.get("agent", "device_id"),
        ca_file=s["ca_file"],
        batch_size=s["batch_size"],
        max_batch_bytes=s["max_batch_bytes"],
        compression=s["compression"],
        zstd_level=s["zstd_level"],
        timeout=s["timeout"],
        interval=s["interval"],
        backoff_initial=s["backoff_initial"],
        backoff_max=s["backoff_max"],
        sync_on_network_available=s["sync_on_network_available"],
    )


async def probe_aggregator(settings: SyncSettings, timeout: float = 5.0) -> bool:
    """Whether the aggregator itself answers ``GET /api/v1/health`` within ``timeout`` seconds (a captive portal's
    ``200 OK`` page does not count)."""
    async with settings.http_client(timeout) as client:
        return (await _get_json(client, settings.url + HEALTH_PATH)).is_aggregator_health


class SyncFailure(Exception):
    """An upload that did not go through; nothing was deleted. ``kind``: network, server, auth, unsupported,
    not_aggregator (the answer came from something else: a captive portal, proxy, WAF) or outbox (local storage)."""

    def __init__(self, kind: str, message: str, status: int | None = None) -> None:
        self.kind = kind
        self.status = status
        self.message = message
        super().__init__(message)


@dataclass
class SyncReport:
    batches: int = 0
    uploaded: int = 0
    accepted: int = 0
    duplicates: int = 0
    quarantined: int = 0
    pending: int | None = 0
    error: str | None = None
    error_kind: str | None = None
    status: int | None = None
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

    @property
    def delivered_all(self) -> bool:
        """Nothing failed and nothing is left waiting."""
        return self.ok and self.pending == 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "batches": self.batches,
            "uploaded": self.uploaded,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "quarantined": self.quarantined,
            "pending": self.pending,
            "error": self.error,
            "error_kind": self.error_kind,
            "http_status": self.status,
        }


def full_jitter_backoff(attempt: int, initial: float, cap: float, rng: random.Random | None = None) -> float:
    """Delay before retry ``attempt`` (1-based): uniform in [0, min(cap, initial × 2^(attempt−1))]."""
    rng = rng or random.Random()
    ceiling = min(cap, initial * (2 ** max(0, attempt - 1)))
    return rng.uniform(0.0, ceiling)


@dataclass(frozen=True)
class Answer:
    """What came back for a request, read up to ``wire.MAX_ANSWER_BYTES``."""

    status: int
    content_type: str
    payload: Any = None  # the JSON document, when the answer was JSON
    snippet: str = ""  # the start of the body, for messages
    location: str | None = None
    oversized: bool = False

    @property
    def describe(self) -> str:
        kind = self.content_type or "no content type"
        return f"HTTP {self.status} {kind}"

    @property
    def is_aggregator_health(self) -> bool:
        p = self.payload
        return self.status == 200 and isinstance(p, dict) and p.get("service") == "lens-aggregator"


def _answer(response: HttpAnswer) -> Answer:
    """The status and at most ``MAX_ANSWER_BYTES`` of the body (the transport read no more: a proxy's 1.5 GB error
    page costs 64 KiB, and its connection is dropped rather than read to the end)."""
    payload: Any = None
    if response.content_type == "application/json" and not response.truncated:
        payload = wire.parse_answer_json(response.body)  # None when not JSON or nested past wire.MAX_ANSWER_DEPTH
    snippet = response.body[:200].decode("utf-8", "replace").strip()
    location = response.headers.get("Location")
    return Answer(response.status, response.content_type, payload, snippet, location, response.truncated)


async def _request(
    client: HttpClient, method: str, url: str, *, body: bytes | None = None, headers: dict[str, str] | None = None
) -> Answer:
    return _answer(await client.request(method, url, body=body, headers=headers, max_body=wire.MAX_ANSWER_BYTES))


async def _get_json(client: HttpClient, url: str, headers: dict[str, str] | None = None) -> Answer:
    try:
        return await _request(client, "GET", url, headers=headers)
    except (asyncio.TimeoutError, TimeoutError, OSError) as exc:
        return Answer(0, "", snippet=_network_message(url, exc))


def _network_message(url: str, exc: BaseException) -> str:
    if isinstance(exc, (asyncio.TimeoutError, TimeoutError)):
        return f"no answer from {url} in time"
    if isinstance(exc, TransportTLSError):
        return f"TLS to {url} failed: {exc}"
    return f"cannot reach {url}: {exc or type(exc).__name__}"


REDIRECTS = (301, 302, 303, 307, 308)


def _not_aggregator(answer: Answer, what: str) -> SyncFailure:
    if answer.status == 200:
        hint = "a captive portal or proxy?"
    elif answer.status in REDIRECTS:
        hint = "a redirect: a captive portal, or sync.url should be the address it points to"
    else:
        hint = "a proxy, WAF or load balancer answering in the aggregator's place?"
    where = f" to {answer.location}" if answer.location else ""
    size = f" over {wire.MAX_ANSWER_BYTES // 1024} KiB" if answer.oversized else ""
    body = f" ({answer.snippet[:80]!r})" if answer.snippet and not answer.oversized else ""
    return SyncFailure(
        "not_aggregator",
        f"{answer.describe}{where}{size} from the upstream{body}, not the aggregator's {what}: {hint} "
        "nothing was deleted",
        answer.status,
    )


async def check_endpoint(settings: SyncSettings) -> list[dict[str, Any]]:
    """Verify URL, TLS, token and device binding without uploading: a list of ``{check, ok, detail}``; all four
    must pass (``reach``, ``aggregator``, ``token``, ``device``)."""
    async with settings.http_client() as client:
        return await _checks(client, settings)


async def _checks(client: HttpClient, settings: SyncSettings) -> list[dict[str, Any]]:
    results: list[dict[str, Any]] = []

    def add(name: str, ok: bool, detail: str) -> bool:
        results.append({"check": name, "ok": ok, "detail": detail})
        return ok

    url = settings.url
    health = await _get_json(client, url + HEALTH_PATH)
    if health.status == 0:
        add("reach", False, health.snippet)
        return results
    tls = "TLS verified" if url.startswith("https://") else "plain HTTP (sync.allow_http)"
    add("reach", True, f"{url} answers ({tls})")
    if not add(
        "aggregator",
        health.is_aggregator_health,
        f"lens-aggregator {health.payload.get('version')}"
        if health.is_aggregator_health
        else f"{health.describe} to GET {HEALTH_PATH} ({health.snippet[:80]!r}): not a lens aggregator",
    ):
        return results
    who = await _get_json(client, url + "/api/v1/whoami", {"Authorization": f"Bearer {settings.token}"})
    payload = who.payload if isinstance(who.payload, dict) else {}
    if who.status == 401:
        add(
            "token",
            False,
            "the aggregator does not know this token: most often it serves another database than the one the token "
            "was added to (on the aggregator, lens-aggregator token list --db DB with the --db serve uses must list "
            f"{settings.device_id}); else it was revoked, expired or mistyped",
        )
    elif who.status != 200 or "token_kind" not in payload:
        add("token", False, f"{who.describe} to GET /api/v1/whoami: upgrade the aggregator?")
    elif payload["token_kind"] != "device":
        add("token", False, f"a {payload['token_kind']} token: uploads need the device's own token")
    else:
        add("token", True, f"a device token for {payload.get('subject')!r}")
        subject = payload.get("subject")
        add(
            "device",
            subject == settings.device_id,
            f"agent.device_id {settings.device_id!r} matches the token"
            if subject == settings.device_id
            else f"the token belongs to {subject!r} but agent.device_id is {settings.device_id!r}: "
            f"set agent.device_id = {subject!r}",
        )
    return results


class Uploader:
    """Uploads the outbox batch by batch. A batch's rows leave the outbox only on the aggregator's acknowledgement of
    that batch (``wire.check_ack``); splits and quarantines happen only on the aggregator's structured refusals
    (``wire.parse_refusal``); every other answer keeps everything and is reported."""

    def __init__(
        self,
        outbox: AsyncOutbox,
        settings: SyncSettings,
        *,
        session: HttpClient | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self._session = session
        self._owns_session = session is None
        # called with each acknowledgement's payload after its rows left the outbox (the service reads the
        # recommendations an aggregator sends with it); whatever it does, the batch stays acknowledged
        self.on_ack: Callable[[dict[str, Any]], None] | None = None

    async def _client(self) -> HttpClient:
        """The HTTP client to the aggregator, one keep-alive connection reused from batch to batch (and by the
        campaign job client)."""
        if self._session is None:
            self._session = self.settings.http_client()
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def hold_requests(self) -> None:
        """Stop the requests in flight (a sync, a campaign poll or report) and fail new ones at once, until
        :meth:`release_requests`: a stopping service does not wait out ``sync.timeout`` for a silent aggregator.
        What was not acknowledged stays in the outbox."""
        if not self._owns_session:
            return
        await self.close()
        self._session = self.settings.http_client()
        await self._session.close()  # a closed client: every request on it fails at once (an OSError)

    def release_requests(self) -> None:
        """Requests go out again (on a new client): the final sync."""
        if self._owns_session:
            self._session = None

    async def probe(self) -> bool:
        """Whether the aggregator itself answers its health endpoint."""
        return (await _get_json(await self._client(), self.settings.url + HEALTH_PATH)).is_aggregator_health

    async def sync_now(self, *, max_batches: int | None = None) -> SyncReport:
        """Upload everything pending now (or ``max_batches`` batches); stops at the first failure."""
        report = SyncReport()
        started_us = time.time_ns() // 1000
        try:
            # A write first: an outbox locked by another process fails here, before anything is uploaded.
            await self.outbox.set_state({"last_attempt_us": started_us})
            while max_batches is None or report.batches < max_batches:
                rows = await self.outbox.pending(self.settings.batch_size)
                if not rows:
                    break
                rows = await self._screen(rows, report)
                if rows:
                    await self._upload(rows, report)
        except SyncFailure as exc:
            report.error, report.error_kind, report.status = exc.message, exc.kind, exc.status
        except OutboxError as exc:
            report.error, report.error_kind = str(exc), "outbox"
        state: dict[str, str | int | None] = {}
        if report.ok:
            state["last_success_us"] = time.time_ns() // 1000
            state["last_success_monotonic"] = repr(time.monotonic())  # status ages it across wall-clock steps
            state["last_success_boot_id"] = boot_id()
            state["last_error"] = None
            state["last_error_kind"] = None
        else:
            state["last_error"] = report.error
            state["last_error_kind"] = report.error_kind
        if report.error_kind == "outbox":  # the outbox is locked or full: asking it again would only wait again
            report.pending = None
            return report
        try:
            report.pending = (await self.outbox.stats()).records
            state["last_result"] = json.dumps(report.as_dict())
            await self.outbox.set_state(state)
        except OutboxError as exc:
            report.pending = None
            if report.ok:
                report.error, report.error_kind = str(exc), "outbox"
        return report

    async def _screen(self, rows: list[PendingRow], report: SyncReport) -> list[PendingRow]:
        """Quarantine rows that can never be uploaded as they are: undecodable, or stored under another device id
        (the token can only upload this device's records; ``lens-agent outbox retry --as-device`` re-homes them)."""
        good = []
        for row in rows:
            try:
                record = wire.validate_record(wire.loads(row.body, row.codec))
            except wire.WireError as exc:
                await self._quarantine(row, f"undecodable on the device: {exc.message}", "undecodable", report)
                continue
            if record["device_id"] != self.settings.device_id:
                await self._quarantine(
                    row,
                    f"stored under device_id {record['device_id']!r}, this device uploads as "
                    f"{self.settings.device_id!r} (lens-agent outbox retry --code other_device --as-device "
                    f"{self.settings.device_id})",
                    "other_device",
                    report,
                )
                continue
            good.append(row)
        return good

    async def _upload(self, rows: list[PendingRow], report: SyncReport) -> None:
        stats = await self.outbox.stats()
        batch_id = str(uuid.uuid4())
        ids = [r.id for r in rows]
        body = wire.encode_batch(
            [r.body for r in rows],
            device_id=self.settings.device_id,
            batch_id=batch_id,
            sent_us=time.time_ns() // 1000,
            codec=rows[0].codec,
            compression=self.settings.compression,
            level=self.settings.zstd_level,
            counters={
                "dropped_total": stats.dropped_total,
                "quarantined_total": stats.quarantined_total,
                # a gauge: the backlog once this batch is acknowledged
                "pending_records": max(0, stats.records - len(rows)),
                **(
                    {"expected_gap_s": max(1, round(self.settings.expected_gap_s))}
                    if self.settings.expected_gap_s is not None
                    else {}
                ),
            },
        )
        if len(body) > self.settings.max_batch_bytes and len(rows) > 1:
            await self._split(rows, report)
            return
        answer = await self._post(body)
        if answer.status == 200:
            if answer.content_type != "application/json" or answer.payload is None:
                raise _not_aggregator(answer, "acknowledgement")
            try:
                accepted, duplicates = wire.check_ack(answer.payload, batch_id, ids)
            except wire.AnswerError as exc:
                raise SyncFailure(
                    "not_aggregator",
                    f"HTTP 200 from the upstream is not the aggregator's acknowledgement of this batch: {exc.message}; "
                    "nothing was deleted",
                    200,
                ) from None
            await self.outbox.ack([r.seq for r in rows])
            report.batches += 1
            report.uploaded += len(rows)
            report.accepted += accepted
            report.duplicates += duplicates
            if self.on_ack is not None and isinstance(answer.payload, dict):
                try:
                    self.on_ack(answer.payload)
                except Exception:  # the ack is done and nothing is lost: a listener's bug is logged, not raised
                    log.exception("sync: the acknowledgement's listener failed")
            return
        if 300 <= answer.status < 400:
            raise _not_aggregator(answer, "acknowledgement")
        refusal = wire.parse_refusal(answer.status, answer.payload, ids)
        if refusal is None:
            if answer.status >= 500:
                raise SyncFailure(
                    "server",
                    f"{answer.describe} from the upstream ({answer.snippet[:80]!r}); nothing was deleted",
                    answer.status,
                )
            raise _not_aggregator(answer, "refusal")
        await self._refused(rows, refusal, answer.status, report)

    async def _refused(self, rows: list[PendingRow], refusal: wire.Refusal, status: int, report: SyncReport) -> None:
        """Act on the aggregator's own structured refusal."""
        message = refusal.message
        if refusal.code == "too_large":
            if len(rows) > 1:
                await self._split(rows, report)
            else:
                await self._quarantine(
                    rows[0], f"refused as too large by the aggregator: {message}", "too_large", report
                )
        elif refusal.code == "record_invalid" and refusal.record_index is not None:
            index = refusal.record_index
            await self._quarantine(rows[index], f"refused by the aggregator: {message}", "refused", report)
            rest = rows[:index] + rows[index + 1 :]
            if rest:
                await self._upload(rest, report)
        elif refusal.code in ("record_invalid", "batch_invalid"):
            if len(rows) > 1:
                await self._split(rows, report)
            else:
                await self._quarantine(rows[0], f"refused by the aggregator: {message}", "refused", report)
        elif refusal.code in ("unauthorized", "forbidden", "wrong_device"):
            raise SyncFailure("auth", f"aggregator refused the device token (HTTP {status}): {message}", status)
        else:
            raise SyncFailure(
                "unsupported", f"aggregator does not accept this format (HTTP {status}): {message}", status
            )

    async def _split(self, rows: list[PendingRow], report: SyncReport) -> None:
        half = len(rows) // 2
        await self._upload(rows[:half], report)
        await self._upload(rows[half:], report)

    async def _quarantine(self, row: PendingRow, reason: str, code: str, report: SyncReport) -> None:
        await self.outbox.quarantine(row.seq, reason, code)
        report.quarantined += 1
        report.details.append(f"quarantined record seq {row.seq} ({code}): {reason}")

    async def _post(self, body: bytes) -> Answer:
        client = await self._client()
        headers = {
            "Authorization": f"Bearer {self.settings.token}",
            "Content-Type": wire.CONTENT_TYPE,
        }
        url = self.settings.url + INGEST_PATH
        try:
            return await _request(client, "POST", url, body=body, headers=headers)
        except (asyncio.TimeoutError, TimeoutError):
            raise SyncFailure(
                "network", f"no complete answer from {self.settings.url} within {self.settings.timeout:g} s"
            ) from None
        except OSError as exc:
            raise SyncFailure("network", _network_message(self.settings.url, exc)) from None


class SyncService:
    """The periodic sync job, retries with backoff, and the network-availability watcher.

    Its jobs run on :class:`agent.schedule.Scheduler`, which waits on the monotonic clock: a step of the wall clock
    neither stalls the syncs nor the retries.
    """

    def __init__(self, uploader: Uploader, *, rng: random.Random | None = None, clock: Clock | None = None) -> None:
        self.uploader = uploader
        self.settings = uploader.settings
        self.failures = 0
        self.last_report: SyncReport | None = None
        self._rng = rng or random.Random()
        self._scheduler = Scheduler(clock=clock, rng=self._rng)
        self._lock = asyncio.Lock()
        self._again = False  # trigger() while a pass was running: one more pass after it

    def start(self) -> None:
        self._scheduler.every("sync", self.settings.interval, self.tick, first_in=0.01)

    async def stop(self, *, cancel: bool = False) -> None:
        """No more syncs; a sync in flight finishes — or, with ``cancel`` (the service stopping), is cancelled: its
        records stay pending in the outbox (sent again later; the aggregator keeps a record once), and the stop does
        not wait out ``sync.timeout`` for a silent aggregator."""
        await self._scheduler.shutdown(wait=True, cancel=cancel)
        async with self._lock:
            pass

    def trigger(self) -> None:
        """Sync as soon as possible (e.g. right after new records were stored)."""
        if self._lock.locked():
            self._again = True  # a pass is running: it goes once more when done
            return
        if self._scheduler.is_running("sync-now") or self._scheduler.get("sync-now") is not None:
            return  # one is due or starting and has not looked yet: it sees these records too
        self._scheduler.later("sync-now", 0.0, self.tick)

    async def tick(self) -> None:
        if self._lock.locked():
            self._again = True  # records stored after the running pass looked: it runs once more
            return
        async with self._lock:
            while True:
                self._again = False
                report = await self.uploader.sync_now()
                if not (report.ok and self._again):
                    break
        self.last_report = report
        if report.ok:
            self.failures = 0
            self._scheduler.remove("sync-retry")
            self._scheduler.remove("probe")
            return
        self.failures += 1
        delay = full_jitter_backoff(self.failures, self.settings.backoff_initial, self.settings.backoff_max, self._rng)
        log.warning("sync failed (%s): %s; retrying in %.1f s", report.error_kind, report.error, delay)
        self._scheduler.later("sync-retry", delay, self.tick)
        network_down = report.error_kind == "network" and self.settings.sync_on_network_available
        if network_down and self._scheduler.get("probe") is None:
            self._scheduler.every("probe", max(0.2, min(5.0, self.settings.backoff_initial)), self._probe)

    async def _probe(self) -> None:
        if await self.uploader.probe():
            log.info("aggregator reachable again: syncing now")
            self._scheduler.remove("probe")
            await self.tick()
