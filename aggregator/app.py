"""The aggregator's aiohttp application: ``create_app(settings, store)``.

Routes: ``POST /api/v1/ingest`` (device token), ``GET /api/v1/health`` (open, tiny), ``GET /api/v1/devices`` and
``GET /metrics`` (Prometheus; both open when listening on loopback only, otherwise a read token).
"""

from __future__ import annotations

import asyncio
import collections
import ipaddress
import json
import logging
import os
import time
import urllib.parse
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from operator import itemgetter
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web

from lens_core import wire
from lens_core.record_schema import contended, guardrail_columns

from . import __version__, api, campaign_pages, campaign_results, campaigns, feedback, reads, regressions, timeline
from .compression import gzip_responses
from .connections import ConnectionGuard, ConnectionsCollector, accept_batch, connection_cap, open_files_limit
from .device_page import RANGES
from .fleet import FIGURE_STATISTICS, Broadcaster, batch_event, event_frame, fleet_rows, live_frame, refetch_frame
from .health import Health
from .metrics import CONTENT_TYPE, ExpositionCache, FleetMetrics, OtlpCollector, recent_requests
from .otlp_forward import Forwarder, OtlpSettings, otlp_settings
from .pages import DEVICE_PAGE, FLEET_PAGE, LOGIN_PAGE, not_found, with_data
from .store import (
    QueryTimeout,
    RecordRow,
    Store,
    TokenInfo,
    average_power,
    energy_per_token,
    note_problem,
    record_settings,
)
from .triggers import Trigger, TriggerWatch

log = logging.getLogger("aggregator")
T = TypeVar("T")


@dataclass(frozen=True)
class Settings:
    host: str = "127.0.0.1"
    max_body_bytes: int = 16 * 1024**2
    max_decompressed_bytes: int = 64 * 1024**2
    max_metric_series: int = 10_000
    max_metric_series_per_device: int = 200  # /metrics: label sets of one device; past it folded to "other"
    metrics_max_age_s: float = 5.0  # /metrics is built off the loop; a build is reused at most this long
    max_read_series: int = 100  # series, groups or trigger states one read answers; the rest: a truncated marker
    retention_s: float | None = None  # drop measurements older than this, hourly
    max_batch_records: int = wire.MAX_BATCH_RECORDS
    max_form_bytes: int = 4096  # POST /login: a token is a few dozen bytes
    max_label_chars: int = 128  # a Prometheus label value longer than this is cut (and counted)
    read_workers: int = 2  # threads serving reads, beside the one writer
    max_pending_reads: int = 32  # reads queued or running at once; beyond: 503
    max_query_seconds: float = 10.0  # a read running longer is interrupted: 503
    late_after_s: float = 3600.0  # the fleet page: a device not heard from for this long is late
    silent_after_s: float = 24 * 3600.0  # … and silent
    error_rate_warning: float = 0.1  # health: a share of failed requests that makes a device's state warning
    error_rate_critical: float = 0.25  # … and critical
    health_window_s: float = 24 * 3600.0  # health: backlog growth, drops and quarantine over this long
    stale_after_s: float = 24 * 3600.0  # /metrics: latest-request gauges not updated for this long are dropped
    regression_interval_s: float = 300.0  # change points are looked for at most this often
    regression_min_change: float = 0.15  # … and a smaller relative change of the median is not reported
    regression_alpha: float = 1e-5  # … nor one whose p-value is not below this
    regression_include_contended: bool = False  # … and contended requests are left out of the search unless set
    regression_window_s: float = 14 * 24 * 3600.0  # … each series over this long of event time
    regression_max_requests: int = 4000  # … at most this many requests of it
    regression_min_duration_s: float = 8 * 3600.0  # … and a change must have lasted this long
    trigger_interval_s: float = 60.0  # the [[triggers]] are evaluated this often (docs/triggers.md)
    feedback_interval_s: float = 300.0  # the feedback documents are recomputed at most this often (docs/feedback.md)
    feedback_settings: feedback.Settings = field(default_factory=feedback.Settings)  # window, evidence, alpha
    otlp: OtlpSettings | None = None  # forward every stored record to an OTLP backend (docs/opentelemetry.md)
    # connections and the live stream (docs/connections.md)
    header_timeout_s: float = 10.0  # a request's headers must arrive within this long: otherwise 408, closed
    body_timeout_s: float = 60.0  # … and its body within this long of its headers: otherwise closed
    max_connections: int | None = None  # open connections at once; None: sized from the open-file limit
    max_subscribers: int = 100  # open /api/v1/stream clients; beyond: 503 with Retry-After
    max_event_bytes: int = 64 * 1024  # a live update with a larger fleet row becomes a refetch notice
    max_unsent_bytes: int = 256 * 1024**2  # answers written, not yet taken: beyond, the largest holders are closed
    campaigns: campaigns.CampaignSettings = field(default_factory=campaigns.CampaignSettings)  # docs/campaigns.md

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        """Settings from the aggregator's configuration (``aggregator.config.load_aggregator_config``)."""
        server = config.values["server"]
        return cls(
            host=server["host"],
            max_body_bytes=server["max_body_bytes"],
            max_decompressed_bytes=server["max_decompressed_bytes"],
            max_metric_series=server["max_metric_series"],
            max_metric_series_per_device=server["max_metric_series_per_device"],
            metrics_max_age_s=server["metrics_max_age"],
            max_read_series=server["max_read_series"],
            retention_s=config.get("storage", "retention"),
            max_batch_records=server["max_batch_records"],
            max_form_bytes=server["max_form_bytes"],
            max_label_chars=server["max_label_chars"],
            read_workers=server["read_workers"],
            max_pending_reads=server["max_pending_reads"],
            max_query_seconds=server["max_query_seconds"],
            late_after_s=config.get("fleet", "late_after"),
            silent_after_s=config.get("fleet", "silent_after"),
            error_rate_warning=config.get("fleet", "error_rate_warning"),
            error_rate_critical=config.get("fleet", "error_rate_critical"),
            health_window_s=config.get("fleet", "health_window"),
            stale_after_s=config.get("fleet", "stale_after"),
            regression_interval_s=config.get("fleet", "regression_interval"),
            regression_min_change=config.get("fleet", "regression_min_change"),
            regression_alpha=config.get("fleet", "regression_alpha"),
            regression_include_contended=config.get("fleet", "regression_include_contended"),
            regression_window_s=config.get("fleet", "regression_window"),
            regression_max_requests=config.get("fleet", "regression_max_requests"),
            regression_min_duration_s=config.get("fleet", "regression_min_duration"),
            trigger_interval_s=config.get("fleet", "trigger_interval"),
            feedback_interval_s=config.get("fleet", "feedback_interval"),
            feedback_settings=feedback.Settings.from_config(config),
            otlp=otlp_settings(config, os.environ),
            header_timeout_s=server["header_timeout"],
            body_timeout_s=server["body_timeout"],
            max_connections=server["max_connections"],
            max_subscribers=server["max_subscribers"],
            max_event_bytes=server["max_event_bytes"],
            max_unsent_bytes=server["max_unsent_bytes"],
            campaigns=campaigns.CampaignSettings.from_config(config),
        )

    def health(self, metric_folds: Callable[[str], dict[str, Any] | None] | None = None) -> Health:
        """The health thresholds; ``metric_folds``: what /metrics folded of a device (``device_status``)."""
        return Health(
            late_after_s=self.late_after_s,
            silent_after_s=self.silent_after_s,
            error_rate_warning=self.error_rate_warning,
            error_rate_critical=self.error_rate_critical,
            window_s=self.health_window_s,
            metric_folds=metric_folds,
        )

    def bounded(self, fn: Callable[..., T]) -> Callable[..., T]:
        """``fn(store, …)`` on a read thread under this read's bounds (``reads.bounded``)."""
        return reads.bounded(fn, self.max_query_seconds, self.max_read_series)

    @property
    def loopback_only(self) -> bool:
        if self.host == "localhost":
            return True
        try:
            return ipaddress.ip_address(self.host).is_loopback
        except ValueError:
            return False


