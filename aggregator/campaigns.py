"""Benchmark campaigns (docs/campaigns.md): a suite pushed to a set of devices, pulled by each when it syncs.

The operator API (``/api/v1/benchmark…``, operator token) starts, reads, cancels and exports campaigns; the device
API (``/api/v1/devices/{device}/jobs/{id}``, the device's own token) hands a device its job's suite and takes its
progress; the ingest acknowledgement lists the device's active jobs (:func:`ack_jobs`). Everything a request carries
is checked here before the store sees it: ids as UUIDs, bodies at most 1 MiB of strict JSON, every field's type and
bound, refusals naming the field's JSON path.

Errors::

    BadRequest            400/404/409/429 with {"error", "path"?, "message"}
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import math
import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

from lens_core import wire
from lens_core.suite import SuiteError, SuiteLimits, canonical_json, check_document, level_keys

from . import callback
from .arrow import ArrowUnavailable
from .campaign_results import Export, export_answer
from .campaign_results import results as results_of
from .health import FACTS_KIND, facts_from_record
from .metrics import clean_label
from .rows import decode_wire
from .store import (
    CAMPAIGN_TERMINAL,
    JOB_ACTIVE,
    JOB_STATES,
    CampaignRow,
    JobRow,
    Query,
    Store,
    TokenInfo,
    TooManyCampaigns,
)

log = logging.getLogger("aggregator.campaigns")

CALLBACK_TIMEOUT_S = 10.0
MAX_BODY_BYTES = 1024**2
MAX_JSON_DEPTH = 64
MAX_JOB_BODY_BYTES = 4096
MAX_ACK_JOBS = 8
MAX_LISTED = 100
MAX_TARGET_NAMES = 256  # classes or tags one start may name
MAX_REASON_CHARS = 300
MIN_DEADLINE_S, MAX_DEADLINE_S, DEFAULT_DEADLINE_S = 60, 604_800, 86_400
DEVICE_STATES = ("running", "succeeded", "failed", "cancelled")  # what a device may report
_DEVICE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:@-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9._-]{1,64}")
MAX_TAGS = 16
START_KEYS = ("configuration", "callback_url", "target", "deadline_seconds", "name")
TARGET_KEYS = ("devices", "classes", "tags", "all")
JOB_KEYS = ("state", "progress_percent", "reason", "levels_done", "levels_total")


class BadRequest(Exception):
    """A refused request: the HTTP status, the error code, the JSON path of the field (if one) and why."""

    def __init__(self, status: int, error: str, message: str, path: str | None = None, **extra: Any) -> None:
        self.status, self.error, self.path, self.extra = status, error, path, extra
        super().__init__(message)

    def response(self) -> web.Response:
        body: dict[str, Any] = {"error": self.error}
        if self.path is not None:
            body["path"] = self.path
        body["message"] = str(self)
        body.update(self.extra)
        return web.json_response(body, status=self.status)


def too_many(exc: TooManyCampaigns) -> BadRequest:
    return BadRequest(429, "too_many_campaigns", str(exc))


def bad(path: str, message: str) -> BadRequest:
    return BadRequest(400, "bad_request", f"{path}: {message}", path)


@dataclass(frozen=True)
class CampaignSettings:
    """The ``[campaigns]`` table (docs/configuration.md)."""

    max_active: int = 100
    max_devices: int = 10_000
    check_interval_s: float = 10.0
    callback_secret_file: Path | None = None
    callback_attempts: int = 8
    allow_private_callbacks: bool = False

    @classmethod
    def from_config(cls, config: Any) -> CampaignSettings:
        return cls(
            max_active=config.get("campaigns", "max_active"),
            max_devices=config.get("campaigns", "max_devices"),
            check_interval_s=config.get("campaigns", "check_interval"),
            callback_secret_file=config.get("campaigns", "callback_secret_file"),
            callback_attempts=config.get("campaigns", "callback_attempts"),
            allow_private_callbacks=config.get("campaigns", "allow_private_callbacks"),
        )


# -- times and ids ---------------------------------------------------------------------------------------------
def iso(us: int | None) -> str | None:
    if us is None:
        return None
    return datetime.fromtimestamp(us / 1e6, tz=timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


def campaign_id(text: str) -> str:
    """The id as a canonical UUID string, checked before any lookup (404 for anything else: no such campaign)."""
    try:
        parsed = uuid.UUID(text)
    except ValueError:
        raise BadRequest(404, "no_such_campaign", "benchmark ids are UUIDs (as start returned them)") from None
    if str(parsed) != text.lower():
        raise BadRequest(404, "no_such_campaign", "benchmark ids are UUIDs (as start returned them)")
    return str(parsed)


def canonical(document: Any) -> str:
    """The document as both sides hash it (``lens_core.suite.canonical_json``)."""
    return canonical_json(document).decode("utf-8")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def parse_json(body: bytes, limit: int) -> Any:
    """A request body as strict JSON (no NaN or Infinity, nesting at most 64), at most ``limit`` bytes."""
    if len(body) > limit:
        raise BadRequest(413, "too_large", f"the body is larger than {limit} bytes", limit=limit)
    if wire.json_depth_exceeds(body, MAX_JSON_DEPTH):
        raise bad("$", f"nesting deeper than {MAX_JSON_DEPTH} levels")
    try:
        return json.loads(body.decode("utf-8"), parse_constant=_refuse_constant)
    except (UnicodeDecodeError, ValueError) as exc:
        raise bad("$", f"not a JSON document ({exc})") from None


async def read_body(request: web.Request, limit: int) -> Any:
    if request.content_length is not None and request.content_length > limit:
        raise BadRequest(413, "too_large", f"a body of {request.content_length} bytes; at most {limit}", limit=limit)
    raw = await request.content.read(limit + 1)
    return parse_json(raw, limit)


# -- the suite document ------------------------------------------------------------------------------------------
def check_configuration(document: Any) -> None:
    """The suite document's checks that need no device: the same code and JSON paths as the device's
    (``lens_core.suite.check_document``); a refusal is 400 ``bad_configuration``."""
    try:
        check_document(document, source="configuration", limits=SuiteLimits())
    except SuiteError as exc:
        raise BadRequest(400, "bad_configuration", str(exc), exc.path) from None


def estimate_duration(document: dict[str, Any]) -> float:
    """A rough run time in seconds on one device: per model × workload × level, its duration_seconds, or its
    requests at 2 s each spread over its concurrency (plus warm-up). An estimate for operators, never a bound."""
    total = 0.0
    models = document.get("models")
    workloads = document.get("workloads")
    n_models = len(models) if type(models) is list else 1
    for workload in workloads if type(workloads) is list else []:
        if type(workload) is not dict:
            continue
        levels: list[int] = []
        if type(workload.get("concurrency")) is int:
            levels = [workload["concurrency"]]
        elif type(workload.get("concurrency_levels")) is list:
            levels = [v for v in workload["concurrency_levels"] if type(v) is int and v > 0]
        rates = workload.get("request_rates")
        n_levels = (len(levels) or (0 if type(rates) is list and rates else 1)) + (
            len(rates) if type(rates) is list else 0
        )
        duration = workload.get("duration_seconds")
        requests = workload.get("requests")
        raw_warmup = workload.get("warmup_requests")
        warmup = raw_warmup if isinstance(raw_warmup, int) else 0
        for i in range(max(1, n_levels)):
            concurrency = levels[i] if i < len(levels) else 1
            if isinstance(duration, int):
                total += duration
            else:
                count = requests if isinstance(requests, int) else 100
                total += 2.0 * count / max(1, concurrency)
            total += 2.0 * warmup
    return float(min(total * n_models, 1e9))


# -- the start request ------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Start:
    configuration: dict[str, Any]
    target: dict[str, Any]
    deadline_s: int
    callback_url: str | None
    name: str


def _names(value: Any, path: str, check: Callable[[str], bool], allowed: str, limit: int) -> list[str]:
    if type(value) is not list:
        raise bad(path, f"a list of {allowed}")
    if len(value) > limit:
        raise bad(path, f"at most {limit} entries")
    out: list[str] = []
    for i, item in enumerate(value):
        if type(item) is not str or not check(item):
            raise bad(f"{path}[{i}]", allowed)
        if item not in out:
            out.append(item)
    return out


def _plain_text(text: str, limit: int) -> bool:
    return 0 < len(text) <= limit and clean_label(text, limit) == (text, False, False)


def parse_start(body: Any, settings: CampaignSettings) -> Start:
    if type(body) is not dict:
        raise bad("$", "an object with configuration and target")
    unknown = sorted(set(body) - set(START_KEYS))
    if unknown:
        raise bad(f"$.{unknown[0]}", "an unknown key; allowed: " + ", ".join(START_KEYS))
    if "configuration" not in body:
        raise BadRequest(400, "bad_configuration", "$: the required key 'configuration'", "$")
    configuration = body["configuration"]
    check_configuration(configuration)
    if type(configuration) is not dict:
        raise BadRequest(400, "bad_configuration", "$: an object", "$")
    target = body.get("target")
    if type(target) is not dict:
        raise bad("$.target", "an object with devices, classes, tags or all")
    unknown = sorted(set(target) - set(TARGET_KEYS))
    if unknown:
        raise bad(f"$.target.{unknown[0]}", "an unknown key; allowed: " + ", ".join(TARGET_KEYS))
    checked: dict[str, Any] = {}
    if "devices" in target:
        checked["devices"] = _names(
            target["devices"],
            "$.target.devices",
            lambda s: _DEVICE_ID.fullmatch(s) is not None,
            "device ids (1 to 128 letters, digits and . _ : @ -)",
            settings.max_devices,
        )
    if "classes" in target:
        checked["classes"] = _names(
            target["classes"],
            "$.target.classes",
            lambda s: _plain_text(s, 256),
            "device classes (1 to 256 characters, no control characters)",
            MAX_TARGET_NAMES,
        )
    if "tags" in target:
        checked["tags"] = _names(
            target["tags"],
            "$.target.tags",
            lambda s: _TAG.fullmatch(s) is not None,
            "tags (1 to 64 of A-Z a-z 0-9 . _ -)",
            MAX_TARGET_NAMES,
        )
    if "all" in target:
        if type(target["all"]) is not bool:
            raise bad("$.target.all", "true or false")
        checked["all"] = target["all"]
    if not (checked.get("devices") or checked.get("classes") or checked.get("tags") or checked.get("all")):
        raise bad("$.target", "at least one of devices, classes, tags (non-empty) or all: true")
    deadline = body.get("deadline_seconds", DEFAULT_DEADLINE_S)
    if type(deadline) is not int or not MIN_DEADLINE_S <= deadline <= MAX_DEADLINE_S:
        raise bad("$.deadline_seconds", f"an integer from {MIN_DEADLINE_S} to {MAX_DEADLINE_S} (seconds)")
    callback = body.get("callback_url")
    if callback is not None:
        callback = check_callback_url(callback, settings)
    if "name" in body:
        name = body["name"]
        if type(name) is not str or not _plain_text(name, 128):
            raise bad("$.name", "a name of 1 to 128 characters without control characters")
    else:
        meta = configuration.get("test_suite")
        suite_name = meta.get("name") if type(meta) is dict else None
        name = suite_name if type(suite_name) is str and _plain_text(suite_name, 128) else "campaign"
    return Start(configuration, checked, deadline, callback, name)


def check_callback_url(value: Any, settings: CampaignSettings) -> str:
    """The callback URL's form (http(s), a host, no credentials) and that a secret signs it; whether its
    addresses are public is :func:`check_callback_addresses` (a DNS lookup, off the event loop)."""
    path = "$.callback_url"
    if type(value) is not str or not 0 < len(value) <= 2048:
        raise bad(path, "an http(s) URL of at most 2048 characters")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - a port out of range raises here
    except ValueError as exc:
        raise bad(path, f"a valid URL ({exc})") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise bad(path, "an http:// or https:// URL with a host")
    if "@" in parts.netloc:
        raise bad(path, "a URL without credentials (no user:password@)")
    if settings.callback_secret_file is None:
        raise bad(
            path, "a callback needs campaigns.callback_secret_file in the aggregator's configuration (it signs it)"
        )
    return value


def check_callback_addresses(url: str, settings: CampaignSettings) -> None:
    """The callback URL passes the same check a delivery makes (``callback.check_callback_url``: every address the
    host resolves to is public — NAT64, 6to4, IPv4-mapped and the other embeddings included — unless
    ``campaigns.allow_private_callbacks``): a URL no delivery could reach is refused at start. Blocking (DNS): on a
    thread."""
    problem = callback.check_callback_url(url, settings.allow_private_callbacks)
    if problem is not None:
        raise bad("$.callback_url", f"{problem} (campaigns.allow_private_callbacks)")


# -- targeting ---------------------------------------------------------------------------------------------------
def device_tags(record: dict[str, Any] | None) -> list[str]:
    """The tags of a facts record (``ext.device.tags``): at most 16 valid tags, the rest ignored."""
    ext = record.get("ext") if record else None
    device = ext.get("device") if type(ext) is dict else None
    tags = device.get("tags") if type(device) is dict else None
    if type(tags) is not list:
        return []
    return [t for t in tags[:MAX_TAGS] if type(t) is str and _TAG.fullmatch(t)]


def class_label(facts: dict[str, Any] | None) -> str | None:
    """The class a campaign compares a device in: its ``device_class`` and hardware ``model`` from its facts
    ("embedded device · NVIDIA Jetson AGX Orin Developer Kit") — the same pair the fleet's feedback groups by —
    or the class alone when the device reports no model."""
    if not facts or not facts.get("device_class"):
        return None
    model = facts.get("model")
    return f"{facts['device_class']} · {model}" if model else str(facts["device_class"])


def latest_facts(store: Store, device_id: str) -> tuple[str | None, list[str], set[str]]:
    """(class label, tags, every name a target's ``classes`` may use for it: the label, the device class, the
    model) from the device's latest facts record."""
    rows = store.latest(Query(device=device_id, kind=FACTS_KIND), 1)
    record = decode_wire(rows[0]) if rows else None
    facts = facts_from_record(record)
    names = {str(facts[k]) for k in ("device_class", "model") if facts and facts.get(k)}
    label = class_label(facts)
    if label is not None:
        names.add(label)
    return label, device_tags(record), names


