"""Benchmark campaigns on the device (docs/campaigns.md, "On the device").

The aggregator pushes a suite to a set of devices; a device learns of its jobs from each ingest acknowledgement
(``jobs``), fetches a new job's configuration (``GET /api/v1/devices/{device}/jobs/{id}``), checks it, keeps it in
``<data_dir>/campaigns/<id>.json`` and runs it level by level between its scheduled workloads, reporting progress
(``POST`` the same path). Everything the server sends is hostile until checked here: the ``jobs`` list (type,
length, ids, states, sizes), the job document (its canonical JSON must hash to the ack's ``configuration_sha256``)
and the suite itself (:func:`agent.suite.parse_suite` with this device's campaign policy — the ``[suite]`` limits
and directories, never a directory of the pushed document's own). A refused job is reported ``failed`` with the
refusal's text and nothing of it runs.

This module holds the pure parts (ack parsing, the job files, the job document checks, the aggregator client);
:class:`agent.service.AgentService` drives them through its gates and measuring lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from lens_core import wire

from .config import AgentConfig

if TYPE_CHECKING:  # suites (agent.suite: prompts, models, limits) load when a job is parsed
    from .suite import Suite

log = logging.getLogger("agent.campaigns")

MAX_JOBS_IN_ACK = 8  # the protocol's bound: a longer list is refused whole
MAX_JOB_FILES = 8  # job files kept; the oldest terminal ones are pruned
MAX_ATTEMPTS = 3  # a job interrupted (crash, reboot) this many times is reported failed
MAX_JOB_ANSWER_BYTES = 2 * 1024 * 1024  # a job document: the configuration (≤ 1 MiB) and a few fields
MAX_REASON_CHARS = 300
JOB_STATES_IN_ACK = ("queued", "running", "cancelled")
TERMINAL = ("succeeded", "failed", "cancelled", "timed_out", "skipped")
LOCAL_STATES = ("queued", "running", "succeeded", "failed", "cancelled")
CAMPAIGN_LEVEL_KIND = "campaign_level"
_UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
MAX_DEADLINE_CHARS = 64


class CampaignError(Exception):
    """A job or an answer refused; the message names the field and what is allowed."""


@dataclass(frozen=True)
class JobNotice:
    """One item of an acknowledgement's ``jobs``, checked."""

    benchmark_id: str
    state: str
    deadline_us: int
    deadline: str
    configuration_sha256: str


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "…"


def is_uuid(value: object) -> bool:
    return type(value) is str and _UUID.match(value) is not None


def parse_deadline(value: object) -> int:
    """An ISO 8601 time with a zone (``…Z`` or ``+00:00``) → Unix µs; CampaignError otherwise."""
    if type(value) is not str or not 0 < len(value) <= MAX_DEADLINE_CHARS:
        raise CampaignError(f"deadline {_short(value)}: allowed: an ISO 8601 time, at most {MAX_DEADLINE_CHARS} chars")
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00") if value.endswith("Z") else value)
    except ValueError:
        raise CampaignError(f"deadline {_short(value)}: allowed: an ISO 8601 time") from None
    if at.tzinfo is None:
        raise CampaignError(f"deadline {_short(value)}: allowed: an ISO 8601 time with a zone")
    return int(at.timestamp() * 1_000_000)