class Busy(Exception):
    """More reads are queued than ``max_pending_reads``."""


class StoreRunner:
    """Runs the blocking store off the event loop: ingest and token checks on one writer thread, reads on a small
    pool of their own (each with its own connection in the store), so that no read, summary or page refresh ever
    queues ingest behind it. Reads in flight are bounded: beyond ``max_pending`` the answer is 503 at once."""

    def __init__(self, store: Store, *, read_workers: int = 2, max_pending: int = 32) -> None:
        self.store = store
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store")
        self._readers = ThreadPoolExecutor(max_workers=read_workers, thread_name_prefix="store-read")
        self.max_pending = max_pending
        self.pending_reads = 0

    async def call(self, fn: Callable[..., T], *args: Any) -> T:
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def read(self, fn: Callable[..., T], *args: Any) -> T:
        if self.pending_reads >= self.max_pending:
            raise Busy(f"{self.pending_reads} reads are in flight (server.max_pending_reads); retry shortly")
        self.pending_reads += 1
        try:
            return await asyncio.get_running_loop().run_in_executor(self._readers, fn, *args)
        finally:
            self.pending_reads -= 1

    def shutdown(self) -> None:
        self._readers.shutdown(wait=True)
        self._executor.shutdown(wait=True)


SETTINGS = web.AppKey("settings", Settings)
STORE = web.AppKey("store", StoreRunner)
METRICS = web.AppKey("metrics", FleetMetrics)
EXPOSITION = web.AppKey("exposition", ExpositionCache)
EVENTS = web.AppKey("events", Broadcaster)
DECODERS = web.AppKey("decoders", ThreadPoolExecutor)
WATCH = web.AppKey("regression_watch", regressions.Watch)
TRIGGERS = web.AppKey("triggers", TriggerWatch)
FEEDBACK = web.AppKey("feedback", feedback.FeedbackCache)
FORWARDER = web.AppKey("otlp_forwarder", Forwarder)
PUBLISHING: web.AppKey[set[asyncio.Task[None]]] = web.AppKey("publishing")
GUARD = web.AppKey("connection_guard", ConnectionGuard)


def _error(status: int, message: str, **extra: Any) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


def _now_us() -> int:
    return time.time_ns() // 1000


def _bearer(request: web.Request) -> str | None:
    header = request.headers.get("Authorization", "")
    scheme, _, token = header.partition(" ")
    if scheme.lower() != "bearer" or not token.strip():
        return None
    return token.strip()


async def _authenticate(request: web.Request) -> TokenInfo | None:
    token = _bearer(request)
    if token is None:
        return None
    runner = request.app[STORE]
    return await runner.call(runner.store.authenticate, token, _now_us())


def _reject(app: web.Application, reason: str) -> None:
    app[METRICS].rejections.labels(reason).inc()


_ROW_FIELDS = itemgetter(
    "id",
    "device_id",
    "run_id",
    "kind",
    "started_us",
    "ok",
    "strategy",
    "model_name",
    "engine",
    "error_type",
    "input_tokens",
    "output_tokens",
    "ttft_us",
    "tpot_us",
    "e2e_us",
)


def _row(record: dict[str, Any], codec: str, body: bytes) -> RecordRow:
    energy, power, settings = energy_per_token(record), average_power(record), record_settings(record)
    busy = 1 if contended(record) else 0
    guarded = guardrail_columns(record)
    try:  # every field present, as the agent writes them: one C call
        return RecordRow._make((*_ROW_FIELDS(record), energy, power, settings, busy, codec, body, *guarded))
    except KeyError:
        pass
    get = record.get
    return RecordRow(
        record["id"],
        record["device_id"],
        record["run_id"],
        record["kind"],
        record["started_us"],
        record["ok"],
        get("strategy"),
        get("model_name"),
        get("engine"),
        get("error_type"),
        get("input_tokens"),
        get("output_tokens"),
        get("ttft_us"),
        get("tpot_us"),
        get("e2e_us"),
        energy,
        power,
        settings,
        busy,
        codec,
        body,
        *guarded,
    )


def _refuse(status: int, code: str, message: str, **fields: Any) -> web.Response:
    """A structured refusal: the agent acts on a refusal (splits, quarantines) only when it carries this shape."""
    return web.json_response(wire.ingest_refusal(code, message, **fields), status=status)


# A batch whose payload announces at most this many bytes is decoded and checked on the event loop (about 1,300
# records: ~25 ms on a slow core); larger or unannounced ones go to a worker thread.
INLINE_PAYLOAD_BYTES = 512 * 1024


class WrongDevice(Exception):
    def __init__(self, message: str, record_index: int | None = None) -> None:
        self.record_index = record_index
        super().__init__(message)


def parse_batch(
    body: bytes, settings: Settings, subject: str, received_us: int
) -> tuple[wire.Batch, list[RecordRow], list[dict[str, Any]]]:
    """The batch, its rows and its records, every record checked against the schema (``wire.check_record``)
    relative to ``received_us``. Raises WireError (naming the record and field) or WrongDevice."""
    batch = wire.decode_batch(
        body, max_decompressed=settings.max_decompressed_bytes, max_records=settings.max_batch_records
    )
    if batch.device_id != subject:
        raise WrongDevice(f"this token belongs to device {subject!r}, the batch names {batch.device_id!r}")
    rows = []
    decoded: list[dict[str, Any]] = []
    codec, check = batch.codec, wire.check_record
    decode = wire.record_decoder(codec)
    for index, blob in enumerate(batch.records):
        try:
            record = decode(blob)
        except Exception as exc:  # the record, not the batch: the agent quarantines just this one
            raise wire.WireError(
                f"record {index}: malformed {codec}: {type(exc).__name__}: {exc}", record_index=index
            ) from None
        check(record, index, received_us)
        if record["device_id"] != subject:
            raise WrongDevice(
                f"record {index} names device {record['device_id']!r}; this token belongs to {subject!r}", index
            )
        rows.append(_row(record, codec, blob))
        decoded.append(record)
    return batch, rows, decoded


