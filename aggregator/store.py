"""Aggregator storage: an interface and its embedded SQLite implementation.

Every record is stored once per device, keyed by (device id, 16-byte record id) (``INSERT OR IGNORE``): a retried
batch never double-counts, and a device that learnt another device's record id cannot have its own record taken for
a duplicate of it (schema 6; before, the key was the record id alone). Each record's bytes are kept as received
beside the columns queries need, and the aggregator's own ``received_us``, so skewed device clocks are visible. A
whole batch is stored in one transaction and only then acknowledged. Tokens are stored as sha256 hashes only.

Regressions found by the change-point search are kept as lasting objects in ``regressions`` (schema 9): one row per
regression or improvement, with its state (open, acknowledged, resolved) and its evidence; see
``aggregator.regressions.Watch`` and docs/fleet.md "Regressions".

``schema_version`` lives in ``meta``; migrations run forward on open — except a read-only open, which refuses a
database of another version (``lens-aggregator migrate`` brings it forward).
"""

from __future__ import annotations

import abc
import hashlib
import json
import math
import secrets
import sqlite3
import threading
import time
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, NamedTuple, TypeVar

import sqlite_utils

from lens_core.record_schema import MAX_NAME_CHARS, contended, guardrail_columns
from lens_core.settings import settings_key
from lens_core.sqlite_readonly import NotUsable, check_layout, connect_readonly, layout
from lens_core.sqlite_schema import migrate_forward

SCHEMA_VERSION = 10
TOKEN_PREFIX = "lens_"
T = TypeVar("T")
TOKEN_KINDS = ("device", "read", "operator")  # operator: starts, reads and cancels benchmark campaigns


class RecordRow(NamedTuple):
    """The columns of one record, plus its bytes as received (a tuple: ingest builds thousands per second)."""

    id: bytes
    device_id: str
    run_id: str
    kind: str
    started_us: int
    ok: bool
    strategy: str | None
    model_name: str | None
    engine: str | None
    error_type: str | None
    input_tokens: int | None
    output_tokens: int | None
    ttft_us: int | None
    tpot_us: int | None
    e2e_us: int | None
    j_per_token: float | None  # joules per output token, from the record's ext.energy (see energy_per_token)
    power_w: float | None  # the request's average power: ext.energy.joules_total ÷ e2e (see average_power)
    settings: str | None  # the engine settings it ran under: lens_core.settings.settings_key of ext.settings
    contended: int  # 1 when ext.interference says the request was contended (lens_core.record_schema.contended)
    codec: str
    body: bytes
    # the record's ext.guardrails (lens_core.record_schema.guardrail_columns; schema 10): None without guardrails
    guardrail_set: str | None = None
    guardrail_outcome: str | None = None
    guardrail_ms: float | None = None  # the stages' overhead (overhead_ms)
    guardrail_input_ms: float | None = None
    guardrail_threat_ms: float | None = None
    guardrail_output_ms: float | None = None
    guardrail_impact: float | None = None  # impact_percent: overhead ÷ the guarded request's total × 100


MAX_J_PER_TOKEN = 1e6  # beyond any device: a larger figure is a broken sensor, kept in the body but not as a column


def energy_per_token(record: dict[str, Any]) -> float | None:
    """``ext.energy.j_per_output_token`` of a decoded record when it is a finite number from 0 to
    :data:`MAX_J_PER_TOKEN`, else None: the value the fleet's J/token figures and the change-point search read from
    a column instead of decoding every record's body."""
    ext = record.get("ext")
    energy = ext.get("energy") if type(ext) is dict else None
    value: Any = energy.get("j_per_output_token") if type(energy) is dict else None
    if type(value) in (int, float) and math.isfinite(value) and 0 <= value <= MAX_J_PER_TOKEN:
        return float(value)
    return None


class SyncRow(NamedTuple):
    """One batch as the device reported it: what the device page's sync history and backlog chart draw."""

    device_id: str
    received_us: int
    batch_id: str
    records: int
    accepted: int
    backlog: int | None
    dropped_total: int | None
    quarantined_total: int | None


def sync_row(
    device_id: str, batch_id: str, counters: dict[str, int], records: int, accepted: int, received_us: int
) -> tuple[Any, ...]:
    """The values of a batch's row in ``syncs`` (column order of ``SYNC_COLUMNS``)."""
    return (
        device_id,
        received_us,
        batch_id,
        records,
        accepted,
        counters.get("pending_records"),
        counters.get("dropped_total"),
        counters.get("quarantined_total"),
    )


MAX_POWER_W = 1e5


def average_power(record: dict[str, Any]) -> float | None:
    """The request's average power in watts — ``ext.energy.joules_total`` over its ``e2e_us`` — when both are
    finite, positive and the result at most :data:`MAX_POWER_W`; else None."""
    ext = record.get("ext")
    energy = ext.get("energy") if type(ext) is dict else None
    joules: Any = energy.get("joules_total") if type(energy) is dict else None
    e2e: Any = record.get("e2e_us")
    if type(joules) not in (int, float) or type(e2e) is not int or e2e <= 0 or not math.isfinite(joules):
        return None
    watts = joules / (e2e / 1e6)
    return float(watts) if 0 <= watts <= MAX_POWER_W else None


@dataclass(frozen=True)
class IngestResult:
    accepted: int
    duplicates: int
    new: tuple[int, ...] = ()  # indices (in the batch) of the records stored now, not before


@dataclass(frozen=True)
class TokenInfo:
    token_id: str  # the first 12 hex digits of the hash: safe to show
    subject: str  # device id, or the name of a read token
    kind: str  # "device", "read" or "operator"
    created_us: int
    revoked_us: int | None
    expires_us: int | None


CAMPAIGN_STATES = ("pending", "running", "completed", "failed", "cancelled")
CAMPAIGN_TERMINAL = ("completed", "failed", "cancelled")
JOB_STATES = ("queued", "running", "succeeded", "failed", "timed_out", "cancelled", "skipped")
JOB_ACTIVE = ("queued", "running")


class CampaignRow(NamedTuple):
    """One benchmark campaign (docs/campaigns.md): its suite document as canonical JSON and its targeting snapshot."""

    id: str  # uuid4
    name: str
    created_us: int
    created_by: str  # the operator token's subject
    configuration: str  # the suite document: canonical JSON (sort_keys, compact)
    configuration_sha256: str
    target: str  # the targeting request as JSON
    deadline_us: int
    callback_url: str | None
    state: str  # CAMPAIGN_STATES
    started_us: int | None
    finished_us: int | None
    estimated_duration_s: float
    callback_state: str | None = None  # pending | delivered | failed
    callback_attempts: int = 0
    callback_next_us: int | None = None
    callback_error: str | None = None


class JobRow(NamedTuple):
    """One device's part in a campaign. ``deadline_us`` and ``configuration_sha256`` are the campaign's (joined)."""

    campaign_id: str
    device_id: str
    state: str  # JOB_STATES
    reason: str | None
    progress_percent: float
    levels_done: int
    levels_total: int | None
    updated_us: int
    started_us: int | None
    finished_us: int | None
    deadline_us: int | None = None
    configuration_sha256: str | None = None


class JobUpdate(NamedTuple):
    """What ``update_job`` did: the job's state before (None: no such job) and after, and the campaign's state
    when this update finished it (else None)."""

    before: str | None
    after: str
    campaign_finished: str | None = None


CAMPAIGN_COLUMNS = CampaignRow._fields
JOB_COLUMNS = JobRow._fields[:10]
_JOB_SELECT = (
    "SELECT j.campaign_id, j.device_id, j.state, j.reason, j.progress_percent, j.levels_done, j.levels_total, "
    "j.updated_us, j.started_us, j.finished_us, c.deadline_us, c.configuration_sha256, c.state "
    "FROM campaign_jobs j JOIN campaigns c ON c.id = j.campaign_id"
)


def _job(row: Sequence[Any], *, effective: bool = False) -> JobRow:
    """A JobRow from a ``_JOB_SELECT`` row; ``effective``: a running job of a cancelled campaign reads
    ``cancelled`` (what the device is told)."""
    job = JobRow(*row[:12])
    if effective and job.state == "running" and row[12] == "cancelled":
        job = job._replace(state="cancelled")
    return job


Run = Callable[[str, Sequence[Any]], list[Any]]


class TooManyCampaigns(Exception):
    """``campaigns.max_active`` campaigns are not finished yet."""

    def __init__(self, active: int, limit: int) -> None:
        self.active, self.limit = active, limit
        super().__init__(f"{active} campaigns are not finished; at most {limit} (campaigns.max_active)")