def parse_jobs(payload: dict[str, Any]) -> tuple[list[JobNotice], list[str]]:
    """The ack's ``jobs``, each checked: (notices, problems). A list longer than the protocol's 8 is refused whole
    (one problem); a bad item is left out with a problem naming it."""
    if "jobs" not in payload:
        return [], []
    raw = payload["jobs"]
    if type(raw) is not list:
        return [], [f"jobs is {type(raw).__name__}; allowed: a list"]
    if len(raw) > MAX_JOBS_IN_ACK:
        return [], [f"jobs holds {len(raw)} items; allowed: at most {MAX_JOBS_IN_ACK} (all ignored)"]
    notices: list[JobNotice] = []
    problems: list[str] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"jobs[{i}]"
        if type(item) is not dict:
            problems.append(f"{where} is {type(item).__name__}; allowed: an object")
            continue
        bid, state, sha = item.get("benchmark_id"), item.get("state"), item.get("configuration_sha256")
        if not is_uuid(bid):
            problems.append(f"{where}.benchmark_id {_short(bid)}: allowed: a UUID (lower case)")
            continue
        assert isinstance(bid, str)
        if bid in seen:
            problems.append(f"{where}.benchmark_id {bid}: given twice")
            continue
        if state not in JOB_STATES_IN_ACK:
            problems.append(f"{where}.state {_short(state)}: allowed: {', '.join(JOB_STATES_IN_ACK)}")
            continue
        if type(sha) is not str or _SHA256.match(sha) is None:
            problems.append(f"{where}.configuration_sha256 {_short(sha)}: allowed: 64 lower-case hex digits")
            continue
        try:
            deadline_us = parse_deadline(item.get("deadline"))
        except CampaignError as exc:
            problems.append(f"{where}.{exc}")
            continue
        seen.add(bid)
        notices.append(JobNotice(bid, str(state), deadline_us, str(item["deadline"]), sha))
    return notices, problems


def campaign_policy(config: AgentConfig) -> Any:
    """The policy a pushed suite is checked and run against: the ``[suite]`` table and the data directory's
    ``datasets/`` and ``credentials/`` — no directory of the document's own (a pushed suite has none) — and the
    endpoints it may contact: only the origins in ``[suite] endpoints`` (none: local models only)."""
    from .bench.suite_run import suite_policy

    allowed = tuple(config.values["suite"]["endpoints"])
    return dataclasses.replace(suite_policy(config), endpoints=allowed)


def check_job_document(payload: Any, notice: JobNotice, config: AgentConfig) -> tuple[dict[str, Any], Suite]:
    """The answer to GET job, checked: (configuration, parsed suite). CampaignError for a document that is not the
    job's (shape, id, hash); SuiteError for a configuration this device refuses."""
    if type(payload) is not dict:
        raise CampaignError(f"the job answer is {type(payload).__name__}; allowed: an object")
    if payload.get("benchmark_id") != notice.benchmark_id:
        raise CampaignError(f"the job answer's benchmark_id {_short(payload.get('benchmark_id'))} is not this job's")
    document = payload.get("configuration")
    if type(document) is not dict:
        raise CampaignError(f"the job answer's configuration is {type(document).__name__}; allowed: an object")
    try:
        from lens_core.suite import canonical_json  # suites load when a job arrives

        digest = hashlib.sha256(canonical_json(document)).hexdigest()
    except (ValueError, TypeError) as exc:
        raise CampaignError(f"the job's configuration is not plain JSON data ({exc})") from None
    if digest != notice.configuration_sha256:
        raise CampaignError(
            f"the job's configuration hashes to {digest}, the acknowledgement announced "
            f"{notice.configuration_sha256}: refused"
        )
    return document, parse_job_suite(document, notice.benchmark_id, config)


def parse_job_suite(document: Any, benchmark_id: str, config: AgentConfig) -> Suite:
    """A pushed suite, checked with the campaign policy (no directory of its own: relative paths are refused)."""
    from .suite import parse_suite

    return parse_suite(document, source=f"campaign {benchmark_id}", base_dir=None, policy=campaign_policy(config))


def level_keys(suite: Suite) -> list[tuple[str, str, str]]:
    """Every (model, workload, level label) the suite runs, in run order."""
    from .bench.suite_run import levels_of

    return [(m.name, w.name, lv.label) for m in suite.models for w in suite.workloads for lv in levels_of(w)]


def clean_reason(text: str) -> str:
    text = _CONTROL.sub(" ", text)
    return text if len(text) <= MAX_REASON_CHARS else text[: MAX_REASON_CHARS - 1] + "…"


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds").replace("+00:00", "Z")