async def ingest(request: web.Request) -> web.Response:
    app = request.app
    started = time.perf_counter()
    token = await _authenticate(request)
    if token is None:
        _reject(app, "unauthorized")
        return _refuse(
            401, "unauthorized", "missing, unknown, revoked or expired device token (Authorization: Bearer <token>)"
        )
    if token.kind != "device":
        _reject(app, "forbidden")
        return _refuse(403, "forbidden", "a read token cannot upload; use the device's own token")
    settings = app[SETTINGS]
    limit = settings.max_body_bytes
    if request.content_length is not None and request.content_length > limit:
        _reject(app, "too_large")
        return _refuse(
            413, "too_large", f"body of {request.content_length} bytes exceeds the limit of {limit}", limit=limit
        )
    try:
        body = await request.read()
    except web.HTTPRequestEntityTooLarge:
        _reject(app, "too_large")
        return _refuse(413, "too_large", f"body exceeds the limit of {limit} bytes", limit=limit)
    received_us = _now_us()
    try:
        announced = wire.payload_size(body)
        if announced is not None and announced <= INLINE_PAYLOAD_BYTES:  # an agent's batch: a few ms, on the loop
            batch, rows, decoded = parse_batch(body, settings, token.subject, received_us)
        else:  # anything larger or of unannounced size off the event loop: health and reads stay responsive
            batch, rows, decoded = await asyncio.get_running_loop().run_in_executor(
                app[DECODERS], parse_batch, body, settings, token.subject, received_us
            )
    except WrongDevice as exc:
        _reject(app, "wrong_device")
        fields: dict[str, Any] = {"token_device_id": token.subject}
        if exc.record_index is not None:
            fields["record_index"] = exc.record_index
        return _refuse(403, "wrong_device", str(exc), **fields)
    except wire.WireError as exc:
        reason = {400: "malformed", 413: "too_large", 415: "unsupported"}.get(exc.status, "malformed")
        _reject(app, reason)
        extra: dict[str, Any] = {}
        if exc.status == 413:
            return _refuse(413, "too_large", exc.message, limit=settings.max_decompressed_bytes)
        if exc.status == 415:
            return _refuse(415, "unsupported_version", exc.message, supported_versions=list(wire.SUPPORTED_VERSIONS))
        if exc.record_index is not None:
            extra["record_index"] = exc.record_index
            extra["record_id"] = exc.record_id
            return _refuse(400, "record_invalid", exc.message, **extra)
        return _refuse(400, "batch_invalid", exc.message)
    runner = app[STORE]
    result = await runner.call(
        runner.store.ingest, batch.device_id, batch.batch_id, batch.sent_us, batch.counters, rows, received_us
    )
    metrics = app[METRICS]
    metrics.batches.inc()
    metrics.records.labels("accepted").inc(result.accepted)
    metrics.records.labels("duplicate").inc(result.duplicates)
    metrics.observe(batch.device_id, (decoded[i] for i in result.new))
    metrics.device(batch.device_id, batch.counters, time.time())
    metrics.ingest_seconds.observe(time.perf_counter() - started)
    if result.accepted and FORWARDER in app:
        app[FORWARDER].wake()
    if result.accepted and app[EVENTS].subscribers:
        event = batch_event(batch.device_id, [decoded[i] for i in result.new])
        task = asyncio.create_task(_publish_with_row(app, event))  # after the acknowledgement, never delaying it
        app[PUBLISHING].add(task)
        task.add_done_callback(app[PUBLISHING].discard)
    log.debug(
        "batch %s from %s: %d accepted, %d duplicates in %.1f ms",
        batch.batch_id,
        batch.device_id,
        result.accepted,
        result.duplicates,
        (time.perf_counter() - started) * 1e3,
    )
    ids = [record["id"] for record in decoded]
    ack = wire.ingest_ack(batch.batch_id, ids, result.accepted, result.duplicates)
    advice = app[FEEDBACK].for_device(batch.device_id)  # from the cache: nothing is computed on the ingest path
    if advice:
        ack["recommendations"] = advice
    try:  # the device's active benchmark jobs (docs/campaigns.md): one indexed query, nothing heavy in the ack
        jobs = await runner.call(campaigns.ack_jobs, runner.store, batch.device_id)
    except QueryTimeout as exc:  # the batch is stored: acknowledge it; the jobs ride on the next ack
        log.warning("ack for %s without its jobs (%s)", batch.device_id, exc)
        jobs = []
    if jobs:
        ack["jobs"] = jobs
    return web.json_response(ack)


async def whoami(request: web.Request) -> web.Response:
    """What the bearer token is to this aggregator: ``lens-agent sync --check`` verifies URL, TLS, token and device
    binding with it, without uploading anything."""
    token = await _authenticate(request)
    if token is None:
        return _refuse(
            401, "unauthorized", "missing, unknown, revoked or expired token (Authorization: Bearer <token>)"
        )
    return web.json_response(
        {
            "protocol": wire.INGEST_PROTOCOL,
            "service": "lens-aggregator",
            "token_kind": token.kind,
            "subject": token.subject,
        }
    )


async def health(request: web.Request) -> web.Response:
    return web.json_response(
        {"status": "ok", "service": "lens-aggregator", "version": __version__, "protocol": wire.INGEST_PROTOCOL}
    )


COOKIE = "lens_read"


async def _read_allowed(request: web.Request) -> web.Response | None:
    """None when the caller may read; otherwise the refusal. Scripts and Prometheus send the read token as a bearer
    header; browsers log in once (``/login``) and send it as a cookie."""
    if request.app[SETTINGS].loopback_only:
        return None
    token = await _authenticate(request)
    if token is None and request.cookies.get(COOKIE):
        runner = request.app[STORE]
        token = await runner.call(runner.store.authenticate, request.cookies[COOKIE], _now_us())
    if token is None:
        if request.method == "GET" and "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/login")
        return _error(401, "a read token is required (Authorization: Bearer <token>; lens-aggregator token add --read)")
    if token.kind not in ("read", "operator"):
        return _error(403, "device tokens only write; use a read token")
    return None