class CampaignSQL:
    """The campaign statements of both stores, written once: ``run(sql, params)`` executes one statement (``?``
    placeholders) inside the caller's transaction and returns its rows (empty for writes)."""

    @staticmethod
    def add(
        run: Run, row: CampaignRow, device_ids: Sequence[str], skipped: dict[str, str], max_active: int | None
    ) -> None:
        if max_active is not None:  # counted in the inserting transaction: concurrent starts cannot overshoot
            active = int(run("SELECT COUNT(*) FROM campaigns WHERE state IN ('pending', 'running')", [])[0][0])
            if active >= max_active:
                raise TooManyCampaigns(active, max_active)
        marks = ", ".join("?" for _ in CAMPAIGN_COLUMNS)
        run(f"INSERT INTO campaigns ({', '.join(CAMPAIGN_COLUMNS)}) VALUES ({marks})", list(row))
        insert = (
            "INSERT INTO campaign_jobs (campaign_id, device_id, state, reason, progress_percent, levels_done, "
            "levels_total, updated_us, started_us, finished_us) VALUES (?, ?, ?, ?, 0, 0, NULL, ?, NULL, ?)"
        )
        for device in device_ids:
            run(insert, [row.id, device, "queued", None, row.created_us, None])
        for device, reason in skipped.items():
            run(insert, [row.id, device, "skipped", reason, row.created_us, row.created_us])

    @staticmethod
    def update_job(
        run: Run,
        campaign_id: str,
        device_id: str,
        state: str,
        *,
        reason: str | None,
        progress_percent: float | None,
        levels_done: int | None,
        levels_total: int | None,
        now_us: int,
    ) -> JobUpdate:
        found = run(
            "SELECT j.state, c.state FROM campaign_jobs j JOIN campaigns c ON c.id = j.campaign_id "
            "WHERE j.campaign_id = ? AND j.device_id = ?",
            [campaign_id, device_id],
        )
        if not found:
            return JobUpdate(None, "")
        before, campaign_state = found[0]
        if before not in JOB_ACTIVE:
            return JobUpdate(before, before)
        after = "cancelled" if campaign_state == "cancelled" else state
        terminal = after not in JOB_ACTIVE
        run(
            "UPDATE campaign_jobs SET state = ?, reason = COALESCE(?, reason), "
            "progress_percent = COALESCE(?, progress_percent), levels_done = COALESCE(?, levels_done), "
            "levels_total = COALESCE(?, levels_total), updated_us = ?, "
            "started_us = COALESCE(started_us, ?), finished_us = ? WHERE campaign_id = ? AND device_id = ?",
            [
                after,
                reason,
                100.0 if after == "succeeded" else progress_percent,
                levels_done,
                levels_total,
                now_us,
                now_us if after == "running" else None,
                now_us if terminal else None,
                campaign_id,
                device_id,
            ],
        )
        if campaign_state == "pending":  # its first report: the campaign runs (and may finish just below)
            run(
                "UPDATE campaigns SET state = 'running', started_us = COALESCE(started_us, ?) WHERE id = ?",
                [now_us, campaign_id],
            )
        finished = CampaignSQL.finish_if_done(run, campaign_id, now_us) if terminal else None
        return JobUpdate(before, after, finished)

    @staticmethod
    def finish_if_done(run: Run, campaign_id: str, now_us: int) -> str | None:
        """Completed (a job succeeded) or failed (none did) once every job is terminal; the state set, or None."""
        rows = run(
            "SELECT c.state, SUM(CASE WHEN j.state IN ('queued', 'running') THEN 1 ELSE 0 END), "
            "SUM(CASE WHEN j.state = 'succeeded' THEN 1 ELSE 0 END) FROM campaigns c "
            "LEFT JOIN campaign_jobs j ON j.campaign_id = c.id WHERE c.id = ? GROUP BY c.state",
            [campaign_id],
        )
        if not rows or rows[0][0] in CAMPAIGN_TERMINAL or (rows[0][1] or 0) > 0:
            return None
        state = "completed" if (rows[0][2] or 0) > 0 else "failed"
        run(
            "UPDATE campaigns SET state = ?, finished_us = ?, callback_state = CASE WHEN callback_url IS NULL "
            "THEN NULL ELSE 'pending' END WHERE id = ?",
            [state, now_us, campaign_id],
        )
        return state

    @staticmethod
    def cancel(run: Run, campaign_id: str, now_us: int) -> str | None:
        """Cancel a non-terminal campaign: queued jobs at once, running ones when their device next reports. The
        campaign's state before (None: no such campaign); a terminal one is left as it is."""
        rows = run("SELECT state FROM campaigns WHERE id = ?", [campaign_id])
        if not rows:
            return None
        if rows[0][0] in CAMPAIGN_TERMINAL:
            return str(rows[0][0])
        run(
            "UPDATE campaigns SET state = 'cancelled', finished_us = ?, callback_state = CASE WHEN callback_url "
            "IS NULL THEN NULL ELSE 'pending' END WHERE id = ?",
            [now_us, campaign_id],
        )
        run(
            "UPDATE campaign_jobs SET state = 'cancelled', reason = 'cancelled by the operator', updated_us = ?, "
            "finished_us = ? WHERE campaign_id = ? AND state = 'queued'",
            [now_us, now_us, campaign_id],
        )
        return str(rows[0][0])

    @staticmethod
    def expire(run: Run, now_us: int, limit: int) -> list[tuple[str, str]]:
        """Jobs past their campaign's deadline (at most ``limit``): timed_out, or cancelled when the campaign was;
        then those campaigns finished when every job is terminal. Returns (campaign id, state) of each finished."""
        from datetime import datetime, timezone

        late = run(
            "SELECT j.campaign_id, j.device_id, c.state, c.deadline_us FROM campaign_jobs j "
            "JOIN campaigns c ON c.id = j.campaign_id WHERE j.state IN ('queued', 'running') AND c.deadline_us <= ? "
            "LIMIT ?",
            [now_us, limit],
        )
        touched: set[str] = set()
        for campaign_id, device_id, campaign_state, deadline_us in late:
            when = datetime.fromtimestamp(deadline_us / 1e6, tz=timezone.utc).isoformat(timespec="seconds")
            if campaign_state == "cancelled":
                state, reason = "cancelled", f"cancelled; the device did not confirm before the deadline {when}"
            else:
                state, reason = "timed_out", f"no report before the deadline {when}"
            run(
                "UPDATE campaign_jobs SET state = ?, reason = ?, updated_us = ?, finished_us = ? "
                "WHERE campaign_id = ? AND device_id = ?",
                [state, reason, now_us, now_us, campaign_id, device_id],
            )
            touched.add(campaign_id)
        # campaigns past the deadline whose jobs all ended already (e.g. all skipped) finish too
        for (campaign_id,) in run(
            "SELECT id FROM campaigns WHERE state IN ('pending', 'running') AND deadline_us <= ? LIMIT ?",
            [now_us, limit],
        ):
            touched.add(campaign_id)
        finished = []
        for campaign_id in sorted(touched):
            ended = CampaignSQL.finish_if_done(run, campaign_id, now_us)
            if ended is not None:
                finished.append((campaign_id, ended))
        return finished


def device_row(
    device_id: str,
    batch_id: str,
    sent_us: int,
    counters: dict[str, int],
    accepted: int,
    duplicates: int,
    received_us: int,
) -> tuple[Any, ...]:
    """The values of a device's row after a batch, in the column order both stores' upserts use."""
    return (
        device_id,
        received_us,
        received_us,
        accepted,
        duplicates,
        int(counters.get("dropped_total", 0)),
        int(counters.get("quarantined_total", 0)),
        batch_id,
        sent_us,
        counters.get("pending_records"),
        counters.get("expected_gap_s"),  # how long the device means to stay silent at most: each batch replaces it
    )


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


def new_token() -> str:
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


TOKEN_ID_CHARS = 12


def is_token_id(selector: str) -> bool:
    """A token id as ``token list`` shows it: exactly 12 lowercase hex digits."""
    return len(selector) == TOKEN_ID_CHARS and all(c in "0123456789abcdef" for c in selector)


