"""The operator's view of the agent on the device: ``lens-agent status``. Health rules are pure functions."""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .clock import boot_id

if TYPE_CHECKING:  # the outbox (and asyncio with it) loads when a command opens one, not with the CLI
    from .outbox import OutboxStats

STATE_FILE = "service.json"  # the service's state, which status reads


def state_path(data_dir: Path | str) -> Path:
    return Path(data_dir) / STATE_FILE


FILL_LIMIT = 0.9
STALE_SYNC_INTERVALS = 3


@dataclass
class Health:
    healthy: bool = True
    reasons: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)  # healthy, but something waits for the operator

    def fail(self, reason: str) -> None:
        self.healthy = False
        self.reasons.append(reason)

    def warn(self, warning: str) -> None:
        self.warnings.append(warning)


def quarantine_warning(stats: OutboxStats) -> str | None:
    """The records kept in quarantine (refused by the aggregator or undecodable): never uploaded unless the operator
    looks and retries them. Not a failure of the agent, which goes on measuring and uploading the rest."""
    if not stats.quarantine_records:
        return None
    codes = ", ".join(f"{code} {n}" for code, n in sorted(stats.quarantined_by_code.items()) if n)
    return (
        f"{plural(stats.quarantine_records, 'record')} in quarantine, not uploaded"
        + (f" (quarantined so far: {codes})" if codes else "")
        + ": see why with `lens-agent outbox list`; after fixing the cause, resend them with "
        "`lens-agent outbox retry --all`"
        + (" (another device's records: retry --code other_device --as-device ID)" if "other_device" in codes else "")
        + " or delete them: `lens-agent outbox drop --all --yes`"
    )


def heartbeat_age(
    service: dict[str, Any], now: float, monotonic_now: float, current_boot: str | None
) -> tuple[float, str]:
    """How old the service's heartbeat is, in seconds, and on which clock: ``monotonic`` when the state file carries
    a CLOCK_MONOTONIC reading from this boot (a step of the wall clock then changes nothing), else ``wall``."""
    written = service.get("updated_monotonic")
    boot = service.get("boot_id")
    if isinstance(written, (int, float)) and boot and boot == current_boot and written <= monotonic_now:
        return monotonic_now - float(written), "monotonic"
    return now - float(service.get("updated_unix") or 0), "wall"


def service_view(
    service: dict[str, Any] | None,
    now: float,
    *,
    monotonic_now: float | None = None,
    current_boot: str | None = None,
) -> dict[str, Any] | None:
    """The service's own state file, with whether it runs and how old its heartbeat is (see ``heartbeat_age``;
    ``monotonic_now`` and ``current_boot`` default to this machine's)."""
    if service is None:
        return None
    pid = service.get("pid")
    alive = False
    if isinstance(pid, int):
        try:
            os.kill(pid, 0)
            alive = True
        except ProcessLookupError:
            alive = False
        except PermissionError:
            alive = True
    age, basis = heartbeat_age(
        service,
        now,
        time.monotonic() if monotonic_now is None else monotonic_now,
        boot_id() if current_boot is None else current_boot,
    )
    return {
        **service,
        "running": alive and service.get("state") != "stopped",
        "heartbeat_age_s": round(age, 1),
        "heartbeat_clock": basis,
    }