def select_devices(store: Store, target: dict[str, Any], max_devices: int) -> tuple[list[str], dict[str, str]]:
    """The snapshot at start (on a read thread): devices the store knows matching any of devices / classes / tags /
    all, and the named devices it does not know (``unknown device``). Beyond ``max_devices``: BadRequest."""
    known = [row["device_id"] for row in store.devices()]
    known_set = set(known)
    chosen: set[str] = set()
    skipped: dict[str, str] = {}
    for device in target.get("devices", []):
        if device in known_set:
            chosen.add(device)
        else:
            skipped[device] = "unknown device"
    if target.get("all"):
        chosen.update(known)
    elif target.get("classes") or target.get("tags"):
        classes, tags = set(target.get("classes", [])), set(target.get("tags", []))
        for device in known:
            if device in chosen:
                continue
            _, device_tag_list, names = latest_facts(store, device)
            if classes.intersection(names) or tags.intersection(device_tag_list):
                chosen.add(device)
    if len(chosen) > max_devices:
        raise bad(
            "$.target", f"{len(chosen)} devices match; a campaign targets at most {max_devices} (campaigns.max_devices)"
        )
    return sorted(chosen), skipped


# -- views -------------------------------------------------------------------------------------------------------
def counts_of(jobs: list[JobRow]) -> dict[str, int]:
    counts: dict[str, int] = {}
    for job in jobs:
        counts[job.state] = counts.get(job.state, 0) + 1
    return counts