class QueryTimeout(Exception):
    """A read ran past the store's bound on query time (``server.max_query_seconds``)."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        super().__init__(f"the query ran longer than {seconds:g} s; narrow it (device, since, until, limit)")


# A filter value that matches a NULL column (model_name, strategy): a series whose records carry no model name.
# One character longer than any name a record or a read request may carry, so it is never a real name.
NULL_NAME = "\u2205" * (MAX_NAME_CHARS + 1)


@dataclass(frozen=True)
class Query:
    """Filters of the read API; ``None`` means no filter, :data:`NULL_NAME` matches a NULL column."""

    device: str | None = None
    model: str | None = None
    strategy: str | None = None
    kind: str | None = None
    since_us: int | None = None
    until_us: int | None = None

    def where(self) -> tuple[str, list[Any]]:
        clauses: list[str] = []
        params: list[Any] = []
        for column, value in (
            ("device_id", self.device),
            ("model_name", self.model),
            ("strategy", self.strategy),
            ("kind", self.kind),
        ):
            if value == NULL_NAME:
                clauses.append(f"{column} IS NULL")
            elif value is not None:
                clauses.append(f"{column} = ?")
                params.append(value)
        if self.since_us is not None:
            clauses.append("started_us >= ?")
            params.append(self.since_us)
        if self.until_us is not None:
            clauses.append("started_us < ?")
            params.append(self.until_us)
        return (" AND ".join(clauses) or "TRUE"), params


DEVICE_COLUMNS = (
    "device_id",
    "first_seen_us",
    "last_seen_us",
    "records",
    "duplicates",
    "dropped_total",
    "quarantined_total",
    "last_batch_id",
    "last_sent_us",
    "backlog",
    "expected_gap_s",
)
GUARDRAIL_COLUMNS = (
    "guardrail_set",
    "guardrail_outcome",
    "guardrail_ms",
    "guardrail_input_ms",
    "guardrail_threat_ms",
    "guardrail_output_ms",
    "guardrail_impact",
)
QUERY_COLUMNS = (
    "seq",
    "id",
    "device_id",
    "run_id",
    "kind",
    "strategy",
    "model_name",
    "engine",
    "started_us",
    "received_us",
    "ok",
    "error_type",
    "input_tokens",
    "output_tokens",
    "ttft_us",
    "tpot_us",
    "e2e_us",
    "j_per_token",
    "power_w",
    "contended",
    "codec",
    "body",
    *GUARDRAIL_COLUMNS,
)
SYNC_COLUMNS = (
    "device_id",
    "received_us",
    "batch_id",
    "records",
    "accepted",
    "backlog",
    "dropped_total",
    "quarantined_total",
)


class Store(abc.ABC):
    """What the aggregator needs from a store. Methods are blocking: call them off the event loop."""

    @abc.abstractmethod
    def ingest(
        self,
        device_id: str,
        batch_id: str,
        sent_us: int,
        counters: dict[str, int],
        rows: Sequence[RecordRow],
        received_us: int,
    ) -> IngestResult: ...

    @abc.abstractmethod
    def devices(self) -> list[dict[str, Any]]: ...

    @abc.abstractmethod
    def device(self, device_id: str) -> dict[str, Any] | None:
        """One device's row (``DEVICE_COLUMNS``), or None when it never sent a batch."""

    @abc.abstractmethod
    def record_count(self) -> int: ...

    @abc.abstractmethod
    def record_ids(self) -> list[bytes]: ...

    @abc.abstractmethod
    def authenticate(self, token: str, now_us: int) -> TokenInfo | None: ...

    @abc.abstractmethod
    def add_token(self, subject: str, kind: str, now_us: int) -> str: ...

    @abc.abstractmethod
    def list_tokens(self) -> list[TokenInfo]: ...

    @abc.abstractmethod
    def revoke(self, selector: str, now_us: int) -> int: ...

    @abc.abstractmethod
    def rotate(self, device_id: str, now_us: int, grace_us: int) -> str: ...

    @abc.abstractmethod
    def query(self, query: Query, *, limit: int, after_seq: int = 0) -> list[dict[str, Any]]:
        """Stored measurements matching ``query`` in the order they were received (``QUERY_COLUMNS``)."""

    @abc.abstractmethod
    def query_newest(self, query: Query, *, limit: int, before_seq: int | None = None) -> list[dict[str, Any]]:
        """The ``limit`` most recently received measurements matching ``query`` (before ``before_seq``, a cursor),
        newest first."""

    @abc.abstractmethod
    def latest_columns(
        self, query: Query, columns: Sequence[str], limit: int, *, by_event: bool = False
    ) -> list[tuple[Any, ...]]:
        """The given columns of the ``limit`` most recently received measurements matching ``query``, oldest first
        (no record bodies: what the change-point search reads). ``by_event``: the ``limit`` whose requests ran
        last (``started_us``, the device's clock; ties in the order received), in the order they ran — a late or
        resent batch of old requests lands where it belongs instead of becoming "the latest"."""

    def latest(self, query: Query, limit: int) -> list[dict[str, Any]]:
        """The ``limit`` most recently received measurements matching ``query``, oldest first."""
        return self.query_newest(query, limit=limit)[::-1]

    @abc.abstractmethod
    def series(self, device: str | None = None) -> list[dict[str, Any]]:
        """Each device × kind × model × strategy that has records (``SERIES_COLUMNS``; a missing model name or
        strategy is :data:`NULL_NAME`), by device, kind, model, strategy."""

    @abc.abstractmethod
    def columns(self, query: Query, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        """The given columns of every matching measurement (names from ``QUERY_COLUMNS`` or a literal)."""

    @abc.abstractmethod
    def syncs(self, device: str, *, since_us: int | None = None, limit: int = 1000) -> list[SyncRow]:
        """The device's latest ``limit`` batches (received at or after ``since_us``), oldest first."""

    @abc.abstractmethod
    def get_meta(self, key: str) -> str | None:
        """A value kept in ``meta`` (the OTLP cursor, …), or None."""

    @abc.abstractmethod
    def swap_meta(self, key: str, old: str | None, new: str) -> bool:
        """Set ``meta[key]`` to ``new`` only if it still is ``old`` (None: absent); whether it was set."""

    @abc.abstractmethod
    def backlog_after(self, seq: int, before_us: int | None = None) -> tuple[int, int | None, int]:
        """(how many, the oldest received_us, the highest seq) of the measurements after ``seq`` (received before
        ``before_us``)."""

    @abc.abstractmethod
    def drop_before(self, cutoff_us: int) -> int:
        """Retention: remove measurements that started before ``cutoff_us``; returns how many (or partitions)."""

    # -- benchmark campaigns (docs/campaigns.md) -----------------------------------------------------------
    @abc.abstractmethod
    def _campaign_write(self, fn: Callable[[Run], T]) -> T:
        """``fn(run)`` inside one write transaction (``run`` takes ``?`` placeholders)."""

    @abc.abstractmethod
    def _campaign_read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """A read with ``?`` placeholders."""

    def add_campaign(
        self, row: CampaignRow, device_ids: list[str], skipped: dict[str, str], *, max_active: int | None = None
    ) -> None:
        """The campaign with a ``queued`` job per targeted device and a ``skipped`` one (with its reason) per
        device that was named but cannot run it; TooManyCampaigns when ``max_active`` campaigns are unfinished."""
        self._campaign_write(lambda run: CampaignSQL.add(run, row, device_ids, skipped, max_active))

    def campaign(self, campaign_id: str) -> CampaignRow | None:
        rows = self._campaign_read(f"SELECT {', '.join(CAMPAIGN_COLUMNS)} FROM campaigns WHERE id = ?", [campaign_id])
        return CampaignRow(*rows[0]) if rows else None

    def campaigns(self, limit: int = 100) -> list[CampaignRow]:
        """The newest ``limit`` campaigns, newest first."""
        rows = self._campaign_read(
            f"SELECT {', '.join(CAMPAIGN_COLUMNS)} FROM campaigns ORDER BY created_us DESC, id LIMIT ?", [limit]
        )
        return [CampaignRow(*row) for row in rows]

    def active_campaigns(self) -> int:
        """How many campaigns are not in a terminal state (bounded by ``campaigns.max_active``)."""
        return int(self._campaign_read("SELECT COUNT(*) FROM campaigns WHERE state IN ('pending', 'running')")[0][0])

    def campaign_jobs(self, campaign_id: str) -> list[JobRow]:
        """Every job of the campaign (at most ``campaigns.max_devices`` plus the skipped ones), by device."""
        rows = self._campaign_read(f"{_JOB_SELECT} WHERE j.campaign_id = ? ORDER BY j.device_id", [campaign_id])
        return [_job(row) for row in rows]

    def job_counts(self, campaign_ids: Sequence[str]) -> dict[str, dict[str, int]]:
        """Per campaign, how many of its jobs are in each state."""
        if not campaign_ids:
            return {}
        marks = ", ".join("?" for _ in campaign_ids)
        rows = self._campaign_read(
            f"SELECT campaign_id, state, COUNT(*) FROM campaign_jobs WHERE campaign_id IN ({marks}) GROUP BY 1, 2",
            list(campaign_ids),
        )
        counts: dict[str, dict[str, int]] = {c: {} for c in campaign_ids}
        for campaign_id, state, n in rows:
            counts[campaign_id][state] = int(n)
        return counts

    def device_jobs(self, device_id: str, limit: int = 8) -> list[JobRow]:
        """What the device's ingest acknowledgement lists: its queued and running jobs, oldest campaign first; a
        running job of a cancelled campaign reads ``cancelled`` until the device reports on it. One indexed query
        (``campaign_jobs_device``)."""
        rows = self._campaign_read(
            f"{_JOB_SELECT} WHERE j.device_id = ? AND j.state IN ('queued', 'running') "
            "ORDER BY c.created_us, j.campaign_id LIMIT ?",
            [device_id, limit],
        )
        return [_job(row, effective=True) for row in rows]

    def device_job(self, device_id: str, campaign_id: str) -> JobRow | None:
        """The device's job in that campaign (its effective state, as ``device_jobs``), or None."""
        rows = self._campaign_read(
            f"{_JOB_SELECT} WHERE j.campaign_id = ? AND j.device_id = ?", [campaign_id, device_id]
        )
        return _job(rows[0], effective=True) if rows else None

    def update_job(
        self,
        campaign_id: str,
        device_id: str,
        state: str,
        *,
        reason: str | None = None,
        progress_percent: float | None = None,
        levels_done: int | None = None,
        levels_total: int | None = None,
        now_us: int,
    ) -> JobUpdate:
        """A device's report on its job, in one transaction: a terminal job stays as it is; a job of a cancelled
        campaign becomes ``cancelled`` whatever the device said; the campaign runs at its first running job and
        finishes when its last job ends."""
        return self._campaign_write(
            lambda run: CampaignSQL.update_job(
                run,
                campaign_id,
                device_id,
                state,
                reason=reason,
                progress_percent=progress_percent,
                levels_done=levels_done,
                levels_total=levels_total,
                now_us=now_us,
            )
        )

    def set_campaign_state(self, campaign_id: str, state: str, now_us: int) -> str | None:
        """Only ``cancelled`` (the operator's): the campaign's state before, None when there is no such campaign;
        a campaign already terminal is left as it is."""
        if state != "cancelled":
            raise ValueError(f"only an operator's cancel sets a campaign's state, not {state!r}")
        return self._campaign_write(lambda run: CampaignSQL.cancel(run, campaign_id, now_us))

    def job_progress(self, campaign_ids: Sequence[str]) -> dict[str, float]:
        """Per campaign, its progress as ``campaigns.progress_of`` computes it from the jobs, in one query."""
        if not campaign_ids:
            return {}
        marks = ", ".join("?" for _ in campaign_ids)
        rows = self._campaign_read(
            "SELECT campaign_id, AVG(CASE WHEN state IN ('queued', 'running', 'cancelled') THEN progress_percent "
            f"ELSE 100.0 END) FROM campaign_jobs WHERE campaign_id IN ({marks}) AND state <> 'skipped' GROUP BY 1",
            list(campaign_ids),
        )
        return {str(c): round(float(p), 1) for c, p in rows if p is not None}

    def campaign_state_counts(self) -> dict[str, int]:
        """How many campaigns are in each state (the campaign gauges)."""
        return {
            str(state): int(n) for state, n in self._campaign_read("SELECT state, COUNT(*) FROM campaigns GROUP BY 1")
        }

    def unfinished_campaigns(self, limit: int = 100) -> list[CampaignRow]:
        """Pending and running campaigns, oldest first, at most ``limit`` (``campaigns.max_active`` bounds them)."""
        rows = self._campaign_read(
            f"SELECT {', '.join(CAMPAIGN_COLUMNS)} FROM campaigns WHERE state IN ('pending', 'running') "
            "ORDER BY created_us, id LIMIT ?",
            [limit],
        )
        return [CampaignRow(*row) for row in rows]

    def due_callbacks(self, now_us: int, limit: int = 20) -> list[CampaignRow]:
        """Finished campaigns whose completion callback is due (``callback_state`` pending, its next attempt's time
        reached), the longest finished first, at most ``limit``."""
        rows = self._campaign_read(
            f"SELECT {', '.join(CAMPAIGN_COLUMNS)} FROM campaigns WHERE callback_state = 'pending' "
            "AND (callback_next_us IS NULL OR callback_next_us <= ?) ORDER BY finished_us, id LIMIT ?",
            [now_us, limit],
        )
        return [CampaignRow(*row) for row in rows]

    def set_callback(self, campaign_id: str, state: str, attempts: int, next_us: int | None, error: str | None) -> None:
        """The outcome of a callback attempt: ``pending`` (retry at ``next_us``), ``delivered`` or ``failed``."""
        if state not in ("pending", "delivered", "failed"):
            raise ValueError(f"callback state {state!r}")
        self._campaign_write(
            lambda run: run(
                "UPDATE campaigns SET callback_state = ?, callback_attempts = ?, callback_next_us = ?, "
                "callback_error = ? WHERE id = ?",
                [state, attempts, next_us, error, campaign_id],
            )
        )

    def expire_jobs(self, now_us: int, limit: int = 1000) -> list[tuple[str, str]]:
        """The deadline task's work: at most ``limit`` late jobs ended; the campaigns that finished."""
        return self._campaign_write(lambda run: CampaignSQL.expire(run, now_us, limit))

    def campaign_levels(self, campaign_id: str, limit: int = 10_000) -> list[dict[str, Any]]:
        """The decoded ``campaign_level`` records of the campaign (wire maps): the newest per device × model ×
        workload × level, at most ``limit`` in all (each device's newest first). Only the suite's own models, workloads
        and levels count, and only records received before the job ended (plus LEVEL_GRACE_US): whatever else a
        device sends under the campaign's id is left out."""
        from .rows import decode_wire

        row = self.campaign(campaign_id)
        if row is None:
            return []
        from lens_core.suite import SuiteError, level_keys

        try:  # the (model, workload, level label) triples the suite runs: nothing else counts
            expected = level_keys(json.loads(row.configuration))
        except (SuiteError, ValueError):
            expected = set()
        models = {m for m, _, _ in expected}
        workloads = {w for _, w, _ in expected}
        out: list[dict[str, Any]] = []
        for job in self.campaign_jobs(campaign_id):
            if job.state == "skipped" or len(out) >= limit:
                continue
            # a record received after the job ended (plus a grace for the last upload) is not of its run
            received_by = None if job.finished_us is None else job.finished_us + LEVEL_GRACE_US
            seen: set[tuple[Any, ...]] = set()
            per_pair: dict[tuple[Any, Any], int] = {}
            for stored in self.query_newest(
                Query(device=job.device_id, kind=CAMPAIGN_LEVEL_KIND, since_us=row.created_us - 86_400_000_000),
                limit=min(limit - len(out), MAX_LEVELS_PER_DEVICE),
            ):
                record = decode_wire(stored)
                ext = record.get("ext") if record else None
                mark = ext.get("campaign") if type(ext) is dict else None
                if record is None or type(mark) is not dict or mark.get("id") != campaign_id:
                    continue
                pair = (mark.get("model"), mark.get("workload"))
                if pair[0] not in models or pair[1] not in workloads:  # not of this suite: a device's say only
                    continue
                if (*pair, mark.get("level")) not in expected:  # a level the suite does not run
                    continue
                received = stored.get("received_us")
                if received_by is not None and (type(received) is not int or received > received_by):
                    continue
                key = (*pair, json.dumps(mark.get("level"), sort_keys=True))
                if key in seen:
                    continue
                levels_of_pair = per_pair.get(pair, 0)
                if levels_of_pair >= MAX_LEVELS_PER_WORKLOAD:  # more levels than a suite may hold: the newest
                    continue
                per_pair[pair] = levels_of_pair + 1
                seen.add(key)
                out.append(record)
        return out

    # -- regressions as lasting objects (schema 9; aggregator.regressions.Watch, docs/fleet.md) ------------------
    def regressions(
        self,
        state: str = "open",
        *,
        device: str | None = None,
        limit: int = 100,
        before_id: int | None = None,
    ) -> list[dict[str, Any]]:
        """The regression objects in ``state`` (``open``, ``acknowledged``, ``resolved``, ``active``: open or
        acknowledged, ``all``), of ``device`` only when given, newest first (highest id), at most ``limit``, with an
        id below ``before_id`` when given (the next page)."""
        clauses, params = regression_filter(state, device, before_id)
        rows = self._campaign_read(
            f"SELECT {', '.join(REGRESSION_COLUMNS)} FROM regressions WHERE {clauses} ORDER BY id DESC LIMIT ?",
            [*params, max(0, int(limit))],
        )
        return [regression_object(row) for row in rows]

    def regression(self, regression_id: int) -> dict[str, Any] | None:
        rows = self._campaign_read(
            f"SELECT {', '.join(REGRESSION_COLUMNS)} FROM regressions WHERE id = ?", [regression_id]
        )
        return regression_object(rows[0]) if rows else None

    def regression_counts(self) -> dict[str, int]:
        """How many regression objects are in each state."""
        rows = self._campaign_read("SELECT state, COUNT(*) FROM regressions GROUP BY 1")
        return {str(state): int(n) for state, n in rows}

    def apply_regressions(self, changes: RegressionChanges, now_us: int) -> dict[str, list[int]]:
        """One search's outcome in one transaction: ``confirm`` (id, finding) refreshes an open or acknowledged
        object's figures and ``last_confirmed_us``; ``resolve`` ids become resolved; each finding of ``insert``
        opens an object — unless its series key already has an open or acknowledged one (another replica's, or one
        opened meanwhile: that one is confirmed instead) or its device already holds ``max_open`` of them (left
        out). Each device keeps its newest ``max_resolved`` resolved objects. Returns the ids by what happened."""
        return self._campaign_write(lambda run: RegressionSQL.apply(run, changes, now_us))

    def acknowledge_regression(self, regression_id: int, by: str, note: str | None, now_us: int) -> str | None:
        """An operator's acknowledgement: an open object becomes acknowledged (``by``, ``note``, when); an
        acknowledged one keeps its state and takes the new note. Returns the state before (None: no such object); a
        resolved object is left as it is."""
        return self._campaign_write(lambda run: RegressionSQL.acknowledge(run, regression_id, by, note, now_us))

    def regression_events_after(self, seq: int, limit: int) -> list[dict[str, Any]]:
        """The regression events after ``seq``, oldest first, at most ``limit`` (``attributes`` parsed)."""
        rows = self._campaign_read(
            f"SELECT {', '.join(REGRESSION_EVENT_COLUMNS)} FROM regression_events WHERE seq > ? ORDER BY seq LIMIT ?",
            [seq, max(0, int(limit))],
        )
        out = []
        for row in rows:
            event = dict(zip(REGRESSION_EVENT_COLUMNS, row, strict=True))
            try:
                attributes = json.loads(event["attributes"])
            except ValueError:
                attributes = {}
            event["attributes"] = attributes if type(attributes) is dict else {}
            out.append(event)
        return out

    def regression_events_backlog(self, seq: int) -> tuple[int, int | None, int]:
        """(how many events after ``seq``, the oldest one's at_us, how many were dropped past the bound)."""
        n, oldest = self._campaign_read("SELECT COUNT(*), MIN(at_us) FROM regression_events WHERE seq > ?", [seq])[0]
        dropped = self.get_meta(REGRESSION_EVENTS_DROPPED)
        return int(n), oldest, int(dropped) if dropped and dropped.isdigit() else 0

    def forget_regression_events(self, through_seq: int) -> None:
        """Delete the events up to ``through_seq`` (the OTLP cursor passed them)."""
        self._campaign_write(lambda run: run("DELETE FROM regression_events WHERE seq <= ?", [through_seq]))

    # the schema version the store held when it was opened (None: none yet, or not known), before any migration
    opened_version: int | None = None

    @abc.abstractmethod
    def schema_version(self) -> int: ...

    @abc.abstractmethod
    def close(self) -> None: ...


CAMPAIGN_LEVEL_KIND = "campaign_level"
# a device's last campaign_level record may reach the aggregator after its final progress report: by this much
LEVEL_GRACE_US = 10 * 60 * 1_000_000
MAX_LEVELS_PER_WORKLOAD = 16  # concurrency levels and rates of one workload (agent.suite.SuitePolicy.max_levels)
MAX_LEVELS_PER_DEVICE = 16 * 32 * MAX_LEVELS_PER_WORKLOAD  # models × workloads × levels a suite may hold


def _migrate_v7(db: sqlite_utils.Database) -> None:
    """Benchmark campaigns (docs/campaigns.md): ``campaigns`` and one row per targeted device in ``campaign_jobs``;
    the ingest acknowledgement reads a device's active jobs through ``campaign_jobs_device``."""
    db.execute(CAMPAIGNS_TABLE)
    db.execute(CAMPAIGN_JOBS_TABLE)
    for statement in CAMPAIGN_INDEXES:
        db.execute(statement)


CAMPAIGNS_TABLE = """CREATE TABLE IF NOT EXISTS campaigns (
    id TEXT PRIMARY KEY, name TEXT NOT NULL, created_us BIGINT NOT NULL, created_by TEXT NOT NULL,
    configuration TEXT NOT NULL, configuration_sha256 TEXT NOT NULL, target TEXT NOT NULL, deadline_us BIGINT NOT NULL,
    callback_url TEXT, state TEXT NOT NULL, started_us BIGINT, finished_us BIGINT,
    estimated_duration_s DOUBLE PRECISION NOT NULL, callback_state TEXT, callback_attempts INTEGER NOT NULL DEFAULT 0,
    callback_next_us BIGINT, callback_error TEXT
)"""
CAMPAIGN_JOBS_TABLE = """CREATE TABLE IF NOT EXISTS campaign_jobs (
    campaign_id TEXT NOT NULL REFERENCES campaigns(id), device_id TEXT NOT NULL, state TEXT NOT NULL, reason TEXT,
    progress_percent DOUBLE PRECISION NOT NULL, levels_done INTEGER NOT NULL, levels_total INTEGER,
    updated_us BIGINT NOT NULL, started_us BIGINT, finished_us BIGINT, PRIMARY KEY (campaign_id, device_id)
)"""
CAMPAIGN_INDEXES = (
    "CREATE INDEX IF NOT EXISTS campaign_jobs_device ON campaign_jobs (device_id, state)",
    "CREATE INDEX IF NOT EXISTS campaigns_state ON campaigns (state, deadline_us)",
    "CREATE INDEX IF NOT EXISTS campaigns_created ON campaigns (created_us)",
)


def _migrate_v1(db: sqlite_utils.Database) -> None:
    db.execute(
        """CREATE TABLE IF NOT EXISTS measurements (
            seq INTEGER PRIMARY KEY,
            id BLOB NOT NULL UNIQUE,
            device_id TEXT NOT NULL,
            run_id TEXT NOT NULL,
            kind TEXT NOT NULL,
            started_us INTEGER NOT NULL,
            received_us INTEGER NOT NULL,
            ok INTEGER NOT NULL,
            strategy TEXT, model_name TEXT, engine TEXT, error_type TEXT,
            input_tokens INTEGER, output_tokens INTEGER,
            ttft_us INTEGER, tpot_us INTEGER, e2e_us INTEGER,
            batch_id TEXT NOT NULL,
            codec TEXT NOT NULL,
            body BLOB NOT NULL
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS measurements_device_time ON measurements(device_id, started_us)")
    db.execute("CREATE INDEX IF NOT EXISTS measurements_time ON measurements(started_us)")
    db.table("devices").create(
        {
            "device_id": str,
            "first_seen_us": int,
            "last_seen_us": int,
            "records": int,
            "duplicates": int,
            "dropped_total": int,
            "quarantined_total": int,
            "last_batch_id": str,
            "last_sent_us": int,
            "backlog": int,
        },
        pk="device_id",
        if_not_exists=True,
    )
    db.table("tokens").create(
        {
            "token_hash": str,
            "subject": str,
            "kind": str,
            "created_us": int,
            "revoked_us": int,
            "expires_us": int,
        },
        pk="token_hash",
        if_not_exists=True,
    )


def _migrate_v2(db: sqlite_utils.Database) -> None:
    """Series (device × kind × model × strategy) kept at ingest, and indexes that read any device's or series'
    latest records without scanning others' (an index ends with the rowid, ``seq``: newest first is a backward
    walk)."""
    db.execute(
        """CREATE TABLE IF NOT EXISTS series (
            device_id TEXT NOT NULL, kind TEXT NOT NULL, model_name TEXT NOT NULL, strategy TEXT NOT NULL,
            first_seen_us INTEGER NOT NULL, last_seen_us INTEGER NOT NULL, records INTEGER NOT NULL,
            PRIMARY KEY (device_id, kind, model_name, strategy)
        )"""
    )
    db.execute(
        "INSERT OR IGNORE INTO series SELECT device_id, kind, COALESCE(model_name, ?), COALESCE(strategy, ?), "
        "MIN(received_us), MAX(received_us), COUNT(*) FROM measurements GROUP BY 1, 2, 3, 4",
        (NULL_NAME, NULL_NAME),
    )
    db.execute("CREATE INDEX IF NOT EXISTS measurements_device_kind ON measurements(device_id, kind)")
    db.execute("CREATE INDEX IF NOT EXISTS measurements_series ON measurements(device_id, kind, model_name, strategy)")


def _migrate_v3(db: sqlite_utils.Database) -> None:
    """The longest gap a device says to expect between its batches (``expected_gap_s`` in its batches' counters)."""
    db.execute("ALTER TABLE devices ADD COLUMN expected_gap_s INTEGER")


def backfill_energy(rows: Sequence[tuple[Any, ...]]) -> list[tuple[float | None, float | None, Any]]:
    """(J/token, W, seq) for each stored (seq, codec, body) whose record carries energy: the schema-4 backfill of
    the ``j_per_token`` and ``power_w`` columns, shared by both stores. A body that does not decode is left as it is
    (NULL)."""
    from lens_core import wire

    out = []
    for seq, codec, body in rows:
        try:
            record = wire.loads(bytes(body), codec)
        except Exception:  # a damaged row stays NULL here; the reads skip and count it as before
            continue
        if type(record) is not dict:
            continue
        joules, watts = energy_per_token(record), average_power(record)
        if joules is not None or watts is not None:
            out.append((joules, watts, seq))
    return out


def _migrate_v4(db: sqlite_utils.Database) -> None:
    """Energy per output token and average power as columns (the fleet's J/token, its change points and the device
    page's power chart read no bodies), backfilled from the stored records; and ``syncs``, one row per batch (its
    records, the device's backlog, drops and quarantine as it reported them): the sync history, backlog growth and
    the device page's backlog chart."""
    db.execute("ALTER TABLE measurements ADD COLUMN j_per_token REAL")
    db.execute("ALTER TABLE measurements ADD COLUMN power_w REAL")
    rows = db.execute("SELECT seq, codec, body FROM measurements WHERE kind = 'inference' AND ok").fetchall()
    db.conn.executemany("UPDATE measurements SET j_per_token = ?, power_w = ? WHERE seq = ?", backfill_energy(rows))
    db.execute(
        """CREATE TABLE IF NOT EXISTS syncs (
            device_id TEXT NOT NULL, received_us INTEGER NOT NULL, batch_id TEXT NOT NULL,
            records INTEGER NOT NULL, accepted INTEGER NOT NULL,
            backlog INTEGER, dropped_total INTEGER, quarantined_total INTEGER
        )"""
    )
    db.execute("CREATE INDEX IF NOT EXISTS syncs_device_time ON syncs(device_id, received_us)")


def record_settings(record: dict[str, Any]) -> str | None:
    """The ``settings`` column of a decoded record: the canonical key of its ``ext.settings``, or None."""
    ext = record.get("ext")
    return settings_key(ext.get("settings")) if type(ext) is dict else None


def backfill_settings(rows: Sequence[tuple[Any, ...]]) -> list[tuple[str, Any]]:
    """(settings key, seq) for each stored (seq, codec, body) whose record names its engine settings: the
    schema-5 backfill, shared by both stores. A body that does not decode stays NULL."""
    from lens_core import wire

    out = []
    for seq, codec, body in rows:
        try:
            record = wire.loads(bytes(body), codec)
        except Exception:  # a damaged row stays NULL here; the reads skip and count it as before
            continue
        key = record_settings(record) if type(record) is dict else None
        if key is not None:
            out.append((key, seq))
    return out


def _migrate_v5(db: sqlite_utils.Database) -> None:
    """The engine settings each measurement ran under (threads, batch, flash attention, quantization, …) as a
    column: triggers and feedback compare a device × model's series per settings without decoding bodies."""
    db.execute("ALTER TABLE measurements ADD COLUMN settings TEXT")
    rows = db.execute("SELECT seq, codec, body FROM measurements WHERE kind = 'inference'").fetchall()
    db.conn.executemany("UPDATE measurements SET settings = ? WHERE seq = ?", backfill_settings(rows))


MEASUREMENT_COLUMNS = (
    "seq INTEGER PRIMARY KEY",
    "id BLOB NOT NULL",
    "device_id TEXT NOT NULL",
    "run_id TEXT NOT NULL",
    "kind TEXT NOT NULL",
    "started_us INTEGER NOT NULL",
    "received_us INTEGER NOT NULL",
    "ok INTEGER NOT NULL",
    "strategy TEXT",
    "model_name TEXT",
    "engine TEXT",
    "error_type TEXT",
    "input_tokens INTEGER",
    "output_tokens INTEGER",
    "ttft_us INTEGER",
    "tpot_us INTEGER",
    "e2e_us INTEGER",
    "batch_id TEXT NOT NULL",
    "codec TEXT NOT NULL",
    "body BLOB NOT NULL",
    "j_per_token REAL",
    "power_w REAL",
    "settings TEXT",
)


def _migrate_v6(db: sqlite_utils.Database) -> None:
    """Dedupe per device: the unique key becomes (device_id, id) instead of id alone, so a device that knows
    another device's record id cannot get its own record acknowledged as a duplicate. SQLite cannot drop a column's
    UNIQUE constraint: the table is rebuilt (same columns, same ``seq``: the OTLP cursors stay valid) and its
    indexes recreated."""
    names = [c.split()[0] for c in MEASUREMENT_COLUMNS]
    db.execute(f"CREATE TABLE measurements_v6 ({', '.join(MEASUREMENT_COLUMNS)}, UNIQUE (device_id, id))")
    db.execute(f"INSERT INTO measurements_v6 ({', '.join(names)}) SELECT {', '.join(names)} FROM measurements")
    db.execute("DROP TABLE measurements")
    db.execute("ALTER TABLE measurements_v6 RENAME TO measurements")
    db.execute("CREATE INDEX IF NOT EXISTS measurements_device_time ON measurements(device_id, started_us)")
    db.execute("CREATE INDEX IF NOT EXISTS measurements_time ON measurements(started_us)")
    db.execute("CREATE INDEX IF NOT EXISTS measurements_device_kind ON measurements(device_id, kind)")
    db.execute("CREATE INDEX IF NOT EXISTS measurements_series ON measurements(device_id, kind, model_name, strategy)")


def backfill_contended(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any]]:
    """(seq,) of each stored (seq, codec, body) whose record says its request was contended
    (:func:`lens_core.record_schema.contended`): the schema-8 backfill, shared by both stores. A body that does not
    decode stays 0."""
    from lens_core import wire

    out = []
    for seq, codec, body in rows:
        try:
            record = wire.loads(bytes(body), codec)
        except Exception:  # a damaged row stays 0 here; the reads skip and count it as before
            continue
        if type(record) is dict and contended(record):
            out.append((seq,))
    return out


def _migrate_v8(db: sqlite_utils.Database) -> None:
    """Whether each measurement's request was contended (``ext.interference``, docs/interference.md) as a column, 0
    or 1: the fleet's contended share, and the change-point search and feedback leave contended requests out
    without decoding bodies. Backfilled from the stored records (a store whose version was set back may hold the
    column already: it is recomputed)."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(measurements)").fetchall()}
    if "contended" not in columns:
        db.execute("ALTER TABLE measurements ADD COLUMN contended INTEGER NOT NULL DEFAULT 0")
    else:
        db.execute("UPDATE measurements SET contended = 0 WHERE contended <> 0")
    rows = db.execute("SELECT seq, codec, body FROM measurements WHERE kind = 'inference'").fetchall()
    db.conn.executemany("UPDATE measurements SET contended = 1 WHERE seq = ?", backfill_contended(rows))


def backfill_guardrails(rows: Sequence[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
    """(the guardrail columns…, seq) of each stored (seq, codec, body) whose record carries a well-formed
    ``ext.guardrails`` (:func:`lens_core.record_schema.guardrail_columns`): the schema-10 backfill, shared by both
    stores. A body that does not decode, or whose guardrails are malformed, stays NULL."""
    from lens_core import wire

    out: list[tuple[Any, ...]] = []
    for seq, codec, body in rows:
        try:
            record = wire.loads(bytes(body), codec)
        except Exception:  # a damaged row stays NULL here; the reads skip and count it as before
            continue
        if type(record) is dict:
            columns = guardrail_columns(record)
            if columns.guardrail_set is not None:
                out.append((*columns, seq))
    return out


GUARDRAIL_COLUMN_TYPES = (
    ("guardrail_set", "TEXT"),
    ("guardrail_outcome", "TEXT"),
    *((name, "REAL") for name in GUARDRAIL_COLUMNS[2:]),
)
GUARDRAIL_BACKFILL = f"UPDATE measurements SET {', '.join(f'{name} = ?' for name in GUARDRAIL_COLUMNS)} WHERE seq = ?"


def _migrate_v10(db: sqlite_utils.Database) -> None:
    """The guardrail measurements of each request (``ext.guardrails``, docs/wire-format.md "Guardrails") as columns:
    the fleet's guardrail overhead, its trigger conditions and the change-point search read them without decoding
    bodies. Backfilled from the stored records of every kind (a blocked request has kind ``blocked``); a store whose
    version was set back may hold the columns already: they are recomputed."""
    columns = {row[1] for row in db.execute("PRAGMA table_info(measurements)").fetchall()}
    for name, kind in GUARDRAIL_COLUMN_TYPES:
        if name not in columns:
            db.execute(f"ALTER TABLE measurements ADD COLUMN {name} {kind}")
    db.execute(
        f"UPDATE measurements SET {', '.join(f'{name} = NULL' for name in GUARDRAIL_COLUMNS)} "
        "WHERE guardrail_set IS NOT NULL OR guardrail_ms IS NOT NULL"
    )
    rows = db.execute("SELECT seq, codec, body FROM measurements").fetchall()
    db.conn.executemany(GUARDRAIL_BACKFILL, backfill_guardrails(rows))


# -- regressions (schema 9) ---------------------------------------------------------------------------------------
REGRESSION_STATES = ("open", "acknowledged", "resolved")
REGRESSION_LISTS = (*REGRESSION_STATES, "active", "all")  # active: open or acknowledged
REGRESSION_COLUMNS = (
    "id",
    "device_id",
    "model_name",
    "strategy",
    "metric",
    "kind",
    "state",
    "since_us",
    "change",
    "before_median",
    "after_median",
    "p_value",
    "confidence",
    "requests_before",
    "requests_after",
    "evidence",
    "summary",
    "first_found_us",
    "last_confirmed_us",
    "resolved_us",
    "acknowledged_us",
    "acknowledged_by",
    "note",
)
# model_name and strategy are NOT NULL (NULL_NAME for none) so that the unique index below holds for them too
REGRESSIONS_TABLE = """CREATE TABLE IF NOT EXISTS regressions (
    id {id}, device_id TEXT NOT NULL, model_name TEXT NOT NULL, strategy TEXT NOT NULL, metric TEXT NOT NULL,
    kind TEXT NOT NULL, state TEXT NOT NULL, since_us BIGINT NOT NULL, change DOUBLE PRECISION NOT NULL,
    before_median DOUBLE PRECISION NOT NULL, after_median DOUBLE PRECISION NOT NULL, p_value DOUBLE PRECISION,
    confidence DOUBLE PRECISION, requests_before INTEGER, requests_after INTEGER, evidence TEXT, summary TEXT NOT NULL,
    first_found_us BIGINT NOT NULL, last_confirmed_us BIGINT NOT NULL, resolved_us BIGINT, acknowledged_us BIGINT,
    acknowledged_by TEXT, note TEXT
)"""
REGRESSION_INDEXES = (
    # at most one open or acknowledged object per series key: the bound, held by the database across replicas
    "CREATE UNIQUE INDEX IF NOT EXISTS regressions_one_active ON regressions "
    "(device_id, model_name, strategy, metric, kind) WHERE state <> 'resolved'",
    "CREATE INDEX IF NOT EXISTS regressions_state ON regressions (state, id)",
    "CREATE INDEX IF NOT EXISTS regressions_device ON regressions (device_id, state, id)",
)
MAX_REGRESSION_NOTE_CHARS = 1000

# Each time an object opens, is acknowledged or resolves, an event is written in the same transaction: what the OTLP
# forwarder sends as a log record (aggregator.otlp_events, docs/opentelemetry.md "Regression events"). ``attributes``
# is the object as it was then (JSON), so the same event is always the same log record, whatever happens to the
# object later. Bounded: at most MAX_REGRESSION_EVENTS are kept; past that the oldest are deleted and counted in
# meta[REGRESSION_EVENTS_DROPPED]. The forwarder deletes the events its cursor passed.
REGRESSION_EVENTS_TABLE = """CREATE TABLE IF NOT EXISTS regression_events (
    seq {id}, regression_id BIGINT NOT NULL, event TEXT NOT NULL, at_us BIGINT NOT NULL, device_id TEXT NOT NULL,
    attributes TEXT NOT NULL
)"""
REGRESSION_EVENTS = ("opened", "acknowledged", "resolved")
REGRESSION_EVENT_COLUMNS = ("seq", "regression_id", "event", "at_us", "device_id", "attributes")
MAX_REGRESSION_EVENTS = 10_000
REGRESSION_EVENTS_DROPPED = "otlp.regression_events.dropped"


def note_problem(note: object) -> str | None:
    """Why ``note`` cannot be a regression's acknowledgement note (it is shown on pages, in the CLI's output and
    stored as UTF-8), or None: a string of at most :data:`MAX_REGRESSION_NOTE_CHARS` characters, valid Unicode (no
    lone surrogate), with no control characters (one line) and no format characters (bidi overrides, zero-width
    characters: text that reads differently from what it holds)."""
    if type(note) is not str:
        return f"a string of at most {MAX_REGRESSION_NOTE_CHARS} characters"
    if len(note) > MAX_REGRESSION_NOTE_CHARS:
        return f"{len(note)} characters; at most {MAX_REGRESSION_NOTE_CHARS}"
    for position, char in enumerate(note):
        category = unicodedata.category(char)
        if category == "Cs":
            return f"holds a lone surrogate (U+{ord(char):04X}) at position {position}: not valid Unicode text"
        if category in ("Cc", "Cf"):
            kind = "control" if category == "Cc" else "format (bidi or zero-width)"
            return f"holds the {kind} character U+{ord(char):04X} at position {position}; a note is one line of text"
    return None


MAX_EVIDENCE_CHARS = 8192  # a finding's evidence and extras as stored JSON; larger: the extras only
_REGRESSION_EXTRAS = ("since_received_us", "engine_before", "engine_after", "contended_excluded")
_MAX_ENGINES, _MAX_ENGINE_CHARS = 8, 128


class RegressionChanges(NamedTuple):
    """What one search changes (``aggregator.regressions.Watch.observe``)."""

    confirm: list[tuple[int, dict[str, Any]]]  # (object id, the finding that confirms it)
    insert: list[dict[str, Any]]  # findings that open an object
    resolve: list[int]  # object ids whose series recovered
    max_open: int = 64  # open or acknowledged objects per device, at most
    max_resolved: int = 100  # resolved objects kept per device (the newest)


def regression_filter(state: str, device: str | None, before_id: int | None) -> tuple[str, list[Any]]:
    if state not in REGRESSION_LISTS:
        raise ValueError(f"regression state {state!r}: one of {', '.join(REGRESSION_LISTS)}")
    clauses: list[str] = ["TRUE"]
    params: list[Any] = []
    if state == "active":
        clauses.append("state <> 'resolved'")
    elif state != "all":
        clauses.append("state = ?")
        params.append(state)
    if device is not None:
        clauses.append("device_id = ?")
        params.append(device)
    if before_id is not None:
        clauses.append("id < ?")
        params.append(before_id)
    return " AND ".join(clauses), params


def evidence_text(finding: dict[str, Any]) -> str:
    """The ``evidence`` column: the finding's ``evidence`` (when the search gives one) and the finding's keys the
    table has no column for (since_received_us, engines, contended_excluded), as JSON, bounded."""
    extras: dict[str, Any] = {}
    for key in _REGRESSION_EXTRAS:
        value = finding.get(key)
        if key.startswith("engine_") and type(value) is list:
            value = [str(v)[:_MAX_ENGINE_CHARS] for v in value[:_MAX_ENGINES]]
        extras[key] = value
    try:
        text = json.dumps({"evidence": finding.get("evidence"), **extras}, default=str, allow_nan=False)
    except ValueError:  # a NaN or infinity somewhere in the evidence: not JSON
        text = ""
    if not text or len(text) > MAX_EVIDENCE_CHARS:
        left_out = {"left_out": f"not JSON or larger than {MAX_EVIDENCE_CHARS} characters"}
        text = json.dumps({"evidence": left_out, **extras}, default=str)
    return text


def regression_object(row: Sequence[Any]) -> dict[str, Any]:
    """A stored row as the API shows it: the finding's keys, the object's, and ``evidence`` parsed."""
    out = dict(zip(REGRESSION_COLUMNS, row, strict=True))
    for name in ("model_name", "strategy"):
        if out[name] == NULL_NAME:
            out[name] = None
    try:
        stored = json.loads(out["evidence"]) if out["evidence"] else {}
    except ValueError:
        stored = {}
    if type(stored) is not dict:
        stored = {}
    out["evidence"] = stored.get("evidence")
    for key in _REGRESSION_EXTRAS:
        out[key] = stored.get(key)
    for key in ("engine_before", "engine_after"):
        if type(out[key]) is not list:
            out[key] = []
    out["contended_excluded"] = out["contended_excluded"] or 0
    return out


def _finite(value: Any) -> float | None:
    return float(value) if type(value) in (int, float) and math.isfinite(value) else None


def _figures(finding: dict[str, Any]) -> list[Any]:
    """change, before_median, after_median, p_value, confidence, requests_before, requests_after, evidence, summary."""
    p = _finite(finding.get("p_value"))
    confidence = _finite(finding.get("confidence"))
    if confidence is None and p is not None:
        confidence = 1.0 - p
    return [
        float(finding["change"]),
        float(finding["before_median"]),
        float(finding["after_median"]),
        p,
        confidence,
        finding.get("requests_before"),
        finding.get("requests_after"),
        evidence_text(finding),
        str(finding.get("summary") or "")[:2000],
    ]


class RegressionSQL:
    """The regression objects' writes, the same SQL on both stores (``?`` placeholders, one transaction)."""

    @staticmethod
    def apply(run: Run, changes: RegressionChanges, now_us: int) -> dict[str, list[int]]:
        done: dict[str, list[int]] = {"confirmed": [], "opened": [], "resolved": [], "left_out": []}
        for regression_id in changes.resolve:
            rows = run(
                "UPDATE regressions SET state = 'resolved', resolved_us = ? WHERE id = ? AND state <> 'resolved' "
                "RETURNING id",
                [now_us, regression_id],
            )
            done["resolved"] += [int(r[0]) for r in rows]
            for row in rows:
                _record_event(run, int(row[0]), "resolved", now_us)
        confirm_sql = (
            "UPDATE regressions SET change = ?, before_median = ?, after_median = ?, p_value = ?, confidence = ?, "
            "requests_before = ?, requests_after = ?, evidence = ?, summary = ?, last_confirmed_us = ? "
            "WHERE id = ? AND state <> 'resolved' RETURNING id"
        )
        for regression_id, finding in changes.confirm:
            rows = run(confirm_sql, [*_figures(finding), now_us, regression_id])
            done["confirmed"] += [int(r[0]) for r in rows]
        devices: set[str] = set()
        for position, finding in enumerate(changes.insert):
            key = [
                finding["device_id"],
                finding["model_name"] if finding["model_name"] is not None else NULL_NAME,
                finding["strategy"] if finding["strategy"] is not None else NULL_NAME,
                finding["metric"],
                finding["kind"],
            ]
            held = run(
                "SELECT id FROM regressions WHERE device_id = ? AND model_name = ? AND strategy = ? AND metric = ? "
                "AND kind = ? AND state <> 'resolved'",
                key,
            )
            if held:  # opened meanwhile (another replica): the same object
                run(confirm_sql, [*_figures(finding), now_us, held[0][0]])
                done["confirmed"].append(int(held[0][0]))
                continue
            active = run(
                "SELECT COUNT(*) FROM regressions WHERE device_id = ? AND state <> 'resolved'", [finding["device_id"]]
            )[0][0]
            if int(active) >= changes.max_open:
                done["left_out"].append(position)  # which finding (its device: the log names it)
                continue
            rows = run(
                f"INSERT INTO regressions ({', '.join(REGRESSION_COLUMNS[1:])}) VALUES "
                f"({', '.join('?' for _ in REGRESSION_COLUMNS[1:])}) RETURNING id",
                [*key, "open", int(finding["since_us"]), *_figures(finding), now_us, now_us, None, None, None, None],
            )
            done["opened"].append(int(rows[0][0]))
            _record_event(run, int(rows[0][0]), "opened", now_us)
            devices.add(finding["device_id"])
        for device in devices | {str(r[0]) for r in _resolved_devices(run, done["resolved"])}:
            run(
                "DELETE FROM regressions WHERE device_id = ? AND state = 'resolved' AND id NOT IN (SELECT id FROM "
                "regressions WHERE device_id = ? AND state = 'resolved' ORDER BY id DESC LIMIT ?)",
                [device, device, changes.max_resolved],
            )
        if done["opened"] or done["resolved"]:
            _bound_events(run)
        return done

    @staticmethod
    def acknowledge(run: Run, regression_id: int, by: str, note: str | None, now_us: int) -> str | None:
        rows = run("SELECT state FROM regressions WHERE id = ?", [regression_id])
        if not rows:
            return None
        before = str(rows[0][0])
        if before == "open":
            run(
                "UPDATE regressions SET state = 'acknowledged', acknowledged_us = ?, acknowledged_by = ?, note = ? "
                "WHERE id = ?",
                [now_us, by[:MAX_NAME_CHARS], note, regression_id],
            )
        elif before == "acknowledged":
            run(
                "UPDATE regressions SET acknowledged_us = ?, acknowledged_by = ?, note = ? WHERE id = ?",
                [now_us, by[:MAX_NAME_CHARS], note, regression_id],
            )
        if before in ("open", "acknowledged"):  # a later acknowledgement (a new note) is an event too
            _record_event(run, regression_id, "acknowledged", now_us)
            _bound_events(run)
        return before


