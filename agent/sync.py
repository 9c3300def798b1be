"""Uploading the outbox to the aggregator: batches, refusals, backoff, and the periodic job.

Delivery is at-least-once: a batch's rows are deleted only after the aggregator acknowledged them, and the
aggregator dedupes by record id, so a retry after a crash, a timeout or a lost answer never double-counts.
Refusals never block the queue:

* 413 — the batch is split in halves and each half retried; a single record the aggregator still refuses is
  quarantined (kept on the device, counted, never resent);
* 400 naming a record — that record is quarantined and the rest resent; 400 naming none — the batch is bisected
  until the bad record is found;
* 401, 403, 415 — nothing is dropped; the uploader backs off and ``status`` reports it as unhealthy;
* 5xx, timeouts, refused connections — backoff (exponential, full jitter, capped), retried without limit.
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from . import wire
from .config import Config
from .errors import ConfigError
from .outbox import AsyncOutbox, PendingRow

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

    def ssl_context(self) -> ssl.SSLContext | None:
        if not self.url.startswith("https://"):
            return None
        return ssl.create_default_context(cafile=str(self.ca_file) if self.ca_file else None)


def sync_settings(config: Config, environ: dict[str, str] | None = None) -> SyncSettings:
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
    """Whether the aggregator answers ``GET /api/v1/health`` within ``timeout`` seconds."""
    connector = aiohttp.TCPConnector(ssl=settings.ssl_context() or False)
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout), connector=connector) as session:
        try:
            async with session.get(settings.url + HEALTH_PATH) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False


class SyncFailure(Exception):
    """An upload that did not go through. ``kind``: network, server, auth or unsupported."""

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
    pending: int = 0
    error: str | None = None
    error_kind: str | None = None
    status: int | None = None
    details: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return self.error is None

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


class Uploader:
    def __init__(
        self,
        outbox: AsyncOutbox,
        settings: SyncSettings,
        *,
        session: aiohttp.ClientSession | None = None,
    ) -> None:
        self.outbox = outbox
        self.settings = settings
        self._session = session
        self._owns_session = session is None

    async def _client(self) -> aiohttp.ClientSession:
        if self._session is None:
            timeout = aiohttp.ClientTimeout(total=self.settings.timeout, sock_connect=min(10.0, self.settings.timeout))
            connector = aiohttp.TCPConnector(ssl=self.settings.ssl_context() or False)
            self._session = aiohttp.ClientSession(timeout=timeout, connector=connector)
        return self._session

    async def close(self) -> None:
        if self._session is not None and self._owns_session:
            await self._session.close()
        self._session = None

    async def probe(self) -> bool:
        """Whether the aggregator answers its health endpoint."""
        try:
            session = await self._client()
            async with session.get(self.settings.url + HEALTH_PATH) as response:
                return response.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False

    async def sync_now(self, *, max_batches: int | None = None) -> SyncReport:
        """Upload everything pending now (or ``max_batches`` batches); stops at the first failure."""
        report = SyncReport()
        started_us = time.time_ns() // 1000
        try:
            while max_batches is None or report.batches < max_batches:
                rows = await self.outbox.pending(self.settings.batch_size)
                if not rows:
                    break
                rows = await self._drop_corrupt(rows, report)
                if rows:
                    await self._upload(rows, report)
        except SyncFailure as exc:
            report.error, report.error_kind, report.status = exc.message, exc.kind, exc.status
        stats = await self.outbox.stats()
        report.pending = stats.records
        state: dict[str, str | int | None] = {
            "last_attempt_us": started_us,
            "last_result": json.dumps(report.as_dict()),
        }
        if report.ok:
            state["last_success_us"] = time.time_ns() // 1000
            state["last_error"] = None
            state["last_error_kind"] = None
        else:
            state["last_error"] = report.error
            state["last_error_kind"] = report.error_kind
        await self.outbox.set_state(state)
        return report

    async def _drop_corrupt(self, rows: list[PendingRow], report: SyncReport) -> list[PendingRow]:
        good = []
        for row in rows:
            try:
                wire.validate_record(wire.loads(row.body, row.codec))
            except wire.WireError as exc:
                await self.outbox.quarantine(row.seq, f"undecodable on the device: {exc.message}")
                report.quarantined += 1
                continue
            good.append(row)
        return good

    async def _upload(self, rows: list[PendingRow], report: SyncReport) -> None:
        stats = await self.outbox.stats()
        body = wire.encode_batch(
            [r.body for r in rows],
            device_id=self.settings.device_id,
            batch_id=str(uuid.uuid4()),
            sent_us=time.time_ns() // 1000,
            codec=rows[0].codec,
            compression=self.settings.compression,
            level=self.settings.zstd_level,
            counters={
                "dropped_total": stats.dropped_total,
                "quarantined_total": stats.quarantined_total,
                "pending_records": stats.records,  # a gauge: the backlog when this batch left
            },
        )
        if len(body) > self.settings.max_batch_bytes and len(rows) > 1:
            await self._split(rows, report)
            return
        status, payload = await self._post(body)
        if status == 200:
            await self.outbox.ack([r.seq for r in rows])
            report.batches += 1
            report.uploaded += len(rows)
            report.accepted += int(payload.get("accepted", 0))
            report.duplicates += int(payload.get("duplicates", 0))
            return
        message = str(payload.get("error") or f"HTTP {status}")
        if status == 413:
            if len(rows) > 1:
                await self._split(rows, report)
            else:
                await self._quarantine(rows[0], f"refused as too large by the aggregator: {message}", report)
            return
        if status == 400:
            index = payload.get("record_index")
            if isinstance(index, int) and 0 <= index < len(rows):
                await self._quarantine(rows[index], f"refused by the aggregator: {message}", report)
                rest = rows[:index] + rows[index + 1 :]
                if rest:
                    await self._upload(rest, report)
            elif len(rows) > 1:
                await self._split(rows, report)
            else:
                await self._quarantine(rows[0], f"refused by the aggregator: {message}", report)
            return
        if status in (401, 403):
            raise SyncFailure("auth", f"aggregator refused the device token (HTTP {status}): {message}", status)
        if status == 415:
            raise SyncFailure("unsupported", f"aggregator does not accept this format (HTTP 415): {message}", status)
        raise SyncFailure("server", f"aggregator answered HTTP {status}: {message}", status)

    async def _split(self, rows: list[PendingRow], report: SyncReport) -> None:
        half = len(rows) // 2
        await self._upload(rows[:half], report)
        await self._upload(rows[half:], report)

    async def _quarantine(self, row: PendingRow, reason: str, report: SyncReport) -> None:
        await self.outbox.quarantine(row.seq, reason)
        report.quarantined += 1
        report.details.append(f"quarantined record seq {row.seq}: {reason}")

    async def _post(self, body: bytes) -> tuple[int, dict[str, Any]]:
        session = await self._client()
        headers = {
            "Authorization": f"Bearer {self.settings.token}",
            "Content-Type": wire.CONTENT_TYPE,
        }
        try:
            async with session.post(self.settings.url + INGEST_PATH, data=body, headers=headers) as response:
                text = await response.text()
                try:
                    payload = json.loads(text) if text else {}
                except json.JSONDecodeError:
                    payload = {"error": text[:200]}
                if not isinstance(payload, dict):
                    payload = {"error": str(payload)[:200]}
                return response.status, payload
        except asyncio.TimeoutError:
            raise SyncFailure(
                "network", f"no answer from {self.settings.url} within {self.settings.timeout:g} s"
            ) from None
        except aiohttp.ClientSSLError as exc:
            raise SyncFailure("network", f"TLS to {self.settings.url} failed: {exc}") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise SyncFailure("network", f"cannot reach {self.settings.url}: {exc}") from None


class SyncService:
    """The periodic sync job (apscheduler), retries with backoff, and the network-availability watcher."""

    def __init__(self, uploader: Uploader, *, rng: random.Random | None = None) -> None:
        from apscheduler.schedulers.asyncio import AsyncIOScheduler

        self.uploader = uploader
        self.settings = uploader.settings
        self.failures = 0
        self.last_report: SyncReport | None = None
        self._rng = rng or random.Random()
        self._scheduler = AsyncIOScheduler()
        self._lock = asyncio.Lock()

    def start(self) -> None:
        from datetime import datetime, timedelta

        self._scheduler.start()
        self._scheduler.add_job(
            self.tick,
            "interval",
            seconds=self.settings.interval,
            id="sync",
            max_instances=1,
            coalesce=True,
            next_run_time=datetime.now() + timedelta(milliseconds=10),
        )

    async def stop(self) -> None:
        self._scheduler.shutdown(wait=False)
        async with self._lock:  # let a sync in flight finish
            pass

    def trigger(self) -> None:
        """Sync as soon as possible (e.g. right after new records were stored)."""
        from datetime import datetime

        self._scheduler.add_job(self.tick, "date", run_date=datetime.now(), id="sync-now", replace_existing=True)

    async def tick(self) -> None:
        if self._lock.locked():
            return
        async with self._lock:
            report = await self.uploader.sync_now()
        self.last_report = report
        if report.ok:
            self.failures = 0
            for job_id in ("sync-retry", "probe"):
                if self._scheduler.get_job(job_id):
                    self._scheduler.remove_job(job_id)
            return
        self.failures += 1
        delay = full_jitter_backoff(self.failures, self.settings.backoff_initial, self.settings.backoff_max, self._rng)
        log.warning("sync failed (%s): %s; retrying in %.1f s", report.error_kind, report.error, delay)
        from datetime import datetime, timedelta

        self._scheduler.add_job(
            self.tick,
            "date",
            run_date=datetime.now() + timedelta(seconds=delay),
            id="sync-retry",
            replace_existing=True,
        )
        network_down = report.error_kind == "network" and self.settings.sync_on_network_available
        if network_down and not self._scheduler.get_job("probe"):
            self._scheduler.add_job(
                self._probe,
                "interval",
                seconds=max(0.2, min(5.0, self.settings.backoff_initial)),
                id="probe",
                max_instances=1,
                coalesce=True,
            )

    async def _probe(self) -> None:
        if await self.uploader.probe():
            log.info("aggregator reachable again: syncing now")
            if self._scheduler.get_job("probe"):
                self._scheduler.remove_job("probe")
            await self.tick()