# job states whose own progress counts (a job that ended otherwise — succeeded, failed, timed out — is done: 100 %)
PROGRESS_OWN = ("queued", "running", "cancelled")


def progress_of(jobs: list[JobRow]) -> float:
    """The campaign's progress: the mean over its non-skipped jobs of each job's progress — the device's report
    while it is queued or running (and what it had reached when cancelled), 100 % once it ended otherwise. The same
    figure everywhere: status, the list, the fleet page's box and the gauge (``Store.job_progress``)."""
    parts = [float(j.progress_percent) if j.state in PROGRESS_OWN else 100.0 for j in jobs if j.state != "skipped"]
    return round(sum(parts) / len(parts), 1) if parts else 100.0


def summary(row: CampaignRow, counts: dict[str, int], progress: float) -> dict[str, Any]:
    return {
        "benchmark_id": row.id,
        "name": row.name,
        "status": row.state,
        "progress_percent": progress,
        "created_at": iso(row.created_us),
        "deadline": iso(row.deadline_us),
        "counts": counts,
    }


def status_view(row: CampaignRow, jobs: list[JobRow]) -> dict[str, Any]:
    started = row.started_us
    estimate = None
    if started is not None and row.state not in CAMPAIGN_TERMINAL:
        estimate = iso(min(started + int(row.estimated_duration_s * 1e6), row.deadline_us))
    return {
        "benchmark_id": row.id,
        "name": row.name,
        "status": row.state,
        "progress_percent": progress_of(jobs),
        "started_at": iso(started),
        "finished_at": iso(row.finished_us),
        "estimated_completion": estimate,
        "estimated_duration_seconds": row.estimated_duration_s,
        "deadline": iso(row.deadline_us),
        "created_at": iso(row.created_us),
        "created_by": row.created_by,
        "configuration_sha256": row.configuration_sha256,
        "counts": counts_of(jobs),
        "callback": None
        if row.callback_url is None
        else {
            "url": row.callback_url,
            "state": row.callback_state,
            "attempts": row.callback_attempts,
            "next_attempt_at": iso(row.callback_next_us),
            "error": row.callback_error,
        },
        "devices": {
            job.device_id: {
                "state": job.state,
                "reason": job.reason,
                "progress_percent": job.progress_percent,
                "levels_done": job.levels_done,
                "levels_total": job.levels_total,
                "updated_at": iso(job.updated_us),
            }
            for job in jobs
        },
    }