def _record_event(run: Run, regression_id: int, event: str, at_us: int) -> None:
    """The event, with the object as it is now (in the transaction that changed it)."""
    rows = run(f"SELECT {', '.join(REGRESSION_COLUMNS)} FROM regressions WHERE id = ?", [regression_id])
    if not rows:
        return
    snapshot = regression_object(rows[0])
    attributes = json.dumps(snapshot, default=str, allow_nan=False, separators=(",", ":"))
    run(
        "INSERT INTO regression_events (regression_id, event, at_us, device_id, attributes) VALUES (?, ?, ?, ?, ?)",
        [regression_id, event, at_us, snapshot["device_id"], attributes],
    )


def _bound_events(run: Run) -> None:
    """At most MAX_REGRESSION_EVENTS events kept: the oldest beyond are deleted and counted."""
    total = int(run("SELECT COUNT(*) FROM regression_events", [])[0][0])
    if total <= MAX_REGRESSION_EVENTS:
        return
    excess = total - MAX_REGRESSION_EVENTS
    run(
        "DELETE FROM regression_events WHERE seq IN (SELECT seq FROM regression_events ORDER BY seq LIMIT ?)",
        [excess],
    )
    held = run("SELECT value FROM meta WHERE key = ?", [REGRESSION_EVENTS_DROPPED])
    before = int(held[0][0]) if held and str(held[0][0]).isdigit() else 0
    run(
        "INSERT INTO meta (key, value) VALUES (?, ?) ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        [REGRESSION_EVENTS_DROPPED, str(before + excess)],
    )