async def _viewer_is_operator(request: web.Request) -> bool:
    """Whether the caller holds an operator token (bearer header or the login cookie): campaigns are shown to
    operators only (docs/campaigns.md), on loopback too."""
    token = await _authenticate(request)
    if token is None and request.cookies.get(COOKIE):
        runner = request.app[STORE]
        token = await runner.call(runner.store.authenticate, request.cookies[COOKIE], _now_us())
    return token is not None and token.kind == "operator"


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def read_endpoint(handler: Handler) -> Handler:
    """Serve ``handler`` only to callers allowed to read (see ``_read_allowed``)."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        refusal = await _read_allowed(request)
        if refusal is not None:
            return refusal
        return await handler(request)

    return guarded


async def login_page(request: web.Request) -> web.Response:
    return web.Response(text=LOGIN_PAGE, content_type="text/html")


async def login(request: web.Request) -> web.Response:
    """Checks a read token from the form and keeps it in an HttpOnly cookie; the page then works as on loopback.
    The form is read up to ``max_form_bytes`` and no further: an unauthenticated body is never held whole."""
    limit = request.app[SETTINGS].max_form_bytes
    if request.content_length is not None and request.content_length > limit:
        return _error(413, f"form body of {request.content_length} bytes exceeds the limit of {limit}", limit=limit)
    raw = await request.content.read(limit + 1)
    if len(raw) > limit:
        return _error(413, f"form body exceeds the limit of {limit} bytes", limit=limit)
    try:
        form = urllib.parse.parse_qs(raw.decode("utf-8"), max_num_fields=8)
    except (UnicodeDecodeError, ValueError):
        return _error(400, "the form must be application/x-www-form-urlencoded UTF-8 with a field 'token'")
    token = (form.get("token") or [""])[0].strip()
    runner = request.app[STORE]
    info = await runner.call(runner.store.authenticate, token, _now_us()) if token else None
    if info is None or info.kind not in ("read", "operator"):
        return web.Response(
            text=LOGIN_PAGE.replace("<!--error-->", "<p class='silent'>not a valid read or operator token</p>"),
            content_type="text/html",
            status=401,
        )
    response = web.HTTPFound("/")
    response.set_cookie(COOKIE, token, httponly=True, samesite="Strict", secure=request.secure, max_age=30 * 86400)
    raise response


async def logout(request: web.Request) -> web.Response:
    response = web.HTTPFound("/login")
    response.del_cookie(COOKIE)
    raise response


@read_endpoint
async def metrics_endpoint(request: web.Request) -> web.Response:
    """Built on a thread of its own and shared (``metrics.ExpositionCache``, ``server.metrics_max_age``)."""
    body = await request.app[EXPOSITION].get()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


async def _read(request: web.Request, build: Any) -> web.Response:
    runner = request.app[STORE]
    try:
        return await runner.read(request.app[SETTINGS].bounded(build), runner.store, request.rel_url.query)
    except api.BadParameter as exc:  # 400; a format whose runtime is missing: 501 (api.FormatUnavailable)
        return _error(exc.status, str(exc), parameter=exc.name)


def _unavailable(exc: Exception) -> web.Response:
    return web.json_response({"error": str(exc)}, status=503, headers={"Retry-After": "5"})


@web.middleware
async def read_limits(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A read that would wait behind too many others, or ran past the query bound, is a 503 naming why."""
    try:
        return await handler(request)
    except (Busy, QueryTimeout) as exc:
        return _unavailable(exc)


@read_endpoint
async def measurements(request: web.Request) -> web.Response:
    return await _read(request, api.measurements_response)


@read_endpoint
async def summary(request: web.Request) -> web.Response:
    return await _read(request, api.summary_response)


def fleet_answer(
    settings: Settings,
    watch: regressions.Watch,
    store: Store,
    now: float,
    only: str | None = None,
    triggers: TriggerWatch | None = None,
    metric_folds: Callable[[str], dict[str, Any] | None] | None = None,
) -> dict[str, Any]:
    """What ``/api/v1/fleet``, the fleet page and a live update show (on a read thread): each device's row (or only
    that one's) with its current regressions and the triggers whose condition holds, and the late and silent
    thresholds. Through a ``reads.BoundedStore``, each row holds at most ``server.max_read_series`` series and
    ``truncated`` says how many more there were."""
    health = settings.health(metric_folds)
    held = triggers.by_device() if triggers is not None else None
    rows = fleet_rows(store, now, health=health, only=only, regressions=watch.by_device(), triggers=held)
    with_regressions(rows, watch)
    answer = {"devices": rows, "late_after_s": health.late_after_s, "silent_after_s": health.silent_after_s}
    answer["statistics"] = FIGURE_STATISTICS  # which statistic each figure is
    truncated = reads.series_truncation(store)
    if truncated is not None:
        answer["truncated"] = truncated
    return answer


def with_regressions(rows: list[dict[str, Any]], watch: regressions.Watch) -> None:
    """Each fleet row's ``regressions_open`` (how many open regressions) and ``regressions_acknowledged`` (their
    lines): an acknowledged regression is said among the health reasons but does not raise the state."""
    acknowledged = watch.acknowledged_by_device()
    for row in rows:
        row["regressions_open"] = len(row.get("regressions") or [])
        lines = acknowledged.get(row["device_id"], [])
        row["regressions_acknowledged"] = lines
        if lines and "health_reasons" in row:
            row["health_reasons"] = [
                *row["health_reasons"],
                *("regression acknowledged: " + line.split(" (", 1)[0] for line in lines),
            ]


REGRESSION_LOCK: web.AppKey[asyncio.Lock] = web.AppKey("regression_lock")


async def refresh_regressions(app: web.Application, *, force: bool = False) -> regressions.Watch:
    """The fleet's change points, searched on a read thread when older than ``fleet.regression_interval``; the
    regression objects they open, confirm and resolve written by the store's writer (docs/fleet.md
    "Regressions"); the regression gauges on /metrics follow."""
    watch = app[WATCH]
    async with app[REGRESSION_LOCK]:  # one search at a time: a second caller waits and takes its result
        if force or watch.stale(time.monotonic()):
            runner = app[STORE]
            now = _now_us()
            observation = await runner.read(watch.observe, runner.store, now)
            done = await runner.call(watch.settle, runner.store, observation, now)
            active = await runner.read(watch.load, runner.store)
            watch.apply(observation, active, done, time.monotonic(), now)
            for what in ("opened", "resolved"):
                if done.get(what):
                    log.info("regressions: %d %s (ids %s)", len(done[what]), what, done[what][:20])
            if done.get("left_out"):
                inserts = observation.changes.insert
                by_device = collections.Counter(
                    inserts[i]["device_id"] for i in done["left_out"] if 0 <= i < len(inserts)
                )
                log.warning(
                    "regressions: %d found but not kept: their devices hold %d open or acknowledged already (%s)",
                    len(done["left_out"]),
                    regressions.MAX_OPEN_PER_DEVICE,
                    ", ".join(f"{device} {n}" for device, n in by_device.most_common(10)),
                )
            app[METRICS].regressions(observation.found)
            app[METRICS].regressions_open(watch.open_counts())
    return watch