# -- job files -----------------------------------------------------------------------------------------------------
class JobFiles:
    """``<data_dir>/campaigns/<id>.json``, one per job, written atomically; at most :data:`MAX_JOB_FILES` kept."""

    def __init__(self, data_dir: Path) -> None:
        self.dir = Path(data_dir) / "campaigns"

    def path(self, benchmark_id: str) -> Path:
        if not is_uuid(benchmark_id):
            raise CampaignError(f"benchmark_id {_short(benchmark_id)}: allowed: a UUID")
        return self.dir / f"{benchmark_id}.json"

    def load(self, benchmark_id: str) -> dict[str, Any] | None:
        try:
            data = json.loads(self.path(benchmark_id).read_text())
        except FileNotFoundError:
            return None
        except (OSError, ValueError) as exc:
            log.warning("campaign job file %s unreadable: %s", self.path(benchmark_id), exc)
            return None
        return data if type(data) is dict and data.get("state") in LOCAL_STATES else None

    def all(self) -> list[dict[str, Any]]:
        """Every readable job file, oldest first."""
        out = []
        try:
            names = sorted(self.dir.glob("*.json"))
        except OSError:
            return []
        for path in names:
            job = self.load(path.stem) if is_uuid(path.stem) else None
            if job is not None:
                out.append(job)
        return sorted(out, key=lambda j: str(j.get("created_at", "")))

    def save(self, job: dict[str, Any]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        job["updated_at"] = now_iso()
        path = self.path(job["benchmark_id"])
        tmp = path.with_name(path.name + ".tmp")
        with open(tmp, "w") as handle:
            json.dump(job, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)

    def room_for_one(self) -> bool:
        """Prune the oldest terminal job files so one more fits; False when :data:`MAX_JOB_FILES` are all live."""
        jobs = self.all()
        terminal = [j for j in jobs if j["state"] in TERMINAL and j.get("reported")]
        while len(jobs) >= MAX_JOB_FILES and terminal:
            old = terminal.pop(0)
            jobs.remove(old)
            with contextlib.suppress(OSError):
                self.path(old["benchmark_id"]).unlink()
        return len(jobs) < MAX_JOB_FILES


def new_job(notice: JobNotice, document: dict[str, Any], levels_total: int) -> dict[str, Any]:
    return {
        "benchmark_id": notice.benchmark_id,
        "state": "queued",
        "reason": None,
        "deadline": notice.deadline,
        "deadline_us": notice.deadline_us,
        "configuration_sha256": notice.configuration_sha256,
        "configuration": document,
        "levels_total": levels_total,
        "levels_done": [],  # [{"model", "workload", "level", "level_run"}]
        "attempts": 0,
        "reported": False,  # the aggregator has the job's current state
        "created_at": now_iso(),
    }


def refused_job(notice: JobNotice, reason: str) -> dict[str, Any]:
    return {
        "benchmark_id": notice.benchmark_id,
        "state": "failed",
        "reason": clean_reason(reason),
        "deadline": notice.deadline,
        "deadline_us": notice.deadline_us,
        "configuration_sha256": notice.configuration_sha256,
        "configuration": None,
        "levels_total": None,
        "levels_done": [],
        "attempts": 0,
        "reported": False,
        "created_at": now_iso(),
    }


def progress_body(job: dict[str, Any]) -> dict[str, Any]:
    total = job.get("levels_total") or 1
    done = len(job.get("levels_done") or [])
    body: dict[str, Any] = {
        "state": job["state"] if job["state"] != "queued" else "running",
        "progress_percent": round(min(100.0, 100.0 * done / total), 2),
        "levels_done": done,
        "levels_total": total,
    }
    if job.get("reason"):
        body["reason"] = clean_reason(str(job["reason"]))
    return body


def status_summary(data_dir: Path) -> list[dict[str, Any]]:
    """What ``lens-agent status`` shows of the campaign jobs: id, state, progress, reason."""
    out = []
    for job in JobFiles(data_dir).all():
        total = job.get("levels_total")
        done = len(job.get("levels_done") or [])
        out.append(
            {
                "benchmark_id": job.get("benchmark_id"),
                "state": job.get("state"),
                "progress_percent": round(100.0 * done / total, 1) if total else None,
                "levels_done": done,
                "levels_total": total,
                "attempts": job.get("attempts"),
                "reason": job.get("reason"),
                "deadline": job.get("deadline"),
                "updated_at": job.get("updated_at"),
            }
        )
    return out


# -- the aggregator's job endpoints --------------------------------------------------------------------------------
class JobClient:
    """GET a job, POST its progress: with the uploader's HTTP client (its TLS settings, deadline and keep-alive
    connection) and the device token."""

    def __init__(self, uploader: Any) -> None:
        self.uploader = uploader

    def _url(self, benchmark_id: str) -> str:
        s = self.uploader.settings
        jobs = f"{s.url}/api/v1/devices/{quote(s.device_id, safe='')}/jobs"
        return f"{jobs}/{benchmark_id}" if benchmark_id else jobs

    def _headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.uploader.settings.token}"}

    async def _call(self, method: str, benchmark_id: str, body: dict[str, Any] | None) -> tuple[int, Any]:
        client = await self.uploader._client()
        headers = self._headers()
        data: bytes | None = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        try:
            answer = await client.request(
                method, self._url(benchmark_id), body=data, headers=headers, max_body=MAX_JOB_ANSWER_BYTES
            )
        except (asyncio.TimeoutError, TimeoutError, OSError) as exc:
            raise CampaignError(f"{method} job {benchmark_id}: {type(exc).__name__}: {str(exc)[:200]}") from None
        status, kind, oversized, data = answer.status, answer.content_type, answer.truncated, answer.body
        if oversized:
            raise CampaignError(f"{method} job {benchmark_id}: HTTP {status}, answer over {MAX_JOB_ANSWER_BYTES} bytes")
        if kind != "application/json" or wire.json_depth_exceeds(data, 64):
            raise CampaignError(f"{method} job {benchmark_id}: HTTP {status} {kind or 'no content type'}, not JSON")
        try:
            return status, json.loads(data)
        except ValueError:
            raise CampaignError(f"{method} job {benchmark_id}: HTTP {status}, not JSON") from None

    async def poll(self) -> Any:
        """GET the device's job list (what an acknowledgement carries): for a device with nothing to upload."""
        status, payload = await self._call("GET", "", None)
        if status != 200:
            error = payload.get("error") if type(payload) is dict else None
            raise CampaignError(f"GET jobs: HTTP {status} ({_short(error)})")
        return payload

    async def fetch(self, benchmark_id: str) -> Any:
        status, payload = await self._call("GET", benchmark_id, None)
        if status != 200:
            error = payload.get("error") if type(payload) is dict else None
            raise CampaignError(f"GET job {benchmark_id}: HTTP {status} ({_short(error)})")
        return payload

    async def report(self, job: dict[str, Any]) -> str | None:
        """POST the job's progress; the server's view of its state (``cancelled``: stop), or None when unknown.
        A 409 ``job_finished`` answers the state the server holds."""
        status, payload = await self._call("POST", job["benchmark_id"], progress_body(job))
        state = payload.get("state") if type(payload) is dict else None
        if status in (200, 409) and state in (*LOCAL_STATES, "timed_out", "skipped"):
            return str(state)
        raise CampaignError(f"POST job {job['benchmark_id']}: HTTP {status} {_short(payload)[:120]}")