def _resolved_devices(run: Run, ids: list[int]) -> list[Any]:
    if not ids:
        return []
    return run(f"SELECT DISTINCT device_id FROM regressions WHERE id IN ({', '.join('?' for _ in ids)})", ids)


def _migrate_v9(db: sqlite_utils.Database) -> None:
    """Regressions as lasting objects (docs/fleet.md "Regressions"): ``regressions``, at most one open or
    acknowledged object per device × model × strategy × metric × kind (a unique partial index)."""
    db.execute(REGRESSIONS_TABLE.format(id="INTEGER PRIMARY KEY"))
    for statement in REGRESSION_INDEXES:
        db.execute(statement)
    # AUTOINCREMENT: a seq is never reused once the forwarder deleted the events it sent (the cursor stays valid)
    db.execute(REGRESSION_EVENTS_TABLE.format(id="INTEGER PRIMARY KEY AUTOINCREMENT"))


MIGRATIONS: dict[int, Callable[[sqlite_utils.Database], None]] = {
    1: _migrate_v1,
    2: _migrate_v2,
    3: _migrate_v3,
    4: _migrate_v4,
    5: _migrate_v5,
    6: _migrate_v6,
    7: _migrate_v7,
    8: _migrate_v8,
    9: _migrate_v9,
    10: _migrate_v10,
}
SERIES_COLUMNS = ("device_id", "kind", "model_name", "strategy", "first_seen_us", "last_seen_us", "records")
_UPSERT_SERIES = (
    "INSERT INTO series (device_id, kind, model_name, strategy, first_seen_us, last_seen_us, records) "
    "VALUES (?, ?, ?, ?, ?, ?, ?) ON CONFLICT (device_id, kind, model_name, strategy) DO UPDATE SET "
    "last_seen_us = excluded.last_seen_us, records = series.records + excluded.records"
)