async def _publish_with_row(app: web.Application, event: dict[str, Any]) -> None:
    """A live update that carries the device's new fleet row, computed and serialized once on a read thread (one
    frame for every subscriber): an open page replaces that row instead of fetching the whole fleet on every batch.
    A row larger than ``server.max_event_bytes`` goes out as a refetch notice instead; when reads are saturated
    the event goes out without the row (the page then fetches that row itself). One row per device is computed at
    a time: batches that arrive meanwhile make one more update, with the newest event."""
    events, runner, settings = app[EVENTS], app[STORE], app[SETTINGS]
    folds = app[METRICS].budget.device_status
    device = event["device_id"]
    if device in events.rows_in_flight:
        waiting = events.rows_in_flight[device]
        if waiting is not None:
            event["records"] += waiting["records"]
        events.rows_in_flight[device] = event
        return
    events.rows_in_flight[device] = None

    def build(store: Store, now: float, event: dict[str, Any]) -> tuple[bytes, bool, int | None]:
        def row() -> dict[str, Any] | None:
            answer = fleet_answer(settings, app[WATCH], store, now, device, app[TRIGGERS], folds)
            return answer["devices"][0] if answer["devices"] else None

        return live_frame(store, event, events.max_event_bytes, row)

    try:
        while True:
            known = events.oversized(device, time.monotonic())
            refetch = True
            if known is not None:  # its row was too large a moment ago: the notice, without computing the row
                frame = refetch_frame(event, events.max_event_bytes, row_bytes=known)
            else:
                try:
                    frame, refetch, size = await runner.read(settings.bounded(build), runner.store, time.time(), event)
                    events.measured(device, size, time.monotonic())
                except (Busy, QueryTimeout) as exc:
                    log.debug("live update without the device's row (%s)", exc)
                    frame, refetch = event_frame({**event, "type": "batch"}), False
            events.publish_frame(frame, refetch=refetch)
            following = events.rows_in_flight.get(device)
            if following is None:
                break
            events.rows_in_flight[device], event = None, following
    finally:
        events.rows_in_flight.pop(device, None)


def include_contended(request: web.Request) -> bool | None:
    """``?include_contended=1|0|true|false`` (None when absent); anything else: BadParameter."""
    value = request.rel_url.query.get("include_contended")
    if value is None:
        return None
    if value.lower() not in ("1", "0", "true", "false"):
        raise api.BadParameter("include_contended", value[:40], "1, 0, true or false")
    return value.lower() in ("1", "true")


async def regressions_for(app: web.Application, include: bool | None) -> regressions.Watch:
    """The cached search when ``include`` is None or the configured one; else a search of its own now (on a read
    thread), kept nowhere: what the API answers for ``?include_contended=…``."""
    watch = app[WATCH]
    if include is None or include == watch.settings.include_contended:
        return await refresh_regressions(app)
    other = regressions.Watch(watch.interval_s, replace(watch.settings, include_contended=include))
    runner = app[STORE]
    await runner.read(other.search, runner.store, time.monotonic(), _now_us())
    return other


def _positive_int(query: Any, name: str, default: int | None, most: int | None = None) -> int | None:
    value = query.get(name)
    if value is None:
        return default
    if not value.isdigit() or int(value) < 1 or (most is not None and int(value) > most):
        allowed = f"an integer from 1 to {most}" if most is not None else "a positive integer"
        raise api.BadParameter(name, value[:40], allowed)
    return int(value)


@read_endpoint
async def regressions_endpoint(request: web.Request) -> web.Response:
    """``GET /api/v1/regressions[?state=open|acknowledged|resolved|all][&device=ID][&limit=N][&before=ID]
    [&include_contended=1]``: the regression objects (docs/fleet.md "Regressions"), newest first by id, at most
    ``limit`` (default and most ``server.max_read_series``); ``next_before`` names the next page. With
    ``include_contended`` other than the configured one, a search of its own now, stored nowhere."""
    app, query = request.app, request.rel_url.query
    most = app[SETTINGS].max_read_series
    try:
        include = include_contended(request)
        state = query.get("state", "open")
        if state not in ("open", "acknowledged", "resolved", "all"):
            raise api.BadParameter("state", state[:40], "open, acknowledged, resolved or all")
        device = api.name_filter("device", query.get("device"))
        limit = _positive_int(query, "limit", most, most) or most
        before = _positive_int(query, "before", None)
    except api.BadParameter as exc:
        return _error(400, str(exc), parameter=exc.name)
    watch = await regressions_for(app, include)
    if watch is not app[WATCH]:
        return web.json_response(watch.answer())
    runner = app[STORE]
    items = await runner.read(
        app[SETTINGS].bounded(lambda store: store.regressions(state, device=device, limit=limit + 1, before_id=before)),
        runner.store,
    )
    answer = watch.answer(items[:limit], state)
    answer["limit"] = limit
    answer["next_before"] = items[limit - 1]["id"] if len(items) > limit else None
    return web.json_response(answer)


@campaigns.operator
async def acknowledge_regression(
    request: web.Request, context: campaigns.Context, token: TokenInfo
) -> web.StreamResponse:
    """``POST /api/v1/regressions/{id}/acknowledge`` (operator token), body ``{"note": "…"}`` or empty: an open
    regression becomes acknowledged; it stays so until its series recovers (docs/fleet.md "Regressions")."""
    raw_id = request.match_info["id"]
    if not raw_id.isdigit() or len(raw_id) > 18:
        raise campaigns.BadRequest(400, "bad_request", f"id: {raw_id[:40]!r} is not a regression id (an integer)", "id")
    note = None
    if request.content_length or request.can_read_body:
        body = await campaigns.read_body(request, 16 * 1024)
        if type(body) is not dict:
            raise campaigns.bad("$", "an object with an optional string 'note'")
        unknown = sorted(set(body) - {"note"})
        if unknown:
            raise campaigns.bad(f"$.{unknown[0]}", "not a field here; the only field is 'note'")
        note = body.get("note")
        problem = note_problem(note) if note is not None else None
        if problem is not None:
            raise campaigns.bad("$.note", problem)
    regression_id = int(raw_id)
    before = await context.call(
        context.store.acknowledge_regression, regression_id, token.subject, note, context.now_us()
    )
    if before is None:
        raise campaigns.BadRequest(404, "no_such_regression", f"no regression {regression_id}")
    if before == "resolved":
        raise campaigns.BadRequest(
            409, "regression_resolved", f"regression {regression_id} is resolved already", state=before
        )
    app = request.app
    watch = app[WATCH]
    watch.active = await context.read(watch.load, context.store)  # the page and health see it at once
    app[METRICS].regressions_open(watch.open_counts())
    return web.json_response(await context.read(context.store.regression, regression_id))


async def evaluate_triggers(app: web.Application) -> TriggerWatch:
    """One evaluation of the [[triggers]]: the window read and judged on a read thread, the new fires recorded in the
    store's meta by the writer, the state and /metrics updated here (docs/triggers.md)."""
    watch = app[TRIGGERS]
    if not watch.triggers:
        return watch
    found: list[dict[str, Any]] = []
    if watch.needs_regressions:
        searched = await refresh_regressions(app)
        found = regressions.for_triggers(searched.found, searched.active)
    runner = app[STORE]
    observation = await runner.read(watch.observe, runner.store, found)
    settled = await runner.call(watch.settle, runner.store, observation)
    watch.apply(settled)
    # the gauges of every holding series through the label-set budget: off the loop (a flood holds thousands)
    await asyncio.get_running_loop().run_in_executor(None, app[METRICS].triggers, watch.holding(), settled.fires)
    return watch