def evaluate(
    stats: OutboxStats | None,
    state: dict[str, str | None],
    *,
    interval_s: float,
    now_us: int,
    service: dict[str, Any] | None = None,
    sync_configured: bool = True,
    monotonic_now: float | None = None,
    current_boot: str | None = None,
) -> Health:
    """Unhealthy, each with its reason, when: records are pending and no sync succeeded for 3× the interval; records
    are pending and sync is not configured; the outbox is above 90 % of its bound; the last sync attempt failed (the
    aggregator refused the device or its format, something else answered in its place, the network, the server or
    the outbox failed); the last run of a workload failed; the service's heartbeat is older than 3× its interval
    (crashed or hung without stopping); the disk holding the outbox is full; a salvage of the damaged outbox is not
    acknowledged yet (lens-agent outbox ack-damage). Healthy with a warning when records sit in the quarantine."""
    health = Health()
    if service is not None and service.get("state") != "stopped":
        limit = STALE_SYNC_INTERVALS * float(service.get("heartbeat_interval_s") or 10)
        age = float(service.get("heartbeat_age_s") or 0)
        if age > limit:
            health.fail(
                f"the service's heartbeat is {age:.0f} s old (limit {limit:g} s) while it claims to be "
                f"{service.get('state')!r}: crashed or hung (pid {service.get('pid')})"
            )
    if stats is None:
        return health
    if stats.fill_ratio > FILL_LIMIT:
        health.fail(
            f"outbox is {stats.fill_ratio:.0%} full ({human_size(stats.bytes)} of {human_size(stats.max_bytes)}): "
            "records will be dropped soon"
        )
    if stats.records:
        last_success = _int(state.get("last_success_us"))
        reference = last_success if last_success is not None else stats.oldest_created_us
        age_us = None if reference is None else now_us - reference
        if last_success is not None:
            # on the monotonic clock when the sync ran in this boot: a step of the wall clock neither hides a stale
            # sync (a step back) nor invents one (a step forward)
            monotonic_age = _monotonic_age_us(state, monotonic_now, current_boot)
            age_us = monotonic_age if monotonic_age is not None else age_us
        limit_us = int(STALE_SYNC_INTERVALS * interval_s * 1e6)
        if age_us is not None and age_us > limit_us:
            since = "the last successful sync" if last_success is not None else "the oldest pending record"
            health.fail(
                f"{plural(stats.records, 'record')} pending and no successful sync for {age_us / 1e6:.0f} s "
                f"since {since} (limit {STALE_SYNC_INTERVALS}× the {interval_s:g} s interval)"
            )
    if stats.records and not sync_configured:
        health.fail(
            f"{plural(stats.records, 'record')} pending and sync.url is not set: nothing will be uploaded "
            "(set sync.url and sync.token_file, then lens-agent sync --check)"
        )
    if stats.disk_full_since_us is not None:
        health.fail(
            f"the disk holding the outbox is full (since {_iso(stats.disk_full_since_us)}; "
            f"{plural(stats.dropped_disk_full_total, 'record')} dropped for it so far): {stats.disk_full_message}; "
            "free space there or lower sync.max_outbox_bytes"
        )
    warning = quarantine_warning(stats)
    if warning is not None:
        health.warn(warning)
    if stats.damage:
        health.fail(f"the outbox was damaged: {stats.damage}; after a look, run `lens-agent outbox ack-damage`")
    kind = state.get("last_error_kind")
    if kind in ("auth", "unsupported"):
        health.fail(f"the aggregator refuses this device: {state.get('last_error')}")
    elif kind == "not_aggregator":
        health.fail(f"the last sync reached something other than the aggregator: {state.get('last_error')}")
    elif kind:
        health.fail(f"the last sync failed ({kind}): {state.get('last_error')}")
    for name, run in ((service or {}).get("last_runs") or {}).items():
        if not isinstance(run, dict):
            continue
        if run.get("error"):
            health.fail(f"the last run of workload {name!r} failed at {run.get('at')}: {run['error']}")
        elif run.get("requests") and run.get("errors") == run.get("requests"):
            health.fail(
                f"every request of the last run of workload {name!r} failed ({run['errors']} of {run['requests']})"
            )
    return health


def _contended(run: dict[str, Any]) -> str:
    """``, 3 of 5 contended (cpu ×3, io ×1)`` when other work contended some of a run's requests
    (docs/interference.md), else nothing."""
    count = run.get("contended")
    if not isinstance(count, int) or count <= 0:
        return ""
    reasons = run.get("contended_reasons")
    if not isinstance(reasons, dict):
        reasons = {}
    why = ", ".join(f"{name} ×{n}" for name, n in sorted(reasons.items()))
    return f", {count} of {run.get('requests')} contended" + (f" ({why})" if why else "")


def _guarded(run: dict[str, Any]) -> str:
    """``; guardrails pii: 3 blocked, 1 with guardrail errors`` for a guarded workload's run (docs/service.md
    "Guarded workloads"), else nothing."""
    name = run.get("guardrail_set")
    if not isinstance(name, str) or not name:
        return ""
    blocked, errors = run.get("blocked"), run.get("guardrail_errors")
    blocked = blocked if isinstance(blocked, int) else 0
    errors = errors if isinstance(errors, int) else 0
    return f"; guardrails {name}: {blocked} blocked, {errors} with guardrail errors"