def series_counts(rows: Sequence[RecordRow], new: Sequence[int]) -> dict[tuple[str, str, str, str], int]:
    """The new records of a batch per series key (device, kind, model or NULL_NAME, strategy or NULL_NAME)."""
    counts: dict[tuple[str, str, str, str], int] = {}
    for i in new:
        r = rows[i]
        key = (r.device_id, r.kind, r.model_name or NULL_NAME, r.strategy or NULL_NAME)
        counts[key] = counts.get(key, 0) + 1
    return counts


# latest_columns(by_event=True) on SQLite: how many of the device's latest rows by time are looked through for the
# ``limit`` asked for before the matching rows are sorted instead
EVENT_WALK_FACTOR = 4
# Column order: RecordRow's fields, then received_us and batch_id.
INSERT_COLUMNS = (*RecordRow._fields, "received_us", "batch_id")
_INSERT = (
    f"INSERT OR IGNORE INTO measurements ({', '.join(INSERT_COLUMNS)}) "
    f"VALUES ({', '.join('?' for _ in INSERT_COLUMNS)})"
)
_INSERT_SYNC = f"INSERT INTO syncs ({', '.join(SYNC_COLUMNS)}) VALUES ({', '.join('?' for _ in SYNC_COLUMNS)})"


def _layout_hints(path: Path) -> dict[str, Any]:
    return {
        "program": "lens-aggregator",
        "marker": "tokens",
        "latest": SCHEMA_VERSION,
        "older_hint": f"run lens-aggregator migrate --db {path} (a starting lens-aggregator serve migrates it too)",
        "newer_hint": "upgrade lens-aggregator",
        "empty_hint": f"lens-aggregator serve --db {path} creates one",
    }