async def refresh_feedback(app: web.Application, *, force: bool = False) -> feedback.FeedbackCache:
    """The feedback documents, recomputed on a read thread when older than ``fleet.feedback_interval`` (with the
    current regressions as their anomalies)."""
    cache = app[FEEDBACK]
    if force or cache.stale(time.monotonic()):
        found = (await refresh_regressions(app)).found
        runner = app[STORE]
        documents, advice, all_contended = await runner.read(
            feedback.compute, runner.store, cache.settings, found, _now_us()
        )
        cache.update(documents, advice, time.monotonic(), _now_us(), all_contended)
    return cache


@read_endpoint
async def feedback_endpoint(request: web.Request) -> web.Response:
    """``GET /api/v1/feedback[?device=ID][&model=NAME][&include_contended=1]``: the performance-feedback documents
    (docs/feedback.md). ``include_contended`` other than the configured one computes the documents now, on a read
    thread, without touching the cache the devices' recommendations come from."""
    query = request.rel_url.query
    try:
        for name in ("device", "model"):
            api.name_filter(name, query.get(name))
        include = include_contended(request)
    except api.BadParameter as exc:
        return _error(400, str(exc), parameter=exc.name)
    app = request.app
    cache = app[FEEDBACK]
    if include is None or include == cache.settings.include_contended:
        cache = await refresh_feedback(app)
    else:
        found = (await regressions_for(app, include)).found
        cache = feedback.FeedbackCache(cache.interval_s, replace(cache.settings, include_contended=include))
        runner = app[STORE]
        documents, advice, all_contended = await runner.read(
            feedback.compute, runner.store, cache.settings, found, _now_us()
        )
        cache.update(documents, advice, time.monotonic(), _now_us(), all_contended)
    return web.json_response(cache.answer(query.get("device") or None, query.get("model") or None))


@read_endpoint
async def triggers_endpoint(request: web.Request) -> web.Response:
    """``GET /api/v1/triggers[?trigger=NAME][&device=ID]``: built on a read thread, at most ``server.max_read_series``
    series per trigger and in ``holding`` (worst states first; ``truncated`` counts the rest)."""
    app = request.app
    settings, watch, runner = app[SETTINGS], app[TRIGGERS], app[STORE]
    query = request.rel_url.query
    try:
        unknown = sorted(set(query) - {"trigger", "device"})
        if unknown:
            raise api.BadParameter(unknown[0], query[unknown[0]][:40], "one of the parameters device, trigger")
        for name in ("trigger", "device"):
            api.name_filter(name, query.get(name))
    except api.BadParameter as exc:
        return _error(400, str(exc), parameter=exc.name)

    wanted = query.get("trigger") or None
    if wanted is not None and wanted not in watch.by_name:
        configured = ", ".join(sorted(watch.by_name)) or "none"
        return _error(404, f"no trigger named {wanted!r} is configured (configured: {configured})", parameter="trigger")
    device = query.get("device") or None

    def build(store: Store) -> dict[str, Any] | None:
        if device is not None and store.device(device) is None:
            return None
        return watch.answer(
            max_series=settings.max_read_series, device=device, trigger=wanted, deadline=reads.deadline_of(store)
        )

    answer = await runner.read(settings.bounded(build), runner.store)
    if answer is None:
        return _error(404, f"no device {device!r} has sent a batch to this aggregator", parameter="device")
    return web.json_response(answer)


@read_endpoint
async def fleet(request: web.Request) -> web.Response:
    """``GET /api/v1/fleet[?device=ID]``: every device's row, or that one's (what a page fetches on a refetch
    notice of the live stream)."""
    runner = request.app[STORE]
    app = request.app
    try:
        only = api.name_filter("device", request.rel_url.query.get("device"))
    except api.BadParameter as exc:
        return _error(400, str(exc), parameter=exc.name)
    settings, watch, triggers, folds = app[SETTINGS], app[WATCH], app[TRIGGERS], app[METRICS].budget.device_status

    def build(store: Store, now: float) -> dict[str, Any]:
        return fleet_answer(settings, watch, store, now, only, triggers, folds)

    return web.json_response(await runner.read(settings.bounded(build), runner.store, time.time()))


@read_endpoint
async def stream(request: web.Request) -> web.StreamResponse:
    return await request.app[EVENTS].stream(request)


@read_endpoint
async def page(request: web.Request) -> web.Response:
    runner = request.app[STORE]
    settings, watch, triggers = request.app[SETTINGS], request.app[WATCH], request.app[TRIGGERS]
    folds = request.app[METRICS].budget.device_status

    def build(store: Store, now: float) -> str:
        return with_data(FLEET_PAGE, fleet_answer(settings, watch, store, now, triggers=triggers, metric_folds=folds))

    text = await runner.read(settings.bounded(build), runner.store, time.time())
    if await _viewer_is_operator(request):  # the campaigns box, server-rendered, for operators only
        listed = await runner.read(settings.bounded(campaigns.listing), runner.store, campaign_pages.BOX_CAMPAIGNS)
        text = text.replace("</h1>", "</h1>\n" + campaign_pages.campaigns_box_html(listed), 1)
    return web.Response(text=text, content_type="text/html")


async def campaign_page(request: web.Request) -> web.Response:
    """``/campaigns/{id}``: a campaign's per-device states and class comparison, for operators (a browser without
    an operator login is sent to /login)."""
    if not await _viewer_is_operator(request):
        if "text/html" in request.headers.get("Accept", ""):
            raise web.HTTPFound("/login")
        return _error(403, "campaigns are shown to operator tokens only (lens-aggregator token add --kind operator)")
    runner, settings = request.app[STORE], request.app[SETTINGS]

    def build(store: Store, text: str) -> str:
        state = campaigns.status(store, text)
        levels, classes = campaigns.campaign_levels_with_class(store, state["benchmark_id"])
        return campaign_pages.campaign_page_html(state, campaign_results.class_rows(levels, classes))

    try:
        text = await runner.read(settings.bounded(build), runner.store, request.match_info["benchmark_id"])
    except campaigns.BadRequest as exc:
        return exc.response()
    return web.Response(text=text, content_type="text/html")