def plural(n: int, noun: str, many: str | None = None) -> str:
    """``1 record``, ``2 records`` (``many`` for irregular plurals: batch → batches)."""
    return f"{n} {noun if n == 1 else (many or noun + 's')}"


def human_size(n: int | None) -> str:
    """``0 B``, ``978 B``, ``12.5 KiB``, ``256 MiB`` — the units the configuration is written in."""
    if n is None:
        return "n/a"
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{int(value)} {unit}" if unit == "B" or value == int(value) else f"{value:.1f} {unit}"
        value /= 1024
    return f"{n} B"  # pragma: no cover - the loop always returns


def _monotonic_age_us(
    state: dict[str, str | None], monotonic_now: float | None, current_boot: str | None
) -> int | None:
    """Microseconds since the last successful sync on CLOCK_MONOTONIC, when it was recorded in this boot."""
    try:
        written = float(state.get("last_success_monotonic") or "")
    except ValueError:
        return None
    boot = state.get("last_success_boot_id")
    if monotonic_now is None or not boot or boot != current_boot or written > monotonic_now:
        return None
    return int((monotonic_now - written) * 1e6)


def _num(value: float | None, digits: int = 1) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def _int(value: str | None) -> int | None:
    try:
        return int(value) if value is not None else None
    except ValueError:
        return None


def _iso(us: int | None) -> str | None:
    if us is None:
        return None
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(us / 1e6))


def status_document(
    *,
    outbox_file: Path,
    stats: OutboxStats | None,
    state: dict[str, str | None],
    health: Health,
    reachable: bool | None,
    aggregator_url: str | None,
    last_salvage: str | None,
    now_us: int,
    service: dict[str, Any] | None = None,
) -> dict[str, Any]:
    last_result: Any = None
    if state.get("last_result"):
        try:
            last_result = json.loads(state["last_result"] or "")
        except json.JSONDecodeError:
            last_result = state["last_result"]
    oldest = stats.oldest_created_us if stats else None
    return {
        "healthy": health.healthy,
        "reasons": health.reasons,
        "warnings": health.warnings,
        "service": service,
        "outbox": None
        if stats is None
        else {
            "path": str(outbox_file),
            "records": stats.records,
            "bytes": stats.bytes,
            "max_bytes": stats.max_bytes,
            "fill_ratio": round(stats.fill_ratio, 4),
            "oldest_record": _iso(oldest),
            "oldest_age_s": None if oldest is None else round((now_us - oldest) / 1e6, 1),
            "dropped_total": stats.dropped_total,
            "quarantined_total": stats.quarantined_total,
            "salvaged_total": stats.salvaged_total,
            "unreadable_pages_total": stats.unreadable_pages_total,
            "last_salvage": last_salvage,
            "dropped_disk_full_total": stats.dropped_disk_full_total,
            "disk_full_since": _iso(stats.disk_full_since_us),
            "disk_full_message": stats.disk_full_message,
            "lost_total": stats.lost_total,
            "loss_unknown_total": stats.loss_unknown_total,
            "damage": stats.damage,
            "quarantine": {
                "records": stats.quarantine_records,
                "bytes": stats.quarantine_bytes,
                "max_bytes": stats.max_quarantine_bytes,
                "by_code": dict(stats.quarantined_by_code),
                "evicted_total": stats.quarantine_evicted_total,
                "dropped_total": stats.quarantine_dropped_total,
                "retried_total": stats.quarantine_retried_total,
            },
        },
        "sync": {
            "aggregator": aggregator_url,
            "reachable": reachable,
            "last_attempt": _iso(_int(state.get("last_attempt_us"))),
            "last_success": _iso(_int(state.get("last_success_us"))),
            "last_error": state.get("last_error"),
            "last_error_kind": state.get("last_error_kind"),
            "last_result": last_result,
        },
    }