def level_record(
    job: dict[str, Any],
    key: tuple[str, str, str],
    level_run: str,
    document: dict[str, Any],
    *,
    device_id: str,
    model_sha256: str | None = None,
) -> Any:
    """The ``campaign_level`` record of a completed level (ok, no tokens): its results document in
    ``ext.results``."""
    from .measurement import Measurement

    model, workload, level = key
    record = Measurement(
        run_id=str(uuid.uuid4()),
        device_id=device_id,
        model_name=model,
        model_sha256=model_sha256,
        kind=CAMPAIGN_LEVEL_KIND,
        ok=True,
        output_tokens=0,
    )
    record.ext["campaign"] = {
        "id": job["benchmark_id"],
        "level_run": level_run,
        "model": model,
        "workload": workload,
        "level": level,
        "levels_done": len(job["levels_done"]),
        "levels_total": job["levels_total"],
    }
    record.ext["results"] = document
    return record


def deadline_passed(job: dict[str, Any]) -> bool:
    deadline = job.get("deadline_us")
    return isinstance(deadline, int) and time.time() * 1_000_000 >= deadline


__all__ = [
    "CampaignError",
    "JobClient",
    "JobFiles",
    "JobNotice",
    "check_job_document",
    "level_keys",
    "parse_jobs",
    "status_summary",
]