def campaign_levels_with_class(
    store: Store, campaign: str, limit: int = 10_000
) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The campaign's level records and the class of each device with a job (from its latest facts; devices
    without one are left out): what ``class_rows`` and ``export`` group by."""
    levels = store.campaign_levels(campaign, limit)
    classes: dict[str, str] = {}
    for job in store.campaign_jobs(campaign):
        if job.state != "skipped":
            device_class = latest_facts(store, job.device_id)[0]
            if device_class is not None:
                classes[job.device_id] = device_class
    return levels, classes


def results_view(store: Store, campaign: str) -> dict[str, Any] | None:
    """``GET /api/v1/benchmark/{id}/results`` (on a read thread)."""
    row = store.campaign(campaign)
    if row is None:
        return None
    states = {job.device_id: job.state for job in store.campaign_jobs(campaign) if job.state != "skipped"}
    levels, classes = campaign_levels_with_class(store, campaign)
    return {
        "benchmark_id": row.id,
        "format_version": "1",
        "status": row.state,
        "results": results_of(levels, classes, states),
    }


def job_for_ack(job: JobRow) -> dict[str, Any]:
    return {
        "benchmark_id": job.campaign_id,
        "state": job.state,
        "deadline": iso(job.deadline_us),
        "configuration_sha256": job.configuration_sha256,
    }


def ack_jobs(store: Store, device_id: str) -> list[dict[str, Any]]:
    """What the ingest acknowledgement carries (at most 8): one indexed query."""
    return [job_for_ack(job) for job in store.device_jobs(device_id, MAX_ACK_JOBS)]


# -- completion callbacks (aggregator/callback.py) -------------------------------------------------------------
def on_campaign_finished(app: web.Application, campaign: str) -> None:
    """A campaign reached a terminal state (completed, failed, cancelled): its callback, if it has one, was set
    ``pending`` in the same transaction and goes out with the next tick of the campaign task (deliver_callbacks)."""
    log.info("campaign %s finished", campaign)


def callback_payload(row: CampaignRow, counts: dict[str, int]) -> dict[str, Any]:
    return {
        "benchmark_id": row.id,
        "name": row.name,
        "status": row.state,
        "counts": counts,
        "finished_at": iso(row.finished_us),
    }


CALLBACKS_AT_ONCE = 8  # deliveries in flight together: a slow receiver holds one slot, never the campaign task
DELIVERING: web.AppKey[set[asyncio.Task[int]]] = web.AppKey("campaign_callbacks")


def start_deliveries(app: web.Application) -> None:
    """The due callbacks, sent in a task of their own (at most one such task at a time): the deadline check and the
    gauges never wait behind a slow receiver."""
    tasks = app.setdefault(DELIVERING, set())
    if any(not t.done() for t in tasks):
        return
    task = asyncio.create_task(deliver_callbacks(app))
    tasks.add(task)
    task.add_done_callback(tasks.discard)


async def deliver_callbacks(app: web.Application, limit: int = 20) -> int:
    """Send the due completion callbacks (at most ``limit`` per tick), signed with ``campaigns.callback_secret_file``;
    a failure is retried with backoff (1 s doubling to 5 min) up to ``campaigns.callback_attempts`` times, across
    restarts (the state is in the campaign's row). How many were attempted."""
    context = app[CONTEXT]
    due: list[CampaignRow] = await context.read(context.store.due_callbacks, context.now_us(), limit)
    slots = asyncio.Semaphore(CALLBACKS_AT_ONCE)

    async def one(row: CampaignRow) -> None:
        async with slots:
            await _deliver_one(context, row)

    await asyncio.gather(*(one(row) for row in due))
    return len(due)


async def _deliver_one(context: Context, row: CampaignRow) -> None:
    """One callback attempt and its outcome in the campaign's row."""
    settings = context.settings
    counts = (await context.read(context.store.job_counts, [row.id])).get(row.id, {})
    attempt = row.callback_attempts + 1
    secret: bytes | None = None
    error: str | None
    try:
        if settings.callback_secret_file is None:
            raise OSError("campaigns.callback_secret_file is not set")
        secret = await asyncio.get_running_loop().run_in_executor(None, settings.callback_secret_file.read_bytes)
    except OSError as exc:
        ok, error = False, f"the callback secret cannot be read: {exc}"
    if secret is not None:
        ok, error = await callback.deliver(
            row.callback_url or "",
            callback_payload(row, counts),
            secret.strip(),
            allow_private=settings.allow_private_callbacks,
            timeout=CALLBACK_TIMEOUT_S,
        )
    if ok:
        state, next_us = "delivered", None
        log.info("campaign %s: callback delivered (attempt %d)", row.id, attempt)
    elif attempt >= settings.callback_attempts:
        state, next_us = "failed", None
        log.warning("campaign %s: callback failed after %d attempts: %s", row.id, attempt, error)
    else:
        state, next_us = "pending", context.now_us() + int(callback.next_attempt_delay(attempt) * 1e6)
        log.info("campaign %s: callback attempt %d failed (%s); retrying", row.id, attempt, error)
    await context.call(context.store.set_callback, row.id, state, attempt, next_us, None if ok else error)


# -- the HTTP layer ------------------------------------------------------------------------------------------------
@dataclass
class Context:
    """What the handlers need from the app: the store runner (``call`` on the writer, ``read`` on the read pool),
    the token check and the settings."""

    call: Callable[..., Awaitable[Any]]
    read: Callable[..., Awaitable[Any]]
    store: Store
    authenticate: Callable[[web.Request], Awaitable[TokenInfo | None]]
    settings: CampaignSettings
    now_us: Callable[[], int]
    bounded: Callable[[Callable[..., Any]], Callable[..., Any]] = lambda fn: fn  # a read's deadline (reads.bounded)


CONTEXT = web.AppKey("campaigns", Context)
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _guarded(handler: Callable[[web.Request, Context, TokenInfo], Awaitable[web.StreamResponse]], kind: str) -> Handler:
    async def serve(request: web.Request) -> web.StreamResponse:
        context = request.app[CONTEXT]
        token = await context.authenticate(request)
        if token is None:
            return web.json_response(
                {"error": "unauthorized", "message": f"an {kind} token is required (Authorization: Bearer <token>)"},
                status=401,
            )
        if token.kind != kind:
            article = "an" if kind == "operator" else "the device's"
            error = "operator_token_required" if kind == "operator" else "forbidden"
            return web.json_response(
                {
                    "error": error,
                    "message": f"a {token.kind} token cannot do this; use {article} {kind} token",
                },
                status=403,
            )
        try:
            return await handler(request, context, token)
        except BadRequest as exc:
            return exc.response()

    return serve


def operator(handler: Callable[[web.Request, Context, TokenInfo], Awaitable[web.StreamResponse]]) -> Handler:
    return _guarded(handler, "operator")


def device(handler: Callable[[web.Request, Context, TokenInfo], Awaitable[web.StreamResponse]]) -> Handler:
    return _guarded(handler, "device")


def new_campaign(start: Start, token: TokenInfo, estimate: float, now_us: int) -> CampaignRow:
    configuration = canonical(start.configuration)
    return CampaignRow(
        id=str(uuid.uuid4()),
        name=start.name,
        created_us=now_us,
        created_by=token.subject,
        configuration=configuration,
        configuration_sha256=hashlib.sha256(configuration.encode()).hexdigest(),
        target=canonical(start.target),
        deadline_us=now_us + start.deadline_s * 1_000_000,
        callback_url=start.callback_url,
        state="pending",
        started_us=None,
        finished_us=None,
        estimated_duration_s=estimate,
    )


@operator
async def start_campaign(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    body = await read_body(request, MAX_BODY_BYTES)
    start = parse_start(body, context.settings)
    if start.callback_url is not None:
        await asyncio.get_running_loop().run_in_executor(
            None, check_callback_addresses, start.callback_url, context.settings
        )
    active = await context.read(context.store.active_campaigns)
    if active >= context.settings.max_active:  # early: no targeting work for a start that cannot be stored
        raise too_many(TooManyCampaigns(active, context.settings.max_active))
    devices, skipped = await context.read(
        context.bounded(select_devices), context.store, start.target, context.settings.max_devices
    )
    if not devices:
        raise BadRequest(400, "no_devices", "no known device matches the target", "$.target", skipped=skipped)
    row = new_campaign(start, token, estimate_duration(start.configuration), context.now_us())
    try:
        await context.call(
            lambda: context.store.add_campaign(row, devices, skipped, max_active=context.settings.max_active)
        )
    except TooManyCampaigns as exc:
        raise too_many(exc) from None
    log.info("campaign %s (%s) started by %s on %d devices", row.id, row.name, token.subject, len(devices))
    return web.json_response(
        {
            "benchmark_id": row.id,
            "status": "pending",
            "estimated_duration_seconds": row.estimated_duration_s,
            "devices": devices,
            "skipped": skipped,
        },
        status=201,
    )


async def _campaign(context: Context, request: web.Request) -> tuple[CampaignRow, list[JobRow]]:
    campaign = campaign_id(request.match_info["benchmark_id"])

    def both(store: Store) -> tuple[CampaignRow | None, list[JobRow]]:
        row = store.campaign(campaign)
        return row, store.campaign_jobs(campaign) if row is not None else []

    row, jobs = await context.read(context.bounded(both), context.store)
    if row is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    return row, jobs


@operator
async def campaign_status(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    row, jobs = await _campaign(context, request)
    return web.json_response(status_view(row, jobs))


@operator
async def list_campaigns(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    def build(store: Store) -> list[dict[str, Any]]:
        rows = store.campaigns(MAX_LISTED)
        counts = store.job_counts([r.id for r in rows])
        progress = store.job_progress([r.id for r in rows])
        return [summary(r, counts.get(r.id, {}), progress.get(r.id, 100.0)) for r in rows]

    return web.json_response(await context.read(context.bounded(build), context.store))


@operator
async def cancel_campaign(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    campaign = campaign_id(request.match_info["benchmark_id"])
    before = await context.call(context.store.set_campaign_state, campaign, "cancelled", context.now_us())
    if before is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    if before in CAMPAIGN_TERMINAL:
        raise BadRequest(409, "campaign_finished", f"benchmark {campaign} is {before} already", state=before)
    log.info("campaign %s cancelled by %s", campaign, token.subject)
    on_campaign_finished(request.app, campaign)
    return web.json_response({"benchmark_id": campaign, "status": "cancelled"})


@operator
async def campaign_results(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    campaign = campaign_id(request.match_info["benchmark_id"])
    answer = await context.read(context.bounded(results_view), context.store, campaign)
    if answer is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    return web.json_response(answer)


EXPORT_FORMATS = ("json", "csv", "parquet", "arrow", "protobuf")


@operator
async def campaign_export(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    campaign = campaign_id(request.match_info["benchmark_id"])
    fmt = request.rel_url.query.get("format", "json")
    answer = await context.read(context.bounded(export_rows), context.store, campaign, fmt)
    return web.Response(body=answer.body, headers={"Content-Type": answer.content_type, **answer.headers()})


def _own_device(request: web.Request, token: TokenInfo) -> str:
    """The path's device, which must be the token's own (403 ``wrong_device`` otherwise)."""
    device_id = request.match_info["device_id"]
    if device_id != token.subject:
        raise BadRequest(
            403, "wrong_device", f"this token belongs to device {token.subject!r}, not {device_id[:128]!r}"
        )
    return device_id


def _own_job(request: web.Request, token: TokenInfo) -> tuple[str, str]:
    device_id = _own_device(request, token)
    try:
        return device_id, campaign_id(request.match_info["benchmark_id"])
    except BadRequest:
        raise BadRequest(404, "no_such_job", "benchmark ids are UUIDs (as the acknowledgement listed them)") from None


@device
async def list_jobs(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    """``GET /api/v1/devices/{device}/jobs``: what an acknowledgement would list, for a device with nothing to
    upload (an idle device polls this every sync interval instead of waiting for its next batch)."""
    device_id = _own_device(request, token)
    jobs = await context.read(context.bounded(ack_jobs), context.store, device_id)
    return web.json_response({"jobs": jobs})


@device
async def get_job(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    device_id, campaign = _own_job(request, token)

    def build(store: Store) -> dict[str, Any] | None:
        job = store.device_job(device_id, campaign)
        row = store.campaign(campaign) if job is not None else None
        if job is None or row is None or job.state == "skipped":
            return None
        return {
            "benchmark_id": campaign,
            "configuration": json.loads(row.configuration),
            "configuration_sha256": row.configuration_sha256,
            "deadline": iso(row.deadline_us),
            "state": job.state,
        }

    answer = await context.read(context.bounded(build), context.store)
    if answer is None:
        raise BadRequest(404, "no_such_job", f"device {device_id} has no job in benchmark {campaign}")
    return web.json_response(answer)


@dataclass(frozen=True)
class Report:
    state: str
    progress_percent: float | None
    reason: str | None
    levels_done: int | None
    levels_total: int | None


def parse_report(body: Any) -> Report:
    if type(body) is not dict:
        raise bad("$", "an object with state (and progress_percent, reason, levels_done, levels_total)")
    unknown = sorted(set(body) - set(JOB_KEYS))
    if unknown:
        raise bad(f"$.{unknown[0][:64]}", "an unknown key; allowed: " + ", ".join(JOB_KEYS))
    state = body.get("state")
    if state not in DEVICE_STATES:
        shown = state if type(state) is str and state in JOB_STATES else "this value"
        raise bad("$.state", f"{shown!s} is not the device's to set; one of " + ", ".join(DEVICE_STATES))
    progress = body.get("progress_percent")
    if progress is not None and (
        type(progress) not in (int, float) or not math.isfinite(progress) or not 0 <= progress <= 100
    ):
        raise bad("$.progress_percent", "a number from 0 to 100")
    reason = body.get("reason")
    if reason is not None:
        if type(reason) is not str or len(reason) > MAX_REASON_CHARS:
            raise bad("$.reason", f"a string of at most {MAX_REASON_CHARS} characters")
        reason = clean_label(reason, MAX_REASON_CHARS)[0]
    done = body.get("levels_done")
    if done is not None and (type(done) is not int or not 0 <= done <= 1_000_000):
        raise bad("$.levels_done", "an integer ≥ 0")
    total = body.get("levels_total")
    if total is not None and (type(total) is not int or not 1 <= total <= 1_000_000):
        raise bad("$.levels_total", "an integer ≥ 1")
    if done is not None and total is not None and done > total:
        raise bad("$.levels_done", f"at most levels_total ({total})")
    return Report(state, None if progress is None else float(progress), reason, done, total)


def suite_levels(store: Store, campaign: str) -> int | None:
    """How many levels the campaign's suite runs on one device (models × workloads × levels), or None when there is
    no such campaign."""
    row = store.campaign(campaign)
    if row is None:
        return None
    try:
        return len(level_keys(json.loads(row.configuration)))
    except (SuiteError, ValueError):
        return None


@device
async def post_job(request: web.Request, context: Context, token: TokenInfo) -> web.Response:
    device_id, campaign = _own_job(request, token)
    report = parse_report(await read_body(request, MAX_JOB_BODY_BYTES))
    levels = await context.read(context.bounded(suite_levels), context.store, campaign)
    if levels is not None:
        if report.levels_total is not None and report.levels_total != levels:
            raise BadRequest(
                400,
                "bad_request",
                f"levels_total {report.levels_total}: the suite runs {levels} levels",
                "$.levels_total",
            )
        if report.levels_done is not None and report.levels_done > levels:
            raise BadRequest(400, "bad_request", f"levels_done {report.levels_done} > {levels} levels", "$.levels_done")
        if report.state == "succeeded" and report.levels_done != levels:
            raise BadRequest(
                400,
                "bad_request",
                f"succeeded needs every level done: levels_done {report.levels_done} of {levels}",
                "$.levels_done",
            )
    update = await context.call(
        lambda: context.store.update_job(
            campaign,
            device_id,
            report.state,
            reason=report.reason,
            progress_percent=report.progress_percent,
            levels_done=report.levels_done,
            levels_total=report.levels_total,
            now_us=context.now_us(),
        )
    )
    if update.before is None or update.before == "skipped":
        raise BadRequest(404, "no_such_job", f"device {device_id} has no job in benchmark {campaign}")
    if update.before not in JOB_ACTIVE:
        raise BadRequest(409, "job_finished", f"the job is {update.before} already: final", state=update.before)
    if update.campaign_finished is not None:
        on_campaign_finished(request.app, campaign)
    return web.json_response({"state": update.after})


# -- the same operations for the command line (blocking, on the caller's thread) -------------------------------
def start(store: Store, body: Any, settings: CampaignSettings, subject: str, now: int) -> dict[str, Any]:
    """What ``POST /api/v1/benchmark/start`` does, for ``lens-aggregator campaign start``: BadRequest on refusal."""
    request = parse_start(body, settings)
    if request.callback_url is not None:
        check_callback_addresses(request.callback_url, settings)
    devices, skipped = select_devices(store, request.target, settings.max_devices)
    if not devices:
        raise BadRequest(400, "no_devices", "no known device matches the target", "$.target", skipped=skipped)
    row = new_campaign(
        request, TokenInfo("", subject, "operator", now, None, None), estimate_duration(request.configuration), now
    )
    try:
        store.add_campaign(row, devices, skipped, max_active=settings.max_active)
    except TooManyCampaigns as exc:
        raise too_many(exc) from None
    return {
        "benchmark_id": row.id,
        "status": "pending",
        "estimated_duration_seconds": row.estimated_duration_s,
        "devices": devices,
        "skipped": skipped,
    }


def status(store: Store, text: str) -> dict[str, Any]:
    campaign = campaign_id(text)
    row = store.campaign(campaign)
    if row is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    return status_view(row, store.campaign_jobs(campaign))


def listing(store: Store, limit: int = MAX_LISTED) -> list[dict[str, Any]]:
    rows = store.campaigns(limit)
    counts = store.job_counts([r.id for r in rows])
    progress = store.job_progress([r.id for r in rows])
    return [summary(r, counts.get(r.id, {}), progress.get(r.id, 100.0)) for r in rows]


def cancel(store: Store, text: str, now: int) -> dict[str, Any]:
    campaign = campaign_id(text)
    before = store.set_campaign_state(campaign, "cancelled", now)
    if before is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    if before in CAMPAIGN_TERMINAL:
        raise BadRequest(409, "campaign_finished", f"benchmark {campaign} is {before} already", state=before)
    return {"benchmark_id": campaign, "status": "cancelled"}


def results(store: Store, text: str) -> dict[str, Any]:
    campaign = campaign_id(text)
    answer = results_view(store, campaign)
    if answer is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    return answer


def export_rows(store: Store, text: str, fmt: str) -> Export:
    """The campaign's export in ``fmt``, with what it left out (``Export.notes``: skipped documents, dropped rows)."""
    campaign = campaign_id(text)
    if fmt not in EXPORT_FORMATS:
        raise BadRequest(400, "bad_request", f"format={fmt[:40]!r}: one of " + ", ".join(EXPORT_FORMATS), "format")
    if store.campaign(campaign) is None:
        raise BadRequest(404, "no_such_campaign", f"no benchmark {campaign}")
    levels, classes = campaign_levels_with_class(store, campaign)
    try:
        answer = export_answer(levels, classes, fmt, benchmark_id=campaign)
    except (ArrowUnavailable, LookupError):
        # 501, as the measurements export answers (api.FormatUnavailable): the request is valid, this server
        # lacks the format's optional runtime
        extra = ("protobuf", "the protobuf runtime") if fmt == "protobuf" else ("arrow", "pyarrow")
        raise BadRequest(
            501,
            "format_unavailable",
            f"format={fmt} needs {extra[1]}, which this aggregator does not have: pip install "
            f"'llm-latency-lens[{extra[0]}]'",
            "format",
        ) from None
    return answer


async def check_deadlines(app: web.Application) -> list[tuple[str, str]]:
    """One tick of the campaign task: at most 1,000 late jobs ended (the next tick takes the rest), then the due
    completion callbacks sent."""
    context = app[CONTEXT]
    finished: list[tuple[str, str]] = await context.call(context.store.expire_jobs, context.now_us(), 1000)
    for campaign, state in finished:
        log.info("campaign %s %s at its deadline", campaign, state)
        on_campaign_finished(app, campaign)
    start_deliveries(app)
    if GAUGES in app:
        totals, active = await context.read(gauge_inputs, context.store, context.settings.max_active)
        app[GAUGES](active, totals, max_active=context.settings.max_active)
    return finished


def gauge_inputs(store: Store, max_active: int) -> tuple[dict[str, int], list[dict[str, Any]]]:
    """What the campaign gauges show (on a read thread): campaigns per state, and the unfinished ones."""
    rows = store.unfinished_campaigns(max_active)
    counts = store.job_counts([r.id for r in rows])
    progress = store.job_progress([r.id for r in rows])
    return store.campaign_state_counts(), [summary(r, counts.get(r.id, {}), progress.get(r.id, 100.0)) for r in rows]


# the campaign gauges' setter (FleetMetrics.campaigns), when the app exports metrics
GaugeSetter = Callable[..., None]
GAUGES: web.AppKey[GaugeSetter] = web.AppKey("campaign_gauges")


def add_routes(app: web.Application) -> None:
    app.router.add_post("/api/v1/benchmark/start", start_campaign)
    app.router.add_get("/api/v1/benchmark", list_campaigns)
    app.router.add_get("/api/v1/benchmark/{benchmark_id}/status", campaign_status)
    app.router.add_get("/api/v1/benchmark/{benchmark_id}/results", campaign_results)
    app.router.add_get("/api/v1/benchmark/{benchmark_id}/export", campaign_export)
    app.router.add_post("/api/v1/benchmark/{benchmark_id}/cancel", cancel_campaign)
    app.router.add_get("/api/v1/devices/{device_id}/jobs", list_jobs)
    app.router.add_get("/api/v1/devices/{device_id}/jobs/{benchmark_id}", get_job)
    app.router.add_post("/api/v1/devices/{device_id}/jobs/{benchmark_id}", post_job)


def now_us() -> int:
    return time.time_ns() // 1000