def render(doc: dict[str, Any]) -> str:
    warnings = doc.get("warnings") or []
    lines = [
        f"health      {'OK' if doc['healthy'] else 'UNHEALTHY'}"
        + (f" with {plural(len(warnings), 'warning')}" if warnings else "")
    ]
    lines += [f"  - {reason}" for reason in doc["reasons"]]
    lines += [f"  WARNING: {warning}" for warning in warnings]
    svc = doc.get("service")
    if svc is None:
        lines.append("service     never ran here (lens-agent run)")
    else:
        running = "running" if svc["running"] else "not running"
        lines.append(
            f"service     {running}, {svc.get('state')} (pid {svc.get('pid')}, since {svc.get('started_at')}, "
            f"heartbeat {svc['heartbeat_age_s']:.0f} s ago)"
        )
        model = svc.get("model") or {}
        if model:
            lines.append(
                f"  model     {model.get('name')} ({model.get('quantization')}), loaded {model.get('loaded_at')} "
                f"in {model.get('load_ms', 0):.0f} ms"
            )
        for name, run in (svc.get("last_runs") or {}).items():
            if "skipped" in run:
                lines.append(f"  last run  {name} at {run['at']}: skipped — {run['skipped']}")
            elif "error" in run:
                lines.append(f"  last run  {name} at {run['at']}: failed — {run['error']}")
            else:
                joules = run.get("j_per_output_token")
                lines.append(
                    f"  last run  {name} at {run['at']}: TTFT p50 {_num(run.get('ttft_p50_ms'))} ms, "
                    f"p95 {_num(run.get('ttft_p95_ms'))} ms, {_num(run.get('tokens_per_second'))} tok/s, "
                    f"{_num(joules, 4) + ' J/token' if joules is not None else 'J/token unknown'}, "
                    f"{plural(int(run.get('errors') or 0), 'error')}" + _contended(run) + _guarded(run)
                )
        for name, at in (svc.get("next_runs") or {}).items():
            lines.append(f"  next run  {name} at {at}")
        lines.append(f"  power     {svc.get('power_source') or 'no power source (lens-agent probe says why)'}")
    box = doc["outbox"]
    if box is None:
        lines.append(f"outbox      {doc.get('outbox_unreadable') or 'none yet'}")
    else:
        lines += [
            f"outbox      {box['path']}",
            f"  records   {box['records']} ({human_size(box['bytes'])}, {box['fill_ratio']:.1%} of "
            f"{human_size(box['max_bytes'])})",
            f"  oldest    {box['oldest_record'] or '-'}"
            + (f" ({box['oldest_age_s']:.0f} s ago)" if box["oldest_age_s"] is not None else ""),
            f"  dropped   {box['dropped_total']}   quarantined {box['quarantined_total']}"
            f"   salvaged {box['salvaged_total']}   unreadable pages {box['unreadable_pages_total']}",
        ]
        quarantine = box["quarantine"]
        lines.append(
            f"  quarantine {quarantine['records']} kept ({human_size(quarantine['bytes'])}); left: evicted "
            f"{quarantine['evicted_total']}, dropped {quarantine['dropped_total']}, retried "
            f"{quarantine['retried_total']} (lens-agent outbox list)"
        )
        if box["lost_total"] or box["loss_unknown_total"]:
            unknown = f" (+ unknown: {box['loss_unknown_total']} salvages)" if box["loss_unknown_total"] else ""
            lines.append(f"  lost      {plural(box['lost_total'], 'record')} to damage{unknown}")
        if box["disk_full_since"]:
            lines.append(
                f"  disk full since {box['disk_full_since']}; {plural(box['dropped_disk_full_total'], 'record')} "
                "dropped for it"
            )
        if box["last_salvage"]:
            lines.append(f"  salvage   {box['last_salvage']}")
    sync = doc["sync"]
    reach = {True: "reachable", False: "unreachable", None: "not checked"}[sync["reachable"]]
    lines += [
        f"aggregator  {sync['aggregator'] or 'not configured'} ({reach})",
        f"  last sync {sync['last_attempt'] or 'never'}; last success {sync['last_success'] or 'never'}",
    ]
    if sync["last_error"]:
        lines.append(f"  error     {sync['last_error']}")
    tune = doc.get("tune")
    if tune is not None:
        lines.append(f"tuning      {tune['line']}")
    for i, job in enumerate(doc.get("campaigns") or []):
        progress = job.get("progress_percent")
        done = f"{progress:.0f} %, " if progress is not None else ""
        levels = f"{job.get('levels_done')}/{job.get('levels_total')} levels" if job.get("levels_total") else "-"
        reason = f" — {job['reason']}" if job.get("reason") else ""
        head = "campaigns  " if i == 0 else "           "
        lines.append(f"{head} {job.get('benchmark_id')} {job.get('state')} ({done}{levels}){reason}")
    return "\n".join(lines)