def device_answer(
    settings: Settings,
    watch: regressions.Watch,
    store: Store,
    now: float,
    device: str,
    params: dict[str, Any],
    other: str | None = None,
    metric_folds: Callable[[str], dict[str, Any] | None] | None = None,
    triggers: TriggerWatch | None = None,
) -> dict[str, Any] | None:
    """What the device page shows first (on a read thread): the device's fleet row (health, facts, series, the
    triggers whose condition holds), every trigger's state on its series (``triggers``: ``GET /api/v1/triggers
    ?device=ID``), its
    downsampled timeline (``params``: of :func:`aggregator.timeline.timeline`), the ``other`` device's over the
    same buckets when one is compared, and its latest batches; None for a device that never sent a batch. Through a
    ``reads.BoundedStore`` (``Settings.bounded``) every part is bounded to ``server.max_read_series`` series, and
    ``truncated`` lists what was left out."""
    health = settings.health(metric_folds)
    held = triggers.by_device() if triggers is not None else None
    rows = fleet_rows(store, now, health=health, only=device, regressions=watch.by_device(), triggers=held)
    if not rows:
        return None
    with_regressions(rows, watch)
    recent = store.syncs(device, limit=10)
    mine = timeline.timeline(store, device, max_series=settings.max_read_series, **params)
    compare = None
    if other and store.device(other) is not None:  # the other device over the same buckets
        compare = timeline.timeline(
            store,
            other,
            since_us=mine["since_us"],
            until_us=mine["until_us"],
            width_s=mine["width_s"],
            max_series=settings.max_read_series,
        )
    truncated = {}
    if (series := reads.series_truncation(store, device)) is not None:
        truncated["series"] = series
    for name, part in (("timeline", mine), ("compare", compare)):
        if part is not None and part.get("series_truncated"):
            truncated[name] = part["series_truncated"]
    return {
        "device": rows[0],
        "metric_series": health.folds(device),
        "timeline": mine,
        "compare": compare,
        "recent_syncs": [sync._asdict() for sync in reversed(recent)],
        # the device's regression objects, every state, newest first (docs/fleet.md "Regressions")
        "regression_objects": store.regressions("all", device=device, limit=DEVICE_PAGE_REGRESSIONS),
        "truncated": truncated,
        "triggers": triggers.answer(device=device, max_series=settings.max_read_series) if triggers else None,
    }


DEVICE_PAGE_REGRESSIONS = 20  # the device page lists the newest this many regression objects


def _device_id(request: web.Request) -> str:
    device = request.match_info["device_id"]
    api.name_filter("device", device)
    return device


@read_endpoint
async def device_page(request: web.Request) -> web.Response:
    runner = request.app[STORE]
    settings, watch, folds = request.app[SETTINGS], request.app[WATCH], request.app[METRICS].budget.device_status
    trigger_watch = request.app[TRIGGERS]

    def build(store: Store, device: str, params: dict[str, Any], other: str | None) -> str | None:
        answer = device_answer(settings, watch, store, time.time(), device, params, other, folds, trigger_watch)
        return None if answer is None else with_data(DEVICE_PAGE, answer)

    query = request.rel_url.query
    try:
        device = _device_id(request)
        range_name = query.get("range", "7d")
        if range_name not in RANGES:
            raise api.BadParameter("range", range_name[:40], "one of " + ", ".join(RANGES))
        other = api.name_filter("compare", query.get("compare"))
    except api.BadParameter as exc:
        return _error(400, str(exc), parameter=exc.name)
    text = await runner.read(settings.bounded(build), runner.store, device, {"range_s": RANGES[range_name]}, other)
    if text is None:
        return web.Response(text=not_found(device), status=404, content_type="text/html")
    return web.Response(text=text, content_type="text/html")


@read_endpoint
async def device_timeline(request: web.Request) -> web.Response:
    """``GET /api/v1/devices/{device}/timeline``: the device's history in at most ``points`` buckets
    (:mod:`aggregator.timeline`); 404 for a device that never sent a batch."""
    runner, settings = request.app[STORE], request.app[SETTINGS]

    def build(store: Store, device: str, params: dict[str, Any]) -> dict[str, Any] | None:
        if store.device(device) is None:
            return None
        return timeline.timeline(store, device, max_series=settings.max_read_series, **params)

    try:
        device = _device_id(request)
        params = timeline.parse_params(request.rel_url.query)
        answer = await runner.read(settings.bounded(build), runner.store, device, params)
    except api.BadParameter as exc:
        return _error(400, str(exc), parameter=exc.name)
    if answer is None:
        return _error(404, f"no device {device!r} has sent measurements to this aggregator")
    return web.json_response(answer)


STATIC = Path(__file__).with_name("static")
STATIC_TYPES = {".js": "text/javascript", ".css": "text/css", ".txt": "text/plain"}


async def static_file(request: web.Request) -> web.Response:
    """The page's vendored assets (uPlot): served from the package, never a CDN; cached for a day."""
    name = request.match_info["name"]
    path = STATIC / name
    if "/" in name or name.startswith(".") or path.suffix not in STATIC_TYPES or not path.is_file():
        raise web.HTTPNotFound()
    return web.Response(
        body=path.read_bytes(),
        content_type=STATIC_TYPES[path.suffix],
        headers={"Cache-Control": "public, max-age=86400"},
    )


@read_endpoint
async def devices(request: web.Request) -> web.Response:
    runner = request.app[STORE]
    rows = await runner.read(runner.store.devices)
    health = request.app[SETTINGS].health(request.app[METRICS].budget.device_status)
    for row in rows:  # what /metrics folded of the device's label sets (None: nothing within the health window)
        row["metric_series"] = health.folds(row["device_id"])
    return web.json_response({"devices": rows}, dumps=json.dumps)