class SQLiteStore(Store):
    """The embedded store. One connection, serialised by a lock; WAL so readers never wait for the writer."""

    def __init__(
        self,
        path: Path | str,
        *,
        synchronous: str = "FULL",
        max_query_seconds: float = 10.0,
        readonly: bool = False,
        create: Literal["parents", "file", "never"] = "parents",
    ) -> None:
        """``readonly``: the database must exist at this schema version and is only read (opened ``mode=ro``, see
        :mod:`lens_core.sqlite_readonly`); else it is migrated forward on open, and ``create`` says what may be
        created: ``"parents"`` the file and its directories (the server), ``"file"`` the file in an existing
        directory, ``"never"`` nothing. A file that is another program's database is refused either way
        (:class:`NotUsable`)."""
        self.path = Path(path)
        self.readonly = readonly
        self.max_query_seconds = max_query_seconds
        self._local = threading.local()  # each reading thread has its own connection: a WAL reader
        self._readers: list[sqlite3.Connection] = []
        self._reading = 0  # reads in progress: close waits for them (closing a connection mid-query crashes SQLite)
        self._reads_done = threading.Condition()
        self._lock = threading.Lock()
        if readonly:
            self._conn = connect_readonly(self.path)
            try:
                found = layout(self._conn, self.path)
                self.opened_version = found.version
                check_layout(found, self.path, **_layout_hints(self.path))
            except BaseException:
                self._conn.close()
                raise
            return
        self._check_writable(create)
        self._conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
        try:
            found = layout(self._conn, self.path)
            if found.tables and (found.version is None or "tokens" not in found.tables):
                check_layout(found, self.path, **_layout_hints(self.path))  # says whose it is not
        except BaseException:
            self._conn.close()
            raise
        self.opened_version = found.version or 0
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute(f"PRAGMA synchronous={synchronous}")
        self._conn.execute("PRAGMA cache_size=-65536")  # 64 MiB: index pages stay hot under steady ingest
        self._conn.execute("PRAGMA temp_store=MEMORY")
        self._migrate()

    def _check_writable(self, create: Literal["parents", "file", "never"]) -> None:
        if self.path.is_dir():
            raise NotUsable(self.path, "is a directory, not a database file")
        if self.path.exists() or create == "parents":
            self.path.parent.mkdir(parents=True, exist_ok=True)
            return
        if create == "never":
            raise NotUsable(self.path, "does not exist (lens-aggregator serve creates the database)")
        if not self.path.parent.is_dir():
            raise NotUsable(
                self.path,
                f"its directory {self.path.parent} does not exist: give the database the server uses "
                "(storage.db, --db), or create the directory first",
            )

    def _migrate(self) -> None:
        migrate_forward(
            self._conn,
            MIGRATIONS,
            lambda version: RuntimeError(
                f"{self.path}: database schema version {version} is newer than this aggregator's "
                f"({SCHEMA_VERSION}); upgrade lens-aggregator"
            ),
        )

    def schema_version(self) -> int:
        row = self._conn.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchone()
        return int(row[0])

    # -- read connections --------------------------------------------------------------------------------
    def _reader(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            if self.readonly:
                conn = connect_readonly(self.path)
            else:
                conn = sqlite3.connect(str(self.path), isolation_level=None, check_same_thread=False, timeout=30)
                conn.execute("PRAGMA query_only=1")
            conn.execute("PRAGMA cache_size=-16384")
            with self._lock:
                self._readers.append(conn)
            self._local.conn = conn
        return conn

    def _read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Rows of a read on this thread's own connection: it never waits for the writer (WAL) and never makes the
        writer wait; it is interrupted after ``max_query_seconds`` (QueryTimeout)."""
        conn = self._reader()
        deadline = time.monotonic() + self.max_query_seconds
        conn.set_progress_handler(lambda: time.monotonic() > deadline, 10_000)
        with self._reads_done:
            self._reading += 1
        try:
            return conn.execute(sql, params).fetchall()
        except sqlite3.OperationalError as exc:
            if "interrupted" in str(exc):
                raise QueryTimeout(self.max_query_seconds) from None
            raise
        finally:
            conn.set_progress_handler(None, 0)
            with self._reads_done:
                self._reading -= 1
                self._reads_done.notify_all()

    # -- ingest ------------------------------------------------------------------------------------------
    def ingest(
        self,
        device_id: str,
        batch_id: str,
        sent_us: int,
        counters: dict[str, int],
        rows: Sequence[RecordRow],
        received_us: int,
    ) -> IngestResult:
        params = [(*r, received_us, batch_id) for r in rows]
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                before = conn.total_changes
                conn.executemany(_INSERT, params)
                accepted = conn.total_changes - before
                duplicates = len(rows) - accepted
                if duplicates == 0:
                    new = list(range(len(rows)))
                else:  # which ones are new: the rows this transaction wrote carry its batch id and receive time
                    mine = {
                        bytes(row[0])
                        for row in conn.execute(
                            "SELECT id FROM measurements WHERE batch_id = ? AND received_us = ?",
                            (batch_id, received_us),
                        )
                    }
                    new, taken = [], set()
                    for i, r in enumerate(rows):
                        if r.id in mine and r.id not in taken:
                            new.append(i)
                            taken.add(r.id)
                conn.executemany(
                    _UPSERT_SERIES,
                    [(*key, received_us, received_us, n) for key, n in series_counts(rows, new).items()],
                )
                conn.execute(
                    """INSERT INTO devices (device_id, first_seen_us, last_seen_us, records, duplicates,
                           dropped_total, quarantined_total, last_batch_id, last_sent_us, backlog, expected_gap_s)
                       VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)
                       ON CONFLICT(device_id) DO UPDATE SET
                           last_seen_us = excluded.last_seen_us,
                           records = devices.records + excluded.records,
                           duplicates = devices.duplicates + excluded.duplicates,
                           dropped_total = MAX(devices.dropped_total, excluded.dropped_total),
                           quarantined_total = MAX(devices.quarantined_total, excluded.quarantined_total),
                           last_batch_id = excluded.last_batch_id,
                           last_sent_us = excluded.last_sent_us,
                           backlog = excluded.backlog,
                           expected_gap_s = excluded.expected_gap_s""",
                    device_row(device_id, batch_id, sent_us, counters, accepted, duplicates, received_us),
                )
                conn.execute(_INSERT_SYNC, sync_row(device_id, batch_id, counters, len(rows), accepted, received_us))
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return IngestResult(accepted=accepted, duplicates=duplicates, new=tuple(new))

    # -- reads -------------------------------------------------------------------------------------------
    def devices(self) -> list[dict[str, Any]]:
        names = DEVICE_COLUMNS
        rows = self._read(f"SELECT {', '.join(names)} FROM devices ORDER BY device_id")
        return [dict(zip(names, row, strict=True)) for row in rows]

    def device(self, device_id: str) -> dict[str, Any] | None:
        rows = self._read(f"SELECT {', '.join(DEVICE_COLUMNS)} FROM devices WHERE device_id = ?", (device_id,))
        return dict(zip(DEVICE_COLUMNS, rows[0], strict=True)) if rows else None

    def record_count(self) -> int:
        return int(self._read("SELECT COUNT(*) FROM measurements")[0][0])

    def record_ids(self) -> list[bytes]:
        return [bytes(r[0]) for r in self._read("SELECT id FROM measurements")]

    def record_body(self, record_id: bytes) -> tuple[str, bytes, int] | None:
        rows = self._read("SELECT codec, body, received_us FROM measurements WHERE id = ?", (record_id,))
        return None if not rows else (str(rows[0][0]), bytes(rows[0][1]), int(rows[0][2]))

    # -- tokens ------------------------------------------------------------------------------------------
    def authenticate(self, token: str, now_us: int) -> TokenInfo | None:
        with self._lock:
            row = self._conn.execute(
                "SELECT token_hash, subject, kind, created_us, revoked_us, expires_us FROM tokens WHERE token_hash = ?",
                (hash_token(token),),
            ).fetchone()
        if row is None:
            return None
        info = TokenInfo(row[0][:12], row[1], row[2], row[3], row[4], row[5])
        if info.revoked_us is not None or (info.expires_us is not None and info.expires_us <= now_us):
            return None
        return info

    def add_token(self, subject: str, kind: str, now_us: int) -> str:
        if kind not in TOKEN_KINDS:
            raise ValueError(f"token kind must be device, read or operator, not {kind!r}")
        token = new_token()
        with self._lock:
            self._conn.execute(
                "INSERT INTO tokens (token_hash, subject, kind, created_us) VALUES (?, ?, ?, ?)",
                (hash_token(token), subject, kind, now_us),
            )
        return token

    def list_tokens(self) -> list[TokenInfo]:
        with self._lock:
            rows = self._conn.execute(
                "SELECT token_hash, subject, kind, created_us, revoked_us, expires_us FROM tokens "
                "ORDER BY subject, created_us"
            ).fetchall()
        return [TokenInfo(r[0][:12], r[1], r[2], r[3], r[4], r[5]) for r in rows]

    def revoke(self, selector: str, now_us: int) -> int:
        """Revoke every live token of a subject (device id or read-token name, exactly), or one token by its id
        (the 12 hex digits ``token list`` shows, exactly): no pattern matching."""
        token_id = selector if is_token_id(selector) else None
        with self._lock:
            cursor = self._conn.execute(
                "UPDATE tokens SET revoked_us = ? WHERE revoked_us IS NULL AND (subject = ? OR "
                "(? IS NOT NULL AND substr(token_hash, 1, 12) = ?))",
                (now_us, selector, token_id, token_id),
            )
            return int(cursor.rowcount)

    def rotate(self, device_id: str, now_us: int, grace_us: int) -> str:
        """A new token for the device; its current tokens keep working for ``grace_us``, then expire."""
        token = new_token()
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            conn.execute(
                "UPDATE tokens SET expires_us = ? WHERE subject = ? AND kind = 'device' AND revoked_us IS NULL "
                "AND (expires_us IS NULL OR expires_us > ?)",
                (now_us + grace_us, device_id, now_us + grace_us),
            )
            conn.execute(
                "INSERT INTO tokens (token_hash, subject, kind, created_us) VALUES (?, ?, 'device', ?)",
                (hash_token(token), device_id, now_us),
            )
            conn.execute("COMMIT")
        return token

    def query(self, query: Query, *, limit: int, after_seq: int = 0) -> list[dict[str, Any]]:
        where, params = query.where()
        rows = self._read(
            f"SELECT {', '.join(QUERY_COLUMNS)} FROM measurements WHERE {where} AND seq > ? ORDER BY seq LIMIT ?",
            [*params, after_seq, limit],
        )
        return [dict(zip(QUERY_COLUMNS, row, strict=True)) for row in rows]

    def query_newest(self, query: Query, *, limit: int, before_seq: int | None = None) -> list[dict[str, Any]]:
        where, params = query.where()
        if before_seq is not None:
            where, params = f"{where} AND seq < ?", [*params, before_seq]
        rows = self._read(
            f"SELECT {', '.join(QUERY_COLUMNS)} FROM measurements WHERE {where} ORDER BY seq DESC LIMIT ?",
            [*params, limit],
        )
        return [dict(zip(QUERY_COLUMNS, row, strict=True)) for row in rows]

    def latest_columns(
        self, query: Query, columns: Sequence[str], limit: int, *, by_event: bool = False
    ) -> list[tuple[Any, ...]]:
        where, params = query.where()
        if not by_event:
            sql = f"SELECT {', '.join(columns)} FROM measurements WHERE {where} ORDER BY seq DESC LIMIT ?"
            return self._read(sql, [*params, limit])[::-1]
        order = "started_us DESC, seq DESC"
        if query.device is not None:
            # the device's latest EVENT_WALK_FACTOR × limit rows by time in the query's range
            # (measurements_device_time, index only); the answer when ``limit`` of them match — the usual case, a
            # series the device runs now — or when they are all of the device's rows in the range
            span = "device_id = ?"
            span_params: list[Any] = [query.device]
            if query.since_us is not None:
                span, span_params = f"{span} AND started_us >= ?", [*span_params, query.since_us]
            if query.until_us is not None:
                span, span_params = f"{span} AND started_us < ?", [*span_params, query.until_us]
            index = "measurements INDEXED BY measurements_device_time"
            walk = f"SELECT seq FROM {index} WHERE {span} ORDER BY {order} LIMIT ?"
            cap = EVENT_WALK_FACTOR * limit
            sql = (
                f"WITH walked(at) AS ({walk}) SELECT {', '.join(columns)} FROM walked CROSS JOIN measurements "
                f"ON measurements.seq = walked.at WHERE {where} ORDER BY {order} LIMIT ?"
            )
            rows = self._read(sql, [*span_params, cap, *params, limit])
            if len(rows) >= limit or self._read(f"SELECT COUNT(*) FROM ({walk})", [*span_params, cap])[0][0] < cap:
                return rows[::-1]
        # rows that are few among the device's latest (facts, an old series): sorted through the series index
        # ("+": not walked by time, which would scan the device's whole history for them)
        sql = f"SELECT {', '.join(columns)} FROM measurements WHERE {where} ORDER BY +{order} LIMIT ?"
        return self._read(sql, [*params, limit])[::-1]

    def series(self, device: str | None = None) -> list[dict[str, Any]]:
        where, params = ("WHERE device_id = ?", [device]) if device is not None else ("", [])
        rows = self._read(f"SELECT {', '.join(SERIES_COLUMNS)} FROM series {where} ORDER BY 1, 2, 3, 4", params)
        return [dict(zip(SERIES_COLUMNS, row, strict=True)) for row in rows]

    def columns(self, query: Query, columns: Sequence[str]) -> list[tuple[Any, ...]]:
        where, params = query.where()
        return self._read(f"SELECT {', '.join(columns)} FROM measurements WHERE {where}", params)

    def syncs(self, device: str, *, since_us: int | None = None, limit: int = 1000) -> list[SyncRow]:
        params: list[Any] = [device]
        where = "device_id = ?"
        if since_us is not None:
            where, params = f"{where} AND received_us >= ?", [device, since_us]
        rows = self._read(
            f"SELECT {', '.join(SYNC_COLUMNS)} FROM syncs WHERE {where} ORDER BY received_us DESC LIMIT ?",
            [*params, limit],
        )
        return [SyncRow(*row) for row in reversed(rows)]

    def get_meta(self, key: str) -> str | None:
        rows = self._read("SELECT value FROM meta WHERE key = ?", (key,))
        return None if not rows else rows[0][0]

    def swap_meta(self, key: str, old: str | None, new: str) -> bool:
        with self._lock:
            if old is None:
                cursor = self._conn.execute("INSERT OR IGNORE INTO meta (key, value) VALUES (?, ?)", (key, new))
            else:
                cursor = self._conn.execute("UPDATE meta SET value = ? WHERE key = ? AND value = ?", (new, key, old))
            return int(cursor.rowcount) == 1

    def backlog_after(self, seq: int, before_us: int | None = None) -> tuple[int, int | None, int]:
        where, params = "seq > ?", [seq]
        if before_us is not None:
            where, params = f"{where} AND received_us < ?", [seq, before_us]
        n, oldest, top = self._read(
            f"SELECT COUNT(*), MIN(received_us), MAX(seq) FROM measurements WHERE {where}", params
        )[0]
        return int(n), oldest, int(top) if top is not None else seq

    def drop_before(self, cutoff_us: int) -> int:
        with self._lock:
            self._conn.execute("DELETE FROM syncs WHERE received_us < ?", (cutoff_us,))
            return int(self._conn.execute("DELETE FROM measurements WHERE started_us < ?", (cutoff_us,)).rowcount)

    # -- campaigns ---------------------------------------------------------------------------------------
    def _campaign_write(self, fn: Callable[[Run], T]) -> T:
        with self._lock:
            conn = self._conn
            conn.execute("BEGIN IMMEDIATE")
            try:
                result = fn(lambda sql, params: conn.execute(sql, params).fetchall())
                conn.execute("COMMIT")
            except BaseException:
                conn.execute("ROLLBACK")
                raise
        return result

    def _campaign_read(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return self._read(sql, params)

    def close(self) -> None:
        with self._reads_done:  # a read still running on another thread (a background task's) ends first
            if not self._reads_done.wait_for(lambda: self._reading == 0, timeout=self.max_query_seconds + 1):
                for reader in self._readers:
                    reader.interrupt()
                self._reads_done.wait_for(lambda: self._reading == 0, timeout=5)
        with self._lock:
            for reader in self._readers:
                reader.close()
            self._readers.clear()
            self._conn.close()