def create_app(
    settings: Settings,
    store: Store,
    *,
    triggers: Sequence[Trigger] = (),
    clock: Callable[[], float] = time.time,
) -> web.Application:
    """The app over ``store``. ``triggers``: the configuration's [[triggers]] (``config.tables["triggers"]``);
    ``clock``: the wall clock (Unix seconds) they and the campaigns' deadlines are evaluated against (tests move
    it)."""
    # each request tells the connection guard its headers came (when served through connections.GuardedSite)
    open_files = open_files_limit()
    cap, how = connection_cap(settings.max_connections, open_files)
    guard = ConnectionGuard(
        max_connections=cap,
        header_timeout_s=settings.header_timeout_s,
        body_timeout_s=settings.body_timeout_s,
        accept_batch=accept_batch(open_files),
        max_unsent_bytes=settings.max_unsent_bytes,
    )
    guard.how = how
    # aiohttp refuses bodies over client_max_size itself; leave headroom so our own check answers first.
    app = web.Application(
        client_max_size=settings.max_body_bytes + 1, middlewares=[guard.middleware, gzip_responses, read_limits]
    )
    app[SETTINGS] = settings
    app[GUARD] = guard
    if hasattr(store, "max_query_seconds"):
        store.max_query_seconds = settings.max_query_seconds
    fleet_metrics = FleetMetrics(
        settings.max_metric_series,
        max_series_per_device=settings.max_metric_series_per_device,
        max_label_chars=settings.max_label_chars,
        stale_after_s=settings.stale_after_s,
    )
    app[METRICS] = fleet_metrics
    app[EXPOSITION] = ExpositionCache(fleet_metrics.exposition, settings.metrics_max_age_s)
    app[EVENTS] = Broadcaster(settings.max_subscribers, settings.max_event_bytes)
    fleet_metrics.registry.register(ConnectionsCollector(guard.snapshot, app[EVENTS].snapshot))
    app[DECODERS] = ThreadPoolExecutor(max_workers=2, thread_name_prefix="ingest-decode")
    app[PUBLISHING] = set()
    app[REGRESSION_LOCK] = asyncio.Lock()
    app[WATCH] = regressions.Watch(
        settings.regression_interval_s,
        regressions.Settings(
            min_change=settings.regression_min_change,
            alpha=settings.regression_alpha,
            include_contended=settings.regression_include_contended,
            window=settings.regression_max_requests,
            window_s=settings.regression_window_s,
            min_duration_s=settings.regression_min_duration_s,
        ),
    )
    app[TRIGGERS] = TriggerWatch(
        triggers, interval_s=settings.trigger_interval_s, clock=clock, max_listed=settings.max_read_series
    )
    app[FEEDBACK] = feedback.FeedbackCache(settings.feedback_interval_s, settings.feedback_settings)
    fleet_metrics.configure_triggers([t.name for t in triggers])

    async def end_streams(app: web.Application) -> None:
        app[EVENTS].close()

    app.on_shutdown.append(end_streams)
    runner = StoreRunner(store, read_workers=settings.read_workers, max_pending=settings.max_pending_reads)
    app[STORE] = runner
    app.router.add_post("/api/v1/ingest", ingest)
    app.router.add_get("/api/v1/health", health)
    app.router.add_get("/api/v1/whoami", whoami)
    app.router.add_get("/api/v1/devices", devices)
    app.router.add_get("/metrics", metrics_endpoint)
    app.router.add_get("/api/v1/measurements", measurements)
    app.router.add_get("/api/v1/summary", summary)
    app.router.add_get("/api/v1/fleet", fleet)
    app.router.add_get("/api/v1/regressions", regressions_endpoint)
    app.router.add_post("/api/v1/regressions/{id}/acknowledge", acknowledge_regression)
    app.router.add_get("/api/v1/triggers", triggers_endpoint)
    app.router.add_get("/api/v1/feedback", feedback_endpoint)
    app.router.add_get("/api/v1/stream", stream)
    app.router.add_get("/", page)
    app.router.add_get("/login", login_page)
    app.router.add_post("/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/device/{device_id}", device_page)
    app.router.add_get("/campaigns/{benchmark_id}", campaign_page)
    app.router.add_get("/api/v1/devices/{device_id}/timeline", device_timeline)
    app.router.add_get("/static/{name}", static_file)
    app[campaigns.CONTEXT] = campaigns.Context(
        call=runner.call,
        read=runner.read,
        store=store,
        authenticate=_authenticate,
        settings=settings.campaigns,
        now_us=lambda: int(clock() * 1e6),
        bounded=settings.bounded,  # every operator read within server.max_query_seconds (503 past it)
    )
    campaigns.add_routes(app)
    app[campaigns.GAUGES] = app[METRICS].campaigns

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        for device in await runner.call(store.devices):  # device gauges survive a restart of the aggregator
            counters = {k: device[k] for k in ("dropped_total", "quarantined_total") if device.get(k) is not None}
            if device.get("backlog") is not None:
                counters["pending_records"] = device["backlog"]
            fleet_metrics.device(device["device_id"], counters, device["last_seen_us"] / 1e6)
        # … and the latency series, request counters, tok/s and contended share, from each device's latest requests
        for device_id, requests in (await runner.call(recent_requests, store)).items():
            fleet_metrics.restore(device_id, requests)
        watch = app[WATCH]  # … and the regression objects: health, the pages and /metrics before the first search
        watch.active = await runner.call(watch.load, store)
        fleet_metrics.regressions_open(watch.open_counts())

        async def retention() -> None:
            while settings.retention_s:
                cutoff = _now_us() - int(settings.retention_s * 1e6)
                dropped = await runner.call(store.drop_before, cutoff)
                log.info("retention: dropped %d (measurements before %d µs)", dropped, cutoff)
                await asyncio.sleep(3600)

        async def every(interval_s: float, refresh: Callable[[web.Application], Awaitable[Any]], what: str) -> None:
            """``refresh`` now and then every ``interval_s``: a failed run is logged and the next one tries again."""
            while True:
                try:
                    await refresh(app)
                except (Busy, QueryTimeout) as exc:
                    log.warning("%s: not computed this time (%s)", what, exc)
                except Exception:  # a periodic computation outlives whatever one run meets; the next run tries again
                    log.exception("%s: the computation failed", what)
                await asyncio.sleep(max(1.0, interval_s))

        async def watch_triggers() -> None:
            """Every fleet.trigger_interval (the first after one interval): a failed evaluation is logged and
            counted, and the next one tries again."""
            trigger_watch = app[TRIGGERS]

            def failed(reason: str) -> None:
                trigger_watch.failures += 1
                fleet_metrics.trigger_failure(reason)

            if not trigger_watch.triggers:
                return
            try:
                await runner.call(trigger_watch.load, store)  # the kept fires: history and cooldowns from the start
            except Exception:  # a store that cannot answer now: the first evaluation reads them again
                log.exception("triggers: the kept fires could not be read")
                failed("error")
            while True:
                await asyncio.sleep(max(0.01, settings.trigger_interval_s))
                try:
                    await evaluate_triggers(app)
                except (Busy, QueryTimeout) as exc:
                    log.warning("triggers: not evaluated this time (%s)", exc)
                    failed("busy" if isinstance(exc, Busy) else "timeout")
                except Exception:  # the evaluation must outlive whatever one run meets
                    log.exception("triggers: the evaluation failed")
                    failed("error")

        pruner = asyncio.create_task(retention())
        watcher = asyncio.create_task(every(settings.regression_interval_s, refresh_regressions, "regressions"))
        feedback_task = asyncio.create_task(every(settings.feedback_interval_s, refresh_feedback, "feedback"))
        trigger_task = asyncio.create_task(watch_triggers())
        deadline_task = asyncio.create_task(
            every(settings.campaigns.check_interval_s, campaigns.check_deadlines, "campaign deadlines")
        )
        forwarder = None
        if settings.otlp is not None:
            forwarder = Forwarder(store, settings.otlp)
            await forwarder.start()
            app[FORWARDER] = forwarder
            fleet_metrics.registry.register(OtlpCollector(forwarder.snapshot))
            log.info("forwarding stored records to %s (%s)", settings.otlp.endpoint, ", ".join(settings.otlp.signals))
        yield
        if forwarder is not None:
            await forwarder.stop()
        pruner.cancel()
        watcher.cancel()
        feedback_task.cancel()
        trigger_task.cancel()
        deadline_task.cancel()
        publishing: set[asyncio.Task[None]] = app[PUBLISHING]
        for task in list(publishing):
            task.cancel()
        app[DECODERS].shutdown(wait=True)
        app[EXPOSITION].close()
        runner.shutdown()
        await asyncio.get_running_loop().run_in_executor(None, store.close)

    app.cleanup_ctx.append(lifecycle)
    return app
